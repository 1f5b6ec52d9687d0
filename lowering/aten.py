"""aten's flash attention (FlashAttention 2) as one of our kernels: ``(out, lse)`` and
``(dq, dk, dv)`` in the ops' conventions, from the parameter objects.

aten needs ``max_q``/``max_k`` as ints and serves none of the optional inputs or softcap
(``varlen_compile.eligibility.aten_unsupported`` says so before anything calls here).
"""

from __future__ import annotations

import torch

from varlen_compile.params import AttnOptions, BatchLayout

__all__ = ["backward", "forward"]


def forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_forward`` (dropout off): ``(out, lse)`` as aten returns them."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k, 0.0,
        options.is_causal, False, scale=options.scale_for(query.shape[-1]),
        window_size_left=options.window_left, window_size_right=options.window_right,
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
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)  # dropout is off
    unused = torch.empty(0, device=query.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out, query, key, value, out, lse, layout.cu_seq_q, layout.cu_seq_k,
        layout.max_q, layout.max_k, 0.0, options.is_causal, rng_state, unused,
        scale=options.scale_for(query.shape[-1]),
        window_size_left=options.window_left, window_size_right=options.window_right,
    )
