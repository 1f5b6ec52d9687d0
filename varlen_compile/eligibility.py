"""Which kernel can serve an attention call, and if not, why: the one place that decides it.

Every caller asks here: eager dispatch (:mod:`varlen_compile.backends`), the Inductor lowerings
and the compiled kernel choice (``lowering/choices.py``). A call is described by
:class:`Call`, metadata only (devices, dtypes, head dims, which optional inputs are present),
so the same rules serve tensors and Inductor IR nodes; nothing here reads data or syncs.

Kernels (docs/design.md §9):

- ``"triton"``: our Triton kernels (the Inductor template when compiled, the standalone launcher
  eagerly). They serve every CUDA call in fp16/bf16/fp32 with head dims 1..256, every feature.
- ``"aten"``: aten's flash attention (FlashAttention 2). It needs ``max_q``/``max_k`` (without
  them it would read ``cu_seq``: a sync) and serves no optional input and no softcap.
- ``"fa4"``: FlashAttention 4 (``flash-attn-4``), when installed: sm90/sm100, fp16/bf16, its head
  dims, and the optional inputs the registry gives an FA4 keyword.

:func:`unsupported` returns None when a kernel can serve a call, else the reason;
:func:`select` turns a preference (``varlen_compile.config.kernel``) and the reasons into the
kernels that compete in a compiled graph; :func:`eager_kernel` picks the one an eager call runs.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import _compat
from .config import check_kernel_name
from .params import OPTIONAL_INPUTS, AttnOptions

__all__ = [
    "ATEN",
    "ATEN_FLASH_DTYPES",
    "ATEN_FLASH_MAX_HEAD_DIM",
    "Call",
    "FA4",
    "FA4_DTYPES",
    "MAX_HEAD_DIM",
    "REFERENCE",
    "TEMPLATE",
    "TRITON_DTYPES",
    "aten_unsupported",
    "NONDETERMINISTIC_BACKWARD",
    "call_of_tensors",
    "deterministic_backward",
    "eager_kernel",
    "fa4_unsupported",
    "select",
    "supported_head_dim",
    "triton_device_unsupported",
    "triton_unsupported",
    "unsupported",
]

log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str]] = set()

TEMPLATE, ATEN, FA4 = "triton", "aten", "fa4"
REFERENCE = "reference"
"""Eager only: the exact reference (CPU, float64, no Triton)."""

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATEN_FLASH_DTYPES = (torch.float16, torch.bfloat16)
FA4_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
ATEN_FLASH_MAX_HEAD_DIM = 256


def supported_head_dim(head_dim: int) -> bool:
    """Head dims our Triton kernels take: 1..256 (padded to a power of two >= 16 inside)."""
    return 1 <= head_dim <= MAX_HEAD_DIM


@dataclasses.dataclass(frozen=True, kw_only=True)
class Call:
    """What decides eligibility, from metadata only.

    ``same_heads``: ``H_q == H_kv`` is known to hold (False when unknown, e.g. symbolic).
    ``optional``: the names of the optional inputs present (the backward's ``grad_lse``
    included). ``hints``: ``max_q`` and ``max_k`` are both known. ``compiled``: the call is in
    a graph Inductor lowers (our kernels are then the templates, not built for ROCm yet).
    ``python_kernels``: False in AOTInductor / ``cpp_wrapper`` graphs, which cannot call a
    Python kernel.
    """

    device: torch.device | None
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    same_heads: bool
    options: AttnOptions
    optional: frozenset[str]
    hints: bool
    compiled: bool = False
    python_kernels: bool = True

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.version.hip is None

    def arch(self) -> tuple[int, int]:
        """The CUDA compute capability (only for a CUDA call)."""
        return torch.cuda.get_device_capability(self.device)


def call_of_tensors(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: AttnOptions, optional: Mapping[str, Any],
    hints: bool,
) -> Call:
    """The :class:`Call` of an eager op call (``key`` contiguous or paged: heads at dim -2)."""
    return Call(
        device=query.device, dtype=query.dtype, head_dim=query.shape[-1], head_dim_v=value.shape[-1],
        same_heads=query.shape[1] == key.shape[-2], options=options, optional=frozenset(optional), hints=hints,
    )


def _is_number(value: object) -> bool:
    """A Python (or sympy) number, not a symbolic expression."""
    return isinstance(value, numbers.Number) or getattr(value, "is_Number", False)


def triton_device_unsupported(device: torch.device | None, dtype: torch.dtype, compiled: bool) -> str | None:
    """The part of :func:`triton_unsupported` that needs neither head dims nor options: the
    lowerings ask it first, so a graph the templates cannot serve guards on nothing."""
    if device is None or device.type != "cuda":
        return f"the Triton kernels are CUDA-only (device: {device})"
    if compiled and torch.version.hip is not None:
        return "the Triton templates are not built for ROCm yet"
    if not _compat.has_triton():
        return "Triton is not installed"
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} (the Triton kernels serve float16, bfloat16, float32)"
    return None


def triton_unsupported(call: Call) -> str | None:
    """Our Triton kernels: CUDA, fp16/bf16/fp32, head dims 1..256, and in compiled graphs a
    constant scale and softcap (the templates take them as constants)."""
    reason = triton_device_unsupported(call.device, call.dtype, call.compiled)
    if reason is not None:
        return reason
    if not (supported_head_dim(call.head_dim) and supported_head_dim(call.head_dim_v)):
        return f"head dims {call.head_dim}/{call.head_dim_v} (the Triton kernels serve 1..256)"
    if call.options.scale is not None and not _is_number(call.options.scale):
        return "a symbolic softmax scale (the templates take it as a constant)"
    if not _is_number(call.options.softcap):
        return "a symbolic softcap (the templates take it as a constant)"
    return None


def aten_unsupported(call: Call) -> str | None:
    """aten flash attention: CUDA sm80+, fp16/bf16, head dims that are multiples of 8 up to
    256 with ``D_v == D``, the max hints, and none of softcap or the optional inputs."""
    if not call.python_kernels:
        return "an AOTInductor package or cpp_wrapper graph cannot call a Python kernel"
    if not call.hints:
        return "aten flash needs max_q/max_k as ints (without them it would read cu_seq: a sync)"
    if "grad_lse" in call.optional:
        return "aten flash takes no gradient into lse"
    if call.head_dim_v != call.head_dim or call.options.softcap != 0.0 or call.optional:
        return "aten flash serves none of D_v != D, softcap, sinks, ALiBi, seqused_k, paged K/V"
    if not call.cuda:
        return f"aten flash runs on NVIDIA GPUs (device: {call.device})"
    if call.dtype not in ATEN_FLASH_DTYPES:
        return f"aten flash serves float16 and bfloat16 (dtype: {call.dtype})"
    if call.head_dim % 8 or call.head_dim > ATEN_FLASH_MAX_HEAD_DIM:
        return f"aten flash serves head dims that are multiples of 8 up to 256 (head dim: {call.head_dim})"
    if call.arch() < (8, 0):
        return "aten flash needs sm80 or newer"
    return None


def _fa4_head_dims(arch_major: int, head_dim: int, head_dim_v: int, same_heads: bool) -> bool:
    """FA4's limits for 16-bit inputs: ``interface._validate_head_dims``, narrowed to what its
    backward also takes. ``D_v != D`` only as MLA's (192, 128): the sm90 tiles are sized by ``D``
    alone (other pairs are untested there), and the sm90 GQA backward asserts ``D == D_v``."""
    if head_dim % 8 or head_dim_v % 8:
        return False
    if head_dim != head_dim_v and ((head_dim, head_dim_v) != (192, 128) or (arch_major == 9 and not same_heads)):
        return False
    if arch_major == 9:
        return 8 <= head_dim <= 256
    return 8 <= head_dim <= 128 or head_dim in (192, 256)


_FA4_CANNOT = {
    "alibi_slopes": "FA4 has no ALiBi",
    # FA4 loads whole pages: rows past seqused_k in a sequence's last page must be finite, which
    # our contract does not ask of the caller (any page content is allowed).
    "block_table": "paged K/V runs in our kernels (FA4 needs finite values in unused page rows)",
}


def fa4_unsupported(call: Call) -> str | None:
    """FlashAttention 4, forward and backward alike (whichever the call is, the other side must
    be servable too: any kernel's backward accepts FA4's forward and the reverse, but a choice
    is made per op)."""
    interface, reason = _compat.fa4_interface()
    if interface is None:
        return reason
    if not call.python_kernels:
        return "an AOTInductor package or cpp_wrapper graph cannot call a Python kernel"
    if not call.cuda:
        return f"FA4 runs on NVIDIA GPUs (device: {call.device})"
    major, minor = call.arch()
    if major not in (9, 10):
        return f"FA4 serves sm90 and sm100 here (device: sm{major}{minor})"
    if call.dtype not in FA4_DTYPES:
        return f"FA4 serves float16 and bfloat16 (dtype: {call.dtype})"
    if not _fa4_head_dims(major, call.head_dim, call.head_dim_v, call.same_heads):
        gqa = "" if call.same_heads else " with GQA"
        return f"FA4 on sm{major}{minor} does not serve head dims {call.head_dim}/{call.head_dim_v}{gqa}"
    if major == 10 and call.head_dim == 256:
        # Its dedicated hd256 backward asserts no softcap, no local window and no dlse.
        left, right = call.options.window()
        if call.options.softcap or left >= 0 or right > 0 or "grad_lse" in call.optional:
            return "FA4's sm100 head-dim-256 backward takes no softcap, sliding window or gradient into lse"
    for spec in OPTIONAL_INPUTS:
        if spec.fa4 is None and spec.name in call.optional:
            return _FA4_CANNOT.get(spec.name, f"FA4 takes no {spec.name}")
    return None


_UNSUPPORTED: dict[str, Callable[[Call], str | None]] = {
    TEMPLATE: triton_unsupported,
    ATEN: aten_unsupported,
    FA4: fa4_unsupported,
}


def unsupported(kernel: str, call: Call) -> str | None:
    """None when ``kernel`` (``"triton"``, ``"aten"``, ``"fa4"``) can serve ``call``, else why not."""
    return _UNSUPPORTED[kernel](call)


def select(
    requested: str, *, fa4_reason: str | None, aten_reason: str | None, max_autotune: bool, fa4_default: bool,
    deterministic: bool = False,
) -> tuple[str, ...]:
    """The kernels that compete in a compiled graph for a call the template serves, from the
    preference and what can serve the call (``*_reason``: None when that kernel can, else why
    not). Always at least one; the template whenever nothing else may run.

    - ``"triton"``: the template.
    - ``"fa4"`` / ``"aten"``: that kernel where it can serve the call, else the template (logged
      once at INFO: a preference is never an error).
    - ``"auto"`` under ``max-autotune``: the template and every kernel that can serve the call.
    - ``"auto"`` otherwise: FA4 where it can serve the call and the default table picks it
      (``fa4_default``), else the template.

    ``deterministic`` (a backward under :func:`deterministic_backward`): FA4 and aten flash
    cannot serve it (:data:`NONDETERMINISTIC_BACKWARD`), whatever the preference.
    """
    check_kernel_name(requested)
    if deterministic:
        fa4_reason = fa4_reason or NONDETERMINISTIC_BACKWARD
        aten_reason = aten_reason or NONDETERMINISTIC_BACKWARD
    if requested == TEMPLATE:
        return (TEMPLATE,)
    if requested in (FA4, ATEN):
        reason = fa4_reason if requested == FA4 else aten_reason
        if reason is None:
            return (requested,)
        _log_once(requested, reason)
        return (TEMPLATE,)
    if max_autotune:
        return (TEMPLATE,) + tuple(name for name, reason in ((FA4, fa4_reason), (ATEN, aten_reason)) if reason is None)
    return (FA4,) if fa4_reason is None and fa4_default else (TEMPLATE,)


NONDETERMINISTIC_BACKWARD = (
    "torch.use_deterministic_algorithms(True) is on, and its backward is not relied on to repeat "
    "bit for bit (by default it sums dQ with atomics)"
)
"""Why aten flash and FA4 do not run a backward while deterministic algorithms are on: our
Triton backward (each dK/dV/dQ element owned by one program, no atomics) and the reference do.
(FA4 has a deterministic mode, and aten flash may switch to FA2's under the flag; neither is
relied on, as neither has been measured here.)"""


def deterministic_backward() -> bool:
    """Whether a backward must be bitwise repeatable: ``torch.use_deterministic_algorithms(True)``
    (Dynamo guards on it, so a compiled graph follows the switch)."""
    return torch.are_deterministic_algorithms_enabled()


def eager_kernel(requested: str, call: Call, deterministic: bool = False) -> str:
    """The kernel an eager call runs: FA4 when asked for and it serves the call; else aten flash
    where it serves (``"auto"``, ``"aten"``, ``"fa4"``); else our Triton kernels; else the exact
    reference (``"reference"``). ``deterministic`` (a backward under
    :func:`deterministic_backward`): our Triton kernels, else the reference. A preference that
    cannot serve the call is logged once per reason, naming what runs instead."""
    if deterministic and requested in (FA4, ATEN):
        _log_once(requested, NONDETERMINISTIC_BACKWARD, "our Triton kernels or the exact reference")
    order = {FA4: (FA4, ATEN, TEMPLATE), TEMPLATE: (TEMPLATE,)}.get(requested, (ATEN, TEMPLATE))
    if deterministic:
        order = (TEMPLATE,)
    chosen, refused = REFERENCE, None
    for kernel in order:  # a preferred kernel comes first in its order
        reason = unsupported(kernel, call)
        if reason is None:
            chosen = kernel
            break
        if kernel == requested:
            refused = reason
    if refused is not None:
        _log_once(requested, refused, "the exact reference" if chosen == REFERENCE else f"kernel {chosen!r}")
    return chosen


def _log_once(requested: str, reason: str, runs: str = "our Triton template") -> None:
    if (requested, reason, runs) not in _logged:
        _logged.add((requested, reason, runs))
        log.info("varlen_compile: kernel=%r cannot serve a call (%s); %s runs it", requested, reason, runs)
