"""Exact varlen attention, one sequence at a time: the oracle for every test and the CPU backend.

Shapes (the same everywhere in this package):

- ``q``: ``(T_q, H_q, D)``, ``k``: ``(T_k, H_kv, D)``, ``v``: ``(T_k, H_kv, D_v)``,
  ``H_q % H_kv == 0`` (GQA/MQA); ``D_v`` may differ from ``D``
- ``cu_seq_q``/``cu_seq_k``: int32 ``(N + 1,)`` offsets; sequence ``i`` is rows
  ``cu_seq[i]:cu_seq[i + 1]``
- ``seqused_k`` (optional): int32 ``(N,)``; sequence ``i`` uses only its first ``seqused_k[i]``
  keys
- ``block_table`` (optional, paged K/V): int32 ``(N, max_pages)``; ``k``/``v`` are then
  ``(total_pages, page_size, H_kv, D or D_v)`` and key ``j`` of sequence ``i`` is
  ``k[block_table[i, j // page_size], j % page_size]``; ``seqused_k`` is required and
  ``cu_seq_k`` is not read (may be None)
- ``out``: ``(T_q, H_q, D_v)``; ``lse``: float32 ``(H_q, T_q)`` (float64 for a float64 computation)

Scores: for query ``i`` and key ``j`` of a sequence with ``L_q`` queries and ``L_k`` keys (``L_k``
is the *used* key count with ``seqused_k``), ``s = scale * q.k``, or
``s = softcap * tanh(scale * q.k / softcap)`` with ``softcap != 0``; with ALiBi,
``s -= alibi_slopes[h] * |i + L_k - L_q - j|`` (FlashAttention's convention, added after the
softcap; no gradient for the slopes).

Masking follows FlashAttention: query ``i`` sits on diagonal ``d = i + L_k - L_q`` (causal is
aligned bottom-right) and may attend key ``j`` when ``d - left <= j <= d + right``; ``-1`` means
unbounded, and causal means ``right = 0``.

Attention sinks (``sink``, ``(H_q,)``, gpt-oss): one extra logit per query head in every row's
softmax denominator, without a value: ``lse = log(sum_j exp(s_j) + exp(sink_h))`` and
``out = sum_j exp(s_j - lse) v_j``. Its gradient is :func:`sink_grad` (``attention_backward``
returns ``(dq, dk, dv)`` only).

A query row that may attend no key at all (``L_k = 0``, or masked out entirely) gets ``out = 0``
and ``lse = +inf``, so that ``exp(s - lse) = 0`` in the backward, as in FlashAttention; with a
sink it gets ``out = 0`` and ``lse = sink_h`` (finite). Malformed offsets, ``seqused_k`` or
``block_table`` entries are clamped (offsets to ``[0, T]``, ``seqused_k`` to
``[0, capacity]``, pages to ``[0, total_pages - 1]``), as the kernels clamp them, so that no
input indexes out of bounds.

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
    "sink_grad",
]

# What selects the keys of one sequence in k/v: a slice of the token dim (contiguous K/V) or
# ``(pages, rows)`` index tensors (paged K/V). ``k[keys]`` is ``(L_k, H_kv, D)`` either way.
_Keys = slice | tuple[torch.Tensor, torch.Tensor]


def _options(
    options: AttnOptions | None, is_causal: bool, scale: float | None, window_size: tuple[int, int], softcap: float,
) -> AttnOptions:
    """The options of a call: ``options`` itself, or the keyword arguments as an object."""
    if options is None:
        return AttnOptions(is_causal, scale, *window_size, softcap=softcap)
    if (is_causal, scale, tuple(window_size), softcap) != (False, None, (-1, -1), 0.0):
        raise TypeError("pass either options= or the is_causal/scale/window_size/softcap keywords, not both")
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


def _clamped_spans(offsets: list[int], total: int) -> list[tuple[int, int]]:
    """``(start, end)`` per sequence with ``0 <= start <= end <= total``."""
    spans = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        start = min(max(start, 0), total)
        spans.append((start, min(max(end, start), total)))
    return spans


def _sequences(
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    total_q: int,
    k: torch.Tensor,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> list[tuple[int, int, _Keys]]:
    """``(start_q, end_q, keys)`` per sequence, clamped as the kernels clamp, so that a malformed
    ``cu_seq``/``seqused_k``/``block_table`` (possible in compiled code, which cannot validate
    them) never indexes outside the tensors. ``keys`` selects the used keys in ``k``/``v``."""
    spans_q = _clamped_spans(cu_seq_q.tolist(), total_q)
    used = None if seqused_k is None else [int(n) for n in seqused_k.tolist()]
    if block_table is None:
        if cu_seq_k is None:
            raise ValueError("cu_seq_k is required unless K/V are paged (block_table)")
        spans_k = _clamped_spans(cu_seq_k.tolist(), k.shape[0])
        if used is None:
            keys: list[_Keys] = [slice(start, end) for start, end in spans_k]
        else:
            keys = [
                slice(start, start + min(max(n, 0), end - start)) for (start, end), n in zip(spans_k, used)
            ]
        return [(*span_q, key) for span_q, key in zip(spans_q, keys)]
    if used is None:
        raise ValueError("paged K/V (block_table) need seqused_k: the number of keys of each sequence")
    total_pages, page_size = k.shape[0], k.shape[1]
    capacity = block_table.shape[1] * page_size if total_pages > 0 else 0
    sequences = []
    for span_q, pages, n in zip(spans_q, block_table, used):
        positions = torch.arange(min(max(n, 0), capacity), device=k.device)
        page_of_key = pages.to(device=k.device, dtype=torch.long).clamp(0, max(total_pages - 1, 0))
        sequences.append((*span_q, (page_of_key[positions // page_size], positions % page_size)))
    return sequences


def _heads_first(x: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``(L, H_kv, D)`` -> ``(num_heads, L, D)`` in ``dtype``, repeating kv heads for GQA."""
    x = x.to(dtype).transpose(0, 1)
    return x.repeat_interleave(num_heads // x.shape[0], dim=0)


def _sum_groups(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(H_q, L, D)`` -> ``(L, H_kv, D)``: sum the query heads of each GQA group."""
    h_q, length, dim = x.shape
    return x.view(num_kv_heads, h_q // num_kv_heads, length, dim).sum(1).transpose(0, 1)


def _scores(
    q: torch.Tensor, k: torch.Tensor, options: AttnOptions, scale: float, alibi_slopes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked scores of one sequence, ``(H, L_q, L_k)`` (masked entries are -inf), and the
    softcap's ``tanh`` term ``(H, L_q, L_k)`` (None without softcap) for the backward."""
    len_q, len_k = q.shape[1], k.shape[1]
    scores = scale * (q @ k.transpose(-1, -2))
    tanh = None
    if options.softcap != 0.0:
        tanh = torch.tanh(scores / options.softcap)
        scores = options.softcap * tanh
    if alibi_slopes is not None:
        rows = torch.arange(len_q, device=q.device)[:, None]
        cols = torch.arange(len_k, device=q.device)[None, :]
        distance = (rows + (len_k - len_q) - cols).abs().to(scores.dtype)
        slopes = alibi_slopes.detach().to(device=q.device, dtype=scores.dtype)
        scores = scores - slopes[:, None, None] * distance
    allowed = sequence_mask(len_q, len_k, *options.window(), device=q.device)
    return scores.masked_fill(~allowed, float("-inf")), tanh


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    options: AttnOptions | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sink: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``: ``out`` ``(T_q, H_q, D_v)`` in ``q.dtype``, ``lse`` ``(H_q, T_q)``.

    The scalar options come as ``options`` or as the keywords ``is_causal``, ``scale``
    (default ``1 / sqrt(D)``), ``window_size`` and ``softcap`` (0 = off); ``sink`` (``(H_q,)``
    or None) and ``alibi_slopes`` (``(H_q,)`` or None) are keywords either way. ``seqused_k`` (``(N,)``) and
    ``block_table`` (``(N, max_pages)``, paged ``k``/``v`` of shape
    ``(total_pages, page_size, H_kv, D)``) describe the keys; see the module docstring.
    Differentiable with autograd w.r.t. ``q``, ``k``, ``v`` and ``sink``, paged K/V included
    (tests use float64 autograd through it as the gradient oracle).
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    options = _options(options, is_causal, scale, window_size, softcap)
    scale = options.scale_for(q.shape[-1])
    num_heads = q.shape[1]
    sink_logits = None if sink is None else sink.to(device=q.device, dtype=compute_dtype)
    out = torch.zeros((q.shape[0], num_heads, v.shape[-1]), dtype=compute_dtype, device=q.device)
    # Rows no sequence covers (only with a malformed cu_seq) attend no key: out 0, lse +inf
    # (lse = sink with sinks).
    if sink_logits is None:
        lse = torch.full((num_heads, q.shape[0]), float("inf"), dtype=compute_dtype, device=q.device)
    else:
        lse = sink_logits[:, None].expand(num_heads, q.shape[0]).clone()
    for start_q, end_q, keys in _sequences(cu_seq_q, cu_seq_k, q.shape[0], k, seqused_k, block_table):
        len_q = end_q - start_q
        qs = _heads_first(q[start_q:end_q], num_heads, compute_dtype)
        ks = _heads_first(k[keys], num_heads, compute_dtype)
        vs = _heads_first(v[keys], num_heads, compute_dtype)
        scores, _ = _scores(qs, ks, options, scale, alibi_slopes)
        if ks.shape[1]:
            row_max = scores.amax(-1, keepdim=True)
        else:
            row_max = scores.new_full((num_heads, len_q, 1), float("-inf"))
        if sink_logits is not None:
            row_max = torch.maximum(row_max, sink_logits[:, None, None])
        row_max = row_max.detach().masked_fill(torch.isinf(row_max), 0.0)
        probs = torch.exp(scores - row_max)
        row_sum = probs.sum(-1, keepdim=True)
        if sink_logits is not None:
            row_sum = row_sum + torch.exp(sink_logits[:, None, None] - row_max)
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
    cu_seq_k: torch.Tensor | None,
    options: AttnOptions | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sink: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv)`` shaped like ``(q, k, v)``, from the saved ``out`` and ``lse``.

    Uses the flash-attention form ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)`` and
    ``P = exp(s - lse)`` (the sink is inside ``lse``); ``grad_lse`` (``(H_q, T_q)``), when given,
    enters as ``delta - grad_lse``. With softcap, ``dS`` is multiplied by ``1 - tanh^2``.
    Keys beyond ``seqused_k`` get ``dk = dv = 0``. The sink's gradient is :func:`sink_grad`.
    Paged K/V (``block_table``) are not supported here: differentiate through
    :func:`attention_forward` instead.
    """
    if block_table is not None:
        raise NotImplementedError(
            "reference.attention_backward does not take paged K/V (block_table); differentiate "
            "through reference.attention_forward with autograd instead"
        )
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    options = _options(options, is_causal, scale, window_size, softcap)
    scale = options.scale_for(q.shape[-1])
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    delta = (grad_out.to(compute_dtype) * out.to(compute_dtype)).sum(-1).transpose(0, 1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute_dtype)
    dq = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=compute_dtype, device=v.device)
    for start_q, end_q, keys in _sequences(cu_seq_q, cu_seq_k, q.shape[0], k, seqused_k, None):
        qs = _heads_first(q[start_q:end_q], num_heads, compute_dtype)
        ks = _heads_first(k[keys], num_heads, compute_dtype)
        vs = _heads_first(v[keys], num_heads, compute_dtype)
        dos = _heads_first(grad_out[start_q:end_q], num_heads, compute_dtype)
        lse_s = lse[:, start_q:end_q, None].to(compute_dtype)
        scores, tanh = _scores(qs, ks, options, scale, alibi_slopes)
        probs = torch.exp(scores - lse_s)
        grad_probs = dos @ vs.transpose(-1, -2)
        grad_scores = probs * (grad_probs - delta[:, start_q:end_q, None])
        if tanh is not None:
            grad_scores = grad_scores * (1 - tanh * tanh)
        dq[start_q:end_q] = (scale * grad_scores @ ks).transpose(0, 1)
        dk[keys] = _sum_groups(scale * grad_scores.transpose(-1, -2) @ qs, num_kv_heads)
        dv[keys] = _sum_groups(probs.transpose(-1, -2) @ dos, num_kv_heads)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def sink_grad(
    sink: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the attention sinks, ``(H_q,)`` in ``sink.dtype``.

    ``d sink_h = sum_t exp(sink_h - lse[h, t]) * (grad_lse[h, t] - delta[h, t])`` with
    ``delta = rowsum(grad_out * out)``: ``exp(sink_h - lse)`` is the sink's softmax weight, and
    a sink only shrinks ``out`` (``d out / d sink = -P_sink * out``) and adds to ``lse``.
    Shapes: ``sink`` ``(H_q,)``, ``lse``/``grad_lse`` ``(H_q, T_q)``, ``grad_out``/``out``
    ``(T_q, H_q, D_v)``. Runs in float64 when any input is float64, else in float32.
    """
    inputs = [sink, lse, grad_out, out] + ([] if grad_lse is None else [grad_lse])
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1).transpose(0, 1)
    upstream = -delta if grad_lse is None else grad_lse.to(dtype) - delta
    weight = torch.exp(sink.to(dtype)[:, None] - lse.to(dtype))
    return (weight * upstream).sum(-1).to(sink.dtype)
