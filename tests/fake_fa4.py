"""A stand-in for ``flash_attn.cute.interface`` on the CPU, for the FA4 adapter's tests.

It follows FA4's calling conventions as far as the adapter relies on them (read from
flash-attn-4 4.0.0b36's ``interface.py``) and is strict where a mistake in the adapter would
show: window sides are ``None`` or ``>= 0`` (never our ``-1``), offsets are int32 and
contiguous, inputs 16-bit, ``lse`` a float32 ``(H_q, T_q)`` buffer it writes into, rows that
attend no key get ``lse = -inf`` (as FA4 may write them), and the backward leaves the dK/dV rows
of unused keys (past ``seqused_k``) unwritten, as FA4 does. The numbers come from our float32
reference; the real kernel is checked against the float64 reference by ``test_choice_gpu.py``.
"""

from __future__ import annotations

import functools
import types

import torch

from varlen_compile import reference


def _check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, window_size_left, window_size_right):
    assert q.dtype in (torch.float16, torch.bfloat16), "FA4 takes 16-bit inputs"
    assert q.dtype == k.dtype == v.dtype
    for name, offsets in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("seqused_k", seqused_k)):
        if offsets is not None:
            assert offsets.dtype == torch.int32 and offsets.is_contiguous(), name
    for side in (window_size_left, window_size_right):
        assert side is None or side >= 0, "FA4's unbounded window side is None"


def _options(causal, window_size_left, window_size_right, softmax_scale, softcap, learnable_sink):
    left = -1 if window_size_left is None else window_size_left
    right = 0 if causal else (-1 if window_size_right is None else window_size_right)
    return dict(
        is_causal=False, window_size=(left, right), scale=softmax_scale,
        softcap=softcap or 0.0, sink=learnable_sink,
    )


def make_interface() -> types.ModuleType:
    """A fresh fake module; ``module.calls`` records every call's arguments (defaults included),
    ``module.passed`` the names of the keywords each call passed."""
    module = types.ModuleType("fake_flash_attn_cute_interface")
    module.calls, module.passed = [], []

    def _flash_attn_fwd(
        q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
        causal=False, softcap=None, window_size_left=None, window_size_right=None, learnable_sink=None,
        return_lse=False, out=None, lse=None, **unused,
    ):
        module.calls.append(("fwd", dict(locals())))
        _check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, window_size_left, window_size_right)
        options = _options(causal, window_size_left, window_size_right, softmax_scale, softcap, learnable_sink)
        result, result_lse = reference.attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=seqused_k, compute_dtype=torch.float32, **options
        )
        if lse is not None:
            assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
        else:
            lse = torch.empty_like(result_lse)
        lse.copy_(result_lse.masked_fill(result_lse == float("inf"), float("-inf")))
        out = torch.empty_like(result) if out is None else out
        out.copy_(result)
        return out, lse, None, None, None

    def _flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
        window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
        max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None, dlse=None, learnable_sink=None,
        **unused,
    ):
        module.calls.append(("bwd", dict(locals())))
        _check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, window_size_left, window_size_right)
        options = _options(causal, window_size_left, window_size_right, softmax_scale, softcap, learnable_sink)
        assert options.pop("sink") is None, "the adapter computes the sink gradient itself"
        grads = reference.attention_backward(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k=seqused_k, grad_lse=dlse,
            compute_dtype=torch.float32, **options,
        )
        dq = torch.empty_like(q) if dq is None else dq
        dk = torch.empty_like(k) if dk is None else dk
        dv = torch.empty_like(v) if dv is None else dv
        dq.copy_(grads[0])
        # FA4 writes dK/dV only for keys a sequence uses.
        starts, ends = cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist()
        used = seqused_k.tolist() if seqused_k is not None else [e - s for s, e in zip(starts, ends)]
        for start, count in zip(starts, used):
            dk[start:start + count] = grads[1][start:start + count]
            dv[start:start + count] = grads[2][start:start + count]
        return dq, dk, dv

    module._flash_attn_fwd = _recording(module, "fwd", _flash_attn_fwd)
    module._flash_attn_bwd = _recording(module, "bwd", _flash_attn_bwd)
    return module


def _recording(module: types.ModuleType, name: str, function):
    """``function``, recording the keywords each call passes in ``module.passed`` (the
    signature stays the function's: ``inspect.signature`` follows ``__wrapped__``)."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        module.passed.append((name, set(kwargs)))
        return function(*args, **kwargs)

    return call
