"""The scoring and key features through the public API and the ops on the CPU: eager calls against the
float64 reference, opcheck of both ops with the new arguments, fullgraph compile (gradients
included, the sink's too), export keeping the arguments, the FLOP count, ``varlen_attn_out``.
The kernels' own math for these features is checked in test_features_interpreter.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from factory import assert_meets_error_rule, make_cu_seq
from varlen_compile import AuxRequest, reference, varlen_attn, varlen_attn_out
from varlen_compile.params import AttnOptions

FORWARD = torch.ops.varlen_compile.varlen_attn.default
BACKWARD = torch.ops.varlen_compile.varlen_attn_backward.default
LENGTHS_Q, LENGTHS_K = [5, 0, 1, 9], [7, 3, 1, 4]


def _batch(head_dim: int = 16, head_dim_v: int = 8, heads_q: int = 4, heads_kv: int = 2, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    return {
        "query": torch.randn(sum(LENGTHS_Q), heads_q, head_dim, dtype=dtype),
        "key": torch.randn(sum(LENGTHS_K), heads_kv, head_dim, dtype=dtype),
        "value": torch.randn(sum(LENGTHS_K), heads_kv, head_dim_v, dtype=dtype),
        "cu_seq_q": make_cu_seq(LENGTHS_Q),
        "cu_seq_k": make_cu_seq(LENGTHS_K),
    }


def _features(heads_q: int = 4) -> dict:
    return {
        "softcap": 3.0,
        "sink": torch.randn(heads_q),
        "alibi_slopes": torch.rand(heads_q),
        "seqused_k": torch.tensor([6, 0, 1, 4], dtype=torch.int32),
    }


def _reference(batch: dict, features: dict, dtype: torch.dtype, is_causal: bool, window):
    q, k, v = (batch[name].detach().to(dtype).requires_grad_() for name in ("query", "key", "value"))
    sink = features["sink"].detach().to(dtype).requires_grad_()
    options = AttnOptions(is_causal, None, *window, softcap=features["softcap"])
    out, lse = reference.attention_forward(
        q, k, v, batch["cu_seq_q"], batch["cu_seq_k"], options, sink=sink,
        alibi_slopes=features["alibi_slopes"].to(dtype), seqused_k=features["seqused_k"], compute_dtype=dtype,
    )
    return out, lse, (q, k, v, sink)


@pytest.mark.parametrize("is_causal, window", [(True, (-1, -1)), (False, (3, 1))], ids=["causal", "window"])
def test_eager_all_features_match_reference(is_causal, window):
    """All features together, GQA, D=16 / D_v=8, forward and backward (sink included)."""
    batch, features = _batch(), _features()
    leaves = {name: batch[name].clone().requires_grad_() for name in ("query", "key", "value")}
    sink = features["sink"].clone().requires_grad_()
    out, lse = varlen_attn(
        leaves["query"], leaves["key"], leaves["value"], batch["cu_seq_q"], batch["cu_seq_k"],
        is_causal=is_causal, window_size=window, enable_gqa=True, return_aux=AuxRequest(lse=True),
        **dict(features, sink=sink),
    )
    assert out.shape == (sum(LENGTHS_Q), 4, 8)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), [*leaves.values(), sink], (grad_out, grad_lse))
    results = {}
    for dtype in (torch.float64, torch.float32):
        ref_out, ref_lse, inputs = _reference(batch, features, dtype, is_causal, window)
        ref_grads = torch.autograd.grad((ref_out, ref_lse), inputs, (grad_out.to(dtype), grad_lse.to(dtype)))
        results[dtype] = (ref_out, ref_lse, *ref_grads)
    names = ("out", "lse", "dq", "dk", "dv", "dsink")
    for name, mine, exact, plain in zip(names, (out, lse, *grads), results[torch.float64], results[torch.float32]):
        assert_meets_error_rule(mine.detach(), exact.detach(), plain.detach(), name=name)


def test_opcheck_with_features():
    batch, features = _batch(), _features()
    args = (*batch.values(), None, None, True, None, -1, -1)
    kwargs = dict(features)
    torch.library.opcheck(FORWARD, args, kwargs, test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_static"))
    out, lse = FORWARD(*args, **kwargs)
    backward_args = (torch.randn_like(out), batch["query"], batch["key"], batch["value"], out, lse,
                     batch["cu_seq_q"], batch["cu_seq_k"], None, None, True, None, -1, -1)
    torch.library.opcheck(
        BACKWARD, backward_args, dict(kwargs, grad_lse=torch.randn_like(lse)), test_utils=("test_schema", "test_faketensor")
    )


def test_fake_shapes_with_value_head_dim():
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = _batch(head_dim=24, head_dim_v=16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {name: mode.from_tensor(tensor) for name, tensor in batch.items()}
        out, lse = FORWARD(*fake.values(), None, None, False, None, -1, -1)
        assert out.shape == (sum(LENGTHS_Q), 4, 16) and lse.shape == (4, sum(LENGTHS_Q))
        dq, dk, dv = BACKWARD(torch.empty_like(out), fake["query"], fake["key"], fake["value"], out, lse,
                              fake["cu_seq_q"], fake["cu_seq_k"], None, None, False, None, -1, -1)
        assert (dq.shape, dk.shape, dv.shape) == (fake["query"].shape, fake["key"].shape, fake["value"].shape)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_with_features(backend):
    """One graph, no breaks; equal to eager on the CPU (both run the reference), sink gradient
    included."""
    batch, features = _batch(), _features()

    def attention(q, k, v, sink):
        out = varlen_attn(
            q, k, v, batch["cu_seq_q"], batch["cu_seq_k"], is_causal=True, enable_gqa=True,
            **dict(features, sink=sink),
        )
        return out.square().sum()

    compiled = torch.compile(attention, backend=backend, fullgraph=True)
    inputs = [batch["query"], batch["key"], batch["value"], features["sink"]]
    eager_leaves = [x.clone().requires_grad_() for x in inputs]
    compiled_leaves = [x.clone().requires_grad_() for x in inputs]
    eager_grads = torch.autograd.grad(attention(*eager_leaves), eager_leaves)
    compiled_grads = torch.autograd.grad(compiled(*compiled_leaves), compiled_leaves)
    for eager, ours in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    assert compiled_grads[3].abs().sum() > 0


def test_export_keeps_feature_arguments():
    batch, features = _batch(), _features()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sink = torch.nn.Parameter(features["sink"].clone())

        def forward(self, q, k, v, cu_seq_q, cu_seq_k, seqused_k):
            return varlen_attn(
                q, k, v, cu_seq_q, cu_seq_k, is_causal=True, enable_gqa=True, softcap=3.0, sink=self.sink,
                alibi_slopes=features["alibi_slopes"], seqused_k=seqused_k,
            )

    args = (*batch.values(), features["seqused_k"])
    exported = torch.export.export(Block(), args)
    calls = [node for node in exported.graph.nodes if node.target == FORWARD]
    assert len(calls) == 1
    from varlen_compile.params import bind_op_args

    kwargs = bind_op_args(FORWARD, calls[0].args, calls[0].kwargs)
    assert kwargs["softcap"] == 3.0
    assert all(kwargs[name] is not None for name in ("sink", "alibi_slopes", "seqused_k"))
    torch.testing.assert_close(exported.module()(*args), Block()(*args))


def test_flop_count_uses_value_head_dim_and_seqused_k():
    """Full attention: pairs = sum over sequences of L_q * used keys; forward FLOPs are
    2 * (D + D_v) * H * pairs, backward 2 * (3D + 2 D_v) * H * pairs."""
    batch = _batch(head_dim=16, head_dim_v=8)
    seqused = torch.tensor([6, 0, 1, 4], dtype=torch.int32)
    pairs = sum(q * k for q, k in zip(LENGTHS_Q, seqused.tolist()))
    leaves = [batch[name].clone().requires_grad_() for name in ("query", "key", "value")]
    with FlopCounterMode(display=False) as counter:
        out = varlen_attn(*leaves, batch["cu_seq_q"], batch["cu_seq_k"], enable_gqa=True, seqused_k=seqused)
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.varlen_compile.varlen_attn] == 2 * (16 + 8) * 4 * pairs
    assert counts[torch.ops.varlen_compile.varlen_attn_backward] == 2 * (3 * 16 + 2 * 8) * 4 * pairs


def _paged_call(query: torch.Tensor):
    """Paged K/V (pages of 4, a scattered block table) and the same keys laid out contiguously."""
    torch.manual_seed(1)
    page_size, used = 4, [6, 0, 1, 4]
    key_pages, value_pages = torch.randn(9, page_size, 2, 16), torch.randn(9, page_size, 2, 8)
    block_table = torch.tensor([[7, 2], [0, 1], [5, 3], [8, 4]], dtype=torch.int32)
    paged = {"key": key_pages, "value": value_pages, "cu_seq_k": None, "block_table": block_table,
             "seqused_k": torch.tensor(used, dtype=torch.int32)}
    rows = [torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in block_table[s].tolist()])[:n]
            for s, n in enumerate(used)]
    contiguous = {"key": torch.cat([key_pages.flatten(0, 1)[r] for r in rows]),
                  "value": torch.cat([value_pages.flatten(0, 1)[r] for r in rows]), "cu_seq_k": make_cu_seq(used)}
    common = {"query": query, "cu_seq_q": make_cu_seq(LENGTHS_Q), "is_causal": True, "enable_gqa": True}
    return {**common, **paged}, {**common, **contiguous}


def test_paged_forward_matches_contiguous():
    paged, contiguous = _paged_call(torch.randn(sum(LENGTHS_Q), 4, 16))
    torch.testing.assert_close(varlen_attn(**paged), varlen_attn(**contiguous), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # a query that requires grad is fine without autograd
        paged["query"] = paged["query"].clone().requires_grad_()
        torch.testing.assert_close(varlen_attn(**paged), varlen_attn(**contiguous), rtol=1e-6, atol=1e-6)


def test_paged_forward_refuses_inputs_that_require_grad_eager_and_compiled():
    """Paged K/V has no backward. A query that requires grad is refused before the forward, eagerly
    and compiled alike (a compiled graph traces its backward ahead of time, so a backward that
    raised later would make compile fail while eager ran)."""
    paged, _ = _paged_call(torch.randn(sum(LENGTHS_Q), 4, 16, requires_grad=True))
    pattern = r"paged K/V \(block_table\) is forward-only .* but query requires grad; call it under torch.no_grad\(\)"
    with pytest.raises(ValueError, match=pattern):
        varlen_attn(**paged)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=pattern):
        torch.compile(lambda kwargs: varlen_attn(**kwargs), backend="aot_eager", fullgraph=True)(paged)
    torch._dynamo.reset()


def test_varlen_attn_out_writes_into_out():
    batch = _batch()
    out = torch.full((sum(LENGTHS_Q), 4, 8), float("nan"))
    result, lse = varlen_attn_out(out, *batch.values(), is_causal=True, enable_gqa=True, return_aux=AuxRequest(lse=True))
    assert result is out
    expected = varlen_attn(*batch.values(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="varlen_attn_out: out must be \\(15, 4, 8\\) torch.float32"):
        varlen_attn_out(torch.empty(15, 4, 16), *batch.values(), enable_gqa=True)


def test_switching_from_torch_varlen_changes_only_the_import():
    """torch.nn.attention.varlen's keyword call works unchanged (its varlen_attn is CUDA-only,
    so only the call shape is compared here)."""
    import inspect

    from torch.nn.attention import varlen as torch_varlen

    ours = inspect.signature(varlen_attn).parameters
    for name in inspect.signature(torch_varlen.varlen_attn).parameters:
        assert name in ours, name
    batch = _batch(head_dim_v=16, heads_kv=4)
    out = varlen_attn(*batch.values(), 9, 7, window_size=(-1, 0), return_aux=torch_varlen.AuxRequest(lse=True), num_splits=1)
    expected = varlen_attn(*batch.values(), is_causal=True, return_aux=AuxRequest(lse=True))
    torch.testing.assert_close(out, expected)
