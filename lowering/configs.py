"""Kernel configs: tile shapes, warps and pipeline depth per head dim, for both kernels.

Defaults are what the template uses without max-autotune (no benchmarking); ``*_autotune_configs``
is the small set max-autotune compares (plus aten flash as an extern choice). Numbers were
chosen on an H100 (see benchmarks/results/); the constraints each config must meet are in the
dataclass docstrings and checked in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from varlen_compile.params import AttnOptions, OptionalInputs

__all__ = [
    "BackwardConfig",
    "ForwardConfig",
    "SEARCH_WIDTH",
    "backward_autotune_configs",
    "backward_constexprs",
    "default_backward_config",
    "default_forward_config",
    "dot_precision",
    "fast_tanh",
    "forward_autotune_configs",
    "kernel_constexprs",
    "pack_gqa_group",
    "page_size_constexpr",
    "paged_config",
    "padded_head_dim",
]

# Sequences read per step of the tile -> sequence search (one vector load when N <= this).
SEARCH_WIDTH = 128


def padded_head_dim(head_dim: int) -> int:
    """``tl.dot`` needs power-of-two tiles of at least 16: D=96 runs as 128 with a mask."""
    return max(16, 1 << (head_dim - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots ('ieee'), never silent tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fast_tanh(softcap: float, dtype: torch.dtype, on_gpu: bool = True) -> bool:
    """Whether the softcap's tanh runs as ``tanh.approx.f32`` (one special-function op,
    relative error ~2^-11) instead of the exp2-and-divide formula: for fp16/bf16 inputs, whose
    own rounding is as coarse, on the GPU (the interpreter has no inline PTX). fp32 inputs keep
    the exact formula."""
    return softcap > 0 and on_gpu and dtype in (torch.float16, torch.bfloat16)


def kernel_constexprs(
    options: AttnOptions, optional: OptionalInputs, head_dim: int, head_dim_v: int, dtype: torch.dtype,
    on_gpu: bool = True,
) -> dict[str, Any]:
    """The forward kernel's constexprs (template and standalone) that follow from the attention
    options, the optional inputs present, the head dims and the dtype: the one place options
    become kernel constants. Every feature is a flag (``OptionalInputs.flags``: one per
    optional input of the registry) or a value that turns its code off when unused.

    The softmax scale is not among them: the standalone kernel takes it as an argument (no
    recompile per scale in eager mode), the templates add it as ``SCALE``. The softcap is
    (a model uses one value; 0.0 compiles the tanh away). ``on_gpu``: False when the kernels run
    in Triton's interpreter (CPU tensors), which cannot run inline PTX.
    """
    return {**_common_constexprs(options, head_dim, head_dim_v, dtype, on_gpu), **optional.flags("forward"),
            # Known from K's shape, not the inputs: the forward sets it with page_size_constexpr().
            "PAGE_SIZE": 0}


def _common_constexprs(
    options: AttnOptions, head_dim: int, head_dim_v: int, dtype: torch.dtype, on_gpu: bool
) -> dict[str, Any]:
    window_left, window_right = options.window()
    return {
        "WINDOW_LEFT": int(window_left),
        "WINDOW_RIGHT": int(window_right),
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": padded_head_dim(head_dim),
        "HEAD_DIM_V": head_dim_v,
        "HEAD_DIM_V_PAD": padded_head_dim(head_dim_v),
        "SEARCH_WIDTH": SEARCH_WIDTH,
        "DOT_PRECISION": dot_precision(dtype),
        "SOFTCAP": float(options.softcap),
        "FAST_TANH": fast_tanh(float(options.softcap), dtype, on_gpu),
    }


def paged_config(config: ForwardConfig, paged: bool) -> ForwardConfig:
    """``config`` for a paged forward: with K/V addresses that depend on a block-table read in
    the loop, Triton's software pipeliner splits ``num_stages - 1`` between the two loads, so
    K/V get ``2 * num_stages - 1`` to stay as deep as without paging (sm_90 TTGIR of the d128
    forward: K/V buffered 3 deep at 5 stages, 2 deep at 3 or 4, as at 3 without paging)."""
    if not paged or config.num_stages <= 1:
        return config
    return dataclasses.replace(config, num_stages=2 * config.num_stages - 1)


def page_size_constexpr(paged: bool, page_size: int | None) -> dict[str, int]:
    """The forward's ``PAGE_SIZE`` constexpr: the page size of paged K/V when it is known at
    compile time (``page_size``; None when it is not, e.g. symbolic under dynamic shapes: never
    a guard), else 0. The kernels then read one block-table entry per key tile (a multiple of
    BLOCK_N) or compute each key's page without a division (a divisor of BLOCK_N); see
    ``varlen_kv_page``."""
    return {"PAGE_SIZE": page_size if paged and page_size is not None and page_size > 0 else 0}


def backward_constexprs(
    options: AttnOptions, optional: OptionalInputs, head_dim: int, head_dim_v: int, dtype: torch.dtype,
    on_gpu: bool = True,
) -> dict[str, Any]:
    """:func:`kernel_constexprs` of the backward kernels: the backward's flags
    (``HAS_GRAD_LSE`` among them, no paging: paged K/V has no backward). The tile sizes are
    added per call."""
    return {**_common_constexprs(options, head_dim, head_dim_v, dtype, on_gpu), **optional.flags("backward")}


def _is_pow2(x: int) -> bool:
    return x >= 16 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Forward tiling.

    ``block_m``: query rows per program; ``block_n``: key rows per inner step. Both powers of two
    >= 16 (``tl.dot`` tiles). ``num_warps`` in {4, 8}; ``num_stages`` >= 1 (software pipelining
    depth of the key/value loads). ``pack_gqa`` (on by default; the template and the standalone
    launcher): a program's ``block_m`` rows are ``block_m // G`` positions in all ``G`` query
    heads of a GQA group, so each K/V tile is loaded once for the group (see
    :func:`pack_gqa_group` for when it applies). H200, bf16, D=128, forward: 0.94x the time of
    the unpacked kernel at G=4 causal, 0.97x full, 0.86x at G=8 causal, 0.29x for decode-like
    batches of 1-16 queries per sequence (``python -m benchmarks ab gqa-pack``).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool = True

    def __post_init__(self) -> None:
        if not (_is_pow2(self.block_m) and _is_pow2(self.block_n)):
            raise ValueError(f"block sizes must be powers of two >= 16: {self}")


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Backward tiling (one launch, two kinds of programs).

    dK/dV programs own ``block_n1`` key rows and step over ``block_m1`` query rows; dQ programs
    own ``block_m2`` query rows and step over ``block_n2`` key rows. All powers of two >= 16.
    """

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        blocks = (self.block_m1, self.block_n1, self.block_m2, self.block_n2)
        if not all(_is_pow2(b) for b in blocks):
            raise ValueError(f"block sizes must be powers of two >= 16: {self}")


def pack_gqa_group(config: ForwardConfig, gqa_group: int) -> int:
    """The forward kernel's ``PACK_GQA``: query heads one program packs. ``gqa_group`` (query
    heads per kv head) when ``config.pack_gqa`` is set and the group is a power of two >= 2 that
    leaves at least 16 positions per tile (``block_m // gqa_group >= 16``); otherwise 1, the
    unpacked kernel (one query head per program). Every feature (window, softcap, sink, ALiBi,
    seqused_k, paged K/V) works packed: the masks, the sink and the ALiBi slope are per row."""
    group = int(gqa_group)
    packs = config.pack_gqa and group >= 2 and group & (group - 1) == 0 and config.block_m // group >= 16
    return group if packs else 1


def default_forward_config(head_dim: int, dtype: torch.dtype) -> ForwardConfig:
    padded = padded_head_dim(head_dim)
    if dtype == torch.float32:
        return ForwardConfig(64, 32, 4, 2) if padded <= 128 else ForwardConfig(32, 32, 4, 1)
    if padded <= 64:
        # H100, bf16, headline batch: 1.44x aten flash vs 1.25x for (128, 64, 4, 3);
        # causal 1.78x vs 1.45x (``python -m benchmarks sweep``).
        return ForwardConfig(64, 64, 4, 3)
    if padded <= 128:
        # H100, bf16, 16 x <=4096 tokens: 1.33x aten flash; 4 warps spill (0.83x).
        return ForwardConfig(128, 64, 8, 3)
    return ForwardConfig(64, 64, 4, 2)


def forward_autotune_configs(head_dim: int, dtype: torch.dtype) -> list[ForwardConfig]:
    default = default_forward_config(head_dim, dtype)
    padded = padded_head_dim(head_dim)
    if dtype == torch.float32:
        candidates = [ForwardConfig(32, 32, 4, 2), ForwardConfig(64, 32, 4, 1)]
    elif padded <= 64:
        candidates = [ForwardConfig(128, 64, 8, 3), ForwardConfig(64, 128, 4, 3), ForwardConfig(128, 64, 4, 3)]
    elif padded <= 128:
        candidates = [ForwardConfig(64, 64, 4, 3), ForwardConfig(128, 64, 8, 4), ForwardConfig(128, 128, 8, 3)]
    else:
        candidates = [ForwardConfig(64, 32, 4, 2), ForwardConfig(128, 32, 8, 2)]
    return [default] + [c for c in candidates if c != default]


def default_backward_config(head_dim: int, dtype: torch.dtype, gqa_group: int = 1) -> BackwardConfig:
    """``gqa_group``: query heads per kv head. A dK/dV program loops over its whole group, so
    grouped attention favours smaller key tiles (more programs)."""
    padded = padded_head_dim(head_dim)
    if dtype == torch.float32:
        return BackwardConfig(32, 32, 32, 32, 4, 1)
    if padded <= 64:
        # H100, bf16, headline batch: fwd+bwd 1.87x aten flash (causal 1.89x).
        return BackwardConfig(32, 64, 64, 32, 4, 3)
    if padded <= 128:
        if gqa_group > 1:
            # H100, bf16, 32 q / 8 kv heads, causal: 1.25x aten vs 1.08x for (64, 128, 128, 64).
            return BackwardConfig(32, 64, 64, 32, 4, 3)
        # H100, bf16, causal fwd+bwd vs aten: 4 x 16384 tokens 1.29x, one 8192 + 64 x 64
        # 1.48x, 16 x <=4096 1.29x; the same tiles with 2 stages are 0.97x-1.13x.
        return BackwardConfig(64, 128, 128, 64, 8, 3)
    return BackwardConfig(16, 64, 64, 16, 4, 1)


def backward_autotune_configs(head_dim: int, dtype: torch.dtype, gqa_group: int = 1) -> list[BackwardConfig]:
    default = default_backward_config(head_dim, dtype, gqa_group)
    padded = padded_head_dim(head_dim)
    if dtype == torch.float32:
        candidates = [BackwardConfig(16, 32, 32, 16, 4, 1)]
    elif padded <= 64:
        candidates = [BackwardConfig(32, 128, 128, 32, 4, 3), BackwardConfig(64, 64, 64, 64, 4, 2)]
    elif padded <= 128:
        candidates = [BackwardConfig(64, 128, 128, 64, 8, 3), BackwardConfig(32, 64, 64, 32, 4, 3), BackwardConfig(32, 128, 128, 32, 8, 3)]
    else:
        candidates = [BackwardConfig(16, 64, 64, 16, 4, 1)]
    return [default] + [c for c in candidates if c != default]
