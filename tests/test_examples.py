"""The examples as a user runs them, at CPU sizes: the hints they give when an extra is missing,
and the PASS verdict every example ends with (quickstart: test_readme.py; AOTInductor:
test_aoti.py; the Hugging Face run's table and JSON: test_transformers.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_hf_example_without_transformers_says_what_to_install():
    """Run with transformers hidden (a None entry in sys.modules fails its import)."""
    code = (
        "import sys, runpy; sys.modules['transformers'] = None; "
        f"runpy.run_path({str(EXAMPLES / 'hf_packed_training.py')!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code, "--tiny"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'needs Hugging Face transformers' in result.stderr and 'pip install -e ".[transformers]"' in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fsdp_example_ends_with_a_pass_verdict(tmp_path):
    """One rank (gloo, CPU), eager: the first step's loss equals an unsharded eager copy's. (The
    compiled runs on 1 and 2 ranks, which must exit 0, are test_distributed.py's.)"""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
               str(_free_port()), str(EXAMPLES / "train_fsdp.py"), "--tiny", "--steps", "2", "--no-compile",
               "--out", str(tmp_path / "losses.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("PASS: 2 finite losses; step 0 global loss"), verdict
