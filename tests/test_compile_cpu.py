"""varlen_attn under dispatch logging and torch.compile on the CPU.

On the CPU, Inductor lowers the ops to their eager implementation (a fallback), so compiled
results equal eager ones up to the compiled code around the op.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from factory import AttnSpec, make_case, make_cu_seq
from modules import BACKWARD_OP, FORWARD_OP, AttentionBlock, CompiledOpLoggingMode, OpLoggingMode
from varlen_compile import AuxRequest, varlen_attn

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
        grad_out = torch.randn_like(expected)
        actual_grads = torch.autograd.grad(actual, (case.q, case.k, case.v), grad_out)
        expected_grads = torch.autograd.grad(expected, (case.q, case.k, case.v), grad_out)
        _assert_same(actual, expected, f"out {lengths}")
        for name, a, e in zip(("dq", "dk", "dv"), actual_grads, expected_grads):
            _assert_same(a, e, f"{name} {lengths}")
    assert 1 <= counter.frame_count <= 2, f"{counter.frame_count} compiles for {len(BATCHES)} batches"
