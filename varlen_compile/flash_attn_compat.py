"""A drop-in for FlashAttention 2's ``flash_attn_varlen_func``, on :func:`varlen_compile.varlen_attn`.

Code written for FA2 switches by changing one import::

    from varlen_compile.flash_attn_compat import flash_attn_varlen_func   # was: from flash_attn import ...

Same signature, argument meanings and return conventions as FA2 (``flash_attn_interface.py``):
q ``(total_q, H_q, D)``, k/v ``(total_k, H_kv, D)`` with ``H_q`` a multiple of ``H_kv``, int32
``cu_seqlens_*``, causal masking aligned bottom-right, ``window_size=(left, right)`` with -1 for
unbounded, and with ``return_attn_probs=True`` the tuple ``(out, softmax_lse, None)`` with
``softmax_lse`` float32 ``(H_q, total_q)``, as FA2 returns it when ``dropout_p == 0`` (FA2 computes
the probabilities only under dropout, for its tests). What differs, and why:

- ``max_seqlen_q``/``max_seqlen_k`` are only hints: ints are passed on, a one-element integer
  tensor is ignored (reading it would be a host sync). Our kernels do not need them.
- Arguments are checked as strictly as :func:`varlen_compile.varlen_attn` checks its own (its
  rules in :mod:`varlen_compile.validation`), and errors name this function's arguments:
  ``causal``, ``deterministic`` and ``return_attn_probs`` must be bools, ``cu_seqlens_*`` int32
  tensors (FA2 requires int32 too; nothing is cast), ``softmax_scale`` a finite float or None.
- ``dropout_p`` and ``softcap`` default to ``None`` (off) rather than FA2's ``0.0``; ``0.0`` means
  the same. A float default would make Dynamo restart its analysis once under ``dynamic=True``.
- ``deterministic=True`` gives bitwise-repeatable gradients, as FA2 promises: the call runs our
  Triton kernels (forward and backward; their backward sums with no atomics), or the exact
  reference where they cannot serve it, whatever ``varlen_compile.config.kernel`` says.
  ``deterministic=False`` leaves the choice to the config; ``torch.use_deterministic_algorithms(True)``
  keeps every backward off aten flash and FA4 (whose backwards sum dQ with atomics) too.
- ``softcap`` and ``alibi_slopes`` (``(H_q,)`` float32 slopes, FA2's convention) run in our
  kernels, forward and backward; ``(batch, H_q)`` slopes are not supported.
- Not supported, each a ``ValueError``: ``dropout_p > 0``, ``block_table`` (FA2's paged
  varlen layout differs from torch's; use :func:`varlen_compile.varlen_attn` with
  ``block_table`` and ``seqused_k``).

Works eagerly and under ``torch.compile(fullgraph=True)`` (FA2's own function graph-breaks).
"""

from __future__ import annotations

import torch

from .api import attend
from .eligibility import TEMPLATE
from .validation import Caller, check_dropout, check_flag, check_hint

__all__ = ["flash_attn_varlen_func"]

FLASH_ATTN_VARLEN_FUNC = Caller(
    "flash_attn_varlen_func (varlen_compile)",
    {
        "query": "q", "key": "k", "value": "v", "cu_seq_q": "cu_seqlens_q", "cu_seq_k": "cu_seqlens_k",
        "max_q": "max_seqlen_q", "max_k": "max_seqlen_k", "is_causal": "causal", "scale": "softmax_scale",
    },
)


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
    ``return_attn_probs=True``. Every argument is checked as :func:`varlen_compile.varlen_attn`
    checks its own, and errors name this function's arguments."""
    caller = FLASH_ATTN_VARLEN_FUNC
    check_dropout(caller, "dropout_p", dropout_p, "pass dropout_p=0.0, or call flash_attn's own function for dropout")
    if block_table is not None:
        raise ValueError(
            caller.message(
                "block_table is not supported (FA2's paged layout differs from torch's); pass block_table=None, "
                "or call varlen_compile.varlen_attn(..., block_table=, seqused_k=)"
            )
        )
    deterministic = check_flag(caller, "deterministic", deterministic)
    return_attn_probs = check_flag(caller, "return_attn_probs", return_attn_probs)
    out, lse = attend(
        caller, q, k, v, cu_seqlens_q, cu_seqlens_k, check_hint(caller, "max_q", max_seqlen_q, ignore_tensor=True),
        check_hint(caller, "max_k", max_seqlen_k, ignore_tensor=True), causal, scale=softmax_scale, window_size=window_size,
        enable_gqa=True, softcap=softcap, alibi_slopes=alibi_slopes, kernel=TEMPLATE if deterministic else None,
    )
    return (out, lse, None) if return_attn_probs else out

