"""Inductor lowering of ``varlen_compile::varlen_attn`` to the forward Triton template.

Steps: bind the arguments into objects -> decide (template or fallback) -> prepare the inputs,
by name -> output layout and the lse buffer -> which kernels compete (``choices.kernels_for``:
the template configs, FlashAttention 4, aten flash) -> ``autotune_select_algorithm``.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, register_lowering
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
    template_constants,
)
from .fallback import fallback
from .configs import (
    ForwardConfig,
    default_forward_config,
    forward_autotune_configs,
    pack_gqa_group,
    page_size_constexpr,
    paged_config,
)

__all__ = ["register", "varlen_attn_lowering"]


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
aten_flash_forward_choice = extern_choice("varlen_compile_aten_flash_forward")
fa4_forward_choice = extern_choice("varlen_compile_fa4_forward")


def _configs(head_dim: int, dtype: torch.dtype) -> list[ForwardConfig]:
    """Configs for the larger of the two head dims (it sizes the biggest tile)."""
    if inductor_config.max_autotune:
        return forward_autotune_configs(head_dim, dtype)
    return [default_forward_config(head_dim, dtype)]


def varlen_attn_lowering(*args: Any, **kwargs: Any):
    op = torch.ops.varlen_compile.varlen_attn.default
    bound = bind_op_args(op, args, kwargs)
    plan = plan_template(bound)
    if isinstance(plan, str):
        return fallback(op, plan, args, kwargs)
    head_dim, head_dim_v, layout, options, optional = plan
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
    # The template's inputs by name: the fixed ones, then the optional ones present, in the
    # order of the registry (varlen_fwd.py.jinja's input list is generated from the same).
    inputs = {"query": query, "key": key, "value": value, "cu_seq_q": cu_seq_q, "cu_seq_k": cu_seq_k, "lse": lse}
    inputs.update(optional_input_nodes(optional, "forward"))
    input_nodes, names = list(inputs.values()), tuple(inputs)
    num_seqs = cu_seq_q.get_size()[0] - 1

    kernels = kernels_for(bound["kernel"], query, key, layout, options, optional, (head_dim, head_dim_v))
    constants = template_constants(options, optional, head_dim, head_dim_v, query.get_dtype())
    # The page size as a constexpr when static (symbolic under dynamic shapes: never a guard).
    page_size = key.get_size()[1] if optional.paged else None
    static_page = int(page_size) if isinstance(page_size, (int, sympy.Integer)) else None
    constants.update(page_size_constexpr(optional.paged, static_page))

    # GQA packing needs the group statically (never a guard): symbolic head counts run unpacked.
    group = gqa_group(query, key)
    static_group = int(group) if group.is_Integer else 1

    choices: list[Any] = []
    configs = [paged_config(c, optional.paged) for c in _configs(max(head_dim, head_dim_v), query.get_dtype())]
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
            **constants,
        )
    externs = {
        ATEN: (aten_flash_forward_choice, extern_ops.FLASH_FORWARD), FA4: (fa4_forward_choice, extern_ops.FA4_FORWARD),
    }
    append_extern_choices(choices, kernels, externs, input_nodes, out_layout, names, extern_scalars(layout, options))
    generators = autotune_generators(cu_seq_q, total_q, cu_seq_k, key.get_size()[0])
    out = autotune_select_algorithm(
        "varlen_attn_fwd", choices, input_nodes, out_layout, input_gen_fns=input_gen_fns(names, generators)
    )
    return out, lse


def register() -> None:
    """Register the lowering for the forward op (which must exist)."""
    op = torch.ops.varlen_compile.varlen_attn.default
    register_lowering(op, type_promotion_kind=None)(lowering_with_fallback(op, varlen_attn_lowering))
