"""Two runs of one benchmark, row by row: head's time over base's, for `bench/ab.sh` (one idea against
the tree before it, built side by side and run one after the other on the same GPU).

    python3 bench/ab_compare.py BASE.json HEAD.json [--impl qlora_ext]

Rows are matched on what names a case (op, mode, impl, shape, M, r, dtype, ...), never on what was
measured; a row in one file only is listed apart. The time is `ms` (quantize, gemm, lora), `ms_op`
(lora's adapter products) or `step_s` (e2e). Prints each matched row's ratio (below 1: head is
faster), then the range for each op, mode and impl.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

# The fields that name a case in the benchmarks' rows (bench/*.py); anything else is a measurement.
CASE_FIELDS = ("op", "mode", "impl", "kernel", "model", "n", "k", "M", "batch", "seq", "r", "adapters", "dropout",
               "dtype", "quant_type", "dq", "blocksize", "adapter_dtype", "optim")  # fmt: skip
TIME_FIELDS = ("ms", "ms_op", "step_s")


def case(row: dict[str, Any]) -> tuple:
    return tuple((f, row[f]) for f in CASE_FIELDS if f in row)


def time_of(row: dict[str, Any]) -> float | None:
    for f in TIME_FIELDS:
        if isinstance(row.get(f), (int, float)) and row[f] > 0:
            return float(row[f])
    return None


def rows_by_case(path: str) -> dict[tuple, dict[str, Any]]:
    with open(path) as f:
        rows = json.load(f)["rows"]
    out: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if time_of(row) is not None:
            out[case(row)] = row
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("head")
    ap.add_argument("--impl", help="only rows of this impl, and those without one (default: all)")
    args = ap.parse_args(argv)

    def wanted(c: tuple) -> bool:  # rows without an impl (lora's adapter products) are kept whatever --impl says
        return args.impl is None or dict(c).get("impl", args.impl) == args.impl

    base = {c: r for c, r in rows_by_case(args.base).items() if wanted(c)}
    head = {c: r for c, r in rows_by_case(args.head).items() if wanted(c)}
    keep = [c for c in head if c in base]
    if not keep:
        print("no row of the two files names the same case", file=sys.stderr)
        return 1
    ranges: dict[tuple, list[float]] = defaultdict(list)
    for c in keep:
        ratio = time_of(head[c]) / time_of(base[c])
        named = dict(c)
        ranges[(named.get("op"), named.get("mode") or named.get("kernel"), named.get("impl"))].append(ratio)
        what = " ".join(f"{k}={v}" for k, v in c if k not in ("op", "dtype", "quant_type", "blocksize"))
        print(f"{ratio:6.3f}  {time_of(base[c]):.5g} -> {time_of(head[c]):.5g}  {named.get('op')} {what}")
    print("\nhead / base time (below 1: head is faster):")
    for (op, mode, impl), ratios in sorted(ranges.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        print(f"  {op} {mode or ''} {impl or ''}: {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rows")
    only = sorted(set(base) ^ set(head), key=str)
    if only:
        print(f"\n{len(only)} rows in one file only, e.g. {dict(only[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
