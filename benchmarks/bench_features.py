"""What #11's features cost: compiled forward (and forward+backward) of each feature against
the same case without it, in one process on one GPU.

    python benchmarks/bench_features.py [--tag h200-features] [--no-backward]

Targets (issue #11): softcap and sinks cost <= 10% forward against the same case without them;
the paged forward is within 15% of the contiguous one. Cases: 16 sequences of <= 4096 tokens,
16 heads of 128 (bf16), causal; and the headline 8 x <= 2048 at 16 x 64. Times are medians of
``triton.testing.do_bench`` after warm-up on random data. Writes results/<tag>.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from varlen_compile import config, varlen_attn

RESULTS = Path(__file__).parent / "results"


def _batch(num_seqs: int, max_len: int, heads: int, head_dim: int, head_dim_v: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 2, max_len + 1, (num_seqs,), generator=generator)
    cu_seq = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    total = int(lengths.sum())
    make = lambda d: torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    return make(head_dim), make(head_dim), make(head_dim_v), cu_seq, lengths


def _paged(k, v, lengths, page_size: int, ordered: bool = False):
    """The same keys in pages scattered over a pool (``ordered``: in order, each sequence's pages
    adjacent, as a contiguous layout would place them), and the block table / seqused_k."""
    max_pages = -(-int(lengths.max()) // page_size)
    num_seqs = len(lengths)
    order = torch.arange(num_seqs * max_pages) if ordered else torch.randperm(num_seqs * max_pages)
    block_table = order.view(num_seqs, max_pages).to(torch.int32)
    heads, dim_k, dim_v = k.shape[1], k.shape[2], v.shape[2]
    key_pages = torch.zeros(num_seqs * max_pages, page_size, heads, dim_k, device="cuda", dtype=k.dtype)
    value_pages = torch.zeros(num_seqs * max_pages, page_size, heads, dim_v, device="cuda", dtype=v.dtype)
    start = 0
    for seq, length in enumerate(lengths.tolist()):
        for page_index in range(-(-length // page_size)):
            rows = slice(start + page_index * page_size, start + min((page_index + 1) * page_size, length))
            page = int(block_table[seq, page_index])
            count = rows.stop - rows.start
            key_pages[page, :count] = k.detach()[rows]
            value_pages[page, :count] = v.detach()[rows]
        start += length
    return key_pages, value_pages, block_table.cuda(), lengths.to(torch.int32).cuda()


def _time(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="features")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--kernel", default="triton", help="varlen_compile.config.kernel for every call (default: "
                        "our Triton kernels; \"auto\" would hand some cases to FA4 when it is installed)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to time (base always runs; 'paged' selects every page size)")
    args = parser.parse_args()
    with config.patch(kernel=args.kernel):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    rows = []
    for case_name, shape in (("16 x <=4096, 16x128", (16, 4096, 16, 128, 128)), ("8 x <=2048, 16x64", (8, 2048, 16, 64, 64)),
                             ("MLA 16 x <=4096, 16 x 192/128", (16, 4096, 16, 192, 128))):
        q, k, v, cu_seq, lengths = _batch(*shape)
        sink = torch.randn(q.shape[1], device="cuda", requires_grad=True)
        slopes = torch.rand(q.shape[1], device="cuda") / 8
        variants = {"base": {}, "softcap": {"softcap": 30.0}, "sink": {"sink": sink}, "alibi": {"alibi_slopes": slopes},
                    "softcap+sink": {"softcap": 30.0, "sink": sink}, "seqused_k": {"seqused_k": lengths.to(torch.int32).cuda()}}
        if shape[3] != shape[4]:
            variants = {"base": {}}
        wanted = None if args.variants is None else set(args.variants.split(",")) | {"base"}
        if wanted is not None:
            variants = {name: kwargs for name, kwargs in variants.items() if name in wanted}
        base_fwd = base_fb = None
        for variant, kwargs in variants.items():
            torch._dynamo.reset()
            attention = torch.compile(lambda q, k, v, kw=kwargs: varlen_attn(q, k, v, cu_seq, cu_seq, is_causal=True, **kw), fullgraph=True)
            with torch.no_grad():
                fwd = _time(lambda: attention(q, k, v))
            fb = None
            if not args.no_backward:
                grad = torch.randn(q.shape[0], q.shape[1], v.shape[2], device="cuda", dtype=q.dtype)
                fb = _time(lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), grad))
            base_fwd = base_fwd or fwd
            base_fb = base_fb or fb
            rows.append({"case": case_name, "variant": variant, "fwd_ms": fwd, "fwd_cost": fwd / base_fwd - 1,
                         "fwdbwd_ms": fb, "fwdbwd_cost": (fb / base_fb - 1) if fb else None})
        if shape[3] == shape[4] and (wanted is None or "paged" in wanted):
            for page_size in (16, 64, 256):
                key_pages, value_pages, block_table, seqused = _paged(k, v, lengths, page_size)
                torch._dynamo.reset()
                paged = torch.compile(lambda q, kp, vp: varlen_attn(q, kp, vp, cu_seq, None, is_causal=True, seqused_k=seqused, block_table=block_table), fullgraph=True)
                with torch.no_grad():
                    fwd = _time(lambda: paged(q, key_pages, value_pages))
                rows.append({"case": case_name, "variant": f"paged ({page_size})", "fwd_ms": fwd, "fwd_cost": fwd / base_fwd - 1,
                             "fwdbwd_ms": None, "fwdbwd_cost": None})
    lines = ["| case | variant | fwd ms | fwd cost | fwd+bwd ms | fwd+bwd cost |", "|---|---|---|---|---|---|"]
    for row in rows:
        fb = f"{row['fwdbwd_ms']:.3f} | {row['fwdbwd_cost']:+.1%}" if row["fwdbwd_ms"] else "- | -"
        lines.append(f"| {row['case']} | {row['variant']} | {row['fwd_ms']:.3f} | {row['fwd_cost']:+.1%} | {fb} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.md").write_text(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, kernel={args.kernel}\n\n{table}\n")
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
