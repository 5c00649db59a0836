"""Training steps of several implementations interleaved step by step in one process: their tokens/s
compared within a few percent on a host-bound step.

    python3 bench/e2e_interleaved.py --out OUT/e2e-interleaved.json
        [--impls qlora_ext,qlora_ext_peft,bitsandbytes_patched] [--models llama7b] [--runs 1x2048,4x2048]
        [--steps 20] [--adapter-dtypes float32] [--optims adamw]

The models and steps are bench/e2e.py's (its `build` and `train_step`: Llama shapes, random weights,
LoRA r = 64 on the seven projections, gradient checkpointing, bf16). bench/e2e.py measures one
implementation after another; a Llama-7B step at 1 x 2048 is bound by the host's launches there, and
rows of the same code moved by up to 26% within one process as the host's speed drifted
(bench/results/e2e-impls-h100-2026-12-06-9f60d1d.json, e2e-rounds-h100-2026-12-06-90b2c4d.json).
Here every implementation's model is built first and all stay on the GPU; then each of --steps
rounds times one step of each, in an order rotated every round (every implementation takes every
place equally often where --steps is a multiple of their number), so that a drift of the host over
seconds falls on every implementation alike. bitsandbytes_patched gets qlora_ext.patch_bitsandbytes()
and qlora_ext_fused qlora_ext.patch_transformers() around their own steps only. All the models must
fit the GPU at once: about 7 GiB each for Llama-7B at 1 x 2048 (16 for bf16_peft); a set that would
take over 90% of the GPU is refused.

Rows: op "e2e_interleaved", one per implementation and run: tok_per_s and step_s (the median step),
step_s_all (every step in order), and vs_first: the median over rounds of the first implementation's
step time over this one's in the same round (the ratio of neighbours in time, the number to read
for "within 3%"), and vs_first_95, that median's 95% interval over the rounds resampled: at 1 x 2048
a noisy host's steps (one implementation's spread 0.29-0.79 s on an H100's host) leave it several
percent wide, at 4 x 2048 the GPU sets the pace. Peak memory is bench/e2e.py's to measure: here every
model shares the GPU.
Correctness first: the first-step losses must agree within 2%, as in bench/e2e.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import qlora_ext  # noqa: E402

import common  # noqa: E402

DEFAULT_IMPLS = "qlora_ext,qlora_ext_peft,bitsandbytes_patched"


@contextlib.contextmanager
def patched(impl: str):
    """impl's process-wide patch (if it has one) around its own steps only."""
    e2e.patch(impl)
    try:
        yield
    finally:
        e2e.unpatch()


def interleave(impls: list[str], name: str, batch: int, seq: int, steps: int, device, adapter_dtype, optim: str):
    """{impl: (first_loss, [step seconds in round order])}: one model each, steps interleaved."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids = e2e.tokens(name, batch, seq, device, seed=seq)
    setups, model, optimizer = {}, None, None
    try:
        for impl in impls:
            model = e2e.build(impl, name, device, adapter_dtype)
            e2e.unpatch()  # bitsandbytes_patched, qlora_ext_fused: patched around their own steps only
            optimizer = e2e.make_optimizer(optim, [p for p in model.parameters() if p.requires_grad])
            setups[impl] = functools.partial(e2e.train_step, model, optimizer, ids)
        firsts, times = {}, {impl: [] for impl in impls}

        def run(impl, timed: bool):
            with patched(impl):
                sync()
                t = time.perf_counter()
                setups[impl]()
                sync()
                if timed:
                    times[impl].append(time.perf_counter() - t)

        for impl in impls:
            model = setups[impl].args[0]
            with patched(impl), torch.no_grad():
                firsts[impl] = model(input_ids=ids, labels=ids).loss.item()
            for _ in range(3):  # warm-up
                run(impl, timed=False)
        for rnd in range(steps):
            k = rnd % len(impls)
            for impl in impls[k:] + impls[:k]:
                run(impl, timed=True)
        return {impl: (firsts[impl], times[impl]) for impl in impls}
    finally:
        e2e.unpatch()  # a build that failed after its patch
        setups.clear()
        del model, optimizer
        e2e.release()


def median_interval(ratios: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 95% interval of the median of `ratios` (the rounds resampled with replacement, a fixed seed):
    how far the host's noise leaves vs_first from the ratio it estimates. A "within 3%" reads off it:
    an interval inside 0.97-1.03 shows it; one that straddles a bound cannot tell."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def rows_of(results: dict, name: str, batch: int, seq: int, dname: str, optim: str) -> list[dict]:
    """The "e2e_interleaved" rows of one run; vs_first pairs each round's steps."""
    first_times = next(iter(results.values()))[1]
    rows = []
    for impl, (first_loss, times) in results.items():
        step_s = statistics.median(times)
        ratios = [f / t for f, t in zip(first_times, times)]
        rows.append({"op": "e2e_interleaved", "impl": impl, "model": name, "batch": batch, "seq": seq,
                     "adapter_dtype": dname, "optim": optim, "tok_per_s": round(batch * seq / step_s, 1),
                     "step_s": round(step_s, 5), "step_s_all": [round(t, 5) for t in times],
                     "vs_first": round(statistics.median(ratios), 4),
                     "vs_first_95": [round(v, 4) for v in median_interval(ratios)],
                     "first_loss": round(first_loss, 5), "steps": len(times)})  # fmt: skip
        if impl == "qlora_ext":
            rows[-1]["layers"] = qlora_ext._lora_layers.layer_kind()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama7b")
    ap.add_argument("--runs", default="1x2048,4x2048", help="BATCHxSEQ list")
    ap.add_argument("--steps", type=int, default=20, help="rounds: one timed step of each implementation a round")
    ap.add_argument(
        "--impls",
        default=DEFAULT_IMPLS,
        help="two or more of " + ",".join(e2e.IMPLS) + "; the first is vs_first's base",
    )
    ap.add_argument("--adapter-dtypes", default="float32", help="float32 and/or bfloat16")
    ap.add_argument("--optims", default="adamw", help="a list of " + ",".join(e2e.OPTIMS))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script with --models tiny")
    ap.add_argument("--out", default=None)
    args = common.parse_args(ap, {"steps": 12})
    device = torch.device(args.device)
    impls, dtypes, optims = e2e.choices(args)
    if len(impls) < 2 or len(set(impls)) != len(impls):
        raise SystemExit(f"--impls: two or more different implementations, got {args.impls!r}")
    if args.steps < 1:
        raise SystemExit(f"--steps: must be 1 or more, got {args.steps}")
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    for name in args.models.split(","):
        if name not in e2e.MODELS:
            raise SystemExit(f"--models: {name!r} is not one of {sorted(e2e.MODELS)}")
        # Every model at once: its bf16 weights for bf16_peft, about half of them for a 4-bit one (the
        # codes, float32 adapters, their gradients and AdamW's states; Llama-7B's step peaks at 6.8 GiB
        # against 12.6 GiB of bf16 weights).
        need = sum(e2e.bf16_bytes(name) * (1.0 if impl == "bf16_peft" else 0.55) for impl in impls)
        if gpu_bytes is not None and need > 0.9 * gpu_bytes:
            raise SystemExit(f"--models {name} with --impls {args.impls}: the models would take about "
                             f"{need / 2**30:.0f} GiB at once, over 90% of the GPU's {gpu_bytes / 2**30:.0f} GiB; "
                             f"interleave fewer implementations or a smaller model")  # fmt: skip
    meta, rows, disagreements = common.meta(args.device), [], []
    for name in args.models.split(","):
        for batch, seq in e2e.parse_runs(args.runs):
            for dname in dtypes:
                for optim in optims:
                    results = interleave(impls, name, batch, seq, args.steps, device, e2e.DTYPES[dname], optim)
                    run_rows = rows_of(results, name, batch, seq, dname, optim)
                    quantized = [r["first_loss"] for r in run_rows if r["impl"] != "bf16_peft"]
                    if e2e.losses_disagree(quantized):
                        disagreements.append(f"{name} {batch}x{seq}: the first-step losses disagree: {quantized}")
                        for row in run_rows:  # kept, and marked: their speed is not of one computation
                            row["losses_disagree"] = True
                    rows += run_rows
                    for row in run_rows:
                        print(f"{row['impl']:20s} {name:9s} {batch}x{seq:<5d} adapters {dname:8s} {optim:12s}: "
                              f"{row['tok_per_s']:8.0f} tok/s, step {row['step_s']:.3f} s, "
                              f"{row['vs_first']:.3f}x {impls[0]} step by step "
                              f"({row['vs_first_95'][0]:.3f}-{row['vs_first_95'][1]:.3f}), "
                              f"first loss {row['first_loss']:.4f}",
                              flush=True)  # fmt: skip
                    if args.out:
                        common.write_results(args.out, meta, rows)
    if disagreements:
        raise SystemExit("\n".join(disagreements))


if __name__ == "__main__":
    main()
