"""FlashAttention 4 (``flash-attn-4``, CuTe DSL) as one of our kernels.

FA4 is fast on Hopper and Blackwell but not compile-friendly on its own (Dynamo refuses its
``autograd.Function``). Behind our ops it is just another kernel: the eager backends call it when
``config.kernel == "fa4"``, and the Inductor lowerings offer it as an extern choice
(:mod:`.extern_ops`). Both call the two functions here, which adapt our conventions to FA4's:

- window sizes: ours use ``-1`` for an unbounded side, FA4 ``None``;
- offsets: FA4 trusts ``cu_seq``/``seqused_k``; compiled and captured calls cannot check them,
  so they pass through the offset sanitizer first (:func:`.launcher.sanitized_offsets`, one tiny
  launch): no out-of-bounds access whatever ``cu_seq`` holds (docs/design.md §6);
- lse: the same ``(H_q, T_q)`` float32 layout, written straight into the caller's buffer; rows
  that attend no key get ``+inf`` (FlashAttention 2's and our convention) where FA4 may write
  ``-inf``, so our backward kernels and aten flash's accept it whichever forward ran;
- ``max_seqlen_q``/``max_seqlen_k`` are never passed: FA4 then bounds its grid by the token
  counts (no host sync, valid for any CUDA-graph replay) and an understated hint cannot make
  it skip rows;
- the optional inputs go to FA4's keywords as the registry names them
  (``varlen_compile.params.OPTIONAL_INPUTS``); the sink's gradient is ours (``ops``), so FA4's
  backward runs without the sink: with lse including the sink, dQ/dK/dV do not depend on it;
- ``seqused_k``: keys past a sequence's used length get zero dK/dV (FA4 leaves them unwritten);
- FA4's per-call Python runs once per shapes and options; later calls launch the kernels it
  chose directly (:mod:`.fa4_replay`).

What FA4 can serve is decided in ``varlen_compile.eligibility.fa4_unsupported``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from varlen_compile import _compat
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs, Side, optional_inputs_of

from .fa4_replay import Replayer
from .launcher import sanitized_offsets

__all__ = ["backward", "forward"]

_FORWARD, _BACKWARD = (Replayer(name, audited=_compat.fa4_replay_audited) for name in ("_flash_attn_fwd", "_flash_attn_bwd"))
"""FA4's two calls, replayed per shapes and options without FA4's Python (:mod:`.fa4_replay`)."""


def _window(options: AttnOptions, total_q: int, total_k: int) -> tuple[int | None, int | None]:
    """FA4's window sides: ``None`` where unbounded (ours: ``-1``), and also where the side is at
    least the token count (then it cannot exclude a key, and FA4's int32 index arithmetic could
    overflow on a huge value)."""
    left, right = options.window_left, options.window_right
    return (None if left < 0 or left >= total_k else left), (None if right < 0 or right >= total_q else right)


@functools.lru_cache(maxsize=512)
def _fixed_keywords(options: AttnOptions, head_dim: int, total_q: int, total_k: int) -> dict[str, Any]:
    """FA4's keywords that follow from the options and sizes alone, the same for the forward
    and the backward: worked out once per call site and token counts (the host path is hot: a
    compiled graph calls this every step). Callers pass it on with ``**`` and never mutate it."""
    left, right = _window(options, total_q, total_k)
    return dict(
        softmax_scale=options.scale_for(head_dim), causal=options.is_causal, softcap=options.softcap,
        window_size_left=left, window_size_right=right, max_seqlen_q=None, max_seqlen_k=None,
    )


def _sanitized(
    layout: BatchLayout, optional: OptionalInputs, total_q: int, total_k: int
) -> tuple[torch.Tensor, torch.Tensor, OptionalInputs]:
    """``cu_seq_q``, ``cu_seq_k`` and the optional inputs with ``seqused_k`` made safe."""
    seqused_k = optional.get("seqused_k")
    cu_seq_q, cu_seq_k, seqused_k = sanitized_offsets(layout.cu_seq_q, layout.cu_seq_k, seqused_k, total_q, total_k)
    return cu_seq_q, cu_seq_k, optional if seqused_k is None else OptionalInputs(optional, seqused_k=seqused_k)


_FA4_KEYWORDS: dict[Side, tuple[tuple[str, str], ...]] = {
    side: tuple((spec.fa4, spec.name) for spec in optional_inputs_of(side) if spec.fa4 is not None)
    for side in ("forward", "backward")
}
"""Per side: ``(FA4 keyword, registry name)`` of every optional input the kernel reads that FA4 takes."""


def _keywords(optional: OptionalInputs, side: Side) -> dict[str, torch.Tensor | None]:
    """FA4's keyword for every optional input the ``side`` kernel reads (None where absent)."""
    return {keyword: optional.get(name) for keyword, name in _FA4_KEYWORDS[side]}


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    optional: OptionalInputs,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as the forward op returns them: out ``(T_q, H_q, D_v)``, lse float32
    ``(H_q, T_q)`` (written into ``lse`` when given, contiguous)."""
    interface, _ = _compat.fa4_interface()
    total_q, heads_q, head_dim = query.shape
    total_k = key.shape[0]
    cu_seq_q, cu_seq_k, optional = _sanitized(layout, optional, total_q, total_k)
    if lse is None:
        lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=query.device)
    out, lse, *_ = _FORWARD(
        interface, q=query, k=key, v=value, cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k, return_lse=True, lse=lse,
        **_fixed_keywords(options, head_dim, total_q, total_k), **_keywords(optional, "forward"),
    )
    # Rows with no key: +inf as in our kernels and aten flash (FA4 may write -inf there).
    lse.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=float("inf"))
    return out, lse


def backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    optional: OptionalInputs,
    grad_query: torch.Tensor | None = None,
    grad_value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` shaped like ``(query, key, value)`` (dQ/dV written into the given
    buffers when any; dK contiguous); the sink's gradient is not computed here (see the module
    docstring)."""
    interface, _ = _compat.fa4_interface()
    total_q, total_k = query.shape[0], key.shape[0]
    cu_seq_q, cu_seq_k, optional = _sanitized(layout, optional, total_q, total_k)
    # Contiguous, as the ops' fakes say (``empty_like`` would copy the strides of a view).
    grad_key = key.new_empty(key.shape)
    if "seqused_k" in optional:  # FA4 leaves the rows of unused keys unwritten
        grad_key.zero_()
        grad_value = value.new_zeros(value.shape) if grad_value is None else grad_value.zero_()
    dq, dk, dv = _BACKWARD(
        interface, q=query, k=key, v=value, out=out, dout=grad_out, lse=lse, cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k,
        dq=grad_query, dk=grad_key, dv=grad_value,
        **_fixed_keywords(options, query.shape[-1], total_q, total_k), **_keywords(optional, "backward"),
    )[:3]
    return dq, dk, dv
