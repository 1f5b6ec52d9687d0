"""Hugging Face transformers integration: attn_implementation="varlen_compile" against
transformers' own "eager" attention, on packed, padded and plain batches, forward and backward,
eager and compiled, and generation with a KV cache. Tiny models built from configs (no
downloads). GPU tests check that the compiled model runs our templates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
import varlen_compile.integrations.transformers as varlen_hf  # noqa: E402  (registers "varlen_compile")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

VOCAB = 96


def _llama(attn_implementation: str, **overrides) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, **overrides,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.float32)


def _pair(**overrides):
    """Two identical models: transformers' eager attention and ours."""
    eager = _llama("eager", **overrides)
    eager.config._attn_implementation = "eager"
    ours = copy.deepcopy(eager)
    ours.config._attn_implementation = varlen_hf.ATTN_IMPLEMENTATION
    return eager, ours


def _loss_and_grads(model, batch: dict, valid: torch.Tensor):
    """Logits at valid positions, the loss over them and the parameter gradients. No KV cache, as
    in training (transformers' eager attention ignores packing when a cache is passed)."""
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits
    targets = torch.randint(0, VOCAB, logits.shape[:-1], generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}
    return logits[valid].detach(), loss.detach(), grads


def _assert_same(ours, eager, what: str) -> None:
    torch.testing.assert_close(ours, eager, rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


def _assert_pair_matches(eager, ours, batch_eager: dict, batch_ours: dict, valid: torch.Tensor) -> None:
    eager_logits, eager_loss, eager_grads = _loss_and_grads(eager, batch_eager, valid)
    our_logits, our_loss, our_grads = _loss_and_grads(ours, batch_ours, valid)
    _assert_same(our_logits, eager_logits, "logits")
    _assert_same(our_loss, eager_loss, "loss")
    for name, grad in eager_grads.items():
        _assert_same(our_grads[name], grad, f"grad {name}")


LENGTHS = [5, 11, 1, 7]


def _packed_batch(lengths=LENGTHS) -> tuple[dict, dict]:
    """A DataCollatorWithFlattening batch (position_ids and the FlashAttention kwargs)."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    features = [{"input_ids": torch.randint(0, VOCAB, (n,)).tolist()} for n in lengths]
    batch = collator(features)
    flash_kwargs = {key: batch[key] for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, flash_kwargs


@pytest.mark.parametrize("with_flash_kwargs", [False, True], ids=["position-ids", "cu-seq-lens"])
def test_packed_batch_matches_eager(with_flash_kwargs):
    eager, ours = _pair()
    batch, flash_kwargs = _packed_batch()
    valid = torch.ones(batch["input_ids"].shape, dtype=torch.bool)
    _assert_pair_matches(eager, ours, batch, {**batch, **(flash_kwargs if with_flash_kwargs else {})}, valid)


def test_padded_batch_matches_eager():
    """Right padding, left padding, a full row and a row of one token."""
    eager, ours = _pair()
    input_ids = torch.randint(0, VOCAB, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, :4] = 0
    mask[3, :9] = 0
    batch = {"input_ids": input_ids, "attention_mask": mask}
    _assert_pair_matches(eager, ours, batch, batch, mask.bool())


def test_plain_batch_and_sliding_window_match_eager():
    eager, ours = _pair(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    batch = {"input_ids": torch.randint(0, VOCAB, (3, 9))}
    _assert_pair_matches(eager, ours, batch, batch, torch.ones(3, 9, dtype=torch.bool))


def test_generation_with_kv_cache_matches_eager():
    """Greedy decoding of a left-padded batch: the same tokens as transformers' eager attention."""
    eager, ours = _pair()
    input_ids = torch.randint(0, VOCAB, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    kwargs = {"input_ids": input_ids, "attention_mask": mask, "max_new_tokens": 7, "do_sample": False}
    assert torch.equal(ours.eval().generate(**kwargs), eager.eval().generate(**kwargs))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_compiled_fullgraph_matches_eager(layout):
    """torch.compile(model, fullgraph=True): one frame, no graph break, equal to eager."""
    torch._dynamo.reset()
    eager, ours = _pair()
    if layout == "packed":
        batch, flash_kwargs = _packed_batch()
        batch_ours = {**batch, **flash_kwargs}
        valid = torch.ones(batch["input_ids"].shape, dtype=torch.bool)
    else:
        batch = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.tensor([[1] * 8, [0] * 3 + [1] * 5])}
        batch_ours, valid = batch, batch["attention_mask"].bool()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    eager_logits, _, eager_grads = _loss_and_grads(eager, batch, valid)
    our_logits, _, our_grads = _loss_and_grads(compiled, batch_ours, valid)
    assert counter.frame_count == 1
    _assert_same(our_logits, eager_logits, "logits")
    for name, grad in eager_grads.items():
        _assert_same(our_grads[name], grad, f"grad {name}")
    torch._dynamo.reset()


def test_unsupported_features_raise_clear_errors():
    _, ours = _pair()
    batch = {"input_ids": torch.randint(0, VOCAB, (1, 5))}
    with pytest.raises(ValueError, match="computes no attention weights"):
        ours(**batch, output_attentions=True)
    holes = {"input_ids": torch.randint(0, VOCAB, (1, 6)), "attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1]])}
    with pytest.raises(ValueError, match=r"one contiguous run of tokens .* rows \[0\] have gaps"):
        ours(**holes)
    attention = ours.model.layers[0].self_attn
    q = torch.randn(1, 6, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    for kwargs, pattern in (({"dropout": 0.1}, r"dropout=0.1: dropout is not supported yet; set the config's attention_dropout"),):
        with pytest.raises(ValueError, match=pattern):
            varlen_hf.varlen_attention_forward(attention, q, kv, kv, None, **kwargs)
    with pytest.raises(ValueError, match="takes 2D padding masks"):
        varlen_hf.varlen_attention_forward(attention, q, kv, kv, torch.zeros(1, 1, 5, 5))


def _attention_module() -> torch.nn.Module:
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    return module


def _attention_call(**overrides) -> dict:
    """A valid call of our attention function (B=1, 6 over 2 heads, 5 tokens), then overrides."""
    torch.manual_seed(0)
    kwargs = {"module": _attention_module(), "query": torch.randn(1, 6, 5, 8), "key": torch.randn(1, 2, 5, 8),
              "value": torch.randn(1, 2, 5, 8), "attention_mask": None}
    return {**kwargs, **overrides}


def _module_with(**attributes) -> torch.nn.Module:
    module = _attention_module()
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


HF = r"attn_implementation='varlen_compile' \(Module\): "
ATTENTION_ERRORS = {
    "is-causal-string": ({"is_causal": "no"}, TypeError, r"is_causal must be a bool \(True or False\), got 'no'"),
    "module-is-causal-string": ({"module": _module_with(is_causal="yes")}, TypeError,
                                r"module.is_causal must be a bool \(True or False\), got 'yes'"),
    "sliding-window-negative": ({"sliding_window": -3}, ValueError,
                                r"sliding_window must be >= 1 \(the number of tokens a query attends\) or None, got -3"),
    "sliding-window-float": ({"sliding_window": 2.5}, TypeError, r"sliding_window must be an int or None, got 2.5"),
    "sliding-window-bool": ({"sliding_window": True}, TypeError, r"sliding_window must be an int or None, got True"),
    "scaling-inf": ({"scaling": float("inf")}, ValueError, r"scaling must be finite, got inf"),
    "scaling-numpy": ({"scaling": np.float64(0.3)}, TypeError, r"scaling must be a float or None .* float\(scaling\)"),
    "softcap-string": ({"softcap": "a"}, TypeError, r"softcap must be a float \(None or 0.0 = off\), got 'a'"),
    "sinks-list": ({"s_aux": [0.0] * 6}, TypeError, r"s_aux must be a torch.Tensor of shape \(H_q,\) or None"),
    "dropout-string": ({"dropout": "0.1"}, TypeError, r"dropout must be a float or None, got '0.1'"),
    "cu-seq-lens-q-alone": ({"cu_seq_lens_q": torch.tensor([0, 2, 5], dtype=torch.int32)}, ValueError,
                            r"got only one of cu_seq_lens_q and cu_seq_lens_k; pass both"),
    "cu-seq-lens-int64": ({"cu_seq_lens_q": torch.tensor([0, 2, 5]), "cu_seq_lens_k": torch.tensor([0, 2, 5])},
                          ValueError, r"cu_seq_lens_q must be int32, got torch.int64"),
    "max-length-float": ({"max_length_q": 3.5}, TypeError, r"max_length_q must be an int or None, got 3.5"),
    "mask-float": ({"attention_mask": torch.ones(1, 5)}, ValueError, r"attention_mask must be a bool or integer padding mask"),
    "mask-values": ({"attention_mask": torch.tensor([[1, 1, 2, 1, 1]])}, ValueError,
                    r"attention_mask must hold only 0 \(padding\) and 1 \(token\)"),
    "mask-shape": ({"attention_mask": torch.ones(1, 6, dtype=torch.long)}, ValueError,
                   r"attention_mask must be \(batch, keys\) = \(1, 5\), got shape \(1, 6\)"),
    "mask-short": ({"attention_mask": torch.ones(1, 4, dtype=torch.long)}, ValueError,
                   r"attention_mask covers 4 keys, fewer than the 5 queries"),
    "query-3d": ({"query": torch.randn(6, 5, 8)}, ValueError, r"query must be 4-D \(batch, heads, length, head_dim\)"),
}


@pytest.mark.parametrize("overrides, error, pattern", ATTENTION_ERRORS.values(), ids=ATTENTION_ERRORS.keys())
def test_attention_function_errors_name_transformers_arguments(overrides, error, pattern):
    with pytest.raises(error, match=f"^{HF}{pattern}"):
        varlen_hf.varlen_attention_forward(**_attention_call(**overrides))


def test_attention_function_compiled_rejects_the_same():
    """fullgraph=True: the same errors, our message in what Dynamo reports."""
    import re

    for name in ("is-causal-string", "sliding-window-negative", "scaling-inf", "cu-seq-lens-q-alone"):
        overrides, error, pattern = ATTENTION_ERRORS[name]
        torch._dynamo.reset()
        compiled = torch.compile(varlen_hf.varlen_attention_forward, backend="eager", fullgraph=True)
        with pytest.raises((error, torch._dynamo.exc.Unsupported)) as raised:
            compiled(**_attention_call(**overrides))
        text = str(raised.value) + str(raised.value.__cause__)
        assert re.search(HF + pattern, text), f"{name}: {text}"
    torch._dynamo.reset()


def test_packed_offsets_keep_documents_apart():
    """With both cu_seq_lens, documents do not attend each other: the result is each document's
    own attention (checked against the plain rows)."""
    call = _attention_call()
    cu_seq = torch.tensor([0, 2, 5], dtype=torch.int32)
    packed, _ = varlen_hf.varlen_attention_forward(**call, cu_seq_lens_q=cu_seq, cu_seq_lens_k=cu_seq)
    for start, end in ((0, 2), (2, 5)):
        alone = {**call, **{name: call[name][:, :, start:end] for name in ("query", "key", "value")}}
        expected, _ = varlen_hf.varlen_attention_forward(**alone)
        torch.testing.assert_close(packed[:, start:end], expected, rtol=1e-6, atol=1e-6)


def test_softcap_and_sinks_match_transformers_eager():
    """Gemma 2's softcap and gpt-oss's sinks (s_aux) through our attention function, against
    transformers' own eager attention of those models on the same (unpadded) batch."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gpt_oss import modeling_gpt_oss

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    causal = torch.full((5, 5), float("-inf")).triu(1)[None, None].expand(2, 1, 5, 5)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 3, False
    module.sinks = torch.randn(6)
    ours, _ = varlen_hf.varlen_attention_forward(module, q, k, v, None, scaling=0.35, softcap=2.0)
    theirs, _ = modeling_gemma2.eager_attention_forward(module, q, k, v, causal, scaling=0.35, softcap=2.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours, _ = varlen_hf.varlen_attention_forward(module, q, k, v, None, scaling=0.35, s_aux=module.sinks)
    theirs, _ = modeling_gpt_oss.eager_attention_forward(module, q, k, v, causal, scaling=0.35)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_registered_under_its_name():
    assert varlen_hf.register() == "varlen_compile"
    assert transformers.AttentionInterface._global_mapping["varlen_compile"] is varlen_hf.varlen_attention_forward
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="varlen_compile")
    assert model.config._attn_implementation == "varlen_compile"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_gpu_compiled_model_runs_our_templates(layout):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    eager, ours = _pair()
    eager, ours = eager.cuda().to(torch.bfloat16), ours.cuda().to(torch.bfloat16)
    if layout == "packed":
        batch, flash_kwargs = _packed_batch([130, 7, 64, 1])
        batch = {key: value.cuda() for key, value in batch.items()}
        # The collator's max_length_* are ints (host hints); the offsets are tensors.
        batch_ours = {**batch, **{key: value.cuda() if torch.is_tensor(value) else value for key, value in flash_kwargs.items()}}
    else:
        mask = torch.ones(3, 96, dtype=torch.long, device="cuda")
        mask[0, 60:] = 0
        mask[1, :33] = 0
        batch = {"input_ids": torch.randint(0, VOCAB, (3, 96), device="cuda"), "attention_mask": mask}
        batch_ours = batch
    compiled = torch.compile(ours, fullgraph=True)

    def step():
        logits = compiled(**batch_ours, use_cache=False).logits
        logits.float().square().mean().backward()
        return logits

    logits, codes = run_and_get_code(step)
    source = "\n".join(codes)
    assert "varlen_fwd_tile(" in source and "varlen_bwd_dkdv_tile(" in source
    expected = eager(**batch, use_cache=False).logits
    valid = batch.get("attention_mask", torch.ones(batch["input_ids"].shape, device="cuda")).bool()
    # bf16 end to end through two layers: compare at the scale of bf16 rounding.
    torch.testing.assert_close(logits[valid].float(), expected[valid].float(), rtol=0.05, atol=0.05)
    torch._dynamo.reset()


def test_packed_training_example_runs(tmp_path, capsys):
    """examples/hf_packed_training.py at a CPU size: packed (ours) and padded (sdpa) runs on the
    same documents and weights give the same losses here (fp32 on the CPU), the verdict is PASS,
    and the JSON is valid JSON that records the model that ran."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "hf_packed_training.py"
    spec = importlib.util.spec_from_file_location("hf_packed_training", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert not Path(example.parse_args([]).out).resolve().is_relative_to(path.parent.parent), "default --out in the repo"
    results = example.main(["--tiny", "--steps", "3", "--no-compile", "--impls", "varlen_compile,sdpa", "--out", str(tmp_path)])
    torch.testing.assert_close(results["varlen_compile"]["losses"], results["sdpa"]["losses"], rtol=1e-4, atol=1e-4)
    assert "PASS: varlen_compile: 3 finite losses" in capsys.readouterr().out
    assert (tmp_path / "hf_packed_training.md").exists()
    saved = json.loads((tmp_path / "hf_packed_training.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert {key: saved["settings"][key] for key in ("layers", "d_model", "heads", "kv_heads", "vocab")} == {
        "layers": 2, "d_model": 64, "heads": 4, "kv_heads": 2, "vocab": 256}
    ours = saved["results"]["varlen_compile"]
    assert ours["peak_gib"] is None and ours["timed_steps"] == 2 and ours["tokens_per_s"] > 0
    # A later run with the same settings adds its implementation to the table (the GPU
    # comparison runs one implementation per process); other settings start a new table.
    more = example.main(["--tiny", "--steps", "3", "--no-compile", "--impls", "eager", "--out", str(tmp_path)])
    assert set(more) == {"varlen_compile", "sdpa", "eager"}
    torch.testing.assert_close(more["eager"]["losses"], results["sdpa"]["losses"], rtol=1e-4, atol=1e-4)
    table = (tmp_path / "hf_packed_training.md").read_text()
    assert all(f"| {name} |" in table for name in ("varlen_compile", "sdpa", "eager")), table
    other = example.main(["--tiny", "--steps", "2", "--no-compile", "--impls", "eager", "--out", str(tmp_path)])
    assert set(other) == {"eager"}
