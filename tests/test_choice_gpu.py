"""FlashAttention 4 as a kernel choice behind our ops, on the GPU.

Skipped without a CUDA GPU that FA4 serves (sm90/sm100) or without ``flash_attn.cute``
(``pip install varlen-compile[fa4]``; on a GPU machine without network access, the FA4 wheels
as ``benchmarks/gpu_steps.sh`` installs them).

Numerics against the float64 reference under the error rule (docs/design.md §15), eager and compiled, forward
and gradients (the sink's too): lengths 0 and 1, q_len != k_len, GQA, causal, windows, softcap,
sinks, seqused_k, D_v != D, fp16 and bf16. Compiled: the generated code calls FA4 when it is
chosen and our template when ``triton`` is forced or FA4 cannot serve; zero host syncs in a
steady-state forward+backward step; at most one recompile over 100 random batches; CUDA graphs
with changing ``cu_seq``; ``torch.export`` keeps our op; ``cpp_wrapper`` takes the template;
malformed offsets stay in bounds (run under compute-sanitizer by the memcheck step).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from factory import assert_meets_error_rule, make_cu_seq
from varlen_compile import AuxRequest, _compat, config, reference, varlen_attn
from varlen_compile.params import AttnOptions


def _fa4_usable() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        return False, "FA4 serves sm90/sm100 here"
    interface, reason = _compat.fa4_interface()
    return interface is not None, reason


_USABLE, _WHY = _fa4_usable()
pytestmark = [pytest.mark.gpu, pytest.mark.fa4, pytest.mark.skipif(not _USABLE, reason=_WHY)]

DEVICE = "cuda"
FA4_FWD, FA4_BWD = "_fa4_forward_into", "_fa4_backward_into"
FWD_KERNEL, BWD_KERNEL = "varlen_fwd_tile(", "varlen_bwd_dkdv_tile("
LENGTHS_Q = [300, 0, 1, 77, 129, 5]
LENGTHS_K = [280, 3, 1, 77, 200, 0]

CASES = {
    "d128-causal-gqa": dict(head_dim=128, is_causal=True),
    "d64-full": dict(head_dim=64),
    "d64-fp16-causal": dict(head_dim=64, is_causal=True, dtype=torch.float16),
    "d128-window": dict(head_dim=128, window_size=(64, 16)),
    "d64-causal-window": dict(head_dim=64, is_causal=True, window_size=(48, 0)),
    "d256-causal": dict(head_dim=256, is_causal=True),
    "d96-full": dict(head_dim=96),
    "mla-d192-dv128-causal": dict(head_dim=192, head_dim_v=128, is_causal=True, heads_kv=8),  # no GQA: sm90 refuses it
    "softcap-causal": dict(head_dim=128, softcap=30.0, is_causal=True),
    "sink-window": dict(head_dim=64, sink=True, window_size=(64, 0)),
    "seqused-causal": dict(head_dim=128, seqused=True, is_causal=True),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fa4_calls(monkeypatch):
    """Counts the calls that reach FA4's forward and backward (replay off, so that each of our
    FA4 calls reaches FA4's entry points; the replay has its own tests)."""
    monkeypatch.setattr(config, "fa4_replay", False)
    interface, _ = _compat.fa4_interface()
    calls = {"fwd": 0, "bwd": 0}
    forward, backward = interface._flash_attn_fwd, interface._flash_attn_bwd

    @functools.wraps(forward)  # keeps FA4's attributes on the function (its compile_cache)
    def counted_forward(*args, **kwargs):
        calls["fwd"] += 1
        return forward(*args, **kwargs)

    @functools.wraps(backward)
    def counted_backward(*args, **kwargs):
        calls["bwd"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(interface, "_flash_attn_fwd", counted_forward)
    monkeypatch.setattr(interface, "_flash_attn_bwd", counted_backward)
    return calls


def _inputs(head_dim=64, head_dim_v=None, dtype=torch.bfloat16, sink=False, seqused=False, heads_kv=2, **_):
    torch.manual_seed(0)
    head_dim_v = head_dim_v or head_dim
    tq, tk = sum(LENGTHS_Q), sum(LENGTHS_K)
    return {
        "q": torch.randn(tq, 8, head_dim, device=DEVICE, dtype=dtype),
        "k": torch.randn(tk, heads_kv, head_dim, device=DEVICE, dtype=dtype),
        "v": torch.randn(tk, heads_kv, head_dim_v, device=DEVICE, dtype=dtype),
        "cu_seq_q": make_cu_seq(LENGTHS_Q, DEVICE),
        "cu_seq_k": make_cu_seq(LENGTHS_K, DEVICE),
        "sink": torch.randn(8, device=DEVICE) if sink else None,
        "seqused_k": torch.tensor([200, 1, 0, 77, 150, 0], dtype=torch.int32, device=DEVICE) if seqused else None,
    }


def _call(inputs, q, k, v, sink, case):
    return varlen_attn(
        q, k, v, inputs["cu_seq_q"], inputs["cu_seq_k"], is_causal=case.get("is_causal", False),
        window_size=case.get("window_size", (-1, -1)), enable_gqa=True, return_aux=AuxRequest(lse=True),
        softcap=case.get("softcap", 0.0), sink=sink, seqused_k=inputs["seqused_k"],
    )


def _reference(inputs, case, dtype, grad_out, grad_lse):
    leaves = [inputs[name].detach().to(dtype).requires_grad_() for name in ("q", "k", "v")]
    sink = inputs["sink"].detach().to(dtype).requires_grad_() if inputs["sink"] is not None else None
    options = AttnOptions(
        case.get("is_causal", False), None, *case.get("window_size", (-1, -1)), softcap=case.get("softcap", 0.0),
    )
    out, lse = reference.attention_forward(
        *leaves, inputs["cu_seq_q"], inputs["cu_seq_k"], options, sink=sink, seqused_k=inputs["seqused_k"],
        compute_dtype=dtype,
    )
    wrt = leaves + ([sink] if sink is not None else [])
    grads = torch.autograd.grad((out, lse), wrt, (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return (out, lse, *grads)


def _run(case, inputs, compiled: bool):
    """``(out, lse, grads, grad_out, grad_lse, generated source)`` of one forward+backward step
    through the public API (lse used too, so the backward gets a gradient into it)."""
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
    sink = inputs["sink"].clone().requires_grad_() if inputs["sink"] is not None else None
    wrt = leaves + ([sink] if sink is not None else [])
    call = torch.compile(_call, fullgraph=True) if compiled else _call

    def step():
        out, lse = call(inputs, *leaves, sink, case)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        return out, lse, torch.autograd.grad((out, lse), wrt, (grad_out, grad_lse)), grad_out, grad_lse

    if not compiled:
        return (*step(), "")
    result, codes = run_and_get_code(step)
    return (*result, "\n".join(codes))


def _check(name, case, inputs, out, lse, grads, grad_out, grad_lse):
    dtype = inputs["q"].dtype
    oracle = _reference(inputs, case, torch.float64, grad_out, grad_lse)
    plain = _reference(inputs, case, dtype, grad_out, grad_lse)  # the budget: the input dtype
    for label, mine, exact, budget in zip(("out", "lse", "dq", "dk", "dv", "dsink"), (out, lse, *grads), oracle, plain):
        assert_meets_error_rule(mine.detach(), exact.detach(), budget.detach(), name=f"{name}/{label}")


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name", list(CASES))
def test_fa4_matches_reference(name, mode, fa4_calls):
    """kernel='fa4': FA4 runs forward and backward (eager: our backends call it; compiled: the
    generated code calls it, no template) and meets the error rule, lse and dsink included."""
    case = CASES[name]
    inputs = _inputs(**case)
    with config.patch(kernel="fa4"):
        out, lse, grads, grad_out, grad_lse, source = _run(case, inputs, compiled=mode == "compiled")
    assert fa4_calls["fwd"] >= 1 and fa4_calls["bwd"] >= 1, f"FA4 did not run: {fa4_calls}"
    if mode == "compiled":
        assert FA4_FWD in source and FA4_BWD in source
        assert FWD_KERNEL not in source and BWD_KERNEL not in source
    _check(name, case, inputs, out, lse, grads, grad_out, grad_lse)


REPLAYED = ["d128-causal-gqa", "d64-full", "d128-window", "softcap-causal", "sink-window", "seqused-causal",
            "mla-d192-dv128-causal", "d64-fp16-causal"]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name", REPLAYED)
def test_replayed_fa4_calls_give_fa4s_own_results(name, mode, monkeypatch):
    """With FA4's calls replayed (lowering/fa4_replay.py; from a key's first call without a
    compile on), steps launch FA4's kernels without FA4's Python and give what FA4's own calls
    give: the forward bit for bit, the gradients under the error rule (FA4's backward
    accumulates dQ with atomics, so its bits vary between runs)."""
    from varlen_compile.lowering import fa4 as adapter

    case = CASES[name]
    inputs = _inputs(**case)
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
    sink = inputs["sink"].clone().requires_grad_() if inputs["sink"] is not None else None
    wrt = leaves + ([sink] if sink is not None else [])
    call = torch.compile(_call, fullgraph=True) if mode == "compiled" else _call
    entered = {"fwd": 0, "bwd": 0}
    interface, _ = _compat.fa4_interface()
    for side, name_ in (("fwd", "_flash_attn_fwd"), ("bwd", "_flash_attn_bwd")):
        function = getattr(interface, name_)

        def counted(*args, _function=function, _side=side, **kwargs):
            entered[_side] += 1
            return _function(*args, **kwargs)

        counted.compile_cache = function.compile_cache
        monkeypatch.setattr(interface, name_, counted)
    adapter._FORWARD.clear()
    adapter._BACKWARD.clear()
    grads_in = {}

    def step():
        out, lse = call(inputs, *leaves, sink, case)
        if not grads_in:
            grads_in.update(out=torch.randn_like(out), lse=torch.randn_like(lse))
        grads = torch.autograd.grad((out, lse), wrt, (grads_in["out"], grads_in["lse"]))
        return out.detach().clone(), lse.detach().clone(), grads

    with config.patch(kernel="fa4", fa4_replay=False):
        own = step()
    with config.patch(kernel="fa4"):
        for _ in range(3):
            step()
        before = dict(entered)
        replayed = step()
    assert entered == before, f"FA4's Python ran in a step that should have replayed: {before} -> {entered}"
    assert any(adapter._FORWARD._plans.values()) and any(adapter._BACKWARD._plans.values())
    assert torch.equal(replayed[0], own[0]) and torch.equal(replayed[1], own[1])
    _check(name, case, inputs, replayed[0], replayed[1], replayed[2], grads_in["out"], grads_in["lse"])


def test_forcing_triton_or_an_unservable_call_runs_the_template(fa4_calls):
    """kernel='triton' keeps FA4 out of the graph; kernel='fa4' on what FA4 cannot serve (here
    fp32) runs the template, silently correct."""
    case = CASES["d128-causal-gqa"]
    with config.patch(kernel="triton"):
        *_, source = _run(case, _inputs(**case), compiled=True)
    assert FWD_KERNEL in source and FA4_FWD not in source and fa4_calls["fwd"] == 0
    torch._dynamo.reset()
    inputs = _inputs(head_dim=128, dtype=torch.float32)
    with config.patch(kernel="fa4"):
        out, lse, grads, grad_out, grad_lse, source = _run(case, inputs, compiled=True)
    assert FWD_KERNEL in source and FA4_FWD not in source and fa4_calls["fwd"] == 0
    _check("fp32", case, inputs, out, lse, grads, grad_out, grad_lse)


@pytest.fixture
def any_batch_size(monkeypatch):
    """The default table (no fitted costs) without its batch-size floor (FA4_MIN_ROWS), for the
    small test batches; a fresh Inductor cache, since neither is part of the cache key."""
    from torch._inductor.utils import fresh_inductor_cache

    from varlen_compile.lowering import choices

    monkeypatch.setattr(choices, "FA4_MIN_ROWS", 0)
    monkeypatch.setattr(choices, "COSTS", {})
    with fresh_inductor_cache():
        yield


@pytest.mark.parametrize("name", ["d128-causal-gqa"])
def test_auto_picks_fa4_where_the_default_table_says(name, fa4_calls, any_batch_size):
    case = CASES[name]
    *_, source = _run(case, _inputs(**case), compiled=True)
    assert FA4_FWD in source and FA4_BWD in source


def _assert_auto_runs(lengths: list[int], head_dim: int, fa4: bool, **compile_kwargs) -> None:
    """Compile one causal GQA forward+backward step under the default switch; the generated code
    calls FA4 (both directions) when ``fa4``, else our template."""
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, *_ = _batch(lengths, head_dim=head_dim)
    compiled = torch.compile(attention, fullgraph=True, **compile_kwargs)

    def step():
        out = compiled(q, k, v, cu_q, cu_k, None, None)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    _, codes = run_and_get_code(step)
    source = "\n".join(codes)
    assert (FA4_FWD in source and FA4_BWD in source) is fa4
    assert (FWD_KERNEL in source) is not fa4


@pytest.mark.parametrize("lengths, fa4", [([6000, 6000, 5000], True), ([300, 0, 1, 77, 129, 5], False)], ids=["136k-rows", "4k-rows"])
def test_auto_needs_enough_rows_for_fa4(lengths, fa4):
    """Behind our op FA4 pays host time the template does not: the default choice keeps the
    template on a small batch and picks FA4 on a large one (on sm90 at causal D128 the fitted
    cost model decides, elsewhere the table's T_q * H_q >= 2**17 rows; here H_q = 8)."""
    _assert_auto_runs(lengths, 128, fa4)


def test_auto_follows_the_batch_under_dynamic_shapes(fa4_calls):
    """Compiled once with dynamic shapes, the default choice is decided per batch through a
    guard (the cost model's comparison, or the table's row rule): a 4k-row batch runs the
    template, a 136k-row batch recompiles once and runs FA4, and batches of either size after
    that reuse their graph."""
    from torch._inductor.utils import fresh_inductor_cache

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attention, backend=counter, fullgraph=True, dynamic=True)
    small, large = [300, 0, 1, 77, 129, 5], [6000, 6000, 5000]
    with fresh_inductor_cache():
        for lengths, fa4, frames in ((small, False, 1), (large, True, 2), (small, False, 2), (large, True, 2)):
            before = dict(fa4_calls)
            q, k, v, cu_q, cu_k, *_ = _batch(lengths)
            out = compiled(q, k, v, cu_q, cu_k, None, None)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            ran_fa4 = fa4_calls["fwd"] > before["fwd"] and fa4_calls["bwd"] > before["bwd"]
            assert ran_fa4 is fa4 and fa4_calls["fwd"] - before["fwd"] <= 1, (len(lengths), fa4_calls)
            assert counter.frame_count == frames, (len(lengths), counter.frame_count)


def _hint_reading_costs() -> dict:
    """Cost-model coefficients for sm90, D64 causal, under which the skewed batch of
    :func:`test_auto_reads_the_max_hint` goes to FA4 only when its ``max_k`` hint is known:
    FA4-like (more host time, less per pair) against a template-like lean kernel."""
    from varlen_compile.lowering.cost_model import FEMTOSECONDS, CostKey, KernelCost

    us = FEMTOSECONDS // 10**6
    costs = {"fa4": KernelCost(host=60 * us, launch=8 * us, row=1_000, sequence=100_000, pair=600),
             "triton": KernelCost(host=20 * us, launch=5 * us, row=2_000, sequence=200_000, pair=1_000)}
    return {9: {CostKey(side, 64, 64, causal=True): costs for side in ("forward", "backward")}}


def test_auto_reads_the_max_hint(fa4_calls, monkeypatch):
    """One 16k-token sequence among 63 of 64 tokens: equal lengths of the same count predict
    little attention (the template), the max hints show the work (FA4). Under dynamic shapes the
    hints are sizes like the others: an even batch with its own hints runs the template after one
    recompile, both graphs are reused after that, and another skewed batch (other tokens, other
    longest sequence) reuses the first graph: a hint is not specialized to its value."""
    from torch._inductor.utils import fresh_inductor_cache

    from varlen_compile.lowering import choices

    monkeypatch.setattr(choices, "COSTS", _hint_reading_costs())
    skewed, even = [16384] + [64] * 63, [320] * 64
    with fresh_inductor_cache():
        for hinted, fa4 in ((False, False), (True, True)):
            torch._dynamo.reset()
            before = dict(fa4_calls)
            q, k, v, cu_q, cu_k, max_q, max_k = _batch(skewed, head_dim=64)
            out = torch.compile(attention, fullgraph=True)(q, k, v, cu_q, cu_k, *((max_q, max_k) if hinted else (None, None)))
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            ran = (fa4_calls["fwd"] > before["fwd"], fa4_calls["bwd"] > before["bwd"])
            assert ran == (fa4, fa4), (hinted, fa4_calls)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(attention, backend=counter, fullgraph=True, dynamic=True)
        other_skewed = [12000] + [80] * 47
        for lengths, fa4, frames in ((skewed, True, 1), (even, False, 2), (skewed, True, 2), (even, False, 2),
                                     (other_skewed, True, 2)):
            before = dict(fa4_calls)
            q, k, v, cu_q, cu_k, max_q, max_k = _batch(lengths, head_dim=64)
            out = compiled(q, k, v, cu_q, cu_k, max_q, max_k)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            ran_fa4 = fa4_calls["fwd"] > before["fwd"] and fa4_calls["bwd"] > before["bwd"]
            assert ran_fa4 is fa4 and (fa4 or fa4_calls["fwd"] == before["fwd"]), (lengths[0], fa4_calls)
            assert counter.frame_count == frames, (lengths[0], counter.frame_count)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_deterministic_algorithms_keep_the_backward_off_fa4(compiled, fa4_calls):
    """kernel="fa4" under torch.use_deterministic_algorithms(True): the forward runs FA4, the
    backward never does (its default backward sums dQ with atomics), and the gradients repeat
    bit for bit over 10 passes."""
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, max_q, max_k = _batch([2048, 1500, 900, 4000])
    grad_out = torch.randn_like(q)
    step = torch.compile(attention, fullgraph=True, dynamic=False) if compiled else attention
    previous, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with config.patch(kernel="fa4"):
            grads = [torch.autograd.grad(step(q, k, v, cu_q, cu_k, max_q, max_k), (q, k, v), grad_out)
                     for _ in range(10)]
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
    assert fa4_calls["fwd"] >= 10 and fa4_calls["bwd"] == 0, fa4_calls
    for later in grads[1:]:
        assert all(torch.equal(grad, first) for grad, first in zip(later, grads[0]))


def test_auto_has_no_row_floor_under_cuda_graphs():
    """Compiled for CUDA graphs (mode="reduce-overhead") the 4k-row batch runs FA4: replays pay
    no per-call host time, and in GPU time FA4 wins small batches too."""
    from torch._inductor.utils import fresh_inductor_cache

    with fresh_inductor_cache():
        _assert_auto_runs([300, 0, 1, 77, 129, 5], 128, True, mode="reduce-overhead")


@pytest.mark.parametrize("lengths, fa4", [([600, 700, 512], True), ([300, 0, 1, 77, 129, 5], False)], ids=["mean-604", "mean-85"])
def test_auto_at_head_dim_64_follows_the_mean_length(lengths, fa4, any_batch_size):
    """At head dim 64 the default table picks FA4 from a mean sequence length of 512 tokens (the
    template won on short sequences), judged on the batch the graph is compiled for."""
    _assert_auto_runs(lengths, 64, fa4)


def test_auto_keeps_the_template_outside_the_default_table(any_batch_size):
    """seqused_k at head dim 128 is not in the default table (not measured): the template."""
    case = CASES["seqused-causal"]
    *_, source = _run(case, _inputs(**case), compiled=True)
    assert FWD_KERNEL in source and FA4_FWD not in source


def test_eager_auto_stays_on_aten_flash(fa4_calls):
    """The eager default is unchanged (aten flash); only the switch routes eager calls to FA4."""
    case = CASES["d128-causal-gqa"]
    _run(case, _inputs(**case), compiled=False)
    assert fa4_calls == {"fwd": 0, "bwd": 0}


def attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=True, enable_gqa=True)


def _batch(lengths_q, lengths_k=None, head_dim=128):
    lengths_k = lengths_k or lengths_q
    q = torch.randn(sum(lengths_q), 8, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lengths_k), 2, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lengths_k), 2, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    return q, k, v, make_cu_seq(lengths_q, DEVICE), make_cu_seq(lengths_k, DEVICE), max(lengths_q), max(lengths_k)


def _cuda_kernels(step, steps: int = 3) -> dict[str, int]:
    """CUDA kernel name -> launches over ``steps`` calls of ``step`` (after two warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    launches: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launches[event.name] = launches.get(event.name, 0) + 1
    return launches


def test_fa4_behind_our_op_runs_fa4s_own_kernels(fa4_calls):
    """A compiled kernel="fa4" training step launches exactly the CUDA kernels FA4's own autograd
    launches (the same names, as often: no copy, no extra pass over dQ/dK/dV, the GQA reduction
    FA4's own), plus per step our offsets sanitizer before each direction and one elementwise
    pass that gives rows without keys lse = +inf: what keeps the backward at FA4's GPU time."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    torch._dynamo.reset()
    lengths = [700, 1, 0, 300, 1024]
    q, k, v, cu_q, cu_k, max_q, max_k = _batch(lengths)
    grad_out = torch.randn_like(q)

    def direct():
        # Without the max_seqlen ints, as our op calls it (they could change FA4's forward tiles).
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)[0]
        torch.autograd.grad(out, (q, k, v), grad_out)

    compiled = torch.compile(attention, fullgraph=True, dynamic=False)

    def ours():
        torch.autograd.grad(compiled(q, k, v, cu_q, cu_k, max_q, max_k), (q, k, v), grad_out)

    with config.patch(kernel="fa4"):
        theirs, mine = _cuda_kernels(direct), _cuda_kernels(ours)
    assert fa4_calls["fwd"] and fa4_calls["bwd"]
    extra = {name: mine[name] - theirs.get(name, 0) for name in mine if mine[name] != theirs.get(name, 0)}
    missing = [name for name in theirs if name not in mine]
    assert not missing, missing
    sanitizer = [name for name in extra if "sanitize_offsets" in name]
    assert sanitizer and extra.pop(sanitizer[0]) == 2 * 3, extra  # forward and backward, 3 steps
    assert len(extra) == 1 and next(iter(extra.values())) == 3, extra  # the lse pass, once a step


@pytest.mark.parametrize("hints", [False, True], ids=["no-hints", "max-hints"])
@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "automatic-dynamic", "dynamic"])
def test_fa4_compiled_step_never_syncs(dynamic, hints, fa4_calls):
    compiled = torch.compile(attention, fullgraph=True, dynamic=dynamic)
    batches = [([130, 0, 1, 257], [90, 3, 1, 300]), ([64, 200, 17], [64, 100, 40]), ([5, 1, 400, 33, 0], [9, 1, 380, 33, 2])]
    if dynamic is False:
        batches = batches[:1] * 3
    with config.patch(kernel="fa4"):
        for index, (lengths_q, lengths_k) in enumerate(batches):
            q, k, v, cu_q, cu_k, max_q, max_k = _batch(lengths_q, lengths_k)
            args = (q, k, v, cu_q, cu_k) + ((max_q, max_k) if hints else (None, None))
            if index == len(batches) - 1:  # the steady state, after any recompile
                compiled(*args).sum().backward()  # warm: FA4 compiles its kernels on first use
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = compiled(*args)
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert fa4_calls["fwd"] > 0 and fa4_calls["bwd"] > 0


def test_fa4_at_most_one_recompile_over_100_random_batches():
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attention, backend=counter, fullgraph=True)
    rng = random.Random(0)
    with config.patch(kernel="fa4"):
        for _ in range(100):
            lengths = [rng.randint(0, 300) for _ in range(rng.randint(1, 12))]
            lengths[0] = max(lengths[0], 1)
            q, k, v, cu_q, cu_k, *_ = _batch(lengths, head_dim=64)
            out = compiled(q, k, v, cu_q, cu_k, None, None)
            out.sum().backward()
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles"


def _cudagraph_roots() -> int:
    from torch._inductor.cudagraph_trees import get_container

    container = get_container(torch.cuda.current_device())
    return len(container.tree_manager.roots) if container.tree_manager is not None else 0


def test_fa4_under_cuda_graphs_with_changing_offsets_and_tokens():
    """mode='reduce-overhead' with FA4 chosen: replays with new cu_seq contents (same T) and new
    token counts are correct, and Inductor skips no graph."""
    compiled = torch.compile(attention, fullgraph=True, mode="reduce-overhead")
    rng = random.Random(1)
    with config.patch(kernel="fa4"):
        for total in (512, 512, 512, 768, 768):
            cuts = sorted(rng.sample(range(1, total), 3))
            lengths = [b - a for a, b in zip([0] + cuts, cuts + [total])]
            q, k, v, cu_q, cu_k, *_ = _batch(lengths, head_dim=64)
            grad_out = torch.randn_like(q)
            out = compiled(q, k, v, cu_q, cu_k, None, None)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            out, grads = out.clone(), tuple(g.clone() for g in grads)
            inputs = {"q": q, "k": k, "v": v, "cu_seq_q": cu_q, "cu_seq_k": cu_k, "sink": None, "seqused_k": None}
            oracle = _reference(inputs, {"is_causal": True}, torch.float64, grad_out, torch.zeros(8, total, device=DEVICE))
            plain = _reference(inputs, {"is_causal": True}, torch.bfloat16, grad_out, torch.zeros(8, total, device=DEVICE))
            for label, mine, exact, budget in zip(("out", "dq", "dk", "dv"), (out, *grads), (oracle[0], *oracle[2:]), (plain[0], *plain[2:])):
                assert_meets_error_rule(mine, exact.detach(), budget.detach(), name=f"T{total}/{label}")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert _cudagraph_roots() >= 1, "no CUDA graph was recorded"


def test_export_keeps_our_op_with_fa4_chosen():
    q, k, v, cu_q, cu_k, *_ = _batch([100, 28])

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, cu_q, cu_k):
            return varlen_attn(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=True)

    with config.patch(kernel="fa4"):
        program = torch.export.export(Attention(), (q.detach(), k.detach(), v.detach(), cu_q, cu_k))
    nodes = [node for node in program.graph.nodes if "varlen_attn" in str(node.target)]
    assert nodes and "'fa4'" in repr((nodes[0].args, nodes[0].kwargs)), "the op and its kernel argument"


def test_cpp_wrapper_takes_the_template():
    q, k, v, cu_q, cu_k, *_ = _batch([100, 28])
    with config.patch(kernel="fa4"), torch.no_grad():
        compiled = torch.compile(attention, fullgraph=True, options={"cpp_wrapper": True})
        out, codes = run_and_get_code(compiled, q, k, v, cu_q, cu_k, None, None)
    source = "\n".join(codes)
    assert FA4_FWD not in source and "varlen_fwd_tile" in source
    expected = attention(q, k, v, cu_q, cu_k, None, None)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def test_max_autotune_offers_fa4_and_stays_correct():
    case = CASES["d128-causal-gqa"]
    inputs = _inputs(**case)
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
    compiled = torch.compile(_call, fullgraph=True, mode="max-autotune-no-cudagraphs")
    out, lse = compiled(inputs, *leaves, None, case)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    _check("max-autotune", case, inputs, out, lse, grads, grad_out, grad_lse)


MALFORMED_OFFSETS = {
    "starts-at-2": [2, 50, 140],
    "negative": [-70, 50, 140],
    "decreasing": [0, 90, 40, 140],
    "ends-past-T": [0, 50, 300],
    "far-out": [0, 2_000_000_000, 140],
    "all-past-T": [500, 600, 700],
}


def test_fa4_malformed_offsets_stay_in_bounds(fa4_calls):
    """FA4 trusts cu_seq; our sanitizer runs first, so whatever cu_seq holds nothing is read or
    written out of bounds (compute-sanitizer checks this under the memcheck step)."""
    compiled = torch.compile(attention, fullgraph=True)
    with config.patch(kernel="fa4"):
        for name, offsets in MALFORMED_OFFSETS.items():
            q, k, v, *_ = _batch([140])
            cu_seq = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
            out = compiled(q, k, v, cu_seq, cu_seq, None, None)
            grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
            torch.cuda.synchronize()
            assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape], name
    assert fa4_calls["fwd"] >= len(MALFORMED_OFFSETS)
