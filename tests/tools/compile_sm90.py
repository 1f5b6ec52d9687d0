"""Compile the standalone kernels for sm_90 (H100/H200) on any machine, GPU or not.

Run as a script (``python tests/tools/compile_sm90.py``) with ``TRITON_INTERPRET`` unset: the
interpreter replaces ``@triton.jit`` functions, and interpreted functions cannot be compiled.
Prints one JSON object per case: ``{"case": ..., "ok": bool, "shared": bytes, "error": str}``.
tests/test_kernels_compile.py runs it and checks every line.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from varlen_compile.lowering import launcher
from varlen_compile.lowering.configs import default_backward_config, default_forward_config, kernel_constexprs
from varlen_compile.params import AttnOptions, BatchLayout

_DUMMY = torch.empty(1)

FEATURES = {
    "plain-causal": (AttnOptions(is_causal=True), False, False),
    "softcap-sink-alibi-window": (
        AttnOptions(window_left=64, softcap=30.0, sink=_DUMMY, alibi_slopes=_DUMMY), True, False,
    ),
    "paged-seqused-causal-softcap": (AttnOptions(is_causal=True, softcap=50.0), True, True),
}


def _signature(kernel, constexprs: dict, dtype: str) -> dict[str, str]:
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("CU_Q", "CU_K", "SEQUSED_K", "BLOCK_TABLE"):
            signature[name] = "*i32"
        elif name in ("LSE", "DELTA", "GRAD_LSE", "SINK", "ALIBI"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = f"*{dtype}"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _layout(seqused: bool, paged: bool) -> BatchLayout:
    return BatchLayout(_DUMMY, _DUMMY, seqused_k=_DUMMY if seqused else None, block_table=_DUMMY if paged else None)


def cases():
    kernels = launcher._kernels()
    for feature, (options, seqused, paged) in FEATURES.items():
        for head_dim, head_dim_v in ((128, 128), (192, 128), (64, 64)):
            config = default_forward_config(max(head_dim, head_dim_v), torch.bfloat16)
            constexprs = dict(
                kernel_constexprs(options, _layout(seqused, paged), head_dim, head_dim_v, torch.bfloat16),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            )
            yield f"fwd-{feature}-d{head_dim}v{head_dim_v}", kernels.varlen_fwd_kernel, constexprs, config
        if paged:
            continue
        for head_dim, head_dim_v in ((128, 128), (192, 128)):
            for grad_lse in (False, True):
                config = default_backward_config(max(head_dim, head_dim_v), torch.bfloat16, 2)
                constexprs = launcher._backward_constexprs(
                    options, _layout(seqused, False), head_dim, head_dim_v, torch.bfloat16
                )
                constexprs.update(
                    HAS_GRAD_LSE=grad_lse, BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1,
                    BLOCK_M2=config.block_m2, BLOCK_N2=config.block_n2,
                )
                name = f"bwd-{feature}-d{head_dim}v{head_dim_v}{'-grad-lse' if grad_lse else ''}"
                yield name, kernels.varlen_bwd_kernel, constexprs, config


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for name, kernel, constexprs, config in cases():
        try:
            compiled = triton.compile(
                ASTSource(kernel, _signature(kernel, constexprs, "bf16"), constexprs=constexprs),
                target=target, options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
            result = {"case": name, "ok": True, "shared": compiled.metadata.shared, "error": ""}
        except Exception:  # noqa: BLE001 - reported to the test
            result = {"case": name, "ok": False, "shared": 0, "error": traceback.format_exc(limit=3)[-2000:]}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
