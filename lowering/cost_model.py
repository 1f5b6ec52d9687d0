"""A cost model of each kernel's wall time for one op call, from what the host knows without a
sync: the token counts ``T_q``/``T_k``, the number of sequences ``N``, the heads, head dims and
masking (docs/design.md §9).

Per op call and kernel, ``wall = max(host, gpu)``: the host issues the call behind our op in a
compiled graph (``host``; not paid per call in CUDA-graph replays) while the GPU runs the
previous work, so whichever is longer sets the pace. The GPU time is linear in four terms::

    gpu = launch + row * H_q * T_q + sequence * H_q * N + pair * H_q * pairs

``pairs``, the (query, key) pairs one head attends, is unknown to the host. The model takes
equal lengths: ``T_q * T_k / N`` without a mask and ``(2 T_q T_k - T_q^2) / 2N`` causal
(bottom-right alignment; ``T_q <= T_k``). Where queries and keys share one partition
(self-attention) that is a lower bound: ``sum L^2 >= T^2 / N``. Skewed batches attend more: the
model then underestimates each kernel's GPU time by its ``pair`` coefficient times the excess,
so it errs towards the kernel with the larger per-pair cost (the slower one on long sequences).

Everything is written times ``2 N`` (:func:`scaled_times`): integer polynomials in the sizes,
with no division, so the same expressions decide for ints and for Inductor's symbolic sizes (a
guard per comparison: see ``choices.holds``). Coefficients are integers in femtoseconds
(:class:`KernelCost`), one set per kernel and :class:`CostKey`, fitted to a measured grid by
``python -m benchmarks choice --cost-grid`` then ``--fit-costs`` (``benchmarks/grid.py``), which
writes them to ``lowering/costs.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import sympy

__all__ = ["CostKey", "FEMTOSECONDS", "KernelCost", "faster", "predicted_seconds", "scaled_pairs", "scaled_times"]

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


def scaled_times(
    cost: KernelCost, tokens_q: Any, tokens_k: Any, sequences: Any, heads_q: Any, causal: bool, cuda_graphs: bool
) -> tuple[Any, Any]:
    """``(2 N host, 2 N gpu)`` in femtoseconds, for ints or symbolic sizes; host is 0 in graphs
    compiled for CUDA graphs (replays issue no call)."""
    host = 0 if cuda_graphs else 2 * cost.host * sequences
    gpu = (
        2 * cost.launch * sequences
        + 2 * cost.row * heads_q * tokens_q * sequences
        + 2 * cost.sequence * heads_q * sequences * sequences
        + cost.pair * heads_q * scaled_pairs(tokens_q, tokens_k, causal)
    )
    return host, gpu


def predicted_seconds(
    cost: KernelCost, tokens_q: int, tokens_k: int, sequences: int, heads_q: int, causal: bool, cuda_graphs: bool = False
) -> float:
    """The predicted wall time of one call, seconds (concrete sizes; 0 for an empty batch)."""
    if sequences <= 0:
        return 0.0
    host, gpu = scaled_times(cost, tokens_q, tokens_k, sequences, heads_q, causal, cuda_graphs)
    return max(host, gpu) / (2 * sequences * FEMTOSECONDS)


def faster(
    candidate: KernelCost, incumbent: KernelCost, sizes: Mapping[str, Any], causal: bool, cuda_graphs: bool,
    decide: Callable[[Any], bool] = bool,
) -> bool:
    """Whether ``candidate`` is predicted strictly faster than ``incumbent``:
    ``max(h_c, g_c) < max(h_i, g_i)`` (host and GPU times, :func:`scaled_times`). ``sizes``:
    ``tokens_q``, ``tokens_k``, ``sequences``, ``heads_q`` (ints or symbolic). Each comparison of
    sizes goes through ``decide`` (``choices.holds`` in a lowering: a guard per comparison read),
    at most two of them:

    - CUDA graphs (no host time): ``g_c < g_i``;
    - ``h_c >= h_i``: the incumbent must be GPU-bound past the candidate's host time,
      ``h_c < g_i and g_c < g_i``;
    - ``h_c < h_i``: ``g_c < h_i or g_c < g_i``.

    A batch with no sequence keeps the incumbent."""
    sequences = sizes["sequences"]
    if not isinstance(sequences, sympy.Basic) and sequences <= 0:
        return False
    h_c, g_c = scaled_times(candidate, causal=causal, cuda_graphs=cuda_graphs, **sizes)
    h_i, g_i = scaled_times(incumbent, causal=causal, cuda_graphs=cuda_graphs, **sizes)

    def less(a: Any, b: Any) -> bool:
        relation = sympy.Lt(a, b) if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic) else a < b
        return decide(relation)

    if cuda_graphs:
        return less(g_c, g_i)
    if candidate.host >= incumbent.host:  # h_c >= h_i (both times the same 2N > 0)
        return less(h_c, g_i) and less(g_c, g_i)
    return less(g_c, h_i) or less(g_c, g_i)
