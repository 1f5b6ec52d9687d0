"""Which kernels compete for one op call in a compiled graph (DESIGN decision 5): our Triton
template, FlashAttention 4 and aten flash attention (the last two as extern choices).

The op's ``kernel`` argument (``varlen_compile.config.kernel`` when the call was traced) decides:

- ``"triton"``: the template.
- ``"fa4"`` / ``"aten"``: that kernel where it can serve the call, else the template (logged
  once at INFO: a preference is never an error, and the template serves every CUDA call).
- ``"auto"`` under ``max-autotune``: the template configs and every kernel that can serve the
  call; Inductor times them on the GPU and keeps the fastest.
- ``"auto"`` otherwise: the default table below.

What a kernel can serve (never the user's choice) decides eligibility:
``varlen_compile._fa4.unsupported`` for FA4 (sm90/sm100, fp16/bf16, its head dims, ``D_v != D``
only as 192/128 and not with GQA on sm90, no ALiBi, no paged K/V), :func:`aten_unsupported` for aten flash (needs ``max_q``/``max_k`` as ints, none
of the features aten does not take). Neither runs in an AOTInductor package or a
``cpp_wrapper`` graph: both are Python kernels, so those graphs take the template.

Default table, without ``max-autotune`` (16-bit dtypes): FA4 where it won, the template
elsewhere. Measured on the H200 (torch 2.11, Triton 3.6, flash-attn-4 4.0.0b36, bf16): issue
#16's table, ``benchmarks/bench_choice.py`` and ``benchmarks/bench.py`` (session 6). At head dim
128, FA4 beat the template in forward and forward+backward on every case (causal or not, GQA 1
and 4, 8 to 128 sequences, 4k to 64k tokens). At head dim 64 it depends on sequence length: with
16 sequences <= 4096 tokens FA4 won (1.20x forward, 1.41x forward+backward), but with 128
sequences <= 512 tokens (mean 279) the template won (1.66x forward, 1.08x forward+backward
against FA4 called directly), so at 64 FA4 is the default from a mean length of 512 tokens.
With a softcap (30, causal, head dim 128, 16 sequences <= 4096, GQA 4) FA4 won too (1.45x
forward, 1.54x forward+backward: ``results/h200-choice-quick.md``); softcap at other head dims,
sinks and ``seqused_k`` are not measured.

FA4 behind our op also costs host time that the template does not: its Python interface runs on
every call, and the backward runs it on autograd's CUDA device thread, where it is slower
(``benchmarks/profile_step.py fa4-host``, H200: a compiled forward+backward step of a tiny batch takes
1.10 ms of host time with FA4, 0.29 ms with the template). Small batches are bound by it: with
8 sequences of mean 768 tokens and 16 heads (``T_q * H_q`` = 98k rows) FA4 behind our op ran at
0.45x (forward) and 0.42x (forward+backward) of FA4 called directly, while at 196k rows and
above it matched or beat it (0.99x to 1.07x). So FA4 is the default only from
``T_q * H_q >= 2**17`` rows, unless the graph runs in Inductor's CUDA graphs
(``mode="reduce-overhead"``, ``triton.cudagraphs``): replays cost no per-kernel host time, and
in GPU time FA4 wins those small batches too (session 10, ``results/h200-s10-cudagraph.md``,
``do_bench_cudagraph``: at 98k rows FA4 direct 0.084 ms forward vs the template's 0.097 on 8
sequences of mean 768 at 16 x 64, 0.269 vs 0.367 forward+backward; causal 0.062 vs 0.064 and
0.193 vs 0.234).

=====  ==================  ==================================  ===================  ========
arch   (D, D_v)            masking / features                  mean sequence length default
=====  ==================  ==================================  ===================  ========
sm90   (128, 128)          none or causal, softcap or not;     any                  FA4 [*]
                           no sink, ALiBi, seqused_k
sm90   (64, 64)            none or causal; no softcap, sink,   >= 512 tokens        FA4 [*]
                           ALiBi, seqused_k
other  any                 any                                 any                  template
=====  ==================  ==================================  ===================  ========

[*] from ``T_q * H_q >= 2**17`` rows (:data:`FA4_MIN_ROWS`); below that, the template, except
    in graphs compiled for CUDA graphs (no row floor there).

The mean length (``T_q / N``) and the rows (``T_q * H_q``) are those of the batch the graph was
compiled for (its size hints under dynamic shapes): the choice is made once per compile.
"other" is not measured yet (sm100, other head dims, windows, softcap/sinks): it keeps the
template until ``benchmarks/bench_choice.py`` measures it; ``max-autotune`` measures it per
call.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.virtualized import V

from varlen_compile import _fa4, backends
from varlen_compile.config import check_kernel_name
from varlen_compile.params import AttnOptions, BatchLayout, uses_score_features

from .common import size_hint

__all__ = ["FA4_DEFAULT", "FA4_MIN_ROWS", "aten_unsupported", "fa4_is_default", "kernels_for", "select"]

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()

TEMPLATE, FA4, ATEN = "triton", "fa4", "aten"

FA4_DEFAULT: dict[int, dict[tuple[int, int], int]] = {9: {(64, 64): 512, (128, 128): 0}}
"""Arch major -> ``(D, D_v)`` -> the mean sequence length (tokens) from which FA4 is the
default (see the table above)."""

FA4_SOFTCAP_DEFAULT: dict[int, tuple[tuple[int, int], ...]] = {9: ((128, 128),)}
"""Arch major -> the ``(D, D_v)`` where FA4 is the default with a softcap too."""

FA4_MIN_ROWS = 1 << 17
"""``T_q * H_q`` from which FA4's host time behind our op is hidden by its GPU time."""


def fa4_is_default(
    arch_major: int, head_dim: int, head_dim_v: int, layout: BatchLayout, options: AttnOptions,
    mean_length: float | None = None,
    rows: int | None = None,
    cuda_graphs: bool = False,
) -> bool:
    """Whether the default table picks FA4 (where it is eligible). ``mean_length``: ``T_q / N``
    and ``rows``: ``T_q * H_q`` of the compiled batch (None: unknown, taken as large).
    ``cuda_graphs``: the graph is compiled for Inductor's CUDA graphs, where FA4's host time
    behind our op is not paid per call (no row floor)."""
    left, right = options.window()
    min_length = FA4_DEFAULT.get(arch_major, {}).get((head_dim, head_dim_v))
    return (
        min_length is not None
        and (mean_length is None or mean_length >= min_length)
        and (rows is None or cuda_graphs or rows >= FA4_MIN_ROWS)
        and left < 0
        and right in (-1, 0)
        and options.sink is None
        and options.alibi_slopes is None
        and (options.softcap == 0.0 or (head_dim, head_dim_v) in FA4_SOFTCAP_DEFAULT.get(arch_major, ()))
        and layout.seqused_k is None
    )


def select(
    requested: str, *, fa4_reason: str | None, aten_reason: str | None, max_autotune: bool, fa4_default: bool
) -> tuple[str, ...]:
    """The kernels that compete, from the preference and what can serve the call
    (``*_reason``: None when that kernel can, else why not). Always at least one; the template
    whenever nothing else may run."""
    check_kernel_name(requested)
    if requested == TEMPLATE:
        return (TEMPLATE,)
    if requested in (FA4, ATEN):
        reason = fa4_reason if requested == FA4 else aten_reason
        if reason is None:
            return (requested,)
        _log_once(requested, reason)
        return (TEMPLATE,)
    if max_autotune:
        return (TEMPLATE,) + tuple(name for name, reason in ((FA4, fa4_reason), (ATEN, aten_reason)) if reason is None)
    return (FA4,) if fa4_reason is None and fa4_default else (TEMPLATE,)


def _log_once(requested: str, reason: str) -> None:
    if (requested, reason) not in _logged:
        _logged.add((requested, reason))
        log.info("varlen_compile: kernel=%r cannot serve a call (%s); our Triton template runs it", requested, reason)


def aten_unsupported(
    query: ir.IRNode, head_dim: int, head_dim_v: int, layout: BatchLayout, options: AttnOptions,
    grad_lse: bool = False,
) -> str | None:
    """None when aten flash can run this call inside a compiled graph, else why not."""
    if layout.max_q is None or layout.max_k is None:
        return "aten flash needs max_q/max_k as ints (without them it would read cu_seq: a sync)"
    if grad_lse:
        return "aten flash takes no gradient into lse"
    if head_dim_v != head_dim or uses_score_features(options) or layout.seqused_k is not None or layout.paged:
        return "aten flash serves none of D_v != D, softcap, sinks, ALiBi, seqused_k, paged K/V"
    if query.get_dtype() not in backends.ATEN_FLASH_DTYPES:
        return f"aten flash serves float16 and bfloat16 (dtype: {query.get_dtype()})"
    if head_dim % 8 or head_dim > backends.ATEN_FLASH_MAX_HEAD_DIM:
        return f"aten flash serves head dims that are multiples of 8 up to 256 (head dim: {head_dim})"
    if torch.cuda.get_device_capability(query.get_device()) < (8, 0):
        return "aten flash needs sm80 or newer"
    return None


def kernels_for(
    requested: str, query: ir.IRNode, heads_kv: Any, head_dim: int, head_dim_v: int, layout: BatchLayout,
    options: AttnOptions, grad_lse: bool = False,
) -> tuple[str, ...]:
    """:func:`select` for an op call the template can serve (a CUDA tensor ``query``; ``heads_kv``
    the key/value head count, possibly symbolic)."""
    if requested == TEMPLATE:
        return (TEMPLATE,)
    device = query.get_device()
    python_kernel = (
        "an AOTInductor package or cpp_wrapper graph cannot call a Python kernel" if V.graph.cpp_wrapper else None
    )
    same_heads = V.graph.sizevars.statically_known_equals(query.get_size()[1], heads_kv)
    fa4_reason = python_kernel or _fa4.unsupported(
        device, query.get_dtype(), head_dim, head_dim_v, layout, options, same_heads=same_heads, grad_lse=grad_lse
    )
    aten_reason = python_kernel or aten_unsupported(query, head_dim, head_dim_v, layout, options, grad_lse)
    return select(
        requested,
        fa4_reason=fa4_reason,
        aten_reason=aten_reason,
        max_autotune=bool(inductor_config.max_autotune),
        fa4_default=fa4_is_default(
            torch.cuda.get_device_capability(device)[0], head_dim, head_dim_v, layout, options,
            *_batch_size_hints(query, layout), cuda_graphs=bool(inductor_config.triton.cudagraphs),
        ),
    )


def _batch_size_hints(query: ir.IRNode, layout: BatchLayout) -> tuple[float | None, int | None]:
    """``(T_q / N, T_q * H_q)`` from the size hints of the graph being compiled (an unbacked size
    takes Inductor's fallback hint; no mean without a sequence)."""
    tokens, heads = (size_hint(size) for size in query.get_size()[:2])
    sequences = 0 if layout.cu_seq_q is None else size_hint(layout.cu_seq_q.get_size()[0]) - 1
    return (tokens / sequences if sequences > 0 else None), tokens * heads
