"""Quickstart: packed (variable-length) attention, eager and torch.compile'd, forward and backward.

Packs a few random sequences of different lengths into one ``(T, H, D)`` tensor, runs
``varlen_attn`` eagerly and under ``torch.compile(fullgraph=True)``, prints the max error of
each against the exact float64 reference, and ends with a one-line verdict against the
project's tolerance: an error at most twice that of the same attention computed plainly in the
input dtype, plus 1e-5. Runs on CUDA (bf16) when present, else on the CPU (float32).

On the CPU, eager and compiled results are identical: there the compiled graph calls the op's
eager implementation (the exact per-sequence reference), since the Triton kernels are
CUDA-only. On CUDA, eager runs aten's flash attention and compiled code our Triton kernels, so
the two differ by rounding.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch

from varlen_compile import AuxRequest, varlen_attn
from varlen_compile.reference import attention_forward


def pack(lengths: list[int], device: torch.device) -> torch.Tensor:
    """Sequence lengths -> int32 cumulative offsets ``cu_seq`` of shape ``(N + 1,)``."""
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    return offsets.to(torch.int32)


def attention(query, key, value, cu_seq, max_len):
    """Causal self-attention within each packed sequence; also returns the log-sum-exp."""
    return varlen_attn(
        query, key, value, cu_seq, cu_seq, max_len, max_len,
        is_causal=True, return_aux=AuxRequest(lse=True),
    )


def run(fn, query, key, value, cu_seq, max_len, grad_out):
    """Forward and backward of ``fn``: ``out``, ``lse`` and ``(dq, dk, dv)``."""
    inputs = [x.detach().requires_grad_() for x in (query, key, value)]
    out, lse = fn(*inputs, cu_seq, max_len)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, lse, grads


def reference(query, key, value, cu_seq, grad_out, dtype):
    """Exact causal attention per sequence computed in ``dtype``: ``out``, ``lse``, gradients."""
    inputs = [x.detach().to(dtype).requires_grad_() for x in (query, key, value)]
    out, lse = attention_forward(*inputs, cu_seq, cu_seq, is_causal=True, compute_dtype=dtype)
    return out, lse, torch.autograd.grad(out, inputs, grad_out.to(dtype))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error, skipping the rows both mark +inf (lse of rows that attend no key)."""
    actual, expected = actual.double(), expected.double()
    both_inf = torch.isinf(actual) & torch.isinf(expected)
    return (actual - expected).masked_fill(both_inf, 0.0).abs().max().item()


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    lengths = [37, 0, 5, 128, 1, 64]  # empty and length-1 sequences are fine
    heads, head_dim = 4, 64
    total = sum(lengths)
    cu_seq = pack(lengths, device)
    max_len = max(lengths)  # an optional hint: pass None and nothing changes
    query, key, value = (
        torch.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3)
    )
    grad_out = torch.randn(total, heads, head_dim, device=device, dtype=dtype)

    # The oracle: exact attention per sequence in float64, gradients by float64 autograd. The
    # same computation in the input dtype sets the error budget (twice its error, plus 1e-5).
    ref_out, ref_lse, ref_grads = reference(query, key, value, cu_seq, grad_out, torch.float64)
    plain = reference(query, key, value, cu_seq, grad_out, dtype)
    budgets = [2 * max_error(p, r) + 1e-5 for p, r in zip((plain[0], plain[1], *plain[2]), (ref_out, ref_lse, *ref_grads))]

    compiled = torch.compile(attention, fullgraph=True)
    print(f"device: {device} ({dtype}), {len(lengths)} sequences, {total} tokens, "
          f"{heads} heads x {head_dim}")
    passed = True
    for name, fn in (("eager", attention), ("compiled", compiled)):
        out, lse, grads = run(fn, query, key, value, cu_seq, max_len, grad_out)
        errors = [max_error(x, ref) for x, ref in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads))]
        passed &= all(error <= budget for error, budget in zip(errors, budgets))
        print(f"{name:>8}: max error vs float64 reference: " + ", ".join(
            f"{label} {error:.2e}" for label, error in zip(("out", "lse", "dq", "dk", "dv"), errors)
        ))
    if device.type == "cpu":
        print("(identical on the CPU: there the compiled graph calls the op's eager implementation, "
              "the exact per-sequence reference; the Triton kernels are CUDA-only)")
    print(f"{'PASS' if passed else 'FAIL'}: eager and compiled are each within twice the error of a plain "
          f"{str(dtype).removeprefix('torch.')} reference (+1e-5) on out, lse and every gradient")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
