"""Eager numerics of varlen_attn on the CPU against the float64 reference (the error rule)."""

from __future__ import annotations

import pytest
import torch

from factory import (
    AttnSpec,
    allowed_pairs,
    assert_matches_reference,
    dtype_id,
    make_case,
    spec_id,
)
from varlen_compile import AuxRequest, varlen_attn

DTYPES = [torch.float32, torch.bfloat16]

# Sequences of up to ~25 tokens: long enough that the max error is a stable statistic (with
# single-digit lengths, bf16 gradients exceed the 2x budget for about 1 seed in 500).
SPECS = [
    AttnSpec((17, 1, 23)),
    AttnSpec((17, 1, 23), is_causal=True),
    # Per sequence: q > k, q < k, queries without keys, keys without queries, length 1.
    AttnSpec((19, 6, 9, 0, 1), (9, 21, 0, 12, 1)),
    AttnSpec((19, 6, 9, 0, 1), (9, 21, 0, 12, 1), is_causal=True),
    AttnSpec((0, 1, 15, 0, 1), is_causal=True, tag="len0-len1"),
    AttnSpec((15, 9, 24), heads_q=6, heads_kv=2, is_causal=True),
    AttnSpec((15, 9, 24), (6, 18, 24), heads_q=3, heads_kv=1),
    AttnSpec((21, 12), scale=0.37),
    AttnSpec((27, 12), (18, 21), window_size=(2, 1)),
    AttnSpec((27, 12), (18, 21), window_size=(3, -1)),
    AttnSpec((27, 12), (18, 21), window_size=(-1, 2)),
    # Window (0, 0) with q > k: the first rows of the first sequence attend no key.
    AttnSpec((18, 15), (6, 15), heads_q=3, heads_kv=1, window_size=(0, 0)),
    AttnSpec((24, 9), (24, 15), is_causal=True, window_size=(2, -1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_forward(spec, dtype):
    case = spec.make(dtype=dtype)
    out, lse = varlen_attn(*case.inputs(), **spec.api_kwargs, return_aux=AuxRequest(lse=True))
    assert out.shape == case.q.shape and out.dtype == dtype
    assert lse.shape == (spec.heads_q, case.q.shape[0]) and lse.dtype == torch.float32
    assert_matches_reference(case, out, lse, **spec.ref_kwargs)


@pytest.mark.parametrize("loss", ["out", "out+lse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gradients(spec, dtype, loss):
    case = spec.make(dtype=dtype, requires_grad=True)
    out, lse = varlen_attn(*case.inputs(), **spec.api_kwargs, return_aux=AuxRequest(lse=True))
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if loss == "out+lse" else None
    if grad_lse is None:
        grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
    else:
        grads = torch.autograd.grad((out, lse), (case.q, case.k, case.v), (grad_out, grad_lse))
    assert_matches_reference(
        case, out, lse, grads, grad_out=grad_out, grad_lse=grad_lse, **spec.ref_kwargs
    )


def test_gradient_through_lse_changes_the_result():
    """The lse term really reaches the inputs (so the "out+lse" tests check something)."""
    spec = AttnSpec((5, 3), is_causal=True)
    case = spec.make(requires_grad=True)
    out, lse = varlen_attn(*case.inputs(), **spec.api_kwargs, return_aux=AuxRequest(lse=True))
    grad_out = torch.randn_like(out)
    without = torch.autograd.grad(out, case.q, grad_out, retain_graph=True)[0]
    with_lse = torch.autograd.grad((out, lse), case.q, (grad_out, torch.randn_like(lse)))[0]
    assert not torch.allclose(without, with_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_inputs(dtype):
    """q, k, v as views of one fused projection (``qkv.chunk(3, -1)`` + ``view``)."""
    spec = AttnSpec((6, 0, 9, 1), is_causal=True)
    case = spec.make(dtype=dtype, fused_qkv=True, requires_grad=True)
    assert not case.q.is_contiguous() and case.q.stride(-1) == 1
    out, lse = varlen_attn(*case.inputs(), **spec.api_kwargs, return_aux=AuxRequest(lse=True))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
    assert_matches_reference(case, out, lse, grads, grad_out=grad_out, **spec.ref_kwargs)


ROWS_WITHOUT_KEYS = [
    AttnSpec((4, 2, 3), (0, 2, 1), tag="empty-keys"),
    AttnSpec((6, 3), (2, 3), window_size=(0, 0)),
    AttnSpec((7, 2), (3, 5), is_causal=True),
]


@pytest.mark.parametrize("spec", ROWS_WITHOUT_KEYS, ids=spec_id)
def test_rows_attending_no_key(spec):
    """Such rows give out = 0 exactly and lse = +inf; every other row has a finite lse."""
    case = spec.make()
    out, lse = varlen_attn(*case.inputs(), **spec.api_kwargs, return_aux=AuxRequest(lse=True))
    no_key = torch.cat([
        ~allowed_pairs(len_q, len_k, spec.is_causal, spec.window_size).any(-1)
        for len_q, len_k in zip(spec.lengths_q, spec.key_lengths)
    ])
    assert no_key.any() and not no_key.all()
    assert torch.equal(out[no_key], torch.zeros_like(out[no_key]))
    assert torch.isposinf(lse[:, no_key]).all()
    assert torch.isfinite(lse[:, ~no_key]).all()


def test_is_causal_as_eighth_positional_argument():
    """``varlen_attn(q, k, v, cu, cu, max_len, max_len, True)``, the first torch release's call."""
    case = make_case([5, 1, 7])
    positional = varlen_attn(*case.inputs(), case.max_q, case.max_k, True)
    keyword = varlen_attn(*case.inputs(), is_causal=True)
    assert torch.equal(positional, keyword)
    assert not torch.allclose(positional, varlen_attn(*case.inputs()))


def test_default_scale_and_max_hints():
    """scale=None means 1/sqrt(D); exact max_q/max_k hints change nothing."""
    case = make_case([5, 1, 7], head_dim=16)
    default = varlen_attn(*case.inputs(), is_causal=True)
    explicit = varlen_attn(*case.inputs(), is_causal=True, scale=0.25)
    hinted = varlen_attn(*case.inputs(), case.max_q, case.max_k, is_causal=True)
    assert torch.equal(default, explicit)
    assert torch.equal(default, hinted)
    assert not torch.allclose(default, varlen_attn(*case.inputs(), is_causal=True, scale=0.5))


@pytest.mark.parametrize("return_aux", [None, AuxRequest(), AuxRequest(lse=True)], ids=["none", "lse_false", "lse_true"])
def test_return_aux(return_aux):
    case = make_case([3, 4])
    result = varlen_attn(*case.inputs(), return_aux=return_aux)
    if return_aux is not None and return_aux.lse:
        out, lse = result
        assert lse.shape == (4, 7) and lse.dtype == torch.float32
    else:
        assert isinstance(result, torch.Tensor) and result.shape == case.q.shape


@pytest.mark.parametrize("features", ["plain", "sink-alibi-window"])
def test_float64_is_exact_forward_and_backward(features):
    """float64 inputs: out, lse (float64 too) and every gradient (q, k, v and the sink, with a
    gradient flowing into lse) match float64 autograd through the reference to rounding (1e-12):
    nothing on the way is rounded to float32, the sink included."""
    case = make_case([7, 0, 1, 12], [9, 3, 1, 12], heads_q=4, heads_kv=2, head_dim=16, dtype=torch.float64,
                     requires_grad=True)
    extra = {}
    if features != "plain":
        extra = dict(sink=torch.randn(4, dtype=torch.float64, requires_grad=True),
                     alibi_slopes=torch.rand(4, dtype=torch.float64), window_size=(4, -1))
    out, lse = varlen_attn(*case.inputs(), is_causal=True, enable_gqa=True, return_aux=AuxRequest(lse=True), **extra)
    leaves = [case.q, case.k, case.v] + ([extra["sink"]] if "sink" in extra else [])
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))

    from varlen_compile import reference

    copies = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    reference_extra = dict(extra, **({"sink": copies[3]} if "sink" in extra else {}))
    ref_out, ref_lse = reference.attention_forward(
        *copies[:3], case.cu_seq_q, case.cu_seq_k, is_causal=True, compute_dtype=torch.float64, **reference_extra
    )
    ref_grads = torch.autograd.grad((ref_out, ref_lse), copies, (grad_out, grad_lse))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    for name, grad, ref in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads):
        assert grad.dtype == torch.float64, name
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12, msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_the_backward_op_uses_the_lse_it_is_given(dtype):
    """The backward op computes probabilities from the ``lse`` passed in (context parallelism
    passes a merged one), never from one of its own: a shifted lse scales every probability by
    e^-1, so dV is e^-1 times the true one."""
    from varlen_compile.ops import call_backward, call_forward
    from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

    case = make_case([6, 1, 9], heads_q=2, head_dim=16, dtype=dtype)
    layout, options, none = BatchLayout(case.cu_seq_q, case.cu_seq_k), AttnOptions(is_causal=True), OptionalInputs()
    out, lse = call_forward(case.q, case.k, case.v, layout, options, none)
    grad_out = torch.randn_like(out)
    _, _, dv = call_backward(grad_out, case.q, case.k, case.v, out, lse, layout, options, none)
    _, _, dv_shifted = call_backward(grad_out, case.q, case.k, case.v, out, lse + 1, layout, options, none)
    torch.testing.assert_close(dv_shifted, dv * torch.exp(torch.tensor(-1.0, dtype=dtype)))
