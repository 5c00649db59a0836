"""A few launches of the fused product for a profiler (ncu) to look at.

    ncu -k regex:gemm_4bit_stream --launch-skip 2 --launch-count 1 python3 bench/profile_gemm.py [N K M CONFIG]

CONFIG: "default" (the dispatch's choice) or a kernel configuration's name (python3 -c "from qlora_ext
import _C; print([c['name'] for c in _C._gemm_4bit_configs()])"), run through the private op
torch.ops.qlora._gemm_4bit_with; or "transposed": the backward product gemm_4bit_transposed, an [M, N]
grad times W (its own kernel at M <= 16: ncu -k regex:gemm_4bit_transposed).
"""

import sys

import torch

from qlora_ext import functional as F

n, k, m = (int(v) for v in (sys.argv[1:4] or ["28672", "8192", "1"]))
config = sys.argv[4] if len(sys.argv) > 4 else "default"
w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
packed, state = F.quantize_4bit(w)
x = torch.randn(m, n if config == "transposed" else k, device="cuda").to(torch.bfloat16)
for _ in range(5):
    if config == "transposed":
        F.gemm_4bit_transposed(x, packed, state)
    elif config == "default":
        F.gemm_4bit(x, packed, state)
    else:
        F._gemm_4bit_with(x, packed, state, config)
torch.cuda.synchronize()
