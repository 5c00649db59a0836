"""The tables of the products with a 4-bit weight, from a bench/gemm.py result.

    python bench/gemm_tables.py bench/results/gemm-h200-2026-12-06-bf679d3.json

One table per op present (gemm: forward, gemm_t: backward): a row per M, a column per weight
shape, each cell the time ratio bf16 / qlora_ext and, in brackets, bitsandbytes / qlora_ext. The
forward table ends with the target for the row (docs/performance.md).
"""

import json
import sys

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
# Issue 3's forward targets (time ratio bf16 / ours) by M.
TARGETS = {1: "3.0x large, 2.0x others", 2: "2.0x large, 1.5x others", 4: "2.0x large, 1.5x others",
           8: "2.0x large, 1.5x others", 16: "2.0x large, 1.5x others", 32: "1.2x", 64: "1.2x", 128: "1.0x",
           256: "1.0x", 1024: "0.95x", 4096: "0.95x"}  # fmt: skip


def table(rows: list[dict], op: str) -> list[str]:
    times = {(r["n"], r["k"], r["M"], r["impl"]): r["ms"] for r in rows if r["op"] == op}
    ms = sorted({m for (_, _, m, _) in times})
    forward = op == "gemm"
    lines = ["| M | " + " | ".join(f"{n}x{k}" for n, k in SHAPES) + (" | target vs bf16 |" if forward else " |"),
             "|" + " --- |" * (len(SHAPES) + 1 + forward)]  # fmt: skip
    for m in ms:
        cells = []
        for n, k in SHAPES:
            ours = times.get((n, k, m, "qlora_ext"))
            bf16, bnb = times.get((n, k, m, "torch_bf16")), times.get((n, k, m, "bitsandbytes"))
            cells.append(f"{bf16 / ours:.2f}x ({bnb / ours:.2f}x)" if ours and bf16 and bnb else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + (f" | {TARGETS.get(m, '')} |" if forward else " |"))
    return lines


def main(path: str) -> None:
    data = json.loads(open(path).read())
    meta, rows = data["meta"], data["rows"]
    print(f"{meta.get('gpu')}, commit {meta.get('commit')}, {meta.get('date')}, copy {meta.get('copy_gbps')} GB/s, "
          f"bf16 matmul {meta.get('matmul_tflops')} TFLOP/s\n")  # fmt: skip
    for op in ("gemm", "gemm_t"):
        if any(r["op"] == op for r in rows):
            print("\n".join(table(rows, op)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
