"""Record what bitsandbytes' CUDA path writes for adversarial inputs, so that the CUDA kernels can be
matched to it bit for bit offline. Run on a GPU machine with bitsandbytes importable; writes one
safetensors file of inputs and outputs to the folder given."""

import sys

import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

out = {}
g = torch.Generator().manual_seed(1234)
nf4 = F.get_4bit_type("nf4", device="cpu")
nf4_mid = (nf4[:-1] + nf4[1:]) / 2
fp4 = F.get_4bit_type("fp4", device="cpu")
fs = torch.sort(fp4).values
fp4_mid = (fs[:-1] + fs[1:]) / 2


def cases():
    yield "rand_odd", torch.randn(3 * 4096 + 37, generator=g) * 3
    yield "rand_small", torch.randn(777, generator=g)
    # zero block, NaN, Inf, midpoints (absmax 1 by a planted 1.0) and tiny values
    x = torch.randn(8192, generator=g)
    x[:64] = 0
    x[64:128] = 0
    x[200] = float("nan")
    x[300] = float("inf")
    x[400] = float("-inf")
    x[512:1024] = torch.cat(
        [nf4_mid, -nf4_mid, nf4_mid.nextafter(torch.tensor(2.0)), nf4_mid.nextafter(torch.tensor(-2.0))]
    ).repeat(9)[:512]
    x[512:1024:32] = 1.0
    x[1024:1536] = torch.cat(
        [fp4_mid, -fp4_mid, fp4_mid.nextafter(torch.tensor(2.0)), fp4_mid.nextafter(torch.tensor(-2.0))]
    ).repeat(9)[:512]
    x[1024:1536:32] = 1.0
    x[1536:1600] = torch.randn(64, generator=g) * 1e-30
    x[1600:1664] = torch.randn(64, generator=g) * 1e-42  # denormals
    x[2000:2100] = -0.0
    yield "adversarial", x
    # absmax spread for the double quantization: block scales over many decades
    y = torch.randn(64 * 512, generator=g) * torch.logspace(-6, 2, 512).repeat_interleave(64)
    yield "spread", y


per_dtype = {"float32": {}, "float16": {}, "bfloat16": {}}
for name, x in cases():
    out[f"{name}.input"] = x.clone()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        dn = str(dtype).split(".")[-1]
        res = per_dtype[dn]
        for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            for qt in ("nf4", "fp4"):
                for dq in (False, True):
                    key = f"{name}.{dn}.{bs}.{qt}.{int(dq)}"
                    try:
                        p, s = F.quantize_4bit(xd.cuda(), blocksize=bs, quant_type=qt, compress_statistics=dq)
                    except Exception as e:  # record, keep going
                        print(key, "failed", e)
                        continue
                    res[key + ".packed"] = p.cpu().reshape(-1)
                    res[key + ".absmax"] = s.absmax.cpu()
                    if dq:
                        res[key + ".nested_absmax"] = s.state2.absmax.cpu()
                        res[key + ".offset"] = s.offset.cpu().reshape(1)
                        res[key + ".nested_code"] = s.state2.code.cpu()
                    res[key + ".deq"] = F.dequantize_4bit(p, s).cpu().reshape(-1)
# plain 8-bit blockwise of absmax-like data, for the nested search alone
for i in range(4):
    a = torch.rand(256 * 40 + 17, generator=g) * 2 - 1
    a[::97] = 0
    q, st = F.quantize_blockwise(a.cuda(), blocksize=256)
    out[f"blockwise8.{i}.input"] = a
    out[f"blockwise8.{i}.q"] = q.cpu()
    out[f"blockwise8.{i}.absmax"] = st.absmax.cpu()
out["meta.torch_cuda"] = torch.tensor([float(torch.version.cuda)])
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1] + "/common.safetensors")
for dn, res in per_dtype.items():
    save_file({k: v.contiguous() for k, v in res.items()}, sys.argv[1] + f"/{dn}.safetensors")
print("wrote", len(out), "tensors")
