"""GPU tests of the compiled path under every compile setting.

For each setting (static shapes, automatic dynamic, ``dynamic=True``, ``mark_dynamic`` on token
counts or head counts, ``mark_unbacked`` token counts), with and without ``max_q``/``max_k``:
the generated code runs our templates, a steady-state compiled forward+backward step never
syncs with the host (``torch.cuda.set_sync_debug_mode("error")``), and the result meets the
error rule. Also: at most one recompile over 100 random batches, CUDA graphs with changing
``cu_seq`` contents and token counts, malformed offsets (run under compute-sanitizer by the
memcheck command in the README), and understated max hints.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from factory import VarlenCase, assert_meets_error_rule, make_case, reference_outputs
from varlen_compile import config, varlen_attn
from varlen_compile.lowering import launcher
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

pytestmark = [pytest.mark.gpu]

DEVICE = "cuda"
FWD_KERNEL = "varlen_fwd_tile("
BWD_KERNEL = "varlen_bwd_dkdv_tile("


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _case(lengths_q, lengths_k=None, *, heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16) -> VarlenCase:
    return make_case(
        lengths_q, lengths_k, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype,
        device=DEVICE, requires_grad=True,
    )


def attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=True, enable_gqa=True)


def _step(compiled, case: VarlenCase, grad_out: torch.Tensor, hints: bool):
    """One forward+backward step: ``(out, (dq, dk, dv))``."""
    max_q, max_k = (case.max_q, case.max_k) if hints else (None, None)
    out = compiled(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, max_q, max_k)
    return out, torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)


def _check(case: VarlenCase, out, grads, grad_out) -> None:
    oracle = reference_outputs(case, torch.float64, grad_out=grad_out, is_causal=True)
    plain = reference_outputs(case, case.q.dtype, grad_out=grad_out, is_causal=True)
    assert_meets_error_rule(out, oracle[0], plain[0], name="out")
    for name, grad, grad_oracle, grad_plain in zip(("dq", "dk", "dv"), grads, oracle[2], plain[2]):
        assert_meets_error_rule(grad, grad_oracle, grad_plain, name=name)


def _mark(setting: str, case: VarlenCase) -> None:
    if setting == "mark-dynamic-tokens":
        for tensor in (case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k):
            torch._dynamo.mark_dynamic(tensor, 0)
    elif setting == "mark-dynamic-heads":
        for tensor in (case.q, case.k, case.v):
            torch._dynamo.mark_dynamic(tensor, 1)
    elif setting == "mark-unbacked-tokens":
        for tensor in (case.q, case.k, case.v):
            torch._dynamo.decorators.mark_unbacked(tensor, 0)


def _compile(setting: str):
    if setting == "static":
        return torch.compile(attention, fullgraph=True, dynamic=False)
    if setting == "dynamic":
        return torch.compile(attention, fullgraph=True, dynamic=True)
    return torch.compile(attention, fullgraph=True)  # automatic dynamic, with or without marks


# Three batches per setting: the last is the steady state, after any automatic-dynamic recompile.
# q_len != k_len per sequence, empty and single-token sequences; static shapes repeat one batch.
BATCHES = {
    "default": [
        dict(lengths_q=[130, 0, 1, 257], lengths_k=[90, 3, 1, 300]),
        dict(lengths_q=[64, 200, 17], lengths_k=[64, 100, 40]),
        dict(lengths_q=[5, 1, 400, 33, 0], lengths_k=[9, 1, 380, 33, 2]),
    ],
    "static": [dict(lengths_q=[130, 0, 1, 257], lengths_k=[90, 3, 1, 300])] * 3,
    "mark-dynamic-heads": [
        dict(lengths_q=[130, 7], lengths_k=[90, 7], heads_q=4, heads_kv=2),
        dict(lengths_q=[130, 7], lengths_k=[90, 7], heads_q=8, heads_kv=2),
        dict(lengths_q=[130, 7], lengths_k=[90, 7], heads_q=6, heads_kv=3),
    ],
}
SETTINGS = ["static", "automatic-dynamic", "dynamic", "mark-dynamic-tokens", "mark-dynamic-heads", "mark-unbacked-tokens"]


@pytest.mark.parametrize("hints", [False, True], ids=["no-hints", "max-hints"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_template_and_no_host_sync(setting, hints):
    compiled = _compile(setting)
    compiled_codes = []
    for kwargs in BATCHES.get(setting, BATCHES["default"]):
        case = _case(**kwargs)
        _mark(setting, case)
        grad_out = torch.randn_like(case.q)
        (out, grads), codes = run_and_get_code(_step, compiled, case, grad_out, hints)
        compiled_codes += [code for code in codes if code]
    for source in compiled_codes:  # every graph compiled for this setting runs our templates
        assert FWD_KERNEL in source or BWD_KERNEL in source, "a compiled graph without our template"
    joined = "\n".join(compiled_codes)
    assert FWD_KERNEL in joined and BWD_KERNEL in joined

    # Steady state: the last batch's shapes again, fresh values, under the sync checker.
    case = _case(**BATCHES.get(setting, BATCHES["default"])[-1])
    _mark(setting, case)
    grad_out = torch.randn_like(case.q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads = _step(compiled, case, grad_out, hints)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(case, out, grads, grad_out)


def _random_lengths(rng: random.Random, count: int) -> list[int]:
    return [rng.randint(1, 300) for _ in range(count)]


@pytest.mark.parametrize("hints", [False, True], ids=["no-hints", "max-hints"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic"])
def test_at_most_one_recompile_over_100_batches(dynamic, hints):
    """N, T and the lengths change every batch (q_len != k_len): one compile, plus at most one
    automatic-dynamic recompile. Every 10th batch is checked against the reference."""
    rng = random.Random(0)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attention, backend=counter, fullgraph=True, dynamic=dynamic)
    for index in range(100):
        num_seqs = rng.randint(2, 16)
        case = _case(_random_lengths(rng, num_seqs), _random_lengths(rng, num_seqs))
        grad_out = torch.randn_like(case.q)
        out, grads = _step(compiled, case, grad_out, hints)
        if index % 10 == 9:
            _check(case, out, grads, grad_out)
    assert counter.frame_count <= (1 if dynamic else 2), f"{counter.frame_count} compiles over 100 batches"


def _cudagraph_roots() -> int:
    manager = torch._inductor.cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return 0 if manager is None else sum(len(nodes) for nodes in manager.roots.values())


@pytest.mark.parametrize("hints", [False, True], ids=["no-hints", "max-hints"])
def test_cuda_graphs_with_changing_offsets_and_token_counts(hints):
    """mode="reduce-overhead": the compiled step is captured in CUDA graphs (no skip) and stays
    right when cu_seq's contents change at fixed shapes and when T changes."""
    counters.clear()
    torch._inductor.cudagraph_trees.reset_cudagraph_trees()
    compiled = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    same_shapes = [[100, 50, 78], [50, 128, 50], [10, 10, 208]]  # T = 228, N = 3 each time
    other_sizes = [[300, 4, 1], [64] * 9, [17, 250]]
    for lengths in same_shapes + other_sizes:
        torch.compiler.cudagraph_mark_step_begin()
        case = _case(lengths, [length + 3 for length in lengths])
        grad_out = torch.randn_like(case.q)
        out, grads = _step(compiled, case, grad_out, hints)
        out, grads = out.clone(), tuple(grad.clone() for grad in grads)  # replays reuse the memory
        _check(case, out, grads, grad_out)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert _cudagraph_roots() >= 1, "no CUDA graph was recorded"


MALFORMED_OFFSETS = {
    "starts-at-2": [2, 50, 140],
    "negative": [-70, 50, 140],
    "decreasing": [0, 90, 40, 140],
    "ends-past-T": [0, 50, 300],
    "ends-before-T": [0, 50, 90],
    "far-out": [0, 2_000_000_000, 140],
    "all-past-T": [500, 600, 700],
}


@pytest.mark.parametrize("kernel", ["auto", "aten"])
def test_malformed_offsets_stay_in_bounds(kernel):
    """Compiled code and the eager launcher cannot validate cu_seq: whatever it holds, the kernels
    clamp every offset into the tensors, and aten flash (``kernel="aten"``, with max hints) gets
    it through the offset sanitizer. Values in the rows it describes are unspecified; the
    guarantee is memory safety, which compute-sanitizer checks when this runs under memcheck
    (with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each tensor is its own allocation)."""
    total = 140
    compiled = torch.compile(attention, fullgraph=True)
    options = AttnOptions(is_causal=True)
    hints = (total, total) if kernel == "aten" else (None, None)
    for name, offsets in MALFORMED_OFFSETS.items():
        case = _case([total], heads_q=4, heads_kv=2)
        cu_seq = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
        with config.patch(kernel=kernel):
            out, codes = run_and_get_code(compiled, case.q, case.k, case.v, cu_seq, cu_seq, *hints)
        if codes:  # a call that compiled: aten flash is the one that runs when asked for
            assert any("_flash_forward_into" in code for code in codes) is (kernel == "aten"), name
        grads = torch.autograd.grad(out, (case.q, case.k, case.v), torch.randn_like(out))
        layout = BatchLayout(cu_seq, cu_seq)
        qkv = (case.q.detach(), case.k.detach(), case.v.detach())
        eager_out, lse = launcher.forward(*qkv, layout, options, OptionalInputs())
        eager_grads = launcher.backward(
            torch.randn_like(eager_out), *qkv, eager_out, lse, layout, options, OptionalInputs()
        )
        torch.cuda.synchronize()
        assert out.shape == eager_out.shape == case.q.shape, name
        assert [grad.shape for grad in grads] == [grad.shape for grad in eager_grads], name


def test_understated_max_hints_are_ignored_by_compiled_code():
    """Eager mode rejects hints below the real maxima; compiled code cannot check them and does
    not need them: the templates never read them, so the result is still right."""
    case = _case([300, 20, 1], [280, 40, 3])
    grad_out = torch.randn_like(case.q)
    compiled = torch.compile(attention, fullgraph=True)
    out = compiled(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, 16, 16)
    grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
    _check(case, out, grads, grad_out)


def test_dynamic_true_specializes_captured_window_ints():
    """dynamic=True makes ints captured from a closure symbolic, window sizes included; the
    lowering specializes them (the kernel takes them as constants) and keeps the template."""
    window = (48, 16)

    def windowed(query, key, value, cu_seq_q, cu_seq_k):
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, window_size=window, enable_gqa=True)

    compiled = torch.compile(windowed, fullgraph=True, dynamic=True)
    case = _case([300, 17, 0, 129], [280, 40, 3, 129])
    grad_out = torch.randn_like(case.q)

    def step():
        out = compiled(*case.inputs())
        return out, torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)

    (out, grads), codes = run_and_get_code(step)
    source = "\n".join(codes)
    assert FWD_KERNEL in source and BWD_KERNEL in source
    oracle = reference_outputs(case, torch.float64, grad_out=grad_out, window_size=window)
    plain = reference_outputs(case, case.q.dtype, grad_out=grad_out, window_size=window)
    for name, actual, expected, budget in zip(("out", "dq", "dk", "dv"), (out, *grads), (oracle[0], *oracle[2]), (plain[0], *plain[2])):
        assert_meets_error_rule(actual, expected, budget, name=name)


def test_marking_the_head_dim_dynamic_is_refused():
    """The head dim sizes the kernel's tiles, so the lowering guards on it; a head dim the user
    marked dynamic makes Dynamo refuse that guard (documented in the README) rather than the
    template silently giving way."""
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    case = _case([100, 20], heads_q=4, heads_kv=4)
    for tensor in (case.q, case.k, case.v):
        torch._dynamo.mark_dynamic(tensor, 2)
    compiled = torch.compile(attention, fullgraph=True)
    with pytest.raises((ConstraintViolationError, torch._dynamo.exc.UserError)):
        compiled(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, None, None)
