"""One QLoRA layer, forward + backward: qlora_ext against bf16 LoRA and bitsandbytes + LoRA, one run.

    python3 bench/lora.py --out bench/results/lora-GPU-DATE.json

For each weight shape (out x in, bf16, NF4 with double quantization, blocksize 64), each rank r and
each dropout probability, op "lora_layer" rows for three implementations of
y = x W^T + b + s * B(A(dropout(x))):
  "qlora_ext":         qlora_ext.nn.QLoRALinear (the fused op functional.lora_linear);
  "torch_bf16":        PEFT's own LoRA layer (get_peft_model) on a frozen bf16 nn.Linear: nn.Dropout,
                       and A, B as nn.Linear, result = base(x) + lora_B(lora_A(dropout(x))) * scaling;
  "bitsandbytes_peft": PEFT's bitsandbytes LoRA layer on bitsandbytes' Linear4bit (its matmul_4bit),
                       as get_peft_model makes it for a model loaded in 4 bits.
All hold the same weight (the bf16 one is the dequantized 4-bit weight) and bf16 adapters, so they
compute one function; each is checked against float64 first (dropout 0, output and the gradients of
x, A and B). A row that fails has "error" and no time; the run goes on and exits non-zero at the end.
mode "train": M tokens (default 4096), forward + backward (x requires grad, as a layer inside a
model; A and B get gradients, the base weight none), timed with CUDA events, the median of many steps.
peak_mib: the peak allocated memory of a step above what was allocated before it (layer, x and dY
already there), the activations kept for backward included, and for the 4-bit layers the weight
dequantized during each product, in steady state; persistent_mib: what the first steps left
allocated for good (cuBLAS's workspace, once a process).
mode "decode": M = 1 in eval mode (adapter not merged), forward only, captured in a CUDA graph over
layer copies rotated through 512 MiB, so that the weights come from memory, not the 60 MiB L2; also
"qlora_ext_composed", the layer as three launches (gemm_4bit, x A^T, addmm): the decode kernels' baseline.
mode "mixed": 16 rows (a decode batch of 16 sequences) on 16 different adapters, lora_linear_indexed
(PEFT's adapter_names in one call), against the same rows on one adapter (qlora_ext's layer op), in
CUDA graphs as decode, the weight and the adapters rotated together: "time_vs_one_adapter" (target
<= 1.2), beside "floor_vs_one_adapter", the same ratio at the copy rate: 16 adapters' bytes against
one's (r = 64: 1.56-2.58x on the six shapes; 1.2x is below the floor there).
mode "products": each adapter product op (lora_down, lora_grad_A, lora_dropout_add_mm: fused kernels
where csrc/cuda/lora.cu's dispatch runs them) against its composite form written with torch (the
dropout op, then cuBLAS), M tokens, dropout 0.05, on every in_features K of the shapes: op
"lora_product" rows (ms_op, ms_composite), the op's result checked against the composite first.
floor_ms: train, FLOPs / the bf16 matmul rate measured in this run (4MNK for the two products with
the base weight + 6Mr(N+K) for the adapters); decode, the weight's bytes / the copy bandwidth; mixed,
the 4-bit weight's, the adapters' the rows use, x's and the output's bytes / the copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_ext import functional as F  # noqa: E402
from qlora_ext.nn import QLoRALinear  # noqa: E402

import common  # noqa: E402
from gemm import capture, matmul_tflops, time_graphs  # noqa: E402

SHAPES = common.LLAMA_SHAPES
IMPLS = ["qlora_ext", "torch_bf16", "bitsandbytes_peft"]


def peft_layer(base: nn.Module, r: int, p: float, A: torch.Tensor, B: torch.Tensor, loaded_in_4bit: bool) -> nn.Module:
    """PEFT's own LoRA layer on `base`, made by get_peft_model as for a model, with bf16 adapters A, B."""
    import peft

    holder = nn.Module()
    holder.proj = base
    # What transformers sets on a model loaded in 4 bits: PEFT then wraps a bitsandbytes Linear4bit in
    # its bitsandbytes layer (peft/tuners/lora/bnb.py), the one QLoRA users train, not its generic one.
    holder.is_loaded_in_4bit = loaded_in_4bit
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])
    layer = peft.get_peft_model(holder, config, autocast_adapter_dtype=False).base_model.model.proj
    expected = "peft.tuners.lora.bnb" if loaded_in_4bit else "peft.tuners.lora.layer"
    if type(layer).__module__ != expected:
        raise SystemExit(f"PEFT made a {type(layer).__module__}.{type(layer).__name__}, not a layer of {expected}")
    layer.lora_A["default"].to(dtype=A.dtype)
    layer.lora_B["default"].to(dtype=B.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def build(impl: str, n: int, k: int, r: int, p: float, w: torch.Tensor, bias: torch.Tensor, A, B, bnb):
    """The layer of `impl` with weight w (already 4-bit representable), bias, adapters A, B, on w's device."""
    device = w.device
    if impl.startswith("qlora_ext"):
        linear = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(bias)
        layer = QLoRALinear.from_linear(linear, r=r, lora_alpha=2 * r, lora_dropout=p, compute_dtype=torch.bfloat16,
                                        adapter_dtype=torch.bfloat16)  # fmt: skip
        with torch.no_grad():
            layer.lora_A.default.weight.copy_(A)
            layer.lora_B.default.weight.copy_(B)
        return layer
    if impl == "torch_bf16":
        base = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            base.weight.copy_(w)
            base.bias.copy_(bias)
    else:
        # From the bf16 weight, as transformers loads a bf16 checkpoint in 4 bits: quant_state.dtype is
        # bf16, so bitsandbytes' backward dequantizes to bf16 (a Linear4bit made on the CPU would hold
        # float32 and dequantize to float32, a slower layer than bitsandbytes users get).
        base = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                                 quant_type="nf4", device="meta")  # fmt: skip
        base.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                        blocksize=64, module=base)  # fmt: skip
        base.bias = nn.Parameter(bias.clone(), requires_grad=False)
        base = base.to(device)  # bitsandbytes quantizes on .to()
    base.requires_grad_(False)
    return peft_layer(base, r, p, A, B, loaded_in_4bit=impl == "bitsandbytes_peft")


class ComposedDecode(nn.Module):
    """qlora_ext's layer as it ran before the decode kernels (csrc/cuda/lora_decode.cu): gemm_4bit, x A^T
    on cuBLAS, the up-projection accumulated into the output (addmm), three launches; the decode path's
    baseline in the same run (impl "qlora_ext_composed", decode only)."""

    def __init__(self, layer: QLoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, A, B = self.layer.base_layer, *adapters(self.layer)
        y = F.gemm_4bit(x, base.weight, base._state(), base.bias)
        return y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ A.t(), B.t(), alpha=2.0).view(y.shape)


def adapters(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(layer, x, g, ref) -> list[float]:
    """The layer's y, dx, dA, dB (dropout 0): relative errors against float64."""
    A, B = adapters(layer)
    xi = x.detach().requires_grad_()
    layer.eval()
    y = layer(xi)
    dx, dA, dB = torch.autograd.grad(y, [xi, A, B], g)
    layer.train()
    return [rel_err(t, r) for t, r in zip((y, dx, dA, dB), ref)]


def train_outputs(layer, x, g) -> list[torch.Tensor]:
    """y, dx, dA, dB of one training step (dropout on), its mask drawn after torch.manual_seed(0)."""
    A, B = adapters(layer)
    xi = x.detach().requires_grad_()
    torch.manual_seed(0)
    y = layer(xi)
    return [y, *torch.autograd.grad(y, [xi, A, B], g)]


# bf16 inputs and outputs: each of y, dx, dA, dB has relative error ~2^-9 from rounding alone; 2e-2
# leaves room for the bf16 accumulation of PEFT's products and still fails any indexing or mask error.
MAX_REL_ERR = 2e-2


def reference(w, bias, A, B, scaling, x, g):
    """y, dx, dA, dB in float64 (dropout 0)."""
    xd = x.double().requires_grad_()
    Ad, Bd = A.double().requires_grad_(), B.double().requires_grad_()
    y = xd @ w.double().T + bias.double() + scaling * (xd @ Ad.T) @ Bd.T
    dx, dA, dB = torch.autograd.grad(y, [xd, Ad, Bd], g.double())
    return y.detach(), dx, dA, dB


def time_train(layer, x, g, iters: int) -> tuple[float, float | None, float | None]:
    """Median ms of forward + backward; on CUDA the peak MiB allocated above the start of a step in
    steady state, and the MiB the first steps left allocated for good."""
    A, B = adapters(layer)
    xi = x.detach().requires_grad_()

    def step(_):
        xi.grad = A.grad = B.grad = None
        layer(xi).backward(g)

    if x.device.type != "cuda":
        return common.time_cpu(step, iters), None, None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    xi.grad = A.grad = B.grad = None
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    layer(xi).backward(g)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return common.time_cuda(step, iters), peak, (before - start) / 2**20


def product_ops(x, A, gd, base, seed, p) -> dict:
    """The three adapter product ops on these inputs and their composite forms written with torch, as
    functions of a call index (not used)."""
    return {
        "lora_down": (lambda i: torch.ops.qlora.lora_down(x, A, seed, p), lambda i: F.lora_dropout(x, p, seed) @ A.T),
        "lora_grad_A": (
            lambda i: torch.ops.qlora.lora_grad_A(gd, x, seed, p),
            lambda i: gd.T @ F.lora_dropout(x, p, seed),
        ),
        "lora_dropout_add_mm": (
            lambda i: torch.ops.qlora.lora_dropout_add_mm(base, gd, A, seed, p),
            lambda i: base + F.lora_dropout(gd @ A, p, seed),
        ),
    }


def call_copy(copies: list, x, i: int):
    """Copy i % len(copies) of a layer applied to x (the copies rotate through more than the L2)."""
    return copies[i % len(copies)](x)


MIXED_ROWS = 16  # a decode batch: 16 sequences, one token each


def time_mixed(dev, n, k, r, w, bias, copy_gbps, gen) -> tuple[list[dict], list[str]]:
    """16 rows on 16 different adapters (lora_linear_indexed, PEFT's adapter_names) against the same 16
    rows on one adapter (lora_linear), both in CUDA graphs over rotated copies of the 4-bit weight."""
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    adapters = MIXED_ROWS
    A = (torch.randn(adapters, r, k, device=dev, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    B = (torch.randn(adapters, n, r, device=dev, generator=gen) / math.sqrt(r)).to(torch.bfloat16)
    scaling = [2.0] * adapters
    x = torch.randn(MIXED_ROWS, k, device=dev, generator=gen).to(torch.bfloat16)
    index = {"qlora_ext": torch.zeros(MIXED_ROWS, dtype=torch.int64, device=dev),
             "qlora_ext_16_adapters": torch.arange(MIXED_ROWS, device=dev)}  # fmt: skip
    w4_bytes = packed.numel() + state.absmax.numel() + n * k // 64 // 256 * 4
    adapter_bytes = 2 * r * (n + k)  # one adapter's A and B, bf16
    # The adapters rotate with the weight: 16 of them at r = 64 are 17-76 MB, which the L2 (50 MB on
    # an H100) would otherwise partly keep from one replay to the next, where a model's next layer
    # reads its own.
    copies = common.rotations(w4_bytes + adapters * adapter_bytes) if dev == "cuda" else 2
    weights = [(packed.clone(), A.clone(), B.clone()) for _ in range(copies)]

    def layer(impl, i):
        p, a, b = weights[i % copies]
        if impl == "qlora_ext":  # the one-adapter layer op: adapter 0's A and B
            return F.lora_linear(x, p, state, a[0], b[0], scaling[0], 0.0, bias)
        return F.lora_linear_indexed(x, p, state, a, b, scaling, index[impl], bias)

    rows, failures, graphs, errs = [], [], {}, {}
    xd = x.double()
    base = xd @ w.double().T + bias.double()
    for impl, idx in index.items():
        Ai, Bi = A.double()[idx], B.double()[idx]  # each row's adapter
        ref = base + 2.0 * torch.einsum("mr,mnr->mn", torch.einsum("mk,mrk->mr", xd, Ai), Bi)
        with torch.no_grad():
            errs[impl] = rel_err(layer(impl, 0), ref)
        key = {"op": "lora_layer", "mode": "mixed", "impl": impl, "n": n, "k": k, "M": MIXED_ROWS, "r": r,
               "adapters": len(set(idx.tolist())), "dropout": 0.0, "dtype": "bfloat16", "quant_type": "nf4",
               "dq": True, "blocksize": 64}  # fmt: skip
        if not errs[impl] < MAX_REL_ERR:
            failures.append(f"mixed {n}x{k} r={r} {impl}: relative error {errs[impl]:.2e}")
            rows.append({**key, "error": f"relative error {errs[impl]:.2e} against float64"})
            continue
        fn = functools.partial(layer, impl)
        with torch.no_grad():
            graphs[impl] = capture(fn, copies) if dev == "cuda" else fn
        rows.append(key)
    with torch.no_grad():
        timed = time_graphs(graphs) if dev == "cuda" else {i: common.time_cpu(f, 5) for i, f in graphs.items()}
    io_bytes = 2 * MIXED_ROWS * (n + k)  # x and the output, bf16

    def floor_ms(used: int) -> float:
        return (w4_bytes + used * adapter_bytes + io_bytes) / (copy_gbps * 1e9) * 1e3

    for row in rows:
        if row["impl"] in timed:
            ms, floor = timed[row["impl"]], floor_ms(row["adapters"])
            row.update(ms=round(ms, 5), rel_err_vs_float64=float(f"{errs[row['impl']]:.3g}"), floor_ms=round(floor, 5),
                       of_floor=round(floor / ms, 3))  # fmt: skip
            if row["impl"] != "qlora_ext" and "qlora_ext" in timed:
                row["time_vs_one_adapter"] = round(ms / timed["qlora_ext"], 3)
                row["floor_vs_one_adapter"] = round(floor / floor_ms(1), 3)
    line = "  ".join(f"{i} {t * 1e3:8.1f} us" for i, t in timed.items())
    print(f"mixed  {n:5d}x{k:<5d} M={MIXED_ROWS} r={r:<3d}  {line}", flush=True)
    return rows, failures


def time_products(dev, ks, ranks, m, iters, gen) -> list[dict]:
    """The adapter product ops against their composite forms, one op at a time."""
    rows = []
    p = 0.05
    seed = F.dropout_seed(torch.device(dev))
    for k in ks:
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        base = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        for r in ranks:
            A = (torch.randn(r, k, device=dev, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
            gd = torch.randn(m, r, device=dev, generator=gen).to(torch.bfloat16)
            for name, (op, composite_fn) in product_ops(x, A, gd, base, seed, p).items():
                composite = composite_fn(0)
                ms_composite = common.time_on(dev, composite_fn, iters)
                ours = op(0)
                ms_op = common.time_on(dev, op, iters)
                err = rel_err(ours, composite.double())
                row = {"op": "lora_product", "kernel": name, "M": m, "k": k, "r": r, "dropout": p, "dtype": "bfloat16",
                       "ms_op": round(ms_op, 5), "ms_composite": round(ms_composite, 5),
                       "speedup": round(ms_composite / ms_op, 3),
                       "rel_err_vs_composite": float(f"{err:.3g}")}  # fmt: skip
                if not err < MAX_REL_ERR:
                    row["error"] = f"op against composite: relative error {err:.2e}"
                rows.append(row)
                print(f"product {name:20s} M={m} K={k:<5d} r={r:<3d} op {ms_op * 1e3:8.1f} us  composite "
                      f"{ms_composite * 1e3:8.1f} us  {ms_composite / ms_op:5.2f}x  err {err:.1e}",
                      flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--dropouts", default="0.05,0")
    ap.add_argument("--m", type=int, default=4096, help="tokens of the training step")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--modes", default="train,decode,mixed,products")
    ap.add_argument("--impls", default=",".join(IMPLS), help="a subset of " + ",".join(IMPLS))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no GPU numbers)")
    ap.add_argument("--out", default=None)
    args = common.parse_args(
        ap,
        {
            "shapes": "4096x4096,28672x8192",
            "ranks": "16",
            "dropouts": "0.05",
            "iters": 10,
            "modes": "train,decode,mixed",
        },
    )
    dev = args.device
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    dropouts = [float(p) for p in args.dropouts.split(",")]
    modes = args.modes.split(",")
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        ap.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    bnb = None
    try:
        import peft  # noqa: F401
    except ImportError:
        print("PEFT is not installed: the torch_bf16 and bitsandbytes_peft rows are left out")
        impls = [i for i in impls if i.startswith("qlora_ext")]
    if "bitsandbytes_peft" in impls:
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("bitsandbytes is not installed: its rows are left out")
            impls.remove("bitsandbytes_peft")
    failures = []

    def save():  # after every configuration, so that a later crash or timeout keeps what was measured
        if args.out:
            common.write_results(args.out, meta, rows)

    copy = common.copy_gbps(dev, nbytes=2**30 if dev == "cuda" else 2**26)
    tflops = matmul_tflops() if dev == "cuda" else float("nan")
    meta = common.meta(dev)
    meta.update(copy_gbps=round(copy, 1), matmul_tflops=round(tflops, 1),
                timing="train: CUDA events, median of --iters steps; decode: CUDA graph replays")  # fmt: skip
    print(f"copy {copy:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    rows = []
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    for n, k in shapes:
        w32 = torch.randn(n, k, device=dev, generator=gen) * 0.02
        packed, state = F.quantize_4bit(
            w32.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        w = F.dequantize_4bit(packed, state)  # 4-bit representable: every implementation holds this weight
        del w32, packed, state
        bias = (torch.randn(n, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        w4_bytes = n * k // 2 + n * k // 64 + n * k // 64 // 256 * 4
        for r in ranks:
            A = (torch.randn(r, k, device=dev, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
            B = (torch.randn(n, r, device=dev, generator=gen) / math.sqrt(r)).to(torch.bfloat16)
            scaling = 2.0
            if "train" in modes:
                m = args.m
                x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
                g = (torch.randn(m, n, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
                ref = reference(w, bias, A, B, scaling, x, g)
                for p in dropouts:
                    times, config_rows = {}, {}
                    flops = 4 * m * n * k + 6 * m * r * (n + k)
                    floor = flops / (tflops * 1e12) * 1e3
                    for impl in impls:
                        layer = build(impl, n, k, r, p, w, bias, A, B, bnb)
                        try:
                            errs = check(layer, x, g, ref)
                            problem = None
                            if not max(errs) < MAX_REL_ERR:
                                listed = ["%.2e" % e for e in errs]
                                problem = f"relative errors (y, dx, dA, dB) {listed} against float64"
                            if problem is None:
                                ms, peak, persistent = time_train(layer, x, g, args.iters)
                        finally:
                            del layer
                        key = {"op": "lora_layer", "mode": "train", "impl": impl, "n": n, "k": k, "M": m, "r": r,
                               "dropout": p, "dtype": "bfloat16", "quant_type": "nf4", "dq": True,
                               "blocksize": 64}  # fmt: skip
                        if problem is not None:
                            failures.append(f"train {n}x{k} r={r} p={p} {impl}: {problem}")
                            print("FAILED " + failures[-1], flush=True)
                            rows.append({**key, "error": problem})
                            save()
                            continue
                        times[impl] = (ms, peak, max(errs), persistent)
                        row = {
                            **key, "ms": round(ms, 5), "peak_mib": None if peak is None else round(peak, 1),
                            "persistent_mib": None if persistent is None else round(persistent, 1),
                            "rel_err_vs_float64": float(f"{max(errs):.3g}"),
                            "floor_ms": round(floor, 5), "of_floor": round(floor / ms, 3),
                        }  # fmt: skip
                        config_rows[impl] = row
                        rows.append(row)
                        save()  # each row as it is timed: a CUDA fault in the next implementation keeps it
                    for impl, row in config_rows.items():
                        if impl.startswith("qlora_ext"):
                            for other in ("torch_bf16", "bitsandbytes_peft"):
                                if other in times:
                                    row[f"speedup_vs_{other}"] = round(times[other][0] / row["ms"], 3)
                    line = "  ".join(f"{i} {t[0]:7.3f} ms {t[1] or 0:7.0f} MiB" for i, t in times.items())
                    print(f"train  {n:5d}x{k:<5d} M={m} r={r:<3d} p={p:<4}  {line}", flush=True)
                    save()
                del x, g, ref
            if "decode" in modes:
                x = torch.randn(1, k, device=dev, generator=gen).to(torch.bfloat16)
                yref = x.double() @ w.double().T + bias.double() + scaling * (x.double() @ A.double().T) @ B.double().T
                graphs, errs, layers = {}, {}, {}
                for impl in impls + (["qlora_ext_composed"] if "qlora_ext" in impls else []):
                    per_copy = 2 * n * k if impl == "torch_bf16" else w4_bytes
                    copies = common.rotations(per_copy) if dev == "cuda" else 2
                    layers[impl] = [build(impl, n, k, r, 0.0, w, bias, A, B, bnb).eval() for _ in range(copies)]
                    if impl == "qlora_ext_composed":
                        layers[impl] = [ComposedDecode(layer) for layer in layers[impl]]
                    with torch.no_grad():
                        errs[impl] = rel_err(layers[impl][0](x), yref)
                        if not errs[impl] < MAX_REL_ERR:
                            failures.append(f"decode {n}x{k} r={r} {impl}: relative error {errs[impl]:.2e}")
                            print("FAILED " + failures[-1], flush=True)
                            rows.append({"op": "lora_layer", "mode": "decode", "impl": impl, "n": n, "k": k, "M": 1,
                                         "r": r, "dropout": 0.0,
                                         "error": f"relative error {errs[impl]:.2e} against float64"})  # fmt: skip
                            save()
                            del layers[impl]
                            continue
                        fn = functools.partial(call_copy, layers[impl], x)
                        graphs[impl] = capture(fn, copies) if dev == "cuda" else fn
                with torch.no_grad():
                    if dev == "cuda":
                        timed = time_graphs(graphs)
                    else:
                        timed = {impl: common.time_cpu(fn, 5) for impl, fn in graphs.items()}
                del graphs, layers
                for impl, ms in timed.items():
                    wbytes = 2 * n * k if impl == "torch_bf16" else w4_bytes
                    floor = (wbytes + 2 * r * (n + k)) / (copy * 1e9) * 1e3
                    row = {
                        "op": "lora_layer", "mode": "decode", "impl": impl, "n": n, "k": k, "M": 1, "r": r,
                        "dropout": 0.0, "dtype": "bfloat16", "quant_type": "nf4", "dq": True, "blocksize": 64,
                        "ms": round(ms, 5), "rel_err_vs_float64": float(f"{errs[impl]:.3g}"),
                        "floor_ms": round(floor, 5), "of_floor": round(floor / ms, 3),
                    }  # fmt: skip
                    if impl == "qlora_ext":
                        for other in ("torch_bf16", "bitsandbytes_peft", "qlora_ext_composed"):
                            if other in timed:
                                row[f"speedup_vs_{other}"] = round(timed[other] / ms, 3)
                    rows.append(row)
                line = "  ".join(f"{i} {t * 1e3:8.1f} us" for i, t in timed.items())
                print(f"decode {n:5d}x{k:<5d} M=1 r={r:<3d}  {line}", flush=True)
                save()
            if "mixed" in modes and "qlora_ext" in impls:
                mixed_rows, mixed_failures = time_mixed(dev, n, k, r, w, bias, copy, gen)
                rows += mixed_rows
                failures += mixed_failures
                save()
    if "products" in modes:
        ks = sorted({k for _, k in shapes})
        product_rows = time_products(dev, ks, ranks, args.m, max(args.iters, 50), gen)
        failures += [f"product {r['kernel']} K={r['k']} r={r['r']}: {r['error']}" for r in product_rows if "error" in r]
        rows += product_rows
    save()
    _summary(rows)
    if failures:
        raise SystemExit("failed the correctness check (not timed):\n  " + "\n  ".join(failures))


def _summary(rows) -> None:
    ours = [r for r in rows if r["op"] == "lora_layer" and r["impl"].startswith("qlora_ext") and "error" not in r]
    if not ours:
        return
    print("\nqlora_ext: time of bf16 LoRA / ours (target train >= 0.952, decode >= 2.5), bitsandbytes / ours (>= 1.3)")
    for r in ours:
        peaks = {
            x["impl"]: x.get("peak_mib")
            for x in rows
            if x["op"] == "lora_layer"
            and x["mode"] == r["mode"]
            and (x["n"], x["k"], x["r"], x["dropout"]) == (r["n"], r["k"], r["r"], r["dropout"])
        }
        print(f"{r['impl']:15s} {r['mode']:6s} {r['n']}x{r['k']} r={r['r']} p={r['dropout']}: "
              f"vs bf16 {r.get('speedup_vs_torch_bf16')}, vs bnb {r.get('speedup_vs_bitsandbytes_peft')}, "
              f"peak MiB {peaks}")  # fmt: skip


if __name__ == "__main__":
    main()
