"""Where the time of a compiled varlen_attn step goes: host vs GPU, layer by layer.

One-off GPU diagnostics, one subcommand each. CASE is one of bench.py's cases (headline,
headline-causal, d128, ...); files are written to $OUT (default /tmp).

    python benchmarks/profile_step.py host CASE...       # host, wall, do_bench and phase times of ours,
                                                          # ours-reduce-overhead, aten, floor; cProfiles; generated code
    python benchmarks/profile_step.py trace CASE...      # torch.profiler chrome traces and table of ours, floor, aten
    python benchmarks/profile_step.py template CASE...   # compiled template vs standalone kernels, forward and backward
    python benchmarks/profile_step.py fa4-host           # host time per call of each layer between FA4 and our op
    python benchmarks/profile_step.py fa4-path [--cases headline,d128]  # FA4 called directly vs behind our op
    python benchmarks/profile_step.py compile-time       # cold-cache compile time of a forward+backward graph
    ncu ... python benchmarks/profile_step.py ncu CASE --impl ours|fa4   # forward kernels for Nsight Compute

Each subcommand's --help says what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from varlen_compile import config, varlen_attn
from varlen_compile.params import AttnOptions, BatchLayout

sys.path.insert(0, str(Path(__file__).parent))  # bench.py, from the repo root too
from bench import Case, Inputs, all_cases, attention_function, build_aten, build_floor, make_inputs

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MODULE_SEPARATOR = "\n\n# ======== next module ========\n\n"
COMPILE_TIME_CHILD = "compile-time-child"  # hidden subcommand: the fresh process of `compile-time`


# ----------------------------------------------------------------------------- shared helpers


def out_dir() -> Path:
    """$OUT (default /tmp), created if missing."""
    path = Path(os.environ.get("OUT", "/tmp"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def kernel_switch(kernel: str | None) -> Iterator[None]:
    """``config.patch(kernel=...)`` for the block; ``None`` leaves the switch as it is."""
    with config.patch(kernel=kernel) if kernel else contextlib.nullcontext():
        yield


def compile_ours(case: Case, x: Inputs, **compile_kwargs: object) -> Attention:
    """``torch.compile(varlen_attn, fullgraph=True)`` on the case's fixed offsets: "ours"."""
    return torch.compile(
        lambda q, k, v: varlen_attn(
            q, k, v, x.cu_seq, x.cu_seq, is_causal=case.causal, enable_gqa=case.heads_q != case.heads_kv
        ),
        fullgraph=True,
        **compile_kwargs,
    )


# The implementations `host` and `trace` compare; aten and floor are bench.py's builders.
VARIANTS: dict[str, Callable[[Case, Inputs], Attention]] = {
    "ours": lambda case, x: compile_ours(case, x),
    "ours-reduce-overhead": lambda case, x: compile_ours(case, x, mode="reduce-overhead"),
    "aten": lambda case, x: build_aten(case, x)[0],
    "floor": lambda case, x: build_floor(case, x)[0],
}


def training_step(fn: Attention, x: Inputs, grad: torch.Tensor, clear_grads: bool = True) -> Callable[[], None]:
    """One forward+backward of ``fn`` on ``x``'s q, k, v; ``clear_grads``: then set their ``.grad``
    to None (as an optimizer step would), else let the gradients accumulate."""
    leaves = (x.q, x.k, x.v)

    def step() -> None:
        fn(x.q, x.k, x.v).backward(grad)
        if clear_grads:
            for tensor in leaves:
                tensor.grad = None

    return step


def bench_ms(fn: Callable[[], object], rep: int = 300, grad_to_none: list[torch.Tensor] | None = None,
             cuda_graph: bool = False) -> float:
    """Median ms of ``triton.testing.do_bench`` (warm-up 50 ms), or of ``do_bench_cudagraph``
    (CUDA-graph replays: GPU time, no host overhead)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if cuda_graph:
        return do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    return do_bench(fn, warmup=50, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def host_time(fn: Callable[[], object], calls: int, warmup: int = 0) -> tuple[float, float]:
    """Seconds per call of ``calls`` calls in a row, ``(host, wall)``: host stops the clock before
    the closing sync (the time to enqueue the work), wall after it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls, (time.perf_counter() - start) / calls


def host_us(fn: Callable[[], object], calls: int = 300) -> float:
    """Host microseconds per call (20 warm-up calls first)."""
    return host_time(fn, calls, warmup=20)[0] * 1e6


def host_us_on_a_thread(fn: Callable[[], object], calls: int = 300) -> float:
    """:func:`host_us` run by another thread, as autograd runs CUDA backward nodes on its device
    thread (the compiled FA4 backward is slower there: this tells which layer is)."""
    result: list[float] = []
    device = torch.cuda.current_device()

    def work() -> None:
        torch.cuda.set_device(device)
        result.append(host_us(fn, calls))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result[0]


def cprofile(fn: Callable[[], object], calls: int, *sorts: tuple[str, int]) -> str:
    """cProfile of ``calls`` calls: the stats printed once per ``(sort key, row limit)``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    for key, limit in sorts:
        stats.sort_stats(key).print_stats(limit)
    return text.getvalue()


def torch_profile(step: Callable[[], None], warmup: int, steps: int, mark: str | None = None) -> profile:
    """torch.profiler (CPU + CUDA) over ``steps`` steps after ``warmup`` unprofiled ones; ``mark``:
    a ``record_function`` label around each step."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function(mark) if mark else contextlib.nullcontext():
                step()
        torch.cuda.synchronize()
    return prof


def generated_code(fn: Callable[[], object]) -> list[str]:
    """The Inductor modules that calling ``fn`` compiles (forward and, for a step, backward)."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn)[1]


# ----------------------------------------------------------------------------- host


def measure_host(fn: Attention, x: Inputs, steps: int = 200) -> tuple[dict[str, float], Callable[[], None]]:
    """Per training step: host enqueue time, synchronized wall time, do_bench's median (what
    bench.py reports), host time of the forward alone (autograd recording) and of each phase of a
    step. Returns the row (ms) and the step."""
    grad = torch.randn_like(fn(x.q, x.k, x.v))
    leaves = [x.q, x.k, x.v]
    step = training_step(fn, x, grad)
    host, wall = host_time(step, steps, warmup=10)
    bench = bench_ms(training_step(fn, x, grad, clear_grads=False), grad_to_none=leaves)
    torch.cuda.synchronize()
    forward_s = backward_s = 0.0
    for _ in range(steps):  # host time of each phase of a step (no sync in between)
        t0 = time.perf_counter()
        out = fn(x.q, x.k, x.v)
        t1 = time.perf_counter()
        out.backward(grad)
        t2 = time.perf_counter()
        for tensor in leaves:
            tensor.grad = None
        forward_s, backward_s = forward_s + t1 - t0, backward_s + t2 - t1
    del out
    fwd_host, _ = host_time(lambda: fn(x.q, x.k, x.v), steps)  # forward with autograd recording, no backward
    return {"host_ms": host * 1e3, "wall_ms": wall * 1e3, "do_bench_ms": bench, "fwd_host_ms": fwd_host * 1e3,
            "phase_fwd_ms": forward_s / steps * 1e3, "phase_bwd_ms": backward_s / steps * 1e3}, step


def host_variant(case: Case, label: str, out: Path) -> dict[str, float] | None:
    """:func:`measure_host` of one variant (None if it failed: reported, not raised); for ours and
    floor also a cProfile of 300 steps, for ours also its generated code."""
    x = make_inputs(case)
    try:
        result, step = measure_host(VARIANTS[label](case, x), x)
    except Exception as error:  # noqa: BLE001 -- report and go on
        print(f"{case.name} {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        return None
    print(case.name, label, {key: round(value, 4) for key, value in result.items()}, flush=True)
    if label in ("ours", "floor"):
        text = cprofile(step, 300, ("tottime", 40), ("cumulative", 60))
        (out / f"cprofile_{case.name}_{label}.txt").write_text(text)
    if label == "ours":
        torch._dynamo.reset()
        fresh = compile_ours(case, x)
        grad = torch.randn_like(x.q)
        codes = generated_code(lambda: fresh(x.q, x.k, x.v).backward(grad))
        (out / f"code_{case.name}.py").write_text(MODULE_SEPARATOR.join(codes))
    return result


def cmd_host(args: argparse.Namespace) -> None:
    """Host time of one compiled forward+backward step: ours, ours-reduce-overhead, aten, floor."""
    out = out_dir()
    rows = []
    for name in args.cases:
        for label in VARIANTS:
            torch._dynamo.reset()
            with kernel_switch(args.kernel):
                result = host_variant(all_cases()[name], label, out)
            if result is not None:
                rows.append((name, label, result))
    print()
    print("| case | variant | host ms/step | wall ms/step | do_bench ms | fwd host ms (grad on) | phase fwd | phase bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, r in rows:
        print(f"| {name} | {label} | {r['host_ms']:.3f} | {r['wall_ms']:.3f} | {r['do_bench_ms']:.3f} "
              f"| {r['fwd_host_ms']:.3f} | {r['phase_fwd_ms']:.3f} | {r['phase_bwd_ms']:.3f} |")


# ----------------------------------------------------------------------------- trace


def cmd_trace(args: argparse.Namespace) -> None:
    """torch.profiler of 10 forward+backward steps of ours, floor and aten per case."""
    out = out_dir()
    for name in args.cases:
        case = all_cases()[name]
        for label in ("ours", "floor", "aten"):
            torch._dynamo.reset()
            x = make_inputs(case)
            with kernel_switch(args.kernel):
                fn = VARIANTS[label](case, x)
                prof = torch_profile(training_step(fn, x, torch.randn_like(x.q)), warmup=20, steps=10, mark="STEP")
            prof.export_chrome_trace(str(out / f"trace_{name}_{label}.json"))
            print(f"==== {name} {label}")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


# ----------------------------------------------------------------------------- template


def template_times(case: Case, kernel: str | None, out: Path) -> dict[str, float]:
    """ms of the compiled template and of the standalone kernels on one case (see ``template --help``)."""
    from varlen_compile.lowering import launcher

    x = make_inputs(case)
    q, k, v = (t.detach() for t in (x.q, x.k, x.v))
    grad = x.grad_out
    layout, options = BatchLayout(x.cu_seq, x.cu_seq), AttnOptions(case.causal)
    times: dict[str, float] = {}
    with kernel_switch(kernel):
        torch._dynamo.reset()
        compiled = compile_ours(case, x)
        with torch.no_grad():
            codes = generated_code(lambda: compiled(q, k, v))
            times["fwd_compiled"] = bench_ms(lambda: compiled(q, k, v))
        (out / f"compiled_{case.name}.py").write_text(MODULE_SEPARATOR.join(codes))
        step = training_step(compiled, x, grad, clear_grads=False)
        codes = generated_code(step)  # compiles the training graph: forward and backward modules
        (out / f"compiled_{case.name}_fwdbwd.py").write_text(MODULE_SEPARATOR.join(codes))
        times["both_compiled"] = bench_ms(step, grad_to_none=[x.q, x.k, x.v])
    times["fwd_standalone"] = bench_ms(lambda: launcher.forward(q, k, v, layout, options))
    saved_out, saved_lse = launcher.forward(q, k, v, layout, options)
    times["bwd_standalone"] = bench_ms(lambda: launcher.backward(grad, q, k, v, saved_out, saved_lse, layout, options))

    def standalone_step() -> None:
        attn_out, attn_lse = launcher.forward(q, k, v, layout, options)
        launcher.backward(grad, q, k, v, attn_out, attn_lse, layout, options)

    times["both_standalone"] = bench_ms(standalone_step)
    times["bwd_compiled"] = times["both_compiled"] - times["fwd_compiled"]
    return times


def cmd_template(args: argparse.Namespace) -> None:
    """Compiled template vs the standalone kernels (same default configs), forward and backward."""
    out = out_dir()
    columns = {"fwd_compiled": "fwd compiled", "fwd_standalone": "fwd standalone", "both_compiled": "fwd+bwd compiled",
               "both_standalone": "fwd+bwd standalone", "bwd_standalone": "bwd standalone",
               "bwd_compiled": "bwd compiled (fwd+bwd - fwd)"}
    lines = ["| case | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in args.cases:
        t = template_times(all_cases()[name], args.kernel, out)
        print(f"{name}: forward compiled {t['fwd_compiled']:.3f} ms, standalone {t['fwd_standalone']:.3f} ms; "
              f"forward+backward compiled {t['both_compiled']:.3f} ms, standalone {t['both_standalone']:.3f} ms; "
              f"backward standalone {t['bwd_standalone']:.3f} ms, compiled ~{t['bwd_compiled']:.3f} ms (by difference)",
              flush=True)
        lines.append(f"| {name} | " + " | ".join(f"{t[column]:.3f}" for column in columns) + " |")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- fa4-host


def cmd_fa4_host(args: argparse.Namespace) -> None:
    """Host time per call of each layer between FlashAttention 4 and our compiled op."""
    from flash_attn.cute import interface
    from flash_attn.cute.interface import flash_attn_varlen_func
    from varlen_compile.lowering.offsets import sanitized

    from varlen_compile import _fa4

    case = Case("fa4-host", (64,) * 8, 16, 16, 64, True)  # so small that the GPU is never the bottleneck
    x = make_inputs(case)
    q, k, v, cu, total = x.q, x.k, x.v, x.cu_seq, case.total
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    layout, options = BatchLayout(cu, cu), AttnOptions(True)
    scale = case.head_dim**-0.5
    out, lse = _fa4.forward(qd, kd, vd, layout, options)
    dout = torch.randn_like(out)
    dq, dv = torch.empty_like(q), torch.empty_like(v)
    lse_buffer = torch.empty_like(lse)

    def direct_step() -> None:
        flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)[0].backward(dout)

    compiled = compile_ours(case, x)

    def compiled_step() -> None:  # `compiled` is rebound below: each time, the current one
        compiled(q, k, v).backward(dout)

    with torch.no_grad():
        rows: dict[str, Callable[[], object]] = {
            "empty_like x1 (floor)": lambda: torch.empty_like(cu),
            "sanitized (Triton launch)": lambda: sanitized(cu, cu, None, total, total),
            "FA4 _flash_attn_fwd": lambda: interface._flash_attn_fwd(
                qd, kd, vd, cu_seqlens_q=cu, cu_seqlens_k=cu, softmax_scale=scale, causal=True, return_lse=True),
            "_fa4.forward (adapter)": lambda: _fa4.forward(qd, kd, vd, layout, options),
            "op _fa4_forward_into (dispatcher)": lambda: torch.ops.varlen_compile._fa4_forward_into.default(
                qd, kd, vd, lse_buffer, cu, cu, True, None, -1, -1),
            "FA4 _flash_attn_bwd": lambda: interface._flash_attn_bwd(
                qd, kd, vd, out, dout, lse, scale, True, cu_seqlens_q=cu, cu_seqlens_k=cu),
            "FA4 _flash_attn_bwd dq/dk/dv given": lambda: interface._flash_attn_bwd(
                qd, kd, vd, out, dout, lse, scale, True, cu_seqlens_q=cu, cu_seqlens_k=cu, dq=dq, dk=torch.empty_like(kd), dv=dv),
            "_fa4.backward (adapter)": lambda: _fa4.backward(dout, qd, kd, vd, out, lse, layout, options, None),
            "op _fa4_backward_into (dispatcher)": lambda: torch.ops.varlen_compile._fa4_backward_into.default(
                dout, qd, kd, vd, out, lse, dq, dv, cu, cu, True, None, -1, -1),
        }
        results = {name: host_us(fn) for name, fn in rows.items()}
        threaded = ("sanitized (Triton launch)", "FA4 _flash_attn_bwd", "_fa4.backward (adapter)",
                    "op _fa4_backward_into (dispatcher)")
        for name in threaded:
            results[name + ", on another thread"] = host_us_on_a_thread(rows[name])
    with config.patch(kernel="fa4"):
        results["FA4 direct fwd+bwd (autograd)"] = host_us(direct_step)
        results["compiled kernel=fa4 fwd+bwd"] = host_us(compiled_step)
        with torch.autograd.set_multithreading_enabled(False):
            results["compiled kernel=fa4 fwd+bwd, autograd single-threaded"] = host_us(compiled_step)
        with torch.no_grad():
            results["compiled kernel=fa4 fwd (no_grad)"] = host_us(lambda: compiled(q, k, v))
    with config.patch(kernel="triton"):
        torch._dynamo.reset()
        compiled = compile_ours(case, x)
        results["compiled kernel=triton fwd+bwd"] = host_us(compiled_step)
    print("| layer | host us/call |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} |")

    for name in ("_fa4.backward (adapter)", "op _fa4_backward_into (dispatcher)"):
        with torch.no_grad():
            text = cprofile(rows[name], 200, ("tottime", 18))
        print(f"### cProfile: {name} x200 (tottime)\n" + text[-4500:])
    with config.patch(kernel="fa4"):
        torch._dynamo.reset()
        compiled = compile_ours(case, x)
        for index, code in enumerate(generated_code(compiled_step)):
            (out_dir() / f"fa4-compiled-{index}.py").write_text(code)
        text = cprofile(compiled_step, 200, ("tottime", 22))
        print("### cProfile: compiled kernel=fa4 fwd+bwd x200 (tottime)\n" + text[-5500:])


# ----------------------------------------------------------------------------- fa4-path


def fa4_direct(case: Case, x: Inputs, hint: bool) -> Attention:
    """``flash_attn_varlen_func`` with max_seqlen ints (``hint``, bench.py's "fa4") or None."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    max_len = x.max_len if hint else None

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=x.cu_seq, cu_seqlens_k=x.cu_seq, max_seqlen_q=max_len, max_seqlen_k=max_len,
            causal=case.causal,
        )[0]

    return attention


def fa4_adapter(case: Case, x: Inputs) -> Attention:
    """``varlen_compile._fa4.forward/backward`` in an autograd.Function, uncompiled."""
    from varlen_compile import _fa4

    layout, options = BatchLayout(x.cu_seq, x.cu_seq), AttnOptions(case.causal)
    return attention_function(
        lambda q, k, v: _fa4.forward(q, k, v, layout, options),
        lambda grad_out, q, k, v, out, lse: _fa4.backward(grad_out, q, k, v, out, lse, layout, options, None),
    )


def fresh_ours(case: Case, x: Inputs) -> Attention:
    """:func:`compile_ours` after a Dynamo reset."""
    torch._dynamo.reset()
    return compile_ours(case, x)


def fa4_path_times(attention: Attention, x: Inputs) -> dict[str, float | str]:
    """Forward and forward+backward, wall time per call (do_bench) and GPU time (CUDA graph)."""
    q, k, v = x.q, x.k, x.v
    row: dict[str, float | str] = {}
    grad = torch.randn_like(attention(q, k, v))
    with torch.no_grad():
        attention(q, k, v)
        row["fwd_wall"] = bench_ms(lambda: attention(q, k, v), rep=200)
        row["fwd_gpu"] = bench_ms(lambda: attention(q, k, v), rep=200, cuda_graph=True)
    step = training_step(attention, x, grad, clear_grads=False)
    step()
    row["both_wall"] = bench_ms(step, rep=200, grad_to_none=[q, k, v])
    try:
        row["both_gpu"] = bench_ms(step, rep=200, grad_to_none=[q, k, v], cuda_graph=True)
    except Exception as error:  # noqa: BLE001 -- the backward may not capture
        row["both_gpu_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row


def fa4_path_profile(attention: Attention, x: Inputs, out: Path, name: str) -> str:
    """The CUDA kernels of 5 forward+backward steps and their times (written to profile-<name>.txt)."""
    step = training_step(attention, x, torch.randn_like(attention(x.q, x.k, x.v)), clear_grads=False)
    prof = torch_profile(step, warmup=3, steps=5)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    (out / f"profile-{name}.txt").write_text(table)
    return table


def fa4_path_case(case: Case, out: Path) -> list[str]:
    """The four paths' times on one case (markdown rows), then the profiles of two of them."""
    x = make_inputs(case)
    paths: dict[str, Callable[[], Attention]] = {
        "direct-hint": lambda: fa4_direct(case, x, True),
        "direct-none": lambda: fa4_direct(case, x, False),
        "adapter": lambda: fa4_adapter(case, x),
        "compiled": lambda: fresh_ours(case, x),
    }
    lines = []
    for path, build in paths.items():
        with config.patch(kernel="fa4"):
            try:
                row = fa4_path_times(build(), x)
            except Exception as error:  # noqa: BLE001 -- report and go on
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        print(json.dumps({"case": case.name, "path": path, **row}), flush=True)
        cells = [f"{row[key]:.3f}" if key in row else "-" for key in ("fwd_wall", "fwd_gpu", "both_wall", "both_gpu")]
        lines.append(f"| {case.name} | {path} | " + " | ".join(cells) + " |")
    with config.patch(kernel="fa4"):
        print(fa4_path_profile(fresh_ours(case, x), x, out, f"{case.name}-compiled"))
    print(fa4_path_profile(fa4_direct(case, x, False), x, out, f"{case.name}-direct-none"))
    return lines


def cmd_fa4_path(args: argparse.Namespace) -> None:
    """FlashAttention 4 called directly vs behind our op: wall and GPU times, then profiles."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| case | path | fwd wall | fwd GPU | fwd+bwd wall | fwd+bwd GPU |", "|---|---|---|---|---|---|"]
    for name in args.cases.split(","):
        lines += fa4_path_case(all_cases()[name], out)
    table = "\n".join(lines)
    (out / "probe_fa4_path.md").write_text(table + "\n")
    print(table)


# ----------------------------------------------------------------------------- compile-time


class Block(torch.nn.Module):
    """A transformer block's attention: qkv projection, varlen_attn (causal), output projection."""

    def __init__(self, heads: int = 16, head_dim: int = 64) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.proj = torch.nn.Linear(heads * head_dim, heads * head_dim)

    def forward(self, x: torch.Tensor, cu_seq: torch.Tensor) -> torch.Tensor:
        total = x.shape[0]
        q, k, v = (t.view(total, self.heads, self.head_dim) for t in self.qkv(x).chunk(3, -1))
        return self.proj(varlen_attn(q, k, v, cu_seq, cu_seq, is_causal=True).reshape(total, -1))


def cmd_compile_time(args: argparse.Namespace) -> int:
    """Cold-cache compile time of a forward+backward graph, measured in a fresh process.

    Runs :func:`compile_time_child` in a new Python process whose Inductor and Triton caches are
    new empty folders (set before torch is imported there), so nothing is reused from earlier runs.
    Its output goes straight to this process's stdout and stderr."""
    with tempfile.TemporaryDirectory(prefix="varlen_compile_cold_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        sys.stdout.flush()
        command = [sys.executable, str(Path(__file__).resolve()), COMPILE_TIME_CHILD]
        return subprocess.run(command, env=env, check=False).returncode


def compile_time_child(args: argparse.Namespace) -> None:
    """Cold-cache compile time of a forward+backward graph that calls varlen_attn (no max-autotune)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ or "TRITON_CACHE_DIR" not in os.environ:
        raise SystemExit(f"{COMPILE_TIME_CHILD} is internal: run `profile_step.py compile-time`")
    model = Block().cuda().bfloat16()
    lengths = [512, 1024, 64, 2048]
    cu_seq = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    x = torch.randn(sum(lengths), 1024, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    compiled(x, cu_seq).float().square().mean().backward()
    torch.cuda.synchronize()
    print(f"cold compile, forward+backward (incl. first run): {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------- command line


# ----------------------------------------------------------------------------- ncu


def cmd_ncu(args: argparse.Namespace) -> None:
    """Run one case's forward kernel a few times, for Nsight Compute to profile one launch."""
    case = all_cases()[args.cases[0]]
    x = make_inputs(case)
    if args.impl == "fa4":
        attention = fa4_direct(case, x, hint=True)
    else:
        from varlen_compile.lowering import launcher

        layout, options = BatchLayout(x.cu_seq, x.cu_seq), AttnOptions(case.causal)
        attention = lambda q, k, v: launcher.forward(q, k, v, layout, options)  # noqa: E731
    with torch.no_grad():
        for _ in range(args.launches):
            attention(x.q, x.k, x.v)
    torch.cuda.synchronize()


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True,
                                   metavar="{host,trace,template,fa4-host,fa4-path,compile-time,ncu}")
    case_names = list(all_cases())

    def command(name: str, func: Callable, description: str, cases: bool = False, kernel: str | None = None
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=func.__doc__.splitlines()[0], description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        if cases:
            sub.add_argument("cases", nargs="+", choices=case_names, metavar="CASE",
                             help="bench.py cases: " + ", ".join(case_names))
            sub.add_argument("--kernel", default=kernel, choices=config.KERNELS,
                             help="varlen_compile.config.kernel for ours (default: "
                                  + (kernel or "as set, i.e. $VARLEN_COMPILE_KERNEL or auto") + ")")
        return sub

    command("host", cmd_host, """\
Host time of one compiled forward+backward step, per case and variant (ours, ours-reduce-overhead,
aten, floor): host enqueue time (perf_counter over 200 steps before a sync), synchronized wall
time, do_bench's median (what bench.py reports), host time of the forward alone (autograd
recording) and of the forward and backward phases of a step. Writes cProfiles of the ours and
floor steps (by own and by cumulative time) to $OUT/cprofile_<case>_<variant>.txt and ours'
generated Inductor code (forward and backward) to $OUT/code_<case>.py.""", cases=True)
    command("trace", cmd_trace, """\
torch.profiler (CPU + CUDA) of 10 forward+backward steps of ours, floor and aten, after 20 unprofiled
ones: writes $OUT/trace_<case>_<variant>.json (chrome trace) and prints the profiler's table.""", cases=True)
    command("template", cmd_template, """\
The compiled template vs the standalone kernels it shares its @triton.jit code with
(launcher.forward, launcher.backward; same default configs), do_bench medians: forward,
forward+backward, and the backward alone (standalone measured, compiled by difference), so that a
gap in either direction shows up. Writes the generated code to $OUT/compiled_<case>.py (forward)
and $OUT/compiled_<case>_fwdbwd.py (training graph: forward and backward modules).""", cases=True, kernel="triton")
    command("fa4-host", cmd_fa4_host, """\
Host (CPU) time per call of each layer between FlashAttention 4 and our compiled op, on inputs so
small that the GPU is never the bottleneck (perf_counter around 300 calls, one sync at the end);
some layers also on another thread, as autograd runs backward nodes on its device thread. Then
cProfiles of the slowest layers and of the compiled kernel=fa4 step, whose generated code goes to
$OUT/fa4-compiled-<i>.py. Needs flash-attn-4.""")
    fa4_path = command("fa4-path", cmd_fa4_path, """\
Where the time goes between FlashAttention 4 called directly and FA4 behind our op. Per case,
forward and forward+backward, each timed two ways: wall time per call (do_bench, host overhead
included) and GPU time alone (do_bench_cudagraph):

    direct-hint   flash_attn_varlen_func with max_seqlen ints (bench.py's "fa4")
    direct-none   the same with max_seqlen=None (what our op passes: no host sync)
    adapter       varlen_compile._fa4.forward/backward in an autograd.Function, uncompiled
                  (adds the offset sanitizer and the lse fix-up)
    compiled      torch.compile(varlen_attn, fullgraph=True) with config.kernel="fa4"

Then a torch.profiler table of 5 compiled and direct-none steps per case (the CUDA kernels and
their times), written to <out>/profile-<case>-<path>.txt; the timings to <out>/probe_fa4_path.md.
Needs flash-attn-4.""")
    fa4_path.add_argument("--cases", default="headline,many-short-causal,d128",
                          help="comma-separated bench.py cases (default: %(default)s)")
    fa4_path.add_argument("--out", default=os.environ.get("OUT", "/tmp"), help="output folder (default: $OUT or /tmp)")
    command("compile-time", cmd_compile_time, """\
Cold-cache compile time of a forward+backward graph that calls varlen_attn (no max-autotune):
a qkv projection, varlen_attn (causal, 16 heads of 64) and an output projection on 4 sequences.
Runs in a fresh Python process whose Inductor and Triton caches are new empty folders, so nothing
is reused from earlier runs.""")
    ncu = command("ncu", cmd_ncu, """\
The forward kernel of one case, launched --launches times (our standalone kernel, the same
@triton.jit code as the template, or FlashAttention 4 called directly), for Nsight Compute:

    ncu -k regex:"varlen_fwd|flash_fwd" --launch-skip 3 --launch-count 1 --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/profile_step.py ncu d128 --impl ours

(benchmarks/device_session.sh's ncu step runs both). FA4 needs flash-attn-4.""", cases=True)
    ncu.add_argument("--impl", choices=("ours", "fa4"), default="ours")
    ncu.add_argument("--launches", type=int, default=5)
    commands.add_parser(COMPILE_TIME_CHILD).set_defaults(func=compile_time_child)  # internal, not in --help
    return root


def main() -> int:
    args = parser().parse_args()
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
