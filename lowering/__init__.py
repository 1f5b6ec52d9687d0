"""Inductor lowerings of the varlen ops to templated Triton kernels (``varlen_compile.lowering``).

Importing this package is cheap and safe without Triton; :func:`register_lowerings` imports
Inductor and is called by ``import varlen_compile`` when both Inductor and Triton are present.
"""

from __future__ import annotations

import functools

__all__ = ["register_lowerings"]


@functools.cache
def register_lowerings() -> None:
    from varlen_compile import _compat

    from . import backward, forward  # noqa: F401  (each registers its lowering on import)

    _compat.tag_compile_caches()  # cached graphs must not outlive the kernels they embed
