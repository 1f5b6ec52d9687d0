"""``sweep``: tile configs of the shared kernels, timed against aten flash (GPU) or compiled for
sm_90 to read registers and spills (any machine)."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import harness, internals
from .harness import CASES, Case, log_row, make_inputs

HELP = """\
Tile configs of the shared kernels, through the standalone launcher (the templates' math, no
Inductor compile per config), against aten flash on the standard cases: per case, each config's
median ms and its speed relative to aten (forward, or forward+backward with --backward). Use it
to choose the defaults in lowering/configs.py.

--regs needs no GPU: it compiles the same candidates (defaults first) for sm_90 with Triton's
NVIDIA backend, as real launches specialize them (16-byte aligned pointers, strides multiples of
16), and prints registers, spill stack (bytes per thread) and shared memory per block from the
cubin (cuobjdump). Spills cost local-memory traffic in the inner loops; a config that spills less
is a candidate to time, not a result by itself. Run it with TRITON_INTERPRET unset."""

# Forward: (block_m, block_n, warps, stages); backward: (block_m1, block_n1, block_m2, block_n2, warps, stages).
FORWARD_CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
         (64, 128, 4, 3), (128, 128, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3),
          (64, 128, 4, 2), (128, 64, 8, 4)],
}
BACKWARD_CANDIDATES = {
    64: [(32, 128, 128, 32, 4, 3), (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 3), (64, 64, 64, 64, 4, 2),
         (32, 128, 128, 32, 8, 3), (64, 128, 128, 64, 8, 3)],
    128: [(32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 2), (64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 8, 2),
          (32, 128, 128, 32, 8, 3), (64, 64, 64, 64, 4, 3), (32, 64, 64, 32, 4, 3),
          # the least-spilling tiles at sm_90 (--regs)
          (32, 64, 64, 32, 8, 2), (64, 64, 128, 64, 8, 2), (64, 64, 64, 64, 8, 2), (64, 32, 64, 32, 4, 2)],
}
CASES_BY_HEAD_DIM = {64: ("headline", "headline-causal"), 128: ("d128", "d128-causal")}


# ----------------------------------------------------------------------------- timings


def aten_times(case: Case, x, backward: bool) -> tuple[float, tuple]:
    """aten flash's forward (or forward+backward) ms and its outputs (out, or dq, dk, dv)."""
    forward, backward_fn = internals.aten_functions(case, x)
    q, k, v = x.detached()
    out, lse = forward(q, k, v)
    if not backward:
        return harness.bench_ms(lambda: forward(q, k, v), rep=200, warmup=25), (out,)

    def step():
        out, lse = forward(q, k, v)
        return backward_fn(x.grad_out, q, k, v, out, lse)

    return harness.bench_ms(step, rep=200, warmup=25), tuple(step())


def config_row(case: Case, x, fields: tuple, backward: bool, aten_ms: float, aten_out: tuple) -> dict:
    """One config's time and its max difference from aten's outputs."""
    row: dict = {"case": case.name, "cfg": fields}
    try:
        if backward:
            config = internals.backward_config(*fields)
            forward = internals.standalone_forward(case, x)
            out, lse = forward()
            run = internals.standalone_backward(case, x, out, lse, config)
            ours = run()
            row["ms"] = harness.bench_ms(run, rep=200, warmup=25) + harness.bench_ms(forward, rep=100, warmup=25)
        else:
            run = internals.standalone_forward(case, x, internals.forward_config(*fields))
            ours = run()[:1]
            row["ms"] = harness.bench_ms(run, rep=200, warmup=25)
            row["tflops"] = harness.forward_flops(case) / row["ms"] / 1e9
        row["max_diff_vs_aten"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, aten_out))
        row["vs_aten"] = aten_ms / row["ms"]
    except Exception as error:  # noqa: BLE001 -- report and go on
        row["error"] = harness.error_text(error, 120)
    return row


def timings(cases: list[Case], backward: bool) -> list[dict]:
    rows = []
    for case in cases:
        x = make_inputs(case)
        aten_ms, aten_out = aten_times(case, x, backward)
        torch.cuda.empty_cache()
        for fields in (BACKWARD_CANDIDATES if backward else FORWARD_CANDIDATES)[case.head_dim]:
            row = config_row(case, x, fields, backward, aten_ms, aten_out)
            log_row(row)
            rows.append(row)
        harness.log.info(f"# {case.name}: aten {'fwd+bwd' if backward else 'fwd'} {aten_ms:.3f} ms")
    return rows


def timings_markdown(rows: list[dict], backward: bool) -> str:
    body = [[row["case"], "/".join(map(str, row["cfg"])), f"{row['ms']:.3f}" if "ms" in row else row["error"][:40],
             f"{row['vs_aten']:.2f}x" if "vs_aten" in row else "-"] for row in rows]
    title = "forward+backward" if backward else "forward"
    return "\n".join([f"{harness.device_line()}; bf16; {title}; standalone launcher, do_bench medians", ""]
                     + harness.markdown_table(["case", "config", "ms", "vs aten"], body))


# ----------------------------------------------------------------------------- --regs


def _signature(kernel, constexprs: dict) -> dict[str, str]:
    """Triton's signature of one of our kernels, bf16 (tensor arguments are the upper-case ones)."""
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("CU_Q", "CU_K", "SEQUSED_K", "BLOCK_TABLE"):
            signature[name] = "*i32"
        elif name in ("LSE", "DELTA", "GRAD_LSE", "SINK", "ALIBI"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


def compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int, gqa_group: int = 1):
    """``kernel`` compiled for sm_90 as launched on torch tensors: ``gqa_group == 1`` a constant
    (Triton specializes 1), pointers 16-byte aligned and strides multiples of 16 (without those
    hints the compile differs a lot: 1656 B of stack instead of 160 for the d128 causal
    backward). A GQA launch passes the group as a plain int32 (no constant, no hint)."""
    constexprs = dict(constexprs)
    if "gqa_group" in inspect.signature(kernel.fn).parameters and gqa_group == 1:
        constexprs["gqa_group"] = 1
    signature = _signature(kernel, constexprs)
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(signature)
             if signature[name].startswith("*") or name.startswith("stride_")}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled) -> dict[str, int]:
    """``{"REG", "STACK", "SHARED"}`` of a compiled kernel (per thread from ``cuobjdump
    --dump-resource-usage``, shared memory per block from Triton's metadata)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", handle.name], capture_output=True,
                              text=True, check=True).stdout
    usage = {"SHARED": compiled.metadata.shared}
    for part in text.split():
        key, _, value = part.partition(":")
        if key in ("REG", "STACK") and value.isdigit():
            usage[key] = int(value)
    return usage


def _variants(fields: tuple, head_dim: int, causal: bool, backward: bool, gqa_group: int, label: str):
    """``(label, kernel, constexprs)`` of one config: the forward also packed where the group packs."""
    kernels = internals.kernels()
    constexprs = internals.sm90_constexprs(head_dim, causal, backward)
    if backward:
        blocks = dict(zip(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"), fields[:4]))
        return [(label, kernels.varlen_bwd_kernel, {**constexprs, **blocks})]
    variants = [(label, kernels.varlen_fwd_kernel, {**constexprs, "BLOCK_M": fields[0], "BLOCK_N": fields[1], "PACK_GQA": 1})]
    pack = internals.packed_group(internals.forward_config(*fields, pack_gqa=True), gqa_group)
    if pack > 1:
        variants.append((f"fwd packed G={pack}", variants[0][1], {**variants[0][2], "PACK_GQA": pack}))
    return variants


def regs(head_dims: list[int], backward: bool, gqa_group: int) -> str:
    """Every candidate (defaults first, marked) compiled for sm_90, bf16, causal and full."""
    body = []
    for head_dim in head_dims:
        case = Case("regs", (1,), 1, 1, head_dim, True)  # MHA defaults (the forward's do not depend on the group)
        default = internals.config_fields(internals.default_backward_config(case) if backward
                                          else internals.contiguous_forward_config(case))[:6 if backward else 4]
        candidates = (BACKWARD_CANDIDATES if backward else FORWARD_CANDIDATES).get(head_dim, [])
        for fields in [default] + [c for c in candidates if c != default]:
            label = ("bwd" if backward else "fwd") + (" (default)" if fields == default else "")
            for mask in ("causal", "full"):
                for name, kernel, constexprs in _variants(fields, head_dim, mask == "causal", backward, gqa_group, label):
                    usage = resource_usage(compile_sm90(kernel, constexprs, fields[-2], fields[-1], gqa_group))
                    body.append([name, head_dim, mask, "/".join(map(str, fields)), usage.get("REG"), usage.get("STACK"),
                                 usage["SHARED"]])
                    harness.log.info(" | ".join(map(str, body[-1])))
    return "\n".join(harness.markdown_table(["kernel", "head dim", "mask", "config", "REG", "STACK (B/thread)", "shared (B)"], body))


def cmd_sweep(args: argparse.Namespace) -> None:
    head_dims = [int(d) for d in args.head_dims.split(",")]
    if args.regs:
        harness.log.info(regs(head_dims, args.backward, args.gqa_group))
        return
    names = args.cases.split(",") if args.cases else [n for d in head_dims for n in CASES_BY_HEAD_DIM[d]]
    rows = timings(harness.pick(CASES, names), args.backward)
    harness.write_results(args.out, args.tag, rows, timings_markdown(rows, args.backward))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sweep", help="tile configs vs aten flash, or their sm_90 registers (--regs)",
                                 description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", default="64,128", help="comma-separated, of 64 and 128 (default: %(default)s)")
    parser.add_argument("--backward", action="store_true", help="backward configs (timed as forward+backward)")
    parser.add_argument("--cases", default=None, help="standard cases (default: two per head dim)")
    parser.add_argument("--regs", action="store_true", help="registers and spills at sm_90 instead of timings (no GPU)")
    parser.add_argument("--gqa-group", type=int, default=1,
                        help="with --regs (forward): compile for this GQA group, unpacked and packed")
    harness.add_output_arguments(parser, "sweep")
    parser.set_defaults(func=cmd_sweep)
