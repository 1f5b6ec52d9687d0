"""FlashAttention 4 (``flash-attn-4``, CuTe DSL) as a kernel behind our ops.

FA4 is fast on Hopper and Blackwell but not compile-friendly on its own (Dynamo refuses its
``autograd.Function``). Behind our ops it is just another kernel: the eager backends call it when
``config.kernel == "fa4"``, and the Inductor lowerings offer it as an extern choice
(``_extern_ops``). Both call the two functions here, which adapt our conventions to FA4's:

- window sizes: ours use ``-1`` for an unbounded side, FA4 ``None``;
- offsets: FA4 trusts ``cu_seq``/``seqused_k``; compiled and captured calls cannot check them,
  so they pass through :func:`varlen_compile.lowering.offsets.sanitized` first (one tiny
  launch), keeping DESIGN decision 12: no out-of-bounds access whatever ``cu_seq`` holds;
- lse: the same ``(H_q, T_q)`` float32 layout, written straight into the caller's buffer; rows
  that attend no key get ``+inf`` (FlashAttention 2's and our convention) where FA4 may write
  ``-inf``, so our backward kernels and aten flash's accept it whichever forward ran;
- ``max_seqlen_q``/``max_seqlen_k`` are never passed: FA4 then bounds its grid by the token
  counts (no host sync, valid for any CUDA-graph replay) and an understated hint cannot make
  it skip rows;
- the sink's gradient is ours (``ops._backward``), so FA4's backward runs without the sink: with
  lse including the sink, dQ/dK/dV do not depend on it;
- ``seqused_k``: keys past a sequence's used length get zero dK/dV (FA4 leaves them unwritten).

:func:`unsupported` decides eligibility from metadata only (tensors or Inductor IR nodes).
"""

from __future__ import annotations

import logging

import torch

from . import _compat
from .params import AttnOptions, BatchLayout

__all__ = ["FA4_DTYPES", "backward", "forward", "unsupported"]

log = logging.getLogger(__name__)

FA4_DTYPES = (torch.float16, torch.bfloat16)


def _head_dims_supported(arch_major: int, head_dim: int, head_dim_v: int, same_heads: bool) -> bool:
    """FA4's limits for 16-bit inputs: ``interface._validate_head_dims``, narrowed to what its
    backward also takes. ``D_v != D`` only as MLA's (192, 128): the sm90 tiles are sized by ``D``
    alone (other pairs are untested there), and the sm90 GQA backward asserts ``D == D_v``."""
    if head_dim % 8 or head_dim_v % 8:
        return False
    if head_dim != head_dim_v and ((head_dim, head_dim_v) != (192, 128) or (arch_major == 9 and not same_heads)):
        return False
    if arch_major == 9:
        return 8 <= head_dim <= 256
    return 8 <= head_dim <= 128 or head_dim in (192, 256)


def unsupported(
    device: torch.device | None,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    layout: BatchLayout,
    options: AttnOptions,
    *,
    same_heads: bool = True,
    grad_lse: bool = False,
) -> str | None:
    """None when FA4 can run this call, else why not. ``same_heads``: ``H_q == H_kv`` (False
    when it is not known to be); ``grad_lse``: the backward of a call with a gradient into lse.
    What the forward needs and what the backward needs are both checked (the forward's result
    must be usable by FA4's backward too, though any kernel's backward accepts it)."""
    interface, reason = _compat.fa4_interface()
    if interface is None:
        return reason
    if device is None or device.type != "cuda" or torch.version.hip is not None:
        return f"FA4 runs on NVIDIA GPUs (device: {device})"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"FA4 serves sm90 and sm100 here (device: sm{major}{minor})"
    if dtype not in FA4_DTYPES:
        return f"FA4 serves float16 and bfloat16 (dtype: {dtype})"
    if not _head_dims_supported(major, head_dim, head_dim_v, same_heads):
        gqa = "" if same_heads else " with GQA"
        return f"FA4 on sm{major}{minor} does not serve head dims {head_dim}/{head_dim_v}{gqa}"
    if major == 10 and head_dim == 256:
        # Its dedicated hd256 backward asserts no softcap, no local window and no dlse.
        left, right = options.window()
        if options.softcap or left >= 0 or right > 0 or grad_lse:
            return "FA4's sm100 head-dim-256 backward takes no softcap, sliding window or gradient into lse"
    if options.alibi_slopes is not None:
        return "FA4 has no ALiBi"
    if layout.paged:
        # FA4 loads whole pages: rows past seqused_k in a sequence's last page must be finite,
        # which our contract does not ask of the caller (any page content is allowed).
        return "paged K/V runs in our kernels (FA4 needs finite values in unused page rows)"
    return None


def _window(options: AttnOptions, total_q: int, total_k: int) -> tuple[int | None, int | None]:
    """FA4's window sides: ``None`` where unbounded (ours: ``-1``), and also where the side is at
    least the token count (then it cannot exclude a key, and FA4's int32 index arithmetic could
    overflow on a huge value)."""
    left, right = options.window_left, options.window_right
    return (None if left < 0 or left >= total_k else left), (None if right < 0 or right >= total_q else right)


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as the forward op returns them: out ``(T_q, H_q, D_v)``, lse float32
    ``(H_q, T_q)`` (written into ``lse`` when given, contiguous)."""
    from varlen_compile.lowering.offsets import sanitized

    interface, _ = _compat.fa4_interface()
    total_q, heads_q, head_dim = query.shape
    cu_seq_q, cu_seq_k, seqused_k = sanitized(
        layout.cu_seq_q, layout.cu_seq_k, layout.seqused_k, total_q, key.shape[0]
    )
    if lse is None:
        lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=query.device)
    left, right = _window(options, total_q, key.shape[0])
    out, lse, *_ = interface._flash_attn_fwd(
        query, key, value,
        cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k, seqused_k=seqused_k,
        max_seqlen_q=None, max_seqlen_k=None,
        softmax_scale=options.scale_for(head_dim), causal=options.is_causal,
        softcap=options.softcap, window_size_left=left, window_size_right=right,
        learnable_sink=options.sink, return_lse=True, lse=lse,
    )
    # Rows with no key: +inf as in our kernels and aten flash (FA4 may write -inf there).
    lse.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=float("inf"))
    return out, lse


def backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
    grad_lse: torch.Tensor | None,
    grad_query: torch.Tensor | None = None,
    grad_value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` shaped like ``(query, key, value)`` (dQ/dV written into the given
    buffers when any; dK contiguous); the sink's gradient is not computed here (see the module
    docstring)."""
    from varlen_compile.lowering.offsets import sanitized

    interface, _ = _compat.fa4_interface()
    cu_seq_q, cu_seq_k, seqused_k = sanitized(
        layout.cu_seq_q, layout.cu_seq_k, layout.seqused_k, query.shape[0], key.shape[0]
    )
    # Contiguous, as the ops' fakes say (``empty_like`` would copy the strides of a view).
    grad_key = key.new_empty(key.shape)
    if seqused_k is not None:  # FA4 leaves the rows of unused keys unwritten
        grad_key.zero_()
        grad_value = value.new_zeros(value.shape) if grad_value is None else grad_value.zero_()
    left, right = _window(options, query.shape[0], key.shape[0])
    dq, dk, dv = interface._flash_attn_bwd(
        query, key, value, out, grad_out, lse,
        softmax_scale=options.scale_for(query.shape[-1]), causal=options.is_causal,
        softcap=options.softcap, window_size_left=left, window_size_right=right,
        cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k, seqused_k=seqused_k,
        max_seqlen_q=None, max_seqlen_k=None,
        dq=grad_query, dk=grad_key, dv=grad_value, dlse=grad_lse,
    )[:3]
    return dq, dk, dv
