"""Random packed-batch shapes and the regret of the kernel choice over them, for
``choice --random``: pure Python (no torch, no GPU), so the CPU tests check them directly.

Two distributions (:data:`DISTRIBUTIONS`), each drawn from its own ``random.Random(seed)``:

- ``train``: training-like batches. Total tokens ``T`` log-uniform in [4096, 131072], the number
  of sequences ``N`` log-uniform in [1, T / 64], the lengths a random partition of ``T`` (sorted
  uniform cut points: lengths vary, every one at least 1).
- ``any``: ``N`` log-uniform in [1, 256], a mean length log-uniform in [32, 8192], lengths
  log-normal around it (at least 1); sequences past :data:`ANY_MAX_TOKENS` tokens are dropped.

Both: query heads from {8, 16, 32}, 1 or 4 query heads per kv head, head dim 64 or 128, causal
with probability 0.8 (else full attention).

Regret of a choice on one shape: its time over the fastest of the implementations measured
(1: it picked the best); an implementation absent (not installed, or unable to serve the
shape) is left out of the minimum.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Mapping, Sequence

DISTRIBUTIONS = ("train", "any")
TRAIN_TOKENS = (4096, 131072)
TRAIN_MIN_MEAN_LENGTH = 64
ANY_MAX_SEQS = 256
ANY_MEAN_LENGTH = (32, 8192)
ANY_MAX_TOKENS = 262144
ANY_LENGTH_SIGMA = 1.0
"""The log-normal lengths' sigma (of the log); the mean stays the drawn mean."""
QUERY_HEADS = (8, 16, 32)
GQA_RATIOS = (1, 4)
HEAD_DIMS = (64, 128)
CAUSAL_PROBABILITY = 0.8


@dataclasses.dataclass(frozen=True)
class Shape:
    """One random packed batch: the sequences' lengths (queries and keys alike), heads, head
    dim and mask; ``index`` numbers it within its draw (and its name)."""

    lengths: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    index: int = 0

    @property
    def total(self) -> int:
        """``T``: the tokens of the batch."""
        return sum(self.lengths)

    @property
    def seqs(self) -> int:
        """``N``: the sequences of the batch."""
        return len(self.lengths)

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.index:02d}-T{self.total}-N{self.seqs}-h{self.heads_q}kv{self.heads_kv}-d{self.head_dim}-{mask}"


def _log_uniform_int(rng: random.Random, low: float, high: float) -> int:
    """An integer log-uniform in [low, high] (rounded, clamped to the range's integers)."""
    value = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min(max(value, math.ceil(low)), math.floor(high))


def _partition(rng: random.Random, total: int, count: int) -> tuple[int, ...]:
    """``count`` positive lengths summing to ``total``: the gaps between ``count - 1`` distinct
    uniform cut points of 1 .. total - 1."""
    cuts = sorted(rng.sample(range(1, total), count - 1))
    return tuple(end - start for start, end in zip([0, *cuts], [*cuts, total]))


def _train_lengths(rng: random.Random) -> tuple[int, ...]:
    total = _log_uniform_int(rng, *TRAIN_TOKENS)
    return _partition(rng, total, _log_uniform_int(rng, 1, total // TRAIN_MIN_MEAN_LENGTH))


def _any_lengths(rng: random.Random) -> tuple[int, ...]:
    count = _log_uniform_int(rng, 1, ANY_MAX_SEQS)
    mean = math.exp(rng.uniform(*map(math.log, ANY_MEAN_LENGTH)))
    mu = math.log(mean) - ANY_LENGTH_SIGMA ** 2 / 2  # a log-normal of mean ``mean``
    drawn = [min(max(1, round(rng.lognormvariate(mu, ANY_LENGTH_SIGMA))), ANY_MAX_TOKENS) for _ in range(count)]
    kept, total = [], 0
    for length in drawn:
        if total + length > ANY_MAX_TOKENS:
            break
        kept.append(length)
        total += length
    return tuple(kept)


def random_shapes(count: int, seed: int, dist: str) -> list[Shape]:
    """``count`` shapes of distribution ``dist`` (``train`` or ``any``, see the module), the
    same for the same seed."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    rng = random.Random(seed)
    shapes = []
    for index in range(count):
        lengths = _train_lengths(rng) if dist == "train" else _any_lengths(rng)
        heads_q = rng.choice(QUERY_HEADS)
        shapes.append(Shape(lengths, heads_q, heads_q // rng.choice(GQA_RATIOS), rng.choice(HEAD_DIMS),
                            rng.random() < CAUSAL_PROBABILITY, index))
    return shapes


def default_tag(dist: str, seed: int | str) -> str:
    """The result files' stem of ``choice --random`` without ``--tag``."""
    return f"choice-random-{dist}-seed{seed}"


# ----------------------------------------------------------------------------- regret


Times = Mapping[str, float | None]
"""One shape's times (ms) by implementation; None: absent (not installed, or it failed)."""


def best_of(times: Times) -> tuple[str, float] | None:
    """The fastest present implementation and its time, or None when none is present."""
    present = {name: ms for name, ms in times.items() if ms is not None}
    if not present:
        return None
    name = min(present, key=present.__getitem__)
    return name, present[name]


def regret(times: Times, choice: str = "auto") -> float | None:
    """``choice``'s time over the fastest present one's (at least 1), or None when ``choice``
    is absent."""
    if times.get(choice) is None:
        return None
    return times[choice] / best_of(times)[1]


def paired_regret(rounds: Mapping[str, Sequence[float] | None], choice: str = "auto") -> float | None:
    """``choice``'s regret from interleaved rounds, against the implementation whose median over
    the rounds is lowest: 1 when that is ``choice``, else the median over the rounds of
    ``choice``'s time over that implementation's time in the same round (at least 1).

    Pairing within a round cancels drift that slows every implementation of the round alike
    (host clock, another process), where a ratio of per-implementation medians would keep it.
    The rival is picked once, by its median, and not anew in each round: the fastest of several
    noisy times in one round is faster than any of them typically is, so a per-round minimum
    would charge a choice for the noise of the others (three runs of one graph would score
    above 1). None when ``choice`` is absent; the rounds of the present implementations must be
    equally many."""
    if rounds.get(choice) is None:
        return None
    present = {name: list(values) for name, values in rounds.items() if values is not None}
    counts = {len(values) for values in present.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"paired_regret: every present implementation needs the same rounds, got {counts}")
    rival = min(present, key=lambda name: (statistics.median(present[name]), name != choice))
    if rival == choice:
        return 1.0
    ratios = [mine / theirs for mine, theirs in zip(present[choice], present[rival], strict=True)]
    return max(1.0, statistics.median(ratios))


@dataclasses.dataclass(frozen=True)
class RegretSummary:
    """A choice's regret over the shapes where it ran: geometric mean, the worst and its shape,
    how many shapes lose more than 5% and 10%, and the sum of its times over the sum of the
    per-shape best."""

    shapes: int
    geomean: float
    worst: float
    worst_shape: str
    over_5_percent: int
    over_10_percent: int
    total_ratio: float


def summarize(
    per_shape: Mapping[str, Times], choice: str = "auto", regrets: Mapping[str, float] | None = None
) -> RegretSummary | None:
    """The :class:`RegretSummary` of ``choice`` over the shapes (by name) where it is present,
    or None when it is present on none. ``regrets``: per-shape regrets measured otherwise (e.g.
    :func:`paired_regret`), used where given instead of :func:`regret` of the times; the sum
    ratio always comes from the times."""
    ran = {name: times for name, times in per_shape.items() if times.get(choice) is not None}
    if not ran:
        return None
    given = regrets or {}
    regrets = {name: given[name] if given.get(name) is not None else regret(times, choice) for name, times in ran.items()}
    worst_shape = max(regrets, key=regrets.__getitem__)
    return RegretSummary(
        shapes=len(ran), geomean=statistics.geometric_mean(regrets.values()), worst=regrets[worst_shape],
        worst_shape=worst_shape, over_5_percent=sum(r > 1.05 for r in regrets.values()),
        over_10_percent=sum(r > 1.10 for r in regrets.values()),
        total_ratio=sum(times[choice] for times in ran.values()) / sum(best_of(times)[1] for times in ran.values()),
    )
