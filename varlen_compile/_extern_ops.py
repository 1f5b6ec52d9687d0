"""aten flash attention shaped for Inductor's autotuner (private ops, CUDA only).

A template choice returns one tensor and writes the others into buffers it mutates (out + lse
in the forward, dK + dQ/dV in the backward). For aten flash to compete as an extern choice it
must keep the same contract, so these ops return the template's output and copy the rest into
the mutated buffers. The lowerings offer them only when ``max_q``/``max_k`` are known (no sync).
"""

from __future__ import annotations

import torch

from .backends import aten_flash_backward, aten_flash_forward, host_max_len

__all__ = ["flash_backward_into", "flash_forward_into"]


@torch.library.custom_op("varlen_compile::_flash_forward_into", mutates_args=("lse_out",))
def flash_forward_into(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    lse_out: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
) -> torch.Tensor:
    """``out`` ``(T_q, H_q, D)``; writes the float32 ``(H_q, T_q)`` log-sum-exp into ``lse_out``."""
    out, lse = aten_flash_forward(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
        is_causal, scale, window_left, window_right,
    )
    lse_out.copy_(lse)
    return out.contiguous()


@flash_forward_into.register_fake
def _flash_forward_into_fake(query, key, value, cu_seq_q, cu_seq_k, lse_out, max_q, max_k, *args):
    return query.new_empty(query.shape)


def flash_forward_for_autotune(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    lse_out: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    **unused_hints: object,
) -> torch.Tensor:
    """What the autotuner times for the aten choice: the aten call alone (no copies)."""
    out, _ = aten_flash_forward(
        query, key, value, cu_seq_q, cu_seq_k,
        host_max_len(cu_seq_q, None), host_max_len(cu_seq_k, None),
        is_causal, scale, window_left, window_right,
    )
    return out


@torch.library.custom_op(
    "varlen_compile::_flash_backward_into", mutates_args=("grad_query_out", "grad_value_out")
)
def flash_backward_into(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    grad_query_out: torch.Tensor,
    grad_value_out: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
) -> torch.Tensor:
    """``dk``; writes ``dq`` and ``dv`` into the given buffers."""
    dq, dk, dv = aten_flash_backward(
        grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k,
        is_causal, scale, window_left, window_right,
    )
    grad_query_out.copy_(dq)
    grad_value_out.copy_(dv)
    return dk.contiguous()


@flash_backward_into.register_fake
def _flash_backward_into_fake(grad_out, query, key, *args):
    return key.new_empty(key.shape)


def flash_backward_for_autotune(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    grad_query_out: torch.Tensor,
    grad_value_out: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    **unused_hints: object,
) -> torch.Tensor:
    """What the autotuner times for the aten backward choice: the aten call alone."""
    _, dk, _ = aten_flash_backward(
        grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k,
        host_max_len(cu_seq_q, None), host_max_len(cu_seq_k, None),
        is_causal, scale, window_left, window_right,
    )
    return dk
