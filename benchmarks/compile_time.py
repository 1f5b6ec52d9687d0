"""Cold-cache compile time of a forward+backward graph that calls varlen_attn (no max-autotune).

    python benchmarks/compile_time.py            # prints seconds; run in a fresh process

Points Inductor's and Triton's caches at new empty folders before torch is imported, so
nothing is reused from earlier runs.
"""

from __future__ import annotations

import os
import tempfile
import time

cache = tempfile.mkdtemp(prefix="varlen_compile_cold_")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")

import torch  # noqa: E402

from varlen_compile import varlen_attn  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, heads: int = 16, head_dim: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.proj = torch.nn.Linear(heads * head_dim, heads * head_dim)

    def forward(self, x, cu_seq):
        total = x.shape[0]
        q, k, v = (t.view(total, self.heads, self.head_dim) for t in self.qkv(x).chunk(3, -1))
        return self.proj(varlen_attn(q, k, v, cu_seq, cu_seq, is_causal=True).reshape(total, -1))


def main() -> None:
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


if __name__ == "__main__":
    main()
