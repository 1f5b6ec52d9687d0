"""Whether values can be read now: predicates for tracing (Dynamo, export, fake tensors) and
CUDA-graph capture. Value checks that read ``cu_seq`` on the host run only where they say so,
so tracing never host-syncs or graph-breaks (docs/design.md §6, §13)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor

__all__ = ["is_symbolic", "is_traced", "stream_is_capturing"]


def is_symbolic(x: object) -> bool:
    """True for SymInt/SymFloat/SymBool values produced while tracing."""
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


def is_traced(t: torch.Tensor) -> bool:
    """True when ``t`` has no readable values: Dynamo/export tracing, fake or functional tensors."""
    if torch.compiler.is_compiling():
        return True
    return is_fake(t) or isinstance(t, FunctionalTensor) or t.device.type == "meta"


def stream_is_capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
