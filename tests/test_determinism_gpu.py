"""GPU tests of bitwise-repeatable gradients.

``flash_attn_varlen_func(..., deterministic=True)`` promises what FlashAttention 2 promises: the
same inputs give the same dQ, dK and dV, bit for bit, on every backward pass. So does every
entry point under ``torch.use_deterministic_algorithms(True)``. aten flash's and FA4's backwards
sum dQ with atomics and do not (with the default ``kernel="auto"``, eager calls run aten flash);
both requests route the backward to our Triton kernels. Cases follow FA2's
``test_flash_attn_varlen_deterministic``: several sequences of random lengths up to 2048 tokens,
causal and not, head dims 64 and 128, bf16, and many repeated backward passes, eager and compiled.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from factory import make_case
from varlen_compile import config, varlen_attn
from varlen_compile.flash_attn_compat import flash_attn_varlen_func

pytestmark = [pytest.mark.gpu]

REPEATS = 20


@contextlib.contextmanager
def _deterministic_algorithms():
    previous, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _fa2_drop_in(case, causal):
    return flash_attn_varlen_func(
        case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, case.max_q, case.max_k, causal=causal, deterministic=True
    )


def _varlen_attn(case, causal):
    return varlen_attn(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, case.max_q, case.max_k, is_causal=causal,
                       enable_gqa=True)


ENTRY_POINTS = {
    "fa2-deterministic": (_fa2_drop_in, contextlib.nullcontext),
    "varlen-attn-deterministic-algorithms": (_varlen_attn, _deterministic_algorithms),
    "fa2-deterministic-algorithms": (
        lambda case, causal: flash_attn_varlen_func(
            case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, case.max_q, case.max_k, causal=causal
        ),
        _deterministic_algorithms,
    ),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["auto", "aten"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_gradients_repeat_bit_for_bit(entry, kernel, causal, head_dim, compiled):
    """Under either request, whatever the preference (``aten`` asks for aten flash, eager and
    compiled), the gradients repeat bit for bit."""
    torch._dynamo.reset()
    attend, mode = ENTRY_POINTS[entry]
    generator = torch.Generator().manual_seed(head_dim + causal)
    lengths = torch.randint(1, 2049, (6,), generator=generator).tolist()
    case = make_case(lengths, heads_q=8, heads_kv=2, head_dim=head_dim, dtype=torch.bfloat16, device="cuda",
                     requires_grad=True, generator=generator)
    grad_out = torch.randn(case.q.shape[0], 8, head_dim, dtype=torch.bfloat16, device="cuda")
    step = torch.compile(attend, fullgraph=True, dynamic=False) if compiled else attend
    with mode(), config.patch(kernel=kernel):
        first = None
        for _ in range(REPEATS):
            out = step(case, causal)
            grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
            assert all(not grad.isnan().any() for grad in grads)
            if first is None:
                first = [grad.clone() for grad in grads]
                continue
            for name, grad, wanted in zip(("dq", "dk", "dv"), grads, first):
                assert torch.equal(grad, wanted), f"{name} differs between backward passes"
