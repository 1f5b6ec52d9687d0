"""FA4 calls recorded once per key and replayed (``lowering/fa4_replay.py``), on the CPU.

A stand-in package shaped like ``flash_attn.cute`` where it matters: an entry point whose
Python allocates, makes views and looks up a ``compile_cache`` keyed on what it decided, and
"compiled kernels" that compute (with torch ops, which a recording must not mistake for the
entry point's). The real FA4 is checked against its own calls in ``test_choice_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import types

import pytest
import torch

from varlen_compile import config
from varlen_compile.lowering import fa4_replay
from varlen_compile.lowering.fa4_replay import ATTEMPTS, Replayer

PACKAGE = "fake_fa4_compiled"


@dataclasses.dataclass
class Aux:
    tensors: object = None
    scalars: object = None


def _attention(q, k, v, scale, causal):
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.einsum("hqk,khd->qhd", (scores - lse[..., None]).exp(), v.float()).to(q.dtype), lse


def make_package(host_op=None, stray=None, tensor_constant=False, recompile=False):
    """A fresh stand-in module ``fake_fa4_compiled.interface`` (registered in ``sys.modules``).
    ``host_op(q)``: an extra op on the entry point's host path; ``stray``: a tensor made outside
    the call that the kernel also reads; ``tensor_constant``: a constant holding a tensor;
    ``recompile``: every call compiles anew."""
    module = types.ModuleType(PACKAGE + ".interface")
    module.python_calls, module.kernel_calls, module.compiles = [], [], []

    def compile_forward(key):
        module.compiles.append(key)

        def kernel(q, k, v, out, lse, scale, cu_seqlens, aux, extra=None):
            module.kernel_calls.append(key)
            result, result_lse = _attention(q, k, v, scale, key[2])
            out.copy_(result)
            lse.copy_(result_lse)
            if extra is not None:
                out.add_(extra.sum())

        return kernel

    def _flash_attn_fwd(q, k, v, cu_seqlens_q=None, lse=None, softmax_scale=None, causal=False):
        module.python_calls.append("fwd")
        if host_op is not None:
            host_op(q)
        q_call, k_call, v_call = q.detach(), k.detach(), v.detach()
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        key = (q.dtype, q.shape[-1], causal, softmax_scale)
        if recompile:
            _flash_attn_fwd.compile_cache.clear()
        if key not in _flash_attn_fwd.compile_cache:
            _flash_attn_fwd.compile_cache[key] = compile_forward(key)
        aux = Aux(tensors=[q] if tensor_constant else None)
        _flash_attn_fwd.compile_cache[key](q_call, k_call, v_call, out.detach(), lse, softmax_scale, cu_seqlens_q,
                                           aux, stray)
        return out, lse, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, dq=None, softmax_scale=None):
        module.python_calls.append("bwd")
        dq = torch.zeros_like(q) if dq is None else dq.zero_()
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        scratch = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device).t()
        key = ("bwd", q.shape[-1])
        if key not in _flash_attn_bwd.compile_cache:
            module.compiles.append(key)

            def kernel(q, k, v, dout, dq, dk, dv, scratch):
                module.kernel_calls.append(key)
                with torch.enable_grad():
                    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
                    result, _ = _attention(*leaves, softmax_scale, False)
                    grads = torch.autograd.grad(result.to(q.dtype).float(), leaves, dout.float())
                scratch.fill_(1.0)
                dq.add_(grads[0].to(dq.dtype))  # accumulates: the entry point zeroed it
                dk.copy_(grads[1])
                dv.copy_(grads[2])

            _flash_attn_bwd.compile_cache[key] = kernel
        _flash_attn_bwd.compile_cache[key](q.detach(), k.detach(), v.detach(), dout, dq, dk, dv, scratch)
        return dq, dk, dv

    _flash_attn_fwd.compile_cache = {}
    _flash_attn_bwd.compile_cache = {}
    module._flash_attn_fwd, module._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    return module


@pytest.fixture
def package(monkeypatch):
    def install(**kwargs):
        module = make_package(**kwargs)
        monkeypatch.setitem(sys.modules, PACKAGE, types.ModuleType(PACKAGE))
        monkeypatch.setitem(sys.modules, PACKAGE + ".interface", module)
        return module

    return install


def _inputs(tokens=7, heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(tokens, heads, dim, generator=generator).to(torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    lse = torch.empty(heads, tokens)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu, lse=lse, softmax_scale=dim ** -0.5, causal=True)


def test_a_recorded_call_is_replayed_with_the_same_results(package):
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for call in range(5):
        kwargs = _inputs(seed=call)
        expected_out, expected_lse, _ = module._flash_attn_fwd(**{**kwargs, "lse": torch.empty(2, 7)})
        out, lse, rest = replayer(module, **kwargs)
        assert rest is None and lse is kwargs["lse"]  # FA4's return value, as FA4 builds it
        assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    # the comparison calls run the entry point themselves; of the replayer's, the first is
    # FA4's own, the second is recorded, and the other three launch the kernel alone
    assert module.python_calls.count("fwd") == 5 + 2
    assert len(module.kernel_calls) == 10 and len(module.compiles) == 1


def test_a_new_shape_or_option_is_a_new_key(package):
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for kwargs in (_inputs(), _inputs(), _inputs(tokens=9), _inputs(tokens=9), {**_inputs(), "causal": False},
                   {**_inputs(), "causal": False}):
        replayer(module, **kwargs)
    # each key runs the entry point twice: FA4's own call, then the recorded one
    assert module.python_calls == ["fwd"] * 6
    for kwargs in (_inputs(seed=3), _inputs(tokens=9, seed=4), {**_inputs(seed=5), "causal": False}):
        out, _, _ = replayer(module, **kwargs)
        expected, _ = _attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["softmax_scale"], kwargs["causal"])
        assert torch.equal(out, expected)
    assert module.python_calls == ["fwd"] * 6


def test_strides_and_alignment_are_part_of_the_key(package):
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for _ in range(2):
        replayer(module, **_inputs())
    wide = torch.randn(7, 2, 16).to(torch.bfloat16)
    strided = {**_inputs(), "q": wide[..., :8]}
    out, _, _ = replayer(module, **strided)
    assert module.python_calls == ["fwd"] * 3
    assert torch.equal(out, _attention(wide[..., :8], strided["k"], strided["v"], 8 ** -0.5, True)[0])
    offset = torch.randn(7 * 2 * 8 + 1).to(torch.bfloat16)[1:].view(7, 2, 8)  # 2-byte aligned
    replayer(module, **{**_inputs(), "q": offset})
    assert module.python_calls == ["fwd"] * 4


def test_replayed_backward_allocates_zeroes_and_writes_given_buffers(package):
    module = package()
    replayer = Replayer("_flash_attn_bwd", package=PACKAGE)
    for call in range(4):
        f = _inputs(seed=call)
        q, k, v = f["q"], f["k"], f["v"]
        out, lse = _attention(q, k, v, 8 ** -0.5, False)
        dout = torch.randn_like(out)
        dq = torch.full_like(q, 7.0)  # the entry point zeroes a given dq
        kwargs = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, dq=dq, softmax_scale=8 ** -0.5)
        expected = module._flash_attn_bwd(**{**kwargs, "dq": torch.full_like(q, 7.0)})
        grads = replayer(module, **kwargs)
        assert grads[0] is dq
        for got, want in zip(grads, expected):
            assert torch.equal(got, want)
    assert module.python_calls.count("bwd") == 4 + 2


@pytest.mark.parametrize("why, options", [
    ("a host op that reads values", dict(host_op=lambda q: q.float().sum())),
    ("a tensor made outside the call", dict(stray=torch.zeros(1))),
    ("a constant holding a tensor", dict(tensor_constant=True)),
])
def test_a_record_that_cannot_be_accounted_for_is_never_replayed(package, why, options):
    module = package(**options)
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for call in range(4):
        kwargs = _inputs(seed=call)
        out, lse, _ = replayer(module, **kwargs)
        expected, expected_lse = _attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["softmax_scale"], True)
        assert torch.equal(out, expected), why
    assert module.python_calls == ["fwd"] * 4, why  # FA4's own call every time
    assert not any(replayer._plans.values())


def test_batches_whose_sizes_never_repeat_are_never_recorded(package, monkeypatch):
    """Token counts that change every call: each key's one call is FA4's own, no recording
    (its dispatch mode would cost more than it saves), and the keys remembered stay bounded."""
    monkeypatch.setattr(fa4_replay, "MAX_KEYS", 8)
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for tokens in range(1, 30):
        kwargs = _inputs(tokens=tokens, seed=tokens)
        out, _, _ = replayer(module, **kwargs)
        assert torch.equal(out, _attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["softmax_scale"], True)[0])
    assert module.python_calls == ["fwd"] * 29
    assert not replayer._tries and not replayer._plans and len(replayer._seen) == 8


def test_a_key_that_compiles_on_every_call_stops_being_recorded(package):
    module = package(recompile=True)
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for call in range(ATTEMPTS + 3):
        replayer(module, **_inputs(seed=call))
    assert module.python_calls == ["fwd"] * (ATTEMPTS + 3)
    assert sum(replayer._tries.values()) == ATTEMPTS


def test_the_switch_turns_replay_off(package):
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    with config.patch(fa4_replay=False):
        for call in range(4):
            replayer(module, **_inputs(seed=call))
    assert module.python_calls == ["fwd"] * 4 and not replayer._plans


def test_compile_caches_are_restored_after_a_recording(package):
    module = package()
    caches = (module._flash_attn_fwd.compile_cache, module._flash_attn_bwd.compile_cache)
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for call in range(2):
        replayer(module, **_inputs(seed=call))
    assert (module._flash_attn_fwd.compile_cache, module._flash_attn_bwd.compile_cache) == caches
    assert all(type(cache) is dict for cache in caches)


def test_another_threads_call_during_a_recording_is_not_recorded(package):
    """A call on another thread while one is recorded sees the wrapped cache but runs as
    usual, and the recording holds only its own thread's steps."""
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    replayer(module, **_inputs())  # compiles
    started, release = threading.Event(), threading.Event()
    results = {}

    def other():
        started.wait()
        kwargs = _inputs(seed=9)
        results["out"] = module._flash_attn_fwd(**kwargs)[0]
        results["want"] = _attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["softmax_scale"], True)[0]
        release.set()

    def host_op(q):
        started.set()
        release.wait(timeout=30)

    thread = threading.Thread(target=other)
    thread.start()
    original = module._flash_attn_fwd

    def entry(**kwargs):
        host_op(None)
        return original(**kwargs)

    entry.compile_cache = original.compile_cache
    waiting = types.SimpleNamespace(_flash_attn_fwd=entry)
    replayer(waiting, **_inputs(seed=1))  # records while the other thread calls
    thread.join()
    assert torch.equal(results["out"], results["want"])
    plan = replayer._plans[replayer._key(_inputs(seed=1))[0]]
    assert plan and sum(step.is_kernel for step in plan.steps) == 1


def test_the_replay_module_reads_no_value_on_the_host():
    """The ops a plan may replay allocate, fill, view or copy: none of them reads a value."""
    names = {packet.__name__ for packet in fa4_replay.REPLAYABLE_OPS}
    assert not names & {"item", "_local_scalar_dense", "nonzero", "masked_select", "sum", "max", "equal"}


def test_one_tensor_passed_twice_is_part_of_the_key(package):
    """A plan recorded with ``k is v`` must not serve a call with separate k and v of the same
    metadata (it would read v as the keys)."""
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for call in range(3):
        shared = _inputs(seed=call)
        shared["k"] = shared["v"]
        replayer(module, **shared)
    assert any(replayer._plans.values())
    for call in range(3, 6):
        kwargs = _inputs(seed=call)
        out, _, _ = replayer(module, **kwargs)
        expected, _ = _attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["softmax_scale"], True)
        assert torch.equal(out, expected)


def test_an_fa4_release_not_read_for_replay_is_called_as_it_is(package):
    module = package()
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE, audited=lambda: False)
    for call in range(4):
        replayer(module, **_inputs(seed=call))
    assert module.python_calls == ["fwd"] * 4 and not replayer._plans and not replayer._seen


def test_only_the_audited_release_is_replayed():
    from varlen_compile import _compat

    assert str(_compat.FA4_REPLAY_VERSIONS) == "==4.0.0b36"
    assert "4.0.0b37" not in _compat.FA4_REPLAY_VERSIONS and "4.0.0b36" in _compat.FA4_VERSIONS


class _Opaque:
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


@pytest.mark.parametrize("value, plain", [
    (3, True), (None, True), ((1, 2.0, "x", torch.bfloat16), True), (Aux(None, None), True),
    ({"a": [1, 2]}, True), (torch.zeros(1), False), ([torch.zeros(1)], False), (Aux([torch.zeros(1)]), False),
    (_Opaque(torch.zeros(1)), False), (object(), False),
])
def test_only_plain_constants_are_kept_in_a_plan(value, plain):
    assert fa4_replay._plain_constant(value) is plain


def test_other_uses_of_a_compile_cache_refuse_the_record(package):
    """``cache.get(key)`` (or the cache's own dict) would reach a kernel past the recording."""
    holder = {}
    module = package(host_op=lambda q: holder["module"]._flash_attn_fwd.compile_cache.get)
    holder["module"] = module
    replayer = Replayer("_flash_attn_fwd", package=PACKAGE)
    for call in range(4):
        replayer(module, **_inputs(seed=call))
    assert module.python_calls == ["fwd"] * 4
    assert replayer._plans and not any(replayer._plans.values())  # recorded once, refused
