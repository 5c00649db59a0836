"""Does initcheck take a cuBLAS product's output for uninitialized memory? The bf16 product of the
report in bench/results/tests/sanitize-h100-2026-12-06-bb339db.md ([37, 200] x [200, 8], cuBLAS),
copied to the host, beside the same values written by an elementwise kernel (the control). Run under
compute-sanitizer --tool initcheck: a report on the first copy only means the reports on cuBLAS
results are the tool's, not a read of memory nothing wrote."""

import sys

import torch

which = sys.argv[1]
x = torch.randn(37, 200, dtype=torch.bfloat16, device="cuda")
a = torch.randn(8, 200, dtype=torch.bfloat16, device="cuda")
if which == "cublas":
    out = x @ a.T
else:
    out = torch.empty(37, 8, dtype=torch.bfloat16, device="cuda")
    out.copy_((x[:, :8] * 2).contiguous())
torch.cuda.synchronize()
print(which, "sum", out.cpu().float().sum().item())  # the bf16 result itself copied, as in the report
