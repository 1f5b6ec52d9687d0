"""Diagnostic: where the host time of one small compiled forward+backward step goes.

For each case, times one training step of ours (compiled), aten and bench.py's ``floor`` (a
compiled pointwise op on the same inputs): host enqueue time (perf_counter over many steps
before a sync), synchronized wall time, do_bench's median (what bench.py reports), and the host
time of the forward and backward phases. Then profiles the compiled steps (cProfile, by own and
by cumulative time) and writes ours' generated Inductor code.

    python benchmarks/host_overhead.py headline-causal headline
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch
from triton.testing import do_bench

from bench import Case, Inputs, all_cases, build_aten, build_floor, make_inputs
from varlen_compile import varlen_attn

OUT = os.environ.get("OUT", "/tmp")


def compiled_ours(case: Case, x: Inputs, **compile_kwargs):
    return torch.compile(
        lambda q, k, v: varlen_attn(
            q, k, v, x.cu_seq, x.cu_seq, is_causal=case.causal,
            enable_gqa=case.heads_q != case.heads_kv,
        ),
        fullgraph=True,
        **compile_kwargs,
    )


def variants(case: Case, x: Inputs) -> dict:
    return {
        "ours": lambda: compiled_ours(case, x),
        "ours-reduce-overhead": lambda: compiled_ours(case, x, mode="reduce-overhead"),
        "aten": lambda: build_aten(case, x)[0],
        "floor": lambda: build_floor(case, x)[0],
    }


def measure(fn, x: Inputs, steps: int = 200):
    grad = torch.randn_like(fn(x.q, x.k, x.v))
    leaves = [x.q, x.k, x.v]

    def step():
        fn(x.q, x.k, x.v).backward(grad)
        for t in leaves:
            t.grad = None

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    bench = do_bench(lambda: fn(x.q, x.k, x.v).backward(grad), warmup=50, rep=300,
                     grad_to_none=leaves, return_mode="median")
    torch.cuda.synchronize()
    forward_s = backward_s = 0.0
    for _ in range(steps):  # host time of each phase of a step (no sync in between)
        t0 = time.perf_counter()
        out = fn(x.q, x.k, x.v)
        t1 = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        for t in leaves:
            t.grad = None
        forward_s, backward_s = forward_s + t1 - t0, backward_s + t2 - t1
    del out
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):  # forward with autograd recording, no backward
        fn(x.q, x.k, x.v)
    fwd_host = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    return {"host_ms": host * 1e3, "wall_ms": wall * 1e3, "do_bench_ms": bench,
            "fwd_host_ms": fwd_host * 1e3, "phase_fwd_ms": forward_s / steps * 1e3,
            "phase_bwd_ms": backward_s / steps * 1e3}, step


def main() -> None:
    rows = []
    for name in sys.argv[1:]:
        case = all_cases()[name]
        for label, build in variants(case, make_inputs(case)).items():
            torch._dynamo.reset()
            x = make_inputs(case)
            try:
                fn = build()
                result, step = measure(fn, x)
            except Exception as error:  # report and go on
                print(f"{name} {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
                continue
            rows.append((name, label, result))
            print(name, label, {k: round(v, 4) for k, v in result.items()}, flush=True)
            if label in ("ours", "floor"):
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(300):
                    step()
                profiler.disable()
                torch.cuda.synchronize()
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text)
                stats.sort_stats("tottime").print_stats(40)
                stats.sort_stats("cumulative").print_stats(60)
                with open(os.path.join(OUT, f"cprofile_{name}_{label}.txt"), "w") as f:
                    f.write(text.getvalue())
                if label != "ours":
                    continue
                from torch._inductor.utils import run_and_get_code

                torch._dynamo.reset()
                fresh = compiled_ours(case, x)
                grad = torch.randn_like(x.q)
                _, codes = run_and_get_code(lambda: fresh(x.q, x.k, x.v).backward(grad))
                with open(os.path.join(OUT, f"code_{name}.py"), "w") as f:
                    f.write("\n\n# ======== next module ========\n\n".join(codes))
    print()
    print("| case | variant | host ms/step | wall ms/step | do_bench ms | fwd host ms (grad on) | phase fwd | phase bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, r in rows:
        print(f"| {name} | {label} | {r['host_ms']:.3f} | {r['wall_ms']:.3f} | {r['do_bench_ms']:.3f} | {r['fwd_host_ms']:.3f} | {r['phase_fwd_ms']:.3f} | {r['phase_bwd_ms']:.3f} |")


if __name__ == "__main__":
    main()
