"""The SASS lines where a kernel's warps stalled most, from an ncu report's source page.

ncu -i REPORT.ncu-rep --page source --csv --print-source sass > sass.csv
python3 bench/ncu_source.py sass.csv [lines]
"""

import csv
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # the header is the first row that names the samples column
    head = next(i for i, r in enumerate(rows) if any(c.startswith("Warp Stall Sampling (All") for c in r))
    cols = rows[head]
    body = [r for r in rows[head + 1 :] if len(r) == len(cols)]
    samples = next(i for i, c in enumerate(cols) if c.startswith("Warp Stall Sampling (All"))
    source = next(i for i, c in enumerate(cols) if c == "Source")
    address = next((i for i, c in enumerate(cols) if c == "Address"), None)
    total = sum(number(r[samples]) for r in body) or 1.0
    print(f"{len(body)} SASS lines, {total:.0f} stall samples")
    ranked = sorted(range(len(body)), key=lambda i: -number(body[i][samples]))[:top]
    for i in sorted(ranked):
        r = body[i]
        where = r[address] if address is not None else str(i)
        print(f"{100 * number(r[samples]) / total:5.1f}%  {where:>6s}  {r[source][:110]}")


if __name__ == "__main__":
    main()
