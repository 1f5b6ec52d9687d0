"""The reference's score features (softcap, attention sinks, ALiBi), ``D_v != D``,
``seqused_k`` and paged K/V (``block_table``), checked in float64 against independent
computations: Hugging Face transformers' Gemma2 and gpt-oss eager attention, SDPA per sequence,
an explicit per-sequence formula written here, repacked/contiguous batches, and finite
differences (``gradcheck``). ``attention_backward`` and ``sink_grad`` are checked against float64
autograd through ``attention_forward`` (itself checked against the independent forwards above).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from factory import allowed_pairs, make_case, make_cu_seq
from varlen_compile import reference
from varlen_compile.params import AttnOptions

try:  # the lowering modules need Triton and Inductor
    from varlen_compile.lowering import aten
except ImportError:
    aten = None

F64 = torch.float64
# Both sides compute in float64; only summation order differs.
TIGHT = {"atol": 1e-12, "rtol": 1e-10}


def randn(*shape: int, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    if generator is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    return torch.randn(*shape, generator=generator, dtype=F64)


def batch(
    lengths_q: list[int],
    lengths_k: list[int],
    *,
    heads_q: int = 4,
    heads_kv: int = 2,
    head_dim: int = 16,
    head_dim_v: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fresh float64 q ``(T_q, H_q, D)``, k ``(T_k, H_kv, D)``, v ``(T_k, H_kv, D_v)`` and offsets."""
    generator = torch.Generator().manual_seed(seed)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    return {
        "q": randn(sum(lengths_q), heads_q, head_dim, generator=generator),
        "k": randn(sum(lengths_k), heads_kv, head_dim, generator=generator),
        "v": randn(sum(lengths_k), heads_kv, head_dim_v, generator=generator),
        "cu_seq_q": make_cu_seq(lengths_q),
        "cu_seq_k": make_cu_seq(lengths_k),
    }


def split(x: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, lengths, dim=0))


def bhld(x: torch.Tensor) -> torch.Tensor:
    """One sequence ``(L, H, D)`` -> ``(1, H, L, D)`` (the Hugging Face / SDPA layout)."""
    return x.transpose(0, 1)[None]


def fa_distance(len_q: int, len_k: int) -> torch.Tensor:
    """``|i + len_k - len_q - j|``, ``(len_q, len_k)``, pair by pair."""
    return torch.tensor(
        [[abs(i + len_k - len_q - j) for j in range(len_k)] for i in range(len_q)], dtype=F64
    ).reshape(len_q, len_k)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=F64).masked_fill(~allowed, float("-inf"))


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    sink: torch.Tensor | None = None,
    slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence written out from the documented formulas, GQA by explicit head mapping and the
    sink as an explicit extra softmax column: ``(out (L_q, H_q, D_v), lse (H_q, L_q))``."""
    len_q, heads_q, _ = q.shape
    len_k, heads_kv, head_dim_v = v.shape
    group = heads_q // heads_kv
    out = torch.zeros(len_q, heads_q, head_dim_v, dtype=F64)
    lse = torch.full((heads_q, len_q), float("inf"), dtype=F64)
    for h in range(heads_q):
        kh, vh = k[:, h // group], v[:, h // group]
        logits = scale * q[:, h] @ kh.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if slopes is not None:
            logits = logits - slopes[h] * fa_distance(len_q, len_k)
        logits = logits.masked_fill(~allowed, float("-inf"))
        if sink is not None:
            logits = torch.cat([logits, sink[h].expand(len_q, 1)], dim=1)
        for i in range(len_q):
            row = logits[i]
            if torch.isinf(row).all():
                continue  # no key and no sink: out 0, lse +inf
            weights = torch.softmax(row, dim=0)[:len_k]
            out[i, h] = weights @ vh
            lse[h, i] = torch.logsumexp(row, dim=0)
    return out, lse


def no_key_rows(lengths_q, lengths_k, is_causal=False, window_size=(-1, -1)) -> torch.Tensor:
    return torch.cat([
        ~allowed_pairs(len_q, len_k, is_causal, window_size).any(-1)
        for len_q, len_k in zip(lengths_q, lengths_k)
    ])


# Per sequence: q < k, q > k (causal rows without keys), length 1, queries without keys,
# keys without queries, both empty.
LENGTHS_Q = [6, 9, 1, 3, 0, 0, 5]
LENGTHS_K = [9, 5, 1, 0, 4, 0, 5]
MASKS = [
    pytest.param(False, (-1, -1), id="full"),
    pytest.param(True, (-1, -1), id="causal"),
    pytest.param(False, (3, 1), id="win3_1"),
    pytest.param(True, (2, -1), id="causal-win2"),
]


# ---------------------------------------------------------------------------- softcap


@pytest.mark.parametrize("is_causal, window_size", MASKS)
def test_softcap_matches_gemma2_eager(is_causal, window_size):
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    x = batch(LENGTHS_Q, LENGTHS_K, seed=1)
    scale, softcap = 0.6, 1.5  # scores reach several units, so the cap matters
    out, lse = reference.attention_forward(
        **x, is_causal=is_causal, window_size=window_size, scale=scale, softcap=softcap
    )
    uncapped, _ = reference.attention_forward(**x, is_causal=is_causal, window_size=window_size, scale=scale)
    assert (out - uncapped).abs().max() > 0.1
    module = types.SimpleNamespace(num_key_value_groups=2, training=False)
    rows = zip(split(x["q"], LENGTHS_Q), split(x["k"], LENGTHS_K), split(x["v"], LENGTHS_K),
               split(out, LENGTHS_Q), split(lse.T, LENGTHS_Q), LENGTHS_Q, LENGTHS_K)
    for q, k, v, out_s, lse_s, len_q, len_k in rows:
        if len_q == 0:
            continue
        allowed = allowed_pairs(len_q, len_k, is_causal, window_size)
        has_key = allowed.any(-1)
        expected_out, expected_lse = explicit_attention(q, k, v, allowed, scale=scale, softcap=softcap)
        torch.testing.assert_close(lse_s.T, expected_lse, **TIGHT)
        torch.testing.assert_close(out_s, expected_out, **TIGHT)
        if len_k == 0:
            continue
        hf_out, _ = gemma2.eager_attention_forward(
            module, bhld(q), bhld(k), bhld(v), additive_mask(allowed)[None, None],
            scaling=scale, softcap=softcap,
        )
        # Gemma2's eager attention softmaxes in float32 (softmax(..., dtype=float32)) even for
        # float64 inputs, hence float32-level tolerances here. Rows without keys are NaN there.
        torch.testing.assert_close(out_s[has_key], hf_out[0][has_key], atol=2e-6, rtol=1e-5)
        assert torch.equal(out_s[~has_key], torch.zeros_like(out_s[~has_key]))


def test_softcap_then_alibi_matches_gemma2_eager():
    """ALiBi is added after the softcap: Gemma2 adds its attention_mask after capping, so an
    additive mask holding the ALiBi bias gives exactly that order."""
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    lengths_q, lengths_k = [5, 8, 1], [9, 8, 3]
    x = batch(lengths_q, lengths_k, seed=2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32)
    scale, softcap = 0.6, 2.0
    out, _ = reference.attention_forward(
        **x, is_causal=True, scale=scale, softcap=softcap, alibi_slopes=slopes
    )
    module = types.SimpleNamespace(num_key_value_groups=2, training=False)
    for q, k, v, out_s, len_q, len_k in zip(split(x["q"], lengths_q), split(x["k"], lengths_k),
                                            split(x["v"], lengths_k), split(out, lengths_q),
                                            lengths_q, lengths_k):
        bias = -slopes.double()[:, None, None] * fa_distance(len_q, len_k)
        bias = bias + additive_mask(allowed_pairs(len_q, len_k, True))
        hf_out, _ = gemma2.eager_attention_forward(
            module, bhld(q), bhld(k), bhld(v), bias[None], scaling=scale, softcap=softcap
        )
        torch.testing.assert_close(out_s, hf_out[0], atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- sinks


@pytest.mark.parametrize("is_causal, window_size", MASKS)
def test_sinks_match_gpt_oss_eager(is_causal, window_size):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    x = batch(LENGTHS_Q, LENGTHS_K, seed=3)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float32)
    out, lse = reference.attention_forward(**x, is_causal=is_causal, window_size=window_size, sink=sink)
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=sink.double())
    scale = 16 ** -0.5
    for q, k, v, out_s, lse_s, len_q, len_k in zip(
        split(x["q"], LENGTHS_Q), split(x["k"], LENGTHS_K), split(x["v"], LENGTHS_K),
        split(out, LENGTHS_Q), split(lse.T, LENGTHS_Q), LENGTHS_Q, LENGTHS_K,
    ):
        if len_q == 0:
            continue
        allowed = allowed_pairs(len_q, len_k, is_causal, window_size)
        hf_out, _ = gpt_oss.eager_attention_forward(
            module, bhld(q), bhld(k), bhld(v), additive_mask(allowed)[None, None], scaling=scale
        )
        torch.testing.assert_close(out_s, hf_out[0], **TIGHT)
        expected_out, expected_lse = explicit_attention(q, k, v, allowed, scale=scale, sink=sink.double())
        torch.testing.assert_close(out_s, expected_out, **TIGHT)
        torch.testing.assert_close(lse_s.T, expected_lse, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_sinks_rows_without_keys(dtype):
    """Rows that attend no key: out = 0 and lse = sink exactly (finite, not +inf)."""
    lengths_q, lengths_k = [4, 2, 7, 3], [0, 2, 3, 1]
    x = {name: t.to(dtype) if t.is_floating_point() else t for name, t in batch(lengths_q, lengths_k, seed=4).items()}
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float32)
    out, lse = reference.attention_forward(**x, is_causal=True, sink=sink)
    empty = no_key_rows(lengths_q, lengths_k, is_causal=True)
    assert empty.any() and not empty.all()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[:, empty], sink.to(lse.dtype)[:, None].expand(-1, int(empty.sum())))
    assert torch.isfinite(lse).all()
    # Without a sink the same rows keep lse = +inf.
    _, lse_plain = reference.attention_forward(**x, is_causal=True)
    assert torch.isposinf(lse_plain[:, empty]).all()


# ---------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_alibi_matches_sdpa(is_causal):
    x = batch(LENGTHS_Q, LENGTHS_K, seed=5)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32)
    out, lse = reference.attention_forward(**x, is_causal=is_causal, alibi_slopes=slopes)
    plain, _ = reference.attention_forward(**x, is_causal=is_causal)
    assert (out - plain).abs().max() > 0.1
    for q, k, v, out_s, lse_s, len_q, len_k in zip(
        split(x["q"], LENGTHS_Q), split(x["k"], LENGTHS_K), split(x["v"], LENGTHS_K),
        split(out, LENGTHS_Q), split(lse.T, LENGTHS_Q), LENGTHS_Q, LENGTHS_K,
    ):
        if len_q == 0:
            continue
        allowed = allowed_pairs(len_q, len_k, is_causal)
        has_key = allowed.any(-1)
        bias = -slopes.double()[:, None, None] * fa_distance(len_q, len_k) + additive_mask(allowed)
        if len_k:
            expected = F.scaled_dot_product_attention(
                bhld(q), bhld(k.repeat_interleave(2, 1)), bhld(v.repeat_interleave(2, 1)), attn_mask=bias[None]
            )[0].transpose(0, 1)
            torch.testing.assert_close(out_s[has_key], expected[has_key], **TIGHT)
        assert torch.equal(out_s[~has_key], torch.zeros_like(out_s[~has_key]))
        logits = 16 ** -0.5 * torch.einsum("ihd,jhd->hij", q, k.repeat_interleave(2, 1)) + bias
        expected_lse = torch.logsumexp(logits, -1).masked_fill(~has_key, float("inf"))
        torch.testing.assert_close(lse_s.T, expected_lse, **TIGHT)


# ---------------------------------------------------------------------------- D_v != D


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_head_dim_v_matches_sdpa(is_causal):
    x = batch(LENGTHS_Q, LENGTHS_K, head_dim=24, head_dim_v=16, seed=6)
    out, lse = reference.attention_forward(**x, is_causal=is_causal)
    assert out.shape == (sum(LENGTHS_Q), 4, 16) and lse.shape == (4, sum(LENGTHS_Q))
    for q, k, v, out_s, len_q, len_k in zip(
        split(x["q"], LENGTHS_Q), split(x["k"], LENGTHS_K), split(x["v"], LENGTHS_K),
        split(out, LENGTHS_Q), LENGTHS_Q, LENGTHS_K,
    ):
        if len_q == 0 or len_k == 0:
            continue
        allowed = allowed_pairs(len_q, len_k, is_causal)
        has_key = allowed.any(-1)
        expected = F.scaled_dot_product_attention(
            bhld(q), bhld(k), bhld(v), attn_mask=allowed, enable_gqa=True
        )[0].transpose(0, 1)
        torch.testing.assert_close(out_s[has_key], expected[has_key], **TIGHT)


# ---------------------------------------------------------------------------- seqused_k


def repack_used(x: torch.Tensor, lengths_k: list[int], used: list[int]) -> torch.Tensor:
    return torch.cat([part[:n] for part, n in zip(split(x, lengths_k), used)])


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_seqused_k_equals_repacked_batch(is_causal):
    lengths_q, lengths_k = [6, 9, 1, 3, 2, 4], [12, 5, 3, 0, 4, 6]
    # Requested used counts: partial, full, more than the capacity (clamped), 0 of 0, 1, negative.
    requested = [7, 5, 9, 2, 1, -3]
    used = [min(max(n, 0), cap) for n, cap in zip(requested, lengths_k)]
    x = batch(lengths_q, lengths_k, seed=7)
    seqused_k = torch.tensor(requested, dtype=torch.int32)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    for features in ({}, {"softcap": 1.5, "sink": sink, "alibi_slopes": slopes}):
        out, lse = reference.attention_forward(**x, is_causal=is_causal, seqused_k=seqused_k, **features)
        expected_out, expected_lse = reference.attention_forward(
            x["q"], repack_used(x["k"], lengths_k, used), repack_used(x["v"], lengths_k, used),
            x["cu_seq_q"], make_cu_seq(used), is_causal=is_causal, **features,
        )
        torch.testing.assert_close(out, expected_out, **TIGHT)
        torch.testing.assert_close(lse, expected_lse, **TIGHT)


# ---------------------------------------------------------------------------- paged K/V


def page_layout(
    tensors: list[torch.Tensor], lengths_k: list[int], page_size: int, seed: int, spare_pages: int = 3
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The keys of each sequence laid out in randomly permuted pages (partial last pages, a few
    pages no sequence uses, garbage in unused rows): ``([pages (P, page_size, H, D) per tensor],
    block_table (N, max_pages))``; unused table entries hold random page numbers."""
    generator = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in lengths_k]
    total_pages = sum(pages_per_seq) + spare_pages
    order = torch.randperm(total_pages, generator=generator).tolist()
    block_table = torch.randint(0, total_pages, (len(lengths_k), max(pages_per_seq) + 1), generator=generator)
    block_table = block_table.to(torch.int32)
    paged = [torch.randn(total_pages, page_size, *x.shape[1:], generator=generator, dtype=x.dtype) for x in tensors]
    for seq, count in enumerate(pages_per_seq):
        for p in range(count):
            block_table[seq, p] = order.pop()
        for x, pages in zip(tensors, paged):
            part = split(x, lengths_k)[seq]
            for j in range(part.shape[0]):
                pages[block_table[seq, j // page_size], j % page_size] = part[j]
    return paged, block_table


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_block_table_equals_contiguous(is_causal):
    lengths_q, lengths_k = [6, 9, 1, 3, 2, 0], [10, 5, 1, 0, 8, 3]
    page_size = 4
    x = batch(lengths_q, lengths_k, head_dim=24, head_dim_v=16, seed=8)
    (k_pages, v_pages), table = page_layout([x["k"], x["v"]], lengths_k, page_size, seed=8)
    assert any(n % page_size for n in lengths_k)  # partial last pages
    assert k_pages.shape[0] > sum(-(-n // page_size) for n in lengths_k)  # pages no sequence uses
    seqused_k = torch.tensor(lengths_k, dtype=torch.int32)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    for features in ({}, {"softcap": 1.5, "sink": sink, "alibi_slopes": slopes, "window_size": (3, -1)}):
        out, lse = reference.attention_forward(
            x["q"], k_pages, v_pages, x["cu_seq_q"], None, is_causal=is_causal,
            seqused_k=seqused_k, block_table=table, **features,
        )
        expected_out, expected_lse = reference.attention_forward(**x, is_causal=is_causal, **features)
        torch.testing.assert_close(out, expected_out, **TIGHT)
        torch.testing.assert_close(lse, expected_lse, **TIGHT)


def test_block_table_gradients_equal_contiguous():
    """Autograd through the paged forward: page gradients are the contiguous gradients laid out
    in the same pages (zero in pages and rows no sequence uses)."""
    lengths_q, lengths_k = [5, 3, 1], [7, 4, 1]
    page_size = 4
    x = batch(lengths_q, lengths_k, seed=9)
    (k_pages, v_pages), table = page_layout([x["k"], x["v"]], lengths_k, page_size, seed=9)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    grad_out = randn(sum(lengths_q), 4, 16, seed=10)
    grad_lse = randn(4, sum(lengths_q), seed=11)
    inputs = [t.clone().requires_grad_() for t in (x["q"], k_pages, v_pages, sink)]
    out, lse = reference.attention_forward(
        inputs[0], inputs[1], inputs[2], x["cu_seq_q"], None, is_causal=True, softcap=2.0, sink=inputs[3],
        seqused_k=torch.tensor(lengths_k, dtype=torch.int32), block_table=table,
    )
    paged = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse))
    contiguous_inputs = [t.clone().requires_grad_() for t in (x["q"], x["k"], x["v"], sink)]
    out, lse = reference.attention_forward(
        contiguous_inputs[0], contiguous_inputs[1], contiguous_inputs[2], x["cu_seq_q"], x["cu_seq_k"],
        is_causal=True, softcap=2.0, sink=contiguous_inputs[3],
    )
    contiguous = torch.autograd.grad((out, lse), contiguous_inputs, (grad_out, grad_lse))
    torch.testing.assert_close(paged[0], contiguous[0], **TIGHT)
    torch.testing.assert_close(paged[3], contiguous[3], **TIGHT)
    for paged_grad, grad in ((paged[1], contiguous[1]), (paged[2], contiguous[2])):
        expected = torch.zeros_like(paged_grad)
        for seq, part in enumerate(split(grad, lengths_k)):
            for j in range(part.shape[0]):
                expected[table[seq, j // page_size], j % page_size] = part[j]
        torch.testing.assert_close(paged_grad, expected, **TIGHT)


def test_block_table_and_seqused_k_are_clamped():
    """Out-of-range page numbers act as the nearest valid page; seqused_k beyond the table's
    capacity acts as the capacity; nothing indexes out of bounds."""
    x = batch([3, 2], [8, 8], seed=12)
    k_pages, v_pages = x["k"].view(4, 4, 2, 16), x["v"].view(4, 4, 2, 16)
    q, cu_seq_q = x["q"], x["cu_seq_q"]
    wild = torch.tensor([[-7, 1], [2, 1000]], dtype=torch.int32)
    clamped = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqused = torch.tensor([50, 8], dtype=torch.int32)  # capacity is 2 pages x 4 = 8
    out, lse = reference.attention_forward(q, k_pages, v_pages, cu_seq_q, None, seqused_k=seqused, block_table=wild)
    expected = reference.attention_forward(
        q, k_pages, v_pages, cu_seq_q, None, seqused_k=torch.tensor([8, 8], dtype=torch.int32), block_table=clamped
    )
    torch.testing.assert_close((out, lse), expected, **TIGHT)
    torch.testing.assert_close(out, reference.attention_forward(**x)[0], **TIGHT)


def test_block_table_needs_seqused_k_and_has_no_reference_backward():
    x = batch([3], [4], seed=13)
    pages, table = x["k"].view(1, 4, 2, 16), torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="seqused_k"):
        reference.attention_forward(x["q"], pages, pages, x["cu_seq_q"], None, block_table=table)
    out, lse = reference.attention_forward(
        x["q"], pages, pages, x["cu_seq_q"], None, seqused_k=torch.tensor([4], dtype=torch.int32), block_table=table
    )
    with pytest.raises(NotImplementedError, match="block_table"):
        reference.attention_backward(
            torch.ones_like(out), x["q"], pages, pages, out, lse, x["cu_seq_q"], None,
            seqused_k=torch.tensor([4], dtype=torch.int32), block_table=table,
        )


# ---------------------------------------------------------------------------- options


def test_options_object_or_keywords():
    x = batch([5, 3], [4, 6], seed=14)
    sink, slopes = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.5, 0.25, 0.125, 0.0625])
    options = AttnOptions(is_causal=True, softcap=3.0)
    by_object = reference.attention_forward(**x, options=options, sink=sink, alibi_slopes=slopes)
    by_keywords = reference.attention_forward(**x, is_causal=True, softcap=3.0, sink=sink, alibi_slopes=slopes)
    torch.testing.assert_close(by_object, by_keywords, atol=0, rtol=0)
    for extra in ({"softcap": 1.0}, {"is_causal": True}, {"window_size": (3, 0)}):
        with pytest.raises(TypeError):
            reference.attention_forward(**x, options=options, **extra)


def test_alibi_slopes_get_no_gradient():
    x = batch([4], [4], seed=15)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)
    out, lse = reference.attention_forward(**x, alibi_slopes=slopes)
    assert not out.requires_grad and not lse.requires_grad


# ---------------------------------------------------------------------------- gradients

SINK = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32)
# requested seqused_k for GRAD_LENGTHS_K: partial, beyond capacity, full, 0 of 0, negative,
# 1 of 1, partial.
GRAD_LENGTHS_Q = [6, 9, 1, 3, 2, 1, 4]
GRAD_LENGTHS_K = [9, 5, 1, 0, 3, 1, 7]
SEQUSED = [5, 8, 1, 0, -2, 1, 3]
FEATURES = {
    "softcap": {"softcap": 1.5},
    "sink": {"sink": SINK},
    "alibi": {"alibi_slopes": SLOPES},
    "dv": {"head_dim_v": 8},
    "seqused": {"seqused_k": SEQUSED},
    "all": {"softcap": 1.5, "sink": SINK, "alibi_slopes": SLOPES, "head_dim_v": 8, "seqused_k": SEQUSED},
}


def gradient_problem(features: dict, seed: int):
    """``(x, kwargs, sink)`` for the feature set: float64 inputs and the attention keywords."""
    features = dict(features)
    x = batch(GRAD_LENGTHS_Q, GRAD_LENGTHS_K, head_dim_v=features.pop("head_dim_v", None), seed=seed)
    if "seqused_k" in features:
        features["seqused_k"] = torch.tensor(features["seqused_k"], dtype=torch.int32)
    return x, features


def autograd_oracle(x, kwargs, grad_out, grad_lse):
    """``(out, lse, (dq, dk, dv[, dsink]))`` by float64 autograd through attention_forward."""
    inputs = [x[name].clone().requires_grad_() for name in ("q", "k", "v")]
    kwargs = dict(kwargs)
    if kwargs.get("sink") is not None:
        kwargs["sink"] = kwargs["sink"].clone().requires_grad_()
        inputs.append(kwargs["sink"])
    out, lse = reference.attention_forward(*inputs[:3], x["cu_seq_q"], x["cu_seq_k"], **kwargs)
    outputs, cotangents = [out], [grad_out]
    if grad_lse is not None:
        outputs.append(lse)
        cotangents.append(grad_lse)
    grads = torch.autograd.grad(outputs, inputs, cotangents, materialize_grads=True)
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("loss", ["out", "out+lse"])
@pytest.mark.parametrize("is_causal, window_size", MASKS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_attention_backward_matches_autograd(feature, is_causal, window_size, loss):
    x, kwargs = gradient_problem(FEATURES[feature], seed=20)
    kwargs.update(is_causal=is_causal, window_size=window_size)
    grad_out = randn(sum(GRAD_LENGTHS_Q), 4, x["v"].shape[-1], seed=21)
    grad_lse = randn(4, sum(GRAD_LENGTHS_Q), seed=22) if loss == "out+lse" else None
    out, lse, expected = autograd_oracle(x, kwargs, grad_out, grad_lse)
    grads = reference.attention_backward(
        grad_out, x["q"], x["k"], x["v"], out, lse, x["cu_seq_q"], x["cu_seq_k"],
        grad_lse=grad_lse, **kwargs,
    )
    for name, grad, reference_grad in zip(("dq", "dk", "dv"), grads, expected):
        assert grad.shape == reference_grad.shape, name
        torch.testing.assert_close(grad, reference_grad, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
    if "seqused_k" in kwargs:  # keys beyond seqused_k get exactly zero dk, dv
        used = [min(max(n, 0), cap) for n, cap in zip(SEQUSED, GRAD_LENGTHS_K)]
        unused = torch.cat([torch.arange(cap) >= n for n, cap in zip(used, GRAD_LENGTHS_K)])
        assert unused.any()
        assert torch.equal(grads[1][unused], torch.zeros_like(grads[1][unused]))
        assert torch.equal(grads[2][unused], torch.zeros_like(grads[2][unused]))
    if kwargs.get("sink") is not None:
        dsink = reference.sink_grad(kwargs["sink"], lse, grad_out, out, grad_lse)
        torch.testing.assert_close(dsink, expected[3], **TIGHT)


def test_single_key_sequence_has_query_gradient_with_sink():
    """Without a sink a single-key row's softmax is constant (dq = 0); a sink makes it vary."""
    x = batch([3], [1], seed=23)
    grad_out = randn(3, 4, 16, seed=24)
    for sink, zero in ((None, True), (SINK, False)):
        out, lse = reference.attention_forward(**x, sink=sink)
        dq, dk, _ = reference.attention_backward(grad_out, x["q"], x["k"], x["v"], out, lse,
                                                 x["cu_seq_q"], x["cu_seq_k"], sink=sink)
        assert (dq.abs().max() < 1e-12) == zero
        assert (dk.abs().max() < 1e-12) == zero


@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["out", "out+lse"])
def test_sink_grad_matches_autograd_float32(with_grad_lse):
    """sink_grad in float32 (float32 result) against float64 autograd."""
    x, kwargs = gradient_problem(FEATURES["sink"], seed=25)
    kwargs.update(is_causal=True)
    grad_out = randn(sum(GRAD_LENGTHS_Q), 4, 16, seed=26)
    grad_lse = randn(4, sum(GRAD_LENGTHS_Q), seed=27) if with_grad_lse else None
    out, lse, expected = autograd_oracle(x, kwargs, grad_out, grad_lse)
    dsink = reference.sink_grad(
        SINK.float(), lse.float(), grad_out.float(), out.float(), None if grad_lse is None else grad_lse.float()
    )
    assert dsink.dtype == torch.float32 and dsink.shape == (4,)
    torch.testing.assert_close(dsink.double(), expected[3], atol=1e-4, rtol=1e-4)


def test_gradcheck_all_features():
    """Finite differences (independent of autograd) through the forward with every feature:
    gradients w.r.t. q, k, v and the sink, out and lse both in the loss."""
    lengths_q, lengths_k = [3, 1, 2], [4, 1, 0]
    x = batch(lengths_q, lengths_k, head_dim=8, head_dim_v=4, seed=28)
    seqused_k = torch.tensor([3, 1, 0], dtype=torch.int32)

    def function(q, k, v, sink):
        return reference.attention_forward(
            q, k, v, x["cu_seq_q"], x["cu_seq_k"], is_causal=True, window_size=(2, -1), softcap=1.5,
            sink=sink, alibi_slopes=SLOPES, seqused_k=seqused_k,
        )

    inputs = tuple(t.clone().requires_grad_() for t in (x["q"], x["k"], x["v"], SINK))
    assert torch.autograd.gradcheck(function, inputs, fast_mode=True)


@pytest.mark.parametrize("side", [2**31 - 1, 2**40])
def test_a_window_side_past_int32_is_unbounded(side):
    """No sequence of int32 offsets has 2**31 - 1 keys or queries, so such a side excludes no
    key: every kernel gets -1 (the kernels' int32 arithmetic takes the sides below it)."""
    assert AttnOptions(window_left=side, window_right=side).window() == (-1, -1)
    assert AttnOptions(is_causal=True, window_left=side).window() == (-1, 0)
    assert AttnOptions(window_left=2**31 - 2, window_right=7).window() == (2**31 - 2, 7)
    if aten is not None:  # aten flash gets the same sides (a causal call keeps its own right side)
        assert aten._window_sizes(AttnOptions(window_left=side, window_right=5)) == {
            "window_size_left": -1, "window_size_right": 5}
        assert aten._window_sizes(AttnOptions(is_causal=True, window_right=side)) == {
            "window_size_left": -1, "window_size_right": side}
    case = make_case([30, 9, 1], [4, 23, 1], dtype=torch.float64)
    huge, _ = reference.attention_forward(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k,
                                          window_size=(side, side))
    unbounded, _ = reference.attention_forward(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k)
    assert torch.equal(huge, unbounded)
