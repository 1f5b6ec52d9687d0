"""The kernel choice's cost-model coefficients (``cost_model.KernelCost``, femtoseconds) per arch
major, cost key and kernel; where a key has none, the default table decides (``choices.py``).
None fitted yet: ``python -m benchmarks choice --cost-grid``, then ``--fit-costs``. Generated: refit rather than edit."""

from .cost_model import CostKey, KernelCost

COSTS: dict[int, dict[CostKey, dict[str, KernelCost]]] = {
    9: {
    },
}
