"""The ops' eager implementations inside compiled graphs, where our templates cannot serve a
call or cannot be built on this torch: logged once per op and reason (docs/design.md §9, §14).

It needs only Inductor's lowering registry, so it also serves where the rest of the lowering
cannot import (Triton missing, or an Inductor internal this torch lacks).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch._inductor.lowering import fallback_handler, register_lowering

from varlen_compile.params import bind_op_args

__all__ = ["fallback", "register_fallbacks"]

log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def fallback(op: torch._ops.OpOverload, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the op's eager implementation from compiled code, logging why once per (op, reason):
    a warning on CUDA, where it costs speed, else info.

    The arguments go positionally, in schema order: Inductor's ``FallbackKernel.create`` takes
    the op as a parameter named ``kernel``, which our ops' ``kernel`` keyword would collide with.
    On CUDA the eager implementation never syncs: without ``max_q``/``max_k`` hints it runs our
    standalone Triton kernels, not aten flash (``backends``)."""
    if (str(op), reason) not in _logged:
        _logged.add((str(op), reason))
        device = args[0].get_device() if hasattr(args[0], "get_device") else None
        level = logging.WARNING if device is not None and device.type == "cuda" else logging.INFO
        log.log(level, "%s runs its eager implementation inside the compiled graph: %s", op, reason)
    return fallback_handler(op, add_to_fallback_set=False)(*bind_op_args(op, args, kwargs).values())


def register_fallbacks(reason: str) -> None:
    """Lower both ops to their eager implementations, for ``reason`` (no template lowering)."""
    for op in (torch.ops.varlen_compile.varlen_attn.default, torch.ops.varlen_compile.varlen_attn_backward.default):
        register_lowering(op, type_promotion_kind=None)(
            lambda *args, op=op, **kwargs: fallback(op, reason, args, kwargs)
        )
