"""A/B of the standalone Triton kernels: this checkout's against an earlier version, in one
process, same inputs, same configs (``triton.testing.do_bench`` medians, interleaved rounds).

    python benchmarks/ab_kernels.py --base-rev 5784b19 --cases headline-causal,d128-causal
    python benchmarks/ab_kernels.py --base .ab_base      # templates saved in a folder
    python benchmarks/ab_kernels.py --save-base 5784b19   # write .ab_base/ (for the device
                                                          # machine, which has no .git: carry it)

``--base-rev`` reads ``lowering/templates/{standalone,varlen_common}.py.jinja`` of that commit
(``git show``); ``--base`` a folder holding the two files. A base whose kernels take today's
arguments runs through today's launcher (only the kernel module is swapped), so any kernel
change with an unchanged signature can be compared; an older base must take the arguments of
the version before session 3 (``GQA_GROUP`` a constexpr, no ``total_k``/``gqa_group``),
which ``_launch_base`` adapts.
"""

from __future__ import annotations

import argparse
import inspect
import linecache
import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from bench import all_cases, forward_flops, make_inputs  # noqa: E402

from varlen_compile.lowering import launcher  # noqa: E402
from varlen_compile.lowering.configs import (  # noqa: E402
    SEARCH_WIDTH,
    default_backward_config,
    default_forward_config,
    dot_precision,
    padded_head_dim,
)
from varlen_compile.params import AttnOptions, BatchLayout  # noqa: E402


def _load(directory: Path) -> types.ModuleType:
    source = "import triton\nimport triton.language as tl\n" + "".join(
        (directory / f"{name}.py.jinja").read_text() for name in ("standalone", "varlen_common")
    )
    filename = f"<ab-base-{abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("ab_base_kernels")
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def _from_rev(rev: str, folder: Path | None = None) -> Path:
    """The two template files of commit ``rev``, written to ``folder`` (default: a new
    temporary one)."""
    root = Path(__file__).resolve().parents[1]
    folder = folder or Path(tempfile.mkdtemp(prefix=f"ab-{rev}-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("standalone", "varlen_common"):
        text = subprocess.run(["git", "show", f"{rev}:lowering/templates/{name}.py.jinja"], cwd=root,
                              capture_output=True, text=True, check=True).stdout
        (folder / f"{name}.py.jinja").write_text(text)
    return folder


def _same_signature(kernels) -> bool:
    current = launcher._kernels()
    return all(
        list(inspect.signature(getattr(kernels, name).fn).parameters) == list(inspect.signature(getattr(current, name).fn).parameters)
        for name in ("varlen_fwd_kernel", "varlen_bwd_kernel", "varlen_bwd_preprocess_kernel")
        if hasattr(kernels, name)
    )


def _launch_same_signature(kernels, q, k, v, cu_seq, causal, grad_out):
    """Forward and backward through today's launcher with the base's kernel module swapped in."""
    layout, options = BatchLayout(cu_seq, cu_seq), AttnOptions(causal)
    current = launcher._kernels

    def swapped(call):
        launcher._kernels = lambda: kernels
        try:
            return call()
        finally:
            launcher._kernels = current

    out, lse = swapped(lambda: launcher.forward(q, k, v, layout, options))
    return (lambda: swapped(lambda: launcher.forward(q, k, v, layout, options)),
            lambda: swapped(lambda: launcher.backward(grad_out, q, k, v, out, lse, layout, options)))


def _launch_base(kernels, q, k, v, cu_seq, causal, grad_out):
    """Forward and backward with the base kernels (the pre-session-3 signatures)."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    scale = 1 / math.sqrt(head_dim)
    num_seqs = cu_seq.shape[0] - 1
    fwd = default_forward_config(head_dim, q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(heads_q, total, device=q.device, dtype=torch.float32)
    common = dict(
        WINDOW_LEFT=-1, WINDOW_RIGHT=0 if causal else -1, GQA_GROUP=heads_q // heads_kv,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=padded_head_dim(head_dim), SEARCH_WIDTH=SEARCH_WIDTH,
        DOT_PRECISION=dot_precision(q.dtype),
    )

    def forward():
        grid = (-(-total // fwd.block_m) + num_seqs, heads_q)
        kernels.varlen_fwd_kernel[grid](
            q, k, v, cu_seq, cu_seq, out, lse, num_seqs, total,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), scale, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n,
            num_warps=fwd.num_warps, num_stages=fwd.num_stages, **common,
        )
        return out, lse

    bwd = default_backward_config(head_dim, q.dtype, heads_q // heads_kv)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def backward():
        delta = launcher.attention_delta(grad_out, out)
        kv_slots = -(-total // bwd.block_n1) + num_seqs
        q_slots = -(-total // bwd.block_m2) + num_seqs
        grid = (kv_slots + (heads_q // heads_kv) * q_slots, heads_kv)
        kernels.varlen_bwd_kernel[grid](
            q, k, v, grad_out, lse, delta, cu_seq, cu_seq, dq, dk, dv, num_seqs, total, total,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1), dk.stride(0),
            dk.stride(1), dv.stride(0), dv.stride(1), scale,
            BLOCK_M1=bwd.block_m1, BLOCK_N1=bwd.block_n1, BLOCK_M2=bwd.block_m2, BLOCK_N2=bwd.block_n2,
            num_warps=bwd.num_warps, num_stages=bwd.num_stages, **common,
        )
        return dq, dk, dv

    return forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=".ab_base", help="a folder with the base's two template files")
    parser.add_argument("--base-rev", default=None, help="a git commit to take the base templates from")
    parser.add_argument("--save-base", default=None, metavar="REV", help="write REV's templates to --base and exit")
    parser.add_argument("--cases", default="headline-causal,d128,d128-causal,gqa-causal,many-short-causal")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.save_base:
        print(f"{args.save_base}'s templates in {_from_rev(args.save_base, Path(args.base))}")
        return
    base = _load(_from_rev(args.base_rev) if args.base_rev else Path(args.base))
    launch = _launch_same_signature if _same_signature(base) else _launch_base
    print("| case | fwd base ms | fwd new ms | new/base | bwd base ms | bwd new ms | new/base |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        case = all_cases()[name]
        x = make_inputs(case)
        q, k, v, grad_out = (t.detach() for t in (x.q, x.k, x.v, x.grad_out))
        base_fwd, base_bwd = launch(base, q, k, v, x.cu_seq, case.causal, grad_out)
        layout, options = BatchLayout(x.cu_seq, x.cu_seq), AttnOptions(case.causal)
        new_out, new_lse = launcher.forward(q, k, v, layout, options)
        base_out, _ = base_fwd()
        assert (new_out.float() - base_out.float()).abs().max() < 1e-2, "versions disagree"
        timings: dict[str, list[float]] = {key: [] for key in ("fb", "fn", "bb", "bn")}
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            timings["fb"].append(do_bench(base_fwd, warmup=25, rep=100, return_mode="median"))
            timings["fn"].append(do_bench(lambda: launcher.forward(q, k, v, layout, options), warmup=25, rep=100, return_mode="median"))
            timings["bb"].append(do_bench(base_bwd, warmup=25, rep=100, return_mode="median"))
            timings["bn"].append(do_bench(lambda: launcher.backward(grad_out, q, k, v, new_out, new_lse, layout, options), warmup=25, rep=100, return_mode="median"))
        fb, fn, bb, bn = (min(timings[key]) for key in ("fb", "fn", "bb", "bn"))
        print(f"| {name} ({forward_flops(case) / fn / 1e9:.0f} TFLOP/s fwd) | {fb:.3f} | {fn:.3f} | {fn / fb:.3f} | {bb:.3f} | {bn:.3f} | {bn / bb:.3f} |", flush=True)


if __name__ == "__main__":
    main()
