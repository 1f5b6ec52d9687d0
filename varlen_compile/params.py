"""The attention parameters as three small frozen objects, the registry of optional kernel
inputs, and the one place they are flattened.

- :class:`AttnOptions`: scalars only, what is masked and how scores are formed (causal, window,
  scale, softcap).
- :class:`BatchLayout`: where the sequences lie (``cu_seq_q``/``cu_seq_k`` and the optional
  ``max_q``/``max_k`` hints).
- :class:`OptionalInputs`: the optional tensors of a call by name (``seqused_k``,
  ``block_table``, ``sink``, ``alibi_slopes``, and in the backward ``grad_lse``); absent ones
  are simply not there.

They travel as objects between the layers (``ops`` -> ``backends`` -> the kernels, and the
Inductor lowerings; inside the lowerings their tensors are IR nodes). Only a custom-op schema
needs flat arguments: :func:`flat_args` turns the objects into the keyword arguments of such a
schema and :func:`unflatten` turns a bound schema call back into objects, both by name.

:data:`OPTIONAL_INPUTS` declares each optional input once: the kernels that read it, the
constexpr flag that gates its code, its name as a kernel parameter and as FlashAttention 4's
keyword. Every template input list, kernel argument list, autotune input index and extern
binding is generated from it by name (docs/design.md §8), so a new optional input touches the
reference, the kernel math, this registry, validation and tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch

__all__ = [
    "OPTIONAL_INPUTS",
    "AttnOptions",
    "BatchLayout",
    "OptionalInput",
    "OptionalInputs",
    "Side",
    "WINDOW_UNBOUNDED_FROM",
    "argument_names",
    "bind_op_args",
    "flat_args",
    "lse_dtype",
    "op_kwargs",
    "optional_inputs_of",
    "unflatten",
]

Side = Literal["forward", "backward"]
"""Which kernel: the forward, or the backward (dQ, dK, dV)."""

WINDOW_UNBOUNDED_FROM = 2**31 - 1
"""A window side from which it is unbounded: every key of any sequence (int32 offsets) is in it."""


@dataclasses.dataclass(frozen=True)
class AttnOptions:
    """Masking and scoring options: scalars only (hashable, so they can key a kernel choice).

    ``window_left``/``window_right``: FlashAttention's sliding window, ``-1`` = unbounded.
    ``is_causal`` means ``window_right = 0`` (aligned bottom-right); see :meth:`window`.
    ``scale``: multiplier of ``q @ k^T``; ``None`` means ``1 / sqrt(head_dim)``.
    ``softcap``: ``> 0`` makes the score of query ``i`` and key ``j``
    ``softcap * tanh(scale * q.k / softcap)`` instead of ``scale * q.k``; ``0.0`` is off.
    The tensors that also shape scores (attention sinks, ALiBi slopes) are
    :class:`OptionalInputs`.
    """

    is_causal: bool = False
    scale: float | None = None
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0

    def window(self) -> tuple[int, int]:
        """``(left, right)`` actually applied: causal attention means ``right = 0``, and a side
        of ``2**31 - 1`` or more is unbounded (-1): no sequence of int32 offsets is that long,
        and the kernels' int32 arithmetic takes sides below it."""
        left = -1 if self.window_left >= WINDOW_UNBOUNDED_FROM else self.window_left
        right = -1 if self.window_right >= WINDOW_UNBOUNDED_FROM else self.window_right
        return left, (0 if self.is_causal else right)

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale for ``head_dim`` (the default ``1 / sqrt(head_dim)`` when unset)."""
        return 1.0 / math.sqrt(head_dim) if self.scale is None else float(self.scale)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchLayout:
    """Where the sequences of a packed batch lie.

    ``cu_seq_q``/``cu_seq_k``: int32 ``(N + 1,)`` offsets into the query / key token dims (tensors
    in eager code, IR nodes inside the lowerings). ``max_q``/``max_k``: optional upper bounds on
    the sequence lengths (int, SymInt or None); only aten flash needs them. With paged K/V
    (``OptionalInputs``' ``block_table``) ``cu_seq_k`` is not read.
    """

    cu_seq_q: Any
    cu_seq_k: Any
    max_q: int | torch.SymInt | None = None
    max_k: int | torch.SymInt | None = None


@dataclasses.dataclass(frozen=True)
class OptionalInput:
    """One optional kernel input, declared once.

    ``name``: the ops' schema argument (and the key in :class:`OptionalInputs`).
    ``kernel_name``: the kernels' parameter (template input and standalone kernel argument).
    ``flag``: the constexpr that turns its code on (its value is whether the input is present).
    ``read_by``: the kernels that take it as an input. ``flag_in``: the kernels whose code it
    changes (a superset: a sink changes the backward's math through lse, without being read).
    ``fa4``: FlashAttention 4's keyword for it, or None when FA4 cannot serve it.
    ``dtype``: what the kernels read. ``doc``: its shape and meaning, for messages and docs.
    """

    name: str
    kernel_name: str
    flag: str
    read_by: tuple[Side, ...]
    flag_in: tuple[Side, ...]
    fa4: str | None
    dtype: torch.dtype
    doc: str


OPTIONAL_INPUTS: tuple[OptionalInput, ...] = (
    OptionalInput(
        "grad_lse", "GRAD_LSE", "HAS_GRAD_LSE", ("backward",), ("backward",), "dlse", torch.float32,
        "float32 (H_q, T_q): the gradient flowing into lse",
    ),
    OptionalInput(
        "seqused_k", "SEQUSED_K", "HAS_SEQUSED_K", ("forward", "backward"), ("forward", "backward"), "seqused_k",
        torch.int32, "int32 (N,): sequence i uses only its first seqused_k[i] keys",
    ),
    OptionalInput(
        "block_table", "BLOCK_TABLE", "PAGED", ("forward",), ("forward",), None, torch.int32,
        "int32 (N, max_pages): paged K/V, key j of sequence i in page block_table[i, j // page_size]",
    ),
    OptionalInput(
        "sink", "SINK", "HAS_SINK", ("forward",), ("forward", "backward"), "learnable_sink", torch.float32,
        "float32 (H_q,): attention-sink logits, one extra logit per head in every softmax",
    ),
    OptionalInput(
        "alibi_slopes", "ALIBI", "HAS_ALIBI", ("forward", "backward"), ("forward", "backward"), None,
        torch.float32, "float32 (H_q,): ALiBi slopes",
    ),
)
"""Every optional input, in the order of every argument list generated from it."""

_BY_NAME = {spec.name: spec for spec in OPTIONAL_INPUTS}


def optional_inputs_of(side: Side) -> tuple[OptionalInput, ...]:
    """The optional inputs the ``side`` kernel reads, in registry order."""
    return tuple(spec for spec in OPTIONAL_INPUTS if side in spec.read_by)


class OptionalInputs(Mapping[str, Any]):
    """The optional tensors of one call (tensors, or IR nodes inside the lowerings), by
    registry name; ``None`` values are left out, so ``"sink" in optional`` says whether the
    call has a sink. Immutable; iterates in registry order."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None, /, **named: Any) -> None:
        merged = {**(values or {}), **named}
        unknown = sorted(set(merged) - set(_BY_NAME))
        if unknown:
            raise TypeError(f"OptionalInputs: unknown optional input(s) {unknown}; known: {sorted(_BY_NAME)}")
        self._values = {name: merged[name] for name in _BY_NAME if merged.get(name) is not None}

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"OptionalInputs({', '.join(self._values)})"

    @property
    def paged(self) -> bool:
        """Whether K/V are pages addressed through ``block_table``."""
        return "block_table" in self._values

    def specs(self, side: Side) -> tuple[OptionalInput, ...]:
        """The registry entries of the inputs present that the ``side`` kernel reads."""
        return tuple(spec for spec in optional_inputs_of(side) if spec.name in self._values)

    def flags(self, side: Side) -> dict[str, bool]:
        """The ``side`` kernel's feature constexprs: each flag, True where its input is present."""
        return {spec.flag: spec.name in self._values for spec in OPTIONAL_INPUTS if side in spec.flag_in}


_PARAM_TYPES = (BatchLayout, AttnOptions)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp the ops return for inputs of ``dtype``: float32, or float64
    for float64 inputs (their exact path keeps float64 throughout, lse included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_args(layout: BatchLayout, options: AttnOptions, optional: OptionalInputs) -> dict[str, Any]:
    """The objects as keyword arguments of a custom-op schema (absent optional inputs as
    None)."""
    flat: dict[str, Any] = {}
    for obj in (layout, options):
        flat.update({field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)})
    flat.update({spec.name: optional.get(spec.name) for spec in OPTIONAL_INPUTS})
    return flat


def unflatten(args: Mapping[str, Any]) -> tuple[BatchLayout, AttnOptions, OptionalInputs]:
    """``(layout, options, optional)`` from a schema's arguments bound by name (see
    :func:`bind_op_args`). Fields a schema lacks keep their defaults."""
    layout, options = (
        cls(**{field.name: args[field.name] for field in dataclasses.fields(cls) if field.name in args})
        for cls in _PARAM_TYPES
    )
    return layout, options, OptionalInputs({name: args[name] for name in _BY_NAME if name in args})


def argument_names(op: torch._ops.OpOverload) -> frozenset[str]:
    """The names of ``op``'s schema arguments (read once, outside tracing: Dynamo cannot trace
    a schema)."""
    return frozenset(argument.name for argument in op._schema.arguments)


def op_kwargs(
    names: frozenset[str], layout: BatchLayout, options: AttnOptions, optional: OptionalInputs
) -> dict[str, Any]:
    """:func:`flat_args` restricted to ``names``, an op's arguments (:func:`argument_names`)."""
    return {name: value for name, value in flat_args(layout, options, optional).items() if name in names}


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
