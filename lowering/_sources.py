"""Reading the kernel sources in ``templates/`` (shared by the templates and the launcher)."""

from __future__ import annotations

import functools
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"


@functools.cache
def load_template(name: str) -> str:
    """Text of ``templates/<name>.py.jinja``."""
    return (TEMPLATE_DIR / f"{name}.py.jinja").read_text()
