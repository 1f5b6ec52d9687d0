"""Inductor lowering of ``varlen_compile::varlen_attn_backward`` to the backward Triton template.

Steps: bind the arguments into objects -> decide (template or fallback) -> prepare inputs ->
``delta = rowsum(dO * O)`` as plain Inductor ops (``grad_lse``, if any, is its own input) -> dK
layout and the dQ/dV buffers -> which kernels compete (``choices.kernels_for``: the template
configs, FlashAttention 4, aten flash) -> ``autotune_select_algorithm``. (``delta`` is an input
of every choice; when an extern kernel wins, nothing reads it and Inductor drops it.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, lowerings, register_lowering, to_dtype
from torch._inductor.select_algorithm import (
    ExternKernelChoice,
    SymbolicGridFn,
    autotune_select_algorithm,
)

from varlen_compile import _extern_ops
from varlen_compile.params import AttnOptions, BatchLayout, bind_op_args, op_kwargs

from .common import (
    cu_seq_generator,
    fallback,
    feature_inputs,
    full_int32,
    gqa_group,
    make_template,
    prepare_attention_input,
    size_hint,
    plan_template,
    template_constants,
)
from .choices import ATEN, FA4, TEMPLATE, kernels_for
from .configs import BackwardConfig, backward_autotune_configs, default_backward_config

__all__ = ["varlen_attn_backward_lowering"]

_OP = torch.ops.varlen_compile.varlen_attn_backward.default
aten = torch.ops.aten


@SymbolicGridFn
def varlen_bwd_grid(total_q, total_k, heads_kv, num_seqs, group, meta, *, cdiv):
    """How is the backward parallelized? One launch, two kinds of programs per kv head:
    ``cdiv(T_k, BLOCK_N1) + N`` key-tile programs (dK, dV summed over the GQA group), then
    ``group * (cdiv(T_q, BLOCK_M2) + N)`` query-tile programs (dQ of one query head), where
    ``group = H_q // H_kv``."""
    kv_slots = cdiv(total_k, meta["BLOCK_N1"]) + num_seqs
    q_slots = cdiv(total_q, meta["BLOCK_M2"]) + num_seqs
    return (kv_slots + group * q_slots, heads_kv, 1)


varlen_bwd_template = make_template("varlen_attn_bwd", varlen_bwd_grid, "varlen_bwd")


def _aten_backward_node(
    grad_out, query, key, value, out, lse, delta, cu_seq_q, cu_seq_k, grad_query, grad_value,
    *, options: AttnOptions, hints: tuple[Any, Any],
) -> ir.IRNode:
    """Output node when the aten choice wins: aten flash writing dQ/dV into our buffers."""
    layout = BatchLayout(cu_seq_q, cu_seq_k, *hints)
    op = torch.ops.varlen_compile._flash_backward_into.default
    return ir.FallbackKernel.create(
        op, grad_out, query, key, value, out, lse, grad_query, grad_value,
        *op_kwargs(op, layout, options).values(),
    )


def _aten_backward_for_autotune(
    grad_out, query, key, value, out, lse, delta, cu_seq_q, cu_seq_k, grad_query, grad_value,
    *, options: AttnOptions, hints: tuple[Any, Any],
) -> torch.Tensor:
    return _extern_ops.flash_backward_for_autotune(
        grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, options=options, hints=hints
    )


aten_flash_backward_choice = ExternKernelChoice(
    _aten_backward_for_autotune,
    name="varlen_compile_aten_flash_backward",
    has_out_variant=False,
    kernel_creator=_aten_backward_node,
)


def _fa4_backward_node(
    grad_out, query, key, value, out, lse, delta, cu_seq_q, cu_seq_k, grad_query, grad_value, *optional,
    options: AttnOptions, has_grad_lse: bool, has_seqused_k: bool,
) -> ir.IRNode:
    """Output node when the FA4 choice wins: FA4 writing dQ/dV into our buffers."""
    grad_lse, seqused_k = _extern_ops.split_fa4_backward_optional(optional, has_grad_lse, has_seqused_k)
    op = torch.ops.varlen_compile._fa4_backward_into.default
    return ir.FallbackKernel.create(
        op, grad_out, query, key, value, out, lse, grad_query, grad_value, cu_seq_q, cu_seq_k,
        options.is_causal, options.scale, options.window_left, options.window_right, options.softcap,
        seqused_k, grad_lse,
    )


fa4_backward_choice = ExternKernelChoice(
    _extern_ops.fa4_backward_for_autotune,
    name="varlen_compile_fa4_backward",
    has_out_variant=False,
    kernel_creator=_fa4_backward_node,
)


def _configs(head_dim: int, dtype: torch.dtype, group: int) -> list[BackwardConfig]:
    if inductor_config.max_autotune:
        return backward_autotune_configs(head_dim, dtype, group)
    return [default_backward_config(head_dim, dtype, group)]


def _delta(grad_out: ir.IRNode, out: ir.IRNode) -> ir.IRNode:
    """``rowsum(dO * O)``, float32 ``(H_q, T_q)``: a fused Inductor reduction. (A gradient
    into lse goes to the template as its own input, see varlen_keep_softmax_grad.)"""
    product = lowerings[aten.mul](to_dtype(grad_out, torch.float32), to_dtype(out, torch.float32))
    delta = lowerings[aten.sum](lowerings[aten.permute](product, [1, 0, 2]), [2])
    return ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(delta))


@register_lowering(_OP, type_promotion_kind=None)
def varlen_attn_backward_lowering(*args: Any, **kwargs: Any):
    bound = bind_op_args(_OP, args, kwargs)
    plan = plan_template(bound)
    if isinstance(plan, str):
        return fallback(_OP, plan, args, kwargs)
    head_dim, head_dim_v, layout, options = plan
    if layout.paged:
        return fallback(_OP, "paged K/V has no backward", args, kwargs)
    grad_lse = bound["grad_lse"]
    delta = _delta(bound["grad_out"], bound["out"])
    grad_out, query, key, value, out = (
        prepare_attention_input(bound[name]) for name in ("grad_out", "query", "key", "value", "out")
    )
    cu_seq_q, cu_seq_k = (prepare_attention_input(x) for x in (layout.cu_seq_q, layout.cu_seq_k))
    lse = ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(bound["lse"]))

    total_q = query.get_size()[0]
    total_k, heads_kv, _ = key.get_size()
    group = gqa_group(query, key)
    device = query.get_device()
    layout_dk = ir.FixedLayout(
        device, key.get_dtype(), [total_k, heads_kv, head_dim],
        ir.FlexibleLayout.contiguous_strides([total_k, heads_kv, head_dim]),
    )
    # dK goes through store_output (fusable); dQ and dV are buffers the template mutates.
    grad_query = empty_strided(query.get_size(), None, dtype=query.get_dtype(), device=device)
    grad_value = empty_strided(value.get_size(), None, dtype=value.get_dtype(), device=device)
    input_nodes = [
        grad_out, query, key, value, out, lse, delta, cu_seq_q, cu_seq_k, grad_query, grad_value,
    ]
    # Optional inputs last, in the order varlen_bwd.py.jinja lists them (the aten choice,
    # offered only without them, keeps its positional inputs).
    if grad_lse is not None:
        input_nodes.append(
            ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(to_dtype(grad_lse, torch.float32)))
        )
    input_nodes += feature_inputs(layout, options, ("seqused_k", "alibi_slopes"))
    num_seqs = cu_seq_q.get_size()[0] - 1

    kernels = kernels_for(bound["kernel"], query, heads_kv, head_dim, head_dim_v, layout, options, grad_lse is not None)
    constants = template_constants(options, layout, head_dim, head_dim_v, query.get_dtype(), backward=True)
    choices: list[Any] = []
    configs = _configs(max(head_dim, head_dim_v), query.get_dtype(), size_hint(group)) if TEMPLATE in kernels else []
    for config in configs:
        varlen_bwd_template.maybe_append_choice(
            choices,
            input_nodes=input_nodes,
            layout=layout_dk,
            mutated_inputs=[grad_query, grad_value],
            call_sizes=[total_q, total_k, heads_kv, num_seqs, group],
            num_stages=config.num_stages,
            num_warps=config.num_warps,
            BLOCK_M1=config.block_m1,
            BLOCK_N1=config.block_n1,
            BLOCK_M2=config.block_m2,
            BLOCK_N2=config.block_n2,
            HAS_GRAD_LSE=grad_lse is not None,
            **constants,
        )
    if ATEN in kernels:
        aten_flash_backward_choice.maybe_append_choice(
            choices, input_nodes=input_nodes, layout=layout_dk,
            options=options, hints=(layout.max_q, layout.max_k),
        )
    if FA4 in kernels:
        # FA4's backward needs no sink (the op's autograd computes its gradient) and no delta.
        fa4_backward_choice.maybe_append_choice(
            choices, input_nodes=input_nodes, layout=layout_dk,
            options=dataclasses.replace(options, sink=None, alibi_slopes=None),
            has_grad_lse=grad_lse is not None, has_seqused_k=layout.seqused_k is not None,
        )
    input_gen_fns = {
        7: cu_seq_generator(size_hint(cu_seq_q.get_size()[0]), size_hint(total_q)),
        8: cu_seq_generator(size_hint(cu_seq_k.get_size()[0]), size_hint(total_k)),
    }
    if layout.seqused_k is not None:
        # Autotuning data: every key used (the kernel clamps seqused_k to the slot).
        input_gen_fns[11 + (grad_lse is not None)] = full_int32(2**30)
    grad_key = autotune_select_algorithm(
        "varlen_attn_bwd", choices, input_nodes, layout_dk, input_gen_fns=input_gen_fns
    )
    return grad_query, grad_key, grad_value
