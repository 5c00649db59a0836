"""Products with a 4-bit weight on the GPU: qlora_ext against bitsandbytes and bf16 cuBLAS, one run.

    python3 bench/gemm.py --out bench/results/gemm-h200-DATE.json [--sweep]

For each Llama weight shape (out x in, bf16, NF4 with double quantization, blocksize 64) and each M:
  op "gemm"   (x [M, in] @ W^T): qlora_ext.gemm_4bit, bitsandbytes.matmul_4bit,
              torch bf16 (torch.matmul on the dequantized weight, cuBLAS);
  op "gemm_t" (dY [M, out] @ W, the backward product): qlora_ext.gemm_4bit_transposed,
              bitsandbytes' backward (its dequantize_4bit, then torch.matmul), torch bf16.
Results are checked first: every implementation against a float64 product on the dequantized
weight (relative Frobenius error, bf16 operands land between 1e-3 and 1e-2).
Timing: each implementation's calls are captured in a CUDA graph (launch overhead out; what is
measured is the GPU's time) over weights rotated through at least 512 MiB, so that no call is served
from the 60 MiB L2; the median of the replays, divided by the calls a replay makes. The floor of each
row is max(bytes it must move / copy bandwidth, 2MNK / bf16 matmul rate), both measured in this run.
--sweep adds op "gemm_path" rows: at each M the dispatch's choice (fused kernels forced at every M:
impl qlora_ext_default), the kernel configurations it weighs there (impl qlora_ext_<configuration>,
run through the private op torch.ops.qlora._gemm_4bit_with) and dequantize + cuBLAS, the
measurements behind the dispatch table of csrc/gemm_4bit_config.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_ext import functional as F  # noqa: E402

import common  # noqa: E402

MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 2048, 4096]


def sweep_configs(m: int) -> list[str]:
    """The kernel configurations (csrc/gemm_4bit_config.cpp) the sweep times at M = m beside the
    dispatch's choice: those the dispatch picks at that M on some weight, GPU or alignment, the ones
    kept for comparison (wgmma_tma_*_1cta), and dequantize + cuBLAS from M = 16."""
    if m <= 8:
        configs = ["ws_32x8", "ws_32x8_deep", "ws_16x8", "stream_16x8", "mma_16x8", "wgmma_tma_128x16"]
    elif m <= 16:
        configs = ["ws_32x16", "ws_16x16", "stream_16x16", "mma_16x16", "wgmma_tma_128x16"]
    elif m <= 32:
        configs = ["ws_32x32", "stream_16x32", "mma_32x32", "wgmma_tma_128x32", "wgmma_tma_128x32_1cta"]
    elif m <= 64:
        configs = ["wgmma_tma_128x64", "wgmma_tma_128x64_1cta", "stream_16x64", "mma_32x32"]
    elif m <= 128:
        configs = ["wgmma_tma_128x128"]
    else:
        configs = ["wgmma_tma_128x256"]
    return configs + (["dequantize_cublas"] if m >= 16 else [])


def implementations(op: str, x, ours: list, theirs: list, bf16: list, bnb=None, bnbf=None) -> dict:
    """Each implementation of `op` on x: {name: (fn, copies)}, fn(i) multiplying by copy i % copies
    of its weight (ours, bitsandbytes' (theirs) or the bf16 one: copies that together are more than
    the L2 holds). bitsandbytes' where bnb and bnbf are given."""
    q, b = len(ours), len(bf16)
    if op == "gemm":
        impls = {"qlora_ext": (lambda i: F.gemm_4bit(x, *ours[i % q]), q)}
        if bnb is not None:
            impls["bitsandbytes"] = (lambda i: bnb.matmul_4bit(x, theirs[i % q][0].t(), theirs[i % q][1]), q)
        impls["torch_bf16"] = (lambda i: torch.matmul(x, bf16[i % b].t()), b)
    else:
        impls = {"qlora_ext": (lambda i: F.gemm_4bit_transposed(x, *ours[i % q]), q)}
        if bnb is not None:
            impls["bitsandbytes"] = (lambda i: torch.matmul(x, bnbf.dequantize_4bit(*theirs[i % q]).to(x.dtype)), q)
        impls["torch_bf16"] = (lambda i: torch.matmul(x, bf16[i % b]), b)
    return impls


def check_and_time(impls: dict, ref: torch.Tensor, what: str) -> dict:
    """{name: (ms a call, relative error)} of each (fn, copies) of `impls`, checked first against
    the float64 product `ref` (a relative error of 1e-2 or more ends the run)."""
    errs, graphs = {}, {}
    for impl, (fn, copies) in impls.items():
        err = rel_err(fn(0), ref)
        if not err < 1e-2:
            raise SystemExit(f"{impl} {what}: relative error {err:.2e} against float64")
        errs[impl] = err
        graphs[impl] = capture(fn, copies)
    return {impl: (ms, errs[impl]) for impl, ms in time_graphs(graphs).items()}


def time_sweep(m: int, x, ref: torch.Tensor, ours: list, bf16: list, rows: list, n: int, k: int) -> dict:
    """Milliseconds a call of the dispatch's choice ("default", with the fused kernels forced at
    every M), of each configuration of sweep_configs(m) and of torch_bf16 on x (M = m) and the weight
    n x k; a configuration that is wrong goes to `rows` as an error, one that cannot run is skipped."""
    q = len(ours)
    paths = {"default": lambda i: F._gemm_4bit_with(x, *ours[i % q], "fused")}
    for name in sweep_configs(m):
        paths[name] = lambda i, name=name: F._gemm_4bit_with(x, *ours[i % q], name)
    graphs = {}
    for path, fn in paths.items():
        try:
            err = rel_err(fn(0), ref)
            if not err < 1e-2:
                # a wrong configuration is reported and left out; the run goes on
                print(f"WRONG {path} {n}x{k} M={m}: relative error {err:.2e}", flush=True)
                rows.append({"op": "gemm_path", "impl": f"qlora_ext_{path}", "n": n, "k": k,
                             "M": m, "dtype": "bfloat16", "error": f"relative error {err:.2e}"})  # fmt: skip
                continue
            graphs[path] = capture(fn, q)
        except NotImplementedError as e:  # the configuration cannot run on this weight or GPU
            print(f"skipped {path} {n}x{k} M={m}: {str(e).splitlines()[0]}", flush=True)
    graphs["torch_bf16"] = capture(*implementations("gemm", x, ours, [], bf16)["torch_bf16"])
    return time_graphs(graphs)


def capture(fn, copies: int):
    """A CUDA graph of `calls` calls fn(0..calls-1), about 2 ms of work, and `calls`."""
    ms_eager = common.time_cuda(fn, 5)
    calls = max(1, min(4 * copies, int(2.0 / max(ms_eager, 1e-3))))  # about 2 ms of work a replay
    calls = max(calls, min(copies, 64))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm-up outside the capture (cuBLAS handles and workspaces)
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return graph, calls


def replay_ms(graph, calls: int, replays: int) -> float:
    """Median milliseconds a call over `replays` replays of a captured graph."""
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    return statistics.median(times)


def time_graphs(graphs: dict, rounds: int = 2, replays: int = 10) -> dict:
    """Milliseconds a call of each captured (graph, calls), timed in turn over `rounds` rounds
    (the lowest round median): the same kernel timed first and timed later in one run once
    differed by up to 15% (2026-11-29, M = 1 on the large shapes), so no implementation always
    takes the first slot's conditions."""
    best = {}
    for r in range(rounds):
        order = list(graphs) if r % 2 == 0 else list(reversed(graphs))
        for name in order:
            t = replay_ms(*graphs[name], replays)
            best[name] = min(best.get(name, float("inf")), t)
    torch.cuda.synchronize()
    return {name: best[name] for name in graphs}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = common.time_cuda(lambda i: a @ b, 20)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in common.LLAMA_SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--ops", default="gemm,gemm_t")
    ap.add_argument("--sweep", action="store_true", help="also time both paths at medium M (op gemm_path)")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep (no gemm / gemm_t rows)")
    ap.add_argument("--out", default=None)
    args = common.parse_args(ap, {"ms": "1,16,64,256,1024"})
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms_list = [int(m) for m in args.ms.split(",")]
    ops = args.ops.split(",")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = bnbf = None
        print("bitsandbytes is not installed: its rows are left out")

    copy = common.copy_gbps("cuda")
    tflops = matmul_tflops()
    meta = common.meta("cuda")
    meta.update(
        copy_gbps=round(copy, 1),
        matmul_tflops=round(tflops, 1),
        timing="CUDA graph replays: median of 10, the lower of 2 rounds taken in turn",
    )
    print(f"copy {copy:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    rows = []
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        w_deq = F.dequantize_4bit(packed, state)  # the weight all three multiply by
        wd = w_deq.double()
        if bnbf is not None:
            bpacked, bstate = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(bpacked, packed), "bitsandbytes packs differently"
        del w
        copies4 = common.rotations(packed.numel() + state.absmax.numel())
        copies16 = common.rotations(w_deq.numel() * 2)
        ours = [(packed.clone(), _clone_state(state)) for _ in range(copies4)]
        theirs = [(bpacked.clone(), _clone_state(bstate)) for _ in range(copies4)] if bnbf is not None else []
        bf16 = [w_deq.clone() for _ in range(copies16)]
        w_bytes4 = packed.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4
        for op in ops:
            for m in [] if args.sweep_only else ms_list:
                inner, outer = (k, n) if op == "gemm" else (n, k)
                x = (torch.randn(m, inner, device="cuda", generator=g)).to(torch.bfloat16)
                ref = x.double() @ (wd.T if op == "gemm" else wd)
                impls = implementations(op, x, ours, theirs, bf16, bnb, bnbf)
                times = check_and_time(impls, ref, f"{op} {n}x{k} M={m}")
                del impls  # (its functions hold the weights' copies)
                flops = 2 * m * n * k
                io = 2 * m * (inner + outer)
                for impl, (ms, err) in times.items():
                    wbytes = 2 * n * k if impl == "torch_bf16" else w_bytes4
                    floor = max((wbytes + io) / (copy * 1e9), flops / (tflops * 1e12)) * 1e3
                    row = {
                        "op": op, "impl": impl, "n": n, "k": k, "M": m, "dtype": "bfloat16", "quant_type": "nf4",
                        "dq": True, "blocksize": 64, "ms": round(ms, 5), "rel_err_vs_float64": float(f"{err:.3g}"),
                        "floor_ms": round(floor, 5), "of_floor": round(floor / ms, 3),
                        "tflops": round(flops / (ms * 1e-3) / 1e12, 1),
                    }  # fmt: skip
                    if impl != "torch_bf16":
                        row["speedup_vs_torch_bf16"] = round(times["torch_bf16"][0] / ms, 3)
                    if impl == "qlora_ext" and "bitsandbytes" in times:
                        row["speedup_vs_bitsandbytes"] = round(times["bitsandbytes"][0] / ms, 3)
                    rows.append(row)
                line = "  ".join(f"{i} {t[0] * 1e3:8.1f} us" for i, t in times.items())
                print(f"{op:6s} {n:5d}x{k:<5d} M={m:<5d} {line}  "
                      f"x{times['torch_bf16'][0] / times['qlora_ext'][0]:.2f} vs bf16", flush=True)  # fmt: skip
                del x, ref
            if op == "gemm" and args.sweep:
                # the sweep's M: these, or those of --ms among them when --ms is given
                sweep_ms = (1, 8, 16, 32, 64, 128, 256, 1024)
                if args.ms != ap.get_default("ms"):
                    sweep_ms = tuple(m for m in sweep_ms if m in ms_list)
                for m in sweep_ms:
                    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
                    ref = x.double() @ wd.T
                    res = time_sweep(m, x, ref, ours, bf16, rows, n, k)
                    for path, ms in res.items():
                        impl = path if path == "torch_bf16" else f"qlora_ext_{path}"
                        rows.append({"op": "gemm_path", "impl": impl, "n": n, "k": k, "M": m,
                                     "dtype": "bfloat16", "ms": round(ms, 5)})  # fmt: skip
                    times = "  ".join(f"{p} {t * 1e3:7.1f}" for p, t in res.items())
                    print(f"path   {n:5d}x{k:<5d} M={m:<5d} {times}", flush=True)
        del ours, theirs, bf16, w_deq, wd
        torch.cuda.empty_cache()
        if args.out:  # after every shape: a run cut short keeps what it measured
            common.write_results(args.out, meta, rows)


def _clone_state(state):
    """A QuantState (ours or bitsandbytes') with its own copies of the scales."""
    import copy

    s = copy.copy(state)
    s.absmax = state.absmax.clone()
    if getattr(state, "nested", False):
        s.state2 = copy.copy(state.state2)
        s.state2.absmax = state.state2.absmax.clone()
    return s


if __name__ == "__main__":
    main()
