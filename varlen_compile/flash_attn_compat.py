"""A drop-in for FlashAttention 2's ``flash_attn_varlen_func``, on :func:`varlen_compile.varlen_attn`.

Code written for FA2 switches by changing one import::

    from varlen_compile.flash_attn_compat import flash_attn_varlen_func   # was: from flash_attn import ...

Same signature, argument meanings and return conventions as FA2 (``flash_attn_interface.py``):
q ``(total_q, H_q, D)``, k/v ``(total_k, H_kv, D)`` with ``H_q`` a multiple of ``H_kv``, int32
``cu_seqlens_*``, causal masking aligned bottom-right, ``window_size=(left, right)`` with -1 for
unbounded, and with ``return_attn_probs=True`` the tuple ``(out, softmax_lse, None)`` with
``softmax_lse`` float32 ``(H_q, total_q)``, as FA2 returns it when ``dropout_p == 0`` (FA2 computes
the probabilities only under dropout, for its tests). What differs, and why:

- ``max_seqlen_q``/``max_seqlen_k`` are only hints: ints are passed on, a tensor is ignored
  (reading it would be a host sync). Our kernels do not need them.
- ``dropout_p`` and ``softcap`` default to ``None`` (off) rather than FA2's ``0.0``; ``0.0`` means
  the same. A float default would make Dynamo restart its analysis once under ``dynamic=True``.
- ``deterministic`` is accepted either way: our backward is always deterministic (no atomics).
- ``softcap`` and ``alibi_slopes`` (``(H_q,)`` float32 slopes, FA2's convention) run in our
  kernels, forward and backward; ``(batch, H_q)`` slopes are not supported.
- Not supported yet, each a ``ValueError``: ``dropout_p > 0``, ``block_table`` (FA2's paged
  varlen layout differs from torch's; use :func:`varlen_compile.varlen_attn` with
  ``block_table`` and ``seqused_k``).

Works eagerly and under ``torch.compile(fullgraph=True)`` (FA2's own function graph-breaks).
"""

from __future__ import annotations

import torch

from .api import AuxRequest, varlen_attn

__all__ = ["flash_attn_varlen_func"]


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    dropout_p: float | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """FlashAttention 2's ``flash_attn_varlen_func`` (see the module docstring for the few
    differences). Returns ``out`` ``(total_q, H_q, D)``, or ``(out, softmax_lse, None)`` with
    ``return_attn_probs=True``."""
    unsupported = {
        "dropout_p": (dropout_p not in (None, 0.0), dropout_p, 0.0),
        "block_table": (block_table is not None, block_table, None),
    }
    for name, (given, value, default) in unsupported.items():
        if given:
            raise ValueError(
                f"flash_attn_varlen_func (varlen_compile): {name} is not supported yet (got {_describe(value)}); "
                f"pass {name}={default!r}, or call flash_attn's own function for this feature"
            )
    out, lse = varlen_attn(
        q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        _hint(max_seqlen_q), _hint(max_seqlen_k), bool(causal),
        scale=softmax_scale, window_size=tuple(window_size), enable_gqa=q.shape[1] != k.shape[1],
        return_aux=AuxRequest(lse=True), softcap=None if softcap is None else float(softcap), alibi_slopes=alibi_slopes,
    )
    if return_attn_probs:
        return out, lse, None
    return out


def _hint(max_seqlen: object) -> int | None:
    """FA2 takes ints; a tensor (or anything else) is dropped rather than read with a sync."""
    if isinstance(max_seqlen, (int, torch.SymInt)) and not isinstance(max_seqlen, bool):
        return max_seqlen
    return None


def _describe(value: object) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
