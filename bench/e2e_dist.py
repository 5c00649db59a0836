"""A whole QLoRA training step on several GPUs of one host: qlora_ext sharded with FSDP2 against
bitsandbytes + PEFT sharded with FSDP, one run (bench/e2e.py's models, adapters and step).

    python3 bench/e2e_dist.py --nproc 2 --out bench/results/e2e-dist-GPU-DATE.json [--models llama65b,llama70b]
    python3 bench/e2e_dist.py --nproc 2 --device cpu --models tiny --impls qlora_ext   # a smoke test: gloo
    BENCH=e2e_dist E2E_DIST_ARGS="--nproc 2" SKIP_TESTS=1 bash bench/gpu_suite.sh OUTDIR   # on a GPU machine

--nproc processes, one a GPU (NCCL), each building the model as bench/e2e.py does (the same random
weights, quantized on its own GPU), then:
  "qlora_ext":         prepare_model, then qlora_ext.distributed.fully_shard_model: FSDP2's fully_shard on
                       each decoder layer and the root, the 4-bit codes and block scales sharded;
  "bitsandbytes_peft": bitsandbytes' Linear4bit with quant_storage=bfloat16 under PEFT's get_peft_model,
                       wrapped by FSDP (FullyShardedDataParallel with PEFT's fsdp_auto_wrap_policy: a unit a decoder
                       layer and a unit a LoRA linear):
                       the FSDP-QLoRA recipe of bitsandbytes' documentation. (bitsandbytes' layers lose their
                       quantization state under FSDP2's fully_shard: bitsandbytes issue 1945.)
Each rank trains on its own batch of --runs' batch x seq tokens; AdamW on the adapters. Correctness
first: the first step's loss (the base alone, B = 0), averaged over the ranks, must agree within 2%
between the implementations. Rows: op "e2e_dist", impl, model, nproc, batch and seq (a rank's),
tok_per_s (every rank's tokens / the step's time), step_s (rank 0's median), peak_gib (the highest
rank's peak allocated memory over the timed steps, after 3 warm-up steps; weights included),
first_loss, build_s. The one-GPU numbers to set them beside come from bench/e2e.py on the same machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

import common  # noqa: E402

IMPLS = ["qlora_ext", "bitsandbytes_peft"]


def wrap(impl: str, model, device):
    """The model sharded over the process group, as each implementation's users shard it."""
    if impl == "qlora_ext":
        from qlora_ext.distributed import fully_shard_model

        return fully_shard_model(model)
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    # PEFT's policy (as accelerate's FSDP-QLoRA recipe): each trainable LoRA linear its own unit, each
    # decoder layer one: FSDP flattens a unit's parameters into one tensor, which needs one dtype (the
    # float32 adapters apart from the bf16 weights) and, without use_orig_params, one requires_grad
    return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                    device_id=device)  # fmt: skip


def measure(impl: str, name: str, batch: int, seq: int, steps: int, device, rank: int, world: int) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    storage = torch.bfloat16 if impl == "bitsandbytes_peft" else torch.uint8
    model = wrap(impl, e2e.build(impl, name, device, torch.float32, quant_storage=storage), device)
    sync()
    build_s = time.perf_counter() - t0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = e2e.tokens(name, batch, seq, device, seed=seq + 7919 * rank)  # each rank its own tokens
    step = functools.partial(e2e.train_step, model, optimizer, ids)
    with torch.no_grad():
        first = model(input_ids=ids, labels=ids).loss.detach().float()
    dist.all_reduce(first)
    for _ in range(3):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        dist.barrier()
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    step_s = statistics.median(times)
    del model, optimizer, step
    e2e.release()
    return dict(step_s=step_s, tok_per_s=world * batch * seq / step_s, peak_gib=max(peaks),
                first_loss=first.item() / world, build_s=build_s)  # fmt: skip


def worker(rank: int, args: argparse.Namespace, rendezvous: str) -> None:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=args.nproc)  # fmt: skip
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        rows, meta = [], common.meta(args.device)
        meta["nproc"] = args.nproc
        for name in args.models.split(","):
            for batch, seq in e2e.parse_runs(args.runs or e2e.RUNS.get(name, "1x2048")):
                firsts = {}
                for impl in args.impls.split(","):
                    r = measure(impl, name, batch, seq, args.steps, device, rank, args.nproc)
                    firsts[impl] = r["first_loss"]
                    rows.append({"op": "e2e_dist", "impl": impl, "model": name, "nproc": args.nproc, "batch": batch,
                                 "seq": seq, **{k: round(v, 5) for k, v in r.items()}})  # fmt: skip
                    if impl == "qlora_ext":  # which LoRA layer class prepare_model built
                        from qlora_ext._lora_layers import layer_kind

                        rows[-1]["layers"] = layer_kind()
                    if rank == 0:
                        print(f"{impl:18s} {name:9s} {args.nproc} x {batch}x{seq}: {r['tok_per_s']:8.0f} tok/s, "
                              f"step {r['step_s']:.3f} s, peak {r['peak_gib']:.2f} GiB a GPU, first loss "
                              f"{r['first_loss']:.4f}", flush=True)  # fmt: skip
                        if args.out:
                            common.write_results(args.out, meta, rows)
                losses = list(firsts.values())
                if max(losses) - min(losses) > 0.02 * abs(losses[0]):
                    raise SystemExit(f"{name} {batch}x{seq}: the first-step losses disagree: {firsts}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes, one a GPU")
    ap.add_argument("--models", default="llama65b,llama70b")
    ap.add_argument("--runs", default=None, help="BATCHxSEQ list, a rank's (default: bench/e2e.py's for each model)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--impls", default=",".join(IMPLS), help="a subset of " + ",".join(IMPLS))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test with --models tiny (gloo)")
    ap.add_argument("--out", default=None)
    args = common.parse_args(ap, {"models": "llama65b", "runs": "1x2048", "steps": 3})
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            raise SystemExit(f"--impls: {impl!r} is not one of {IMPLS}")
    if args.device == "cpu" and "bitsandbytes_peft" in args.impls.split(","):
        raise SystemExit("--device cpu: --impls qlora_ext only (FSDP, bitsandbytes' recipe, needs a GPU)")
    if args.nproc < 2:
        raise SystemExit("--nproc must be 2 or more (one process: bench/e2e.py)")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            worker, args=(args, os.path.join(tmp, "rendezvous")), nprocs=args.nproc, start_method="spawn"
        )


if __name__ == "__main__":
    main()
