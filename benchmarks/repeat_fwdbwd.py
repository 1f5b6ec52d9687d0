"""Diagnostic: how stable is a host-bound forward+backward comparison? Interleaved rounds.

Small cases are bound by host time per step, which varies between runs and machines. This
builds each implementation once, then times forward+backward (bench.py's method) in several
interleaved rounds and prints every round, the median and the range of ours/aten.

    python benchmarks/repeat_fwdbwd.py headline-causal --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from bench import BUILDERS, all_cases, make_inputs, time_forward_backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--impls", default="ours,aten,floor")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    impls = args.impls.split(",")
    results = {}
    for name in args.cases:
        torch._dynamo.reset()
        case = all_cases()[name]
        inputs = make_inputs(case)
        built = {}
        for impl in impls:
            attention, notes = BUILDERS[impl](case, inputs)
            built[impl] = (attention, notes.pop("inputs", [inputs.q, inputs.k, inputs.v]))
            attention(inputs.q, inputs.k, inputs.v)
        times = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl, (attention, leaves) in built.items():
                times[impl].append(time_forward_backward(attention, inputs, leaves))
        ratios = [a / o for a, o in zip(times["aten"], times["ours"])]
        results[name] = {"times_ms": times, "aten_over_ours": ratios}
        print(f"## {name}: forward+backward ms per round")
        for impl in impls:
            print(f"{impl:>8}: " + " ".join(f"{t:.3f}" for t in times[impl]) + f"   median {statistics.median(times[impl]):.3f}")
        print(f"ours vs aten per round: " + " ".join(f"{r:.2f}" for r in ratios)
              + f"   median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "repeat_fwdbwd.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
