"""Every torch / triton version difference and optional-dependency check lives here.

Compare versions with :class:`packaging.version.Version`, never with strings.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import types

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .params import OPTIONAL_INPUTS

__all__ = [
    "AUX_REQUEST_TYPES",
    "FA4_BACKWARD_KEYWORDS",
    "FA4_FORWARD_KEYWORDS",
    "FA4_VERSIONS",
    "fa4_interface",
    "all_gather",
    "all_gather_autograd",
    "group_size_by_name",
    "TORCH_VERSION",
    "has_triton",
    "has_inductor",
    "jagged_view",
    "reduce_scatter_sum",
    "runtime_check",
    "triton_version",
]

TORCH_VERSION = Version(torch.__version__.split("+")[0])
MIN_TORCH_VERSION = Version("2.11")


# Dynamo traces a torch._check message closure over constants from torch 2.13; torch 2.11 refuses
# any closure ("Can't extract message from torch._check()"), so there the check has no message.
_DYNAMO_TRACES_CHECK_MESSAGES = TORCH_VERSION >= Version("2.13")


def runtime_check(condition: bool | torch.SymBool, message: str) -> None:
    """``torch._check(condition)``: nothing for a true bool, a guard for a backed SymBool, a runtime
    assertion for an unbacked one; ``message`` goes with it where Dynamo can trace that."""
    if _DYNAMO_TRACES_CHECK_MESSAGES:
        torch._check(condition, lambda: message)
    else:
        torch._check(condition)


def _torch_aux_request_types() -> tuple[type, ...]:
    """torch's own ``AuxRequest`` (torch.nn.attention.varlen), so callers can switch over."""
    try:
        from torch.nn.attention.varlen import AuxRequest
    except ImportError:  # pragma: no cover - every supported torch has it
        return ()
    return (AuxRequest,)


AUX_REQUEST_TYPES = _torch_aux_request_types()


@functools.cache
def has_triton() -> bool:
    """True when ``import triton`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version() -> Version | None:
    if not has_triton():
        return None
    import triton

    return Version(triton.__version__.split("+")[0])


FA4_VERSIONS = SpecifierSet(">=4.0.0b36,<4.1", prereleases=True)
"""flash-attn-4 releases the FA4 kernel choice accepts (the ``[fa4]`` extra pins the same range;
tested: 4.0.0b36). Its varlen forward/backward entry points are private functions of
``flash_attn.cute.interface``, so the keywords we pass (every argument is passed by keyword) are also checked against their
signatures: a release that renamed one is refused with a logged reason, never called."""

FA4_REPLAY_VERSIONS = SpecifierSet("==4.0.0b36", prereleases=True)
"""flash-attn-4 releases whose entry points were read for ``lowering.fa4_replay`` (every kernel
launched through a function's ``compile_cache``, no tensor cached across calls): other releases
in :data:`FA4_VERSIONS` are called as they are, never replayed."""

_FA4_FIXED_KEYWORDS = {
    "forward": ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "softcap",
                "window_size_left", "window_size_right", "return_lse", "lse"),
    "backward": ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right", "cu_seqlens_q",
                 "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv"),
}


def _fa4_keywords(side: str) -> tuple[str, ...]:
    """The keywords ``varlen_compile.lowering.fa4`` passes to FA4's ``side`` entry point: the
    fixed ones and the optional inputs' (the registry's ``fa4`` names)."""
    return _FA4_FIXED_KEYWORDS[side] + tuple(
        spec.fa4 for spec in OPTIONAL_INPUTS if spec.fa4 is not None and side in spec.read_by
    )


FA4_FORWARD_KEYWORDS, FA4_BACKWARD_KEYWORDS = _fa4_keywords("forward"), _fa4_keywords("backward")


@functools.cache
def fa4_replay_audited() -> bool:
    """Whether the installed flash-attn-4 is one :data:`FA4_REPLAY_VERSIONS` names."""
    try:
        return Version(importlib.metadata.version("flash-attn-4")) in FA4_REPLAY_VERSIONS
    except importlib.metadata.PackageNotFoundError:
        return False


@functools.cache
def fa4_interface() -> tuple[types.ModuleType | None, str]:
    """``(flash_attn.cute.interface, "")`` when FlashAttention 4 can serve as a kernel choice,
    else ``(None, why not)``. Imported once; never raises."""
    try:
        version = Version(importlib.metadata.version("flash-attn-4"))
    except importlib.metadata.PackageNotFoundError:
        return None, "flash-attn-4 is not installed (pip install 'varlen-compile[fa4]')"
    if version not in FA4_VERSIONS:
        return None, f"flash-attn-4 {version} is outside the supported range {FA4_VERSIONS}"
    try:
        from flash_attn.cute import interface
    except Exception as error:  # a broken CUDA / CuTe DSL install must not break our package
        return None, f"import flash_attn.cute.interface failed: {type(error).__name__}: {error}"
    for name, keywords in (("_flash_attn_fwd", FA4_FORWARD_KEYWORDS), ("_flash_attn_bwd", FA4_BACKWARD_KEYWORDS)):
        function = getattr(interface, name, None)
        if function is None:
            return None, f"flash-attn-4 {version} has no flash_attn.cute.interface.{name}"
        missing = [key for key in keywords if key not in inspect.signature(function).parameters]
        if missing:
            return None, f"flash-attn-4 {version}: {name} lacks the arguments {missing}"
    return interface, ""


def no_dispatch_modes() -> contextlib.AbstractContextManager:
    """A block that runs with the current thread's ``TorchDispatchMode`` stack set aside."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


@functools.cache
def has_inductor() -> bool:
    """True when Inductor's lowering machinery imports on this install."""
    try:
        import torch._inductor.lowering  # noqa: F401
        import torch._inductor.select_algorithm  # noqa: F401
    except Exception:  # pragma: no cover - broken or stripped installs
        return False
    return True


def jagged_view(values: torch.Tensor, offsets: torch.Tensor, min_seqlen: object, max_seqlen: object) -> torch.Tensor:
    """A jagged nested tensor viewing ``values`` with ``offsets`` (and the cached min/max lengths,
    or None): ``nested_view_from_values_offsets``, what torch's own jagged SDPA builds its output
    with, where torch has it (2.11-2.15); else the public ``nested_tensor_from_jagged``, which on
    torch 2.15 warns at every call under tracing (``is_fx_tracing``)."""
    try:
        from torch.nested._internal.nested_tensor import nested_view_from_values_offsets
    except ImportError:  # pragma: no cover - a torch that moved it
        return torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=min_seqlen, max_seqlen=max_seqlen)
    return nested_view_from_values_offsets(values, offsets, min_seqlen=min_seqlen, max_seqlen=max_seqlen)


def all_gather_autograd(tensor: torch.Tensor, gather_dim: int, group: object) -> torch.Tensor:
    """torch.distributed's functional all-gather along ``gather_dim`` whose backward
    reduce-scatters the gradient: ``all_gather_single_autograd`` from torch 2.13 (the older name,
    ``all_gather_tensor_autograd``, is deprecated there and the only one in torch 2.11)."""
    from torch.distributed import _functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    return gather(tensor, gather_dim, group)


def all_gather(tensor: torch.Tensor, gather_dim: int, group: object) -> torch.Tensor:
    """Functional all-gather (no autograd): ``all_gather_single`` from torch 2.13,
    ``all_gather_tensor`` before (deprecated from 2.13)."""
    from torch.distributed import _functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single", None) or collectives.all_gather_tensor
    return gather(tensor, gather_dim, group)


def reduce_scatter_sum(tensor: torch.Tensor, scatter_dim: int, group: object) -> torch.Tensor:
    """Functional reduce-scatter with a sum (no autograd): ``reduce_scatter_single`` from torch
    2.13, ``reduce_scatter_tensor`` before (deprecated from 2.13)."""
    from torch.distributed import _functional_collectives as collectives

    scatter = getattr(collectives, "reduce_scatter_single", None) or collectives.reduce_scatter_tensor
    return scatter(tensor, "sum", scatter_dim, group)


def group_size_by_name(group_name: str) -> int:
    """The size of the process group registered as ``group_name`` (``ProcessGroup.group_name``),
    without the group object (fake implementations of custom ops get the name only):
    ``_get_group_size_by_name`` where torch has it, else the resolved group's size."""
    from torch.distributed import distributed_c10d as c10d

    by_name = getattr(c10d, "_get_group_size_by_name", None)
    return by_name(group_name) if by_name is not None else c10d._resolve_process_group(group_name).size()
