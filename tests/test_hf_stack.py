"""The Hugging Face stack on qlora_ext, against the real libraries: transformers' from_pretrained with
QLoraExtConfig (quantized while loading, bit for bit ours and bitsandbytes', saved and loaded back to the
same bits), PEFT's LoRA on it (qlora_ext's fused op where it applies, PEFT's composition elsewhere,
merging, several adapters, PEFT's files), and transformers' Trainer and TRL's SFTTrainer (a few steps,
a checkpoint that reloads to the same logits, a resume that ends where the uninterrupted run ends)."""

from __future__ import annotations

import copy
import json
import math
import statistics
import warnings

import pytest
import torch

import qlora_ext
from qlora_ext import _lora_layers as lora_layers, functional as F
from qlora_ext.nn import Linear4bit

from helpers import (
    DEVICES,
    SEED,
    WORDS,
    assert_bits_equal,
    assert_each_raises,
    assert_state_equal,
    poison,
    requires_cuda,
    tiny_lm_dir,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from qlora_ext.hf import QLoraExtConfig, QLoraExtHfQuantizer, register_peft  # noqa: E402  (needs transformers)
from qlora_ext.peft_lora import LoraLinear4bit  # noqa: E402  (needs PEFT)

# The 14 linears of the tiny Llama's two layers; the output head stays 16-bit.
N_LINEARS = 14
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny Llama in float32 with a tokenizer, on disk as a model from the Hub is (fresh weights each run)."""
    return tiny_lm_dir(tmp_path_factory.mktemp("tiny-lm"), SEED % 2**31)


def compute_dtype(device: str) -> torch.dtype:
    # float32 on the CPU (exact comparisons with PEFT's float32 layers); the fused bf16 kernels on CUDA
    return torch.float32 if device == "cpu" else torch.bfloat16


def load(lm_dir, device="cpu", **config):
    config.setdefault("compute_dtype", compute_dtype(device))
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(lm_dir), quantization_config=QLoraExtConfig(**config), device_map=device
    ).eval()


def load_plain(lm_dir, device="cpu"):
    return transformers.AutoModelForCausalLM.from_pretrained(str(lm_dir), device_map=device).eval()


def dequantized(quantized, plain):
    """`plain` (16-bit layers) with each of `quantized`'s 4-bit weights dequantized into it: the same
    weights, for PEFT's own layers to run on."""
    plain = copy.deepcopy(plain)
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            name = name.removeprefix("base_model.model.").removesuffix(".base_layer")  # PEFT's wrapping
            with torch.no_grad():
                plain.get_submodule(name).weight.copy_(module.dequantize().float())
    return plain


def tokens(gen, device="cpu", batch=2, length=11):
    return torch.randint(0, 96, (batch, length), generator=gen).to(device)


def logits(model, ids, **kwargs):
    poison(ids.device.type, 2 * ids.numel() * 96 * 4)
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def randomize_adapters(model, gen):
    """Random A and B (PEFT starts B at zero, which hides every error of the adapter path)."""
    with torch.no_grad():
        for name, p in lora_params(model).items():
            scale = 1 / math.sqrt(p.shape[1]) if ".lora_A." in name else 0.5
            p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype))


def copy_adapters(src, dst):
    """The adapter tensors of `src` into `dst` (the same PEFT names), in dst's dtypes."""
    theirs = lora_params(dst)
    mine = lora_params(src)
    assert sorted(mine) == sorted(theirs)
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(mine[name].to(p.dtype))


def spied(monkeypatch, name: str, record) -> list:
    """What record(args) gives for each call of functional's op `name` (F._<op>_op) as functional makes it."""
    calls = []
    op = getattr(F, name)

    def spy(*args):
        calls.append(record(args))
        return op(*args)

    monkeypatch.setattr(F, name, spy)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls of torch.ops.qlora.lora_linear (its dropout probability each)."""
    return spied(monkeypatch, "_lora_linear_op", lambda args: args[-2])


@pytest.fixture
def indexed_calls(monkeypatch):
    """The calls of torch.ops.qlora.lora_linear_indexed (the adapter index of each)."""
    return spied(monkeypatch, "_lora_linear_indexed_op", lambda args: args[-1])


def fused_nodes(out: torch.Tensor) -> int:
    """How many autograd nodes of qlora_ext's lora_linear op are in out's graph."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "LoraLinear" in node.name()
        stack.extend(n for n, _ in node.next_functions)
    return count


def peft_model(model, config, gen=None):
    model = peft.get_peft_model(model, config)
    if gen is not None:
        randomize_adapters(model, gen)
    return model


# ---------------------------------------------------------------------------------------------
# transformers: from_pretrained, save_pretrained


@pytest.mark.parametrize("fmt", [("nf4", 64, True), ("fp4", 128, False)], ids=["nf4-dq", "fp4"])
@pytest.mark.parametrize("device", DEVICES)
def test_from_pretrained_quantizes_while_loading(lm_dir, gen, device, fmt, monkeypatch):
    quant_type, blocksize, dq = fmt
    plain = load_plain(lm_dir, device)
    # The loader hands each 16-bit weight to the quantize op in turn: when the k-th arrives, exactly
    # k - 1 of the 4-bit layers have their codes and the others are still empty (on the meta device).
    convert = qlora_ext.hf._Quantize.convert
    progress = []

    def watched(self, input_dict, full_layer_name=None, model=None, **kwargs):
        assert len(input_dict) == 1
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        progress.append(sum(not m.weight.is_meta for m in layers))
        return convert(self, input_dict, full_layer_name=full_layer_name, model=model, **kwargs)

    monkeypatch.setattr(qlora_ext.hf._Quantize, "convert", watched)
    model = load(lm_dir, device, quant_type=quant_type, blocksize=blocksize, compress_statistics=dq)
    assert progress == list(range(N_LINEARS))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sorted(n for n, k in kinds.items() if k == "Linear4bit") == sorted(
        f"model.layers.{i}.{block}.{p}" for i in range(2) for p in PROJ
        for block in (("self_attn",) if p in PROJ[:4] else ("mlp",))
    )  # fmt: skip
    assert kinds["lm_head"] == "Linear"
    assert model.is_quantized and isinstance(model.hf_quantizer, QLoraExtHfQuantizer)
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, Linear4bit) for p in m.parameters())
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            assert module.weight.device.type == device and module.quant_state.absmax.device.type == device
            packed, state = F.quantize_4bit(plain.get_submodule(name).weight, blocksize, quant_type, dq)
            assert_bits_equal(module.weight, packed, name)
            assert_state_equal(module.quant_state, state, name)
            assert module.compute_dtype == compute_dtype(device)
    # the model computes with those weights
    ids = tokens(gen, device)
    tol = 0.02 if device == "cuda" else 1e-5  # bf16 products on CUDA, float32 on the CPU
    reference = logits(dequantized(model, plain).to(compute_dtype(device)), ids)
    torch.testing.assert_close(logits(model, ids), reference, rtol=tol, atol=tol)


@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
def test_loaded_bits_are_bitsandbytes(lm_dir, bnbf, dq):
    """bitsandbytes' CPU quantizer gives the same bytes and scales for every loaded layer."""
    plain = load_plain(lm_dir)
    model = load(lm_dir, compress_statistics=dq)
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            packed, state = bnbf.quantize_4bit(plain.get_submodule(name).weight.detach(), blocksize=64,
                                               quant_type="nf4", compress_statistics=dq)  # fmt: skip
            assert_bits_equal(module.weight, packed, name)
            assert_state_equal(module.quant_state, state, name)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("device", DEVICES)
def test_save_pretrained_and_back(lm_dir, gen, tmp_path, device, storage):
    model = load(lm_dir, device, quant_storage=storage)
    ids = tokens(gen, device)
    before = logits(model, ids)
    model.save_pretrained(str(tmp_path / "q"))
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "qlora_ext", "quant_type": "nf4", "blocksize": 64, "compress_statistics": True,
                      "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
                      "quant_storage": str(storage).removeprefix("torch."), "modules_to_not_convert": None}  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == storage
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert {k for k in keys if k.startswith(q_proj)} == {q_proj} | {f"{q_proj}.{e}" for e in (
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")}  # fmt: skip
    assert "lm_head.weight" in keys and not any(k.startswith("lm_head.weight.") for k in keys)
    # from_pretrained reads the method from config.json: no quantization_config argument
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), device_map=device).eval()
    assert isinstance(back.hf_quantizer, QLoraExtHfQuantizer) and back.hf_quantizer.pre_quantized
    assert back.hf_quantizer.quantization_config.quant_storage == storage
    theirs, ours = model.state_dict(), back.state_dict()
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        assert_bits_equal(ours[key], theirs[key], key)
    assert_bits_equal(logits(back, ids), before)
    # the model loaded from 4 bits saves again to the same files (save_pretrained reverts the load's conversions)
    back.save_pretrained(str(tmp_path / "again"))
    from safetensors.torch import load_file

    first, again = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("q", "again"))
    assert sorted(first) == sorted(again)
    for key in first:
        assert_bits_equal(again[key], first[key], key)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == config


def test_config_and_refusals(lm_dir, tmp_path):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["qlora_ext"] is QLoraExtConfig
    assert AUTO_QUANTIZER_MAPPING["qlora_ext"] is QLoraExtHfQuantizer
    assert qlora_ext.QLoraExtConfig is QLoraExtConfig
    config = QLoraExtConfig(quant_type="fp4", blocksize=128, compress_statistics=False, compute_dtype="bfloat16",
                            modules_to_not_convert=["down_proj"])  # fmt: skip
    assert config.compute_dtype is torch.bfloat16
    assert QLoraExtConfig.from_dict(json.loads(config.to_json_string())).to_dict() == config.to_dict()
    # a key that a newer qlora_ext wrote into config.json is kept and written back; in code it is a mistake
    newer = QLoraExtConfig.from_dict({**config.to_dict(), "newer_key": [1, 2]})
    assert newer.newer_key == [1, 2] and newer.to_dict() == {**config.to_dict(), "newer_key": [1, 2]}
    assert_each_raises([
        (lambda: QLoraExtConfig(compute_type=torch.bfloat16), TypeError,
         "QLoraExtConfig got unexpected keyword arguments 'compute_type'"),
        (lambda: QLoraExtConfig(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False), TypeError,
         "bnb_4bit_quant_type is quant_type here; bnb_4bit_use_double_quant is compress_statistics here"),
        (lambda: QLoraExtConfig(load_in_4bit=True), TypeError, "always loads in 4 bits"),
        (lambda: QLoraExtConfig(quant_type="int4"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
        (lambda: QLoraExtConfig(blocksize=48), ValueError, "blocksize must be one of"),
        (lambda: QLoraExtConfig(compute_dtype=torch.int8), ValueError, "compute_dtype must be one of"),
        (lambda: QLoraExtConfig(quant_storage="int4"), ValueError, "quant_storage must be one of"),
        (lambda: QLoraExtConfig(compress_statistics="yes"), TypeError, "compress_statistics must be a bool"),
        (lambda: QLoraExtConfig(quant_method="bitsandbytes"), ValueError, "quant_method must be 'qlora_ext'"),
        (lambda: transformers.AutoModelForCausalLM.from_pretrained(str(lm_dir), quantization_config=QLoraExtConfig(),
                                                                   device_map={"model": "cpu", "lm_head": "disk"}),
         ValueError, "offloads modules"),
    ])  # fmt: skip
    # modules_to_not_convert: those stay 16-bit, with their weights as they were
    plain = load_plain(lm_dir)
    model = load(lm_dir, modules_to_not_convert=["down_proj", "model.layers.1.self_attn"])
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sum(k is Linear4bit for k in kinds.values()) == N_LINEARS - 2 - 4
    assert kinds["model.layers.0.mlp.down_proj"] is torch.nn.Linear
    assert kinds["model.layers.1.self_attn.q_proj"] is torch.nn.Linear
    assert_bits_equal(model.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)
    # a checkpoint that lacks a 4-bit layer, or has a broken one, does not load
    model.save_pretrained(str(tmp_path / "q"))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "q" / "model.safetensors"))
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    for case, broken in {
        "missing": {k: v for k, v in weights.items() if not k.startswith(q_proj)},
        "truncated": {**weights, f"{q_proj}.absmax": weights[f"{q_proj}.absmax"][:-1]},
    }.items():
        save_file(broken, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
        error, match = {"missing": (ValueError, r"no weight for 1 quantized layers \(model.layers.0.self_attn.q_proj"),
                        "truncated": (RuntimeError, "conversion")}[case]  # fmt: skip
        with pytest.raises(error, match=match):
            transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    # dequantize(): nn.Linear layers with the dequantized weights, no quantization left
    expected = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    model.dequantize()
    assert not any(isinstance(m, Linear4bit) for m in model.modules()) and not model.is_quantized
    for name, weight in expected.items():
        assert_bits_equal(model.get_submodule(name).weight, weight, name)
    # PEFT inits that need the base weight in 16 bits are refused, naming the option
    with pytest.raises(ValueError, match="init_lora_weights='pissa' needs the base weight in 16 bits"):
        peft.get_peft_model(load(lm_dir), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


# ---------------------------------------------------------------------------------------------
# PEFT


def reference_outputs(plain, config, ours, ids, g, dtype, device):
    """Logits and adapter gradients of PEFT's own LoRA layers on `plain` (the same dequantized weights) with
    ours' adapter values, in ours' precision layout: the wrapped linears and their adapters in `dtype` (not
    cast to float32 as get_peft_model casts adapters by default), each linear casting its input to `dtype`
    and its output back, as qlora_ext's Linear4bit does, and the rest of the model (embeddings, norms, the
    residual stream) in float32 as ours loads it. Their errors against float64 are then comparable tensor
    by tensor: an all-bf16 model rounds the norms and the residual stream too, and through a whole backward
    its gradient errors and ours differed by up to 11x either way from one random model to the next."""
    rest = torch.float64 if dtype == torch.float64 else torch.float32
    base = copy.deepcopy(plain).to(device=device, dtype=rest)
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ:
            module.to(dtype)
            module.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
            module.register_forward_hook(lambda m, args, out: out.to(rest))
    ref = peft.get_peft_model(base, copy.deepcopy(config), autocast_adapter_dtype=False)
    copy_adapters(ours, ref)
    assert all(p.dtype == dtype for p in lora_params(ref).values())
    ref.train()
    out = ref(ids).logits
    (out.float() * g).sum().backward()
    return out.detach(), {n: p.grad.detach() for n, p in lora_params(ref).items()}


def peft_error_ratio(ours, low, exact) -> float:
    """Ours' error norm against float64 over PEFT's in the working precision plus a floor of four units in
    its last place (scaled by the exact value's norm)."""
    floor = 4 * torch.finfo(low.dtype).eps * exact.double().norm().item()
    return (ours.double() - exact.double()).norm().item() / ((low.double() - exact.double()).norm().item() + floor)


def assert_within_peft_error(ours, low, exact, what, norm_factor=2) -> float:
    """Ours against float64 within twice PEFT's error in the working precision, plus a floor of four units
    in the last place of that precision: for the largest element's error in float32 (the CPU). In bf16
    (CUDA) the tensors come out of a whole model's forward and backward, where one element's error is
    the extreme of many roundings upstream, as likely ours as PEFT's: there the largest element's error
    within six times PEFT's (over 30 fresh models on the CPU in bf16 the worst of the 29 tensors was
    3.21x), and the error of the whole tensor (its norm) within `norm_factor` times. Returns that norm
    ratio (peft_error_ratio)."""
    diff, ref_diff = (ours.double() - exact.double()).abs(), (low.double() - exact.double()).abs()
    eps, largest = torch.finfo(low.dtype).eps, exact.double().abs().max().item()
    err, ref_err = diff.max().item(), ref_diff.max().item()
    factor = 2 if low.dtype == torch.float32 else 6
    assert err <= factor * ref_err + 4 * eps * largest, f"{what}: largest error {err:.3g} vs PEFT's {ref_err:.3g}"
    ratio = peft_error_ratio(ours, low, exact)
    if low.dtype != torch.float32:
        assert ratio <= norm_factor, f"{what}: error norm {ratio:.3g}x PEFT's (with its floor), over {norm_factor}x"
    return ratio


def assert_close_in_precision(got, want, msg=None):
    """Two computations of the same outputs, rounded in different places: on the CPU (float32) torch's
    default tolerances; on CUDA (bf16) 2e-2 relative plus four units in the last place of the largest
    output, since an output near zero that is the difference of larger terms carries their rounding."""
    if want.device.type == "cpu":
        torch.testing.assert_close(got, want, msg=msg)
    else:
        atol = 4 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=atol, msg=msg)


@pytest.mark.parametrize("device", DEVICES)
def test_get_peft_model_runs_the_fused_op(lm_dir, gen, device, fused_calls):
    """get_peft_model on the loaded model gives LoraLinear4bit layers whose forward is one call of the
    fused op each (one autograd node each); logits and adapter gradients agree with PEFT's own LoRA
    layers on the same dequantized weights: against a float64 run of those, within the error of PEFT's
    layers computing in the same precision (float32 on the CPU, bfloat16 on CUDA; bounds below)."""
    dtype = compute_dtype(device)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = peft_model(load(lm_dir, device), config, gen)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}
    assert len(layers) == N_LINEARS
    assert all(isinstance(m.base_layer, Linear4bit) for m in layers.values())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_params(model)) and len(trainable) == 2 * N_LINEARS
    ids = tokens(gen, device)
    model.train()
    out = model(ids).logits
    assert len(fused_calls) == N_LINEARS and fused_nodes(out) == N_LINEARS
    g = torch.randn(out.shape, generator=gen).to(device)
    (out.float() * g).sum().backward()
    grads = {n: p.grad for n, p in lora_params(model).items()}
    assert all(v is not None and v.abs().sum() > 0 for v in grads.values())
    plain = dequantized(model, load_plain(lm_dir, device))
    low, low_grads = reference_outputs(plain, config, model, ids, g, dtype, device)
    exact, exact_grads = reference_outputs(plain, config, model, ids, g, torch.float64, device)
    # bf16: the logits within 3x PEFT's error norm, each adapter gradient within 5x (a gradient gone wrong
    # is off by about its whole norm, 5-100x PEFT's error), and their median within 1.5x (an error the
    # adapter path makes everywhere). On the CPU in bf16 over 60 fresh models, against this reference:
    # logits 2.31x at most, the worst gradient 3.32x, the median 1.02x.
    assert_within_peft_error(out.detach(), low, exact, "logits", norm_factor=3)
    ratios = [assert_within_peft_error(grads[n], low_grads[n], exact_grads[n], n, norm_factor=5) for n in grads]
    if dtype != torch.float32:
        median = statistics.median(ratios)
        assert median <= 1.5, f"the adapter gradients' median error norm is {median:.3g}x PEFT's"
    # the layer's dropout is the op's: p in training mode, none in eval mode
    dropped = peft_model(load(lm_dir, device), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.25))
    fused_calls.clear()
    dropped.train()(ids)
    dropped.eval()(ids)
    assert fused_calls == [0.25, 0.25, 0.0, 0.0]


def test_peft_composition_where_the_fused_op_does_not_apply(lm_dir, gen, fused_calls, indexed_calls):
    """Where a layer has several active adapters, with adapters disabled and with DoRA, the layers run
    PEFT's composition (no fused call); layers with one active plain adapter stay fused, and a
    mixed-adapter batch of plain adapters is one lora_linear_indexed call a layer. All agree with PEFT's
    own layers on the same weights (float32, torch's default tolerances)."""
    plain = load_plain(lm_dir)
    a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    b = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], use_rslora=True)
    d = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True)
    # (adapter names that are not in PEFT's prefix "lora_", which PEFT warns about)
    ours = peft.get_peft_model(load(lm_dir), a, adapter_name="one")
    ours.add_adapter("two", b)
    ours.add_adapter("dora", d)
    randomize_adapters(ours, gen)
    theirs = peft.get_peft_model(dequantized(ours, plain), copy.deepcopy(a), adapter_name="one")
    theirs.add_adapter("two", copy.deepcopy(b))
    theirs.add_adapter("dora", copy.deepcopy(d))
    copy_adapters(ours, theirs)
    with torch.no_grad():  # DoRA's magnitudes were computed from each model's own base weights: the same ones
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                torch.testing.assert_close(ours.get_parameter(name), p)
    ids = tokens(gen, batch=3)
    ours.eval(), theirs.eval()

    def same(what, fused, **kwargs):
        fused_calls.clear()
        torch.testing.assert_close(logits(ours, ids, **kwargs), logits(theirs, ids, **kwargs), msg=what)
        assert len(fused_calls) == fused, what

    same("one alone", 6)  # q, v, down of both layers
    ours.base_model.set_adapter(["one", "two"]), theirs.base_model.set_adapter(["one", "two"])
    same("one and two", 6)  # v has both: composed; q and down (one), o (two): fused
    same("mixed batch", 0, adapter_names=["one", "two", "__base__"])
    assert len(indexed_calls) == 8  # q, v, o, down of both layers
    # each layer's slots: its adapters of the batch in name order, -1 for "__base__" and the others
    slots = {tuple(i.view(3, -1)[:, 0].tolist()) for i in indexed_calls}
    assert slots == {(0, 1, -1), (0, -1, -1), (-1, 0, -1)}, slots
    ours.set_adapter("dora"), theirs.set_adapter("dora")
    same("DoRA", 0)
    with ours.disable_adapter(), theirs.disable_adapter():
        same("disabled", 0)
        assert_bits_equal(logits(ours, ids), logits(load(lm_dir), ids))
    # DoRA trains through PEFT's composition: its gradients are PEFT's
    ours.train(), theirs.train()
    g = torch.randn(ids.shape + (96,), generator=gen)
    for model in (ours, theirs):
        (model(ids).logits * g).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert any("lora_magnitude_vector" in n for n in grads) and any(".lora_A.dora." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs.get_parameter(name).grad, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_adapter_batch(lm_dir, gen, device, indexed_calls):
    """adapter_names: one lora_linear_indexed call a layer, PEFT's result (its composition on the same
    layers, within the two roundings' difference: assert_close_in_precision), adapters of two ranks, the new
    values of an adapter changed through .data (as PEFT's hotswap changes them) and of one added later;
    PEFT's composition where gradients are wanted."""
    base = load(lm_dir, device)
    ours = peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), gen)
    ours.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj", "o_proj"]))
    randomize_adapters(ours, gen)
    ours.eval()
    ids = tokens(gen, device, batch=4)
    names = ["two", "__base__", "default", "two"]

    def peft_composition():
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(qlora_ext.peft_lora.LoraLinear4bit, "_fused_mixed_batch", lambda *a: None)
            return ours(ids, adapter_names=names).logits.float()

    def check(what):
        indexed_calls.clear()
        got = logits(ours, ids, adapter_names=names)
        assert len(indexed_calls) == 6, (what, len(indexed_calls))  # q, v, o of both layers
        assert_close_in_precision(got, peft_composition(), msg=what)

    check("two ranks")
    with torch.no_grad():
        layer = ours.base_model.model.model.layers[0].self_attn.v_proj
        layer.lora_B["two"].weight.data.mul_(-3)
    check("an adapter changed through .data")
    ours.add_adapter("three", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["v_proj"]))
    randomize_adapters(ours, gen)
    names = ["three", "two", "default", "three"]
    check("an adapter added")
    # gradients wanted (PEFT refuses adapter_names on a model in training mode, not on a layer): PEFT's
    # composition
    indexed_calls.clear()
    x = torch.randn(4, 5, layer.in_features, generator=gen).to(device, compute_dtype(device))
    layer.lora_A["two"].weight.requires_grad_(True)
    out = layer(x, adapter_names=names)
    assert not indexed_calls and out.requires_grad
    with torch.no_grad():
        assert_close_in_precision(layer(x, adapter_names=names), out.detach())
    assert len(indexed_calls) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_merge_and_unload(lm_dir, gen, tmp_path, device, fused_calls):
    """Merging follows PEFT's bitsandbytes layer: the merged weight (dequantized + adapter, DoRA's too) is
    quantized again in the base's format. The codes are those of the weight PEFT merges on the same
    dequantized base, bit for bit; unmerged layers keep theirs; the merged model saves and loads back."""
    plain = load_plain(lm_dir, device)
    configs = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
               "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], use_dora=True)}  # fmt: skip
    for kind, config in configs.items():
        ours = peft_model(load(lm_dir, device), config, gen)
        theirs = peft_model(dequantized(ours, plain), copy.deepcopy(config))
        copy_adapters(ours, theirs)
        untouched = {n.removeprefix("base_model.model."): m.weight.clone() for n, m in ours.named_modules()
                     if isinstance(m, Linear4bit) and not n.endswith("base_layer")}  # fmt: skip
        assert len(untouched) == N_LINEARS - 2 * len(config.target_modules)
        ids = tokens(gen, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "Merge lora module to 4-bit linear may get different generations"
            ours.merge_adapter()
            fused_calls.clear()
            merged_logits = logits(ours, ids)
            assert not fused_calls, kind  # merged: the base alone
            merged = ours.merge_and_unload()
            reference = theirs.merge_and_unload()
        assert not any(isinstance(m, LoraLinear4bit) for m in merged.modules())
        for name, module in merged.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            if name in untouched:
                assert_bits_equal(module.weight, untouched[name], name)
                continue
            state = module.quant_state
            expected = reference.get_submodule(name).weight.detach().to(state.dtype)
            packed, expected_state = F.quantize_4bit(expected, state.blocksize, state.quant_type, state.nested)
            assert_bits_equal(module.weight, packed, f"{kind} {name}")
            assert_state_equal(state, expected_state, f"{kind} {name}")
        assert_bits_equal(logits(merged, ids), merged_logits)
        merged.save_pretrained(str(tmp_path / kind))
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / kind), device_map=device).eval()
        assert_bits_equal(logits(back, ids), merged_logits)


def test_peft_files_and_several_adapters(lm_dir, gen, tmp_path):
    """PEFT's save_pretrained / PeftModel.from_pretrained / load_adapter round trip on a freshly loaded
    4-bit model gives the same logits, bit for bit, with rsLoRA's scaling; the files are PEFT's, and PEFT's
    own layers on the dequantized weights read them to the same logits."""
    first = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)
    second = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "up_proj"])
    ours = peft_model(load(lm_dir), first, gen)
    ours.add_adapter("other", second)
    randomize_adapters(ours, gen)
    ours.save_pretrained(str(tmp_path))  # default in tmp_path, "other" in tmp_path/other
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    assert len(keys) == 2 * N_LINEARS and "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    ids = tokens(gen)
    expected = {}
    for name in ("default", "other"):
        ours.set_adapter(name)
        expected[name] = logits(ours, ids)
    loaded = peft.PeftModel.from_pretrained(load(lm_dir), str(tmp_path)).eval()
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, LoraLinear4bit) and layer.scaling["default"] == 8 / math.sqrt(4)
    assert_bits_equal(logits(loaded, ids), expected["default"])
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    loaded.set_adapter("other")
    assert_bits_equal(logits(loaded, ids), expected["other"])
    theirs = peft.PeftModel.from_pretrained(dequantized(ours, load_plain(lm_dir)), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, ids), expected["default"])


def test_registration(fused_calls):
    """register_peft is idempotent, and puts LoraLinear4bit on a Linear4bit of any model, for a LoraConfig
    made before the hook was installed too (PEFT's dispatch registers the mapping on the config in use)."""
    config = peft.LoraConfig(r=2, target_modules=["0"])
    assert register_peft() and register_peft()
    from peft.tuners.lora.model import LoraModel

    hook = LoraModel._create_new_module
    assert not hasattr(hook.__wrapped__, "__wrapped__")  # wrapped once
    model = torch.nn.Sequential(Linear4bit.from_linear(torch.nn.Linear(64, 32)), torch.nn.ReLU())
    model = peft.get_peft_model(model, config)
    assert isinstance(model.base_model.model[0], LoraLinear4bit)
    assert config._custom_modules == {Linear4bit: LoraLinear4bit}
    model(torch.randn(3, 64))
    assert len(fused_calls) == 1


# ---------------------------------------------------------------------------------------------
# Trainer and SFTTrainer


def lm_dataset(gen, rows=16, length=12):
    datasets = pytest.importorskip("datasets")
    ids = torch.randint(4, 4 + len(WORDS), (rows, length), generator=gen).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def text_dataset(gen, rows=16):
    datasets = pytest.importorskip("datasets")
    texts = []
    for _ in range(rows):
        n = int(torch.randint(5, 12, (), generator=gen))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen)))
    return datasets.Dataset.from_dict({"text": texts})


def adapters_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_params(model).items()}


def assert_adapters_moved(trained: dict[str, torch.Tensor]) -> None:
    """Every lora_B left zero, where PEFT and prepare_model start it: with adapters that took no
    gradient, every resume and reload of these tests would agree all the same."""
    B = {n: v for n, v in trained.items() if "lora_B" in n}
    assert B and all(bool(v.ne(0).any()) for v in B.values()), [n for n, v in B.items() if not v.ne(0).any()][:3]


def train_twice(make_trainer, out_dir):
    """An uninterrupted run of 4 steps (checkpoints at 2 and 4), and a second trainer on a freshly loaded
    model that resumes from checkpoint-2. Returns both trained models."""
    whole = make_trainer(out_dir / "whole")
    whole.train()
    resumed = make_trainer(out_dir / "resumed")
    resumed.train(resume_from_checkpoint=str(out_dir / "whole" / "checkpoint-2"))
    return whole, resumed


def check_trained(whole, resumed, lm_dir, out_dir, gen, device="cpu"):
    assert whole.state.global_step == resumed.state.global_step == 4
    losses = [e["loss"] for e in whole.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    trained = adapters_of(whole.model)
    assert_adapters_moved(trained)
    # the resumed run ends where the uninterrupted one does
    for name, value in adapters_of(resumed.model).items():
        assert_bits_equal(value, trained[name], name)
    # the last checkpoint, loaded onto a freshly loaded 4-bit model, gives the trained model's logits
    ids = tokens(gen, device)
    loaded = peft.PeftModel.from_pretrained(load(lm_dir, device), str(out_dir / "whole" / "checkpoint-4")).eval()
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    assert_bits_equal(logits(loaded, ids), logits(whole.model.eval(), ids))


def test_trainer_steps_checkpoint_and_resume(lm_dir, gen, tmp_path, fused_calls):
    data = lm_dataset(gen)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)

    def make_trainer(out):
        model = peft.get_peft_model(load(lm_dir), copy.deepcopy(config))
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, logging_steps=1,
                                              per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                                              use_cpu=True, seed=SEED % 2**31, save_only_model=False)  # fmt: skip
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    whole, resumed = train_twice(make_trainer, tmp_path)
    assert 0.1 in fused_calls  # the fused op trained, with its dropout
    check_trained(whole, resumed, lm_dir, tmp_path, gen)


def sft_trainer(lm_dir, data, out, device="cpu", max_steps=4):
    trl = pytest.importorskip("trl")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lm_dir))
    args = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, save_steps=2, logging_steps=1,
                         per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=device == "cpu",
                         max_length=32, bf16=device == "cuda", seed=SEED % 2**31)  # fmt: skip
    # the user's LoraConfig goes to the trainer, which calls get_peft_model itself
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.05)
    return trl.SFTTrainer(model=load(lm_dir, device), args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=config)  # fmt: skip


def test_sft_trainer_steps_checkpoint_and_resume(lm_dir, gen, tmp_path, fused_calls):
    data = text_dataset(gen)
    whole, resumed = train_twice(lambda out: sft_trainer(lm_dir, data, out), tmp_path)
    assert isinstance(whole.model.base_model.model.model.layers[1].mlp.up_proj, LoraLinear4bit)
    assert 0.05 in fused_calls
    check_trained(whole, resumed, lm_dir, tmp_path, gen)


@pytest.mark.cuda
@requires_cuda
def test_sft_trainer_on_cuda(lm_dir, gen, tmp_path, fused_calls):
    """TRL on the GPU (bf16 autocast, the fused bf16 kernels): a few finite steps, and the checkpoint
    reloads to the trained model's logits."""
    data = text_dataset(gen)
    trainer = sft_trainer(lm_dir, data, tmp_path / "whole", device="cuda")
    trainer.train()
    assert fused_calls and trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.is_cuda
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert_adapters_moved(adapters_of(trainer.model))
    ids = tokens(gen, "cuda")
    loaded = peft.PeftModel.from_pretrained(load(lm_dir, "cuda"), str(tmp_path / "whole" / "checkpoint-4")).eval()
    assert_bits_equal(logits(loaded, ids), logits(trainer.model.eval(), ids))


def test_replace_linears_takes_the_layers_bitsandbytes_takes():
    """Exactly nn.Linear (and Conv1D), as transformers' bitsandbytes integration: a subclass of nn.Linear
    stays 16-bit under both, so a model loads to the same layers and saves the same keys either way."""
    from qlora_ext.hf import replace_linears

    class Scaled(torch.nn.Linear):
        pass

    model = torch.nn.Module()
    model.plain = torch.nn.Linear(64, 32)
    model.sub = Scaled(64, 48, bias=False)
    model.norm = torch.nn.LayerNorm(64)
    assert replace_linears(model, QLoraExtConfig()) == ["plain"]
    assert isinstance(model.plain, Linear4bit) and type(model.sub) is Scaled
    assert replace_linears(model, QLoraExtConfig()) == []  # a Linear4bit is not replaced again


# ---------------------------------------------------------------------------------------------
# Trainer and SFTTrainer on a model made by qlora_ext.prepare_model (no PeftModel: qlora_ext's LoRA layers)


def prepared(lm_dir, base="16-bit", dropout=0.1):
    """The tiny Llama prepared by prepare_model: loaded in 16 bits (quantized by prepare_model), or loaded
    with QLoraExtConfig (4-bit already, kept). The adapters' initial A comes from a fixed seed."""
    model = load_plain(lm_dir) if base == "16-bit" else load(lm_dir)
    torch.manual_seed(1)
    config = qlora_ext.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout)
    return qlora_ext.prepare_model(model, config, compute_dtype=torch.float32, progress=False)


def trainer_args(out, **kw):
    return transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, logging_steps=1,
                                          per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, seed=SEED % 2**31, **kw)  # fmt: skip


def losses_of(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def check_prepared_checkpoint(whole, checkpoint, gen):
    """`from_pretrained(checkpoint)` alone gives the prepared model (its LoRA layers, the same adapters and
    4-bit bits) and the trained model's logits, bit for bit."""
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "qlora_ext" and config["prepared"]["active_adapter"] == "default"
    assert len(config["prepared"]["adapters"]["default"]["layers"]) == N_LINEARS
    back = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    layer = back.model.layers[1].mlp.down_proj
    assert lora_layers.is_lora_layer(layer) and isinstance(lora_layers.base_of(layer), Linear4bit)
    assert back.qlora_config == whole.model.qlora_config
    assert sorted(n for n, p in back.named_parameters() if p.requires_grad) == sorted(lora_params(back))
    theirs = whole.model.state_dict()
    ours = back.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert_bits_equal(ours[key], theirs[key], key)
    ids = tokens(gen)
    assert_bits_equal(logits(back, ids), logits(whole.model.eval(), ids))
    return back


@pytest.mark.parametrize("base", ["16-bit", "QLoraExtConfig"])
def test_trainer_on_a_prepared_model_checkpoint_and_resume(lm_dir, gen, tmp_path, fused_calls, base):
    """Trainer on prepare_model's model: its checkpoints reload with from_pretrained alone to the trained
    model (not 16-bit linears with random weights), and a resume ends where the uninterrupted run ends, the
    same losses; a resume onto the model reloaded from the checkpoint too."""
    data = lm_dataset(gen)

    def make_trainer(out, model=None):
        model = prepared(lm_dir, base) if model is None else model
        return transformers.Trainer(model=model, args=trainer_args(out, save_only_model=False), train_dataset=data)

    whole, resumed = train_twice(make_trainer, tmp_path)
    assert 0.1 in fused_calls
    assert whole.state.global_step == resumed.state.global_step == 4
    assert losses_of(resumed) == losses_of(whole) and len(losses_of(whole)) == 4
    trained = adapters_of(whole.model)
    assert_adapters_moved(trained)
    for name, value in adapters_of(resumed.model).items():
        assert_bits_equal(value, trained[name], name)
    check_prepared_checkpoint(whole, tmp_path / "whole" / "checkpoint-4", gen)
    # the model that from_pretrained gives back from checkpoint-2 trains on from there to the same end
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "whole" / "checkpoint-2"))
    again = make_trainer(tmp_path / "again", again)
    again.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    for name, value in adapters_of(again.model).items():
        assert_bits_equal(value, trained[name], name)


def test_prepared_save_pretrained_several_adapters_and_refusals(lm_dir, gen, tmp_path):
    """save_pretrained of a prepared model writes its layout as it is when saved (an adapter added after
    prepare_model, another one active, modules_to_save, plain 4-bit layers from quantize_others), and
    from_pretrained builds it again to the same logits for each adapter. A checkpoint that lacks a tensor
    of its prepared layers, a prepared config given for a 16-bit checkpoint and a merged adapter are
    refused, naming what is wrong."""
    model = qlora_ext.prepare_model(
        load_plain(lm_dir),
        qlora_ext.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        compute_dtype=torch.float32, quantize_others=True, progress=False,
    )  # fmt: skip
    # on the prepared v_proj layers only (up_proj is a plain Linear4bit: add_adapter leaves it as it is)
    other = qlora_ext.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj", "up_proj"], use_rslora=True,
                                 adapter_dtype=torch.bfloat16)  # fmt: skip
    qlora_ext.add_adapter(model, "other", other)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name == "lm_head.weight":
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)
    qlora_ext.set_adapter(model, "other")
    ids = tokens(gen)
    model.eval()
    expected = {"other": logits(model, ids)}
    model.save_pretrained(str(tmp_path / "p"))
    prepared = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["prepared"]
    assert prepared["active_adapter"] == "other" and len(prepared["linear4bit"]) == N_LINEARS - 4
    assert prepared["adapters"]["other"]["layers"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    # (on a GPU machine from_pretrained would place it on CUDA, as bitsandbytes' quantizer does)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"), device_map="cpu").eval()
    assert lora_layers.is_lora_layer(back.model.layers[0].self_attn.q_proj)
    assert isinstance(back.model.layers[0].mlp.up_proj, Linear4bit)
    assert back.model.layers[0].self_attn.v_proj.lora_A["other"].weight.dtype == torch.bfloat16
    assert sorted(n for n, p in back.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad
    )  # the active adapter's layers and lm_head, as prepare_model + set_adapter leave them
    assert_bits_equal(logits(back, ids), expected["other"])
    for m in (model, back):
        qlora_ext.set_adapter(m, "default")
    assert_bits_equal(logits(back, ids), logits(model, ids))
    # refusals
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    lora = "model.layers.1.self_attn.q_proj.lora_B.default.weight"
    save_file({k: v for k, v in weights.items() if k != lora}, str(tmp_path / "p" / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "p")).quantization_config
    qlora_ext.merge_adapter(model, "default")
    assert_each_raises([
        (lambda: transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "p")), ValueError,
         rf"the checkpoint lacks 1 tensors of its prepared layers \({lora}\)"),
        (lambda: transformers.AutoModelForCausalLM.from_pretrained(str(lm_dir), quantization_config=config),
         ValueError, "describes a saved prepare_model checkpoint"),
        (lambda: model.save_pretrained(str(tmp_path / "merged")), ValueError, "run a merged adapter"),
        (lambda: back.dequantize(), ValueError, "would take the 4-bit bases from under its LoRA layers"),
    ])  # fmt: skip


def test_sft_trainer_on_a_prepared_model(lm_dir, gen, tmp_path, fused_calls):
    """TRL's SFTTrainer given prepare_model's model (no peft_config): it trains the adapters, and its
    checkpoint reloads with from_pretrained alone to the trained model's logits."""
    trl = pytest.importorskip("trl")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lm_dir))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, save_steps=2, logging_steps=1,
                         per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True, max_length=32,
                         bf16=False, seed=SEED % 2**31)  # fmt: skip
    model = prepared(lm_dir, dropout=0.05)
    before = adapters_of(model)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(gen), processing_class=tokenizer)
    trainer.train()
    assert trainer.model is model and 0.05 in fused_calls
    assert any(not torch.equal(p, before[n]) for n, p in adapters_of(model).items())
    check_prepared_checkpoint(trainer, tmp_path / "checkpoint-2", gen)


def test_qlora_ext_functions_leave_a_peft_model_to_peft(lm_dir, tmp_path):
    """A model that PEFT's get_peft_model wraps holds the same LoRA layer class that prepare_model can
    build, but its adapters are PEFT's: qlora_ext's adapter functions find no layer of it, change nothing,
    and load_adapter refuses it (as before qlora_ext's functions knew PEFT's layers)."""
    model = peft.get_peft_model(load(lm_dir), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(4, 20, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    assert list(qlora_ext.model.qlora_layers(model)) == []
    with qlora_ext.disable_adapters(model), torch.no_grad():
        assert torch.equal(model(ids).logits, before), "disable_adapters changed a PEFT model"
    qlora_ext.merge_adapter(model)
    qlora_ext.merge_adapter(model, requantize=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_layers.is_lora_layer(layer) and not layer.merged and lora_layers.merged_of(layer) is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="prepare the model"):
        qlora_ext.load_adapter(model.base_model.model, tmp_path, "mine")
