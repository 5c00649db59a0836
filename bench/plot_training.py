"""QLoRA training against bitsandbytes + PEFT, from one GPU run of bench/e2e.py and bench/lora.py.

    pip install -r requirements-bench.txt
    python bench/plot_training.py E2E.json LORA.json OUT.png

Left: tokens/s of a whole training step per model and batch x seq (float32 adapters). Middle: the loss
of the same 50 steps on the same tokens, qlora_ext and bitsandbytes + PEFT. Right: one QLoRA layer,
forward + backward at M = 4096 and decode at M = 1, time of PEFT's layer / ours (above 1: ours faster).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"qlora_ext": "tab:blue", "bitsandbytes_peft": "tab:orange", "bitsandbytes_patched": "tab:green",
          "bf16_peft": "tab:gray"}  # fmt: skip
LABELS = {"qlora_ext": "qlora_ext", "bitsandbytes_peft": "bitsandbytes + PEFT",
          "bitsandbytes_patched": "bitsandbytes + PEFT, patch_bitsandbytes()", "bf16_peft": "bf16 + PEFT"}  # fmt: skip


def main(e2e_path: str, lora_path: str, dst: str) -> None:
    e2e = json.loads(open(e2e_path).read())
    lora = json.loads(open(lora_path).read())
    fig, (ax_tok, ax_loss, ax_layer) = plt.subplots(1, 3, figsize=(18, 5.5))

    steps = [r for r in e2e["rows"] if r["op"] == "e2e" and r.get("adapter_dtype", "float32") == "float32"]
    runs = sorted({(r["model"], r["batch"], r["seq"]) for r in steps}, key=lambda t: (t[0] != "llama7b", t[1], t[2]))
    impls = [i for i in COLORS if any(r["impl"] == i for r in steps)]
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, run in enumerate(runs):
            row = next((r for r in steps if (r["model"], r["batch"], r["seq"]) == run and r["impl"] == impl), None)
            if row:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(row["tok_per_s"])
        ax_tok.bar(xs, ys, width, color=COLORS[impl], label=LABELS[impl])
    ax_tok.set_xticks(range(len(runs)), [f"{m.removeprefix('llama')}\n{b} x {s}" for m, b, s in runs])
    ax_tok.set_ylabel("tokens / s (training step, r = 64 on 7 projections)")
    ax_tok.legend()
    ax_tok.set_title("Whole training step")

    for r in e2e["rows"]:
        if r["op"] == "loss_curve":
            ax_loss.plot(range(1, len(r["losses"]) + 1), r["losses"], color=COLORS[r["impl"]], label=LABELS[r["impl"]],
                         linestyle="-" if r["impl"] == "qlora_ext" else "--")  # fmt: skip
    ax_loss.set_xlabel("step (4 batches of 1 x 512 tokens, cycled)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title("Same steps, same tokens, same initial adapters")

    layer = [r for r in lora["rows"] if r["op"] == "lora_layer" and r["impl"] == "qlora_ext" and "error" not in r]
    shapes = sorted({(r["n"], r["k"]) for r in layer}, key=lambda s: s[0] * s[1])
    for mode, marker in (("train", "o"), ("decode", "s")):
        for peer, color in (("torch_bf16", "tab:gray"), ("bitsandbytes_peft", "tab:orange")):
            xs, ys = [], []
            for i, shape in enumerate(shapes):
                vals = [r[f"speedup_vs_{peer}"] for r in layer if (r["n"], r["k"]) == shape and r["mode"] == mode
                        and f"speedup_vs_{peer}" in r]  # fmt: skip
                if vals:
                    xs.append(i)
                    ys.append(min(vals))
            label = f"{mode}: {'PEFT on bf16 nn.Linear' if peer == 'torch_bf16' else LABELS[peer]} / ours"
            ax_layer.plot(xs, ys, marker=marker, color=color, linestyle="-" if mode == "train" else ":", label=label)
    ax_layer.axhline(1.0, color="black", linewidth=0.8)
    ax_layer.set_xticks(range(len(shapes)), [f"{n}x{k}" for n, k in shapes], rotation=20)
    ax_layer.set_ylabel("time ratio, the lower of r = 16 and 64")
    ax_layer.legend(fontsize=8)
    ax_layer.set_title("One QLoRA layer: M = 4096 train, M = 1 decode")

    m = e2e["meta"]
    fig.suptitle(f"{m['gpu']}, torch {m['torch']}, bitsandbytes {m['bitsandbytes']}, commit {m['commit']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
