"""Sweep tile configs of the shared kernels (through the standalone launcher: same math as the
templates, no Inductor compile per config) against aten flash, on the benchmark's shapes.

    python benchmarks/sweep_configs.py --head-dims 64,128 [--backward]

Prints, per (head dim, causal), each config's median ms and its speed relative to aten flash;
use it to choose the defaults in lowering/configs.py.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from bench import all_cases, forward_flops, make_inputs
from varlen_compile.lowering import launcher
from varlen_compile.params import AttnOptions, BatchLayout
from varlen_compile.lowering.configs import BackwardConfig, ForwardConfig

FORWARD_CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4)],
}
BACKWARD_CANDIDATES = {
    64: [(32, 128, 128, 32, 4, 3), (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 2), (32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 3)],
    128: [(32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 2), (64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 8, 3), (64, 64, 64, 64, 4, 3), (32, 64, 64, 32, 4, 3)],
}
SHAPES = {64: "headline", 128: "d128"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--cases", default=None, help="bench case names (default: one per head dim)")
    args = parser.parse_args()
    from torch.nn.attention.varlen import varlen_attn as aten_varlen

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
