"""Diagnostic: host-side cost of one compiled forward+backward step (profiler), per case.

    python benchmarks/profile_step.py headline headline-causal
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import all_cases, build_ours, make_inputs

for name in sys.argv[1:]:
    torch._dynamo.reset()
    case = all_cases()[name]
    x = make_inputs(case)
    attention, _ = build_ours(case, x)
    grad = torch.randn_like(attention(x.q, x.k, x.v))

    def step():
        attention(x.q, x.k, x.v).backward(grad)
        for t in (x.q, x.k, x.v):
            t.grad = None

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        step()
    host = (time.perf_counter() - start) / 50
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 50
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    events = {e.key: e for e in prof.key_averages()}
    syncs = {k: e.count for k, e in events.items() if "Synchronize" in k or "Memcpy" in k or "item" in k or "_local_scalar" in k}
    print(f"{name}: host {host * 1e3:.3f} ms/step, wall {wall * 1e3:.3f} ms/step, sync-like calls in 10 steps: {syncs}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"dynamo counters: {dict(torch._dynamo.utils.counters['stats'])}")
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
