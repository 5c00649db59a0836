"""Markdown tables from a bench/quantize.py result (the quantize tables of README.md and docs/performance.md).

python bench/report.py bench/results/quantize-h200-2026-11-29.json
"""

import json
import sys


def main(path: str) -> None:
    data = json.loads(open(path).read())
    meta, rows = data["meta"], data["rows"]
    where = meta.get("gpu") or f"CPU ({meta.get('cpu')}, {meta.get('threads')} threads)"
    print(f"{where}, torch {meta['torch']}, bitsandbytes {meta.get('bitsandbytes')}, {meta['date']}, "
          f"commit {meta.get('commit')}; copy {meta.get('copy_gbps')} GB/s; `{meta['command']}`\n")  # fmt: skip
    ours = [r for r in rows if r["impl"] == "qlora_ext"]
    print("| op | weight | dtype | DQ | qlora_ext ms | bitsandbytes ms | speed-up | GB/s | of copy | floor ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in ours:
        same = ("op", "n", "k", "dtype", "dq")
        ref = next((q for q in rows if q["impl"] == "bitsandbytes" and all(q[f] == r[f] for f in same)), None)
        print(f"| {r['op']} | {r['n']}x{r['k']} | {r['dtype']} | {'yes' if r['dq'] else 'no'} | {r['ms']:.4f} | "
              f"{ref['ms'] if ref else float('nan'):.4f} | {r.get('speedup_vs_bitsandbytes', float('nan')):.2f}x | "
              f"{r['gbps']:.0f} | {r['frac_of_copy']:.2f} | {r['floor_ms']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
