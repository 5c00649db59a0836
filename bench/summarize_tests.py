"""Turns a pytest junit XML into the short Markdown record committed under bench/results/tests/:
the machine, the date, the commit, the command, and the counts by outcome and device.

    python bench/summarize_tests.py junit.xml "the pytest command" > gpu-tests.md
"""

import collections
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import common  # noqa: E402

root = ET.parse(sys.argv[1]).getroot()
command = sys.argv[2] if len(sys.argv) > 2 else "?"
counts = collections.Counter()
failures = []
for case in root.iter("testcase"):
    name = case.get("name", "")
    device = "cuda" if "cuda" in name else "cpu"
    outcome = "passed"
    for child in case:
        if child.tag in ("failure", "error"):
            outcome = "failed"
            failures.append(f"{case.get('classname')}::{name}: {child.get('message', '')[:200]}")
        elif child.tag == "skipped":
            outcome = "skipped"
    counts[(device, outcome)] += 1
m = common.meta("cuda" if torch.cuda.is_available() else "cpu")
print("# GPU test run")
print()
print(f"- machine: {m.get('gpu')} ({m.get('sms')} SMs), torch {m['torch']}, CUDA {m['cuda']}, "
      f"bitsandbytes {m['bitsandbytes']}")  # fmt: skip
print(f"- date: {m['date']}")
print(f"- commit: {m['commit']}")
print(f"- command: `{command}`")
print()
print("| tests | passed | failed | skipped |")
print("| --- | --- | --- | --- |")
for device in ("cuda", "cpu"):
    print(f"| {device} | {counts[(device, 'passed')]} | {counts[(device, 'failed')]} | {counts[(device, 'skipped')]} |")
if failures:
    print()
    print("Failures:")
    for f in failures:
        print(f"- {f}")
