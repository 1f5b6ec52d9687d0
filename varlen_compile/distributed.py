"""Context-parallel varlen attention: one packed batch spread over the ranks of a process group.

For batches too long for one GPU, the packed token dimension ``T`` is sharded across the ``W``
ranks of a ``torch.distributed`` group; documents may span ranks. Each rank computes attention
for its own queries against every key of their documents, using torch.distributed's functional
collectives (all-gather of K and V, reduce-scatter of their gradients) and our ops for the math.
No communication layer of our own.

**Sharding: zig-zag.** With causal attention a rank holding the end of a long document does
most of the work when ``T`` is split in order. So ``T`` is cut into ``2W`` equal chunks and rank
``r`` holds chunks ``r`` and ``2W - 1 - r`` (early and late positions pair up, the work per rank
evens out). The cost to the user is a permutation of the token dimension: every per-token tensor
of the batch (input ids, labels, position ids, hidden states) is sharded with
:func:`zigzag_shard` before the model, and per-token outputs gathered back with
:func:`zigzag_unshard` where the global order matters. ``T`` must be a multiple of ``2W`` (pad
the packed batch with one extra document). ``cu_seq`` stays global, the same on every rank.

**Exchange: all-gather, explicit backward.** Each rank gathers K and V of the whole batch (one
collective each) and runs one varlen call per local chunk, with keys clamped to what that chunk's
queries can see: the prefix up to the chunk's end for causal attention. Between forward and
backward it keeps only its own tensors (q, k, v, out, lse: ``1/W`` of the batch each); the
backward gathers K and V again (one collective of both, ordered after the incoming gradient so
that compiled graphs run it in the backward), runs our backward op per chunk and reduce-scatters dK and dV to their ranks. So
attention's saved activations per rank are ``1/W`` of one GPU's, for one extra all-gather per
backward. A ring exchange (P2P, overlapped with compute) would also hide the
communication; this module starts with the collectives, which are graph-friendly and need no
merging of partial results.

Supported masks: full attention, causal, and causal with a left window. Windows on non-causal
attention raise (the keys a chunk needs would not end where its queries do).

Works eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _compat, config
from ._tracing import is_traced
from .ops import call_backward, call_forward
from .params import AttnOptions, BatchLayout, OptionalInputs
from .validation import (
    Caller, check_flag, check_hint, check_int, check_offset_values, check_scale, check_tensor, check_tensors, check_window,
    describe,
)

__all__ = ["context_parallel_varlen_attn", "zigzag_chunks", "zigzag_shard", "zigzag_unshard"]

CONTEXT_PARALLEL = Caller(
    "context_parallel_varlen_attn", {"cu_seq_q": "cu_seq", "cu_seq_k": "cu_seq", "max_q": "max_len", "max_k": "max_len"}
)


def zigzag_chunks(total: int, world_size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two global token ranges ``[start, end)`` rank ``rank`` holds: chunks ``rank`` and
    ``2 * world_size - 1 - rank`` of ``2 * world_size`` equal chunks of ``total`` tokens."""
    caller = Caller("zigzag_chunks")
    check_int(caller, "total", total, 0)
    check_int(caller, "world_size", world_size, 1)
    if check_int(caller, "rank", rank, 0) >= world_size:
        raise ValueError(caller.message(f"rank must be below world_size ({world_size}), got {rank}"))
    chunks = 2 * world_size
    if total % chunks:
        raise ValueError(
            f"zig-zag sharding needs the token count ({total}) to be a multiple of 2 * world_size "
            f"({chunks}); pad the packed batch with one extra document of "
            f"{(-total) % chunks} tokens"
        )
    size = total // chunks
    first, second = rank, chunks - 1 - rank
    return (first * size, (first + 1) * size), (second * size, (second + 1) * size)


def zigzag_shard(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 0) -> torch.Tensor:
    """This rank's part of the global per-token tensor ``x`` (the same ``x`` on every rank): its
    two zig-zag chunks along ``dim``, concatenated (``T / W`` tokens)."""
    _check_shard_args(Caller("zigzag_shard"), x, group, dim)
    (a, b), (c, d) = zigzag_chunks(x.shape[dim], dist.get_world_size(group), dist.get_rank(group))
    return torch.cat([x.narrow(dim, a, b - a), x.narrow(dim, c, d - c)], dim=dim)


def zigzag_unshard(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 0) -> torch.Tensor:
    """The global tensor from every rank's zig-zag part ``x`` (differentiable): all-gather, then
    back into token order."""
    _check_shard_args(Caller("zigzag_unshard"), x, group, dim)
    group = _group(group)
    world_size = dist.get_world_size(group)
    gathered = _compat.all_gather_autograd(x.movedim(dim, 0).contiguous(), 0, group)
    return _to_token_order(gathered, world_size).movedim(0, dim)


def _check_group(caller: Caller, group: object) -> None:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(caller.message(f"group must be a torch.distributed ProcessGroup or None, got {describe(group)}"))


def _check_shard_args(caller: Caller, x: object, group: object, dim: object) -> None:
    check_tensor(caller, "x", x)
    _check_group(caller, group)
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            caller.message(f"dim must be an int in [{-x.dim()}, {x.dim()}) (x is {x.dim()}-D), got {describe(dim)}")
        )


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def _to_token_order(gathered: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank-major gathered parts ``[r0: c0, c(2W-1) | r1: c1, c(2W-2) | ...]`` -> chunks
    ``c0 ... c(2W-1)``."""
    parts = gathered.view(world_size, 2, gathered.shape[0] // (2 * world_size), *gathered.shape[1:])
    return torch.cat([parts[:, 0], parts[:, 1].flip(0)]).flatten(0, 1)


def _chunk_calls(cu_seq: torch.Tensor, total: int, world_size: int, rank: int, max_len: int | None, causal: bool):
    """For each local chunk: its rows in the local tensors, the global key prefix it reads, and
    its :class:`BatchLayout`. Documents are clamped to the chunk for queries and to the key
    prefix for keys (causal queries see nothing past their chunk): both stay partitions, and
    each document's last query meets its last key, so bottom-right causal masking is right."""
    calls = []
    for slot, (start, end) in enumerate(zigzag_chunks(total, world_size, rank)):
        chunk_len = end - start
        key_end = end if causal else total
        layout = BatchLayout(
            (cu_seq.clamp(start, end) - start).to(torch.int32), cu_seq.clamp(0, key_end).to(torch.int32),
            chunk_len if max_len is None else min(max_len, chunk_len),
            key_end if max_len is None else min(max_len, key_end),
        )
        calls.append((slice(slot * chunk_len, (slot + 1) * chunk_len), key_end, layout))
    return calls


@torch.library.custom_op("varlen_compile::gather_key_value_after", mutates_args=())
def gather_key_value_after(key: torch.Tensor, value: torch.Tensor, after: torch.Tensor, group_name: str) -> torch.Tensor:
    """All-gather ``key`` ``(T / W, H_kv, D)`` and ``value`` ``(T / W, H_kv, D_v)`` over the
    group named ``group_name`` in one collective: ``(T, H_kv * (D + D_v))``, each row K's then V's
    features, tokens rank-major. ``after`` is not read; it orders the gather after ``after``
    exists. The backward passes its incoming gradient there, so a compiled graph gathers K and V
    in the backward. A gather that depends on forward values only (a functional collective in the
    backward, say) is computed in the forward and its output kept until the backward: the
    partitioner never recomputes collectives, and CSE merges it with the forward's own gathers.
    That would keep the whole batch's K and V on every rank."""
    del after
    rows = torch.cat([key.flatten(1), value.flatten(1)], dim=1)  # (T / W, H_kv * (D + D_v))
    gathered = _compat.all_gather(rows, 0, group_name)
    return gathered.wait() if hasattr(gathered, "wait") else gathered


@gather_key_value_after.register_fake
def _(key: torch.Tensor, value: torch.Tensor, after: torch.Tensor, group_name: str) -> torch.Tensor:
    world_size = _compat.group_size_by_name(group_name)
    return key.new_empty((key.shape[0] * world_size, math.prod(key.shape[1:]) + math.prod(value.shape[1:])))


class _ContextParallelAttention(torch.autograd.Function):
    """Zig-zag context-parallel attention. The forward all-gathers K and V and runs one varlen
    call per local chunk; it saves only this rank's tensors (q, k, v, out, lse: 1/W of the
    batch each). The backward gathers K and V again, runs the backward op per chunk and
    reduce-scatters dK and dV to their ranks: one more all-gather in exchange for not keeping
    the whole batch's K and V between forward and backward."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq, max_len, options: AttnOptions, group, kernel: str):
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        total = query.shape[0] * world_size
        keys = _to_token_order(_compat.all_gather(key.contiguous(), 0, group), world_size)
        values = _to_token_order(_compat.all_gather(value.contiguous(), 0, group), world_size)
        outs, lses = [], []
        for rows, key_end, layout in _chunk_calls(cu_seq, total, world_size, rank, max_len, _is_causal(options)):
            out, lse = call_forward(query[rows], keys[:key_end], values[:key_end], layout, options, OptionalInputs(), kernel)
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)
        ctx.save_for_backward(query, key, value, cu_seq, out, lse)
        ctx.max_len, ctx.options, ctx.group, ctx.kernel = max_len, options, group, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, cu_seq, out, lse = ctx.saved_tensors
        group, options = ctx.group, ctx.options
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        total = query.shape[0] * world_size
        gathered = gather_key_value_after(key, value, grad_out, group.group_name)
        key_width = math.prod(key.shape[1:])
        # Reordered K and V come out contiguous (the reordering copies them), as the kernels
        # of the forward's gathers saw them.
        keys = _to_token_order(gathered[:, :key_width], world_size).unflatten(1, key.shape[1:])
        values = _to_token_order(gathered[:, key_width:], world_size).unflatten(1, value.shape[1:])
        del gathered  # eager: free the rank-major copy before the kernels (compiled graphs do)
        # dK and dV accumulate in rank-major order (W, 2 chunks, chunk, ...): what the
        # reduce-scatter sends, without a reordering copy.
        chunk = total // (2 * world_size)
        grad_keys = key.new_zeros((world_size, 2, chunk, *key.shape[1:]))
        grad_values = value.new_zeros((world_size, 2, chunk, *value.shape[1:]))
        grad_query = []
        grad_out = grad_out.contiguous()
        for rows, key_end, layout in _chunk_calls(cu_seq, total, world_size, rank, ctx.max_len, _is_causal(options)):
            dq, dk, dv = call_backward(
                grad_out[rows], query[rows], keys[:key_end], values[:key_end], out[rows], lse[:, rows], layout,
                options, OptionalInputs(), kernel=ctx.kernel,
            )
            grad_query.append(dq)
            for index in range(key_end // chunk if chunk else 0):  # key_end is a chunk boundary
                owner, slot = (index, 0) if index < world_size else (2 * world_size - 1 - index, 1)
                grad_keys[owner, slot] += dk[index * chunk:(index + 1) * chunk]
                grad_values[owner, slot] += dv[index * chunk:(index + 1) * chunk]
            del dk, dv
        del keys, values
        grad_key = _compat.reduce_scatter_sum(grad_keys.flatten(0, 2), 0, group)
        grad_value = _compat.reduce_scatter_sum(grad_values.flatten(0, 2), 0, group)
        return torch.cat(grad_query), grad_key, grad_value, None, None, None, None, None


def _is_causal(options: AttnOptions) -> bool:
    return options.window()[1] == 0


def context_parallel_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq: torch.Tensor,
    max_len: int | None = None,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Self-attention within the documents of a packed batch whose tokens are zig-zag sharded
    over ``group`` (see the module docstring).

    Args:
        query: ``(T / W, H_q, D)``, this rank's queries (:func:`zigzag_shard` of the global ones).
        key, value: ``(T / W, H_kv, D)``, this rank's keys and values.
        cu_seq: int32 ``(N + 1,)``, the global document offsets into ``[0, T]``, on every rank.
        max_len: optional int hint, the longest document.
        is_causal, scale, window_size, enable_gqa: as in :func:`varlen_compile.varlen_attn`;
            ``window_size`` needs ``is_causal`` (or ``(left, 0)``) when it is not ``(-1, -1)``.

    Returns:
        ``(T / W, H_q, D)``: the attention output of this rank's queries, in its zig-zag order.
    """
    caller = CONTEXT_PARALLEL
    _check_group(caller, group)
    group = _group(group)
    is_causal, enable_gqa = check_flag(caller, "is_causal", is_causal), check_flag(caller, "enable_gqa", enable_gqa)
    window_left, window_right = check_window(caller, window_size)
    check_tensors(caller, query, key, value, cu_seq, cu_seq, enable_gqa)
    max_len = check_hint(caller, "max_q", max_len)
    options = AttnOptions(is_causal, check_scale(caller, scale), window_left, window_right)
    if not _is_causal(options) and (window_left, window_right) != (-1, -1):
        raise ValueError(
            f"context_parallel_varlen_attn: window_size={tuple(window_size)} without causal masking is "
            "not supported (a chunk's keys would not end where its queries do); use is_causal=True "
            "with (left, 0), or no window"
        )
    world_size = dist.get_world_size(group)
    total = query.shape[0] * world_size
    zigzag_chunks(total, world_size, dist.get_rank(group))  # checks that T splits evenly
    if not is_traced(cu_seq):
        check_offset_values(caller, cu_seq, cu_seq, total, total, max_len, max_len)
    kernel = config.checked_kernel()
    return _ContextParallelAttention.apply(query, key, value, cu_seq, max_len, options, group, kernel)
