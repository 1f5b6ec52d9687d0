"""Diagnostic: a torch.profiler trace (CPU + CUDA) of a few compiled forward+backward steps.

Writes $OUT/trace_<case>_<variant>.json (chrome trace) and prints the profiler's table.
    python benchmarks/trace_step.py headline-causal
"""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench import all_cases, build_aten, build_floor, make_inputs
from host_overhead import compiled_ours

OUT = os.environ.get("OUT", "/tmp")

for name in sys.argv[1:]:
    case = all_cases()[name]
    for label in ("ours", "floor", "aten"):
        torch._dynamo.reset()
        x = make_inputs(case)
        fn = {"ours": lambda: compiled_ours(case, x), "floor": lambda: build_floor(case, x)[0],
              "aten": lambda: build_aten(case, x)[0]}[label]()
        grad = torch.randn_like(x.q)

        def step():
            fn(x.q, x.k, x.v).backward(grad)
            for t in (x.q, x.k, x.v):
                t.grad = None

        for _ in range(20):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                with torch.profiler.record_function("STEP"):
                    step()
            torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(OUT, f"trace_{name}_{label}.json"))
        print(f"==== {name} {label}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
