"""Side-by-side speed of varlen attention implementations on one GPU, in one process.

    python benchmarks/bench.py                      # every case, every implementation
    python benchmarks/bench.py --cases headline-causal,d128 --impls ours,aten --no-backward

Implementations (all on the same packed random bf16 inputs):
    ours        torch.compile(varlen_compile.varlen_attn, fullgraph=True) with
                config.kernel="triton": our Inductor templates ("ours (Triton)")
    ours-auto   the same with config.kernel="auto" (the default): the kernel the lowering's
                default table picks, FlashAttention 4 where it was measured faster
    fa4         FlashAttention 4 called directly (flash_attn.cute.interface
                .flash_attn_varlen_func with max_seqlen ints, its own autograd), uncompiled:
                torch.compile(fullgraph=True) of it fails
    ours-eager  our standalone Triton kernels (same @triton.jit math, no Inductor)
    aten        aten._flash_attention_forward/_backward (FlashAttention 2), what
                torch.nn.attention.varlen.varlen_attn runs, called directly
    sdpa        scaled_dot_product_attention on a padded batch with a boolean mask
    flex        compiled flex_attention with a document block mask built once, outside the
                timing (its build time is reported separately)
    floor       not attention: torch.compile of one pointwise op on the same q, k, v. Its time is
                torch.compile's own per-call cost (Dynamo guards, AOTAutograd wrappers, the
                autograd engine, a launch each way), which any compiled implementation pays;
                where it is near aten's time, a one-op compiled graph cannot beat aten

    python benchmarks/bench.py --cases headline --impls ours,fa4 --rounds 9   # small cases

Times are medians of ``triton.testing.do_bench`` after warm-up. Small cases are bound by host
time per call, which drifts within a process: ``--rounds N`` builds every implementation of a
case once and times them in N interleaved rounds, reporting each one's median over the rounds
and the range (``results/<tag>-rounds.md``). TFLOP/s count the attended
(query, key) pairs only (causal counts half), the same for every implementation. Writes
``results/<tag>.md``, ``results/<tag>.json`` and ``results/<tag>.png`` (with --plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from varlen_compile import config

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    @property
    def total(self) -> int:
        return sum(self.lengths)


def _random_multiples(count: int, upper: int, seed: int, step: int = 64) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple((torch.randint(1, upper // step + 1, (count,), generator=generator) * step).tolist())


def _random_lengths(count: int, upper: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, upper + 1, (count,), generator=generator).tolist())


def all_cases() -> dict[str, Case]:
    headline = _random_multiples(8, 2048, seed=0)
    d128 = _random_multiples(16, 4096, seed=1)
    gqa = _random_multiples(8, 4096, seed=2)
    cases = [
        Case("headline", headline, 16, 16, 64, False),
        Case("headline-causal", headline, 16, 16, 64, True),
        Case("d128", d128, 16, 16, 128, False),
        Case("d128-causal", d128, 16, 16, 128, True),
        Case("gqa-causal", gqa, 32, 8, 128, True),
        Case("many-short-causal", _random_lengths(128, 512, seed=3), 16, 16, 64, True),
        Case("skewed-causal", (8192,) + (64,) * 64, 16, 16, 128, True),
        Case("long-causal", (16384,) * 4, 16, 16, 128, True),
    ]
    return {case.name: case for case in cases}


def attended_pairs(case: Case) -> int:
    if not case.causal:
        return sum(length * length for length in case.lengths)
    return sum(length * (length + 1) // 2 for length in case.lengths)


def forward_flops(case: Case) -> float:
    return 4.0 * case.head_dim * case.heads_q * attended_pairs(case)


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    cu_seq: torch.Tensor
    max_len: int


def make_inputs(case: Case, device: str = "cuda") -> Inputs:
    torch.manual_seed(0)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(case.total, heads, case.head_dim, device=device, dtype=torch.bfloat16)

    offsets = torch.tensor((0,) + case.lengths, device=device).cumsum(0).to(torch.int32)
    return Inputs(
        randn(case.heads_q).requires_grad_(), randn(case.heads_kv).requires_grad_(),
        randn(case.heads_kv).requires_grad_(), randn(case.heads_q), offsets, max(case.lengths),
    )


# ----------------------------------------------------------------------------- implementations
# Each builder returns a forward function of (q, k, v) and an optional note (e.g. build time).


def build_ours(case: Case, inputs: Inputs):
    from varlen_compile import varlen_attn

    compiled = torch.compile(
        lambda q, k, v: varlen_attn(
            q, k, v, inputs.cu_seq, inputs.cu_seq, is_causal=case.causal,
            enable_gqa=case.heads_q != case.heads_kv,
        ),
        fullgraph=True,
    )
    return compiled, {}


def build_fa4(case: Case, inputs: Inputs):
    from flash_attn.cute.interface import flash_attn_varlen_func

    def attention(q, k, v):
        out, _ = flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=inputs.cu_seq, cu_seqlens_k=inputs.cu_seq,
            max_seqlen_q=inputs.max_len, max_seqlen_k=inputs.max_len, causal=case.causal,
        )
        return out

    return attention, {}


# The kernel switch (varlen_compile.config.kernel) each implementation runs under.
KERNEL_SWITCH = {"ours": "triton", "ours-auto": "auto"}


def attention_function(forward: Callable, backward: Callable) -> Callable:
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


def build_ours_eager(case: Case, inputs: Inputs):
    from varlen_compile.lowering import launcher
    from varlen_compile.params import AttnOptions, BatchLayout

    layout, options = BatchLayout(inputs.cu_seq, inputs.cu_seq), AttnOptions(case.causal)
    return attention_function(
        lambda q, k, v: launcher.forward(q, k, v, layout, options),
        lambda grad_out, q, k, v, out, lse: launcher.backward(grad_out, q, k, v, out, lse, layout, options),
    ), {}


def build_aten(case: Case, inputs: Inputs):
    """aten flash attention (FlashAttention 2) called directly, forward and backward; GQA is
    native there (torch 2.11's varlen_attn wrapper has no enable_gqa)."""
    from varlen_compile.backends import aten_flash_backward, aten_flash_forward
    from varlen_compile.params import AttnOptions, BatchLayout

    args = (BatchLayout(inputs.cu_seq, inputs.cu_seq, inputs.max_len, inputs.max_len), AttnOptions(case.causal))

    class AtenFlash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = aten_flash_forward(q, k, v, *args)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            return aten_flash_backward(grad_out, q, k, v, out, lse, *args)

    return AtenFlash.apply, {}


def build_sdpa(case: Case, inputs: Inputs):
    batch, max_len = len(case.lengths), inputs.max_len
    lengths = torch.tensor(case.lengths, device=inputs.q.device)
    positions = torch.arange(max_len, device=inputs.q.device)
    valid = positions[None, :] < lengths[:, None]  # (B, L)
    mask = valid[:, None, None, :].expand(batch, 1, max_len, max_len)
    if case.causal:
        mask = mask & torch.ones(max_len, max_len, dtype=torch.bool, device=valid.device).tril()
    batch_index = torch.repeat_interleave(torch.arange(batch, device=valid.device), lengths)
    token_index = torch.cat([torch.arange(n, device=valid.device) for n in case.lengths])

    def pad(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(batch, max_len, x.shape[1], x.shape[2])
        padded[batch_index, token_index] = x
        return padded.transpose(1, 2)  # (B, H, L, D)

    padded = [pad(x.detach()).requires_grad_() for x in (inputs.q, inputs.k, inputs.v)]
    enable_gqa = case.heads_q != case.heads_kv

    def attention(q, k, v):  # times the padded attention only, on pre-padded inputs
        return F.scaled_dot_product_attention(*padded, attn_mask=mask, enable_gqa=enable_gqa)

    return attention, {"inputs": padded}


def build_flex(case: Case, inputs: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = inputs.q.device
    lengths = torch.tensor(case.lengths, device=device)
    document = torch.repeat_interleave(torch.arange(len(case.lengths), device=device), lengths)

    def document_mask(b, h, q_idx, kv_idx):
        same = document[q_idx] == document[kv_idx]
        return same & (q_idx >= kv_idx) if case.causal else same

    torch.cuda.synchronize()
    start = time.perf_counter()
    block_mask = create_block_mask(document_mask, 1, 1, case.total, case.total, device=device)
    torch.cuda.synchronize()
    build_ms = (time.perf_counter() - start) * 1e3
    compiled = torch.compile(flex_attention, fullgraph=True)
    layout = [x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_() for x in (inputs.q, inputs.k, inputs.v)]
    enable_gqa = case.heads_q != case.heads_kv

    def attention(q, k, v):
        return compiled(*layout, block_mask=block_mask, enable_gqa=enable_gqa)

    return attention, {"inputs": layout, "mask_build_ms": build_ms}


def build_floor(case: Case, inputs: Inputs):
    group = case.heads_q // case.heads_kv
    compiled = torch.compile(
        lambda q, k, v: q * 2.0 + (k + v).repeat_interleave(group, dim=1), fullgraph=True
    )
    return compiled, {}


BUILDERS: dict[str, Callable] = {
    "ours": build_ours,
    "ours-auto": build_ours,
    "fa4": build_fa4,
    "ours-eager": build_ours_eager,
    "aten": build_aten,
    "sdpa": build_sdpa,
    "flex": build_flex,
    "floor": build_floor,
}


# ----------------------------------------------------------------------------- timing


# --cuda-graph: replay the timed step from a CUDA graph, which removes host launch overhead
# and leaves GPU time (small cases are otherwise bound by Python/launch cost per call).
CUDA_GRAPH = False


def _bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    if CUDA_GRAPH:
        return do_bench_cudagraph(fn, rep=300, grad_to_none=grad_to_none, return_mode="median")
    return do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")


def time_forward(attention, inputs: Inputs) -> float:
    with torch.no_grad():
        attention(inputs.q, inputs.k, inputs.v)  # compile the inference graph before timing
        return _bench(lambda: attention(inputs.q, inputs.k, inputs.v))


def time_forward_backward(attention, inputs: Inputs, leaves: list[torch.Tensor]) -> float:
    grad = torch.randn_like(attention(inputs.q, inputs.k, inputs.v))

    def step():
        attention(inputs.q, inputs.k, inputs.v).backward(grad)

    step()  # compile the backward before do_bench estimates its repetitions
    return _bench(step, grad_to_none=leaves)


def build(case: Case, impl: str, inputs: Inputs) -> tuple[Callable, list[torch.Tensor], dict]:
    """(attention, the leaves its gradients go to, notes) of one implementation, compiled and
    warmed up by one call."""
    attention, notes = BUILDERS[impl](case, inputs)
    leaves = notes.pop("inputs", [inputs.q, inputs.k, inputs.v])
    attention(inputs.q, inputs.k, inputs.v)  # compile / warm up
    return attention, leaves, notes


def measure(case: Case, impl: str, inputs: Inputs, backward: bool) -> dict:
    """One implementation on one case: setup time, forward (and forward+backward) times and
    rates, or the error that stopped it (one failing impl must not hide the rest)."""
    row: dict = {}
    try:
        start = time.perf_counter()
        attention, leaves, notes = build(case, impl, inputs)
        torch.cuda.synchronize()
        row["setup_s"] = round(time.perf_counter() - start, 2)
        row.update(notes)
        row["fwd_ms"] = time_forward(attention, inputs)
        row["fwd_tflops"] = forward_flops(case) / row["fwd_ms"] / 1e9
        if backward:
            row["fwdbwd_ms"] = time_forward_backward(attention, inputs, leaves)
            row["fwdbwd_tflops"] = 3.5 * forward_flops(case) / row["fwdbwd_ms"] / 1e9
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return row


def run(cases: list[Case], impls: list[str], backward: bool, log) -> list[dict]:
    rows = []
    for case in cases:
        # A fresh compile per case, as a model with fixed heads and head dim gets (otherwise
        # Dynamo would mark H and D dynamic across cases and the strides would turn symbolic).
        torch._dynamo.reset()
        inputs = make_inputs(case)
        for impl in impls:
            row = {"case": case.name, "impl": impl, "tokens": case.total, "seqs": len(case.lengths)}
            torch._dynamo.reset()  # ours and ours-auto differ only in the switch
            with config.patch(kernel=KERNEL_SWITCH.get(impl, "auto")):
                row.update(measure(case, impl, inputs, backward))
            log(json.dumps(row))
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def run_rounds(cases: list[Case], impls: list[str], backward: bool, rounds: int, log) -> list[dict]:
    """Each case's implementations built once, then timed in ``rounds`` interleaved rounds
    (so drift in host time hits all alike): rows with the median over rounds in ``fwd_ms`` /
    ``fwdbwd_ms`` and every round's time in ``fwd_rounds`` / ``fwdbwd_rounds``."""
    rows = []
    for case in cases:
        torch._dynamo.reset()
        inputs = make_inputs(case)
        built = {}
        for impl in impls:  # no reset in between: each keeps its compiled code, guarded on the switch
            with config.patch(kernel=KERNEL_SWITCH.get(impl, "auto")):
                attention, leaves, _ = build(case, impl, inputs)
            built[impl] = (attention, leaves)
        times: dict[str, dict[str, list[float]]] = {impl: {"fwd": [], "fwdbwd": []} for impl in impls}
        for _ in range(rounds):
            for impl, (attention, leaves) in built.items():
                with config.patch(kernel=KERNEL_SWITCH.get(impl, "auto")):
                    times[impl]["fwd"].append(time_forward(attention, inputs))
                    if backward:
                        times[impl]["fwdbwd"].append(time_forward_backward(attention, inputs, leaves))
        for impl in impls:
            row = {"case": case.name, "impl": impl, "tokens": case.total, "seqs": len(case.lengths)}
            for key, rate in (("fwd", 1.0), ("fwdbwd", 3.5)):
                if times[impl][key]:
                    row[f"{key}_rounds"] = times[impl][key]
                    row[f"{key}_ms"] = statistics.median(times[impl][key])
                    row[f"{key}_tflops"] = rate * forward_flops(case) / row[f"{key}_ms"] / 1e9
            log(json.dumps(row))
            rows.append(row)
        del built
        torch.cuda.empty_cache()
    return rows


def rounds_markdown(rows: list[dict], impls: list[str]) -> str:
    """Per case and direction: each implementation's times over the rounds, median and range,
    and the per-round ratio of each implementation to the last one listed."""
    lines = []
    for case in dict.fromkeys(row["case"] for row in rows):
        by_impl = {r["impl"]: r for r in rows if r["case"] == case}
        for key, title in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
            if not all(f"{key}_rounds" in by_impl[i] for i in impls):
                continue
            lines.append(f"## {case}: {title} ms per round")
            for impl in impls:
                values = by_impl[impl][f"{key}_rounds"]
                lines.append(f"{impl:>10}: " + " ".join(f"{v:.3f}" for v in values)
                             + f"   median {statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}")
            peer = impls[-1]
            for impl in impls[:-1]:
                ratios = [p / o for o, p in zip(by_impl[impl][f"{key}_rounds"], by_impl[peer][f"{key}_rounds"])]
                lines.append(f"{impl} vs {peer} per round: " + " ".join(f"{r:.2f}" for r in ratios)
                             + f"   median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
            lines.append("")
    return "\n".join(lines)


def speedups(rows: list[dict], metric: str, baseline: str = "aten", ours_impl: str = "ours") -> dict[str, float]:
    """ours / baseline speed per case (time ratio baseline_ms / ours_ms)."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["impl"]] = row
    ratios = {}
    for case, impls in by_case.items():
        ours, base = impls.get(ours_impl, {}), impls.get(baseline, {})
        if metric in ours and metric in base:
            ratios[case] = base[metric] / ours[metric]
    return ratios


def markdown(rows: list[dict], impls: list[str], backward: bool) -> str:
    device = torch.cuda.get_device_name()
    lines = [
        f"Device: {device}; torch {torch.__version__}; bf16; median ms (TFLOP/s) of "
        + ("do_bench_cudagraph (CUDA-graph replays: GPU time, no launch overhead)." if CUDA_GRAPH else "do_bench."),
        "",
    ]
    metrics = [("fwd_ms", "fwd_tflops", "forward")] + ([("fwdbwd_ms", "fwdbwd_tflops", "forward+backward")] if backward else [])
    # Ratio columns (time of the peer / time of ours; above 1: ours faster) for the pairs present.
    pairs = [(o, p) for o, p in (("ours", "aten"), ("ours", "fa4"), ("ours-auto", "fa4")) if o in impls and p in impls]
    for metric, rate, title in metrics:
        header = " | ".join(f"{o} vs {p}" for o, p in pairs)
        lines += [f"### {title}", "", "| case | " + " | ".join(impls) + (f" | {header} |" if pairs else " |"),
                  "|---" * (len(impls) + len(pairs) + 1) + "|"]
        ratios = {pair: speedups(rows, metric, baseline=pair[1], ours_impl=pair[0]) for pair in pairs}
        for case in dict.fromkeys(row["case"] for row in rows):
            cells = []
            for impl in impls:
                row = next((r for r in rows if r["case"] == case and r["impl"] == impl), {})
                if impl == "floor" and metric in row:  # no attention work: time only
                    cells.append(f"{row[metric]:.3f}")
                else:
                    cells.append(f"{row[metric]:.3f} ({row[rate]:.0f})" if metric in row else row.get("error", "-")[:40])
            cells += [f"{ratios[pair][case]:.2f}x" if case in ratios[pair] else "-" for pair in pairs]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
        for (ours_impl, peer), by_case in ratios.items():
            if by_case:
                geomean = math.exp(sum(math.log(r) for r in by_case.values()) / len(by_case))
                lines.append(f"Geometric mean {ours_impl} vs {peer} ({title}): {geomean:.2f}x; min {min(by_case.values()):.2f}x")
        lines.append("")
    builds = [r for r in rows if "mask_build_ms" in r]
    if builds:
        lines += ["FlexAttention block-mask build (not in the timings): " + ", ".join(f"{r['case']} {r['mask_build_ms']:.1f} ms" for r in builds), ""]
    return "\n".join(lines)


def plot(rows: list[dict], impls: list[str], path: Path, metric: str = "fwd_tflops") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(row["case"] for row in rows))
    figure, axes = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 4.5))
    impls = [impl for impl in impls if impl != "floor"]
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        values = [next((r.get(metric, 0) for r in rows if r["case"] == c and r["impl"] == impl), 0) for c in cases]
        axes.bar([x + i * width for x in range(len(cases))], values, width, label=impl)
    axes.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, rotation=30, ha="right")
    axes.set_ylabel(metric.replace("_", " ").replace("tflops", "TFLOP/s"))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(all_cases()))
    parser.add_argument("--impls", default=",".join(BUILDERS))
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--tag", default="bench")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (GPU time only)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per case (small cases)")
    args = parser.parse_args()
    global CUDA_GRAPH
    CUDA_GRAPH = args.cuda_graph
    cases = [all_cases()[name] for name in args.cases.split(",")]
    impls = args.impls.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.rounds > 1:
        rows = run_rounds(cases, impls, not args.no_backward, args.rounds, log)
        table = markdown(rows, impls, not args.no_backward) + "\n" + rounds_markdown(rows, impls)
        (out / f"{args.tag}-rounds.md").write_text(table + "\n")
        (out / f"{args.tag}-rounds.json").write_text(json.dumps(rows, indent=1))
        print(table)
        return
    rows = run(cases, impls, not args.no_backward, log)
    table = markdown(rows, impls, not args.no_backward)
    (out / f"{args.tag}.md").write_text(table + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, impls, out / f"{args.tag}.png")
        if not args.no_backward:
            plot(rows, impls, out / f"{args.tag}-fwdbwd.png", metric="fwdbwd_tflops")
    print(table)


if __name__ == "__main__":
    main()
