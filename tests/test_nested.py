"""``varlen_compile.nested.scaled_dot_product_attention`` on jagged nested tensors (NJTs).

CPU (CI): torch's own SDPA on the same NJTs where torch supports the case (non-causal, no
GQA), the float64 reference everywhere (causal, GQA, empty and single-token sequences,
q_len != k_len, strided values), ``torch.compile(fullgraph=True)`` against eager, dense
passthrough, and every error message. GPU (marked ``gpu``): bf16 causal GQA against the
reference, eager and compiled (the compiled code running our templates), and agreement with
torch's jagged SDPA, which on CUDA also takes causal masks.

Inputs are NJT leaves in ``(B, j, H, D)`` (``requires_grad``) built on packed tensors of
:mod:`factory`; SDPA gets their ``.transpose(1, 2)``. Gradients are those of the leaves,
compared through their ``values()`` with the reference's packed gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from factory import (
    AttnSpec, VarlenCase, assert_matches_reference, dtype_id, max_error, reference_outputs, spec_id,
)
from varlen_compile.nested import scaled_dot_product_attention


@dataclasses.dataclass
class NestedCase:
    """Packed inputs and NJT leaves ``(B, j, H, D)`` over the same data. Key and value share
    one offsets tensor; in self-attention the query shares it too."""

    packed: VarlenCase
    leaves: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def sdpa_inputs(self) -> tuple[torch.Tensor, ...]:
        """query, key, value in SDPA's ``(B, H, j, D)`` layout."""
        return tuple(leaf.transpose(1, 2) for leaf in self.leaves)


def nested_case(spec: AttnSpec, *, cache_seqlens: bool = False, **make_kwargs) -> NestedCase:
    """Fresh random inputs for ``spec`` (``make_kwargs`` go to ``AttnSpec.make``).
    ``cache_seqlens``: the NJTs carry their min/max lengths, as ``torch.nested.nested_tensor``
    gives (then passed on as max hints)."""
    packed = spec.make(**make_kwargs)
    offsets_q = packed.cu_seq_q.long()
    offsets_k = offsets_q if spec.lengths_k is None else packed.cu_seq_k.long()

    def leaf(values: torch.Tensor, offsets: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        seqlens = {"min_seqlen": min(lengths), "max_seqlen": max(lengths)} if cache_seqlens else {}
        return torch.nested.nested_tensor_from_jagged(values.detach(), offsets, **seqlens).requires_grad_()

    leaves = (
        leaf(packed.q, offsets_q, spec.lengths_q),
        leaf(packed.k, offsets_k, spec.key_lengths),
        leaf(packed.v, offsets_k, spec.key_lengths),
    )
    return NestedCase(packed, leaves)


def run_nested(attention, case: NestedCase, grad_out: torch.Tensor, **kwargs):
    """``(out, grads)``: the output NJT ``(B, H, j_q, D)`` and the packed gradients of the
    leaves for the packed cotangent ``grad_out`` ``(T_q, H_q, D)``."""
    out = attention(*case.sdpa_inputs(), **kwargs)
    grads = torch.autograd.grad(out.transpose(1, 2).values(), case.leaves, grad_out)
    return out, tuple(grad.values() for grad in grads)


def packed_values(out: torch.Tensor) -> torch.Tensor:
    """``(B, H, j, D)`` NJT -> its packed ``(T, H, D)`` values."""
    return out.transpose(1, 2).values()


def assert_same_structure(out: torch.Tensor, query: torch.Tensor) -> None:
    """``out`` is a jagged NJT with the query's ragged structure (the same nested int)."""
    assert out.is_nested and out.layout == torch.jagged
    assert out.shape == query.shape
    assert out._ragged_idx == 2
    assert (out + query).shape == query.shape


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- torch's SDPA

TORCH_SPECS = [
    AttnSpec((5, 1, 8), tag="self"),
    AttnSpec((5, 1, 8, 2), (3, 7, 1, 2), head_dim=8),
    AttnSpec((4, 0, 6, 3), (3, 0, 2, 0), heads_q=3, scale=0.3),
]


@pytest.mark.parametrize("spec", TORCH_SPECS, ids=spec_id)
def test_matches_torch_sdpa(spec: AttnSpec):
    """Where torch's jagged SDPA works (non-causal, equal heads), values and leaf gradients
    agree with it; includes empty query and key sequences."""
    case = nested_case(spec)
    grad_out = torch.randn(case.packed.q.shape)
    out, grads = run_nested(scaled_dot_product_attention, case, grad_out, scale=spec.scale)
    torch_out, torch_grads = run_nested(F.scaled_dot_product_attention, case, grad_out, scale=spec.scale)
    assert_same_structure(out, case.sdpa_inputs()[0])
    torch.testing.assert_close(packed_values(out), packed_values(torch_out))
    for name, grad, torch_grad in zip(("dq", "dk", "dv"), grads, torch_grads):
        torch.testing.assert_close(grad, torch_grad, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- float64 reference

REFERENCE_CASES = [
    pytest.param(AttnSpec((5, 1, 8, 0), is_causal=True), False, id="self-causal"),
    pytest.param(
        AttnSpec((5, 1, 8, 0, 3), (7, 1, 3, 2, 0), heads_q=6, heads_kv=2, is_causal=True), False,
        id="cross-gqa-causal",
    ),
    pytest.param(AttnSpec((3, 9, 1), (6, 2, 4), heads_q=3, heads_kv=1, scale=0.5), False, id="cross-mqa-full"),
    pytest.param(AttnSpec((6, 2, 9, 1), heads_q=2, is_causal=True), True, id="self-causal-strided"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("spec,fused_qkv", REFERENCE_CASES)
def test_matches_float64_reference(spec: AttnSpec, fused_qkv: bool, dtype: torch.dtype):
    """Output and leaf gradients meet the error rule; ``fused_qkv``: the values are strided
    views of one ``(T, 3 H D)`` projection."""
    case = nested_case(spec, dtype=dtype, fused_qkv=fused_qkv)
    grad_out = torch.randn(case.packed.q.shape, dtype=dtype)
    out, grads = run_nested(
        scaled_dot_product_attention, case, grad_out,
        is_causal=spec.is_causal, scale=spec.scale, enable_gqa=spec.heads_q != spec.kv_heads,
    )
    assert_same_structure(out, case.sdpa_inputs()[0])
    assert out.dtype == dtype
    assert_matches_reference(case.packed, packed_values(out), grads=grads, grad_out=grad_out, **spec.ref_kwargs)


def test_keeps_cached_seqlens():
    """An NJT built from a list caches its min/max lengths: they reach the output."""
    leaf = torch.nested.nested_tensor([torch.randn(7, 2, 8), torch.randn(3, 2, 8)], layout=torch.jagged)
    query = leaf.transpose(1, 2)
    out = scaled_dot_product_attention(query, query, query, is_causal=True)
    assert_same_structure(out, query)
    assert (out._maybe_max_seqlen, out._maybe_min_seqlen) == (7, 3)


# ----------------------------------------------------------------------------- torch.compile

COMPILE_SPEC = AttnSpec((5, 1, 8, 0, 3), (7, 1, 3, 2, 0), heads_q=6, heads_kv=2, is_causal=True)


def _attention_plus_query(query, key, value):
    """A residual add needs the output to share the query's ragged structure."""
    return scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True) + query


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(backend: str):
    """fullgraph=True, one frame, forward and backward equal to eager (causal, GQA, cross)."""
    case = nested_case(COMPILE_SPEC)
    grad_out = torch.randn(case.packed.q.shape)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_attention_plus_query, backend=counter, fullgraph=True)
    out, grads = run_nested(compiled, case, grad_out)
    expected_out, expected_grads = run_nested(_attention_plus_query, case, grad_out)
    assert counter.frame_count == 1
    assert_same_structure(out, case.sdpa_inputs()[0])
    actuals, expecteds = (packed_values(out),) + grads, (packed_values(expected_out),) + expected_grads
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), actuals, expecteds):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_new_lengths_do_not_recompile():
    """After the one dynamic-shape recompile, new lengths and new cached max lengths (the
    hints passed to varlen_attn) reuse the graph. Shortest lengths stay >= 2: torch
    specializes a cached length of 1."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(scaled_dot_product_attention, backend=counter, fullgraph=True)
    for lengths in ([3, 2, 5], [2, 7, 4, 2], [9, 2, 6, 3, 4]):
        query = torch.nested.nested_tensor([torch.randn(n, 2, 8) for n in lengths], layout=torch.jagged)
        key = torch.nested.nested_tensor([torch.randn(n + 1, 2, 8) for n in lengths], layout=torch.jagged)
        value = torch.nested.nested_tensor_from_jagged(
            torch.randn_like(key.values()), key.offsets(),
            min_seqlen=min(lengths) + 1, max_seqlen=max(lengths) + 1,
        )
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        expected = scaled_dot_product_attention(query, key, value, is_causal=True)
        torch.testing.assert_close(packed_values(compiled(query, key, value, is_causal=True)), packed_values(expected))
    assert counter.frame_count == 2


def _separate_njts(spec: AttnSpec) -> NestedCase:
    """q, k and v as separate NJTs, each from its own offsets tensor (as users often build
    them, and as torch's SDPA takes them): three ragged structures, k and v of equal lengths."""
    case = nested_case(spec)
    leaves = tuple(
        torch.nested.nested_tensor_from_jagged(leaf.values().detach(), leaf.offsets().clone()).requires_grad_()
        for leaf in case.leaves
    )
    return NestedCase(case.packed, leaves)


SEPARATE_SPEC = AttnSpec((5, 1, 8, 0), heads_q=4, heads_kv=2, is_causal=True)


def test_separate_njts_match_reference_eager_and_compiled():
    """Separately built q, k, v (equal lengths, three offsets tensors): torch's SDPA takes them,
    and so does ours, eagerly and compiled (one frame), against the float64 reference."""
    case = _separate_njts(SEPARATE_SPEC)
    assert case.leaves[1].offsets() is not case.leaves[2].offsets()
    grad_out = torch.randn(case.packed.q.shape)
    kwargs = {"is_causal": True, "enable_gqa": True}
    out, grads = run_nested(scaled_dot_product_attention, case, grad_out, **kwargs)
    assert_same_structure(out, case.sdpa_inputs()[0])
    assert_matches_reference(case.packed, packed_values(out), grads=grads, grad_out=grad_out, **SEPARATE_SPEC.ref_kwargs)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(scaled_dot_product_attention, backend=counter, fullgraph=True)
    compiled_out, compiled_grads = run_nested(compiled, case, grad_out, **kwargs)
    assert counter.frame_count == 1
    for actual, expected in zip((packed_values(compiled_out),) + compiled_grads, (packed_values(out),) + grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_separate_njts_agree_with_torch_sdpa():
    spec = AttnSpec((5, 1, 8, 0), heads_q=2, heads_kv=2)
    case = _separate_njts(spec)
    grad_out = torch.randn(case.packed.q.shape)
    out, grads = run_nested(scaled_dot_product_attention, case, grad_out)
    torch_out, torch_grads = run_nested(F.scaled_dot_product_attention, case, grad_out)
    for actual, expected in zip((packed_values(out),) + grads, (packed_values(torch_out),) + torch_grads):
        torch.testing.assert_close(actual, expected)


def test_builds_output_without_fx_tracing_check(monkeypatch):
    """torch.nested.nested_tensor_from_jagged asks torch.fx whether it is tracing, which logs an
    "is_fx_tracing will return true ..." warning; the output is built without it."""
    import torch.fx._symbolic_trace as symbolic_trace

    query = _sdpa_layout()  # built with nested_tensor_from_jagged: before the patch
    calls = []
    monkeypatch.setattr(symbolic_trace, "is_fx_tracing_warning", lambda: calls.append(1))
    scaled_dot_product_attention(query, query, query, is_causal=True)
    assert not calls


# ----------------------------------------------------------------------------- dense passthrough


def _dense_inputs(heads_kv: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 6, 8), torch.randn(2, heads_kv, 5, 8), torch.randn(2, heads_kv, 5, 8)


DENSE_CALLS = {
    "plain": dict,
    "causal": lambda: {"is_causal": True},
    "bool-mask-scale": lambda: {"attn_mask": torch.rand(6, 5) > 0.3, "scale": 0.3},
    "float-mask": lambda: {"attn_mask": torch.randn(2, 1, 6, 5)},
    "gqa": lambda: {"enable_gqa": True},
    "dropout": lambda: {"dropout_p": 0.5},
}


@pytest.mark.parametrize("make_kwargs", DENSE_CALLS.values(), ids=DENSE_CALLS.keys())
def test_dense_inputs_pass_through(make_kwargs):
    """Dense tensors reach torch's SDPA with every argument unchanged: bit-identical results."""
    kwargs = make_kwargs()
    query, key, value = _dense_inputs(heads_kv=2 if kwargs.get("enable_gqa") else 4)
    torch.manual_seed(1)  # the same dropout mask for both calls
    out = scaled_dot_product_attention(query, key, value, **kwargs)
    torch.manual_seed(1)
    expected = F.scaled_dot_product_attention(query, key, value, **kwargs)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- errors


def _jagged(lengths: list[int], heads: int = 2) -> torch.Tensor:
    """An NJT ``(B, j, H, D)`` with fresh offsets."""
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.nested.nested_tensor_from_jagged(torch.randn(int(offsets[-1]), heads, 8), offsets)


def _sdpa_layout(lengths: tuple[int, ...] = (3, 5), heads: int = 2) -> torch.Tensor:
    return _jagged(list(lengths), heads).transpose(1, 2)


def _self(x: torch.Tensor, **kwargs) -> dict:
    return {"query": x, "key": x, "value": x, **kwargs}


def _holes() -> torch.Tensor:
    """An NJT with holes (offsets plus lengths, as ``narrow`` gives)."""
    return torch.nested.nested_tensor_from_jagged(
        torch.randn(9, 2, 8), torch.tensor([0, 3, 4, 9]), lengths=torch.tensor([2, 1, 3])
    ).transpose(1, 2)


def _key_value_lengths_differ() -> dict:
    """key and value built apart, with different lengths (and the same total)."""
    return {"query": _sdpa_layout(), "key": _sdpa_layout((3, 5)), "value": _sdpa_layout((4, 4))}


def _key_value(lengths: list[int], heads: int = 2) -> dict:
    """key and value in SDPA layout, sharing one offsets tensor."""
    key = _jagged(lengths, heads)
    value = torch.nested.nested_tensor_from_jagged(torch.randn_like(key.values()), key.offsets())
    return {"key": key.transpose(1, 2), "value": value.transpose(1, 2)}


ERROR_CASES = {
    "attn-mask": (
        lambda: _self(_sdpa_layout(), attn_mask=torch.ones(8, 8, dtype=torch.bool)),
        ValueError, "attn_mask is not supported",
    ),
    "dropout": (lambda: _self(_sdpa_layout(), dropout_p=0.1), ValueError, "dropout_p=0.1: dropout is not supported yet"),
    "mixed-nested-dense": (
        lambda: {"query": _sdpa_layout(), "key": torch.randn(2, 2, 5, 8), "value": torch.randn(2, 2, 5, 8)},
        TypeError, "all nested or all dense",
    ),
    "strided-layout": (
        lambda: _self(torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)])),
        ValueError, "only torch.jagged nested tensors",
    ),
    "three-dims": (
        lambda: _self(torch.nested.nested_tensor_from_jagged(torch.randn(8, 8), torch.tensor([0, 3, 8]))),
        ValueError, "must be 4-D",
    ),
    "bjhd-layout": (lambda: _self(_jagged([3, 5])), ValueError, r"pass query.transpose\(1, 2\)"),
    "holes": (lambda: _self(_holes()), ValueError, "has holes"),
    "key-value-lengths-differ": (
        _key_value_lengths_differ, ValueError, r"key and value must have equal sequence lengths, got \[3, 5\] and \[4, 4\]"
    ),
    "is-causal-string": (lambda: _self(_sdpa_layout(), is_causal="no"), TypeError, "is_causal must be a bool"),
    "scale-inf": (lambda: _self(_sdpa_layout(), scale=float("inf")), ValueError, "scale must be finite"),
    "dropout-string": (lambda: _self(_sdpa_layout(), dropout_p="0"), TypeError, "dropout_p must be a float or None"),
    "batch-mismatch": (
        lambda: {"query": _sdpa_layout(), **_key_value([2, 4, 1])}, ValueError, "same number of sequences"
    ),
    "gqa-not-enabled": (
        lambda: {"query": _sdpa_layout(heads=4), **_key_value([3, 5], heads=2)},
        ValueError, "enable_gqa=True",
    ),
}


@pytest.mark.parametrize("make_kwargs,error,match", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_errors(make_kwargs, error: type[Exception], match: str):
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(**make_kwargs())


# ----------------------------------------------------------------------------- GPU

GPU_SPEC = AttnSpec(
    (130, 0, 1, 257, 64), (90, 3, 1, 257, 200), heads_q=6, heads_kv=2, head_dim=64, is_causal=True
)
# Inductor names template kernels triton_tem_fused_*; the template bodies call these helpers.
FWD_KERNEL = "varlen_fwd_tile("
BWD_KERNEL = "varlen_bwd_dkdv_tile("


def _causal_gqa(query, key, value):
    return scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "compiled", "compiled-cached-seqlens"])
def test_gpu_bf16_causal_gqa_matches_reference(mode: str):
    """bf16, causal, GQA, q_len != k_len, empty and single-token sequences; compiled: one
    fullgraph frame whose forward and backward run our Triton templates, also when the NJTs
    cache their max lengths (SymInt hints in the graph)."""
    case = nested_case(
        GPU_SPEC, cache_seqlens=mode == "compiled-cached-seqlens", dtype=torch.bfloat16, device="cuda"
    )
    grad_out = torch.randn(case.packed.q.shape, dtype=torch.bfloat16, device="cuda")
    if mode == "eager":
        out, grads = run_nested(_causal_gqa, case, grad_out)
    else:
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(_causal_gqa, backend=counter, fullgraph=True)
        (out, grads), codes = run_and_get_code(run_nested, compiled, case, grad_out)
        source = "\n".join(codes)
        assert counter.frame_count == 1
        assert FWD_KERNEL in source and BWD_KERNEL in source
    assert_same_structure(out, case.sdpa_inputs()[0])
    assert_matches_reference(case.packed, packed_values(out), grads=grads, grad_out=grad_out, **GPU_SPEC.ref_kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_bf16_agrees_with_torch_sdpa(is_causal: bool):
    """On CUDA torch's eager jagged SDPA takes causal masks too (not GQA): ours and torch's
    differ by no more than the error budget of the bf16 reference, output and gradients."""
    spec = AttnSpec((130, 1, 257, 64), (90, 3, 300, 64), heads_q=4, head_dim=64, is_causal=is_causal)
    case = nested_case(spec, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(case.packed.q.shape, dtype=torch.bfloat16, device="cuda")
    out, grads = run_nested(scaled_dot_product_attention, case, grad_out, is_causal=is_causal)
    torch_out, torch_grads = run_nested(F.scaled_dot_product_attention, case, grad_out, is_causal=is_causal)
    oracle = reference_outputs(case.packed, torch.float64, grad_out=grad_out, **spec.ref_kwargs)
    plain = reference_outputs(case.packed, torch.bfloat16, grad_out=grad_out, **spec.ref_kwargs)
    pairs = zip(
        ("out", "dq", "dk", "dv"),
        (packed_values(out),) + grads,
        (packed_values(torch_out),) + torch_grads,
        (oracle[0],) + oracle[2],
        (plain[0],) + plain[2],
    )
    for name, ours, theirs, exact, plain_result in pairs:
        budget = 2 * max_error(plain_result, exact) + 1e-5
        assert max_error(ours, theirs) <= budget, f"{name}: ours and torch's differ beyond {budget:.3g}"
