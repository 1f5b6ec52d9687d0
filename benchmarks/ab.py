"""``ab``: A/B timings of the standalone kernels in one process, the variants interleaved over
rounds (each variant's median round reported): a feature's cost, a config choice, or this
checkout's kernels against an earlier commit's."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from . import harness, internals
from .harness import CASES, FEATURE_CASES, Case, make_inputs

HELP = """\
A/B timings of our standalone kernels (the templates' @triton.jit math, launched without
Inductor), in one process on one GPU, bf16: do_bench medians, the variants interleaved over
--rounds rounds and each variant's median round reported. One subject per call."""

SUBJECT_HELP = {
    "softcap": """\
The forward with and without a softcap (tanh.approx.f32: a second special-function op per
score), next to what a softcap costs FlashAttention 4 called directly (when installed), and the
max error of each output against float64 next to the error of the same computation in bf16 (the
correctness rule allows twice that).""",
    "paged": """\
The paged forward (pages of 16, 64, 256; 16 also with the pages in order, which separates memory
locality from the per-key lookup) at the pipeline depths --stages (default: the contiguous
config's and the paged config's), against the contiguous forward on the same keys (outputs
checked bit-equal).""",
    "gqa-pack": """\
The forward with the query heads of a GQA group packed into one program (each K/V tile loaded
once for the group) against the unpacked config, on prefill batches (groups of 4 and 8) and a
decode-like one (1-16 queries per sequence); outputs checked equal to a few bf16 ulps.""",
    "revision": """\
This checkout's forward and backward kernels against an earlier commit's templates (--base-rev,
or a folder holding them: --base), same inputs and configs, through today's launcher (the base's
kernels must take today's arguments).""",
}

SOFTCAP = 30.0
SOFTCAP_CASES = ("feat-d128-causal", "feat-d128", "feat-d64-causal", "feat-d64")
PAGED_CASES = ("feat-d128-causal", "feat-d64-causal")
GQA_CASES = ("feat-gqa4-causal", "feat-gqa4", "feat-gqa8-causal", "feat-gqa4-decode")
PAGES = ((16, False), (16, True), (64, False), (256, False))  # (page size, pages in order)


# ----------------------------------------------------------------------------- softcap


def softcap_errors() -> dict[str, float]:
    """Max abs error of out vs float64, with and without softcap, on 4 causal sequences <= 512
    (16 heads of 64), inputs doubled so that the tanh's saturated range is reached too."""
    case = Case("errors", harness.random_lengths(4, 512, seed=1, lower=256), 16, 16, 64, True)
    x = make_inputs(case)
    x.q, x.k, x.v = (t.detach() * 2 for t in (x.q, x.k, x.v))
    errors = {}
    for label, softcap in (("base", 0.0), ("softcap", SOFTCAP)):
        oracle = internals.reference_forward(case, x, torch.float64, torch.float64, softcap=softcap)
        plain = internals.reference_forward(case, x, torch.bfloat16, softcap=softcap)
        ours = internals.standalone_forward(case, x, softcap=softcap)()[0]
        errors[f"bf16 reference {label}"] = (plain.double() - oracle).abs().max().item()
        errors[label] = (ours.double() - oracle).abs().max().item()
    return errors


def ab_softcap(args: argparse.Namespace) -> list[str]:
    harness.log.info("max abs error of out vs float64: " + ", ".join(f"{k} {v:.3e}" for k, v in softcap_errors().items()))
    fa4 = internals.fa4_missing() is None
    rows = []
    for case in harness.pick(FEATURE_CASES, SOFTCAP_CASES):
        x = make_inputs(case)
        runs = {"base": internals.standalone_forward(case, x), "softcap": internals.standalone_forward(case, x, softcap=SOFTCAP)}
        if fa4:
            q, k, v = x.detached()
            for label, variant in (("fa4-base", case), ("fa4-softcap", dataclasses.replace(case, softcap=SOFTCAP))):
                runs[label] = functools.partial(harness.fa4_direct(variant, x), q, k, v)
                runs[label]()  # FA4 compiles per shape and softcap on its first call
        ms = harness.interleaved_medians(runs, args.rounds)
        peer = ([f"{ms['fa4-base']:.3f}", f"{ms['fa4-softcap']:.3f}", f"{ms['fa4-softcap'] / ms['fa4-base'] - 1:+.1%}"]
                if fa4 else ["-", "-", "-"])
        rows.append([case.name, f"{ms['base']:.3f}", f"{ms['softcap']:.3f}", f"{ms['softcap'] / ms['base'] - 1:+.1%}", *peer])
        harness.log.info(" | ".join(rows[-1]))
    return harness.markdown_table(["case", "base ms", "softcap ms", "softcap cost", "FA4 base ms", "FA4 softcap ms",
                                   "FA4 softcap cost"], rows)


# ----------------------------------------------------------------------------- paged


def ab_paged(args: argparse.Namespace) -> list[str]:
    stages = [int(n) for n in args.stages.split(",") if n]
    rows = []
    for case in harness.pick(FEATURE_CASES, PAGED_CASES):
        x = make_inputs(case)
        default = internals.contiguous_forward_config(case)
        configs = ([internals.replace_config(default, num_stages=n) for n in stages]
                   or [default, internals.paged_forward_config(default)])
        contiguous = internals.standalone_forward(case, x, default)
        expected = contiguous()[0]
        for page_size, ordered in PAGES:
            paged = dataclasses.replace(case, page_size=page_size, ordered_pages=ordered)
            px = make_inputs(paged)
            runs = {"contiguous": contiguous}
            for index, config in enumerate(configs):
                run = internals.standalone_forward(paged, px, config)
                try:
                    out = run()[0]
                except Exception as error:  # noqa: BLE001 -- e.g. too deep for shared memory
                    harness.log.info(f"{config}: {harness.error_text(error)}")
                    continue
                torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same keys: the same output
                runs[index] = run
            ms = harness.interleaved_medians(runs, args.rounds)
            cells = [f"{ms[i]:.3f} ({c.num_stages}), {ms[i] / ms['contiguous'] - 1:+.1%}" if i in ms else f"- ({c.num_stages})"
                     for i, c in enumerate(configs)]
            rows.append([case.name, f"{page_size} in order" if ordered else page_size, f"{ms['contiguous']:.3f}", *cells])
            harness.log.info(" | ".join(map(str, rows[-1])))
    header = ["case", "page", "contiguous ms", *(f"{n} stages: ms, cost" for n in stages or ("default", "paged config"))]
    return harness.markdown_table(header, rows)


# ----------------------------------------------------------------------------- gqa-pack


def ab_gqa_pack(args: argparse.Namespace) -> list[str]:
    rows = []
    for case in harness.pick(FEATURE_CASES, GQA_CASES):
        x = make_inputs(case)
        group = case.heads_q // case.heads_kv
        default = internals.default_forward_config(case)
        unpacked, packed = (internals.replace_config(default, pack_gqa=flag) for flag in (False, True))
        if internals.packed_group(packed, group) != group:
            raise SystemExit(f"{packed} does not pack a group of {group}")
        runs = {"unpacked": internals.standalone_forward(case, x, unpacked),
                "packed": internals.standalone_forward(case, x, packed)}
        (out, lse), (out_packed, lse_packed) = runs["unpacked"](), runs["packed"]()
        # The same rows, tiled differently: a row's key blocks split into masked and unmasked
        # ones elsewhere, so fp32 rescaling rounds differently and a bf16 output can move by an
        # ulp. Correctness is the GPU tests' rule against float64; here only that nothing moved
        # by more than a few ulps.
        torch.testing.assert_close(out_packed, out, rtol=1.6e-2, atol=2e-3)
        torch.testing.assert_close(lse_packed, lse, rtol=1.6e-2, atol=1e-5)
        diff = (out_packed.float() - out.float()).abs().max().item()
        ms = harness.interleaved_medians(runs, args.rounds)
        rows.append([case.name, group, f"{ms['unpacked']:.3f}", f"{ms['packed']:.3f}", f"{ms['packed'] / ms['unpacked']:.3f}",
                     f"{diff:.2e}"])
        harness.log.info(" | ".join(map(str, rows[-1])))
    return harness.markdown_table(["case", "G", "unpacked ms", "packed ms", "packed / unpacked", "max abs diff of out"], rows)


# ----------------------------------------------------------------------------- revision

def templates_of(rev: str, folder: Path | None = None) -> Path:
    """``lowering/templates/`` of commit ``rev``, written to ``folder`` (default: a new
    temporary one)."""
    root = Path(__file__).resolve().parents[1]
    folder = folder or Path(tempfile.mkdtemp(prefix=f"ab-{rev}-"))
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "lowering/templates"], cwd=root, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return folder


def ab_revision(args: argparse.Namespace) -> list[str]:
    base = internals.kernels_from(templates_of(args.base_rev) if args.base_rev else Path(args.base))
    if not internals.same_kernel_signatures(base):
        raise SystemExit("the base's kernels take other arguments than today's launcher passes: pick a base "
                         "whose kernel signatures match this checkout's")
    rows = []
    for case in harness.pick(CASES, args.cases):
        x = make_inputs(case)
        new_forward = internals.standalone_forward(case, x)
        out, lse = new_forward()
        with internals.kernels_swapped(base):
            base_out, base_lse = new_forward()
        if (out.float() - base_out.float()).abs().max() >= 1e-2:
            raise SystemExit(f"{case.name}: the two versions' outputs disagree")
        new_backward = internals.standalone_backward(case, x, out, lse)

        def swapped(run):
            def call():
                with internals.kernels_swapped(base):
                    return run()
            return call

        runs = {"fwd base": swapped(new_forward), "fwd new": new_forward,
                "bwd base": swapped(internals.standalone_backward(case, x, base_out, base_lse)), "bwd new": new_backward}
        ms = harness.interleaved_medians(runs, args.rounds)
        rate = harness.forward_flops(case) / ms["fwd new"] / 1e9
        rows.append([f"{case.name} ({rate:.0f} TFLOP/s fwd)", *(f"{ms[k]:.3f}" for k in ("fwd base", "fwd new")),
                     f"{ms['fwd new'] / ms['fwd base']:.3f}", *(f"{ms[k]:.3f}" for k in ("bwd base", "bwd new")),
                     f"{ms['bwd new'] / ms['bwd base']:.3f}"])
        harness.log.info(" | ".join(rows[-1]))
    return harness.markdown_table(["case", "fwd base ms", "fwd new ms", "new/base", "bwd base ms", "bwd new ms", "new/base"], rows)


SUBJECTS = {  # name -> (function, one-line help)
    "softcap": (ab_softcap, "the forward's softcap cost, ours and FA4's, and its error"),
    "paged": (ab_paged, "paged vs contiguous forward, per page size and pipeline depth"),
    "gqa-pack": (ab_gqa_pack, "GQA-packed vs unpacked forward"),
    "revision": (ab_revision, "this checkout's kernels vs an earlier commit's"),
}


def cmd_ab(args: argparse.Namespace) -> None:
    if getattr(args, "save_base", None):  # no GPU needed
        harness.log.info(f"{args.save_base}'s templates in {templates_of(args.save_base, Path(args.base))}")
        return
    harness.log.info(harness.device_line())
    harness.log.info("\n".join(SUBJECTS[args.subject][0](args)))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("ab", help="standalone-kernel A/Bs: softcap, paged, gqa-pack, revision",
                                 description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    subjects = parser.add_subparsers(dest="subject", required=True, metavar="{" + ",".join(SUBJECTS) + "}")
    for name, (_, summary) in SUBJECTS.items():
        sub = subjects.add_parser(name, help=summary, description=SUBJECT_HELP[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--rounds", type=int, default=5 if name != "revision" else 3, help="interleaved rounds")
        sub.set_defaults(func=cmd_ab)
    subjects.choices["paged"].add_argument("--stages", default="", help="comma-separated pipeline depths to time")
    revision = subjects.choices["revision"]
    revision.add_argument("--base", default=".ab_base", help="a folder with the base's template files (default: %(default)s)")
    revision.add_argument("--base-rev", default=None, help="a git commit to take the base templates from")
    revision.add_argument("--save-base", default=None, metavar="REV",
                          help="write REV's templates to --base and exit (for a machine without .git: copy the folder along)")
    revision.add_argument("--cases", default="headline-causal,d128,d128-causal,gqa-causal,many-short-causal",
                          help="comma-separated standard cases (default: %(default)s)")
