"""Quantize and dequantize against bitsandbytes, from one or more bench/quantize.py results (one a GPU).

    pip install -r requirements-bench.txt
    python bench/plot_quantize.py OUT.png RESULT.json [RESULT.json ...]

bf16 input, NF4, blocksize 64, one bar group a weight shape, one bar colour a GPU. Left: speed-up
over bitsandbytes; right: the effective bandwidth as a fraction of the device-to-device copy rate of
the same run (1.0 is a plain copy of the same bytes). Solid bars with double quantization, hatched
without.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:red"]


def main(dst: str, srcs: list[str]) -> None:
    runs = [json.loads(open(s).read()) for s in srcs]
    fig, axes = plt.subplots(2, 2, figsize=(15, 8.5), sharex=True)
    shapes = sorted({(r["n"], r["k"]) for run in runs for r in run["rows"]}, key=lambda s: (s[0] * s[1], s))
    width = 0.8 / (2 * len(runs))
    for row, op in enumerate(("quantize", "dequantize")):
        for col, (field, label) in enumerate((("speedup_vs_bitsandbytes", "speed-up over bitsandbytes"),
                                              ("frac_of_copy", "fraction of the copy rate"))):  # fmt: skip
            ax = axes[row, col]
            for i, run in enumerate(runs):
                meta = run["meta"]
                for j, dq in enumerate((True, False)):
                    vals = []
                    for n, k in shapes:
                        r = next((r for r in run["rows"] if r["impl"] == "qlora_ext" and r["op"] == op
                                  and r["dtype"] == "bfloat16" and r["dq"] == dq and (r["n"], r["k"]) == (n, k)),
                                 None)  # fmt: skip
                        vals.append(r[field] if r else float("nan"))
                    xs = [s + (2 * i + j) * width - 0.4 + width / 2 for s in range(len(shapes))]
                    ax.bar(xs, vals, width, color=COLORS[i % len(COLORS)], hatch=None if dq else "//",
                           alpha=0.9 if dq else 0.5, edgecolor="white",
                           label=f"{meta.get('gpu')} ({meta.get('date', '')[:10]}, {meta.get('commit')}), "
                                 f"{'double quant' if dq else 'no double quant'}")  # fmt: skip
            if field == "frac_of_copy":
                ax.axhline(1.0, color="black", lw=0.6)
            ax.set_title(f"{op}: {label}")
            ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[1]:
        ax.set_xticks(range(len(shapes)), [f"{n}x{k}" for n, k in shapes], rotation=20)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle("qlora_ext quantize_4bit / dequantize_4bit, NF4, blocksize 64, bf16 input; CUDA-event medians",
                 fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
