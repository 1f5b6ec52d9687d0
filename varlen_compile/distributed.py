"""Context-parallel varlen attention: one packed batch spread over the ranks of a process group.

For batches too long for one GPU, the packed token dimension ``T`` is sharded across the ``W``
ranks of a ``torch.distributed`` group; documents may span ranks. Each rank computes attention
for its own queries against every key of their documents, using torch.distributed's functional
collectives to move K and V (and their gradients) and our ops for the math. No communication
layer of our own.

**Sharding: zig-zag.** With causal attention a rank holding the end of a long document does
most of the work when ``T`` is split in order. So ``T`` is cut into ``2W`` equal chunks and rank
``r`` holds chunks ``r`` and ``2W - 1 - r`` (early and late positions pair up, the work per rank
evens out). The cost to the user is a permutation of the token dimension: every per-token tensor
of the batch (input ids, labels, position ids, hidden states) is sharded with
:func:`zigzag_shard` before the model, and per-token outputs gathered back with
:func:`zigzag_unshard` where the global order matters. ``T`` must be a multiple of ``2W`` (pad
the packed batch with one extra document). ``cu_seq`` stays global, the same on every rank.

**Exchange ``"all_gather"`` (the default): explicit backward.** Each rank gathers K and V of the
whole batch (one collective each) and runs one varlen call per local chunk, with keys clamped to
what that chunk's queries can see: the prefix up to the chunk's end for causal attention.
Between forward and backward it keeps only its own tensors (q, k, v, out, lse: ``1/W`` of the
batch each); the backward gathers K and V again (one collective of both, ordered after the
incoming gradient so that compiled graphs run it in the backward), runs our backward op per
chunk and reduce-scatters dK and dV to their ranks. No partial results to merge.

**Exchange ``"ring"``.** K/V blocks (a rank's ``T / W`` tokens of K and V, one tensor) pass rank
to rank: in step ``s`` rank ``r`` holds rank ``r - s``'s block and sends it on to ``r + 1``
while it computes, so the transfer of the next block overlaps the calls of this one. Each step
runs one varlen call of the local queries against the visiting block (with a causal window, one
call per pair of chunks the window reaches) and merges its ``(out, lse)`` into the running
result through the lse (:func:`_merge_into`). The backward sends the blocks round again; each
block's dK/dV travel with it, summed in float32 by every rank it visits, and arrive home after
the last step. The backward reads the merged ``out`` and ``lse``, so every step's gradients are
exact shares of the whole softmax's.

**Memory and messages per rank.** ``B``: one K/V block, ``(T / W) * H_kv * (D + D_v)``
elements of the input dtype (``s`` bytes each); both exchanges keep ``B``, q, out and lse from
forward to backward.

=================  ===============================  =========================================
                   all_gather                       ring
=================  ===============================  =========================================
forward K/V        the batch's K and V: ``W B``     2 blocks: the visiting and the arriving
                   (another K or V copy while it    one (``2 B``), plus float32 out and lse of
                   goes into token order)           the local queries
backward K/V       ``W B`` gathered, and dK/dV      2 blocks, plus dK/dV in float32: this
                   of the whole batch: ``W B``      step's, the one arriving and the one
                                                    being sent (``3 B`` of 4 bytes), and a
                                                    float32 dq
forward sends      2 all-gathers (K, V): about      ``W - 1`` steps, 1 message each of
                   ``(W - 1) B s`` bytes            ``B s`` bytes to ``rank + 1``
backward sends     1 all-gather (K and V), 2        ``W - 1`` K/V messages (``B s``) and
                   reduce-scatters (dK, dV):        ``W`` dK/dV messages (``4 B`` bytes),
                   about ``2 (W - 1) B s`` bytes    one of each per step
=================  ===============================  =========================================

(The all-gather's bytes are those of ring algorithms, ``W - 1`` shares a rank.) The ring sends
as many K/V bytes as the all-gather; its gradients travel in float32 (for bf16 inputs twice the
reduce-scatters' bytes), so that a block's dK/dV are rounded once, at home. What it saves is
memory: K/V per rank stay ``O(T / W)`` (the all-gather's are ``O(T)``), and its transfers can
hide behind compute. Each exchange is one functional all-to-all with two non-empty splits
(:func:`_ring_send`), waited for at the end of the step, in eager code and in compiled graphs.

Supported masks: full attention, causal, and causal with a left window. Windows on non-causal
attention raise (the keys a chunk needs would not end where its queries do).

Works eagerly and under ``torch.compile`` (``fullgraph=True``: no host sync, no graph break).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from . import _compat, config
from ._tracing import is_traced
from .ops import call_backward, call_forward
from .params import AttnOptions, BatchLayout, OptionalInputs, lse_dtype
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
    first, second = _chunk_indices(world_size, rank)
    return (first * size, (first + 1) * size), (second * size, (second + 1) * size)


def _chunk_indices(world_size: int, rank: int) -> tuple[int, int]:
    """The zig-zag chunks of ``rank``: ``rank`` and ``2 * world_size - 1 - rank``."""
    return rank, 2 * world_size - 1 - rank


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


def _key_value_rows(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``key`` ``(n, H_kv, D)`` and ``value`` ``(n, H_kv, D_v)`` as one contiguous ``(n, H_kv *
    (D + D_v))`` tensor, each row K's then V's features: one message for both."""
    return torch.cat([key.flatten(1), value.flatten(1)], dim=1)


def _split_key_value(rows: torch.Tensor, key_shape: torch.Size, value_shape: torch.Size):
    """Views of ``rows`` (see :func:`_key_value_rows`) as K ``(n, *key_shape)`` and V ``(n,
    *value_shape)``."""
    key_width = math.prod(key_shape)
    return rows[:, :key_width].unflatten(1, key_shape), rows[:, key_width:].unflatten(1, value_shape)


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
    gathered = _compat.all_gather(_key_value_rows(key, value), 0, group_name)
    return gathered.wait() if hasattr(gathered, "wait") else gathered


@gather_key_value_after.register_fake
def _(key: torch.Tensor, value: torch.Tensor, after: torch.Tensor, group_name: str) -> torch.Tensor:
    world_size = _compat.group_size_by_name(group_name)
    return key.new_empty((key.shape[0] * world_size, math.prod(key.shape[1:]) + math.prod(value.shape[1:])))


class _AllGatherAttention(torch.autograd.Function):
    """Zig-zag context-parallel attention by all-gather. The forward all-gathers K and V and runs one varlen
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
        # Waited here: eagerly the functional collectives return AsyncCollectiveTensors, which
        # must not become the caller's gradients.
        grad_key = _wait(_compat.reduce_scatter_sum(grad_keys.flatten(0, 2), 0, group))
        grad_value = _wait(_compat.reduce_scatter_sum(grad_values.flatten(0, 2), 0, group))
        return torch.cat(grad_query), grad_key, grad_value, None, None, None, None, None


# ----------------------------------------------------------------------------- ring exchange

_INF = float("inf")


def _ring_send(rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Starts sending ``rows`` to the next rank of the ring (``rank + 1``) and receiving the
    previous rank's; returns the receive buffer, valid after :func:`_wait`. One functional
    all-to-all whose only non-empty splits are those two, so in effect point-to-point: the
    exchange every torch from 2.11 compiles with ``fullgraph=True`` (``dist.batch_isend_irecv``
    graph-breaks). The raw functional op, not its Python wrapper, which waits right away when
    traced: so the wait sits where the caller puts it, in eager code and in the compiled graph
    alike, and the exchange runs while the step computes."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    send_sizes, receive_sizes = [0] * world_size, [0] * world_size
    send_sizes[(rank + 1) % world_size] = rows.shape[0]
    receive_sizes[(rank - 1) % world_size] = rows.shape[0]
    return torch.ops._c10d_functional.all_to_all_single(rows, receive_sizes, send_sizes, group.group_name)


def _wait(received: torch.Tensor) -> torch.Tensor:
    """``received`` once its functional collective has completed (a plain tensor)."""
    return torch.ops._c10d_functional.wait_tensor(received)


@torch.library.custom_op("varlen_compile::key_value_rows_after", mutates_args=())
def key_value_rows_after(key: torch.Tensor, value: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """:func:`_key_value_rows` of ``key`` and ``value``, made once ``after`` exists (``after`` is
    not read). The ring's backward builds its own K/V block from the saved K and V after the
    incoming gradient, so a compiled graph keeps only K and V from the forward (not a copy of
    them), and runs the exchange of that block and every one chained to it in the backward.
    Built from forward values alone, the block would be CSE'd with the forward's (kept until the
    backward) and its exchanges would depend on forward values only: the partitioner would run
    them in the forward (it never recomputes collectives) and keep every block that arrived, the
    whole batch's K and V. Opaque on purpose, so that no pass sees through it."""
    del after
    return _key_value_rows(key, value)


@key_value_rows_after.register_fake
def _(key: torch.Tensor, value: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return key.new_empty((key.shape[0], math.prod(key.shape[1:]) + math.prod(value.shape[1:])))


@dataclasses.dataclass(frozen=True)
class _RingCall:
    """One varlen call of a ring step: this rank's query rows ``query_rows`` against rows
    ``key_rows`` of the K/V block visiting it. ``rows_in_document`` (bool, one per query row, or
    None for all) marks the rows whose result counts."""

    query_rows: slice
    key_rows: slice
    layout: BatchLayout
    options: AttnOptions
    rows_in_document: torch.Tensor | None = None


def _slots_rows(slots: list[int], chunk: int) -> slice:
    """The rows of consecutive chunk slots (0: a rank's first chunk, 1: its second)."""
    return slice(slots[0] * chunk, (slots[-1] + 1) * chunk)


def _pieces_offsets(cu_seq: torch.Tensor, chunks: list[int], chunk: int, split: bool) -> torch.Tensor:
    """int32 offsets of the documents into the rows of ``chunks`` (increasing global chunk
    indices) laid one after the other. Merged (``split=False``): one segment per document, its
    rows in every chunk together (a document crossing the gap between two chunks stays one
    segment: its rows end one chunk and start the next). Split: the documents of each chunk
    separately, cut at the chunk's bounds."""
    parts = [cu_seq.clamp(index * chunk, (index + 1) * chunk) - index * chunk for index in chunks]
    if split:
        return torch.cat([part + slot * chunk for slot, part in enumerate(parts)]).to(torch.int32)
    return sum(parts[1:], parts[0]).to(torch.int32)


def _hint(max_len: int | None, rows: int) -> int:
    return rows if max_len is None else min(max_len, rows)


def _whole_step_call(
    cu_seq: torch.Tensor, chunk: int, local: tuple[int, int], block: tuple[int, int], max_len: int | None,
    options: AttnOptions,
) -> _RingCall:
    """A ring step without a window as one call. Full attention: every local query against every
    visiting key. Causal: the query chunks that see any visiting chunk against the chunks they
    see. Zig-zag makes that a product: a block of a lower rank has one chunk before both local
    ones and one after both; a block of a higher rank has both chunks between the local ones.
    Those calls are full attention (every key lies before every query); the own block's call is
    causal, on merged layouts where local order is global order."""
    causal = _is_causal(options)
    pairs = [(q, k) for q in range(2) for k in range(2) if not causal or block[k] <= local[q]]
    query_slots, key_slots = sorted({q for q, _ in pairs}), sorted({k for _, k in pairs})
    if causal and local != block:
        options = dataclasses.replace(options, is_causal=False, window_left=-1, window_right=-1)
    layout = BatchLayout(
        _pieces_offsets(cu_seq, [local[q] for q in query_slots], chunk, split=False),
        _pieces_offsets(cu_seq, [block[k] for k in key_slots], chunk, split=False),
        _hint(max_len, len(query_slots) * chunk), _hint(max_len, len(key_slots) * chunk),
    )
    return _RingCall(_slots_rows(query_slots, chunk), _slots_rows(key_slots, chunk), layout, options)


def _diagonal_call(cu_seq: torch.Tensor, chunk: int, local: tuple[int, int], max_len: int | None,
                   options: AttnOptions) -> _RingCall:
    """Each local chunk against its own keys, causal with the window, documents cut at the
    chunks' bounds (within a chunk local distance is global distance)."""
    offsets = _pieces_offsets(cu_seq, list(local), chunk, split=True)
    layout = BatchLayout(offsets, offsets, _hint(max_len, chunk), _hint(max_len, chunk))
    return _RingCall(slice(0, 2 * chunk), slice(0, 2 * chunk), layout, options)


def _window_call(
    cu_seq: torch.Tensor, total: int, chunk: int, query: tuple[int, int], key: tuple[int, int],
    options: AttnOptions,
) -> _RingCall | None:
    """Query chunk ``query = (slot, chunk index)`` against the earlier key chunk ``key``, causal
    with a left window ``w``, or None where the window does not reach that far.

    One document at most links the two chunks: the one holding the query chunk's first token
    (it must span the gap between them). Queries at global ``p < key_end + w`` see keys of the
    chunk: the first ``rows`` of the chunk. The call takes those rows as one segment against
    that document's keys in the key chunk, with a non-causal window ``(left, -1)``: bottom-right
    alignment puts query ``i`` on key ``i + L_k - rows``, so ``left = key_end - query_start -
    rows + w`` makes its first key the one at global ``p - w``, the same for every document
    (the key segment's start cancels out). The rows past that document's end are other
    documents' queries: ``rows_in_document`` masks them."""
    (query_slot, query_chunk), (key_slot, key_chunk) = query, key
    query_start, key_end = query_chunk * chunk, (key_chunk + 1) * chunk
    rows = min(chunk, key_end + options.window_left - query_start)
    if rows <= 0:
        return None
    # In int64 throughout: Inductor's Triton code for a min/max reduction over int32 offsets
    # mixed with an int constant carried its accumulator as int32 and int64 (a compile error).
    offsets = cu_seq.to(torch.int64)
    document_start = torch.where(offsets <= query_start, offsets, 0).amax()
    document_end = torch.where(offsets > query_start, offsets, total).amin()
    key_start = (document_start - key_chunk * chunk).clamp(0, chunk)
    cu_seq_k = torch.stack([torch.zeros_like(key_start), key_start, torch.full_like(key_start, chunk)]).to(torch.int32)
    cu_seq_q = torch.tensor([0, 0, rows], dtype=torch.int32, device=cu_seq.device)
    window_left = key_end - query_start - rows + options.window_left
    call_options = dataclasses.replace(options, is_causal=False, window_left=window_left, window_right=-1)
    in_document = torch.arange(rows, device=cu_seq.device) < document_end - query_start
    return _RingCall(
        slice(query_slot * chunk, query_slot * chunk + rows), slice(key_slot * chunk, (key_slot + 1) * chunk),
        BatchLayout(cu_seq_q, cu_seq_k, rows, chunk), call_options, in_document,
    )


def _ring_calls(
    cu_seq: torch.Tensor, total: int, world_size: int, rank: int, source: int, max_len: int | None,
    options: AttnOptions,
) -> list[_RingCall]:
    """The calls of the ring step in which ``rank`` holds the K/V block of rank ``source``: one
    call without a window; with a causal window, the diagonal call on the own block and one call
    per pair of a query chunk and an earlier key chunk that the window reaches."""
    chunk = total // (2 * world_size)
    local, block = _chunk_indices(world_size, rank), _chunk_indices(world_size, source)
    if options.window_left < 0:
        return [_whole_step_call(cu_seq, chunk, local, block, max_len, options)]
    calls = [_diagonal_call(cu_seq, chunk, local, max_len, options)] if source == rank else []
    for query in enumerate(local):
        for key in enumerate(block):
            call = _window_call(cu_seq, total, chunk, query, key, options) if key[1] < query[1] else None
            calls += [call] if call is not None else []
    return calls


def _merge_into(out: torch.Tensor, lse: torch.Tensor, rows: slice, part_out: torch.Tensor,
                part_lse: torch.Tensor) -> None:
    """Merges one call's ``(part_out, part_lse)`` into rows ``rows`` of the running ``out``
    (float32 or wider) and ``lse`` (``-inf`` where no key was seen yet), in place:
    ``lse' = logaddexp(lse, part_lse)``, ``out' = exp(lse - lse') out + exp(part_lse - lse')
    part_out``. A row of the call that saw no key has ``part_lse = +inf``: it weighs
    ``exp(-inf) = 0``. Where neither saw a key both weights are ``exp(-inf - 0) = 0``, never
    ``-inf - -inf``: no NaN."""
    part_lse = part_lse.masked_fill(part_lse == _INF, -_INF)
    old_lse = lse[:, rows]
    new_lse = torch.logaddexp(old_lse, part_lse)
    base = new_lse.masked_fill(new_lse == -_INF, 0.0)
    old_weight = torch.exp(old_lse - base).t().unsqueeze(-1)  # (rows, H, 1)
    part_weight = torch.exp(part_lse - base).t().unsqueeze(-1)
    out[rows] = old_weight * out[rows] + part_weight * part_out.to(out.dtype)
    lse[:, rows] = new_lse


class _RingAttention(torch.autograd.Function):
    """Zig-zag context-parallel attention over a ring: K/V blocks travel rank to rank, each
    step's partial results merge through the lse. Saves this rank's tensors only (q, k, v, out,
    lse); the backward sends the blocks round again, with the dK/dV of each block
    travelling beside it and arriving home after the last step."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq, max_len, options: AttnOptions, group, kernel: str):
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        total = query.shape[0] * world_size
        block = _key_value_rows(key, value)
        wide = torch.promote_types(query.dtype, torch.float32)
        out = query.new_zeros((query.shape[0], query.shape[1], value.shape[-1]), dtype=wide)
        lse = query.new_full((query.shape[1], query.shape[0]), -_INF, dtype=lse_dtype(query.dtype))
        visiting = block
        for step in range(world_size):
            last = step + 1 == world_size
            arriving = None if last else _ring_send(visiting, group)  # the next step's block
            keys, values = _split_key_value(visiting, key.shape[1:], value.shape[1:])
            for call in _ring_calls(cu_seq, total, world_size, rank, (rank - step) % world_size, max_len, options):
                part_out, part_lse = call_forward(
                    query[call.query_rows], keys[call.key_rows], values[call.key_rows], call.layout, call.options,
                    OptionalInputs(), kernel,
                )
                if call.rows_in_document is not None:
                    part_lse = part_lse.masked_fill(~call.rows_in_document, _INF)
                _merge_into(out, lse, call.query_rows, part_out, part_lse)
            visiting = None if last else _wait(arriving)
        # A new tensor even where the dtype matches: torch 2.11's Dynamo took the accumulator itself
        # (mutated in place) for an output without gradient, and ran the backward on zeros.
        out, lse = out.to(query.dtype, copy=True), lse.masked_fill(lse == -_INF, _INF)
        # K and V themselves, not their concatenated block: the block is a copy, and saving it
        # would keep this rank's K/V twice from forward to backward (the backward rebuilds it).
        ctx.save_for_backward(query, key, value, cu_seq, out, lse)
        ctx.max_len, ctx.options, ctx.group, ctx.kernel = max_len, options, group, kernel
        ctx.key_shape, ctx.value_shape, ctx.key_dtype = key.shape[1:], value.shape[1:], key.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, cu_seq, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        block = key_value_rows_after(key, value, grad_out)
        group = ctx.group
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        total = query.shape[0] * world_size
        wide = torch.promote_types(query.dtype, torch.float32)
        grad_query = torch.zeros(query.shape, dtype=wide, device=query.device)
        visiting, grad_arriving = block, None
        for step in range(world_size):
            last = step + 1 == world_size
            arriving = None if last else _ring_send(visiting, group)
            calls = _ring_calls(cu_seq, total, world_size, rank, (rank - step) % world_size, ctx.max_len, ctx.options)
            grad_block = _ring_step_backward(ctx, calls, grad_out, query, visiting, out, lse, grad_query)
            if grad_arriving is not None:  # this block's dK/dV from the ranks it visited before
                grad_block += _wait(grad_arriving)
            # On to the next rank; after the last step that is the block's own rank.
            grad_arriving = _ring_send(grad_block, group) if world_size > 1 else grad_block
            visiting = None if last else _wait(arriving)
        grad_home = _wait(grad_arriving) if world_size > 1 else grad_arriving
        grad_key, grad_value = (
            grad.to(ctx.key_dtype).contiguous() for grad in _split_key_value(grad_home, ctx.key_shape, ctx.value_shape)
        )
        return grad_query.to(query.dtype), grad_key, grad_value, None, None, None, None, None


def _ring_step_backward(ctx, calls: list[_RingCall], grad_out, query, visiting, out, lse, grad_query) -> torch.Tensor:
    """The backward op for one ring step's calls: adds their dq into ``grad_query`` and returns
    the visiting block's dK/dV from them (rows as :func:`_key_value_rows`, ``grad_query``'s
    dtype). Each call reads the merged ``out`` and ``lse``: the probabilities ``exp(s - lse)``
    of its keys are already those of the whole softmax, so its gradients are exact shares."""
    keys, values = _split_key_value(visiting, ctx.key_shape, ctx.value_shape)
    grad_block = torch.zeros(visiting.shape, dtype=grad_query.dtype, device=visiting.device)
    grad_keys, grad_values = _split_key_value(grad_block, ctx.key_shape, ctx.value_shape)
    for call in calls:
        rows = call.query_rows
        call_lse = lse[:, rows]
        if call.rows_in_document is not None:  # lse = +inf: exp(s - lse) = 0, the row adds nothing
            call_lse = call_lse.masked_fill(~call.rows_in_document, _INF)
        dq, dk, dv = call_backward(
            grad_out[rows], query[rows], keys[call.key_rows], values[call.key_rows], out[rows], call_lse,
            call.layout, call.options, OptionalInputs(), kernel=ctx.kernel,
        )
        grad_query[rows] += dq
        grad_keys[call.key_rows] += dk
        grad_values[call.key_rows] += dv
    return grad_block


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
    exchange: str = "all_gather",
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
        group: the process group the tokens are sharded over (default: the world).
        exchange: how K and V reach the other ranks (see the module docstring): ``"all_gather"``
            (each rank gathers the whole batch's K and V: few large collectives) or ``"ring"``
            (blocks of ``T / W`` tokens pass rank to rank: K/V memory per rank stays ``O(T / W)``).

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
    options = AttnOptions(
        is_causal=is_causal, scale=check_scale(caller, scale), window_left=window_left, window_right=window_right
    )
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
    attention = _exchange_function(caller, exchange)
    kernel = config.checked_kernel()
    return attention.apply(query, key, value, cu_seq, max_len, options, group, kernel)


_EXCHANGES = {"all_gather": _AllGatherAttention, "ring": _RingAttention}


def _exchange_function(caller: Caller, exchange: object) -> type[torch.autograd.Function]:
    if not isinstance(exchange, str) or exchange not in _EXCHANGES:
        raise ValueError(caller.message(
            f"exchange must be one of {', '.join(map(repr, _EXCHANGES))}, got {describe(exchange)}"
        ))
    return _EXCHANGES[exchange]
