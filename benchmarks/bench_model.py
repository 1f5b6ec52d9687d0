"""Training-step time of a small packed-sequence transformer, attention swapped, on one GPU.

bench.py times attention alone. A one-op compiled graph pays torch.compile's whole per-call
host cost (Dynamo guards, AOTAutograd wrappers, the autograd engine) for one kernel, which
dominates when the GPU work is ~0.2 ms. Here the same attention sits in a model, as users run
it: ``LAYERS`` pre-norm blocks (RMSNorm, fused qkv Linear, varlen attention, out Linear,
RMSNorm, GELU MLP), bf16, forward + backward of the whole model per step.

Variants (same weights, same packed random batch):
    compiled-ours        torch.compile(model, fullgraph=True), varlen_compile.varlen_attn with
                         config.kernel="triton": our Inductor templates forward and backward
    compiled-ours-auto   the same with config.kernel="auto" (the default): the lowering's
                         default table picks the kernel, FlashAttention 4 where it was faster
    compiled-fa4         torch.compile(model) (not fullgraph: it cannot be) with FlashAttention
                         4 called directly: a graph break around every attention call
    compiled-torch       torch.compile(model, fullgraph=True), torch.nn.attention.varlen
                         .varlen_attn: aten flash (FA2) kernels inside the compiled graph
    eager-torch          the model in eager mode with torch.nn.attention.varlen.varlen_attn

    python benchmarks/bench_model.py --cases headline-causal,many-short-causal --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from triton.testing import do_bench

from bench import RESULTS, Case, all_cases
from varlen_compile import config


class Block(nn.Module):
    """One pre-norm transformer block over a packed batch ``x`` of shape ``(T, H * D)``."""

    def __init__(self, case: Case, attention: str) -> None:
        super().__init__()
        self.case, self.attention = case, attention
        width, kv_width = case.heads_q * case.head_dim, case.heads_kv * case.head_dim
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.qkv = nn.Linear(width, width + 2 * kv_width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.up, self.down = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def attend(self, q, k, v, cu_seq, max_len):
        if self.attention == "fa4":
            from flash_attn.cute.interface import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seq, cu_seqlens_k=cu_seq, max_seqlen_q=max_len,
                                          max_seqlen_k=max_len, causal=self.case.causal)[0]
        if self.attention == "ours":
            from varlen_compile import varlen_attn

            return varlen_attn(q, k, v, cu_seq, cu_seq, is_causal=self.case.causal,
                               enable_gqa=self.case.heads_q != self.case.heads_kv)
        from torch.nn.attention.varlen import varlen_attn

        window = (-1, 0) if self.case.causal else (-1, -1)
        return varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, window_size=window)

    def forward(self, x: torch.Tensor, cu_seq: torch.Tensor, max_len: int) -> torch.Tensor:
        c, total = self.case, x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).split(
            [c.heads_q * c.head_dim, c.heads_kv * c.head_dim, c.heads_kv * c.head_dim], -1)
        attn = self.attend(q.view(total, c.heads_q, c.head_dim), k.view(total, c.heads_kv, c.head_dim),
                           v.view(total, c.heads_kv, c.head_dim), cu_seq, max_len)
        x = x + self.out(attn.reshape(total, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, case: Case, attention: str, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(case, attention) for _ in range(layers))

    def forward(self, x, cu_seq, max_len):
        for block in self.blocks:
            x = block(x, cu_seq, max_len)
        return x


def time_variant(case: Case, variant: str, layers: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    attention = variant.split("-")[1]  # ours, torch or fa4
    model = Model(case, attention, layers).cuda().to(torch.bfloat16)
    width = case.heads_q * case.head_dim
    x = torch.randn(case.total, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_seq = torch.tensor((0,) + case.lengths, device="cuda").cumsum(0).to(torch.int32)
    max_len = max(case.lengths)
    if variant.startswith("compiled"):
        run = torch.compile(model, fullgraph=attention != "fa4")
    else:
        run = model
    grad = torch.randn_like(x)
    leaves = [x, *model.parameters()]

    def step():
        run(x, cu_seq, max_len).backward(grad)

    with config.patch(kernel="auto" if variant.endswith("-auto") else "triton"):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        ms = do_bench(step, warmup=50, rep=300, grad_to_none=leaves, return_mode="median")
    attn_flops = 3.5 * 4.0 * case.head_dim * case.heads_q * sum(
        n * (n + 1) // 2 if case.causal else n * n for n in case.lengths) * layers
    linear_flops = 3 * 2 * case.total * sum(p.numel() for p in model.parameters() if p.dim() == 2)
    return {"case": case.name, "variant": variant, "layers": layers, "step_ms": ms,
            "tflops": (attn_flops + linear_flops) / ms / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="headline-causal,many-short-causal,d128-causal")
    parser.add_argument("--variants", default="compiled-ours,compiled-torch,eager-torch")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tag", default="model")
    parser.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = parser.parse_args()
    rows = []
    for name in args.cases.split(","):
        for variant in args.variants.split(","):
            try:
                row = time_variant(all_cases()[name], variant, args.layers)
            except Exception as error:  # report and go on
                row = {"case": name, "variant": variant, "error": f"{type(error).__name__}: {str(error)[:200]}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    variants = args.variants.split(",")
    lines = [f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; {args.layers} layers; "
             "median ms per training step (forward + backward) of do_bench, model TFLOP/s in brackets", "",
             "| case | " + " | ".join(variants) + " | compiled-ours vs compiled-torch | vs eager-torch "
             "| compiled-ours-auto vs compiled-fa4 |",
             "|---" * (len(variants) + 4) + "|"]
    for name in dict.fromkeys(r["case"] for r in rows):
        got = {r["variant"]: r for r in rows if r["case"] == name}
        cells = [f"{got[v]['step_ms']:.3f} ({got[v]['tflops']:.0f})" if "step_ms" in got.get(v, {}) else "-" for v in variants]

        def ratio(base: str, ours: str = "compiled-ours") -> str:
            if "step_ms" in got.get(base, {}) and "step_ms" in got.get(ours, {}):
                return f"{got[base]['step_ms'] / got[ours]['step_ms']:.2f}x"
            return "-"

        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio('compiled-torch')} | {ratio('eager-torch')} "
                     f"| {ratio('compiled-fa4', 'compiled-ours-auto')} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(table + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
