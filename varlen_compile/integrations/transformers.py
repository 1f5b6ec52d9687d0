"""Hugging Face transformers integration: ``attn_implementation="varlen_compile"``.

Importing this module registers :func:`varlen_attention_forward` with transformers'
``AttentionInterface`` and :func:`varlen_attention_mask` with its ``AttentionMaskInterface``
under the name :data:`ATTN_IMPLEMENTATION`::

    import varlen_compile.integrations.transformers  # noqa: F401  (registers "varlen_compile")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="varlen_compile")

Every batch layout a model sees becomes one packed call of :func:`varlen_compile.varlen_attn`,
with sequence boundaries computed on the device at fixed shapes (no host sync, no data-dependent
size, so ``torch.compile(model, fullgraph=True)`` works):

- **packed** (``DataCollatorWithFlattening``): the ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs when
  the collator returns them (``return_flash_attn_kwargs=True``: the fastest), else boundaries
  where ``position_ids`` do not increase by one (``(B * L) + 1`` offsets, most of them empty);
- **padded** (a 2D ``attention_mask``, left or right padding): per row, the valid run and the
  padding become separate sequences; padding queries attend no key (their output is 0) and
  padding keys are attended by no query, so padding costs almost nothing;
- **plain** batches (no mask, no packing) and generation with a KV cache: one sequence per row,
  the queries aligned with the last keys (causal masking is bottom-right aligned).

Passed through: ``scaling``, ``sliding_window`` (a window of that many tokens, as transformers'
FlashAttention path), ``is_causal``, ``softcap`` (Gemma 2/3) and ``s_aux`` (gpt-oss's attention
sinks, differentiable). Under autocast, float32 q/k/v run in the autocast dtype (as transformers'
FlashAttention and SDPA paths do). Each is checked as :func:`varlen_compile.varlen_attn` checks
its own arguments, with errors in transformers' names. Not supported yet, each with a clear
error: attention dropout, ``output_attentions``, 4D masks. Masks are padding masks, as with
FlashAttention in transformers: custom mask functions (``or_mask_function`` and
``and_mask_function`` overlays) are not applied.
"""

from __future__ import annotations

import logging

import torch

from .._tracing import is_traced
from ..api import attend
from ..validation import Caller, check_dropout, check_flag, check_hint, check_tensor, describe

__all__ = ["ATTN_IMPLEMENTATION", "register", "varlen_attention_forward", "varlen_attention_mask"]

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "varlen_compile"

# Our argument names -> transformers' (the attention function's arguments and kwargs).
_NAMES = {
    "scale": "scaling", "sink": "s_aux", "cu_seq_q": "cu_seq_lens_q", "cu_seq_k": "cu_seq_lens_k",
    "max_q": "max_length_q", "max_k": "max_length_k",
}
_DERIVED_OFFSETS = {"cu_seq_q": "the query offsets built from the batch", "cu_seq_k": "the key offsets built from the batch"}


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on :func:`varlen_compile.varlen_attn`.

    Args:
        query: ``(B, H_q, L_q, D)``; key, value: ``(B, H_kv, L_k, D)`` (``L_k >= L_q`` with a KV
            cache: the queries are the last ``L_q`` positions).
        attention_mask: None, or the 2D padding mask ``(B, L_k)`` from
            :func:`varlen_attention_mask` (bool or integer, 1 = token, 0 = padding; one
            contiguous run per row).
        is_causal: a bool, or None for ``module.is_causal`` (default True).
        sliding_window: None, or an int >= 1: each query attends that many keys, itself included.
        kwargs: ``cu_seq_lens_q``/``cu_seq_lens_k`` (both or neither; int32, on the query's
            device) and ``position_ids`` of packed batches; ``max_length_q``/``max_length_k``.

    Every argument is checked as :func:`varlen_compile.varlen_attn` checks its own (no value is
    coerced: flags are bools, offsets int32 tensors, ``scaling`` a finite float), and errors
    name transformers' arguments (``scaling``, ``sliding_window``, ``cu_seq_lens_q``, ``s_aux``).

    Returns:
        ``(out, None)``: ``out`` ``(B, L_q, H_q, D)`` (zeros at padding positions), no weights.
    """
    caller = _caller(module, is_causal, kwargs)
    _check_supported(caller, dropout, attention_mask, kwargs)
    is_causal = check_flag(caller, "is_causal", getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = _window(caller, sliding_window, is_causal)
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _check_bhld(caller, name, tensor)
    query, key, value = _autocast(query, key, value)
    if attention_mask is not None and key.shape[2] > attention_mask.shape[-1]:
        # A static cache holds more slots than the mask covers: the rest is not written yet.
        key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
    batch, heads_q, len_q, _ = query.shape
    len_k = key.shape[2]
    cu_seq_q, cu_seq_k = _offsets(caller, attention_mask, kwargs, batch, len_q, len_k, query.device)
    max_q = check_hint(caller, "max_q", kwargs.get("max_length_q"), ignore_tensor=True)
    max_k = check_hint(caller, "max_k", kwargs.get("max_length_k"), ignore_tensor=True)
    out, _ = attend(
        caller, _packed(query), _packed(key), _packed(value), cu_seq_q, cu_seq_k,
        len_q if max_q is None else max_q, len_k if max_k is None else max_k, is_causal, scale=scaling,
        window_size=window, enable_gqa=True, softcap=softcap, sink=s_aux,
    )
    return out.view(batch, len_q, heads_q, value.shape[-1]), None


def _caller(module: torch.nn.Module, is_causal: object, kwargs: dict) -> Caller:
    """Errors name the module's class and transformers' arguments (``module.is_causal`` when
    ``is_causal`` comes from there; the built offsets when the batch gave none)."""
    names = dict(_NAMES)
    if kwargs.get("cu_seq_lens_q") is None and kwargs.get("cu_seq_lens_k") is None:
        names.update(_DERIVED_OFFSETS)
    if is_causal is None:
        names["is_causal"] = "module.is_causal"
    return Caller(f"attn_implementation='varlen_compile' ({type(module).__name__})", names)


def varlen_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask our attention function takes: the 2D padding mask ``(B, kv_length)`` as is (sliced
    to the keys, as FlashAttention's), or None. Unlike transformers' FlashAttention mask it never
    asks whether the mask is all ones (a host sync, and a graph break under compile)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def register() -> str:
    """Register the attention function and its mask function with transformers (idempotent);
    returns the ``attn_implementation`` name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, varlen_attention_mask)
    return ATTN_IMPLEMENTATION


def _check_supported(caller: Caller, dropout: object, attention_mask: object, kwargs: dict) -> None:
    check_dropout(caller, "dropout", dropout, "set the config's attention_dropout to 0.0")
    if kwargs.get("output_attentions"):
        raise ValueError(
            caller.message(
                "computes no attention weights; pass output_attentions=False, or use "
                "attn_implementation='eager' to inspect them"
            )
        )
    if (kwargs.get("cu_seq_lens_q") is None) != (kwargs.get("cu_seq_lens_k") is None):
        raise ValueError(
            caller.message(
                "got only one of cu_seq_lens_q and cu_seq_lens_k; pass both (DataCollatorWithFlattening("
                "return_flash_attn_kwargs=True) returns both) or neither"
            )
        )
    if attention_mask is None:
        return
    check_tensor(caller, "attention_mask", attention_mask, " (the 2D padding mask) or None")
    if attention_mask.dim() != 2:
        raise ValueError(
            caller.message(
                f"takes 2D padding masks (batch, keys), got a {attention_mask.dim()}D mask of shape "
                f"{tuple(attention_mask.shape)}: pass the tokenizer's attention_mask and let the model build its mask"
            )
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(
            caller.message(
                f"attention_mask must be a bool or integer padding mask (1 = token, 0 = padding), got "
                f"{attention_mask.dtype}; additive float masks are not supported"
            )
        )


def _window(caller: Caller, sliding_window: object, is_causal: bool) -> tuple[int, int]:
    """transformers' ``sliding_window`` (a window of that many tokens) as ``(left, right)``."""
    if sliding_window is None:
        return -1, -1
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool):
        raise TypeError(caller.message(f"sliding_window must be an int or None, got {describe(sliding_window)}"))
    if sliding_window < 1:
        raise ValueError(
            caller.message(f"sliding_window must be >= 1 (the number of tokens a query attends) or None, got {sliding_window}")
        )
    return sliding_window - 1, 0 if is_causal else sliding_window - 1


def _check_bhld(caller: Caller, name: str, tensor: object) -> None:
    check_tensor(caller, name, tensor)
    if tensor.dim() != 4:
        raise ValueError(
            caller.message(f"{name} must be 4-D (batch, heads, length, head_dim), got shape {tuple(tensor.shape)}")
        )


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, float32 q/k/v (rotary embeddings promote them) run in the autocast dtype,
    as transformers' FlashAttention and SDPA paths do."""
    device_type = tensors[0].device.type
    if tensors[0].dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(tensor.to(dtype) for tensor in tensors)
    return tensors


def _packed(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B * L, H, D)``: a view for transformers' usual layouts (projections
    viewed as ``(B, L, H, D)`` and transposed), a copy otherwise."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, head_dim)


def _offsets(
    caller: Caller,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
    batch: int,
    len_q: int,
    len_k: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_seq_q``, ``cu_seq_k`` for the packed ``(B * L, H, D)`` tensors: the collator's, as
    given (``varlen_attn``'s checks see them), else int32 offsets built on the device."""
    cu_seq_q, cu_seq_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seq_q is not None:
        return cu_seq_q, cu_seq_k
    if attention_mask is not None:
        _check_on_device(caller, "attention_mask", attention_mask, device)
        if tuple(attention_mask.shape) != (batch, len_k):
            raise ValueError(
                caller.message(
                    f"attention_mask must be (batch, keys) = {(batch, len_k)}, got shape {tuple(attention_mask.shape)}"
                )
            )
        if len_q > len_k:
            raise ValueError(
                caller.message(f"attention_mask covers {len_k} keys, fewer than the {len_q} queries")
            )
        return _padded_offsets(caller, attention_mask, len_q, len_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and len_q == len_k:
        check_tensor(caller, "position_ids", position_ids)
        _check_on_device(caller, "position_ids", position_ids, device)
        cu_seq = _position_id_offsets(position_ids.expand(batch, -1))
        return cu_seq, cu_seq
    rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return rows * len_q, rows * len_k


def _check_on_device(caller: Caller, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(caller.message(f"{name} is on {tensor.device}, query on {device}; move it with .to(query.device)"))


def _padded_offsets(caller: Caller, mask: torch.Tensor, len_q: int, len_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets for a padded batch: five sequences per row, in token order.

    Row ``b`` has keys ``[0, len_k)`` with one valid run ``[first, end)``; its queries are the
    last ``len_q`` key positions. The sequences (queries, keys) are: (queries before the run, 0),
    (0, keys before the run), (queries in the run, keys in the run), (queries after the run, 0),
    (0, keys after the run). Padding queries thus attend no key (output 0, nothing computed), and
    the run's last query meets its last key, so bottom-right causal masking is right also with a
    KV cache. All on the device, at fixed shapes.
    """
    if not is_traced(mask):
        _check_mask_values(caller, mask)
    mask = mask.to(torch.bool)
    lengths = mask.sum(-1)
    first = torch.where(lengths > 0, mask.to(torch.int32).argmax(-1), len_k)
    end = first + lengths
    q_start = len_k - len_q
    before_q = (first - q_start).clamp(0, len_q)
    after_q = (len_k - end).clamp(0, len_q)
    zeros = torch.zeros_like(lengths)
    parts_q = torch.stack([before_q, zeros, len_q - before_q - after_q, after_q, zeros], dim=-1)
    parts_k = torch.stack([zeros, first, lengths, zeros, len_k - end], dim=-1)
    return _cumulative(parts_q.flatten()), _cumulative(parts_k.flatten())


def _check_mask_values(caller: Caller, mask: torch.Tensor) -> None:
    """Eager only (one host sync): 0/1 values, and each row's tokens one contiguous run."""
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(caller.message("attention_mask must hold only 0 (padding) and 1 (token)"))
        mask = mask.to(torch.bool)
    starts = mask[:, :1].sum(-1) + (mask[:, 1:] & ~mask[:, :-1]).sum(-1)
    if bool((starts > 1).any()):
        rows = torch.nonzero(starts > 1).flatten().tolist()
        raise ValueError(
            caller.message(
                "each row of attention_mask must hold one contiguous run of tokens (left or right padding); "
                f"rows {rows} have gaps. Pack such rows as separate sequences (DataCollatorWithFlattening) instead"
            )
        )


def _position_id_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    """Offsets of packed sequences from ``position_ids`` ``(B, L)``: a sequence starts at each row
    start and wherever the position does not grow by one (as transformers'
    ``find_packed_sequence_indices``). Fixed size ``B * L + 1`` (the number of sequences is data):
    the starts sorted first, then empty sequences at the end."""
    previous = torch.cat([position_ids[:, :1], position_ids[:, :-1]], dim=-1)  # row starts: p != p + 1
    starts = (position_ids != previous + 1).flatten()
    total = starts.shape[0]
    index = torch.arange(total, device=starts.device)
    boundaries = torch.where(starts, index, total).sort().values
    return torch.cat([boundaries, boundaries.new_full((1,), total)]).to(torch.int32)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


register()
