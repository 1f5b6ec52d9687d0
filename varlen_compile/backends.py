"""Eager implementations of the two ops, picked per call by the kernel preference
(``varlen_compile.config.kernel``), device, dtype, head dim and hints.

- ``kernel="fa4"`` where FlashAttention 4 serves the call (:func:`varlen_compile._fa4.unsupported`):
  FA4's varlen kernels.
- ``kernel="triton"`` on CUDA: our Triton kernels (below), whatever aten flash could serve.
- otherwise (``"auto"``, ``"aten"``), CUDA, fp16/bf16, head dim a multiple of 8 up to 256, sm80+, ``max_q``/``max_k`` known and
  none of softcap, sinks, ALiBi, ``seqused_k``, paged K/V, ``D_v != D``:
  ``aten._flash_attention_forward`` / ``_backward`` (FlashAttention 2). The public API reads the
  maxima off ``cu_seq`` in eager mode (its validation syncs once anyway), so eager calls get here.
- other CUDA cases (fp32, head dims aten rejects, ``grad_lse``, those features, no max hints:
  CUDA-graph capture, or a compiled graph that falls back to this op): our Triton kernels through
  :mod:`varlen_compile.lowering.launcher`, which share their ``@triton.jit`` code with the
  Inductor templates and never need the maxima.
- everything else (CPU, float64, no Triton): the exact reference in :mod:`varlen_compile.reference`.

These functions never read ``cu_seq`` on the host: none of them syncs (the reference aside).
"""

from __future__ import annotations

import logging

import torch

from . import _compat, _fa4, reference
from .params import AttnOptions, BatchLayout, uses_score_features

log = logging.getLogger(__name__)

ATEN_FLASH_DTYPES = (torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATEN_FLASH_MAX_HEAD_DIM = 256


def aten_flash_supports(query: torch.Tensor) -> bool:
    """Whether ``aten._flash_attention_*`` accepts these tensors (metadata only, no sync)."""
    head_dim = query.shape[-1]
    return (
        query.device.type == "cuda"
        and torch.version.hip is None
        and query.dtype in ATEN_FLASH_DTYPES
        and head_dim % 8 == 0
        and head_dim <= ATEN_FLASH_MAX_HEAD_DIM
        and torch.cuda.get_device_capability(query.device) >= (8, 0)
    )


def triton_supports(query: torch.Tensor, value: torch.Tensor | None = None) -> bool:
    """Whether our Triton kernels accept these tensors (see ``lowering.configs.supported_head_dim``)."""
    if query.device.type != "cuda" or query.dtype not in TRITON_DTYPES or not _compat.has_triton():
        return False
    from varlen_compile.lowering.configs import supported_head_dim

    return supported_head_dim(query.shape[-1]) and (value is None or supported_head_dim(value.shape[-1]))


def _use_aten(query: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions) -> bool:
    """aten flash needs the maxima as ints (without them it would read ``cu_seq``: a sync),
    and serves none of softcap, sinks, ALiBi, seqused_k, paging or ``D_v != D`` here: those go
    to our kernels."""
    return (
        layout.max_q is not None
        and layout.max_k is not None
        and layout.seqused_k is None
        and not layout.paged
        and not uses_score_features(options)
        and value.shape[-1] == query.shape[-1]
        and aten_flash_supports(query)
    )


def aten_flash_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_forward`` (dropout off): ``(out, lse)`` as aten returns them."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k, 0.0,
        options.is_causal, False, scale=options.scale_for(query.shape[-1]),
        window_size_left=options.window_left, window_size_right=options.window_right,
    )
    return out, lse


def aten_flash_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BatchLayout,
    options: AttnOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_backward`` (dropout off): ``(dq, dk, dv)``."""
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)  # dropout is off
    unused = torch.empty(0, device=query.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out, query, key, value, out, lse, layout.cu_seq_q, layout.cu_seq_k,
        layout.max_q, layout.max_k, 0.0, options.is_causal, rng_state, unused,
        scale=options.scale_for(query.shape[-1]),
        window_size_left=options.window_left, window_size_right=options.window_right,
    )


def _use_fa4(
    query: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions, kernel: str,
    grad_lse: bool = False,
) -> bool:
    if kernel != "fa4":
        return False
    reason = _fa4.unsupported(
        query.device, query.dtype, query.shape[-1], value.shape[-1], layout, options,
        same_heads=query.shape[1] == value.shape[-2], grad_lse=grad_lse,
    )
    if reason is not None:
        log.debug("varlen_attn: kernel='fa4' cannot serve this call (%s): our kernels run it", reason)
    return reason is None


def forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out contiguous ``(T_q, H_q, D)``, lse float32 contiguous ``(H_q, T_q)``."""
    if _use_fa4(query, value, layout, options, kernel):
        return _fa4.forward(query, key, value, layout, options)
    if kernel != "triton" and _use_aten(query, value, layout, options):
        out, lse = aten_flash_forward(query, key, value, layout, options)
        return out.contiguous(), lse.contiguous()
    if triton_supports(query, value):
        from varlen_compile.lowering import launcher

        return launcher.forward(query, key, value, layout, options)
    log.debug("varlen_attn: reference forward on %s %s", query.device, query.dtype)
    out, lse = reference.attention_forward(
        query, key, value, layout.cu_seq_q, layout.cu_seq_k, options=options,
        seqused_k=layout.seqused_k, block_table=layout.block_table,
    )
    return out.contiguous(), lse.float().contiguous()


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
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``(query, key, value)``. ``lse`` may be any
    strided ``(H_q, T_q)`` view (context parallelism passes column slices); aten flash and FA4
    read it as contiguous, so it is made contiguous here."""
    lse = lse.contiguous()
    if _use_fa4(query, value, layout, options, kernel, grad_lse is not None):
        dq, dk, dv = _fa4.backward(grad_out, query, key, value, out, lse, layout, options, grad_lse)
        return dq.contiguous(), dk, dv.contiguous()
    if kernel != "triton" and grad_lse is None and _use_aten(query, value, layout, options):
        dq, dk, dv = aten_flash_backward(grad_out, query, key, value, out, lse, layout, options)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    if triton_supports(query, value):
        from varlen_compile.lowering import launcher

        return launcher.backward(grad_out, query, key, value, out, lse, layout, options, grad_lse)
    log.debug("varlen_attn: reference backward on %s %s", query.device, query.dtype)
    dq, dk, dv = reference.attention_backward(
        grad_out, query, key, value, out, lse, layout.cu_seq_q, layout.cu_seq_k,
        options=options, grad_lse=grad_lse, seqused_k=layout.seqused_k,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
