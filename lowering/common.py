"""Pieces both lowerings use: the template-or-fallback decision, template construction, inputs
by name, kernel constants and autotune inputs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import to_dtype
from torch._inductor.select_algorithm import ExternKernelChoice, TritonTemplate, realize_inputs
from torch._inductor.virtualized import V
from torch.utils._sympy.functions import FloorDiv

from varlen_compile import config, eligibility
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs, Side, unflatten

from . import extern_ops
from .fallback import fallback
from ._sources import template_source
from .configs import backward_constexprs, kernel_constexprs

__all__ = [
    "Plan",
    "arange_int32_rows",
    "call_of_nodes",
    "cu_seq_generator",
    "extern_choice",
    "extern_scalars",
    "full_int32",
    "gqa_group",
    "input_gen_fns",
    "lowering_with_fallback",
    "make_template",
    "append_extern_choices",
    "autotune_generators",
    "optional_input_nodes",
    "plan_template",
    "prepare_attention_input",
    "size_hint",
    "template_constants",
]



def make_template(name: str, grid: Any, entry: str) -> TritonTemplate:
    """A TritonTemplate whose source is ``templates/<entry>.py.jinja`` with the shared Jinja
    macros before it and the shared math after it (``_sources.template_source``)."""
    return TritonTemplate(name=name, grid=grid, source=template_source(entry))


class Plan(NamedTuple):
    """What the templates need to know of an op call they serve."""

    head_dim: int
    head_dim_v: int
    layout: BatchLayout
    options: AttnOptions
    optional: OptionalInputs


def call_of_nodes(
    query: ir.IRNode, key: ir.IRNode, options: AttnOptions, optional: OptionalInputs, layout: BatchLayout,
    head_dims: tuple[int, int],
) -> eligibility.Call:
    """The :class:`~varlen_compile.eligibility.Call` of an op call inside a graph (IR nodes,
    the head dims specialized). ``H_q == H_kv`` counts only when statically known; a graph
    compiled for AOTInductor or with ``cpp_wrapper`` cannot call Python kernels."""
    return eligibility.Call(
        device=query.get_device(), dtype=query.get_dtype(), head_dim=head_dims[0], head_dim_v=head_dims[1],
        same_heads=V.graph.sizevars.statically_known_equals(query.get_size()[1], key.get_size()[-2]),
        options=options, optional=frozenset(optional), hints=layout.max_q is not None and layout.max_k is not None,
        compiled=True, python_kernels=not V.graph.cpp_wrapper,
    )


def plan_template(bound: dict[str, Any]) -> Plan | str:
    """The :class:`Plan` when our templates serve the op call ``bound`` (its arguments by
    name), else why not (``varlen_compile.eligibility``).

    What the kernel takes as a constexpr is specialized here when it arrives symbolic: the head
    dims (``dynamic=True``), as Inductor's flex attention does, and the window sizes
    (``dynamic=True`` also makes ints captured from closures symbolic), each with a guard on its
    value, and only once the device and dtype are known to be served. Token, sequence and head
    counts and the ``max_q``/``max_k`` hints are never guarded on here; the one guard on them
    anywhere is the default kernel choice's size rule, where FA4 could run (``choices.holds``).
    (A head dim the
    user marked dynamic with ``torch._dynamo.mark_dynamic`` makes Dynamo refuse that guard with
    a ConstraintViolationError: leave the head dim static.)
    """
    query, key, value = bound["query"], bound["key"], bound["value"]
    reason = eligibility.triton_device_unsupported(query.get_device(), query.get_dtype(), compiled=True)
    if reason is not None:
        return reason
    head_dims = (_static_int(query.get_size()[-1]), _static_int(value.get_size()[-1]))
    layout, options, optional = unflatten(bound)
    reason = eligibility.unsupported(eligibility.TEMPLATE, call_of_nodes(query, key, options, optional, layout, head_dims))
    if reason is not None:
        return reason
    options = dataclasses.replace(
        options,
        scale=None if options.scale is None else float(options.scale),
        softcap=float(options.softcap),
        window_left=_static_int(options.window_left),
        window_right=_static_int(options.window_right),
    )
    return Plan(head_dim=head_dims[0], head_dim_v=head_dims[1], layout=layout, options=options, optional=optional)


def optional_input_nodes(optional: OptionalInputs, side: Side) -> dict[str, ir.IRNode]:
    """The optional inputs the ``side`` template reads that are present, by name in registry
    order (the order the templates' input lists are generated in), realized contiguous in the
    registry's dtype (validation gives them that dtype; the ops called directly may not)."""
    return {
        spec.name: ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(
            optional[spec.name] if optional[spec.name].get_dtype() == spec.dtype else to_dtype(optional[spec.name], spec.dtype)
        ))
        for spec in optional.specs(side)
    }


def extern_choice(name: str) -> ExternKernelChoice:
    """The extern choice named ``name`` that runs a private op of :mod:`.extern_ops` (given per
    call as ``op``) on the template's inputs, bound to the op's arguments by name (``names``:
    the template's inputs in order; ``scalars``: :func:`extern_scalars`)."""
    return ExternKernelChoice(extern_ops.timed, name=name, has_out_variant=False, kernel_creator=_extern_node)


def _extern_node(*inputs: ir.IRNode, op: str, names: tuple[str, ...], scalars: Mapping[str, Any]) -> ir.IRNode:
    """The output node when an extern choice wins: its op writing into the template's buffers."""
    overload = getattr(torch.ops.varlen_compile, op).default
    return ir.FallbackKernel.create(overload, *extern_ops.op_arguments(overload, {**scalars, **dict(zip(names, inputs))}))


def extern_scalars(layout: BatchLayout, options: AttnOptions) -> dict[str, Any]:
    """The scalar arguments an extern op may take: the options and the max hints, by name."""
    return {**dataclasses.asdict(options), "max_q": layout.max_q, "max_k": layout.max_k}


def input_gen_fns(
    names: list[str], generators: Mapping[str, Callable[[ir.Buffer], torch.Tensor]]
) -> dict[int, Callable[[ir.Buffer], torch.Tensor]]:
    """Autotuning input generators by template input position, from ``generators`` by name
    (``names``: the template's inputs in order; names without one get random data)."""
    return {index: generators[name] for index, name in enumerate(names) if name in generators}


def _static_int(value: Any) -> int:
    """``value`` as an int, guarding on it when it is symbolic."""
    if isinstance(value, (int, sympy.Integer)):
        return int(value)
    return int(V.graph.sizevars.guard_int(value))


INDUCTOR_API_ERRORS = (AttributeError, TypeError, ImportError, KeyError, AssertionError, NotImplementedError)
"""What an Inductor internal that moved between torch releases raises inside a lowering."""


def lowering_with_fallback(op: torch._ops.OpOverload, lowering: Callable[..., Any]) -> Callable[..., Any]:
    """``lowering``, or, where it fails on an Inductor internal it does not know (a torch release
    that renamed or changed one: :data:`INDUCTOR_API_ERRORS`), the op's eager implementation,
    logged once as every fallback is: a user's compile never crashes on our lowering
    (docs/design.md §14). ``varlen_compile.config.strict_lowering`` re-raises instead."""

    @functools.wraps(lowering)
    def lower(*args: Any, **kwargs: Any) -> Any:
        try:
            return lowering(*args, **kwargs)
        except INDUCTOR_API_ERRORS as error:
            if config.strict_lowering:
                raise
            reason = f"the lowering cannot build on torch {torch.__version__} ({type(error).__name__}: {error})"
            return fallback(op, reason, args, kwargs)

    return lower


def prepare_attention_input(x: ir.IRNode) -> ir.IRNode:
    """Realize ``x`` with a contiguous last dim, keeping any other strides (no copy for views
    such as ``qkv.chunk(3, -1)``); a flexible layout is frozen contiguous by the template."""
    x = realize_inputs(x)
    layout = x.get_layout()
    if isinstance(layout, ir.FlexibleLayout):
        return x
    if V.graph.sizevars.statically_known_equals(x.get_stride()[-1], 1):
        return x
    return ir.ExternKernel.require_contiguous(x)


def size_hint(expr: Any) -> int:
    """A concrete value for a (possibly symbolic) size, for autotuning inputs and heuristics;
    never a guard."""
    return int(V.graph.sizevars.optimization_hint(expr, fallback=inductor_config.unbacked_symint_fallback))


def gqa_group(query: ir.IRNode, key: ir.IRNode) -> sympy.Expr:
    """``H_q // H_kv``: an integer for static head counts, an expression under dynamic shapes.
    ``key`` is ``(T_k, H_kv, D)`` or paged ``(pages, page_size, H_kv, D)``."""
    return sympy.sympify(FloorDiv(query.get_size()[1], key.get_size()[-2]))


def cu_seq_generator(num_offsets: int, total: int) -> Callable[[ir.Buffer], torch.Tensor]:
    """Autotuning input for a ``cu_seq`` buffer: ``N`` near-equal sequences covering ``total``.

    Random int32 data would make the benchmark meaningless; equal lengths are a fair middle case.
    """

    def generate(buffer: ir.Buffer) -> torch.Tensor:
        sequences = max(num_offsets - 1, 0)
        offsets = torch.linspace(0, total, sequences + 1, dtype=torch.float64).round()
        return offsets.to(device=buffer.get_device(), dtype=torch.int32)

    return generate


def full_int32(value: int) -> Callable[[ir.Buffer], torch.Tensor]:
    """Autotuning input: an int32 buffer filled with ``value``."""

    def generate(buffer: ir.Buffer) -> torch.Tensor:
        size = [size_hint(s) for s in buffer.get_size()]
        return torch.full(size, value, dtype=torch.int32, device=buffer.get_device())

    return generate


def autotune_generators(
    cu_seq_q: ir.IRNode, total_q: Any, cu_seq_k: ir.IRNode, total_k: Any
) -> dict[str, Callable[[ir.Buffer], torch.Tensor]]:
    """Autotuning data by input name: near-equal sequences for the offsets, every key used for
    ``seqused_k`` (the kernels clamp it to the slot), pages in order for ``block_table`` (they
    clamp entries to the pool)."""
    return {
        "cu_seq_q": cu_seq_generator(size_hint(cu_seq_q.get_size()[0]), size_hint(total_q)),
        "cu_seq_k": cu_seq_generator(size_hint(cu_seq_k.get_size()[0]), size_hint(total_k)),
        "seqused_k": full_int32(2**30),
        "block_table": arange_int32_rows(),
    }


def append_extern_choices(
    choices: list[Any], kernels: tuple[str, ...], externs: Mapping[str, tuple[ExternKernelChoice, str]],
    input_nodes: list[ir.IRNode], layout: ir.Layout, names: tuple[str, ...], scalars: Mapping[str, Any],
) -> None:
    """Append the extern choice of each kernel in ``kernels`` that ``externs`` has (kernel ->
    (choice, private op)), bound by name to the template's inputs and the call's scalars."""
    for kernel, (choice, op) in externs.items():
        if kernel in kernels:
            choice.maybe_append_choice(choices, input_nodes=input_nodes, layout=layout, op=op, names=names, scalars=scalars)


def arange_int32_rows() -> Callable[[ir.Buffer], torch.Tensor]:
    """Autotuning input for a block table ``(N, max_pages)``: row i holds pages
    ``i * max_pages ...`` (the kernel clamps them to the pool)."""

    def generate(buffer: ir.Buffer) -> torch.Tensor:
        rows, cols = (size_hint(s) for s in buffer.get_size())
        table = torch.arange(rows * cols, dtype=torch.int32, device=buffer.get_device())
        return table.view(rows, cols)

    return generate


def template_constants(
    options: AttnOptions, optional: OptionalInputs, head_dim: int, head_dim_v: int, dtype: torch.dtype,
    side: Side = "forward",
) -> dict[str, Any]:
    """Constexprs every choice of a template shares: ``configs.kernel_constexprs`` (or
    ``backward_constexprs``) plus the softmax scale, rendered as template literals."""
    make = backward_constexprs if side == "backward" else kernel_constexprs
    constants = make(options, optional, head_dim, head_dim_v, dtype)
    constants["DOT_PRECISION"] = repr(constants["DOT_PRECISION"])
    constants["SCALE"] = options.scale_for(head_dim)
    return constants
