"""Modules and dispatch modes shared by the compile, export and GPU tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from varlen_compile import varlen_attn

FORWARD_OP = "varlen_compile.varlen_attn.default"
BACKWARD_OP = "varlen_compile.varlen_attn_backward.default"


class AttentionBlock(nn.Module):
    """Transformer-style self-attention over a packed batch ``x`` of shape ``(T, H * D)``.

    A fused qkv projection, ``qkv.chunk(3, -1)`` and ``.view(T, H, D)`` (strided views, no
    copies, as real models produce them), ``varlen_attn``, then the output projection.
    """

    def __init__(self, num_heads: int = 4, head_dim: int = 16, is_causal: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.is_causal = num_heads, head_dim, is_causal
        width = num_heads * head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, cu_seq: torch.Tensor, max_len: int | None = None
    ) -> torch.Tensor:
        total = x.shape[0]
        query, key, value = (
            t.view(total, self.num_heads, self.head_dim) for t in self.qkv(x).chunk(3, -1)
        )
        attn = varlen_attn(query, key, value, cu_seq, cu_seq, max_len, max_len, is_causal=self.is_causal)
        return self.out(attn.reshape(total, self.num_heads * self.head_dim))


class OpLoggingMode(TorchDispatchMode):
    """Records ``str(func)`` of every op dispatched while active (``self.ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class CompiledOpLoggingMode(OpLoggingMode):
    """An :class:`OpLoggingMode` that lets Dynamo compile while it is active.

    On torch 2.13 Dynamo skips every frame while a plain dispatch mode is active (and with
    ``fullgraph=True`` raises "found no compiled frames"); a mode whose
    ``ignore_compile_internals()`` is True is ignored while compiling and sees the compiled
    artifact's runtime ops.
    """

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True
