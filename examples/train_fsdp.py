"""Data-parallel training with FSDP2 and torch.compile, on packed batches, with varlen_attn.

A small decoder-only transformer (pre-norm blocks: RMSNorm, fused qkv, causal varlen attention,
out projection, GELU MLP) is sharded block by block with ``fully_shard`` and each block is
compiled with ``fullgraph=True``. Every step takes one global batch of random-length documents;
each rank packs its share of the documents (about the same number of tokens per rank) into one
``(T, d_model)`` row with ``cu_seq`` offsets. The loss is the mean over the global batch's
predicted tokens, so any number of ranks trains the same model on the same data.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 20       # 2 GPUs (NCCL)
    torchrun --nproc-per-node 1 examples/train_fsdp.py --steps 20       # the 1-GPU baseline
    torchrun --nproc-per-node 2 examples/train_fsdp.py --tiny --steps 5 # CPU (gloo), tiny sizes

Rank 0 prints tokens/s and writes the losses as JSON (``--out``), and the run ends with a
PASS/FAIL verdict: every global loss is finite, and the first step's global loss (sharded,
compiled, each rank on its own documents) equals the loss of an unsharded eager copy of the
initial model on the whole global batch, computed on rank 0 (within 2e-2 relative in bf16,
1e-5 in float32). On several GPUs of one host, keep NVLink multicast off where the host requires
it (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from varlen_compile import varlen_attn


class Block(nn.Module):
    """A pre-norm transformer block over a packed batch ``x`` ``(T, d_model)``."""

    def __init__(self, d_model: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d_model // heads
        kv_width = kv_heads * self.head_dim
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_width, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.up, self.down = nn.Linear(d_model, 4 * d_model, bias=False), nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cu_seq: torch.Tensor) -> torch.Tensor:
        total, kv_width = x.shape[0], self.kv_heads * self.head_dim
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.head_dim, kv_width, kv_width], -1)
        attn = varlen_attn(
            q.view(total, self.heads, self.head_dim), k.view(total, self.kv_heads, self.head_dim),
            v.view(total, self.kv_heads, self.head_dim), cu_seq, cu_seq, is_causal=True,
            enable_gqa=self.heads != self.kv_heads,
        )
        x = x + self.out(attn.reshape(total, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, cu_seq: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cu_seq)
        return self.head(self.norm(x))


def global_batches(steps: int, tokens: int, vocab: int, max_doc: int, seed: int = 0) -> list[list[list[int]]]:
    """``steps`` lists of documents of exactly ``tokens`` tokens together (a batch size that
    changes from step to step would recompile the blocks on one GPU); each document repeats a
    random motif (learnable), lengths heavy-tailed, at least 2."""
    rng = random.Random(seed)
    batches = []
    for _ in range(steps):
        lengths = []
        while sum(lengths) < tokens:
            lengths.append(min(max(2, int(rng.paretovariate(1.2) * 32)), max_doc, tokens - sum(lengths)))
        if len(lengths) > 1 and lengths[-1] == 1:  # a 1-token remainder joins the previous document
            lengths[-2:] = [lengths[-2] + 1]
        docs = []
        for length in lengths:
            motif = [rng.randrange(vocab) for _ in range(rng.randint(3, 16))]
            docs.append([motif[i % len(motif)] for i in range(length)])
        batches.append(docs)
    return batches


def rank_share(docs: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Documents dealt to ranks longest first, each to the rank with the fewest tokens so far."""
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for doc in sorted(docs, key=len, reverse=True):
        target = loads.index(min(loads))
        shares[target].append(doc)
        loads[target] += len(doc)
    return shares[rank]


def pack(docs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``(T,)``, next-token targets (-100 at each document's last token), int32 cu_seq."""
    tokens = torch.tensor([t for doc in docs for t in doc], device=device)
    targets = torch.tensor([t for doc in docs for t in doc[1:] + [-100]], device=device)
    cu_seq = torch.tensor([0] + [len(doc) for doc in docs], device=device).cumsum(0).to(torch.int32)
    return tokens, targets, cu_seq


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per global batch")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--max-doc", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s (compilation)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and batches")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="rank 0 writes the losses and tokens/s here (JSON)")
    parser.add_argument("--report-kernels", action="store_true",
                        help="rank 0 says whether the compiled blocks run varlen_compile's Triton templates")
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.layers, args.d_model, args.heads, args.kv_heads, args.vocab, args.max_doc = (
            512, 2, 64, 4, 2, 128, 128)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)  # the same initial weights on every rank, whatever the world size
    model = LanguageModel(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads).to(device, dtype)
    reference = copy.deepcopy(model) if rank == 0 else None  # unsharded, eager: the verdict's reference
    for index, block in enumerate(model.blocks):
        fully_shard(block)
        if not args.no_compile:
            model.blocks[index] = torch.compile(block, fullgraph=True)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    losses, tokens_seen, seconds, reference_loss = [], 0, 0.0, None
    for step, docs in enumerate(global_batches(args.steps, args.tokens, args.vocab, args.max_doc)):
        tokens, targets, cu_seq = pack(rank_share(docs, rank, world_size), device)
        predicted = sum(len(doc) - 1 for doc in docs)  # the global batch's predicted tokens
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()

        def forward_backward() -> torch.Tensor:
            logits = model(tokens, cu_seq)
            # Sum over this rank's tokens / global count, times world_size: FSDP averages
            # gradients over ranks, so the step follows the global batch's mean loss.
            loss = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum") / predicted
            (loss * world_size).backward()
            return loss

        if step == 0 and args.report_kernels and rank == 0:
            from torch._inductor.utils import run_and_get_code

            loss, codes = run_and_get_code(forward_backward)
            source = "\n".join(codes)
            found = {name: name in source for name in ("varlen_fwd_tile(", "varlen_bwd_dkdv_tile(")}
            print(f"compiled blocks run our templates: forward {found['varlen_fwd_tile(']}, "
                  f"backward {found['varlen_bwd_dkdv_tile(']}", flush=True)
        else:
            loss = forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss.detach(), op=dist.ReduceOp.SUM)  # the global mean loss, for the log
        global_loss = loss.item()
        if step == 0 and rank == 0:
            reference_loss = global_loss_of(reference, docs, device)
            del reference
        if step >= args.warmup:
            seconds += time.perf_counter() - start
            tokens_seen += sum(map(len, docs))
        losses.append(global_loss)
        if rank == 0:
            rate = f"{tokens_seen / seconds:,.0f} tokens/s" if seconds else "warm-up"
            print(f"step {step:3d}  loss {global_loss:.4f}  {rate}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as file:
            json.dump({"world_size": world_size, "losses": losses,
                       "tokens_per_s": tokens_seen / seconds if seconds else None, "args": vars(args)}, file)
    dist.destroy_process_group()
    if rank == 0:
        passed, verdict = check_losses(losses, reference_loss, 2e-2 if dtype == torch.bfloat16 else 1e-5)
        print(f"{'PASS' if passed else 'FAIL'}: {verdict} ({world_size} rank{'s' if world_size > 1 else ''})", flush=True)
        if not passed:
            raise SystemExit(1)
    return losses


@torch.no_grad()
def global_loss_of(model: nn.Module, docs: list[list[int]], device: torch.device) -> float:
    """The mean loss of ``model`` over the predicted tokens of all ``docs``, in one process."""
    tokens, targets, cu_seq = pack(docs, device)
    logits = model(tokens, cu_seq)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100).item()


def check_losses(losses: list[float], reference_loss: float, tolerance: float) -> tuple[bool, str]:
    """The verdict: every global loss finite, and the first within ``tolerance`` (relative) of
    the unsharded eager reference's."""
    if not (losses and all(map(math.isfinite, losses))):
        return False, f"non-finite losses {losses}"
    gap = abs(losses[0] - reference_loss) / abs(reference_loss)
    return gap <= tolerance, (
        f"{len(losses)} finite losses; step 0 global loss {losses[0]:.6f} vs {reference_loss:.6f} from an "
        f"unsharded eager copy on the whole batch (relative gap {gap:.1e}, tolerance {tolerance:.0e})"
    )


if __name__ == "__main__":
    main()
