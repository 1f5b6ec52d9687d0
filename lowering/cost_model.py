"""A cost model of each kernel's wall time for one op call, from what the host knows without a
sync: the token counts ``T_q``/``T_k``, the number of sequences ``N``, the heads, head dims and
masking (docs/design.md §9).

Per op call and kernel, ``wall = max(host, gpu)``: the host issues the call behind our op in a
compiled graph (``host``; not paid per call in CUDA-graph replays) while the GPU runs the
previous work, so whichever is longer sets the pace. The GPU time is linear in four terms::

    gpu = launch + row * H_q * T_q + sequence * H_q * N + pair * H_q * pairs

``pairs``, the (query, key) pairs one head attends, is unknown to the host. The model's base
value is equal lengths: ``P_lo = T_q * T_k / N`` without a mask and ``(2 T_q T_k - T_q^2) / 2N``
causal (bottom-right alignment; ``T_q <= T_k``). Where queries and keys share one partition
(self-attention) that is a lower bound, since ``sum L^2 >= T^2 / N``. The caller's max hints
bound the pairs from above: each query attends at most ``max_k`` keys and each key is attended
by at most ``max_q`` queries, so the pairs are at most ``P_lo * r`` with ``r`` the smaller of
``N * max_k / T_k`` and ``N * max_q / T_q`` (:func:`skew`; 1 for equal lengths, and for one query
per sequence as in decoding, whose pairs are exactly ``T_k``). The model takes the geometric mean
of the bounds, ``pairs = P_lo * sqrt(r)``. Over six draws of 30 random packed batches
(``benchmarks/shapes.py``, both distributions) the true count is 0.93x to 1.01x of that estimate
in geomean (0.6x to 1.8x at the extremes), where ``P_lo`` alone is 1.5x to 2.0x low in geomean
and up to 5.5x. Without a hint ``pairs = P_lo``: skewed batches then attend more than predicted,
so the model errs towards the kernel with the larger per-pair cost (the slower one on long
sequences). A hint the batch exceeds makes the estimate low and a loose one high; our kernels
and FA4 behind the op never read the hints, so they change only which kernel runs (aten flash,
which only max-autotune or ``kernel="aten"`` runs, trusts them as FlashAttention 2 does).

Everything is written times ``2 N`` (:func:`scaled_times`): integer polynomials in the sizes,
with no division, so the same expressions decide for ints and for Inductor's symbolic sizes (a
guard per comparison: see ``choices.holds``). The square root is compared by squaring both sides
(:func:`_negative`), which keeps the comparisons polynomial. Coefficients are integers in femtoseconds
(:class:`KernelCost`), one set per kernel and :class:`CostKey`, fitted to a measured grid by
``python -m benchmarks choice --cost-grid`` then ``--fit-costs`` (``benchmarks/grid.py``), which
writes them to ``lowering/costs.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import sympy

__all__ = [
    "CostKey", "FEMTOSECONDS", "KernelCost", "faster", "predicted_seconds", "scaled_pairs", "scaled_times", "skew",
]

Side = Literal["forward", "backward"]

FEMTOSECONDS = 10**15


@dataclasses.dataclass(frozen=True)
class CostKey:
    """What selects a set of coefficients: the side, the head dims, causal or not, softcap or
    not (each changes the kernels' code). Windows and the optional inputs are not modeled."""

    side: Side
    head_dim: int
    head_dim_v: int
    causal: bool
    softcap: bool = False


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel's coefficients for one :class:`CostKey`, integer femtoseconds.

    ``host``: host time per call behind our op in a compiled graph; ``launch``: GPU time of a
    call with no work; ``row``: per query row and head; ``sequence``: per sequence and head;
    ``pair``: per attended (query, key) pair and head."""

    host: int
    launch: int
    row: int
    sequence: int
    pair: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"KernelCost.{field.name} must be a non-negative int (femtoseconds), got {value!r}")


def _min(a: Any, b: Any) -> Any:
    """``min`` for ints, ``sympy.Min`` for symbolic sizes."""
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return min(a, b)


def scaled_pairs(tokens_q: Any, tokens_k: Any, causal: bool) -> Any:
    """``2 N`` times the lower bound on the pairs one head attends: ``2 T_q T_k`` without a
    mask; causal, ``2 m T_k - m^2`` with ``m = min(T_q, T_k)`` (queries past the keys attend
    nothing more)."""
    if not causal:
        return 2 * tokens_q * tokens_k
    rows = _min(tokens_q, tokens_k)
    return 2 * rows * tokens_k - rows * rows


def skew(
    sequences: Any, tokens_q: Any, tokens_k: Any, max_q: Any, max_k: Any, decide: Callable[[Any], bool] = bool
) -> tuple[Any, Any] | None:
    """``(numerator, denominator)`` of ``r``, the pairs' upper bound over ``P_lo``: the smaller of
    ``N * max_k / T_k`` and ``N * max_q / T_q`` over the hints given (see the module docstring);
    None without a hint (``r`` is then taken as 1). With both hints, which is smaller is one
    comparison read through ``decide`` (a guard on symbolic sizes)."""
    ratios = [(sequences * hint, tokens) for hint, tokens in ((max_k, tokens_k), (max_q, tokens_q))
              if hint is not None and (isinstance(tokens, sympy.Basic) or tokens > 0)]
    if len(ratios) < 2:
        return ratios[0] if ratios else None
    (num_k, den_k), (num_q, den_q) = ratios
    relation = num_q * den_k < num_k * den_q  # N max_q / T_q < N max_k / T_k
    if isinstance(relation, sympy.Basic):
        relation = sympy.Lt(num_q * den_k, num_k * den_q)
    return (num_q, den_q) if decide(relation) else (num_k, den_k)


def _scaled_parts(
    cost: KernelCost, tokens_q: Any, tokens_k: Any, sequences: Any, heads_q: Any, causal: bool, cuda_graphs: bool
) -> tuple[Any, Any, Any]:
    """``2 N`` times ``(host, gpu less the pair term, the pair term at P_lo)``."""
    host = 0 if cuda_graphs else 2 * cost.host * sequences
    fixed = (
        2 * cost.launch * sequences
        + 2 * cost.row * heads_q * tokens_q * sequences
        + 2 * cost.sequence * heads_q * sequences * sequences
    )
    return host, fixed, cost.pair * heads_q * scaled_pairs(tokens_q, tokens_k, causal)


def scaled_times(
    cost: KernelCost, tokens_q: Any, tokens_k: Any, sequences: Any, heads_q: Any, causal: bool, cuda_graphs: bool
) -> tuple[Any, Any]:
    """``(2 N host, 2 N gpu)`` in femtoseconds at ``pairs = P_lo`` (no skew), for ints or
    symbolic sizes; host is 0 in graphs compiled for CUDA graphs (replays issue no call)."""
    host, fixed, pairs = _scaled_parts(cost, tokens_q, tokens_k, sequences, heads_q, causal, cuda_graphs)
    return host, fixed + pairs


def predicted_seconds(
    cost: KernelCost, tokens_q: int, tokens_k: int, sequences: int, heads_q: int, causal: bool, cuda_graphs: bool = False,
    max_q: int | None = None, max_k: int | None = None,
) -> float:
    """The predicted wall time of one call, seconds (concrete sizes; 0 for an empty batch);
    ``max_q``/``max_k``: the caller's hints, which scale the pairs by ``sqrt(r)`` (:func:`skew`)."""
    if sequences <= 0:
        return 0.0
    host, fixed, pairs = _scaled_parts(cost, tokens_q, tokens_k, sequences, heads_q, causal, cuda_graphs)
    ratio = skew(sequences, tokens_q, tokens_k, max_q, max_k)
    gpu = fixed + (pairs if ratio is None else pairs * math.sqrt(max(ratio[0], 0) / ratio[1]))
    return max(host, gpu) / (2 * sequences * FEMTOSECONDS)


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def _negative(
    base: Any, root_factor: Any, factor_sign: int, ratio: tuple[Any, Any] | None, decide: Callable[[Any], bool]
) -> bool:
    """Whether ``base + root_factor * sqrt(ratio) < 0`` (``ratio`` ``(num, den)``, both >= 0 and
    ``den > 0``; None: 1), where ``factor_sign`` is the sign of ``root_factor`` for every size
    (the sign of a coefficient times sizes that are never negative). The root is compared by
    squaring, so each comparison read through ``decide`` is polynomial: one without a ratio, at
    most two with one."""

    def less(a: Any, b: Any) -> bool:
        relation = sympy.Lt(a, b) if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic) else a < b
        return decide(relation)

    if ratio is None:
        return less(base + root_factor, 0)
    if factor_sign == 0:
        return less(base, 0)
    num, den = ratio
    if factor_sign > 0:  # base < -f sqrt(r) <= 0: base < 0 and f^2 r < base^2
        return less(base, 0) and less(root_factor * root_factor * num, base * base * den)
    # f < 0: base < |f| sqrt(r): any negative base, or base^2 < f^2 r
    return less(base, 0) or less(base * base * den, root_factor * root_factor * num)


def faster(
    candidate: KernelCost, incumbent: KernelCost, sizes: Mapping[str, Any], causal: bool, cuda_graphs: bool,
    decide: Callable[[Any], bool] = bool,
) -> bool:
    """Whether ``candidate`` is predicted strictly faster than ``incumbent``:
    ``max(h_c, g_c) < max(h_i, g_i)`` (host and GPU times, :func:`scaled_times`, the pairs
    scaled by ``sqrt(r)`` where ``sizes`` has max hints, :func:`skew`). ``sizes``: ``tokens_q``,
    ``tokens_k``, ``sequences``, ``heads_q`` and optionally ``max_q``/``max_k`` (ints or
    symbolic). Each comparison of sizes goes through ``decide`` (``choices.holds`` in a lowering:
    a guard per comparison read): at most two without a hint, four with one (half of that under
    CUDA graphs), and one more to pick the smaller bound when both hints are given:

    - CUDA graphs (no host time): ``g_c < g_i``;
    - ``h_c >= h_i``: the incumbent must be GPU-bound past the candidate's host time,
      ``h_c < g_i and g_c < g_i``;
    - ``h_c < h_i``: ``g_c < h_i or g_c < g_i``.

    A batch with no sequence keeps the incumbent."""
    sequences = sizes["sequences"]
    if not isinstance(sequences, sympy.Basic) and sequences <= 0:
        return False
    shape = {name: sizes[name] for name in ("tokens_q", "tokens_k", "sequences", "heads_q")}
    ratio = skew(sequences, sizes["tokens_q"], sizes["tokens_k"], sizes.get("max_q"), sizes.get("max_k"), decide)
    h_c, f_c, p_c = _scaled_parts(candidate, causal=causal, cuda_graphs=cuda_graphs, **shape)
    h_i, f_i, p_i = _scaled_parts(incumbent, causal=causal, cuda_graphs=cuda_graphs, **shape)
    pair_sign = _sign(candidate.pair - incumbent.pair)

    def gpu_faster() -> bool:  # g_c < g_i
        return _negative(f_c - f_i, p_c - p_i, pair_sign, ratio, decide)

    if cuda_graphs:
        return gpu_faster()
    if candidate.host >= incumbent.host:  # h_c >= h_i (both times the same 2N > 0)
        # h_c < g_i, then g_c < g_i
        return _negative(h_c - f_i, -p_i, -_sign(incumbent.pair), ratio, decide) and gpu_faster()
    # g_c < h_i, or g_c < g_i
    return _negative(f_c - h_i, p_c, _sign(candidate.pair), ratio, decide) or gpu_faster()
