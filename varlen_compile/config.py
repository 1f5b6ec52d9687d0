"""Package-wide switches, Inductor-style: module attributes, defaults from the environment.

Read while a call is traced, so Dynamo guards on them: changing one recompiles.

``check_offsets`` (env ``VARLEN_COMPILE_CHECK_OFFSETS=1``): eager calls always check ``cu_seq``
and the ``max_q``/``max_k`` hints on the host. Compiled, exported and CUDA-graph-captured calls
cannot read them without a sync; by default their kernels clamp every offset into the tensors
(never an out-of-bounds access) and a malformed ``cu_seq`` gives unspecified values in the rows
it describes. With ``check_offsets = True`` those calls also run a device-side assertion
(``torch._assert_async``: no host sync) that ``cu_seq`` starts at 0, never decreases and ends at
the token count, and that the hints are not below the real maxima. A failed assertion is a CUDA
device-side assert: the process's CUDA context is unusable afterwards, so use it to debug.

``kernel`` (env ``VARLEN_COMPILE_KERNEL``): which attention kernel runs the ops on CUDA, the one
switch for it. A preference, never a requirement: a kernel that cannot serve a call (dtype, head
dims, features, no ``max_q``/``max_k`` for aten flash, an AOTInductor / ``cpp_wrapper`` graph
for the Python kernels) leaves it to our Triton kernels, which serve every CUDA call.

- ``"auto"`` (default): compiled calls run our Triton template, or FlashAttention 4 where the
  default table (``lowering.choices``) measured it faster; under ``max-autotune`` Inductor
  times every kernel that can serve the call (template configs, FA4, aten flash with max hints)
  and keeps the fastest. Eager calls run aten flash attention where it serves, else our kernels.
- ``"triton"``: our Triton kernels (the template when compiled).
- ``"fa4"``: FlashAttention 4's varlen kernels (``pip install varlen-compile[fa4]``; sm90 and
  sm100, fp16/bf16), compiled and eager.
- ``"aten"``: aten flash attention (FlashAttention 2), compiled and eager; it needs the
  ``max_q``/``max_k`` hints as ints.

``strict_lowering`` (env ``VARLEN_COMPILE_STRICT_LOWERING=1``): a lowering that fails on an
Inductor internal it does not know falls back to the op's eager implementation (logged once),
so a user's compile never crashes on it; set this to re-raise instead (the test suite does, so
that a bug of ours cannot hide behind the fallback). Read inside Inductor, not guarded on.

``fa4_replay`` (env ``VARLEN_COMPILE_FA4_REPLAY=0`` to switch off): FlashAttention 4 calls
behind our ops record, per shapes and options, the kernels FA4's Python launches and then launch
them directly (``lowering.fa4_replay``), which saves most of FA4's host time per call. Read at
run time, not guarded on.

Set switches for a block of code with :func:`patch`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["KERNELS", "check_offsets", "fa4_replay", "kernel", "patch", "strict_lowering"]

KERNELS = ("auto", "triton", "fa4", "aten")

check_offsets: bool = os.environ.get("VARLEN_COMPILE_CHECK_OFFSETS", "0") == "1"
kernel: str = os.environ.get("VARLEN_COMPILE_KERNEL", "auto")
strict_lowering: bool = os.environ.get("VARLEN_COMPILE_STRICT_LOWERING", "0") == "1"
fa4_replay: bool = os.environ.get("VARLEN_COMPILE_FA4_REPLAY", "1") != "0"


def checked_kernel() -> str:
    """``kernel``, validated (it may come from the environment or be assigned directly)."""
    return check_kernel_name(kernel, "varlen_compile.config.kernel", " (check VARLEN_COMPILE_KERNEL)")


def check_kernel_name(name: object, what: str = "kernel", hint: str = "") -> str:
    """``name`` if it is one of :data:`KERNELS`, else a ValueError that says so."""
    if name not in KERNELS:
        raise ValueError(f"{what} must be one of {KERNELS}, got {name!r}{hint}")
    return name  # type: ignore[return-value]


@contextlib.contextmanager
def patch(**changes: object) -> Iterator[None]:
    """Set switches of this module for the ``with`` block, e.g.
    ``with varlen_compile.config.patch(kernel="fa4"): ...``. Calls traced inside the block are
    guarded on the values, so a function compiled inside it recompiles outside it."""
    unknown = sorted(set(changes) - {"check_offsets", "fa4_replay", "kernel", "strict_lowering"})
    if unknown:
        raise AttributeError(f"varlen_compile.config has no switch {unknown[0]!r}")
    if "kernel" in changes:
        check_kernel_name(changes["kernel"], "varlen_compile.config.kernel")
    module = globals()
    previous = {name: module[name] for name in changes}
    module.update(changes)
    try:
        yield
    finally:
        module.update(previous)
