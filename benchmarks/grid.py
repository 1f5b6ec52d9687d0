"""``choice --cost-grid`` and ``choice --fit-costs``: the measured grid behind the kernel choice's cost model
(``varlen_compile.lowering.cost_model``) and the fit of its coefficients.

The grid: packed bf16 batches of equal lengths (the model's bound on the attended pairs is exact
there) over token counts, sequence counts, heads, head dims and causal or not
(:func:`grid_cases`). Per batch, each kernel's GPU time alone (CUDA-graph replays) forward and
backward: our Triton kernels (the standalone launcher runs the templates' ``@triton.jit`` code
with the same default configs) and FlashAttention 4 through our adapter. Per cost key, the host
time of one call behind our op in a compiled graph, on a batch too small for the GPU to matter.

The fit (:func:`fit`, numpy only, no GPU): per cost key and kernel, the four GPU coefficients by
non-negative least squares on the relative error, the host time as measured; then the held-out
shapes' errors (:func:`fit_report`) and the coefficients as Python source (:func:`costs_source`)
for ``lowering/costs.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from . import harness, internals
from .harness import Case, make_inputs

GRID_TOKENS = (2048, 8192, 32768, 131072)
GRID_SEQUENCES = (1, 4, 16, 64, 256)
GRID_HEADS = ((16, 16), (32, 8))
GRID_HEAD_DIMS = (64, 128)
MIN_MEAN_LENGTH = 16
HOST_CASE_LENGTHS = (64,) * 8
"""The batch whose compiled call measures host time: too small for the GPU to matter."""
HOST_KEYS = ((64, True), (128, False))
"""(head dim, causal) of the host measurements (two compiles per kernel each); a cost key
without its own takes the median of its side and kernel (the host path does not depend on the
shapes' code much: FA4's and our Python are the same)."""
KERNELS = ("triton", "fa4")
SIDES = ("forward", "backward")
GRAPH_REP_MS = 20
"""``do_bench_cudagraph``'s ``rep`` per timing: a graph of about this many ms of calls, replayed ten
times (capturing a host-bound kernel's calls costs their host time, so more would mostly wait)."""
HOLDOUT_EVERY = 5
"""Every fifth grid shape is held out of the first fit and reported on (``fit_report``)."""


def grid_cases(tokens: Sequence[int] = GRID_TOKENS, sequences: Sequence[int] = GRID_SEQUENCES,
               heads: Sequence[tuple[int, int]] = GRID_HEADS, head_dims: Sequence[int] = GRID_HEAD_DIMS
               ) -> list[Case]:
    """The grid's batches: ``N`` equal sequences of ``T // N`` tokens, mean length at least
    :data:`MIN_MEAN_LENGTH`, every heads pair, head dim and causal or not."""
    cases = []
    for total in tokens:
        for count in sequences:
            length = total // count
            if length < MIN_MEAN_LENGTH:
                continue
            for heads_q, heads_kv in heads:
                for head_dim in head_dims:
                    for causal in (True, False):
                        name = f"T{length * count}-N{count}-H{heads_q}x{heads_kv}-D{head_dim}" + ("-causal" if causal else "")
                        cases.append(Case(name, (length,) * count, heads_q, heads_kv, head_dim, causal))
    return cases


def cost_key_fields(case: Case, side: str) -> dict[str, Any]:
    """The :class:`~varlen_compile.lowering.cost_model.CostKey` fields of a case's call."""
    return dict(side=side, head_dim=case.head_dim, head_dim_v=case.value_dim, causal=case.causal,
                softcap=bool(case.softcap))


def size_fields(case: Case) -> dict[str, int]:
    return dict(tokens_q=case.total_q, tokens_k=case.total, sequences=len(case.lengths), heads_q=case.heads_q)


# ----------------------------------------------------------------------------- measuring (GPU)


def _row(kind: str, kernel: str, case: Case, side: str, seconds: float, shape: int) -> dict[str, Any]:
    return {"kind": kind, "kernel": kernel, "shape": shape, "case": case.name, **cost_key_fields(case, side),
            **size_fields(case), "heads_kv": case.heads_kv, "seconds": seconds}


def gpu_rows(case: Case, shape: int, kernels: Sequence[str] = KERNELS) -> list[dict[str, Any]]:
    """Each kernel's GPU time (CUDA-graph replays) forward and backward on one grid batch."""
    x = make_inputs(case)
    q, k, v = x.detached()
    rows = []
    for kernel in kernels:
        make = internals.fa4_adapter_functions if kernel == "fa4" else internals.standalone_functions
        forward, backward = make(case, x)
        out, lse = forward(q, k, v)
        timings = {
            "forward": lambda: forward(q, k, v),
            "backward": lambda: backward(x.grad_out, q, k, v, out, lse),
        }
        for side, call in timings.items():
            call()
            rows.append(_row("gpu", kernel, case, side, harness.bench_ms(call, rep=GRAPH_REP_MS, cuda_graph=True) / 1e3, shape))
    return rows


HOST_ROUNDS = 3
"""Rounds of host timings per host key: each round times the floor and every kernel once, in
an order that rotates between rounds; a kernel's host time is the median over rounds of its
time less the same round's floor (the first timings of a process can run long)."""


def host_rows(case: Case, calls: int = 300, kernels: Sequence[str] = KERNELS,
              rounds: int = HOST_ROUNDS) -> list[dict[str, Any]]:
    """Host time of one call behind our op (``case``: a batch too small for the GPU to matter),
    per kernel, forward and backward of a training step: the compiled one-op graph's time less
    that of the ``floor`` graph (torch.compile's own cost per call, which a model's graph pays
    once for all its ops). Forward: with autograd recording; backward: the step less the
    forward. Each graph is compiled once; the timings run in :data:`HOST_ROUNDS` rotating
    rounds."""
    x = make_inputs(case)

    def times(attention: Any) -> tuple[float, float]:
        def step() -> None:
            attention(x.q, x.k, x.v).backward(x.grad_out)
            x.q.grad = x.k.grad = x.v.grad = None

        forward_s, _ = harness.host_time(lambda: attention(x.q, x.k, x.v), calls, warmup=20)
        step_s, _ = harness.host_time(step, calls, warmup=20)
        return forward_s, step_s - forward_s

    harness.fresh_compile()
    built = {"floor": harness.build_floor(case, x)}
    for kernel in kernels:  # each graph compiled under its own switch (Dynamo guards on it)
        with harness.kernel_switch("ours", kernel):
            built[kernel] = harness.build_ours(case, x)
    names = list(built)
    samples: dict[str, list[tuple[float, float]]] = {kernel: [] for kernel in kernels}
    for round_ in range(rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        measured = {}
        for name in order:
            with contextlib.nullcontext() if name == "floor" else harness.kernel_switch("ours", name):
                measured[name] = times(built[name].attention)
        for kernel in kernels:
            samples[kernel].append(tuple(max(mine - floor, 0.0) for mine, floor in zip(measured[kernel],
                                                                                         measured["floor"])))
    rows = []
    for kernel in kernels:
        forward_s = statistics.median(sample[0] for sample in samples[kernel])
        backward_s = statistics.median(sample[1] for sample in samples[kernel])
        rows.append(_row("host", kernel, case, "forward", forward_s, -1))
        rows.append(_row("host", kernel, case, "backward", backward_s, -1))
    return rows


# ----------------------------------------------------------------------------- the fit (CPU)


def _features(row: Mapping[str, Any]) -> list[float]:
    """The GPU terms of one row, per :class:`KernelCost` coefficient after ``host``: 1, rows,
    sequences and attended pairs (the equal-lengths bound), each times the query heads."""
    heads, sequences = row["heads_q"], row["sequences"]
    pairs = internals.scaled_pairs(row["tokens_q"], row["tokens_k"], row["causal"]) / (2 * sequences)
    return [1.0, heads * row["tokens_q"], heads * sequences, heads * pairs]


def nonnegative_least_squares(columns: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares of ``targets`` on ``columns`` (one list of features per target) with every
    coefficient >= 0, by elimination: refit without the most negative coefficient until none is
    (never adding one back: not the optimum of true NNLS in general; with four columns, at most
    four refits)."""
    import numpy as np

    matrix, target = np.asarray(columns, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    active = list(range(matrix.shape[1]))
    while True:
        solution = np.zeros(matrix.shape[1])
        if active:
            solution[active] = np.linalg.lstsq(matrix[:, active], target, rcond=None)[0]
        negative = [index for index in active if solution[index] < 0]
        if not negative:
            return solution.tolist()
        active.remove(min(negative, key=lambda index: solution[index]))


def _relative_fit(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """The GPU coefficients (femtoseconds) minimizing the relative error over ``rows``."""
    scale = internals.FEMTOSECONDS
    columns = [[value / (row["seconds"] * scale) for value in _features(row)] for row in rows]
    return nonnegative_least_squares(columns, [1.0] * len(rows))


def fit_key(row: Mapping[str, Any]) -> tuple:
    """The key a row is fitted under: ``(side, D, D_v, causal, softcap, kernel)``."""
    return (row["side"], row["head_dim"], row["head_dim_v"], row["causal"], row["softcap"], row["kernel"])


def _group(rows: Iterable[Mapping[str, Any]], kind: str) -> dict[tuple, list[Mapping[str, Any]]]:
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["kind"] == kind:
            groups.setdefault(fit_key(row), []).append(row)
    return groups


def fit(rows: Sequence[Mapping[str, Any]], holdout: bool = False) -> dict[tuple, Any]:
    """``{(side, D, D_v, causal, softcap, kernel): KernelCost}`` from grid rows (``holdout``:
    leave out every :data:`HOLDOUT_EVERY`-th shape). A key needs at least four GPU rows per
    kernel, and host rows of its own or of its side and kernel; others are left out (the
    default table decides there)."""
    host_groups = _group(rows, "host")
    hosts = {key: statistics.median(row["seconds"] for row in group) for key, group in host_groups.items()}
    by_side_kernel: dict[tuple, list[float]] = {}
    for key, group in host_groups.items():
        by_side_kernel.setdefault((key[0], key[-1]), []).extend(row["seconds"] for row in group)
    costs = {}
    for key, group in _group(rows, "gpu").items():
        train = [row for row in group if not (holdout and row["shape"] % HOLDOUT_EVERY == 0)]
        host = hosts.get(key)
        if host is None and (key[0], key[-1]) in by_side_kernel:
            host = statistics.median(by_side_kernel[(key[0], key[-1])])
        if host is None or len(train) < 4:
            continue
        launch, row_cost, sequence, pair = (round(value) for value in _relative_fit(train))
        costs[key] = internals.kernel_cost(host=round(host * internals.FEMTOSECONDS), launch=launch,
                                           row=row_cost, sequence=sequence, pair=pair)
    return costs


def predicted(cost: Any, row: Mapping[str, Any]) -> float:
    """The GPU seconds ``cost`` predicts for a grid row."""
    return internals.gpu_seconds(cost, row["tokens_q"], row["tokens_k"], row["sequences"], row["heads_q"], row["causal"])


def fit_report(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per key and kernel: the GPU coefficients' relative error, median and max, on the shapes
    they were fitted on and on the held-out ones (fitted without them)."""
    held_out, full = fit(rows, holdout=True), fit(rows)
    body = []
    for key, group in sorted(_group(rows, "gpu").items(), key=lambda item: str(item[0])):
        if key not in full:
            continue
        cells = []
        for name, cost in (("fitted", full[key]), ("held out", held_out.get(key))):
            errors = [abs(predicted(cost, row) / row["seconds"] - 1) for row in group
                      if (row["shape"] % HOLDOUT_EVERY == 0) == (name == "held out")] if cost is not None else []
            cells.append(f"{statistics.median(errors):.1%} / {max(errors):.1%}" if errors else "-")
        body.append([*map(str, key), *cells])
    return body


def costs_source(costs: Mapping[tuple, Any], arch_major: int, source: str | None) -> str:
    """``lowering/costs.py``: the fitted coefficients as a literal, with where they came from
    (``source`` None: none fitted yet)."""
    origin = (f"Fitted by ``python -m benchmarks choice --fit-costs {source}``" if source else
              "None fitted yet: ``python -m benchmarks choice --cost-grid``, then ``--fit-costs``")
    lines = [
        '"""The kernel choice\'s cost-model coefficients (``cost_model.KernelCost``, femtoseconds) per arch',
        "major, cost key and kernel; where a key has none, the default table decides (``choices.py``).",
        f'{origin}. Generated: refit rather than edit."""',
        "",
        "from .cost_model import CostKey, KernelCost",
        "",
        "COSTS: dict[int, dict[CostKey, dict[str, KernelCost]]] = {",
        f"    {arch_major}: {{",
    ]
    by_key: dict[tuple, dict[str, Any]] = {}
    for (side, head_dim, head_dim_v, causal, softcap, kernel), cost in sorted(costs.items(), key=lambda item: str(item[0])):
        by_key.setdefault((side, head_dim, head_dim_v, causal, softcap), {})[kernel] = cost
    for (side, head_dim, head_dim_v, causal, softcap), kernels in by_key.items():
        lines.append(f"        CostKey({side!r}, {head_dim}, {head_dim_v}, causal={causal}, softcap={softcap}): {{")
        for kernel, cost in kernels.items():
            fields = ", ".join(f"{field.name}={getattr(cost, field.name)}" for field in dataclasses.fields(cost))
            lines.append(f"            {kernel!r}: KernelCost({fields}),")
        lines.append("        },")
    lines += ["    },", "}", ""]
    return "\n".join(lines)


def read_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Grid rows from ``.json`` files (a list) and ``.jsonl`` files (a row a line, as a
    measurement writes them while it runs); a row in several files counts once."""
    import json
    from pathlib import Path

    rows: dict[str, dict[str, Any]] = {}  # a run's .json and .jsonl hold the same rows: each counts once
    for path in map(Path, paths):
        text = path.read_text()
        found = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
        rows.update((json.dumps(row, sort_keys=True), row) for row in found)
    return list(rows.values())


def part_of(cases: Sequence[Case], part: tuple[int, int]) -> list[tuple[int, Case]]:
    """``(shape index, case)`` of part ``k`` of ``m`` (1-based): every m-th shape from the k-th,
    so that parts measured in separate runs cover the grid together."""
    k, m = part
    return [(index, case) for index, case in enumerate(cases) if index % m == k - 1]

