"""FlashAttention 4 calls without FA4's per-call Python: recorded once per key, replayed after.

FA4's ``_flash_attn_fwd`` and ``_flash_attn_bwd`` spend about 100 us of host time per call
(H100 host, flash-attn-4 4.0.0b36) working out, from the shapes and options alone, which
compiled CuTe kernels to launch on which buffers. The launches themselves take a few
microseconds. A compiled graph calls FA4 with the same shapes and options every step, so
:class:`Replayer` does that work once per key and then launches the kernels directly:

- **Record.** One call runs FA4 as usual while every compiled kernel it calls (each
  ``compile_cache`` of FA4's modules is wrapped for the call) and every aten op its Python runs
  (a ``TorchDispatchMode``) is written down, in order, each tensor argument as a *slot*: one of
  the call's tensor arguments or an earlier op's result.
- **Keep or refuse.** The record becomes a plan only when everything in it is accounted for:
  each op is an allocation, fill, view or copy (:data:`REPLAYABLE_OPS`: pure functions of their
  arguments, no host read of tensor values); every tensor an op or kernel reads and every tensor
  FA4 returns is a slot; constants hold no tensor; and no kernel was compiled during the call
  (the first call of a key compiles, so a key gets :data:`ATTEMPTS` tries). Otherwise the key is
  served by FA4's own call from then on.
- **Replay.** The ops and kernels in order on this call's tensors; the result built as FA4
  built it.
- **Only keys that repeat.** A plan holds the sizes of what FA4 allocates, so a key includes
  the token counts. A key's first call is FA4's own; the second is recorded. Batches whose
  token counts change every call therefore pay only the key (a few microseconds) on top of
  FA4's call, never a recording; at most :data:`MAX_KEYS` keys are remembered (oldest first out).

The key holds what FA4's Python decides by: every non-tensor argument's value, every tensor
argument's shape, strides, dtype, device, ``requires_grad`` and 16-byte alignment, the grad
mode, the deterministic-algorithms flag and the current device. FA4 never reads a tensor's
values on the host (it would sync), so two calls of one key take the same path.

A kernel FA4 launched other than through a ``compile_cache`` would be missing from a plan; in
flash-attn-4 4.0.0b36 every launch goes through one, and only the releases read for it
(``_compat.FA4_REPLAY_VERSIONS``) are replayed. The GPU tests check replayed results against
FA4's own. FA4's environment switches (``FLASH_ATTENTION_*``) and its log level count as fixed
for the process: a plan keeps the choice FA4 made when it was recorded. Two arguments that are
one tensor (``k is v``) are part of the key.
Switch it off with ``varlen_compile.config.fa4_replay = False`` (env
``VARLEN_COMPILE_FA4_REPLAY=0``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from varlen_compile import _compat, config

__all__ = ["ATTEMPTS", "MAX_KEYS", "REPLAYABLE_OPS", "Replayer"]

log = logging.getLogger(__name__)

MAX_KEYS = 4096
"""Keys remembered per FA4 function (calls seen, plans, refusals); the oldest go first."""

ATTEMPTS = 3
"""Recording tries per key before it is left to FA4's own call (a try that compiled a kernel
does not count as a refusal of the key, but the tries are bounded all the same)."""

_aten = torch.ops.aten
REPLAYABLE_OPS = frozenset({
    # allocations and fills
    _aten.empty, _aten.empty_strided, _aten.empty_like, _aten.new_empty, _aten.new_empty_strided,
    _aten.zeros, _aten.zeros_like, _aten.new_zeros, _aten.full, _aten.full_like, _aten.new_full,
    _aten.zero_, _aten.fill_,
    # views and aliases
    _aten.detach, _aten.alias, _aten.view, _aten._unsafe_view, _aten.reshape, _aten.transpose, _aten.permute,
    _aten.t, _aten.unsqueeze, _aten.squeeze, _aten.select, _aten.slice, _aten.expand, _aten.as_strided,
    # copies
    _aten.clone, _aten.copy_, _aten._to_copy, _aten.contiguous,
})
"""aten ops (overload packets) a plan may replay: their effect follows from their arguments, and
none reads a tensor's values on the host."""


class _Slot(int):
    """A tensor argument in a recorded step: the index of its slot."""


class _Refused(Exception):
    """The record cannot become a plan (the message says why)."""


_CONSTANT_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format,
                   enum.Enum)


def _plain_constant(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` (a non-tensor argument of a recorded step) is made only of plain
    constants (numbers, strings, dtypes, devices, enums) in tuples, lists, dicts and dataclasses:
    a value a plan may reuse as it is. A tensor anywhere, an object of any other type (which
    could hold a tensor or a stream where we cannot see) or nesting past 8 levels is not."""
    if isinstance(value, _CONSTANT_TYPES):
        return True
    if isinstance(value, torch.Tensor) or depth > 8:
        return False
    if isinstance(value, (tuple, list)):
        return all(_plain_constant(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(_plain_constant(item, depth + 1) for item in (*value.keys(), *value.values()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_plain_constant(getattr(value, field.name), depth + 1) for field in dataclasses.fields(value))
    return False


@dataclasses.dataclass(frozen=True)
class _Step:
    """One recorded op or kernel call: ``function(*args, **kwargs)`` with slots for tensors."""

    function: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]
    arg_slots: tuple[tuple[int, int], ...]
    """``(position, slot)`` of the top-level tensor arguments."""
    kwarg_slots: tuple[tuple[str, int], ...]
    nested: bool
    """Whether a slot sits inside a list or tuple argument (then ``args``/``kwargs`` are filled
    recursively)."""
    results: tuple[int, ...]
    """Positions in the flattened result (one tensor: position 0) whose tensors become new slots."""
    is_kernel: bool


def _rebuild(like: tuple | list, items: list[Any]) -> tuple | list:
    """``items`` in ``like``'s type (a named tuple takes its fields positionally)."""
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


def _fill(value: Any, slots: list[torch.Tensor]) -> Any:
    if type(value) is _Slot:
        return slots[value]
    if isinstance(value, (tuple, list)):
        return _rebuild(value, [_fill(item, slots) for item in value])
    return value


def _flat_results(result: Any) -> list[Any]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _fast(function: Callable[..., Any]) -> Callable[..., Any]:
    """The cheapest callable with ``function``'s effect: ``Tensor.detach`` for aten's detach
    (an alias without autograd history), the builtin behind an ``OpOverload``."""
    if function is torch.ops.aten.detach.default:
        return torch.Tensor.detach
    return getattr(function, "_op", function) if isinstance(function, torch._ops.OpOverload) else function


@dataclasses.dataclass(frozen=True)
class _Plan:
    steps: tuple[_Step, ...]
    result: Any
    """FA4's return value with slots for its tensors."""

    def run(self, inputs: list[torch.Tensor]) -> Any:
        slots = list(inputs)
        for step in self.steps:
            if step.nested:
                result = step.function(*_fill(step.args, slots),
                                       **{name: _fill(value, slots) for name, value in step.kwargs.items()})
            else:
                args = list(step.args)
                for position, slot in step.arg_slots:
                    args[position] = slots[slot]
                if step.kwarg_slots:
                    kwargs = dict(step.kwargs)
                    for name, slot in step.kwarg_slots:
                        kwargs[name] = slots[slot]
                    result = step.function(*args, **kwargs)
                else:
                    result = step.function(*args, **step.kwargs)
            if step.results:
                if len(step.results) == 1 and step.results[0] == 0 and isinstance(result, torch.Tensor):
                    slots.append(result)
                else:
                    flat = _flat_results(result)
                    slots.extend(flat[position] for position in step.results)
        return _fill(self.result, slots)


class _Recording(TorchDispatchMode):
    """Writes down FA4's aten ops (as a dispatch mode) and compiled kernel calls (through
    :class:`_CacheProxy`) on the recording thread, with tensors as slots."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.slot_of: dict[int, int] = {id(tensor): index for index, tensor in enumerate(inputs)}
        self.alive: list[torch.Tensor] = list(inputs)  # keeps ids unique while recording
        self.steps: list[_Step] = []
        self.refusal: str | None = None
        self.compiled = False

    def refuse(self, why: str) -> None:
        if self.refusal is None:
            self.refusal = why

    def _template(self, value: Any, depth: int = 0) -> tuple[Any, bool]:
        """``value`` with its tensors as slots, and whether a slot is nested."""
        if isinstance(value, torch.Tensor):
            slot = self.slot_of.get(id(value))
            if slot is None:
                raise _Refused(f"a tensor argument ({tuple(value.shape)}, {value.dtype}) is none of the call's tensors")
            return _Slot(slot), depth > 0
        if isinstance(value, (tuple, list)) and depth < 4:
            items = [self._template(item, depth + 1) for item in value]
            return _rebuild(value, [item for item, _ in items]), any(nested for _, nested in items)
        if not _plain_constant(value):
            raise _Refused(f"a constant argument is not a plain constant ({type(value).__name__})")
        return value, False

    def _record(self, function: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], is_kernel: bool) -> _Step:
        template_args, template_kwargs, nested = [], {}, False
        for value in args:
            template, inner = self._template(value)
            template_args.append(template)
            nested = nested or inner
        for name, value in kwargs.items():
            template_kwargs[name], inner = self._template(value)
            nested = nested or inner
        arg_slots = tuple((position, int(v)) for position, v in enumerate(template_args) if type(v) is _Slot)
        kwarg_slots = tuple((name, int(v)) for name, v in template_kwargs.items() if type(v) is _Slot)
        return _Step(_fast(function), tuple(template_args), template_kwargs, arg_slots, kwarg_slots, nested, (),
                     is_kernel)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 -- the mode's protocol
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.refusal is not None or threading.get_ident() != self.thread:
            return result
        if func.overloadpacket not in REPLAYABLE_OPS:
            self.refuse(f"FA4 ran {func} on the host path")
            return result
        try:
            step = self._record(func, args, kwargs, is_kernel=False)
        except _Refused as error:
            self.refuse(f"{func}: {error}")
            return result
        new = []
        for position, value in enumerate(_flat_results(result)):
            if isinstance(value, torch.Tensor) and id(value) not in self.slot_of:
                self.slot_of[id(value)] = len(self.alive)
                self.alive.append(value)
                new.append(position)
        self.steps.append(dataclasses.replace(step, results=tuple(new)))
        return result

    def kernel(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.refusal is None:
            try:
                self.steps.append(self._record(function, args, kwargs, is_kernel=True))
            except _Refused as error:
                self.refuse(f"a compiled kernel's argument: {error}")
        with _compat.no_dispatch_modes():  # the launch's own conversions are not FA4's Python
            return function(*args, **kwargs)

    def plan(self, result: Any) -> _Plan:
        if self.compiled:
            raise _Refused("FA4 compiled a kernel during the call")
        if self.refusal is not None:
            raise _Refused(self.refusal)
        if not any(step.is_kernel for step in self.steps):
            raise _Refused("FA4 launched no compiled kernel through a compile cache")
        template, _ = self._template(result)
        return _Plan(tuple(self.steps), template)


class _CacheProxy:
    """Stands in for one FA4 ``compile_cache`` while a call is recorded: the recording thread's
    lookups return the kernel wrapped by :meth:`_Recording.kernel`, and a compile is noted."""

    def __init__(self, cache: Any, recording: _Recording) -> None:
        self._cache, self._recording = cache, recording

    def __contains__(self, key: Any) -> bool:
        return key in self._cache

    def __getitem__(self, key: Any) -> Any:
        function = self._cache[key]
        if threading.get_ident() != self._recording.thread:
            return function
        recording = self._recording
        return lambda *args, **kwargs: recording.kernel(function, *args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        if threading.get_ident() == self._recording.thread:
            self._recording.compiled = True
        self._cache[key] = value

    def __getattr__(self, name: str) -> Any:
        # Any other use of the cache (``get``, its dict) could reach a kernel unrecorded.
        if threading.get_ident() == self._recording.thread:
            self._recording.refuse(f"FA4 used its compile cache's {name!r}")
        return getattr(self._cache, name)


def _compile_caches(package: str) -> list[tuple[Any, Any]]:
    """``(owner, cache)`` of every ``compile_cache`` attribute on the functions of ``package``'s
    loaded modules."""
    found, seen = [], set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in list(vars(module).values()):
            cache = getattr(value, "compile_cache", None) if callable(value) else None
            if cache is not None and id(value) not in seen:
                seen.add(id(value))
                found.append((value, cache))
    return found


_RECORD_LOCK = threading.Lock()


def _remember(table: dict[tuple, Any], key: tuple, value: Any) -> None:
    """``table[key] = value``, dropping the oldest key beyond :data:`MAX_KEYS`."""
    table[key] = value
    if len(table) > MAX_KEYS:
        try:
            table.pop(next(iter(table)), None)
        except (StopIteration, RuntimeError):  # emptied or resized by another thread meanwhile
            pass


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, tensor.requires_grad,
            tensor.data_ptr() % 16)


class Replayer:
    """One FA4 function (``interface.<name>``), called with keywords only, replayed per key
    (see the module docstring). ``package``: the modules whose compile caches are watched;
    ``audited``: whether the installed FA4 is one whose calls may be replayed (else every call
    is FA4's own)."""

    def __init__(self, name: str, package: str = "flash_attn.cute",
                 audited: Callable[[], bool] = lambda: True) -> None:
        self.name, self.package, self.audited = name, package, audited
        self._plans: dict[tuple, _Plan | None] = {}
        self._tries: dict[tuple, int] = {}
        self._seen: dict[tuple, int] = {}

    def clear(self) -> None:
        self._plans.clear()
        self._tries.clear()
        self._seen.clear()

    def __call__(self, interface: Any, **kwargs: Any) -> Any:
        function = getattr(interface, self.name)
        if not config.fa4_replay or not self.audited():
            return function(**kwargs)
        key, inputs = self._key(kwargs)
        try:
            plan = self._plans.get(key, False)
        except TypeError:  # an argument we cannot key on (unhashable): FA4's own call
            return function(**kwargs)
        if plan:
            return plan.run(inputs)
        if plan is None or self._tries.get(key, 0) >= ATTEMPTS:
            return function(**kwargs)
        if key not in self._seen:  # a key's first call: FA4's own (most keys never repeat)
            _remember(self._seen, key, 1)
            return function(**kwargs)
        return self._record(key, function, kwargs, inputs)

    @staticmethod
    def _key(kwargs: Mapping[str, Any]) -> tuple[tuple, list[torch.Tensor]]:
        parts, inputs = [torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled()], []
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                inputs.append(value)
                parts.append((name, _tensor_key(value)))
            else:
                parts.append((name, value))
        if inputs and inputs[0].is_cuda:
            parts.append(torch.cuda.current_device())
        if len({id(tensor) for tensor in inputs}) < len(inputs):  # one tensor passed twice (k is v)
            first: dict[int, int] = {}
            parts.append(tuple(first.setdefault(id(tensor), index) for index, tensor in enumerate(inputs)))
        return tuple(parts), inputs

    def _record(self, key: tuple, function: Callable[..., Any], kwargs: dict[str, Any],
                inputs: list[torch.Tensor]) -> Any:
        if not _RECORD_LOCK.acquire(blocking=False):  # another thread is recording: call plainly
            return function(**kwargs)
        try:
            _remember(self._tries, key, self._tries.get(key, 0) + 1)
            recording = _Recording(inputs)
            caches = _compile_caches(self.package)
            for owner, cache in caches:
                owner.compile_cache = _CacheProxy(cache, recording)
            try:
                with recording:
                    result = function(**kwargs)
            finally:
                for owner, cache in caches:
                    owner.compile_cache = cache
            try:
                plan = recording.plan(result)
                _remember(self._plans, key, plan)
                log.debug("FA4 %s: replaying a plan of %d steps from now on", self.name, len(plan.steps))
            except _Refused as error:
                if not recording.compiled:
                    _remember(self._plans, key, None)
                log.debug("FA4 %s: no plan for this key (%s)", self.name, error)
            return result
        finally:
            _RECORD_LOCK.release()
