"""Every validation error of ``varlen_attn`` (varlen_compile/api.py), and which checks run
under torch.compile."""

from __future__ import annotations

import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from factory import make_case, make_cu_seq
from varlen_compile import AuxRequest, varlen_attn

# The base call: 2 sequences (3 and 5 tokens), 4 query heads over 2 kv heads, D = 16.
LENGTHS = [3, 5]


def _base_kwargs() -> dict:
    case = make_case(LENGTHS, heads_q=4, heads_kv=2)
    return {
        "query": case.q, "key": case.k, "value": case.v,
        "cu_seq_q": case.cu_seq_q, "cu_seq_k": case.cu_seq_k, "enable_gqa": True,
    }


def _kv(heads: int = 2, head_dim: int = 16, **kwargs) -> dict:
    return {
        "key": torch.randn(8, heads, head_dim, **kwargs),
        "value": torch.randn(8, heads, head_dim, **kwargs),
    }


def _paged() -> dict:
    """Paged K/V for the base call: 4 pages of 4 rows, two pages per sequence."""
    return {
        "key": torch.randn(4, 4, 2, 16), "value": torch.randn(4, 4, 2, 16),
        "block_table": torch.tensor([[2, 0], [1, 3]], dtype=torch.int32),
        "seqused_k": torch.tensor([3, 5], dtype=torch.int32), "cu_seq_k": None,
    }


def _qkv(dtype: torch.dtype) -> dict:
    return {
        "query": torch.zeros(8, 4, 16).to(dtype),
        "key": torch.zeros(8, 2, 16).to(dtype),
        "value": torch.zeros(8, 2, 16).to(dtype),
    }


def _qkv_shaped(head_dim: int) -> dict:
    return {
        "query": torch.randn(8, 4, head_dim),
        "key": torch.randn(8, 2, head_dim),
        "value": torch.randn(8, 2, head_dim),
    }


# (id, overrides of the base call, exception type, message pattern)
METADATA_ERRORS = [
    ("query-not-tensor", lambda b: {"query": b["query"].tolist()}, TypeError,
     r"query must be a torch.Tensor, got \[a list of 4 items, .*\]; build it with torch.tensor\(query, "),
    ("query-rank-2", lambda b: {"query": b["query"][0]}, ValueError,
     r"query must be 3-D \(total_tokens, heads, head_dim\), got shape \(4, 16\); pack sequences along dim 0"),
    ("key-rank-4", lambda b: {"key": b["key"][None]}, ValueError, r"key must be 3-D"),
    ("key-value-heads", lambda b: {"value": b["value"][:, :1]}, ValueError,
     r"key and value must have the same number of heads, got shapes \(8, 2, 16\) and \(8, 1, 16\)"),
    ("key-value-tokens", lambda b: {"value": b["value"][:5]}, ValueError,
     r"key and value must have the same number of tokens, got shapes \(8, 2, 16\) and \(5, 2, 16\)"),
    ("head-dim-mismatch", lambda b: _kv(head_dim=8), ValueError,
     r"query and key must have the same head_dim, got 16 and 8"),
    ("softcap-negative", lambda b: {"softcap": -1.0}, ValueError,
     r"softcap must be a finite float >= 0 \(0.0 = off\), got -1.0"),
    ("softcap-inf", lambda b: {"softcap": float("inf")}, ValueError, r"softcap must be a finite float >= 0"),
    ("softcap-string", lambda b: {"softcap": "30"}, TypeError, r"softcap must be a float \(None or 0.0 = off\), got '30'"),
    ("sink-wrong-length", lambda b: {"sink": torch.zeros(3)}, ValueError,
     r"sink must have one value per query head \(4\), got 3"),
    ("sink-2d", lambda b: {"sink": torch.zeros(1, 4)}, ValueError,
     r"sink must be 1-D with one value per query head \(H_q=4\), got shape \(1, 4\)"),
    ("sink-int", lambda b: {"sink": torch.zeros(4, dtype=torch.int32)}, ValueError,
     r"sink must be a floating tensor, got torch.int32"),
    ("alibi-requires-grad", lambda b: {"alibi_slopes": torch.ones(4, requires_grad=True)}, ValueError,
     r"alibi_slopes must not require grad .*; pass alibi_slopes.detach\(\)"),
    ("seqused-int64", lambda b: {"seqused_k": torch.tensor([3, 5])}, ValueError,
     r"seqused_k must be int32, got torch.int64; use seqused_k.to\(torch.int32\)"),
    ("seqused-wrong-length", lambda b: {"seqused_k": torch.tensor([3], dtype=torch.int32)}, ValueError,
     r"seqused_k must have one row per sequence \(N=2\), got shape \(1,\)"),
    ("seqused-above-capacity", lambda b: {"seqused_k": torch.tensor([4, 5], dtype=torch.int32)}, ValueError,
     r"seqused_k must lie in \[0, sequence's cu_seq_k length\] per sequence, got \[4, 5\] for capacities \[3, 5\]"),
    ("cu-seq-k-none", lambda b: {"cu_seq_k": None}, ValueError,
     r"cu_seq_k may be None only with block_table \(paged K/V\)"),
    ("block-table-without-seqused", lambda b: {**_paged(), "seqused_k": None}, ValueError,
     r"block_table needs seqused_k"),
    ("block-table-3d-kv", lambda b: {**_paged(), **_kv()}, ValueError,
     r"with block_table, key must be 4-D pages \(total_pages, page_size, heads, head_dim\), got shape \(8, 2, 16\)"),
    ("block-table-page-out-of-pool", lambda b: {**_paged(), "block_table": torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)},
     ValueError, r"block_table entries must be page indices in \[0, 4\), got values in \[0, 9\]"),
    ("paged-seqused-above-capacity", lambda b: {**_paged(), "seqused_k": torch.tensor([3, 9], dtype=torch.int32)},
     ValueError, r"seqused_k must lie in \[0, block_table row capacity \(max_pages \* page_size\)\]"),
    ("paged-4d-kv-without-block-table", lambda b: {k: v for k, v in _paged().items() if k in ("key", "value")},
     ValueError, r"key must be 3-D .*\(4-D pages need block_table\)"),
    ("num-splits-negative", lambda b: {"num_splits": -1}, ValueError, r"num_splits must be None or an int >= 0, got -1"),
    ("heads-not-divisible", lambda b: _kv(heads=3), ValueError,
     r"the number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("zero-kv-heads", lambda b: _kv(heads=0), ValueError,
     r"key must have at least one head, got shape \(8, 0, 16\)"),
    ("zero-query-heads", lambda b: {"query": torch.randn(8, 0, 16)}, ValueError,
     r"query must have at least one head, got shape \(8, 0, 16\)"),
    ("head-dim-zero", lambda b: {**_qkv_shaped(0), "enable_gqa": True}, ValueError,
     r"query must have head_dim >= 1, got shape \(8, 4, 0\)"),
    ("head-dim-zero-with-scale", lambda b: {**_qkv_shaped(0), "scale": 0.5}, ValueError,
     r"query must have head_dim >= 1, got shape \(8, 4, 0\)"),
    ("is-causal-string", lambda b: {"is_causal": "no"}, TypeError,
     r"is_causal must be a bool \(True or False\), got 'no'$"),
    ("is-causal-int", lambda b: {"is_causal": 1}, TypeError,
     r"is_causal must be a bool \(True or False\), got 1$"),
    ("is-causal-tensor", lambda b: {"is_causal": torch.tensor(True)}, TypeError,
     r"is_causal must be a bool \(True or False\), got a 0-d torch.bool tensor; pass a Python bool \(a "
     r"tensor's value is data"),
    ("enable-gqa-none", lambda b: {"enable_gqa": None}, TypeError,
     r"enable_gqa must be a bool \(True or False\), got None$"),
    ("max-q-tensor", lambda b: {"max_q": torch.tensor(5)}, TypeError,
     r"max_q must be an int or None, got a 0-d torch.int64 tensor; it is only a hint"),
    ("max-k-float", lambda b: {"max_k": 5.0}, TypeError, r"max_k must be an int or None, got 5.0;"),
    ("gqa-without-enable-gqa", lambda b: {"enable_gqa": False}, ValueError,
     r"query has 4 heads but key/value have 2; pass enable_gqa=True"),
    ("cu-seq-q-int64", lambda b: {"cu_seq_q": b["cu_seq_q"].long()}, ValueError,
     r"cu_seq_q must be int32, got torch.int64; use cu_seq_q.to\(torch.int32\)"),
    ("cu-seq-k-float", lambda b: {"cu_seq_k": b["cu_seq_k"].float()}, ValueError,
     r"cu_seq_k must be int32, got torch.float32; it counts tokens: compute it in integers .* casting "
     r"fractional values would truncate them"),
    ("cu-seq-k-2d", lambda b: {"cu_seq_k": b["cu_seq_k"][None]}, ValueError,
     r"cu_seq_k must be 1-D with N \+ 1 >= 1 offsets, got shape \(1, 3\)"),
    ("cu-seq-q-empty", lambda b: {"cu_seq_q": torch.zeros(0, dtype=torch.int32)}, ValueError,
     r"cu_seq_q must be 1-D with N \+ 1 >= 1 offsets, got shape \(0,\)"),
    ("different-num-seqs", lambda b: {"cu_seq_k": make_cu_seq(LENGTHS + [0])}, ValueError,
     r"cu_seq_q and cu_seq_k must describe the same number of sequences, got 2 and 3; "
     r"pass an empty sequence"),
    ("device-mismatch", lambda b: _kv(device="meta"), ValueError,
     r"all tensors must be on one device, got .*meta.*; move them with .to\(query.device\)"),
    ("cu-seq-device-mismatch", lambda b: {"cu_seq_k": b["cu_seq_k"].to("meta")}, ValueError,
     r"all tensors must be on one device"),
    ("mixed-dtypes", lambda b: _kv(dtype=torch.float64), ValueError,
     r"query, key and value must share a dtype, got torch.float32, torch.float64, torch.float64"),
    ("dtype-int32", lambda b: _qkv(torch.int32), ValueError,
     r"unsupported dtype torch.int32; use one of torch.float16, torch.bfloat16, torch.float32, torch.float64"),
    ("dtype-float8", lambda b: _qkv(torch.float8_e4m3fn), ValueError,
     r"unsupported dtype torch.float8_e4m3fn; use one of"),
    ("query-last-dim-strided", lambda b: {"query": torch.randn(8, 16, 4).transpose(1, 2)}, ValueError,
     r"query must have a contiguous last dimension \(stride 1\), got strides \(64, 1, 4\); .*"
     r"call query.contiguous\(\)"),
    ("value-last-dim-strided", lambda b: {"value": torch.randn(8, 16, 2).transpose(1, 2)}, ValueError,
     r"value must have a contiguous last dimension"),
    ("window-one-entry", lambda b: {"window_size": (3,)}, ValueError,
     r"window_size must be a pair of ints \(left, right\), got \(3,\); use \(-1, -1\) for no window"),
    ("window-float", lambda b: {"window_size": (1.5, 0)}, ValueError, r"window_size must be a pair of ints"),
    ("window-none", lambda b: {"window_size": None}, ValueError, r"window_size must be a pair of ints"),
    ("window-bools", lambda b: {"window_size": (True, False)}, ValueError, r"window_size must be a pair of ints"),
    ("window-below-minus-one", lambda b: {"window_size": (-2, 0)}, ValueError,
     r"window_size entries must be >= -1 \(-1 = unbounded\), got \(-2, 0\)"),
    ("return-aux-bool", lambda b: {"return_aux": True}, TypeError,
     r"return_aux must be None or AuxRequest\(lse=...\), got True$"),
    ("return-aux-dict", lambda b: {"return_aux": {"lse": True}}, TypeError,
     r"return_aux must be None or AuxRequest"),
    ("scale-string", lambda b: {"scale": "0.5"}, TypeError, r"scale must be a float or None \(None = 1 / sqrt\(head_dim\)\), got '0.5'$"),
    ("scale-bool", lambda b: {"scale": True}, TypeError, r"scale must be a float or None \(None = 1 / sqrt\(head_dim\)\), got True$"),
]

# Offsets and max lengths: read on the host, eager mode only.
VALUE_ERRORS = [
    ("cu-seq-q-starts-at-1", lambda b: {"cu_seq_q": torch.tensor([1, 4, 8], dtype=torch.int32)},
     r"cu_seq_q must start at 0, got 1"),
    ("cu-seq-k-starts-at-1", lambda b: {"cu_seq_k": torch.tensor([1, 4, 8], dtype=torch.int32)},
     r"cu_seq_k must start at 0, got 1"),
    ("cu-seq-q-decreasing", lambda b: {"cu_seq_q": torch.tensor([0, 9, 8], dtype=torch.int32)},
     r"cu_seq_q must be non-decreasing \(cumulative sequence lengths\), got \[0, 9, 8\]"),
    ("cu-seq-k-decreasing", lambda b: {"cu_seq_k": torch.tensor([0, 9, 8], dtype=torch.int32)},
     r"cu_seq_k must be non-decreasing"),
    ("cu-seq-q-short-of-total", lambda b: {"cu_seq_q": torch.tensor([0, 3, 7], dtype=torch.int32)},
     r"cu_seq_q must end at the total token count 8, got 7"),
    ("cu-seq-k-past-total", lambda b: {"cu_seq_k": torch.tensor([0, 3, 9], dtype=torch.int32)},
     r"cu_seq_k must end at the total token count 8, got 9"),
    ("max-q-too-small", lambda b: {"max_q": 4}, r"max_q=4 is smaller than the longest sequence \(5\); "
     r"pass the true maximum or None"),
    ("max-k-too-small", lambda b: {"max_k": 1}, r"max_k=1 is smaller than the longest sequence \(5\)"),
]


def _ids(cases) -> list[str]:
    return [case[0] for case in cases]


@pytest.mark.parametrize("name, overrides, error, pattern", METADATA_ERRORS, ids=_ids(METADATA_ERRORS))
def test_metadata_error(name, overrides, error, pattern):
    kwargs = _base_kwargs()
    kwargs.update(overrides(kwargs))
    with pytest.raises(error, match=f"^varlen_attn: {pattern}"):
        varlen_attn(**kwargs)


@pytest.mark.parametrize("name, overrides, pattern", VALUE_ERRORS, ids=_ids(VALUE_ERRORS))
def test_value_error(name, overrides, pattern):
    kwargs = _base_kwargs()
    kwargs.update(overrides(kwargs))
    with pytest.raises(ValueError, match=f"^varlen_attn: {pattern}"):
        varlen_attn(**kwargs)


def test_torch_aux_request_is_accepted():
    """Callers moving from torch.nn.attention.varlen keep their AuxRequest."""
    from torch.nn.attention.varlen import AuxRequest as TorchAuxRequest

    kwargs = _base_kwargs()
    out, lse = varlen_attn(**kwargs, return_aux=TorchAuxRequest(lse=True))
    ours_out, ours_lse = varlen_attn(**kwargs, return_aux=AuxRequest(lse=True))
    assert torch.equal(out, ours_out) and torch.equal(lse, ours_lse)
    assert lse.shape == (4, sum(LENGTHS))


def test_base_call_is_valid():
    """The base call of the cases above passes, so each case fails for its own reason."""
    kwargs = _base_kwargs()
    out, lse = varlen_attn(**kwargs, max_q=5, max_k=5, window_size=[2, 0], scale=0.5,
                           return_aux=AuxRequest(lse=True))
    assert out.shape == (8, 4, 16) and lse.shape == (4, 8)


def _attention(query, key, value, cu_seq_q, cu_seq_k, max_len):
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_len, max_len, is_causal=True)


def test_value_checks_skipped_under_compile():
    """A too-small max hint raises in eager mode but compiles in one graph (no sync, no graph
    break): hints are never needed by the compiled path, and the result is unchanged."""
    case = make_case([3, 5])
    with pytest.raises(ValueError, match="smaller than the longest sequence"):
        _attention(*case.inputs(), 1)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    compiled = torch.compile(_attention, backend=backend, fullgraph=True)
    out = compiled(*case.inputs(), 1)
    assert backend.frame_count == 1
    assert not counters["graph_break"]
    torch.testing.assert_close(out, _attention(*case.inputs(), None), rtol=0, atol=0)


def _exception_text(exc: BaseException) -> str:
    """The message of ``exc`` and of the exceptions it was raised from (Dynamo wraps a user
    exception raised under ``fullgraph=True`` and names it in its message and cause)."""
    texts = []
    while exc is not None and len(texts) < 5:
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(texts)


COMPILED_METADATA_ERRORS = [
    case for case in METADATA_ERRORS
    if case[0] in ("query-rank-2", "head-dim-mismatch", "gqa-without-enable-gqa", "cu-seq-q-int64",
                   "different-num-seqs", "query-last-dim-strided")
]


@pytest.mark.parametrize(
    "name, overrides, error, pattern", COMPILED_METADATA_ERRORS, ids=_ids(COMPILED_METADATA_ERRORS)
)
def test_metadata_error_under_compile(name, overrides, error, pattern):
    kwargs = _base_kwargs()
    kwargs.update(overrides(kwargs))
    torch._dynamo.reset()
    compiled = torch.compile(varlen_attn, backend="eager", fullgraph=True)
    with pytest.raises((error, torch._dynamo.exc.Unsupported)) as raised:
        compiled(**kwargs)
    assert re.search(pattern, _exception_text(raised.value)), _exception_text(raised.value)
