"""Registration of the custom ops: opcheck, double backward, FLOP counting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from factory import AttnSpec, allowed_pairs, spec_id
from varlen_compile import varlen_attn

FORWARD = torch.ops.varlen_compile.varlen_attn.default
BACKWARD = torch.ops.varlen_compile.varlen_attn_backward.default
FORWARD_UTILS = (
    "test_schema",
    "test_faketensor",
    "test_autograd_registration",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)
BACKWARD_UTILS = ("test_schema", "test_faketensor")

# (spec, pass max_q as a hint?) pairs: plain MHA with both hints, GQA with max_q=None.
OPCHECK_SPECS = [
    (AttnSpec((3, 0, 5), is_causal=True), True),
    (AttnSpec((3, 1, 6), (5, 2, 4), heads_q=4, heads_kv=2, window_size=(2, 1), scale=0.3), False),
]


def _forward_args(spec: AttnSpec, case, hint_max_q: bool) -> tuple:
    """Positional arguments of the forward op (``scale=None`` is the op's 1/sqrt(D) default)."""
    max_q = case.max_q if hint_max_q else None
    return (
        *case.inputs(), max_q, case.max_k, spec.is_causal, spec.scale, *spec.window_size,
    )


@pytest.mark.parametrize(
    "spec, hint_max_q", OPCHECK_SPECS,
    ids=[f"{spec.id}-{'max_q' if hint else 'no_max_q'}" for spec, hint in OPCHECK_SPECS],
)
def test_opcheck_forward(spec, hint_max_q):
    case = spec.make(requires_grad=True)
    torch.library.opcheck(FORWARD, _forward_args(spec, case, hint_max_q), test_utils=FORWARD_UTILS)


@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["no_grad_lse", "grad_lse"])
@pytest.mark.parametrize(
    "spec, hint_max_q", OPCHECK_SPECS,
    ids=[f"{spec.id}-{'max_q' if hint else 'no_max_q'}" for spec, hint in OPCHECK_SPECS],
)
def test_opcheck_backward(spec, hint_max_q, with_grad_lse):
    case = spec.make()
    forward_args = _forward_args(spec, case, hint_max_q)
    out, lse = FORWARD(*forward_args)
    grad_out = torch.randn_like(out)
    kwargs = {"grad_lse": torch.randn_like(lse)} if with_grad_lse else {}
    args = (grad_out, *case.inputs()[:3], out, lse, *forward_args[3:])
    torch.library.opcheck(BACKWARD, args, kwargs, test_utils=BACKWARD_UTILS)


def test_double_backward_raises():
    spec = AttnSpec((3, 0, 5), (4, 2, 5), heads_q=4, heads_kv=2, is_causal=True)
    case = spec.make(requires_grad=True)
    out = varlen_attn(*case.inputs(), **spec.api_kwargs)
    grads = torch.autograd.grad(out.square().sum(), (case.q, case.k, case.v), create_graph=True)
    assert all(grad.requires_grad for grad in grads)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(sum(grad.sum() for grad in grads), (case.q, case.k, case.v))


def _attended_pairs(spec: AttnSpec) -> int:
    return sum(
        int(allowed_pairs(len_q, len_k, spec.is_causal, spec.window_size).sum())
        for len_q, len_k in zip(spec.lengths_q, spec.key_lengths)
    )


FLOP_SPECS = [
    AttnSpec((3, 0, 5, 1), (4, 2, 9, 1), heads_q=4, heads_kv=2, is_causal=True),
    AttnSpec((6, 2), (3, 7), heads_q=3, heads_kv=1, window_size=(2, 1)),
]


@pytest.mark.parametrize("spec", FLOP_SPECS, ids=spec_id)
def test_flop_counter_counts_both_ops(spec):
    case = spec.make(requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = varlen_attn(*case.inputs(), **spec.api_kwargs)
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    forward = counts[torch.ops.varlen_compile.varlen_attn]
    backward = counts[torch.ops.varlen_compile.varlen_attn_backward]
    pairs = _attended_pairs(spec)
    assert pairs > 0
    assert forward == 4 * spec.head_dim * spec.heads_q * pairs
    assert 2 * backward == 5 * forward
