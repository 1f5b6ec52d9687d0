"""varlen_compile: variable-length (packed) attention native to ``torch.compile``.

``varlen_attn`` runs eagerly on aten flash attention (CUDA) or an exact reference (CPU), and
Inductor lowers it, forward and backward, to templated Triton kernels.
``scaled_dot_product_attention`` serves jagged nested tensors with SDPA's signature.
"""

from __future__ import annotations

import logging

from . import _extern_ops, ops  # noqa: F401  (register torch.ops.varlen_compile.*)
from ._compat import has_inductor, has_triton
from .api import AuxRequest, varlen_attn, varlen_attn_out
from .nested import scaled_dot_product_attention

__all__ = ["AuxRequest", "scaled_dot_product_attention", "varlen_attn", "varlen_attn_out"]
__version__ = "0.1.0"

log = logging.getLogger(__name__)


def _register_lowerings() -> None:
    """Teach Inductor to lower our ops; a no-op without Inductor or Triton."""
    if not (has_inductor() and has_triton()):
        log.debug("varlen_compile: Inductor or Triton missing, ops run as fallbacks when compiled")
        return
    from .lowering import register_lowerings

    register_lowerings()


_register_lowerings()
