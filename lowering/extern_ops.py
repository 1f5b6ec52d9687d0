"""aten flash attention and FlashAttention 4 shaped for Inductor's autotuner: private ops (CUDA
only), and what the autotuner times for each.

A template choice returns one tensor and writes the others into buffers it mutates (out + lse
in the forward, dK + dQ/dV in the backward). For an external kernel to compete as an extern
choice it must keep the same contract, so these ops return the template's output and write the
rest into the mutated buffers: aten flash by a copy (it allocates its own outputs), FA4 directly
(it takes output buffers). Both trust ``cu_seq``; their adapters (:mod:`.aten`, :mod:`.fa4`)
pass it through the offset sanitizer.
Their arguments carry the names of the op schemas and of the registry of optional inputs
(``varlen_compile.params``), so a choice binds the template's inputs to them by name
(:func:`op_arguments`). Which kernel may compete is decided in
``varlen_compile.eligibility``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs, unflatten

from . import aten, fa4

__all__ = ["FA4_BACKWARD", "FA4_FORWARD", "FLASH_BACKWARD", "FLASH_FORWARD", "op_arguments", "timed"]

_LIB = torch.library.Library("varlen_compile", "FRAGMENT")
_PYTHON: dict[str, Callable[..., torch.Tensor]] = {}


def _lean_op(name: str, *, mutates_args: tuple[str, ...]):
    """Define ``varlen_compile::<name>`` from the decorated function (schema inferred as
    ``torch.library.custom_op`` would) with its implementation registered straight on the CUDA
    and CPU dispatch keys. ``custom_op`` would wrap every call in Python layers (autograd,
    ADInplaceOrView, an aliasing check): about 40 us per call on the H200, paid by each FA4 or
    aten-flash call in a compiled graph. These ops only run inside compiled graphs (and in the
    autotuner), on tensors that never require grad, so none of those layers has work to do."""

    def define(function):
        schema = torch.library.infer_schema(function, mutates_args=mutates_args)
        _LIB.define(name + schema)
        for dispatch_key in ("CUDA", "CPU"):
            _LIB.impl(name, function, dispatch_key)
        _PYTHON[name] = function
        return function

    return define


def _fake(name: str):
    return torch.library.register_fake(f"varlen_compile::{name}", lib=_LIB)


def op_arguments(op: torch._ops.OpOverload, values: Mapping[str, Any]) -> list[Any]:
    """``op``'s arguments in schema order, each taken from ``values`` by name (an optional
    argument ``values`` lacks is None)."""
    arguments = []
    for argument in op._schema.arguments:
        if argument.name in values:
            arguments.append(values[argument.name])
        elif isinstance(argument.type, torch.OptionalType):
            arguments.append(None)
        else:
            raise KeyError(f"{op}: no value for its argument {argument.name!r}")
    return arguments


@functools.lru_cache(maxsize=512)
def _options(is_causal: bool, scale: float | None, window_left: int, window_right: int, softcap: float) -> AttnOptions:
    """The :class:`AttnOptions` of an FA4 extern call, built once per compiled call site (these
    ops are on the host's hot path: :func:`unflatten` would rebuild it on every call)."""
    return AttnOptions(
        is_causal=is_causal, scale=scale, window_left=window_left, window_right=window_right, softcap=softcap
    )


_NO_OPTIONAL = OptionalInputs()


def _optional(**tensors: torch.Tensor | None) -> OptionalInputs:
    return OptionalInputs(tensors) if any(t is not None for t in tensors.values()) else _NO_OPTIONAL


FLASH_FORWARD, FLASH_BACKWARD = "_flash_forward_into", "_flash_backward_into"
FA4_FORWARD, FA4_BACKWARD = "_fa4_forward_into", "_fa4_backward_into"


@_lean_op(FLASH_FORWARD, mutates_args=("lse",))
def flash_forward_into(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
) -> torch.Tensor:
    """``out`` ``(T_q, H_q, D)``; writes the float32 ``(H_q, T_q)`` log-sum-exp into ``lse``."""
    layout, options, _ = unflatten(locals())
    out, lse_aten = aten.forward(query, key, value, layout, options)
    lse.copy_(lse_aten)
    return out.contiguous()


@_fake(FLASH_FORWARD)
def _flash_forward_into_fake(query, *args):
    return query.new_empty(query.shape)


@_lean_op(FLASH_BACKWARD, mutates_args=("grad_query", "grad_value"))
def flash_backward_into(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_query: torch.Tensor,
    grad_value: torch.Tensor,
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
    layout, options, _ = unflatten(locals())
    dq, dk, dv = aten.backward(grad_out, query, key, value, out, lse, layout, options)
    grad_query.copy_(dq)
    grad_value.copy_(dv)
    return dk.contiguous()


@_fake(FLASH_BACKWARD)
def _flash_backward_into_fake(grad_out, query, key, *args):
    return key.new_empty(key.shape)


@_lean_op(FA4_FORWARD, mutates_args=("lse",))
def fa4_forward_into(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
    seqused_k: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` ``(T_q, H_q, D_v)``; FA4 writes the float32 ``(H_q, T_q)`` lse into ``lse``."""
    options = _options(is_causal, scale, window_left, window_right, softcap)
    optional = _optional(seqused_k=seqused_k, sink=sink)
    return fa4.forward(query, key, value, BatchLayout(cu_seq_q, cu_seq_k), options, optional, lse=lse)[0]


@_fake(FA4_FORWARD)
def _fa4_forward_into_fake(query, key, value, *args, **kwargs):
    return query.new_empty((query.shape[0], query.shape[1], value.shape[-1]))


@_lean_op(FA4_BACKWARD, mutates_args=("grad_query", "grad_value"))
def fa4_backward_into(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_query: torch.Tensor,
    grad_value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
    grad_lse: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dk``; FA4 writes ``dq`` and ``dv`` into the given buffers."""
    options = _options(is_causal, scale, window_left, window_right, softcap)
    optional = _optional(grad_lse=grad_lse, seqused_k=seqused_k)
    return fa4.backward(
        grad_out, query, key, value, out, lse, BatchLayout(cu_seq_q, cu_seq_k), options, optional,
        grad_query=grad_query, grad_value=grad_value,
    )[1]


@_fake(FA4_BACKWARD)
def _fa4_backward_into_fake(grad_out, query, key, *args, **kwargs):
    return key.new_empty(key.shape)


def _longest(cu_seq: torch.Tensor) -> int:
    return int((cu_seq[1:] - cu_seq[:-1]).max()) if cu_seq.numel() > 1 else 0


def timed(*inputs: torch.Tensor, op: str, names: Sequence[str], scalars: Mapping[str, Any]) -> torch.Tensor:
    """What the autotuner times for the extern choice of the private op ``op``, on the
    template's inputs (``inputs``, named ``names``) and the call's scalars. The aten choices
    time the aten call alone (no copies into our buffers), with the real maxima of the
    autotuner's own ``cu_seq`` inputs (a host read: autotuning only), not the graph's hints."""
    values = {**scalars, **dict(zip(names, inputs))}
    if op in (FLASH_FORWARD, FLASH_BACKWARD):
        layout, options, _ = unflatten({**values, "max_q": _longest(values["cu_seq_q"]),
                                        "max_k": _longest(values["cu_seq_k"])})
        if op == FLASH_FORWARD:
            return aten.forward(values["query"], values["key"], values["value"], layout, options)[0]
        return aten.backward(
            *(values[name] for name in ("grad_out", "query", "key", "value", "out", "lse")), layout, options
        )[1]
    return _PYTHON[op](*op_arguments(getattr(torch.ops.varlen_compile, op).default, values))

