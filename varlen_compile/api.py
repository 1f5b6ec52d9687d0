"""Public entry point: :func:`varlen_attn`, mirroring ``torch.nn.attention.varlen.varlen_attn``."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from . import _compat, config
from .ops import call_forward
from .params import AttnOptions, BatchLayout

__all__ = ["AuxRequest", "varlen_attn", "varlen_attn_out"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AuxRequest(NamedTuple):
    """Which auxiliary outputs :func:`varlen_attn` returns besides ``out``.

    ``lse``: also return the float32 log-sum-exp of the scaled scores, shape ``(H_q, T_q)``
    (the layout aten flash attention uses). Gradients flow through it.
    """

    lse: bool = False


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
            ``seqused_k``. Forward only, as in torch (the backward raises).
        num_splits: accepted for parity with torch and ignored: our kernels never split the
            keys of a row, so results are always batch-invariant (bitwise independent of the
            other sequences in the batch).

    Returns:
        ``out`` ``(T_q, H_q, D_v)`` in the input dtype, or ``(out, lse)`` with ``lse`` float32
        ``(H_q, T_q)`` when ``return_aux.lse``. Query rows that attend no key (an empty key
        sequence, or a window that excludes every key) get ``out = 0`` and ``lse = +inf``
        (``lse = sink`` with sinks).

    Checked on every call (argument types and tensor metadata, so also under ``torch.compile``
    where it costs no sync and no graph break): bool flags, int hints, ranks and shapes, head
    counts and head dims of at least 1, matching head dims, head counts and ``enable_gqa``,
    ``cu_seq`` dtype/rank/length, devices, dtypes, a contiguous last dim, ``window_size``.
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
    _check_flag("is_causal", is_causal)
    _check_flag("enable_gqa", enable_gqa)
    window_left, window_right = _check_window(window_size)
    paged = block_table is not None
    if cu_seq_k is None:
        if not paged:
            raise ValueError("varlen_attn: cu_seq_k may be None only with block_table (paged K/V)")
        cu_seq_k = cu_seq_q  # not read with paged K/V
    _check_tensors(query, key, value, cu_seq_q, cu_seq_k, enable_gqa, paged)
    softcap = _check_softcap(softcap)
    sink = _check_head_vector("sink", sink, query)
    alibi_slopes = _check_head_vector("alibi_slopes", alibi_slopes, query)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "varlen_attn: alibi_slopes must not require grad (ALiBi slopes are fixed and get no "
            "gradient); pass alibi_slopes.detach()"
        )
    _check_paging(query, key, value, cu_seq_q, seqused_k, block_table)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0):
        raise ValueError(f"varlen_attn: num_splits must be None or an int >= 0, got {num_splits!r}")
    _check_hint("max_q", max_q)
    _check_hint("max_k", max_k)
    if return_aux is not None and not isinstance(return_aux, _compat.AUX_REQUEST_TYPES + (AuxRequest,)):
        raise TypeError(
            f"varlen_attn: return_aux must be None or AuxRequest(lse=...), got {type(return_aux)}"
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat))
    ):
        raise TypeError(f"varlen_attn: scale must be a float or None, got {type(scale)}")
    if scale is not None and not _compat.is_symbolic(scale):
        scale = float(scale)
    cu_seq_q, cu_seq_k = cu_seq_q.contiguous(), cu_seq_k.contiguous()
    if seqused_k is not None:
        seqused_k = seqused_k.contiguous()
    if block_table is not None:
        block_table = block_table.contiguous()
    if not (_compat.is_traced(cu_seq_q) or _compat.stream_is_capturing(cu_seq_q.device)):
        max_q, max_k = _check_offsets(
            cu_seq_q, cu_seq_k, query.shape[0], key.shape[0], max_q, max_k, check_k=not paged
        )
        _check_used_keys(cu_seq_k, key, seqused_k, block_table)
    elif config.check_offsets:
        _assert_offsets_on_device(cu_seq_q, query.shape[0], max_q, "cu_seq_q", "max_q")
        if not paged:
            _assert_offsets_on_device(cu_seq_k, key.shape[0], max_k, "cu_seq_k", "max_k")
    layout = BatchLayout(cu_seq_q, cu_seq_k, max_q, max_k, seqused_k=seqused_k, block_table=block_table)
    options = AttnOptions(
        is_causal, scale, window_left, window_right, softcap=softcap, sink=sink, alibi_slopes=alibi_slopes
    )
    out, lse = call_forward(query, key, value, layout, options, config.checked_kernel())
    if return_aux is not None and return_aux.lse:
        return out, lse
    return out


def _check_flag(name: str, flag: object) -> None:
    """Flags must be real bools: a truthy string such as "no" would silently mean True."""
    if not isinstance(flag, bool):
        raise TypeError(f"varlen_attn: {name} must be a bool (True or False), got {flag!r} of type {type(flag).__name__}")


def _check_hint(name: str, hint: object) -> None:
    if hint is None or (isinstance(hint, (int, torch.SymInt)) and not isinstance(hint, bool)):
        return
    raise TypeError(
        f"varlen_attn: {name} must be an int or None, got {type(hint).__name__}; it is only a hint "
        "(the longest sequence): pass None rather than reading it off a tensor with .item()"
    )


def _require(condition: bool | torch.SymBool, message: Callable[[], str], generic_message: str) -> None:
    """Raise ``ValueError(message())`` when ``condition`` is known to be false. Under dynamic
    shapes it can be a SymBool: a guard for backed sizes; for unbacked (data-dependent) sizes,
    where it cannot be decided while tracing, a runtime assertion (``_compat.runtime_check``)
    that reports ``generic_message`` (Dynamo needs a constant message, naming no sizes)."""
    if not guard_or_true(condition):
        raise ValueError(message())
    _compat.runtime_check(condition, generic_message)


def _check_softcap(softcap: object) -> float | torch.SymFloat:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"varlen_attn: softcap must be a float (None or 0.0 = off), got {type(softcap).__name__}")
    if _compat.is_symbolic(softcap):
        return softcap
    softcap = float(softcap)
    if not (softcap >= 0.0 and softcap != float("inf")):
        raise ValueError(f"varlen_attn: softcap must be a finite float >= 0 (0.0 = off), got {softcap}")
    return softcap


def _check_head_vector(name: str, tensor: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """``sink``/``alibi_slopes``: a floating ``(H_q,)`` tensor on the query's device, returned
    as contiguous float32 (differentiably: ``.float()``)."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"varlen_attn: {name} must be a torch.Tensor of shape (H_q,) or None, got {type(tensor)}")
    if not tensor.is_floating_point():
        raise ValueError(f"varlen_attn: {name} must be a floating tensor, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(
            f"varlen_attn: {name} must be 1-D with one value per query head (H_q={query.shape[1]}), "
            f"got shape {tuple(tensor.shape)}"
        )
    _require(
        tensor.shape[0] == query.shape[1],
        lambda: f"varlen_attn: {name} must have one value per query head ({query.shape[1]}), got {tensor.shape[0]}",
        f"varlen_attn: {name} must have one value per query head",
    )
    if tensor.device != query.device:
        raise ValueError(f"varlen_attn: {name} is on {tensor.device}, query on {query.device}; move it with .to(query.device)")
    return tensor.float().contiguous()


def _check_paging(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> None:
    """Metadata checks of ``seqused_k`` and ``block_table``."""
    num_seqs = cu_seq_q.shape[0] - 1
    for name, tensor, rank in (("seqused_k", seqused_k, 1), ("block_table", block_table, 2)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"varlen_attn: {name} must be a torch.Tensor or None, got {type(tensor)}")
        if tensor.dtype != torch.int32:
            raise ValueError(f"varlen_attn: {name} must be int32, got {tensor.dtype}; use {name}.to(torch.int32)")
        if tensor.dim() != rank:
            raise ValueError(f"varlen_attn: {name} must be {rank}-D, got shape {tuple(tensor.shape)}")
        _require(
            tensor.shape[0] == num_seqs,
            lambda: f"varlen_attn: {name} must have one row per sequence (N={num_seqs}), got shape {tuple(tensor.shape)}",
            f"varlen_attn: {name} must have one row per sequence",
        )
        if tensor.device != query.device:
            raise ValueError(f"varlen_attn: {name} is on {tensor.device}, query on {query.device}")
    if block_table is not None and seqused_k is None:
        raise ValueError(
            "varlen_attn: block_table needs seqused_k (the number of valid keys of each sequence, "
            "as in torch.nn.attention.varlen)"
        )


def _check_used_keys(
    cu_seq_k: torch.Tensor, key: torch.Tensor, seqused_k: torch.Tensor | None, block_table: torch.Tensor | None
) -> None:
    """Eager-only value checks of ``seqused_k`` and ``block_table`` (host reads)."""
    if seqused_k is None:
        return
    used = seqused_k.cpu()
    if block_table is not None:
        capacity = torch.full_like(used, block_table.shape[1] * key.shape[1])
        pages = block_table.cpu()
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= key.shape[0]):
            raise ValueError(
                f"varlen_attn: block_table entries must be page indices in [0, {key.shape[0]}), got "
                f"values in [{int(pages.min())}, {int(pages.max())}]"
            )
        what = "block_table row capacity (max_pages * page_size)"
    else:
        offsets = cu_seq_k.cpu()
        capacity = offsets[1:] - offsets[:-1]
        what = "sequence's cu_seq_k length"
    if used.numel() and (int(used.min()) < 0 or bool((used > capacity).any())):
        raise ValueError(
            f"varlen_attn: seqused_k must lie in [0, {what}] per sequence, got {used.tolist()} "
            f"for capacities {capacity.tolist()}"
        )


def _check_window(window_size: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in window_size)
    ):
        raise ValueError(
            f"varlen_attn: window_size must be a pair of ints (left, right), got {window_size!r}; "
            "use (-1, -1) for no window"
        )
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(
            f"varlen_attn: window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}"
        )
    return left, right


def _check_tensors(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    enable_gqa: bool,
    paged: bool = False,
) -> None:
    """Metadata checks: safe under torch.compile (no data access)."""
    named = {"query": query, "key": key, "value": value, "cu_seq_q": cu_seq_q, "cu_seq_k": cu_seq_k}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"varlen_attn: {name} must be a torch.Tensor, got {type(tensor)}")
    if query.dim() != 3:
        raise ValueError(
            f"varlen_attn: query must be 3-D (total_tokens, heads, head_dim), got shape "
            f"{tuple(query.shape)}; pack sequences along dim 0 instead of padding a batch dim"
        )
    for name in ("key", "value"):
        if paged and named[name].dim() != 4:
            raise ValueError(
                f"varlen_attn: with block_table, {name} must be 4-D pages (total_pages, page_size, "
                f"heads, head_dim), got shape {tuple(named[name].shape)}"
            )
        if not paged and named[name].dim() != 3:
            raise ValueError(
                f"varlen_attn: {name} must be 3-D (total_tokens, heads, head_dim), got shape "
                f"{tuple(named[name].shape)}; pack sequences along dim 0 instead of padding a batch "
                "dim (4-D pages need block_table)"
            )
    heads_q, heads_kv = query.shape[1], key.shape[-2]
    for name, heads in (("query", heads_q), ("key", heads_kv), ("value", value.shape[-2])):
        _require(
            heads >= 1,
            lambda: f"varlen_attn: {name} must have at least one head, got shape {tuple(named[name].shape)}",
            f"varlen_attn: {name} must have at least one head",
        )
    for name in ("query", "key", "value"):
        _require(
            named[name].shape[-1] >= 1,
            lambda: f"varlen_attn: {name} must have head_dim >= 1, got shape {tuple(named[name].shape)}",
            f"varlen_attn: {name} must have head_dim >= 1",
        )
    for dim, what in ((0, "tokens" if not paged else "pages"), (-2, "heads")) + (((1, "rows per page"),) if paged else ()):
        _require(
            key.shape[dim] == value.shape[dim],
            lambda: f"varlen_attn: key and value must have the same number of {what}, got shapes "
            f"{tuple(key.shape)} and {tuple(value.shape)}",
            f"varlen_attn: key and value must have the same number of {what}",
        )
    _require(
        query.shape[-1] == key.shape[-1],
        lambda: f"varlen_attn: query and key must have the same head_dim, got {query.shape[-1]} and "
        f"{key.shape[-1]}",
        "varlen_attn: query and key must have the same head_dim",
    )
    _require(
        heads_q % heads_kv == 0,
        lambda: f"varlen_attn: the number of query heads ({heads_q}) must be a multiple of the number "
        f"of key/value heads ({heads_kv})",
        "varlen_attn: the number of query heads must be a multiple of the number of key/value heads",
    )
    if heads_q != heads_kv and not enable_gqa:
        raise ValueError(
            f"varlen_attn: query has {heads_q} heads but key/value have {heads_kv}; pass "
            "enable_gqa=True for grouped-query attention"
        )
    for name in ("cu_seq_q", "cu_seq_k"):
        cu_seq = named[name]
        if cu_seq.dtype != torch.int32:
            raise ValueError(
                f"varlen_attn: {name} must be int32, got {cu_seq.dtype}; use {name}.to(torch.int32)"
            )
        if cu_seq.dim() != 1 or cu_seq.shape[0] < 1:
            raise ValueError(
                f"varlen_attn: {name} must be 1-D with N + 1 >= 1 offsets, got shape {tuple(cu_seq.shape)}"
            )
    if cu_seq_q.shape[0] != cu_seq_k.shape[0]:
        raise ValueError(
            f"varlen_attn: cu_seq_q and cu_seq_k must describe the same number of sequences, got "
            f"{cu_seq_q.shape[0] - 1} and {cu_seq_k.shape[0] - 1}; pass an empty sequence "
            "(a repeated offset) where one side has none"
        )
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(
            f"varlen_attn: all tensors must be on one device, got {devices}; move them with .to(query.device)"
        )
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1:
        raise ValueError(
            f"varlen_attn: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"varlen_attn: unsupported dtype {query.dtype}; use one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
        )
    for name in ("query", "key", "value"):
        tensor = named[name]
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                f"varlen_attn: {name} must have a contiguous last dimension (stride 1), got strides "
                f"{tuple(tensor.stride())}; views like qkv.chunk(3, -1) are fine, call "
                f"{name}.contiguous() for transposed inputs"
            )


def _check_offsets(
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    total_q: int,
    total_k: int,
    max_q: int | None,
    max_k: int | None,
    check_k: bool = True,
) -> tuple[int, int]:
    """Eager-only value checks (one host sync); returns the max lengths for aten flash.
    ``check_k=False`` (paged K/V) skips ``cu_seq_k``, which is not read then."""
    offsets = torch.stack([cu_seq_q, cu_seq_k]).cpu()
    checked = []
    sides = [(offsets[0], "cu_seq_q", total_q, max_q, "max_q"), (offsets[1], "cu_seq_k", total_k, max_k, "max_k")]
    for offs, name, total, max_len, max_name in sides[: 2 if check_k else 1]:
        lengths = offs[1:] - offs[:-1]
        if int(offs[0]) != 0:
            raise ValueError(f"varlen_attn: {name} must start at 0, got {int(offs[0])}")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(
                f"varlen_attn: {name} must be non-decreasing (cumulative sequence lengths), got "
                f"{offs.tolist()}"
            )
        if int(offs[-1]) != total:
            raise ValueError(
                f"varlen_attn: {name} must end at the total token count {total}, got {int(offs[-1])}"
            )
        longest = int(lengths.max()) if lengths.numel() else 0
        if max_len is not None and int(max_len) < longest:
            raise ValueError(
                f"varlen_attn: {max_name}={int(max_len)} is smaller than the longest sequence "
                f"({longest}); pass the true maximum or None"
            )
        checked.append(longest if max_len is None else max_len)
    if not check_k:
        checked.append(max_k)
    return checked[0], checked[1]


def _assert_offsets_on_device(
    cu_seq: torch.Tensor, total: int, max_len: int | None, name: str, max_name: str
) -> None:
    """What ``_check_offsets`` checks, as a device-side assertion (no host sync): for traced and
    captured calls when ``config.check_offsets`` is on."""
    lengths = cu_seq[1:] - cu_seq[:-1]
    valid = (cu_seq[0] == 0) & (cu_seq[-1] == total) & (lengths >= 0).all()
    torch._assert_async(valid, f"varlen_attn: {name} must start at 0, never decrease and end at the token count")
    if max_len is not None:
        torch._assert_async(
            (lengths <= max_len).all(), f"varlen_attn: {max_name} is smaller than the longest sequence"
        )


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
    dtype), as ``torch.nn.attention.varlen.varlen_attn_out``: for static output buffers
    (serving, CUDA graphs). Returns ``out``, or ``(out, lse)`` with ``return_aux.lse``. The
    other keywords are :func:`varlen_attn`'s. (Today the result is computed, then copied into
    ``out``: no memory is saved yet.)"""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"varlen_attn_out: out must be a torch.Tensor, got {type(out)}")
    result = varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
        return_aux=AuxRequest(lse=True), **kwargs,
    )
    attn, lse = result
    if out.shape != attn.shape or out.dtype != attn.dtype or out.device != attn.device:
        raise ValueError(
            f"varlen_attn_out: out must be {tuple(attn.shape)} {attn.dtype} on {attn.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    out.copy_(attn)
    if return_aux is not None and return_aux.lse:
        return out, lse
    return out
