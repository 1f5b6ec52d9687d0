"""Eager implementations of the two ops: each call runs the kernel
:func:`varlen_compile.eligibility.eager_kernel` picks from the preference
(``varlen_compile.config.kernel``) and what each kernel can serve:

- ``"fa4"``: FlashAttention 4's varlen kernels, when asked for and it serves the call;
- ``"aten"``: ``aten._flash_attention_forward`` / ``_backward`` (FlashAttention 2) for
  ``"auto"``, ``"aten"`` and ``"fa4"`` where it serves (it needs ``max_q``/``max_k``, which the
  public API reads off ``cu_seq`` in eager mode: its validation syncs once anyway);
- ``"triton"``: our Triton kernels through the standalone launcher, which shares its
  ``@triton.jit`` code with the Inductor templates and never needs the maxima (fp32, head dims
  aten rejects, gradients into ``lse``, the optional inputs, no max hints: CUDA-graph capture,
  or a compiled graph that falls back to this op);
- ``"reference"``: the exact reference in :mod:`varlen_compile.reference` (CPU, float64, no
  Triton).

These functions never read ``cu_seq`` on the host: none of them syncs (the reference aside).
"""

from __future__ import annotations

import logging

import torch

from . import eligibility, lowering, reference
from .params import AttnOptions, BatchLayout, OptionalInputs, lse_dtype

log = logging.getLogger(__name__)

__all__ = ["backward", "forward"]


def _kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions,
    optional: OptionalInputs, kernel: str, deterministic: bool = False,
) -> str:
    hints = layout.max_q is not None and layout.max_k is not None
    call = eligibility.call_of_tensors(query, key, value, options, optional, hints)
    return eligibility.eager_kernel(kernel, call, deterministic)


def forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: BatchLayout, options: AttnOptions,
    optional: OptionalInputs, kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out contiguous ``(T_q, H_q, D)``, lse contiguous ``(H_q, T_q)`` in
    :func:`~varlen_compile.params.lse_dtype`."""
    chosen = _kernel(query, key, value, layout, options, optional, kernel)
    if chosen == eligibility.FA4:
        return lowering.fa4.forward(query, key, value, layout, options, optional)
    if chosen == eligibility.ATEN:
        out, lse = lowering.aten.forward(query, key, value, layout, options)
        return out.contiguous(), lse.contiguous()
    if chosen == eligibility.TEMPLATE:
        return lowering.launcher.forward(query, key, value, layout, options, optional)
    log.debug("varlen_attn: reference forward on %s %s", query.device, query.dtype)
    out, lse = reference.attention_forward(
        query, key, value, layout.cu_seq_q, layout.cu_seq_k, options=options, **optional,
    )
    return out.contiguous(), lse.to(lse_dtype(query.dtype)).contiguous()


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
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped like ``(query, key, value)``. ``optional`` may hold
    ``grad_lse``. ``lse`` may be any strided ``(H_q, T_q)`` view (context parallelism passes
    column slices); aten flash and FA4 read it as contiguous, so it is made contiguous here."""
    lse = lse.contiguous()
    chosen = _kernel(query, key, value, layout, options, optional, kernel, eligibility.deterministic_backward())
    if chosen == eligibility.FA4:
        dq, dk, dv = lowering.fa4.backward(grad_out, query, key, value, out, lse, layout, options, optional)
        return dq.contiguous(), dk, dv.contiguous()
    if chosen == eligibility.ATEN:
        dq, dk, dv = lowering.aten.backward(grad_out, query, key, value, out, lse, layout, options)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    if chosen == eligibility.TEMPLATE:
        return lowering.launcher.backward(grad_out, query, key, value, out, lse, layout, options, optional)
    log.debug("varlen_attn: reference backward on %s %s", query.device, query.dtype)
    dq, dk, dv = reference.attention_backward(
        grad_out, query, key, value, out, lse, layout.cu_seq_q, layout.cu_seq_k, options=options, **optional,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
