"""aten flash attention shaped for Inductor's autotuner (private ops, CUDA only).

A template choice returns one tensor and writes the others into buffers it mutates (out + lse
in the forward, dK + dQ/dV in the backward). For aten flash to compete as an extern choice it
must keep the same contract, so these ops return the template's output and copy the rest into
the mutated buffers. The lowerings offer them only when ``max_q``/``max_k`` are known (no sync).
"""

from __future__ import annotations

import torch

from .backends import aten_flash_backward, aten_flash_forward
from .params import AttnOptions, BatchLayout, unflatten

__all__ = ["flash_backward_for_autotune", "flash_backward_into", "flash_forward_for_autotune", "flash_forward_into"]


@torch.library.custom_op("varlen_compile::_flash_forward_into", mutates_args=("lse_out",))
def flash_forward_into(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse_out: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
) -> torch.Tensor:
    """``out`` ``(T_q, H_q, D)``; writes the float32 ``(H_q, T_q)`` log-sum-exp into ``lse_out``."""
    out, lse = aten_flash_forward(query, key, value, *unflatten(locals()))
    lse_out.copy_(lse)
    return out.contiguous()


@flash_forward_into.register_fake
def _flash_forward_into_fake(query, *args):
    return query.new_empty(query.shape)


def _host_maxima(layout: BatchLayout) -> BatchLayout:
    """``layout`` with the real maxima read off ``cu_seq`` (a host sync: autotuning only)."""
    def longest(cu_seq: torch.Tensor) -> int:
        return int((cu_seq[1:] - cu_seq[:-1]).max()) if cu_seq.numel() > 1 else 0

    return BatchLayout(layout.cu_seq_q, layout.cu_seq_k, longest(layout.cu_seq_q), longest(layout.cu_seq_k))


def flash_forward_for_autotune(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    lse_out: torch.Tensor,
    *,
    options: AttnOptions,
    hints: tuple[object, object],
) -> torch.Tensor:
    """What the autotuner times for the aten choice: the aten call alone (no copies), on the
    autotuner's own ``cu_seq`` inputs (their maxima, not the graph's ``hints``)."""
    layout = _host_maxima(BatchLayout(cu_seq_q, cu_seq_k))
    return aten_flash_forward(query, key, value, layout, options)[0]


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
    grad_query_out: torch.Tensor,
    grad_value_out: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
) -> torch.Tensor:
    """``dk``; writes ``dq`` and ``dv`` into the given buffers."""
    dq, dk, dv = aten_flash_backward(grad_out, query, key, value, out, lse, *unflatten(locals()))
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
    *,
    options: AttnOptions,
    hints: tuple[object, object],
) -> torch.Tensor:
    """What the autotuner times for the aten backward choice: the aten call alone."""
    layout = _host_maxima(BatchLayout(cu_seq_q, cu_seq_k))
    return aten_flash_backward(grad_out, query, key, value, out, lse, layout, options)[1]
