"""The benchmarks stay runnable and organised, checked on a machine without a GPU.

They run on a GPU only, so nothing else would notice a broken import, a removed function or
a dead link until a GPU run fails on it: every ``python -m benchmarks`` subcommand parses
``--help`` (one process for all, which also parses ``choice --random``'s flags), nothing under
``benchmarks/`` imports from ``tests/``, only ``benchmarks/internals.py`` touches the package's
internals, and every result file is named by machine and date, listed in the results index and
linked where it exists."""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
SOURCES = sorted(BENCHMARKS.glob("*.py"))

# In one process: every command path of the parser (nested subcommands too), each with --help.
_DRIVER = """
import argparse, contextlib, io, json, sys
from benchmarks.__main__ import parser

def paths(p, prefix=()):
    yield prefix
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if not name.endswith("-child"):  # internal
                    yield from paths(sub, prefix + (name,))

failures, seen = [], []
for path in paths(parser()):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            parser().parse_args([*path, "--help"])
    except SystemExit as exit:
        if exit.code not in (0, None):
            failures.append(f"{' '.join(path)}: exit {exit.code}")
    if "usage:" not in out.getvalue():
        failures.append(f"{' '.join(path)}: no usage text")
    seen.append(" ".join(path))
print("\\n".join(failures) or "ok")
print("|".join(seen))

# Then the command lines of sys.argv[1] (JSON), each as parsed or the exit code that refused it.
parsed = {}
for argv in json.loads(sys.argv[1]):
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser().parse_args(argv)
    except SystemExit as exit:
        parsed[" ".join(argv)] = f"exit {exit.code}"
        continue
    parsed[" ".join(argv)] = {name: getattr(args, name) for name in ("random", "seed", "dist", "rounds", "no_backward", "tag")}
print(json.dumps(parsed))
"""

CHOICE_RANDOM = {
    "choice": {"random": None, "seed": 0, "dist": "train", "rounds": 5, "no_backward": False, "tag": "choice"},
    "choice --random 30 --seed 7 --dist any --rounds 3 --no-backward --tag t":
        {"random": 30, "seed": 7, "dist": "any", "rounds": 3, "no_backward": True, "tag": "t"},
    "choice --random 3 --quick": "exit 2",
    "choice --random 3 --cases d64-causal": "exit 2",
    "choice --random 0": "exit 2",
    "choice --random 3 --rounds 0": "exit 2",
    "choice --random 3 --dist uniform": "exit 2",
}
"""Command lines of ``choice --random`` and what they parse to (``exit 2``: refused)."""

COMMANDS = {"run", "choice", "features", "model", "profile", "context-parallel", "ab", "sweep"}
PUBLIC = {"varlen_compile": {"config", "varlen_attn", "varlen_attn_out"}, "varlen_compile.config": None,
          "varlen_compile.distributed": None}
"""What any benchmark module may import from the package (None: anything of that module)."""

RESULT_NAME = re.compile(r"^(h100|h200|h200x2|sm90)-\d{4}-\d{2}-\d{2}-[a-z0-9-]+(\.[a-z]+)?$")
LINK = re.compile(r"\]\(([^)#\s]+)")
BRACES = re.compile(r"([\w.-]+)\.\{([\w,]+)\}")  # the index writes "name.{md,json}" for name.md, name.json


def _expanded(text: str) -> str:
    return BRACES.sub(lambda match: " ".join(f"{match[1]}.{ext}" for ext in match[2].split(",")), text)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path`` (relative imports resolved in ``benchmarks``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ("benchmarks." * bool(node.level)) + (node.module or "")
            found.append((module.rstrip("."), [alias.name for alias in node.names]))
    return found


@functools.cache
def _driver() -> subprocess.CompletedProcess:
    """The driver's run, shared by the tests that read it (one import of every command module)."""
    command_lines = json.dumps([line.split() for line in CHOICE_RANDOM])
    return subprocess.run([sys.executable, "-c", _DRIVER, command_lines], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_every_command_parses_its_help():
    result = _driver()
    assert result.returncode == 0, result.stderr[-3000:]
    verdict, seen = result.stdout.strip().splitlines()[-3:-1]
    assert verdict == "ok", result.stdout[-3000:]
    top_level = {path.split(" ")[0] for path in seen.split("|") if path}
    assert COMMANDS <= top_level, f"missing commands: {COMMANDS - top_level}"
    assert {"ab paged", "ab revision", "profile host", "profile fa4-host"} <= set(seen.split("|"))


def test_choice_parses_the_random_shape_flags():
    result = _driver()
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == CHOICE_RANDOM


def test_nothing_under_benchmarks_imports_from_tests():
    offenders = [f"{path.name}: {module}" for path in SOURCES for module, _ in _imports(path)
                 if module.split(".")[0] in ("tests", "conftest", "factory", "compile_sm90")]
    offenders += [f"{path.name}: edits sys.path" for path in SOURCES if "sys.path" in path.read_text()]
    assert not offenders, offenders


def test_only_the_internals_module_imports_package_internals():
    offenders = []
    for path in SOURCES:
        if path.name == "internals.py":
            continue
        for module, names in _imports(path):
            if not module.startswith("varlen_compile"):
                continue
            allowed = PUBLIC.get(module, set())
            if allowed is not None and not set(names) <= allowed:
                offenders.append(f"{path.name}: from {module} import {', '.join(names)}")
    assert not offenders, offenders


def test_result_files_are_named_by_machine_and_date_and_indexed():
    index = set(re.findall(r"[\w.-]+", _expanded((RESULTS / "README.md").read_text())))
    entries = [entry.name for entry in RESULTS.iterdir() if entry.name != "README.md"]
    misnamed = [name for name in entries if not RESULT_NAME.match(name)]
    assert not misnamed, f"results named otherwise than <machine>-<YYYY-MM-DD>-<what>: {misnamed}"
    unlisted = [name for name in entries if name not in index]
    assert not unlisted, f"results missing from benchmarks/results/README.md: {unlisted}"


def test_links_into_the_benchmarks_resolve():
    documents = [ROOT / "README.md", BENCHMARKS / "README.md", RESULTS / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for document in documents:
        for target in LINK.findall(document.read_text()):
            resolved = (document.parent / target).resolve()
            if "benchmarks" in resolved.parts and not target.startswith("http") and not resolved.exists():
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert not broken, broken
