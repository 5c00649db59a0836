"""A whole QLoRA training step of Llama-shaped models: qlora_ext against bitsandbytes + PEFT, one run.

    python3 bench/e2e.py --out bench/results/e2e-GPU-DATE.json [--models llama7b,llama65b]
        [--runs 1x2048,4x2048] [--adapter-dtypes float32,bfloat16] [--optims adamw,adamw_8bit]
        [--loss-steps 50] [--profile FILE]

transformers' LlamaForCausalLM with random weights (std 0.02, norms 1), built on the meta device and
quantized layer by layer (NF4, double quantization, blocksize 64); LoRA r = 64, alpha = 16, dropout
0.05 on all seven projections; gradient checkpointing (non-reentrant); AdamW (lr 1e-4); bf16. The
implementations hold the same weights (the same random values, quantized to the same bits) and
differ in the layers:
  "qlora_ext":         qlora_ext.prepare_model (fused 4-bit products, one autograd op a layer; the layer class,
                       PEFT's LoraLinear4bit or QLoRALinear, is the row's "layers");
  "qlora_ext_fused":   "qlora_ext" after qlora_ext.patch_transformers(): the model's RMSNorm (torch's fused
                       rms_norm), rotary embedding (qlora's rotary_embedding) and MLP gating (qlora's
                       silu_mul) on one kernel each way (undone after its measurement);
  "qlora_ext_peft":    qlora_ext's Linear4bit (as from_pretrained with QLoraExtConfig makes it) under PEFT's own
                       get_peft_model, whose LoRA layers run the same fused op (qlora_ext.peft_lora);
  "bitsandbytes_peft": bitsandbytes' Linear4bit with PEFT's get_peft_model on top (its bitsandbytes layer);
  "bitsandbytes_patched": that same model after qlora_ext.patch_bitsandbytes() (the one line a user of
                       bitsandbytes + PEFT adds; undone after its measurement);
  "bf16_peft":         the bf16 model with PEFT's LoRA: the ceiling a 4-bit base can at best reach
                       (left out where its 16-bit weights would take over half the GPU's memory).
Neither casts the frozen norms or embeddings to float32 (PEFT's prepare_model_for_kbit_training
would, for both). Adapters are float32 (PEFT's default) or, with --adapter-dtypes bfloat16, bf16 for
every implementation alike (AdamW's states then bf16 too). --optims picks the optimizer, the same for
every implementation: torch's AdamW (adamw: its default, the foreach form on CUDA, which makes one
temporary the size of the adapters in each step; adamw_fused: fused=True, without it, transformers'
Trainer's default optimizer), or bitsandbytes' AdamW8bit, PagedAdamW8bit, PagedAdamW32bit
(paged states live in CUDA managed memory, which torch's peak does not count: their bytes are
reported beside it as paged_gib), or torchao's AdamW8bit (torchao_adamw_8bit; it compiles its step
during the warm-up steps).

Correctness first: the loss of the same tokens at the first step (B = 0, so the quantized base) must
agree within 2% between the 4-bit implementations. Then: the median time of --steps full steps
(forward, backward, optimizer step) after 3 warm-up steps, tokens/s, and the peak allocated memory of
the process (weights included). Rows: op "e2e", impl, model, batch, seq, adapter_dtype, tok_per_s,
peak_gib, reserved_gib (the caching allocator's highest reserved memory over the timed steps: what
the GPU must have; above peak_gib by what fragmentation leaves unused), peak_gib_by_phase (one more
step's forward, backward and optimizer step, each's highest allocation: where the peak is; CUDA
only), step_s, host_s (the median time until the step's Python returned, before the wait for the
GPU: near step_s, the host's launches bound the step, unless the step itself waits for the GPU, as a
.item() does). --loss-steps N adds op "loss_curve" rows: N steps on the same 4 batches, cycled, for
each implementation (the same initial adapters: A drawn from the layer's name, B = 0).
--decode N adds op "decode" rows: greedy generation of N new tokens at batch 1 after a 32-token prompt
(model.generate with the KV cache, adapter active and not merged, eval mode), the median of 3 after a
warm-up: tok_per_s = N / time. Decode runs one token at a time through every layer, so the host's
Python per layer, not the GPU, can bound it: the row for comparing layer classes' overheads.
--rounds R measures every implementation R times, the order rotated each round (round i starts at
the i-th implementation), each round a fresh build: the steps are bound by the host's launches, and
rows of the same code moved by up to 26% within one process, and in two of four such calls the
first implementation ran 11-19% below the rest: one pass compares implementations no closer than
that (bench/results/e2e-impls-h100-2026-12-06-9f60d1d.json). The "e2e" and "decode"
rows are then each implementation's median round (step_s and ms_per_token the medians, peak_gib the
highest), with every round's tokens/s in tok_per_s_rounds; the rounds themselves are kept as op
"e2e_round" and "decode_round" rows, tagged round and order.
--profile FILE writes, per implementation, the GPU time of one step kernel by kernel
(torch.profiler), the step's wall time against the GPU's busy time, and where the step's Python
waits for the GPU (torch.cuda.set_sync_debug_mode: each such place keeps host_s near step_s).
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import importlib
import math
import re
import statistics
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_ext  # noqa: E402

import common  # noqa: E402

MODELS = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000),
    "llama65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=64, vocab_size=32000),
    "llama70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=32000),  # grouped-query attention: 8 KV heads
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}  # fmt: skip
# The batch x sequence shapes of issue 18 for each model (--runs replaces them for every model).
RUNS = {"llama7b": "1x512,1x2048,4x2048", "llama65b": "1x2048", "llama70b": "1x2048", "tiny": "1x64,2x64"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ["qlora_ext", "qlora_ext_fused", "qlora_ext_peft", "bitsandbytes_peft", "bitsandbytes_patched", "bf16_peft"]
PREPARED = ("qlora_ext", "qlora_ext_fused")  # the models prepare_model builds
BNB_IMPLS = ("bitsandbytes_peft", "bitsandbytes_patched")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# --optims: torch's AdamW (None; "fused": fused=True), or (module, class) of bitsandbytes' optimizers and
# torchao's 8-bit AdamW (lr 1e-4 for all): the two 8-bit AdamWs that the CLI's --optim adamw_8bit could
# be built on.
OPTIMS = {
    "adamw": None,
    "adamw_fused": "fused",
    "adamw_8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "paged_adamw_8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
    "paged_adamw_32bit": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "torchao_adamw_8bit": ("torchao.optim", "AdamW8bit"),
}
LORA = dict(r=64, lora_alpha=16, lora_dropout=0.05)


class RandomWeights(Mapping):
    """The model's tensors, drawn when asked for: std 0.02 (norm weights 1), one generator seeded by
    the tensor's name, so every implementation gets the same values without any holding them all."""

    def __init__(self, shapes: dict[str, torch.Size], device, dtype=torch.bfloat16):
        self.shapes, self.device, self.dtype = shapes, device, dtype

    def __getitem__(self, key):
        shape = self.shapes[key]
        if "norm" in key:
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(name_seed(key))
        return (torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) * 0.02).to(self.dtype)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def empty_model(name: str):
    import transformers
    from accelerate import init_empty_weights

    cfg = transformers.LlamaConfig(**MODELS[name], max_position_embeddings=4096, tie_word_embeddings=False)
    with init_empty_weights():  # parameters on meta, in bf16; computed buffers (rotary) real
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model


def bf16_bytes(name: str) -> int:
    c = MODELS[name]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]  # k_proj and v_proj's rows (GQA: fewer)
    return 2 * (n * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h)


def patch(impl: str) -> None:
    """impl's process-wide patch, where it has one: bitsandbytes_patched's patch_bitsandbytes(),
    qlora_ext_fused's patch_transformers(); unpatch() undoes both."""
    if impl == "bitsandbytes_patched":
        qlora_ext.patch_bitsandbytes(peft=True)
    elif impl == "qlora_ext_fused":
        qlora_ext.patch_transformers()


def unpatch() -> None:
    qlora_ext.unpatch_bitsandbytes()
    qlora_ext.unpatch_transformers()


def build(impl: str, name: str, device, adapter_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8):
    """The model of `impl`; `quant_storage`: the dtype bitsandbytes' packed codes are viewed as (bfloat16 in
    its FSDP recipe, so that FSDP flattens them with the bf16 parameters)."""
    model = empty_model(name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = RandomWeights(shapes, device)
    if impl in PREPARED:
        config = qlora_ext.LoraConfig(target_modules=PROJECTIONS, adapter_dtype=adapter_dtype, **LORA)
        qlora_ext.prepare_model(
            model, config, compute_dtype=torch.bfloat16, weights=weights, device=device, progress=False
        )
        model = model.to(device=device)
    else:
        import peft

        replaced = []
        if impl in BNB_IMPLS:
            import bitsandbytes as bnb

            for mname, module in list(model.named_modules()):
                if type(module) is torch.nn.Linear and mname.split(".")[-1] in PROJECTIONS:
                    replaced.append(mname)
                    layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                              quant_storage=quant_storage, device="meta")  # fmt: skip
                    layer.weight = bnb.nn.Params4bit(weights[f"{mname}.weight"], requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True, blocksize=64, module=layer,
                                                     quant_storage=quant_storage)  # fmt: skip
                    parent, child = qlora_ext.model._parent(model, mname)
                    setattr(parent, child, layer.to(device))  # bitsandbytes quantizes on .to()
        elif impl == "qlora_ext_peft":
            # What from_pretrained(quantization_config=QLoraExtConfig()) builds: qlora_ext's Linear4bit,
            # one projection quantized at a time; PEFT then wraps each in qlora_ext.peft_lora's layer.
            from qlora_ext import hf

            hf.register_peft()
            for mname, module in list(model.named_modules()):
                if type(module) is torch.nn.Linear and mname.split(".")[-1] in PROJECTIONS:
                    replaced.append(mname)
                    linear = torch.nn.Linear(module.in_features, module.out_features, bias=False, device=device,
                                             dtype=torch.bfloat16)  # fmt: skip
                    with torch.no_grad():
                        linear.weight.copy_(weights[f"{mname}.weight"])
                    layer = qlora_ext.nn.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
                    parent, child = qlora_ext.model._parent(model, mname)
                    setattr(parent, child, layer)
        rest = RandomWeights({k: v for k, v in shapes.items() if k.rpartition(".")[0] not in replaced}, device)
        qlora_ext.model._load_rest(model, qlora_ext.model._WeightSource(rest))
        model = model.to(device=device)
        model.requires_grad_(False)
        model.enable_input_require_grads()
        if impl in BNB_IMPLS:
            # What from_pretrained(load_in_4bit) sets: PEFT then wraps each Linear4bit in its bitsandbytes
            # LoRA layer (peft/tuners/lora/bnb.py), the one QLoRA users train, not its generic one.
            model.is_loaded_in_4bit = True
        model = peft.get_peft_model(model, peft.LoraConfig(target_modules=PROJECTIONS, **LORA))
        kinds = {type(m).__module__ for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        want = {"qlora_ext_peft": "qlora_ext.peft_lora"}.get(
            impl, "peft.tuners.lora.bnb" if impl in BNB_IMPLS else "peft.tuners.lora.layer"
        )
        if kinds != {want}:
            raise SystemExit(f"PEFT made LoRA layers of {sorted(kinds)}, not of {want}")
        for p in model.parameters():
            if p.requires_grad and p.dtype != adapter_dtype:
                p.data = p.data.to(adapter_dtype)
    patch(impl)  # bitsandbytes_patched: the same model, then the one line; measure() and loss_curve() undo it
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def adapter_key(name: str) -> str:
    """A LoRA parameter's name without PEFT's wrapper prefix: the same key in every implementation."""
    return name.removeprefix("base_model.model.")


def reset_adapters(model) -> None:
    """A from the layer's name (kaiming-uniform's bound, 1 / sqrt(in_features)), B = 0: the same start
    for every implementation."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_B." in pname:
                p.zero_()
            elif ".lora_A." in pname:
                g = torch.Generator(device=p.device).manual_seed(name_seed(adapter_key(pname)))
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=g, device=p.device) * (2 * bound) - bound)


def tokens(name: str, batch: int, seq: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODELS[name]["vocab_size"], (batch, seq), generator=g).to(device)


# Kernel families for the profile's summary: the first pattern a kernel's name matches.
FAMILIES = [
    ("bitsandbytes", r"kDequantize|kgemm_4bit|kQuantize"),
    ("qlora_ext kernels", r"qlora"),
    ("attention", r"flash|fmha|attention|sdpa|cutlass.*Kernel.*(Fwd|Bwd)"),
    ("GEMM (cuBLAS)", r"nvjet|gemm|sm90_xmma|cutlass|splitKreduce|Kernel2"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("loss / softmax", r"softmax|nll|log_softmax|cross_entropy"),
    ("reductions", r"reduce"),
    ("copies / casts", r"copy|cast|CatArray|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|index"),
]


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """Microseconds of GPU time and launch count per kernel name, from a torch.profiler run."""
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") and getattr(e, "is_legacy", False) is False:
            t = getattr(e, "device_time", None)
            if t is None:
                t = getattr(e, "cuda_time", 0.0)
            if t and not e.cpu_children and e.name and not e.name.startswith("cuda"):
                out[e.name][0] += t
                out[e.name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def sync_sites(step) -> Counter:
    """The places (file:line of the Python caller, and torch's message) where one step synchronizes
    with the GPU, as torch reports them: where its host has to wait, and host_s stops telling launch
    time from GPU time. (A backward's syncs show as autograd's one line; an explicit synchronize, the
    allocator's and other libraries' own CUDA calls are not reported.)"""
    import warnings

    sites: Counter = Counter()
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"`{Path(w.filename).name}:{w.lineno}` {str(w.message).splitlines()[0][:80]}"] += 1
    torch.cuda.synchronize()
    return sites


def peak_groups(events: list[dict]) -> tuple[int, dict[str, list[int]]]:
    """From the allocator's trace (torch.cuda.memory._snapshot()'s device_traces): the highest change of
    the bytes allocated over it (frees of blocks from before it included), and the blocks it made that
    are live at that moment as {origin: [bytes, blocks]}, the
    origin being the innermost Python frame outside torch, or, for a trace recorded without stacks, the
    block's size (a tensor's shape shows through it: 344 MiB is one 22016 x 8192 bf16 weight)."""

    def origin(e) -> str:
        if not e.get("frames"):
            return f"(no stack) blocks of {e['size'] / 2**20:.1f} MiB"
        for f in e["frames"]:
            if "/torch/" not in f["filename"] and not f["filename"].startswith("<"):
                return f"`{Path(f['filename']).name}:{f['line']}` {f['name']}"
        return "(torch internals)"

    live, level, best, best_live = {}, 0, 0, {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            level += e["size"]
            if level > best:
                best, best_live = level, dict(live)
        elif e["action"] == "free_requested":  # blocks from before the trace count too
            live.pop(e["addr"], None)
            level -= e["size"]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in best_live.values():
        g = groups[origin(e)]
        g[0] += e["size"]
        g[1] += 1
    return best, dict(groups)


def memory_at_peak(step, reset, top: int = 12) -> str:
    """One more step under the caching allocator's history: the allocations live at the step's highest
    allocated memory, grouped by the innermost Python frame outside torch that made them (which layer
    and line: what the peak is made of, beside what was live before the step). reset undoes what a
    step that failed half-way leaves (its gradients), before the step is run again without stacks."""

    def traced(**how):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, **how)
        try:
            step()
            torch.cuda.synchronize()
            return torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)

    before = torch.cuda.memory_allocated()
    note, snap = "", None
    try:
        snap = traced(stacks="python")
    except Exception as e:  # noqa: BLE001
        # torch 2.11 fails some steps whose allocations it records with Python stacks (a SystemError
        # out of a pybind11 function, seen on qlora_ext's steps, not bitsandbytes'); without stacks
        # the blocks still show by size.
        note = f" (recorded without stacks: with them the step failed: {type(e).__name__})"
        print(f"memory_at_peak, with Python stacks:\n{traceback.format_exc(limit=-4)}", file=sys.stderr)
    if snap is None:  # (out of the except clause: its traceback holds the failed step's tensors)
        reset()  # a step that failed in its backward leaves gradients half accumulated
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        snap = traced(context=None)
    peak = torch.cuda.max_memory_allocated()
    best, groups = peak_groups(snap["device_traces"][torch.cuda.current_device()])
    # The trace's sizes are the bytes asked for; the allocator's counts (before, peak) are its blocks,
    # rounded up to 512 bytes and at times holding an unsplit remainder: the two differ a little.
    lines = [f"\nmemory at the step's peak: {peak / 2**30:.3f} GiB allocated (the allocator's count), "
             f"{before / 2**30:.3f} GiB of it live before the step (weights, adapters, optimizer states); "
             f"the step's own allocations at their highest, {best / 2**30:.3f} GiB as requested, by where{note}:\n",
             "| made at | MiB requested | blocks |", "| --- | --- | --- |"]  # fmt: skip
    for where, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {where} | {size / 2**20:.1f} | {n} |")
    return "\n".join(lines) + "\n"


def profile_step(step, reset, label: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    times = kernel_times(prof)
    busy = sum(t for t, _ in times.values()) / 1e3
    families: dict[str, float] = defaultdict(float)
    for kname, (t, _) in times.items():
        fam = next((f for f, pat in FAMILIES if re.search(pat, kname, re.I)), "other")
        families[fam] += t / 1e3
    lines = [
        f"## {label}",
        "",
        f"step {wall:.1f} ms wall (under the profiler), GPU busy {busy:.1f} ms, "
        f"{sum(n for _, n in times.values())} kernels",
        "",
        "| family | ms | share |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {f} | {ms:.1f} | {ms / busy:.1%} |" for f, ms in sorted(families.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | ms | launches |", "| --- | --- | --- |"]
    for kname, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"| `{kname[:110]}` | {t / 1e3:.2f} | {n} |")
    lines += ["", "Where the step's Python waits for the GPU (torch.cuda.set_sync_debug_mode, one step):", ""]
    try:  # a failure here must not cost the run its measurements
        sites = [f"- {site}: {count}x" for site, count in sync_sites(step).most_common(10)]
        lines += sites or ["- none that torch reports"]
    except Exception as e:  # noqa: BLE001
        lines.append(f"- not measured: {type(e).__name__}: {e}")
    try:
        lines.append(memory_at_peak(step, reset))
    except Exception as e:  # noqa: BLE001
        lines.append(f"\nmemory at the step's peak: not measured: {type(e).__name__}: {e}")
    return "\n".join(lines) + "\n"


def make_optimizer(name: str, params: list, lr: float = 1e-4):
    if OPTIMS[name] is None:
        return torch.optim.AdamW(params, lr=lr)
    if OPTIMS[name] == "fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    module, cls = OPTIMS[name]
    return getattr(importlib.import_module(module), cls)(params, lr=lr)


def paged_gib(optimizer) -> float:
    """GiB of the optimizer's states in CUDA managed memory (bitsandbytes' paged tensors)."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False):
                total += t.numel() * t.element_size()
    return total / 2**30


def release(*_):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_step(model, optimizer, ids):
    """One training step on the batch `ids` (its own labels); returns the loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def phase_peaks(model, optimizer, ids) -> dict[str, float]:
    """One more training step, the highest allocated memory (GiB) of each of its phases: the forward
    (with the checkpoints it keeps), the backward (the recomputed forward with it) and the optimizer's
    step. Which one holds the peak says what would lower it (activations, the dequantized weight of a
    product, or the optimizer's states and temporaries)."""
    peaks = {}

    def phase(name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return out

    loss = phase("forward", lambda: model(input_ids=ids, labels=ids).loss)
    phase("backward", loss.backward)
    del loss
    phase("optimizer", optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return peaks


def decode_speed(model, name: str, new_tokens: int, device) -> dict:
    """Greedy generation of `new_tokens` tokens after a 32-token prompt, batch 1: the median of 3 runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt = tokens(name, 1, 32, device, seed=32)
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(4):  # the first warms up
            sync()
            t = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True)  # fmt: skip
            sync()
            if i:
                times.append(time.perf_counter() - t)
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")
    model.train()
    t = statistics.median(times)
    return dict(tok_per_s=new_tokens / t, ms_per_token=t / new_tokens * 1e3)


def measure(impl, name, runs, steps, device, adapter_dtype, optim, profile_run, decode=0):
    """Times each (batch, seq) of `runs` on one model build; returns {run: result} (and "decode": the
    decode speed, with `decode` > 0) and a profile text."""
    try:
        return _measure(impl, name, runs, steps, device, adapter_dtype, optim, profile_run, decode)
    finally:
        unpatch()  # bitsandbytes_patched's and qlora_ext_fused's patches: later builds run unpatched


def _measure(impl, name, runs, steps, device, adapter_dtype, optim, profile_run, decode):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = build(impl, name, device, adapter_dtype)
    sync()
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the build's cached temporaries are not the steps': reserved_gib
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optim, trainable)
    results, profile_text = {}, ""
    for batch, seq in runs:
        ids = tokens(name, batch, seq, device, seed=seq)
        step = functools.partial(train_step, model, optimizer, ids)
        with torch.no_grad():
            first = model(input_ids=ids, labels=ids).loss.item()
        for _ in range(3):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, host = [], []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            host.append(time.perf_counter() - t)
            sync()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
        peaks = phase_peaks(model, optimizer, ids) if device.type == "cuda" else None
        step_s, host_s = statistics.median(times), statistics.median(host)
        n = batch * seq
        paged = paged_gib(optimizer)
        results[(batch, seq)] = dict(
            first_loss=first,
            step_s=step_s,
            host_s=host_s,
            tok_per_s=n / step_s,
            peak_gib=peak,
            reserved_gib=reserved,
            paged_gib=paged,
            peak_gib_by_phase=peaks,
        )
        print(f"{impl:20s} {name:9s} {batch}x{seq:<5d} adapters {str(adapter_dtype)[6:]:8s} {optim:17s}: "
              f"{n / step_s:8.0f} tok/s, step {step_s:.3f} s (host {host_s:.3f}), peak {peak or 0:.2f} GiB"
              f"{f' + {paged:.2f} GiB paged' if paged else ''}, first loss {first:.4f}", flush=True)  # fmt: skip
        if profile_run == (batch, seq) and device.type == "cuda":
            profile_text = profile_step(
                step,
                functools.partial(optimizer.zero_grad, set_to_none=True),
                f"{impl}, {name} {batch}x{seq}, {str(adapter_dtype)[6:]} adapters, {optim}",
            )
            print(profile_text, flush=True)
    if decode > 0:
        results["decode"] = decode_speed(model, name, decode, device)
        print(f"{impl:20s} {name:9s} decode {decode} tokens: {results['decode']['tok_per_s']:8.1f} tok/s "
              f"({results['decode']['ms_per_token']:.2f} ms a token)", flush=True)  # fmt: skip
    del model, optimizer, trainable, step  # (step holds the model and optimizer too)
    release()
    return build_s, results, profile_text


def loss_curve(impl, name, steps, device, adapter_dtype, batch=1, seq=512) -> list[float]:
    """`steps` training steps (lr 2e-4) on 4 fixed batches, cycled, from the same initial adapters."""
    try:
        model = build(impl, name, device, adapter_dtype)
        reset_adapters(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        data = [tokens(name, batch, seq, device, seed=1000 + i) for i in range(4)]
        torch.manual_seed(0)
        losses = []
        for i in range(steps):
            losses.append(train_step(model, optimizer, data[i % len(data)]).item())
    finally:
        unpatch()
    del model, optimizer
    release()
    print(f"{impl:20s} {name} loss curve: {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps", flush=True)
    return losses


def choices(args) -> tuple[list[str], list[str], list[str]]:
    """--impls, --adapter-dtypes and --optims as lists, each name checked (SystemExit naming the argument)."""
    lists = {"--impls": (args.impls, IMPLS), "--adapter-dtypes": (args.adapter_dtypes, sorted(DTYPES)),
             "--optims": (args.optims, sorted(OPTIMS))}  # fmt: skip
    out = []
    for flag, (text, known) in lists.items():
        names = text.split(",")
        for name in names:
            if name not in known:
                raise SystemExit(f"{flag}: {name!r} is not one of {known}")
        out.append(names)
    return out[0], out[1], out[2]


def losses_disagree(losses: list[float]) -> bool:
    """Whether the 4-bit implementations' first-step losses (bf16_peft's left out) differ by over 2%:
    the same weights and tokens, so they differ only in rounding (bf16 products, the order of the
    4-bit dequantization), which moves the loss far less."""
    return bool(losses) and max(losses) - min(losses) > 0.02 * abs(losses[0])


def parse_runs(text: str) -> list[tuple[int, int]]:
    runs = []
    for item in text.split(","):
        b, _, s = item.partition("x")
        if not (b.isdigit() and s.isdigit()):
            raise SystemExit(f"--runs: each run is BATCHxSEQ (e.g. 1x2048), got {item!r}")
        runs.append((int(b), int(s)))
    return runs


def tag_round(row: dict, rnd: int, rounds: int, impls: list[str]) -> None:
    """With --rounds R > 1, a measured row becomes a round's row: op "e2e_round" / "decode_round"."""
    if rounds > 1:
        row["op"] += "_round"
        row["round"] = rnd
        row["order"] = (impls.index(row["impl"]) - rnd) % len(impls)


def median_rounds(rounds: list[dict]) -> list[dict]:
    """One "e2e" / "decode" row per implementation and run from its rounds' rows: the median step (or
    token) time; the highest peak; every round's tokens/s in order of the rounds."""
    groups = defaultdict(list)
    for row in rounds:
        groups[(row["op"], row["impl"], row.get("batch"), row.get("seq"))].append(row)
    out = []
    for (op, _, batch, seq), group in groups.items():
        row = {k: v for k, v in group[0].items() if k not in ("round", "order")}
        row["op"] = op.removesuffix("_round")
        row["rounds"] = len(group)
        row["tok_per_s_rounds"] = [r["tok_per_s"] for r in group]
        if row["op"] == "e2e":
            row["step_s"] = round(statistics.median(r["step_s"] for r in group), 5)
            row["host_s"] = round(statistics.median(r["host_s"] for r in group), 5)
            row["tok_per_s"] = round(batch * seq / row["step_s"], 1)
            row["build_s"] = round(statistics.median(r["build_s"] for r in group), 2)
            peaks = [r["peak_gib"] for r in group if r["peak_gib"] is not None]
            row["peak_gib"] = max(peaks) if peaks else None
            reserved = [r["reserved_gib"] for r in group if r.get("reserved_gib") is not None]
            row["reserved_gib"] = max(reserved) if reserved else None
            phases = [r["peak_gib_by_phase"] for r in group if r["peak_gib_by_phase"]]
            row["peak_gib_by_phase"] = {k: max(p[k] for p in phases) for k in phases[0]} if phases else None
            row["paged_gib"] = max(r["paged_gib"] for r in group)
        else:
            row["ms_per_token"] = round(statistics.median(r["ms_per_token"] for r in group), 3)
            row["tok_per_s"] = round(1e3 / row["ms_per_token"], 2)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama7b,llama65b")
    ap.add_argument("--runs", default=None, help="BATCHxSEQ list for every model (default: " +
                    "; ".join(f"{m} {r}" for m, r in RUNS.items()) + ")")  # fmt: skip
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--impls", default=",".join(IMPLS), help="a subset of " + ",".join(IMPLS))
    ap.add_argument("--adapter-dtypes", default="float32", help="float32 and/or bfloat16, for every implementation")
    ap.add_argument("--optims", default="adamw", help="a list of " + ",".join(OPTIMS) + ", for every implementation")
    ap.add_argument("--loss-steps", type=int, default=0, help="N > 0: the loss curve of N steps on the first model")
    ap.add_argument("--decode", type=int, default=0, help="N > 0: greedy decode speed of N new tokens, batch 1")
    ap.add_argument("--rounds", type=int, default=1, help="R > 1: each implementation R times, in rotated orders")
    ap.add_argument("--profile", default=None, help="FILE: one step of each implementation, kernel by kernel")
    ap.add_argument("--profile-run", default="1x2048", help="the BATCHxSEQ run profiled")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script with --models tiny")
    ap.add_argument("--out", default=None)
    args = common.parse_args(ap, {"models": "llama7b", "runs": "1x2048", "steps": 3, "decode": 32, "rounds": 3})
    device = torch.device(args.device)
    impls, dtypes, optims = choices(args)
    if args.rounds < 1:
        raise SystemExit(f"--rounds: must be 1 or more, got {args.rounds}")
    profile_run = parse_runs(args.profile_run)[0] if args.profile else None
    rows, disagreements, profiles = [], [], []
    meta = common.meta(args.device)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None
    models = args.models.split(",")
    for name in models:
        runs = parse_runs(args.runs or RUNS.get(name, "1x2048"))
        for dname, optim in [(d, o) for d in dtypes for o in optims]:
            firsts = {}
            measured = len(rows)
            fit = list(impls)
            if "bf16_peft" in fit and gpu_bytes is not None and bf16_bytes(name) > gpu_bytes // 2:
                print(f"bf16_peft {name}: left out, its bf16 weights ({bf16_bytes(name) / 2**30:.0f} GiB) "
                      f"take over half of the GPU's {gpu_bytes / 2**30:.0f} GiB")  # fmt: skip
                fit.remove("bf16_peft")
            for rnd, impl in [(i, m) for i in range(args.rounds) for m in fit[i % len(fit) :] + fit[: i % len(fit)]]:
                build_s, results, prof = measure(
                    impl,
                    name,
                    runs,
                    args.steps,
                    device,
                    DTYPES[dname],
                    optim,
                    profile_run if rnd == 0 else None,
                    args.decode,
                )
                if prof:
                    profiles.append(prof)
                decode = results.pop("decode", None)
                if decode is not None:
                    rows.append({"op": "decode", "impl": impl, "model": name, "adapter_dtype": dname, "batch": 1,
                                 "prompt": 32, "new_tokens": args.decode, "tok_per_s": round(decode["tok_per_s"], 2),
                                 "ms_per_token": round(decode["ms_per_token"], 3)})  # fmt: skip
                    if impl in PREPARED:
                        rows[-1]["layers"] = qlora_ext._lora_layers.layer_kind()
                    tag_round(rows[-1], rnd, args.rounds, fit)
                for (batch, seq), r in results.items():
                    firsts.setdefault((batch, seq), {})[impl] = r["first_loss"]
                    rows.append({"op": "e2e", "impl": impl, "model": name, "batch": batch, "seq": seq,
                                 "adapter_dtype": dname, "optim": optim, "tok_per_s": round(r["tok_per_s"], 1),
                                 "step_s": round(r["step_s"], 5), "host_s": round(r["host_s"], 5),
                                 "peak_gib": None if r["peak_gib"] is None else round(r["peak_gib"], 3),
                                 "reserved_gib": None if r["reserved_gib"] is None else round(r["reserved_gib"], 3),
                                 "peak_gib_by_phase": r["peak_gib_by_phase"],
                                 "paged_gib": round(r["paged_gib"], 3), "first_loss": round(r["first_loss"], 5),
                                 "build_s": round(build_s, 2)})  # fmt: skip
                    if impl in PREPARED:  # which LoRA layer class prepare_model built (QLORA_EXT_LAYERS)
                        rows[-1]["layers"] = qlora_ext._lora_layers.layer_kind()
                    tag_round(rows[-1], rnd, args.rounds, fit)
                if args.out:  # after every implementation: a later crash or timeout keeps these
                    common.write_results(args.out, meta, rows)
                if args.profile and profiles:
                    Path(args.profile).write_text(f"# One training step, kernel by kernel ({meta['gpu']}, commit "
                                                  f"{meta['commit']})\n\n" + "\n".join(profiles))  # fmt: skip
            if args.rounds > 1:
                rows.extend(median_rounds(rows[measured:]))
                if args.out:
                    common.write_results(args.out, meta, rows)
            for run, losses in firsts.items():
                if losses_disagree([v for k, v in losses.items() if k != "bf16_peft"]):
                    disagreements.append(f"{name} {run[0]}x{run[1]}: the first-step losses disagree: {losses}")
                    print("FAILED " + disagreements[-1], flush=True)
                    for row in rows:  # kept, and marked: their speed is not of one computation
                        if (row["model"], row["batch"], row["seq"], row["adapter_dtype"], row["optim"]) == (
                            name,
                            *run,
                            dname,
                            optim,
                        ):
                            row["losses_disagree"] = True
    if args.loss_steps > 0:
        name = models[0]
        for impl in [i for i in impls if i != "bf16_peft"]:
            losses = loss_curve(impl, name, args.loss_steps, device, DTYPES[dtypes[0]])
            rows.append({"op": "loss_curve", "impl": impl, "model": name, "batch": 1, "seq": 512,
                         "adapter_dtype": dtypes[0], "losses": [round(v, 5) for v in losses]})  # fmt: skip
            if args.out:
                common.write_results(args.out, meta, rows)
    if args.out:
        common.write_results(args.out, meta, rows)
    # ours / peer on the same run: qlora_ext against every other row, the two patches against the
    # stack they patch (qlora_ext_fused against bitsandbytes + PEFT too: issue 18's ratio with it)
    pairs = {
        "qlora_ext": None,
        "qlora_ext_fused": ("bitsandbytes_peft",),
        "bitsandbytes_patched": ("bitsandbytes_peft",),
    }
    run_keys = ("model", "batch", "seq", "adapter_dtype", "optim")
    for row in rows:
        if row["op"] != "e2e" or row["impl"] not in pairs:
            continue
        for peer in rows:
            wanted = pairs[row["impl"]]
            if (peer["op"] != "e2e" or peer["impl"] == row["impl"] or (wanted and peer["impl"] not in wanted)
                    or not all(peer[k] == row[k] for k in run_keys)):  # fmt: skip
                continue
            print(f"{row['model']} {row['batch']}x{row['seq']} {row['adapter_dtype']} {row['optim']}: "
                  f"{row['impl']} / {peer['impl']} tokens/s {row['tok_per_s'] / peer['tok_per_s']:.2f}x, "
                  f"peak {row['peak_gib']} vs {peer['peak_gib']} GiB")  # fmt: skip
    if disagreements:
        raise SystemExit("\n".join(disagreements))


if __name__ == "__main__":
    main()
