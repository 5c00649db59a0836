"""The one interface to a prepared model's LoRA layers (``qlora_ext._lora_layers``) on both classes it
serves: qlora_ext's ``QLoRALinear`` and PEFT's LoRA layer on a ``Linear4bit`` (``LoraLinear4bit``). Each
test does the same thing to one layer of each class holding the same weights, and asserts the same bits
and the same behaviour: the initial adapter a seed draws, outputs and gradients with dropout, the 16-bit
merge and its exact unmerge, deleting the active adapter, disabling without touching requires_grad."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

from qlora_ext import LoraConfig, _lora_layers as layers
from qlora_ext.nn import Linear4bit, QLoRALinear

from helpers import DEVICES, assert_bits_equal

peft = pytest.importorskip("peft")
from qlora_ext.peft_lora import LoraLinear4bit  # noqa: E402  (needs PEFT)

IN, OUT = 128, 96
FIRST = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1)


def both_layers(device: str, seed: int) -> tuple[QLoRALinear, LoraLinear4bit]:
    """A QLoRALinear and a LoraLinear4bit on copies of one 4-bit base, with the same adapter "first"
    (random A and B, so that the adapter term is not zero)."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=gen) / IN**0.5)
        linear.bias.copy_(torch.randn(OUT, generator=gen))
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    base = Linear4bit.from_linear(linear, "nf4", 64, True, compute, device=device)
    ours = QLoRALinear(copy.deepcopy(base), FIRST.r, FIRST.lora_alpha, FIRST.lora_dropout, adapter_name="first")
    config = peft.LoraConfig(r=FIRST.r, lora_alpha=FIRST.lora_alpha, lora_dropout=FIRST.lora_dropout)
    theirs = LoraLinear4bit(copy.deepcopy(base), "first", config=config, r=FIRST.r, lora_alpha=FIRST.lora_alpha)
    # PEFT puts a new adapter in the base's compute dtype (bfloat16 on CUDA), QLoRALinear in float32:
    # prepare_model gives both its adapter_dtype (test_prepare_model_gives_the_same_model_with_either_class)
    theirs.lora_A.float(), theirs.lora_B.float()
    with torch.no_grad():
        for pair in zip(layers.weights_of(ours, "first"), layers.weights_of(theirs, "first")):
            values = torch.randn(pair[0].shape, generator=gen) * 0.2
            for p in pair:
                p.copy_(values)
    return ours, theirs


def grads_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


def trainable(layer: nn.Module) -> list[str]:
    return sorted(n for n, p in layer.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "init,dtype", [("kaiming", torch.float32), ("gaussian", torch.bfloat16), (False, torch.float32)], ids=str
)
def test_add_draws_the_same_adapter(device, init, dtype):
    ours, theirs = both_layers(device, seed=1)
    config = LoraConfig(r=16, lora_alpha=8, lora_dropout=0.2, init=init, adapter_dtype=dtype, use_rslora=True)
    for layer in (ours, theirs):
        layer.eval()  # the new adapter's modules (its dropout too) must follow the layer's mode
        torch.manual_seed(7)
        layers.add(layer, "second", config)
    for a, b, what in zip(layers.weights_of(ours, "second"), layers.weights_of(theirs, "second"), "AB"):
        assert a.device.type == device and a.dtype == dtype
        assert_bits_equal(b, a, f"{what} of the added adapter")
    if init:
        assert not layers.weights_of(ours, "second")[1].any(), "B starts at zero"
    for layer in (ours, theirs):
        assert layers.active_of(layer) == "first", "adding an adapter keeps the active one"
        assert layers.adapters_of(layer) == ["first", "second"]
        assert layers.scaling_of(layer, "second") == 8 / 16**0.5
    assert trainable(ours) == ["lora_A.first.weight", "lora_B.first.weight"]
    assert trainable(theirs) == trainable(ours)
    with pytest.raises(ValueError, match="exists already"):
        layers.add(theirs, "second", config)
    x = torch.randn(3, IN, device=device, generator=torch.Generator(device).manual_seed(20))
    outs = []
    for layer in (ours, theirs):
        layers.set_active(layer, "second")
        with torch.no_grad():
            layers.weights_of(layer, "second")[1].fill_(0.25)
        outs.append(layer(x))
    assert_bits_equal(outs[1], outs[0], "eval output with the added adapter (no dropout in eval)")


@pytest.mark.parametrize("device", DEVICES)
def test_same_outputs_and_gradients_with_dropout(device):
    ours, theirs = both_layers(device, seed=2)
    x = torch.randn(3, 5, IN, device=device, generator=torch.Generator(device).manual_seed(3))
    outs = []
    for layer in (ours, theirs):
        layer.train()
        layers.set_active(layer, "first")
        torch.manual_seed(11)  # the dropout mask's seed
        out = layer(x)
        out.square().sum().backward()
        outs.append(out)
    assert_bits_equal(outs[1], outs[0], "output")
    g_ours, g_theirs = grads_of(ours), grads_of(theirs)
    assert sorted(g_theirs) == sorted(g_ours) == ["lora_A.first.weight", "lora_B.first.weight"]
    for name in g_ours:
        assert_bits_equal(g_theirs[name], g_ours[name], name)


@pytest.mark.parametrize("device", DEVICES)
def test_merge16_runs_the_merged_weight_and_unmerges_exactly(device):
    ours, theirs = both_layers(device, seed=4)
    x = torch.randn(4, IN, device=device, generator=torch.Generator(device).manual_seed(5))
    merged = []
    for layer in (ours, theirs):
        layer.eval()
        before = layer(x)
        codes = layers.base_of(layer).weight.clone()
        layers.merge16(layer, "first")
        assert layers.merged_of(layer) == "first"
        weight = layers.merged_weight_of(layer, "first")
        base = layers.base_of(layer)
        bias = None if base.bias is None else base.bias.to(base.compute_dtype)  # float32 beside bfloat16 products
        expected = nn.functional.linear(x.to(base.compute_dtype), weight.to(base.compute_dtype), bias)
        out = layer(x)
        assert_bits_equal(out, expected.to(out.dtype), "merged output")
        merged.append(out)
        layers.unmerge16(layer)
        assert layers.merged_of(layer) is None
        assert_bits_equal(layer(x), before, "output after unmerge16")
        assert_bits_equal(layers.base_of(layer).weight, codes, "4-bit codes")
    assert_bits_equal(merged[1], merged[0], "merged output, one class against the other")
    layers.merge16(theirs, "first")
    with pytest.raises(ValueError, match="merge16"):
        theirs.set_adapter("first")
    with pytest.raises(ValueError, match="merge16"):
        theirs.merge()
    with pytest.raises(ValueError, match="merge16"):
        theirs(x, adapter_names=["first"] * len(x))
    with pytest.raises(ValueError, match="no adapter is merged"):
        layers.unmerge16(ours)


@pytest.mark.parametrize("device", DEVICES)
def test_delete_the_active_adapter_leaves_the_base_alone(device):
    ours, theirs = both_layers(device, seed=6)
    x = torch.randn(4, IN, device=device, generator=torch.Generator(device).manual_seed(7))
    for layer in (ours, theirs):
        layer.eval()
        torch.manual_seed(8)
        layers.add(layer, "second", FIRST)
        layers.set_active(layer, "second")
        layers.delete(layer, "second")
        assert layers.active_of(layer) is None, "PEFT alone would activate 'first'"
        assert layers.adapters_of(layer) == ["first"]
        assert trainable(layer) == []
        assert_bits_equal(layer(x), layers.base_of(layer)(x), "output with no active adapter")
        layers.set_active(layer, "first")
        assert trainable(layer) == ["lora_A.first.weight", "lora_B.first.weight"]
    layers.add(theirs, "second", FIRST)
    theirs.set_adapter(["first", "second"])
    with pytest.raises(ValueError, match="2 adapters are active"):
        layers.active_of(theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_disabled_runs_the_base_and_keeps_requires_grad(device):
    ours, theirs = both_layers(device, seed=9)
    x = torch.randn(4, IN, device=device, generator=torch.Generator(device).manual_seed(10))
    for layer in (ours, theirs):
        layer.eval()
        layers.set_active(layer, "first")
        with_adapter = layer(x)
        with layers.disabled([layer]):
            assert_bits_equal(layer(x), layers.base_of(layer)(x), "disabled output")
            assert trainable(layer) == ["lora_A.first.weight", "lora_B.first.weight"]
        assert_bits_equal(layer(x), with_adapter, "output after the block")
        assert trainable(layer) == ["lora_A.first.weight", "lora_B.first.weight"]


# ---------------------------------------------------------------------------------------------
# prepare_model with either class (QLORA_EXT_LAYERS)


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_model_gives_the_same_model_with_either_class(device, tmp_path, monkeypatch):
    """The same seed gives the same model, step and files whichever class prepare_model builds: state-dict
    keys and bits, trainable parameters in the same order (the CLI's optimizer state is indexed by it),
    logits and adapter gradients with dropout, and byte-identical save_adapter, save_quantized and
    save_pretrained files."""
    pytest.importorskip("transformers")
    import qlora_ext

    from helpers import tiny_llama

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                        modules_to_save=["lm_head"])  # fmt: skip
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(12)).to(device)
    runs = {}
    for kind in ("qlora", "peft"):
        monkeypatch.setenv("QLORA_EXT_LAYERS", kind)
        torch.manual_seed(13)
        model = qlora_ext.prepare_model(tiny_llama(14, device), config, quantize_others=True,
                                        compute_dtype=torch.float32, progress=False)  # fmt: skip
        qlora_ext.add_adapter(model, "other", LoraConfig(r=2, target_modules=["v_proj"]))
        kinds = {type(m).__name__ for _, m in qlora_ext.model.qlora_layers(model)}
        assert kinds == {"QLoRALinear" if kind == "qlora" else "LoraLinear4bit"}
        model.train()
        torch.manual_seed(15)  # dropout's masks
        loss = model(ids, labels=ids).loss
        loss.backward()
        out = tmp_path / kind
        qlora_ext.save_adapter(model, out / "adapter")
        qlora_ext.save_quantized(model, out / "quantized")
        model.save_pretrained(str(out / "pretrained"))
        runs[kind] = {
            "state": model.state_dict(),
            "trainable": [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad],
            "loss": loss.detach(),
            "files": {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()},
        }
    ours, theirs = runs["qlora"], runs["peft"]
    assert list(theirs["state"]) == list(ours["state"])
    for key, value in ours["state"].items():
        assert_bits_equal(theirs["state"][key], value, key)
    assert [n for n, _ in theirs["trainable"]] == [n for n, _ in ours["trainable"]]
    assert_bits_equal(theirs["loss"], ours["loss"], "loss")
    for (name, g_theirs), (_, g_ours) in zip(theirs["trainable"], ours["trainable"]):
        assert g_ours is not None, name
        assert_bits_equal(g_theirs, g_ours, f"gradient of {name}")
    assert sorted(theirs["files"]) == sorted(ours["files"])
    for path, data in ours["files"].items():
        assert theirs["files"][path] == data, f"{path} differs between the two classes"


@pytest.mark.parametrize("device", DEVICES)
def test_both_classes_under_torch_compile_fullgraph(device):
    """Each class traces whole (fullgraph=True: PEFT's Python around the fused op breaks no graph) and the
    compiled layer gives the eager one's bits, output and gradients, with dropout."""
    x = torch.randn(33, IN, device=device, generator=torch.Generator(device).manual_seed(16))
    g = torch.randn(33, OUT, device=device, generator=torch.Generator(device).manual_seed(17))
    for layer in both_layers(device, seed=18):
        layers.set_active(layer, "first")
        compiled = torch.compile(
            layer, fullgraph=True, dynamic=False, backend="aot_eager" if device == "cpu" else "inductor"
        )
        layer.eval()
        assert_bits_equal(compiled(x), layer(x), f"{type(layer).__name__} compiled, eval")
        layer.train()
        results = []
        for fn in (layer, compiled):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            torch.manual_seed(19)
            with torch._inductor.config.patch(fallback_random=True):
                y = fn(xi)
            y.backward(g)
            results.append((y.detach(), xi.grad, layers.weights_of(layer, "first")[0].grad.clone()))
        for a, b, what in zip(*results, ("output", "x's gradient", "A's gradient")):
            assert_bits_equal(b, a, f"{type(layer).__name__} compiled, train: {what}")


def _prepared_sequential() -> nn.Module:
    from qlora_ext import prepare_model

    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, IN))
    return prepare_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), progress=False)


@pytest.mark.parametrize("peft_fails", ["missing", "breaks on import"])
def test_prepare_model_builds_peft_layers_by_default_and_qlora_layers_without_peft(monkeypatch, peft_fails):
    """The default class: PEFT's layer where PEFT can take it; where it cannot (PEFT not importable, or
    qlora_ext's layer on it failing to import), qlora_ext's own, with one FutureWarning that names the
    user's line and the PEFT that works."""
    import qlora_ext

    monkeypatch.delenv("QLORA_EXT_LAYERS", raising=False)
    monkeypatch.setattr(layers, "_PEFT_LAYER", None)
    monkeypatch.setattr(layers, "_FALLBACK_WARNED", False)
    assert layers.layer_kind() == "peft"
    assert {type(m) for _, m in layers.prepared_layers(_prepared_sequential())} == {LoraLinear4bit}

    monkeypatch.setattr(layers, "_PEFT_LAYER", None)
    hidden = ["qlora_ext.peft_lora"]
    if peft_fails == "missing":
        hidden += [n for n in sys.modules if n == "peft" or n.startswith("peft.")]
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    monkeypatch.delattr(qlora_ext, "peft_lora")
    with pytest.warns(
        FutureWarning, match=r"QLoRALinear.*(Import|ModuleNotFound)Error.*peft>=0\.21\.2, in the train extra"
    ) as caught:
        model = _prepared_sequential()
    assert [w.filename for w in caught if w.category is FutureWarning] == [__file__]
    assert {type(m) for _, m in layers.prepared_layers(model)} == {QLoRALinear}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a process
        assert {type(m) for _, m in layers.prepared_layers(_prepared_sequential())} == {QLoRALinear}
        assert not layers.is_lora_layer(nn.Linear(2, 2))  # walking a model does not retry the import
    with pytest.raises(ValueError, match="QLORA_EXT_LAYERS must be 'qlora' or 'peft', got 'both'"):
        monkeypatch.setenv("QLORA_EXT_LAYERS", "both")
        layers.layer_kind()


@pytest.mark.parametrize("kind", ["qlora", "peft"])
def test_functions_find_the_layers_of_a_prepared_model_inside_a_wrapper(monkeypatch, kind):
    """A prepared model inside another module (sentence-transformers' ``model[0].auto_model``): the public
    functions given the wrapper reach its layers with either class."""
    from qlora_ext import disable_adapters
    from qlora_ext.model import qlora_layers

    monkeypatch.setenv("QLORA_EXT_LAYERS", kind)
    wrapper = nn.ModuleDict({"inner": _prepared_sequential(), "other": nn.Linear(IN, IN)})
    found = [n for n, _ in qlora_layers(wrapper)]
    assert found == ["inner.0", "inner.2"]
    with torch.no_grad():
        for _, layer in qlora_layers(wrapper):
            layers.weights_of(layer, "default")[1].normal_()  # B != 0: the adapter changes the output
    x = torch.randn(3, IN)
    with torch.no_grad():
        on = wrapper["inner"](x)
        with disable_adapters(wrapper):
            off = wrapper["inner"](x)
    assert not torch.equal(on, off)
