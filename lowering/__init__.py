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
``choices``, ``extern_ops``, ``cache_tag``) are imported only where Inductor and Triton are; a
torch whose Inductor lacks an internal they import, or that fails inside a lowering, leaves the
ops' eager implementations to compiled graphs, logged once (docs/design.md §14).
"""

from __future__ import annotations

import functools
import logging

from varlen_compile import _compat

from . import aten, fa4, launcher

_NO_TEMPLATES = "" if _compat.has_triton() else "Triton is not installed"
# ``fallback`` is bound only after the import is tried: a package attribute of that name set
# first would be what ``from . import fallback`` returns, and the module would never load.
if _compat.has_inductor():
    try:
        from . import fallback
    except (ImportError, AttributeError) as error:  # Inductor's lowering registry itself moved
        fallback = None
        _NO_TEMPLATES = f"Inductor's lowering registry is unknown on torch {_compat.TORCH_VERSION} ({error})"
    if not _NO_TEMPLATES:
        try:
            from . import backward, cache_tag, forward
        except Exception as error:  # an Inductor internal this torch lacks or changed (import-time objects)
            _NO_TEMPLATES = f"the lowerings cannot import on torch {_compat.TORCH_VERSION} ({type(error).__name__}: {error})"
else:
    fallback = None

__all__ = ["aten", "fa4", "launcher", "register_lowerings"]

log = logging.getLogger(__name__)


@functools.cache
def register_lowerings() -> None:
    """Register the forward and backward lowerings with Inductor (the ops must exist), and tag
    Inductor's caches with our build (:func:`.cache_tag.tag_compile_caches`). Where the
    templates cannot be built (no Triton, or lowerings that cannot import on this torch), the
    ops lower to their eager implementations, said once."""
    if not _compat.has_inductor():
        log.debug("varlen_compile: no Inductor; compiled graphs call the ops as they are")
        return
    if _NO_TEMPLATES:
        level = logging.INFO if _NO_TEMPLATES == "Triton is not installed" else logging.WARNING
        log.log(level, "varlen_compile: %s; compiled graphs call the ops' eager implementations", _NO_TEMPLATES)
        if fallback is not None:
            fallback.register_fallbacks(_NO_TEMPLATES)
        return
    forward.register()
    backward.register()
    cache_tag.tag_compile_caches()  # cached graphs must not outlive the kernels they embed
