"""The kernel choice on the CPU: the switch, eligibility, the selection logic and its
default table, the path without FlashAttention 4, the FA4 adapter against a stand-in of FA4's
interface, and the offsets it sanitizes (under the Triton interpreter).

What needs a GPU and FA4 itself (numerics of the real kernel, generated code, syncs, CUDA
graphs, speed) is in ``test_choice_gpu.py`` and ``benchmarks/``.
"""

from __future__ import annotations

import logging
import random
import sys
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import fake_fa4
from factory import assert_matches_reference, make_case, make_cu_seq
from varlen_compile import _compat, config, eligibility, varlen_attn
from varlen_compile.lowering import extern_ops, fa4, launcher
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs, bind_op_args

pytestmark = pytest.mark.fa4

CUDA = torch.device("cuda", 0)


# ---------------------------------------------------------------------------- the switch


def test_switch_defaults_to_auto_and_rejects_unknown_names(monkeypatch):
    assert config.kernel == "auto" or "VARLEN_COMPILE_KERNEL" in __import__("os").environ
    with pytest.raises(ValueError, match=r"must be one of \('auto', 'triton', 'fa4', 'aten'\), got 'fa3'"):
        with config.patch(kernel="fa3"):
            pass
    with pytest.raises(AttributeError, match="no switch 'kernels'"):
        with config.patch(kernels="fa4"):
            pass
    monkeypatch.setattr(config, "kernel", "FA4")  # as a misspelt environment variable would set it
    case = make_case([3, 2])
    with pytest.raises(ValueError, match="VARLEN_COMPILE_KERNEL"):
        varlen_attn(*case.inputs())


def test_patch_restores_the_previous_value():
    before = config.kernel
    with config.patch(kernel="triton"):
        assert config.kernel == "triton"
        with config.patch(kernel="aten"):
            assert config.kernel == "aten"
        assert config.kernel == "triton"
    assert config.kernel == before


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "varlen_compile" in str(func):
            self.calls.append((str(func.overloadpacket), bind_op_args(func, args, kwargs)["kernel"]))
        return func(*args, **kwargs)


def test_the_switch_reaches_both_ops_through_autograd():
    """The forward op gets the preference as an argument and autograd hands it to the backward
    op; at the default the argument is left out (captured graphs stay as they were)."""
    case = make_case([3, 0, 5], heads_q=2, requires_grad=True)
    for kernel in ("triton", "auto"):
        with config.patch(kernel=kernel), _OpLog() as log:
            out = varlen_attn(*case.inputs(), is_causal=True)
            out.sum().backward()
        assert log.calls == [
            ("varlen_compile.varlen_attn", kernel),
            ("varlen_compile.varlen_attn_backward", kernel),
        ]


def test_the_fa2_drop_in_deterministic_runs_our_kernels_whatever_the_switch():
    """``flash_attn_varlen_func(..., deterministic=True)``: both ops get ``kernel="triton"``
    (a bitwise-repeatable backward), also when the switch asks for FA4; without it, the switch."""
    from varlen_compile.flash_attn_compat import flash_attn_varlen_func

    case = make_case([3, 0, 5], heads_q=2, requires_grad=True)
    for deterministic, expected in ((True, "triton"), (False, "fa4")):
        with config.patch(kernel="fa4"), _OpLog() as log:
            out = flash_attn_varlen_func(case.q, case.k, case.v, case.cu_seq_q, case.cu_seq_k, 5, 5,
                                         causal=True, deterministic=deterministic)
            out.sum().backward()
        assert log.calls == [
            ("varlen_compile.varlen_attn", expected),
            ("varlen_compile.varlen_attn_backward", expected),
        ], deterministic


def test_deterministic_algorithms_reach_the_eager_backward(monkeypatch):
    """The eager backward asks for a deterministic kernel exactly while
    ``torch.use_deterministic_algorithms(True)`` is on; the forward never does."""
    asked = []
    choose = eligibility.eager_kernel
    monkeypatch.setattr(eligibility, "eager_kernel",
                        lambda requested, call, deterministic=False: asked.append(deterministic) or choose(requested, call,
                                                                                                          deterministic))
    case = make_case([3, 0, 5], heads_q=2, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for enabled in (True, False):
            torch.use_deterministic_algorithms(enabled)
            varlen_attn(*case.inputs(), is_causal=True).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert asked == [False, True, False, False]


def test_flipping_the_switch_recompiles_and_lands_in_the_graph():
    def attention(query, key, value, cu_seq):
        return varlen_attn(query, key, value, cu_seq, cu_seq, is_causal=True)

    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention, backend=backend, fullgraph=True)
    case = make_case([4, 3])
    compiled(case.q, case.k, case.v, case.cu_seq_q)
    with config.patch(kernel="fa4"):
        compiled(case.q, case.k, case.v, case.cu_seq_q)
        compiled(case.q, case.k, case.v, case.cu_seq_q)
    assert backend.frame_count == 2, "the switch is guarded on: flipping it recompiles once"
    kernels = [
        node.kwargs.get("kernel", "auto")
        for graph in backend.graphs for node in graph.graph.nodes
        if "varlen_attn" in str(node.target)
    ]
    assert kernels == ["auto", "fa4"]


@pytest.mark.parametrize("kernel", ["fa4", "aten", "triton"])
def test_every_preference_is_correct_where_that_kernel_cannot_run(kernel):
    """On the CPU no preferred kernel can run: eager and compiled calls still give the reference
    result (the preference is never an error)."""
    case = make_case([5, 1, 0, 7], [6, 2, 3, 7], heads_q=4, heads_kv=2, requires_grad=True)
    grad_out = torch.randn_like(case.q)

    def attention(query, key, value, cu_seq_q, cu_seq_k):
        return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, is_causal=True, enable_gqa=True)

    with config.patch(kernel=kernel):
        for function in (attention, torch.compile(attention, backend="inductor", fullgraph=True)):
            out = function(*case.inputs())
            grads = torch.autograd.grad(out, (case.q, case.k, case.v), grad_out)
            assert_matches_reference(case, out, grads=grads, grad_out=grad_out, is_causal=True)


# ---------------------------------------------------------------------------- FA4 detection


@pytest.fixture
def fresh_fa4_detection():
    _compat.fa4_interface.cache_clear()
    yield
    _compat.fa4_interface.cache_clear()


def test_without_fa4_installed_nothing_offers_it(fresh_fa4_detection, monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    interface, reason = _compat.fa4_interface()
    assert interface is None and "flash-attn-4 is not installed" in reason and "[fa4]" in reason
    assert fa4_reason(torch.bfloat16, (128, 128)) == reason


def test_fa4_outside_the_supported_range_is_refused(fresh_fa4_detection, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.1.0")
    interface, reason = _compat.fa4_interface()
    assert interface is None and "4.1.0 is outside the supported range" in reason


def test_fa4_whose_private_api_moved_is_refused(fresh_fa4_detection, monkeypatch):
    """A release inside the range whose entry points lost an argument we pass: refused with the
    names, never called."""
    import importlib.metadata

    interface = fake_fa4.make_interface()

    def renamed(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, **kwargs):  # lacks seqused_k, lse, ...
        raise AssertionError("never called")

    interface._flash_attn_fwd = renamed
    package = types.ModuleType("flash_attn")
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.0.0b40")
    found, reason = _compat.fa4_interface()
    assert found is None and "_flash_attn_fwd lacks the arguments" in reason and "'seqused_k'" in reason

    interface._flash_attn_fwd = fake_fa4.make_interface()._flash_attn_fwd
    _compat.fa4_interface.cache_clear()
    found, reason = _compat.fa4_interface()
    assert found is interface and reason == ""


# ---------------------------------------------------------------------------- eligibility


@pytest.fixture
def fa4_present(monkeypatch):
    """FA4 'installed' (the stand-in) on an sm90 GPU; ``set_arch`` changes the GPU."""
    interface = fake_fa4.make_interface()
    monkeypatch.setattr(_compat, "fa4_interface", lambda: (interface, ""))
    arch = {"capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: arch["capability"])
    interface.set_arch = lambda major, minor=0: arch.update(capability=(major, minor))
    return interface


LAYOUT = BatchLayout(None, None)


def make_call(dtype=torch.bfloat16, head_dims=(128, 128), options=AttnOptions(), optional=(), same_heads=True,
              device=CUDA, hints=False, **kwargs) -> eligibility.Call:
    """An eligibility call described by metadata (``optional``: names)."""
    return eligibility.Call(device=device, dtype=dtype, head_dim=head_dims[0], head_dim_v=head_dims[1],
                            same_heads=same_heads, options=options, optional=frozenset(optional), hints=hints, **kwargs)


def fa4_reason(dtype, head_dims, options=AttnOptions(), optional=(), same_heads=True, device=CUDA):
    """eligibility's answer for FA4 on a call described by metadata (``optional``: names)."""
    return eligibility.unsupported("fa4", make_call(dtype, head_dims, options, optional, same_heads, device))


@pytest.mark.parametrize(
    "arch, dtype, head_dims, expected",
    [
        ((9, 0), torch.bfloat16, (128, 128), None),
        ((9, 0), torch.float16, (64, 64), None),
        ((9, 0), torch.bfloat16, (256, 256), None),
        ((9, 0), torch.bfloat16, (192, 128), None),
        ((9, 0), torch.bfloat16, (96, 96), None),
        ((9, 0), torch.bfloat16, (72, 72), None),
        ((9, 0), torch.bfloat16, (36, 36), "head dims 36/36"),
        ((9, 0), torch.bfloat16, (512, 512), "head dims 512/512"),
        ((9, 0), torch.float32, (128, 128), "float16 and bfloat16"),
        ((10, 0), torch.bfloat16, (128, 128), None),
        ((10, 0), torch.bfloat16, (192, 128), None),
        ((10, 0), torch.bfloat16, (256, 256), None),
        ((10, 0), torch.bfloat16, (160, 160), "head dims 160/160"),
        ((8, 0), torch.bfloat16, (128, 128), "sm90 and sm100"),
        ((12, 0), torch.bfloat16, (128, 128), "sm90 and sm100"),
    ],
)
def test_fa4_eligibility_by_arch_dtype_and_head_dims(fa4_present, arch, dtype, head_dims, expected):
    fa4_present.set_arch(*arch)
    reason = fa4_reason(dtype, head_dims)
    assert reason is None if expected is None else expected in reason


def test_fa4_eligibility_where_its_backward_is_narrower(fa4_present):
    """D_v != D only as MLA's 192/128, not with GQA on sm90 (its GQA backward asserts D == D_v);
    sm100's head-dim-256 backward takes no softcap, window or gradient into lse."""
    def reason(head_dims, same_heads=True, grad_lse=False, **options):
        return fa4_reason(torch.bfloat16, head_dims, AttnOptions(**options), ("grad_lse",) if grad_lse else (),
                          same_heads=same_heads)

    assert reason((192, 128)) is None
    assert "with GQA" in reason((192, 128), same_heads=False)
    assert reason((128, 128), same_heads=False) is None
    assert "head dims 64/256" in reason((64, 256))
    fa4_present.set_arch(10)
    assert reason((192, 128), same_heads=False) is None
    assert reason((256, 256), is_causal=True) is None
    for kwargs in (dict(softcap=30.0), dict(window_left=128), dict(grad_lse=True)):
        assert "head-dim-256 backward" in reason((256, 256), **kwargs), kwargs
    assert reason((128, 128), softcap=30.0, grad_lse=True) is None


def test_fa4_eligibility_by_features(fa4_present):
    def reason(optional=(), **options):
        return fa4_reason(torch.bfloat16, (128, 128), AttnOptions(**options), optional)

    assert reason(is_causal=True, window_left=64) is None
    assert reason(softcap=30.0) is None
    assert reason(("sink",)) is None
    assert reason(("seqused_k",)) is None
    assert "ALiBi" in reason(("alibi_slopes",))
    assert "paged" in reason(("seqused_k", "block_table"))
    assert "NVIDIA GPUs" in fa4_reason(torch.bfloat16, (128, 128), device=torch.device("cpu"))


def test_every_registry_input_fa4_cannot_take_makes_it_ineligible(fa4_present):
    """The registry decides: an optional input without an FA4 keyword rules FA4 out."""
    from varlen_compile.params import OPTIONAL_INPUTS

    for spec in OPTIONAL_INPUTS:
        reason = fa4_reason(torch.bfloat16, (128, 128), optional=(spec.name,))
        assert (reason is None) == (spec.fa4 is not None), spec.name


@pytest.mark.parametrize(
    "requested, call, expected",
    [
        ("auto", dict(hints=True), "aten"),
        ("auto", dict(hints=False), "triton"),  # aten flash would read cu_seq (a sync)
        ("auto", dict(hints=True, optional=("alibi_slopes",)), "triton"),
        ("auto", dict(hints=True, dtype=torch.float32), "triton"),
        ("auto", dict(hints=True, dtype=torch.float64), "reference"),
        ("auto", dict(hints=True, device=torch.device("cpu")), "reference"),
        ("aten", dict(hints=True), "aten"),
        ("aten", dict(hints=False), "triton"),
        ("triton", dict(hints=True), "triton"),
        ("triton", dict(hints=True, head_dims=(512, 512)), "reference"),
        ("fa4", dict(hints=True), "fa4"),
        ("fa4", dict(hints=True, optional=("alibi_slopes",)), "triton"),  # aten takes no ALiBi either
        ("fa4", dict(hints=True, dtype=torch.float32), "triton"),
        ("fa4", dict(hints=True, head_dims=(36, 36), optional=()), "triton"),
    ],
)
def test_the_eager_kernel_follows_the_preference_then_what_serves(fa4_present, requested, call, expected):
    """Eager calls: FA4 when preferred and it serves, else aten flash where it serves (auto,
    aten, fa4), else our Triton kernels, else the exact reference."""
    assert eligibility.eager_kernel(requested, make_call(**call)) == expected


@pytest.mark.parametrize("requested", ["auto", "aten", "fa4", "triton"])
def test_a_deterministic_backward_never_runs_aten_flash_or_fa4(fa4_present, requested):
    """A backward under deterministic algorithms: our Triton kernels (eager) or the template
    (compiled, under max-autotune too) whatever the preference, else the exact reference;
    aten flash and FA4 sum dQ with atomics."""
    assert eligibility.eager_kernel(requested, make_call(hints=True), deterministic=True) == "triton"
    assert eligibility.eager_kernel(requested, make_call(hints=True, dtype=torch.float64), deterministic=True) == "reference"
    for max_autotune in (False, True):
        assert eligibility.select(requested, fa4_reason=None, aten_reason=None, max_autotune=max_autotune,
                                  fa4_default=True, deterministic=True) == ("triton",)
    # Without it, the same calls may run them.
    assert eligibility.eager_kernel(requested, make_call(hints=True)) == {"auto": "aten"}.get(requested, requested)


def test_deterministic_backward_follows_the_torch_switch():
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for enabled in (True, False):
            torch.use_deterministic_algorithms(enabled)
            assert eligibility.deterministic_backward() is enabled
    finally:
        torch.use_deterministic_algorithms(previous)


def test_an_unservable_eager_preference_says_once_what_runs_instead(fa4_present, caplog, monkeypatch):
    monkeypatch.setattr(eligibility, "_logged", set())
    caplog.set_level(logging.INFO, logger="varlen_compile.eligibility")
    for _ in range(3):
        assert eligibility.eager_kernel("fa4", make_call(hints=True, dtype=torch.float32)) == "triton"
    messages = [record.getMessage() for record in caplog.records if "kernel='fa4' cannot serve" in record.getMessage()]
    assert len(messages) == 1 and "float16 and bfloat16" in messages[0] and "kernel 'triton' runs it" in messages[0]


def test_rocm_runs_the_standalone_kernels_eagerly_and_keeps_compiled_graphs_off_the_templates(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert eligibility.unsupported("triton", make_call()) is None
    assert "ROCm" in eligibility.unsupported("triton", make_call(compiled=True))


def test_extern_ops_bind_by_name_from_what_the_lowerings_pass():
    """Every argument of the four private extern ops is bound by name from the template's
    inputs (the fixed ones and the optional inputs of the registry that side reads) and the
    scalars (the options and the hints), as the lowerings pass them."""
    import dataclasses

    from varlen_compile.params import OPTIONAL_INPUTS

    fixed = {
        "forward": {"query", "key", "value", "cu_seq_q", "cu_seq_k", "lse"},
        "backward": {"grad_out", "query", "key", "value", "out", "lse", "delta", "cu_seq_q", "cu_seq_k",
                     "grad_query", "grad_value"},
    }
    scalars = {field.name for field in dataclasses.fields(AttnOptions)} | {"max_q", "max_k"}
    for name, side in ((extern_ops.FLASH_FORWARD, "forward"), (extern_ops.FA4_FORWARD, "forward"),
                       (extern_ops.FLASH_BACKWARD, "backward"), (extern_ops.FA4_BACKWARD, "backward")):
        names = fixed[side] | {spec.name for spec in OPTIONAL_INPUTS if side in spec.read_by} | scalars
        op = getattr(torch.ops.varlen_compile, name).default
        assert {argument.name for argument in op._schema.arguments} <= names, name
        values = {name: name for name in names}  # each argument gets its own name back
        assert extern_ops.op_arguments(op, values) == [argument.name for argument in op._schema.arguments]


# ---------------------------------------------------------------------------- selection


def test_selection_follows_the_preference_where_the_kernel_can_serve():
    select = eligibility.select

    def pick(requested, fa4=None, aten=None, max_autotune=False, default=False):
        return select(requested, fa4_reason=fa4, aten_reason=aten, max_autotune=max_autotune, fa4_default=default)

    assert pick("triton") == ("triton",)
    assert pick("triton", max_autotune=True) == ("triton",)
    assert pick("fa4") == ("fa4",)
    assert pick("fa4", fa4="fp32") == ("triton",)
    assert pick("aten") == ("aten",)
    assert pick("aten", aten="no max hints") == ("triton",)
    # auto without max-autotune: the default table, where FA4 can serve.
    assert pick("auto", default=True) == ("fa4",)
    assert pick("auto", default=False) == ("triton",)
    assert pick("auto", fa4="not installed", default=True) == ("triton",)
    # auto under max-autotune: everything that can serve competes, the template always.
    assert pick("auto", max_autotune=True) == ("triton", "fa4", "aten")
    assert pick("auto", aten="no max hints", max_autotune=True) == ("triton", "fa4")
    assert pick("auto", fa4="x", aten="y", max_autotune=True) == ("triton",)
    with pytest.raises(ValueError, match="must be one of"):
        pick("flash")


def test_an_unservable_preference_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="varlen_compile.eligibility")
    for _ in range(3):
        eligibility.select("fa4", fa4_reason="a reason only this test gives", aten_reason=None, max_autotune=False, fa4_default=False)
    messages = [r.getMessage() for r in caplog.records if "a reason only this test gives" in r.getMessage()]
    assert len(messages) == 1 and "our Triton template runs it" in messages[0]


@pytest.mark.parametrize(
    "arch, head_dims, options, optional, expected",
    [
        (9, (128, 128), AttnOptions(is_causal=True), {}, True),
        (9, (64, 64), AttnOptions(), {}, True),
        (9, (64, 64), AttnOptions(window_right=0), {}, True),
        (9, (96, 96), AttnOptions(is_causal=True), {}, False),
        (9, (192, 128), AttnOptions(is_causal=True), {}, False),
        (9, (128, 128), AttnOptions(is_causal=True, window_left=256), {}, False),
        (9, (128, 128), AttnOptions(softcap=50.0), {}, True),
        (9, (64, 64), AttnOptions(softcap=50.0), {}, False),
        (9, (128, 128), AttnOptions(), dict(alibi_slopes=torch.ones(2)), False),
        (9, (128, 128), AttnOptions(), dict(sink=torch.zeros(2)), False),
        (9, (128, 128), AttnOptions(), dict(seqused_k=torch.ones(2)), False),
        (9, (128, 128), AttnOptions(is_causal=True), dict(grad_lse=torch.ones(2)), True),
        (10, (128, 128), AttnOptions(is_causal=True), {}, False),
        (8, (128, 128), AttnOptions(is_causal=True), {}, False),
    ],
)
def test_default_table(arch, head_dims, options, optional, expected):
    """FA4 by default only where it was measured faster (lowering/choices.py's table)."""
    from varlen_compile.lowering.choices import fa4_is_default

    assert fa4_is_default(arch, *head_dims, options, OptionalInputs(optional)) is expected


@pytest.mark.parametrize(
    "head_dims, mean_length, expected",
    [((64, 64), 279.0, False), ((64, 64), 511.9, False), ((64, 64), 512.0, True), ((64, 64), 768.0, True),
     ((128, 128), 1.0, True), ((128, 128), 279.0, True), ((64, 64), None, True)],
)
def test_default_table_by_mean_length(head_dims, mean_length, expected):
    """At head dim 64 the template won on short sequences (128 of mean 279 tokens) and FA4 on
    long ones: FA4 is the default from a mean of 512 tokens; at 128 FA4 won at every length."""
    from varlen_compile.lowering.choices import fa4_is_default

    assert fa4_is_default(9, *head_dims, AttnOptions(is_causal=True), OptionalInputs(), mean_length) is expected


@pytest.mark.parametrize(
    "rows, expected", [(6144 * 16, False), ((1 << 17) - 1, False), (1 << 17, True), (12288 * 16, True), (None, True)]
)
def test_default_table_needs_enough_rows(rows, expected):
    """Behind our op FA4 pays host time the template does not; below 2**17 rows (T_q * H_q) it
    is not hidden (the H200: 0.45x of FA4 direct at 98k rows, >= 0.99x from 196k)."""
    from varlen_compile.lowering.choices import fa4_is_default

    assert fa4_is_default(9, 128, 128, AttnOptions(is_causal=True), OptionalInputs(), 768.0, rows) is expected


@pytest.mark.parametrize("rows", [6144 * 16, (1 << 17) - 1, 1 << 17, None])
def test_default_table_has_no_row_floor_in_cuda_graphs(rows):
    """In a graph compiled for CUDA graphs (mode="reduce-overhead") FA4's host time is not paid
    per call, and in GPU time it wins small batches too (H200, do_bench_cudagraph: 0.084 vs
    0.097 ms forward at 98k rows): no row floor. The other rules stay (mean length at D=64)."""
    from varlen_compile.lowering.choices import fa4_is_default

    causal, none = AttnOptions(is_causal=True), OptionalInputs()
    assert fa4_is_default(9, 128, 128, causal, none, 768.0, rows, cuda_graphs=True)
    assert fa4_is_default(9, 64, 64, causal, none, 768.0, rows, cuda_graphs=True)
    assert not fa4_is_default(9, 64, 64, causal, none, 279.0, rows, cuda_graphs=True)


def _symbolic_batch(tokens: int, offsets: int):
    """A graph handler over a fresh ShapeEnv and IR-node stand-ins whose sizes are backed
    symbols with these hints: the query ``(T_q, 16, 128)`` and ``cu_seq_q`` ``(N + 1,)``."""
    from types import SimpleNamespace

    from torch._dynamo.source import ConstantSource
    from torch._inductor.sizevars import SizeVarAllocator
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    t, n = (env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
            for hint, name in ((tokens, "t"), (offsets, "n")))
    query = SimpleNamespace(get_size=lambda: [t, 16, 128])
    cu_seq = SimpleNamespace(get_size=lambda: [n])
    return env, SimpleNamespace(sizevars=SizeVarAllocator(env)), query, BatchLayout(cu_seq, cu_seq, None, None)


@pytest.fixture
def fa4_could_run(monkeypatch):
    """kernels_for's view of a compiled sm90 bf16 call at head dims 128 where FA4 can run, with
    no fitted costs (the default table decides; tests of the model set their own)."""
    from varlen_compile.lowering import choices

    monkeypatch.setattr(choices, "COSTS", {9: {}})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(choices, "call_of_nodes", lambda *args, **kwargs: make_call(
        head_dims=(128, 128), options=AttnOptions(is_causal=True), compiled=True))
    reasons = {"fa4": None, "aten": "no max hints"}
    monkeypatch.setattr(eligibility, "unsupported", lambda kernel, call: reasons[kernel])
    return reasons


@pytest.mark.parametrize("tokens, expected", [(12288, ("fa4",)), (6144, ("triton",))])
def test_the_default_choice_follows_the_batch_through_a_guard(fa4_could_run, tokens, expected):
    """Under dynamic shapes the table's row rule (``T_q * H_q >= 2**17``) is decided on the
    symbolic sizes with a guard: the graph holds for batches on the same side, and a batch on
    the other side fails the guard (Dynamo recompiles once, and that graph picks the other
    kernel), instead of keeping the first compiled batch's choice."""
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    from varlen_compile.lowering import choices

    env, graph, query, layout = _symbolic_batch(tokens, 9)
    with V.set_graph_handler(graph), inductor_config.patch({"triton.cudagraphs": False, "max_autotune": False}):
        kernels = choices.kernels_for("auto", query, query, layout, AttnOptions(is_causal=True), OptionalInputs(),
                                      (128, 128))
    assert kernels == expected
    (guard,) = env.guards
    t = next(symbol for symbol in guard.expr.free_symbols)
    fa4_side, template_side = (8192, 65536), (1024, 8191)  # 2**17 rows at 16 heads: 8192 tokens
    same, other = (fa4_side, template_side) if expected == ("fa4",) else (template_side, fa4_side)
    assert [bool(guard.expr.subs(t, size)) for size in same + other] == [True, True, False, False]


def test_the_default_choice_adds_no_guard_where_it_does_not_depend_on_the_sizes(fa4_could_run):
    """No guard where the sizes cannot change the answer: a forced kernel, max-autotune, CUDA
    graphs (no row floor at head dim 128), FA4 unable to run."""
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    from varlen_compile.lowering import choices

    causal, none = AttnOptions(is_causal=True), OptionalInputs()
    for requested, patch, fa4_reason, expected in (
        ("triton", {}, None, ("triton",)),
        ("fa4", {}, None, ("fa4",)),
        ("auto", {"max_autotune": True}, None, ("triton", "fa4")),
        ("auto", {"triton.cudagraphs": True}, None, ("fa4",)),
        ("auto", {}, "not installed", ("triton",)),
    ):
        fa4_could_run["fa4"] = fa4_reason
        env, graph, query, layout = _symbolic_batch(6144, 9)
        with V.set_graph_handler(graph), inductor_config.patch({"triton.cudagraphs": False, "max_autotune": False, **patch}):
            assert choices.kernels_for(requested, query, query, layout, causal, none, (128, 128)) == expected, requested
        assert not env.guards, (requested, patch, fa4_reason)


def _fitted(monkeypatch, side_keys=("forward", "backward"), causal=True, head_dims=(128, 128)):
    """choices' fitted costs for sm90 with a template-like kernel (little host time) and an
    FA4-like one (more host time, less GPU time per pair)."""
    from varlen_compile.lowering import choices
    from varlen_compile.lowering.cost_model import CostKey, KernelCost

    us = 10**9  # femtoseconds
    template = KernelCost(host=30 * us, launch=5 * us, row=2_000, sequence=200_000, pair=1_000)
    fa4_cost = KernelCost(host=250 * us, launch=8 * us, row=1_000, sequence=100_000, pair=600)
    costs = {CostKey(side, *head_dims, causal=causal): {"triton": template, "fa4": fa4_cost} for side in side_keys}
    monkeypatch.setattr(choices, "COSTS", {9: costs})
    return template, fa4_cost


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("tokens, expected", [(65536, ("fa4",)), (2048, ("triton",))])
def test_fitted_costs_decide_the_default_choice_through_guards(fa4_could_run, monkeypatch, backward, tokens, expected):
    """Where the cost model was fitted for the call's key it decides, forward and backward: the
    answer is the model's for the batch, and the graph's guards hold exactly for the batches on
    the same side of the model's boundary (one recompile when a batch crosses it)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    from varlen_compile.lowering import choices, cost_model

    template, fa4_cost = _fitted(monkeypatch)
    env, graph, query, layout = _symbolic_batch(tokens, 5)  # 4 sequences
    with V.set_graph_handler(graph), inductor_config.patch({"triton.cudagraphs": False, "max_autotune": False}):
        kernels = choices.kernels_for("auto", query, query, layout, AttnOptions(is_causal=True), OptionalInputs(),
                                      (128, 128), backward=backward)
    assert kernels == expected and env.guards
    t, n = query.get_size()[0], layout.cu_seq_q.get_size()[0]

    def graph_serves(size: int) -> bool:
        return all(bool(guard.expr.subs({t: size, n: 5})) for guard in env.guards)

    for size in (1024, 2048, 4096, 16384, 65536, 131072):
        picks_fa4 = cost_model.faster(fa4_cost, template, dict(tokens_q=size, tokens_k=size, sequences=4, heads_q=16),
                                      True, False)
        assert graph_serves(size) is (picks_fa4 == (expected == ("fa4",))), size


def test_the_table_decides_where_the_model_was_not_fitted(fa4_could_run, monkeypatch):
    """Costs fitted for causal head-dim-128 calls only: those follow the model, every other key
    the table. At 8192 tokens of 4 sequences x 16 heads (2**17 rows) the table picks FA4, the
    model the template (its GPU time, about 135 us, is under FA4's host time, 250)."""
    from varlen_compile.lowering import choices

    _fitted(monkeypatch)
    causal, full, none = AttnOptions(is_causal=True), AttnOptions(), OptionalInputs()
    assert choices.fitted_costs(9, "forward", (128, 128), causal, none) is not None
    assert choices.fitted_costs(9, "backward", (128, 128), causal, OptionalInputs(grad_lse=torch.ones(1))) is not None
    for arch, head_dims, options, optional in (
        (9, (128, 128), full, none), (9, (64, 64), causal, none), (10, (128, 128), causal, none),
        (9, (128, 128), AttnOptions(is_causal=True, window_left=256), none),
        (9, (128, 128), causal, OptionalInputs(sink=torch.ones(1))),
    ):
        assert choices.fitted_costs(arch, "forward", head_dims, options, optional) is None, (arch, head_dims, options)
    # A right window of 0 without is_causal is causal masking: the causal key.
    right_window = AttnOptions(window_right=0)
    assert choices.fitted_costs(9, "forward", (128, 128), right_window, none) is not None
    sizes = dict(tokens_q=8192, tokens_k=8192, sequences=4, heads_q=16)
    assert not choices.fa4_by_default(9, "forward", (128, 128), causal, none, sizes, cuda_graphs=False)
    assert choices.fa4_by_default(9, "forward", (128, 128), full, none, sizes, cuda_graphs=False)
    bigger = dict(sizes, tokens_q=32768, tokens_k=32768)
    assert choices.fa4_by_default(9, "forward", (128, 128), causal, none, bigger, cuda_graphs=False)


def test_the_size_rule_holds_on_hints_for_unbacked_sizes():
    """Unbacked sizes (``mark_unbacked``) cannot be guarded on: the rule is decided on their hint
    (Inductor's fallback for unbacked sizes), with no guard."""
    from types import SimpleNamespace

    from torch._inductor import config as inductor_config
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from varlen_compile.lowering import choices

    env = ShapeEnv()
    tokens = env.create_unbacked_symint().node.expr
    fallback = inductor_config.unbacked_symint_fallback
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator(env))):
        rows, = choices.fa4_size_rule(tokens, 16, 4, 0, cuda_graphs=False)
        assert choices.holds(rows) is (16 * fallback >= choices.FA4_MIN_ROWS)
        mean, _ = choices.fa4_size_rule(tokens, 16, 4, 512, cuda_graphs=False)
        assert choices.holds(mean) is (fallback >= 4 * 512)
    assert not env.guards


@pytest.mark.parametrize("head_dims", [(64, 64), (128, 128)])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_the_default_choice_is_monotone_in_the_work(head_dims, cuda_graphs):
    """More tokens or more heads for the same sequences never take a batch from FA4 back to
    the template, and more sequences for the same tokens never give it to FA4: the rule's
    boundaries are single thresholds, so a batch crosses each at most once as it grows."""
    from varlen_compile.lowering import choices

    def picks(tokens, heads, sequences):
        rules = choices.fa4_size_rule(tokens, heads, sequences, choices.FA4_DEFAULT[9][head_dims], cuda_graphs)
        return all(bool(rule) for rule in rules)

    sizes = [1, 7, 64, 500, 4096, 8192, 65536, 131072]
    for tokens in sizes:
        for heads in (1, 8, 16, 32):
            for sequences in (0, 1, 3, 16, 128, 1024):
                if picks(tokens, heads, sequences):
                    assert picks(2 * tokens, heads, sequences) and picks(tokens, 2 * heads, sequences)
                    assert sequences <= 1 or picks(tokens, heads, sequences // 2)


def test_the_size_rule_adds_no_guard_on_a_range_the_caller_set():
    """``mark_dynamic(tensor, 0, min=16, max=65536)`` makes Dynamo refuse any guard that narrows
    the range (ConstraintViolationError when it builds the guards): there the rule is decided
    on the hint, with no guard; a size with the default range gets the guard."""
    from types import SimpleNamespace

    from torch._dynamo.source import ConstantSource
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StrictMinMaxConstraint
    from torch.utils._sympy.value_ranges import ValueRanges

    from varlen_compile.lowering import choices

    env = ShapeEnv()
    bounded = env.create_symbol(20000, ConstantSource("bounded"), dynamic_dim=DimDynamic.DYNAMIC,
                                constraint_dim=StrictMinMaxConstraint(vr=ValueRanges(16, 65536), warn_only=False))
    free = env.create_symbol(20000, ConstantSource("free"), dynamic_dim=DimDynamic.DYNAMIC)
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator(env))):
        (rows,) = choices.fa4_size_rule(bounded, 16, 4, 0, cuda_graphs=False)
        assert choices.holds(rows) and not env.guards
        (rows,) = choices.fa4_size_rule(free, 16, 4, 0, cuda_graphs=False)
        assert choices.holds(rows) and [str(guard.expr) for guard in env.guards] == [f"16*{free} >= 131072"]


def test_the_size_rule_reads_the_mean_length_without_dividing():
    from varlen_compile.lowering import choices

    mean, rows = choices.fa4_size_rule(3000, 16, 6, 512, cuda_graphs=False)
    assert bool(mean) is False and bool(rows) is False  # mean 500 < 512; 48000 rows
    mean, rows = choices.fa4_size_rule(12288, 16, 0, 512, cuda_graphs=False)
    assert bool(mean) and bool(rows)  # no sequence: no mean length to fail
    assert choices.fa4_size_rule(3000, 16, 6, 0, cuda_graphs=True) == []


# ---------------------------------------------------------------------------- the FA4 adapter

ADAPTER_CASES = {
    "causal-gqa-empty-single": dict(lengths_q=[5, 0, 1, 9], lengths_k=[7, 3, 1, 9], heads_q=4, heads_kv=2, causal=True),
    "full-qk-differ": dict(lengths_q=[6, 2], lengths_k=[3, 8], heads_q=2, heads_kv=2, causal=False),
    "window-left-right": dict(lengths_q=[9, 4], lengths_k=[9, 6], heads_q=2, heads_kv=1, causal=False, window=(3, 2)),
    "causal-window": dict(lengths_q=[9, 4], lengths_k=[9, 6], heads_q=2, heads_kv=1, causal=True, window=(2, -1)),
    "softcap-scale": dict(lengths_q=[6, 3], lengths_k=[6, 5], heads_q=2, heads_kv=2, causal=True, softcap=2.0, scale=0.7),
    "sink-empty-keys": dict(lengths_q=[4, 3], lengths_k=[0, 5], heads_q=2, heads_kv=2, causal=False, sink=True),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_fa4_adapter_round_trip(name, fa4_present, interpret, poison_empty):
    """Through the FA4 adapter (the stand-in computes), results meet the error rule against the
    float64 reference: our window/causal/scale/softcap/sink conventions reach FA4's, lse comes
    back +inf for rows with no key (the stand-in writes -inf, as FA4 may), and no output is left
    unwritten (uninitialized memory is NaN here)."""
    spec = ADAPTER_CASES[name]
    case = make_case(spec["lengths_q"], spec["lengths_k"], heads_q=spec["heads_q"], heads_kv=spec["heads_kv"],
                     head_dim=16, dtype=torch.bfloat16)
    sink = torch.randn(spec["heads_q"]) if spec.get("sink") else None
    window = spec.get("window", (-1, -1))
    options = AttnOptions(spec["causal"], spec.get("scale"), *window, softcap=spec.get("softcap", 0.0))
    layout = BatchLayout(case.cu_seq_q, case.cu_seq_k)
    out, lse = fa4.forward(case.q, case.k, case.v, layout, options, OptionalInputs(sink=sink))
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = fa4.backward(grad_out, case.q, case.k, case.v, out, lse, layout, options, OptionalInputs(grad_lse=grad_lse))
    ref_kwargs = dict(is_causal=spec["causal"], window_size=window, scale=spec.get("scale"),
                      softcap=spec.get("softcap", 0.0), sink=sink)
    assert_matches_reference(case, out, lse, grads, grad_out=grad_out, grad_lse=grad_lse,
                             **ref_kwargs)
    forward_call, backward_call = fa4_present.calls[0][1], fa4_present.calls[1][1]
    assert forward_call["max_seqlen_q"] is None and forward_call["max_seqlen_k"] is None
    # The adapter passes exactly the keywords _compat checks FA4's entry points for (the
    # registry's optional-input keywords among them); the sink only to the forward.
    (_, forward_keywords), (_, backward_keywords) = fa4_present.passed
    assert forward_keywords == set(_compat.FA4_FORWARD_KEYWORDS) and backward_keywords == set(_compat.FA4_BACKWARD_KEYWORDS)
    assert (forward_call["learnable_sink"] is None) == (sink is None) and backward_call["learnable_sink"] is None


@pytest.mark.interpreter
def test_fa4_adapter_passes_windows_that_exclude_nothing_as_unbounded(fa4_present, interpret):
    """A window side at least the token count cannot exclude a key: it reaches FA4 as None (its
    int32 index arithmetic would overflow on a huge value)."""
    case = make_case([8, 6], heads_q=2, head_dim=16, dtype=torch.bfloat16)
    layout = BatchLayout(case.cu_seq_q, case.cu_seq_k)
    for window, expected in (((2**31 - 1, 3), (None, 3)), ((5, 14), (5, None)), ((13, 13), (13, 13))):
        fa4.forward(case.q, case.k, case.v, layout, AttnOptions(False, None, *window), OptionalInputs())
        call = fa4_present.calls[-1][1]
        assert (call["window_size_left"], call["window_size_right"]) == expected, window


@pytest.mark.interpreter
def test_fa4_adapter_zeroes_the_gradients_of_unused_keys(fa4_present, interpret, poison_empty):
    """FA4 writes no dK/dV for keys past seqused_k; the adapter makes them 0, as our kernels."""
    case = make_case([4, 3], [6, 5], heads_q=2, head_dim=16, dtype=torch.bfloat16)
    seqused_k = torch.tensor([2, 5], dtype=torch.int32)
    layout, optional = BatchLayout(case.cu_seq_q, case.cu_seq_k), OptionalInputs(seqused_k=seqused_k)
    options = AttnOptions(is_causal=True)
    out, lse = fa4.forward(case.q, case.k, case.v, layout, options, optional)
    grad_out = torch.randn_like(out)
    grads = fa4.backward(grad_out, case.q, case.k, case.v, out, lse, layout, options, optional)
    assert torch.equal(grads[1][2:6], torch.zeros_like(grads[1][2:6]))
    assert torch.equal(grads[2][2:6], torch.zeros_like(grads[2][2:6]))
    assert_matches_reference(case, out, lse, grads, grad_out=grad_out,
                             is_causal=True, seqused_k=seqused_k)


@pytest.mark.interpreter
def test_fa4_adapter_hands_fa4_only_sanitized_offsets(fa4_present, interpret):
    """A malformed cu_seq (compiled code cannot check it) reaches FA4 clamped into the tensors
    and non-decreasing, seqused_k clamped to its slots: FA4 cannot read out of bounds."""
    case = make_case([8, 6], heads_q=2, head_dim=16, dtype=torch.bfloat16)
    bad_q = torch.tensor([3, 90, -4], dtype=torch.int32)
    bad_k = torch.tensor([-7, 9, 4], dtype=torch.int32)
    optional = OptionalInputs(seqused_k=torch.tensor([50, -2], dtype=torch.int32))
    fa4.forward(case.q, case.k, case.v, BatchLayout(bad_q, bad_k), AttnOptions(), optional)
    call = fa4_present.calls[0][1]
    assert call["cu_seqlens_q"].tolist() == [3, 14, 14]
    assert call["cu_seqlens_k"].tolist() == [0, 9, 9]
    assert call["seqused_k"].tolist() == [9, 0]


@pytest.fixture
def aten_flash_calls(monkeypatch):
    """Stand-ins for aten's flash attention ops that record the offsets they get."""
    seen = []

    def forward(query, key, value, cu_seq_q, cu_seq_k, *args, **kwargs):
        seen.append((cu_seq_q.tolist(), cu_seq_k.tolist()))
        return torch.zeros_like(query), torch.zeros(query.shape[1], query.shape[0]), None, None, None

    def backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, *args, **kwargs):
        seen.append((cu_seq_q.tolist(), cu_seq_k.tolist()))
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward)
    return seen


def _aten_flash_both_ways():
    """One forward and one backward through our aten adapter and through its extern ops, on a
    malformed cu_seq (which must not change)."""
    from varlen_compile.lowering import aten

    case = make_case([8, 6], heads_q=2, head_dim=16, dtype=torch.bfloat16)
    bad_q = torch.tensor([3, 90, -4], dtype=torch.int32)
    bad_k = torch.tensor([-7, 9, 4], dtype=torch.int32)
    layout, options = BatchLayout(bad_q, bad_k, 8, 8), AttnOptions(is_causal=True)
    out, lse = aten.forward(case.q, case.k, case.v, layout, options)
    aten.backward(torch.ones_like(out), case.q, case.k, case.v, out, lse, layout, options)
    scalars = dict(max_q=8, max_k=8, is_causal=True, scale=None, window_left=-1, window_right=-1)
    lse = torch.empty(2, case.q.shape[0])
    out = extern_ops.flash_forward_into(case.q, case.k, case.v, lse, bad_q, bad_k, **scalars)
    extern_ops.flash_backward_into(torch.ones_like(out), case.q, case.k, case.v, out, lse, torch.empty_like(case.q),
                                   torch.empty_like(case.v), bad_q, bad_k, **scalars)
    assert bad_q.tolist() == [3, 90, -4] and bad_k.tolist() == [-7, 9, 4]


@pytest.mark.interpreter
def test_aten_flash_gets_only_sanitized_offsets(aten_flash_calls, interpret):
    """aten flash reads cu_seq as given, like FA4: eager (traced, captured) and compiled (the
    extern ops of max-autotune or kernel="aten") calls hand it offsets clamped and
    non-decreasing, forward and backward."""
    _aten_flash_both_ways()
    assert aten_flash_calls == [([3, 14, 14], [0, 9, 9])] * 4


def test_aten_flash_offsets_are_sanitized_without_triton_too(aten_flash_calls, monkeypatch):
    """Without Triton the same rule runs in torch ops."""
    monkeypatch.setattr(_compat, "has_triton", lambda: False)
    _aten_flash_both_ways()
    assert aten_flash_calls == [([3, 14, 14], [0, 9, 9])] * 4


@pytest.mark.interpreter
def test_fa4_extern_ops_pass_opcheck(fa4_present, interpret):
    """The private ops the lowerings emit for the FA4 choice: schema, fake (shapes, strides,
    dtypes) and the declared mutation of the lse / dQ / dV buffers agree with what runs."""
    case = make_case([5, 0, 3], [4, 2, 3], heads_q=4, heads_kv=2, head_dim=16, dtype=torch.bfloat16)
    lse = torch.empty(4, case.q.shape[0])
    scalars = dict(is_causal=True, scale=None, window_left=-1, window_right=-1, softcap=0.0)
    torch.library.opcheck(
        torch.ops.varlen_compile._fa4_forward_into.default,
        (case.q, case.k, case.v, lse, case.cu_seq_q, case.cu_seq_k), dict(scalars, sink=torch.randn(4)),
        test_utils=("test_schema", "test_faketensor"),
    )
    out = extern_ops.fa4_forward_into(case.q, case.k, case.v, lse, case.cu_seq_q, case.cu_seq_k, **scalars)
    grad_query, grad_value = torch.empty_like(case.q), torch.empty_like(case.v)
    torch.library.opcheck(
        torch.ops.varlen_compile._fa4_backward_into.default,
        (torch.randn_like(out), case.q, case.k, case.v, out, lse, grad_query, grad_value, case.cu_seq_q, case.cu_seq_k),
        scalars, test_utils=("test_schema", "test_faketensor"),
    )


# ---------------------------------------------------------------------------- offsets


def _sanitized_by_hand(cu_q, cu_k, used, total_q, total_k):
    def monotone(offsets, total):
        result, running = [], 0
        for offset in offsets:
            running = max(running, min(max(offset, 0), total))
            result.append(running)
        return result

    q, k = monotone(cu_q, total_q), monotone(cu_k, total_k)
    used = None if used is None else [min(max(u, 0), k[i + 1] - k[i]) for i, u in enumerate(used)]
    return q, k, used


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", range(6))
def test_offsets_kernel_matches_its_definition(seed, interpret):
    """Random (mostly malformed) offsets, some longer than one block of the kernel's scan."""
    sanitized = launcher.sanitized_offsets
    rng = random.Random(seed)
    count = rng.choice([1, 2, 5, 1500])
    total_q, total_k = rng.randint(0, 300), rng.randint(0, 300)
    cu_q = [rng.randint(-50, 400) for _ in range(count)]
    cu_k = [rng.randint(-50, 400) for _ in range(count)]
    used = [rng.randint(-5, 80) for _ in range(count - 1)] if seed % 2 else None
    as_tensor = lambda values: None if values is None else torch.tensor(values, dtype=torch.int32)  # noqa: E731
    got = sanitized(as_tensor(cu_q), as_tensor(cu_k), as_tensor(used), total_q, total_k)
    expected = _sanitized_by_hand(cu_q, cu_k, used, total_q, total_k)
    assert [None if t is None else t.tolist() for t in got] == list(expected)


@pytest.mark.interpreter
def test_offsets_kernel_leaves_well_formed_offsets_alone(interpret):
    sanitized = launcher.sanitized_offsets
    cu = make_cu_seq([5, 0, 1, 9])
    used = torch.tensor([5, 0, 1, 4], dtype=torch.int32)
    q, k, u = sanitized(cu, cu, used, 15, 15)
    assert torch.equal(q, cu) and torch.equal(k, cu) and torch.equal(u, used)


