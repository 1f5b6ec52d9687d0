"""The kernel layer (``varlen_compile.lowering``): our Triton kernels, the adapters that make
aten flash attention and FlashAttention 4 kernels of ours, and the Inductor lowerings.

It imports only the bottom layer of ``varlen_compile`` (``params``, ``config``, ``_compat``,
``eligibility``; docs/design.md §3). The rest of the package uses it through this module alone:

- :mod:`.launcher`: the standalone Triton kernels, eagerly (``forward``, ``backward``,
  ``sanitized_offsets``);
- :mod:`.aten`: aten's flash attention in the ops' conventions;
- :mod:`.fa4`: FlashAttention 4 in the ops' conventions;
- :func:`register_lowerings`: teach Inductor to lower our ops (``import varlen_compile`` calls
  it once the ops exist).

Importing the kernels needs no Triton: they load it when they first run, which eligibility
allows only where it is installed. The Inductor modules (``forward``, ``backward``, ``common``,
``choices``, ``extern_ops``, ``cache_tag``) are imported only where Inductor and Triton are.
"""

from __future__ import annotations

import functools
import logging

from varlen_compile import _compat

from . import aten, fa4, launcher

if _compat.has_inductor() and _compat.has_triton():
    from . import backward, cache_tag, forward

__all__ = ["aten", "fa4", "launcher", "register_lowerings"]

log = logging.getLogger(__name__)


@functools.cache
def register_lowerings() -> None:
    """Register the forward and backward lowerings with Inductor (the ops must exist), and tag
    Inductor's caches with our build (:func:`.cache_tag.tag_compile_caches`). Without Inductor
    or Triton, compiled graphs call the ops' eager implementations."""
    if not (_compat.has_inductor() and _compat.has_triton()):
        log.debug("varlen_compile: Inductor or Triton missing, ops run as fallbacks when compiled")
        return
    forward.register()
    backward.register()
    cache_tag.tag_compile_caches()  # cached graphs must not outlive the kernels they embed
