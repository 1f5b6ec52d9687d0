"""Argument checks shared by every public entry point.

Every entry point (``varlen_attn``, ``varlen_attn_out``, the FlashAttention 2 drop-in, the
transformers attention function, the nested-tensor SDPA, context parallel) validates through
these functions, so all of them accept and reject the same inputs, eagerly and under
``torch.compile``. Each check takes a :class:`Caller`: the entry point's name and its names for
our arguments, so an error raised on behalf of ``flash_attn_varlen_func`` names ``causal`` and
``cu_seqlens_q``, not ``is_causal`` and ``cu_seq_q``. Each returns the validated value.

The rules: flags are Python bools; hints are Python ints (or SymInts) or None; scales are finite
Python floats (or SymFloats) or None; offsets are int32 tensors. Nothing is coerced: numpy
scalars and 0-d tensors are refused with a message saying what to pass (Dynamo traces a numpy
scalar as an array, so a compiled call could not read it without a graph break, and a tensor's
value is data: a host sync). Messages never show a tensor's or a numpy scalar's value
(:func:`describe`), so they trace.

Metadata checks (types, ranks, shapes, dtypes, devices) run on every call, also while tracing,
where they cost no sync and no graph break. Value checks of the offsets read them on the host
(:func:`check_offset_values`: eager calls only); traced and captured calls skip them, or assert on
the device with ``varlen_compile.config.check_offsets`` (:func:`assert_offsets_on_device`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from . import config
from ._compat import runtime_check
from ._tracing import is_symbolic, is_traced, stream_is_capturing

__all__ = [
    "Caller",
    "CheckedCall",
    "SUPPORTED_DTYPES",
    "assert_offsets_on_device",
    "check_call",
    "check_dropout",
    "check_flag",
    "check_hint",
    "check_int",
    "check_lse_request",
    "check_offset_values",
    "check_scale",
    "check_softcap",
    "check_tensor",
    "check_tensors",
    "check_window",
    "describe",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclasses.dataclass(frozen=True)
class Caller:
    """The entry point a check runs for: ``function`` starts every message, and ``names`` maps
    our argument names (``varlen_attn``'s: ``query``, ``cu_seq_q``, ``max_q``, ``is_causal``,
    ``scale``, ...) to the caller's (``q``, ``cu_seqlens_q``, ``max_seqlen_q``, ``causal``,
    ``softmax_scale``, ...); names it lacks are the caller's too."""

    function: str
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def arg(self, name: str) -> str:
        """The caller's name for our argument ``name``."""
        return self.names.get(name, name)

    def message(self, text: str) -> str:
        return f"{self.function}: {text}"


class CheckedCall(NamedTuple):
    """A validated ``varlen_attn`` call: contiguous offsets, the max hints (read off the offsets
    in eager calls), the window as ``(left, right)``, softcap as a float (0.0 = off), sink and
    ALiBi slopes contiguous in float32 (float64 for float64 queries)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int | torch.SymInt | None
    max_k: int | torch.SymInt | None
    is_causal: bool
    scale: float | torch.SymFloat | None
    window_left: int
    window_right: int
    softcap: float | torch.SymFloat
    sink: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    seqused_k: torch.Tensor | None
    block_table: torch.Tensor | None


# ----------------------------------------------------------------------------- values


def describe(value: object, nested: bool = False) -> str:
    """``value`` for an error message: the repr of a Python constant (also inside a short tuple
    or list), else what it is. Never a tensor's or a numpy scalar's value, whose repr cannot
    trace (Dynamo reports "repr() on tensor" instead of the message)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-d {value.dtype} tensor"
    if type(value).__module__ == "numpy":
        return "a numpy value"
    if isinstance(value, (tuple, list)):
        if nested or len(value) > 8:
            return f"a {type(value).__name__} of {len(value)} items"
        inner = ", ".join(describe(item, nested=True) for item in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return f"an object of type {type(value).__name__}"


def _how_to_pass(name: str, value: object, python_type: str) -> str:
    """The fix for a tensor or numpy scalar where a Python value belongs, else ''."""
    if isinstance(value, torch.Tensor):
        return (
            f"; pass a Python {python_type} (a tensor's value is data: reading it is a host sync, and a "
            "graph break under torch.compile)"
        )
    if type(value).__module__ == "numpy":
        return f"; pass a Python {python_type}: {python_type}({name})"
    return ""


def _is_int(value: object) -> bool:
    """A Python int (or SymInt), not a bool."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A Python int or float (or SymInt/SymFloat): not a bool, not a numpy scalar (np.float64
    subclasses float eagerly, but Dynamo traces it as an array)."""
    return (
        isinstance(value, (int, float, torch.SymInt, torch.SymFloat))
        and not isinstance(value, bool)
        and type(value).__module__ != "numpy"
    )


def check_flag(caller: Caller, name: str, flag: object) -> bool:
    """A Python bool: a truthy string such as ``"no"`` would silently mean True."""
    if not isinstance(flag, bool):
        raise TypeError(
            caller.message(
                f"{caller.arg(name)} must be a bool (True or False), got {describe(flag)}"
                + _how_to_pass(caller.arg(name), flag, "bool")
            )
        )
    return flag


def check_int(caller: Caller, name: str, value: object, minimum: int) -> int | torch.SymInt:
    """A Python int (or SymInt) >= ``minimum``."""
    if not _is_int(value):
        raise TypeError(caller.message(f"{caller.arg(name)} must be an int, got {describe(value)}"))
    if not is_symbolic(value) and value < minimum:
        raise ValueError(caller.message(f"{caller.arg(name)} must be >= {minimum}, got {value}"))
    return value


def check_hint(caller: Caller, name: str, hint: object, ignore_tensor: bool = False) -> int | torch.SymInt | None:
    """An optional upper bound on sequence lengths: an int >= 0 (or SymInt), or None. With
    ``ignore_tensor`` (FA2 and transformers pass their max lengths as tensors too), a
    one-element integer tensor is accepted and dropped (None): reading it would be a host sync."""
    if hint is None:
        return None
    arg = caller.arg(name)
    if ignore_tensor and isinstance(hint, torch.Tensor):
        if hint.dtype not in _INT_DTYPES or hint.numel() != 1:
            raise ValueError(
                caller.message(
                    f"{arg} must be an int (or a one-element integer tensor, ignored), got a {hint.dtype} "
                    f"tensor of shape {tuple(hint.shape)}"
                )
            )
        return None
    if not _is_int(hint):
        raise TypeError(
            caller.message(
                f"{arg} must be an int or None, got {describe(hint)}; it is only a hint (the longest "
                "sequence): pass None rather than reading it off a tensor with .item()"
            )
        )
    if not is_symbolic(hint) and hint < 0:
        raise ValueError(caller.message(f"{arg} must be >= 0 (the longest sequence) or None, got {hint}"))
    return hint


def _check_real(caller: Caller, name: str, value: object, expected: str) -> float | torch.SymFloat:
    """A Python float (ints accepted), returned as a float, or a SymFloat (kept as is)."""
    if not _is_real(value):
        raise TypeError(
            caller.message(
                f"{caller.arg(name)} must be {expected}, got {describe(value)}"
                + _how_to_pass(caller.arg(name), value, "float")
            )
        )
    return value if is_symbolic(value) else float(value)


def check_scale(caller: Caller, scale: object, name: str = "scale") -> float | torch.SymFloat | None:
    """The multiplier of ``q @ k^T``: a finite float, or None for ``1 / sqrt(head_dim)``."""
    if scale is None:
        return None
    scale = _check_real(caller, name, scale, "a float or None (None = 1 / sqrt(head_dim))")
    # Comparisons, not math.isfinite: Dynamo traces them also for a float it keeps unspecialized
    # (dynamic=True). False for inf and nan.
    if not abs(scale) < math.inf:
        raise ValueError(caller.message(f"{caller.arg(name)} must be finite, got {scale}; pass None for 1 / sqrt(head_dim)"))
    return scale


def check_softcap(caller: Caller, softcap: object, name: str = "softcap") -> float | torch.SymFloat:
    """A finite float >= 0; None and 0.0 are off (returned as 0.0)."""
    if softcap is None:
        return 0.0
    softcap = _check_real(caller, name, softcap, "a float (None or 0.0 = off)")
    if not 0.0 <= softcap < math.inf:
        raise ValueError(caller.message(f"{caller.arg(name)} must be a finite float >= 0 (0.0 = off), got {softcap}"))
    return softcap


def check_window(caller: Caller, window_size: object, name: str = "window_size") -> tuple[int, int]:
    """``(left, right)``, ints >= -1 (-1 = unbounded), as a tuple or list of two."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(map(_is_int, window_size))):
        raise ValueError(
            caller.message(
                f"{caller.arg(name)} must be a pair of ints (left, right), got {describe(window_size)}; "
                "use (-1, -1) for no window"
            )
        )
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(
            caller.message(f"{caller.arg(name)} entries must be >= -1 (-1 = unbounded), got {describe(window_size)}")
        )
    return left, right


def check_dropout(caller: Caller, name: str, dropout: object, fix: str) -> None:
    """Dropout is not supported: None or 0 passes, anything else raises (``fix`` says what to do)."""
    if dropout is None:
        return
    dropout = _check_real(caller, name, dropout, "a float or None")
    if dropout != 0:
        raise ValueError(caller.message(f"{caller.arg(name)}={dropout}: dropout is not supported yet; {fix}"))


def check_lse_request(caller: Caller, return_aux: object, request_types: tuple[type, ...]) -> bool:
    """Whether ``return_aux`` (None or an ``AuxRequest``) asks for the lse."""
    if return_aux is None:
        return False
    if not isinstance(return_aux, request_types):
        raise TypeError(
            caller.message(f"{caller.arg('return_aux')} must be None or AuxRequest(lse=...), got {describe(return_aux)}")
        )
    return check_flag(caller, "return_aux.lse", return_aux.lse)


# ----------------------------------------------------------------------------- tensors


def _require(condition: bool | torch.SymBool, message: Callable[[], str], generic_message: str) -> None:
    """Raise ``ValueError(message())`` when ``condition`` is known to be false. Under dynamic
    shapes it can be a SymBool: a guard for backed sizes; for unbacked (data-dependent) sizes,
    where it cannot be decided while tracing, a runtime assertion (``_compat.runtime_check``)
    that reports ``generic_message`` (Dynamo needs a constant message, naming no sizes)."""
    if not guard_or_true(condition):
        raise ValueError(message())
    runtime_check(condition, generic_message)


def check_tensor(
    caller: Caller, name: str, tensor: object, what: str = "", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A plain (not nested) ``torch.Tensor``; ``what`` describes it for the message, ``dtype``
    (when it has one) goes into the fix for a list."""
    arg = caller.arg(name)
    if not isinstance(tensor, torch.Tensor):
        fix = ""
        if isinstance(tensor, (list, tuple)):
            fix = f"; build it with torch.tensor({arg}{'' if dtype is None else f', dtype={dtype}'}, device=...)"
        elif type(tensor).__module__ == "numpy":
            fix = f"; convert it with torch.from_numpy({arg})"
        raise TypeError(caller.message(f"{arg} must be a torch.Tensor{what}, got {describe(tensor)}{fix}"))
    if tensor.is_nested:
        raise TypeError(
            caller.message(
                f"{arg} is a nested tensor; pass its packed values() and offsets(), or call "
                "varlen_compile.scaled_dot_product_attention with jagged nested tensors"
            )
        )
    return tensor


def _check_int32(caller: Caller, name: str, tensor: torch.Tensor) -> None:
    """int32, never cast for the caller: a float tensor's values would be truncated."""
    if tensor.dtype == torch.int32:
        return
    arg = caller.arg(name)
    if tensor.is_floating_point():
        raise ValueError(
            caller.message(
                f"{arg} must be int32, got {tensor.dtype}; it counts tokens: compute it in integers "
                "(e.g. lengths.cumsum(0).to(torch.int32)), since casting fractional values would truncate them"
            )
        )
    raise ValueError(caller.message(f"{arg} must be int32, got {tensor.dtype}; use {arg}.to(torch.int32)"))


def _check_offsets_tensor(caller: Caller, name: str, cu_seq: object) -> None:
    check_tensor(caller, name, cu_seq, " of int32 offsets (N + 1,)", torch.int32)
    _check_int32(caller, name, cu_seq)
    if cu_seq.dim() != 1 or cu_seq.shape[0] < 1:
        raise ValueError(
            caller.message(f"{caller.arg(name)} must be 1-D with N + 1 >= 1 offsets, got shape {tuple(cu_seq.shape)}")
        )


def _check_ranks(caller: Caller, named: dict[str, torch.Tensor], paged: bool) -> None:
    query = named["query"]
    if query.dim() != 3:
        raise ValueError(
            caller.message(
                f"{caller.arg('query')} must be 3-D (total_tokens, heads, head_dim), got shape "
                f"{tuple(query.shape)}; pack sequences along dim 0 instead of padding a batch dim"
            )
        )
    for name in ("key", "value"):
        arg, shape = caller.arg(name), tuple(named[name].shape)
        if paged and named[name].dim() != 4:
            raise ValueError(
                caller.message(
                    f"with {caller.arg('block_table')}, {arg} must be 4-D pages (total_pages, page_size, "
                    f"heads, head_dim), got shape {shape}"
                )
            )
        if not paged and named[name].dim() != 3:
            raise ValueError(
                caller.message(
                    f"{arg} must be 3-D (total_tokens, heads, head_dim), got shape {shape}; pack sequences "
                    f"along dim 0 instead of padding a batch dim (4-D pages need {caller.arg('block_table')})"
                )
            )


def _check_sizes(caller: Caller, named: dict[str, torch.Tensor], enable_gqa: bool, paged: bool) -> None:
    """Head counts and head dims of at least 1, key/value agreement, head dims and GQA."""
    query, key, value = named["query"], named["key"], named["value"]
    heads_q, heads_kv = query.shape[1], key.shape[-2]
    for name in ("query", "key", "value"):
        arg, tensor = caller.arg(name), named[name]
        for dim, requirement in ((-2, "at least one head"), (-1, "head_dim >= 1")):
            _require(
                tensor.shape[dim] >= 1,
                lambda: caller.message(f"{arg} must have {requirement}, got shape {tuple(tensor.shape)}"),
                caller.message(f"{arg} must have {requirement}"),
            )
    key_arg, value_arg = caller.arg("key"), caller.arg("value")
    dims = ((0, "pages" if paged else "tokens"), (-2, "heads")) + (((1, "rows per page"),) if paged else ())
    for dim, what in dims:
        _require(
            key.shape[dim] == value.shape[dim],
            lambda: caller.message(
                f"{key_arg} and {value_arg} must have the same number of {what}, got shapes {tuple(key.shape)} "
                f"and {tuple(value.shape)}"
            ),
            caller.message(f"{key_arg} and {value_arg} must have the same number of {what}"),
        )
    query_arg = caller.arg("query")
    _require(
        query.shape[-1] == key.shape[-1],
        lambda: caller.message(
            f"{query_arg} and {key_arg} must have the same head_dim, got {query.shape[-1]} and {key.shape[-1]}"
        ),
        caller.message(f"{query_arg} and {key_arg} must have the same head_dim"),
    )
    _require(
        heads_q % heads_kv == 0,
        lambda: caller.message(
            f"the number of query heads ({heads_q}) must be a multiple of the number of key/value heads ({heads_kv})"
        ),
        caller.message("the number of query heads must be a multiple of the number of key/value heads"),
    )
    if heads_q != heads_kv and not enable_gqa:
        raise ValueError(
            caller.message(
                f"{query_arg} has {heads_q} heads but {key_arg}/{value_arg} have {heads_kv}; pass "
                f"{caller.arg('enable_gqa')}=True for grouped-query attention"
            )
        )


def _check_placement(caller: Caller, named: dict[str, torch.Tensor]) -> None:
    """One device, one supported dtype, contiguous last dims."""
    query, key, value = named["query"], named["key"], named["value"]
    devices = {caller.arg(name): tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(
            caller.message(
                f"all tensors must be on one device, got {devices}; move them with .to({caller.arg('query')}.device)"
            )
        )
    if len({query.dtype, key.dtype, value.dtype}) != 1:
        args = "{}, {} and {}".format(*(caller.arg(name) for name in ("query", "key", "value")))
        raise ValueError(
            caller.message(f"{args} must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            caller.message(
                f"unsupported dtype {query.dtype}; use one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
        )
    for name in ("query", "key", "value"):
        arg, tensor = caller.arg(name), named[name]
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                caller.message(
                    f"{arg} must have a contiguous last dimension (stride 1), got strides {tuple(tensor.stride())}; "
                    f"views like qkv.chunk(3, -1) are fine, call {arg}.contiguous() for transposed inputs"
                )
            )


def check_tensors(
    caller: Caller,
    query: object,
    key: object,
    value: object,
    cu_seq_q: object,
    cu_seq_k: object,
    enable_gqa: bool,
    paged: bool = False,
) -> None:
    """Metadata checks of q/k/v and the offsets (safe under torch.compile: no data access)."""
    named = {"query": query, "key": key, "value": value}
    for name, tensor in named.items():
        check_tensor(caller, name, tensor)
    _check_offsets_tensor(caller, "cu_seq_q", cu_seq_q)
    _check_offsets_tensor(caller, "cu_seq_k", cu_seq_k)
    _check_ranks(caller, named, paged)
    _check_sizes(caller, named, enable_gqa, paged)
    if cu_seq_q.shape[0] != cu_seq_k.shape[0]:
        raise ValueError(
            caller.message(
                f"{caller.arg('cu_seq_q')} and {caller.arg('cu_seq_k')} must describe the same number of "
                f"sequences, got {cu_seq_q.shape[0] - 1} and {cu_seq_k.shape[0] - 1}; pass an empty sequence "
                "(a repeated offset) where one side has none"
            )
        )
    _check_placement(caller, {**named, "cu_seq_q": cu_seq_q, "cu_seq_k": cu_seq_k})


def _check_head_vector(caller: Caller, name: str, tensor: object, query: torch.Tensor) -> torch.Tensor | None:
    """``sink``/``alibi_slopes``: a floating ``(H_q,)`` tensor on the query's device, returned
    contiguous in float32 (what the kernels read), or in float64 for float64 queries (the
    reference keeps it exact); the cast is differentiable."""
    if tensor is None:
        return None
    arg = caller.arg(name)
    check_tensor(caller, name, tensor, " of shape (H_q,) or None")
    if not tensor.is_floating_point():
        raise ValueError(caller.message(f"{arg} must be a floating tensor, got {tensor.dtype}"))
    if tensor.dim() != 1:
        raise ValueError(
            caller.message(
                f"{arg} must be 1-D with one value per query head (H_q={query.shape[1]}), got shape {tuple(tensor.shape)}"
            )
        )
    _require(
        tensor.shape[0] == query.shape[1],
        lambda: caller.message(f"{arg} must have one value per query head ({query.shape[1]}), got {tensor.shape[0]}"),
        caller.message(f"{arg} must have one value per query head"),
    )
    if tensor.device != query.device:
        raise ValueError(
            caller.message(
                f"{arg} is on {tensor.device}, {caller.arg('query')} on {query.device}; move it with "
                f".to({caller.arg('query')}.device)"
            )
        )
    return tensor.to(torch.float64 if query.dtype == torch.float64 else torch.float32).contiguous()


def _check_paging(
    caller: Caller, query: torch.Tensor, cu_seq_q: torch.Tensor, seqused_k: object, block_table: object
) -> None:
    """Metadata checks of ``seqused_k`` and ``block_table``."""
    num_seqs = cu_seq_q.shape[0] - 1
    for name, tensor, rank in (("seqused_k", seqused_k, 1), ("block_table", block_table, 2)):
        if tensor is None:
            continue
        arg = caller.arg(name)
        check_tensor(caller, name, tensor, " or None", torch.int32)
        _check_int32(caller, name, tensor)
        if tensor.dim() != rank:
            raise ValueError(caller.message(f"{arg} must be {rank}-D, got shape {tuple(tensor.shape)}"))
        _require(
            tensor.shape[0] == num_seqs,
            lambda: caller.message(
                f"{arg} must have one row per sequence (N={num_seqs}), got shape {tuple(tensor.shape)}"
            ),
            caller.message(f"{arg} must have one row per sequence"),
        )
        if tensor.device != query.device:
            raise ValueError(caller.message(f"{arg} is on {tensor.device}, {caller.arg('query')} on {query.device}"))
    if block_table is not None and seqused_k is None:
        raise ValueError(
            caller.message(
                f"{caller.arg('block_table')} needs {caller.arg('seqused_k')} (the number of valid keys of each "
                "sequence, as in torch.nn.attention.varlen)"
            )
        )


def _check_no_grad_through_pages(caller: Caller, named: dict[str, torch.Tensor | None]) -> None:
    """Paged K/V has no backward: refuse inputs that would need one, eagerly and compiled alike
    (a compiled graph traces its backward ahead of time, so a late error would fail compile)."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in named.items():
        if tensor is not None and tensor.requires_grad:
            arg = caller.arg(name)
            raise ValueError(
                caller.message(
                    f"paged K/V ({caller.arg('block_table')}) is forward-only (as in torch.nn.attention.varlen), "
                    f"but {arg} requires grad; call it under torch.no_grad() or torch.inference_mode(), or pass "
                    f"{arg}.detach()"
                )
            )


# ----------------------------------------------------------------------------- offsets


def check_offset_values(
    caller: Caller,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    total_q: int,
    total_k: int,
    max_q: int | None,
    max_k: int | None,
    check_k: bool = True,
) -> tuple[int, int | None]:
    """Eager-only value checks (one host sync): the offsets start at 0, never decrease and end at
    the token counts, and the hints are not below the longest sequences. Returns the hints, read
    off the offsets where None (aten flash needs them). ``check_k=False`` (paged K/V) skips
    ``cu_seq_k``, which is not read then."""
    offsets = torch.stack([cu_seq_q, cu_seq_k]).cpu()
    sides = [(offsets[0], "cu_seq_q", total_q, max_q, "max_q"), (offsets[1], "cu_seq_k", total_k, max_k, "max_k")]
    checked = []
    for offs, name, total, max_len, max_name in sides[: 2 if check_k else 1]:
        arg, lengths = caller.arg(name), offs[1:] - offs[:-1]
        if int(offs[0]) != 0:
            raise ValueError(caller.message(f"{arg} must start at 0, got {int(offs[0])}"))
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(
                caller.message(f"{arg} must be non-decreasing (cumulative sequence lengths), got {offs.tolist()}")
            )
        if int(offs[-1]) != total:
            raise ValueError(caller.message(f"{arg} must end at the total token count {total}, got {int(offs[-1])}"))
        longest = int(lengths.max()) if lengths.numel() else 0
        if max_len is not None and int(max_len) < longest:
            raise ValueError(
                caller.message(
                    f"{caller.arg(max_name)}={int(max_len)} is smaller than the longest sequence ({longest}); "
                    "pass the true maximum or None"
                )
            )
        checked.append(longest if max_len is None else max_len)
    if not check_k:
        checked.append(max_k)
    return checked[0], checked[1]


def assert_offsets_on_device(
    caller: Caller, cu_seq: torch.Tensor, total: int, max_len: int | None, name: str, max_name: str
) -> None:
    """What :func:`check_offset_values` checks, as a device-side assertion (no host sync): for
    traced and captured calls when ``config.check_offsets`` is on."""
    lengths = cu_seq[1:] - cu_seq[:-1]
    valid = (cu_seq[0] == 0) & (cu_seq[-1] == total) & (lengths >= 0).all()
    torch._assert_async(
        valid, caller.message(f"{caller.arg(name)} must start at 0, never decrease and end at the token count")
    )
    if max_len is not None:
        torch._assert_async(
            (lengths <= max_len).all(), caller.message(f"{caller.arg(max_name)} is smaller than the longest sequence")
        )


def _check_used_keys(
    caller: Caller, cu_seq_k: torch.Tensor, key: torch.Tensor, seqused_k: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> None:
    """Eager-only value checks of ``seqused_k`` and ``block_table`` (host reads)."""
    if seqused_k is None:
        return
    used = seqused_k.cpu()
    if block_table is not None:
        capacity = torch.full_like(used, block_table.shape[1] * key.shape[1])
        pages = block_table.cpu()
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= key.shape[0]):
            raise ValueError(
                caller.message(
                    f"{caller.arg('block_table')} entries must be page indices in [0, {key.shape[0]}), got values "
                    f"in [{int(pages.min())}, {int(pages.max())}]"
                )
            )
        what = f"{caller.arg('block_table')} row capacity (max_pages * page_size)"
    else:
        offsets = cu_seq_k.cpu()
        capacity = offsets[1:] - offsets[:-1]
        what = f"sequence's {caller.arg('cu_seq_k')} length"
    if used.numel() and (int(used.min()) < 0 or bool((used > capacity).any())):
        raise ValueError(
            caller.message(
                f"{caller.arg('seqused_k')} must lie in [0, {what}] per sequence, got {used.tolist()} for "
                f"capacities {capacity.tolist()}"
            )
        )


# ----------------------------------------------------------------------------- a whole call


def check_call(
    caller: Caller,
    query: object,
    key: object,
    value: object,
    cu_seq_q: object,
    cu_seq_k: object,
    max_q: object = None,
    max_k: object = None,
    is_causal: object = False,
    *,
    scale: object = None,
    window_size: object = (-1, -1),
    enable_gqa: object = False,
    softcap: object = None,
    sink: object = None,
    alibi_slopes: object = None,
    seqused_k: object = None,
    block_table: object = None,
) -> CheckedCall:
    """Every check of a ``varlen_attn`` call (its arguments, as documented there), in
    ``caller``'s words. Eager calls also read the offsets on the host (one sync)."""
    is_causal = check_flag(caller, "is_causal", is_causal)
    enable_gqa = check_flag(caller, "enable_gqa", enable_gqa)
    window_left, window_right = check_window(caller, window_size)
    paged = block_table is not None
    if cu_seq_k is None:
        if not paged:
            raise ValueError(
                caller.message(
                    f"{caller.arg('cu_seq_k')} may be None only with {caller.arg('block_table')} (paged K/V)"
                )
            )
        cu_seq_k = cu_seq_q  # not read with paged K/V
    check_tensors(caller, query, key, value, cu_seq_q, cu_seq_k, enable_gqa, paged)
    softcap = check_softcap(caller, softcap)
    sink = _check_head_vector(caller, "sink", sink, query)
    alibi_slopes = _check_head_vector(caller, "alibi_slopes", alibi_slopes, query)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        arg = caller.arg("alibi_slopes")
        raise ValueError(
            caller.message(
                f"{arg} must not require grad (ALiBi slopes are fixed and get no gradient); pass {arg}.detach()"
            )
        )
    _check_paging(caller, query, cu_seq_q, seqused_k, block_table)
    if paged:
        _check_no_grad_through_pages(caller, {"query": query, "key": key, "value": value, "sink": sink})
    max_q, max_k = check_hint(caller, "max_q", max_q), check_hint(caller, "max_k", max_k)
    scale = check_scale(caller, scale)
    cu_seq_q, cu_seq_k = cu_seq_q.contiguous(), cu_seq_k.contiguous()
    seqused_k = None if seqused_k is None else seqused_k.contiguous()
    block_table = None if block_table is None else block_table.contiguous()
    if not (is_traced(cu_seq_q) or stream_is_capturing(cu_seq_q.device)):
        max_q, max_k = check_offset_values(
            caller, cu_seq_q, cu_seq_k, query.shape[0], key.shape[0], max_q, max_k, check_k=not paged
        )
        _check_used_keys(caller, cu_seq_k, key, seqused_k, block_table)
    elif config.check_offsets:
        assert_offsets_on_device(caller, cu_seq_q, query.shape[0], max_q, "cu_seq_q", "max_q")
        if not paged:
            assert_offsets_on_device(caller, cu_seq_k, key.shape[0], max_k, "cu_seq_k", "max_k")
    return CheckedCall(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, window_left, window_right,
        softcap, sink, alibi_slopes, seqused_k, block_table,
    )

