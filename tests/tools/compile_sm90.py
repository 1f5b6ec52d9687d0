"""Compile the standalone kernels for sm_90 (H100/H200) on any machine, GPU or not.

Run as a script (``python tests/tools/compile_sm90.py``) with ``TRITON_INTERPRET`` unset: the
interpreter replaces ``@triton.jit`` functions, and interpreted functions cannot be compiled.
Prints one JSON object per case: ``{"case": ..., "ok": bool, "shared": bytes, "error": str}``.
tests/test_kernels_sm90.py runs it and checks every line.
"""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/
from benchmarks.sweep import resource_usage  # noqa: E402  (registers and spills from the cubin)
from varlen_compile.lowering import launcher  # noqa: E402
from varlen_compile.lowering.configs import (
    backward_constexprs,
    default_backward_config,
    default_forward_config,
    kernel_constexprs,
)
from varlen_compile.params import OPTIONAL_INPUTS, AttnOptions, OptionalInputs

_DUMMY = torch.empty(1)

FEATURES = {
    "plain-causal": (AttnOptions(is_causal=True), OptionalInputs()),
    "softcap-sink-alibi-window": (
        AttnOptions(window_left=64, softcap=30.0), OptionalInputs(sink=_DUMMY, alibi_slopes=_DUMMY, seqused_k=_DUMMY),
    ),
    "paged-seqused-causal-softcap": (
        AttnOptions(is_causal=True, softcap=50.0), OptionalInputs(seqused_k=_DUMMY, block_table=_DUMMY),
    ),
}
# (head dim, value head dim) per feature set: the plain kernels at the common 128 and 64, the
# features with MLA's 192/128 (the largest tiles) and at 128.
HEAD_DIMS = {
    "plain-causal": ((128, 128), (64, 64)),
    "softcap-sink-alibi-window": ((192, 128), (128, 128)),
    "paged-seqused-causal-softcap": ((128, 128),),
}


# Pointer types by kernel parameter name: the fixed int32 / float32 ones, and the optional
# inputs as the registry declares them.
_POINTER_TYPES = {
    "CU_Q": "*i32", "CU_K": "*i32", "LSE": "*fp32", "DELTA": "*fp32",
    **{spec.kernel_name: "*fp32" if spec.dtype.is_floating_point else "*i32" for spec in OPTIONAL_INPUTS},
}


def _signature(kernel, constexprs: dict, dtype: str) -> dict[str, str]:
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTER_TYPES:
            signature[name] = _POINTER_TYPES[name]
        elif name.isupper():
            signature[name] = f"*{dtype}"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def cases():
    kernels = launcher._kernels()
    for feature, (options, optional) in FEATURES.items():
        paged = optional.paged
        for head_dim, head_dim_v in HEAD_DIMS[feature]:
            config = default_forward_config(max(head_dim, head_dim_v), torch.bfloat16)
            constexprs = dict(
                kernel_constexprs(options, optional, head_dim, head_dim_v, torch.bfloat16),
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, PACK_GQA=1,
            )
            yield f"fwd-{feature}-d{head_dim}v{head_dim_v}", kernels.varlen_fwd_kernel, constexprs, config
            # The GQA-packed forward (ForwardConfig.pack_gqa): 4 query heads per program.
            yield (f"fwd-{feature}-d{head_dim}v{head_dim_v}-pack4", kernels.varlen_fwd_kernel,
                   dict(constexprs, PACK_GQA=4), config)
            if paged:  # a static page size: a multiple of the key tile (one block-table read per
                # tile), or a divisor (a read per key without a division); the case above: unknown
                yield (f"fwd-{feature}-d{head_dim}v{head_dim_v}-page-tile", kernels.varlen_fwd_kernel,
                       dict(constexprs, PAGE_SIZE=4 * config.block_n), config)
                yield (f"fwd-{feature}-d{head_dim}v{head_dim_v}-page-16", kernels.varlen_fwd_kernel,
                       dict(constexprs, PAGE_SIZE=16), config)
        if paged:
            continue
        for head_dim, head_dim_v in HEAD_DIMS[feature][:1]:
            for grad_lse in (False, True):
                config = default_backward_config(max(head_dim, head_dim_v), torch.bfloat16, 2)
                backward_optional = OptionalInputs(optional, grad_lse=_DUMMY if grad_lse else None)
                constexprs = backward_constexprs(options, backward_optional, head_dim, head_dim_v, torch.bfloat16)
                constexprs.update(
                    BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1,
                    BLOCK_M2=config.block_m2, BLOCK_N2=config.block_n2,
                )
                name = f"bwd-{feature}-d{head_dim}v{head_dim_v}{'-grad-lse' if grad_lse else ''}"
                yield name, kernels.varlen_bwd_kernel, constexprs, config


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for name, kernel, constexprs, config in cases():
        try:
            compiled = triton.compile(
                ASTSource(kernel, _signature(kernel, constexprs, "bf16"), constexprs=constexprs),
                target=target, options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
            result = {"case": name, "ok": True, "shared": compiled.metadata.shared, "error": ""}
        except Exception:  # noqa: BLE001 - reported to the test
            result = {"case": name, "ok": False, "shared": 0, "error": traceback.format_exc(limit=3)[-2000:]}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__" and not {"--templates", "--static-vs-dynamic"} & set(sys.argv):
    sys.exit(main())


# ----------------------------------------------------------------------------- Inductor templates
#
# The templates are Jinja around the same math. Inductor fills in def_kernel, size, stride and
# store_output; here small stand-ins do (static shapes, contiguous strides, a plain tl.store for
# store_output), which is enough to check that every feature branch of the Jinja renders to
# valid Triton and compiles for sm_90.

def _contiguous_strides(shape):
    strides, running = [1], 1
    for size in reversed(shape[1:]):
        running *= size
        strides.append(running)
    return tuple(reversed(strides))


def render_template(entry: str, shapes: dict, output_shape: tuple, constants: dict,
                    size_args: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """(source, argument names) of the template ``entry`` rendered with stand-ins. A size given
    as a name (listed in ``size_args``) is rendered as Inductor renders a dynamic size: a
    kernel argument (int32) after the pointers."""
    import jinja2

    from varlen_compile.lowering._sources import template_source

    names_seen: list[str] = []
    defines = "".join(f"    {name} : tl.constexpr = {value}\n" for name, value in constants.items())
    defines += "    INDEX_DTYPE : tl.constexpr = tl.int32\n"

    def def_kernel(*names):
        names_seen.extend(names)
        names_seen.append("OUT_PTR")
        names_seen.extend(size_args)
        return f"@triton.jit\ndef template_kernel({', '.join(names_seen)}):\n{defines}"

    def size(name, index):
        return str(shapes[name][index])

    def stride(name, index=None):
        strides = _contiguous_strides(shapes[name])
        return str(strides[index]) if index is not None else ", ".join(map(str, strides))

    def store_output(indices, value, mask, indent_width=4, val_shape=None):
        strides = _contiguous_strides(output_shape)
        offset = " + ".join(f"{index} * {s}" for index, s in zip(indices, strides))
        return f"tl.store(OUT_PTR + {offset}, {value}.to(OUT_PTR.dtype.element_ty), {mask})"

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    source = template_source(entry)
    text = env.from_string(source).render(
        def_kernel=def_kernel, size=size, stride=stride, store_output=store_output, **constants
    )
    return "import triton\nimport triton.language as tl\n" + text, names_seen


def template_cases():
    """(name, source, names, constants) for the forward and backward templates."""
    from varlen_compile.lowering.common import template_constants

    total_q, total_k, heads_q, heads_kv, num_seqs = 100, 80, 4, 2, 5
    for feature, (options, optional) in FEATURES.items():
        paged = optional.paged
        for head_dim, head_dim_v in HEAD_DIMS[feature][:1]:
            constants = template_constants(options, optional, head_dim, head_dim_v, torch.bfloat16)
            config = default_forward_config(max(head_dim, head_dim_v), torch.bfloat16)
            shapes = {
                "Q": (total_q, heads_q, head_dim), "CU_Q": (num_seqs + 1,), "CU_K": (num_seqs + 1,),
                "LSE": (heads_q, total_q), "SEQUSED_K": (num_seqs,), "BLOCK_TABLE": (num_seqs, 8),
                "SINK": (heads_q,), "ALIBI": (heads_q,),
                "K": (20, 16, heads_kv, head_dim) if paged else (total_k, heads_kv, head_dim),
                "V": (20, 16, heads_kv, head_dim_v) if paged else (total_k, heads_kv, head_dim_v),
            }
            fwd = dict(constants, BLOCK_M=config.block_m, BLOCK_N=config.block_n, PACK_GQA=1)
            source, names = render_template("varlen_fwd", shapes, (total_q, heads_q, head_dim_v), fwd)
            yield f"tpl-fwd-{feature}-d{head_dim}v{head_dim_v}", source, names, config
            # GQA packing (the group of 2 query heads per kv head in one program).
            source, names = render_template("varlen_fwd", shapes, (total_q, heads_q, head_dim_v), dict(fwd, PACK_GQA=2))
            yield f"tpl-fwd-{feature}-d{head_dim}v{head_dim_v}-pack2", source, names, config
            if paged:  # the static page size (16, as K's shape says) the lowering passes
                source, names = render_template("varlen_fwd", shapes, (total_q, heads_q, head_dim_v), dict(fwd, PAGE_SIZE=16))
                yield f"tpl-fwd-{feature}-d{head_dim}v{head_dim_v}-page-16", source, names, config
                continue
            for grad_lse in (False, True):
                bwd_config = default_backward_config(max(head_dim, head_dim_v), torch.bfloat16, 2)
                bwd_constants = template_constants(
                    options, OptionalInputs(optional, grad_lse=_DUMMY if grad_lse else None), head_dim, head_dim_v,
                    torch.bfloat16, side="backward",
                )
                bwd = dict(bwd_constants, BLOCK_M1=bwd_config.block_m1, BLOCK_N1=bwd_config.block_n1,
                           BLOCK_M2=bwd_config.block_m2, BLOCK_N2=bwd_config.block_n2)
                bwd_shapes = dict(
                    shapes, DO=(total_q, heads_q, head_dim_v), FWD_OUT=(total_q, heads_q, head_dim_v),
                    DELTA=(heads_q, total_q), GRAD_LSE=(heads_q, total_q), DQ=shapes["Q"], DV=shapes["V"],
                )
                source, names = render_template("varlen_bwd", bwd_shapes, shapes["K"], bwd)
                suffix = "-grad-lse" if grad_lse else ""
                yield f"tpl-bwd-{feature}-d{head_dim}v{head_dim_v}{suffix}", source, names, bwd_config


def compile_template(source: str, names: list[str], config, target, aligned: bool = False) -> object:
    """``aligned``: every argument divisible by 16, as Triton specializes the launches Inductor
    makes on 16-byte aligned tensors and sizes (so it compiles the code the GPU runs)."""
    import hashlib
    import linecache
    import types

    filename = f"<template-{hashlib.sha256(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("rendered_template")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    kernel = module.template_kernel
    signature = {name: "i32" if name.islower() else _POINTER_TYPES.get(name, "*bf16") for name in names}
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(len(names))} if aligned else None
    return triton.compile(
        ASTSource(kernel, signature, constexprs={}, attrs=attrs),
        target=target, options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def main_templates() -> None:
    target = GPUTarget("cuda", 90, 32)
    for name, source, names, config in template_cases():
        try:
            compiled = compile_template(source, names, config, target)
            result = {"case": name, "ok": True, "shared": compiled.metadata.shared, "error": ""}
        except Exception:  # noqa: BLE001 - reported to the test
            result = {"case": name, "ok": False, "shared": 0, "error": traceback.format_exc(limit=4)[-2500:]}
        print(json.dumps(result), flush=True)


def compile_offsets_kernel(target) -> dict:
    """The offsets sanitizer FA4's calls run first (``launcher.sanitized_offsets``), with and
    without seqused_k."""
    kernel = launcher._kernels().sanitize_offsets_kernel
    results = []
    for has_used in (False, True):
        constexprs = {"HAS_USED": has_used, "BLOCK": launcher._SANITIZE_BLOCK}
        signature = {
            name: ("constexpr" if name in constexprs else "*i32" if name.isupper() else "i32")
            for name in inspect.signature(kernel.fn).parameters
        }
        name = f"offsets{'-seqused' if has_used else ''}"
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target,
                                      options={"num_warps": 4})
            results.append({"case": name, "ok": True, "shared": compiled.metadata.shared, "error": ""})
        except Exception:  # noqa: BLE001 - reported to the test
            results.append({"case": name, "ok": False, "shared": 0, "error": traceback.format_exc(limit=4)[-2500:]})
    return results


def static_vs_dynamic_tokens() -> dict:
    """Resource use at sm_90 of the d128 causal backward template (default MHA config, T =
    23040, 16 heads, 16 sequences) rendered with T static and with T a kernel argument: what
    ``torch.compile`` without and with dynamic shapes builds. ``cuobjdump`` gives registers and
    stack per thread."""
    from varlen_compile.lowering.common import template_constants

    tokens, heads, num_seqs, head_dim = 23040, 16, 16, 128
    config = default_backward_config(head_dim, torch.bfloat16, 1)
    constants = dict(
        template_constants(AttnOptions(is_causal=True), OptionalInputs(), head_dim, head_dim, torch.bfloat16,
                           side="backward"),
        BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1, BLOCK_M2=config.block_m2,
        BLOCK_N2=config.block_n2,
    )
    result = {}
    for label, t in (("static", tokens), ("dynamic", "ks0")):
        shapes = {name: (t, heads, head_dim) for name in ("Q", "K", "V", "DO", "FWD_OUT", "DQ", "DV")}
        shapes.update({"CU_Q": (num_seqs + 1,), "CU_K": (num_seqs + 1,), "LSE": (heads, t), "DELTA": (heads, t)})
        source, names = render_template("varlen_bwd", shapes, shapes["K"], constants,
                                         size_args=("ks0",) if label == "dynamic" else ())
        usage = resource_usage(compile_template(source, names, config, GPUTarget("cuda", 90, 32), aligned=True))
        result[label] = {key: usage[key] for key in ("REG", "STACK")}
    return result


if __name__ == "__main__" and "--static-vs-dynamic" in sys.argv:
    print(json.dumps(static_vs_dynamic_tokens()), flush=True)


if __name__ == "__main__" and "--templates" in sys.argv:
    main_templates()
    for result in compile_offsets_kernel(GPUTarget("cuda", 90, 32)):
        print(json.dumps(result), flush=True)
