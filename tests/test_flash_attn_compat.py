"""varlen_compile.flash_attn_compat.flash_attn_varlen_func: FlashAttention 2's signature and
conventions (bottom-right causal, windows, GQA, the lse layout with return_attn_probs), equal to
varlen_attn, checked against the float64 reference, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from factory import AttnSpec, assert_matches_reference, spec_id
from varlen_compile import AuxRequest, varlen_attn
from varlen_compile.flash_attn_compat import flash_attn_varlen_func

SPECS = [
    AttnSpec((9, 1, 14), (12, 3, 14), heads_q=6, heads_kv=2, is_causal=True),
    AttnSpec((9, 1, 14), (4, 3, 20), heads_q=4, heads_kv=4, window_size=(3, 1)),
    AttnSpec((16, 5), heads_q=3, heads_kv=1, is_causal=True, window_size=(4, -1), scale=0.3),
    AttnSpec((7, 0, 8), (0, 5, 8), heads_q=2, heads_kv=2),
]


def _fa2_call(spec: AttnSpec, case, **kwargs):
    """The call FA2 code makes: positional tensors and max lengths, FA2's keyword names."""
    return flash_attn_varlen_func(
        case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, case.max_q, case.max_k,
        softmax_scale=spec.scale, causal=spec.is_causal, window_size=spec.window_size, **kwargs,
    )


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_matches_varlen_attn_and_reference(spec):
    case = spec.make(requires_grad=True)
    out, lse, attn_probs = _fa2_call(spec, case, return_attn_probs=True)
    expected_out, expected_lse = varlen_attn(
        *case.inputs(), case.max_q, case.max_k, spec.is_causal, scale=spec.scale,
        window_size=spec.window_size, enable_gqa=True, return_aux=AuxRequest(lse=True),
    )
    assert attn_probs is None  # as FA2 returns it without dropout
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert lse.shape == (spec.heads_q, case.q.shape[0]) and lse.dtype == torch.float32  # FA2's (H, total_q)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
    assert_matches_reference(case, out, lse, grads, grad_out=grad_out, **spec.ref_kwargs)


def test_causal_is_bottom_right_aligned():
    """FA2's convention (since 2.1): with fewer queries than keys, the last query sees every key;
    query i of L_q attends keys j <= i + L_k - L_q."""
    spec = AttnSpec((2,), (5,), heads_q=1, head_dim=8, is_causal=True)
    case = spec.make()
    value = torch.eye(5)[:, None, :].repeat(1, 1, 8 // 5 + 1)[..., :8]  # key j carries one-hot e_j
    out = flash_attn_varlen_func(case.q, case.k, value, case.cu_seq_q, case.cu_seq_k, 2, 5, causal=True)
    attended = out[:, 0, :5] > 0
    assert attended.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_default_returns_out_only_and_hints_are_optional():
    spec = SPECS[0]
    case = spec.make()
    out = flash_attn_varlen_func(
        case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k,
        torch.tensor(1), None, causal=True,  # a tensor max_seqlen is ignored (no sync): even a wrong one
    )
    assert isinstance(out, torch.Tensor) and out.shape == case.q.shape
    assert torch.equal(out, _fa2_call(spec, case))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"dropout_p": 0.1}, r"dropout_p=0.1: dropout is not supported yet; pass dropout_p=0.0"),
        ({"block_table": torch.zeros(3, 1, dtype=torch.int32)}, r"block_table is not supported .* pass block_table=None"),
    ],
    ids=["dropout", "block-table"],
)
def test_unsupported_arguments_raise(kwargs, pattern):
    spec = SPECS[0]
    with pytest.raises(ValueError, match=rf"^flash_attn_varlen_func \(varlen_compile\): {pattern}"):
        _fa2_call(spec, spec.make(), **kwargs)


def test_softcap_and_alibi_follow_fa2_conventions():
    """FA2's softcap and alibi_slopes: the same attention as varlen_attn's (whose conventions
    are checked against transformers' Gemma 2 and SDPA with an ALiBi bias in
    test_reference.py)."""
    from varlen_compile import varlen_attn

    spec = SPECS[0]
    case = spec.make()
    slopes = torch.rand(case.q.shape[1])
    out = _fa2_call(spec, case, softcap=30.0, alibi_slopes=slopes)
    expected = varlen_attn(
        *case.inputs(), is_causal=spec.is_causal, window_size=spec.window_size, scale=spec.scale,
        enable_gqa=case.q.shape[1] != case.k.shape[1], softcap=30.0, alibi_slopes=slopes,
    )
    assert torch.equal(out, expected)
    assert not torch.equal(out, _fa2_call(spec, case))


def test_deterministic_is_accepted():
    spec = SPECS[0]
    case = spec.make()
    assert torch.equal(_fa2_call(spec, case, deterministic=True), _fa2_call(spec, case))


def test_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    spec = SPECS[0]
    case = spec.make(requires_grad=True)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(flash_attn_varlen_func, backend=counter, fullgraph=True)
    args = (case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, case.max_q, case.max_k)
    out = compiled(*args, causal=True)
    expected = flash_attn_varlen_func(*args, causal=True)
    grad_out = torch.randn_like(out)
    inputs = (case.q, case.k, case.v)
    for actual, wanted in zip(
        (out, *torch.autograd.grad(out, inputs, grad_out)), (expected, *torch.autograd.grad(expected, inputs, grad_out))
    ):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()
