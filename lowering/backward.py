"""Inductor lowering of ``varlen_compile::varlen_attn_backward`` to the backward Triton template.

Steps: bind the arguments into objects -> decide (template or fallback) -> prepare the inputs,
by name -> ``delta = rowsum(dO * O)`` as plain Inductor ops (``grad_lse``, if any, is its own
input) -> dK layout and the dQ/dV buffers -> which kernels compete (``choices.kernels_for``: the
template configs, FlashAttention 4, aten flash) -> ``autotune_select_algorithm``. (``delta`` is
an input of every choice; when an extern kernel wins, nothing reads it and Inductor drops it.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, lowerings, register_lowering, to_dtype
from torch._inductor.select_algorithm import SymbolicGridFn, autotune_select_algorithm

from varlen_compile.params import bind_op_args

from . import extern_ops
from .choices import ATEN, FA4, TEMPLATE, kernels_for
from .common import (
    append_extern_choices,
    autotune_generators,
    extern_choice,
    extern_scalars,
    gqa_group,
    input_gen_fns,
    lowering_with_fallback,
    make_template,
    optional_input_nodes,
    plan_template,
    prepare_attention_input,
    size_hint,
    template_constants,
)
from .fallback import fallback
from .configs import BackwardConfig, backward_autotune_configs, default_backward_config

__all__ = ["register", "varlen_attn_backward_lowering"]

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
aten_flash_backward_choice = extern_choice("varlen_compile_aten_flash_backward")
fa4_backward_choice = extern_choice("varlen_compile_fa4_backward")


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


def varlen_attn_backward_lowering(*args: Any, **kwargs: Any):
    op = torch.ops.varlen_compile.varlen_attn_backward.default
    bound = bind_op_args(op, args, kwargs)
    plan = plan_template(bound)
    if isinstance(plan, str):
        return fallback(op, plan, args, kwargs)
    head_dim, head_dim_v, layout, options, optional = plan
    if optional.paged:
        return fallback(op, "paged K/V has no backward", args, kwargs)
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
    # The template's inputs by name: the fixed ones, then the optional ones present, in the
    # order of the registry (varlen_bwd.py.jinja's input list is generated from the same).
    inputs = {
        "grad_out": grad_out, "query": query, "key": key, "value": value, "out": out, "lse": lse, "delta": delta,
        "cu_seq_q": cu_seq_q, "cu_seq_k": cu_seq_k, "grad_query": grad_query, "grad_value": grad_value,
    }
    inputs.update(optional_input_nodes(optional, "backward"))
    input_nodes, names = list(inputs.values()), tuple(inputs)
    num_seqs = cu_seq_q.get_size()[0] - 1

    kernels = kernels_for(bound["kernel"], query, key, layout, options, optional, (head_dim, head_dim_v), backward=True)
    constants = template_constants(options, optional, head_dim, head_dim_v, query.get_dtype(), side="backward")
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
            **constants,
        )
    externs = {
        ATEN: (aten_flash_backward_choice, extern_ops.FLASH_BACKWARD), FA4: (fa4_backward_choice, extern_ops.FA4_BACKWARD),
    }
    append_extern_choices(choices, kernels, externs, input_nodes, layout_dk, names, extern_scalars(layout, options))
    generators = autotune_generators(cu_seq_q, total_q, cu_seq_k, total_k)
    grad_key = autotune_select_algorithm(
        "varlen_attn_bwd", choices, input_nodes, layout_dk, input_gen_fns=input_gen_fns(names, generators)
    )
    return grad_query, grad_key, grad_value


def register() -> None:
    """Register the lowering for the backward op (which must exist)."""
    op = torch.ops.varlen_compile.varlen_attn_backward.default
    register_lowering(op, type_promotion_kind=None)(lowering_with_fallback(op, varlen_attn_backward_lowering))
