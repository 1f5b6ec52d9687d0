"""aten flash attention and FlashAttention 4 shaped for Inductor's autotuner (private ops, CUDA
only).

A template choice returns one tensor and writes the others into buffers it mutates (out + lse
in the forward, dK + dQ/dV in the backward). For an external kernel to compete as an extern
choice it must keep the same contract, so these ops return the template's output and write the
rest into the mutated buffers: aten flash by a copy (it allocates its own outputs), FA4 directly
(it takes output buffers). The lowerings offer aten flash only when ``max_q``/``max_k`` are
known (no sync), FA4 where ``_fa4.unsupported`` finds nothing against it.
"""

from __future__ import annotations

import torch

from . import _fa4
from .backends import aten_flash_backward, aten_flash_forward
from .params import AttnOptions, BatchLayout, unflatten

_LIB = torch.library.Library("varlen_compile", "FRAGMENT")


def _lean_op(name: str, *, mutates_args: tuple[str, ...]):
    """Define ``varlen_compile::<name>`` from the decorated function (schema inferred as
    ``torch.library.custom_op`` would) with its implementation registered straight on the CUDA
    and CPU dispatch keys. ``custom_op`` would wrap every call in Python layers (autograd,
    ADInplaceOrView, an aliasing check): about 40 us per call on the H200, paid by each FA4 or
    aten-flash call in a compiled graph. These ops only run inside compiled graphs (and in the
    autotuner), on tensors that never require grad, so none of those layers has work to do.
    The function is returned unchanged (a direct Python call skips the dispatcher)."""

    def define(function):
        schema = torch.library.infer_schema(function, mutates_args=mutates_args)
        _LIB.define(name + schema)
        for dispatch_key in ("CUDA", "CPU"):
            _LIB.impl(name, function, dispatch_key)
        return function

    return define


def _fake(name: str):
    return torch.library.register_fake(f"varlen_compile::{name}", lib=_LIB)


__all__ = [
    "fa4_backward_for_autotune",
    "fa4_backward_into",
    "fa4_forward_for_autotune",
    "fa4_forward_into",
    "split_fa4_backward_optional",
    "split_fa4_optional",
    "flash_backward_for_autotune",
    "flash_backward_into",
    "flash_forward_for_autotune",
    "flash_forward_into",
]


@_lean_op("_flash_forward_into", mutates_args=("lse_out",))
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


@_fake("_flash_forward_into")
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


@_lean_op("_flash_backward_into", mutates_args=("grad_query_out", "grad_value_out"))
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


@_fake("_flash_backward_into")
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


# ---------------------------------------------------------------------------- FlashAttention 4


@_lean_op("_fa4_forward_into", mutates_args=("lse_out",))
def fa4_forward_into(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse_out: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
    sink: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` ``(T_q, H_q, D_v)``; FA4 writes the float32 ``(H_q, T_q)`` lse into ``lse_out``."""
    layout, options = unflatten(locals())
    return _fa4.forward(query, key, value, layout, options, lse=lse_out)[0]


@_fake("_fa4_forward_into")
def _fa4_forward_into_fake(query, key, value, *args, **kwargs):
    return query.new_empty((query.shape[0], query.shape[1], value.shape[-1]))


def fa4_forward_for_autotune(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    lse_out: torch.Tensor,
    *optional: torch.Tensor,
    options: AttnOptions,
    has_seqused_k: bool,
) -> torch.Tensor:
    """What the autotuner times for the FA4 choice, on the forward template's inputs (after the
    six fixed ones: ``seqused_k`` if ``has_seqused_k``, then the sink if ``options`` has one)."""
    seqused_k, sink = split_fa4_optional(optional, has_seqused_k)
    return fa4_forward_into(query, key, value, lse_out, cu_seq_q, cu_seq_k, **_fa4_scalars(options), sink=sink, seqused_k=seqused_k)


def split_fa4_optional(optional: tuple, has_seqused_k: bool) -> tuple:
    """The forward template's optional inputs as FA4 takes them: ``(seqused_k or None, sink or
    None)`` (FA4 is offered only without ``block_table`` and ALiBi, which sit between them)."""
    optional = list(optional)
    seqused_k = optional.pop(0) if has_seqused_k else None
    return seqused_k, (optional.pop(0) if optional else None)


def split_fa4_backward_optional(optional: tuple, has_grad_lse: bool, has_seqused_k: bool) -> tuple:
    """The backward template's optional inputs as FA4 takes them: ``(grad_lse or None,
    seqused_k or None)`` (ALiBi, which may follow, is never offered to FA4)."""
    optional = list(optional)
    grad_lse = optional.pop(0) if has_grad_lse else None
    return grad_lse, (optional.pop(0) if has_seqused_k else None)


def _fa4_scalars(options: AttnOptions) -> dict:
    return dict(
        is_causal=options.is_causal, scale=options.scale, window_left=options.window_left,
        window_right=options.window_right, softcap=options.softcap,
    )


@_lean_op("_fa4_backward_into", mutates_args=("grad_query_out", "grad_value_out"))
def fa4_backward_into(
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
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
    seqused_k: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dk``; FA4 writes ``dq`` and ``dv`` into the given buffers."""
    layout, options = unflatten(locals())
    return _fa4.backward(
        grad_out, query, key, value, out, lse, layout, options, grad_lse,
        grad_query=grad_query_out, grad_value=grad_value_out,
    )[1]


@_fake("_fa4_backward_into")
def _fa4_backward_into_fake(grad_out, query, key, *args, **kwargs):
    return key.new_empty(key.shape)


def fa4_backward_for_autotune(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    grad_query: torch.Tensor,
    grad_value: torch.Tensor,
    *optional: torch.Tensor,
    options: AttnOptions,
    has_grad_lse: bool,
    has_seqused_k: bool,
) -> torch.Tensor:
    """What the autotuner times for the FA4 backward choice, on the backward template's inputs
    (``delta`` is the template's; FA4 computes its own)."""
    grad_lse, seqused_k = split_fa4_backward_optional(optional, has_grad_lse, has_seqused_k)
    return fa4_backward_into(
        grad_out, query, key, value, out, lse, grad_query, grad_value, cu_seq_q, cu_seq_k,
        **_fa4_scalars(options), seqused_k=seqused_k, grad_lse=grad_lse,
    )
