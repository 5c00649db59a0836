"""Hostile files: an adapter or a 4-bit checkpoint that is truncated, has a corrupt header, wrong dtypes
or shapes, or extra / missing keys fails with an error that names the problem, and leaves the model
exactly as it was. Nothing is unpickled."""

from __future__ import annotations

import json

import pytest
import torch

import qlora_ext
from qlora_ext import LoraConfig, _lora_layers as lora_layers

from helpers import tiny_llama

transformers = pytest.importorskip("transformers")
# every test with each class of LoRA layer (conftest.layer_kind)
pytestmark = pytest.mark.usefixtures("layer_kind")


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: type(m).__name__ for n, m in model.named_modules()},
        sorted(getattr(model, "qlora_config", {})),
        {n: lora_layers.active_of(layer) for n, layer in qlora_ext.model.qlora_layers(model)},
    )


def assert_unchanged(model, before):
    tensors, kinds, configs, active = snapshot(model)
    assert kinds == before[1] and configs == before[2] and active == before[3]
    assert sorted(tensors) == sorted(before[0])
    for k, v in tensors.items():
        assert v.dtype == before[0][k].dtype and torch.equal(v, before[0][k]), k


@pytest.fixture
def model():
    return qlora_ext.prepare_model(tiny_llama(21), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), progress=False)


@pytest.fixture
def adapter_dir(tmp_path, model):
    qlora_ext.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite_adapter(directory, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "adapter_model.safetensors"))


LAST = "base_model.model.model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize(
    "damage,error,match",
    [
        ("truncate", ValueError, "not a readable safetensors file"),
        ("header", ValueError, "not a readable safetensors file"),
        ("config", ValueError, "not a valid adapter config"),
        ("dtype", TypeError, "is torch.int32, not a float tensor"),
        ("shape", ValueError, r"layers.1.self_attn.v_proj has lora_A \(4, 60\)"),
        ("extra", ValueError, "the model has no module 'model.layers.9.mlp.up_proj'"),
        ("missing", ValueError, r"layers.1.self_attn.v_proj has \['lora_A'\] but needs lora_A and lora_B"),
        ("dora", ValueError, "use_dora=True is not supported"),
        ("rank", ValueError, r"lora_A has rank 4 but adapter_config.json says r=8: the files do not belong together"),
        ("twice", ValueError, r"layers.1.self_attn.v_proj has two lora_A tensors"),
    ],
)
def test_damaged_adapter_fails_and_changes_nothing(model, adapter_dir, damage, error, match):
    path = adapter_dir / "adapter_model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "header":
        data = bytearray(path.read_bytes())
        data[:8] = (2**40).to_bytes(8, "little")  # a header length past the end of the file
        path.write_bytes(bytes(data))
    elif damage == "config":
        (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    elif damage == "dora":
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    elif damage == "rank":  # the config of another adapter beside these tensors
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    elif damage == "twice":  # PEFT's key and one with an adapter name, for one layer
        rewrite_adapter(
            adapter_dir, lambda t: t.update({f"{LAST}.lora_A.other.weight": t[f"{LAST}.lora_A.weight"].clone()})
        )
    elif damage == "dtype":
        rewrite_adapter(adapter_dir, lambda t: t.update({f"{LAST}.lora_A.weight": t[f"{LAST}.lora_A.weight"].int()}))
    elif damage == "shape":
        rewrite_adapter(
            adapter_dir, lambda t: t.update({f"{LAST}.lora_A.weight": t[f"{LAST}.lora_A.weight"][:, :60].contiguous()})
        )
    elif damage == "extra":
        rewrite_adapter(adapter_dir, lambda t: t.update({
            "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(128, 4)}))  # fmt: skip
    elif damage == "missing":
        rewrite_adapter(adapter_dir, lambda t: t.pop(f"{LAST}.lora_B.weight"))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        qlora_ext.load_adapter(model, adapter_dir, "second")
    assert_unchanged(model, before)


def test_load_adapter_records_the_dtype_it_loaded(model, adapter_dir):
    """The adapter's config on the model is what save_pretrained writes and from_pretrained checks the
    layers against: it must say the dtype the tensors were loaded in, not the config file's default."""
    rewrite_adapter(adapter_dir, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    config = qlora_ext.load_adapter(model, adapter_dir, "bf16")
    assert config.adapter_dtype is torch.bfloat16 and model.qlora_config["bf16"].adapter_dtype is torch.bfloat16
    loaded = {n: p for n, p in model.named_parameters() if ".lora_" in n and "bf16" in n}
    assert loaded and all(p.dtype is torch.bfloat16 for p in loaded.values())


def test_pickle_is_never_read(model, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(
        json.dumps(LoraConfig(r=4, target_modules=["q_proj"]).to_peft())
    )
    torch.save({"x": torch.zeros(1)}, tmp_path / "a" / "adapter_model.bin")
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="only safetensors is read"):
        qlora_ext.load_adapter(model, tmp_path / "a", "second")
    with pytest.raises(ValueError, match="no pickle"):
        qlora_ext.load_quantized(model, tmp_path / "a" / "adapter_model.bin")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "damage,error,match",
    [
        ("truncate", ValueError, "not a readable safetensors file"),
        ("missing", ValueError, r"missing keys \['model.norm.weight'\]"),
        ("extra", ValueError, r"unexpected keys \['model.extra.weight'\]"),
        ("dtype", ValueError, r"model.norm.weight is torch.float16 \(64,\), the model has torch.float32"),
        ("quant_state", ValueError, "layers.1.mlp.down_proj.base_layer.weight: .*quant_state"),
        ("packed", ValueError, r"layers.1.mlp.down_proj.base_layer.weight: the packed weight has 4095 bytes"),
        ("orphan", ValueError, "has its 4-bit entries but not the weight"),
    ],
)
def test_damaged_checkpoint_fails_and_changes_nothing(tmp_path, damage, error, match):
    from safetensors.torch import load_file, save_file

    source = qlora_ext.prepare_model(tiny_llama(22), LoraConfig(r=4, target_modules="all-linear"), progress=False)
    path = tmp_path / "model.safetensors"
    qlora_ext.save_quantized(source, path)
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.down_proj.weight"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        if damage == "missing":
            tensors.pop("model.norm.weight")
        elif damage == "extra":
            tensors["model.extra.weight"] = torch.zeros(3)
        elif damage == "dtype":
            tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
        elif damage == "quant_state":
            tensors[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
        elif damage == "packed":
            tensors[key] = tensors[key][:-1].contiguous()
        elif damage == "orphan":
            tensors.pop(key)
        save_file(tensors, str(path))
    target = qlora_ext.prepare_model(tiny_llama(23), LoraConfig(r=4, target_modules="all-linear"), progress=False)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        qlora_ext.load_quantized(target, path)
    assert_unchanged(target, before)


@pytest.mark.parametrize(
    "damage,error,match",
    [
        ("pickle only", FileNotFoundError, r"no .*model.safetensors nor model.safetensors.index.json .*no pickle"),
        ("outside", ValueError, r"'../model.safetensors' is not a .safetensors file name in"),
        ("not json", ValueError, "model.safetensors.index.json: not a valid index"),
        ("lacks", ValueError, r"its shards lack \['model.extra.weight'\]"),
        ("twice", ValueError, "is in two shards"),
    ],
)
def test_damaged_checkpoint_directory_fails_and_changes_nothing(tmp_path, damage, error, match):
    from safetensors.torch import load_file, save_file

    source = qlora_ext.prepare_model(tiny_llama(24), LoraConfig(r=4, target_modules="all-linear"), progress=False)
    qlora_ext.save_quantized(source, tmp_path / "model.safetensors")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:10]}, str(directory / "a.safetensors"))
    save_file({k: tensors[k] for k in keys[10:]}, str(directory / "b.safetensors"))
    weight_map = {k: "a.safetensors" if i < 10 else "b.safetensors" for i, k in enumerate(keys)}
    if damage == "pickle only":
        for p in directory.iterdir():
            p.unlink()
        torch.save(tensors, directory / "pytorch_model.bin")
    elif damage == "outside":
        weight_map[keys[0]] = "../model.safetensors"
    elif damage == "lacks":
        weight_map["model.extra.weight"] = "a.safetensors"
    elif damage == "twice":
        save_file({k: tensors[k] for k in keys[:11]}, str(directory / "a.safetensors"))
    if damage != "pickle only":
        index = json.dumps({"weight_map": weight_map}) if damage != "not json" else "{not json"
        (directory / "model.safetensors.index.json").write_text(index)
    target = qlora_ext.prepare_model(tiny_llama(25), LoraConfig(r=4, target_modules="all-linear"), progress=False)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        qlora_ext.load_quantized(target, directory)
    assert_unchanged(target, before)
