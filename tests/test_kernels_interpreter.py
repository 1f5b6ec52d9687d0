"""The shared Triton kernels (forward and backward) under TRITON_INTERPRET=1 on the CPU.

The standalone launcher runs the same ``@triton.jit`` math the Inductor templates append, so
this is CI's check of the kernel math. Tiny sizes: each interpreted launch takes about a second.
Outputs are allocated NaN-filled (``poison_empty``), so an element a kernel never writes fails.
"""

from __future__ import annotations

import pytest
import torch

from factory import AttnSpec, assert_matches_reference, make_case, spec_id
from varlen_compile.lowering import launcher
from varlen_compile.lowering.configs import BackwardConfig, ForwardConfig, pack_gqa_group
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.usefixtures("interpret", "poison_empty"),
    # Triton 3.6's interpreter converts size-1 arrays with int(): numpy >= 1.25 warns each time.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

FORWARD_CONFIG = ForwardConfig(16, 16, 4, 1)
BACKWARD_CONFIG = BackwardConfig(16, 16, 16, 16, 4, 1)

# Per sequence q > k, q < k, queries without keys and keys without queries, length 1, and
# sequences longer than one 16-row tile, so that tiles are partial, full, masked and unmasked.
MIXED_Q, MIXED_K = (5, 20, 0, 1, 33, 3), (17, 3, 4, 1, 40, 0)

SPECS = [
    AttnSpec(MIXED_Q, MIXED_K, heads_q=4, heads_kv=2, is_causal=True),
    AttnSpec(MIXED_Q, MIXED_K, heads_q=4, heads_kv=2),
    AttnSpec((23, 9, 1), (30, 9, 1), heads_q=4, heads_kv=2, window_size=(5, -1)),
    AttnSpec((23, 9, 1), (30, 9, 1), heads_q=4, heads_kv=2, window_size=(-1, 3)),
    AttnSpec((30, 9, 1), (23, 9, 1), heads_q=4, heads_kv=2, window_size=(4, 2)),
    AttnSpec((34, 2), (34, 5), heads_q=4, heads_kv=2, is_causal=True, window_size=(6, -1), scale=0.3),
    # Window (0, 0) with q > k: rows without any key inside a tile.
    AttnSpec((20,), (6,), heads_q=4, heads_kv=2, window_size=(0, 0)),
    # Head dim 24, padded to 32 inside the kernel.
    AttnSpec((19, 1, 26), (19, 1, 26), heads_q=4, heads_kv=2, head_dim=24, is_causal=True),
    # Window sides near int32's limit, queries longer and shorter than keys: a diagonal minus the
    # left side, or plus the right side, would overflow int32 (it did: silently wrong rows).
    AttnSpec((30, 9, 1), (4, 23, 1), heads_q=4, heads_kv=2, window_size=(2**31 - 2, 2**31 - 2)),
    AttnSpec((30, 9, 1), (4, 23, 1), heads_q=4, heads_kv=2, window_size=(2**31 - 1, 3)),
    AttnSpec((4, 23, 1), (30, 9, 1), heads_q=4, heads_kv=2, window_size=(3, 2**31 - 2)),
    AttnSpec((4, 23, 1), (30, 9, 1), heads_q=4, heads_kv=2, window_size=(10**12, 10**12)),
]

# The GQA-packed forward (ForwardConfig.pack_gqa): every spec above (groups of 2), and groups of 4.
PACKED_SPECS = SPECS + [
    AttnSpec(MIXED_Q, MIXED_K, heads_q=8, heads_kv=2, is_causal=True),
    AttnSpec(MIXED_Q, MIXED_K, heads_q=4, heads_kv=1),
    AttnSpec((30, 9, 1), (23, 9, 1), heads_q=8, heads_kv=2, window_size=(4, 2)),
    AttnSpec((34, 2), (34, 5), heads_q=8, heads_kv=2, is_causal=True, window_size=(6, -1), scale=0.3),
]


def packed_config(spec: AttnSpec, block_n: int = 16) -> ForwardConfig:
    """A forward config packing ``spec``'s GQA group G: tiles of G heads x 16 positions (the
    fewest positions that pack), so sequences above 16 tokens span several, partial, tiles."""
    group = spec.heads_q // spec.kv_heads
    config = ForwardConfig(16 * group, block_n, 4, 1, pack_gqa=True)
    assert pack_gqa_group(config, group) == group, "the test must run the packed kernel, not the fallback"
    return config


def _run_and_check(
    spec: AttnSpec,
    case,
    *,
    with_grad_lse: bool = False,
    forward_config: ForwardConfig | None = FORWARD_CONFIG,
    backward_config: BackwardConfig | None = BACKWARD_CONFIG,
) -> None:
    """Forward and backward through the launcher, checked against the float64 reference.

    The error rule's ``max_error`` also checks that lse is +inf exactly where the reference's
    is (rows that attend no key) and that nothing is NaN (no unwritten output element)."""
    options = AttnOptions(spec.is_causal, spec.scale, *spec.window_size)
    layout = BatchLayout(case.cu_seq_q, case.cu_seq_k)
    qkv = (case.q.detach(), case.k.detach(), case.v.detach())
    out, lse = launcher.forward(*qkv, layout, options, OptionalInputs(), config=forward_config)
    grad_out = torch.randn(out.shape)
    grad_lse = torch.randn(lse.shape) if with_grad_lse else None
    grads = launcher.backward(
        grad_out, *qkv, out, lse, layout, options, OptionalInputs(grad_lse=grad_lse), config=backward_config
    )
    assert_matches_reference(
        case, out, lse, grads, grad_out=grad_out, grad_lse=grad_lse, plain_dtype=torch.float32,
        **spec.ref_kwargs,
    )


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_forward_backward(spec):
    _run_and_check(spec, spec.make())


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[4]], ids=spec_id)
def test_gradient_through_lse(spec):
    _run_and_check(spec, spec.make(), with_grad_lse=True)


def test_strided_fused_qkv():
    spec = AttnSpec((17, 0, 30, 1), heads_q=4, is_causal=True)
    case = spec.make(fused_qkv=True)
    assert not case.q.is_contiguous() and case.q.stride(0) == 3 * 4 * 16
    _run_and_check(spec, case)


def test_more_sequences_than_one_search_step():
    """150 sequences > SEARCH_WIDTH (128): the tile -> sequence search takes several steps."""
    lengths_q = torch.randint(0, 3, (150,)).tolist()
    lengths_k = torch.randint(0, 3, (150,)).tolist()
    spec = AttnSpec(tuple(lengths_q), tuple(lengths_k), heads_q=1, is_causal=True)
    _run_and_check(spec, spec.make())


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_running_max_jumps_between_key_blocks(is_causal):
    """Logits that jump between key blocks (by a little and by ~21 in log2 units, then drop
    back): the online softmax's rescaling of acc and the running sum meets the reference, in
    masked and unmasked blocks alike."""
    spec = AttnSpec((41, 7), (48, 7), heads_q=4, heads_kv=2, is_causal=is_causal)
    case = spec.make()
    direction = torch.randn(spec.head_dim)
    direction /= direction.norm()
    with torch.no_grad():
        case.q += 3.0 * direction  # every query points the same way (plus noise)
        # Key blocks of 16 rows: score offsets ~0, ~+3, ~+15, then back to ~+1 (natural log units).
        offsets = torch.tensor([0.0] * 16 + [3.0] * 16 + [15.0] * 8 + [1.0] * 8 + [2.0] * 7)
        case.k += (offsets * spec.head_dim**0.5 / 3.0)[:, None, None] * direction
    _run_and_check(spec, case)


@pytest.mark.parametrize(
    "forward_config, backward_config",
    [
        (ForwardConfig(32, 16, 4, 1), BackwardConfig(16, 32, 32, 16, 4, 1)),
        (None, None),  # the launcher's defaults for float32
        (ForwardConfig(32, 32, 4, 1, pack_gqa=True), BACKWARD_CONFIG),  # 2 heads x 16 positions
        (ForwardConfig(32, 32, 4, 1, pack_gqa=False), BACKWARD_CONFIG),  # one head per program
    ],
    ids=["asymmetric-blocks", "default-configs", "packed-gqa", "unpacked-gqa"],
)
def test_other_configs(forward_config, backward_config):
    spec = SPECS[0]
    _run_and_check(spec, spec.make(), forward_config=forward_config, backward_config=backward_config)


@pytest.mark.parametrize("spec", PACKED_SPECS, ids=spec_id)
def test_forward_packed_gqa(spec):
    """The forward with the query heads of each GQA group packed into one program (G heads x
    16 positions per tile, each K/V tile serving the group): out and lse against the reference
    (causal, windows, q_len != k_len, lengths 0 and 1, rows without keys). The backward does not
    depend on the forward's packing."""
    case = spec.make()
    options = AttnOptions(spec.is_causal, spec.scale, *spec.window_size)
    out, lse = launcher.forward(
        case.q, case.k, case.v, BatchLayout(case.cu_seq_q, case.cu_seq_k), options, OptionalInputs(),
        config=packed_config(spec),
    )
    assert_matches_reference(case, out, lse, plain_dtype=torch.float32, **spec.ref_kwargs)


def test_pack_gqa_falls_back_where_it_cannot_pack():
    """pack_gqa packs groups that are powers of two >= 2 with at least 16 positions per tile;
    otherwise the launcher runs the unpacked kernel (PACK_GQA = 1)."""
    packed = ForwardConfig(64, 16, 4, 1, pack_gqa=True)
    assert [pack_gqa_group(packed, group) for group in (1, 2, 3, 4, 6, 8)] == [1, 2, 1, 4, 1, 1]
    assert pack_gqa_group(ForwardConfig(64, 16, 4, 1, pack_gqa=False), 4) == 1
    assert ForwardConfig(64, 16, 4, 1) == packed != ForwardConfig(64, 16, 4, 1, False)  # packing is the default
    # A group that cannot pack still gives the right answer (through the unpacked kernel).
    spec = AttnSpec((20, 1), (9, 1), heads_q=6, heads_kv=2, is_causal=True)
    case = spec.make()
    out, lse = launcher.forward(
        case.q, case.k, case.v, BatchLayout(case.cu_seq_q, case.cu_seq_k), AttnOptions(True), OptionalInputs(),
        config=packed,
    )
    assert_matches_reference(case, out, lse, plain_dtype=torch.float32, **spec.ref_kwargs)


@pytest.mark.parametrize("grad_lse", [None, "zeros"])
def test_single_key_sequences_have_exactly_zero_dq_dk(grad_lse):
    """Softmax over one key has zero gradient: dQ and dK of such sequences are exactly 0 (the
    computed dP - delta would leave fp32 noise that dK accumulates over all queries). Also when
    a zero gradient flows into lse, as AOTAutograd passes when a compiled function returns lse
    (the compiled backward then runs the HAS_GRAD_LSE kernel): found by fuzzing at D=192."""
    spec = AttnSpec((40, 3, 1), (1, 1, 1), heads_q=4, heads_kv=2, head_dim=24)
    case = spec.make()
    layout, options = BatchLayout(case.cu_seq_q, case.cu_seq_k), AttnOptions()
    qkv = (case.q, case.k, case.v)
    out, lse = launcher.forward(*qkv, layout, options, OptionalInputs(), config=FORWARD_CONFIG)
    grad_lse = torch.zeros_like(lse) if grad_lse == "zeros" else None
    dq, dk, dv = launcher.backward(
        torch.randn(out.shape), *qkv, out, lse, layout, options, OptionalInputs(grad_lse=grad_lse),
        config=BACKWARD_CONFIG,
    )
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    assert dv.abs().min() > 0
    _run_and_check(spec, case, with_grad_lse=grad_lse is not None)


def test_single_key_gradient_through_lse():
    """With one key per sequence, lse = scale * q.k, so dQ = scale * grad_lse * k and
    dK = scale * sum over rows and the GQA group of grad_lse * q: checked against that closed
    form, computed here in float64."""
    spec = AttnSpec((40, 3), (1, 1), heads_q=4, heads_kv=2, head_dim=24)
    case = spec.make()
    layout, options = BatchLayout(case.cu_seq_q, case.cu_seq_k), AttnOptions()
    qkv = (case.q.detach(), case.k.detach(), case.v.detach())
    out, lse = launcher.forward(*qkv, layout, options, OptionalInputs(), config=FORWARD_CONFIG)
    grad_lse = torch.randn(lse.shape)
    dq, dk, _ = launcher.backward(
        torch.randn(out.shape), *qkv, out, lse, layout, options, OptionalInputs(grad_lse=grad_lse),
        config=BACKWARD_CONFIG,
    )
    scale = 24 ** -0.5
    q, k, g = case.q.double(), case.k.double(), grad_lse.double().T  # g: (T_q, H_q)
    k_per_query = k.repeat_interleave(torch.tensor([40, 3]), dim=0).repeat_interleave(2, dim=1)
    expected_dq = scale * g[:, :, None] * k_per_query
    weighted = (g[:, :, None] * q).unflatten(1, (2, 2)).sum(2)  # sum the GQA group
    expected_dk = scale * torch.stack([weighted[:40].sum(0), weighted[40:].sum(0)])
    torch.testing.assert_close(dq.double(), expected_dq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dk.double(), expected_dk, rtol=1e-5, atol=1e-5)


def test_poison_fixture_catches_unwritten_outputs():
    """The check can fail: an lse row the kernel never writes (here: a token outside every
    sequence, which validated inputs never have) stays NaN and is rejected."""
    case = make_case([4, 5], heads_q=2)
    cu_seq_short = torch.tensor([0, 4, 8], dtype=torch.int32)  # token 8 belongs to no sequence
    _, lse = launcher.forward(
        case.q, case.k, case.v, BatchLayout(cu_seq_short, cu_seq_short), AttnOptions(), OptionalInputs(),
        config=FORWARD_CONFIG,
    )
    assert torch.isnan(lse[:, 8]).all() and not torch.isnan(lse[:, :8]).any()


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_non_positive_scale(scale):
    """The forward takes row maxima before the scale (varlen_logits): a negative scale must
    still pick each row's largest score, and a zero one gives uniform weights, also next to
    masked keys (causal, a window, q_len != k_len, a sequence without keys)."""
    spec = AttnSpec((9, 1, 4, 17), (5, 1, 0, 23), heads_q=4, heads_kv=2, is_causal=True, window_size=(6, 0), scale=scale)
    _run_and_check(spec, spec.make())
