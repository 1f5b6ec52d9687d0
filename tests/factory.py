"""One factory for test inputs and one error rule, used by every test module.

The error rule (docs/design.md §15): a result passes when its max error against the float64
reference is at most 2x the error of the same computation done by the plain reference in the
input dtype, plus a tiny absolute slack. NaN never passes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from varlen_compile import reference


def make_cu_seq(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Sequence lengths -> int32 cumulative offsets ``(N + 1,)``."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


@dataclasses.dataclass
class VarlenCase:
    """A packed batch: q ``(T_q, H_q, D)``, k/v ``(T_k, H_kv, D)`` and their offsets."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    lengths_q: list[int]
    lengths_k: list[int]

    @property
    def max_q(self) -> int:
        return max(self.lengths_q, default=0)

    @property
    def max_k(self) -> int:
        return max(self.lengths_k, default=0)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.k, self.v, self.cu_seq_q, self.cu_seq_k


def make_case(
    lengths_q: list[int],
    lengths_k: list[int] | None = None,
    *,
    heads_q: int = 4,
    heads_kv: int | None = None,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fused_qkv: bool = False,
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
) -> VarlenCase:
    """Fresh random inputs. ``fused_qkv=True`` makes q/k/v strided views of one
    ``(T, (H_q + 2 H_kv) D)`` projection (split along the last dim, then ``view``), as a fused
    projection gives (GQA included); that needs equal query/key lengths."""
    lengths_k = lengths_q if lengths_k is None else lengths_k
    heads_kv = heads_q if heads_kv is None else heads_kv
    total_q, total_k = sum(lengths_q), sum(lengths_k)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    if fused_qkv:
        assert list(lengths_q) == list(lengths_k), "fused qkv needs self-attention lengths"
        qkv = randn(total_q, (heads_q + 2 * heads_kv) * head_dim).requires_grad_(requires_grad)
        q, k, v = qkv.split([heads_q * head_dim, heads_kv * head_dim, heads_kv * head_dim], -1)
        q = q.view(total_q, heads_q, head_dim)
        k, v = (x.view(total_k, heads_kv, head_dim) for x in (k, v))
    else:
        q = randn(total_q, heads_q, head_dim).requires_grad_(requires_grad)
        k = randn(total_k, heads_kv, head_dim).requires_grad_(requires_grad)
        v = randn(total_k, heads_kv, head_dim).requires_grad_(requires_grad)
    return VarlenCase(
        q, k, v, make_cu_seq(lengths_q, device), make_cu_seq(lengths_k, device),
        list(lengths_q), list(lengths_k),
    )


def allowed_pairs(
    len_q: int, len_k: int, is_causal: bool = False, window_size: tuple[int, int] = (-1, -1)
) -> torch.Tensor:
    """Bool ``(len_q, len_k)``: which keys each query attends, written out pair by pair from the
    documented rule (independent of the reference's vectorized mask): query ``i`` sits on
    diagonal ``d = i + len_k - len_q`` and attends key ``j`` when ``d - left <= j <= d + right``
    (``-1`` unbounded; causal means ``right = 0``)."""
    left, right = window_size
    if is_causal:
        right = 0
    allowed = torch.zeros(len_q, len_k, dtype=torch.bool)
    for i in range(len_q):
        diagonal = i + len_k - len_q
        for j in range(len_k):
            allowed[i, j] = (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)
    return allowed


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error over entries; infinities must sit at the same places (and are skipped)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(actual).any(), "NaN in result"
    inf_actual, inf_expected = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_actual, inf_expected), "infinities differ from the reference"
    if inf_expected.any():
        assert torch.equal(actual[inf_actual], expected[inf_expected]), "inf signs differ"
    finite = ~inf_expected
    if not finite.any():
        return 0.0
    return (actual[finite] - expected[finite]).abs().max().item()


def assert_meets_error_rule(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    plain: torch.Tensor,
    *,
    name: str = "",
    atol: float = 1e-5,
) -> None:
    """``err(actual) <= 2 * err(plain) + atol``, errors measured against the float64 oracle."""
    error = max_error(actual, oracle)
    budget = 2 * max_error(plain, oracle) + atol
    assert error <= budget, f"{name}: error {error:.3g} exceeds budget {budget:.3g}"
    assert math.isfinite(error)


def reference_outputs(
    case: VarlenCase,
    compute_dtype: torch.dtype,
    *,
    grad_out: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
    **attn_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """``(out, lse, grads)`` of the reference in ``compute_dtype`` (grads via autograd).

    Inputs are upcast for float64, and used as-is (in their own dtype) otherwise. ``grads`` are
    ``(dq, dk, dv)`` for the cotangents ``grad_out`` (into ``out``) and ``grad_lse`` (into
    ``lse``, optional), or None without ``grad_out``.
    """
    inputs = [
        (x.detach().to(compute_dtype) if compute_dtype == torch.float64 else x.detach()).requires_grad_(
            grad_out is not None
        )
        for x in (case.q, case.k, case.v)
    ]
    out, lse = reference.attention_forward(
        *inputs, case.cu_seq_q, case.cu_seq_k, compute_dtype=compute_dtype, **attn_kwargs
    )
    grads = None
    if grad_out is not None:
        outputs, cotangents = [out], [grad_out.to(out.dtype)]
        if grad_lse is not None:
            outputs.append(lse)
            cotangents.append(grad_lse.to(lse.dtype))
        grads = torch.autograd.grad(outputs, inputs, cotangents, materialize_grads=True)
    return out.detach(), lse.detach(), grads


def assert_matches_reference(
    case: VarlenCase,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    grads: tuple[torch.Tensor, ...] | None = None,
    *,
    grad_out: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
    plain_dtype: torch.dtype | None = None,
    **attn_kwargs,
) -> None:
    """The error rule for ``out`` and, when given, ``lse`` and ``grads = (dq, dk, dv)``.

    The oracle is the float64 reference; the plain reference (the error budget) runs in
    ``plain_dtype``, by default the input dtype. ``grads`` need ``grad_out`` (and ``grad_lse``
    when the loss also used ``lse``). ``attn_kwargs`` go to ``reference.attention_forward``.
    """
    plain_dtype = plain_dtype or case.q.dtype
    oracle = reference_outputs(case, torch.float64, grad_out=grad_out, grad_lse=grad_lse, **attn_kwargs)
    plain = reference_outputs(case, plain_dtype, grad_out=grad_out, grad_lse=grad_lse, **attn_kwargs)
    assert_meets_error_rule(out, oracle[0], plain[0], name="out")
    if lse is not None:
        expected = torch.float64 if case.q.dtype == torch.float64 else torch.float32
        assert lse.dtype == expected, f"lse must be {expected} for {case.q.dtype} inputs, got {lse.dtype}"
        assert_meets_error_rule(lse, oracle[1], plain[1], name="lse")
    if grads is not None:
        assert grad_out is not None, "gradients need the grad_out they were computed with"
        for name, grad, grad_oracle, grad_plain in zip(("dq", "dk", "dv"), grads, oracle[2], plain[2]):
            assert grad.dtype == grad_plain.dtype, f"{name}: dtype {grad.dtype} != {grad_plain.dtype}"
            assert_meets_error_rule(grad, grad_oracle, grad_plain, name=name)


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """One attention problem for parametrized tests; ``id`` is its readable pytest id
    (``N3-Hq4-Hkv2-causal``). ``lengths_k=None`` means self-attention lengths."""

    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...] | None = None
    heads_q: int = 4
    heads_kv: int | None = None
    head_dim: int = 16
    is_causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    scale: float | None = None
    tag: str = ""

    @property
    def key_lengths(self) -> tuple[int, ...]:
        return self.lengths_q if self.lengths_k is None else tuple(self.lengths_k)

    @property
    def kv_heads(self) -> int:
        return self.heads_q if self.heads_kv is None else self.heads_kv

    @property
    def id(self) -> str:
        parts = [f"N{len(self.lengths_q)}", f"Hq{self.heads_q}", f"Hkv{self.kv_heads}", f"D{self.head_dim}"]
        if self.key_lengths != tuple(self.lengths_q):
            parts.append("qk-differ")
        parts.append("causal" if self.is_causal else "full")
        if tuple(self.window_size) != (-1, -1):
            parts.append("win{}_{}".format(*self.window_size))
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    @property
    def ref_kwargs(self) -> dict:
        """Keyword arguments of ``reference.attention_forward`` (and ``reference_outputs``)."""
        return {"is_causal": self.is_causal, "scale": self.scale, "window_size": tuple(self.window_size)}

    @property
    def api_kwargs(self) -> dict:
        """Keyword arguments of ``varlen_attn`` for this problem."""
        return {**self.ref_kwargs, "enable_gqa": self.heads_q != self.kv_heads}

    def make(self, **kwargs) -> VarlenCase:
        """Fresh random inputs (``kwargs`` go to :func:`make_case`: dtype, fused_qkv, ...)."""
        return make_case(
            list(self.lengths_q), list(self.key_lengths),
            heads_q=self.heads_q, heads_kv=self.kv_heads, head_dim=self.head_dim, **kwargs,
        )


def spec_id(spec: AttnSpec) -> str:
    """``ids=`` callable for ``pytest.mark.parametrize`` over specs."""
    return spec.id


def dtype_id(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16`` for parametrize ids."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]
