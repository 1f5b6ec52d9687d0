"""Host (CPU) time per call of each layer between FlashAttention 4 and our compiled op, on inputs
so small that the GPU is never the bottleneck: microseconds per call of a loop of launches
(perf_counter around N calls, one sync at the end), then a cProfile of the slowest layer.

    python benchmarks/probe_fa4_host.py
"""

from __future__ import annotations

import cProfile
import io
import pathlib
import pstats
import time

import torch

from varlen_compile import _fa4, config, varlen_attn
from varlen_compile.lowering.offsets import sanitized
from varlen_compile.params import AttnOptions, BatchLayout


def host_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_us_on_a_thread(fn, calls: int = 300) -> float:
    """:func:`host_us` run by another thread, as autograd runs CUDA backward nodes on its device
    thread (the compiled FA4 backward is slower there: this tells which layer is)."""
    import threading

    result = []
    device = torch.cuda.current_device()

    def work():
        torch.cuda.set_device(device)
        result.append(host_us(fn, calls))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    from flash_attn.cute import interface
    from flash_attn.cute.interface import flash_attn_varlen_func

    torch.manual_seed(0)
    lengths = [64] * 8
    total, heads, dim = sum(lengths), 16, 64
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    layout, options = BatchLayout(cu, cu), AttnOptions(True)
    scale = dim**-0.5
    out, lse = _fa4.forward(q.detach(), k.detach(), v.detach(), layout, options)
    dout = torch.randn_like(out)
    dq, dv = torch.empty_like(q), torch.empty_like(v)
    lse_buffer = torch.empty_like(lse)
    qd, kd, vd = q.detach(), k.detach(), v.detach()

    def direct_step():
        flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)[0].backward(dout)

    compiled = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu, cu, is_causal=True), fullgraph=True)

    def compiled_step():
        compiled(q, k, v).backward(dout)

    with torch.no_grad():
        rows = {
            "empty_like x1 (floor)": lambda: torch.empty_like(cu),
            "sanitized (Triton launch)": lambda: sanitized(cu, cu, None, total, total),
            "FA4 _flash_attn_fwd": lambda: interface._flash_attn_fwd(qd, kd, vd, cu_seqlens_q=cu, cu_seqlens_k=cu, softmax_scale=scale, causal=True, return_lse=True),
            "_fa4.forward (adapter)": lambda: _fa4.forward(qd, kd, vd, layout, options),
            "op _fa4_forward_into (dispatcher)": lambda: torch.ops.varlen_compile._fa4_forward_into.default(qd, kd, vd, lse_buffer, cu, cu, True, None, -1, -1),
            "FA4 _flash_attn_bwd": lambda: interface._flash_attn_bwd(qd, kd, vd, out, dout, lse, scale, True, cu_seqlens_q=cu, cu_seqlens_k=cu),
            "FA4 _flash_attn_bwd dq/dk/dv given": lambda: interface._flash_attn_bwd(
                qd, kd, vd, out, dout, lse, scale, True, cu_seqlens_q=cu, cu_seqlens_k=cu, dq=dq, dk=torch.empty_like(kd), dv=dv),
            "_fa4.backward (adapter)": lambda: _fa4.backward(dout, qd, kd, vd, out, lse, layout, options, None),
            "op _fa4_backward_into (dispatcher)": lambda: torch.ops.varlen_compile._fa4_backward_into.default(dout, qd, kd, vd, out, lse, dq, dv, cu, cu, True, None, -1, -1),
        }
        results = {name: host_us(fn) for name, fn in rows.items()}
        for name in ("sanitized (Triton launch)", "FA4 _flash_attn_bwd", "_fa4.backward (adapter)", "op _fa4_backward_into (dispatcher)"):
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
        compiled = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu, cu, is_causal=True), fullgraph=True)
        results["compiled kernel=triton fwd+bwd"] = host_us(compiled_step)
    print("| layer | host us/call |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.1f} |")

    for name in ("_fa4.backward (adapter)", "op _fa4_backward_into (dispatcher)"):
        profiler = cProfile.Profile()
        with torch.no_grad():
            profiler.enable()
            for _ in range(200):
                rows[name]()
            profiler.disable()
        torch.cuda.synchronize()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(18)
        print(f"### cProfile: {name} x200 (tottime)\n" + stream.getvalue()[-4500:])
    with config.patch(kernel="fa4"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu, cu, is_causal=True), fullgraph=True)
        from torch._inductor.utils import run_and_get_code
        import os
        _, codes = run_and_get_code(compiled_step)
        for index, code in enumerate(codes):
            (pathlib.Path(os.environ.get("OUT", ".")) / f"fa4-compiled-{index}.py").write_text(code)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            compiled_step()
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(22)
        print("### cProfile: compiled kernel=fa4 fwd+bwd x200 (tottime)\n" + stream.getvalue()[-5500:])


if __name__ == "__main__":
    main()
