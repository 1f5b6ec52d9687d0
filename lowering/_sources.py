"""Reading the kernel sources in ``templates/`` (shared by the templates and the launcher)."""

from __future__ import annotations

import functools
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"


@functools.cache
def load_template(name: str) -> str:
    """Text of ``templates/<name>.py.jinja``."""
    return (TEMPLATE_DIR / f"{name}.py.jinja").read_text()


def template_source(entry: str) -> str:
    """Jinja source of the Inductor template ``entry``: the shared macros, the entry template,
    then the shared ``@triton.jit`` math (``varlen_common``)."""
    return (TEMPLATE_DIR / "varlen_macros.jinja").read_text() + load_template(entry) + load_template("varlen_common")
