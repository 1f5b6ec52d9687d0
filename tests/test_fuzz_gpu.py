"""Seeded fuzzing on the GPU: random packed batches through the compiled path and the eager
launcher, forward and backward, against the float64 reference under the error rule.

12 attention configurations (head dims 32..256, fp16/bf16/fp32, GQA ratios 1/2/4/8, causal,
windows, separate or fused-qkv strided inputs) x 84 random batches = 1008 batches, each checked
through both paths. Lengths include 0 and 1 and differ between queries and keys. Each
configuration compiles once (``dynamic=True``). Long: run apart from the GPU suite with
``python -m pytest -q -m fuzz tests/``.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from factory import VarlenCase, assert_meets_error_rule, dtype_id, make_case, reference_outputs
from varlen_compile import AuxRequest, varlen_attn
from varlen_compile.lowering import launcher
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

pytestmark = [pytest.mark.gpu, pytest.mark.fuzz]

BATCHES_PER_CONFIG = 84


@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    head_dim: int
    dtype: torch.dtype
    is_causal: bool
    window: tuple[int, int]
    heads: tuple[int, int]  # (H_q, H_kv)
    fused_qkv: bool

    @property
    def id(self) -> str:
        window = "" if self.window == (-1, -1) else "-win{}_{}".format(*self.window)
        layout = "-fused" if self.fused_qkv else ""
        return (
            f"D{self.head_dim}-{dtype_id(self.dtype)}-{'causal' if self.is_causal else 'full'}{window}"
            f"-Hq{self.heads[0]}-Hkv{self.heads[1]}{layout}"
        )


CONFIGS = [
    FuzzConfig(32, torch.bfloat16, True, (-1, -1), (4, 4), False),
    FuzzConfig(64, torch.float16, False, (-1, -1), (8, 2), True),
    FuzzConfig(64, torch.bfloat16, True, (48, -1), (8, 1), False),
    FuzzConfig(80, torch.bfloat16, False, (-1, -1), (4, 1), False),
    FuzzConfig(96, torch.float16, True, (-1, -1), (6, 3), True),
    FuzzConfig(96, torch.float32, False, (32, 8), (4, 4), False),
    FuzzConfig(128, torch.bfloat16, True, (-1, -1), (8, 1), False),
    FuzzConfig(128, torch.float16, False, (64, 16), (4, 2), True),
    FuzzConfig(128, torch.float32, True, (-1, -1), (2, 2), False),
    FuzzConfig(192, torch.bfloat16, False, (-1, -1), (4, 2), False),
    FuzzConfig(256, torch.bfloat16, True, (100, -1), (8, 2), False),
    FuzzConfig(256, torch.float16, False, (-1, -1), (2, 1), True),
]


def _lengths(rng: random.Random, count: int) -> list[int]:
    """Mostly ordinary lengths, with 0 and 1 often enough to matter."""
    return [rng.choice([0, 1, rng.randint(2, 32), rng.randint(2, 400)]) for _ in range(count)]


def _random_case(rng: random.Random, config: FuzzConfig) -> VarlenCase:
    while True:
        num_seqs = rng.randint(1, 8)
        lengths_q = _lengths(rng, num_seqs)
        lengths_k = lengths_q if config.fused_qkv else _lengths(rng, num_seqs)
        if sum(lengths_q) >= 2 and sum(lengths_k) >= 2:  # T of 0 or 1 would be specialized: recompiles
            break
    return make_case(
        lengths_q, lengths_k, heads_q=config.heads[0], heads_kv=config.heads[1],
        head_dim=config.head_dim, dtype=config.dtype, device="cuda", fused_qkv=config.fused_qkv,
        requires_grad=True,
    )


def _check(case, out, lse, grads, oracle, plain, label: str) -> None:
    assert_meets_error_rule(out, oracle[0], plain[0], name=f"{label} out")
    assert_meets_error_rule(lse, oracle[1], plain[1], name=f"{label} lse")
    for name, grad, grad_oracle, grad_plain in zip(("dq", "dk", "dv"), grads, oracle[2], plain[2]):
        assert_meets_error_rule(grad, grad_oracle, grad_plain, name=f"{label} {name}")


@pytest.mark.parametrize("config", CONFIGS, ids=[config.id for config in CONFIGS])
def test_fuzz(config: FuzzConfig):
    torch._dynamo.reset()
    rng = random.Random(f"varlen-fuzz-{config.id}")
    torch.manual_seed(rng.randrange(2**31))
    options = AttnOptions(config.is_causal, None, *config.window)
    ref_kwargs = {"is_causal": config.is_causal, "window_size": config.window}
    enable_gqa = config.heads[0] != config.heads[1]

    def attention(q, k, v, cu_seq_q, cu_seq_k):
        return varlen_attn(
            q, k, v, cu_seq_q, cu_seq_k, is_causal=config.is_causal, window_size=config.window,
            enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True),
        )

    compiled = torch.compile(attention, fullgraph=True, dynamic=True)
    failures = []  # every batch runs; the test reports all that miss the rule
    for index in range(BATCHES_PER_CONFIG):
        case = _random_case(rng, config)
        grad_out = torch.randn_like(case.q)
        oracle = reference_outputs(case, torch.float64, grad_out=grad_out, **ref_kwargs)
        plain = reference_outputs(case, config.dtype, grad_out=grad_out, **ref_kwargs)
        label = f"batch {index} lengths {case.lengths_q} / {case.lengths_k}"

        out, lse = compiled(*case.inputs())
        grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
        qkv = (case.q.detach(), case.k.detach(), case.v.detach())
        layout = BatchLayout(case.cu_seq_q, case.cu_seq_k)
        eager_out, eager_lse = launcher.forward(*qkv, layout, options, OptionalInputs())
        eager_grads = launcher.backward(grad_out, *qkv, eager_out, eager_lse, layout, options, OptionalInputs())
        for path, results in (("compiled", (out, lse, grads)), ("launcher", (eager_out, eager_lse, eager_grads))):
            try:
                _check(case, *results, oracle, plain, f"{path}, {label}")
            except AssertionError as failure:
                failures.append(str(failure).splitlines()[0])
    assert not failures, f"{len(failures)} of {2 * BATCHES_PER_CONFIG} checks missed the rule:\n" + "\n".join(failures)
