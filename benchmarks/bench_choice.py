"""The measurements behind the kernel choice's default table (lowering/choices.py): our Triton
template vs FlashAttention 4, both behind our op and compiled (fullgraph), per head dims, masking
and feature, on one GPU in one process.

    python benchmarks/bench_choice.py [--quick] [--tag h200-choice]

Each row times ``config.kernel="triton"`` and ``config.kernel="fa4"`` on the same packed random
bf16 batch (16 sequences up to 4096 tokens, 16 query heads, GQA 4): forward alone and
forward+backward, medians of ``triton.testing.do_bench``. ratio = template time / FA4 time
(above 1: FA4 faster). The last column says which kernel the default table should pick there
(FA4 when it is faster in both forward and forward+backward). Needs flash-attn-4.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code
from triton.testing import do_bench

from varlen_compile import config, varlen_attn

RESULTS = Path(__file__).parent / "results"

# name -> (head_dim, head_dim_v, api kwargs)
ROWS = {
    "d64-full": (64, 64, {}),
    "d64-causal": (64, 64, {"is_causal": True}),
    "d96-causal": (96, 96, {"is_causal": True}),
    "d128-full": (128, 128, {}),
    "d128-causal": (128, 128, {"is_causal": True}),
    "d192v128-causal": (192, 128, {"is_causal": True}),
    "d256-causal": (256, 256, {"is_causal": True}),
    "d128-window1024-causal": (128, 128, {"is_causal": True, "window_size": (1024, 0)}),
    "d128-softcap-causal": (128, 128, {"is_causal": True, "softcap": 30.0}),
    "d64-sink-window128": (64, 64, {"window_size": (128, 0), "sink": True}),
    "d128-seqused-causal": (128, 128, {"is_causal": True, "seqused": True}),
}
QUICK = ("d64-causal", "d128-causal", "d192v128-causal", "d128-softcap-causal")


def _inputs(head_dim: int, head_dim_v: int, kwargs: dict) -> dict:
    torch.manual_seed(0)
    lengths = (torch.randint(1, 4096 // 64 + 1, (16,)) * 64).tolist()
    total = sum(lengths)
    cu_seq = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)

    def randn(heads: int, dim: int) -> torch.Tensor:
        return torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    extra = {key: value for key, value in kwargs.items() if key not in ("sink", "seqused")}
    if kwargs.get("sink"):
        extra["sink"] = torch.randn(16, device="cuda")
    if kwargs.get("seqused"):
        extra["seqused_k"] = torch.tensor([max(n - 32, 0) for n in lengths], dtype=torch.int32, device="cuda")
    pairs = sum(n * (n + 1) // 2 if kwargs.get("is_causal") else n * n for n in lengths)
    return {"q": randn(16, head_dim), "k": randn(4, head_dim), "v": randn(4, head_dim_v), "cu_seq": cu_seq,
            "kwargs": extra, "flops": 2.0 * (head_dim + head_dim_v) * 16 * pairs}


def _time(kernel: str, inputs: dict) -> tuple[float, float]:
    torch._dynamo.reset()
    q, k, v, cu_seq = inputs["q"], inputs["k"], inputs["v"], inputs["cu_seq"]

    def attention(q, k, v):
        return varlen_attn(q, k, v, cu_seq, cu_seq, enable_gqa=True, **inputs["kwargs"])

    compiled = torch.compile(attention, fullgraph=True)
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[-1], device="cuda", dtype=torch.bfloat16)
    with config.patch(kernel=kernel):
        with torch.no_grad():
            _, codes = run_and_get_code(compiled, q, k, v)
            ran_fa4 = any("_fa4_forward_into" in code for code in codes)
            if ran_fa4 != (kernel == "fa4"):  # a silent fallback must not make a row of the table
                raise RuntimeError(f"kernel={kernel!r} but the compiled forward {'calls' if ran_fa4 else 'does not call'} FA4")
            forward = do_bench(lambda: compiled(q, k, v), warmup=50, rep=200, return_mode="median")
        compiled(q, k, v).backward(grad)

        def step():
            compiled(q, k, v).backward(grad)

        both = do_bench(step, warmup=50, rep=200, grad_to_none=[q, k, v], return_mode="median")
    return forward, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--tag", default="choice")
    parser.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = parser.parse_args()
    from varlen_compile import _compat

    if _compat.fa4_interface()[0] is None:
        raise SystemExit(f"bench_choice.py needs FlashAttention 4: {_compat.fa4_interface()[1]}")
    names = QUICK if args.quick else tuple(ROWS)
    rows = []
    for name in names:
        head_dim, head_dim_v, kwargs = ROWS[name]
        inputs = _inputs(head_dim, head_dim_v, kwargs)
        row = {"case": name}
        for kernel in ("triton", "fa4"):
            try:
                row[f"{kernel}_fwd_ms"], row[f"{kernel}_fwdbwd_ms"] = _time(kernel, inputs)
            except Exception as error:  # report and go on
                row[f"{kernel}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        row["fwd_tflops"] = {k: inputs["flops"] / row[f"{k}_fwd_ms"] / 1e9 for k in ("triton", "fa4") if f"{k}_fwd_ms" in row}
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = [f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; 16 seqs <= 4096, 16 q heads, 4 kv heads; "
             "compiled behind our op; median ms; ratio = template / FA4 (above 1: FA4 faster)", "",
             "| case | template fwd | FA4 fwd | fwd ratio | template fwd+bwd | FA4 fwd+bwd | fwd+bwd ratio | default |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "triton_fwd_ms" not in row or "fa4_fwd_ms" not in row:
            lines.append(f"| {row['case']} | " + " | ".join(str(row.get(k, "-"))[:40] for k in ("triton_error", "fa4_error")) + " | | | | | |")
            continue
        fwd = row["triton_fwd_ms"] / row["fa4_fwd_ms"]
        both = row["triton_fwdbwd_ms"] / row["fa4_fwdbwd_ms"]
        pick = "FA4" if fwd > 1 and both > 1 else "template"
        lines.append(f"| {row['case']} | {row['triton_fwd_ms']:.3f} | {row['fa4_fwd_ms']:.3f} | {fwd:.2f} | "
                     f"{row['triton_fwdbwd_ms']:.3f} | {row['fa4_fwdbwd_ms']:.3f} | {both:.2f} | {pick} |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(table + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
