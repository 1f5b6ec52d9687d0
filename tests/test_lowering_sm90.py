"""The Inductor lowerings of both ops, run on a machine without a GPU through Inductor's own
template rendering (tests/tools/lowering_sm90.py): every step up to the kernel choice, the
template kernels Inductor renders compiled for sm_90, and the extern choices' output nodes bound
to their private ops by name. The GPU suite runs the same lowerings to the end; this catches,
on every CI run, what would otherwise first show on a GPU: a template that no longer renders
or compiles, inputs out of step with the registry, an extern op that no longer binds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).parent / "tools" / "lowering_sm90.py"
MAX_SHARED = 227 * 1024  # the H100/H200 limit of dynamic shared memory per block

# Inputs of each case: the template's fixed ones, then the optional ones present, in the
# registry's order (forward: seqused_k, block_table, sink, alibi_slopes; backward: grad_lse,
# seqused_k, alibi_slopes).
EXPECTED = {
    "plain-causal-gqa-forward-triton": (6, [3, 4], [], 1),
    "plain-causal-gqa-backward-triton": (12, [7, 8], [], 1),
    "features-forward-triton": (9, [3, 4, 6], [], 1),
    "features-backward-triton": (14, [7, 8, 12], [], 1),
    "sink-seqused-forward-fa4": (8, [3, 4, 6], ["varlen_compile._fa4_forward_into.default"], 0),
    "sink-seqused-backward-fa4": (13, [7, 8, 12], ["varlen_compile._fa4_backward_into.default"], 0),
    "plain-causal-gqa-forward-aten": (6, [3, 4], ["varlen_compile._flash_forward_into.default"], 0),
    "plain-causal-gqa-backward-aten": (12, [7, 8], ["varlen_compile._flash_backward_into.default"], 0),
}


@pytest.fixture(scope="module")
def cases() -> dict[str, dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines and "ptxas" in result.stderr:
        pytest.skip(f"Triton's NVIDIA backend is unusable here: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {line["case"]: line for line in lines}


def test_every_lowering_case_runs(cases):
    assert set(cases) == set(EXPECTED)
    failed = {name: case["error"] for name, case in cases.items() if not case["ok"]}
    assert not failed, "\n\n".join(f"{name}:\n{error}" for name, error in failed.items())


@pytest.mark.parametrize("name", EXPECTED)
def test_inputs_generators_externs_and_kernels(cases, name):
    """The template's inputs (fixed, then the optional ones), the autotune generators by
    position (the offsets, then seqused_k), the extern op each extern choice builds, and each
    rendered template kernel compiled for sm_90 within the shared-memory limit."""
    case = cases[name]
    inputs, generators, externs, templates = EXPECTED[name]
    assert len(case["inputs"]) == inputs and case["generators"] == generators and case["externs"] == externs
    assert len(case["compiled"]) == templates
    assert all(0 < kernel["shared"] <= MAX_SHARED for kernel in case["compiled"])
