"""Packed (padding-free) training of a Hugging Face Llama-style model with varlen_compile.

A causal LM is built from a small config (random init; no download): by default 8 layers,
d_model 1024, 16 query heads over 4 kv heads. It is trained on packed batches of
random-length documents: DataCollatorWithFlattening, with its FlashAttention kwargs. The model is
compiled whole (``torch.compile(model, fullgraph=True)``) with ``attn_implementation=
"varlen_compile"``. A tqdm bar shows tokens/s and the loss, and the loss curve is saved as a PNG.

The documents are synthetic but learnable: each repeats a random motif of 3-24 tokens, so the
loss falls as the model learns to copy (no text corpus is needed offline).

``--compare`` trains the same initial weights on the same documents with transformers' other
attention implementations:
- ``sdpa``: the documents padded into a batch, with an attention mask;
- ``flex_attention``: packed, with its document block mask;
- ``eager``: padded.
It reports tokens/s and peak memory of each, checks that our loss curve matches ``sdpa``'s within
bf16 noise, and writes the table (JSON and markdown) and the curves. Tokens/s counts only steps
that compiled nothing (the padded batches change shape, so ``sdpa`` recompiles a few times after
the warm-up steps). Results are written after each implementation and merged with those already
in ``--out`` for the same settings, so the comparison can run one implementation per process
(``--impls sdpa``, then ``--impls flex_attention,eager``). A run that exhausts GPU memory (padded
``eager`` materializes every batch row's full attention matrix) is reported as such.

It ends with a PASS/FAIL verdict: every loss is finite, the loss goes down over the run (from 8
steps on), and with ``sdpa`` in the comparison our loss curve matches its curve (within 1%
relative in bf16, 1e-4 in float32). Needs ``pip install -e ".[transformers]"``; the loss-curve
plot also needs matplotlib (``pip install -e ".[bench]"``).

    python examples/hf_packed_training.py                    # 50 steps, ours only (CUDA)
    python examples/hf_packed_training.py --compare          # + sdpa, flex_attention, eager
    python examples/hf_packed_training.py --tiny --steps 4   # a tiny CPU-sized run

Results (JSON, markdown table, PNG) go to ``--out``, by default a folder in the system's
temporary directory, outside the source tree.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

try:
    import transformers
    from tqdm import tqdm
except ModuleNotFoundError as missing:
    raise SystemExit(
        f"examples/hf_packed_training.py needs Hugging Face transformers ({missing}): "
        'pip install -e ".[transformers]"'
    ) from missing

import varlen_compile.integrations.transformers  # noqa: E402,F401  (registers "varlen_compile")

# How each implementation gets its batches, and how it is compiled: flex_attention's mask
# creation graph-breaks in transformers (a warning inside create_block_mask), so it compiles
# with breaks; eager runs eagerly.
IMPLEMENTATIONS = {
    "varlen_compile": {"layout": "packed", "compile": "fullgraph"},
    "sdpa": {"layout": "padded", "compile": "fullgraph"},
    "flex_attention": {"layout": "packed", "compile": "graph breaks"},
    "eager": {"layout": "padded", "compile": "no"},
}


# --tiny: a CPU-sized model and batch (these settings replace the defaults).
TINY = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 2, "vocab": 256, "tokens_per_batch": 256,
        "min_doc": 8, "max_doc": 96}


def build_config(args: argparse.Namespace) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_model * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.max_doc),
    )


def documents(args: argparse.Namespace, vocab: int, rng: random.Random) -> list[list[list[int]]]:
    """``steps`` batches of documents, each batch about ``tokens_per_batch`` tokens. A document
    repeats a random motif: learnable by copying."""
    batches = []
    for _ in range(args.steps):
        batch, total = [], 0
        while total < args.tokens_per_batch:
            length = min(int(rng.paretovariate(1.2) * args.min_doc), args.max_doc, args.tokens_per_batch - total)
            length = max(length, 2)
            motif = [rng.randrange(vocab) for _ in range(rng.randint(3, 24))]
            batch.append([motif[i % len(motif)] for i in range(length)])
            total += length
        batches.append(batch)
    return batches


def packed_inputs(docs: list[list[int]], device: torch.device) -> dict:
    """DataCollatorWithFlattening's batch: one row, position_ids, labels with the first token of
    each document ignored, and the FlashAttention kwargs (cu_seq_lens_q/k, max_length_q/k)."""
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": doc} for doc in docs])
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def padded_inputs(docs: list[list[int]], device: torch.device) -> dict:
    """The same documents padded into rows, with an attention mask; the same predicted tokens."""
    width = max(len(doc) for doc in docs)
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for row, doc in enumerate(docs):
        input_ids[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def train(name: str, config, state: dict, batches, args, device) -> dict:
    """Train one implementation from ``state`` on ``batches``: losses, tokens/s, peak memory
    (``error`` set when it ran out of GPU memory)."""
    settings = IMPLEMENTATIONS[name]
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name).to(device)
    model.load_state_dict(state)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    step_fn = model
    if settings["compile"] != "no" and not args.no_compile:
        step_fn = torch.compile(model, fullgraph=settings["compile"] == "fullgraph")
    make = packed_inputs if settings["layout"] == "packed" else padded_inputs
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, tokens, seconds, timed_steps, compiling_steps, error = [], 0, 0.0, 0, 0, None
    bar = tqdm(batches, desc=f"{name:>15}", unit="step", dynamic_ncols=True)
    for step, docs in enumerate(bar):
        inputs = make(docs, device)
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        try:
            with autocast:
                loss = step_fn(**inputs, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = loss.item()  # synchronizes: the step's time ends here
        except torch.OutOfMemoryError:
            error = f"out of GPU memory at step {step + 1}"
            break
        compiled_now = counters["stats"]["unique_graphs"] != graphs
        compiling_steps += compiled_now
        if step >= args.warmup and not compiled_now:  # steady-state steps only
            seconds += time.perf_counter() - start
            tokens += sum(len(doc) for doc in docs)
            timed_steps += 1
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / seconds:,.0f}" if seconds else "warm-up")
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None  # JSON null
    del model, optimizer, step_fn
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"losses": losses, "tokens_per_s": tokens / seconds if seconds else None, "timed_steps": timed_steps,
            "peak_gib": peak, "compiling_steps": compiling_steps, "error": error}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s (compilation)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--min-doc", type=int, default=64)
    parser.add_argument("--max-doc", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--compare", action="store_true", help="also train sdpa, flex_attention and eager")
    parser.add_argument("--impls", default=None, help="comma-separated implementations (overrides --compare)")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model and batch: " + str(TINY))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "varlen_compile" / "hf_packed_training"),
                        help="folder for the curve and the table (default: under the temporary directory)")
    args = parser.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY, warmup=min(args.warmup, 1))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.impls.split(",") if args.impls else (list(IMPLEMENTATIONS) if args.compare else ["varlen_compile"])

    config = build_config(args)
    torch.manual_seed(0)
    state = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    batches = documents(args, config.vocab_size, random.Random(0))
    print(f"{device}: {config.num_hidden_layers} layers, d_model {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads, {args.steps} steps of "
          f"~{args.tokens_per_batch} tokens in {sum(map(len, batches)) / len(batches):.0f} documents")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The settings of the run (after --tiny): runs with equal settings share one table.
    settings = dict({k: v for k, v in vars(args).items() if k not in ("compare", "impls", "out")}, device=str(device))
    saved = out / "hf_packed_training.json"
    results = _earlier_results(saved, settings)
    for name in names:
        results[name] = dict(train(name, config, state, batches, args, device),
                             compiled="no" if args.no_compile else IMPLEMENTATIONS[name]["compile"])
        saved.write_text(json.dumps({"settings": settings, "results": results}, indent=1, allow_nan=False))

    table = _table(results)
    print(table)
    (out / "hf_packed_training.md").write_text(table + "\n")
    _plot(results, out / "hf_packed_training_loss.png")
    print(f"results: {out}")
    passed, verdict = _verdict(results, device)
    print(f"{'PASS' if passed else 'FAIL'}: {verdict}")
    if not passed:
        raise SystemExit(1)
    return results


def _earlier_results(saved: Path, settings: dict) -> dict:
    """Results of earlier runs of other implementations with the same settings, else none."""
    if not saved.exists():
        return {}
    earlier = json.loads(saved.read_text())
    return earlier["results"] if earlier.get("settings") == settings else {}


def _table(results: dict) -> str:
    rows = ["| implementation | batch layout | compiled | tokens/s (timed steps) | peak memory GiB | final loss |",
            "|---|---|---|---|---|---|"]
    for name in [n for n in IMPLEMENTATIONS if n in results]:
        result = results[name]
        speed = result["error"] or (
            f"{result['tokens_per_s']:,.0f} ({result['timed_steps']})" if result["tokens_per_s"] else "- (0)"
        )
        peak = "-" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"
        final = f"{result['losses'][-1]:.4f}" if result["losses"] else "-"
        rows.append(f"| {name} | {IMPLEMENTATIONS[name]['layout']} | {result['compiled']} | {speed} | {peak} | {final} |")
    return "\n".join(rows)


def _verdict(results: dict, device: torch.device) -> tuple[bool, str]:
    """Every run's losses finite and, from 8 steps on, going down (mean of the last 4 below the
    first 4); our curve within tolerance of sdpa's when both ran. A run that ran out of memory
    is reported, not failed."""
    checks, passed = [], True
    for name, result in results.items():
        losses = result["losses"]
        if result["error"]:
            checks.append(f"{name}: {result['error']}")
            continue
        finite = bool(losses) and all(map(math.isfinite, losses))
        down = len(losses) < 8 or sum(losses[-4:]) < sum(losses[:4])
        passed &= finite and down
        checks.append(f"{name}: {len(losses)} finite losses" + (", going down" if len(losses) >= 8 else "")
                      if finite and down else f"{name}: losses {losses}")
    if "varlen_compile" in results and "sdpa" in results and not results["sdpa"]["error"]:
        ours, sdpa = results["varlen_compile"]["losses"], results["sdpa"]["losses"]
        gap = max(abs(a - b) / abs(b) for a, b in zip(ours, sdpa))
        tolerance = 1e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on CUDA, float32 on the CPU
        passed &= gap <= tolerance
        checks.append(f"loss curves, varlen_compile vs sdpa (padded): largest relative gap {gap:.3%} "
                      f"(tolerance {tolerance:.2%}) over {len(ours)} steps")
    return passed, "; ".join(checks)


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no loss-curve plot (pip install -e ".[bench]")')
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        if not result["losses"]:
            continue
        axes.plot(range(1, len(result["losses"]) + 1), result["losses"], label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("packed training, same documents and initial weights")
    axes.set_yscale("log" if max(max(r["losses"], default=0) for r in results.values()) > 10 * math.e else "linear")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"loss curve: {path}")


if __name__ == "__main__":
    main()
