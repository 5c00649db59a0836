"""``qlora-ext finetune``: QLoRA fine-tuning of a causal language model on local disk.

    qlora-ext finetune --model DIR --data FILE.jsonl --output DIR [options]
    python -m qlora_ext finetune ...

The model is a transformers causal LM directory (config.json, safetensors weights, tokenizer). Its
weights are streamed from the safetensors shards into a model built on the meta device and
quantized layer by layer (NF4 with double quantization), so the 16-bit model is never whole in
memory. LoRA goes on every linear layer of the blocks. The defaults are those of the original
qlora.py: r = 64, alpha = 16, dropout 0.05, AdamW with lr 2e-4, a constant rate after a linear
warm-up over 3% of the steps, gradient norm clipped at 0.3, gradient checkpointing, and batch 1 with
16 steps of gradient accumulation; but the optimizer is torch's AdamW unless asked (qlora.py's is
bitsandbytes' paged one: --optim paged_adamw_32bit). The model's RMSNorm, rotary embedding and SwiGLU
gating run on fused kernels (qlora_ext.patch_transformers(), for the run only; --no-patch-transformers: not).

Data: JSON lines of text, prompt and response (or TRL's completion), or chat messages; the formats and
their loss masks are qlora_ext.finetune_data's. A malformed line is an error that names its file and line.

Checkpoints: every ``--save-steps`` optimizer steps and at the last step, ``OUTPUT/checkpoint-STEP/``
gets the adapter (PEFT's format), the optimizer and scheduler state and the random generators'
states, all in safetensors and JSON (nothing is pickled). A checkpoint is written into a temporary
directory and renamed into place, so a crash mid-save leaves the previous one whole. A later run with
the same ``--output`` resumes from the newest checkpoint and gives the same adapter as a run without
the interruption (``--no-resume`` starts over instead, moving the earlier run's files into
``OUTPUT/previous-N/``). At the end the adapter is written to ``OUTPUT/`` itself, beside
``log.jsonl`` (a line a step: loss, learning rate, gradient norm before clipping, tokens/s, peak GPU
memory; a line an evaluation with ``--eval-data``) and ``loss.png`` (where matplotlib is installed);
``--report-to tensorboard`` writes the same numbers as TensorBoard scalars into ``OUTPUT/runs/``. A
finished run started again with a larger ``--max-steps`` continues from its last step, on the
learning-rate schedule it started with (its length and warm-up are recorded in the checkpoint; the
warm-up is not stretched); with the same ``--max-steps`` there is nothing to do.

Several processes: ``torchrun --nproc-per-node N -m qlora_ext finetune ...`` replicates the model with
DDP, ``... --fsdp`` shards it with FSDP2 (per decoder layer, the 4-bit base included). A step's batch
stays --batch-size x --grad-accum examples, split over the ranks, so the run trains on the batches of
one device; rank 0 writes the checkpoints (the same files), log.jsonl and loss.png. See
docs/distributed.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import qlora_ext
from qlora_ext import LoraConfig, finetune_dist, transformers_patch
from qlora_ext.finetune_data import DataError, batches, pad_batch, read_examples, tokenize
from qlora_ext.finetune_dist import DistError, Ranks, launched_by_torchrun, micro_seed
from qlora_ext.finetune_optim import OPTIMIZERS, make_optimizer, optimizer_state, optimizer_tensors, page_state
from qlora_ext.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from qlora_ext.serialization import _write_adapter

_CHECKPOINT = "checkpoint-"
_STATE = "trainer_state.json"
_TENSORS = "trainer_state.safetensors"
_LOG = "log.jsonl"
_PLOT = "loss.png"
_RUNS = "runs"  # TensorBoard's event files (--report-to tensorboard)


# The arguments a checkpoint is resumed with must be the ones it was written with.
_RUN_KEYS = ("model", "r", "lora_alpha", "lora_dropout", "batch_size", "grad_accum", "max_length", "seed",
             "lr", "warmup_ratio", "quant_type", "no_double_quant", "optim", "patch_transformers")  # fmt: skip
# what a checkpoint written before a key was recorded was run with
_RUN_KEY_DEFAULTS = {"optim": "adamw", "patch_transformers": []}


def _patched_parts(recorded, parts: list[str]) -> list[str]:
    """The parts of patch_transformers() a checkpoint's run ran, of those that apply (`parts`): its
    record is a list of them, or (c7b8d13, before the MLP's gating was a part) true for the norms and
    the rotary, or false / absent (older) for none."""
    if recorded is True:
        recorded = ["rms_norm", "rotary"]
    return [p for p in parts if p in (recorded or [])]


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(model_dir: Path, lora: LoraConfig, compute_dtype, device, quant_type: str, double_quant: bool):
    """The causal LM of `model_dir`, built on the meta device and filled layer by layer (quantized)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"{model_dir} has no .safetensors weights (pickled weights are not read)")
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise SystemExit(
            "qlora-ext finetune needs accelerate (pip install accelerate) to build the model empty"
        ) from None
    # parameters on the meta device; buffers computed at construction (rotary frequencies) are real
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    qlora_ext.prepare_model(model, lora, quant_type=quant_type, compress_statistics=double_quant,
                            compute_dtype=compute_dtype, weights=model_dir, device=device)  # fmt: skip
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors and JSON only


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x


def _save_checkpoint(
    output: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, ranks: Optional[Ranks] = None
) -> Path:
    """Writes OUTPUT/checkpoint-STEP/. Under torchrun every rank calls it: the adapter and the
    optimizer state are gathered, rank 0 writes, and no rank goes on before the checkpoint is whole."""
    from safetensors.torch import save_file

    ranks = ranks or Ranks.single(next(model.parameters()).device)
    final = output / f"{_CHECKPOINT}{step}"
    config, adapter = ranks.adapter(model)
    opt_sd = ranks.optimizer_state_dict(model, optimizer)
    if not ranks.main:
        ranks.barrier()
        return final
    tmp = output / f".{_CHECKPOINT}{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_adapter(tmp, config, adapter, None)
    tensors, opt_json = optimizer_tensors(optimizer, opt_sd)
    tensors["rng.torch"] = torch.get_rng_state()
    device = ranks.device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _TENSORS))
    full = dict(
        state, step=step, optimizer=opt_json, scheduler=scheduler.state_dict(), python_rng=_jsonable(random.getstate())
    )
    (tmp / _STATE).write_text(json.dumps(full, indent=1) + "\n")
    if final.exists():  # a checkpoint of this step already (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


# What a run writes in OUTPUT/ itself (besides its checkpoints): --no-resume moves these aside.
_RUN_FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, _LOG, _PLOT, _RUNS)
_PREVIOUS = "previous-"


def _move_earlier_run(output: Path) -> Optional[Path]:
    """Moves the checkpoints and files of an earlier run in `output` into `output/previous-N/` (N one
    more than the last such directory) and returns it; None where there was nothing to move."""
    found = [p for p in output.glob(f"{_CHECKPOINT}*") if p.is_dir()] + [
        output / name for name in _RUN_FILES if (output / name).exists()
    ]
    if not found:
        return None
    taken = [int(p.name[len(_PREVIOUS) :]) for p in output.glob(f"{_PREVIOUS}*") if p.name[len(_PREVIOUS) :].isdigit()]
    dest = output / f"{_PREVIOUS}{max(taken, default=0) + 1}"
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    return dest


def _checkpoints(output: Path) -> list[Path]:
    found = []
    for p in output.glob(f"{_CHECKPOINT}*"):
        suffix = p.name[len(_CHECKPOINT) :]
        if p.is_dir() and suffix.isdigit() and (p / _STATE).exists() and (p / ADAPTER_WEIGHTS_NAME).exists():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def _resume_adapter(checkpoint: Path, model) -> None:
    """The checkpoint's adapter in place of the new one: before DDP or FSDP2 wrap the model (they
    hold its parameters) and before the optimizer is made (it holds them too)."""
    qlora_ext.delete_adapter(model, "default")
    qlora_ext.load_adapter(model, checkpoint, "default", is_trainable=True)


def _resume(checkpoint: Path, model, optimizer, scheduler, ranks: Ranks) -> dict:
    """The optimizer's, the scheduler's and the generators' states of `checkpoint` (every rank reads
    it: the output directory must be one that every rank sees)."""
    from safetensors.torch import load_file

    state = json.loads((checkpoint / _STATE).read_text())
    tensors = load_file(str(checkpoint / _TENSORS))
    opt = state["optimizer"]
    ranks.load_optimizer_state_dict(
        model, optimizer, {"state": optimizer_state(opt, tensors), "param_groups": opt["param_groups"]}
    )
    page_state(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    device = ranks.device
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state


# ---------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    """Whether both exist with the same bytes: OUTPUT's adapter is the last checkpoint's (a run stopped
    between its last checkpoint and writing OUTPUT's adapter leaves an older adapter there, or none)."""
    import filecmp

    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def _warmup_steps(warmup_ratio: float, length: int) -> int:
    return max(1, round(warmup_ratio * length)) if warmup_ratio > 0 else 0


def finetune(args: argparse.Namespace) -> Path:
    """The run that args describe, in this process or (under torchrun) as one rank of it."""
    _check_args(args)
    if launched_by_torchrun():
        ranks = Ranks.init(args.fsdp, args.device)
    else:
        ranks = Ranks.single(
            torch.device(
                args.device or ("cuda" if torch.cuda.is_available() and qlora_ext.cuda_kernels_available() else "cpu")
            )
        )
    args = copy.copy(args)  # (_finetune settles the options left to it in its own copy)
    # The run patches transformers as its own option says, whatever the process had; the process's
    # transformers as it was after (the CLI may run inside another program).
    patches = transformers_patch._state()
    try:
        return _finetune(args, ranks)
    finally:
        transformers_patch._restore(patches)
        ranks.close()


def _finetune(args: argparse.Namespace, ranks: Ranks) -> Path:
    import transformers

    model_dir, output = Path(args.model), Path(args.output)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"--model {model_dir}: no config.json (a transformers model directory is needed)")
    examples = read_examples(Path(args.data))
    device = ranks.device
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SystemExit(f"--model {model_dir}: the tokenizer has neither a pad nor an eos token")
    data = tokenize(examples, tokenizer, args.max_length)
    if len(data) < len(examples) and ranks.main:
        print(f"qlora-ext finetune: {len(examples) - len(data)} of {len(examples)} examples left out: their prompt "
              f"fills --max-length {args.max_length} and leaves no response token", file=sys.stderr)  # fmt: skip
    if not data:
        raise DataError(f"{args.data}: no example has a token to learn from within --max-length {args.max_length}")
    eval_data = None
    if args.eval_data:
        eval_data = tokenize(read_examples(Path(args.eval_data)), tokenizer, args.max_length)
        if not eval_data:
            raise DataError(f"{args.eval_data}: no example has a token to score within --max-length {args.max_length}")
    batches_per_epoch = math.ceil(len(data) / args.batch_size)
    total = args.max_steps or math.ceil(args.epochs * batches_per_epoch / args.grad_accum)

    if ranks.main:
        output.mkdir(parents=True, exist_ok=True)
        # A run that starts over (--no-resume, or no checkpoint left to resume) moves what an earlier
        # run left in OUTPUT aside: its adapter, log and checkpoint-N directories are never overwritten.
        if args.no_resume or not _checkpoints(output):
            moved = _move_earlier_run(output)
            if moved is not None:
                why = "--no-resume" if args.no_resume else f"no checkpoint to resume in {output}"
                print(f"{why}: the earlier run's files in {output} moved to {moved}", file=sys.stderr, flush=True)
    ranks.barrier()  # the other ranks look for checkpoints once rank 0 has moved the earlier run's aside
    existing = _checkpoints(output)
    foreign = sorted(p.name for p in output.glob(f"{_CHECKPOINT}*") if p.is_dir() and p not in existing)
    if foreign:  # a checkpoint of this run's would replace it whole
        raise SystemExit(f"{output} holds {', '.join(foreign[:3])}, which are not checkpoints of qlora-ext finetune "
                         "(no trainer_state.json or adapter): move them out of --output")  # fmt: skip
    # what a checkpoint must agree with to be resumed: the same data, in the same batches, the same
    # adapter. Not --max-steps / --epochs: a finished run is continued with more steps. Nor the
    # number of ranks or --fsdp: a step's batch and its checkpoint are the same on any number.
    saved = json.loads((existing[-1] / _STATE).read_text()) if existing else None
    # --patch-transformers: on for a new run, a resumed one as it ran (the bits differ). Recorded as the
    # parts of patch_transformers() that ran, none for a model it does not cover, whatever was asked.
    model_type = transformers.AutoConfig.from_pretrained(str(model_dir)).model_type
    parts = transformers_patch._parts_for(model_type)
    if saved is not None:
        recorded = _patched_parts(saved.setdefault("run", {}).get("patch_transformers"), parts)
        saved["run"]["patch_transformers"] = recorded
    if args.patch_transformers is None:
        args.patch_transformers = parts if saved is None else recorded
    else:
        args.patch_transformers = parts if args.patch_transformers else []
    run = {k: getattr(args, k) for k in _RUN_KEYS}
    run["data"] = _file_digest(Path(args.data))
    if saved is not None:
        changed = sorted(k for k in run if saved.get("run", {}).get(k, _RUN_KEY_DEFAULTS.get(k)) != run[k])
        if changed:
            raise SystemExit(f"{existing[-1]} was written by a run with other {', '.join(changed)}; resuming it would "
                             "train on other batches or another adapter: pass another --output")  # fmt: skip
        done = saved["step"]
        if done > total:
            raise SystemExit(f"{existing[-1]}: that run has trained {done} steps, past the {total} asked for: pass "
                             f"--max-steps above {done} to continue it, or --no-resume to start over")  # fmt: skip
        if done == total and _same_file(output / ADAPTER_WEIGHTS_NAME, existing[-1] / ADAPTER_WEIGHTS_NAME):
            if ranks.main:
                print(f"nothing to do: {output} holds a run of {total} steps, finished (its adapter is in "
                      f"{output}); pass a larger --max-steps to continue it, or --no-resume to start over",
                      file=sys.stderr)  # fmt: skip
            return output
        # The learning-rate schedule is the one the run started with, even where it is continued
        # with more steps: its length and warm-up are recorded in each checkpoint.
        schedule = saved.get("schedule") or {"length": saved["total"]}
    else:
        schedule = {"length": total}
    schedule.setdefault("warmup", _warmup_steps(args.warmup_ratio, schedule["length"]))
    warmup = schedule["warmup"]

    lora = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules="all-linear")
    model = load_model(model_dir, lora, compute_dtype, device, args.quant_type, not args.no_double_quant)
    transformers_patch.unpatch_transformers()  # (finetune() puts back what the process had)
    if args.patch_transformers:
        chosen = {p: p in args.patch_transformers for p in ("rms_norm", "rotary", "swiglu")}
        transformers_patch.patch_transformers([model_type], **chosen)
    if existing:
        _resume_adapter(existing[-1], model)
    if not args.no_gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = ranks.wrap(model)  # what runs the forward: DDP around model, or model (sharded in place)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optim, trainable, args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
    )
    step, micro, history = 0, 0, []
    if existing:
        state = _resume(existing[-1], model, optimizer, scheduler, ranks)
        step, micro, history = state["step"], state["micro"], state.get("log_history", [])
        if not args.quiet and ranks.main:
            print(f"resuming from {existing[-1]} (step {step} of {total})", flush=True)
    # OUTPUT/log.jsonl: one line a step, and one an evaluation; what a resumed run logged after its
    # checkpoint is dropped (it is logged again), the checkpoint's history kept. Rank 0 writes it.
    report = _TensorBoard(output / _RUNS, step) if args.report_to == "tensorboard" and ranks.main else None
    log = _Log(output / _LOG if ranks.main else None, history, report)
    model.train()
    progress = _bar(total, step, args.quiet or not ranks.main)
    # each rank runs grad_accum / world of a step's forward passes (finetune_dist's docstring)
    local_accum = args.grad_accum // ranks.world
    t0, losses, tokens, t_step = time.perf_counter(), [], 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total:
        epoch, skip = divmod(micro, batches_per_epoch)
        for ids, labels, mask in batches(data, args.batch_size, pad_id, args.seed + epoch):
            if skip:  # the batches a resumed run consumed already
                skip -= 1
                continue
            if ranks.owns(micro):
                # seeded by its index: the same dropout on whichever rank runs it, resumed or not
                torch.manual_seed(micro_seed(args.seed, micro))
                with ranks.accumulating(wrapped, sync=micro % args.grad_accum >= args.grad_accum - ranks.world):
                    out = wrapped(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
                    (out.loss / local_accum).backward()
                losses.append(out.loss.item())
                tokens += int(mask.sum())
            micro += 1
            if micro % args.grad_accum:
                continue
            grad_norm = ranks.clip_grad_norm(trainable, args.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step is taken with
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_losses, tokens = ranks.step_losses(losses), ranks.sum_int(tokens)
            losses = []
            now = time.perf_counter()
            entry = {"step": step, "loss": sum(step_losses) / args.grad_accum, "learning_rate": lr,
                     "grad_norm": grad_norm, "tokens_per_s": tokens / (now - t_step)}  # fmt: skip
            if device.type == "cuda":  # the highest of the ranks' peaks
                entry["peak_memory_gib"] = ranks.max_float(torch.cuda.max_memory_allocated(device) / 2**30)
            log.append(entry)
            progress(step, entry["loss"], entry["tokens_per_s"])
            tokens = 0
            if eval_data is not None and (step == total or (args.eval_steps and step % args.eval_steps == 0)):
                loss = eval_loss(model, eval_data, args.batch_size, pad_id, device, ranks)
                log.append({"step": step, "eval_loss": loss})
                if not args.quiet and ranks.main:
                    progress.write(f"step {step}: eval loss {loss:.4f}")
            # the last step is always checkpointed: a finished run can be continued with more steps
            if step == total or (args.save_steps and step % args.save_steps == 0):
                loop_state = {"micro": micro, "total": total, "run": run, "schedule": schedule,
                              "loss": entry["loss"], "log_history": log.history}  # fmt: skip
                log.flush()  # once the checkpoint exists, its steps' events are on disk: a resume keeps them
                _save_checkpoint(output, step, model, optimizer, scheduler, loop_state, args.keep, ranks)
            t_step = time.perf_counter()  # tokens/s counts the training alone, not the eval or the save
            if step >= total:
                break
    log.close()
    config, adapter = ranks.adapter(model)
    if ranks.main:
        _write_adapter(output, config, adapter, str(model_dir))
        plot_losses(log.history, output / _PLOT)
        if not args.quiet:
            print(f"\ntrained {step} steps in {time.perf_counter() - t0:.1f} s; adapter in {output}", flush=True)
    ranks.barrier()  # the adapter is whole before any rank returns
    return output


class UsageError(ValueError):
    """Arguments this installation cannot run: main prints it on one line and returns 2, as argparse
    does for its own errors."""


def _check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check, checked before the data is read and the model loads."""
    if args.report_to == "tensorboard":
        _summary_writer_class()
    finetune_dist.check_args(args.fsdp, args.optim, args.grad_accum, args.device)


def _summary_writer_class() -> type:
    """torch's SummaryWriter; a UsageError where the tensorboard package it writes through is missing."""
    try:
        # by name: torch.utils.tensorboard looks for it on its first import only
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError(
            "--report-to tensorboard needs the tensorboard package, which is not installed: pip install tensorboard"
        ) from None
    return SummaryWriter


def _scalar_tag(name: str) -> str:
    """The TensorBoard tag of a log.jsonl key: eval_loss is eval/loss, a step's keys are train/KEY."""
    return f"eval/{name[len('eval_') :]}" if name.startswith("eval_") else f"train/{name}"


class _TensorBoard:
    """OUTPUT/runs/: each log.jsonl entry's numbers as TensorBoard scalars at the entry's step.

    Every run opens a new event file there whose purge_step, the first step the run logs, hides what
    earlier files logged from that step on: a resumed run drops what the interrupted one logged after
    its checkpoint (as log.jsonl is rewritten from the checkpoint's history) and logs those steps again."""

    def __init__(self, directory: Path, resumed_step: int):
        self._writer = _summary_writer_class()(log_dir=str(directory), purge_step=resumed_step + 1)

    def append(self, entry: dict) -> None:
        for name, value in entry.items():
            if name != "step":
                self._writer.add_scalar(_scalar_tag(name), value, global_step=entry["step"])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _Log:
    """OUTPUT/log.jsonl: rewritten from `history` (a resumed checkpoint's), then one line appended and
    flushed for each entry. Each appended entry also goes to `report`, whose events reach the disk at
    flush() (each checkpoint) rather than a line at a time. With no `path` (the ranks other than 0
    under torchrun) it keeps the history and writes nothing."""

    def __init__(self, path: Optional[Path], history: list[dict], report: Optional[_TensorBoard] = None):
        self.history = list(history)
        self._report = report
        self._file = open(path, "w", encoding="utf-8") if path is not None else None
        for entry in self.history:
            self._write(entry)

    def _write(self, entry: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()

    def append(self, entry: dict) -> None:
        self.history.append(entry)
        self._write(entry)
        if self._report is not None:
            self._report.append(entry)

    def flush(self) -> None:
        if self._report is not None:
            self._report.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._report is not None:
            self._report.close()


@torch.no_grad()
def eval_loss(model, data, batch_size: int, pad_id: int, device, ranks: Optional[Ranks] = None) -> float:
    """The mean cross-entropy over every labelled token of `data` (not a mean of batch means), in
    eval mode (no dropout), the batches in file order. Under torchrun batch b runs on rank
    b % world, and the batches' sums are added in file order: one device's number, bit for bit."""
    ranks = ranks or Ranks.single(device)
    model.eval()
    starts = range(0, len(data), batch_size)
    sums, counts = [0.0] * len(starts), [0] * len(starts)
    # under FSDP2 every forward gathers each layer from all ranks: a rank out of batches runs its
    # first one again (its result dropped) until every rank has run as many
    end = math.ceil(len(starts) / ranks.world) * ranks.world if ranks.mode == "fsdp" else len(starts)
    for b in range(ranks.rank, end, ranks.world):
        mine = b < len(starts)
        i = starts[b if mine else ranks.rank % len(starts)]
        ids, labels, mask = pad_batch(data[i : i + batch_size], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        if mine:
            sums[b], counts[b] = loss.item(), int((targets != -100).sum())
    sums, counts = ranks.sum_exact(sums), ranks.sum_exact([float(c) for c in counts])
    total = 0.0
    for value in sums:  # one device's additions, in its order
        total += value
    model.train()
    return total / int(sum(counts))


def plot_losses(history: list[dict], path: Path) -> Optional[Path]:
    """Train and eval loss against step, drawn into `path`; None (and a one-line note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"qlora-ext finetune: {path.name} not drawn: matplotlib is not installed (pip install matplotlib); "
              f"the losses are in {path.with_name(_LOG)}", file=sys.stderr)  # fmt: skip
        return None
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class _Progress:
    """A tqdm bar (a line a step without tqdm) that shows the loss and tokens/s; nothing when quiet."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.total, self.quiet, self.bar = total, quiet, None
        if not quiet:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step")
            except ImportError:
                pass

    def __call__(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.quiet:
            return
        if self.bar is None:
            print(f"step {step}/{self.total} loss {loss:.4f} {tokens_per_s:.0f} tokens/s", flush=True)
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}", tokens_per_s=f"{tokens_per_s:.0f}")
        if step >= self.total:
            self.bar.close()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif not self.quiet:
            print(line, flush=True)


_bar = _Progress


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and every option's default after its help."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def _int_at_least(low: int):
    """An argparse type: an integer >= low (argparse names the option in its message)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # what argparse calls a value that is no number at all
    return parse


def _float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True):
    """An argparse type: a float in the interval from low to high (NaN is in none)."""

    def parse(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qlora-ext", description=__doc__, formatter_class=_HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="QLoRA fine-tuning of a causal LM directory on JSON lines",
                        description=__doc__, formatter_class=_HelpFormatter)  # fmt: skip
    ft.add_argument("--model", required=True, help="a transformers causal LM directory (config.json, safetensors "
                    "weights, tokenizer)")  # fmt: skip
    ft.add_argument("--data", required=True, help="the training data: a JSON lines file (the formats above)")
    ft.add_argument("--output", required=True, help="the adapter, the checkpoints and the run's log go here")
    ft.add_argument("--r", "--lora-r", dest="r", type=_int_at_least(1), default=64,
                    help="LoRA rank (under torchrun spell it --lora-r: torchrun takes --r for an abbreviation of "
                    "its own options)")  # fmt: skip
    ft.add_argument(
        "--lora-alpha",
        type=_float_in(-math.inf, low_open=True),
        default=16,
        help="LoRA alpha (the update is scaled by alpha / r)",
    )
    ft.add_argument("--lora-dropout", type=_float_in(0, 1), default=0.05, help="dropout on the adapters' input")
    ft.add_argument("--lr", type=_float_in(0), default=2e-4, help="peak learning rate")
    ft.add_argument("--optim", default="adamw", choices=list(OPTIMIZERS),
                    help="AdamW: torch's, or bitsandbytes' (installed apart) with its state paged to CPU memory when "
                    "the GPU's runs out (paged_*; qlora.py's default, which fits 65B on one 48 GB GPU) or in 8 bits "
                    "(*_8bit)")  # fmt: skip
    ft.add_argument("--warmup-ratio", type=_float_in(0, 1, high_open=False), default=0.03,
                    help="linear warm-up over this fraction of the steps, then a constant rate")  # fmt: skip
    ft.add_argument("--max-grad-norm", type=_float_in(0), default=0.3,
                    help="gradients are clipped to this norm (0: not clipped, as in transformers' "
                    "Trainer)")  # fmt: skip
    ft.add_argument("--batch-size", type=_int_at_least(1), default=1,
                    help="examples per forward pass (under torchrun: per forward pass of each rank)")  # fmt: skip
    ft.add_argument("--grad-accum", type=_int_at_least(1), default=16,
                    help="forward passes per optimizer step, on all ranks together: a step's global batch is "
                    "--batch-size x --grad-accum examples on any number of ranks (each of N ranks runs --grad-accum "
                    "/ N passes: a multiple of N), and tokens/s counts every rank's tokens")  # fmt: skip
    ft.add_argument(
        "--epochs", type=_float_in(0, low_open=True), default=1.0, help="passes over --data (when --max-steps is 0)"
    )
    ft.add_argument("--max-steps", type=_int_at_least(0), default=0, help="optimizer steps (0: --epochs decides)")
    ft.add_argument("--max-length", type=_int_at_least(1), default=512, help="tokens an example is cut to")
    ft.add_argument("--save-steps", type=_int_at_least(0), default=100,
                    help="a checkpoint every this many steps (0: only the last step's)")  # fmt: skip
    ft.add_argument("--keep", type=_int_at_least(0), default=2, help="checkpoints kept (the newest; 0: all)")
    ft.add_argument("--no-resume", action="store_true",
                    help="start over even if --output holds an earlier run: its files are moved, not deleted, into "
                    "OUTPUT/previous-N/ (without it, a run resumes from the newest checkpoint)")  # fmt: skip
    ft.add_argument("--eval-data", default=None,
                    help="JSON lines (as --data) whose loss is measured every --eval-steps and at the end")  # fmt: skip
    ft.add_argument("--eval-steps", type=_int_at_least(0), default=0,
                    help="the eval loss every this many steps (0: at the last step only)")  # fmt: skip
    ft.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="the 4-bit format of the weights")
    ft.add_argument("--no-double-quant", action="store_true",
                    help="keep the absmax statistics in fp32 (double quantization packs them in 8 bits)")  # fmt: skip
    ft.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep every activation (faster, more memory)")  # fmt: skip
    ft.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="compute dtype (None: bf16 on a GPU, fp32 on the CPU)")  # fmt: skip
    ft.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: the GPU where there is one)")
    ft.add_argument("--fsdp", action="store_true",
                    help="under torchrun, shard the model with FSDP2 (fully_shard per decoder layer; the 4-bit "
                    "base's codes and scales too) instead of replicating it with DDP; needs torchrun and --optim "
                    "adamw")  # fmt: skip
    ft.add_argument("--patch-transformers", action=argparse.BooleanOptionalAction, default=None,
                    help="run the model's RMSNorm, rotary embedding and SwiGLU gating on fused kernels "
                    "(qlora_ext.patch_transformers(); Llama, Mistral, Mixtral, Qwen2, Qwen3: 1.1-1.3x faster steps "
                    "on an H100, outputs within bf16's rounding of transformers'; other models run as they are). "
                    "None: on for a new run, and a resumed run as it was started (off for checkpoints older than "
                    "the option)")  # fmt: skip
    ft.add_argument("--seed", type=int, default=42, help="seeds the data order, the dropout and the adapters' init")
    ft.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    ft.add_argument("--report-to", default="none", choices=["none", "tensorboard"],
                    help="tensorboard: log.jsonl's numbers also go to OUTPUT/runs/ as TensorBoard scalars (train/loss, "
                    "train/learning_rate, ..., eval/loss), flushed at each checkpoint; needs the tensorboard package "
                    "(pip install tensorboard)")  # fmt: skip
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "finetune":
        try:
            finetune(args)
        except (DataError, UsageError, DistError) as e:
            print(f"qlora-ext finetune: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
