"""Eager implementations of the two ops, picked per call by device, dtype and head dim.

- CUDA, fp16/bf16, head dim a multiple of 8 up to 256, sm80+: ``aten._flash_attention_forward`` /
  ``_backward`` (FlashAttention 2). They need ``max_q``/``max_k`` as ints: when the caller gave
  none they are read off ``cu_seq`` on the host (one sync).
- other CUDA cases (fp32, head dims aten rejects, ``grad_lse``, CUDA-graph capture without max
  lengths): our Triton kernels through :mod:`varlen_compile.lowering.launcher`, which share their
  ``@triton.jit`` code with the Inductor templates.
- everything else (CPU, float64, no Triton): the exact reference in :mod:`varlen_compile.reference`.
"""

from __future__ import annotations

import logging

import torch

from . import _compat, reference

log = logging.getLogger(__name__)

ATEN_FLASH_DTYPES = (torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATEN_FLASH_MAX_HEAD_DIM = 256


def aten_flash_supports(query: torch.Tensor, key: torch.Tensor) -> bool:
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


def triton_supports(query: torch.Tensor) -> bool:
    """Whether our Triton kernels accept these tensors (see ``lowering.configs.supported_head_dim``)."""
    if query.device.type != "cuda" or query.dtype not in TRITON_DTYPES or not _compat.has_triton():
        return False
    from varlen_compile.lowering.configs import supported_head_dim

    return supported_head_dim(query.shape[-1])


def host_max_len(cu_seq: torch.Tensor, max_len: int | None) -> int:
    """``max_len`` if given, else the longest sequence read off ``cu_seq`` (a host sync)."""
    if max_len is not None:
        return int(max_len)
    if cu_seq.numel() < 2:
        return 0
    return int((cu_seq[1:] - cu_seq[:-1]).max())


def _use_aten(query: torch.Tensor, key: torch.Tensor, max_q: int | None, max_k: int | None) -> bool:
    if not aten_flash_supports(query, key):
        return False
    # Reading max lengths off the device is illegal while a CUDA graph is captured.
    needs_sync = max_q is None or max_k is None
    return not (needs_sync and _compat.stream_is_capturing(query.device))


def aten_flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_forward`` (dropout off): ``(out, lse)`` as aten returns them."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, is_causal, False,
        scale=scale, window_size_left=window_left, window_size_right=window_right,
    )
    return out, lse


def aten_flash_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten._flash_attention_backward`` (dropout off): ``(dq, dk, dv)``."""
    rng_state = torch.zeros(2, dtype=torch.uint64, device=query.device)  # dropout is off
    unused = torch.empty(0, device=query.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, 0.0,
        is_causal, rng_state, unused,
        scale=scale, window_size_left=window_left, window_size_right=window_right,
    )


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int | None,
    max_k: int | None,
    is_causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out contiguous ``(T_q, H_q, D)``, lse float32 contiguous ``(H_q, T_q)``."""
    if _use_aten(query, key, max_q, max_k):
        out, lse = aten_flash_forward(
            query, key, value, cu_seq_q, cu_seq_k,
            host_max_len(cu_seq_q, max_q), host_max_len(cu_seq_k, max_k),
            is_causal, scale, window_left, window_right,
        )
        return out.contiguous(), lse.contiguous()
    if triton_supports(query):
        from varlen_compile.lowering import launcher

        return launcher.forward(
            query, key, value, cu_seq_q, cu_seq_k, is_causal, scale, window_left, window_right
        )
    log.debug("varlen_attn: reference forward on %s %s", query.device, query.dtype)
    out, lse = reference.attention_forward(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        is_causal=is_causal,
        scale=scale,
        window_size=(window_left, window_right),
    )
    return out.contiguous(), lse.float().contiguous()


def backward(
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
    scale: float,
    window_left: int,
    window_right: int,
    grad_lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``(query, key, value)``."""
    if grad_lse is None and _use_aten(query, key, max_q, max_k):
        dq, dk, dv = aten_flash_backward(
            grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k,
            host_max_len(cu_seq_q, max_q), host_max_len(cu_seq_k, max_k),
            is_causal, scale, window_left, window_right,
        )
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    if triton_supports(query):
        from varlen_compile.lowering import launcher

        return launcher.backward(
            grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k,
            is_causal, scale, window_left, window_right, grad_lse,
        )
    log.debug("varlen_attn: reference backward on %s %s", query.device, query.dtype)
    dq, dk, dv = reference.attention_backward(
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        cu_seq_q,
        cu_seq_k,
        is_causal=is_causal,
        scale=scale,
        window_size=(window_left, window_right),
        grad_lse=grad_lse,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
