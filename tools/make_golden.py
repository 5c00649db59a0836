"""Writes tests/data/golden/: files as this version of qlora_ext saves them, which every later version
must keep loading to the same tensors and logits (tests/test_golden_files.py). It ran once and refuses
to run where the folder exists: a file that no longer loads is a broken promise to the users who saved
it, not a file to regenerate. A new kind of saved file gets a writer of its own, run once into its own
folder.

    python3 tools/make_golden.py

On the CPU, float32 compute, a tiny Llama (tests/helpers.py's tiny_llama, hidden 64, two layers):
- base/: the float32 model and a word-level tokenizer as transformers saves them;
- adapter/: save_adapter of a prepared model (r = 4 on q_proj and v_proj, lm_head in modules_to_save,
  adapters moved off their initial values so that B is not zero);
- quantized/model.safetensors: save_quantized of that model with quantize_others (4-bit layers in
  bitsandbytes' keys, adapters left out);
- prepared/: save_pretrained of that model after add_adapter("other", ...) with "other" active;
- expected.safetensors: the input ids and the logits each of the above gives: "adapter" (base/ prepared,
  adapter/ loaded), "prepared_other" and "prepared_default" (prepared/ through from_pretrained);
- cli/: the fine-tuning CLI's run on base/ and cli/train.jsonl (CLI_ARGS, paths relative to the
  repository's root, as the run records them; cli/args.json): its checkpoint-2/ and its final adapter
  (final/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import qlora_ext  # noqa: E402

from helpers import WORDS, tiny_lm_dir  # noqa: E402

SEED = 20261206
ADAPTER = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
OTHER = dict(r=2, lora_alpha=2, target_modules=["v_proj"], use_rslora=True)
# the CLI's run, from the repository's root (a checkpoint records --model and resumes only with the same)
GOLDEN = "tests/data/golden"
CLI_ARGS = ["finetune", "--model", f"{GOLDEN}/base", "--data", f"{GOLDEN}/cli/train.jsonl", "--lora-r", "4",
            "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--save-steps", "2", "--lr", "1e-2",
            "--device", "cpu", "--quiet"]  # fmt: skip


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().contiguous()


def write_cli_run(cli_dir: Path, gen: torch.Generator) -> None:
    import os
    import tempfile

    from qlora_ext import cli

    cli_dir.mkdir()
    (cli_dir / "args.json").write_text(json.dumps(CLI_ARGS) + "\n")  # what a test reruns
    lines = []
    for i in range(12):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5 + i % 8,), generator=gen)]
        if i % 2:
            lines.append(json.dumps({"text": " ".join(words)}))
        else:
            lines.append(json.dumps({"prompt": " ".join(words[:-3]), "response": " ".join(words[-3:])}))
    (cli_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.chdir(ROOT)
            if cli.main([*CLI_ARGS, "--output", str(Path(tmp) / "run")]) != 0:
                raise SystemExit("the CLI's run failed")
        finally:
            os.chdir(cwd)
        shutil.copytree(Path(tmp) / "run" / "checkpoint-2", cli_dir / "checkpoint-2")
        (cli_dir / "final").mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(Path(tmp) / "run" / name, cli_dir / "final" / name)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args(argv)
    out = ROOT / GOLDEN
    if out.exists():
        raise SystemExit(f"{out} exists: golden files are written once, never refreshed (see the docstring)")
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(SEED)
    tiny_lm_dir(out / "base", SEED % 2**31)

    def load_base():
        return transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), device_map="cpu").eval()

    model = qlora_ext.prepare_model(load_base(), qlora_ext.LoraConfig(**ADAPTER), compute_dtype=torch.float32,
                                    quantize_others=True, progress=False)  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name == "lm_head.weight":
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    ids = torch.randint(0, 96, (2, 11), generator=gen)
    expected = {"ids": ids, "adapter": logits(model, ids)}
    qlora_ext.save_adapter(model, out / "adapter")
    qlora_ext.save_quantized(model, out / "quantized")
    qlora_ext.add_adapter(model, "other", qlora_ext.LoraConfig(**OTHER))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and ".other." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    qlora_ext.set_adapter(model, "other")
    expected["prepared_other"] = logits(model, ids)
    model.save_pretrained(str(out / "prepared"))
    qlora_ext.set_adapter(model, "default")
    expected["prepared_default"] = logits(model, ids)
    save_file(expected, str(out / "expected.safetensors"), metadata={"format": "pt"})
    write_cli_run(out / "cli", gen)
    (out / "README.md").write_text(
        "Files as qlora_ext " + qlora_ext.__version__ + " saved them (`python3 tools/make_golden.py`), which "
        "tests/test_golden_files.py loads: never regenerate them.\n"
    )
    for junk in out.rglob("generation_config.json"):
        junk.unlink()  # transformers' default, not ours
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    print(json.dumps(sizes, indent=1), f"\ntotal {sum(sizes.values())} bytes")
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
