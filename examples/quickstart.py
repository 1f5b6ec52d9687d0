"""Quickstart: packed (variable-length) attention, eager and torch.compile'd, forward and backward.

Packs a few random sequences of different lengths into one ``(T, H, D)`` tensor, runs
``varlen_attn`` eagerly and under ``torch.compile(fullgraph=True)``, and prints the max error of
each against the exact float64 reference. Runs on CUDA (bf16) when present, else on the CPU
(float32).

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

    # The oracle: exact attention per sequence in float64, gradients by float64 autograd.
    ref_inputs = [x.detach().double().requires_grad_() for x in (query, key, value)]
    ref_out, ref_lse = attention_forward(*ref_inputs, cu_seq, cu_seq, is_causal=True)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())

    compiled = torch.compile(attention, fullgraph=True)
    print(f"device: {device} ({dtype}), {len(lengths)} sequences, {total} tokens, "
          f"{heads} heads x {head_dim}")
    for name, fn in (("eager", attention), ("compiled", compiled)):
        out, lse, grads = run(fn, query, key, value, cu_seq, max_len, grad_out)
        grad_errors = ", ".join(
            f"{grad_name} {max_error(grad, ref):.2e}"
            for grad_name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads)
        )
        print(f"{name:>8}: max error vs float64 reference: out {max_error(out, ref_out):.2e}, "
              f"lse {max_error(lse, ref_lse):.2e}, {grad_errors}")


if __name__ == "__main__":
    main()
