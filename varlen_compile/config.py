"""Package-wide switches, Inductor-style: module attributes, defaults from the environment.

Read while a call is traced, so Dynamo guards on them: changing one recompiles.

``check_offsets`` (env ``VARLEN_COMPILE_CHECK_OFFSETS=1``): eager calls always check ``cu_seq``
and the ``max_q``/``max_k`` hints on the host. Compiled, exported and CUDA-graph-captured calls
cannot read them without a sync; by default their kernels clamp every offset into the tensors
(never an out-of-bounds access) and a malformed ``cu_seq`` gives unspecified values in the rows
it describes. With ``check_offsets = True`` those calls also run a device-side assertion
(``torch._assert_async``: no host sync) that ``cu_seq`` starts at 0, never decreases and ends at
the token count, and that the hints are not below the real maxima. A failed assertion is a CUDA
device-side assert: the process's CUDA context is unusable afterwards, so use it to debug.
"""

from __future__ import annotations

import os

__all__ = ["check_offsets"]

check_offsets: bool = os.environ.get("VARLEN_COMPILE_CHECK_OFFSETS", "0") == "1"
