"""Inductor's on-disk caches keyed by our build: a graph compiled before an upgrade of this
package (or before FlashAttention 4 was installed or removed) is compiled again rather than
served with the old kernels or kernel choice."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

from varlen_compile import params

__all__ = ["build_fingerprint", "tag_compile_caches"]

_CACHE_TAG_PREFIX = "varlen_compile="
_SOURCE_ROOTS = (Path(params.__file__).parent, Path(__file__).parent)  # varlen_compile/, lowering/


def build_fingerprint() -> str:
    """What Inductor's caches cannot see but our lowering's output depends on: a hash of this
    package's sources (the lowering, templates and kernels included) and of the installed
    FlashAttention 4 version (FA4 as a kernel choice). 16 hex digits; computed once per call."""
    digest = hashlib.sha256()
    for root in _SOURCE_ROOTS:
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".jinja") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    try:
        fa4 = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        fa4 = "none"
    digest.update(f"flash-attn-4={fa4}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def tag_compile_caches() -> str:
    """Put :func:`build_fingerprint` into ``torch.compiler.config.cache_key_tag``, which keys
    Inductor's FX graph cache and AOTAutograd's cache. Appended to a tag the user set (kept);
    a tag assigned after ``import varlen_compile`` replaces ours. Returns the tag set."""
    from torch.compiler import config as compiler_config

    current = compiler_config.cache_key_tag
    kept = "|".join(part for part in current.split("|") if part and not part.startswith(_CACHE_TAG_PREFIX))
    tag = "|".join(part for part in (kept, _CACHE_TAG_PREFIX + build_fingerprint()) if part)
    compiler_config.cache_key_tag = tag
    return tag
