"""prepare_model beyond nn.Linear: transformers' Conv1D (GPT-2, weight [in, out]) quantized as its
transpose, the same bits as from_pretrained with QLoraExtConfig and adapters PEFT reads both ways;
nn.Linear subclasses; nn.MultiheadAttention's out_proj; models already in 4 bits (qlora_ext's
Linear4bit kept, bitsandbytes' refused with the way to speed them up)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import LoraConfig, _lora_layers as lora_layers, functional as F
from qlora_ext.nn import Linear4bit

from helpers import assert_bits_equal, assert_close_to_reference, assert_each_raises, make_input, tiny_llama

transformers = pytest.importorskip("transformers")
# every test with each class of LoRA layer (conftest.layer_kind)
pytestmark = pytest.mark.usefixtures("layer_kind")
from transformers.pytorch_utils import Conv1D  # noqa: E402  (needs transformers)

# GPT-2's four Conv1D a block: c_attn, attn.c_proj, c_fc, mlp.c_proj
GPT2_LINEARS = 8


def tiny_gpt2(seed: int):
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 starts its biases at zero: give them values, so that a lost bias shows
        for m in model.modules():
            if isinstance(m, Conv1D):
                m.bias.normal_(0, 0.1)
    return model


def tokens(gen, batch=2, length=11):
    return torch.randint(0, 96, (batch, length), generator=gen)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def conv1d_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}


def dequantized_gpt2(original, prepared):
    """`original` with each Conv1D's weight replaced by the prepared layer's dequantized weight, transposed
    back to [in, out]: the base that PEFT's own layers see."""
    plain = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in qlora_ext.model.qlora_layers(prepared):
            plain.get_submodule(name).weight.copy_(layer.base_layer.dequantize().float().T)
    return plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv1d_is_quantized_as_its_transpose(gen, dtype):
    original = tiny_gpt2(50)
    model = qlora_ext.prepare_model(copy.deepcopy(original), LoraConfig(r=4, target_modules="all-linear"),
                                    compute_dtype=dtype, progress=False)  # fmt: skip
    layers = dict(qlora_ext.model.qlora_layers(model))
    assert sorted(layers) == sorted(conv1d_layers(original)) and len(layers) == GPT2_LINEARS
    assert type(model.lm_head) is nn.Linear  # the output head (tied to the embedding) stays
    for name, conv in conv1d_layers(original).items():
        layer = layers[name]
        w = conv.weight.detach()  # [in, out]
        assert (layer.in_features, layer.out_features) == tuple(w.shape)
        packed, state = F.quantize_4bit(w.T.contiguous(), 64, "nf4", True)
        assert torch.equal(layer.base_layer.weight, packed), name
        assert_bits_equal(layer.base_layer.dequantize(), F.dequantize_4bit(packed, state), name)
        # the product: x @ deq(q(W^T))^T + b in float64, within the dtype's bound (B is zero at the start)
        x = make_input((5, w.shape[0]), dtype, "cpu", gen)
        with torch.no_grad():
            out = layer(x)
        assert out.dtype == dtype
        assert_close_to_reference(out, x, F.dequantize_4bit(packed, state), conv.bias.detach().to(dtype), name)
        # and the quantization is of W^T, not of W read as [out, in]: the error is NF4's, about 0.1
        rel = (layer.base_layer.dequantize() - w.T).norm() / w.norm()
        assert 0.01 < rel < 0.2, (name, rel)


def test_gpt2_whole_model_matches_peft_and_from_pretrained(gen, tmp_path):
    peft = pytest.importorskip("peft")
    from qlora_ext.hf import QLoraExtConfig

    original = tiny_gpt2(51)
    model = qlora_ext.prepare_model(copy.deepcopy(original), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    ids = tokens(gen)
    plain = dequantized_gpt2(original, model)
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=1e-4, atol=1e-4)
    # adapters with values: PEFT's own LoRA on the dequantized GPT-2 (Conv1D, fan_in_fan_out) reads ours
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if ".lora_A." in name else 0.5))
    qlora_ext.save_adapter(model, tmp_path / "ours")
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT sets it for Conv1D, as it says
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "ours")).eval()
    expected = logits(model, ids)
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-4, atol=1e-4)
    # and ours reads PEFT's (its adapter_config.json says fan_in_fan_out=True)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh = qlora_ext.prepare_model(copy.deepcopy(original), LoraConfig(r=4, target_modules="all-linear"),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    qlora_ext.load_adapter(fresh, tmp_path / "theirs", "peft")
    assert_bits_equal(logits(fresh, ids), expected)
    # from_pretrained with QLoraExtConfig quantizes GPT-2's Conv1D to the same bits; prepare_model then keeps
    # those Linear4bit layers as they are and adds adapters
    original.save_pretrained(str(tmp_path / "fp32"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "fp32"), quantization_config=QLoraExtConfig(compute_dtype=torch.float32), device_map="cpu"
    ).eval()
    bases = {n: m for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(bases) == sorted(dict(qlora_ext.model.qlora_layers(model)))
    for name, layer in qlora_ext.model.qlora_layers(model):
        assert torch.equal(bases[name].weight, layer.base_layer.weight), name
    qlora_ext.prepare_model(loaded, LoraConfig(r=4, target_modules="all-linear"), progress=False)
    for name, layer in qlora_ext.model.qlora_layers(loaded):
        assert layer.base_layer is bases[name], name  # kept: not quantized again
    qlora_ext.load_adapter(loaded, tmp_path / "ours", "trained")
    assert_bits_equal(logits(loaded, ids), expected)


def test_gpt2_streamed_from_weights_on_meta(gen):
    accelerate = pytest.importorskip("accelerate")
    original = tiny_gpt2(52)
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"])
    eager = qlora_ext.prepare_model(copy.deepcopy(original), config, compute_dtype=torch.float32, progress=False)
    with accelerate.init_empty_weights():
        empty = transformers.GPT2LMHeadModel(original.config).eval()
    streamed = qlora_ext.prepare_model(empty, config, compute_dtype=torch.float32, weights=original.state_dict(),
                                       device="cpu", progress=False)  # fmt: skip
    assert not any(t.is_meta for t in streamed.parameters())
    assert type(streamed.transformer.h[0].mlp.c_proj) is Conv1D  # not a target: loaded as it is
    for (n1, l1), (n2, l2) in zip(qlora_ext.model.qlora_layers(eager), qlora_ext.model.qlora_layers(streamed)):
        assert n1 == n2 and torch.equal(l1.base_layer.weight, l2.base_layer.weight), n1
        assert torch.equal(l1.base_layer.bias, l2.base_layer.bias), n1
    with qlora_ext.disable_adapters(eager), qlora_ext.disable_adapters(streamed):
        ids = tokens(gen)
        assert_bits_equal(logits(streamed, ids), logits(eager, ids))


class PlainSubclass(nn.Linear):
    """An nn.Linear subclass that changes nothing in the product (as MHA's NonDynamicallyQuantizableLinear)."""


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class Net(nn.Module):
    def __init__(self, first=PlainSubclass, second=nn.Linear):
        super().__init__()
        self.first = first(64, 128)
        self.second = second(128, 64)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_linear_subclasses(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = Net().eval()
    model = qlora_ext.prepare_model(copy.deepcopy(net), LoraConfig(r=4), compute_dtype=torch.float32, progress=False)
    assert lora_layers.is_lora_layer(model.first) and lora_layers.is_lora_layer(model.second)
    x = make_input((3, 64), torch.float32, "cpu", gen)
    w1 = F.dequantize_4bit(*F.quantize_4bit(net.first.weight.detach(), 64, "nf4", True))
    with torch.no_grad():
        hidden = model.first(x)
    assert_close_to_reference(hidden, x, w1, net.first.bias.detach(), "first")
    # a subclass with its own forward: "all-linear" leaves it out, with a warning that names it
    net = Net(first=OwnForward).eval()
    with pytest.warns(UserWarning, match=r"leaves 1 linear layers as they are: first \(OwnForward, an nn.Linear"):
        model = qlora_ext.prepare_model(copy.deepcopy(net), LoraConfig(r=4), progress=False)
    assert type(model.first) is OwnForward and lora_layers.is_lora_layer(model.second)
    # named, it is quantized as an nn.Linear
    model = qlora_ext.prepare_model(copy.deepcopy(net), LoraConfig(r=4, target_modules=["first"]), progress=False)
    assert lora_layers.is_lora_layer(model.first) and type(model.second) is nn.Linear
    # alone under "all-linear": nothing to target, and the error says what was left out and why
    only = nn.Sequential(OwnForward(64, 64))
    int8 = nn.Sequential(nn.Linear(64, 64, device="meta"))
    int8[0].weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)
    int8[0].bias = None
    assert_each_raises([
        (lambda: qlora_ext.prepare_model(only, LoraConfig(r=4), progress=False), ValueError,
         r"matches no linear layer .*left out: 0 \(OwnForward, an nn.Linear with its own forward\)"),
        (lambda: qlora_ext.prepare_model(int8, LoraConfig(r=4), progress=False), ValueError,
         r"0 \(Linear\) holds a torch.int8 weight"),
    ])  # fmt: skip


def test_multihead_attention_out_proj_is_left_alone(gen):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.mlp = nn.Linear(64, 64)

        def forward(self, x):
            return self.mlp(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    block = Block().eval()
    with pytest.warns(UserWarning, match=r"attn.out_proj \(read by nn.MultiheadAttention"):
        model = qlora_ext.prepare_model(copy.deepcopy(block), LoraConfig(r=4), compute_dtype=torch.float32,
                                        progress=False)  # fmt: skip
    assert type(model.attn.out_proj) is type(block.attn.out_proj) and lora_layers.is_lora_layer(model.mlp)
    x = make_input((2, 5, 64), torch.float32, "cpu", gen)
    with torch.no_grad():
        torch.testing.assert_close(model.attn(x, x, x)[0], block.attn(x, x, x)[0], rtol=0, atol=0)
        model(x)
    with pytest.raises(ValueError, match=r"names attn.out_proj \(read by nn.MultiheadAttention.*cannot be replaced"):
        qlora_ext.prepare_model(copy.deepcopy(block), LoraConfig(target_modules=["out_proj"]), progress=False)


def test_an_empty_linear4bit_is_refused():
    model = nn.Sequential(Linear4bit(64, 64, device="cpu"))
    with pytest.raises(ValueError, match="0 is a Linear4bit without a weight"):
        qlora_ext.prepare_model(model, LoraConfig(r=4), progress=False)


# ---------------------------------------------------------------------------------------------
# Models quantized by bitsandbytes: refused, naming patch_bitsandbytes(); never "matches no ..."


def fake_bitsandbytes_layer(name: str, base: type = nn.Linear) -> type:
    """A class as bitsandbytes defines it (its module's name is what prepare_model looks at: bitsandbytes
    itself need not be importable)."""
    return types.new_class(name, (base,), exec_body=lambda ns: ns.update({"__module__": "bitsandbytes.nn.modules"}))


def test_bitsandbytes_layers_are_named_by_class_without_importing_it(monkeypatch):
    linear4bit = fake_bitsandbytes_layer("Linear4bit")
    nf4 = fake_bitsandbytes_layer("LinearNF4", linear4bit)
    int8 = fake_bitsandbytes_layer("Linear8bitLt")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it would fail
    for cls in (linear4bit, nf4):
        model = tiny_llama(53)
        model.model.layers[1].mlp.up_proj = cls(64, 128)
        with pytest.raises(ValueError, match=rf"up_proj is bitsandbytes' {cls.__name__}\).*patch_bitsandbytes\(\)"):
            qlora_ext.prepare_model(model, LoraConfig(r=4), progress=False)
        assert not any(
            isinstance(m, Linear4bit) or lora_layers.is_lora_layer(m) for m in model.modules()
        )  # nothing was changed
    model = tiny_llama(53)
    model.model.layers[0].self_attn.q_proj = int8(64, 64)
    with pytest.raises(ValueError, match=r"bitsandbytes' Linear8bitLt\), which qlora_ext cannot run"):
        qlora_ext.prepare_model(model, LoraConfig(r=4), progress=False)


def test_a_bitsandbytes_model_with_peft_names_patch_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    tiny_llama(54).save_pretrained(str(tmp_path))
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=q, device_map="cpu")
    for target in (model, peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules="all-linear"))):
        with pytest.raises(ValueError, match=r"quantized by bitsandbytes already .*qlora_ext.patch_bitsandbytes\(\)"):
            qlora_ext.prepare_model(target, LoraConfig(r=4), progress=False)
