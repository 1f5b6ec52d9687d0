"""Exact varlen attention, one sequence at a time: the oracle for every test and the CPU backend.

Shapes (the same everywhere in this package):

- ``q``: ``(T_q, H_q, D)``, ``k``/``v``: ``(T_k, H_kv, D)``, ``H_q % H_kv == 0`` (GQA/MQA)
- ``cu_seq_q``/``cu_seq_k``: int32 ``(N + 1,)`` offsets; sequence ``i`` is rows
  ``cu_seq[i]:cu_seq[i + 1]``
- ``out``: ``(T_q, H_q, D)``; ``lse``: float32 ``(H_q, T_q)`` (float64 for a float64 computation)

Masking follows FlashAttention: query ``i`` of a sequence with ``L_q`` queries and ``L_k`` keys
sits on diagonal ``d = i + L_k - L_q`` (causal is aligned bottom-right) and may attend key ``j``
when ``d - left <= j <= d + right``; ``-1`` means unbounded, and causal means ``right = 0``.
A query row that may attend no key at all (``L_k = 0``, or masked out entirely) gets ``out = 0``
and ``lse = +inf``, so that ``exp(s - lse) = 0`` in the backward, as in FlashAttention.

The computation runs in ``compute_dtype`` (default: float32 for half inputs, else the input
dtype). Tests call it twice: in float64 (the oracle) and in the input dtype (the error budget).
"""

from __future__ import annotations

import torch

from .params import AttnOptions

__all__ = [
    "attention_backward",
    "attention_forward",
    "sequence_mask",
]


def _options(
    options: AttnOptions | None, is_causal: bool, scale: float | None, window_size: tuple[int, int]
) -> AttnOptions:
    """The options of a call: ``options`` itself, or the keyword arguments as an object."""
    if options is None:
        return AttnOptions(is_causal, scale, *window_size)
    if (is_causal, scale, tuple(window_size)) != (False, None, (-1, -1)):
        raise TypeError("pass either options= or the is_causal/scale/window_size keywords, not both")
    return options


def sequence_mask(
    len_q: int, len_k: int, window_left: int, window_right: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool ``(len_q, len_k)``: which keys each query of one sequence may attend."""
    rows = torch.arange(len_q, device=device)[:, None]
    cols = torch.arange(len_k, device=device)[None, :]
    diagonal = rows + (len_k - len_q)
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= cols >= diagonal - window_left
    if window_right >= 0:
        allowed &= cols <= diagonal + window_right
    return allowed


def _default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _lse_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _spans(
    cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor, total_q: int, total_k: int
) -> list[tuple[int, int, int, int]]:
    """``(start_q, end_q, start_k, end_k)`` per sequence, clamped as the kernels clamp
    (``0 <= start <= end <= T``), so that a malformed ``cu_seq`` (possible in compiled code,
    which cannot validate it) never indexes outside the tensors."""

    def clamp(offsets: list[int], total: int) -> list[tuple[int, int]]:
        spans = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            start = min(max(start, 0), total)
            spans.append((start, min(max(end, start), total)))
        return spans

    spans_q, spans_k = clamp(cu_seq_q.tolist(), total_q), clamp(cu_seq_k.tolist(), total_k)
    return [(*span_q, *span_k) for span_q, span_k in zip(spans_q, spans_k)]


def _heads_first(x: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``(L, H_kv, D)`` -> ``(num_heads, L, D)`` in ``dtype``, repeating kv heads for GQA."""
    x = x.to(dtype).transpose(0, 1)
    return x.repeat_interleave(num_heads // x.shape[0], dim=0)


def _sum_groups(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(H_q, L, D)`` -> ``(L, H_kv, D)``: sum the query heads of each GQA group."""
    h_q, length, dim = x.shape
    return x.view(num_kv_heads, h_q // num_kv_heads, length, dim).sum(1).transpose(0, 1)


def _scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, window: tuple[int, int]
) -> torch.Tensor:
    """Masked ``scale * q @ k^T`` of one sequence, ``(H, L_q, L_k)``; masked entries are -inf."""
    scores = scale * (q @ k.transpose(-1, -2))
    allowed = sequence_mask(q.shape[1], k.shape[1], *window, device=q.device)
    return scores.masked_fill(~allowed, float("-inf"))


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    options: AttnOptions | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``: ``out`` ``(T_q, H_q, D)`` in ``q.dtype``, ``lse`` ``(H_q, T_q)``.

    The attention options come as ``options`` or as the keywords ``is_causal``, ``scale``
    (default ``1 / sqrt(D)``) and ``window_size``. Differentiable with autograd (tests use
    float64 autograd through it as the gradient oracle).
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    options = _options(options, is_causal, scale, window_size)
    scale = options.scale_for(q.shape[-1])
    window = options.window()
    num_heads = q.shape[1]
    # Rows no sequence covers (only with a malformed cu_seq) attend no key: out 0, lse +inf.
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    lse = torch.full((num_heads, q.shape[0]), float("inf"), dtype=compute_dtype, device=q.device)
    for start_q, end_q, start_k, end_k in _spans(cu_seq_q, cu_seq_k, q.shape[0], k.shape[0]):
        len_q = end_q - start_q
        qs = _heads_first(q[start_q:end_q], num_heads, compute_dtype)
        ks = _heads_first(k[start_k:end_k], num_heads, compute_dtype)
        vs = _heads_first(v[start_k:end_k], num_heads, compute_dtype)
        scores = _scores(qs, ks, scale, window)
        row_max = scores.amax(-1, keepdim=True) if ks.shape[1] else scores.new_zeros(num_heads, len_q, 1)
        row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
        probs = torch.exp(scores - row_max)
        row_sum = probs.sum(-1, keepdim=True)
        empty_row = row_sum == 0
        safe_sum = torch.where(empty_row, torch.ones_like(row_sum), row_sum)
        out[start_q:end_q] = ((probs / safe_sum) @ vs).transpose(0, 1)
        lse[:, start_q:end_q] = torch.where(empty_row, float("inf"), row_max + torch.log(safe_sum)).squeeze(-1)
    return out.to(q.dtype), lse.to(_lse_dtype(compute_dtype))


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    options: AttnOptions | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    grad_lse: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)`` shaped like ``(q, k, v)``, from the saved ``out`` and ``lse``.

    Uses the flash-attention form ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)``;
    ``grad_lse`` (``(H_q, T_q)``), when given, enters as ``delta - grad_lse``.
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    options = _options(options, is_causal, scale, window_size)
    scale = options.scale_for(q.shape[-1])
    window = options.window()
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    delta = (grad_out.to(compute_dtype) * out.to(compute_dtype)).sum(-1).transpose(0, 1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute_dtype)
    dq = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype, device=v.device)
    for start_q, end_q, start_k, end_k in _spans(cu_seq_q, cu_seq_k, q.shape[0], k.shape[0]):
        qs = _heads_first(q[start_q:end_q], num_heads, compute_dtype)
        ks = _heads_first(k[start_k:end_k], num_heads, compute_dtype)
        vs = _heads_first(v[start_k:end_k], num_heads, compute_dtype)
        dos = _heads_first(grad_out[start_q:end_q], num_heads, compute_dtype)
        lse_s = lse[:, start_q:end_q, None].to(compute_dtype)
        probs = torch.exp(_scores(qs, ks, scale, window) - lse_s)
        grad_probs = dos @ vs.transpose(-1, -2)
        grad_scores = probs * (grad_probs - delta[:, start_q:end_q, None])
        dq[start_q:end_q] = (scale * grad_scores @ ks).transpose(0, 1)
        dk[start_k:end_k] = _sum_groups(scale * grad_scores.transpose(-1, -2) @ qs, num_kv_heads)
        dv[start_k:end_k] = _sum_groups(probs.transpose(-1, -2) @ dos, num_kv_heads)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
