"""Which kernels compete for one op call in a compiled graph: our Triton template, FlashAttention
4 and aten flash attention (the last two as extern choices). What each kernel can serve is
``varlen_compile.eligibility``'s answer; the preference (``varlen_compile.config.kernel``) and
``max-autotune`` are handled by ``eligibility.select``; this module adds the default table used
for ``"auto"`` without ``max-autotune`` (docs/design.md §9).

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

The mean length (``T_q / N``) and the rows (``T_q * H_q``) are those of the batch the graph was
compiled for (its size hints under dynamic shapes): the choice is made once per compile.
"""

from __future__ import annotations

from torch._inductor import config as inductor_config
from torch._inductor import ir

from varlen_compile import eligibility
from varlen_compile.eligibility import ATEN, FA4, TEMPLATE
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

from .common import call_of_nodes, size_hint

__all__ = ["ATEN", "FA4", "FA4_DEFAULT", "FA4_MIN_ROWS", "TEMPLATE", "fa4_is_default", "kernels_for"]

FA4_DEFAULT: dict[int, dict[tuple[int, int], int]] = {9: {(64, 64): 512, (128, 128): 0}}
"""Arch major -> ``(D, D_v)`` -> the mean sequence length (tokens) from which FA4 is the
default (see the table above)."""

FA4_SOFTCAP_DEFAULT: dict[int, tuple[tuple[int, int], ...]] = {9: ((128, 128),)}
"""Arch major -> the ``(D, D_v)`` where FA4 is the default with a softcap too."""

FA4_MIN_ROWS = 1 << 17
"""``T_q * H_q`` from which FA4's host time behind our op is hidden by its GPU time."""


def fa4_is_default(
    arch_major: int, head_dim: int, head_dim_v: int, options: AttnOptions, optional: OptionalInputs,
    mean_length: float | None = None,
    rows: int | None = None,
    cuda_graphs: bool = False,
) -> bool:
    """Whether the default table picks FA4 (where it is eligible). ``mean_length``: ``T_q / N``
    and ``rows``: ``T_q * H_q`` of the compiled batch (None: unknown, taken as large).
    ``cuda_graphs``: the graph is compiled for Inductor's CUDA graphs, where FA4's host time
    behind our op is not paid per call (no row floor). Measured with no optional input but
    the backward's ``grad_lse``."""
    left, right = options.window()
    min_length = FA4_DEFAULT.get(arch_major, {}).get((head_dim, head_dim_v))
    return (
        min_length is not None
        and (mean_length is None or mean_length >= min_length)
        and (rows is None or cuda_graphs or rows >= FA4_MIN_ROWS)
        and left < 0
        and right in (-1, 0)
        and (options.softcap == 0.0 or (head_dim, head_dim_v) in FA4_SOFTCAP_DEFAULT.get(arch_major, ()))
        and set(optional) <= {"grad_lse"}
    )


def kernels_for(
    requested: str, query: ir.IRNode, key: ir.IRNode, layout: BatchLayout, options: AttnOptions,
    optional: OptionalInputs, head_dims: tuple[int, int], backward: bool = False,
) -> tuple[str, ...]:
    """:func:`varlen_compile.eligibility.select` for an op call the template can serve (CUDA
    IR nodes; ``head_dims`` specialized); a ``backward`` under deterministic algorithms gets
    the template only."""
    if requested == TEMPLATE:
        return (TEMPLATE,)
    call = call_of_nodes(query, key, options, optional, layout, head_dims)
    return eligibility.select(
        requested,
        fa4_reason=eligibility.unsupported(FA4, call),
        aten_reason=eligibility.unsupported(ATEN, call),
        max_autotune=bool(inductor_config.max_autotune),
        deterministic=backward and eligibility.deterministic_backward(),
        fa4_default=fa4_is_default(
            call.arch()[0], *head_dims, options, optional, *_batch_size_hints(query, layout),
            cuda_graphs=bool(inductor_config.triton.cudagraphs),
        ),
    )


def _batch_size_hints(query: ir.IRNode, layout: BatchLayout) -> tuple[float | None, int | None]:
    """``(T_q / N, T_q * H_q)`` from the size hints of the graph being compiled (an unbacked size
    takes Inductor's fallback hint; no mean without a sequence)."""
    tokens, heads = (size_hint(size) for size in query.get_size()[:2])
    sequences = 0 if layout.cu_seq_q is None else size_hint(layout.cu_seq_q.get_size()[0]) - 1
    return (tokens / sequences if sequences > 0 else None), tokens * heads
