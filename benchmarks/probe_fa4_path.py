"""Where the time goes between FlashAttention 4 called directly and FA4 behind our op.

    python benchmarks/probe_fa4_path.py [--cases headline,many-short-causal,d128]

Per case (bench.py's cases), forward and forward+backward, each timed two ways: wall time per
call (``do_bench``, host overhead included) and GPU time alone (``do_bench_cudagraph``):

    direct-hint   flash_attn_varlen_func with max_seqlen ints (bench.py's "fa4")
    direct-none   the same with max_seqlen=None (what our op passes: no host sync)
    adapter       varlen_compile._fa4.forward/backward in an autograd.Function, uncompiled
                  (adds the offset sanitizer and the lse fix-up)
    compiled      torch.compile(varlen_attn, fullgraph=True) with config.kernel="fa4"

Then a torch.profiler trace of one compiled step per case: the CUDA kernels and their times.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

from bench import all_cases, make_inputs
from varlen_compile import _fa4, config, varlen_attn
from varlen_compile.params import AttnOptions, BatchLayout


def _direct(case, inputs, hint: bool):
    from flash_attn.cute.interface import flash_attn_varlen_func

    max_len = inputs.max_len if hint else None

    def attention(q, k, v):
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=inputs.cu_seq, cu_seqlens_k=inputs.cu_seq,
            max_seqlen_q=max_len, max_seqlen_k=max_len, causal=case.causal,
        )[0]

    return attention


def _adapter(case, inputs):
    layout, options = BatchLayout(inputs.cu_seq, inputs.cu_seq), AttnOptions(case.causal)

    class Adapter(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = _fa4.forward(q, k, v, layout, options)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            return _fa4.backward(grad_out, q, k, v, out, lse, layout, options, None)

    return Adapter.apply


def _compiled(case, inputs):
    torch._dynamo.reset()
    return torch.compile(
        lambda q, k, v: varlen_attn(
            q, k, v, inputs.cu_seq, inputs.cu_seq, is_causal=case.causal, enable_gqa=case.heads_q != case.heads_kv
        ),
        fullgraph=True,
    )


def _times(attention, inputs) -> dict:
    q, k, v = inputs.q, inputs.k, inputs.v
    grad = torch.randn_like(attention(q, k, v))
    row = {}
    with torch.no_grad():
        attention(q, k, v)
        row["fwd_wall"] = do_bench(lambda: attention(q, k, v), warmup=50, rep=200, return_mode="median")
        row["fwd_gpu"] = do_bench_cudagraph(lambda: attention(q, k, v), rep=200, return_mode="median")

    def step():
        attention(q, k, v).backward(grad)

    step()
    row["both_wall"] = do_bench(step, warmup=50, rep=200, grad_to_none=[q, k, v], return_mode="median")
    try:
        row["both_gpu"] = do_bench_cudagraph(step, rep=200, grad_to_none=[q, k, v], return_mode="median")
    except Exception as error:  # the backward may not capture
        row["both_gpu_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row


def _profile(attention, inputs, out_dir: Path, name: str) -> str:
    q, k, v = inputs.q, inputs.k, inputs.v
    grad = torch.randn_like(attention(q, k, v))
    for _ in range(3):
        attention(q, k, v).backward(grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            attention(q, k, v).backward(grad)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    (out_dir / f"profile-{name}.txt").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="headline,many-short-causal,d128")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    out_dir = Path(args.out)
    cases = all_cases()
    lines = ["| case | path | fwd wall | fwd GPU | fwd+bwd wall | fwd+bwd GPU |", "|---|---|---|---|---|---|"]
    for name in args.cases.split(","):
        case = cases[name]
        inputs = make_inputs(case)
        for path, build in (
            ("direct-hint", lambda: _direct(case, inputs, True)),
            ("direct-none", lambda: _direct(case, inputs, False)),
            ("adapter", lambda: _adapter(case, inputs)),
            ("compiled", lambda: _compiled(case, inputs)),
        ):
            with config.patch(kernel="fa4"):
                try:
                    row = _times(build(), inputs)
                except Exception as error:
                    row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            print(json.dumps({"case": name, "path": path, **row}), flush=True)
            cells = [f"{row[key]:.3f}" if key in row else "-" for key in ("fwd_wall", "fwd_gpu", "both_wall", "both_gpu")]
            lines.append(f"| {name} | {path} | " + " | ".join(cells) + " |")
        with config.patch(kernel="fa4"):
            print(_profile(_compiled(case, inputs), inputs, out_dir, f"{name}-compiled"))
        print(_profile(_direct(case, inputs, False), inputs, out_dir, f"{name}-direct-none"))
    table = "\n".join(lines)
    (out_dir / "probe_fa4_path.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
