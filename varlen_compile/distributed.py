"""Context-parallel varlen attention: one packed batch spread over the ranks of a process group.

For batches too long for one GPU, the packed token dimension ``T`` is sharded across the ``W``
ranks of a ``torch.distributed`` group; documents may span ranks. Each rank computes attention
for its own queries against every key of their documents, using torch.distributed's functional
collectives (all-gather of K and V in the forward, reduce-scatter of their gradients in the
backward, through autograd) and our op for the math. No communication layer of our own.

**Sharding: zig-zag.** With causal attention a rank holding the end of a long document does
most of the work when ``T`` is split in order. So ``T`` is cut into ``2W`` equal chunks and rank
``r`` holds chunks ``r`` and ``2W - 1 - r`` (early and late positions pair up, the work per rank
evens out). The cost to the user is a permutation of the token dimension: every per-token tensor
of the batch (input ids, labels, position ids, hidden states) is sharded with
:func:`zigzag_shard` before the model, and per-token outputs gathered back with
:func:`zigzag_unshard` where the global order matters. ``T`` must be a multiple of ``2W`` (pad
the packed batch with one extra document). ``cu_seq`` stays global, the same on every rank.

**Exchange: all-gather.** Each rank gathers K and V of the whole batch once per layer (one
collective each way) and runs one varlen call per local chunk, with keys clamped to what that
chunk's queries can see: the chunk's own prefix for causal attention. Only local outputs are
written; activation memory per rank holds the local q, out and lse and, transiently and saved
for the backward, the gathered K and V. A ring exchange (P2P, overlapped with compute) would keep
only two K/V chunks in flight; this module starts with the all-gather, which is one graph-friendly
collective and no merging of partial results.

Supported masks: full attention, causal, and causal with a left window. Windows on non-causal
attention raise (the keys a chunk needs would not end where its queries do).

Works eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _compat
from .api import varlen_attn

__all__ = ["context_parallel_varlen_attn", "zigzag_chunks", "zigzag_shard", "zigzag_unshard"]


def zigzag_chunks(total: int, world_size: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two global token ranges ``[start, end)`` rank ``rank`` holds: chunks ``rank`` and
    ``2 * world_size - 1 - rank`` of ``2 * world_size`` equal chunks of ``total`` tokens."""
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
    (a, b), (c, d) = zigzag_chunks(x.shape[dim], dist.get_world_size(group), dist.get_rank(group))
    return torch.cat([x.narrow(dim, a, b - a), x.narrow(dim, c, d - c)], dim=dim)


def zigzag_unshard(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 0) -> torch.Tensor:
    """The global tensor from every rank's zig-zag part ``x`` (differentiable): all-gather, then
    back into token order."""
    group = _group(group)
    world_size = dist.get_world_size(group)
    gathered = _compat.all_gather_autograd(x.movedim(dim, 0).contiguous(), 0, group)
    return _to_token_order(gathered, world_size).movedim(0, dim)


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


def _to_token_order(gathered: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank-major gathered parts ``[r0: c0, c(2W-1) | r1: c1, c(2W-2) | ...]`` -> chunks
    ``c0 ... c(2W-1)``."""
    parts = gathered.view(world_size, 2, gathered.shape[0] // (2 * world_size), *gathered.shape[1:])
    return torch.cat([parts[:, 0], parts[:, 1].flip(0)]).flatten(0, 1)


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
    group = _group(group)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    window_left, window_right = window_size
    causal = is_causal or window_right == 0
    if not causal and tuple(window_size) != (-1, -1):
        raise ValueError(
            f"context_parallel_varlen_attn: window_size={tuple(window_size)} without causal masking is "
            "not supported (a chunk's keys would not end where its queries do); use is_causal=True "
            "with (left, 0), or no window"
        )
    total = query.shape[0] * world_size
    chunks = zigzag_chunks(total, world_size, rank)
    keys = _to_token_order(_compat.all_gather_autograd(key.contiguous(), 0, group), world_size)
    values = _to_token_order(_compat.all_gather_autograd(value.contiguous(), 0, group), world_size)
    chunk_len = chunks[0][1] - chunks[0][0]
    outputs = []
    for slot, (start, end) in enumerate(chunks):
        key_end = end if causal else total  # causal queries see nothing past their chunk
        outputs.append(
            varlen_attn(
                query[slot * chunk_len:(slot + 1) * chunk_len], keys[:key_end], values[:key_end],
                (cu_seq.clamp(start, end) - start).to(torch.int32), cu_seq.clamp(0, key_end).to(torch.int32),
                chunk_len if max_len is None else min(max_len, chunk_len),
                key_end if max_len is None else min(max_len, key_end),
                is_causal, scale=scale, window_size=window_size, enable_gqa=enable_gqa,
            )
        )
    return torch.cat(outputs)
