"""Run the Inductor lowerings of both ops on a machine without a GPU, through Inductor's own
template rendering, and compile the kernels they render for sm_90 (H100/H200).

Inductor lowers our ops to templates only for CUDA tensors. Here the calls are CPU tensors with
eligibility told the device is served (and a stand-in for Triton's backend hash, which needs a
driver); ``autotune_select_algorithm`` is replaced by a recorder that keeps each choice and
stops the compile. So everything of the lowering up to the choice runs for real: the inputs by
name, the registry's optional inputs, constants, the template's Jinja through Inductor's hooks
(``def_kernel``, ``store_output``, ...), the autotune generators and, for the extern choices, the
output node bound to the private op's arguments. Then each rendered template kernel is compiled
for sm_90 with the signature Inductor gave it.

Run as a script with ``TRITON_INTERPRET`` unset (interpreted functions cannot be compiled). Prints
one JSON object per case; tests/test_lowering_sm90.py checks them.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.utils._triton
import triton
from triton.backends.compiler import GPUTarget
from torch._inductor.select_algorithm import TritonTemplateCaller
from triton.compiler import ASTSource

from varlen_compile import AuxRequest, config, eligibility, varlen_attn
from varlen_compile.lowering import backward, forward

_RECORDED: list[dict] = []


class _Recorded(Exception):
    """Stops the compile once the choices are recorded."""


def _record(name, choices, input_nodes, layout, input_gen_fns=None, **kwargs):
    entry = {"name": name, "inputs": [node.get_name() for node in input_nodes], "generators": sorted(input_gen_fns or {}),
             "templates": [], "externs": []}
    for choice in choices:
        if isinstance(choice, TritonTemplateCaller):
            entry["templates"].append(choice)
        else:
            entry["externs"].append(_extern_op(choice.output_node()))  # its arguments bound by name
    _RECORDED.append(entry)
    raise _Recorded(name)


_FORWARD_PLAN = forward.plan_template


def _extern_op(node) -> str:
    """The op an extern choice's output node calls (through the IR wrappers and outputs)."""
    seen = node
    for _ in range(8):
        kernel = getattr(seen, "op_overload", None)
        if kernel is not None:
            return str(kernel)
        seen = getattr(seen, "data", None) or getattr(seen, "inputs", [None])[0]
    raise AssertionError(f"no op in {node}")


def _patch() -> None:
    config.strict_lowering = True
    torch.utils._triton.triton_hash_with_backend = lambda: "no-driver"
    eligibility.triton_device_unsupported = lambda device, dtype, compiled: None
    for kernel in (eligibility.ATEN, eligibility.FA4):  # aten flash and FA4 "serve" these CPU calls
        eligibility._UNSUPPORTED[kernel] = lambda call: None
    eligibility.eager_kernel = lambda requested, call, deterministic=False: eligibility.REFERENCE  # eager: the reference
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    forward.autotune_select_algorithm = _record
    backward.autotune_select_algorithm = _record


def _batch(dtype=torch.bfloat16, heads_q=4, heads_kv=2, head_dim=64):
    cu = torch.tensor([0, 37, 37, 100], dtype=torch.int32)
    q = torch.randn(100, heads_q, head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(100, heads_kv, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, cu


CASES = {
    "plain-causal-gqa": dict(is_causal=True, enable_gqa=True),
    "features": dict(window_size=(17, 0), softcap=20.0, enable_gqa=True, sink=torch.randn(4),
                     alibi_slopes=torch.rand(4), seqused_k=torch.tensor([30, 0, 50], dtype=torch.int32)),
}


def run_case(name: str, kwargs: dict, side: str, kernel: str = "triton", grad_lse: bool = True) -> None:
    """One compile of the op (``side="backward"``: the forward runs eagerly, the backward is
    lowered; ``grad_lse``: the loss uses lse, so a gradient flows into it), recorded."""
    q, k, v, cu = _batch()
    if side == "forward":
        q, k, v = (x.detach() for x in (q, k, v))

    def attention(q, k, v):
        return varlen_attn(q, k, v, cu, cu, 63, 63, return_aux=AuxRequest(lse=True), **kwargs)

    torch._dynamo.reset()
    config.kernel = kernel
    forward.plan_template = _FORWARD_PLAN if side == "forward" else (lambda bound: "the forward runs eagerly here")
    compiled = torch.compile(attention, backend="inductor", fullgraph=True)
    case = f"{name}-{side}-{kernel}"
    try:
        out, lse = compiled(q, k, v)
        loss = out.float().sum() + (lse.sum() if grad_lse else 0)
        loss.backward()
        print(json.dumps({"case": case, "ok": False, "error": "the lowering recorded no choice"}))
        return
    except Exception as error:  # noqa: BLE001 - the recorder stops every compile
        if "_Recorded" not in f"{error!r} {error.__cause__!r}" and not _RECORDED:
            print(json.dumps({"case": case, "ok": False, "error": traceback.format_exc()[-3000:]}))
            return
    finally:
        config.kernel = "auto"
    entry = _RECORDED.pop()
    result = {"case": f"{name}-{side}-{kernel}", "ok": True, "inputs": entry["inputs"], "generators": entry["generators"],
              "externs": entry["externs"], "compiled": []}
    for choice in entry["templates"]:
        try:
            result["compiled"].append(_compile_for_sm90(choice))
        except Exception:  # noqa: BLE001 - reported to the test
            result.update(ok=False, error=traceback.format_exc()[-3000:])
    print(json.dumps(result), flush=True)


def _compile_for_sm90(choice) -> dict:
    """Compile the kernel of a rendered template choice for sm_90, with Inductor's signature."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rendered", choice.bmreq.module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    autotuner = getattr(module, choice.bmreq.kernel_name)
    meta = autotuner.triton_meta
    signature = {name: kind for name, kind in meta["signature"].items()}
    constants = dict(meta.get("constants", {}))
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(
        ASTSource(autotuner.fn, signature, constexprs=constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": choice.bmreq.num_warps, "num_stages": choice.bmreq.num_stages},
    )
    return {"kernel": choice.bmreq.kernel_name, "shared": compiled.metadata.shared}


def main() -> int:
    _patch()
    for name, kwargs in CASES.items():
        run_case(name, kwargs, "forward")
        run_case(name, kwargs, "backward")
    # The extern choices: FA4 with the optional inputs it takes (the sink to the forward only,
    # seqused_k both ways, the gradient into lse to the backward), aten flash (no gradient into lse).
    fa4_inputs = dict(is_causal=True, enable_gqa=True, sink=torch.randn(4), seqused_k=torch.tensor([30, 0, 50], dtype=torch.int32))
    run_case("sink-seqused", fa4_inputs, "forward", kernel="fa4")
    run_case("sink-seqused", fa4_inputs, "backward", kernel="fa4")
    run_case("plain-causal-gqa", CASES["plain-causal-gqa"], "forward", kernel="aten")
    run_case("plain-causal-gqa", CASES["plain-causal-gqa"], "backward", kernel="aten", grad_lse=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
