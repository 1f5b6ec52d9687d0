"""``choice --random``'s pure parts, on the CPU: the random shapes (deterministic per seed,
within every bound of both distributions) and the regret math on hand-made times."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks import shapes
from benchmarks.shapes import Shape, best_of, random_shapes, regret, summarize

DRAWS = 300


@pytest.mark.parametrize("dist", shapes.DISTRIBUTIONS)
def test_shapes_are_the_same_for_a_seed_and_differ_across_seeds(dist):
    assert random_shapes(20, 7, dist) == random_shapes(20, 7, dist)
    assert random_shapes(20, 7, dist) != random_shapes(20, 8, dist)
    assert random_shapes(5, 7, dist) == random_shapes(20, 7, dist)[:5]


def _check_common(drawn: list[Shape]) -> None:
    """Lengths, heads, head dims and masks of either distribution, and that every choice occurs."""
    for shape in drawn:
        assert all(isinstance(n, int) and n >= 1 for n in shape.lengths), shape.name
        assert shape.total == sum(shape.lengths) and shape.seqs == len(shape.lengths)
        assert shape.heads_q in shapes.QUERY_HEADS
        assert shape.heads_q % shape.heads_kv == 0 and shape.heads_q // shape.heads_kv in shapes.GQA_RATIOS
        assert shape.head_dim in shapes.HEAD_DIMS
    assert {s.heads_q for s in drawn} == set(shapes.QUERY_HEADS)
    assert {s.heads_q // s.heads_kv for s in drawn} == set(shapes.GQA_RATIOS)
    assert {s.head_dim for s in drawn} == set(shapes.HEAD_DIMS)
    causal = sum(s.causal for s in drawn) / len(drawn)
    assert 0.7 < causal < 0.9
    assert len({s.name for s in drawn}) == len(drawn)
    assert any(len(set(s.lengths)) > 1 for s in drawn)


def test_train_shapes_respect_their_bounds():
    drawn = random_shapes(DRAWS, 0, "train")
    _check_common(drawn)
    low, high = shapes.TRAIN_TOKENS
    for shape in drawn:
        assert low <= shape.total <= high, shape.name
        assert 1 <= shape.seqs <= shape.total / 64, shape.name
    totals = sorted(s.total for s in drawn)
    assert totals[0] < 2 * low and totals[-1] > high / 2  # log-uniform over the range
    assert min(s.seqs for s in drawn) <= 2 and max(s.seqs / s.total for s in drawn) > 1 / 128


def test_any_shapes_respect_their_bounds():
    drawn = random_shapes(DRAWS, 0, "any")
    _check_common(drawn)
    for shape in drawn:
        assert 1 <= shape.seqs <= shapes.ANY_MAX_SEQS, shape.name
        assert shape.total <= shapes.ANY_MAX_TOKENS, shape.name
    means = [s.total / s.seqs for s in drawn]
    assert min(means) < 64 and max(means) > 4096
    assert max(s.total for s in drawn) > shapes.ANY_MAX_TOKENS / 2  # the cap is reached, not set lower
    assert min(s.seqs for s in drawn) == 1 and max(s.seqs for s in drawn) > 128


def test_an_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="dist must be one of"):
        random_shapes(1, 0, "uniform")


def test_names_and_tags():
    assert Shape((3, 5), 16, 4, 128, True, 7).name == "07-T8-N2-h16kv4-d128-causal"
    assert Shape((8,), 8, 8, 64, False).name == "00-T8-N1-h8kv8-d64-full"
    assert shapes.default_tag("any", 3) == "choice-random-any-seed3"


def test_regret_is_against_the_fastest_present():
    assert regret({"template": 2.0, "auto": 3.0, "fa4": 1.5}) == 2.0
    assert regret({"template": 2.0, "auto": 1.0, "fa4": 1.5}) == 1.0  # auto is the best
    assert regret({"template": 2.0, "auto": 3.0, "fa4": None}) == 1.5  # FA4 absent
    assert regret({"template": None, "auto": 3.0, "fa4": None}) == 1.0
    assert regret({"template": 2.0, "auto": None, "fa4": 1.0}) is None  # auto absent
    assert best_of({"template": 2.0, "auto": 3.0, "fa4": None}) == ("template", 2.0)
    assert best_of({"template": None, "auto": None}) is None


def test_summary_on_hand_made_times():
    per_shape = {
        "a": {"template": 1.0, "auto": 1.0, "fa4": 2.0},  # regret 1
        "b": {"template": 8.0, "auto": 4.0, "fa4": 1.0},  # regret 4
        "c": {"template": 1.0, "auto": None, "fa4": 1.0},  # auto absent: left out
    }
    summary = summarize(per_shape)
    assert summary.shapes == 2
    assert summary.geomean == pytest.approx(2.0)  # geomean of [1, 4]
    assert (summary.worst, summary.worst_shape) == (4.0, "b")
    assert (summary.over_5_percent, summary.over_10_percent) == (1, 1)
    assert summary.total_ratio == pytest.approx((1.0 + 4.0) / (1.0 + 1.0))
    assert summarize({}) is None and summarize({"a": {"template": 1.0, "auto": None}}) is None


def test_summary_counts_the_thresholds_strictly():
    per_shape = {str(ratio): {"template": 1.0, "auto": ratio, "fa4": None} for ratio in (1.0, 1.04, 1.07, 1.10, 1.2)}
    summary = summarize(per_shape)
    assert (summary.over_5_percent, summary.over_10_percent) == (3, 1)
    assert summary.geomean == pytest.approx(math.prod((1.0, 1.04, 1.07, 1.10, 1.2)) ** 0.2)
    assert summary.total_ratio == pytest.approx(sum((1.0, 1.04, 1.07, 1.10, 1.2)) / 5)


def test_random_cases_are_called_with_hints_which_no_implementation_refuses():
    """``choice --random`` calls our op with the max hints, as FA4 direct gets ``max_seqlen``;
    the hints are not a feature, so FA4 direct and aten still measure the case (a real feature
    still keeps them out)."""
    import dataclasses

    from benchmarks import harness, run

    for shape in shapes.random_shapes(5, 3, "train"):
        case = run._case_of(shape)
        assert case.hints and harness.features_of(case) == []
    assert harness.features_of(dataclasses.replace(case, softcap=30.0)) == ["softcap"]


def test_paired_regret_cancels_drift_common_to_a_round():
    """Two implementations of the same code whose rounds drift together: the ratio of medians
    says 1.49, the rounds say 1 (times from an H100 run of two identical fwd+bwd steps)."""
    from benchmarks.shapes import paired_regret

    rounds = {"template": [0.773, 0.562, 0.347, 0.348, 0.346], "auto": [0.676, 0.803, 0.343, 0.343, 0.519], "fa4": None}
    assert paired_regret(rounds) == 1.0
    assert regret({name: (None if v is None else sorted(v)[2]) for name, v in rounds.items()}) == pytest.approx(0.519 / 0.348)
    # a real loss in every round stays: auto 20% slower than FA4 throughout, whatever the drift
    slow = {"template": [3.0, 6.0, 3.0], "auto": [1.2, 2.4, 1.2], "fa4": [1.0, 2.0, 1.0]}
    assert paired_regret(slow) == pytest.approx(1.2)
    assert paired_regret({"template": [1.0], "auto": None, "fa4": [1.0]}) is None
    with pytest.raises(ValueError, match="same rounds"):
        paired_regret({"template": [1.0, 2.0], "auto": [1.0]})


def test_paired_regret_does_not_charge_a_choice_for_its_rivals_noise():
    """Three runs of one compiled graph, host-bound, noisy (auto's and the template's rounds of
    an H100 fwd+bwd step where both ran the template, FA4 direct beside them): auto has the
    lowest median, so its regret is 1. Against each round's fastest of the three it would be
    1.23, charging auto for whichever rival happened to be quick in that round."""
    from benchmarks.shapes import paired_regret

    rounds = {"template": [0.434, 0.412, 0.769, 0.729, 0.748], "auto": [0.594, 0.638, 0.949, 0.726, 0.707],
              "fa4": [0.738, 0.768, 0.801, 0.808, 0.738]}
    assert paired_regret(rounds) == 1.0
    per_round_fastest = sorted(a / min(t, a, f) for t, a, f in zip(*rounds.values()))[2]
    assert per_round_fastest == pytest.approx(1.234, abs=1e-3)
    # the rival is the lowest median; auto is paired with it round by round
    rounds["auto"] = [0.8, 0.7, 1.0, 0.9, 0.95]
    assert paired_regret(rounds) == pytest.approx(statistics.median(
        [a / t for a, t in zip(rounds["auto"], rounds["template"])]))
    # a paired median under 1 against a rival with a lower median is noise: regret is at least 1
    assert paired_regret({"template": [1.0, 1.0, 3.0], "auto": [0.9, 2.0, 2.0], "fa4": None}) == 1.0


def test_summary_takes_given_regrets_and_sums_the_times():
    per_shape = {"a": {"template": 1.0, "auto": 2.0, "fa4": None}, "b": {"template": 1.0, "auto": 1.0, "fa4": None}}
    summary = summarize(per_shape, regrets={"a": 1.0, "b": None})
    assert summary.geomean == 1.0 and summary.worst == 1.0 and summary.over_5_percent == 0
    assert summary.total_ratio == 1.5  # from the medians, not the regrets


def test_a_cut_short_random_run_is_reported_from_its_rows(tmp_path):
    """``choice --random-report``: the tables of a run cut short, rebuilt on the CPU from the rows
    it wrote one at a time, with the regrets recomputed (paired over rounds)."""
    import argparse
    import json

    from benchmarks import run

    row = {"shape": "00-T100-N2-h8kv8-d64-causal", "tokens": 100, "seqs": 2, "max_len": 60, "heads_q": 8,
           "heads_kv": 8, "head_dim": 64, "causal": True, "default_picks_fa4": False, "dist": "train", "seed": 7,
           "rounds": 5, "backward": False, "device": "a test device",
           "template_fwd_ms": 0.348, "auto_fwd_ms": 0.519, "fa4_fwd_ms": 0.6,
           "template_fwd_rounds": [0.773, 0.562, 0.347, 0.348, 0.346],
           "auto_fwd_rounds": [0.676, 0.803, 0.343, 0.343, 0.519],
           "fa4_fwd_rounds": [0.9, 0.9, 0.6, 0.6, 0.6], "fwd_regret": 1.49}
    source = tmp_path / "choice-random-train-seed7.jsonl"
    source.write_text(json.dumps(row) + "\n")
    run.cmd_choice_random_report(argparse.Namespace(random_report=str(source), rounds=5))
    rows = json.loads((tmp_path / "choice-random-train-seed7-report.json").read_text())
    assert rows[0]["fwd_regret"] == 1.0  # paired, not the 1.49 the row came with
    text = (tmp_path / "choice-random-train-seed7-report.md").read_text()
    assert text.startswith("a test device;") and "| forward | 1 | 1.000 |" in text
