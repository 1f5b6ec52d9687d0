"""Inductor lowering of ``varlen_compile::varlen_attn`` to the forward Triton template.

Steps: bind the arguments into objects -> decide (template or fallback) -> prepare inputs ->
output layout and the lse buffer -> which kernels compete (``choices.kernels_for``: the template
configs, FlashAttention 4, aten flash) -> ``autotune_select_algorithm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, register_lowering
from torch._inductor.select_algorithm import (
    ExternKernelChoice,
    SymbolicGridFn,
    autotune_select_algorithm,
)
from torch._inductor.virtualized import V

from varlen_compile import _extern_ops
from varlen_compile.params import AttnOptions, BatchLayout, bind_op_args, op_kwargs

from .common import (
    arange_int32_rows,
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
from .configs import (
    ForwardConfig,
    default_forward_config,
    forward_autotune_configs,
    pack_gqa_group,
    page_size_constexpr,
    paged_config,
)

__all__ = ["varlen_attn_lowering"]

_OP = torch.ops.varlen_compile.varlen_attn.default


@SymbolicGridFn
def varlen_fwd_grid(total_q, heads_q, num_seqs, meta, *, cdiv):
    """How is the forward parallelized? One program per (query tile slot, query head).

    ``cdiv(T_q, BLOCK_M) + N`` slots cover every tile of every sequence (see
    ``varlen_find_tile``): bounded by total tokens, never ``max_len * N``. With GQA packing
    (``PACK_GQA`` = G > 1) a slot is ``BLOCK_M // G`` positions and a program serves the G query
    heads of one kv head: ``(cdiv(T_q, BLOCK_M // G) + N, H_q // G)``.
    """
    pack = meta["PACK_GQA"]
    return (cdiv(total_q, meta["BLOCK_M"] // pack) + num_seqs, heads_q // pack, 1)


varlen_fwd_template = make_template("varlen_attn_fwd", varlen_fwd_grid, "varlen_fwd")


def _aten_forward_node(
    query, key, value, cu_seq_q, cu_seq_k, lse, *, options: AttnOptions, hints: tuple[Any, Any]
) -> ir.IRNode:
    """Output node when the aten choice wins: aten flash writing into our lse buffer."""
    layout = BatchLayout(cu_seq_q, cu_seq_k, *hints)
    op = torch.ops.varlen_compile._flash_forward_into.default
    return ir.FallbackKernel.create(op, query, key, value, lse, *op_kwargs(op, layout, options).values())


aten_flash_forward_choice = ExternKernelChoice(
    _extern_ops.flash_forward_for_autotune,
    name="varlen_compile_aten_flash_forward",
    has_out_variant=False,
    kernel_creator=_aten_forward_node,
)


def _fa4_forward_node(
    query, key, value, cu_seq_q, cu_seq_k, lse, *optional, options: AttnOptions, has_seqused_k: bool
) -> ir.IRNode:
    """Output node when the FA4 choice wins: FA4 writing into our lse buffer."""
    seqused_k, sink = _extern_ops.split_fa4_optional(optional, has_seqused_k)
    op = torch.ops.varlen_compile._fa4_forward_into.default
    return ir.FallbackKernel.create(
        op, query, key, value, lse, cu_seq_q, cu_seq_k, options.is_causal, options.scale,
        options.window_left, options.window_right, options.softcap, sink, seqused_k,
    )


fa4_forward_choice = ExternKernelChoice(
    _extern_ops.fa4_forward_for_autotune,
    name="varlen_compile_fa4_forward",
    has_out_variant=False,
    kernel_creator=_fa4_forward_node,
)


def _configs(head_dim: int, dtype: torch.dtype) -> list[ForwardConfig]:
    """Configs for the larger of the two head dims (it sizes the biggest tile)."""
    if inductor_config.max_autotune:
        return forward_autotune_configs(head_dim, dtype)
    return [default_forward_config(head_dim, dtype)]


@register_lowering(_OP, type_promotion_kind=None)
def varlen_attn_lowering(*args: Any, **kwargs: Any):
    bound = bind_op_args(_OP, args, kwargs)
    plan = plan_template(bound)
    if isinstance(plan, str):
        return fallback(_OP, plan, args, kwargs)
    head_dim, head_dim_v, layout, options = plan
    query, key, value = (prepare_attention_input(bound[name]) for name in ("query", "key", "value"))
    cu_seq_q, cu_seq_k = (prepare_attention_input(x) for x in (layout.cu_seq_q, layout.cu_seq_k))

    total_q, heads_q, _ = query.get_size()
    device = query.get_device()
    out_size = [total_q, heads_q, head_dim_v]
    out_layout = ir.FixedLayout(
        device, query.get_dtype(), out_size, ir.FlexibleLayout.contiguous_strides(out_size)
    )
    # NOTE (as in flex attention): a template has one output; lse is a buffer it mutates.
    lse = empty_strided([heads_q, total_q], None, dtype=torch.float32, device=device)
    input_nodes = [query, key, value, cu_seq_q, cu_seq_k, lse]
    # Optional inputs after the fixed ones, in the order varlen_fwd.py.jinja lists them.
    input_nodes += feature_inputs(layout, options, ("seqused_k", "block_table", "sink", "alibi_slopes"))
    num_seqs = cu_seq_q.get_size()[0] - 1

    kernels = kernels_for(bound["kernel"], query, key.get_size()[-2], head_dim, head_dim_v, layout, options)
    constants = template_constants(options, layout, head_dim, head_dim_v, query.get_dtype())
    # The page size as a constexpr when static (symbolic under dynamic shapes: never a guard).
    page_size = key.get_size()[1] if layout.paged else None
    page_constants = page_size_constexpr(layout.paged, int(page_size) if isinstance(page_size, (int, sympy.Integer)) else None)

    # GQA packing needs the group statically (never a guard): symbolic head counts run unpacked.
    group = gqa_group(query, key)
    static_group = int(group) if group.is_Integer else 1

    choices: list[Any] = []
    configs = [paged_config(c, layout.paged) for c in _configs(max(head_dim, head_dim_v), query.get_dtype())]
    for config in configs if TEMPLATE in kernels else ():
        varlen_fwd_template.maybe_append_choice(
            choices,
            input_nodes=input_nodes,
            layout=out_layout,
            mutated_inputs=[lse],
            call_sizes=[total_q, heads_q, num_seqs],
            num_stages=config.num_stages,
            num_warps=config.num_warps,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            PACK_GQA=pack_gqa_group(config, static_group),
            **{**constants, **page_constants},
        )
    if ATEN in kernels:
        aten_flash_forward_choice.maybe_append_choice(
            choices, input_nodes=input_nodes, layout=out_layout,
            options=options, hints=(layout.max_q, layout.max_k),
        )
    if FA4 in kernels:
        # The sink is an input node; the choice keeps only the scalar options.
        fa4_forward_choice.maybe_append_choice(
            choices, input_nodes=input_nodes, layout=out_layout,
            options=dataclasses.replace(options, sink=None), has_seqused_k=layout.seqused_k is not None,
        )
    input_gen_fns = {
        3: cu_seq_generator(size_hint(cu_seq_q.get_size()[0]), size_hint(total_q)),
        4: cu_seq_generator(size_hint(cu_seq_k.get_size()[0]), size_hint(key.get_size()[0])),
    }
    optional_index = 6  # seqused_k, then block_table, follow the six fixed inputs
    if layout.seqused_k is not None:
        # Autotuning data: every key used (the kernel clamps seqused_k to the slot).
        input_gen_fns[optional_index] = full_int32(2**30)
        optional_index += 1
    if layout.paged:
        # Autotuning data: pages in order (the kernel clamps entries to the pool).
        input_gen_fns[optional_index] = arange_int32_rows()
    out = autotune_select_algorithm("varlen_attn_fwd", choices, input_nodes, out_layout, input_gen_fns=input_gen_fns)
    return out, lse
