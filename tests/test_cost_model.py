"""The kernel choice's cost model (``lowering/cost_model.py``) and its fit (``benchmarks/grid.py``),
on the CPU: predictions against hand-computed times, the same answer for ints and for symbolic
sizes (with guards that flip across the boundary), and a fit that recovers known coefficients."""

from __future__ import annotations

import random

import pytest
import sympy

from benchmarks import grid
from varlen_compile.lowering import cost_model
from varlen_compile.lowering.cost_model import FEMTOSECONDS, CostKey, KernelCost

US = FEMTOSECONDS // 10**6  # femtoseconds per microsecond

# A template-like kernel (little host time, slower per pair) and an FA4-like one.
LEAN = KernelCost(host=30 * US, launch=5 * US, row=2_000, sequence=200_000, pair=1_000)
HEAVY = KernelCost(host=250 * US, launch=8 * US, row=1_000, sequence=100_000, pair=600)


def _sizes(tokens: int, sequences: int, heads: int = 16, tokens_k: int | None = None) -> dict:
    return dict(tokens_q=tokens, tokens_k=tokens if tokens_k is None else tokens_k, sequences=sequences, heads_q=heads)


def _wall_us(cost: KernelCost, tokens: int, sequences: int, heads: int, causal: bool, cuda_graphs: bool = False) -> float:
    """The model written out by hand, in floating point."""
    length = tokens / sequences
    pairs = sequences * (length * length - (length * length / 2 if causal else 0.0))
    gpu = cost.launch + cost.row * heads * tokens + cost.sequence * heads * sequences + cost.pair * heads * pairs
    host = 0 if cuda_graphs else cost.host
    return max(host, gpu) / US


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_predictions_match_the_model_written_out(causal, cuda_graphs):
    for tokens, sequences in ((512, 8), (8192, 4), (131072, 64), (4096, 1)):
        for cost in (LEAN, HEAVY):
            predicted = cost_model.predicted_seconds(cost, tokens, tokens, sequences, 16, causal, cuda_graphs) * 1e6
            assert predicted == pytest.approx(_wall_us(cost, tokens, sequences, 16, causal, cuda_graphs), rel=1e-9)


def test_faster_is_the_comparison_of_the_predictions():
    """Over random sizes, ``faster`` answers exactly whether the candidate's predicted wall time
    is below the incumbent's."""
    rng = random.Random(0)
    for _ in range(500):
        tokens, sequences, heads = rng.randint(1, 1 << 18), rng.randint(1, 512), rng.choice((8, 16, 32))
        causal, cuda_graphs = rng.random() < 0.5, rng.random() < 0.3
        expected = _wall_us(HEAVY, tokens, sequences, heads, causal, cuda_graphs) < _wall_us(
            LEAN, tokens, sequences, heads, causal, cuda_graphs)
        assert cost_model.faster(HEAVY, LEAN, _sizes(tokens, sequences, heads), causal, cuda_graphs) is expected


def test_an_empty_batch_keeps_the_incumbent():
    """No sequence: nothing to attend, whatever the token count (the 2N scaling would otherwise
    leave only the pair terms)."""
    for tokens in (0, 4096, 131072):
        assert not cost_model.faster(HEAVY, LEAN, _sizes(tokens, 0), True, False)
        assert not cost_model.faster(HEAVY, LEAN, _sizes(tokens, 0), False, True)
    assert cost_model.predicted_seconds(HEAVY, 0, 0, 0, 16, True) == 0.0


def test_cuda_graphs_ignore_host_time():
    """A kernel with much more host time but less GPU time wins only where the GPU sets the pace,
    and always in CUDA-graph replays, which issue no call."""
    small = _sizes(8192, 8)  # GPU: about 73 us (lean) and 48 us (heavy); heavy host: 250 us
    assert not cost_model.faster(HEAVY, LEAN, small, True, cuda_graphs=False)
    assert cost_model.faster(HEAVY, LEAN, small, True, cuda_graphs=True)
    assert cost_model.faster(HEAVY, LEAN, _sizes(65536, 4), True, cuda_graphs=False)


def test_more_work_never_takes_the_batch_back_from_the_heavier_kernel():
    """With less GPU time per unit of work and more host time, the heavy kernel's region is
    closed under more tokens and more heads, and under fewer sequences for the same tokens."""
    for causal in (True, False):
        for tokens in (64, 1024, 8192, 32768, 131072):
            for heads in (8, 16, 32):
                for sequences in (1, 4, 64, 512):
                    if cost_model.faster(HEAVY, LEAN, _sizes(tokens, sequences, heads), causal, False):
                        assert cost_model.faster(HEAVY, LEAN, _sizes(2 * tokens, sequences, heads), causal, False)
                        assert cost_model.faster(HEAVY, LEAN, _sizes(tokens, sequences, 2 * heads), causal, False)
                        assert sequences == 1 or cost_model.faster(
                            HEAVY, LEAN, _sizes(tokens, sequences // 2, heads), causal, False)


def test_symbolic_sizes_give_the_same_answer_through_guards():
    """With a ShapeEnv's backed sizes and ``choices.holds`` as the decider, the answer is the
    one for the hints, and the guards it leaves hold for batches on the same side of the
    boundary and fail for a batch on the other side (one recompile, then that graph serves)."""
    from types import SimpleNamespace

    from torch._dynamo.source import ConstantSource
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from varlen_compile.lowering import choices

    for tokens, expected in ((65536, True), (1024, False)):
        env = ShapeEnv()
        t, n = (env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
                for hint, name in ((tokens, "t"), (4, "n")))
        with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator(env))):
            answer = cost_model.faster(HEAVY, LEAN, dict(tokens_q=t, tokens_k=t, sequences=n, heads_q=16), True, False,
                                       decide=choices.holds)
        assert answer is expected is cost_model.faster(HEAVY, LEAN, _sizes(tokens, 4), True, False)
        assert env.guards

        def guards_hold(size: int) -> bool:
            return all(bool(guard.expr.subs({t: size, n: 4})) for guard in env.guards)

        same, other = (131072, 1024) if expected else (512, 131072)
        assert guards_hold(tokens) and guards_hold(same) and not guards_hold(other)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("hinted", [False, True])
def test_at_most_two_comparisons_are_read_per_bound(cuda_graphs, hinted):
    """Each comparison read is a guard in a compiled graph: at most two per decision (one under
    CUDA graphs), whichever kernel has more host time; twice that with a ``max_k`` hint (each
    comparison with a root is read as two without one)."""
    limit = (1 if cuda_graphs else 2) * (2 if hinted else 1)
    for candidate, incumbent in ((HEAVY, LEAN), (LEAN, HEAVY)):
        for tokens, sequences in ((1024, 8), (8192, 4), (131072, 2), (65536, 256)):
            sizes = {**_sizes(tokens, sequences), **({"max_k": tokens // 2} if hinted else {})}
            read = []
            cost_model.faster(candidate, incumbent, sizes, True, cuda_graphs,
                              decide=lambda relation: read.append(relation) or bool(relation))
            assert 1 <= len(read) <= limit, (tokens, sequences, read)


def test_causal_pairs_stop_at_the_keys():
    """Causal with more queries than keys: the extra queries attend nothing more."""
    assert cost_model.scaled_pairs(100, 100, True) == 2 * 100 * 100 - 100 * 100
    assert cost_model.scaled_pairs(300, 100, True) == cost_model.scaled_pairs(100, 100, True)
    assert cost_model.scaled_pairs(300, 100, False) == 2 * 300 * 100
    t, k = sympy.symbols("t k", positive=True, integer=True)
    assert cost_model.scaled_pairs(t, k, True).subs({t: 300, k: 100}) == cost_model.scaled_pairs(300, 100, True)


def _wall_us_skewed(cost: KernelCost, tokens: int, sequences: int, heads: int, causal: bool, max_k: int,
                    cuda_graphs: bool = False) -> float:
    """The model with a ``max_k`` hint written out by hand: the equal-length pairs times
    ``sqrt(N * max_k / T)``."""
    length = tokens / sequences
    pairs = sequences * (length * length - (length * length / 2 if causal else 0.0))
    pairs *= (sequences * max_k / tokens) ** 0.5
    gpu = cost.launch + cost.row * heads * tokens + cost.sequence * heads * sequences + cost.pair * heads * pairs
    return max(0 if cuda_graphs else cost.host, gpu) / US


def _random_skewed(rng: random.Random) -> tuple[int, int, int, int]:
    """``(tokens, sequences, heads, max_k)`` of a random packed batch (``max_k`` at least the mean
    length, at most the tokens)."""
    sequences = rng.randint(1, 256)
    tokens = sequences * rng.randint(1, 2048)
    return tokens, sequences, rng.choice((8, 16, 32)), rng.randint(tokens // sequences, tokens)


def test_a_max_hint_scales_the_pairs_by_the_root_of_the_skew():
    rng = random.Random(1)
    for _ in range(200):
        tokens, sequences, heads, max_k = _random_skewed(rng)
        for cost in (LEAN, HEAVY):
            for causal in (True, False):
                predicted = cost_model.predicted_seconds(cost, tokens, tokens, sequences, heads, causal, max_k=max_k) * 1e6
                assert predicted == pytest.approx(_wall_us_skewed(cost, tokens, sequences, heads, causal, max_k), rel=1e-9)


def test_a_hint_of_equal_lengths_changes_nothing():
    """``max_k = T / N``: the bounds meet, and every answer is the one without a hint."""
    for tokens, sequences in ((512, 8), (8192, 4), (131072, 64), (4096, 1)):
        for causal in (True, False):
            for cuda_graphs in (True, False):
                sizes = _sizes(tokens, sequences)
                hinted = {**sizes, "max_k": tokens // sequences}
                for candidate, incumbent in ((HEAVY, LEAN), (LEAN, HEAVY)):
                    assert cost_model.faster(candidate, incumbent, hinted, causal, cuda_graphs) is cost_model.faster(
                        candidate, incumbent, sizes, causal, cuda_graphs)


def test_faster_with_a_hint_is_the_comparison_of_the_predictions():
    """Over random skewed batches, both kernel orders: ``faster`` with a hint answers exactly
    whether the candidate's predicted wall time (the root computed in floating point) is lower."""
    rng = random.Random(2)
    for _ in range(1000):
        tokens, sequences, heads, max_k = _random_skewed(rng)
        causal, cuda_graphs = rng.random() < 0.5, rng.random() < 0.3
        sizes = {**_sizes(tokens, sequences, heads), "max_k": max_k}
        for candidate, incumbent in ((HEAVY, LEAN), (LEAN, HEAVY)):
            mine = _wall_us_skewed(candidate, tokens, sequences, heads, causal, max_k, cuda_graphs)
            theirs = _wall_us_skewed(incumbent, tokens, sequences, heads, causal, max_k, cuda_graphs)
            if abs(mine - theirs) < 1e-6 * max(mine, theirs):
                continue  # a tie within floating point: either answer is the model's
            assert cost_model.faster(candidate, incumbent, sizes, causal, cuda_graphs) is (mine < theirs)


def test_a_skewed_batch_goes_to_the_kernel_with_less_time_per_pair():
    """One long sequence among short ones: equal lengths predict little attention and keep the
    lean kernel; the hint shows the work, and the heavy kernel (less GPU time per pair) wins."""
    lengths = [16384] + [64] * 63
    tokens, sequences, longest = sum(lengths), len(lengths), max(lengths)
    sizes = _sizes(tokens, sequences)
    assert not cost_model.faster(HEAVY, LEAN, sizes, True, False)
    assert cost_model.faster(HEAVY, LEAN, {**sizes, "max_k": longest}, True, False)
    true_pairs = sum(length * (length + 1) // 2 for length in lengths)
    heavy_gpu = HEAVY.launch + HEAVY.row * 16 * tokens + HEAVY.sequence * 16 * sequences + HEAVY.pair * 16 * true_pairs
    lean_gpu = LEAN.launch + LEAN.row * 16 * tokens + LEAN.sequence * 16 * sequences + LEAN.pair * 16 * true_pairs
    assert max(HEAVY.host, heavy_gpu) < max(LEAN.host, lean_gpu)  # the hinted answer is the right one here


def test_one_query_per_sequence_takes_no_skew():
    """Decoding-like calls (one query per sequence, bottom-right causal): the pairs are exactly
    ``T_k`` however long the longest key sequence, and ``max_q = 1`` bounds them there: the
    prediction is the one without hints, however skewed the keys."""
    sequences, tokens_k = 64, 64 * 500
    for cost in (LEAN, HEAVY):
        # GPU time alone (CUDA graphs): host time would hide the pair term at this size
        plain = cost_model.predicted_seconds(cost, sequences, tokens_k, sequences, 16, True, True)
        hinted = cost_model.predicted_seconds(cost, sequences, tokens_k, sequences, 16, True, True, max_q=1, max_k=20000)
        assert hinted == plain
        assert cost_model.predicted_seconds(cost, sequences, tokens_k, sequences, 16, True, True, max_k=20000) > plain


def test_the_smaller_bound_is_taken_from_two_hints():
    """With both hints the tighter upper bound sets ``r`` (one comparison read), whichever side
    it comes from."""
    tokens, sequences = 16384 + 63 * 64, 64
    for max_q, max_k, expected in ((16384, 64, (sequences * 64, tokens)), (64, 16384, (sequences * 64, tokens)),
                                   (16384, 16384, (sequences * 16384, tokens))):
        read = []
        ratio = cost_model.skew(sequences, tokens, tokens, max_q, max_k,
                                decide=lambda relation: read.append(relation) or bool(relation))
        assert ratio == expected and len(read) == 1
    assert cost_model.skew(sequences, tokens, tokens, None, None) is None
    assert cost_model.skew(sequences, tokens, tokens, None, 300) == (sequences * 300, tokens)
    assert cost_model.skew(sequences, tokens, tokens, 300, None) == (sequences * 300, tokens)


def test_symbolic_hints_give_the_same_answer_through_guards():
    """Tokens, sequences and the hint as a ShapeEnv's backed sizes: the answer is the hints',
    and the guards left hold for the same batch and fail for a batch on the other side."""
    from types import SimpleNamespace

    from torch._dynamo.source import ConstantSource
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from varlen_compile.lowering import choices

    tokens, sequences = 16384 + 63 * 64, 64
    for longest, expected in ((16384, True), (128, False)):
        env = ShapeEnv()
        t, n, m = (env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
                   for hint, name in ((tokens, "t"), (sequences, "n"), (longest, "m")))
        sizes = dict(tokens_q=t, tokens_k=t, sequences=n, heads_q=16, max_k=m)
        with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator(env))):
            answer = cost_model.faster(HEAVY, LEAN, sizes, True, False, decide=choices.holds)
        assert answer is expected is cost_model.faster(HEAVY, LEAN, {**_sizes(tokens, sequences), "max_k": longest},
                                                       True, False)

        def guards_hold(hint: int) -> bool:
            return all(bool(guard.expr.subs({t: tokens, n: sequences, m: hint})) for guard in env.guards)

        assert env.guards and guards_hold(longest)
        assert not guards_hold(128 if expected else 16384)


@pytest.mark.parametrize("field, value", [("host", -1), ("pair", 1.5), ("row", None)])
def test_coefficients_are_nonnegative_integers(field, value):
    fields = {**dict(host=0, launch=0, row=0, sequence=0, pair=0), field: value}
    with pytest.raises(ValueError, match=f"KernelCost.{field}"):
        KernelCost(**fields)


# ---------------------------------------------------------------------------- the fit


def _synthetic_rows(costs: dict[str, KernelCost], seed: int = 0) -> list[dict]:
    """Grid rows whose GPU seconds are the model's own (no noise), plus the host rows."""
    rows = []
    for shape, case in enumerate(grid.grid_cases(tokens=(2048, 8192, 32768), heads=((16, 16), (32, 8)), head_dims=(64,))):
        for kernel, cost in costs.items():
            for side in grid.SIDES:
                seconds = cost_model.predicted_seconds(cost, case.total_q, case.total, len(case.lengths), case.heads_q,
                                                       case.causal, cuda_graphs=True)
                rows.append({"kind": "gpu", "kernel": kernel, "shape": shape, **grid.cost_key_fields(case, side),
                             **grid.size_fields(case), "seconds": seconds})
    for causal in (True, False):
        for kernel, cost in costs.items():
            for side in grid.SIDES:
                rows.append({"kind": "host", "kernel": kernel, "shape": -1, "side": side, "head_dim": 64,
                             "head_dim_v": 64, "causal": causal, "softcap": False, "seconds": cost.host / FEMTOSECONDS})
    return rows


def test_the_fit_recovers_the_coefficients_that_made_the_times():
    costs = {"triton": LEAN, "fa4": HEAVY}
    fitted = grid.fit(_synthetic_rows(costs))
    assert len(fitted) == 2 * 2 * 2  # side x causal x kernel, one head dim
    for (side, head_dim, head_dim_v, causal, softcap, kernel), cost in fitted.items():
        truth = costs[kernel]
        assert cost.host == truth.host
        for field in ("launch", "row", "sequence", "pair"):
            assert getattr(cost, field) == pytest.approx(getattr(truth, field), rel=0.01), (kernel, side, causal, field)


def test_the_fit_report_shows_small_errors_on_exact_data():
    report = grid.fit_report(_synthetic_rows({"triton": LEAN, "fa4": HEAVY}))
    assert report and all(len(row) == 8 for row in report)
    for row in report:
        for cell in row[-2:]:
            median, largest = (float(part.strip().rstrip("%")) for part in cell.split("/"))
            assert largest < 1.0, row  # percent


def test_nonnegative_least_squares_drops_negative_coefficients():
    columns = [[1.0, x, -x] for x in range(1, 8)]  # the third column would take a negative weight
    solution = grid.nonnegative_least_squares(columns, [2.0 + 3.0 * x for x in range(1, 8)])
    assert all(value >= 0 for value in solution)
    assert solution[0] == pytest.approx(2.0) and solution[1] == pytest.approx(3.0) and solution[2] == 0


def test_the_written_coefficients_read_back_the_same():
    fitted = grid.fit(_synthetic_rows({"triton": LEAN, "fa4": HEAVY}))
    namespace: dict = {}
    source = grid.costs_source(fitted, 9, "choice-cost-grid.json")
    exec(compile(source.replace("from .cost_model import", "from varlen_compile.lowering.cost_model import"),
                 "costs.py", "exec"), namespace)
    read = namespace["COSTS"][9]
    for (side, head_dim, head_dim_v, causal, softcap, kernel), cost in fitted.items():
        assert read[CostKey(side, head_dim, head_dim_v, causal=causal, softcap=softcap)][kernel] == cost


def test_grid_batches_have_equal_lengths_and_enough_tokens_per_sequence():
    cases = grid.grid_cases()
    assert len({case.name for case in cases}) == len(cases)
    for case in cases:
        assert len(set(case.lengths)) == 1 and case.lengths[0] >= grid.MIN_MEAN_LENGTH
        assert case.heads_q % case.heads_kv == 0
    assert {case.causal for case in cases} == {True, False}


def test_grid_parts_cover_the_grid_once():
    cases = grid.grid_cases()
    parts = [grid.part_of(cases, (k, 3)) for k in (1, 2, 3)]
    indices = sorted(index for part in parts for index, _ in part)
    assert indices == list(range(len(cases)))
    assert grid.part_of(cases, (1, 1)) == list(enumerate(cases))


def test_fit_reads_jsonl_and_takes_a_sides_host_time_where_a_key_has_none(tmp_path):
    """Host rows for causal keys only: the full-attention keys take the median host time of
    their side and kernel."""
    import json

    rows = [row for row in _synthetic_rows({"triton": LEAN, "fa4": HEAVY}) if row["kind"] == "gpu" or row["causal"]]
    path = tmp_path / "grid.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fitted = grid.fit(grid.read_rows([str(path)]))
    assert {key[3] for key in fitted} == {True, False}
    assert all(cost.host == (LEAN if key[-1] == "triton" else HEAVY).host for key, cost in fitted.items())


def test_the_grid_measurement_runs_on_the_cpu(interpret, monkeypatch):
    """``choice --cost-grid``'s measuring functions, on the CPU: our kernels through the
    interpreter, FA4 as the stand-in, the timers replaced by a call and a constant. The rows
    carry every field the fit reads, each kernel and side once."""
    import fake_fa4
    import torch

    from benchmarks import harness
    from benchmarks.harness import Case
    from varlen_compile import _compat

    interface = fake_fa4.make_interface()
    monkeypatch.setattr(_compat, "fa4_interface", lambda: (interface, ""))
    monkeypatch.setattr(grid, "make_inputs", lambda case: harness.make_inputs(case, device="cpu"))
    monkeypatch.setattr(harness, "bench_ms", lambda fn, **kwargs: (fn(), 2.0)[1])
    monkeypatch.setattr(harness, "host_time", lambda fn, calls, warmup=0: (fn(), (3e-5, 3e-5))[1])
    monkeypatch.setattr(harness, "build_floor", lambda case, x: harness.Built(lambda q, k, v: q * 2.0, [x.q]))
    case = Case("tiny", (8, 5), 2, 1, 16, True)
    rows = grid.gpu_rows(case, 7)
    assert sorted((row["kernel"], row["side"]) for row in rows) == sorted(
        (kernel, side) for kernel in grid.KERNELS for side in grid.SIDES)
    assert interface.calls  # FA4's forward and backward ran through the adapter
    for row in rows:
        assert row["kind"] == "gpu" and row["seconds"] == 2e-3 and row["shape"] == 7
        assert (row["tokens_q"], row["tokens_k"], row["sequences"], row["heads_q"]) == (13, 13, 2, 2)
        assert (row["head_dim"], row["head_dim_v"], row["causal"], row["softcap"]) == (16, 16, True, False)
    hosts = grid.host_rows(case, calls=2)
    assert sorted((row["kernel"], row["side"]) for row in hosts) == sorted(
        (kernel, side) for kernel in grid.KERNELS for side in grid.SIDES)
    assert all(row["kind"] == "host" and row["seconds"] == 0.0 for row in hosts)  # the same fake time as the floor
    assert torch.is_grad_enabled()


def test_a_run_read_from_its_json_and_jsonl_counts_once(tmp_path):
    import json

    rows = _synthetic_rows({"triton": LEAN, "fa4": HEAVY})
    (tmp_path / "grid.json").write_text(json.dumps(rows))
    (tmp_path / "grid.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = grid.read_rows([str(tmp_path / "grid.json"), str(tmp_path / "grid.jsonl")])
    assert len(read) == len(rows)


def test_fit_costs_runs_without_a_gpu_and_refuses_to_write_nothing(tmp_path):
    """``choice --fit-costs`` on the CPU: writes the coefficients from a grid with host rows;
    from GPU rows alone (a later part of a --part run) it stops and leaves the file alone."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    rows = _synthetic_rows({"triton": LEAN, "fa4": HEAVY})
    full, gpu_only, out = tmp_path / "full.jsonl", tmp_path / "gpu.jsonl", tmp_path / "costs.py"
    full.write_text("".join(json.dumps(row) + "\n" for row in rows))
    gpu_only.write_text("".join(json.dumps(row) + "\n" for row in rows if row["kind"] == "gpu"))
    root = Path(__file__).resolve().parents[1]

    def fit(path):
        return subprocess.run([sys.executable, "-m", "benchmarks", "choice", "--fit-costs", str(path), "--costs-out",
                               str(out)], cwd=root, capture_output=True, text=True)

    done = fit(full)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KernelCost(host=" in out.read_text() and "full.jsonl" in out.read_text()
    written = out.read_text()
    refused = fit(gpu_only)
    assert refused.returncode != 0 and "nothing to fit" in refused.stderr
    assert out.read_text() == written


def test_runs_of_one_kernel_each_fit_together(tmp_path):
    """A grid measured one kernel per run (``--grid-kernels triton``, then ``fa4``) fits as one:
    each kernel's coefficients from its own file."""
    import json

    rows = _synthetic_rows({"triton": LEAN, "fa4": HEAVY})
    for kernel in grid.KERNELS:
        (tmp_path / f"grid-{kernel}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows if row["kernel"] == kernel))
    together = grid.fit(grid.read_rows(sorted(str(path) for path in tmp_path.iterdir())))
    assert together == grid.fit(rows)
    assert {key[-1] for key in together} == set(grid.KERNELS)


@pytest.mark.parametrize("text, expected", [("triton", ("triton",)), ("fa4, triton", ("fa4", "triton")),
                                            ("fa4,fa4", ("fa4",)), ("cuda", None), (",", None)])
def test_grid_kernels_are_named_from_the_grids_kernels(text, expected):
    import argparse

    from benchmarks import run

    if expected is None:
        with pytest.raises(argparse.ArgumentTypeError, match="expected kernels from triton, fa4"):
            run._grid_kernels(text)
    else:
        assert run._grid_kernels(text) == expected


def test_host_rows_time_each_graph_in_rotating_rounds(monkeypatch):
    """Each graph is compiled once (each kernel under its own switch) and timed once per round,
    the order rotating; a kernel's host time is the median over rounds of its time less that
    round's floor, so a slow first timing (here the floor's, first of the first round) does not
    decide it."""
    from benchmarks import harness
    from benchmarks.harness import Case
    from varlen_compile import config

    monkeypatch.setattr(grid, "make_inputs", lambda case: harness.make_inputs(case, device="cpu"))
    state, builds, timed = {}, [], []
    costs = {"floor": (10e-6, 20e-6), "triton": (15e-6, 30e-6), "fa4": (25e-6, 60e-6)}  # forward, step

    def built(name):
        def attention(q, k, v):
            state["name"], state["backward"] = name, False
            out = q * 1.0
            out.register_hook(lambda grad: state.__setitem__("backward", True))
            return out

        builds.append(name)
        return harness.Built(attention, [])

    def host_time(fn, calls, warmup=0):
        fn()
        if not state["backward"]:
            timed.append(state["name"])
        seconds = costs[state["name"]][state["backward"]] + (1e-3 if len(timed) == 1 and not state["backward"] else 0)
        return seconds, seconds

    monkeypatch.setattr(harness, "build_floor", lambda case, x: built("floor"))
    monkeypatch.setattr(harness, "build_ours", lambda case, x: built(config.kernel))
    monkeypatch.setattr(harness, "host_time", host_time)
    rows = grid.host_rows(Case("tiny", (8, 5), 2, 1, 16, True), calls=2)
    assert builds == ["floor", "triton", "fa4"]
    assert timed == ["floor", "triton", "fa4", "triton", "fa4", "floor", "fa4", "floor", "triton"]
    seconds = {(row["kernel"], row["side"]): row["seconds"] for row in rows}
    assert seconds == pytest.approx({("triton", "forward"): 5e-6, ("triton", "backward"): 5e-6,
                                     ("fa4", "forward"): 15e-6, ("fa4", "backward"): 25e-6})
