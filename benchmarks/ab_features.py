"""A/Bs of #11's forward kernel choices, in one process on one GPU, through the standalone
launcher (bf16; medians of ``triton.testing.do_bench``, variants interleaved over the rounds,
the median round reported).

    python benchmarks/ab_features.py [--ab softcap,paged,gqa-pack] [--rounds 5] [--paged-stages 3,5,7]

``softcap``: the forward with and without a softcap (the tanh is ``tanh.approx.f32``, a second
special-function op per score next to the exp2): its cost, next to what it costs FlashAttention
4 called directly (when installed), and the max error of the output
against the float64 reference on a small batch, next to the error of the same computation in
bf16 (the DESIGN.md budget is twice that).

``paged``: the paged forward (pages of 16, 64, 256; 16 also with the pages in order, which
separates memory locality from the per-key lookup's instructions) at several pipeline depths
(``--paged-stages``, default: the contiguous config's and ``configs.paged_config``'s), against
the contiguous forward on the same keys.

``gqa-pack``: the forward with ``ForwardConfig.pack_gqa`` (the query heads of a GQA group in one
program: block_m // G positions x G heads per tile, each K/V tile loaded once for the group)
against the default config on GQA batches (d128; groups of 4 and 8; prefill, and one
decode-like batch of 1-16 queries per sequence, where unpacked tiles are mostly empty rows);
outputs checked equal to bf16 tolerances (the same rows, but differently tiled: other causal
block splits).

Session 10 also timed P = 2^s by an FMA-pipe polynomial (FA4's Blackwell trick) here, all or
half of the exps: 1.14-1.24x and 1.04-1.12x slower than ``ex2.approx`` with a softcap, 1.06x
slower without (benchmarks/NOTES.md); the code is gone, the numbers stay in the notes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_features import _paged  # noqa: E402

from varlen_compile import reference  # noqa: E402
from varlen_compile.lowering import configs, launcher  # noqa: E402
from varlen_compile.params import AttnOptions, BatchLayout  # noqa: E402

SOFTCAP = 30.0
CASES = {  # name: (sequences, max length, heads, head dim, causal)
    "16 x <=4096, 16x128, causal": (16, 4096, 16, 128, True),
    "16 x <=4096, 16x128": (16, 4096, 16, 128, False),
    "8 x <=2048, 16x64, causal": (8, 2048, 16, 64, True),
    "8 x <=2048, 16x64": (8, 2048, 16, 64, False),
}
VARIANTS = {"base": 0.0, "softcap": SOFTCAP}  # name: softcap
GQA_CASES = {  # name: (sequences, max length, query heads, kv heads, head dim, causal, max queries)
    "8 x <=4096, 32/8x128, causal": (8, 4096, 32, 8, 128, True, None),
    "8 x <=4096, 32/8x128": (8, 4096, 32, 8, 128, False, None),
    "16 x <=2048, 16/2x128, causal": (16, 2048, 16, 2, 128, True, None),
    "64 x q 1-16 / k <=4096, 32/8x128, causal": (64, 4096, 32, 8, 128, True, 16),
}


def _batch(num_seqs: int, max_len: int, heads: int, head_dim: int, seed: int = 0, heads_kv: int | None = None):
    """bf16 q ``(T, heads, D)``, k and v ``(T, heads_kv or heads, D)``, cu_seq: ``num_seqs``
    sequences of ``max_len // 2 .. max_len`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (num_seqs,), generator=generator)
    cu_seq = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    total = int(lengths.sum())
    q = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(total, heads_kv or heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v, cu_seq


def _forward(variant: str, q, k, v, layout, causal: bool):
    options = AttnOptions(causal, softcap=VARIANTS[variant])
    return lambda: launcher.forward(q, k, v, layout, options)


def _errors() -> dict[str, float]:
    """Max abs error of out vs float64 on 4 causal sequences <= 512 (16 heads of 64)."""
    q, k, v, cu_seq = _batch(4, 512, 16, 64, seed=1)
    q, k, v = (x * 2 for x in (q, k, v))  # larger logits: the tanh's saturated range too
    layout = BatchLayout(cu_seq, cu_seq)
    result = {}
    for softcap in (0.0, SOFTCAP):
        options = AttnOptions(True, softcap=softcap)
        oracle, _ = reference.attention_forward(*(x.double() for x in (q, k, v)), cu_seq, cu_seq, options,
                                                compute_dtype=torch.float64)
        plain, _ = reference.attention_forward(q, k, v, cu_seq, cu_seq, options, compute_dtype=torch.bfloat16)
        result[f"bf16 reference{' softcap' if softcap else ''}"] = (plain.double() - oracle).abs().max().item()
        for variant, variant_softcap in VARIANTS.items():
            if variant_softcap == softcap:
                out, _ = _forward(variant, q, k, v, layout, True)()
                result[variant] = (out.double() - oracle).abs().max().item()
    return result


def _interleaved(runs: dict, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(triton.testing.do_bench(run, warmup=50, rep=200, return_mode="median"))
    return {name: statistics.median(values) for name, values in samples.items()}


def _fa4_forward(softcap: float, q, k, v, cu_seq, max_len: int, causal: bool):
    """FlashAttention 4 called directly (the peer: what softcap costs the fastest Hopper kernel)."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    return lambda: flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seq, cu_seqlens_k=cu_seq, max_seqlen_q=max_len,
                                          max_seqlen_k=max_len, causal=causal, softcap=softcap)


def ab_softcap(rounds: int, _stages: list[int]) -> list[str]:
    errors = _errors()
    print("max abs error of out vs float64: " + ", ".join(f"{name} {value:.3e}" for name, value in errors.items()))
    try:
        import flash_attn.cute.interface  # noqa: F401
        fa4 = True
    except ImportError:
        fa4 = False
    rows = ["| case | base ms | softcap ms | softcap cost | FA4 base ms | FA4 softcap ms | FA4 softcap cost |",
            "|---|---|---|---|---|---|---|"]
    for name, (num_seqs, max_len, heads, head_dim, causal) in CASES.items():
        q, k, v, cu_seq = _batch(num_seqs, max_len, heads, head_dim)
        layout = BatchLayout(cu_seq, cu_seq)
        runs = {variant: _forward(variant, q, k, v, layout, causal) for variant in VARIANTS}
        if fa4:
            longest = int((cu_seq[1:] - cu_seq[:-1]).max())
            runs.update({f"fa4-{variant}": _fa4_forward(softcap, q, k, v, cu_seq, longest, causal)
                         for variant, softcap in VARIANTS.items()})
            for run in runs.values():
                run()  # FA4 compiles per shape and softcap on its first call
        ms = _interleaved(runs, rounds)
        peer = (f"{ms['fa4-base']:.3f} | {ms['fa4-softcap']:.3f} | {ms['fa4-softcap'] / ms['fa4-base'] - 1:+.1%}"
                if fa4 else "- | - | -")
        rows.append(f"| {name} | {ms['base']:.3f} | {ms['softcap']:.3f} | {ms['softcap'] / ms['base'] - 1:+.1%} | {peer} |")
        print(rows[-1], flush=True)
    return rows


def ab_paged(rounds: int, stages: list[int]) -> list[str]:
    rows = ["| case | page | contiguous ms | " + " | ".join(f"{n} stages: ms, cost" for n in stages or ["default", "paged_config"])
            + " |", "|---" * (3 + max(len(stages), 2)) + "|"]
    options = AttnOptions(True)
    for name, (num_seqs, max_len, heads, head_dim, causal) in CASES.items():
        if not causal:
            continue
        q, k, v, cu_seq = _batch(num_seqs, max_len, heads, head_dim)
        lengths = (cu_seq[1:] - cu_seq[:-1]).cpu()
        default = configs.default_forward_config(head_dim, q.dtype)
        paged_configs = [dataclasses.replace(default, num_stages=n) for n in stages] or [default, configs.paged_config(default, True)]
        contiguous = launcher.forward(q, k, v, BatchLayout(cu_seq, cu_seq), options, config=default)[0]
        for page_size, ordered in ((16, False), (16, True), (64, False), (256, False)):
            key_pages, value_pages, block_table, seqused = _paged(k, v, lengths, page_size, ordered)
            layout = BatchLayout(cu_seq, None, seqused_k=seqused, block_table=block_table)
            runs = {"contiguous": lambda: launcher.forward(q, k, v, BatchLayout(cu_seq, cu_seq), options, config=default)}
            for index, config in enumerate(paged_configs):
                run = functools.partial(launcher.forward, q, key_pages, value_pages, layout, options, config=config)
                try:
                    out = run()[0]
                except triton.runtime.errors.OutOfResources as error:  # too deep for shared memory
                    print(f"{config}: {error}")
                    continue
                # The same keys: the same output as contiguous.
                torch.testing.assert_close(out, contiguous, rtol=0, atol=0)
                runs[index] = run
            ms = _interleaved(runs, rounds)
            cells = " | ".join(f"{ms[index]:.3f} ({config.num_stages}), {ms[index] / ms['contiguous'] - 1:+.1%}"
                               if index in ms else f"- ({config.num_stages})" for index, config in enumerate(paged_configs))
            page = f"{page_size} in order" if ordered else page_size
            rows.append(f"| {name} | {page} | {ms['contiguous']:.3f} | {cells} |")
            print(rows[-1], flush=True)
    return rows


def _gqa_batch(num_seqs: int, max_len: int, heads_q: int, heads_kv: int, head_dim: int, max_q: int | None):
    """(q, k, v, layout): :func:`_batch`'s sequences, GQA; with ``max_q``, each sequence's
    queries are its last 1..max_q positions (bottom-right causal), as in decoding."""
    q, k, v, cu_seq = _batch(num_seqs, max_len, heads_q, head_dim, heads_kv=heads_kv)
    if max_q is None:
        return q, k, v, BatchLayout(cu_seq, cu_seq)
    lengths_q = torch.randint(1, max_q + 1, (num_seqs,), generator=torch.Generator().manual_seed(1))
    cu_seq_q = torch.nn.functional.pad(lengths_q.cumsum(0), (1, 0)).to(torch.int32).cuda()
    q = torch.randn(int(lengths_q.sum()), heads_q, head_dim, device="cuda", dtype=torch.bfloat16)
    return q, k, v, BatchLayout(cu_seq_q, cu_seq)


def ab_gqa_pack(rounds: int, _stages: list[int]) -> list[str]:
    rows = ["| case | G | default ms | packed ms | packed / default | max abs diff of out |", "|---|---|---|---|---|---|"]
    for name, (num_seqs, max_len, heads_q, heads_kv, head_dim, causal, max_q) in GQA_CASES.items():
        q, k, v, layout = _gqa_batch(num_seqs, max_len, heads_q, heads_kv, head_dim, max_q)
        options = AttnOptions(causal)
        default = configs.default_forward_config(head_dim, q.dtype)
        packed = dataclasses.replace(default, pack_gqa=True)
        group = heads_q // heads_kv
        assert configs.pack_gqa_group(packed, group) == group, f"{packed} does not pack a group of {group}"
        runs = {
            "default": functools.partial(launcher.forward, q, k, v, layout, options, config=default),
            "packed": functools.partial(launcher.forward, q, k, v, layout, options, config=packed),
        }
        (out, lse), (out_packed, lse_packed) = runs["default"](), runs["packed"]()
        # The same rows, tiled differently: a row's key blocks split into masked and unmasked
        # ones elsewhere, so fp32 rescaling rounds differently and a bf16 output can move by an
        # ulp (6e-4 at 0.1; 28 of 99M elements on the H200). Correctness is the GPU test's
        # error rule against float64; here only that nothing moved by more than a few ulps.
        torch.testing.assert_close(out_packed, out, rtol=1.6e-2, atol=2e-3)
        torch.testing.assert_close(lse_packed, lse, rtol=1.6e-2, atol=1e-5)
        diff = (out_packed.float() - out.float()).abs().max().item()
        ms = _interleaved(runs, rounds)
        rows.append(f"| {name} | {group} | {ms['default']:.3f} | {ms['packed']:.3f} | {ms['packed'] / ms['default']:.3f} | {diff:.2e} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ab", default="softcap,paged", help="comma-separated: softcap, paged, gqa-pack")
    parser.add_argument("--paged-stages", default="", help="comma-separated pipeline depths for the paged A/B")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    tables = []
    for ab in args.ab.split(","):
        stages = [int(n) for n in args.paged_stages.split(",") if n]
        tables.append({"softcap": ab_softcap, "paged": ab_paged, "gqa-pack": ab_gqa_pack}[ab](args.rounds, stages))
    print("\n\n".join("\n".join(rows) for rows in tables))


if __name__ == "__main__":
    main()
