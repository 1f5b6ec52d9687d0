"""Export packed attention and run it from an AOTInductor package, on new batch sizes.

An inference module (fused qkv Linear -> varlen_attn -> out Linear) is exported with a dynamic
token count and sequence count (``torch.export``), compiled ahead of time into a ``.pt2``
package (``torch._inductor.aoti_compile_and_package``), loaded back
(``torch._inductor.aoti_load_package``) and run on batches of other sizes, against eager.

On CUDA the package holds our Triton kernel, compiled ahead of time (no Python kernel runs
inside it). Elsewhere the package calls the op's eager implementation: ``import varlen_compile``
before loading it, so that the op is registered. Runs on CUDA when present, else on the CPU.

    python examples/export_aoti.py [--package /tmp/packed_attention.pt2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn
from torch.export import Dim

import varlen_compile  # noqa: F401  (registers torch.ops.varlen_compile.*, also for loading)
from varlen_compile import varlen_attn


class PackedSelfAttention(nn.Module):
    """Causal self-attention over a packed batch ``x`` ``(T, H * D)`` with offsets ``cu_seq``."""

    def __init__(self, num_heads: int = 4, head_dim: int = 64) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        width = num_heads * head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cu_seq: torch.Tensor) -> torch.Tensor:
        total = x.shape[0]
        query, key, value = (t.view(total, self.num_heads, self.head_dim) for t in self.qkv(x).chunk(3, -1))
        attn = varlen_attn(query, key, value, cu_seq, cu_seq, is_causal=True)
        return self.out(attn.reshape(total, self.num_heads * self.head_dim))


def packed_batch(lengths: list[int], width: int, device: torch.device, dtype: torch.dtype):
    """Random tokens ``(T, width)`` and the int32 offsets of ``lengths``."""
    cu_seq = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    return torch.randn(sum(lengths), width, device=device, dtype=dtype), cu_seq


def main(argv: list[str] | None = None) -> str:
    """Export, package, load and check; returns the package path (exits 1 on a mismatch)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=os.path.join(tempfile.gettempdir(), "packed_attention.pt2"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = PackedSelfAttention().to(device, dtype).eval()
    width = model.num_heads * model.head_dim

    example = packed_batch([5, 17, 9], width, device, dtype)
    dynamic_shapes = {"x": {0: Dim("tokens", min=2)}, "cu_seq": {0: Dim("offsets", min=2)}}
    program = torch.export.export(model, example, dynamic_shapes=dynamic_shapes)
    path = torch._inductor.aoti_compile_and_package(program, package_path=args.package)
    print(f"packaged for {device} ({dtype}): {path}")

    loaded = torch._inductor.aoti_load_package(path)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    worst = 0.0
    with torch.no_grad():
        for lengths in ([3, 40, 1, 12], [64], [7, 7, 7, 0, 2, 31]):  # other T and N than exported
            x, cu_seq = packed_batch(lengths, width, device, dtype)
            error = (loaded(x, cu_seq) - model(x, cu_seq)).abs().max().item()
            worst = max(worst, error)
            print(f"  lengths {lengths}: max |package - eager| = {error:.2e}")
    verdict = "PASS" if worst <= tolerance else "FAIL"
    print(f"{verdict}: package matches eager within {tolerance:g} on every batch (worst {worst:.2e})")
    if verdict == "FAIL":
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    main()
