"""Public entry points: :func:`varlen_attn`, mirroring ``torch.nn.attention.varlen.varlen_attn``,
and :func:`varlen_attn_out`. Validation lives in :mod:`varlen_compile.validation`; here each call
is validated, turned into the parameter objects and handed to the op."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from . import _compat, config
from .ops import call_forward
from .params import AttnOptions, BatchLayout, OptionalInputs
from .validation import Caller, CheckedCall, check_call, check_lse_request, check_tensor, describe

__all__ = ["AuxRequest", "varlen_attn", "varlen_attn_out"]

VARLEN_ATTN = Caller("varlen_attn")
VARLEN_ATTN_OUT = Caller("varlen_attn_out")


class AuxRequest(NamedTuple):
    """Which auxiliary outputs :func:`varlen_attn` returns besides ``out``.

    ``lse``: a bool: also return the float32 log-sum-exp of the scaled scores, shape
    ``(H_q, T_q)`` (the layout aten flash attention uses). Gradients flow through it.
    """

    lse: bool = False


_AUX_REQUEST_TYPES = _compat.AUX_REQUEST_TYPES + (AuxRequest,)


def varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int | None = None,
    max_k: int | None = None,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    return_aux: AuxRequest | None = None,
    softcap: float | None = None,
    sink: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention within each sequence of a packed (variable-length) batch, without padding.

    Args:
        query: ``(T_q, H_q, D)``, the queries of all ``N`` sequences concatenated.
        key: ``(T_k, H_kv, D)``, or pages ``(total_pages, page_size, H_kv, D)`` with
            ``block_table``.
        value: ``(T_k, H_kv, D_v)`` (or pages); ``D_v`` may differ from ``D`` (MLA: 192/128).
        cu_seq_q: int32 ``(N + 1,)``, cumulative query offsets: ``0 = cu_seq_q[0] <= ... <=
            cu_seq_q[N] = T_q``; sequence ``i`` owns query rows ``cu_seq_q[i]:cu_seq_q[i + 1]``.
        cu_seq_k: int32 ``(N + 1,)``, the same for keys and values. Sequences may be empty, and a
            sequence's query and key lengths may differ. May be None with ``block_table``.
        max_q, max_k: optional hints, the longest query / key sequence (int or SymInt, never
            below the real maxima). Our Triton kernels never need them; eager aten flash does,
            and eager calls read them off ``cu_seq`` during validation. Under ``torch.compile``
            they cause no guard and no host sync.
        is_causal: a bool: causal masking, aligned bottom-right when a sequence's query length differs
            from its key length (FlashAttention's convention): query ``i`` of a sequence with
            ``L_q`` queries and ``L_k`` keys attends keys ``j <= i + L_k - L_q``.
        scale: multiplier of ``Q @ K^T``; default ``1 / sqrt(D)``.
        window_size: ``(left, right)`` sliding window as in FlashAttention: query ``i`` attends
            keys ``j`` with ``i + L_k - L_q - left <= j <= i + L_k - L_q + right``; ``-1`` is
            unbounded. ``is_causal=True`` sets ``right = 0``.
        enable_gqa: a bool: allow ``H_q != H_kv`` (grouped-query / multi-query attention); ``H_q`` must
            be a multiple of ``H_kv``, and query head ``h`` uses kv head ``h // (H_q // H_kv)``.
        return_aux: ``AuxRequest(lse=True)`` also returns the log-sum-exp (torch's own
            ``torch.nn.attention.varlen.AuxRequest`` is accepted too).
        softcap: ``> 0`` caps the scores: ``s = softcap * tanh(scale * q.k / softcap)`` (Gemma 2/3);
            gradients flow through the tanh. ``None`` (the default) or ``0.0`` is off. (The default is
            ``None``, not ``0.0``: under ``dynamic=True`` Dynamo would make a float default a
            symbolic input and restart its analysis to specialize it again.)
        sink: ``(H_q,)`` attention-sink logits (gpt-oss; FlashAttention 4's ``learnable_sink``):
            each joins its head's softmax denominators as an extra logit with no value.
            Differentiable (``d sink_h = sum_rows exp(sink_h - lse) * (grad_lse - rowsum(dO * O))``).
            Computed in float32.
        alibi_slopes: ``(H_q,)`` ALiBi slopes, FlashAttention's convention: scores get
            ``-slope_h * |i + L_k - L_q - j|``. Not differentiable (must not require grad).
        seqused_k: int32 ``(N,)``: sequence ``i`` uses only its first ``seqused_k[i]`` keys (KV-cache
            slots larger than the cache); masks and the causal diagonal use that length. Keys past
            it get zero gradients.
        block_table: int32 ``(N, max_pages)``: paged K/V (a page pool); key ``j`` of sequence ``i``
            is row ``j % page_size`` of page ``block_table[i, j // page_size]``. Needs
            ``seqused_k``. Forward only, as in torch: with it, query, key, value and sink must not
            require grad (a ``ValueError`` otherwise, eager and compiled alike).
        num_splits: accepted for parity with torch and ignored: our kernels never split the
            keys of a row, so results are always batch-invariant (bitwise independent of the
            other sequences in the batch).

    Returns:
        ``out`` ``(T_q, H_q, D_v)`` in the input dtype, or ``(out, lse)`` with ``lse`` float32
        ``(H_q, T_q)`` when ``return_aux.lse``. Query rows that attend no key (an empty key
        sequence, or a window that excludes every key) get ``out = 0`` and ``lse = +inf``
        (``lse = sink`` with sinks).

    Checked on every call (argument types and tensor metadata, so also under ``torch.compile``
    where it costs no sync and no graph break; :mod:`varlen_compile.validation`): Python bools
    for the flags, Python ints or None for the hints, finite Python floats or None for ``scale``
    and ``softcap`` (numpy scalars and 0-d tensors are refused, eager and compiled alike), ranks
    and shapes, head counts and head dims of at least 1, matching head dims, head counts and
    ``enable_gqa``, ``cu_seq`` dtype (int32)/rank/length, devices, dtypes, a contiguous last dim,
    ``window_size``, and, with ``block_table``, that nothing requires grad.
    Checked in eager mode only (it reads ``cu_seq`` on the host: one sync): offsets start at 0,
    never decrease and end at ``T``, and ``max_q``/``max_k`` are not below the real maxima.
    Skipped while tracing (compile, export, fake tensors) and during CUDA-graph capture, where
    the kernels clamp every offset into the tensors instead (a malformed ``cu_seq`` gives
    unspecified values, never an out-of-bounds access) and ``config.check_offsets`` can add
    device-side assertions.

    Which kernel runs the call on CUDA (our Triton kernels, FlashAttention 4, aten flash) is
    ``varlen_compile.config.kernel``, a preference read here (so a traced call is guarded on it);
    see :mod:`varlen_compile.config`.

    Example::

        >>> lengths = torch.tensor([5, 0, 3])
        >>> cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        >>> q = k = v = torch.randn(8, 4, 64)
        >>> out = varlen_attn(q, k, v, cu, cu, is_causal=True)
    """
    return_lse = _check_extras(VARLEN_ATTN, return_aux, num_splits)
    out, lse = attend(
        VARLEN_ATTN, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale=scale,
        window_size=window_size, enable_gqa=enable_gqa, softcap=softcap, sink=sink, alibi_slopes=alibi_slopes,
        seqused_k=seqused_k, block_table=block_table,
    )
    return (out, lse) if return_lse else out


def attend(
    caller: Caller,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int | None = None,
    max_k: int | None = None,
    is_causal: bool = False,
    kernel: str | None = None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`varlen_attn` on behalf of another entry point: validated by
    :func:`varlen_compile.validation.check_call` in ``caller``'s words (its function name and
    argument names), and always ``(out, lse)``. ``options`` are :func:`varlen_attn`'s keywords,
    without ``return_aux`` and ``num_splits``. ``kernel``: a kernel the entry point requires
    (one of ``config.KERNELS``), instead of ``varlen_compile.config.kernel``."""
    call = check_call(caller, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, **options)
    return _run(call, config.checked_kernel() if kernel is None else config.check_kernel_name(kernel))


def _run(call: CheckedCall, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op on a validated call: the parameter objects, then the op with ``kernel``."""
    layout = BatchLayout(call.cu_seq_q, call.cu_seq_k, call.max_q, call.max_k)
    options = AttnOptions(
        is_causal=call.is_causal, scale=call.scale, window_left=call.window_left, window_right=call.window_right,
        softcap=call.softcap,
    )
    optional = OptionalInputs(
        seqused_k=call.seqused_k, block_table=call.block_table, sink=call.sink, alibi_slopes=call.alibi_slopes
    )
    return call_forward(call.query, call.key, call.value, layout, options, optional, kernel)


def _check_extras(caller: Caller, return_aux: object, num_splits: object) -> bool:
    """``num_splits`` (None or an int >= 0, ignored); returns whether ``return_aux`` asks for the lse."""
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0):
        raise ValueError(caller.message(f"num_splits must be None or an int >= 0, got {describe(num_splits)}"))
    return check_lse_request(caller, return_aux, _AUX_REQUEST_TYPES)


def varlen_attn_out(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int | None = None,
    max_k: int | None = None,
    *,
    return_aux: AuxRequest | None = None,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`varlen_attn` writing its result into ``out`` (``(T_q, H_q, D_v)``, the input
    dtype, on the query's device), as ``torch.nn.attention.varlen.varlen_attn_out``: for static
    output buffers (serving, CUDA graphs). Returns ``out``, or ``(out, lse)`` with
    ``return_aux.lse``. The other keywords are :func:`varlen_attn`'s. (Today the result is
    computed, then copied into ``out``: no memory is saved yet.)"""
    unknown = sorted(set(kwargs) - _OUT_KEYWORDS)
    if unknown:
        raise TypeError(
            VARLEN_ATTN_OUT.message(
                f"unexpected keyword arguments {unknown}; it takes varlen_attn's: {', '.join(sorted(_OUT_KEYWORDS))}"
            )
        )
    return_lse = _check_extras(VARLEN_ATTN_OUT, return_aux, kwargs.pop("num_splits", None))
    check_tensor(VARLEN_ATTN_OUT, "out", out)
    attn, lse = attend(VARLEN_ATTN_OUT, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)
    if out.shape != attn.shape or out.dtype != attn.dtype or out.device != attn.device:
        raise ValueError(
            VARLEN_ATTN_OUT.message(
                f"out must be {tuple(attn.shape)} {attn.dtype} on {attn.device}, got {tuple(out.shape)} "
                f"{out.dtype} on {out.device}"
            )
        )
    out.copy_(attn)
    return (out, lse) if return_lse else out


# varlen_attn's arguments that varlen_attn_out takes as keywords.
_OUT_KEYWORDS = frozenset(inspect.signature(varlen_attn).parameters) - {
    "query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux",
}
