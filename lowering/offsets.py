"""Offsets made safe for kernels that trust them (FlashAttention 4), in one small launch.

Our own kernels clamp every offset they read (DESIGN decision 12), but an external kernel reads
``cu_seq`` and ``seqused_k`` as given: a ``cu_seq`` ending past ``T`` or a decreasing one would
make it read out of bounds. Compiled and captured calls cannot check the values on the host, so
before such a kernel runs, :func:`sanitized` rewrites them on the device:

- ``cu_seq``: ``prefix_max(clamp(cu_seq, 0, T))``: non-decreasing and inside ``[0, T]``; a
  well-formed ``cu_seq`` is unchanged.
- ``seqused_k[i]``: clamped to ``[0, len_k(i)]`` of the sanitized ``cu_seq_k``.

One program scans all three tensors (``N + 1`` is small); no host sync, capturable in a CUDA
graph. Rows a malformed ``cu_seq`` describes get unspecified values, as with our kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sanitized"]

_BLOCK = 1024


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def sanitize_offsets_kernel(
    CU_Q, CU_K, USED, OUT_Q, OUT_K, OUT_USED, num_offsets, total_q, total_k,
    HAS_USED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(1,)``. ``OUT_Q``/``OUT_K`` ``(N + 1,)``: running maxima of the clamped offsets;
    ``OUT_USED`` ``(N,)``: ``USED`` clamped to each sanitized key slot."""
    carry_q = tl.full([], 0, tl.int32)
    carry_k = tl.full([], 0, tl.int32)
    for start in range(0, num_offsets, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < num_offsets
        # Lanes past the end load 0, which never raises a running maximum.
        cu_q = tl.load(CU_Q + index, mask=valid, other=0)
        cu_q = tl.maximum(tl.associative_scan(tl.minimum(tl.maximum(cu_q, 0), total_q), 0, _maximum), carry_q)
        tl.store(OUT_Q + index, cu_q, mask=valid)
        carry_q = tl.max(cu_q, 0)
        cu_k = tl.load(CU_K + index, mask=valid, other=0)
        cu_k = tl.maximum(tl.associative_scan(tl.minimum(tl.maximum(cu_k, 0), total_k), 0, _maximum), carry_k)
        tl.store(OUT_K + index, cu_k, mask=valid)
        carry_k = tl.max(cu_k, 0)
        if HAS_USED:
            # The sanitized end of slot i is max(start of slot i, clamp(CU_K[i + 1])): no need to
            # read back what this program stored.
            in_slots = index < num_offsets - 1
            end_k = tl.load(CU_K + index + 1, mask=in_slots, other=0)
            end_k = tl.maximum(cu_k, tl.minimum(tl.maximum(end_k, 0), total_k))
            used = tl.load(USED + index, mask=in_slots, other=0)
            used = tl.minimum(tl.maximum(used, 0), end_k - cu_k)
            tl.store(OUT_USED + index, used, mask=in_slots)


def sanitized(
    cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor, seqused_k: torch.Tensor | None, total_q: int, total_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(cu_seq_q, cu_seq_k, seqused_k)`` rewritten as the module docstring says (new int32
    tensors; the inputs are not modified)."""
    out_q, out_k = torch.empty_like(cu_seq_q), torch.empty_like(cu_seq_k)
    out_used = None if seqused_k is None else torch.empty_like(seqused_k)
    sanitize_offsets_kernel[(1,)](
        cu_seq_q, cu_seq_k, out_k if seqused_k is None else seqused_k,
        out_q, out_k, out_k if out_used is None else out_used,
        cu_seq_q.shape[0], total_q, total_k,
        HAS_USED=seqused_k is not None, BLOCK=_BLOCK,
    )
    return out_q, out_k, out_used
