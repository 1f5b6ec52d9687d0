"""``context-parallel``: context-parallel varlen attention on several GPUs against one GPU."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from varlen_compile import varlen_attn
from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_shard

from . import harness

HELP = """\
Context-parallel varlen attention on W GPUs against one GPU: forward+backward time and memory.
One packed batch of --docs documents of --doc-len tokens (default 2 x 65536), --heads x
--head-dim, causal, bf16. Every rank times context_parallel_varlen_attn on its zig-zag share
(compiled, fullgraph); then rank 0 alone times varlen_attn on the whole batch (compiled, the
same kernels) while the others wait. Scaling efficiency = (one-GPU time / W) / W-GPU time. Also
measured: the communication alone (the exchange's NCCL collectives at the same sizes:
all-gather of K and V forward and again backward, reduce-scatter of dK and dV), the memory
attention keeps from forward to backward (its output and saved tensors) and the peak during the
step, per GPU. Times are medians of --iters steps timed with CUDA events (the same count on
every rank, so that their collectives match).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m benchmarks context-parallel --doc-len 131072

--fake-world-size W runs one process on one GPU as rank 0 of W over torch.distributed's fake
process group (collectives do nothing, their outputs are left uninitialized): the numbers
computed are meaningless, but the kernels, their sizes and every allocation are rank 0's. It
measures what one GPU of W computes and keeps without W GPUs; the communication is not
measured (the compute-only ratio is an upper bound).

    python -m benchmarks context-parallel --fake-world-size 2 --doc-len 131072

--exchange picks context_parallel_varlen_attn's exchange (all_gather or ring). The table also
gives a model of the communication per rank, bytes over --link-gbs (default: the effective rate
of the all-gather's collectives on 2 x H200, NVLink, 2026-11-24: 3.22 GB per rank in 12.0 ms at
2 x 131072 tokens, 16 x 128, bf16), from the exchange's messages (docstring of
varlen_compile.distributed): the all-gather's are not overlapped with compute (model: compute +
communication), the ring's are (model: the larger of the two)."""

# The all-gather's collectives on 2 x H200 (NVLink, NCCL, 2026-11-24): 6 collectives of a rank's
# K (0.5 GiB at 2 x 131072, 16 x 128, bf16), 3.22 GB per rank, in 12.0 ms.
MEASURED_LINK_GBS = 268.0


def measure(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, iters: int) -> dict:
    """fwd+bwd median ms; GiB kept from forward to backward (output + saved tensors) and peak GiB
    during a step, above what was allocated before it."""

    def step():
        torch.autograd.grad(fn(*inputs), inputs, grad_out)

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
    return {"ms": harness.cuda_event_ms(step, iters=iters), "held_gib": held, "peak_gib": peak}


def communication_ms(local: torch.Tensor, world_size: int, iters: int, exchange: str) -> float:
    """The exchange's messages alone, at the benchmark's sizes (``local``: this rank's K, V the
    same size). All-gather: all-gather K and V (forward), again (backward), reduce-scatter dK and
    dV. Ring: ``W - 1`` K/V blocks forward, ``W - 1`` again and ``W`` float32 dK/dV blocks
    backward, each to the next rank."""
    if exchange == "all_gather":
        gathered = local.new_empty((local.shape[0] * world_size, *local.shape[1:]))
        scattered = torch.empty_like(local)

        def step():
            for _ in range(4):
                dist.all_gather_into_tensor(gathered, local)
            for _ in range(2):
                dist.reduce_scatter_tensor(scattered, gathered)

        return harness.cuda_event_ms(step, iters=iters)
    rank = dist.get_rank()
    block = torch.cat([local.flatten(), local.flatten()])  # K and V travel as one tensor
    grads = block.float()

    def ring(tensor: torch.Tensor) -> None:
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, (rank + 1) % world_size), dist.P2POp(dist.irecv, received, (rank - 1) % world_size)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    def step():
        for _ in range(2 * (world_size - 1)):
            ring(block)
        for _ in range(world_size):
            ring(grads)

    return harness.cuda_event_ms(step, iters=iters)


def modeled_communication_ms(local: torch.Tensor, world_size: int, exchange: str, link_gbs: float) -> float:
    """Bytes a rank sends per forward+backward step (the messages of ``communication_ms``) over
    ``link_gbs`` GB/s."""
    kv_bytes = 2 * local.numel() * local.element_size()  # this rank's K and V
    if exchange == "all_gather":
        # 4 all-gathers (K and V, forward and backward) and 2 reduce-scatters (dK, dV): each sends
        # W - 1 blocks of K's size, kv_bytes / 2.
        sent = 3 * (world_size - 1) * kv_bytes
    else:
        sent = 2 * (world_size - 1) * kv_bytes + world_size * kv_bytes * 4 // local.element_size()
    return sent / (link_gbs * 1e9) * 1e3


def init_process_group(fake_world_size: int) -> None:
    if fake_world_size:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=fake_world_size)
    else:
        dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def markdown(args: argparse.Namespace, one: dict, per_rank: list[dict], world_size: int, fake: bool) -> str:
    slowest = max(r["ms"] for r in per_rank)
    comm = "not measured"
    if not fake:
        comm_ms = max(r["comm_ms"] for r in per_rank)
        comm = f"{comm_ms:.2f} ({comm_ms / slowest:.1%})"
    model = per_rank[0]["model_comm_ms"]
    overlapped = args.exchange == "ring"
    estimate = max(slowest, model) if overlapped else slowest + model
    modeled = f"{model:.2f}; step {estimate:.2f} ({one['ms'] / estimate:.2f}x)"
    ranks = ", ".join(f"{r['ms']:.2f}" for r in per_rank)
    title = (f"{args.docs} x {args.doc_len} tokens, {args.heads} x {args.head_dim}, causal, bf16, fwd+bwd, "
             f"exchange {args.exchange}"
             + (f"; one GPU as rank 0 of {world_size} (fake process group: no communication)" if fake else ""))
    body = [[1, f"{one['ms']:.2f}", "1.00x", "100%", "-", "-", f"{one['held_gib']:.2f}", f"{one['peak_gib']:.2f}"],
            [f"{world_size}{' (rank 0, fake)' if fake else ''}", f"{slowest:.2f} (ranks: {ranks})",
             f"{one['ms'] / slowest:.2f}x", f"{one['ms'] / slowest / world_size:.0%}", comm, modeled,
             f"{max(r['held_gib'] for r in per_rank):.2f}", f"{max(r['peak_gib'] for r in per_rank):.2f}"]]
    header = ["GPUs", "fwd+bwd ms", "speed-up", "efficiency", "communication ms (share)",
              f"modeled communication ms at {args.link_gbs:g} GB/s; step", "held GiB per GPU", "peak GiB per GPU"]
    return "\n".join([title] + harness.markdown_table(header, body))


def cmd_context_parallel(args: argparse.Namespace) -> None:
    fake = args.fake_world_size > 0
    init_process_group(args.fake_world_size)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    total = args.docs * args.doc_len
    cu_seq = torch.arange(args.docs + 1, device="cuda", dtype=torch.int32) * args.doc_len
    torch.manual_seed(0)
    q, k, v, grad_out = (torch.randn(total, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    parallel = torch.compile(
        lambda q, k, v: context_parallel_varlen_attn(q, k, v, cu_seq, args.doc_len, True, exchange=args.exchange),
        fullgraph=True,
    )
    local = [zigzag_shard(t).detach().requires_grad_() for t in (q, k, v)]
    cp = measure(parallel, local, zigzag_shard(grad_out), args.iters)
    cp["model_comm_ms"] = modeled_communication_ms(local[1].detach(), world_size, args.exchange, args.link_gbs)
    per_rank = [cp]
    if not fake:
        cp["comm_ms"] = communication_ms(local[1].detach(), world_size, args.iters, args.exchange)
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, cp)
        dist.barrier()
    if rank == 0:
        single = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu_seq, cu_seq, args.doc_len, args.doc_len, True),
                               fullgraph=True)
        one = measure(single, [t.detach().requires_grad_() for t in (q, k, v)], grad_out, args.iters)
        slowest = max(r["ms"] for r in per_rank)
        result = {"tokens": total, "docs": args.docs, "doc_len": args.doc_len, "heads": args.heads, "exchange": args.exchange,
                  "head_dim": args.head_dim, "world_size": world_size, "one_gpu": one, "per_rank": per_rank,
                  "speedup": one["ms"] / slowest, "efficiency": one["ms"] / slowest / world_size, "fake_process_group": fake}
        harness.log.info(markdown(args, one, per_rank, world_size, fake))
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps(result) + "\n")
    if not fake:
        dist.barrier()
    dist.destroy_process_group()


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("context-parallel", help="context-parallel attention on W GPUs vs one (torchrun)",
                                 description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2)
    parser.add_argument("--doc-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="rank 0 appends one JSON line to this file")
    parser.add_argument("--fake-world-size", type=int, default=0,
                        help="one process as rank 0 of this many over the fake process group (compute and memory only)")
    parser.add_argument("--exchange", choices=("all_gather", "ring"), default="all_gather",
                        help="context_parallel_varlen_attn's exchange (default: %(default)s)")
    parser.add_argument("--link-gbs", type=float, default=MEASURED_LINK_GBS,
                        help="GB/s per rank for the communication model (default: the measured %(default)g)")
    parser.set_defaults(func=cmd_context_parallel)
