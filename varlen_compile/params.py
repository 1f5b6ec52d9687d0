"""The attention parameters as two small frozen objects, and the one place they are flattened.

- :class:`AttnOptions`: what is masked and how scores are formed (causal, window, scale).
- :class:`BatchLayout`: how the packed batch is laid out (``cu_seq_q``/``cu_seq_k`` and the
  optional ``max_q``/``max_k`` hints).

They travel as objects between the layers (``ops`` -> ``backends`` -> ``lowering.launcher``, and
the Inductor lowerings). Only a custom-op schema needs flat arguments: :func:`flat_args` turns
the objects into the keyword arguments of such a schema and :func:`unflatten` turns a bound
schema call back into objects, both by field name. A new option is a new field here, plus the
kernel math, ``lowering.configs.kernel_constexprs``, validation and tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["AttnOptions", "BatchLayout", "bind_op_args", "flat_args", "unflatten"]


@dataclasses.dataclass(frozen=True)
class AttnOptions:
    """Masking and scoring options.

    ``window_left``/``window_right``: FlashAttention's sliding window, ``-1`` = unbounded.
    ``is_causal`` means ``window_right = 0`` (aligned bottom-right); see :meth:`window`.
    ``scale``: multiplier of ``q @ k^T``; ``None`` means ``1 / sqrt(head_dim)``.
    """

    is_causal: bool = False
    scale: float | None = None
    window_left: int = -1
    window_right: int = -1

    def window(self) -> tuple[int, int]:
        """``(left, right)`` actually applied: causal attention means ``right = 0``."""
        return self.window_left, (0 if self.is_causal else self.window_right)

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale for ``head_dim`` (the default ``1 / sqrt(head_dim)`` when unset)."""
        return 1.0 / math.sqrt(head_dim) if self.scale is None else float(self.scale)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchLayout:
    """Where the sequences of a packed batch lie.

    ``cu_seq_q``/``cu_seq_k``: int32 ``(N + 1,)`` offsets into the query / key token dims (tensors
    in eager code, IR nodes inside the lowerings). ``max_q``/``max_k``: optional upper bounds on
    the sequence lengths (int, SymInt or None); only aten flash needs them.
    """

    cu_seq_q: Any
    cu_seq_k: Any
    max_q: int | torch.SymInt | None = None
    max_k: int | torch.SymInt | None = None


_PARAM_TYPES = (BatchLayout, AttnOptions)


def flat_args(*objects: BatchLayout | AttnOptions) -> dict[str, Any]:
    """The fields of ``objects`` as keyword arguments of a custom-op schema."""
    flat: dict[str, Any] = {}
    for obj in objects:
        flat.update({field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)})
    return flat


def unflatten(args: Mapping[str, Any]) -> tuple[BatchLayout, AttnOptions]:
    """``(layout, options)`` from a schema's arguments bound by name (see :func:`bind_op_args`)."""
    layout, options = (
        cls(**{field.name: args[field.name] for field in dataclasses.fields(cls)}) for cls in _PARAM_TYPES
    )
    return layout, options


def bind_op_args(op: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of a call to ``op`` by name, schema defaults filled in."""
    bound: dict[str, Any] = {}
    for position, argument in enumerate(op._schema.arguments):
        if position < len(args):
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            raise TypeError(f"{op}: missing argument {argument.name!r}")
    return bound
