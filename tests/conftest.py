import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET when it is imported: triton.language's own @jit helpers (tl.sum,
# tl.max, ...) are decorated then, and a kernel built in interpreter mode later fails inside
# them ("Cannot call @triton.jit'd outside of the scope of a kernel"). So the mode is chosen
# here, before anything imports triton (`import varlen_compile` does, through Inductor). Without
# a GPU no real Triton kernel can run anyway, so the whole session interprets; on a GPU machine
# run the interpreter tests apart: `TRITON_INTERPRET=1 python -m pytest -m interpreter tests/`.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def interpret():
    """Run Triton kernels on the CPU through the interpreter (tiny sizes only)."""
    triton = pytest.importorskip("triton")
    if not (os.environ.get("TRITON_INTERPRET") == "1" and triton.knobs.runtime.interpret):
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (automatic without a GPU)")
    yield


@pytest.fixture(autouse=True)
def _strict_lowering(monkeypatch):
    """A lowering that fails re-raises in tests: the fallback that keeps users' compiles alive
    must not hide a bug of ours (tests of the fallback turn it off)."""
    from varlen_compile import config

    monkeypatch.setattr(config, "strict_lowering", True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _hide_fa4(request, monkeypatch):
    """FlashAttention 4, when installed, is a kernel choice: the tests of our own
    kernels must not silently run it instead, so only tests marked ``fa4`` see it."""
    if request.node.get_closest_marker("fa4") is None:
        from varlen_compile import _compat

        monkeypatch.setattr(_compat, "fa4_interface", lambda: (None, "FA4 hidden from tests not marked fa4"))


@pytest.fixture
def poison_empty():
    """Uninitialized memory (``torch.empty``, ``new_empty``) comes back NaN-filled, so an output
    element a kernel never writes shows up as NaN instead of passing by luck. Uses deterministic
    mode's fill; CPU tests only (deterministic mode rejects some CUDA ops)."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-part", default=None,
        help="K/N: run only the fuzz tests whose index modulo N is K (spreads fuzzing over N processes)",
    )


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` marker implies the skip without a CUDA GPU, ``multigpu`` without two: marking
    a test is the one way to say what it needs. Then ``--fuzz-part`` keeps its share of fuzzing."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if item.get_closest_marker("multigpu") is not None and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs two CUDA GPUs ({gpus} here)"))
        elif item.get_closest_marker("gpu") is not None and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    part = config.getoption("--fuzz-part")
    if not part:
        return
    index, count = (int(x) for x in part.split("/"))
    fuzz = [item for item in items if item.get_closest_marker("fuzz")]
    dropped = {id(item) for position, item in enumerate(fuzz) if position % count != index}
    config.hook.pytest_deselected(items=[item for item in items if id(item) in dropped])
    items[:] = [item for item in items if id(item) not in dropped]
