"""A/B of the softcap's tanh: ``tanh.approx.f32`` (FAST_TANH) against the exact exp2 formula,
in one process on one GPU, through the standalone launcher (bf16, causal).

    python benchmarks/ab_softcap.py

For each case: forward and backward ms without softcap, with the exact tanh, with the fast one
(medians of ``triton.testing.do_bench``, variants interleaved over 3 rounds), and the max error
of each softcap variant's output and gradients against the float64 reference on a small batch,
next to the error of the same computation in bf16 (the DESIGN.md budget is twice that).
"""

from __future__ import annotations

import argparse

import torch
import triton

from varlen_compile import reference
from varlen_compile.lowering import configs, launcher
from varlen_compile.params import AttnOptions, BatchLayout

SOFTCAP = 30.0
CASES = {  # name: (sequences, max length, heads, head dim)
    "16 x <=4096, 16x128": (16, 4096, 16, 128),
    "8 x <=2048, 16x64": (8, 2048, 16, 64),
}


def _batch(num_seqs: int, max_len: int, heads: int, head_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (num_seqs,), generator=generator)
    cu_seq = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return q, k, v, cu_seq


def _with_fast_tanh(enabled: bool):
    """Patch configs.fast_tanh (what kernel_constexprs asks) to force one path."""
    original = configs.fast_tanh

    def forced(softcap: float, dtype: torch.dtype, on_gpu: bool = True) -> bool:
        return enabled and original(softcap, dtype, on_gpu)

    configs.fast_tanh = forced
    return original


def _run(variant: str, q, k, v, layout, grad):
    softcap = 0.0 if variant == "none" else SOFTCAP
    original = _with_fast_tanh(variant == "fast")
    try:
        options = AttnOptions(True, softcap=softcap)
        out, lse = launcher.forward(q, k, v, layout, options)
        grads = launcher.backward(grad, q, k, v, out, lse, layout, options)
    finally:
        configs.fast_tanh = original
    return out, lse, grads


def _time(variant: str, q, k, v, layout, grad) -> tuple[float, float]:
    softcap = 0.0 if variant == "none" else SOFTCAP
    original = _with_fast_tanh(variant == "fast")
    try:
        options = AttnOptions(True, softcap=softcap)
        out, lse = launcher.forward(q, k, v, layout, options)
        fwd = triton.testing.do_bench(lambda: launcher.forward(q, k, v, layout, options), warmup=50, rep=200,
                                      return_mode="median")
        bwd = triton.testing.do_bench(lambda: launcher.backward(grad, q, k, v, out, lse, layout, options),
                                      warmup=50, rep=200, return_mode="median")
    finally:
        configs.fast_tanh = original
    return fwd, bwd


def _errors() -> dict[str, float]:
    """Max abs error of out, dq, dk, dv vs float64 on 4 sequences <= 512 (16 heads of 64)."""
    torch.manual_seed(0)
    q, k, v, cu_seq = _batch(4, 512, 16, 64, seed=1)
    q, k, v = (x * 2 for x in (q, k, v))  # larger logits: the tanh's saturated range too
    grad = torch.randn_like(q)
    layout = BatchLayout(cu_seq, cu_seq)
    result = {}
    exact = {}
    for dtype in (torch.float64, torch.bfloat16):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out, _ = reference.attention_forward(*leaves, cu_seq, cu_seq, is_causal=True, softcap=SOFTCAP,
                                             compute_dtype=dtype if dtype == torch.float64 else torch.bfloat16)
        grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
        exact[dtype] = [out.detach().double(), *(g.double() for g in grads)]
    oracle = exact[torch.float64]
    result["bf16 reference"] = max((b - a).abs().max().item() for a, b in zip(oracle, exact[torch.bfloat16]))
    for variant in ("exact", "fast"):
        out, _, grads = _run(variant, q, k, v, layout, grad)
        mine = [out.double(), *(g.double() for g in grads)]
        result[variant] = max((b - a).abs().max().item() for a, b in zip(oracle, mine))
    return result


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    errors = _errors()
    print("max abs error vs float64 (out, dq, dk, dv): "
          + ", ".join(f"{name} {value:.3e}" for name, value in errors.items()))
    rows = ["| case | fwd none | fwd exact | fwd fast | fast/exact | bwd none | bwd exact | bwd fast | fast/exact |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, shape in CASES.items():
        q, k, v, cu_seq = _batch(*shape)
        layout, grad = BatchLayout(cu_seq, cu_seq), torch.randn_like(q)
        samples: dict[str, list[tuple[float, float]]] = {"none": [], "exact": [], "fast": []}
        for _ in range(3):
            for variant in samples:
                samples[variant].append(_time(variant, q, k, v, layout, grad))
        fwd = {key: sorted(s[0] for s in value)[1] for key, value in samples.items()}
        bwd = {key: sorted(s[1] for s in value)[1] for key, value in samples.items()}
        rows.append(f"| {name} | {fwd['none']:.3f} | {fwd['exact']:.3f} | {fwd['fast']:.3f} | {fwd['fast'] / fwd['exact']:.3f} "
                    f"| {bwd['none']:.3f} | {bwd['exact']:.3f} | {bwd['fast']:.3f} | {bwd['fast'] / bwd['exact']:.3f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
