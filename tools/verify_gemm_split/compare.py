"""dump TAG: run the default gemm_4bit over a grid of cases with this PYTHONPATH's build, saving the
outputs and the launched kernels (name, grid, block, shared memory, registers) under /tmp/dump_TAG.
compare: the two dumps, bit for bit and launch for launch. times TAG: each kernel's median time (us,
torch.profiler) in the default gemm_4bit of a few bf16 cases, under /tmp/times_TAG.json; compare_times:
the two builds' times side by side (which kernel of a product got slower)."""

import glob
import json
import os
import sys

import torch

CASES = []
big = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
small = [(200, 1024), (40, 16448), (5000, 4096), (72, 4608)]
MS = [1, 2, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 300]
for n, k in big + small:
    for m in MS:
        CASES.append((n, k, m, "bf16", True, -1))
for n, k in [(4096, 4096), (8192, 8192), (8192, 28672), (11008, 4096), (72, 4608)]:
    for m in MS:
        CASES.append((n, k, m, "fp16", True, -1))
for n, k in [(8192, 8192), (4096, 4096), (8192, 28672)]:
    for m in [1, 9, 16, 17, 64, 129, 256]:
        CASES.append((n, k, m, "bf16", False, -1))
        CASES.append((n, k, m, "fp16", False, -1))
for n, k in [(4096, 4096), (8192, 8192), (8192, 28672), (200, 1024)]:
    for m in [64, 300, 1024]:
        CASES.append((n, k, m, "bf16", True, 1 << 40))


def gemm(_C, F, x, packed, state, bias, maxm):
    """The default gemm_4bit (maxm -1), or the fused kernel forced at every M: through the global
    switch of the build before the split, through _gemm_4bit_with("fused") after it."""
    if maxm == -1:
        return F.gemm_4bit(x, packed, state, bias)
    if not hasattr(_C, "_set_gemm_fused_max_m"):
        return F._gemm_4bit_with(x, packed, state, "fused", bias)
    prev = _C._set_gemm_fused_max_m(maxm)
    try:
        return F.gemm_4bit(x, packed, state, bias)
    finally:
        _C._set_gemm_fused_max_m(prev)


def dump(tag):
    from torch.profiler import ProfilerActivity, profile

    from qlora_ext import _C, functional as F

    out_dir = f"/tmp/dump_{tag}"
    os.makedirs(out_dir, exist_ok=True)
    by_shape = {}
    for i, c in enumerate(CASES):
        by_shape.setdefault((c[0], c[1], c[3], c[4]), []).append((i, c))
    launches = {}
    for (n, k, dt, nested), cases in by_shape.items():
        dtype = torch.bfloat16 if dt == "bf16" else torch.float16
        g = torch.Generator().manual_seed(n * 7 + k)
        w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).cuda()
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        torch.save({"packed": packed.cpu(), "absmax": state.absmax.cpu()}, f"{out_dir}/w_{n}x{k}_{dt}_{nested}.pt")
        inputs = []
        for i, (_, _, m, _, _, maxm) in cases:
            gx = torch.Generator().manual_seed(1000 + i)
            x = torch.randn(m, k, generator=gx).to(dtype).cuda()
            bias = (torch.randn(n, generator=gx) * 0.1).to(dtype).cuda() if i % 2 else None
            inputs.append((i, x, bias, maxm))
        for _, x, bias, maxm in inputs:  # warm-up: caches, workspaces
            gemm(_C, F, x, packed, state, bias, maxm)
        torch.cuda.synchronize()
        outs = {}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i, x, bias, maxm in inputs:
                outs[i] = gemm(_C, F, x, packed, state, bias, maxm)
            torch.cuda.synchronize()
        trace = f"/tmp/trace_{tag}.json"
        prof.export_chrome_trace(trace)
        ev = [e for e in json.load(open(trace))["traceEvents"] if e.get("cat") == "kernel"]
        ev.sort(key=lambda e: e["ts"])
        launches[f"{n}x{k}_{dt}_{nested}"] = [
            (
                e["name"],
                e["args"].get("grid"),
                e["args"].get("block"),
                e["args"].get("shared memory"),
                e["args"].get("registers per thread"),
            )
            for e in ev
        ]
        for i, o in outs.items():
            torch.save(o.cpu(), f"{out_dir}/out_{i}.pt")
    json.dump(launches, open(f"{out_dir}/launches.json", "w"))
    print(tag, "dumped", len(CASES), "cases", sum(len(v) for v in launches.values()), "kernel launches", flush=True)


def compare():
    a, b = "/tmp/dump_orig", "/tmp/dump_new"
    same = diff = 0
    for i, c in enumerate(CASES):
        x, y = torch.load(f"{a}/out_{i}.pt"), torch.load(f"{b}/out_{i}.pt")
        if torch.equal(x, y):
            same += 1
        else:
            diff += 1
            print("DIFFERENT OUTPUT", c)
    for f in glob.glob(f"{a}/w_*.pt"):
        wa, wb = torch.load(f), torch.load(f.replace(a, b))
        assert all(torch.equal(wa[t], wb[t]) for t in wa), f
    la, lb = json.load(open(f"{a}/launches.json")), json.load(open(f"{b}/launches.json"))
    ldiff = 0
    kernels = {}
    for key in la:
        A, B = la[key], lb[key]
        for q in B:
            short = q[0].split("<")[0].split("::")[-1].replace("void ", "")
            kernels[short] = kernels.get(short, 0) + 1
        if len(A) != len(B) or any(p[1:] != q[1:] for p, q in zip(A, B)):
            ldiff += 1
            print("DIFFERENT LAUNCHES", key, len(A), len(B))
            for p, q in zip(A, B):
                if p[1:] != q[1:]:
                    print("   ", p, "\n   ", q)
                    break
    print(
        f"outputs: {same} bit-identical, {diff} different; launches (grid, block, shared memory, registers): "
        f"{len(la) - ldiff} of {len(la)} weight groups identical, {sum(len(v) for v in lb.values())} launches; "
        f"kernels: {kernels}"
    )


TIMED = [(11008, 4096, 64), (11008, 4096, 128), (4096, 11008, 256), (8192, 8192, 256), (4096, 4096, 128)]


def times(tag, reps=50):
    from torch.profiler import ProfilerActivity, profile

    from qlora_ext import functional as F

    result = {}
    for n, k, m in TIMED:
        g = torch.Generator().manual_seed(n + k)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).cuda()
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
        for _ in range(10):
            F.gemm_4bit(x, packed, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                F.gemm_4bit(x, packed, state)
            torch.cuda.synchronize()
        trace = f"/tmp/trace_times_{tag}.json"
        prof.export_chrome_trace(trace)
        by_kernel = {}
        for e in json.load(open(trace))["traceEvents"]:
            if e.get("cat") == "kernel":
                name = e["name"].replace("qlora::cuda::(anonymous namespace)::", "").replace("void ", "")
                short = name.split("(")[0]  # the kernel and its template arguments
                if short.startswith("add_splits_kernel<"):  # one kernel in 26789df, one per LORA after
                    short = short.split(",")[0].rstrip(">") + ">"
                by_kernel.setdefault(short, []).append(e["dur"])
        result[f"{n}x{k} M={m}"] = {name: sorted(d)[len(d) // 2] for name, d in by_kernel.items()}
    json.dump(result, open(f"/tmp/times_{tag}.json", "w"), indent=1)
    print(tag, "timed", len(result), "cases", flush=True)


def compare_times():
    a, b = (json.load(open(f"/tmp/times_{t}.json")) for t in ("orig", "new"))
    for case in a:
        for name in sorted(set(a[case]) | set(b[case])):
            ta, tb = a[case].get(name), b[case].get(name)
            ratio = f"{tb / ta:.3f}" if ta and tb else "-"
            print(f"{case:22s} {name[:70]:70s} orig {ta} us, new {tb} us, new/orig {ratio}")


if __name__ == "__main__":
    {
        "dump": lambda: dump(sys.argv[2]),
        "compare": compare,
        "times": lambda: times(sys.argv[2]),
        "compare_times": compare_times,
    }[sys.argv[1]]()
