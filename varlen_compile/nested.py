"""SDPA for jagged nested tensors, on :func:`varlen_compile.varlen_attn`.

:func:`scaled_dot_product_attention` has the signature of
``torch.nn.functional.scaled_dot_product_attention``. Given ``torch.jagged`` nested tensors
(NJTs) in SDPA's layout it runs our op; dense tensors go to torch's SDPA unchanged.

Layout mapping. A jagged NJT of ``B`` sequences in SDPA's layout is ``(B, H, j, D)``: its
ragged dim ``j`` (the sequence length, different per sequence) sits at index 2, which is what
``nt.transpose(1, 2)`` gives for an NJT built as ``(B, j, H, D)``. Transposing back gives
``(B, j, H, D)``, whose ``values()`` are exactly the packed ``(T, H, D)`` tensor ``varlen_attn``
takes (``T`` = total tokens, no copy: possibly strided, with a contiguous last dim) and whose
``offsets()`` (int64 ``(B + 1,)``) are ``cu_seq`` (cast to int32)::

    query (B, H_q, j_q, D)  --transpose(1, 2)-->  (B, j_q, H_q, D)  --values()-->  (T_q, H_q, D)
                                                                     --offsets()-> cu_seq_q
    out   (T_q, H_q, D)  --nested_tensor_from_jagged(out, query offsets)-->  (B, j_q, H_q, D)
                         --transpose(1, 2)-->  (B, H_q, j_q, D)

The output reuses the query's offsets, so it has the query's ragged structure (the same nested
int: ``out + query`` works), and autograd flows through ``values()`` back to the NJT inputs.
Query and key/value may have different ragged structures (cross attention between two jagged
batches). Key and value need equal lengths, but not one offsets tensor: separately built NJTs
(as torch's SDPA takes them) are fine. Eager calls compare their offsets by value (one host
sync, skipped when they share the tensor); compiled calls use the key's offsets and, with
``varlen_compile.config.check_offsets``, assert on the device that the value's are equal.

The output NJT is built as torch's own jagged SDPA builds its output
(``_compat.jagged_view``): the public
``torch.nested.nested_tensor_from_jagged`` adds only a check for ``torch.fx.symbolic_trace``
that logs an "is_fx_tracing will return true ..." warning.

What it adds over torch's own jagged SDPA (measured on torch 2.11 CUDA, 2.13 and 2.15 CPU):
torch refuses ``is_causal=True`` on the CPU and GQA everywhere, and its
``torch.compile(fullgraph=True)`` fails on the CPU (an op without a fake implementation) and,
on CUDA, for NJTs without cached max lengths (a data-dependent size). Here all of these work;
causal masking is aligned bottom-right when a sequence's query and key lengths differ
(FlashAttention's convention, as torch's CUDA flash path does).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import _compat, config
from ._tracing import is_traced, stream_is_capturing
from .api import attend
from .validation import Caller, check_dropout

__all__ = ["scaled_dot_product_attention"]

log = logging.getLogger(__name__)

_NAMES = ("query", "key", "value")
SDPA = Caller(
    "scaled_dot_product_attention",
    {
        "cu_seq_q": "query.offsets()", "cu_seq_k": "key.offsets()", "max_q": "the max_seqlen cached on query",
        "max_k": "the max_seqlen cached on key",
    },
)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, with jagged nested tensors served
    by :func:`varlen_compile.varlen_attn` (eager and under ``torch.compile``, forward and
    backward).

    Nested inputs (``torch.jagged`` layout, ragged dim at index 2, as ``nt.transpose(1, 2)``
    gives):

    - ``query``: ``(B, H_q, j_q, D)``; ``key``, ``value``: ``(B, H_kv, j_k, D)`` with equal
      lengths (built from one offsets tensor or not). ``j_q`` and ``j_k`` may differ per
      sequence (cross attention); sequences may be empty.
    - Returns a jagged nested tensor ``(B, H_q, j_q, D)`` with the query's ragged structure, in
      the input dtype. A query that attends no key (an empty key sequence) gets zeros.
    - ``is_causal``: causal masking, aligned bottom-right when a sequence's query and key lengths
      differ (query ``i`` of ``L_q`` attends keys ``j <= i + L_k - L_q``), as in FlashAttention.
      Dense SDPA aligns top-left instead; both agree when ``L_q == L_k``.
    - ``enable_gqa``: ``H_q`` a multiple of ``H_kv``; query head ``h`` uses kv head
      ``h // (H_q // H_kv)``.
    - ``scale``: multiplier of ``Q @ K^T``; default ``1 / sqrt(D)``.
    - ``attn_mask`` and ``dropout_p > 0`` are not supported (``ValueError``). ``dropout_p``
      defaults to ``None`` (no dropout) rather than SDPA's ``0.0``: a float default would
      restart Dynamo's analysis once under ``dynamic=True``.
    - Checked as :func:`varlen_compile.varlen_attn` checks its arguments: ``is_causal`` and
      ``enable_gqa`` are bools, ``scale`` a finite float or None.

    Dense (strided) inputs: all arguments go to ``torch.nn.functional.scaled_dot_product_attention``
    unchanged. Mixing nested and dense inputs is a ``TypeError``.

    Example::

        >>> nt = torch.nested.nested_tensor(
        ...     [torch.randn(5, 4, 64), torch.randn(3, 4, 64)], layout=torch.jagged
        ... )  # (B=2, j, H=4, D=64)
        >>> q = k = v = nt.transpose(1, 2)  # (B, H, j, D)
        >>> out = scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, j, D)
    """
    if not _check_all_or_none_nested(query, key, value):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=0.0 if dropout_p is None else dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )
    _check_nested_call(query, key, value, attn_mask, dropout_p)
    # (B, H, j, D) -> (B, j, H, D): values() is then the packed (T, H, D) tensor.
    query_t, key_t, value_t = (x.transpose(1, 2) for x in (query, key, value))
    if not torch.compiler.is_compiling():  # Dynamo graph-breaks on logging calls
        log.debug("scaled_dot_product_attention: %d jagged sequences -> varlen_attn", query.shape[0])
    _check_same_lengths(key_t, value_t)
    min_q, max_q = _cached_seqlens(query_t)
    _, max_k = _cached_seqlens(key_t)
    out, _ = attend(
        SDPA, query_t.values(), key_t.values(), value_t.values(), query_t.offsets().to(torch.int32),
        key_t.offsets().to(torch.int32), max_q, max_k, is_causal, scale=scale, enable_gqa=enable_gqa,
    )
    return _compat.jagged_view(out, query_t.offsets(), min_q, max_q).transpose(1, 2)


def _check_all_or_none_nested(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """True when all three are nested, False when none is; a mix raises ``TypeError``."""
    nested = {name: t.is_nested for name, t in zip(_NAMES, (query, key, value))}
    if all(nested.values()):
        return True
    if not any(nested.values()):
        return False
    raise TypeError(
        f"scaled_dot_product_attention: query, key and value must be all nested or all dense, "
        f"got nested={nested}; build the dense ones as jagged nested tensors too "
        "(torch.nested.nested_tensor_from_jagged(values, offsets))"
    )


def _check_nested_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float | None,
) -> None:
    """What only the nested path requires; shapes, heads, dtypes and devices of the packed
    values are checked by :func:`varlen_attn`."""
    if attn_mask is not None:
        raise ValueError(
            "scaled_dot_product_attention: attn_mask is not supported with nested inputs (the "
            "ragged structure already keeps each sequence to itself); use is_causal=True for "
            "causal masking, or varlen_compile.varlen_attn(..., window_size=(left, right)) on the "
            "packed values for a sliding window"
        )
    check_dropout(
        SDPA, "dropout_p", dropout_p,
        "pass dropout_p=0.0, and apply dropout elsewhere (e.g. to the attention output) if the model needs it",
    )
    for name, tensor in zip(_NAMES, (query, key, value)):
        if tensor.layout != torch.jagged:
            raise ValueError(
                f"scaled_dot_product_attention: {name} is a nested tensor with layout "
                f"{tensor.layout}; only torch.jagged nested tensors are supported: build it with "
                "torch.nested.nested_tensor(..., layout=torch.jagged)"
            )
        if tensor.dim() != 4:
            raise ValueError(
                f"scaled_dot_product_attention: {name} must be 4-D (B, H, j, D), got "
                f"{tensor.dim()}-D with shape {tuple(tensor.shape)}"
            )
        if tensor._ragged_idx != 2:
            raise ValueError(
                f"scaled_dot_product_attention: {name} has shape {tuple(tensor.shape)}, ragged in "
                f"dim {tensor._ragged_idx}; SDPA's layout is (B, H, j, D), ragged in dim 2: for a "
                f"(B, j, H, D) tensor pass {name}.transpose(1, 2)"
            )
        if tensor.lengths() is not None:
            raise ValueError(
                f"scaled_dot_product_attention: {name} has holes (lengths() is set, e.g. after "
                "narrow()); make the (B, j, H, D) tensor contiguous before transposing: "
                f"{name}.transpose(1, 2).contiguous().transpose(1, 2)"
            )
    if key.shape[0] != value.shape[0]:
        raise ValueError(
            "scaled_dot_product_attention: key and value must hold the same number of sequences, got "
            f"{key.shape[0]} and {value.shape[0]}"
        )
    if query.shape[0] != key.shape[0]:
        raise ValueError(
            f"scaled_dot_product_attention: query and key/value must hold the same number of "
            f"sequences, got {query.shape[0]} and {key.shape[0]}"
        )


def _check_same_lengths(key: torch.Tensor, value: torch.Tensor) -> None:
    """Key and value ``(B, j, H, D)`` need equal lengths. Eagerly their offsets are compared by
    value (one host sync; none when they share the tensor); traced and CUDA-graph-captured calls
    use the key's offsets, with a device-side assertion under ``config.check_offsets``."""
    key_offsets, value_offsets = key.offsets(), value.offsets()
    if key_offsets is value_offsets:
        return
    if not (is_traced(key_offsets) or stream_is_capturing(key_offsets.device)):
        if not torch.equal(key_offsets, value_offsets):
            raise ValueError(
                "scaled_dot_product_attention: key and value must have equal sequence lengths, got "
                f"{key_offsets.diff().tolist()} and {value_offsets.diff().tolist()}"
            )
    elif config.check_offsets:
        torch._assert_async(
            (key_offsets == value_offsets).all(), "scaled_dot_product_attention: key and value lengths differ"
        )


def _cached_seqlens(nested: torch.Tensor) -> tuple[int | torch.SymInt | None, int | torch.SymInt | None]:
    """``(min, max)`` sequence lengths where the NJT caches them (e.g. built by
    ``torch.nested.nested_tensor``), else None. Reading them costs no host sync: torch stores
    each as a tensor's size, so under ``torch.compile`` they are SymInts. The max is only a hint
    for ``varlen_attn``; both are passed on to the output."""
    return nested._maybe_min_seqlen, nested._maybe_max_seqlen
