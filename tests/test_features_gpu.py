"""The scoring and key features on the GPU: compiled (our templates in the generated code, forward and
backward, the sink's gradient included) and eager (the standalone kernels), against the float64
reference under the error rule (docs/design.md §15); bf16 and fp32; GQA; lengths 0 and 1; q_len != k_len.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from factory import assert_meets_error_rule, make_cu_seq
from varlen_compile import AuxRequest, config, reference, varlen_attn
from varlen_compile.params import AttnOptions

pytestmark = [pytest.mark.gpu]

DEVICE = "cuda"
FWD_KERNEL = "varlen_fwd_tile("
BWD_KERNEL = "varlen_bwd_dkdv_tile("
LENGTHS_Q = [300, 0, 1, 77, 129, 5]
LENGTHS_K = [280, 3, 1, 77, 200, 0]

CASES = {
    "softcap-causal": dict(softcap=30.0, is_causal=True),
    "sink-window": dict(sink=True, window_size=(64, 0)),
    "alibi-causal": dict(alibi=True, is_causal=True),
    "mla-d192-dv128-causal": dict(head_dim=192, head_dim_v=128, is_causal=True),
    "seqused-causal": dict(seqused=True, is_causal=True),
    "all": dict(softcap=20.0, sink=True, alibi=True, seqused=True, head_dim=96, head_dim_v=64, window_size=(100, 0)),
}


def _inputs(head_dim=64, head_dim_v=None, dtype=torch.bfloat16, sink=False, alibi=False, seqused=False, **_):
    torch.manual_seed(0)
    head_dim_v = head_dim_v or head_dim
    tq, tk = sum(LENGTHS_Q), sum(LENGTHS_K)
    return {
        "q": torch.randn(tq, 8, head_dim, device=DEVICE, dtype=dtype),
        "k": torch.randn(tk, 2, head_dim, device=DEVICE, dtype=dtype),
        "v": torch.randn(tk, 2, head_dim_v, device=DEVICE, dtype=dtype),
        "cu_seq_q": make_cu_seq(LENGTHS_Q, DEVICE),
        "cu_seq_k": make_cu_seq(LENGTHS_K, DEVICE),
        "sink": torch.randn(8, device=DEVICE) if sink else None,
        "alibi_slopes": torch.rand(8, device=DEVICE) / 8 if alibi else None,
        "seqused_k": torch.tensor([200, 1, 0, 77, 150, 0], dtype=torch.int32, device=DEVICE) if seqused else None,
    }


def _call(inputs, q, k, v, sink, case):
    return varlen_attn(
        q, k, v, inputs["cu_seq_q"], inputs["cu_seq_k"], is_causal=case.get("is_causal", False),
        window_size=case.get("window_size", (-1, -1)), enable_gqa=True, return_aux=AuxRequest(lse=True),
        softcap=case.get("softcap", 0.0), sink=sink, alibi_slopes=inputs["alibi_slopes"], seqused_k=inputs["seqused_k"],
    )


def _reference(inputs, case, dtype, grad_out, grad_lse):
    leaves = [inputs[name].detach().to(dtype).requires_grad_() for name in ("q", "k", "v")]
    sink = inputs["sink"].detach().to(dtype).requires_grad_() if inputs["sink"] is not None else None
    alibi = inputs["alibi_slopes"].to(dtype) if inputs["alibi_slopes"] is not None else None
    options = AttnOptions(
        case.get("is_causal", False), None, *case.get("window_size", (-1, -1)), softcap=case.get("softcap", 0.0),
    )
    out, lse = reference.attention_forward(
        *leaves, inputs["cu_seq_q"], inputs["cu_seq_k"], options, sink=sink, alibi_slopes=alibi,
        seqused_k=inputs["seqused_k"], compute_dtype=dtype,
    )
    wrt = leaves + ([sink] if sink is not None else [])
    grads = torch.autograd.grad((out, lse), wrt, (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return (out, lse, *grads)


# Each feature alone in bf16, eager and compiled; fp32 (the slowest kernels to compile, 9-20 s a
# test on the H200) once, compiled, with every feature at the same time (the eager fp32 kernels
# are test_numerics_gpu.py's fp32 launcher case and the interpreter tests' business).
FEATURE_RUNS = [(name, torch.bfloat16, mode) for name in CASES for mode in ("eager", "compiled")]
FEATURE_RUNS.append(("all", torch.float32, "compiled"))


@pytest.mark.parametrize(
    ("name", "dtype", "mode"), FEATURE_RUNS,
    ids=[f"{name}-{'bf16' if dtype is torch.bfloat16 else 'fp32'}-{mode}" for name, dtype, mode in FEATURE_RUNS],
)
def test_feature_matches_reference(name, dtype, mode):
    case = CASES[name]
    inputs = _inputs(dtype=dtype, **case)
    leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
    sink = inputs["sink"].clone().requires_grad_() if inputs["sink"] is not None else None
    wrt = leaves + ([sink] if sink is not None else [])

    def step():
        out, lse = _call(inputs, *leaves, sink, case)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        return out, lse, torch.autograd.grad((out, lse), wrt, (grad_out, grad_lse)), grad_out, grad_lse

    if mode == "compiled":
        torch._dynamo.reset()
        call = torch.compile(_call, fullgraph=True)

        def step():  # noqa: F811
            out, lse = call(inputs, *leaves, sink, case)
            grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
            return out, lse, torch.autograd.grad((out, lse), wrt, (grad_out, grad_lse)), grad_out, grad_lse

        (out, lse, grads, grad_out, grad_lse), codes = run_and_get_code(step)
        source = "\n".join(codes)
        assert FWD_KERNEL in source and BWD_KERNEL in source, "the compiled graph does not run our templates"
    else:
        out, lse, grads, grad_out, grad_lse = step()
    oracle = _reference(inputs, case, torch.float64, grad_out, grad_lse)
    plain = _reference(inputs, case, dtype, grad_out, grad_lse)  # the budget: the input dtype
    for label, mine, exact, budget in zip(("out", "lse", "dq", "dk", "dv", "dsink"), (out, lse, *grads), oracle, plain):
        assert_meets_error_rule(mine.detach(), exact.detach(), budget.detach(), name=f"{name}/{label}")


@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_forward_compiled_matches_contiguous(page_size):
    """Pages of 16 keys are read with a block-table lookup per key; 64 and 256 are multiples
    of the d128 forward's 64-key tile, so each tile lies in one page. The static page size is a
    constexpr (PAGE_SIZE). A fresh Dynamo per page size: a recompile would make the page size
    dynamic (then PAGE_SIZE = 0, the runtime path)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    used = [300, 0, 1, 77, 129, 5]
    max_pages = -(-max(used) // page_size)
    num_pages = len(used) * max_pages
    block_table = torch.randperm(num_pages, device=DEVICE).view(len(used), max_pages).to(torch.int32)
    key_pages = torch.randn(num_pages, page_size, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    value_pages = torch.randn(num_pages, page_size, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    q = torch.randn(sum(LENGTHS_Q), 8, 128, device=DEVICE, dtype=torch.bfloat16)
    cu_seq_q, seqused = make_cu_seq(LENGTHS_Q, DEVICE), torch.tensor(used, dtype=torch.int32, device=DEVICE)

    def paged(q, k, v):
        return varlen_attn(q, k, v, cu_seq_q, None, is_causal=True, enable_gqa=True, seqused_k=seqused, block_table=block_table)

    out, codes = run_and_get_code(torch.compile(paged, fullgraph=True), q, key_pages, value_pages)
    source = "\n".join(codes)
    assert FWD_KERNEL in source
    assert f"PAGE_SIZE : tl.constexpr = {page_size}" in source
    rows = [torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in block_table[s].tolist()])[:n] for s, n in enumerate(used)]
    key = torch.cat([key_pages.flatten(0, 1)[r.to(DEVICE)] for r in rows])
    value = torch.cat([value_pages.flatten(0, 1)[r.to(DEVICE)] for r in rows])
    cu_seq_k = make_cu_seq(used, DEVICE)
    contiguous = torch.compile(lambda q, k, v: varlen_attn(q, k, v, cu_seq_q, cu_seq_k, is_causal=True, enable_gqa=True), fullgraph=True)
    torch.testing.assert_close(out, contiguous(q, key, value))
    # Eager: the standalone kernel, whose page size is a constexpr (a division per key by a
    # runtime page size was the cost of small pages there).
    with config.patch(kernel="triton"):  # not aten flash: the same tiles, so equal bits
        eager_contiguous = varlen_attn(q, key, value, cu_seq_q, cu_seq_k, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(paged(q, key_pages, value_pages), eager_contiguous, rtol=0, atol=0)
