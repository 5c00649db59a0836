"""Whole models: prepare_model on transformers' models (targets, freezing, meta device + streamed
safetensors), adapters in PEFT's format both ways (checked with PEFT itself), several adapters,
merging, and 4-bit checkpoints in bitsandbytes' keys both ways (checked with bitsandbytes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qlora_ext
from qlora_ext import LoraConfig, _lora_layers as lora_layers
from qlora_ext.nn import Linear4bit

from helpers import DEVICES, assert_bits_equal, assert_each_raises, tiny_llama

transformers = pytest.importorskip("transformers")
# every test with each class of LoRA layer (conftest.layer_kind)
pytestmark = pytest.mark.usefixtures("layer_kind")


def tokens(gen, device="cpu"):
    return torch.randint(0, 96, (2, 11), generator=gen).to(device)


def randomize_adapters(model, gen, adapter="default"):
    """B is zero after PEFT's init; give both adapters values so that every path is seen."""
    with torch.no_grad():
        for _, layer in qlora_ext.model.qlora_layers(model):
            if adapter in layer.lora_B:
                w = layer.lora_B[adapter].weight
                w.copy_(torch.randn(w.shape, generator=gen).to(w.device) * 0.05)


def dequantized_copy(original, prepared):
    """`original` with each quantized layer's weight replaced by the dequantized 4-bit weight: the base
    that PEFT sees when it runs on top of the same quantization."""
    plain = copy.deepcopy(original)
    for name, module in prepared.named_modules():
        base = (
            lora_layers.base_of(module)
            if lora_layers.is_lora_layer(module)
            else module
            if isinstance(module, Linear4bit)
            else None
        )
        if base is not None and not name.endswith(".base_layer"):
            with torch.no_grad():
                plain.get_submodule(name).weight.copy_(base.dequantize().float())
    return plain


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------------------------
# prepare_model


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_targets_freezes_and_matches_the_quantized_model(gen, device):
    original = tiny_llama(1, device)
    model = qlora_ext.prepare_model(copy.deepcopy(original), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    kinds = {n: "LoRA" if lora_layers.is_lora_layer(m) else type(m).__name__ for n, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "LoRA"
    assert kinds["model.layers.1.self_attn.v_proj"] == "LoRA"
    assert kinds["model.layers.0.self_attn.k_proj"] == "Linear" and kinds["lm_head"] == "Linear"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # B starts at zero: the prepared model is the model with those weights quantized.
    ids = tokens(gen, device)
    torch.testing.assert_close(logits(model, ids), logits(dequantized_copy(original, model), ids), rtol=1e-4, atol=1e-4)


def test_target_forms(gen):
    original = tiny_llama(2)
    cases = {
        "all-linear": 14,  # 7 linears a layer; the output head is left out
        r"model\.layers\.1\..*_proj": 7,
        ("up_proj", "down_proj"): 4,
    }
    for target, count in cases.items():
        config = LoraConfig(target_modules=target if isinstance(target, str) else list(target))
        model = qlora_ext.prepare_model(copy.deepcopy(original), config, progress=False)
        assert sum(1 for _ in qlora_ext.model.qlora_layers(model)) == count, target
        assert type(model.lm_head) is torch.nn.Linear
    others = qlora_ext.prepare_model(
        copy.deepcopy(original), LoraConfig(target_modules=["q_proj"]), quantize_others=True, progress=False
    )
    assert type(others.model.layers[0].mlp.up_proj) is Linear4bit and type(others.lm_head) is torch.nn.Linear
    assert not any(p.requires_grad for p in others.model.layers[0].mlp.up_proj.parameters())
    # compute_dtype by name too, as QLoraExtConfig and config files take it
    named = qlora_ext.prepare_model(copy.deepcopy(original), LoraConfig(target_modules=["q_proj"]),
                                    compute_dtype="float32", progress=False)  # fmt: skip
    assert named.model.layers[0].self_attn.q_proj.base_layer.compute_dtype is torch.float32
    for modules_to_save in (["lm_head"], "lm_head"):  # a string is one name, not its characters
        config = LoraConfig(target_modules=["q_proj"], modules_to_save=modules_to_save)
        assert config.modules_to_save == ["lm_head"]
        saved = qlora_ext.prepare_model(copy.deepcopy(original), config, progress=False)
        assert saved.lm_head.weight.requires_grad


def test_meta_model_streamed_from_safetensors(gen, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import save_file

    original = tiny_llama(3)
    sd = {k: v.contiguous() for k, v in original.state_dict().items()}
    sd.pop("lm_head.weight", None) if original.config.tie_word_embeddings else None
    half = len(sd) // 2
    keys = sorted(sd)
    (tmp_path / "shards").mkdir()
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "shards" / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "shards" / "model-00002-of-00002.safetensors"))
    config = LoraConfig(r=4, target_modules="all-linear")
    eager = qlora_ext.prepare_model(copy.deepcopy(original), config, compute_dtype=torch.float32, progress=False)
    # parameters on the meta device, buffers (rotary frequencies, computed, not in a checkpoint) real
    with accelerate.init_empty_weights():
        empty = tiny_llama(0)
    assert all(p.is_meta for p in empty.parameters())
    # a weight missing halfway raises and leaves the model as it was, to be prepared again
    short = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj.weight"):
        qlora_ext.prepare_model(empty, config, weights=short, progress=False)
    assert all(type(m) is torch.nn.Linear for n, m in empty.named_modules() if n.endswith("proj"))
    assert all(p.is_meta for n, p in empty.named_parameters() if "layers" in n)
    streamed = qlora_ext.prepare_model(empty, config, compute_dtype=torch.float32, weights=tmp_path / "shards",
                                       device="cpu", progress=False)  # fmt: skip
    assert not any(t.is_meta for t in streamed.parameters())
    for (n1, l1), (n2, l2) in zip(qlora_ext.model.qlora_layers(eager), qlora_ext.model.qlora_layers(streamed)):
        assert n1 == n2
        assert torch.equal(l1.base_layer.weight, l2.base_layer.weight)
    with torch.no_grad():
        for (_, l1), (_, l2) in zip(qlora_ext.model.qlora_layers(eager), qlora_ext.model.qlora_layers(streamed)):
            l2.lora_A.default.weight.copy_(l1.lora_A.default.weight)
    ids = tokens(gen)
    assert_bits_equal(logits(streamed, ids), logits(eager, ids))
    with pytest.raises(ValueError, match="no pickle"):
        qlora_ext.prepare_model(tiny_llama(0, meta=True), config, weights=tmp_path / "model.bin", progress=False)


def test_checkpointed_training_step_gets_gradients(gen):
    model = qlora_ext.prepare_model(
        tiny_llama(4), LoraConfig(r=4, lora_dropout=0.1), compute_dtype=torch.float32, progress=False
    )
    randomize_adapters(model, gen)  # with B = 0, A's gradient is zero
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = tokens(gen)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert len(grads) == 2 * 7 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# PEFT's format, both ways


def test_our_adapter_loads_into_peft(gen, tmp_path):
    peft = pytest.importorskip("peft")
    original = tiny_llama(5)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = qlora_ext.prepare_model(copy.deepcopy(original), lora_config, compute_dtype=torch.float32, progress=False)
    randomize_adapters(model, gen)
    qlora_ext.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    theirs = peft.PeftModel.from_pretrained(dequantized_copy(original, model), str(tmp_path)).eval()
    ids = tokens(gen)
    torch.testing.assert_close(logits(model, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_into_ours(gen, tmp_path, use_rslora):
    peft = pytest.importorskip("peft")
    original = tiny_llama(6)
    ours = qlora_ext.prepare_model(copy.deepcopy(original), LoraConfig(r=8, target_modules="all-linear"),
                                   compute_dtype=torch.float32, progress=False)  # fmt: skip
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj"],
                             init_lora_weights=False, use_rslora=use_rslora)  # fmt: skip
    theirs = peft.get_peft_model(dequantized_copy(original, ours), config).eval()
    theirs.save_pretrained(str(tmp_path))
    loaded = qlora_ext.load_adapter(ours, tmp_path, "peft")
    assert loaded.use_rslora == use_rslora
    ids = tokens(gen)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)
    # Layers the adapter does not touch run their base alone while it is active.
    assert lora_layers.active_of(ours.model.layers[0].mlp.up_proj) is None


def test_delete_the_active_adapter_while_another_is_merged(gen):
    """Deleting the active adapter while another is merged (merge_adapter(model, "other")) leaves every
    layer without it and the merge as it was (PEFT's own delete would activate another adapter, which the
    merge refuses, halfway through the model)."""
    model = qlora_ext.prepare_model(tiny_llama(8), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    qlora_ext.add_adapter(model, "other", LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_adapters(model, gen, "other")
    ids = tokens(gen)
    qlora_ext.set_adapter(model, "other")
    with_other = logits(model, ids)
    qlora_ext.merge_adapter(model, "other")
    qlora_ext.delete_adapter(model, "default")
    layers = dict(qlora_ext.model.qlora_layers(model))
    assert all("default" not in lora_layers.adapters_of(m) for m in layers.values())
    assert sorted(model.qlora_config) == ["other"]
    assert lora_layers.merged_of(layers["model.layers.0.self_attn.v_proj"]) == "other"
    torch.testing.assert_close(logits(model, ids), with_other, rtol=1e-5, atol=1e-5)  # the merged 16-bit weight
    qlora_ext.unmerge_adapter(model)
    assert_bits_equal(logits(model, ids), with_other, "after unmerge")


@pytest.mark.parametrize("device", DEVICES)
def test_several_adapters(gen, device):
    model = qlora_ext.prepare_model(tiny_llama(7, device), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    randomize_adapters(model, gen)
    qlora_ext.add_adapter(model, "other", LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_adapters(model, gen, "other")
    ids = tokens(gen, device)
    first = logits(model, ids)
    qlora_ext.set_adapter(model, "other")
    second = logits(model, ids)
    assert not torch.equal(first, second)
    assert lora_layers.active_of(model.model.layers[0].self_attn.q_proj) is None  # "other" has no q_proj
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    with qlora_ext.disable_adapters(model):
        base = logits(model, ids)
    qlora_ext.delete_adapter(model, "other")
    assert_bits_equal(logits(model, ids), base)  # no active adapter left: the base alone
    qlora_ext.set_adapter(model, "default")
    assert_bits_equal(logits(model, ids), first)
    assert_each_raises([
        (lambda: qlora_ext.set_adapter(model, "other"), ValueError, "no adapter 'other'"),
        (lambda: qlora_ext.add_adapter(model, "default", LoraConfig()), ValueError, "exists already"),
        (lambda: qlora_ext.add_adapter(model, "cuda", LoraConfig()), ValueError, "'cuda' is an attribute"),
        (lambda: qlora_ext.load_adapter(model, "nowhere", adapter_name="keys"), ValueError, "'keys' is an attribute"),
    ])  # fmt: skip
    assert sorted(model.qlora_config) == ["default"]


@pytest.mark.parametrize("device", DEVICES)
def test_merge_and_unmerge(gen, device):
    model = qlora_ext.prepare_model(tiny_llama(8, device), LoraConfig(r=4), compute_dtype=torch.float32, progress=False)
    randomize_adapters(model, gen)
    ids = tokens(gen, device)
    before = logits(model, ids)
    qlora_ext.merge_adapter(model)
    merged = logits(model, ids)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    qlora_ext.unmerge_adapter(model)
    assert_bits_equal(logits(model, ids), before)
    with pytest.warns(UserWarning, match=r"adds a relative error of 0\.\d+") as record:
        qlora_ext.merge_adapter(model, requantize=True)
    stated = float(str(record[0].message).split("relative error of ")[1].split()[0])
    assert 0.01 < stated < 0.2  # NF4's own error on Gaussian weights is about 0.1
    assert not any(True for _ in qlora_ext.model.qlora_layers(model))
    requantized = logits(model, ids)
    rel = ((requantized - before).norm() / before.norm()).item()
    assert 0 < rel < 5 * stated
    with pytest.raises(ValueError, match="cannot be undone"):
        qlora_ext.unmerge_adapter(model)


# ---------------------------------------------------------------------------------------------
# 4-bit checkpoints in bitsandbytes' keys


def test_save_and_load_quantized(gen, tmp_path):
    model = qlora_ext.prepare_model(tiny_llama(9), LoraConfig(r=4), progress=False)
    qlora_ext.save_quantized(model, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    other = qlora_ext.prepare_model(tiny_llama(10), LoraConfig(r=4), progress=False)  # other weights
    qlora_ext.load_quantized(other, tmp_path / "model.safetensors")
    ids = tokens(gen)
    with qlora_ext.disable_adapters(model), qlora_ext.disable_adapters(other):
        assert_bits_equal(logits(other, ids), logits(model, ids))
    with pytest.raises(ValueError, match="no pickle"):
        qlora_ext.load_quantized(other, tmp_path / "model.bin")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"].half()
    with pytest.raises(ValueError, match=r"model.norm.weight is torch.float16 \(64,\), the model has torch.float32"):
        qlora_ext.load_quantized(other, sd)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight.absmax"] = sd["model.layers.1.self_attn.q_proj.weight.absmax"][:-1]
    before = {k: v.clone() for k, v in other.state_dict().items()}
    randomized = qlora_ext.prepare_model(tiny_llama(19), LoraConfig(r=4), progress=False)
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj.base_layer.weight: absmax must have"):
        qlora_ext.load_quantized(randomized, sd)
    # a checkpoint that fails changes nothing (layer 0 came before the bad entry)
    fresh = qlora_ext.prepare_model(tiny_llama(19), LoraConfig(r=4), progress=False)
    for k, v in fresh.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, randomized.state_dict()[k]), k
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_bitsandbytes_checkpoint_both_ways(gen):
    bnb = pytest.importorskip("bitsandbytes")
    original = tiny_llama(11)
    # theirs: the model as transformers + bitsandbytes holds it, each linear of the layers a Linear4bit
    theirs = copy.deepcopy(original)
    for name, module in list(theirs.named_modules()):
        if type(module) is torch.nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4",
                                      compress_statistics=True)  # fmt: skip
            layer.load_state_dict(module.state_dict())
            parent, child = qlora_ext.model._parent(theirs, name)
            setattr(parent, child, layer.to("cpu"))  # bitsandbytes quantizes on .to()
    sd = theirs.state_dict()
    assert "model.layers.0.mlp.up_proj.weight.absmax" in sd
    ours = qlora_ext.prepare_model(
        tiny_llama(12), LoraConfig(r=4, target_modules=["q_proj"]), quantize_others=True, progress=False
    )
    qlora_ext.load_quantized(ours, sd)
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = ours.get_submodule(name)
            mine = lora_layers.base_of(mine) if lora_layers.is_lora_layer(mine) else mine
            expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert_bits_equal(mine.dequantize(), expected, name)
    # ours back into bitsandbytes: Params4bit.from_prequantized, as transformers loads a 4-bit checkpoint
    saved = qlora_ext.serialization._base_state_dict(ours)
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            stats = {k[len(name) + 8 :]: v for k, v in saved.items() if k.startswith(name + ".weight.")}
            module.weight = bnb.nn.Params4bit.from_prequantized(
                saved[name + ".weight"], stats, device="cpu", module=module
            )
            mine = ours.get_submodule(name)
            mine = lora_layers.base_of(mine) if lora_layers.is_lora_layer(mine) else mine
            assert_bits_equal(
                bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state), mine.dequantize(), name
            )


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument(tmp_path):
    model = qlora_ext.prepare_model(tiny_llama(13), LoraConfig(r=4, target_modules=["q_proj"]), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    assert_each_raises([
        (lambda: LoraConfig(r=0), ValueError, "r must be a positive integer"),
        (lambda: LoraConfig(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
        (lambda: LoraConfig(target_modules="(unclosed"), ValueError, "not a valid regex"),
        (lambda: LoraConfig(target_modules=[]), ValueError, "target_modules must be non-empty"),
        (lambda: qlora_ext.prepare_model(tiny_llama(14), LoraConfig(target_modules=["nothing"]), progress=False),
         ValueError, "matches no linear layer"),
        (lambda: qlora_ext.prepare_model(model, LoraConfig(), progress=False), ValueError, "prepared already"),
        (lambda: qlora_ext.load_adapter(model, tmp_path / "empty"), FileNotFoundError, "adapter_model.safetensors"),
        (lambda: qlora_ext.load_adapter(model, tmp_path / "pickled"), FileNotFoundError, "only safetensors is read"),
        (lambda: qlora_ext.save_adapter(model, tmp_path / "x", "nope"), ValueError, "no adapter 'nope'"),
    ])  # fmt: skip


def test_transformers_bitsandbytes_checkpoint_both_ways(gen, tmp_path):
    """A 4-bit checkpoint saved by transformers + bitsandbytes loads into ours, and ours, saved with
    save_quantized beside that checkpoint's config.json, loads back into transformers + bitsandbytes:
    the same dequantized weights, bit for bit. (bitsandbytes' CPU forward repacks the weights for its
    own kernel and computes with bfloat16 scales, so its logits are compared with its own.)"""
    bnb = pytest.importorskip("bitsandbytes")
    import shutil

    def dequantized(model):
        out = {}
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                out[name] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            elif isinstance(m, Linear4bit) and not name.endswith(".base_layer"):
                out[name] = m.dequantize()
            elif lora_layers.is_lora_layer(m):
                out[name] = lora_layers.base_of(m).dequantize()
        return out

    original = tiny_llama(15)
    original.save_pretrained(str(tmp_path / "fp32"))
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "fp32"), quantization_config=q, device_map="cpu"
    ).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    expected = dequantized(theirs)
    assert len(expected) == 14
    ours = qlora_ext.prepare_model(tiny_llama(16), LoraConfig(r=4, target_modules=["q_proj"]), quantize_others=True,
                                   compute_dtype=torch.float32, progress=False)  # fmt: skip
    qlora_ext.load_quantized(ours, tmp_path / "theirs")  # the directory save_pretrained wrote
    got = dequantized(ours)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert_bits_equal(got[name], expected[name], name)
    ids = tokens(gen)
    with qlora_ext.disable_adapters(ours):
        torch.testing.assert_close(
            logits(ours, ids), logits(dequantized_copy(original, ours), ids), rtol=1e-5, atol=1e-5
        )
    # ours back: our file in place of theirs, their config (with its quantization_config) beside it
    (tmp_path / "back").mkdir()
    for name in ("config.json", "generation_config.json"):
        if (tmp_path / "theirs" / name).exists():
            shutil.copy(tmp_path / "theirs" / name, tmp_path / "back" / name)
    qlora_ext.save_quantized(ours, tmp_path / "back")  # beside the config: back/model.safetensors
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back"), device_map="cpu").eval()
    assert type(back.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    for name, w in dequantized(back).items():
        assert_bits_equal(w, expected[name], name)
    assert_bits_equal(logits(back, ids), logits(theirs, ids))


def test_a_failed_save_keeps_the_previous_adapter(gen, tmp_path, monkeypatch):
    import safetensors.torch

    model = qlora_ext.prepare_model(tiny_llama(17), LoraConfig(r=4, target_modules=["q_proj"]), progress=False)
    qlora_ext.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, gen)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", crash)
        with pytest.raises(OSError, match="disk full"):
            qlora_ext.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # another adapter's pair over it, interrupted while its config is written: the old pair stays, whole,
    # not the new weights beside the old config (which would load, with the old alpha)
    config_before = (tmp_path / "adapter_config.json").read_bytes()
    other = qlora_ext.prepare_model(tiny_llama(17), LoraConfig(r=2, lora_alpha=64, target_modules=["q_proj"]),
                                    progress=False)  # fmt: skip

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(type(tmp_path), "write_text", interrupted)
        with pytest.raises(KeyboardInterrupt):
            qlora_ext.save_adapter(other, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert (tmp_path / "adapter_config.json").read_bytes() == config_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_prepared_layers_keep_the_models_mode():
    """A layer put in by prepare_model is in the mode of the one it replaces: an eval-mode model runs
    no adapter dropout."""
    model = qlora_ext.prepare_model(tiny_llama(18), LoraConfig(r=4, lora_dropout=0.5), progress=False)  # eval mode
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_tied_embeddings_round_trip(gen, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(24)
    model = qlora_ext.prepare_model(transformers.LlamaForCausalLM(cfg).eval(), LoraConfig(r=4), progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qlora_ext.save_quantized(model, tmp_path / "tied.safetensors")
    torch.manual_seed(25)
    other = qlora_ext.prepare_model(transformers.LlamaForCausalLM(cfg).eval(), LoraConfig(r=4), progress=False)
    qlora_ext.load_quantized(other, tmp_path / "tied.safetensors")
    assert other.lm_head.weight is other.model.embed_tokens.weight
    ids = tokens(gen)
    with qlora_ext.disable_adapters(model), qlora_ext.disable_adapters(other):
        assert_bits_equal(logits(other, ids), logits(model, ids))


def test_adapters_refuse_to_switch_while_merged(gen):
    model = qlora_ext.prepare_model(
        tiny_llama(26), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), progress=False
    )
    qlora_ext.add_adapter(model, "other", LoraConfig(r=2, target_modules=["v_proj"]))
    # a new adapter trains only once it is active
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    qlora_ext.merge_adapter(model)
    merged = [lora_layers.merged_of(layer) for _, layer in qlora_ext.model.qlora_layers(model)]
    assert_each_raises([
        (lambda: qlora_ext.set_adapter(model, "other"), ValueError, "unmerge_adapter first"),
        (lambda: qlora_ext.add_adapter(model, "third", LoraConfig(r=2, target_modules=["q_proj"])), ValueError,
         "unmerge_adapter first"),
        (lambda: qlora_ext.merge_adapter(model, "other"), ValueError, "unmerge_adapter first"),
        (lambda: qlora_ext.delete_adapter(model, "default"), ValueError, "is merged"),
    ])  # fmt: skip
    assert [lora_layers.merged_of(layer) for _, layer in qlora_ext.model.qlora_layers(model)] == merged
    qlora_ext.unmerge_adapter(model)
    qlora_ext.set_adapter(model, "other")


def test_weights_fill_a_model_that_is_not_on_meta(gen):
    """weights= given for a model built in full: every tensor the weights have is taken from them."""
    original = tiny_llama(27)
    config = LoraConfig(r=4, target_modules="all-linear")
    from_weights = qlora_ext.prepare_model(tiny_llama(28), config, compute_dtype=torch.float32,
                                           weights=original.state_dict(), progress=False)  # fmt: skip
    direct = qlora_ext.prepare_model(copy.deepcopy(original), config, compute_dtype=torch.float32, progress=False)
    assert torch.equal(from_weights.model.embed_tokens.weight, original.model.embed_tokens.weight)
    with qlora_ext.disable_adapters(from_weights), qlora_ext.disable_adapters(direct):
        ids = tokens(gen)
        assert_bits_equal(logits(from_weights, ids), logits(direct, ids))


def test_save_and_load_quantized_in_a_directory(gen, tmp_path, monkeypatch):
    """save_quantized(model, dir) writes dir/model.safetensors, load_quantized(model, dir) reads it (or
    transformers' shards); nothing but an earlier 4-bit checkpoint is ever replaced, and a failed write
    keeps it whole."""
    import safetensors.torch

    model = qlora_ext.prepare_model(tiny_llama(30), LoraConfig(r=4), progress=False)
    other = qlora_ext.prepare_model(tiny_llama(31), LoraConfig(r=4), progress=False)
    ids = tokens(gen)
    with qlora_ext.disable_adapters(model), qlora_ext.disable_adapters(other):
        expected, other_logits = logits(model, ids), logits(other, ids)
    out = tmp_path / "new" / "quantized"  # made, parents too
    assert qlora_ext.save_quantized(model, out) == out / "model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    fresh = qlora_ext.prepare_model(tiny_llama(32), LoraConfig(r=4), progress=False)
    qlora_ext.load_quantized(fresh, out)
    with qlora_ext.disable_adapters(fresh):
        assert_bits_equal(logits(fresh, ids), expected)
    # an earlier 4-bit checkpoint is replaced, through a temporary file: a crash keeps it whole
    qlora_ext.save_quantized(other, out)
    before = (out / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", crash)
        with pytest.raises(OSError, match="disk full"):
            qlora_ext.save_quantized(model, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    qlora_ext.load_quantized(fresh, out)
    with qlora_ext.disable_adapters(fresh):
        assert_bits_equal(logits(fresh, ids), other_logits)
    # transformers' shards: the same checkpoint cut in two, with its index
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    keys = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: tensors[k] for k in keys[::2]}, str(sharded / names[0]))
    save_file({k: tensors[k] for k in keys[1::2]}, str(sharded / names[1]))
    weight_map = {k: names[i % 2] for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    qlora_ext.save_quantized(model, out)
    qlora_ext.load_quantized(fresh, out)  # `model`'s weights again, then `other`'s from the shards
    with qlora_ext.disable_adapters(fresh):
        assert_bits_equal(logits(fresh, ids), expected)
    qlora_ext.load_quantized(fresh, sharded)
    with qlora_ext.disable_adapters(fresh):
        assert_bits_equal(logits(fresh, ids), other_logits)
    # never replaced: a 16-bit model's weights, a file that is not a directory, a directory of shards
    sixteen = tmp_path / "sixteen"
    tiny_llama(33).save_pretrained(str(sixteen))
    (tmp_path / "notes").write_text("mine")
    pretrained = tmp_path / "pretrained"  # the prepared model's own save_pretrained: its adapters too
    model.save_pretrained(str(pretrained))
    files = {p: p.read_bytes() for p in (*sixteen.iterdir(), tmp_path / "notes", *sharded.iterdir(),
                                         *pretrained.iterdir())}  # fmt: skip
    assert_each_raises([
        (lambda: qlora_ext.save_quantized(model, pretrained), ValueError,
         r"model.safetensors holds \d+ tensors this save would drop .*adapters of a prepared model"),
        (lambda: qlora_ext.save_quantized(model, sixteen), ValueError,
         r"sixteen/model.safetensors exists and is not a 4-bit checkpoint .*not overwritten"),
        (lambda: qlora_ext.save_quantized(model, sixteen / "model.safetensors"), ValueError,
         "is not a 4-bit checkpoint"),
        (lambda: qlora_ext.save_quantized(model, tmp_path / "notes"), ValueError,
         "exists and is neither a directory nor a .safetensors file: not overwritten"),
        (lambda: qlora_ext.save_quantized(model, sharded), ValueError,
         r"holds other weights \(model-00001-of-00002.safetensors, .*save to another directory"),
        (lambda: qlora_ext.save_quantized(model, tmp_path / "model.bin"), ValueError, "only safetensors is written"),
        (lambda: qlora_ext.load_quantized(fresh, tmp_path / "notes"), ValueError, "no pickle"),
    ])  # fmt: skip
    assert {p: p.read_bytes() for p in files} == files
    assert not (tmp_path / "model.bin").exists()


def test_every_public_name_keeps_its_places():
    """model.py's pieces live in lora_config.py, adapters.py, serialization.py and merging.py; each public
    name is one object under qlora_ext.model, its module, and qlora_ext where it was exported before."""
    from qlora_ext import adapters, lora_config, merging, serialization

    homes = (lora_config, adapters, serialization, merging, qlora_ext.model)
    names = set(qlora_ext.model.__all__)
    assert names >= {"LoraConfig", "add_adapter", "delete_adapter", "disable_adapters", "load_adapter",
                     "load_quantized", "merge_adapter", "prepare_model", "qlora_layers", "save_adapter",
                     "save_quantized", "set_adapter", "unmerge_adapter", "ADAPTER_CONFIG_NAME",
                     "ADAPTER_WEIGHTS_NAME"}  # fmt: skip
    for name in names:
        obj = getattr(qlora_ext.model, name)
        defined = [m for m in homes if name in getattr(m, "__all__", ()) and m is not qlora_ext.model]
        assert name == "prepare_model" or len(defined) == 1, name
        assert all(getattr(m, name) is obj for m in defined), name
        if name in qlora_ext.__all__:
            assert getattr(qlora_ext, name) is obj, name
    model_only = {"qlora_layers", "as_lora_config"} | {n for n in names if n.isupper()}
    assert names - set(qlora_ext.__all__) == model_only  # qlora_ext.model's only, as before
    from qlora_ext.model import ADAPTER_WEIGHTS_NAME  # as the CLI imports it

    assert ADAPTER_WEIGHTS_NAME == "adapter_model.safetensors"
