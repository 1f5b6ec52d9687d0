"""aten's flash attention (FlashAttention 2) as one of our kernels: ``(out, lse)`` and
``(dq, dk, dv)`` in the ops' conventions, from the parameter objects.

aten needs ``max_q``/``max_k`` as ints and serves none of the optional inputs or softcap
(``varlen_compile.eligibility.aten_unsupported`` says so before anything calls here). It reads
``cu_seq`` as given, so both functions pass it through the offset sanitizer first (docs/design.md
§6): traced, captured and compiled calls cannot check it on the host.
"""

from __future__ import annotations

import dataclasses

import torch

from varlen_compile import _compat
from varlen_compile.params import AttnOptions, BatchLayout

from .launcher import sanitized_offsets

__all__ = ["backward", "forward"]


def sanitized(layout: BatchLayout, total_q: int, total_k: int) -> BatchLayout:
    """``layout`` with ``prefix_max(clamp(cu_seq, 0, T))`` offsets (a well-formed ``cu_seq`` is
    unchanged): the Triton sanitizer's one launch, or where Triton is not installed the same
    rule in torch ops."""
    if _compat.has_triton():
        cu_seq_q, cu_seq_k, _ = sanitized_offsets(layout.cu_seq_q, layout.cu_seq_k, None, total_q, total_k)
    else:
        cu_seq_q, cu_seq_k = (
            torch.cummax(cu_seq.clamp(0, total), dim=0).values
            for cu_seq, total in ((layout.cu_seq_q, total_q), (layout.cu_seq_k, total_k))
        )
    return dataclasses.replace(layout, cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k)


def _window_sizes(options: AttnOptions) -> dict[str, int]:
    """aten flash's window keywords: our sides, with one of ``2**31 - 1`` or more unbounded
    (``AttnOptions.window``; FlashAttention's int32 block arithmetic would wrap around on it).
    Causal calls keep their own right side: aten sets it to 0 under ``is_causal``."""
    left, right = options.window()
    return {"window_size_left": left, "window_size_right": options.window_right if options.is_causal else right}


def forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_forward`` (dropout off): ``(out, lse)`` as aten returns them."""
    layout = sanitized(layout, query.shape[0], key.shape[0])
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k, 0.0,
        options.is_causal, False, scale=options.scale_for(query.shape[-1]),
        **_window_sizes(options),
    )
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_backward`` (dropout off): ``(dq, dk, dv)``."""
    layout = sanitized(layout, query.shape[0], key.shape[0])
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)  # dropout is off
    unused = torch.empty(0, device=query.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out, query, key, value, out, lse, layout.cu_seq_q, layout.cu_seq_k,
        layout.max_q, layout.max_k, 0.0, options.is_causal, rng_state, unused,
        scale=options.scale_for(query.shape[-1]),
        **_window_sizes(options),
    )
