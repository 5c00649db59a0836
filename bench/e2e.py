"""A whole QLoRA training step of Llama-shaped models: qlora_ext against bitsandbytes + PEFT, one run.

    python3 bench/e2e.py --out bench/results/e2e-h200-DATE.json [--models llama7b,llama65b] [--seqs 512,2048]

transformers' LlamaForCausalLM with random weights (std 0.02, norms 1), built on the meta device and
quantized layer by layer (NF4, double quantization, blocksize 64); LoRA r = 64, alpha = 16, dropout
0.05 on all seven projections; gradient checkpointing (non-reentrant); AdamW (lr 1e-4); bf16;
batch 1. The two implementations hold the same weights (the same random values, quantized to the
same bits) and differ in the layers:
  "qlora_ext":     qlora_ext.prepare_model (QLoRALinear: fused 4-bit products, one autograd op a layer);
  "bitsandbytes_peft": bitsandbytes' Linear4bit with PEFT's get_peft_model on top.
Neither casts the frozen norms or embeddings to float32 (PEFT's prepare_model_for_kbit_training
would, for both). Correctness first: the loss of the same tokens at the first step (B = 0, so the
quantized base) must agree within 2%. Then: the median time of --steps full steps (forward,
backward, optimizer step) after 3 warm-up steps, tokens/s, and the peak allocated memory of the
process (weights included). Rows: op "e2e", impl, model, seq, tok_per_s, peak_gib, step_s.
--compile adds the same with torch.compile of the model, where it works.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import qlora_ext  # noqa: E402

MODELS = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000),
    "llama65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=64, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}  # fmt: skip
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RandomWeights(Mapping):
    """The model's tensors, drawn when asked for: std 0.02 (norm weights 1), one generator seeded by
    the tensor's name, so both implementations get the same values without either holding them all."""

    def __init__(self, shapes: dict[str, torch.Size], device, dtype=torch.bfloat16):
        self.shapes, self.device, self.dtype = shapes, device, dtype

    def __getitem__(self, key):
        shape = self.shapes[key]
        if "norm" in key:
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1)
        return (torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) * 0.02).to(self.dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def empty_model(name: str):
    import transformers
    from accelerate import init_empty_weights

    cfg = transformers.LlamaConfig(**MODELS[name], max_position_embeddings=4096, tie_word_embeddings=False)
    with init_empty_weights():  # parameters on meta, in bf16; computed buffers (rotary) real
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model


def build(impl: str, name: str, device):
    model = empty_model(name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = RandomWeights(shapes, device)
    lora = dict(r=64, lora_alpha=16, lora_dropout=0.05)
    if impl == "qlora_ext":
        qlora_ext.prepare_model(model, qlora_ext.LoraConfig(target_modules=PROJECTIONS, **lora), compute_dtype=torch.bfloat16,
                                weights=weights, device=device, progress=False)  # fmt: skip
        model = model.to(device=device)
    else:
        import bitsandbytes as bnb
        import peft

        replaced = []
        for mname, module in list(model.named_modules()):
            if type(module) is torch.nn.Linear and mname.split(".")[-1] in PROJECTIONS:
                replaced.append(mname)
                layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
                layer.weight = bnb.nn.Params4bit(weights[f"{mname}.weight"], requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64, module=layer)  # fmt: skip
                parent, child = qlora_ext.model._parent(model, mname)
                setattr(parent, child, layer.to(device))  # bitsandbytes quantizes on .to()
        rest = RandomWeights({k: v for k, v in shapes.items() if k.rpartition(".")[0] not in replaced}, device)
        qlora_ext.model._load_rest(model, qlora_ext.model._WeightSource(rest))
        model = model.to(device=device)
        model.requires_grad_(False)
        model.enable_input_require_grads()
        # What from_pretrained(load_in_4bit) sets: PEFT then wraps each Linear4bit in its bitsandbytes
        # LoRA layer (peft/tuners/lora/bnb.py), the one QLoRA users train, not its generic one.
        model.is_loaded_in_4bit = True
        model = peft.get_peft_model(model, peft.LoraConfig(target_modules=PROJECTIONS, **lora))
        kinds = {type(m).__module__ for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        if kinds != {"peft.tuners.lora.bnb"}:
            raise SystemExit(f"PEFT made LoRA layers of {sorted(kinds)}, not of peft.tuners.lora.bnb")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def measure(impl, name, seqs, steps, device, compile_model: bool):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = build(impl, name, device)
    sync()
    build_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    fn = torch.compile(model) if compile_model else model
    vocab = MODELS[name]["vocab_size"]
    results = {}
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)

        def step():
            loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        with torch.no_grad():
            first = fn(input_ids=ids, labels=ids).loss.item()
        for _ in range(3):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        step_s = statistics.median(times)
        results[seq] = dict(first_loss=first, step_s=step_s, tok_per_s=seq / step_s, peak_gib=peak)
        print(f"{impl:18s}{' compiled' if compile_model else '':9s} {name:9s} seq {seq:5d}: {seq / step_s:8.0f} tok/s, "
              f"step {step_s:.3f} s, peak {peak or 0:.2f} GiB, first loss {first:.4f}", flush=True)  # fmt: skip
    model = fn = optimizer = trainable = None  # freed before the next build
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return build_s, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama7b,llama65b")
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--impls", default="qlora_ext,bitsandbytes_peft")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of each model")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script with --models tiny")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    seqs = [int(s) for s in args.seqs.split(",")]
    rows, disagreements = [], []
    meta = common.meta(args.device)
    for name in args.models.split(","):
        firsts = {}
        for impl in args.impls.split(","):
            for compiled in ([False, True] if args.compile else [False]):
                try:
                    build_s, results = measure(impl, name, seqs, args.steps, device, compiled)
                except Exception as e:  # a compile failure is a result, not the end of the run
                    if not compiled:
                        raise
                    print(f"{impl} {name}: torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                for seq, r in results.items():
                    firsts.setdefault(seq, {})[(impl, compiled)] = r["first_loss"]
                    rows.append({"op": "e2e", "impl": impl + ("+compile" if compiled else ""), "model": name, "seq": seq,
                                 "batch": 1, "tok_per_s": round(r["tok_per_s"], 1), "step_s": round(r["step_s"], 5),
                                 "peak_gib": None if r["peak_gib"] is None else round(r["peak_gib"], 3),
                                 "first_loss": round(r["first_loss"], 5), "build_s": round(build_s, 2)})  # fmt: skip
                if args.out:  # after every model and implementation: a later crash or timeout keeps these
                    common.write_results(args.out, meta, rows)
        for seq, losses in firsts.items():
            values = list(losses.values())
            # Same weights, same tokens: the models differ only in rounding (bf16 products, the order
            # of the 4-bit dequantization), which moves the loss far less than 2%.
            if max(values) - min(values) > 0.02 * abs(values[0]):
                disagreements.append(f"{name} seq {seq}: the first-step losses disagree: {losses}")
                print("FAILED " + disagreements[-1], flush=True)
                for row in rows:  # kept, and marked: their speed is not of one computation
                    if row["model"] == name and row["seq"] == seq:
                        row["losses_disagree"] = True
                if args.out:
                    common.write_results(args.out, meta, rows)
    if args.out:
        common.write_results(args.out, meta, rows)
    for name in args.models.split(","):
        for seq in seqs:
            pick = {r["impl"]: r for r in rows if r["model"] == name and r["seq"] == seq}
            if "qlora_ext" in pick and "bitsandbytes_peft" in pick:
                a, b = pick["qlora_ext"], pick["bitsandbytes_peft"]
                print(f"{name} seq {seq}: qlora_ext / bitsandbytes + PEFT tokens/s {a['tok_per_s'] / b['tok_per_s']:.2f}x, "
                      f"peak {a['peak_gib']} vs {b['peak_gib']} GiB")  # fmt: skip
    if disagreements:
        raise SystemExit("\n".join(disagreements))


if __name__ == "__main__":
    main()
