"""Standalone launcher: runs the shared Triton kernels eagerly, without Inductor.

Eager mode uses it on CUDA where aten flash attention cannot serve a call (fp32, head dims
aten rejects, gradients through ``lse``, the optional inputs, no max hints: CUDA-graph capture
or a compiled graph that falls back to the op), and FlashAttention 4's calls use its offset
sanitizer. It never reads ``cu_seq`` on the host. Tests run it on the CPU under
``TRITON_INTERPRET=1``. The kernels are ``standalone.py.jinja`` on top of
``varlen_common.py.jinja``: the very ``@triton.jit`` code the Inductor templates append
(docs/design.md §7). Every kernel argument is passed by name; the optional inputs by their
registry names (``varlen_compile.params.OPTIONAL_INPUTS``).
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import types

import torch

from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs, Side, optional_inputs_of

from ._sources import standalone_source
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

__all__ = ["attention_delta", "backward", "forward", "sanitized_offsets"]

_SANITIZE_BLOCK = 1024


@functools.cache
def _kernels() -> types.ModuleType:
    """Build the kernel module once. ``triton.jit`` reads the source through ``inspect``, so the
    text is registered with ``linecache`` under a stable name. (Triton fixes interpreter mode
    when it is imported: set ``TRITON_INTERPRET=1`` before the process starts to run these on
    the CPU.)"""
    source = standalone_source()
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    filename = f"<varlen_compile-kernels-{digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("varlen_compile_standalone_kernels")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _optional_arguments(optional: OptionalInputs, side: Side, unused: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``side`` kernel's optional-input arguments by kernel name: the tensor where present,
    else ``unused`` (a feature that is off never reads its pointer)."""
    return {spec.kernel_name: optional.get(spec.name, unused) for spec in optional_inputs_of(side)}


def _key_arguments(key: torch.Tensor, value: torch.Tensor, optional: OptionalInputs) -> dict[str, int]:
    """The forward's K/V geometry arguments, contiguous or paged ``(pages, page_size, H_kv, D)``."""
    if not optional.paged:
        return dict(
            total_k=key.shape[0], stride_kt=key.stride(0), stride_kh=key.stride(1), stride_vt=value.stride(0),
            stride_vh=value.stride(1), stride_kp=0, stride_vp=0, stride_bt=0, page_size=1, num_pages=1, max_pages=0,
        )
    block_table = optional["block_table"]
    num_pages, page_size = key.shape[0], key.shape[1]
    return dict(
        total_k=num_pages * page_size, stride_kp=key.stride(0), stride_kt=key.stride(1), stride_kh=key.stride(2),
        stride_vp=value.stride(0), stride_vt=value.stride(1), stride_vh=value.stride(2),
        stride_bt=block_table.stride(0), page_size=page_size, num_pages=num_pages, max_pages=block_table.shape[1],
    )


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    optional: OptionalInputs,
    config: ForwardConfig | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(T_q, H_q, D_v)`` (contiguous, or the given ``out``, any strides
    with a contiguous last dim), lse float32 ``(H_q, T_q)``.

    Inputs as in :func:`varlen_compile.varlen_attn` (any strides with a contiguous last dim;
    paged K/V ``(pages, page_size, H_kv, D)`` with ``block_table``). Grid
    ``(cdiv(T_q, BLOCK_M) + N, H_q)``: one program per query tile slot and head; with
    ``config.pack_gqa`` where :func:`~.configs.pack_gqa_group` allows it (group G = H_q // H_kv),
    ``(cdiv(T_q, BLOCK_M // G) + N, H_kv)``: one program per slot of ``BLOCK_M // G`` positions
    and kv head, all G query heads in one tile.
    """
    total_q, heads_q, head_dim = query.shape
    head_dim_v = value.shape[-1]
    heads_kv = key.shape[-2]
    num_seqs = layout.cu_seq_q.shape[0] - 1
    config = config or paged_config(default_forward_config(max(head_dim, head_dim_v), query.dtype), optional.paged)
    if out is None:
        out = query.new_empty((total_q, heads_q, head_dim_v))
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=query.device)
    pack = pack_gqa_group(config, heads_q // max(heads_kv, 1))
    grid = (_cdiv(total_q, config.block_m // pack) + num_seqs, heads_q // pack)
    if grid[0] * grid[1] == 0:
        return out, lse
    keys = _key_arguments(key, value, optional)
    _kernels().varlen_fwd_kernel[grid](
        Q=query, K=key, V=value, CU_Q=layout.cu_seq_q, CU_K=layout.cu_seq_k, OUT=out, LSE=lse,
        **_optional_arguments(optional, "forward", lse),
        num_seqs=num_seqs, total_q=total_q, gqa_group=heads_q // heads_kv,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        scale=options.scale_for(head_dim), **keys,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, PACK_GQA=pack,
        **{**kernel_constexprs(options, optional, head_dim, head_dim_v, query.dtype, query.is_cuda),
           **page_size_constexpr(optional.paged, keys["page_size"])},
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
        OUT=out, DO=grad_out, DELTA=delta, total_q=total_q, heads_q=heads_q,
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_dot=grad_out.stride(0), stride_doh=grad_out.stride(1),
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
    optional: OptionalInputs,
    config: BackwardConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``(query, key, value)``. Not for paged K/V.
    ``optional`` may hold ``grad_lse``, the gradient flowing into lse.

    Grid ``(cdiv(T_k, BLOCK_N1) + N + group * (cdiv(T_q, BLOCK_M2) + N), H_kv)``: key-tile
    programs (dK, dV over the GQA group), then query-tile programs (dQ), in one launch.
    """
    if optional.paged:
        raise NotImplementedError("varlen_attn: no backward for paged K/V (block_table)")
    total_q, heads_q, head_dim = query.shape
    total_k, heads_kv, head_dim_v = value.shape
    num_seqs = layout.cu_seq_q.shape[0] - 1
    group = heads_q // heads_kv
    config = config or default_backward_config(max(head_dim, head_dim_v), query.dtype, group)
    delta = attention_delta(grad_out, out)
    if "grad_lse" in optional:
        # grad_lse stays apart from delta: see varlen_keep_softmax_grad in the kernels.
        optional = OptionalInputs(optional, grad_lse=optional["grad_lse"].to(torch.float32).contiguous())
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
        Q=query, K=key, V=value, DO=grad_out, LSE=lse, DELTA=delta, CU_Q=layout.cu_seq_q, CU_K=layout.cu_seq_k,
        DQ=dq, DK=dk, DV=dv, **_optional_arguments(optional, "backward", delta),
        num_seqs=num_seqs, total_q=total_q, total_k=total_k, gqa_group=group,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_kt=key.stride(0), stride_kh=key.stride(1),
        stride_vt=value.stride(0), stride_vh=value.stride(1), stride_dot=grad_out.stride(0),
        stride_doh=grad_out.stride(1), stride_dqt=dq.stride(0), stride_dqh=dq.stride(1),
        stride_dkt=dk.stride(0), stride_dkh=dk.stride(1), stride_dvt=dv.stride(0), stride_dvh=dv.stride(1),
        scale=options.scale_for(head_dim),
        BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1, BLOCK_M2=config.block_m2, BLOCK_N2=config.block_n2,
        **backward_constexprs(options, optional, head_dim, head_dim_v, query.dtype, query.is_cuda),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dq, dk, dv


def sanitized_offsets(
    cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor, seqused_k: torch.Tensor | None, total_q: int, total_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(cu_seq_q, cu_seq_k, seqused_k)`` made safe for a kernel that trusts them (new int32
    tensors; the inputs are not modified), in one small launch (``sanitize_offsets_kernel``):

    - ``cu_seq``: ``prefix_max(clamp(cu_seq, 0, T))``: non-decreasing and inside ``[0, T]``; a
      well-formed ``cu_seq`` is unchanged;
    - ``seqused_k[i]``: clamped to ``[0, len_k(i)]`` of the sanitized ``cu_seq_k``.

    Our own kernels clamp every offset they read; FlashAttention 4 reads them as given, so a
    ``cu_seq`` ending past ``T`` or decreasing would make it read out of bounds. Compiled and
    captured calls cannot check the values on the host; this needs no sync and is capturable in
    a CUDA graph. Rows a malformed ``cu_seq`` describes get unspecified values, as with our
    kernels."""
    out_q, out_k = torch.empty_like(cu_seq_q), torch.empty_like(cu_seq_k)
    out_used = None if seqused_k is None else torch.empty_like(seqused_k)
    _kernels().sanitize_offsets_kernel[(1,)](
        CU_Q=cu_seq_q, CU_K=cu_seq_k, USED=out_k if seqused_k is None else seqused_k,
        OUT_Q=out_q, OUT_K=out_k, OUT_USED=out_k if out_used is None else out_used,
        num_offsets=cu_seq_q.shape[0], total_q=total_q, total_k=total_k,
        HAS_USED=seqused_k is not None, BLOCK=_SANITIZE_BLOCK,
    )
    return out_q, out_k, out_used
