"""Pieces both lowerings use: template construction, input preparation, autotune inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler
from torch._inductor.select_algorithm import TritonTemplate, realize_inputs
from torch._inductor.virtualized import V

from varlen_compile import backends

from ._sources import load_template
from .configs import SEARCH_WIDTH, dot_precision, padded_head_dim

__all__ = [
    "cu_seq_generator",
    "fallback",
    "kernel_constants",
    "make_template",
    "prepare_attention_input",
    "size_hint",
    "use_template",
]


def make_template(name: str, grid: Any, entry: str) -> TritonTemplate:
    """A TritonTemplate whose source is ``templates/<entry>.py.jinja`` + the shared math."""
    return TritonTemplate(
        name=name, grid=grid, source=load_template(entry) + load_template("varlen_common")
    )


def use_template(query: ir.IRNode) -> bool:
    """Our templates serve CUDA fp16/bf16/fp32 with head dims 1..256; anything else falls back."""
    device = query.get_device()
    if device is None or device.type != "cuda" or torch.version.hip is not None:
        return False
    head_dim = query.get_size()[-1]
    if not isinstance(head_dim, (int, sympy.Integer)):
        return False
    return query.get_dtype() in backends.TRITON_DTYPES and 1 <= int(head_dim) <= 256


def fallback(op: torch._ops.OpOverload, *args: Any) -> Any:
    """Run the op's eager implementation from compiled code (other devices, unsupported cases)."""
    return fallback_handler(op, add_to_fallback_set=False)(*args)


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
    """A concrete value for a (possibly symbolic) size, for autotuning inputs."""
    return int(V.graph.sizevars.optimization_hint(expr, fallback=inductor_config.unbacked_symint_fallback))


def cu_seq_generator(num_offsets: int, total: int) -> Callable[[ir.Buffer], torch.Tensor]:
    """Autotuning input for a ``cu_seq`` buffer: ``N`` near-equal sequences covering ``total``.

    Random int32 data would index out of bounds; equal lengths are a fair middle case.
    """

    def generate(buffer: ir.Buffer) -> torch.Tensor:
        sequences = max(num_offsets - 1, 0)
        offsets = torch.linspace(0, total, sequences + 1, dtype=torch.float64).round()
        return offsets.to(device=buffer.get_device(), dtype=torch.int32)

    return generate


def kernel_constants(
    query: ir.IRNode,
    key: ir.IRNode,
    scale: float,
    window_left: int,
    window_right: int,
) -> dict[str, Any]:
    """Constexprs every choice of both templates shares (see the template headers)."""
    head_dim = int(query.get_size()[-1])
    heads_q = V.graph.sizevars.guard_int(query.get_size()[1])
    heads_kv = V.graph.sizevars.guard_int(key.get_size()[1])
    return {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": padded_head_dim(head_dim),
        "WINDOW_LEFT": int(window_left),
        "WINDOW_RIGHT": int(window_right),
        "GQA_GROUP": heads_q // heads_kv,
        "SCALE": float(scale),
        "SEARCH_WIDTH": SEARCH_WIDTH,
        "DOT_PRECISION": repr(dot_precision(query.get_dtype())),
    }
