"""Standalone launcher: runs the shared Triton kernels eagerly, without Inductor.

Eager mode uses it on CUDA where aten flash attention cannot serve a call (fp32, head dims
aten rejects, gradients through ``lse``, no max hints: CUDA-graph capture or a compiled graph
that falls back to the op). It never reads ``cu_seq`` on the host. Tests run it on the CPU under
``TRITON_INTERPRET=1``. The kernels are ``standalone.py.jinja`` on top of
``varlen_common.py.jinja``: the very ``@triton.jit`` code the Inductor templates append.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import types

import torch

from varlen_compile.params import AttnOptions, BatchLayout

from ._sources import load_template
from .configs import (
    BackwardConfig,
    ForwardConfig,
    backward_constexprs,
    default_backward_config,
    default_forward_config,
    kernel_constexprs,
    pack_gqa_group,
    page_size_constexpr,
    paged_config,
    padded_head_dim,
)

__all__ = ["attention_delta", "backward", "forward"]

_PRELUDE = "import triton\nimport triton.language as tl\n"


@functools.cache
def _kernels() -> types.ModuleType:
    """Build the kernel module once. ``triton.jit`` reads the source through ``inspect``, so the
    text is registered with ``linecache`` under a stable name. (Triton fixes interpreter mode
    when it is imported: set ``TRITON_INTERPRET=1`` before the process starts to run these on
    the CPU.)"""
    source = _PRELUDE + load_template("standalone") + load_template("varlen_common")
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    filename = f"<varlen_compile-kernels-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("varlen_compile_standalone_kernels")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pointer(tensor: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """A feature's tensor, or any tensor where the feature is off (its pointer is never read)."""
    return fallback if tensor is None else tensor


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    config: ForwardConfig | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(T_q, H_q, D_v)`` (contiguous, or the given ``out``, any strides
    with a contiguous last dim), lse float32 ``(H_q, T_q)``.

    Inputs as in :func:`varlen_compile.varlen_attn` (any strides with a contiguous last dim;
    paged K/V ``(pages, page_size, H_kv, D)`` with ``layout.block_table``). Grid
    ``(cdiv(T_q, BLOCK_M) + N, H_q)``: one program per query tile slot and head; with
    ``config.pack_gqa`` where :func:`~.configs.pack_gqa_group` allows it (group G = H_q // H_kv),
    ``(cdiv(T_q, BLOCK_M // G) + N, H_kv)``: one program per slot of ``BLOCK_M // G`` positions
    and kv head, all G query heads in one tile.
    """
    total_q, heads_q, head_dim = query.shape
    head_dim_v = value.shape[-1]
    heads_kv = key.shape[-2]
    num_seqs = layout.cu_seq_q.shape[0] - 1
    config = config or paged_config(default_forward_config(max(head_dim, head_dim_v), query.dtype), layout.paged)
    if out is None:
        out = query.new_empty((total_q, heads_q, head_dim_v))
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=query.device)
    pack = pack_gqa_group(config, heads_q // max(heads_kv, 1))
    grid = (_cdiv(total_q, config.block_m // pack) + num_seqs, heads_q // pack)
    if grid[0] * grid[1] == 0:
        return out, lse
    if layout.paged:
        num_pages, page_size = key.shape[0], key.shape[1]
        total_k = num_pages * page_size
        stride_kp, stride_kt, stride_kh = key.stride()[:3]
        stride_vp, stride_vt, stride_vh = value.stride()[:3]
        block_table = layout.block_table
        stride_bt, max_pages = block_table.stride(0), block_table.shape[1]
    else:
        num_pages, page_size, total_k = 1, 1, key.shape[0]
        stride_kp = stride_vp = 0
        stride_kt, stride_kh = key.stride()[:2]
        stride_vt, stride_vh = value.stride()[:2]
        block_table, stride_bt, max_pages = lse, 0, 0
    _kernels().varlen_fwd_kernel[grid](
        query, key, value, layout.cu_seq_q, layout.cu_seq_k, out, lse,
        _pointer(layout.seqused_k, lse), block_table,
        _pointer(options.sink, lse), _pointer(options.alibi_slopes, lse),
        num_seqs, total_q, total_k, heads_q // heads_kv,
        query.stride(0), query.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
        stride_kp, stride_vp, stride_bt, page_size, num_pages, max_pages,
        out.stride(0), out.stride(1), options.scale_for(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, PACK_GQA=pack,
        **{**kernel_constexprs(options, layout, head_dim, head_dim_v, query.dtype, query.is_cuda),
           **page_size_constexpr(layout.paged, page_size)},
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def attention_delta(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``rowsum(dO * O)`` as float32 ``(H_q, T_q)``, the backward's row term."""
    total_q, heads_q, head_dim = out.shape
    delta = torch.empty((heads_q, total_q), dtype=torch.float32, device=out.device)
    block_t = 64
    grid = (_cdiv(total_q, block_t), heads_q)
    if grid[0] * grid[1] == 0:
        return delta
    _kernels().varlen_bwd_preprocess_kernel[grid](
        out, grad_out, delta, total_q, heads_q,
        out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        BLOCK_T=block_t, HEAD_DIM=head_dim, HEAD_DIM_PAD=padded_head_dim(head_dim),
    )
    return delta


def backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    grad_lse: torch.Tensor | None = None,
    config: BackwardConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``(query, key, value)``. Not for paged K/V.

    Grid ``(cdiv(T_k, BLOCK_N1) + N + group * (cdiv(T_q, BLOCK_M2) + N), H_kv)``: key-tile
    programs (dK, dV over the GQA group), then query-tile programs (dQ), in one launch.
    """
    if layout.paged:
        raise NotImplementedError("varlen_attn: no backward for paged K/V (block_table)")
    total_q, heads_q, head_dim = query.shape
    total_k, heads_kv, head_dim_v = value.shape
    num_seqs = layout.cu_seq_q.shape[0] - 1
    group = heads_q // heads_kv
    config = config or default_backward_config(max(head_dim, head_dim_v), query.dtype, group)
    delta = attention_delta(grad_out, out)
    # grad_lse stays apart from delta: see varlen_keep_softmax_grad in the kernels.
    grad_lse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else None
    lse = lse.contiguous()
    dq = query.new_empty((total_q, heads_q, head_dim))
    dk = key.new_empty((total_k, heads_kv, head_dim))
    dv = value.new_empty((total_k, heads_kv, head_dim_v))
    kv_slots = _cdiv(total_k, config.block_n1) + num_seqs
    q_slots = _cdiv(total_q, config.block_m2) + num_seqs
    grid = (kv_slots + group * q_slots, heads_kv)
    if grid[0] * grid[1] == 0:
        return dq, dk, dv
    _kernels().varlen_bwd_kernel[grid](
        query, key, value, grad_out, lse, delta, _pointer(grad_lse, delta), layout.cu_seq_q, layout.cu_seq_k,
        _pointer(layout.seqused_k, delta), _pointer(options.alibi_slopes, delta), dq, dk, dv,
        num_seqs, total_q, total_k, group,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), grad_out.stride(0), grad_out.stride(1),
        dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        options.scale_for(head_dim),
        BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1,
        BLOCK_M2=config.block_m2, BLOCK_N2=config.block_n2, HAS_GRAD_LSE=grad_lse is not None,
        **backward_constexprs(options, layout, head_dim, head_dim_v, query.dtype, query.is_cuda),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dq, dk, dv

