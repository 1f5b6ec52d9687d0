"""Sweep tile configs of the shared kernels (through the standalone launcher: same math as the
templates, no Inductor compile per config) against aten flash, on the benchmark's shapes.

    python benchmarks/sweep_configs.py --head-dims 64,128 [--backward]          # on a GPU
    python benchmarks/sweep_configs.py --regs --head-dims 128 [--backward]      # any machine
    python benchmarks/sweep_configs.py --regs --head-dims 128 --gqa-group 4     # + GQA-packed forward

Prints, per (head dim, causal), each config's median ms and its speed relative to aten flash;
use it to choose the defaults in lowering/configs.py.

``--regs`` needs no GPU: it compiles the same candidates (and the defaults) for sm_90 with
Triton's NVIDIA backend and prints registers, spill stack (bytes per thread) and shared memory
per block from the cubin (``cuobjdump``; ``results/sm90-regs.md``). Spills cost local-memory
traffic in the inner loops; a config that spills less is a candidate to time, not a result by
itself. Run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tools"))
import compile_sm90  # noqa: E402  (tests/tools: the sm_90 compile check's helpers)
from bench import all_cases, forward_flops, make_inputs  # noqa: E402

from varlen_compile.lowering import launcher  # noqa: E402
from varlen_compile.lowering.configs import (  # noqa: E402
    BackwardConfig,
    ForwardConfig,
    backward_constexprs,
    default_backward_config,
    default_forward_config,
    kernel_constexprs,
    pack_gqa_group,
)
from varlen_compile.params import AttnOptions, BatchLayout  # noqa: E402

FORWARD_CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4)],
}
BACKWARD_CANDIDATES = {
    64: [(32, 128, 128, 32, 4, 3), (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 2), (32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 3)],
    128: [(32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 2), (64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 8, 3), (64, 64, 64, 64, 4, 3), (32, 64, 64, 32, 4, 3),
          # the least-spilling tiles at sm_90 (--regs, results/sm90-regs.md)
          (32, 64, 64, 32, 8, 2), (64, 64, 128, 64, 8, 2), (64, 64, 64, 64, 8, 2), (64, 32, 64, 32, 4, 2)],
}
SHAPES = {64: "headline", 128: "d128"}


def _compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int, gqa_group: int = 1):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # As launched on MHA tensors from torch: gqa_group == 1 (Triton specializes 1 to a constant),
    # pointers 16-byte aligned and strides multiples of 16 (its divisibility hints). Without the
    # hints the compile differs a lot (d128 causal backward: 1656 B of stack instead of 160).
    # A GQA launch (gqa_group > 1) passes the group as a plain int32 argument, as Triton does
    # for 4 or 8 (no constant, no divisibility hint).
    constexprs = dict(constexprs)
    if "gqa_group" in inspect.signature(kernel.fn).parameters and gqa_group == 1:
        constexprs["gqa_group"] = 1
    signature = compile_sm90._signature(kernel, constexprs, "bf16")
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(signature)
             if signature[name].startswith("*") or name.startswith("stride_")}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def regs(head_dims: list[int], backward: bool, gqa_group: int = 1) -> None:
    """The ``--regs`` table: every candidate (defaults first, marked) compiled for sm_90, bf16.
    ``gqa_group`` > 1 (forward only): each config compiled for that GQA group, unpacked and
    with ``pack_gqa`` (one row each, "fwd packed" for the latter where the group packs)."""
    layout = BatchLayout(torch.empty(1), torch.empty(1))
    kernels = launcher._kernels()
    print("| kernel | head dim | mask | config | REG | STACK (B/thread) | shared (B) |\n|---|---|---|---|---|---|---|")
    for head_dim in head_dims:
        if backward:
            default = dataclasses.astuple(default_backward_config(head_dim, torch.bfloat16))
        else:  # (block_m, block_n, num_warps, num_stages): pack_gqa is chosen below
            default = dataclasses.astuple(default_forward_config(head_dim, torch.bfloat16))[:4]
        candidates = (BACKWARD_CANDIDATES if backward else FORWARD_CANDIDATES).get(head_dim, [])
        for cfg in [default] + [c for c in candidates if c != default]:
            for mask, options in (("causal", AttnOptions(is_causal=True)), ("full", AttnOptions())):
                label = ("bwd" if backward else "fwd") + (" (default)" if cfg == default else "")
                if backward:
                    constexprs = dict(backward_constexprs(options, layout, head_dim, head_dim, torch.bfloat16),
                                      HAS_GRAD_LSE=False, BLOCK_M1=cfg[0], BLOCK_N1=cfg[1], BLOCK_M2=cfg[2], BLOCK_N2=cfg[3])
                    variants = [(label, kernels.varlen_bwd_kernel, constexprs)]
                else:
                    constexprs = dict(kernel_constexprs(options, layout, head_dim, head_dim, torch.bfloat16),
                                      BLOCK_M=cfg[0], BLOCK_N=cfg[1], PACK_GQA=1)
                    variants = [(label, kernels.varlen_fwd_kernel, constexprs)]
                    pack = pack_gqa_group(ForwardConfig(*cfg, pack_gqa=True), gqa_group)
                    if pack > 1:
                        variants.append((f"fwd packed G={pack}", kernels.varlen_fwd_kernel, dict(constexprs, PACK_GQA=pack)))
                fields = "/".join(map(str, cfg))
                for name, kernel, variant in variants:
                    usage = compile_sm90.resource_usage(_compile_sm90(kernel, variant, cfg[-2], cfg[-1], gqa_group))
                    print(f"| {name} | {head_dim} | {mask} | {fields} | {usage.get('REG')} | {usage.get('STACK')} | {usage['SHARED']} |",
                          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--cases", default=None, help="bench case names (default: one per head dim)")
    parser.add_argument("--regs", action="store_true", help="registers and spills at sm_90 instead of timings (no GPU)")
    parser.add_argument("--gqa-group", type=int, default=1,
                        help="with --regs (forward): compile for this GQA group, unpacked and packed (pack_gqa)")
    args = parser.parse_args()
    if args.regs:
        regs([int(d) for d in args.head_dims.split(",")], args.backward, args.gqa_group)
        return
    from torch.nn.attention.varlen import varlen_attn as aten_varlen
    from triton.testing import do_bench

    results = []
    if args.cases:
        selected = [all_cases()[name] for name in args.cases.split(",")]
    else:
        selected = [
            all_cases()[SHAPES[d] + suffix] for d in map(int, args.head_dims.split(",")) for suffix in ("", "-causal")
        ]
    for case in selected:
            head_dim, causal = case.head_dim, case.causal
            x = make_inputs(case)
            q, k, v = (t.detach() for t in (x.q, x.k, x.v))
            layout, options = BatchLayout(x.cu_seq, x.cu_seq), AttnOptions(causal)
            window = (-1, 0) if causal else (-1, -1)
            aten_out = aten_varlen(q, k, v, x.cu_seq, x.cu_seq, x.max_len, x.max_len, window_size=window)
            torch.cuda.empty_cache()
            aten_ms = do_bench(
                lambda: aten_varlen(q, k, v, x.cu_seq, x.cu_seq, x.max_len, x.max_len, window_size=window),
                warmup=25, rep=200, return_mode="median",
            )
            if args.backward:
                out, lse = launcher.forward(q, k, v, layout, options)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                aten_bwd = lambda: torch.autograd.grad(  # noqa: E731
                    aten_varlen(*leaves, x.cu_seq, x.cu_seq, x.max_len, x.max_len, window_size=window), leaves, x.grad_out
                )
                aten_fb_ms = do_bench(aten_bwd, warmup=25, rep=200, return_mode="median")
            for cfg in (BACKWARD_CANDIDATES if args.backward else FORWARD_CANDIDATES)[head_dim]:
                row = {"D": head_dim, "causal": causal, "cfg": cfg}
                try:
                    if args.backward:
                        config = BackwardConfig(*cfg)
                        run = lambda: launcher.backward(  # noqa: E731
                            x.grad_out, q, k, v, out, lse, layout, options, config=config
                        )
                        dq, dk, dv = run()
                        ref = torch.autograd.grad(
                            aten_varlen(*leaves, x.cu_seq, x.cu_seq, x.max_len, x.max_len, window_size=window),
                            leaves, x.grad_out,
                        )
                        row["max_diff_vs_aten"] = max((a - b).abs().max().item() for a, b in zip((dq, dk, dv), ref))
                        fwd_ms = do_bench(lambda: launcher.forward(q, k, v, layout, options),
                                          warmup=25, rep=100, return_mode="median")
                        row["ms"] = do_bench(run, warmup=25, rep=200, return_mode="median") + fwd_ms
                        row["vs_aten_fwdbwd"] = aten_fb_ms / row["ms"]
                    else:
                        config = ForwardConfig(*cfg)
                        run = lambda: launcher.forward(q, k, v, layout, options, config=config)  # noqa: E731
                        row["max_diff_vs_aten"] = (run()[0] - aten_out).abs().max().item()
                        row["ms"] = do_bench(run, warmup=25, rep=200, return_mode="median")
                        row["tflops"] = forward_flops(case) / row["ms"] / 1e9
                        row["vs_aten"] = aten_ms / row["ms"]
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                print(json.dumps(row), flush=True)
                results.append(row)
            print(f"# {case.name}: aten fwd {aten_ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
