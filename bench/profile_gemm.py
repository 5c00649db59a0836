"""A few launches of the fused product for a profiler (ncu) to look at.

    ncu -k regex:gemm_4bit_stream --launch-skip 2 --launch-count 1 python3 bench/profile_gemm.py [N K M variant]
"""

import sys

import torch

from qlora_ext import _C, functional as F

n, k, m, variant = (int(v) for v in (sys.argv[1:] or ["28672", "8192", "1", "0"]))
w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
packed, state = F.quantize_4bit(w)
x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
_C._set_gemm_variant(variant)
for _ in range(5):
    F.gemm_4bit(x, packed, state)
torch.cuda.synchronize()
