"""The benchmarks' shared harness: cases, the input factory, the implementations, timing, output.

Every command imports this module; nothing here touches a GPU at import time. Every use of
``varlen_compile``'s internals (launcher, configs, parameter objects, kernel choice) goes through
:mod:`benchmarks.internals`.

Timing: medians of ``triton.testing.do_bench`` after warm-up (or of ``do_bench_cudagraph``:
CUDA-graph replays, GPU time without host overhead); :func:`interleaved` times several
functions in rounds so that drift in host time hits all alike; :func:`cuda_event_ms` times a
fixed number of steps (the same count on every rank of a distributed run). TFLOP/s count the
attended (query, key) pairs only (causal counts half), the same for every implementation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench, do_bench_cudagraph

from varlen_compile import config, varlen_attn

from . import internals

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("benchmarks")

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One packed bf16 batch and the attention asked of it.

    ``lengths``: the key (and query) length of each sequence; ``query_lengths``: the queries'
    when they differ (each sequence's last positions, as in decoding). ``head_dim_v``: 0 means
    ``head_dim``. ``seqused_k_trim``: with it, sequence ``i`` uses only its first
    ``max(lengths[i] - trim, 0)`` keys (``seqused_k``). ``page_size`` > 0: K/V in pages of that
    size scattered over a pool (``ordered_pages``: each sequence's pages adjacent), forward only.
    ``hints``: our op gets the ``max_q``/``max_k`` ints, as ``torch.nn.attention.varlen`` callers
    pass them (the default choice's cost model reads them).
    """

    name: str
    lengths: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    head_dim_v: int = 0
    query_lengths: tuple[int, ...] | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sink: bool = False
    alibi: bool = False
    seqused_k_trim: int | None = None
    page_size: int = 0
    ordered_pages: bool = False
    hints: bool = False

    @property
    def value_dim(self) -> int:
        return self.head_dim_v or self.head_dim

    @property
    def q_lengths(self) -> tuple[int, ...]:
        return self.query_lengths or self.lengths

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def total_q(self) -> int:
        return sum(self.q_lengths)

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv


def random_lengths(count: int, upper: int, seed: int, lower: int = 1) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(lower, upper + 1, (count,), generator=generator).tolist())


def _random_multiples(count: int, upper: int, seed: int, step: int = 64) -> tuple[int, ...]:
    return tuple(step * n for n in random_lengths(count, upper // step, seed))


def _registry(cases: Iterable[Case]) -> dict[str, Case]:
    return {case.name: case for case in cases}


def _standard_cases() -> dict[str, Case]:
    headline = _random_multiples(8, 2048, seed=0)
    d128 = _random_multiples(16, 4096, seed=1)
    return _registry([
        Case("headline", headline, 16, 16, 64, False),
        Case("headline-causal", headline, 16, 16, 64, True),
        Case("d128", d128, 16, 16, 128, False),
        Case("d128-causal", d128, 16, 16, 128, True),
        Case("gqa-causal", _random_multiples(8, 4096, seed=2), 32, 8, 128, True),
        Case("many-short-causal", random_lengths(128, 512, seed=3), 16, 16, 64, True),
        Case("skewed-causal", (8192,) + (64,) * 64, 16, 16, 128, True),
        Case("long-causal", (16384,) * 4, 16, 16, 128, True),
    ])


def _feature_cases() -> dict[str, Case]:
    """The batches of the feature costs and the standalone A/Bs: sequences of ``max / 2 .. max``
    tokens, causal and full."""
    d128 = random_lengths(16, 4096, seed=0, lower=2048)
    d64 = random_lengths(8, 2048, seed=0, lower=1024)
    gqa = random_lengths(8, 4096, seed=0, lower=2048)
    gqa_g8 = random_lengths(16, 2048, seed=0, lower=1024)
    decode_keys = random_lengths(64, 4096, seed=0, lower=2048)
    return _registry([
        Case("feat-d128-causal", d128, 16, 16, 128, True),
        Case("feat-d128", d128, 16, 16, 128, False),
        Case("feat-d64-causal", d64, 16, 16, 64, True),
        Case("feat-d64", d64, 16, 16, 64, False),
        Case("feat-mla-causal", d128, 16, 16, 192, True, head_dim_v=128),
        Case("feat-gqa4-causal", gqa, 32, 8, 128, True),
        Case("feat-gqa4", gqa, 32, 8, 128, False),
        Case("feat-gqa8-causal", gqa_g8, 16, 2, 128, True),
        Case("feat-gqa4-decode", decode_keys, 32, 8, 128, True,
             query_lengths=random_lengths(64, 16, seed=1)),
    ])


def _choice_cases() -> dict[str, Case]:
    """The grid behind the kernel choice's default table: 16 sequences <= 4096 tokens, 16 query
    heads, 4 kv heads, per head dims, masking and feature."""
    lengths = _random_multiples(16, 4096, seed=0)

    def case(name: str, head_dim: int, causal: bool, **features) -> Case:
        return Case(name, lengths, 16, 4, head_dim, causal, **features)

    return _registry([
        case("d64-full", 64, False),
        case("d64-causal", 64, True),
        case("d96-causal", 96, True),
        case("d128-full", 128, False),
        case("d128-causal", 128, True),
        case("d192v128-causal", 192, True, head_dim_v=128),
        case("d256-causal", 256, True),
        case("d128-window1024-causal", 128, True, window=(1024, 0)),
        case("d128-softcap-causal", 128, True, softcap=30.0),
        case("d64-sink-window128", 64, False, window=(128, 0), sink=True),
        case("d128-seqused-causal", 128, True, seqused_k_trim=32),
    ])


CASES = _standard_cases()
"""The standard cases: what ``run``, ``model``, ``profile`` and ``sweep`` measure."""
FEATURE_CASES = _feature_cases()
"""The batches of ``features`` and ``ab``."""
CHOICE_CASES = _choice_cases()
"""The grid of ``choice``."""


def pick(registry: dict[str, Case], names: str | Iterable[str], option: str = "--cases") -> list[Case]:
    """The cases named (comma-separated or a list); a clear error for an unknown name."""
    wanted = names.split(",") if isinstance(names, str) else list(names)
    unknown = [name for name in wanted if name not in registry]
    if unknown:
        raise SystemExit(f"{option}: unknown case(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    return [registry[name] for name in wanted]


def attended_pairs(case: Case) -> int:
    """(query, key) pairs attended (windows are not counted: causal or full only)."""
    if not case.causal:
        return sum(n_q * n_k for n_q, n_k in zip(case.q_lengths, case.lengths))
    return sum(n_q * (n_k - n_q) + n_q * (n_q + 1) // 2 for n_q, n_k in zip(case.q_lengths, case.lengths))


def forward_flops(case: Case) -> float:
    return 2.0 * (case.head_dim + case.value_dim) * case.heads_q * attended_pairs(case)


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """Random bf16 leaves ``q, k, v`` (``requires_grad``), an output gradient, the offsets, and
    the tensors of the case's features (``features``: ``varlen_attn`` keyword arguments)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int
    features: dict[str, torch.Tensor]
    key_pages: torch.Tensor | None = None
    value_pages: torch.Tensor | None = None

    @property
    def cu_seq(self) -> torch.Tensor:
        """The offsets when queries and keys share them (every case but decode-like ones)."""
        return self.cu_seq_k

    def detached(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q.detach(), self.k.detach(), self.v.detach()


def cu_seq_of(lengths: Iterable[int], device: str | torch.device = "cuda") -> torch.Tensor:
    """Sequence lengths -> int32 cumulative offsets ``(N + 1,)``."""
    return torch.tensor((0, *lengths), device=device).cumsum(0).to(torch.int32)


def make_inputs(case: Case, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Inputs:
    """The case's batch on ``device``, from a fixed seed."""
    torch.manual_seed(0)

    def randn(tokens: int, heads: int, dim: int) -> torch.Tensor:
        return torch.randn(tokens, heads, dim, device=device, dtype=dtype)

    d, d_v = case.head_dim, case.value_dim
    x = Inputs(
        randn(case.total_q, case.heads_q, d).requires_grad_(), randn(case.total, case.heads_kv, d).requires_grad_(),
        randn(case.total, case.heads_kv, d_v).requires_grad_(), randn(case.total_q, case.heads_q, d_v),
        cu_seq_of(case.q_lengths, device), cu_seq_of(case.lengths, device), max(case.q_lengths), max(case.lengths), {},
    )
    if case.sink:
        x.features["sink"] = torch.randn(case.heads_q, device=device, requires_grad=True)
    if case.alibi:
        x.features["alibi_slopes"] = torch.rand(case.heads_q, device=device) / 8
    if case.seqused_k_trim is not None:
        used = [max(n - case.seqused_k_trim, 0) for n in case.lengths]
        x.features["seqused_k"] = torch.tensor(used, dtype=torch.int32, device=device)
    if case.page_size:
        x.key_pages, x.value_pages, x.features["block_table"] = paged_kv(x.k, x.v, case.lengths, case.page_size,
                                                                         case.ordered_pages)
        x.features.setdefault("seqused_k", torch.tensor(case.lengths, dtype=torch.int32, device=device))
    return x


def paged_kv(k: torch.Tensor, v: torch.Tensor, lengths: Iterable[int], page_size: int, ordered: bool = False):
    """``(key_pages, value_pages, block_table)``: the same keys in pages of ``page_size`` rows
    scattered over a pool (``ordered``: in order, each sequence's pages adjacent, as a
    contiguous layout would place them)."""
    lengths = list(lengths)
    max_pages = -(-max(lengths) // page_size)
    slots = len(lengths) * max_pages
    order = torch.arange(slots) if ordered else torch.randperm(slots)
    block_table = order.view(len(lengths), max_pages).to(torch.int32)
    heads = k.shape[1]
    key_pages = k.new_zeros(slots, page_size, heads, k.shape[2], requires_grad=False)
    value_pages = v.new_zeros(slots, page_size, heads, v.shape[2], requires_grad=False)
    start = 0
    for seq, length in enumerate(lengths):
        for page_index in range(-(-length // page_size)):
            first = start + page_index * page_size
            count = min(page_size, start + length - first)
            page = int(block_table[seq, page_index])
            key_pages[page, :count] = k.detach()[first:first + count]
            value_pages[page, :count] = v.detach()[first:first + count]
        start += length
    return key_pages, value_pages, block_table.to(k.device)


def varlen_kwargs(case: Case, x: Inputs) -> dict:
    """``varlen_attn``'s keyword arguments for the case (besides q, k, v and the offsets)."""
    kwargs: dict = {"is_causal": case.causal, "enable_gqa": case.gqa, **x.features}
    if case.window != (-1, -1):
        kwargs["window_size"] = case.window
    if case.softcap:
        kwargs["softcap"] = case.softcap
    if case.hints:
        kwargs.update(max_q=x.max_q, max_k=x.max_k)
    return kwargs


# ----------------------------------------------------------------------------- implementations


@dataclasses.dataclass
class Built:
    """An implementation ready to time: ``attention(q, k, v)`` (of the case's ``Inputs``), the
    leaves its gradients go to, and notes for the result row (e.g. a mask's build time)."""

    attention: Attention
    leaves: list[torch.Tensor]
    notes: dict = dataclasses.field(default_factory=dict)


def build_ours(case: Case, x: Inputs, **compile_kwargs) -> Built:
    """``torch.compile(varlen_attn, fullgraph=True)`` on the case's fixed offsets (the kernel
    is whatever ``varlen_compile.config.kernel`` says while it compiles)."""
    kwargs = varlen_kwargs(case, x)
    cu_seq_k = None if case.page_size else x.cu_seq_k
    compiled = torch.compile(
        lambda q, k, v: varlen_attn(q, k, v, x.cu_seq_q, cu_seq_k, **kwargs), fullgraph=True, **compile_kwargs
    )
    if case.page_size:  # the same keys from the pool: forward only
        return Built(lambda q, k, v: compiled(q, x.key_pages, x.value_pages), [x.q])
    return Built(compiled, [x.q, x.k, x.v, *(t for t in x.features.values() if t.requires_grad)])


def fa4_direct(case: Case, x: Inputs, hint: bool = True) -> Attention:
    """FlashAttention 4's ``flash_attn_varlen_func`` (its own autograd), uncompiled: with the
    max_seqlen ints (``hint``) or None."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    max_q, max_k = (x.max_q, x.max_k) if hint else (None, None)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=x.cu_seq_q, cu_seqlens_k=x.cu_seq_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            causal=case.causal, softcap=case.softcap,
        )[0]

    return attention


def autograd_attention(forward: Callable, backward: Callable) -> Attention:
    """An autograd function of q, k, v from ``forward(q, k, v) -> (out, lse)`` and
    ``backward(grad_out, q, k, v, out, lse) -> (dq, dk, dv)`` (eager kernels, uncompiled)."""

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = forward(q, k, v)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            return backward(grad_out, *ctx.saved_tensors)

    return Attention.apply


def build_ours_eager(case: Case, x: Inputs) -> Built:
    """Our standalone Triton kernels (the templates' @triton.jit math, no Inductor)."""
    return Built(autograd_attention(*internals.standalone_functions(case, x)), [x.q, x.k, x.v])


def build_aten(case: Case, x: Inputs) -> Built:
    """aten flash attention (FlashAttention 2, what torch.nn.attention.varlen runs) called
    directly, forward and backward; GQA is native there."""
    return Built(autograd_attention(*internals.aten_functions(case, x)), [x.q, x.k, x.v])


def build_fa4(case: Case, x: Inputs) -> Built:
    return Built(fa4_direct(case, x), [x.q, x.k, x.v])


def build_sdpa(case: Case, x: Inputs) -> Built:
    """``scaled_dot_product_attention`` on a padded batch with a boolean mask; times the padded
    attention only, on inputs padded once."""
    device, batch, max_len = x.q.device, len(case.lengths), x.max_k
    lengths = torch.tensor(case.lengths, device=device)
    valid = torch.arange(max_len, device=device)[None, :] < lengths[:, None]  # (B, L)
    mask = valid[:, None, None, :].expand(batch, 1, max_len, max_len)
    if case.causal:
        mask = mask & torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
    batch_index = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
    token_index = torch.cat([torch.arange(n, device=device) for n in case.lengths])

    def pad(t: torch.Tensor) -> torch.Tensor:
        padded = t.new_zeros(batch, max_len, t.shape[1], t.shape[2])
        padded[batch_index, token_index] = t
        return padded.transpose(1, 2)  # (B, H, L, D)

    padded = [pad(t.detach()).requires_grad_() for t in (x.q, x.k, x.v)]
    return Built(lambda q, k, v: F.scaled_dot_product_attention(*padded, attn_mask=mask, enable_gqa=case.gqa), padded)


def build_flex(case: Case, x: Inputs) -> Built:
    """Compiled ``flex_attention`` with a document block mask built once, outside the timing
    (its build time goes to the row's ``mask_build_ms``)."""
    device = x.q.device
    document = torch.repeat_interleave(torch.arange(len(case.lengths), device=device),
                                       torch.tensor(case.lengths, device=device))

    def document_mask(b, h, q_idx, kv_idx):
        same = document[q_idx] == document[kv_idx]
        return same & (q_idx >= kv_idx) if case.causal else same

    torch.cuda.synchronize()
    start = time.perf_counter()
    block_mask = create_block_mask(document_mask, 1, 1, case.total, case.total, device=device)
    torch.cuda.synchronize()
    build_ms = (time.perf_counter() - start) * 1e3
    compiled = torch.compile(flex_attention, fullgraph=True)
    heads_first = [t.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for t in (x.q, x.k, x.v)]
    return Built(lambda q, k, v: compiled(*heads_first, block_mask=block_mask, enable_gqa=case.gqa), heads_first,
                 {"mask_build_ms": build_ms})


def build_floor(case: Case, x: Inputs) -> Built:
    """Not attention: ``torch.compile`` of pointwise ops on the same q, k, v, forward and
    backward: the per-call cost any compiled one-op graph pays (Dynamo guards, AOTAutograd
    wrappers, the autograd engine, a launch each way)."""
    group = case.heads_q // case.heads_kv
    compiled = torch.compile(lambda q, k, v: q * 2.0 + (k + v).repeat_interleave(group, dim=1), fullgraph=True)
    return Built(compiled, [x.q, x.k, x.v])


IMPLEMENTATIONS: dict[str, Callable[[Case, Inputs], Built]] = {
    "ours": build_ours,
    "ours-auto": build_ours,
    "ours-fa4": build_ours,
    "fa4": build_fa4,
    "ours-eager": build_ours_eager,
    "aten": build_aten,
    "sdpa": build_sdpa,
    "flex": build_flex,
    "floor": build_floor,
}
"""``ours``: our Inductor templates (``config.kernel="triton"``); ``ours-auto``: the default
switch (the lowering's default table picks the kernel); ``ours-fa4``: FA4 behind our op
(``kernel="fa4"``); the others as their builders say."""

KERNEL_SWITCH = {"ours": "triton", "ours-auto": "auto", "ours-fa4": "fa4"}
"""The ``varlen_compile.config.kernel`` each implementation compiles and runs under (others: auto)."""


def kernel_switch(impl: str, kernel: str | None = None):
    """``config.patch`` of ``kernel``, by default the implementation's kernel switch."""
    return config.patch(kernel=kernel or KERNEL_SWITCH.get(impl, "auto"))


FEATURE_IMPLEMENTATIONS = ("ours", "ours-auto", "ours-fa4")
"""The implementations that take every feature of a :class:`Case`; the others measure plain
causal or full attention."""


def features_of(case: Case) -> list[str]:
    """The case's features beyond plain causal or full attention (the max hints are how our op
    is called, not a feature: every implementation serves a hinted case)."""
    defaults = Case(case.name, case.lengths, case.heads_q, case.heads_kv, case.head_dim, case.causal,
                    head_dim_v=case.head_dim_v, hints=case.hints)
    return [field.name for field in dataclasses.fields(Case) if getattr(case, field.name) != getattr(defaults, field.name)]


def build(case: Case, impl: str, x: Inputs, kernel: str | None = None, backward: bool = True,
          **compile_kwargs) -> Built:
    """One implementation, compiled (under :func:`kernel_switch`) and warmed up by one call
    (with autograd recording when ``backward`` will be timed: paged K/V has no backward).
    ``compile_kwargs``: ``torch.compile`` options of the builders that take them (``ours*``)."""
    if impl not in FEATURE_IMPLEMENTATIONS and features_of(case):
        raise ValueError(f"{impl} measures plain causal or full attention; case {case.name!r} has "
                         f"{', '.join(features_of(case))}: use one of {', '.join(FEATURE_IMPLEMENTATIONS)}")
    with kernel_switch(impl, kernel), torch.set_grad_enabled(backward):
        built = IMPLEMENTATIONS[impl](case, x, **compile_kwargs)
        built.attention(x.q, x.k, x.v)
    return built


# ----------------------------------------------------------------------------- timing


def bench_ms(fn: Callable[[], object], *, rep: int = 300, warmup: int = 50,
             grad_to_none: list[torch.Tensor] | None = None, cuda_graph: bool = False) -> float:
    """Median ms of ``triton.testing.do_bench`` after ``warmup`` ms, or of
    ``do_bench_cudagraph`` (``cuda_graph``: CUDA-graph replays, GPU time only)."""
    if cuda_graph:
        return do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def time_forward(built: Built, x: Inputs, cuda_graph: bool = False, **bench) -> float:
    """The forward's :func:`bench_ms` (``bench``: its ``rep`` and ``warmup``), without autograd."""
    with torch.no_grad():
        built.attention(x.q, x.k, x.v)  # compile the inference graph before timing
        return bench_ms(lambda: built.attention(x.q, x.k, x.v), cuda_graph=cuda_graph, **bench)


def time_forward_backward(built: Built, x: Inputs, cuda_graph: bool = False, **bench) -> float:
    """The forward+backward step's :func:`bench_ms` (``bench``: its ``rep`` and ``warmup``)."""
    grad = torch.randn_like(built.attention(x.q, x.k, x.v))

    def step() -> None:
        built.attention(x.q, x.k, x.v).backward(grad)

    step()  # compile the backward before do_bench estimates its repetitions
    return bench_ms(step, grad_to_none=built.leaves, cuda_graph=cuda_graph, **bench)


def interleaved(timers: dict[Hashable, Callable[[], float]], rounds: int) -> dict[Hashable, list[float]]:
    """Each timer's result in each of ``rounds`` rounds, the timers in turn within a round."""
    samples: dict[Hashable, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer())
    return samples


def interleaved_medians(runs: dict[str, Callable[[], object]], rounds: int, rep: int = 200) -> dict[str, float]:
    """:func:`interleaved` do_bench medians of ``runs``: each run's median over the rounds."""
    timers = {name: (lambda run=run: bench_ms(run, rep=rep)) for name, run in runs.items()}
    return {name: statistics.median(values) for name, values in interleaved(timers, rounds).items()}


def cuda_event_ms(step: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median ms of ``iters`` calls after ``warmup`` calls, timed with CUDA events (a fixed
    count: ``do_bench`` picks its own, which could differ between ranks and mismatch their
    collectives)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def host_time(fn: Callable[[], object], calls: int, warmup: int = 0) -> tuple[float, float]:
    """Seconds per call of ``calls`` calls in a row, ``(host, wall)``: host stops the clock
    before the closing sync (the time to enqueue the work), wall after it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls, (time.perf_counter() - start) / calls


def measure(case: Case, impl: str, x: Inputs, backward: bool, cuda_graph: bool = False,
            kernel: str | None = None) -> dict:
    """One implementation on one case: setup time, forward (and forward+backward) times and
    rates, or the error that stopped it (one failing implementation must not hide the rest).
    ``kernel``: the kernel switch, by default the implementation's."""
    row: dict = {}
    try:
        start = time.perf_counter()
        built = build(case, impl, x, kernel, backward)
        torch.cuda.synchronize()
        row["setup_s"] = round(time.perf_counter() - start, 2)
        row.update(built.notes)
        with kernel_switch(impl, kernel):
            row["fwd_ms"] = time_forward(built, x, cuda_graph)
            if backward:
                row["fwdbwd_ms"] = time_forward_backward(built, x, cuda_graph)
        add_rates(row, case)
    except Exception as error:  # noqa: BLE001 -- report and go on
        row["error"] = error_text(error)
    return row


def add_rates(row: dict, case: Case) -> None:
    """TFLOP/s next to each time in ``row`` (forward+backward counts 3.5 forwards)."""
    for key, passes in (("fwd", 1.0), ("fwdbwd", 3.5)):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = passes * forward_flops(case) / row[f"{key}_ms"] / 1e9


# ----------------------------------------------------------------------------- output


def error_text(error: BaseException, limit: int = 200) -> str:
    lines = str(error).splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:limit]}"


def device_line() -> str:
    return f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}"


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown_table(header: list[str], rows: Iterable[Iterable[object]]) -> list[str]:
    """Lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def log_row(row: dict) -> None:
    """One result row as a JSON line (gpu_steps.sh filters them by their leading ``{``)."""
    log.info(json.dumps(row))


def default_out() -> str:
    """Where result files go: ``$OUT`` when set (the folder a GPU run writes its outputs to),
    else ``benchmarks/results``."""
    return os.environ.get("OUT", str(RESULTS))


def add_output_arguments(parser, tag: str) -> None:
    parser.add_argument("--tag", default=tag, help="file name stem of the results (default: %(default)s)")
    parser.add_argument("--out", default=default_out(), help="folder for the results (default: $OUT, else benchmarks/results)")


def write_results(out: str | Path, tag: str, rows: list[dict], text: str) -> Path:
    """``<out>/<tag>.md`` (``text``) and ``<out>/<tag>.json`` (``rows``); logs ``text``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tag}.md").write_text(text + "\n")
    (folder / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    log.info(text)
    return folder


def fresh_compile() -> None:
    """A Dynamo reset between builds: each case compiles as a model with fixed heads and head
    dims would (otherwise Dynamo marks H and D dynamic across cases, and symbolic strides lose
    the kernels' 16-byte divisibility hints)."""
    torch._dynamo.reset()
