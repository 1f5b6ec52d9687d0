"""Registers, spill stack and shared memory of our kernels compiled for sm_90, on any machine
(no GPU needed: Triton compiles for a GPUTarget, cuobjdump reads the cubin).

    python benchmarks/regs_sm90.py                  # the default configs, causal and full
    python benchmarks/regs_sm90.py --sweep-backward # candidate backward tiles at D=128, MHA

Spills (STACK > 0 bytes per thread) cost local-memory traffic in the inner loops; a config
that spills less is a candidate to time on the GPU (ab_kernels.py / sweep_configs.py), not a
result by itself. Run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tools"))
import compile_sm90 as tool  # noqa: E402  (the sm_90 compile check's signature helpers)

from varlen_compile.lowering import launcher  # noqa: E402
from varlen_compile.lowering.configs import (  # noqa: E402
    BackwardConfig,
    backward_constexprs,
    default_backward_config,
    default_forward_config,
    kernel_constexprs,
)
from varlen_compile.params import AttnOptions  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def resource_usage(compiled) -> dict[str, int]:
    """``{"REG": .., "STACK": .., "SHARED": ..}`` from ``cuobjdump --dump-resource-usage``
    (SHARED: the kernel's dynamic shared memory from Triton's metadata)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(cuobjdump), "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    os.unlink(handle.name)
    usage = {}
    for line in text.splitlines():
        for part in line.split():
            key, _, value = part.partition(":")
            if key in ("REG", "STACK") and value.isdigit():
                usage[key] = int(value)
    usage["SHARED"] = compiled.metadata.shared
    return usage


def _compile(kernel, constexprs: dict, num_warps: int, num_stages: int):
    signature = tool._signature(kernel, constexprs, "bf16")
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=TARGET,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def backward(head_dim: int, options: AttnOptions, config: BackwardConfig) -> dict[str, int]:
    constexprs = backward_constexprs(options, tool._layout(False, False), head_dim, head_dim, torch.bfloat16)
    constexprs.update(HAS_GRAD_LSE=False, BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1,
                      BLOCK_M2=config.block_m2, BLOCK_N2=config.block_n2)
    return resource_usage(_compile(launcher._kernels().varlen_bwd_kernel, constexprs, config.num_warps, config.num_stages))


def forward(head_dim: int, options: AttnOptions) -> dict[str, int]:
    config = default_forward_config(head_dim, torch.bfloat16)
    constexprs = dict(kernel_constexprs(options, tool._layout(False, False), head_dim, head_dim, torch.bfloat16),
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    return resource_usage(_compile(launcher._kernels().varlen_fwd_kernel, constexprs, config.num_warps, config.num_stages))


BACKWARD_CANDIDATES = [
    BackwardConfig(64, 128, 128, 64, 8, 3),
    BackwardConfig(64, 128, 128, 64, 8, 2),
    BackwardConfig(64, 128, 128, 64, 8, 1),
    BackwardConfig(32, 128, 128, 32, 8, 3),
    BackwardConfig(64, 64, 64, 64, 4, 3),
    BackwardConfig(32, 64, 64, 32, 4, 3),
    BackwardConfig(64, 64, 64, 64, 8, 2),
]


def _fields(config) -> str:
    return "/".join(str(value) for value in dataclasses.astuple(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-backward", action="store_true")
    args = parser.parse_args()
    masks = {"causal": AttnOptions(is_causal=True), "full": AttnOptions()}
    print("| kernel | head dim | mask | config | REG | STACK (B/thread) | shared (B) |\n|---|---|---|---|---|---|---|")
    if args.sweep_backward:
        for config in BACKWARD_CANDIDATES:
            for mask, options in masks.items():
                usage = backward(128, options, config)
                print(f"| bwd | 128 | {mask} | {_fields(config)} | {usage['REG']} | {usage['STACK']} | {usage['SHARED']} |", flush=True)
        return
    for head_dim in (64, 128):
        for mask, options in masks.items():
            usage = forward(head_dim, options)
            config = default_forward_config(head_dim, torch.bfloat16)
            print(f"| fwd | {head_dim} | {mask} | {_fields(config)} | {usage['REG']} | {usage['STACK']} | {usage['SHARED']} |", flush=True)
            for group in (1, 4):
                config = default_backward_config(head_dim, torch.bfloat16, group)
                usage = backward(head_dim, options, config)
                print(f"| bwd (GQA {group}) | {head_dim} | {mask} | {_fields(config)} | {usage['REG']} | {usage['STACK']} | {usage['SHARED']} |", flush=True)


if __name__ == "__main__":
    main()
