"""varlen_compile: variable-length (packed) attention native to ``torch.compile``.

``varlen_attn`` runs eagerly on aten flash attention (CUDA) or an exact reference (CPU), and
Inductor lowers it, forward and backward, to templated Triton kernels.
``scaled_dot_product_attention`` serves jagged nested tensors with SDPA's signature.
"""

from __future__ import annotations

from . import lowering, ops  # noqa: F401  (ops registers torch.ops.varlen_compile.*)
from .api import AuxRequest, varlen_attn, varlen_attn_out
from .nested import scaled_dot_product_attention

__all__ = ["AuxRequest", "scaled_dot_product_attention", "varlen_attn", "varlen_attn_out"]
__version__ = "0.1.0"

lowering.register_lowerings()  # after the ops: the lowerings are registered for them
