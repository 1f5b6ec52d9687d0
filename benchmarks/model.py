"""``model``: the training step of a small packed-sequence transformer, attention swapped."""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn

from varlen_compile import config, varlen_attn

from . import harness
from .harness import CASES, Case, log_row

HELP = """\
Training-step time of a small packed-sequence transformer on one GPU, attention swapped. A
one-op compiled graph pays torch.compile's whole per-call host cost for one kernel; here the
same attention sits in a model, as users run it: --layers pre-norm blocks (RMSNorm, fused qkv
Linear, varlen attention, out Linear, RMSNorm, GELU MLP), bf16, forward + backward of the whole
model per step, median of do_bench. Same weights, same packed random batch for every variant:

  compiled-ours        torch.compile(model, fullgraph=True), varlen_compile.varlen_attn with
                       config.kernel="triton": our Inductor templates forward and backward
  compiled-ours-auto   the same with config.kernel="auto" (the default switch)
  compiled-fa4         torch.compile(model) (not fullgraph: it cannot be) with FlashAttention 4
                       called directly: a graph break around every attention call
  compiled-torch       torch.compile(model, fullgraph=True), torch.nn.attention.varlen
                       .varlen_attn: aten flash (FA2) kernels inside the compiled graph
  eager-torch          the model in eager mode with torch.nn.attention.varlen.varlen_attn"""

VARIANTS = ("compiled-ours", "compiled-ours-auto", "compiled-fa4", "compiled-torch", "eager-torch")


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
        causal = self.case.causal
        if self.attention == "fa4":
            from flash_attn.cute.interface import flash_attn_varlen_func

            return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seq, cu_seqlens_k=cu_seq, max_seqlen_q=max_len,
                                          max_seqlen_k=max_len, causal=causal)[0]
        if self.attention == "ours":
            return varlen_attn(q, k, v, cu_seq, cu_seq, is_causal=causal, enable_gqa=self.case.gqa)
        return torch_varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1))

    def forward(self, x: torch.Tensor, cu_seq: torch.Tensor, max_len: int) -> torch.Tensor:
        c, total = self.case, x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).split([c.heads_q * c.head_dim, c.heads_kv * c.head_dim, c.heads_kv * c.head_dim], -1)
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


def model_flops(case: Case, model: Model, layers: int) -> float:
    """Attention (3.5 forwards for forward+backward) and the linear layers (3 x 2 flops per weight per token)."""
    linear = 3 * 2 * case.total * sum(p.numel() for p in model.parameters() if p.dim() == 2)
    return 3.5 * harness.forward_flops(case) * layers + linear


def time_variant(case: Case, variant: str, layers: int) -> dict:
    harness.fresh_compile()
    torch.manual_seed(0)
    attention = variant.split("-")[1]  # ours, torch or fa4
    model = Model(case, attention, layers).cuda().to(torch.bfloat16)
    x = torch.randn(case.total, case.heads_q * case.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_seq, max_len = harness.cu_seq_of(case.lengths), max(case.lengths)
    run = torch.compile(model, fullgraph=attention != "fa4") if variant.startswith("compiled") else model
    grad = torch.randn_like(x)

    def step():
        run(x, cu_seq, max_len).backward(grad)

    with config.patch(kernel="auto" if variant.endswith("-auto") else "triton"):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        ms = harness.bench_ms(step, grad_to_none=[x, *model.parameters()])
    return {"case": case.name, "variant": variant, "layers": layers, "step_ms": ms,
            "tflops": model_flops(case, model, layers) / ms / 1e9}


def markdown(rows: list[dict], variants: list[str], layers: int) -> str:
    def ratio(got: dict, base: str, ours: str = "compiled-ours") -> str:
        if "step_ms" in got.get(base, {}) and "step_ms" in got.get(ours, {}):
            return f"{got[base]['step_ms'] / got[ours]['step_ms']:.2f}x"
        return "-"

    body = []
    for name in dict.fromkeys(row["case"] for row in rows):
        got = {row["variant"]: row for row in rows if row["case"] == name}
        cells = [f"{got[v]['step_ms']:.3f} ({got[v]['tflops']:.0f})" if "step_ms" in got.get(v, {}) else "-" for v in variants]
        body.append([name, *cells, ratio(got, "compiled-torch"), ratio(got, "eager-torch"),
                     ratio(got, "compiled-fa4", "compiled-ours-auto")])
    header = ["case", *variants, "compiled-ours vs compiled-torch", "vs eager-torch", "compiled-ours-auto vs compiled-fa4"]
    title = (f"{harness.device_line()}; bf16; {layers} layers; median ms per training step (forward + backward) "
             "of do_bench, model TFLOP/s in brackets")
    return "\n".join([title, ""] + harness.markdown_table(header, body))


def cmd_model(args: argparse.Namespace) -> None:
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rows = []
    for case in harness.pick(CASES, args.cases):
        for variant in variants:
            try:
                row = time_variant(case, variant, args.layers)
            except Exception as error:  # noqa: BLE001 -- report and go on
                row = {"case": case.name, "variant": variant, "error": harness.error_text(error)}
            log_row(row)
            rows.append(row)
    harness.write_results(args.out, args.tag, rows, markdown(rows, variants, args.layers))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("model", help="training step of a small transformer, attention swapped",
                                 description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="headline-causal,many-short-causal,d128-causal",
                        help="comma-separated standard cases (default: %(default)s)")
    parser.add_argument("--variants", default="compiled-ours,compiled-torch,eager-torch",
                        help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4)
    harness.add_output_arguments(parser, "model")
    parser.set_defaults(func=cmd_model)
