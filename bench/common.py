"""Shared benchmark plumbing: timing, the copy ceiling, environment facts and the results file."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

# The six Llama weight shapes of the design notes, (out, in) = (n, k).
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]

# Inputs are rotated over at least this many bytes so that no timed call is served from the
# H200's 60 MiB L2.
ROTATE_BYTES = 512 * 2**20


def parse_args(ap: argparse.ArgumentParser, quick: dict[str, object], argv: Sequence[str] | None = None):
    """ap's arguments plus --quick: the benchmark's quick form, `quick`'s values in place of the
    defaults (an argument given on the command line still wins). The quick form is what a GPU
    session runs first, beside the whole test suite: every path of the benchmark, checked and timed
    on fewer shapes and iterations, to show that nothing broke or slowed before anything is tuned."""
    unknown = set(quick) - {action.dest for action in ap._actions}
    if unknown:  # set_defaults would take a misspelt name silently, as a new attribute
        raise ValueError(f"quick form: {sorted(unknown)} are not arguments of this benchmark")
    given = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in quick.items())
    ap.add_argument("--quick", action="store_true", help=f"the quick form: {given}")
    argv = list(sys.argv[1:] if argv is None else argv)
    if ap.parse_known_args(argv)[0].quick:  # as argparse reads it: "--qu" is --quick too
        ap.set_defaults(**quick)
    return ap.parse_args(argv)


def rotations(bytes_per_input: int, at_least: int = 2) -> int:
    return max(at_least, -(-ROTATE_BYTES // max(1, bytes_per_input)))


def time_cuda(fn: Callable[[int], object], iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn(i) over `iters` calls, each between two CUDA events, after warm-up."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(warmup + i)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def settle_cpu_allocator() -> None:
    """glibc serves large allocations with fresh mmaps (page faults on every first touch) until a
    freed one raises its threshold (to 32 MiB at most); without this the first configuration timed
    pays for page faults, the later ones do not."""
    t = torch.empty(31 * 2**20, dtype=torch.uint8)
    t.fill_(0)
    del t


def time_cpu(fn: Callable[[int], object], iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn(i) by the wall clock, after warm-up."""
    settle_cpu_allocator()
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_on(device: str, fn: Callable[[int], object], iters: int) -> float:
    return time_cuda(fn, iters) if device == "cuda" else time_cpu(fn, iters)


def copy_gbps(device: str, nbytes: int = 2 * 2**30, iters: int = 20) -> float:
    """Device-to-device (or host memcpy) bandwidth, bytes read plus bytes written per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_on(device, lambda i: dst.copy_(src), iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def git_commit() -> str:
    """The commit (QLORA_COMMIT where the tree travelled without its .git, e.g. to the GPU machine)."""
    if os.environ.get("QLORA_COMMIT"):
        return os.environ["QLORA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta(device: str) -> dict:
    m = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        "commit": git_commit(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        m["gpu"] = p.name
        m["sms"] = p.multi_processor_count
    else:
        m["gpu"] = None
        m["cpu"] = platform.processor() or platform.machine()
        m["threads"] = torch.get_num_threads()
    try:
        import bitsandbytes

        m["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        m["bitsandbytes"] = None
    return m


def write_results(path: str, meta_: dict, rows: Sequence[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta_, "rows": list(rows)}, indent=1) + "\n")
    print(f"wrote {path}")
