"""Context-parallel varlen attention on several GPUs against one GPU: fwd+bwd time, memory.

One packed batch of ``--docs`` documents of ``--doc-len`` tokens (default 2 x 65536), 16 heads x
128, causal, bf16. Every rank times ``context_parallel_varlen_attn`` on its zig-zag share
(compiled, fullgraph); then rank 0 alone times ``varlen_attn`` on the whole batch on one GPU
(compiled, the same kernels), while the other ranks wait. Scaling efficiency =
(one-GPU time / W) / W-GPU time. Also measured: the communication alone (the exchange's NCCL
collectives at the same sizes: all-gather of K and V forward and again backward, reduce-scatter
of dK and dV), the memory attention holds from forward to backward (its output and saved
tensors) and the peak during the step, per GPU.

Times are medians of a fixed number of steps timed with CUDA events, the same count on every rank
(``do_bench`` picks its repeat count from a first timing, which can differ between ranks and would
mismatch their collectives).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --doc-len 131072

``--fake-world-size W`` runs one process on one GPU as rank 0 of ``W`` over torch.distributed's fake
process group (collectives do nothing, their outputs are left uninitialized): the numbers are
meaningless, but the kernels, their sizes and every allocation are rank 0's. It measures what one
GPU of ``W`` computes and holds without ``W`` GPUs; the communication and the speed-up it costs
are not measured (the compute-only ratio is an upper bound).

    python benchmarks/bench_context_parallel.py --fake-world-size 2 --doc-len 131072
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from varlen_compile import varlen_attn
from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard


def timed(step, warmup: int = 3, iters: int = 10) -> float:
    """Median ms of ``iters`` calls after ``warmup`` calls (CUDA events)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def measure(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, iters: int) -> dict:
    """fwd+bwd median ms; GiB held from forward to backward (output + saved tensors) and peak GiB
    during a step, above what was allocated before it."""

    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*inputs)
    torch.cuda.synchronize()
    held = (torch.cuda.memory_allocated() - base) / 2**30
    torch.autograd.grad(out, inputs, grad_out)
    del out
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"ms": timed(step, iters=iters), "held_gib": held, "peak_gib": peak}


def communication_ms(local: torch.Tensor, world_size: int, iters: int) -> float:
    """The exchange's collectives alone, at the benchmark's sizes: all-gather K and V (forward),
    again (backward), reduce-scatter dK and dV."""
    gathered = torch.empty((local.shape[0] * world_size, *local.shape[1:]), device=local.device, dtype=local.dtype)
    scattered = torch.empty_like(local)

    def step():
        for _ in range(4):
            dist.all_gather_into_tensor(gathered, local)
        for _ in range(2):
            dist.reduce_scatter_tensor(scattered, gathered)

    return timed(step, iters=iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--doc-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="rank 0 appends one JSON line here")
    parser.add_argument("--fake-world-size", type=int, default=0,
                        help="one process as rank 0 of this many over the fake process group (compute and memory only)")
    args = parser.parse_args()
    fake = args.fake_world_size > 0
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world_size)
    else:
        dist.init_process_group("nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    total = args.docs * args.doc_len
    cu_seq = torch.arange(args.docs + 1, device="cuda", dtype=torch.int32) * args.doc_len
    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(total, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))

    parallel = torch.compile(
        lambda q, k, v: context_parallel_varlen_attn(q, k, v, cu_seq, args.doc_len, True), fullgraph=True
    )
    local = [zigzag_shard(x).detach().requires_grad_() for x in (q, k, v)]
    cp = measure(parallel, local, zigzag_shard(grad_out), args.iters)
    if fake:
        per_rank = [cp]
    else:
        cp["comm_ms"] = communication_ms(local[1].detach(), world_size, args.iters)
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, cp)
        dist.barrier()
    if rank == 0:
        single = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu_seq, cu_seq, args.doc_len, args.doc_len, True), fullgraph=True)
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        one = measure(single, inputs, grad_out, args.iters)
        slowest = max(r["ms"] for r in per_rank)
        result = {
            "tokens": total, "docs": args.docs, "doc_len": args.doc_len, "heads": args.heads, "head_dim": args.head_dim,
            "world_size": world_size, "one_gpu": one, "per_rank": per_rank, "speedup": one["ms"] / slowest,
            "efficiency": one["ms"] / slowest / world_size, "fake_process_group": fake,
        }
        print(f"{args.docs} x {args.doc_len} tokens, {args.heads} x {args.head_dim}, causal, bf16, fwd+bwd"
              + (f"; one GPU as rank 0 of {world_size} (fake process group: no communication)" if fake else ""))
        print("| GPUs | fwd+bwd ms | speed-up | efficiency | communication ms (share) | held GiB per GPU | peak GiB per GPU |")
        print("|---|---|---|---|---|---|---|")
        print(f"| 1 | {one['ms']:.2f} | 1.00x | 100% | - | {one['held_gib']:.2f} | {one['peak_gib']:.2f} |")
        ranks = ", ".join(f"{r['ms']:.2f}" for r in per_rank)
        if fake:
            comm_cell = "not measured"
        else:
            comm = max(r["comm_ms"] for r in per_rank)
            comm_cell = f"{comm:.2f} ({comm / slowest:.1%})"
        print(f"| {world_size}{' (rank 0, fake)' if fake else ''} | {slowest:.2f} (ranks: {ranks}) | "
              f"{result['speedup']:.2f}x | {result['efficiency']:.0%} | {comm_cell} | "
              f"{max(r['held_gib'] for r in per_rank):.2f} | {max(r['peak_gib'] for r in per_rank):.2f} |", flush=True)
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps(result) + "\n")
    if not fake:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
