"""GPU tests: eager backends, the compiled (lowered) forward and backward, training.

Run on a CUDA machine: ``python -m pytest -q -m gpu tests/``. Skipped without CUDA.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import varlen_compile
from varlen_compile import AuxRequest, varlen_attn
from varlen_compile.lowering import launcher
from varlen_compile.params import AttnOptions, BatchLayout, OptionalInputs

from factory import VarlenCase, assert_matches_reference, assert_meets_error_rule, make_case, make_cu_seq, reference_outputs
from modules import AttentionBlock, CompiledOpLoggingMode

pytestmark = [pytest.mark.gpu]

DEVICE = "cuda"
# Inductor names template kernels triton_tem_fused_*; the template bodies call these helpers.
FWD_KERNEL = "varlen_fwd_tile("
BWD_KERNEL = "varlen_bwd_dkdv_tile("
ATTN_OPS = (
    "varlen_compile.varlen_attn.default",
    "varlen_compile.varlen_attn_backward.default",
    "aten._flash_attention_forward.default",
    "aten._flash_attention_backward.default",
)


def gpu_case(
    lengths_q, lengths_k=None, *, heads_q=4, heads_kv=None, head_dim=64,
    dtype=torch.bfloat16, fused_qkv=False, requires_grad=True,
) -> VarlenCase:
    """Random packed inputs on the GPU (``factory.make_case``; ``fused_qkv``: strided views of
    one projection, GQA included)."""
    return make_case(
        lengths_q, lengths_k, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype,
        device=DEVICE, fused_qkv=fused_qkv, requires_grad=requires_grad,
    )


def check_forward_backward(case: VarlenCase, out, lse, grads, grad_out, **attn_kwargs) -> None:
    """Output, lse and gradients meet the error rule against float64 (docs/design.md §15)."""
    ref_out, ref_lse, ref_grads = reference_outputs(case, torch.float64, grad_out=grad_out, **attn_kwargs)
    plain_out, plain_lse, plain_grads = reference_outputs(case, case.q.dtype, grad_out=grad_out, **attn_kwargs)
    assert_meets_error_rule(out, ref_out, plain_out, name="out")
    assert_meets_error_rule(lse, ref_lse, plain_lse, name="lse")
    for name, grad, ref, plain in zip("qkv", grads, ref_grads, plain_grads):
        assert_meets_error_rule(grad, ref, plain, name=f"d{name}")


def run_attention(fn, case: VarlenCase, grad_out, **kwargs):
    inputs = [x.detach().requires_grad_() for x in (case.q, case.k, case.v)]
    out, lse = fn(*inputs, case.cu_seq_q, case.cu_seq_k, return_aux=AuxRequest(lse=True), **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, lse, grads


# ----------------------------------------------------------------------------- eager


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_eager_bf16_aten_path_matches_reference(causal):
    case = gpu_case([130, 0, 1, 257, 64], [90, 3, 1, 257, 200], heads_q=6, heads_kv=2, head_dim=64)
    grad_out = torch.randn_like(case.q)
    out, lse, grads = run_attention(varlen_attn, case, grad_out, is_causal=causal, enable_gqa=True)
    check_forward_backward(case, out, lse, grads, grad_out, is_causal=causal)


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_eager_backward_reads_a_strided_lse(kernel):
    """The backward op given ``lse`` as a column slice of a wider ``(H, 2T)`` buffer (the rest NaN),
    as context parallelism passes each chunk's rows: the gradients meet the error rule. aten flash
    (the auto path here) read such an lse as contiguous and returned dQ off by 1e3."""
    from varlen_compile.ops import call_backward, call_forward

    case = gpu_case([300, 1, 0, 517], heads_q=4, head_dim=128)
    grad_out = torch.randn_like(case.q)
    layout, options = BatchLayout(case.cu_seq_q, case.cu_seq_k, case.max_q, case.max_k), AttnOptions(True)
    qkv = (case.q.detach(), case.k.detach(), case.v.detach())
    out, lse = call_forward(*qkv, layout, options, OptionalInputs(), kernel)
    wide = torch.full((lse.shape[0], 2 * lse.shape[1]), float("nan"), device=DEVICE)
    wide[:, lse.shape[1]:] = lse
    grads = call_backward(grad_out, *qkv, out, wide[:, lse.shape[1]:], layout, options, OptionalInputs(), kernel=kernel)
    check_forward_backward(case, out, lse, grads, grad_out, is_causal=True)


@pytest.mark.parametrize(
    "dtype,head_dim,window",
    [  # fp32 once (its kernels take 11 s to compile; test_features_gpu.py has fp32 compiled)
        (torch.bfloat16, 96, (-1, -1)),
        (torch.float16, 128, (32, 8)),
        (torch.bfloat16, 256, (-1, 0)),
        (torch.float32, 40, (16, -1)),
    ],
    ids=["bf16-D96", "fp16-D128-window", "bf16-D256-causal", "fp32-D40-left"],
)
def test_eager_triton_launcher_matches_reference(dtype, head_dim, window):
    case = gpu_case([100, 0, 1, 300], [77, 5, 1, 300], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype)
    grad_out = torch.randn_like(case.q)
    scale = 0.7 / head_dim**0.5

    layout, options = BatchLayout(case.cu_seq_q, case.cu_seq_k), AttnOptions(False, scale, *window)
    qkv = (case.q.detach(), case.k.detach(), case.v.detach())
    out, lse = launcher.forward(*qkv, layout, options, OptionalInputs())
    dq, dk, dv = launcher.backward(grad_out, *qkv, out, lse, layout, options, OptionalInputs())
    check_forward_backward(case, out, lse, (dq, dk, dv), grad_out, scale=scale, window_size=window)


@pytest.mark.parametrize(
    "dtype,head_dim,heads,window",
    [
        (torch.bfloat16, 128, (8, 2), (-1, 0)),
        (torch.float16, 64, (4, 2), (32, 8)),
        (torch.bfloat16, 128, (16, 2), (-1, -1)),
    ],
    ids=["bf16-D128-G4-causal", "fp16-D64-G2-window", "bf16-D128-G8-full"],
)
def test_eager_packed_gqa_forward_matches_reference(dtype, head_dim, heads, window):
    """The GQA-packed forward (ForwardConfig.pack_gqa, the default) at the default tiles: out and
    lse meet the error rule, and match the unpacked forward within a few bf16 ulps (a row's key
    blocks split into masked and unmasked ones elsewhere, so fp32 rescaling rounds differently)."""
    from varlen_compile.lowering.configs import default_forward_config, pack_gqa_group

    case = gpu_case([100, 0, 1, 300], [77, 5, 1, 300], heads_q=heads[0], heads_kv=heads[1], head_dim=head_dim, dtype=dtype)
    packed = default_forward_config(head_dim, dtype)
    unpacked = dataclasses.replace(packed, pack_gqa=False)
    assert pack_gqa_group(packed, heads[0] // heads[1]) == heads[0] // heads[1]
    layout, options = BatchLayout(case.cu_seq_q, case.cu_seq_k), AttnOptions(False, None, *window)
    qkv = (case.q.detach(), case.k.detach(), case.v.detach())
    out, lse = launcher.forward(*qkv, layout, options, OptionalInputs(), config=packed)
    ref_out, ref_lse, _ = reference_outputs(case, torch.float64, window_size=window)
    plain_out, plain_lse, _ = reference_outputs(case, dtype, window_size=window)
    assert_meets_error_rule(out, ref_out, plain_out, name="out")
    assert_meets_error_rule(lse, ref_lse, plain_lse, name="lse")
    unpacked_out, unpacked_lse = launcher.forward(*qkv, layout, options, OptionalInputs(), config=unpacked)
    torch.testing.assert_close(out, unpacked_out, rtol=1.6e-2, atol=2e-3)
    torch.testing.assert_close(lse, unpacked_lse, rtol=1e-5, atol=1e-5)


def test_eager_grad_through_lse_uses_triton_and_is_right():
    case = gpu_case([65, 130, 0], heads_q=4, head_dim=64)
    inputs = [x.detach().requires_grad_() for x in (case.q, case.k, case.v)]
    out, lse = varlen_attn(*inputs, case.cu_seq_q, case.cu_seq_k, is_causal=True, return_aux=AuxRequest(lse=True))
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse))

    def reference_grads(dtype):
        ref_inputs = [x.detach().to(dtype).requires_grad_() for x in (case.q, case.k, case.v)]
        ref_out, ref_lse = varlen_compile.reference.attention_forward(
            *ref_inputs, case.cu_seq_q, case.cu_seq_k, is_causal=True, compute_dtype=dtype
        )
        return torch.autograd.grad((ref_out, ref_lse), ref_inputs, (grad_out.to(dtype), grad_lse.to(ref_lse.dtype)))

    for grad, ref, plain in zip(grads, reference_grads(torch.float64), reference_grads(torch.bfloat16)):
        assert_meets_error_rule(grad, ref, plain, name="grad through lse")


# ----------------------------------------------------------------------------- compiled

# Each combination covers the compiled forward and backward; every factor appears both ways.
COMPILED_MATRIX = [
    # causal, head_dim, gqa, layout
    (False, 64, False, "fused"),
    (True, 64, True, "fused"),
    (False, 128, True, "separate"),
    (True, 128, False, "separate"),
    (True, 64, False, "separate"),
    (False, 128, False, "fused"),
    (True, 128, True, "fused"),
    (False, 64, True, "separate"),
]


def _matrix_id(params):
    causal, head_dim, gqa, layout = params
    return f"{'causal' if causal else 'full'}-D{head_dim}-{'gqa' if gqa else 'mha'}-{layout}"


@pytest.mark.parametrize("params", COMPILED_MATRIX, ids=[_matrix_id(p) for p in COMPILED_MATRIX])
def test_compiled_matches_reference_and_runs_templates(params):
    causal, head_dim, gqa, layout = params
    heads_q, heads_kv = (8, 2) if gqa else (4, 4)
    if layout == "fused":
        case = gpu_case([200, 0, 1, 77, 129], heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, fused_qkv=True)
    else:  # q_len != k_len, both ways, plus empty and single-token sequences
        case = gpu_case([200, 0, 1, 77, 129, 3], [150, 4, 1, 0, 260, 1], heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim)
    grad_out = torch.randn(case.q.shape, device=DEVICE, dtype=case.q.dtype)

    def attention(q, k, v, cu_q, cu_k, **kwargs):  # max_q/max_k left None: no hints
        return varlen_attn(q, k, v, cu_q, cu_k, is_causal=causal, enable_gqa=gqa, **kwargs)

    compiled = torch.compile(attention, fullgraph=True)
    log = CompiledOpLoggingMode()
    (out, lse, grads), codes = run_and_get_code(run_attention, compiled, case, grad_out)
    source = "\n".join(codes)
    assert FWD_KERNEL in source and BWD_KERNEL in source
    # GQA (8 query heads per 2 kv heads) runs the forward packed: 4 heads per program.
    assert re.search(rf"PACK_GQA\s*:\s*tl.constexpr\s*=\s*{4 if gqa else 1}\b", source), "forward packing"
    with log:
        run_attention(compiled, case, grad_out)
    assert not set(log.ops) & set(ATTN_OPS), f"attention ops ran at run time: {set(log.ops) & set(ATTN_OPS)}"
    check_forward_backward(case, out, lse, grads, grad_out, is_causal=causal)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa-packed"])
def test_compiled_output_gate_epilogue(gqa):
    """A pointwise op on the output (a sigmoid output gate, as in gated attention), which Inductor
    may fuse into the forward template's store: with packed GQA each tile row stores to its own
    head, so the epilogue must index by row. Output against the float64 reference, gated."""
    heads_q, heads_kv = (8, 2) if gqa else (4, 4)
    case = gpu_case([200, 0, 1, 77, 129], heads_q=heads_q, heads_kv=heads_kv, head_dim=64, requires_grad=False)
    gate = torch.randn(case.q.shape[0], heads_q, 64, device=DEVICE, dtype=case.q.dtype)

    def gated(q, k, v, cu_q, cu_k, gate):
        return varlen_attn(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=gqa) * torch.sigmoid(gate)

    out, codes = run_and_get_code(torch.compile(gated, fullgraph=True), case.q, case.k, case.v, case.cu_seq_q,
                                  case.cu_seq_k, gate)
    source = "\n".join(codes)
    assert FWD_KERNEL in source
    assert re.search(rf"PACK_GQA\s*:\s*tl.constexpr\s*=\s*{4 if gqa else 1}\b", source), "forward packing"
    oracle = reference_outputs(case, torch.float64, is_causal=True)[0] * torch.sigmoid(gate.double())
    plain = reference_outputs(case, case.q.dtype, is_causal=True)[0] * torch.sigmoid(gate)
    assert_meets_error_rule(out, oracle, plain, name="gated out")


def test_compiled_window_and_scale():
    case = gpu_case([300, 17, 0, 129], [280, 40, 3, 129], heads_q=4, head_dim=64)
    grad_out = torch.randn(case.q.shape, device=DEVICE, dtype=case.q.dtype)
    compiled = torch.compile(varlen_attn, fullgraph=True)
    out, lse, grads = run_attention(compiled, case, grad_out, window_size=(48, 16), scale=0.1)
    check_forward_backward(case, out, lse, grads, grad_out, window_size=(48, 16), scale=0.1)


def test_compiled_skewed_batch_grid_is_bounded():
    """One long sequence plus many short ones: the launch grid follows total tokens."""
    lengths = [2048] + [64] * 64
    case = gpu_case(lengths, heads_q=2, head_dim=64, requires_grad=False)
    compiled = torch.compile(lambda *a: varlen_attn(*a, is_causal=True), fullgraph=True)
    out, codes = run_and_get_code(compiled, *case.inputs())
    ref_out, _, _ = reference_outputs(case, torch.float64, is_causal=True)
    plain_out, _, _ = reference_outputs(case, case.q.dtype, is_causal=True)
    assert_meets_error_rule(out, ref_out, plain_out, name="skewed")
    # The wrapper launches the template as kernel.run(*buffers, grid_x, grid_y, grid_z, stream=...).
    launches = re.findall(r"triton_tem_fused_\w+\.run\(.*?(\d+), (\d+), (\d+), stream=", "\n".join(codes))
    assert launches, "no template launch found in the compiled code"
    total, num_seqs = sum(lengths), len(lengths)
    for grid_x, grid_y, _ in launches:
        # cdiv(T, BLOCK_M) + N programs per head, whatever BLOCK_M (16..128) the config uses
        assert int(grid_x) <= -(-total // 16) + num_seqs
        # a max_len * N grid would need at least (2048 / 128) * 65 = 1040 programs per head
        assert int(grid_x) < (max(lengths) // 128) * num_seqs // 4
        assert int(grid_y) == 2


def test_compiled_fp32_and_odd_head_dim_use_template():
    case = gpu_case([33, 0, 70], heads_q=3, head_dim=40, dtype=torch.float32)
    grad_out = torch.randn(case.q.shape, device=DEVICE, dtype=case.q.dtype)
    compiled = torch.compile(lambda *a, **k: varlen_attn(*a, is_causal=True, **k), fullgraph=True)
    (out, lse, grads), codes = run_and_get_code(run_attention, compiled, case, grad_out)
    assert FWD_KERNEL in "\n".join(codes)
    check_forward_backward(case, out, lse, grads, grad_out, is_causal=True)


def test_max_autotune_offers_aten_and_stays_correct():
    case = gpu_case([256, 128, 64], heads_q=4, head_dim=64)
    grad_out = torch.randn(case.q.shape, device=DEVICE, dtype=case.q.dtype)

    def attention(q, k, v, cu_q, cu_k, **kwargs):
        return varlen_attn(q, k, v, cu_q, cu_k, 256, 256, True, **kwargs)

    compiled = torch.compile(attention, fullgraph=True, mode="max-autotune-no-cudagraphs")
    out, lse, grads = run_attention(compiled, case, grad_out)
    check_forward_backward(case, out, lse, grads, grad_out, is_causal=True)


def test_aten_extern_choice_output_path(monkeypatch):
    """With the template configs removed, the aten extern choice builds the graph's node."""
    from varlen_compile.lowering import backward, forward

    monkeypatch.setattr(forward, "_configs", lambda *a: [])
    monkeypatch.setattr(backward, "_configs", lambda *a: [])
    monkeypatch.setattr(torch._inductor.config, "max_autotune", True)
    torch._dynamo.reset()
    case = gpu_case([100, 60], heads_q=4, head_dim=64)
    grad_out = torch.randn(case.q.shape, device=DEVICE, dtype=case.q.dtype)
    # lse is not returned: no gradient flows into it, so aten's backward is eligible too.
    compiled = torch.compile(lambda q, k, v: varlen_attn(q, k, v, case.cu_seq_q, case.cu_seq_q, 100, 100, True), fullgraph=True)
    inputs = [x.detach().requires_grad_() for x in (case.q, case.k, case.v)]

    def step():
        out = compiled(*inputs)
        return out, torch.autograd.grad(out, inputs, grad_out)

    (out, grads), codes = run_and_get_code(step)
    source = "\n".join(codes)
    assert "_flash_forward_into" in source and "_flash_backward_into" in source
    assert FWD_KERNEL not in source and BWD_KERNEL not in source
    ref_out, _, ref_grads = reference_outputs(case, torch.float64, grad_out=grad_out, is_causal=True)
    plain_out, _, plain_grads = reference_outputs(case, case.q.dtype, grad_out=grad_out, is_causal=True)
    assert_meets_error_rule(out, ref_out, plain_out, name="out")
    for grad, ref, plain in zip(grads, ref_grads, plain_grads):
        assert_meets_error_rule(grad, ref, plain, name="grad")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- training


def _train(model, batches, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        x, target, cu_seq = batches[step % len(batches)]
        loss = torch.nn.functional.mse_loss(model(x, cu_seq).float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_training_matches_eager_aten():
    heads, head_dim = 4, 64
    width = heads * head_dim
    batches = []
    for _ in range(4):
        lengths = torch.randint(1, 400, (int(torch.randint(2, 9, ())),)).tolist()
        x = torch.randn(sum(lengths), width, device=DEVICE, dtype=torch.bfloat16)
        batches.append((x, torch.randn_like(x), make_cu_seq(lengths, DEVICE)))
    eager_model = AttentionBlock(heads, head_dim, is_causal=True).to(DEVICE, torch.bfloat16)
    compiled_model = copy.deepcopy(eager_model)
    eager_losses = _train(eager_model, batches, 20)
    log = CompiledOpLoggingMode()
    with log:
        compiled_losses = _train(torch.compile(compiled_model, fullgraph=True), batches, 20)
    assert not set(log.ops) & set(ATTN_OPS), "compiled training ran attention ops, not templates"
    eager_t, compiled_t = torch.tensor(eager_losses), torch.tensor(compiled_losses)
    assert compiled_t[-4:].mean() < compiled_t[:4].mean(), f"loss did not go down: {compiled_losses}"
    # bf16 noise: the two runs use different kernels, so the curves drift apart slowly.
    assert torch.allclose(compiled_t, eager_t, rtol=0.05, atol=0.01), (eager_losses, compiled_losses)


@pytest.mark.parametrize("window", [(2**31 - 1, 2**31 - 1), (2**31 - 2, 2**31 - 2), (2**31 - 2, 5), (3, 2**31 - 2),
                                    (10**12, 0)], ids=["int32-max", "int32-max-minus-1", "left-huge", "right-huge",
                                                       "past-int32"])
def test_window_sides_near_int32_limit_match_reference(window):
    """A diagonal minus the left side, or plus the right one, once wrapped around int32 in the
    kernels (silently wrong rows); the standalone kernels, and the compiled template once, meet
    the error rule with queries longer and shorter than keys."""
    for lengths_q, lengths_k in (([300, 90, 5], [100, 7, 0]), ([4, 23, 1], [300, 90, 5])):
        case = gpu_case(lengths_q, lengths_k, heads_q=4, heads_kv=2, requires_grad=False)
        options = AttnOptions(window_left=window[0], window_right=window[1])
        layout = BatchLayout(case.cu_seq_q, case.cu_seq_k)
        out, lse = launcher.forward(case.q, case.k, case.v, layout, options, OptionalInputs())
        assert_matches_reference(case, out, lse, window_size=window)
    if window == (2**31 - 2, 2**31 - 2):
        compiled = torch.compile(
            lambda q, k, v: varlen_attn(q, k, v, case.cu_seq_q, case.cu_seq_k, window_size=window, enable_gqa=True),
            fullgraph=True,
        )
        with varlen_compile.config.patch(kernel="triton"):
            out = compiled(case.q, case.k, case.v)
        assert_matches_reference(case, out, window_size=window)
