"""The custom ops ``torch.ops.varlen_compile.varlen_attn`` and ``varlen_attn_backward``.

Layout of this module: the forward op and its fake, the backward op and its fake, autograd
(``setup_context`` / ``backward``), then FLOP formulas. The public, validated entry point is
:func:`varlen_compile.varlen_attn`; these ops trust their inputs.

The schemas are the flat form of :class:`~varlen_compile.params.BatchLayout`,
:class:`~varlen_compile.params.AttnOptions` and :class:`~varlen_compile.params.OptionalInputs`:
each op body binds its arguments by name and hands the objects on. ``max_q``/``max_k`` are optional hints (``SymInt?``): the Triton kernels never
need them, aten flash does. ``scale=None`` means ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from . import backends, reference
from ._tracing import is_traced
from .params import (
    OPTIONAL_INPUTS,
    AttnOptions,
    BatchLayout,
    OptionalInputs,
    argument_names,
    bind_op_args,
    op_kwargs,
    lse_dtype,
    unflatten,
)

__all__ = ["attention_flops", "call_backward", "call_forward", "varlen_attn_backward_op", "varlen_attn_op"]


@torch.library.custom_op("varlen_compile::varlen_attn", mutates_args=())
def varlen_attn_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int | None,
    max_k: int | None,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
    sink: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(T_q, H_q, D_v)`` in the input dtype, lse ``(H_q, T_q)`` float32
    (float64 for float64 inputs: :func:`~varlen_compile.params.lse_dtype`).

    ``key``/``value`` are ``(T_k, H_kv, D / D_v)``, or pages ``(pages, page_size, H_kv, D / D_v)``
    with ``block_table`` (then ``cu_seq_k`` is not read). ``kernel``: the preferred kernel,
    ``varlen_compile.config.kernel`` when the call was made (``"auto"``, ``"triton"``, ``"fa4"``
    or ``"aten"``; see :mod:`varlen_compile.config`)."""
    layout, options, optional = unflatten(locals())
    return backends.forward(query, key, value, layout, options, optional, kernel)


@varlen_attn_op.register_fake
def _varlen_attn_fake(query, key, value, *flat_params, **kwargs):
    total_q, num_heads, _ = query.shape
    out = query.new_empty((total_q, num_heads, value.shape[-1]))
    lse = query.new_empty((num_heads, total_q), dtype=lse_dtype(query.dtype))
    return out, lse


@torch.library.custom_op("varlen_compile::varlen_attn_backward", mutates_args=())
def varlen_attn_backward_op(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int | None,
    max_k: int | None,
    is_causal: bool,
    scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float = 0.0,
    sink: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``(query, key, value)``.

    ``grad_lse`` (float32 ``(H_q, T_q)``) is the gradient flowing into ``lse``, or None. The
    sink's gradient is not computed here (it is a reduction over lse: see ``_backward``).
    Paged K/V (``block_table``) has no backward. ``kernel`` as in the forward op (the forward's
    value reaches the backward through autograd); whichever kernel ran the forward, ``lse``
    follows one convention (``+inf`` for rows with no key), so any kernel can run the backward.
    """
    layout, options, optional = unflatten(locals())
    return backends.backward(grad_out, query, key, value, out, lse, layout, options, optional, kernel)


@varlen_attn_backward_op.register_fake
def _varlen_attn_backward_fake(grad_out, query, key, value, *flat_params, **kwargs):
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
    )


def _kernel_kwargs(kernel: str) -> dict[str, str]:
    """``kernel`` as an op keyword, left out at its default (captured graphs stay as they were)."""
    return {} if kernel == "auto" else {"kernel": kernel}


def call_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions,
    optional: OptionalInputs, kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op on objects: ``(out, lse)``."""
    return varlen_attn_op(
        query, key, value, **op_kwargs(_FORWARD_ARGS, layout, options, optional), **_kernel_kwargs(kernel)
    )


def call_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    optional: OptionalInputs,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op on objects: ``(dq, dk, dv)``; ``optional`` may hold ``grad_lse``."""
    return varlen_attn_backward_op(
        grad_out, query, key, value, out, lse, **op_kwargs(_BACKWARD_ARGS, layout, options, optional),
        **_kernel_kwargs(kernel),
    )


# ---------------------------------------------------------------------------- autograd

_FORWARD = torch.ops.varlen_compile.varlen_attn.default
_BACKWARD = torch.ops.varlen_compile.varlen_attn_backward.default
_FORWARD_ARGS, _BACKWARD_ARGS = argument_names(_FORWARD), argument_names(_BACKWARD)
_DIFFERENTIABLE = ("query", "key", "value")
_ARG_INDEX = {argument.name: index for index, argument in enumerate(_FORWARD._schema.arguments)}
# What the backward needs, saved by name: the fixed tensors, then the forward op's optional inputs.
_SAVED_FIXED = ("query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k")
_SAVED_OPTIONAL = tuple(spec.name for spec in OPTIONAL_INPUTS if spec.name in _ARG_INDEX)
_SAVED = _SAVED_FIXED + _SAVED_OPTIONAL


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    args = bind_op_args(_FORWARD, inputs, {})
    args["out"], args["lse"] = output
    layout, ctx.options, _ = unflatten(args)
    ctx.save_for_backward(*(args[name] for name in _SAVED))
    ctx.hints = (layout.max_q, layout.max_k)
    ctx.kernel = args["kernel"]
    # Unused outputs get None instead of zeros: an unused lse keeps the aten flash backward.
    ctx.set_materialize_grads(False)


def _backward(
    ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    saved = dict(zip(_SAVED, ctx.saved_tensors))
    query, key, value, out, lse = (saved[name] for name in ("query", "key", "value", "out", "lse"))
    optional = OptionalInputs({name: saved[name] for name in _SAVED_OPTIONAL}, grad_lse=grad_lse)
    if optional.paged:
        raise NotImplementedError(
            "varlen_attn: paged K/V (block_table) is forward-only (as in torch.nn.attention.varlen); "
            "run the backward on contiguous K/V, or call it under torch.no_grad()"
        )
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    layout = BatchLayout(saved["cu_seq_q"], saved["cu_seq_k"], *ctx.hints)
    grads = dict(zip(_DIFFERENTIABLE, call_backward(
        grad_out, query, key, value, out, lse, layout, ctx.options, optional, ctx.kernel
    )))
    if "sink" in optional and ctx.needs_input_grad[_ARG_INDEX["sink"]]:
        sink = optional["sink"]
        grads["sink"] = reference.sink_grad(sink, lse, grad_out, out, grad_lse).to(sink.dtype)
    return tuple(grads.get(argument.name) for argument in _FORWARD._schema.arguments)


varlen_attn_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_double_backward(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    pass


def _double_backward(ctx: Any, *grads: Any) -> None:
    raise RuntimeError(
        "varlen_attn does not support double backward (gradients of gradients). "
        "Differentiate through varlen_compile.reference.attention_forward instead if you need it."
    )


varlen_attn_backward_op.register_autograd(_double_backward, setup_context=_setup_double_backward)


# ---------------------------------------------------------------------------- FLOP counting


def _attended_pairs(len_q: int, len_k: int, window_left: int, window_right: int) -> int:
    """Number of (query, key) pairs one sequence attends under the window (closed form per row)."""
    if len_q <= 0 or len_k <= 0:
        return 0
    diagonal = torch.arange(len_q, dtype=torch.int64) + (len_k - len_q)
    first = (diagonal - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(diagonal)
    last = (diagonal + window_right).clamp(max=len_k - 1) if window_right >= 0 else torch.full_like(diagonal, len_k - 1)
    return int((last - first + 1).clamp(min=0).sum())


def _sequence_lengths(
    cu_seq: torch.Tensor, max_len: int | None, total: int
) -> list[int]:
    """Real lengths when ``cu_seq`` is readable; else ``max_len`` per sequence (an upper bound),
    or, without a hint, the whole batch as one sequence (also an upper bound)."""
    if not is_traced(cu_seq):
        return (cu_seq[1:] - cu_seq[:-1]).tolist()
    if max_len is not None:
        return [int(max_len)] * (cu_seq.shape[0] - 1)
    return [int(total)]


def _key_lengths(key_shape: torch.Size, layout: BatchLayout, optional: OptionalInputs) -> list[int]:
    """Keys each sequence uses: its ``cu_seq_k`` slot (or block-table capacity), cut to
    ``seqused_k`` when it is given and readable."""
    num_seqs = layout.cu_seq_q.shape[0] - 1
    if optional.paged:
        slots = [optional["block_table"].shape[1] * key_shape[1]] * num_seqs
    else:
        slots = _sequence_lengths(layout.cu_seq_k, layout.max_k, key_shape[0])
    seqused_k = optional.get("seqused_k")
    if seqused_k is not None and not is_traced(seqused_k):
        used = seqused_k.tolist()
        slots = [min(max(u, 0), s) for u, s in zip(used, slots)] if len(slots) == len(used) else slots
    return slots


def attention_flops(
    query_shape: torch.Size, key_shape: torch.Size, layout: BatchLayout, options: AttnOptions,
    optional: OptionalInputs, value_head_dim: int | None = None,
) -> int:
    """Forward FLOPs actually attended: ``2 * (D + D_v) * H_q * sum(attended pairs)`` (the
    two matmuls ``Q K^T`` and ``P V``; ``4 * D * ...`` when ``D_v == D``).

    Unlike aten's count, causal and window masks and ``seqused_k`` are taken into account.
    Softcap, sinks and ALiBi add elementwise work only (not counted, as in FlashAttention's
    own accounting). The backward does ``2 * (3 D + 2 D_v)`` per pair (five matmuls including
    the recomputation of ``Q K^T``): 2.5x the forward when ``D_v == D``.
    """
    _, num_heads, head_dim = query_shape
    head_dim_v = head_dim if value_head_dim is None else value_head_dim
    lengths_q = _sequence_lengths(layout.cu_seq_q, layout.max_q, query_shape[0])
    lengths_k = _key_lengths(key_shape, layout, optional)
    pairs = sum(_attended_pairs(lq, lk, *options.window()) for lq, lk in zip(lengths_q, lengths_k))
    return 2 * (head_dim + head_dim_v) * num_heads * pairs


@register_flop_formula(torch.ops.varlen_compile.varlen_attn, get_raw=True)
def _varlen_attn_flop(*args, out_val=None, **kwargs) -> int:
    bound = bind_op_args(_FORWARD, args, kwargs)
    return attention_flops(
        bound["query"].shape, bound["key"].shape, *unflatten(bound), value_head_dim=bound["value"].shape[-1]
    )


@register_flop_formula(torch.ops.varlen_compile.varlen_attn_backward, get_raw=True)
def _varlen_attn_backward_flop(*args, out_val=None, **kwargs) -> int:
    bound = bind_op_args(_BACKWARD, args, kwargs)
    head_dim, head_dim_v = bound["query"].shape[-1], bound["value"].shape[-1]
    forward = attention_flops(
        bound["query"].shape, bound["key"].shape, *unflatten(bound), value_head_dim=head_dim_v
    )
    return forward * (3 * head_dim + 2 * head_dim_v) // (head_dim + head_dim_v)
