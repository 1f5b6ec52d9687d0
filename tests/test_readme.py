"""README.md runs as pasted: every ```python block runs on its own (on the CPU here, on CUDA
where present), unless its first line marks it as a fragment (``# fragment: ...``). The
quickstart ends with a PASS verdict."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAGMENT = "# fragment"


def _python_blocks() -> list[tuple[int, str]]:
    """``(line number, source)`` of each python block in README.md."""
    text = (ROOT / "README.md").read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    ]


BLOCKS = _python_blocks()
RUNNABLE = [(line, source) for line, source in BLOCKS if not source.startswith(FRAGMENT)]


def test_readme_has_runnable_blocks():
    assert len(RUNNABLE) >= 3, "README.md should show runnable examples"


@pytest.mark.parametrize("line, source", RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_readme_block_runs(line, source):
    code = compile(source, f"README.md:{line}", "exec")
    exec(code, {"__name__": "__main__"})  # as when pasted into a script


def test_quickstart_passes(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("PASS"), lines
