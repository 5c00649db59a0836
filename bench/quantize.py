"""Quantize / dequantize benchmark: qlora_ext against bitsandbytes and a plain copy, side by side.

For each Llama weight shape, bf16 and fp16 input, with and without double quantization, it first
checks that both libraries give the same bytes, then times quantize_4bit and dequantize_4bit
(NF4, blocksize 64). Effective bandwidth counts 2.5 bytes a weight (2 bytes of 16-bit weight,
0.5 byte of codes); the floor is those bytes at the measured copy rate.

    python bench/quantize.py --out bench/results/quantize-GPU-DATE.json        # GPU
    python bench/quantize.py --device cpu --shapes 4096x4096 --out ...        # CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_ext  # noqa: E402
from qlora_ext import functional as Q  # noqa: E402

import common  # noqa: E402

BYTES_PER_WEIGHT = 2.5


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.numel() != b.numel():
        return False
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype.is_floating_point:
        view = {4: torch.int32, 2: torch.int16}[a.element_size()]
        return bool(((a.view(view) == b.view(view)) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def check_same(bnbf, x, dq) -> None:
    p, s = Q.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
    p_ref, s_ref = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
    ok = same_bits(p, p_ref) and same_bits(s.absmax, s_ref.absmax)
    if dq:
        ok = ok and same_bits(s.state2.absmax, s_ref.state2.absmax) and same_bits(s.offset, s_ref.offset)
    ok = ok and same_bits(Q.dequantize_4bit(p, s), bnbf.dequantize_4bit(p_ref, s_ref))
    if not ok:
        raise SystemExit(f"qlora_ext and bitsandbytes disagree on {tuple(x.shape)} {x.dtype} dq={dq}: not timing")


def time_impl(device: str, quant, dequant, xs: list, kw: dict, iters: int) -> dict:
    """Milliseconds a call of quant(x, **kw) and of dequant(*quant(x, **kw)), cycling through the
    copies xs (more than the L2 holds)."""
    qs = [quant(x, **kw) for x in xs]
    ms_q = common.time_on(device, lambda i: quant(xs[i % len(xs)], **kw), iters)
    ms_d = common.time_on(device, lambda i: dequant(*qs[i % len(qs)]), iters)
    return {"quantize": ms_q, "dequantize": ms_d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in common.LLAMA_SHAPES))
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None, help="results JSON (bench/results/...)")
    args = common.parse_args(ap, {"shapes": "4096x4096,28672x8192", "iters": 10})
    device = args.device
    if device == "cuda" and not qlora_ext.cuda_kernels_available():
        raise SystemExit("this build of qlora_ext has no CUDA kernels")
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
        print("bitsandbytes is not installed: timing qlora_ext alone")

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    copy = common.copy_gbps(device, nbytes=2 * 2**30 if device == "cuda" else 512 * 2**20)
    print(f"copy: {copy:.0f} GB/s (read + write)")
    rows = []
    for n, k in shapes:
        for dtype in dtypes:
            numel = n * k
            reps = common.rotations(numel * 2) if device == "cuda" else 1
            xs = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(reps)]
            floor_ms = numel * BYTES_PER_WEIGHT / (copy * 1e9) * 1e3
            for dq in (False, True):
                if bnbf is not None:
                    check_same(bnbf, xs[0], dq)
                impls = {"qlora_ext": (Q.quantize_4bit, Q.dequantize_4bit)}
                if bnbf is not None:
                    impls["bitsandbytes"] = (
                        lambda x, **kw: bnbf.quantize_4bit(x, **kw),
                        lambda p, s: bnbf.dequantize_4bit(p, s),
                    )
                kw = dict(blocksize=64, quant_type="nf4", compress_statistics=dq)
                timings = {impl: time_impl(device, quant, dequant, xs, kw, args.iters)
                           for impl, (quant, dequant) in impls.items()}  # fmt: skip
                for impl, t in timings.items():
                    for op, ms in t.items():
                        gbps = numel * BYTES_PER_WEIGHT / (ms * 1e-3) / 1e9
                        row = {
                            "op": op,
                            "impl": impl,
                            "n": n,
                            "k": k,
                            "M": 0,
                            "dtype": str(dtype).removeprefix("torch."),
                            "dq": dq,
                            "ms": round(ms, 5),
                            "gbps": round(gbps, 1),
                            "floor_ms": round(floor_ms, 5),
                            "frac_of_copy": round(gbps / copy, 3),
                            "checked_against_bitsandbytes": bnbf is not None,
                        }
                        if impl == "qlora_ext" and "bitsandbytes" in timings:
                            row["speedup_vs_bitsandbytes"] = round(timings["bitsandbytes"][op] / ms, 2)
                        rows.append(row)
            del xs
            if device == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{'op':<10} {'shape':>12} {'dtype':>8} {'dq':>3} {'qlora ms':>9} {'bnb ms':>8} {'x bnb':>6} "
          f"{'GB/s':>6} {'of copy':>7}")  # fmt: skip
    for r in rows:
        if r["impl"] != "qlora_ext":
            continue
        same = ("op", "n", "k", "dtype", "dq")
        ref = next((q for q in rows if q["impl"] == "bitsandbytes" and all(q[f] == r[f] for f in same)), None)
        print(f"{r['op']:<10} {r['n']:>5}x{r['k']:<6} {r['dtype']:>8} {int(r['dq']):>3} {r['ms']:>9.4f} "
              f"{(ref['ms'] if ref else float('nan')):>8.4f} {r.get('speedup_vs_bitsandbytes', float('nan')):>6.2f} "
              f"{r['gbps']:>6.0f} {r['frac_of_copy']:>7.2f}")  # fmt: skip
    m = common.meta(device)
    m["copy_gbps"] = round(copy, 1)
    m["bytes_per_weight"] = BYTES_PER_WEIGHT
    m["quant_type"] = "nf4"
    m["blocksize"] = 64
    if args.out:
        common.write_results(args.out, m, rows)


if __name__ == "__main__":
    main()
