"""Files saved by an earlier version keep loading: tests/data/golden/ holds an adapter (save_adapter), a
4-bit checkpoint (save_quantized), a prepared model (save_pretrained) and a CLI checkpoint as qlora_ext
0.1.0 wrote them (tools/make_golden.py), with the logits each gave. Loaded by today's code, each must
give the same tensors and logits; saved again, the same files' tensors. (Logits within float32
rounding of a different CPU or torch build; the tensors to the bit.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qlora_ext
from qlora_ext.nn import Linear4bit

from helpers import LAYER_CLASS, assert_bits_equal

transformers = pytest.importorskip("transformers")
# every test with each class of LoRA layer (conftest.layer_kind)
pytestmark = pytest.mark.usefixtures("layer_kind")
from safetensors.torch import load_file  # noqa: E402  (transformers brings safetensors)

from qlora_ext.hf import QLoraExtConfig  # noqa: E402  (needs transformers)

GOLDEN = Path(__file__).parent / "data" / "golden"
EXPECTED = load_file(str(GOLDEN / "expected.safetensors"))
# float32 logits of a two-layer model: the same code on another torch build may round its matrix
# products differently, never by more than this
LOGITS = dict(rtol=1e-5, atol=1e-5)


def load_base():
    return transformers.AutoModelForCausalLM.from_pretrained(str(GOLDEN / "base"), device_map="cpu").eval()


def logits(model):
    with torch.no_grad():
        return model(EXPECTED["ids"]).logits.float()


def prepared_base():
    """The base prepared as make_golden.py prepared it (the adapter's saved config says how)."""
    saved = json.loads((GOLDEN / "adapter" / "adapter_config.json").read_text())
    lora = qlora_ext.LoraConfig(**{k: saved[k] for k in ("r", "lora_alpha", "target_modules", "modules_to_save")})
    return qlora_ext.prepare_model(load_base(), lora, compute_dtype=torch.float32, quantize_others=True,
                                   progress=False)  # fmt: skip


def test_adapter_loads_to_the_same_logits_and_saves_the_same_tensors(tmp_path):
    model = prepared_base()
    qlora_ext.load_adapter(model, GOLDEN / "adapter", adapter_name="golden")
    qlora_ext.set_adapter(model, "golden")
    torch.testing.assert_close(logits(model), EXPECTED["adapter"], **LOGITS)
    qlora_ext.save_adapter(model, tmp_path / "again", adapter_name="golden")
    old = load_file(str(GOLDEN / "adapter" / "adapter_model.safetensors"))
    new = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(new) == sorted(old)
    for key, tensor in old.items():
        assert_bits_equal(new[key], tensor, what=key)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "target_modules", "modules_to_save", "use_rslora", "peft_type"):
        assert config[field] == json.loads((GOLDEN / "adapter" / "adapter_config.json").read_text())[field], field


def test_quantized_checkpoint_loads_the_same_bits_and_saves_them_again(tmp_path):
    model = prepared_base()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    with torch.no_grad():  # codes and scales that only the file can put back
        for layer in model.modules():
            if isinstance(layer, Linear4bit):
                layer.weight.zero_()
                layer.quant_state.absmax.zero_()
    qlora_ext.load_quantized(model, GOLDEN / "quantized")
    old = load_file(str(GOLDEN / "quantized" / "model.safetensors"))
    written = qlora_ext.save_quantized(model, tmp_path / "again")
    new = load_file(str(written))
    assert sorted(new) == sorted(old)
    for key, tensor in old.items():
        assert_bits_equal(new[key], tensor, what=key)
    for key, tensor in before.items():  # the adapters are left as they were
        assert_bits_equal(model.state_dict()[key], tensor, what=key)
    # today's quantizer gives the same bits from the same weights (lm_head, trained in place as
    # modules_to_save, had moved before the golden file was written)
    fresh = qlora_ext.save_quantized(prepared_base(), tmp_path / "fresh")
    for key, tensor in load_file(str(fresh)).items():
        if not key.startswith("lm_head."):
            assert_bits_equal(tensor, old[key], what=key)


def test_adapter_loads_onto_a_model_loaded_in_4_bits(layer_kind):
    """load_adapter onto bare Linear4bit layers (from_pretrained with QLoraExtConfig) builds the layers
    that layer_kind names, with the golden adapter's logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(GOLDEN / "base"), quantization_config=QLoraExtConfig(compute_dtype=torch.float32), device_map="cpu"
    ).eval()
    qlora_ext.load_adapter(model, GOLDEN / "adapter", adapter_name="golden")
    assert type(model.model.layers[0].self_attn.v_proj).__name__ == LAYER_CLASS[layer_kind]
    torch.testing.assert_close(logits(model), EXPECTED["adapter"], **LOGITS)


def test_prepared_model_loads_with_from_pretrained_to_the_same_logits(layer_kind):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(GOLDEN / "prepared"), device_map="cpu").eval()
    assert type(model.model.layers[0].self_attn.v_proj).__name__ == LAYER_CLASS[layer_kind]
    torch.testing.assert_close(logits(model), EXPECTED["prepared_other"], **LOGITS)
    qlora_ext.set_adapter(model, "default")
    torch.testing.assert_close(logits(model), EXPECTED["prepared_default"], **LOGITS)


def test_cli_checkpoint_resumes_to_the_run_it_was_part_of(tmp_path, monkeypatch):
    """The CLI's checkpoint-2 of a 4-step run (cli/args.json), resumed by today's CLI: the
    run resumes (its log keeps the golden run's first two steps, wall-clock speeds included, which a
    run that started over could not repeat) and ends near where the run that wrote it ended. Where this
    machine's own run of the same command writes the golden checkpoint-2 to the bit (the same CPU
    kernels), the resumed run also ends on this machine's uninterrupted run to the bit. (Another CPU
    or torch build may round a gradient element near zero the other way, and Adam's first steps then
    move that weight by about 2 lr = 2e-2: the median difference of a tensor must stay far below lr,
    as a resume without the optimizer's state would not.)"""
    from safetensors.torch import load_file

    from qlora_ext import cli

    args = json.loads((GOLDEN / "cli" / "args.json").read_text())
    monkeypatch.chdir(GOLDEN.parents[2])  # the run recorded --model as given, from the repository's root
    shutil.copytree(GOLDEN / "cli" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert cli.main([*args, "--output", str(tmp_path / "resumed")]) == 0
    golden_state = json.loads((GOLDEN / "cli" / "checkpoint-2" / "trainer_state.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log[:2] == golden_state["log_history"][:2]
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    then = load_file(str(GOLDEN / "cli" / "final" / "adapter_model.safetensors"))
    assert sorted(resumed) == sorted(then)
    for key in then:
        assert (resumed[key] - then[key]).abs().median() < 1e-4, key
    assert cli.main([*args, "--output", str(tmp_path / "fresh")]) == 0
    fresh_2 = load_file(str(tmp_path / "fresh" / "checkpoint-2" / "adapter_model.safetensors"))
    golden_2 = load_file(str(GOLDEN / "cli" / "checkpoint-2" / "adapter_model.safetensors"))
    if all(torch.equal(fresh_2[k], golden_2[k]) for k in golden_2):
        fresh = load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
        for key in then:
            assert_bits_equal(resumed[key], fresh[key], what=key)
