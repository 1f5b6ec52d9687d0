"""varlen_attn under dispatch logging and torch.compile on the CPU.

On the CPU, Inductor lowers the ops to their eager implementation (a fallback), so compiled
results equal eager ones up to the compiled code around the op.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import fresh_inductor_cache

from factory import AttnSpec, make_case, make_cu_seq
from modules import BACKWARD_OP, FORWARD_OP, AttentionBlock, CompiledOpLoggingMode, OpLoggingMode
from varlen_compile import AuxRequest, config, varlen_attn

HEADS, HEAD_DIM = 4, 16
LENGTHS = [5, 0, 9, 1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _block_inputs(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = torch.randn(sum(lengths), HEADS * HEAD_DIM, requires_grad=True)
    return x, make_cu_seq(lengths), max(lengths)


def test_dispatch_logging_eager():
    block = AttentionBlock(HEADS, HEAD_DIM)
    x, cu_seq, max_len = _block_inputs(LENGTHS)
    with OpLoggingMode() as mode:
        block(x, cu_seq, max_len).sum().backward()
    assert FORWARD_OP in mode.ops
    assert BACKWARD_OP in mode.ops
    assert mode.ops.index(FORWARD_OP) < mode.ops.index(BACKWARD_OP)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_dispatch_logging_compiled(backend):
    """Dynamo really compiles (one frame, fullgraph) while the mode is active, and the mode
    sees both ops run by the compiled forward and backward."""
    block = AttentionBlock(HEADS, HEAD_DIM)
    x, cu_seq, max_len = _block_inputs(LENGTHS)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    with CompiledOpLoggingMode() as mode:
        compiled(x, cu_seq, max_len).sum().backward()
    assert counter.frame_count == 1
    assert any(FORWARD_OP in str(node.target) for graph in counter.graphs for node in graph.graph.nodes)
    assert FORWARD_OP in mode.ops
    assert BACKWARD_OP in mode.ops


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_block_matches_eager(backend):
    eager_block = AttentionBlock(HEADS, HEAD_DIM)
    compiled_block = copy.deepcopy(eager_block)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_block, backend=counter, fullgraph=True)
    x, cu_seq, max_len = _block_inputs(LENGTHS)
    x_compiled = x.detach().clone().requires_grad_()
    grad = torch.randn(x.shape)

    expected = eager_block(x, cu_seq, max_len)
    expected.backward(grad)
    actual = compiled(x_compiled, cu_seq, max_len)
    actual.backward(grad)

    assert counter.frame_count == 1
    _assert_same(actual, expected, "out")
    _assert_same(x_compiled.grad, x.grad, "dx")
    for (name, param), param_compiled in zip(eager_block.named_parameters(), compiled_block.parameters()):
        _assert_same(param_compiled.grad, param.grad, f"d{name}")


SPEC = AttnSpec((6, 0, 9, 1), (4, 3, 11, 0), heads_q=6, heads_kv=2, is_causal=True, window_size=(3, -1))


def _attention_with_lse(query, key, value, cu_seq_q, cu_seq_k):
    out, lse = varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, **SPEC.api_kwargs, return_aux=AuxRequest(lse=True)
    )
    return out, lse


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gqa_window_lse_matches_eager(backend):
    """GQA, q_len != k_len, a window, lse returned and differentiated, no max hints."""
    case = SPEC.make(requires_grad=True)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_attention_with_lse, backend=counter, fullgraph=True)
    expected = _attention_with_lse(*case.inputs())
    actual = compiled(*case.inputs())
    assert counter.frame_count == 1
    cotangents = (torch.randn_like(expected[0]), torch.randn_like(expected[1]))
    inputs = (case.q, case.k, case.v)
    expected_grads = torch.autograd.grad(expected, inputs, cotangents)
    actual_grads = torch.autograd.grad(actual, inputs, cotangents)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), actual + actual_grads, expected + expected_grads):
        _assert_same(a, e, name)


BATCHES = [
    [5, 9, 1],
    [12, 0, 3, 7],
    [2, 2],
    [17, 4, 0, 6, 1],
    [8],
    [3, 11, 6, 2, 9, 5],
]


def _assert_step_matches(case, actual: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    """A compiled output equals the eager one, and so do its gradients for one random grad_out."""
    grad_out = torch.randn_like(expected)
    actual_grads = torch.autograd.grad(actual, (case.q, case.k, case.v), grad_out)
    expected_grads = torch.autograd.grad(expected, (case.q, case.k, case.v), grad_out)
    _assert_same(actual, expected, f"out {label}")
    for name, a, e in zip(("dq", "dk", "dv"), actual_grads, expected_grads):
        _assert_same(a, e, f"{name} {label}")


@pytest.mark.parametrize("hints", [True, False], ids=["max-hints", "no-hints"])
def test_varying_batches_compile_at_most_twice(hints):
    """Six batches of different token and sequence counts: a static compile, then at most one
    dynamic recompile. Each compiled result equals eager."""

    def attention(query, key, value, cu_seq, max_len):
        return varlen_attn(query, key, value, cu_seq, cu_seq, max_len, max_len, is_causal=True)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attention, backend=counter, fullgraph=True)
    for lengths in BATCHES:
        case = make_case(lengths, heads_q=HEADS, head_dim=HEAD_DIM, requires_grad=True)
        max_len = case.max_q if hints else None
        actual = compiled(case.q, case.k, case.v, case.cu_seq_q, max_len)
        expected = attention(case.q, case.k, case.v, case.cu_seq_q, max_len)
        _assert_step_matches(case, actual, expected, str(lengths))
    assert 1 <= counter.frame_count <= 2, f"{counter.frame_count} compiles for {len(BATCHES)} batches"


def test_fallback_logs_why_once(caplog):
    """On the CPU the lowering runs the op's eager implementation and says so once per op and
    reason (logger varlen_compile.lowering.fallback; TORCH_LOGS="+varlen_compile" shows it)."""
    from varlen_compile.lowering import fallback

    fallback._logged.clear()
    caplog.set_level(logging.INFO, logger="varlen_compile")
    compiled = torch.compile(lambda *args: varlen_attn(*args, is_causal=True), backend="inductor", fullgraph=True)
    with fresh_inductor_cache():  # a cached graph is not lowered again, so nothing would log
        for lengths in ([3, 5], [4, 9, 1], [2, 2, 7]):  # a static, then a dynamic recompile
            case = make_case(lengths, requires_grad=True)
            compiled(*case.inputs()).sum().backward()
    messages = [record.getMessage() for record in caplog.records if "eager implementation" in record.getMessage()]
    assert len(messages) == 2, messages  # forward op and backward op, once each
    assert all("the Triton kernels are CUDA-only (device: cpu)" in message for message in messages)
    assert {message.split(" runs ")[0] for message in messages} == {FORWARD_OP, BACKWARD_OP}


@pytest.mark.parametrize("side", ["forward", "backward"])
def test_a_lowering_that_meets_an_unknown_inductor_api_falls_back(side, monkeypatch, caplog):
    """A torch whose Inductor changed an internal the lowering uses (here: the lowering's first
    step raises the AttributeError a removed attribute would): the compile still succeeds, the
    op's eager implementation runs inside the graph with the right results, forward and
    backward, and the reason is logged once. With ``config.strict_lowering`` (the test suite's
    default) the error is raised instead."""
    from varlen_compile.lowering import backward, fallback, forward

    def moved(*args, **kwargs):
        raise AttributeError("module 'torch._inductor.ir' has no attribute 'FixedLayout'")

    monkeypatch.setattr(forward if side == "forward" else backward, "plan_template", moved)
    case = make_case([3, 0, 6], heads_q=HEADS, head_dim=HEAD_DIM, requires_grad=True)
    attention = lambda *args: varlen_attn(*args, is_causal=True)  # noqa: E731

    def step(function):
        out = function(*case.inputs())
        return out, torch.autograd.grad(out.sum(), (case.q, case.k, case.v))

    with fresh_inductor_cache():
        torch._dynamo.reset()
        with pytest.raises(Exception, match="FixedLayout"):
            step(torch.compile(attention, backend="inductor", fullgraph=True))
        monkeypatch.setattr(config, "strict_lowering", False)
        fallback._logged.clear()
        caplog.set_level(logging.INFO, logger="varlen_compile")
        for _ in range(2):
            torch._dynamo.reset()
            out, grads = step(torch.compile(attention, backend="inductor", fullgraph=True))
    expected_out, expected_grads = step(attention)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    messages = [r.getMessage() for r in caplog.records if "cannot build on torch" in r.getMessage()]
    op = FORWARD_OP if side == "forward" else BACKWARD_OP
    assert len(messages) == 1 and "FixedLayout" in messages[0] and op in messages[0], messages


_PROBE_SETUPS = {
    # An Inductor internal the lowerings import is missing while the package imports.
    "inductor-api-missing": (
        "import torch._inductor.compile_fx, torch._inductor.lowering\n"
        "import torch._inductor.select_algorithm as select_algorithm\n"
        "removed = select_algorithm.autotune_select_algorithm\n"
        "del select_algorithm.autotune_select_algorithm\n"
        "import varlen_compile\n"
        "select_algorithm.autotune_select_algorithm = removed  # Inductor itself needs it\n",
        "cannot import on torch",
    ),
    # Triton is not installed (CPU wheels of torch come without it).
    "no-triton": ("sys.modules['triton'] = None\nimport varlen_compile\n", "Triton is not installed"),
}


@pytest.mark.parametrize("setup", _PROBE_SETUPS)
def test_without_templates_compiled_calls_run_the_eager_ops(setup, tmp_path):
    """Where the lowerings cannot build templates (an Inductor internal this torch lacks, or no
    Triton), ``import varlen_compile`` works, says why once, and compiled calls run the ops'
    eager implementations, forward and backward, with eager's results. In a fresh process."""
    import os
    import subprocess
    import sys

    prelude, expected_message = _PROBE_SETUPS[setup]
    script = tmp_path / "probe.py"
    script.write_text(
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s: %(message)s')\n"
        + prelude +
        "import torch\n"
        "from varlen_compile import varlen_attn\n"
        "cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)\n"
        "q, k, v = (torch.randn(9, 2, 8, requires_grad=True) for _ in range(3))\n"
        "attention = lambda q, k, v: varlen_attn(q, k, v, cu, cu, is_causal=True)\n"
        "out = torch.compile(attention, backend='inductor', fullgraph=True)(q, k, v)\n"
        "grads = torch.autograd.grad(out.sum(), (q, k, v))\n"
        "expected = attention(q, k, v)\n"
        "expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))\n"
        "same = torch.equal(out, expected) and all(map(torch.equal, grads, expected_grads))\n"
        "print('SAME' if same else 'DIFFERENT')\n"
    )
    # Caches of its own: a graph cached by another run would skip the lowering under test.
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "SAME", result.stdout
    said_at_import = [line for line in lines if line.startswith("varlen_compile.lowering: ")]
    assert len(said_at_import) == 1 and expected_message in said_at_import[0], result.stdout
    # Our fallback lowering served both ops (not Inductor's implicit fallback), each said once,
    # with the same reason.
    for op in (FORWARD_OP, BACKWARD_OP):
        said = [line for line in lines if f"{op} runs its eager implementation inside the compiled graph" in line]
        assert len(said) == 1 and expected_message in said[0], result.stdout


MALFORMED_OFFSETS = {
    "starts-at-2": [2, 5, 14],
    "negative": [-7, 5, 14],
    "decreasing": [0, 9, 4, 14],
    "ends-past-T": [0, 5, 30],
    "ends-before-T": [0, 5, 9],
    "far-out": [0, 2_000_000_000, 14],
}


@pytest.mark.parametrize("offsets", MALFORMED_OFFSETS.values(), ids=MALFORMED_OFFSETS.keys())
def test_malformed_offsets_under_compile_run_within_bounds(offsets):
    """Compiled code cannot validate cu_seq (it is data). Whatever it holds, forward and backward
    run with every offset clamped into the tensors, and rows no sequence covers get out = 0 on
    the CPU (the GPU memcheck test covers the kernels)."""
    total = 14
    q, k, v = (torch.randn(total, 2, 16, requires_grad=True) for _ in range(3))
    cu_seq = torch.tensor(offsets, dtype=torch.int32)
    compiled = torch.compile(lambda *args: varlen_attn(*args, is_causal=True), backend="inductor", fullgraph=True)
    out = compiled(q, k, v, cu_seq, cu_seq)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == q.shape and all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


def test_check_offsets_switch_asserts_on_device(monkeypatch):
    """config.check_offsets adds device-side assertions (no host sync) to traced calls; off by
    default, where the graph has none."""
    from varlen_compile import config

    def attention(query, key, value, cu_seq, max_len):
        return varlen_attn(query, key, value, cu_seq, cu_seq, max_len, max_len)

    case = make_case([3, 5])
    bad = torch.tensor([0, 3, 9], dtype=torch.int32)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, backend=backend, fullgraph=True)
    compiled(case.q, case.k, case.v, bad, None)  # off: runs, clamped
    assert not any("_assert_async" in str(node.target) for node in backend.graphs[0].graph.nodes)

    monkeypatch.setattr(config, "check_offsets", True)
    compiled(case.q, case.k, case.v, case.cu_seq_q, 5)
    assert backend.frame_count == 2, "the switch is guarded on: flipping it recompiles"
    with pytest.raises(RuntimeError, match="cu_seq_q must start at 0, never decrease and end at the token count"):
        compiled(case.q, case.k, case.v, bad, 5)
    with pytest.raises(RuntimeError, match="max_q is smaller than the longest sequence"):
        compiled(case.q, case.k, case.v, case.cu_seq_q, 4)


def test_unbacked_token_counts_compile_in_one_graph():
    """Token counts marked unbacked (as data-dependent sizes are): the shape checks become
    runtime assertions instead of guards, and the graph compiles whole, equal to eager."""
    def attention(query, key, value, cu_seq_q, cu_seq_k):
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, is_causal=True, enable_gqa=True)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attention, backend=counter, fullgraph=True)
    for lengths_q, lengths_k in (([5, 9], [7, 11]), ([7, 2, 3], [1, 2, 9])):
        case = make_case(lengths_q, lengths_k, heads_q=4, heads_kv=2, requires_grad=True)
        for tensor in (case.q, case.k, case.v):
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        actual = compiled(*case.inputs())
        expected = attention(*case.inputs())
        grad_out = torch.randn_like(expected)
        inputs = (case.q, case.k, case.v)
        for name, a, e in zip(
            ("out", "dq", "dk", "dv"),
            (actual, *torch.autograd.grad(actual, inputs, grad_out)),
            (expected, *torch.autograd.grad(expected, inputs, grad_out)),
        ):
            _assert_same(a, e, name)
    assert counter.frame_count <= 2


def _varlen_entry(case):
    return varlen_attn(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, is_causal=True)


def _fa2_entry(case):
    from varlen_compile.flash_attn_compat import flash_attn_varlen_func

    return flash_attn_varlen_func(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, None, None, causal=True)


def _nested_entry(case):
    from varlen_compile.nested import scaled_dot_product_attention

    offsets_q, offsets_k = case.cu_seq_q.long(), case.cu_seq_k.long()  # k and v share one structure

    def nested(packed, offsets):
        return torch.nested.nested_tensor_from_jagged(packed, offsets).transpose(1, 2)

    out = scaled_dot_product_attention(
        nested(case.q, offsets_q), nested(case.k, offsets_k), nested(case.v, offsets_k), is_causal=True
    )
    return out.transpose(1, 2).values()


@pytest.mark.parametrize("entry", [_varlen_entry, _fa2_entry, _nested_entry], ids=["varlen_attn", "flash_attn_compat", "nested-sdpa"])
def test_dynamic_true_compiles_each_entry_point_once(entry):
    """dynamic=True: one Dynamo frame for batches of different sizes, forward and backward. A
    float default (softcap, dropout_p) would become a symbolic input that Inductor's
    tensorify pass cannot keep, and Dynamo would restart its analysis: a second frame."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(entry, backend=counter, fullgraph=True, dynamic=True)
    # No two sizes of a batch are equal: Dynamo's duck sizing would tie them with a guard.
    for lengths_q, lengths_k in (([5, 3, 7, 2, 6], [4, 3, 9, 2, 7]), ([2, 11, 1, 6, 4, 3], [2, 10, 3, 6, 5, 3])):
        case = make_case(lengths_q, lengths_k, heads_q=HEADS, head_dim=HEAD_DIM, requires_grad=True)
        _assert_step_matches(case, compiled(case), entry(case), str(lengths_q))
    assert counter.frame_count == 1, f"{counter.frame_count} frames (a restart or a recompile)"


def test_compile_caches_are_keyed_on_our_build(monkeypatch):
    """Inductor's on-disk caches cannot see our sources or whether FA4 is installed: the
    package puts a fingerprint of both into torch.compiler.config.cache_key_tag, so a graph
    cached before an upgrade (or before FA4 was installed) is compiled again, not reused."""
    from torch._dynamo.utils import counters

    from varlen_compile.lowering import cache_tag

    tag = torch.compiler.config.cache_key_tag
    assert f"varlen_compile={cache_tag.build_fingerprint()}" in tag.split("|")

    def attention(query, key, value, cu_seq):
        return varlen_attn(query, key, value, cu_seq, cu_seq, is_causal=True)

    case = make_case([5, 9, 1], heads_q=HEADS, head_dim=HEAD_DIM)

    def compile_and_count() -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        torch.compile(attention, fullgraph=True)(case.q, case.k, case.v, case.cu_seq_q)
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    with (
        fresh_inductor_cache(),
        torch._inductor.config.patch(fx_graph_cache=True, fx_graph_remote_cache=False),
        torch.compiler.config.patch(cache_key_tag="user-tag|" + tag),  # restored on exit
    ):
        assert compile_and_count() == (0, 1)
        assert compile_and_count() == (1, 0)  # the cache works at all
        monkeypatch.setattr(cache_tag, "build_fingerprint", lambda: "0123456789abcdef")
        cache_tag.tag_compile_caches.cache_clear()
        try:
            assert cache_tag.tag_compile_caches() == "user-tag|varlen_compile=0123456789abcdef"  # the user's part kept
            assert compile_and_count() == (0, 1)  # another build: compiled again
        finally:
            cache_tag.tag_compile_caches.cache_clear()
    assert torch.compiler.config.cache_key_tag == tag


def test_build_fingerprint_follows_the_fa4_version(monkeypatch):
    import importlib.metadata

    from varlen_compile.lowering import cache_tag

    real_version = importlib.metadata.version

    def version(name, fa4_version):
        if name == "flash-attn-4":
            if fa4_version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return fa4_version
        return real_version(name)

    prints = []
    for fa4_version in (None, "4.0.0b36", "4.0.0b37"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=fa4_version: version(name, v))
        prints.append(cache_tag.build_fingerprint())
    assert len(set(prints)) == 3, prints
