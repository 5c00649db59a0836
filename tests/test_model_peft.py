"""prepare_model and PEFT: a peft.LoraConfig converted (the same model as with ours, the same logits as
PEFT's own layers on the same quantized weights), its fields that qlora_ext cannot honour refused by
name, PEFT models refused (their lora_A / lora_B never quantized), adapter_names= refused."""

from __future__ import annotations

import copy

import pytest
import torch

import qlora_ext
from qlora_ext import LoraConfig, _lora_layers as lora_layers
from qlora_ext.nn import Linear4bit

from helpers import assert_bits_equal, assert_each_raises, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
# every test with each class of LoRA layer (conftest.layer_kind)
pytestmark = pytest.mark.usefixtures("layer_kind")


def tokens(gen, batch=2, length=11):
    return torch.randint(0, 96, (batch, length), generator=gen)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


def prepare(original, config, seed):
    torch.manual_seed(seed)  # the adapters' initial A
    return qlora_ext.prepare_model(copy.deepcopy(original), config, compute_dtype=torch.float32, progress=False)


def randomize_adapters(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if ".lora_A." in name else 0.5))


def peft_on_dequantized(original, ours, peft_config):
    """PEFT's own LoRA layers on `original` with each of `ours`' 4-bit weights dequantized into it, and
    `ours`' adapter tensors (PEFT's names less base_layer)."""
    plain = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in qlora_ext.model.qlora_layers(ours):
            plain.get_submodule(name).weight.copy_(layer.base_layer.dequantize().float())
    theirs = peft.get_peft_model(plain, copy.deepcopy(peft_config)).eval()
    mine = {n.replace(".base_layer", ""): p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                key = name.removeprefix("base_model.model.").replace(".default.", ".").replace(".modules_to_save", "")
                p.copy_(mine[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")])
    return theirs


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_a_peft_config_gives_the_model_ours_gives_and_peft_computes(gen, use_rslora):
    original = tiny_llama(40)
    fields = dict(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "down_proj"], use_rslora=use_rslora,
                  modules_to_save=["lm_head"])  # fmt: skip
    theirs_config = peft.LoraConfig(**fields, task_type="CAUSAL_LM")
    ours_config = LoraConfig(**fields)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    from_peft = prepare(original, theirs_config, seed)
    from_ours = prepare(original, ours_config, seed)
    assert from_peft.qlora_config["default"] == ours_config
    layer = from_peft.model.layers[1].mlp.down_proj
    assert lora_layers.is_lora_layer(layer) and lora_layers.scaling_of(layer, "default") == 12 / (
        2 if use_rslora else 4
    )
    assert sorted(n for n, p in from_peft.named_parameters() if p.requires_grad) == sorted(
        n for n, p in from_ours.named_parameters() if p.requires_grad
    )
    ids = tokens(gen)
    assert_bits_equal(logits(from_peft, ids), logits(from_ours, ids))
    # with B and the head trained away from their start: PEFT's own layers on the same 4-bit weights
    randomize_adapters(from_peft, gen)
    with torch.no_grad():
        from_peft.lm_head.weight.add_(torch.randn(from_peft.lm_head.weight.shape, generator=gen) * 0.01)
    theirs = peft_on_dequantized(original, from_peft, theirs_config)
    torch.testing.assert_close(logits(from_peft, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)


def test_peft_config_defaults_and_task_heads():
    llama = tiny_llama(41)
    model = qlora_ext.prepare_model(llama, peft.LoraConfig(r=2), progress=False)  # target_modules=None
    names = sorted(n.rsplit(".", 1)[1] for n, _ in qlora_ext.model.qlora_layers(model))
    assert names == ["q_proj"] * 2 + ["v_proj"] * 2
    theirs = peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights="gaussian", target_modules={"v_proj", "q_proj"},
                             task_type="SEQ_CLS")  # fmt: skip
    config = LoraConfig.from_peft_config(theirs)
    assert config == LoraConfig(r=3, lora_alpha=5, init="gaussian", target_modules=["q_proj", "v_proj"],
                                modules_to_save=["classifier", "score"])  # fmt: skip
    assert LoraConfig.from_peft_config(peft.LoraConfig(target_modules="ALL-LINEAR")).target_modules == "all-linear"
    assert LoraConfig.from_peft_config(peft.LoraConfig(target_modules=r".*\.q_proj")).target_modules == r".*\.q_proj"
    qa = peft.LoraConfig(target_modules=["q"], modules_to_save=["x"], task_type="QUESTION_ANS")
    qa = LoraConfig.from_peft_config(qa)
    assert qa.modules_to_save == ["x", "qa_outputs"]
    # add_adapter takes one too
    qlora_ext.add_adapter(model, "other", peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    assert model.model.layers[0].self_attn.v_proj.r == {"default": 2, "other": 2}


def test_peft_config_fields_that_cannot_be_honoured_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))

    def prep(**kwargs):
        kwargs.setdefault("target_modules", ["0"])
        return lambda: qlora_ext.prepare_model(copy.deepcopy(model), peft.LoraConfig(**kwargs), progress=False)

    assert_each_raises([
        (prep(use_dora=True), ValueError, r"use_dora=True\): DoRA .* peft.get_peft_model"),
        (prep(bias="all"), ValueError, r"bias='all'\): only 'none'"),
        (prep(bias="lora_only"), ValueError, r"bias='lora_only'"),
        (prep(init_lora_weights="pissa"), ValueError, r"init_lora_weights='pissa'"),
        (prep(inference_mode=True), ValueError, r"inference_mode=True\).*load_adapter"),
        (prep(rank_pattern={"0": 2}), ValueError, r"rank_pattern=\{'0': 2\}\): qlora_ext's layers do not support"),
        (prep(alpha_pattern={"0": 2}), ValueError, r"alpha_pattern="),
        (prep(layers_to_transform=[0]), ValueError, r"layers_to_transform=\[0\]"),
        (prep(exclude_modules=["x"]), ValueError, r"exclude_modules=\{'x'\}"),
        (prep(lora_bias=True), ValueError, r"lora_bias=True"),
        (prep(target_parameters=["0.weight"]), ValueError, r"target_parameters="),
        (prep(layer_replication=[(0, 1)]), ValueError, r"layer_replication="),
        (prep(target_modules=None), ValueError, r"target_modules=None\): PEFT has no default target modules"),
        (lambda: qlora_ext.prepare_model(model, {"r": 4}), TypeError, "a qlora_ext.LoraConfig or a peft.LoraConfig"),
    ])  # fmt: skip
    # fan_in_fan_out describes the base weight's layout, which each layer's type decides here
    qlora_ext.prepare_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["0"], fan_in_fan_out=True),
                            progress=False)  # fmt: skip


def test_a_peft_model_is_refused_and_left_as_it_is(gen):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(42), config).eval()
    ids = tokens(gen)
    before = logits(peft_model, ids)
    kinds = {n: type(m) for n, m in peft_model.named_modules()}
    for target in (peft_model, peft_model.base_model.model, peft_model.base_model.model.model.layers[0]):
        with pytest.raises(ValueError, match=r"PEFT model already \(.*\).*QLoraExtConfig.*unload\(\)"):
            qlora_ext.prepare_model(target, LoraConfig(r=4), progress=False)
    assert {n: type(m) for n, m in peft_model.named_modules()} == kinds
    assert not any(isinstance(m, Linear4bit) for m in peft_model.modules())
    assert_bits_equal(logits(peft_model, ids), before)
    # what the error suggests: the model without PEFT's layers (here with the adapter merged in)
    merged = peft_model.merge_and_unload()
    model = qlora_ext.prepare_model(merged, LoraConfig(r=4, target_modules="all-linear"), compute_dtype=torch.float32,
                                    progress=False)  # fmt: skip
    assert sum(1 for _ in qlora_ext.model.qlora_layers(model)) == 14
    assert not any(".lora_A.default.lora_" in n for n, _ in model.named_parameters())


def test_adapter_names_is_refused_not_ignored(gen, tmp_path):
    model = qlora_ext.prepare_model(tiny_llama(43), LoraConfig(r=4, target_modules=["q_proj"]), progress=False)
    ids = tokens(gen)
    before = logits(model, ids)
    assert_each_raises([
        (lambda: model(ids, adapter_names=["default", "default"]), ValueError,
         r"adapter_names \(PEFT's mixed-adapter batches\) is not supported"),
        (lambda: model.generate(ids, max_new_tokens=2, adapter_names=["default", "default"]), ValueError,
         "adapter_names"),
    ])  # fmt: skip
    assert_bits_equal(logits(model, ids, adapter_names=None), before)
    assert sum(h is qlora_ext.adapters._refuse_adapter_names for h in model._forward_pre_hooks.values()) == 1
    # a model whose adapters come from load_adapter (no prepare_model) refuses it as well, once
    qlora_ext.save_adapter(model, tmp_path)
    bare = copy.deepcopy(model)
    bare._forward_pre_hooks.clear()
    qlora_ext.load_adapter(bare, tmp_path, "second")
    qlora_ext.load_adapter(bare, tmp_path, "third")
    assert sum(h is qlora_ext.adapters._refuse_adapter_names for h in bare._forward_pre_hooks.values()) == 1
    with pytest.raises(ValueError, match="adapter_names"):
        bare(ids, adapter_names=["second", "third"])
