"""Diagnostic: does our lowering work with Inductor's C++ wrapper and AOTInductor (CUDA)?

    TORCHDYNAMO_VERBOSE=1 python benchmarks/probe_cpp_wrapper.py [forward] [training] [aoti]
        [plain-training] [plain-aoti]

On the H100 (torch 2.11): forward OK; training and plain-training fail alike ("CudaKernelParamCache
not populated": the backward graph is compiled without store_cubin); aoti and plain-aoti both
crash the process (segmentation fault) when the package is loaded and run. Neither is ours.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch

from varlen_compile import varlen_attn

torch.manual_seed(0)
lengths = [37, 0, 128, 1, 300]
cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def attention(q, k, v):
    return varlen_attn(q, k, v, cu, cu, is_causal=True)


with torch.no_grad():
    expected = attention(q, k, v)


def report(label, fn):
    try:
        got = fn()
        print(f"{label}: OK, max abs diff vs eager {(got.float() - expected.float()).abs().max().item():.3e}", flush=True)
    except Exception:
        print(f"{label}: FAILED\n" + traceback.format_exc()[-3000:], flush=True)


def cpp_forward():
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(attention, fullgraph=True, options={"cpp_wrapper": True})(q, k, v)


def cpp_training():
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(attention, fullgraph=True, options={"cpp_wrapper": True})(*leaves)
    out.backward(torch.ones_like(out))
    return out.detach()


class Module(torch.nn.Module):
    def forward(self, q, k, v, cu_seq):
        return varlen_attn(q, k, v, cu_seq, cu_seq, is_causal=True)


def aoti():
    program = torch.export.export(Module(), (q, k, v, cu))
    path = os.path.join(tempfile.mkdtemp(), "varlen.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    loaded = torch._inductor.aoti_load_package(path)
    return loaded(q, k, v, cu)


def plain(t):
    """A graph without our ops (softmax: a reduction forward and backward), for triage."""
    return torch.softmax(t.float(), -1).to(t.dtype) * 2


def plain_training():
    torch._dynamo.reset()
    leaf = q.clone().requires_grad_()
    out = torch.compile(plain, fullgraph=True, options={"cpp_wrapper": True})(leaf)
    out.backward(torch.ones_like(out))
    with torch.no_grad():
        return expected + (out - plain(q)).abs().max()


class PlainModule(torch.nn.Module):
    def forward(self, t):
        return plain(t)


def plain_aoti():
    path = os.path.join(tempfile.mkdtemp(), "plain.pt2")
    torch._inductor.aoti_compile_and_package(torch.export.export(PlainModule(), (q,)), package_path=path)
    got = torch._inductor.aoti_load_package(path)(q)
    return expected + (got - plain(q)).abs().max()


if __name__ == "__main__":
    import sys

    probes = {"forward": ("cpp_wrapper forward", cpp_forward),
              "training": ("cpp_wrapper forward+backward", cpp_training),
              "aoti": ("AOTInductor package", aoti),
              # the same without our ops: is a failure ours or torch's?
              "plain-training": ("cpp_wrapper forward+backward, softmax only", plain_training),
              "plain-aoti": ("AOTInductor package, softmax only", plain_aoti)}
    for name in sys.argv[1:] or list(probes):
        report(*probes[name])
