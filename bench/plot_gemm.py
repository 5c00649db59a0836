r"""Speed-up over bf16 cuBLAS against M, one panel per weight shape, from a bench/gemm.py result.

    pip install -r requirements-bench.txt
    python bench/plot_gemm.py bench/results/gemm-h200-2026-12-06-bf679d3.json \
        bench/results/gemm-h200-2026-12-06-bf679d3.png

Solid lines: the forward product (op gemm); dashed: the backward product (op gemm_t). Grey steps:
the forward targets (docs/performance.md). Above 1 is faster than bf16.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Forward targets (time ratio bf16 / ours) by M, for the three large shapes and for the others.
LARGE = {(8192, 8192), (28672, 8192), (8192, 28672)}
TARGET_LARGE = {1: 3.0, 2: 2.0, 4: 2.0, 8: 2.0, 16: 2.0, 32: 1.2, 64: 1.2, 128: 1.0, 256: 1.0, 1024: 0.95, 4096: 0.95}
TARGET_OTHER = {1: 2.0, 2: 1.5, 4: 1.5, 8: 1.5, 16: 1.5, 32: 1.2, 64: 1.2, 128: 1.0, 256: 1.0, 1024: 0.95, 4096: 0.95}


def main(src: str, dst: str) -> None:
    data = json.loads(open(src).read())
    meta, rows = data["meta"], data["rows"]
    shapes = sorted({(r["n"], r["k"]) for r in rows if r["op"] == "gemm"}, key=lambda s: (s[0] * s[1], s))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True, sharey=True)
    for ax, (n, k) in zip(axes.flat, shapes):
        for op, style in (("gemm", "-"), ("gemm_t", "--")):
            for impl, color in (("qlora_ext", "tab:blue"), ("bitsandbytes", "tab:orange")):
                pts = sorted((r["M"], r["speedup_vs_torch_bf16"]) for r in rows
                             if r["op"] == op and r["impl"] == impl and (r["n"], r["k"]) == (n, k))  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, label=f"{impl} {op}")
        target = TARGET_LARGE if (n, k) in LARGE else TARGET_OTHER
        ax.step(list(target), list(target.values()), where="mid", color="grey", lw=1, label="target (gemm)")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(f"W {n} x {k} (out x in)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("M (rows of x)")
    for ax in axes[:, 0]:
        ax.set_ylabel("speed-up over bf16 cuBLAS")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"NF4 + double quant, bf16, {meta.get('gpu')}, {meta.get('date')}, commit {meta.get('commit')}; "
                 f"CUDA-graph timing", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
