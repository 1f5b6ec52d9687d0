"""Context-parallel varlen attention on several GPUs against one GPU: fwd+bwd time, peak memory.

One packed batch of ``--docs`` documents of ``--doc-len`` tokens (default 2 x 65536), 16 heads x
128, causal, bf16. Every rank times ``context_parallel_varlen_attn`` on its zig-zag share
(compiled, fullgraph); then rank 0 alone times ``varlen_attn`` on the whole batch on one GPU
(compiled, the same kernels), while the other ranks wait. Scaling efficiency =
(one-GPU time / W) / W-GPU time.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --doc-len 131072
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from triton.testing import do_bench

from varlen_compile import varlen_attn
from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard


def fwd_bwd(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor):
    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    return step


def measure(step) -> tuple[float, float]:
    """Median ms (do_bench after warm-up) and the peak GiB allocated during one step."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return do_bench(step, warmup=5, rep=30, return_mode="median"), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--doc-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
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
    cp_ms, cp_peak = measure(fwd_bwd(parallel, local, zigzag_shard(grad_out)))
    times = [None] * world_size
    dist.all_gather_object(times, (cp_ms, cp_peak))

    dist.barrier()
    result = None
    if rank == 0:
        single = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu_seq, cu_seq, args.doc_len, args.doc_len, True), fullgraph=True)
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        one_ms, one_peak = measure(fwd_bwd(single, inputs, grad_out))
        slowest = max(ms for ms, _ in times)
        result = {
            "tokens": total, "docs": args.docs, "heads": args.heads, "head_dim": args.head_dim, "world_size": world_size,
            "one_gpu_ms": one_ms, "one_gpu_peak_gib": one_peak, "cp_ms_per_rank": [ms for ms, _ in times],
            "cp_peak_gib_per_rank": [peak for _, peak in times], "speedup": one_ms / slowest,
            "efficiency": one_ms / slowest / world_size,
        }
        print("| GPUs | tokens | fwd+bwd ms | speed-up | efficiency | peak GiB per GPU (attention) |")
        print("|---|---|---|---|---|---|")
        print(f"| 1 | {total} | {one_ms:.2f} | 1.00x | 100% | {one_peak:.2f} |")
        print(f"| {world_size} | {total} | {slowest:.2f} | {result['speedup']:.2f}x | {result['efficiency']:.0%} | "
              f"{max(p for _, p in times):.2f} |")
        if args.out:
            with open(args.out, "w") as file:
                json.dump(result, file, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
