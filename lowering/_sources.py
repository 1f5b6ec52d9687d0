"""Reading the kernel sources in ``templates/`` (shared by the Inductor templates and the
standalone launcher, docs/design.md §7), and the Jinja macros generated from the registry of
optional inputs (``varlen_compile.params.OPTIONAL_INPUTS``)."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from varlen_compile.params import OPTIONAL_INPUTS, optional_inputs_of

TEMPLATE_DIR = Path(__file__).parent / "templates"

_PRELUDE = "import triton\nimport triton.language as tl\n"


@functools.cache
def load_template(name: str) -> str:
    """Text of ``templates/<name>.py.jinja``."""
    return (TEMPLATE_DIR / f"{name}.py.jinja").read_text()


@functools.cache
def optional_input_macros() -> str:
    """Jinja lists and macros generated from the registry:

    - ``FORWARD_OPTIONAL`` / ``BACKWARD_OPTIONAL``: the kernel names of the optional inputs each
      kernel reads (the standalone kernels' parameters), ``FORWARD_FLAGS`` / ``BACKWARD_FLAGS``:
      the constexpr flags of each kernel (varlen_macros.jinja's lists take them);

    and two macros for the Inductor templates (each passes its side, ``"forward"`` or
    ``"backward"``; a flag is a template constant there):

    - ``optional_inputs(side)``: the kernel names of the optional inputs present, space
      separated, in registry order (the lowerings pass the inputs in that order);
    - ``absent_inputs(side, int_stand_in, float_stand_in)``: a line ``NAME = <stand-in>`` for each
      optional input the side reads that is absent (its code is off: the pointer is never read).
    """
    present = "".join(
        f"{{%- if side in {list(spec.read_by)!r} and {spec.flag} %}} {spec.kernel_name}{{% endif -%}}"
        for spec in OPTIONAL_INPUTS
    )
    absent = "".join(
        f"{{% if side in {list(spec.read_by)!r} and not {spec.flag} %}}"
        f"    {spec.kernel_name} = {{{{ {'int' if not spec.dtype.is_floating_point else 'float'}_stand_in }}}}"
        "  # absent: never read\n{% endif %}"
        for spec in OPTIONAL_INPUTS
    )
    lists = "".join(
        f"{{%- set {side.upper()}_OPTIONAL = {[spec.kernel_name for spec in optional_inputs_of(side)]!r} -%}}\n"
        f"{{%- set {side.upper()}_FLAGS = {[spec.flag for spec in OPTIONAL_INPUTS if side in spec.flag_in]!r} -%}}\n"
        for side in ("forward", "backward")
    )
    return (
        "{#- Generated from varlen_compile.params.OPTIONAL_INPUTS (lowering/_sources.py). -#}\n"
        + lists
        + f"{{% macro optional_inputs(side) -%}}{present}{{%- endmacro %}}\n"
        f"{{% macro absent_inputs(side, int_stand_in, float_stand_in) -%}}\n{absent}{{%- endmacro %}}\n"
    )


def _with_macros(entry: str) -> str:
    """Jinja source: the generated and the shared macros, ``entry``, then the shared
    ``@triton.jit`` math (``varlen_common``)."""
    macros = optional_input_macros() + (TEMPLATE_DIR / "varlen_macros.jinja").read_text()
    return macros + load_template(entry) + load_template("varlen_common")


def template_source(entry: str) -> str:
    """Jinja source of the Inductor template ``entry`` (Inductor renders it per choice)."""
    return _with_macros(entry)


@functools.cache
def standalone_source() -> str:
    """Python source of the standalone kernel module: the eager kernels and the shared math,
    rendered (their constants are kernel arguments, so nothing per call is rendered in)."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return _PRELUDE + environment.from_string(_with_macros("standalone")).render()
