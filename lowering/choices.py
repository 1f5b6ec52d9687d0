"""Which kernels compete for one op call in a compiled graph: our Triton template, FlashAttention
4 and aten flash attention (the last two as extern choices). What each kernel can serve is
``varlen_compile.eligibility``'s answer; the preference (``varlen_compile.config.kernel``) and
``max-autotune`` are handled by ``eligibility.select``; this module adds the default choice for
``"auto"`` without ``max-autotune`` (docs/design.md §9): the cost model (``cost_model.py``) where
its coefficients were fitted for the call's arch and cost key (``costs.py``), else the default
table below.

Default table (16-bit inputs; measured on the H200 with flash-attn-4 4.0.0b36, 2026-11-23/24;
``docs/performance.md`` has the numbers):

=====  ==================  ==================================  ===================  ========
arch   (D, D_v)            masking / features                  mean sequence length default
=====  ==================  ==================================  ===================  ========
sm90   (128, 128)          none or causal, softcap or not;     any                  FA4 [*]
                           no optional input
sm90   (64, 64)            none or causal; no softcap, no      >= 512 tokens        FA4 [*]
                           optional input
other  any                 any                                 any                  template
=====  ==================  ==================================  ===================  ========

[*] from ``T_q * H_q >= 2**17`` rows (:data:`FA4_MIN_ROWS`): FA4 behind our op pays host time
    per call (its Python interface; its backward runs on autograd's device thread) that a
    smaller batch cannot hide; except in graphs compiled for CUDA graphs
    (``mode="reduce-overhead"``), whose replays pay no per-call host time.

The mean length (``T_q / N``) and the rows (``T_q * H_q``) are decided on the graph's sizes
with a guard (:func:`holds`): under dynamic shapes a batch on the other side of a boundary
recompiles once, and each side's graph serves its batches after that. Unbacked sizes cannot be
guarded on; their size hints decide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.virtualized import V
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._sympy.numbers import int_oo

from varlen_compile import eligibility
from varlen_compile.eligibility import ATEN, FA4, TEMPLATE
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

from . import cost_model
from .common import call_of_nodes, size_hint
from .costs import COSTS

__all__ = [
    "ATEN", "FA4", "FA4_DEFAULT", "FA4_MIN_ROWS", "TEMPLATE", "fa4_by_default", "fa4_is_default", "fa4_min_length",
    "fa4_size_rule", "fitted_costs", "holds", "kernels_for",
]

FA4_DEFAULT: dict[int, dict[tuple[int, int], int]] = {9: {(64, 64): 512, (128, 128): 0}}
"""Arch major -> ``(D, D_v)`` -> the mean sequence length (tokens) from which FA4 is the
default (see the table above)."""

FA4_SOFTCAP_DEFAULT: dict[int, tuple[tuple[int, int], ...]] = {9: ((128, 128),)}
"""Arch major -> the ``(D, D_v)`` where FA4 is the default with a softcap too."""

FA4_MIN_ROWS = 1 << 17
"""``T_q * H_q`` from which FA4's host time behind our op is hidden by its GPU time."""


def fa4_min_length(
    arch_major: int, head_dim: int, head_dim_v: int, options: AttnOptions, optional: OptionalInputs
) -> int | None:
    """The mean sequence length from which the default table picks FA4 for these head dims,
    masks and features (where FA4 is eligible), or None where it never does. Measured with no
    optional input but the backward's ``grad_lse``."""
    left, right = options.window()
    min_length = FA4_DEFAULT.get(arch_major, {}).get((head_dim, head_dim_v))
    if (
        min_length is None
        or left >= 0
        or right not in (-1, 0)
        or (options.softcap != 0.0 and (head_dim, head_dim_v) not in FA4_SOFTCAP_DEFAULT.get(arch_major, ()))
        or not set(optional) <= {"grad_lse"}
    ):
        return None
    return min_length


def fa4_size_rule(tokens: Any, heads: Any, sequences: Any, min_length: int, cuda_graphs: bool) -> list[sympy.Basic]:
    """The table's conditions on the batch's sizes (ints or Inductor's symbolic sizes), all of
    which must hold for FA4: the mean length ``T_q / N >= min_length`` (as ``T_q >= min_length
    * N``: no division, and true for ``N = 0``) and, unless the graph is compiled for CUDA graphs
    (whose replays pay no host time), ``T_q * H_q >= FA4_MIN_ROWS``."""
    rules = [sympy.Ge(sympy.sympify(tokens), min_length * sympy.sympify(sequences))] if min_length > 0 else []
    if not cuda_graphs:
        rules.append(sympy.Ge(sympy.sympify(tokens) * sympy.sympify(heads), FA4_MIN_ROWS))
    return rules


def holds(rule: sympy.Basic | bool) -> bool:
    """``rule`` decided for the graph being compiled. On backed sizes with a guard: a later batch
    on the other side of the boundary recompiles once, and each side's graph is reused after
    that, so the choice follows the batch. From the size hints, with no guard, where a guard is
    not allowed: unbacked sizes (``mark_unbacked``), and sizes whose range the caller set
    (``mark_dynamic(min=, max=)``: Dynamo refuses a guard that narrows it)."""
    if isinstance(rule, bool):  # decided on plain ints
        return rule
    sizevars = V.graph.sizevars
    rule = sizevars.simplify(rule) if isinstance(rule, sympy.Expr) else rule.xreplace(sizevars.shape_env.replacements)
    if rule in (sympy.true, sympy.false):
        return bool(rule)
    if not _guardable(rule):
        return bool(rule.subs({symbol: size_hint(symbol) for symbol in rule.free_symbols}))
    return bool(sizevars.evaluate_expr(rule))


def _guardable(rule: sympy.Basic) -> bool:
    """Whether every size in ``rule`` is backed and has the default range ``[2, oo)`` or wider
    (none that the caller bounded)."""
    if free_unbacked_symbols(rule):
        return False
    ranges = V.graph.sizevars.shape_env.var_to_range
    for symbol in rule.free_symbols:
        bounds = ranges.get(symbol)
        if bounds is None or bounds.lower > 2 or bounds.upper not in (int_oo, sympy.oo):
            return False
    return True


def fa4_is_default(
    arch_major: int, head_dim: int, head_dim_v: int, options: AttnOptions, optional: OptionalInputs,
    mean_length: float | None = None,
    rows: int | None = None,
    cuda_graphs: bool = False,
) -> bool:
    """Whether the default table picks FA4 (where it is eligible) for a batch of concrete sizes:
    ``mean_length`` ``T_q / N`` and ``rows`` ``T_q * H_q`` (None: unknown, taken as large).
    ``cuda_graphs``: the graph is compiled for Inductor's CUDA graphs, where FA4's host time
    behind our op is not paid per call (no row floor)."""
    min_length = fa4_min_length(arch_major, head_dim, head_dim_v, options, optional)
    return (
        min_length is not None
        and (mean_length is None or mean_length >= min_length)
        and (rows is None or cuda_graphs or rows >= FA4_MIN_ROWS)
    )


def fitted_costs(
    arch_major: int, side: cost_model.Side, head_dims: tuple[int, int], options: AttnOptions, optional: OptionalInputs
) -> dict[str, cost_model.KernelCost] | None:
    """The template's and FA4's fitted costs for this call (:data:`~.costs.COSTS`), or None
    where the cost model was not fitted for it: windows and optional inputs (the backward's
    ``grad_lse`` aside) are not modeled."""
    left, right = options.window()
    if left >= 0 or right not in (-1, 0) or not set(optional) <= {"grad_lse"}:
        return None
    key = cost_model.CostKey(side, *head_dims, causal=right == 0, softcap=options.softcap != 0.0)
    costs = COSTS.get(arch_major, {}).get(key, {})
    return costs if TEMPLATE in costs and FA4 in costs else None


def fa4_by_default(
    arch_major: int, side: cost_model.Side, head_dims: tuple[int, int], options: AttnOptions, optional: OptionalInputs,
    sizes: dict[str, Any], cuda_graphs: bool, decide: Callable[[Any], bool] = bool,
) -> bool:
    """Whether the default choice gives a call FA4 (where FA4 can serve it): the cost model
    where fitted (FA4 predicted strictly faster than the template), else the default table.
    ``sizes``: ``tokens_q``, ``tokens_k``, ``sequences``, ``heads_q`` and the optional ``max_q``/
    ``max_k`` hints, which only the cost model reads (ints, or Inductor's symbolic sizes with
    ``decide=holds``: a guard per comparison read)."""
    costs = fitted_costs(arch_major, side, head_dims, options, optional)
    if costs is not None:
        causal = options.window()[1] == 0  # a right window of 0 is causal masking
        return cost_model.faster(costs[FA4], costs[TEMPLATE], sizes, causal, cuda_graphs, decide)
    min_length = fa4_min_length(arch_major, *head_dims, options, optional)
    if min_length is None:
        return False
    rules = fa4_size_rule(sizes["tokens_q"], sizes["heads_q"], sizes["sequences"], min_length, cuda_graphs)
    return all(decide(rule) for rule in rules)  # a guard per rule read; none after one fails


def kernels_for(
    requested: str, query: ir.IRNode, key: ir.IRNode, layout: BatchLayout, options: AttnOptions,
    optional: OptionalInputs, head_dims: tuple[int, int], backward: bool = False,
) -> tuple[str, ...]:
    """:func:`varlen_compile.eligibility.select` for an op call the template can serve (CUDA
    IR nodes; ``head_dims`` specialized); a ``backward`` under deterministic algorithms gets
    the template only. For ``"auto"``, the default choice (:func:`fa4_by_default`) is decided on
    the graph's sizes (:func:`holds`: guarded), and only where FA4 could run."""
    if requested == TEMPLATE:
        return (TEMPLATE,)
    call = call_of_nodes(query, key, options, optional, layout, head_dims)
    fa4_reason = eligibility.unsupported(FA4, call)
    max_autotune = bool(inductor_config.max_autotune)
    deterministic = backward and eligibility.deterministic_backward()
    fa4_default = False
    if requested == "auto" and not max_autotune and not deterministic and fa4_reason is None:
        tokens_q, heads_q = query.get_size()[:2]
        sequences = 0 if layout.cu_seq_q is None else layout.cu_seq_q.get_size()[0] - 1
        sizes = dict(tokens_q=tokens_q, tokens_k=key.get_size()[0], sequences=sequences, heads_q=heads_q,
                     max_q=layout.max_q, max_k=layout.max_k)
        fa4_default = fa4_by_default(
            call.arch()[0], "backward" if backward else "forward", head_dims, options, optional, sizes,
            bool(inductor_config.triton.cudagraphs), decide=holds,
        )
    return eligibility.select(
        requested,
        fa4_reason=fa4_reason,
        aten_reason=eligibility.unsupported(ATEN, call),
        max_autotune=max_autotune,
        deterministic=deterministic,
        fa4_default=fa4_default,
    )
