"""Every public entry point is as strict as ``varlen_attn`` (varlen_compile/validation.py):
wrong types, shapes, values, numpy scalars, 0-d tensors, lists instead of tensors and int64 or
float offsets are a ``TypeError``/``ValueError`` that names the caller's own argument; nothing is
coerced; eager and ``torch.compile(fullgraph=True)`` accept and reject the same inputs.

Each case is a call of one entry point from outside, with one argument made wrong. The
compiled cases are grouped in two tests (one fresh Dynamo each) to keep the suite quick.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from factory import make_cu_seq
from varlen_compile import AuxRequest, scaled_dot_product_attention, varlen_attn, varlen_attn_out
from varlen_compile.distributed import context_parallel_varlen_attn, zigzag_chunks, zigzag_shard, zigzag_unshard
from varlen_compile.flash_attn_compat import flash_attn_varlen_func

LENGTHS = [3, 5]


def _qkv(heads_q: int = 4, heads_kv: int = 2) -> dict:
    torch.manual_seed(0)
    return {"q": torch.randn(8, heads_q, 16), "k": torch.randn(8, heads_kv, 16), "v": torch.randn(8, heads_kv, 16)}


def _varlen_kwargs() -> dict:
    tensors = _qkv()
    return {"query": tensors["q"], "key": tensors["k"], "value": tensors["v"], "cu_seq_q": make_cu_seq(LENGTHS),
            "cu_seq_k": make_cu_seq(LENGTHS), "enable_gqa": True}


def _fa2_kwargs() -> dict:
    return {**_qkv(), "cu_seqlens_q": make_cu_seq(LENGTHS), "cu_seqlens_k": make_cu_seq(LENGTHS),
            "max_seqlen_q": 5, "max_seqlen_k": 5}


def _njt(lengths=LENGTHS, heads: int = 2) -> torch.Tensor:
    """A jagged NJT in SDPA's (B, H, j, D) layout, from its own offsets."""
    offsets = torch.tensor([0] + list(lengths)).cumsum(0)
    return torch.nested.nested_tensor_from_jagged(torch.randn(int(offsets[-1]), heads, 8), offsets).transpose(1, 2)


def _sdpa_kwargs() -> dict:
    query = _njt()
    return {"query": query, "key": query, "value": query}


def _context_parallel_kwargs() -> dict:
    """Its checks run before any collective: no process group is needed to reach them."""
    tensors = _qkv(2, 2)
    return {"query": tensors["q"], "key": tensors["k"], "value": tensors["v"], "cu_seq": make_cu_seq(LENGTHS)}


class Entry:
    """A public function and the arguments of a valid call of it; ``name`` starts its messages."""

    def __init__(self, function, base_kwargs, name: str):
        self.function, self.base_kwargs, self.name = function, base_kwargs, name

    def kwargs(self, overrides: dict) -> dict:
        return {**self.base_kwargs(), **overrides}

    def __call__(self, **overrides):
        return self.function(**self.kwargs(overrides))


varlen_call = Entry(varlen_attn, _varlen_kwargs, "varlen_attn")
out_call = Entry(varlen_attn_out, lambda: {"out": torch.empty(8, 4, 16), **_varlen_kwargs()}, "varlen_attn_out")
fa2_call = Entry(flash_attn_varlen_func, _fa2_kwargs, r"flash_attn_varlen_func \(varlen_compile\)")
sdpa_call = Entry(scaled_dot_product_attention, _sdpa_kwargs, "scaled_dot_product_attention")
context_parallel_call = Entry(context_parallel_varlen_attn, _context_parallel_kwargs, "context_parallel_varlen_attn")
shard_call = Entry(zigzag_shard, lambda: {"x": torch.randn(8, 2, 16)}, "zigzag_shard")
unshard_call = Entry(zigzag_unshard, lambda: {"x": torch.randn(8, 2, 16)}, "zigzag_unshard")
chunks_call = Entry(zigzag_chunks, lambda: {"total": 8, "world_size": 2, "rank": 0}, "zigzag_chunks")


NOT_CAST = r"; pass a Python (bool|float): (bool|float)\({}\)"
TENSOR_VALUE = r"; pass a Python (bool|float) \(a tensor's value is data"

# (id, entry point, overrides, exception type, message after "<function>: ")
CASES = [
    # varlen_attn
    ("varlen-causal-numpy", varlen_call, {"is_causal": np.bool_(True)}, TypeError,
     r"is_causal must be a bool \(True or False\), got a numpy value" + NOT_CAST.format("is_causal")),
    ("varlen-causal-0d-tensor", varlen_call, {"is_causal": torch.tensor(True)}, TypeError,
     r"is_causal must be a bool \(True or False\), got a 0-d torch.bool tensor" + TENSOR_VALUE),
    ("varlen-gqa-string", varlen_call, {"enable_gqa": "yes"}, TypeError, r"enable_gqa must be a bool"),
    ("varlen-window-numpy", varlen_call, {"window_size": (np.int64(2), np.int64(0))}, ValueError,
     r"window_size must be a pair of ints \(left, right\), got \(a numpy value, a numpy value\)"),
    ("varlen-window-floats", varlen_call, {"window_size": [2.0, 0]}, ValueError, r"window_size must be a pair of ints"),
    ("varlen-window-string", varlen_call, {"window_size": "ab"}, ValueError, r"window_size must be a pair of ints"),
    ("varlen-window-below", varlen_call, {"window_size": (-1, -5)}, ValueError, r"window_size entries must be >= -1"),
    ("varlen-scale-numpy64", varlen_call, {"scale": np.float64(0.25)}, TypeError,
     r"scale must be a float or None \(None = 1 / sqrt\(head_dim\)\), got a numpy value" + NOT_CAST.format("scale")),
    ("varlen-scale-numpy32", varlen_call, {"scale": np.float32(0.25)}, TypeError, r"scale must be a float or None"),
    ("varlen-scale-0d-tensor", varlen_call, {"scale": torch.tensor(0.25)}, TypeError,
     r"scale must be a float or None .*, got a 0-d torch.float32 tensor" + TENSOR_VALUE),
    ("varlen-scale-inf", varlen_call, {"scale": float("inf")}, ValueError, r"scale must be finite, got inf"),
    ("varlen-scale-nan", varlen_call, {"scale": float("nan")}, ValueError, r"scale must be finite, got nan"),
    ("varlen-softcap-numpy", varlen_call, {"softcap": np.float64(1.0)}, TypeError, r"softcap must be a float"),
    ("varlen-softcap-nan", varlen_call, {"softcap": float("nan")}, ValueError, r"softcap must be a finite float >= 0"),
    ("varlen-max-q-negative", varlen_call, {"max_q": -1}, ValueError, r"max_q must be >= 0 \(the longest sequence\)"),
    ("varlen-max-q-numpy", varlen_call, {"max_q": np.int64(5)}, TypeError, r"max_q must be an int or None, got a numpy"),
    ("varlen-cu-seq-list", varlen_call, {"cu_seq_q": [0, 3, 8]}, TypeError,
     r"cu_seq_q must be a torch.Tensor of int32 offsets \(N \+ 1,\), got \[0, 3, 8\]; build it with "
     r"torch.tensor\(cu_seq_q, dtype=torch.int32, device=...\)"),
    ("varlen-cu-seq-numpy", varlen_call, {"cu_seq_k": np.array([0, 3, 8], dtype=np.int32)}, TypeError,
     r"cu_seq_k must be a torch.Tensor .*, got a numpy value; convert it with torch.from_numpy\(cu_seq_k\)"),
    ("varlen-cu-seq-fractional", varlen_call, {"cu_seq_q": torch.tensor([0, 2.6, 8])}, ValueError,
     r"cu_seq_q must be int32, got torch.float32; it counts tokens"),
    ("varlen-cu-seq-0d", varlen_call, {"cu_seq_q": torch.tensor(8, dtype=torch.int32)}, ValueError,
     r"cu_seq_q must be 1-D with N \+ 1 >= 1 offsets, got shape \(\)"),
    ("varlen-cu-seq-negative", varlen_call, {"cu_seq_q": torch.tensor([0, -3, 8], dtype=torch.int32)}, ValueError,
     r"cu_seq_q must be non-decreasing"),
    ("varlen-cu-seq-huge", varlen_call, {"cu_seq_k": torch.tensor([0, 3, 2**31 - 1], dtype=torch.int32)}, ValueError,
     r"cu_seq_k must end at the total token count 8, got 2147483647"),
    ("varlen-query-nested", varlen_call, {"query": _njt(heads=4).transpose(1, 2)}, TypeError,
     r"query is a nested tensor; pass its packed values\(\) and offsets\(\)"),
    ("varlen-sink-numpy", varlen_call, {"sink": np.zeros(4, dtype=np.float32)}, TypeError,
     r"sink must be a torch.Tensor of shape \(H_q,\) or None, got a numpy value"),
    ("varlen-seqused-list", varlen_call, {"seqused_k": [3, 5]}, TypeError, r"seqused_k must be a torch.Tensor or None"),
    ("varlen-lse-string", varlen_call, {"return_aux": AuxRequest(lse="yes")}, TypeError,
     r"return_aux.lse must be a bool \(True or False\), got 'yes'"),
    ("varlen-num-splits-numpy", varlen_call, {"num_splits": np.int64(1)}, ValueError,
     r"num_splits must be None or an int >= 0, got a numpy value"),
    # varlen_attn_out
    ("out-list", out_call, {"out": [0.0]}, TypeError, r"out must be a torch.Tensor, got \[0.0\]"),
    ("out-unknown-keyword", out_call, {"is_casual": True}, TypeError, r"unexpected keyword arguments \['is_casual'\]"),
    ("out-causal-string", out_call, {"is_causal": "no"}, TypeError, r"is_causal must be a bool"),
    ("out-return-aux-bool", out_call, {"return_aux": True}, TypeError, r"return_aux must be None or AuxRequest"),
    ("out-wrong-shape", out_call, {"out": torch.empty(8, 4, 8)}, ValueError, r"out must be \(8, 4, 16\) torch.float32"),
    # FlashAttention 2's drop-in: its own argument names
    ("fa2-causal-string", fa2_call, {"causal": "no"}, TypeError, r"causal must be a bool \(True or False\), got 'no'"),
    ("fa2-causal-none", fa2_call, {"causal": None}, TypeError, r"causal must be a bool \(True or False\), got None"),
    ("fa2-probs-string", fa2_call, {"return_attn_probs": "no"}, TypeError, r"return_attn_probs must be a bool"),
    ("fa2-deterministic-int", fa2_call, {"deterministic": 1}, TypeError, r"deterministic must be a bool"),
    ("fa2-window-int", fa2_call, {"window_size": 3}, ValueError, r"window_size must be a pair of ints .*, got 3"),
    ("fa2-window-none", fa2_call, {"window_size": None}, ValueError, r"window_size must be a pair of ints .*, got None"),
    ("fa2-softcap-string", fa2_call, {"softcap": "a"}, TypeError, r"softcap must be a float \(None or 0.0 = off\), got 'a'"),
    ("fa2-scale-inf", fa2_call, {"softmax_scale": float("inf")}, ValueError, r"softmax_scale must be finite, got inf"),
    ("fa2-scale-numpy", fa2_call, {"softmax_scale": np.float64(0.25)}, TypeError,
     r"softmax_scale must be a float or None .*" + NOT_CAST.format("softmax_scale")),
    ("fa2-cu-seqlens-list", fa2_call, {"cu_seqlens_q": [0, 3, 8]}, TypeError, r"cu_seqlens_q must be a torch.Tensor"),
    ("fa2-cu-seqlens-fractional", fa2_call, {"cu_seqlens_q": torch.tensor([0, 4.6, 5.2, 8])}, ValueError,
     r"cu_seqlens_q must be int32, got torch.float32; it counts tokens"),
    ("fa2-cu-seqlens-int64", fa2_call, {"cu_seqlens_k": make_cu_seq(LENGTHS).long()}, ValueError,
     r"cu_seqlens_k must be int32, got torch.int64; use cu_seqlens_k.to\(torch.int32\)"),
    ("fa2-max-seqlen-understated", fa2_call, {"max_seqlen_q": 3}, ValueError,
     r"max_seqlen_q=3 is smaller than the longest sequence \(5\)"),
    ("fa2-max-seqlen-float", fa2_call, {"max_seqlen_k": 5.0}, TypeError, r"max_seqlen_k must be an int or None, got 5.0"),
    ("fa2-max-seqlen-float-tensor", fa2_call, {"max_seqlen_q": torch.tensor(5.0)}, ValueError,
     r"max_seqlen_q must be an int \(or a one-element integer tensor, ignored\)"),
    ("fa2-q-rank", fa2_call, {"q": torch.randn(8, 64)}, ValueError, r"q must be 3-D"),
    ("fa2-heads", fa2_call, {"k": torch.randn(8, 3, 16), "v": torch.randn(8, 3, 16)}, ValueError,
     r"the number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("fa2-dropout-string", fa2_call, {"dropout_p": "0.1"}, TypeError, r"dropout_p must be a float or None, got '0.1'"),
    # the nested-tensor SDPA
    ("sdpa-causal-string", sdpa_call, {"is_causal": "no"}, TypeError, r"is_causal must be a bool"),
    ("sdpa-causal-numpy", sdpa_call, {"is_causal": np.bool_(False)}, TypeError, r"is_causal must be a bool"),
    ("sdpa-gqa-int", sdpa_call, {"enable_gqa": 1}, TypeError, r"enable_gqa must be a bool"),
    ("sdpa-scale-inf", sdpa_call, {"scale": float("inf")}, ValueError, r"scale must be finite"),
    ("sdpa-scale-numpy", sdpa_call, {"scale": np.float32(0.5)}, TypeError, r"scale must be a float or None"),
    ("sdpa-dropout-string", sdpa_call, {"dropout_p": "0"}, TypeError, r"dropout_p must be a float or None"),
    # context parallel and zig-zag sharding
    ("cp-causal-string", context_parallel_call, {"is_causal": "no"}, TypeError, r"is_causal must be a bool"),
    ("cp-cu-seq-int64", context_parallel_call, {"cu_seq": make_cu_seq(LENGTHS).long()}, ValueError,
     r"cu_seq must be int32, got torch.int64"),
    ("cp-cu-seq-list", context_parallel_call, {"cu_seq": [0, 3, 8]}, TypeError, r"cu_seq must be a torch.Tensor"),
    ("cp-max-len-float", context_parallel_call, {"max_len": 4.0}, TypeError, r"max_len must be an int or None"),
    ("cp-max-len-negative", context_parallel_call, {"max_len": -1}, ValueError, r"max_len must be >= 0"),
    ("cp-scale-inf", context_parallel_call, {"scale": float("inf")}, ValueError, r"scale must be finite"),
    ("cp-scale-numpy", context_parallel_call, {"scale": np.float64(0.5)}, TypeError, r"scale must be a float or None"),
    ("cp-window-numpy", context_parallel_call, {"window_size": (np.int64(4), 0)}, ValueError,
     r"window_size must be a pair of ints"),
    ("cp-group-string", context_parallel_call, {"group": "world"}, TypeError,
     r"group must be a torch.distributed ProcessGroup or None, got 'world'"),
    ("shard-list", shard_call, {"x": [1, 2]}, TypeError, r"x must be a torch.Tensor, got \[1, 2\]"),
    ("shard-dim-float", shard_call, {"dim": 0.0}, ValueError, r"dim must be an int in \[-3, 3\) \(x is 3-D\), got 0.0"),
    ("shard-dim-bool", shard_call, {"dim": False}, ValueError, r"dim must be an int in \[-3, 3\)"),
    ("shard-dim-out-of-range", shard_call, {"dim": 3}, ValueError, r"dim must be an int in \[-3, 3\)"),
    ("unshard-group-string", unshard_call, {"group": "world"}, TypeError, r"group must be a torch.distributed"),
    ("chunks-total-float", chunks_call, {"total": 8.0}, TypeError, r"total must be an int, got 8.0"),
    ("chunks-rank-too-big", chunks_call, {"rank": 2}, ValueError, r"rank must be below world_size \(2\), got 2"),
    ("chunks-world-zero", chunks_call, {"world_size": 0}, ValueError, r"world_size must be >= 1, got 0"),
]

def _ids(cases) -> list[str]:
    return [case[0] for case in cases]


@pytest.mark.parametrize("name, call, overrides, error, pattern", CASES, ids=_ids(CASES))
def test_eager_error_names_the_callers_argument(name, call, overrides, error, pattern):
    with pytest.raises(error, match=f"^{call.name}: {pattern}"):
        call(**overrides)


def _exception_text(exc: BaseException) -> str:
    """The message of ``exc`` and of the exceptions it was raised from (under fullgraph=True
    Dynamo reports a user exception as ``Unsupported: Observed exception``, our message in its
    debug context and in its cause)."""
    texts = []
    while exc is not None and len(texts) < 5:
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(texts)


# Cases whose compiled call must fail the same way: the message traces (no "repr() on tensor").
COMPILED = [case for case in CASES if case[0] in {
    "varlen-causal-numpy", "varlen-causal-0d-tensor", "varlen-window-numpy", "varlen-scale-numpy64",
    "varlen-scale-numpy32", "varlen-scale-inf", "varlen-cu-seq-fractional", "varlen-max-q-negative",
    "varlen-query-nested", "out-causal-string", "fa2-causal-string", "fa2-window-int", "fa2-scale-inf",
    "fa2-cu-seqlens-int64", "fa2-scale-numpy", "sdpa-causal-numpy", "sdpa-scale-inf", "shard-dim-float",
}]


def test_compiled_rejects_what_eager_rejects():
    """fullgraph=True: every case still fails, with our message (whole, so it traced) in what
    Dynamo reports, and never an internal tracing error in its place."""
    failures = []
    for name, call, overrides, error, pattern in COMPILED:
        torch._dynamo.reset()
        compiled = torch.compile(call.function, backend="eager", fullgraph=True)
        try:
            compiled(**call.kwargs(overrides))
        except (error, torch._dynamo.exc.Unsupported) as raised:
            text = _exception_text(raised)
            if not re.search(f"{call.name}: {pattern}", text) or "repr() on" in text:
                failures.append(f"{name}: {text[:600]}")
        else:
            failures.append(f"{name}: compiled call did not raise")
    torch._dynamo.reset()
    assert not failures, "\n\n".join(failures)


def _strided_offsets() -> torch.Tensor:
    """[0, 3, 8] as a non-contiguous view (every other element of a longer tensor)."""
    return torch.tensor([0, 99, 3, 99, 8, 99], dtype=torch.int32)[::2]


# Calls both modes accept, with the same result: a list window, an int scale, strided offsets,
# a huge max hint, FA2's ignored tensor max length.
ACCEPTED = {
    "varlen-window-list": (varlen_call, {"window_size": [2, 0]}),
    "varlen-int-scale": (varlen_call, {"scale": 1}),
    "varlen-strided-offsets": (varlen_call, {"cu_seq_q": _strided_offsets(), "cu_seq_k": _strided_offsets()}),
    "varlen-huge-hint": (varlen_call, {"max_q": 2**40, "is_causal": True}),
    "fa2-tensor-max-seqlen": (fa2_call, {"max_seqlen_q": torch.tensor(1), "causal": True}),
}


def test_eager_and_compiled_accept_the_same_calls():
    assert not _strided_offsets().is_contiguous()
    for name, (call, overrides) in ACCEPTED.items():
        torch._dynamo.reset()
        kwargs = call.kwargs(overrides)
        eager = call.function(**kwargs)
        compiled = torch.compile(call.function, backend="eager", fullgraph=True)(**kwargs)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()
    # The strided offsets give the contiguous ones' result.
    torch.testing.assert_close(varlen_call(**ACCEPTED["varlen-strided-offsets"][1]), varlen_call(), rtol=0, atol=0)


def test_fa2_causal_runs_causal_only_for_true():
    """A truthy non-bool is not taken as causal, nor a falsy one as non-causal: both are refused."""
    causal, full = fa2_call(causal=True), fa2_call(causal=False)
    assert not torch.equal(causal, full)
    torch.testing.assert_close(causal, varlen_call(is_causal=True), rtol=0, atol=0)
    out, lse, probs = fa2_call(return_attn_probs=True)
    assert probs is None and lse.shape == (4, 8)
    assert isinstance(fa2_call(return_attn_probs=False), torch.Tensor)
