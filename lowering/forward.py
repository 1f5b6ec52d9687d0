"""Inductor lowering of ``varlen_compile::varlen_attn`` to the forward Triton template.

Steps: decide (template or fallback) -> prepare inputs -> output layout and the lse buffer ->
configs -> choices (template configs, plus aten flash under max-autotune) ->
``autotune_select_algorithm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import empty_strided, register_lowering
from torch._inductor.select_algorithm import (
    ExternKernelChoice,
    SymbolicGridFn,
    autotune_select_algorithm,
)

from varlen_compile import _extern_ops, backends
from varlen_compile.reference import effective_window

from .common import (
    cu_seq_generator,
    fallback,
    kernel_constants,
    make_template,
    prepare_attention_input,
    size_hint,
    use_template,
)
from .configs import ForwardConfig, default_forward_config, forward_autotune_configs

__all__ = ["varlen_attn_lowering"]

_OP = torch.ops.varlen_compile.varlen_attn.default


@SymbolicGridFn
def varlen_fwd_grid(total_q, heads_q, num_seqs, meta, *, cdiv):
    """How is the forward parallelized? One program per (query tile slot, query head).

    ``cdiv(T_q, BLOCK_M) + N`` slots cover every tile of every sequence (see
    ``varlen_find_tile``): bounded by total tokens, never ``max_len * N``.
    """
    return (cdiv(total_q, meta["BLOCK_M"]) + num_seqs, heads_q, 1)


varlen_fwd_template = make_template("varlen_attn_fwd", varlen_fwd_grid, "varlen_fwd")


def _aten_forward_node(query, key, value, cu_seq_q, cu_seq_k, lse, **kwargs: Any) -> ir.IRNode:
    """Output node when the aten choice wins: aten flash writing into our lse buffer."""
    return ir.FallbackKernel.create(
        torch.ops.varlen_compile._flash_forward_into.default,
        query, key, value, cu_seq_q, cu_seq_k, lse,
        kwargs["max_q"], kwargs["max_k"], kwargs["is_causal"], kwargs["scale"],
        kwargs["window_left"], kwargs["window_right"],
    )


aten_flash_forward_choice = ExternKernelChoice(
    _extern_ops.flash_forward_for_autotune,
    name="varlen_compile_aten_flash_forward",
    has_out_variant=False,
    kernel_creator=_aten_forward_node,
)


def _configs(head_dim: int, dtype: torch.dtype) -> list[ForwardConfig]:
    if inductor_config.max_autotune:
        return forward_autotune_configs(head_dim, dtype)
    return [default_forward_config(head_dim, dtype)]


@register_lowering(_OP, type_promotion_kind=None)
def varlen_attn_lowering(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, window_left, window_right
):
    if not use_template(query):
        return fallback(
            _OP, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
            is_causal, scale, window_left, window_right,
        )
    query, key, value = (prepare_attention_input(x) for x in (query, key, value))
    cu_seq_q, cu_seq_k = (prepare_attention_input(x) for x in (cu_seq_q, cu_seq_k))
    left, right = effective_window(is_causal, window_left, window_right)

    total_q, heads_q, head_dim = query.get_size()
    device = query.get_device()
    layout = ir.FixedLayout(
        device, query.get_dtype(), [total_q, heads_q, head_dim],
        ir.FlexibleLayout.contiguous_strides([total_q, heads_q, head_dim]),
    )
    # NOTE (as in flex attention): a template has one output; lse is a buffer it mutates.
    lse = empty_strided([heads_q, total_q], None, dtype=torch.float32, device=device)
    input_nodes = [query, key, value, cu_seq_q, cu_seq_k, lse]
    num_seqs = cu_seq_q.get_size()[0] - 1

    constants = kernel_constants(query, key, scale, left, right)
    choices: list[Any] = []
    for config in _configs(int(head_dim), query.get_dtype()):
        varlen_fwd_template.maybe_append_choice(
            choices,
            input_nodes=input_nodes,
            layout=layout,
            mutated_inputs=[lse],
            call_sizes=[total_q, heads_q, num_seqs],
            num_stages=config.num_stages,
            num_warps=config.num_warps,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            **constants,
        )
    if _offer_aten(query, max_q, max_k):
        aten_flash_forward_choice.maybe_append_choice(
            choices,
            input_nodes=input_nodes,
            layout=layout,
            max_q=max_q,
            max_k=max_k,
            is_causal=bool(is_causal),
            scale=float(scale),
            window_left=int(window_left),
            window_right=int(window_right),
        )
    out = autotune_select_algorithm(
        "varlen_attn_fwd",
        choices,
        input_nodes,
        layout,
        input_gen_fns={
            3: cu_seq_generator(size_hint(cu_seq_q.get_size()[0]), size_hint(total_q)),
            4: cu_seq_generator(size_hint(cu_seq_k.get_size()[0]), size_hint(key.get_size()[0])),
        },
    )
    return out, lse


def _offer_aten(query: ir.IRNode, max_q: Any, max_k: Any) -> bool:
    """aten flash competes under max-autotune when it can run without a host sync."""
    return (
        inductor_config.max_autotune
        and max_q is not None
        and max_k is not None
        and query.get_dtype() in backends.ATEN_FLASH_DTYPES
        and int(query.get_size()[-1]) % 8 == 0
        and int(query.get_size()[-1]) <= backends.ATEN_FLASH_MAX_HEAD_DIM
    )
