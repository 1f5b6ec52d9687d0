"""The benchmark scripts stay runnable: each parses its arguments (``--help``) on a machine
without a GPU, imports included (they run on the GPU machine only, so nothing else would notice
a broken import or a removed helper until a device session is spent on it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# One process for all scripts (torch is imported once): run each as __main__ with --help.
_DRIVER = """
import contextlib, io, runpy, sys
failures = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failures.append(f"{path}: exit {exit.code}")
            continue
    except BaseException as error:
        failures.append(f"{path}: {type(error).__name__}: {error}")
        continue
    if "usage:" not in out.getvalue():
        failures.append(f"{path}: no usage text")
print("\\n".join(failures) or "ok")
"""


def test_every_benchmark_script_parses_its_arguments():
    scripts = sorted(str(path) for path in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 8
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, *scripts], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok", result.stdout[-3000:]
