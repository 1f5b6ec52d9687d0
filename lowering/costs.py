"""The kernel choice's cost-model coefficients (``cost_model.KernelCost``, femtoseconds) per arch
major, cost key and kernel; where a key has none, the default table decides (``choices.py``).
Fitted by ``python -m benchmarks choice --fit-costs choice-cost-grid-part1of2-fa4.jsonl choice-cost-grid-part1of2-triton.jsonl``. Generated: refit rather than edit."""

from .cost_model import CostKey, KernelCost

COSTS: dict[int, dict[CostKey, dict[str, KernelCost]]] = {
    9: {
        CostKey('backward', 128, 128, causal=True, softcap=False): {
            'fa4': KernelCost(host=577479808333, launch=722001932, row=1284635, sequence=72053911, pair=2100),
            'triton': KernelCost(host=84083318333, launch=22703820008, row=1143666, sequence=26255474, pair=3495),
        },
        CostKey('backward', 64, 64, causal=True, softcap=False): {
            'fa4': KernelCost(host=968496780000, launch=0, row=600692, sequence=72105047, pair=1233),
            'triton': KernelCost(host=146142396667, launch=8343324516, row=520918, sequence=10683006, pair=2215),
        },
        CostKey('forward', 128, 128, causal=True, softcap=False): {
            'fa4': KernelCost(host=109335418333, launch=3850398753, row=350541, sequence=11598148, pair=770),
            'triton': KernelCost(host=27413718333, launch=7526227631, row=355191, sequence=2889761, pair=1082),
        },
        CostKey('forward', 64, 64, causal=True, softcap=False): {
            'fa4': KernelCost(host=108546436667, launch=4033304125, row=265740, sequence=9923833, pair=466),
            'triton': KernelCost(host=27638050000, launch=3461158839, row=156106, sequence=1450427, pair=655),
        },
    },
}
