"""``run``: implementations side by side on the standard cases; ``choice``: our template against
FlashAttention 4 behind our op, the measurements behind the kernel choice's default table, and
(``choice --random``) the default choice's regret on random shapes."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

from . import grid, harness, internals, shapes
from .harness import CASES, CHOICE_CASES, Case, Inputs, log, log_row, make_inputs

RUN_HELP = """\
Side-by-side speed of varlen attention implementations on one GPU, in one process, on the same
packed random bf16 inputs: forward and forward+backward, medians of triton.testing.do_bench.

implementations (--impls):
  ours        torch.compile(varlen_attn, fullgraph=True), config.kernel="triton": our templates
  ours-auto   the same with config.kernel="auto" (the default switch: the lowering's default
              table picks the kernel, FlashAttention 4 where it was measured faster)
  ours-fa4    the same with config.kernel="fa4": FA4 behind our op
  fa4         FlashAttention 4's flash_attn_varlen_func called directly, uncompiled (max_seqlen ints)
  ours-eager  our standalone Triton kernels (the templates' @triton.jit math, no Inductor)
  aten        aten._flash_attention_forward/_backward (FlashAttention 2) called directly
  sdpa        scaled_dot_product_attention on a padded batch with a boolean mask
  flex        compiled flex_attention with a document block mask built once, outside the timing
  floor       not attention: torch.compile of pointwise ops on the same q, k, v, forward and
              backward: the per-call cost any compiled one-op graph pays

Small cases are bound by host time per call, which drifts within a process: --rounds N builds
each implementation once and times them in N interleaved rounds (<tag>-rounds.md). Writes
<out>/<tag>.md and .json (and .png, -fwdbwd.png with --plot)."""

CHOICE_HELP = """\
Our Triton template (config.kernel="triton") against FlashAttention 4 (config.kernel="fa4"),
both behind our op and compiled fullgraph, on the grid of head dims, masking and features behind
the kernel choice's default table (lowering/choices.py): 16 sequences <= 4096 tokens, 16 query
heads, 4 kv heads, bf16. ratio = template time / FA4 time (above 1: FA4 faster); "measured"
picks FA4 where it is faster forward and forward+backward; "default" is what the default choice
picks today (the cost model where fitted, else the table). The generated code is checked to call FA4 exactly when it is forced. Needs
flash-attn-4.

--cost-grid: instead, the cost model's grid (benchmarks/grid.py): the host time of one compiled
call behind our op per kernel, then on equal-length batches of 2048..131072 tokens in 1..256
sequences, 16/16 and 32/8 heads, head dims 64 and 128, causal or not, each kernel's GPU time
(CUDA-graph replays) forward and backward (our template's kernels through the standalone
launcher, FA4 through our adapter); writes the rows (also to <tag>.jsonl as they are measured)
and the fit's errors (default tag: choice-cost-grid; --part K/M: a part of the grid).
--fit-costs GRID_JSON...: no GPU; fits the cost model to measured grids (.json or .jsonl) and
writes the coefficients to --costs-out (lowering/costs.py), which the default choice then uses.

--random N: instead of the grid, N random shapes (--seed, --dist: "train", training-like
batches of 4096..131072 tokens; "any", 1..256 sequences of mean length 32..8192; the
distributions are in benchmarks/shapes.py), each timed as the template (kernel="triton") and
the default choice (kernel="auto"), compiled fullgraph with static shapes and called with the
max_q/max_k ints, and FA4's
flash_attn_varlen_func called directly: forward and forward+backward (--no-backward: forward
only); directions whose fastest step is under 1 ms in --rounds interleaved rounds. regret =
auto time / fastest of the three (1: auto picked the best; FA4 absent: the best of the other
two); in rounds, auto against the implementation of the lowest median, paired round by round
(the median over the rounds of auto's time over its time in the same round: drift common to a
round cancels). Writes per-shape rows and a summary (geometric mean and max regret, shapes above 1.05
and 1.10, sum of auto over the sum of the per-shape best) to <out>/<tag>.md and .json
(default tag: choice-random-<dist>-seed<S>); each row also goes to <out>/<tag>.jsonl as it is
measured, and --random-report <tag>.jsonl rebuilds the tables from those rows (no GPU)."""


# ----------------------------------------------------------------------------- run


def run_once(cases: list[Case], impls: list[str], backward: bool, cuda_graph: bool) -> list[dict]:
    """Each implementation built and timed on each case (a fresh compile per build)."""
    rows = []
    for case in cases:
        harness.fresh_compile()
        x = make_inputs(case)
        for impl in impls:
            harness.fresh_compile()  # ours and ours-auto differ only in the switch
            row = {"case": case.name, "impl": impl, "tokens": case.total, "seqs": len(case.lengths),
                   **harness.measure(case, impl, x, backward, cuda_graph)}
            log_row(row)
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def _round_timers(x: Inputs, built: dict[str, harness.Built], backward: bool, cuda_graph: bool, **bench) -> dict:
    """``(impl, "fwd" | "fwdbwd")`` -> a timer of that implementation under its kernel switch
    (``bench``: :func:`harness.bench_ms`'s ``rep`` and ``warmup``)."""

    def timer(impl: str, step) -> Callable[[], float]:
        def timed() -> float:
            with harness.kernel_switch(impl):
                return step(built[impl], x, cuda_graph, **bench)

        return timed

    timers = {}
    for impl in built:
        timers[(impl, "fwd")] = timer(impl, harness.time_forward)
        if backward:
            timers[(impl, "fwdbwd")] = timer(impl, harness.time_forward_backward)
    return timers


def run_rounds(cases: list[Case], impls: list[str], backward: bool, rounds: int, cuda_graph: bool) -> list[dict]:
    """Each case's implementations built once, then timed in ``rounds`` interleaved rounds:
    rows with the median over the rounds in ``fwd_ms`` / ``fwdbwd_ms`` and every round's time
    in ``fwd_rounds`` / ``fwdbwd_rounds``."""
    rows = []
    for case in cases:
        harness.fresh_compile()
        x = make_inputs(case)
        # No reset in between: each keeps its compiled code, guarded on the kernel switch.
        built = {impl: harness.build(case, impl, x, backward=backward) for impl in impls}
        samples = harness.interleaved(_round_timers(x, built, backward, cuda_graph), rounds)
        for impl in impls:
            row = {"case": case.name, "impl": impl, "tokens": case.total, "seqs": len(case.lengths)}
            for (name, key), values in samples.items():
                if name == impl:
                    row[f"{key}_rounds"], row[f"{key}_ms"] = values, statistics.median(values)
            harness.add_rates(row, case)
            log_row(row)
            rows.append(row)
        del built
        torch.cuda.empty_cache()
    return rows


RATIO_PAIRS = (("ours", "aten"), ("ours", "fa4"), ("ours-auto", "fa4"), ("ours-fa4", "fa4"))
"""The (ours, peer) ratio columns of the table, where both are run."""


def _by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        table.setdefault(row["case"], {})[row["impl"]] = row
    return table


def speedups(rows: list[dict], metric: str, ours: str, peer: str) -> dict[str, float]:
    """Per case, ``peer`` time / ``ours`` time (above 1: ours faster)."""
    return {case: got[peer][metric] / got[ours][metric] for case, got in _by_case(rows).items()
            if metric in got.get(ours, {}) and metric in got.get(peer, {})}


def _cell(row: dict, impl: str, metric: str, rate: str) -> str:
    if metric not in row:
        return row.get("error", "-")[:40]
    if impl == "floor":  # no attention work: the time only
        return f"{row[metric]:.3f}"
    return f"{row[metric]:.3f} ({row[rate]:.0f})"


def side_by_side_markdown(rows: list[dict], impls: list[str], backward: bool, cuda_graph: bool) -> str:
    timing = "do_bench_cudagraph (CUDA-graph replays: GPU time, no launch overhead)" if cuda_graph else "do_bench"
    lines = [f"{harness.device_line()}; bf16; median ms (TFLOP/s) of {timing}.", ""]
    pairs = [(o, p) for o, p in RATIO_PAIRS if o in impls and p in impls]
    metrics = [("fwd", "forward")] + ([("fwdbwd", "forward+backward")] if backward else [])
    for key, title in metrics:
        metric, rate = f"{key}_ms", f"{key}_tflops"
        ratios = {pair: speedups(rows, metric, *pair) for pair in pairs}
        body = [[case, *(_cell(got.get(impl, {}), impl, metric, rate) for impl in impls),
                 *(f"{ratios[pair][case]:.2f}x" if case in ratios[pair] else "-" for pair in pairs)]
                for case, got in _by_case(rows).items()]
        lines += [f"### {title}", ""]
        lines += harness.markdown_table(["case", *impls, *(f"{o} vs {p}" for o, p in pairs)], body) + [""]
        lines += [f"Geometric mean {o} vs {p} ({title}): {harness.geomean(r.values()):.2f}x; min {min(r.values()):.2f}x"
                  for (o, p), r in ratios.items() if r] + [""]
    builds = [row for row in rows if "mask_build_ms" in row]
    if builds:
        lines += ["FlexAttention block-mask build (not in the timings): "
                  + ", ".join(f"{row['case']} {row['mask_build_ms']:.1f} ms" for row in builds), ""]
    return "\n".join(lines)


def rounds_markdown(rows: list[dict], impls: list[str]) -> str:
    """Per case and direction: each implementation's times over the rounds, median and range,
    and the per-round ratio of each implementation to the last one listed."""
    lines = []
    for case, got in _by_case(rows).items():
        for key, title in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            if not all(f"{key}_rounds" in got[impl] for impl in impls):
                continue
            lines.append(f"## {case}: {title} ms per round")
            for impl in impls:
                values = got[impl][f"{key}_rounds"]
                lines.append(f"{impl:>10}: " + " ".join(f"{v:.3f}" for v in values)
                             + f"   median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}")
            peer = impls[-1]
            for impl in impls[:-1]:
                ratios = [p / o for o, p in zip(got[impl][f"{key}_rounds"], got[peer][f"{key}_rounds"])]
                lines.append(f"{impl} vs {peer} per round: " + " ".join(f"{r:.2f}" for r in ratios)
                             + f"   median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], impls: list[str], path: Path, metric: str = "fwd_tflops") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(_by_case(rows))
    impls = [impl for impl in impls if impl != "floor"]
    figure, axes = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 4.5))
    width = 0.8 / len(impls)
    for index, impl in enumerate(impls):
        values = [_by_case(rows)[case].get(impl, {}).get(metric, 0) for case in cases]
        axes.bar([position + index * width for position in range(len(cases))], values, width, label=impl)
    axes.set_xticks([position + 0.4 - width / 2 for position in range(len(cases))], cases, rotation=30, ha="right")
    axes.set_ylabel(metric.replace("_", " ").replace("tflops", "TFLOP/s"))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def cmd_run(args: argparse.Namespace) -> None:
    cases = harness.pick(CASES, args.cases)
    impls = args.impls.split(",")
    unknown = [impl for impl in impls if impl not in harness.IMPLEMENTATIONS]
    if unknown:
        raise SystemExit(f"--impls: unknown {', '.join(unknown)}; choose from {', '.join(harness.IMPLEMENTATIONS)}")
    backward = not args.no_backward
    if args.rounds > 1:
        rows = run_rounds(cases, impls, backward, args.rounds, args.cuda_graph)
        text = side_by_side_markdown(rows, impls, backward, args.cuda_graph) + "\n" + rounds_markdown(rows, impls)
        harness.write_results(args.out, f"{args.tag}-rounds", rows, text)
        return
    rows = run_once(cases, impls, backward, args.cuda_graph)
    out = harness.write_results(args.out, args.tag, rows, side_by_side_markdown(rows, impls, backward, args.cuda_graph))
    if args.plot:
        plot(rows, impls, out / f"{args.tag}.png")
        if backward:
            plot(rows, impls, out / f"{args.tag}-fwdbwd.png", metric="fwdbwd_tflops")


# ----------------------------------------------------------------------------- choice


def choice_row(case: Case) -> dict:
    """Template and FA4 behind our op on one case: forward and forward+backward ms, or the
    error that stopped one (a silent fallback must not make a row of the table)."""
    x = make_inputs(case)
    row: dict = {"case": case.name}
    for impl, label in (("ours", "triton"), ("ours-fa4", "fa4")):
        harness.fresh_compile()
        try:
            built = harness.build(case, impl, x)
            with harness.kernel_switch(impl), torch.no_grad():
                ran_fa4 = internals.calls_fa4(run_and_get_code(built.attention, x.q, x.k, x.v)[1])
            if ran_fa4 != (label == "fa4"):
                raise RuntimeError(f"kernel={label!r} but the compiled forward {'calls' if ran_fa4 else 'does not call'} FA4")
            with harness.kernel_switch(impl):
                row[f"{label}_fwd_ms"] = harness.time_forward(built, x)
                row[f"{label}_fwdbwd_ms"] = harness.time_forward_backward(built, x)
        except Exception as error:  # noqa: BLE001 -- report and go on
            row[f"{label}_error"] = harness.error_text(error, 160)
    row["default_picks_fa4"] = internals.default_picks_fa4(case, torch.cuda.get_device_capability()[0])
    return row


def choice_markdown(rows: list[dict]) -> str:
    lines = [f"{harness.device_line()}; bf16; 16 seqs <= 4096, 16 q heads, 4 kv heads; compiled behind our op; "
             "median ms; ratio = template / FA4 (above 1: FA4 faster)", ""]
    body = []
    for row in rows:
        default = "FA4" if row["default_picks_fa4"] else "template"
        if "triton_fwd_ms" not in row or "fa4_fwd_ms" not in row:
            body.append([row["case"], row.get("triton_error", "-")[:40], row.get("fa4_error", "-")[:40], "", "", "", "", "",
                         default])
            continue
        fwd = row["triton_fwd_ms"] / row["fa4_fwd_ms"]
        both = row["triton_fwdbwd_ms"] / row["fa4_fwdbwd_ms"]
        measured = "FA4" if fwd > 1 and both > 1 else "template"
        body.append([row["case"], f"{row['triton_fwd_ms']:.3f}", f"{row['fa4_fwd_ms']:.3f}", f"{fwd:.2f}",
                     f"{row['triton_fwdbwd_ms']:.3f}", f"{row['fa4_fwdbwd_ms']:.3f}", f"{both:.2f}", measured, default])
    header = ["case", "template fwd", "FA4 fwd", "fwd ratio", "template fwd+bwd", "FA4 fwd+bwd", "fwd+bwd ratio",
              "measured", "default"]
    return "\n".join(lines + harness.markdown_table(header, body))


QUICK = ("d64-causal", "d128-causal", "d192v128-causal", "d128-softcap-causal")
CHOICE_TAG = "choice"

RANDOM_IMPLS = {"ours": "template", "ours-auto": "auto", "fa4": "fa4"}
"""``choice --random``'s implementations (harness names) and their labels in the rows."""
RANDOM_BENCH = {"warmup": 25, "rep": 100}
"""``do_bench`` warm-up and repetition ms of each timing of ``choice --random``."""
ROUNDS_BELOW_MS = 1.0
"""A direction whose fastest step takes less is timed in interleaved rounds."""
DIRECTIONS = (("fwd", "forward"), ("fwdbwd", "forward+backward"))


def _directions(backward: bool) -> tuple[tuple[str, str], ...]:
    return DIRECTIONS if backward else DIRECTIONS[:1]


def _case_of(shape: shapes.Shape) -> Case:
    """The shape as a case called with the max hints (as FA4 direct gets them)."""
    return Case(shape.name, shape.lengths, shape.heads_q, shape.heads_kv, shape.head_dim, shape.causal, hints=True)


def _times(row: dict, key: str) -> dict[str, float | None]:
    """The row's ``key`` times by label (None: absent)."""
    return {label: row.get(f"{label}_{key}_ms") for label in RANDOM_IMPLS.values()}


def random_shape_row(shape: shapes.Shape, backward: bool, rounds: int) -> dict:
    """The template, the default choice and FA4 direct on one shape: each built once (after a
    Dynamo reset: a fresh static compile per shape), timed forward (and forward+backward) in one
    interleaved round, then the directions whose fastest step is under :data:`ROUNDS_BELOW_MS`
    in ``rounds - 1`` more (the median of the rounds counts). An implementation that fails is
    recorded as ``<label>_error`` (build) or ``<label>_<direction>_error`` (a timing) and left
    out of that regret."""
    case = _case_of(shape)
    row: dict = {"shape": shape.name, "tokens": shape.total, "seqs": shape.seqs, "max_len": max(shape.lengths),
                 "heads_q": shape.heads_q, "heads_kv": shape.heads_kv, "head_dim": shape.head_dim,
                 "causal": shape.causal,
                 "default_picks_fa4": internals.default_picks_fa4(case, torch.cuda.get_device_capability()[0])}
    harness.fresh_compile()
    x = make_inputs(case)
    start = time.perf_counter()
    built = {}
    for impl, label in RANDOM_IMPLS.items():
        compile_kwargs = {} if impl == "fa4" else {"dynamic": False}  # FA4: called directly, uncompiled
        try:  # no reset in between: ours and ours-auto keep their code, guarded on the kernel switch
            built[impl] = harness.build(case, impl, x, backward=backward, **compile_kwargs)
        except Exception as error:  # noqa: BLE001 -- record it absent and go on
            row[f"{label}_error"] = harness.error_text(error, 160)
    torch.cuda.synchronize()
    row["setup_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    timers = _round_timers(x, built, backward, False, **RANDOM_BENCH)
    samples: dict[tuple[str, str], list[float]] = {}
    for (impl, key), timer in timers.items():
        try:
            samples[(impl, key)] = [timer()]
        except Exception as error:  # noqa: BLE001 -- record it absent in this direction and go on
            row[f"{RANDOM_IMPLS[impl]}_{key}_error"] = harness.error_text(error, 160)
    for key, _ in DIRECTIONS:
        group = {name: timers[name] for name in samples if name[1] == key}
        if rounds > 1 and group and min(samples[name][0] for name in group) < ROUNDS_BELOW_MS:
            for name, values in harness.interleaved(group, rounds - 1).items():
                samples[name] += values
    for (impl, key), values in samples.items():
        row[f"{RANDOM_IMPLS[impl]}_{key}_ms"] = statistics.median(values)
        if len(values) > 1:
            row[f"{RANDOM_IMPLS[impl]}_{key}_rounds"] = values
    _set_regrets(row, backward)
    row["timing_s"] = round(time.perf_counter() - start, 2)
    return row


def _set_regrets(row: dict, backward: bool) -> None:
    """``<direction>_best`` and ``<direction>_regret`` of a row from its times: the paired regret
    (:func:`shapes.paired_regret`) where every present implementation has its rounds, else the
    ratio of the times."""
    for key, _ in _directions(backward):
        best = shapes.best_of(_times(row, key))
        row[f"{key}_best"] = best[0] if best else None
        rounds = {label: row.get(f"{label}_{key}_rounds") for label in RANDOM_IMPLS.values()
                  if row.get(f"{label}_{key}_ms") is not None}
        paired = all(values is not None for values in rounds.values()) and len({len(v) for v in rounds.values()}) == 1
        row[f"{key}_regret"] = shapes.paired_regret(rounds) if paired else shapes.regret(_times(row, key))


def _ms_cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _regret_cell(row: dict, key: str) -> str:
    value, best = row.get(f"{key}_regret"), row.get(f"{key}_best")
    if value is None:
        return "-"
    return f"{value:.2f}" + ("" if best == "auto" else f" ({best})")


def random_markdown(rows: list[dict], dist: str, seed: int, rounds: int, backward: bool) -> str:
    """Per-shape times and regrets, then the regret summary of each direction (the device the
    rows name, else this process's)."""
    directions = _directions(backward)
    device = rows[0].get("device") if rows else None
    if device is None:
        device = harness.device_line() if torch.cuda.is_available() else "device not recorded"
    lines = [f"{device}; bf16; {len(rows)} random shapes (--dist {dist} --seed {seed}); template "
             "(kernel=triton) and auto (the default choice) compiled behind our op, fullgraph, static shapes; "
             f"FA4 called directly; median ms of do_bench, steps under {ROUNDS_BELOW_MS:g} ms over {rounds} "
             "interleaved rounds; regret = auto / fastest of the three (steps timed in rounds: the median over "
             "the rounds of auto / the lowest-median implementation's time in the same round; in parentheses: "
             "the fastest median, when not auto); default: what the default choice picks for the forward "
             "(the cost model where fitted, else the table)", ""]
    header = ["shape", "max len", "default"]
    for _, title in directions:
        header += [f"template {title}", f"auto {title}", f"FA4 {title}", f"regret {title}"]
    body = []
    for row in rows:
        cells = [row["shape"], row["max_len"], "FA4" if row["default_picks_fa4"] else "template"]
        for key, _ in directions:
            cells += [_ms_cell(ms) for ms in _times(row, key).values()] + [_regret_cell(row, key)]
        body.append(cells)
    lines += ["### Per shape", ""] + harness.markdown_table(header, body) + [""]
    summary = []
    for key, title in directions:
        result = shapes.summarize({row["shape"]: _times(row, key) for row in rows},
                                  regrets={row["shape"]: row.get(f"{key}_regret") for row in rows})
        if result is None:
            summary.append([title, 0, "-", "-", "-", "-", "-"])
            continue
        summary.append([title, result.shapes, f"{result.geomean:.3f}", f"{result.worst:.2f} ({result.worst_shape})",
                        result.over_5_percent, result.over_10_percent, f"{result.total_ratio:.3f}"])
    lines += ["### Regret of auto", ""]
    lines += harness.markdown_table(["direction", "shapes", "geomean", "max", "> 1.05", "> 1.10",
                                     "sum(auto) / sum(best)"], summary) + [""]
    errors = [f"- {row['shape']}: {name[:-len('_error')]}: {text}" for row in rows
              for name, text in row.items() if name.endswith("_error")]
    if errors:
        lines += ["Absent (left out of the regret):", "", *errors, ""]
    return "\n".join(lines)


def cmd_choice_random(args: argparse.Namespace) -> None:
    backward = not args.no_backward
    missing = internals.fa4_missing()
    if missing is not None:
        log.warning("FlashAttention 4 is no kernel choice here (%s): auto runs the template", missing)
    tag = shapes.default_tag(args.dist, args.seed) if args.tag == CHOICE_TAG else args.tag
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    progress = folder / f"{tag}.jsonl"  # a row a line as measured: a run cut short keeps its rows
    progress.write_text("")
    rows = []
    for shape in shapes.random_shapes(args.random, args.seed, args.dist):
        row = {**random_shape_row(shape, backward, args.rounds), "dist": args.dist, "seed": args.seed,
               "rounds": args.rounds, "backward": backward, "device": harness.device_line()}
        log_row(row)
        rows.append(row)
        with progress.open("a") as file:
            file.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()  # the shape's inputs and builds are gone with its frame
    harness.write_results(args.out, tag, rows, random_markdown(rows, args.dist, args.seed, args.rounds, backward))


def cmd_choice_random_report(args: argparse.Namespace) -> None:
    """The tables of ``--random`` rebuilt from its rows (``<tag>.jsonl``, written a row at a time,
    or ``<tag>.json``), e.g. of a run cut short by a time limit; no GPU. Written next to the
    input, tagged ``<its name>-report`` (the shapes present, in their order)."""
    source = Path(args.random_report)
    text = source.read_text()
    rows = json.loads(text) if source.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
    if not rows:
        raise SystemExit(f"--random-report: no rows in {source}")
    first = rows[0]
    if len({(row.get("dist"), row.get("seed")) for row in rows}) != 1:
        raise SystemExit(f"--random-report: {source} mixes distributions or seeds")
    backward = first.get("backward", "fwdbwd_regret" in first)
    for row in rows:  # regrets as this version computes them
        _set_regrets(row, backward)
    markdown = random_markdown(rows, first["dist"], first["seed"], first.get("rounds", args.rounds), backward)
    harness.write_results(source.parent, f"{source.stem}-report", rows, markdown)


def cmd_choice_grid(args: argparse.Namespace) -> None:
    kernels = args.grid_kernels
    missing = internals.fa4_missing() if "fa4" in kernels else None
    if missing is not None:
        raise SystemExit(f"choice --cost-grid needs FlashAttention 4 (or --grid-kernels triton): {missing}")
    k, m = args.part
    tag = ("choice-cost-grid" if args.tag == CHOICE_TAG else args.tag) + (f"-part{k}of{m}" if m > 1 else "")
    if args.grid_host_only:
        tag += "-host"
    if tuple(kernels) != grid.KERNELS:
        tag += "-" + "-".join(kernels)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    progress = folder / f"{tag}.jsonl"  # a row a line as measured: a run cut short keeps what it measured
    progress.write_text("")
    rows: list[dict] = []

    def keep(new: list[dict]) -> None:
        rows.extend(new)
        with progress.open("a") as file:
            file.writelines(json.dumps(row) + "\n" for row in new)

    if k == 1 or args.grid_host_only:  # host time: the first part measures it
        for head_dim, causal in grid.HOST_KEYS:
            host_case = Case(f"host-D{head_dim}" + ("-causal" if causal else ""), grid.HOST_CASE_LENGTHS, 16, 16,
                             head_dim, causal)
            keep(grid.host_rows(host_case, kernels=kernels))
            log.info(f"host {host_case.name}: " + ", ".join(
                f"{row['kernel']} {row['side']} {row['seconds'] * 1e6:.1f} us" for row in rows[-2 * len(kernels):]))
    shapes_of_part = [] if args.grid_host_only else grid.part_of(grid.grid_cases(), (k, m))
    for done, (shape, case) in enumerate(shapes_of_part, 1):
        keep(grid.gpu_rows(case, shape, kernels))
        log.info(f"{done}/{len(shapes_of_part)} {case.name}: " + ", ".join(
            f"{row['kernel']} {row['side']} {row['seconds'] * 1e3:.3f} ms" for row in rows[-2 * len(kernels):]))
        torch.cuda.empty_cache()
    harness.write_results(args.out, tag, rows, fit_markdown(rows, f"{tag}.json"))


def fit_markdown(rows: list[dict], source: str) -> str:
    """The fit's errors on the grid (fitted and held-out shapes), per key and kernel."""
    header = ["side", "D", "D_v", "causal", "softcap", "kernel", "error fitted (median / max)",
              "error held out (median / max)"]
    where = harness.device_line() + "; " if torch.cuda.is_available() else ""  # --fit-costs runs without a GPU
    lines = [f"{where}{source}: {sum(row['kind'] == 'gpu' for row in rows)} GPU rows; the cost "
             "model's GPU coefficients against the measured times (held out: every fifth shape, fitted without it)", ""]
    return "\n".join(lines + harness.markdown_table(header, grid.fit_report(rows))) + "\n"


def cmd_choice_fit(args: argparse.Namespace) -> None:
    rows = grid.read_rows(args.fit_costs)
    log.info(fit_markdown(rows, ", ".join(Path(path).name for path in args.fit_costs)))
    costs = grid.fit(rows)
    measured = {grid.fit_key(row) for row in rows if row["kind"] == "gpu"}
    if measured - set(costs):
        log.warning("not fitted (fewer than 4 GPU rows, or no host rows of their side and kernel: part 1 of a "
                    "--part run measures them): %s", sorted(measured - set(costs)))
    if not costs:
        raise SystemExit(f"--fit-costs: nothing to fit in {args.fit_costs}; {args.costs_out} is left as it is")
    source = " ".join(Path(path).name for path in args.fit_costs)
    Path(args.costs_out).write_text(grid.costs_source(costs, args.arch_major, source))
    log.info(f"wrote {args.costs_out}")


def cmd_choice(args: argparse.Namespace) -> None:
    if args.random is not None:
        cmd_choice_random(args)
        return
    if args.random_report is not None:
        cmd_choice_random_report(args)
        return
    if args.cost_grid:
        cmd_choice_grid(args)
        return
    if args.fit_costs:
        cmd_choice_fit(args)
        return
    missing = internals.fa4_missing()
    if missing is not None:
        raise SystemExit(f"choice needs FlashAttention 4: {missing}")
    cases = harness.pick(CHOICE_CASES, QUICK if args.quick else (args.cases or list(CHOICE_CASES)))
    rows = []
    for case in cases:
        row = choice_row(case)
        log_row(row)
        rows.append(row)
    harness.write_results(args.out, args.tag, rows, choice_markdown(rows))


def _part(text: str) -> tuple[int, int]:
    try:
        k, m = (int(value) for value in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/M (e.g. 1/2), got {text!r}") from None
    if not 1 <= k <= m:
        raise argparse.ArgumentTypeError(f"K/M needs 1 <= K <= M, got {text!r}")
    return k, m


def _grid_kernels(text: str) -> tuple[str, ...]:
    kernels = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in kernels if name not in grid.KERNELS]
    if not kernels or unknown:
        raise argparse.ArgumentTypeError(f"expected kernels from {', '.join(grid.KERNELS)}, got {text!r}")
    return kernels


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="implementations side by side on the standard cases", description=RUN_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    run.add_argument("--impls", default=",".join(i for i in harness.IMPLEMENTATIONS if i != "ours-fa4"),
                     help="comma-separated (default: %(default)s)")
    run.add_argument("--no-backward", action="store_true", help="forward only")
    run.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (GPU time only)")
    run.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per case (small cases)")
    run.add_argument("--plot", action="store_true", help="bar charts of TFLOP/s (needs matplotlib)")
    harness.add_output_arguments(run, "bench")
    run.set_defaults(func=cmd_run)

    choice = commands.add_parser("choice", help="our template vs FA4 behind our op (the default table's data)",
                                 description=CHOICE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = choice.add_mutually_exclusive_group()
    which.add_argument("--cases", default=None, help="comma-separated, from: " + ", ".join(CHOICE_CASES))
    which.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    which.add_argument("--random", type=_positive, default=None, metavar="N",
                       help="N random shapes instead of the grid: auto's regret (default tag: "
                       f"{shapes.default_tag('<dist>', '<S>')})")
    which.add_argument("--random-report", default=None, metavar="ROWS_JSONL",
                       help="no GPU: the --random tables rebuilt from its rows (<tag>.jsonl, written as each "
                            "shape is measured, or <tag>.json), e.g. of a run cut short")
    which.add_argument("--cost-grid", action="store_true",
                       help="measure the cost model's grid: GPU time per kernel and side on equal-length batches, "
                            "host time per call behind our op (default tag: choice-cost-grid)")
    which.add_argument("--fit-costs", nargs="+", default=None, metavar="GRID_JSON",
                       help="fit the cost model to measured grid files and write its coefficients (no GPU)")
    choice.add_argument("--costs-out", default=str(Path(__file__).resolve().parent.parent / "lowering" / "costs.py"),
                        help="with --fit-costs: where the coefficients go (default: %(default)s)")
    choice.add_argument("--arch-major", type=int, default=9, help="with --fit-costs: the GPUs' arch (default: %(default)s)")
    choice.add_argument("--part", type=_part, default=(1, 1), metavar="K/M",
                        help="with --cost-grid: measure part K of M (every M-th shape from the K-th; part 1 also "
                             "measures host time), so that runs of a time limit cover the grid together "
                             "(default: 1/1)")
    choice.add_argument("--grid-host-only", action="store_true",
                        help="with --cost-grid: measure the host rows alone (tag suffix -host), no GPU rows, "
                             "e.g. to re-measure them without the rest of part 1")
    choice.add_argument("--grid-kernels", type=_grid_kernels, default=",".join(grid.KERNELS), metavar="K[,K]",
                        help="with --cost-grid: the kernels measured (default: %(default)s; runs of one kernel each "
                             "are fitted together, and triton alone needs no FA4)")
    choice.add_argument("--seed", type=int, default=0,
                        help="with --random: the shapes' seed (default: %(default)s)")
    choice.add_argument("--dist", choices=shapes.DISTRIBUTIONS, default="train",
                        help="with --random: the shapes' distribution (default: %(default)s)")
    choice.add_argument("--rounds", type=_positive, default=5,
                        help="with --random: interleaved rounds of steps under 1 ms (default: %(default)s)")
    choice.add_argument("--no-backward", action="store_true", help="with --random: forward only")
    harness.add_output_arguments(choice, CHOICE_TAG)
    choice.set_defaults(func=cmd_choice)
