"""Diagnostic: the compiled template vs the standalone kernel on one case, same config.

Writes the generated Inductor code to $OUT/compiled_<case>.py and prints both timings.
    python benchmarks/inspect_template.py d128
"""

from __future__ import annotations

import os
import sys

import torch
from torch._inductor.utils import run_and_get_code
from triton.testing import do_bench

from bench import all_cases, make_inputs
from varlen_compile import varlen_attn
from varlen_compile.lowering import launcher
from varlen_compile.params import AttnOptions, BatchLayout

for name in sys.argv[1:]:
    case = all_cases()[name]
    x = make_inputs(case)
    q, k, v = (t.detach() for t in (x.q, x.k, x.v))
    compiled = torch.compile(lambda q, k, v: varlen_attn(q, k, v, x.cu_seq, x.cu_seq, is_causal=case.causal), fullgraph=True)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, q, k, v)
        ours = do_bench(lambda: compiled(q, k, v), warmup=50, rep=300, return_mode="median")
    path = os.path.join(os.environ.get("OUT", "/tmp"), f"compiled_{name}.py")
    with open(path, "w") as f:
        f.write("\n\n# ======== next module ========\n\n".join(codes))
    layout, options = BatchLayout(x.cu_seq, x.cu_seq), AttnOptions(case.causal)
    standalone = do_bench(lambda: launcher.forward(q, k, v, layout, options), warmup=50, rep=300, return_mode="median")
    print(f"{name}: compiled {ours:.3f} ms, standalone {standalone:.3f} ms")
