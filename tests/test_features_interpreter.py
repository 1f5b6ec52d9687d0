"""The scoring and key features in the shared Triton kernels, under TRITON_INTERPRET=1 on the CPU: softcap,
attention sinks, ALiBi, a value head dim different from the key head dim, seqused_k and paged
K/V, alone and combined with causal/window/GQA, lengths 0 and 1, q_len != k_len.

Each case runs the standalone launcher (the same ``@triton.jit`` math the Inductor templates
append) forward and backward, and checks out, lse, dq, dk, dv and the sink gradient against the
float64 reference (autograd through ``reference.attention_forward``) under the error
rule, the budget being the same computation in float32. Outputs start NaN-filled
(``poison_empty``): an element no kernel writes fails. The GQA-packed forward
(``ForwardConfig.pack_gqa``) runs every feature too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factory import assert_meets_error_rule, make_cu_seq
from varlen_compile import reference
from varlen_compile.lowering import launcher
from varlen_compile.lowering.configs import BackwardConfig, ForwardConfig, pack_gqa_group
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.usefixtures("interpret", "poison_empty"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

FORWARD_CONFIG = ForwardConfig(16, 16, 4, 1)
BACKWARD_CONFIG = BackwardConfig(16, 16, 16, 16, 4, 1)
# The GQA-packed forward for groups of 2 and 4: tiles of G heads x 16 positions.
PACKED_CONFIGS = {2: ForwardConfig(32, 16, 4, 1, pack_gqa=True), 4: ForwardConfig(64, 16, 4, 1, pack_gqa=True)}
# q > k, q < k, queries without keys, length 1 both ways, a sequence over two tiles.
LENGTHS_Q, LENGTHS_K = (5, 20, 3, 1, 33), (17, 3, 0, 1, 40)


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    softcap: float = 0.0
    sink: bool = False
    alibi: bool = False
    head_dim_v: int = 16
    seqused: bool = False
    is_causal: bool = False
    window: tuple[int, int] = (-1, -1)
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16


FEATURES = [
    Feature("softcap-causal", softcap=2.0, is_causal=True),
    Feature("softcap-window", softcap=5.0, window=(6, 2)),
    Feature("sink-full", sink=True),
    Feature("sink-causal-window", sink=True, is_causal=True, window=(4, -1)),
    Feature("alibi-causal", alibi=True, is_causal=True),
    Feature("alibi-full", alibi=True),
    Feature("dv16-d24-causal", head_dim=24, head_dim_v=16, is_causal=True),
    Feature("dv40-d16", head_dim_v=40),
    Feature("seqused-causal", seqused=True, is_causal=True),
    Feature("seqused-full", seqused=True),
    Feature("seqused-window", seqused=True, window=(3, 3)),
    Feature(
        "all-combined", softcap=3.0, sink=True, alibi=True, head_dim=24, head_dim_v=16, seqused=True,
        window=(7, 0), heads_q=6, heads_kv=2,
    ),
]


def _inputs(feature: Feature, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    total_q, total_k = sum(LENGTHS_Q), sum(LENGTHS_K)
    return {
        "q": randn(total_q, feature.heads_q, feature.head_dim),
        "k": randn(total_k, feature.heads_kv, feature.head_dim),
        "v": randn(total_k, feature.heads_kv, feature.head_dim_v),
        "cu_seq_q": make_cu_seq(list(LENGTHS_Q)),
        "cu_seq_k": make_cu_seq(list(LENGTHS_K)),
        "sink": randn(feature.heads_q) if feature.sink else None,
        "alibi_slopes": torch.rand(feature.heads_q, generator=generator) if feature.alibi else None,
        # Each sequence uses a prefix of its keys: none, some, all.
        "seqused_k": torch.tensor([9, 3, 0, 1, 23], dtype=torch.int32) if feature.seqused else None,
    }


def _options(feature: Feature, inputs: dict) -> AttnOptions:
    return AttnOptions(feature.is_causal, None, *feature.window, softcap=feature.softcap)


def _optional(inputs: dict, **extra) -> OptionalInputs:
    """The call's optional inputs (sink, ALiBi slopes, seqused_k) and ``extra`` ones."""
    names = ("sink", "alibi_slopes", "seqused_k")
    return OptionalInputs({name: inputs[name] for name in names}, **extra)


def _reference(feature: Feature, inputs: dict, dtype: torch.dtype, grad_out, grad_lse):
    """(out, lse, dq, dk, dv, dsink) of the reference in ``dtype``, gradients by autograd."""
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in ("q", "k", "v")}
    sink = None
    if inputs["sink"] is not None:
        sink = inputs["sink"].detach().to(dtype).requires_grad_()
    alibi = inputs["alibi_slopes"].to(dtype) if inputs["alibi_slopes"] is not None else None
    options = AttnOptions(feature.is_causal, None, *feature.window, softcap=feature.softcap)
    out, lse = reference.attention_forward(
        leaves["q"], leaves["k"], leaves["v"], inputs["cu_seq_q"], inputs["cu_seq_k"], options,
        sink=sink, alibi_slopes=alibi, seqused_k=inputs["seqused_k"], compute_dtype=dtype,
    )
    wrt = [leaves["q"], leaves["k"], leaves["v"]] + ([sink] if sink is not None else [])
    grads = torch.autograd.grad((out, lse), wrt, (grad_out.to(dtype), grad_lse.to(dtype)), materialize_grads=True)
    return (out.detach(), lse.detach(), *grads)


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_feature_forward_backward(feature):
    inputs = _inputs(feature)
    layout = BatchLayout(inputs["cu_seq_q"], inputs["cu_seq_k"])
    options = _options(feature, inputs)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    out, lse = launcher.forward(q, k, v, layout, options, _optional(inputs), config=FORWARD_CONFIG)
    assert out.shape == (q.shape[0], feature.heads_q, feature.head_dim_v)
    grad_out, grad_lse = torch.randn(out.shape), torch.randn(lse.shape)
    dq, dk, dv = launcher.backward(
        grad_out, q, k, v, out, lse, layout, options, _optional(inputs, grad_lse=grad_lse), config=BACKWARD_CONFIG
    )
    ours = [out, lse, dq, dk, dv]
    if inputs["sink"] is not None:
        ours.append(reference.sink_grad(inputs["sink"], lse, grad_out, out, grad_lse))
    oracle = _reference(feature, inputs, torch.float64, grad_out, grad_lse)
    plain = _reference(feature, inputs, torch.float32, grad_out, grad_lse)
    for name, mine, exact, budget in zip(("out", "lse", "dq", "dk", "dv", "dsink"), ours, oracle, plain):
        assert_meets_error_rule(mine, exact, budget, name=f"{feature.name}: {name}")
    if inputs["sink"] is not None:
        # The sequence without keys: out 0, lse = sink.
        rows = slice(int(inputs["cu_seq_q"][2]), int(inputs["cu_seq_q"][3]))
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        torch.testing.assert_close(lse[:, rows], inputs["sink"][:, None].expand(-1, 3), rtol=1e-6, atol=1e-6)
    if inputs["seqused_k"] is not None:
        # Keys past seqused_k take no part: zero gradients.
        for seq, used in enumerate(inputs["seqused_k"].tolist()):
            start, end = int(inputs["cu_seq_k"][seq]), int(inputs["cu_seq_k"][seq + 1])
            assert torch.equal(dk[start + used:end], torch.zeros_like(dk[start + used:end]))
            assert torch.equal(dv[start + used:end], torch.zeros_like(dv[start + used:end]))


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.name)
def test_feature_forward_packed_gqa(feature):
    """Each feature through the GQA-packed forward, 8 query heads on 2 kv heads (4 heads x 16
    positions per tile): per-row masks, per-head sinks and ALiBi slopes, seqused_k. out and lse
    against the reference; the sequence without keys gets out 0 and lse = its head's sink."""
    feature = dataclasses.replace(feature, heads_q=8, heads_kv=2)
    config = PACKED_CONFIGS[4]
    assert pack_gqa_group(config, 4) == 4
    inputs = _inputs(feature)
    layout = BatchLayout(inputs["cu_seq_q"], inputs["cu_seq_k"])
    out, lse = launcher.forward(
        inputs["q"], inputs["k"], inputs["v"], layout, _options(feature, inputs), _optional(inputs), config=config
    )
    grad_out, grad_lse = torch.zeros(out.shape), torch.zeros(lse.shape)
    oracle = _reference(feature, inputs, torch.float64, grad_out, grad_lse)
    plain = _reference(feature, inputs, torch.float32, grad_out, grad_lse)
    for name, mine, exact, budget in zip(("out", "lse"), (out, lse), oracle, plain):
        assert_meets_error_rule(mine, exact, budget, name=f"{feature.name} packed: {name}")
    if inputs["sink"] is not None:
        rows = slice(int(inputs["cu_seq_q"][2]), int(inputs["cu_seq_q"][3]))
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        torch.testing.assert_close(lse[:, rows], inputs["sink"][:, None].expand(-1, 3), rtol=1e-6, atol=1e-6)


def test_sink_makes_single_key_gradients_nonzero():
    """Without a sink, one key per sequence means zero dQ/dK (exactly: see the kernels'
    varlen_keep_softmax_grad); a sink makes the softmax two logits wide, so they are not."""
    feature = Feature("sink-single-key", sink=True)
    inputs = _inputs(feature)
    inputs.update(cu_seq_q=make_cu_seq([40, 3]), cu_seq_k=make_cu_seq([1, 1]))
    inputs.update(q=torch.randn(43, 4, 16), k=torch.randn(2, 2, 16), v=torch.randn(2, 2, 16))
    layout, options = BatchLayout(inputs["cu_seq_q"], inputs["cu_seq_k"]), _options(feature, inputs)
    optional = OptionalInputs(sink=inputs["sink"])
    out, lse = launcher.forward(inputs["q"], inputs["k"], inputs["v"], layout, options, optional, config=FORWARD_CONFIG)
    grad_out, grad_lse = torch.randn(out.shape), torch.zeros(lse.shape)
    dq, dk, dv = launcher.backward(
        grad_out, inputs["q"], inputs["k"], inputs["v"], out, lse, layout, options,
        OptionalInputs(optional, grad_lse=grad_lse), config=BACKWARD_CONFIG,
    )
    assert dq.abs().min() > 0 and dk.abs().min() > 0
    oracle = _reference(feature, inputs, torch.float64, grad_out, grad_lse)
    plain = _reference(feature, inputs, torch.float32, grad_out, grad_lse)
    for name, mine, exact, budget in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), oracle, plain):
        assert_meets_error_rule(mine, exact, budget, name=name)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed-gqa"])
@pytest.mark.parametrize(
    "page_size, static", [(4, True), (4, False), (12, True), (32, True)],
    ids=["page4", "page4-runtime", "page12", "page32"],
)
@pytest.mark.parametrize(
    "feature",
    [Feature("paged-causal", is_causal=True), Feature("paged-softcap-sink-alibi-dv", softcap=4.0, sink=True, alibi=True, head_dim_v=24, window=(9, 0))],
    ids=lambda f: f.name,
)
def test_paged_forward(feature, page_size, static, packed, monkeypatch):
    """Paged K/V: the keys of each sequence in pages scattered over a pool (page_size 4 divides
    the 16-key block: a block-table read per key, its index without a division; 12 neither
    divides nor is a multiple of it: a constant division per key; 32 is a multiple: one read per
    key tile; ``static`` False: the page size as a runtime value, what the template gets under
    dynamic shapes), partial last pages, unused pages; compared with the reference on the same
    pages and on the contiguous layout. ``packed``: the GQA-packed forward (2 heads x 16
    positions per tile) for both layouts."""
    if not static:
        monkeypatch.setattr(launcher, "page_size_constexpr", lambda paged, size: {"PAGE_SIZE": 0})
    config = PACKED_CONFIGS[2] if packed else FORWARD_CONFIG
    inputs = _inputs(feature)
    used = [9, 3, 0, 1, 40]
    max_pages = -(-max(used) // page_size)
    num_pages = len(used) * max_pages + 3
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(num_pages, generator=generator)
    block_table = order[: len(used) * max_pages].view(len(used), max_pages).to(torch.int32)
    key_pages = torch.randn(num_pages, page_size, feature.heads_kv, feature.head_dim, generator=generator)
    value_pages = torch.randn(num_pages, page_size, feature.heads_kv, feature.head_dim_v, generator=generator)
    seqused = torch.tensor(used, dtype=torch.int32)
    layout = BatchLayout(inputs["cu_seq_q"], inputs["cu_seq_q"])
    options = _options(feature, inputs)
    scoring = OptionalInputs(sink=inputs["sink"], alibi_slopes=inputs["alibi_slopes"])
    optional = OptionalInputs(scoring, seqused_k=seqused, block_table=block_table)
    out, lse = launcher.forward(inputs["q"], key_pages, value_pages, layout, options, optional, config=config)

    def run_reference(dtype):
        return reference.attention_forward(
            inputs["q"].to(dtype), key_pages.to(dtype), value_pages.to(dtype), inputs["cu_seq_q"], None, options,
            **{name: tensor.to(dtype) for name, tensor in scoring.items()},
            seqused_k=seqused, block_table=block_table, compute_dtype=dtype,
        )

    oracle, plain = run_reference(torch.float64), run_reference(torch.float32)
    assert_meets_error_rule(out, oracle[0], plain[0], name="out")
    assert_meets_error_rule(lse, oracle[1], plain[1], name="lse")
    # The same keys laid out contiguously give the same attention.
    rows = [torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in block_table[s].tolist()])[:n] for s, n in enumerate(used)]
    flat_k, flat_v = key_pages.flatten(0, 1), value_pages.flatten(0, 1)
    contiguous_k = torch.cat([flat_k[r] for r in rows])
    contiguous_v = torch.cat([flat_v[r] for r in rows])
    contiguous = BatchLayout(inputs["cu_seq_q"], make_cu_seq(used))
    out_c, lse_c = launcher.forward(inputs["q"], contiguous_k, contiguous_v, contiguous, options, scoring, config=config)
    torch.testing.assert_close(out, out_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse_c, rtol=1e-5, atol=1e-6)
