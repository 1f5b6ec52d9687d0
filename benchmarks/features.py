"""``features``: what each attention feature costs, compiled, against the same case without it."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from . import harness
from .harness import FEATURE_CASES, Case, log_row, make_inputs

HELP = """\
The compiled forward (and forward+backward) of each feature against the same causal case
without it, in one process on one GPU: softcap, attention sinks, ALiBi, seqused_k, and paged K/V
(pages of 16, 64, 256; forward only). Cases: 16 sequences of 2048-4096 tokens at 16 heads x 128,
8 of 1024-2048 at 16 x 64, and MLA's 192/128 head dims (base only). Medians of do_bench on
random bf16 data; cost = time / base time - 1."""

CASE_NAMES = ("feat-d128-causal", "feat-d64-causal", "feat-mla-causal")
VARIANTS: dict[str, dict] = {
    "base": {},
    "softcap": {"softcap": 30.0},
    "sink": {"sink": True},
    "alibi": {"alibi": True},
    "softcap+sink": {"softcap": 30.0, "sink": True},
    "seqused_k": {"seqused_k_trim": 0},
    "paged (16)": {"page_size": 16},
    "paged (64)": {"page_size": 64},
    "paged (256)": {"page_size": 256},
}
"""Variant name -> the case's fields that turn the feature on."""


def variants_of(case: Case, wanted: set[str] | None) -> dict[str, Case]:
    """The case with each wanted feature on (MLA: base only); ``paged`` selects every page size."""
    names = ["base"] if case.head_dim != case.value_dim else list(VARIANTS)
    if wanted is not None:
        names = [name for name in names if name == "base" or name in wanted or (name.startswith("paged") and "paged" in wanted)]
    return {name: dataclasses.replace(case, name=f"{case.name} {name}", **VARIANTS[name]) for name in names}


def feature_rows(case: Case, wanted: set[str] | None, backward: bool, kernel: str) -> list[dict]:
    """Rows of one case: each variant's times and its cost against the base."""
    rows, base = [], {}
    for name, variant in variants_of(case, wanted).items():
        harness.fresh_compile()
        x = make_inputs(variant)
        timed = harness.measure(variant, "ours", x, backward and not variant.page_size, kernel=kernel)
        row = {"case": case.name, "variant": name, **timed}
        base = base or row
        for key in ("fwd_ms", "fwdbwd_ms"):
            if key in row and key in base:
                row[key.replace("_ms", "_cost")] = row[key] / base[key] - 1
        log_row(row)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], kernel: str) -> str:
    def cells(row: dict, key: str) -> list[str]:
        if f"{key}_ms" not in row:
            return [row.get("error", "-")[:40] if key == "fwd" else "-", "-"]
        return [f"{row[f'{key}_ms']:.3f}", f"{row[f'{key}_cost']:+.1%}" if f"{key}_cost" in row else "-"]

    body = [[row["case"], row["variant"], *cells(row, "fwd"), *cells(row, "fwdbwd")] for row in rows]
    header = ["case", "variant", "fwd ms", "fwd cost", "fwd+bwd ms", "fwd+bwd cost"]
    return "\n".join([f"{harness.device_line()}; kernel={kernel}", ""] + harness.markdown_table(header, body))


def cmd_features(args: argparse.Namespace) -> None:
    wanted = None if args.variants is None else set(args.variants.split(",")) | {"base"}
    rows = []
    for case in harness.pick(FEATURE_CASES, args.cases):
        rows += feature_rows(case, wanted, not args.no_backward, args.kernel)
    harness.write_results(args.out, args.tag, rows, markdown(rows, args.kernel))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("features", help="the cost of each feature, compiled", description=HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASE_NAMES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated, from: " + ", ".join(VARIANTS) + " ('paged': every page size; base always runs)")
    parser.add_argument("--kernel", default="triton", choices=harness.config.KERNELS,
                        help="varlen_compile.config.kernel for every call (default: our Triton kernels; "
                             "'auto' would hand some cases to FA4 where installed)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    harness.add_output_arguments(parser, "features")
    parser.set_defaults(func=cmd_features)
