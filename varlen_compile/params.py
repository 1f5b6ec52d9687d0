"""The attention parameters as two small frozen objects, and the one place they are flattened.

- :class:`AttnOptions`: what is masked and how scores are formed (causal, window, scale,
  softcap, attention sinks, ALiBi).
- :class:`BatchLayout`: how the packed batch is laid out (``cu_seq_q``/``cu_seq_k``, the
  optional ``max_q``/``max_k`` hints, ``seqused_k`` and the paged-KV ``block_table``).

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

__all__ = ["AttnOptions", "BatchLayout", "bind_op_args", "flat_args", "op_kwargs", "unflatten", "uses_score_features"]


@dataclasses.dataclass(frozen=True, eq=False)
class AttnOptions:
    """Masking and scoring options.

    ``window_left``/``window_right``: FlashAttention's sliding window, ``-1`` = unbounded.
    ``is_causal`` means ``window_right = 0`` (aligned bottom-right); see :meth:`window`.
    ``scale``: multiplier of ``q @ k^T``; ``None`` means ``1 / sqrt(head_dim)``.

    The score of query ``i`` and key ``j`` of one sequence (``L_q`` queries, ``L_k`` keys) is
    ``s = softcap * tanh(scale * q.k / softcap)`` (just ``scale * q.k`` when ``softcap == 0``),
    minus ``alibi_slopes[h] * |i + L_k - L_q - j|`` with ALiBi (FlashAttention's convention).
    ``sink``: float32 ``(H_q,)`` logits, one per query head, that join every row's softmax
    denominator without contributing a value (gpt-oss's attention sinks, FA4's
    ``learnable_sink``); lse includes them. ``sink``/``alibi_slopes`` are tensors (IR nodes
    inside the lowerings), hence no equality on this class.
    """

    is_causal: bool = False
    scale: float | None = None
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    sink: Any = None
    alibi_slopes: Any = None

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
    ``seqused_k``: int32 ``(N,)`` or None: sequence ``i`` uses only its first ``seqused_k[i]``
    keys (its causal diagonal is aligned to that length).
    ``block_table``: int32 ``(N, max_pages)`` or None: paged K/V, shaped
    ``(total_pages, page_size, H_kv, D)``; key ``j`` of sequence ``i`` is row
    ``j % page_size`` of page ``block_table[i, j // page_size]``. Needs ``seqused_k``;
    ``cu_seq_k`` may then be None (it is not read).
    """

    cu_seq_q: Any
    cu_seq_k: Any
    max_q: int | torch.SymInt | None = None
    max_k: int | torch.SymInt | None = None
    seqused_k: Any = None
    block_table: Any = None

    @property
    def paged(self) -> bool:
        return self.block_table is not None


_PARAM_TYPES = (BatchLayout, AttnOptions)


def flat_args(*objects: BatchLayout | AttnOptions) -> dict[str, Any]:
    """The fields of ``objects`` as keyword arguments of a custom-op schema."""
    flat: dict[str, Any] = {}
    for obj in objects:
        flat.update({field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)})
    return flat


def unflatten(args: Mapping[str, Any]) -> tuple[BatchLayout, AttnOptions]:
    """``(layout, options)`` from a schema's arguments bound by name (see :func:`bind_op_args`).
    Fields a schema lacks (the private aten ops take only the original ones) keep their
    defaults."""
    layout, options = (
        cls(**{field.name: args[field.name] for field in dataclasses.fields(cls) if field.name in args})
        for cls in _PARAM_TYPES
    )
    return layout, options


def op_kwargs(op: torch._ops.OpOverload, *objects: BatchLayout | AttnOptions) -> dict[str, Any]:
    """:func:`flat_args` restricted to the arguments ``op``'s schema has."""
    names = {argument.name for argument in op._schema.arguments}
    return {name: value for name, value in flat_args(*objects).items() if name in names}


def uses_score_features(options: AttnOptions) -> bool:
    """Whether softcap, sinks or ALiBi are on (features aten flash does not serve here)."""
    return options.softcap != 0.0 or options.sink is not None or options.alibi_slopes is not None


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
