"""Every use the benchmarks make of ``varlen_compile``'s internals, as small adapter functions.

The kernel layer (``varlen_compile.lowering``: the standalone launcher and offsets sanitizer,
the configs, the aten and FA4 adapters, the extern ops, the kernel choice), the parameter
objects (``varlen_compile.params``), ``_compat`` and the reference are private and change with
the package. Nothing else under ``benchmarks/`` imports them (``tests/test_benchmarks_cli.py``
checks that), so a change to their signatures is adapted here, once. The public API
(``varlen_attn``, ``config``, ``distributed``) is used directly.

Callers describe a call by a :class:`~benchmarks.harness.Case` and its
:class:`~benchmarks.harness.Inputs`; the parameter objects are built here. Nothing here runs a
kernel or touches a GPU at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import linecache
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from varlen_compile import _compat, reference
from varlen_compile.lowering import _sources, aten, choices, configs, cost_model, extern_ops, fa4, launcher
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

if TYPE_CHECKING:
    from .harness import Case, Inputs

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- parameter objects


def _options(case: Case, **overrides: Any):
    """The case's ``AttnOptions`` (``overrides``: fields to change, e.g. ``softcap``)."""
    fields = dict(is_causal=case.causal, window_left=case.window[0], window_right=case.window[1], softcap=case.softcap)
    return AttnOptions(**{**fields, **overrides})


def _layout(x: Inputs, paged: bool = False, hints: bool = False):
    """The inputs' ``BatchLayout`` (``paged``: no key offsets; ``hints``: the max-length ints
    aten flash needs)."""
    max_q, max_k = (x.max_q, x.max_k) if hints else (None, None)
    return BatchLayout(x.cu_seq_q, None if paged else x.cu_seq_k, max_q, max_k)


def _optional(x: Inputs, paged: bool = False):
    """The inputs' ``OptionalInputs`` (the block table only for the paged forward)."""
    return OptionalInputs({name: t for name, t in x.features.items() if paged or name != "block_table"})


# ----------------------------------------------------------------------------- standalone kernels


def standalone_forward(case: Case, x: Inputs, config: Any = None, **overrides: Any) -> Callable[[], tuple]:
    """``launcher.forward`` on the case's (detached) inputs, paged K/V when the case is paged:
    a function of no arguments returning ``(out, lse)``. ``config``: a forward config (None:
    the default); ``overrides``: option fields to change (e.g. ``softcap=30.0``)."""
    paged = bool(case.page_size)
    q, k, v = x.detached()
    if paged:
        k, v = x.key_pages, x.value_pages
    layout, options, optional = _layout(x, paged), _options(case, **overrides), _optional(x, paged)
    return lambda: launcher.forward(q, k, v, layout, options, optional, config=config)


def standalone_backward(case: Case, x: Inputs, out: torch.Tensor, lse: torch.Tensor, config: Any = None
                        ) -> Callable[[], tuple]:
    """``launcher.backward`` for the forward's ``out`` and ``lse``: a function of no arguments
    returning ``(dq, dk, dv)``."""
    q, k, v = x.detached()
    layout, options, optional = _layout(x), _options(case), _optional(x)
    return lambda: launcher.backward(x.grad_out, q, k, v, out, lse, layout, options, optional, config=config)


def standalone_functions(case: Case, x: Inputs) -> tuple[Forward, Backward]:
    """``(forward(q, k, v), backward(grad_out, q, k, v, out, lse))`` of the standalone kernels."""
    layout, options, optional = _layout(x), _options(case), _optional(x)
    return (lambda q, k, v: launcher.forward(q, k, v, layout, options, optional),
            lambda grad_out, q, k, v, out, lse: launcher.backward(grad_out, q, k, v, out, lse, layout, options, optional))


def aten_functions(case: Case, x: Inputs) -> tuple[Forward, Backward]:
    """The same pair for aten flash attention (FlashAttention 2) called directly."""
    layout, options = _layout(x, hints=True), _options(case)
    return (lambda q, k, v: aten.forward(q, k, v, layout, options),
            lambda grad_out, q, k, v, out, lse: aten.backward(grad_out, q, k, v, out, lse, layout, options))


def reference_forward(case: Case, x: Inputs, compute_dtype: torch.dtype, inputs_dtype: torch.dtype | None = None,
                      softcap: float | None = None) -> torch.Tensor:
    """The reference's output (``inputs_dtype``: cast q, k, v first, e.g. float64 for the oracle;
    ``softcap``: instead of the case's)."""
    q, k, v = (t.to(inputs_dtype or t.dtype) for t in x.detached())
    out, _ = reference.attention_forward(
        q, k, v, x.cu_seq_q, x.cu_seq_k, is_causal=case.causal, window_size=case.window,
        softcap=case.softcap if softcap is None else softcap, compute_dtype=compute_dtype, **_optional(x),
    )
    return out


# ----------------------------------------------------------------------------- configs


def default_forward_config(case: Case) -> Any:
    """The forward config the launcher picks for the case (paged: deeper pipelining)."""
    default = configs.default_forward_config(max(case.head_dim, case.value_dim), torch.bfloat16)
    return configs.paged_config(default, bool(case.page_size))


def contiguous_forward_config(case: Case) -> Any:
    """The default forward config of the case's head dims without paging."""
    return configs.default_forward_config(max(case.head_dim, case.value_dim), torch.bfloat16)


def default_backward_config(case: Case) -> Any:

    return configs.default_backward_config(max(case.head_dim, case.value_dim), torch.bfloat16,
                                           case.heads_q // case.heads_kv)


def forward_config(block_m: int, block_n: int, num_warps: int, num_stages: int, pack_gqa: bool = False) -> Any:

    return configs.ForwardConfig(block_m, block_n, num_warps, num_stages, pack_gqa=pack_gqa)


def backward_config(block_m1: int, block_n1: int, block_m2: int, block_n2: int, num_warps: int, num_stages: int) -> Any:

    return configs.BackwardConfig(block_m1, block_n1, block_m2, block_n2, num_warps, num_stages)


def config_fields(config: Any) -> tuple:
    """A config's tile fields, in order (``(block_m, block_n, warps, stages)`` for a forward)."""
    return dataclasses.astuple(config)


def replace_config(config: Any, **changes: Any) -> Any:
    """``config`` with fields changed (``num_stages``, ``pack_gqa``)."""
    return dataclasses.replace(config, **changes)


def paged_forward_config(config: Any) -> Any:
    """``config`` as the launcher adapts it for paged K/V."""
    return configs.paged_config(config, True)


def packed_group(config: Any, group: int) -> int:
    """The GQA group the forward packs into one program with ``config`` (1: unpacked)."""
    return configs.pack_gqa_group(config, group)


# ----------------------------------------------------------------------------- kernel modules


def kernels() -> types.ModuleType:
    """The standalone kernels' module (the compiled templates' @triton.jit source)."""
    return launcher._kernels()


def kernels_from(folder: Path) -> types.ModuleType:
    """The standalone kernels built, as the launcher builds its own, from the template files in
    ``folder`` (a copy of ``lowering/templates/`` of another revision)."""
    saved = _sources.TEMPLATE_DIR
    _sources.TEMPLATE_DIR = Path(folder)
    _sources.load_template.cache_clear()
    try:
        source = _sources.standalone_source.__wrapped__()  # uncached: not this checkout's
    finally:
        _sources.TEMPLATE_DIR = saved
        _sources.load_template.cache_clear()
    filename = f"<ab-base-kernels-{hashlib.sha256(source.encode()).hexdigest()[:16]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # @triton.jit reads it
    module = types.ModuleType("ab_base_kernels")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def same_kernel_signatures(module: types.ModuleType) -> bool:
    """Whether ``module``'s kernels take the arguments today's launcher passes (by name)."""
    current = kernels()
    names = ("varlen_fwd_kernel", "varlen_bwd_kernel", "varlen_bwd_preprocess_kernel")
    return all(  # the launcher passes every argument by name
        set(inspect.signature(getattr(module, name).fn).parameters)
        == set(inspect.signature(getattr(current, name).fn).parameters)
        for name in names if hasattr(module, name)
    )


@contextlib.contextmanager
def kernels_swapped(module: types.ModuleType) -> Iterator[None]:
    """The launcher runs ``module``'s kernels inside the block."""
    current = launcher._kernels
    launcher._kernels = lambda: module
    try:
        yield
    finally:
        launcher._kernels = current


def sm90_constexprs(head_dim: int, causal: bool, backward: bool) -> dict[str, Any]:
    """The constexprs of an MHA bf16 launch without optional inputs (tile sizes not included)."""
    constexprs = configs.backward_constexprs if backward else configs.kernel_constexprs
    return constexprs(AttnOptions(is_causal=causal), OptionalInputs(), head_dim, head_dim, torch.bfloat16)


# ----------------------------------------------------------------------------- FlashAttention 4


def fa4_missing() -> str | None:
    """Why FlashAttention 4 cannot serve as a kernel choice here, or None when it can."""
    interface, reason = _compat.fa4_interface()
    return None if interface is not None else reason


def fa4_interface() -> types.ModuleType:

    interface, reason = _compat.fa4_interface()
    if interface is None:
        raise RuntimeError(reason)
    return interface


def fa4_adapter_functions(case: Case, x: Inputs) -> tuple[Forward, Backward]:
    """The FA4 adapter between our op and FA4 (``lowering.fa4.forward/backward``), uncompiled."""
    layout, options, optional = _layout(x), _options(case), _optional(x)
    return (lambda q, k, v: fa4.forward(q, k, v, layout, options, optional),
            lambda grad_out, q, k, v, out, lse: fa4.backward(grad_out, q, k, v, out, lse, layout, options, optional))


def fa4_replayers() -> dict[str, Any]:
    """Our two FA4 replayers by direction (``lowering.fa4``): their plans and keys, for reports."""
    return {"forward": fa4._FORWARD, "backward": fa4._BACKWARD}


def sanitize_offsets(x: Inputs) -> Callable[[], object]:
    """The offsets sanitizer FA4 runs behind our op (one Triton launch)."""
    total_q, total_k = x.q.shape[0], x.k.shape[0]
    return lambda: launcher.sanitized_offsets(x.cu_seq_q, x.cu_seq_k, x.features.get("seqused_k"), total_q, total_k)


def fa4_extern_ops(case: Case, x: Inputs, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor
                   ) -> dict[str, Callable[[], object]]:
    """The extern ops a compiled graph calls for FA4 (through the dispatcher), forward and backward."""
    q, k, v = x.detached()
    lse_buffer, dq, dv = torch.empty_like(lse), torch.empty_like(q), torch.empty_like(v)
    forward, backward = (getattr(torch.ops.varlen_compile, name).default
                         for name in (extern_ops.FA4_FORWARD, extern_ops.FA4_BACKWARD))
    scalars = (case.causal, None, *case.window)  # is_causal, scale, window_left, window_right
    return {
        f"op {extern_ops.FA4_FORWARD} (dispatcher)": lambda: forward(q, k, v, lse_buffer, x.cu_seq_q, x.cu_seq_k, *scalars),
        f"op {extern_ops.FA4_BACKWARD} (dispatcher)": lambda: backward(
            grad_out, q, k, v, out, lse, dq, dv, x.cu_seq_q, x.cu_seq_k, *scalars),
        # as a compiled graph calls it: on the graph's inputs, which require grad
        f"op {extern_ops.FA4_FORWARD} (dispatcher), inputs requiring grad": lambda: forward(
            x.q, x.k, x.v, lse_buffer, x.cu_seq_q, x.cu_seq_k, *scalars),
    }


def calls_fa4(generated_code: list[str]) -> bool:
    """Whether Inductor's generated code calls FA4 (its extern forward op)."""
    return any(extern_ops.FA4_FORWARD in code for code in generated_code)


def default_picks_fa4(case: Case, arch_major: int, side: str = "forward") -> bool:
    """Whether the default kernel choice (no max-autotune, no CUDA graphs) gives the case's
    ``side`` op to FA4 where FA4 can serve it: the cost model where fitted, else the table."""
    marker = torch.empty(0)  # the choice asks only which optional inputs are present
    optional = OptionalInputs(sink=marker if case.sink else None, alibi_slopes=marker if case.alibi else None,
                              seqused_k=marker if case.seqused_k_trim is not None else None)
    sizes = dict(tokens_q=case.total_q, tokens_k=case.total, sequences=len(case.lengths), heads_q=case.heads_q,
                 **({"max_q": max(case.query_lengths or case.lengths, default=0), "max_k": max(case.lengths, default=0)}
                    if case.hints else {}))
    return choices.fa4_by_default(arch_major, side, (case.head_dim, case.value_dim), _options(case), optional, sizes,
                                  cuda_graphs=False)


# ----------------------------------------------------------------------------- the cost model

FEMTOSECONDS = cost_model.FEMTOSECONDS


def scaled_pairs(tokens_q: int, tokens_k: int, causal: bool) -> int:
    """``2 N`` times the cost model's lower bound on the pairs one head attends."""
    return cost_model.scaled_pairs(tokens_q, tokens_k, causal)


def kernel_cost(**fields: int) -> Any:
    """A ``cost_model.KernelCost`` (integer femtoseconds)."""
    return cost_model.KernelCost(**fields)


def gpu_seconds(cost: Any, tokens_q: int, tokens_k: int, sequences: int, heads_q: int, causal: bool) -> float:
    """The GPU seconds ``cost`` predicts for one call (no host time)."""
    _, gpu = cost_model.scaled_times(cost, tokens_q, tokens_k, sequences, heads_q, causal, cuda_graphs=True)
    return gpu / (2 * sequences * FEMTOSECONDS)

