"""Pieces both lowerings use: the template-or-fallback decision, template construction, input
preparation, kernel constants and autotune inputs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler
from torch._inductor.select_algorithm import TritonTemplate, realize_inputs
from torch._inductor.virtualized import V
from torch.utils._sympy.functions import FloorDiv

from varlen_compile import backends
from varlen_compile.params import AttnOptions, BatchLayout, unflatten

from ._sources import template_source
from .configs import backward_constexprs, kernel_constexprs, supported_head_dim

__all__ = [
    "Plan",
    "cu_seq_generator",
    "fallback",
    "arange_int32_rows",
    "feature_inputs",
    "full_int32",
    "gqa_group",
    "make_template",
    "prepare_attention_input",
    "size_hint",
    "plan_template",
    "template_constants",
]

log = logging.getLogger(__name__)
_logged_fallbacks: set[tuple[str, str]] = set()


def make_template(name: str, grid: Any, entry: str) -> TritonTemplate:
    """A TritonTemplate whose source is ``templates/<entry>.py.jinja`` with the shared Jinja
    macros before it and the shared math after it (``_sources.template_source``)."""
    return TritonTemplate(
        name=name, grid=grid, source=template_source(entry)
    )


class Plan(NamedTuple):
    """What the templates need to know of an op call they serve."""

    head_dim: int
    head_dim_v: int
    layout: BatchLayout
    options: AttnOptions


def plan_template(bound: dict[str, Any]) -> Plan | str:
    """The :class:`Plan` when our templates serve the op call ``bound`` (its arguments by
    name), else why not.

    Templates serve CUDA fp16/bf16/fp32 with head dims 1..256 (query/key and value). What the
    kernel takes as a constexpr is specialized here when it arrives symbolic: the head dims
    (``dynamic=True``), as Inductor's flex attention does, and the window sizes (``dynamic=True``
    also makes ints captured from closures symbolic), each with a guard on its value. Token
    counts, sequence counts, head counts and the ``max_q``/``max_k`` hints are never guarded
    on. (A head dim the user marked dynamic with ``torch._dynamo.mark_dynamic`` makes Dynamo
    refuse that guard with a ConstraintViolationError: leave the head dim static.)
    """
    query, value = bound["query"], bound["value"]
    device = query.get_device()
    if device is None or device.type != "cuda":
        return f"the Triton templates are CUDA-only (device: {device})"
    if torch.version.hip is not None:
        return "the Triton templates are not built for ROCm yet"
    if query.get_dtype() not in backends.TRITON_DTYPES:
        return f"dtype {query.get_dtype()} (the templates serve float16, bfloat16, float32)"
    head_dim = _static_int(query.get_size()[-1])
    head_dim_v = _static_int(value.get_size()[-1])
    if not (supported_head_dim(head_dim) and supported_head_dim(head_dim_v)):
        return f"head dims {head_dim}/{head_dim_v} (the templates serve 1..256)"
    layout, options = unflatten(bound)
    scale, softcap = options.scale, options.softcap
    if scale is not None and not isinstance(scale, (int, float, sympy.Number)):
        return "a symbolic softmax scale (the templates take it as a constant)"
    if not isinstance(softcap, (int, float, sympy.Number)):
        return "a symbolic softcap (the templates take it as a constant)"
    for name in ("sink", "alibi_slopes"):
        tensor = getattr(options, name)
        if tensor is not None and tensor.get_dtype() != torch.float32:
            return f"{name} of dtype {tensor.get_dtype()} (the templates read float32)"
    options = dataclasses.replace(
        options,
        scale=None if scale is None else float(scale),
        softcap=float(softcap),
        window_left=_static_int(options.window_left),
        window_right=_static_int(options.window_right),
    )
    return Plan(head_dim, head_dim_v, layout, options)


def feature_inputs(layout: BatchLayout, options: AttnOptions, names: Sequence[str]) -> list[ir.IRNode]:
    """The optional template inputs among ``names`` (``seqused_k``, ``block_table``,
    ``sink``, ``alibi_slopes``) that are present, realized contiguous, in the order of
    ``names`` (the order the templates' ``def_kernel`` lists them in)."""
    inputs = []
    for name in names:
        node = getattr(layout, name) if hasattr(layout, name) else getattr(options, name)
        if node is not None:
            inputs.append(ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(node)))
    return inputs


def _static_int(value: Any) -> int:
    """``value`` as an int, guarding on it when it is symbolic."""
    if isinstance(value, (int, sympy.Integer)):
        return int(value)
    return int(V.graph.sizevars.guard_int(value))


def fallback(op: torch._ops.OpOverload, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the op's eager implementation from compiled code (other devices, unsupported cases),
    logging why once per (op, reason): a warning on CUDA, where it costs speed, else info.

    On CUDA the eager implementation never syncs: without ``max_q``/``max_k`` hints it runs our
    standalone Triton kernels, not aten flash (``backends``)."""
    if (str(op), reason) not in _logged_fallbacks:
        _logged_fallbacks.add((str(op), reason))
        device = args[0].get_device() if isinstance(args[0], ir.IRNode) else None
        level = logging.WARNING if device is not None and device.type == "cuda" else logging.INFO
        log.log(level, "%s runs its eager implementation inside the compiled graph: %s", op, reason)
    return fallback_handler(op, add_to_fallback_set=False)(*args, **kwargs)


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


def arange_int32_rows() -> Callable[[ir.Buffer], torch.Tensor]:
    """Autotuning input for a block table ``(N, max_pages)``: row i holds pages
    ``i * max_pages ...`` (the kernel clamps them to the pool)."""

    def generate(buffer: ir.Buffer) -> torch.Tensor:
        rows, cols = (size_hint(s) for s in buffer.get_size())
        table = torch.arange(rows * cols, dtype=torch.int32, device=buffer.get_device())
        return table.view(rows, cols)

    return generate


def template_constants(
    options: AttnOptions, layout: BatchLayout, head_dim: int, head_dim_v: int, dtype: torch.dtype,
    backward: bool = False,
) -> dict[str, Any]:
    """Constexprs every choice of a template shares: ``configs.kernel_constexprs`` (or
    ``backward_constexprs``) plus the softmax scale, rendered as template literals."""
    make = backward_constexprs if backward else kernel_constexprs
    constants = make(options, layout, head_dim, head_dim_v, dtype)
    constants["DOT_PRECISION"] = repr(constants["DOT_PRECISION"])
    constants["SCALE"] = options.scale_for(head_dim)
    return constants
