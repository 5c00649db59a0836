"""bitsandbytes' objects with qlora_ext: ``patch_bitsandbytes()`` (bitsandbytes' Linear4bit and PEFT's
LoRA layer on it, run on qlora_ext's ops: the same outputs and gradients as unpatched, the op that
runs, what falls back to PEFT's forward, weight changes, unpatch, idempotence, a tiny Llama built as
bench/e2e.py's bitsandbytes_peft and trained a few steps), bitsandbytes' QuantState passed to
qlora_ext's functions (the same bits as ours), and our QuantState answering bitsandbytes' look-ups.

On the CPU the patched base layer is bitsandbytes' to the bit: both dequantize the weight to the
compute dtype and multiply (functional.matmul_4bit's promise). PEFT's LoRA layer computes the
adapters in their own dtype and adds them to the base output; the fused op computes them in the
compute dtype with the base, so its results are held to the project's rule for lora_linear: within
twice the error, against float64, of the same layer composed of PyTorch ops in the compute dtype
(PEFT's own forward, where adapters and compute dtype agree)."""

from __future__ import annotations

import copy
import functools
import math
import pickle
import sys

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import QuantState, functional as F

from helpers import (
    DEVICES,
    OpCounter,
    assert_bits_equal,
    assert_each_raises,
    assert_within_twice_the_reference_error,
    make_input,
    random_weights,
    requires_cuda,
    tiny_llama,
)

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
import bitsandbytes.functional as bnbF  # noqa: E402  (after the skip)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def unpatched():
    """Each test starts and ends with bitsandbytes' and PEFT's own forwards."""
    qlora_ext.unpatch_bitsandbytes()
    yield
    qlora_ext.unpatch_bitsandbytes()


def peft_bnb_layer_type():
    pytest.importorskip("peft", reason="PEFT is not installed")
    from peft.tuners.lora.bnb import Linear4bit

    return Linear4bit


# ---------------------------------------------------------------------------------------------
# Layers and models as bitsandbytes and PEFT build them


def weight(n, k, gen, dtype=torch.bfloat16):
    w = random_weights(n * k, torch.float32, "cpu", gen).reshape(n, k)
    return (w * (0.05 / w.pow(2).mean().sqrt())).to(dtype)


def bnb_linear(n, k, gen, device="cpu", *, weight_dtype=torch.bfloat16, bias=True, blocksize=64, **fmt):
    """bitsandbytes' Linear4bit of a fresh [n, k] weight, quantized by its own .to(device).
    fmt: compute_dtype, quant_type, compress_statistics, quant_storage."""
    fmt = {"compute_dtype": torch.bfloat16, "quant_type": "nf4", "compress_statistics": True, **fmt}
    layer = bnb.nn.Linear4bit(k, n, bias=bias, device="meta", **fmt)
    fmt.pop("compute_dtype")
    layer.weight = bnb.nn.Params4bit(
        weight(n, k, gen, weight_dtype), requires_grad=False, blocksize=blocksize, module=layer, **fmt
    )
    if bias:
        layer.bias = nn.Parameter(make_input((n,), weight_dtype, "cpu", gen) * 0.1)
    return layer.to(device)  # bitsandbytes quantizes here


class OneLayer(nn.Module):
    """A model of one bitsandbytes layer, marked as transformers marks a model loaded in 4 bits so
    that PEFT wraps the layer in its bitsandbytes LoRA layer."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer
        self.is_loaded_in_4bit = True

    def forward(self, x):
        return self.proj(x)


def randomize_adapters(model, gen, std=0.05):
    """Fresh A and B (B is zero after PEFT's init, which would hide every error of the adapter path)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.device))


def peft_layer(gen, device="cpu", *, adapter_dtype=torch.float32, lora=None, **fmt):
    """PEFT's LoRA layer (peft.tuners.lora.bnb.Linear4bit) on a bitsandbytes Linear4bit, built by
    get_peft_model; returns (model, layer)."""
    import peft

    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **(lora or {})}
    model = peft.get_peft_model(
        OneLayer(bnb_linear(96, 192, gen, device, **fmt)), peft.LoraConfig(target_modules=["proj"], **lora)
    )
    layer = model.base_model.model.proj
    assert type(layer) is peft_bnb_layer_type()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    randomize_adapters(model, gen)
    return model.train(), layer


def bnb_peft_llama(seed, gen, dtype=torch.float32, compute_dtype=torch.float32, adapter_dtype=torch.float32):
    """A tiny transformers Llama as bench/e2e.py builds "bitsandbytes_peft": its seven projections of
    each layer bitsandbytes Linear4bit (NF4, double quantization, blocksize 64, quantized on .to()),
    the model marked as loaded in 4 bits, PEFT's get_peft_model with LoRA on those projections."""
    peft = pytest.importorskip("peft", reason="PEFT is not installed")
    model = tiny_llama(seed).to(dtype)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.split(".")[-1] in PROJECTIONS:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64, module=layer)  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))
    model.requires_grad_(False)
    model.enable_input_require_grads()
    model.is_loaded_in_4bit = True
    model = peft.get_peft_model(
        model, peft.LoraConfig(target_modules=PROJECTIONS, r=8, lora_alpha=16, lora_dropout=0.0)
    )
    kinds = {type(m).__module__ for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert kinds == {"peft.tuners.lora.bnb"}, kinds
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    randomize_adapters(model, gen)
    return model.train()


def lora_layers(model):
    return [m for m in model.modules() if type(m) is peft_bnb_layer_type()]


# ---------------------------------------------------------------------------------------------
# Outputs, gradients and their references


def exact_weight(layer) -> torch.Tensor:
    """The 4-bit weight's values in float64: code x scale, computed in float32 (exact), not rounded
    to the weight's original dtype."""
    state = QuantState.from_bitsandbytes(layer.weight.quant_state)
    state.dtype = torch.float32
    return F.dequantize_4bit(layer.weight.data, state).double()


def base_outputs(layer, x, g):
    """y, dx and (when the bias trains) dbias of a Linear4bit."""
    x = x.detach().requires_grad_()
    y = layer(x)
    wrt = [x] + ([layer.bias] if layer.bias is not None and layer.bias.requires_grad else [])
    return [y.detach(), *torch.autograd.grad(y, wrt, g)]


def base_reference(layer, x, g):
    """base_outputs in float64 from the dequantized weight and x in the compute dtype."""
    dtype = layer.compute_dtype or x.dtype
    W = exact_weight(layer)
    xd = x.detach().to(dtype).double().requires_grad_()
    wrt = [xd]
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().to(dtype).double().requires_grad_(layer.bias.requires_grad)
        wrt += [bias] if layer.bias.requires_grad else []
    y = nn.functional.linear(xd, W, bias)
    return [y.detach(), *torch.autograd.grad(y, wrt, g.double())]


def lora_params(layer, name="default"):
    return [layer.lora_A[name].weight, layer.lora_B[name].weight]


def lora_outputs(layer, x, g):
    """y, dx, dA, dB of a PEFT LoRA layer."""
    x = x.detach().requires_grad_()
    y = layer(x)
    return [y.detach(), *torch.autograd.grad(y, [x, *lora_params(layer)], g)]


def lora_composed(layer, x, g, dtype):
    """lora_outputs of the layer composed of PyTorch ops with every input in `dtype` (float64: the
    reference), the gradients in the adapters' dtype."""
    base = layer.base_layer
    W = exact_weight(base).to(dtype)
    bias = base.bias.detach().to(dtype) if base.bias is not None else None
    A, B = (p.detach().to(dtype).requires_grad_() for p in lora_params(layer))
    xd = x.detach().to(dtype).requires_grad_()
    s = layer.scaling["default"]
    y = nn.functional.linear(xd, W, bias) + s * nn.functional.linear(nn.functional.linear(xd, A), B)
    grads = torch.autograd.grad(y, [xd, A, B], g.to(dtype))
    adapter_dtype = layer.lora_A["default"].weight.dtype
    return [y.detach(), grads[0], grads[1].to(adapter_dtype), grads[2].to(adapter_dtype)]


def counted(fn, *args):
    with OpCounter() as ops:
        out = fn(*args)
    return out, ops


def patched(fn, *args):
    qlora_ext.patch_bitsandbytes()
    try:
        return counted(fn, *args)
    finally:
        qlora_ext.unpatch_bitsandbytes()


# ---------------------------------------------------------------------------------------------
# The patched base layer

BASE_FORMATS = {
    "nf4-dq-uint8-bf16": dict(quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16),
    "fp4-bf16storage-fp32": dict(
        quant_type="fp4", compress_statistics=False, quant_storage=torch.bfloat16, compute_dtype=torch.float32
    ),
    "nf4-fp32storage-fp16": dict(
        quant_type="nf4", compress_statistics=False, quant_storage=torch.float32, compute_dtype=torch.float16
    ),
    "fp4-dq-nobias-fromx": dict(quant_type="fp4", compress_statistics=True, compute_dtype=None, bias=False),
    # bitsandbytes' CPU dequantize needs rows of a multiple of the blocksize (see helpers.tiny_llama)
    "nf4-dq-fp32weight-bs32": dict(weight_dtype=torch.float32, blocksize=32, compute_dtype=torch.float32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", BASE_FORMATS.values(), ids=BASE_FORMATS.keys())
def test_patched_linear4bit_is_bitsandbytes(gen, device, fmt):
    """On the CPU the forward is bitsandbytes' to the bit, and so is the gradient of x where the
    compute dtype is the weight's. Everywhere, every result is within twice bitsandbytes' error
    against float64: on CUDA bitsandbytes has kernels of its own; its backward rounds the weight to
    the weight's original dtype before casting it to the compute dtype (ours dequantizes to the
    compute dtype, as both forwards do); it sums the bias's gradient in two roundings (sum(0) in the
    bias's dtype, then autograd's reduction of the other leading dimensions). qlora_ext's product
    runs in the forward, and no bitsandbytes op."""
    layer = bnb_linear(96, 192, gen, device, **fmt)
    x = make_input((2, 5, 192), torch.float32 if fmt["compute_dtype"] is None else torch.bfloat16, device, gen)
    g = make_input((2, 5, 96), x.dtype, device, gen)
    theirs, their_ops = counted(base_outputs, layer, x, g)
    ours, our_ops = patched(base_outputs, layer, x, g)
    assert their_ops.of("qlora") == {} and their_ops.of("bitsandbytes"), their_ops.counts
    assert our_ops.of("qlora") == {"qlora::gemm_4bit": 1} and our_ops.of("bitsandbytes") == {}, our_ops.counts
    if device == "cpu":
        assert_bits_equal(ours[0], theirs[0], "y")
        if layer.compute_dtype == layer.weight.quant_state.dtype:
            assert_bits_equal(ours[1], theirs[1], "dx")
    exact = base_reference(layer, x, g)
    assert_within_twice_the_reference_error(ours, theirs, exact, ["y", "dx", "dbias"][: len(ours)])


def test_patched_linear4bit_without_gradients_and_in_eval_mode(gen):
    """Inference (eval, no grad) on the patched layer takes the product on the format as it is: the
    weight is not repacked for bitsandbytes' CPU kernel, and the result is bitsandbytes' product on
    that format (its training-mode path) to the bit."""
    layer = bnb_linear(96, 192, gen, compute_dtype=torch.bfloat16)
    x = make_input((7, 192), torch.bfloat16, "cpu", gen)
    expected = layer(x).detach()  # training mode: bitsandbytes' dequantize + matmul
    layer.eval()
    with torch.no_grad():
        y, ops = patched(layer, x)
    assert ops.of("qlora") == {"qlora::gemm_4bit": 1} and ops.of("bitsandbytes") == {}
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert_bits_equal(y, expected)


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="bitsandbytes repacks CPU weights only with AVX512-BF16")
def test_a_weight_repacked_by_bitsandbytes_keeps_its_forward(gen):
    """bitsandbytes' first eval-mode CPU forward without gradients repacks the weight for its own
    kernel (another layout, bfloat16 scales). A layer repacked before the patch keeps bitsandbytes'
    forward, and so does PEFT's layer on it; qlora_ext's functions refuse such a state by name."""
    _, layer = peft_layer(gen)
    base = layer.base_layer
    x = make_input((3, 192), torch.bfloat16, "cpu", gen)
    layer.eval()
    with torch.no_grad():
        y_base, y_lora = base(x), layer(x)
        assert base.weight.quant_state.packing_format_for_cpu
        (p_base, p_lora), ops = patched(lambda: (base(x), layer(x)))
    assert ops.of("qlora") == {} and ops.of("bitsandbytes"), ops.counts
    assert_bits_equal(p_base, y_base)
    assert_bits_equal(p_lora, y_lora)
    assert_each_raises(
        [
            (lambda: F.gemm_4bit(x, base.weight, base.weight.quant_state), ValueError, "repacked"),
            (lambda: QuantState.from_bitsandbytes(base.weight.quant_state), ValueError, "repacked"),
        ]
    )


def test_the_patched_layer_reads_its_weight_as_it_is_now(gen):
    """Nothing is cached: a new Params4bit (as PEFT's merge puts there), weight.data and quant_state
    swapped (as FSDP does), and scales changed in place are each seen by the next forward."""
    layer = bnb_linear(96, 192, gen, compute_dtype=torch.float32, compress_statistics=False, bias=False)
    x = make_input((4, 192), torch.float32, "cpu", gen)

    def both():
        with torch.no_grad():
            theirs = layer(x)
            ours, ops = patched(layer, x)
        assert ops.of("qlora") == {"qlora::gemm_4bit": 1}
        assert_bits_equal(ours, theirs)
        return ours

    first = both()
    qlora_ext.patch_bitsandbytes()
    layer(x)  # a patched forward before each change
    # 1. a new parameter, quantized by bitsandbytes on .to()
    layer.weight = bnb.nn.Params4bit(
        weight(96, 192, gen), requires_grad=False, quant_type="nf4", compress_statistics=False, module=layer
    )
    layer.to("cpu")
    qlora_ext.unpatch_bitsandbytes()
    second = both()
    assert not torch.equal(first, second)
    # 2. the parameter's data and its state replaced under it
    qlora_ext.patch_bitsandbytes()
    layer(x)
    packed, state = bnbF.quantize_4bit(weight(96, 192, gen), quant_type="fp4", compress_statistics=True)
    layer.weight.data = packed
    layer.weight.quant_state = state
    qlora_ext.unpatch_bitsandbytes()
    third = both()
    assert not torch.equal(second, third)
    # 3. the scales changed in place (power-of-two scaling: exact)
    layer = bnb_linear(96, 192, gen, compute_dtype=torch.float32, compress_statistics=False, bias=False)
    before = both()
    layer.weight.quant_state.absmax.mul_(2)
    assert_bits_equal(both(), before * 2)


@requires_cuda
@pytest.mark.cuda
def test_the_patched_layer_follows_to_device(gen):
    """.to("cuda") and back: the patched forward runs where the weight is now, on the state that
    bitsandbytes moved with it, and on the CPU again gives bitsandbytes' bits."""
    layer = bnb_linear(96, 192, gen, compute_dtype=torch.bfloat16)
    x = make_input((3, 192), torch.bfloat16, "cpu", gen)
    with torch.no_grad():
        expected = layer(x)
        qlora_ext.patch_bitsandbytes()
        assert_bits_equal(layer(x), expected)
        layer.cuda()
        assert layer.weight.quant_state.absmax.is_cuda
        y = layer(x.cuda())
        assert (y.float().cpu() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
        layer.cpu()
        assert_bits_equal(layer(x), expected)


# ---------------------------------------------------------------------------------------------
# PEFT's LoRA layer on it

LORA_CASES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-fp32adapters": (torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", LORA_CASES.values(), ids=LORA_CASES.keys())
def test_patched_peft_layer_runs_the_fused_op(gen, device, dtypes):
    """Forward and the gradients of x, A and B within twice the error (against float64) of the layer
    composed in the compute dtype, which is PEFT's own forward where the adapters have that dtype;
    one lora_linear and nothing else runs, no bitsandbytes op."""
    compute_dtype, adapter_dtype = dtypes
    _, layer = peft_layer(gen, device, adapter_dtype=adapter_dtype, compute_dtype=compute_dtype)
    x = make_input((3, 4, 192), compute_dtype, device, gen)
    g = make_input((3, 4, 96), compute_dtype, device, gen)
    theirs, their_ops = counted(lora_outputs, layer, x, g)
    ours, our_ops = patched(lora_outputs, layer, x, g)
    assert their_ops.of("qlora") == {} and their_ops.of("bitsandbytes"), their_ops.counts
    assert our_ops.of("qlora") == {"qlora::lora_linear": 1} and our_ops.of("bitsandbytes") == {}, our_ops.counts
    exact = lora_composed(layer, x, g, torch.float64)
    low = theirs if adapter_dtype == compute_dtype else lora_composed(layer, x, g, compute_dtype)
    assert_within_twice_the_reference_error(ours, low, exact, ["y", "dx", "dA", "dB"])


def test_patched_peft_layer_dropout(gen):
    """Training mode: the dropout probability of PEFT's nn.Dropout, as lora_linear draws its mask (a
    seed from torch's generator); eval mode: none."""
    _, layer = peft_layer(gen, lora={"lora_dropout": 0.25}, compute_dtype=torch.float32)
    base = layer.base_layer
    x = make_input((5, 192), torch.float32, "cpu", gen)
    A, B = lora_params(layer)

    def fused(p, seed=None):
        w = base.weight
        return F.lora_linear(x, w.data, w.quant_state, A, B, layer.scaling["default"], p, base.bias.float(), seed)

    torch.manual_seed(1234)
    y, ops = patched(layer, x)
    assert ops.of("qlora") == {"qlora::lora_linear": 1}
    torch.manual_seed(1234)
    expected = fused(0.25, F.dropout_seed(x.device))
    assert_bits_equal(y, expected)
    assert not torch.equal(y, fused(0.0))
    layer.eval()
    y_eval, _ = patched(layer, x)
    assert_bits_equal(y_eval, fused(0.0))


def fallback_cases():
    """(name, LoRA config, what to do to the layer (model, layer) -> forward kwargs)."""

    def merge(model, layer):
        with pytest.warns(UserWarning, match="Merge lora module to 4-bit"):
            layer.merge()
        return {}

    def disable(model, layer):
        layer.enable_adapters(False)
        return {}

    def two_adapters(model, layer):
        import peft

        model.add_adapter("other", peft.LoraConfig(target_modules=["proj"], r=4, lora_alpha=8))
        layer.set_adapter(["default", "other"])
        return {}

    def hook(model, layer):
        layer.base_layer.register_forward_hook(lambda m, args, out: out * 2)
        return {}

    def other_dropout(model, layer):
        layer.lora_dropout["default"] = nn.Sequential()
        return {}

    return {
        "dora": ({"use_dora": True}, None),
        "lora_bias": ({"lora_bias": True}, None),
        "merged": ({}, merge),
        "disabled": ({}, disable),
        "two-active-adapters": ({}, two_adapters),
        "adapter_names": ({}, lambda model, layer: {"adapter_names": ["default", "__base__", "default"]}),
        "hook-on-base": ({}, hook),
        "dropout-module-unknown": ({}, other_dropout),
    }


@pytest.mark.parametrize("case", fallback_cases().keys())
def test_peft_layer_falls_back_to_peft_forward(gen, case):
    """What the fused op does not do runs PEFT's own forward (its base layer on qlora_ext's product),
    with the same result as unpatched, to the bit on the CPU."""
    lora, prepare = fallback_cases()[case]
    model, layer = peft_layer(gen, lora=lora, compute_dtype=torch.float32)
    kwargs = prepare(model, layer) if prepare else {}
    x = make_input((3, 192), torch.float32, "cpu", gen)
    with torch.no_grad():
        theirs = layer(x, **kwargs)
        ours, ops = patched(lambda: layer(x, **kwargs))
    assert "qlora::lora_linear" not in ops.counts
    assert ops.counts["qlora::gemm_4bit"] >= 1, ops.counts  # the base layer, patched
    assert_bits_equal(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_patched_layers_under_torch_compile_fullgraph(gen, device):
    """The patched forwards trace whole (fullgraph=True), and the compiled layer gives the eager
    patched layer's output and gradients, to the bit."""
    _, layer = peft_layer(gen, device, compute_dtype=torch.bfloat16)
    x = make_input((5, 192), torch.bfloat16, device, gen)
    g = make_input((5, 96), torch.bfloat16, device, gen)
    qlora_ext.patch_bitsandbytes()
    backend = "aot_eager" if device == "cpu" else "inductor"
    for module in (layer, layer.base_layer):
        compiled = torch.compile(module, fullgraph=True, dynamic=False, backend=backend)
        eager = base_outputs(module, x, g) if module is layer.base_layer else lora_outputs(module, x, g)
        got = base_outputs(compiled, x, g) if module is layer.base_layer else lora_outputs(compiled, x, g)
        for a, b in zip(got, eager):
            assert_bits_equal(a, b)


# ---------------------------------------------------------------------------------------------
# patch / unpatch


def test_patch_unpatch_idempotence():
    lora_type = peft_bnb_layer_type()
    original_base, original_lora = bnb.nn.Linear4bit.forward, lora_type.forward
    classes = qlora_ext.patch_bitsandbytes()
    assert set(classes) == {bnb.nn.Linear4bit, lora_type}
    patched_base, patched_lora = bnb.nn.Linear4bit.forward, lora_type.forward
    assert patched_base is not original_base and patched_lora is not original_lora
    assert bnb.nn.LinearNF4.forward is patched_base and "forward" not in bnb.nn.LinearNF4.__dict__
    assert qlora_ext.patch_bitsandbytes() == classes  # again: nothing changes
    assert bnb.nn.Linear4bit.forward is patched_base and lora_type.forward is patched_lora
    assert qlora_ext.unpatch_bitsandbytes() is True
    assert bnb.nn.Linear4bit.forward is original_base and lora_type.forward is original_lora
    assert bnb.nn.Linear4bit.__dict__["forward"] is original_base and "forward" not in bnb.nn.LinearNF4.__dict__
    assert qlora_ext.unpatch_bitsandbytes() is False
    # PEFT left alone; then added by a later call
    assert qlora_ext.patch_bitsandbytes(peft=False) == (bnb.nn.Linear4bit,)
    assert lora_type.forward is original_lora
    assert set(qlora_ext.patch_bitsandbytes(peft=True)) == {bnb.nn.Linear4bit, lora_type}


def test_patched_twice_runs_once_and_unpatch_restores(gen):
    """Patched twice, a forward runs one fused op; after unpatch, bitsandbytes' and PEFT's forwards
    run again with the same results as before the patch; peft=False leaves PEFT's forward (its base
    layer on the patched product)."""
    _, layer = peft_layer(gen, compute_dtype=torch.float32)
    x = make_input((3, 192), torch.float32, "cpu", gen)
    with torch.no_grad():
        before, ops = counted(layer, x)
        assert ops.of("qlora") == {}
        qlora_ext.patch_bitsandbytes()
        qlora_ext.patch_bitsandbytes()
        _, ops = counted(layer, x)
        assert ops.of("qlora") == {"qlora::lora_linear": 1}
        qlora_ext.unpatch_bitsandbytes()
        after, ops = counted(layer, x)
        assert ops.of("qlora") == {} and ops.of("bitsandbytes")
        assert_bits_equal(after, before)
        qlora_ext.patch_bitsandbytes(peft=False)
        y, ops = counted(layer, x)
    assert ops.of("qlora") == {"qlora::gemm_4bit": 1} and ops.of("bitsandbytes") == {}
    assert_bits_equal(y, before)


def test_missing_packages_raise_import_error_naming_them(monkeypatch):
    peft_bnb_layer_type()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)
        with pytest.raises(ImportError, match="needs bitsandbytes"):
            qlora_ext.patch_bitsandbytes()
    assert qlora_ext.unpatch_bitsandbytes() is False
    for name in ["peft", "peft.tuners", "peft.tuners.lora", "peft.tuners.lora.bnb"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="needs PEFT"):
        qlora_ext.patch_bitsandbytes(peft=True)
    assert qlora_ext.patch_bitsandbytes() == (bnb.nn.Linear4bit,)  # peft=None: PEFT where installed


# ---------------------------------------------------------------------------------------------
# A tiny Llama with PEFT on bitsandbytes layers, as bench/e2e.py builds it


def loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.logits.detach(), out.loss.detach(), torch.autograd.grad(out.loss, params)


def test_tiny_llama_patched_is_unpatched(gen):
    """fp32: logits, loss and every adapter gradient of the patched model equal the unpatched ones
    within 1e-5 of their largest value (the fused op adds the adapter inside the product, PEFT after
    it: a different order of fp32 sums, measured at 4e-7 to 6e-7), with 14 lora_linear (7
    projections x 2 layers) and no bitsandbytes op in the forward."""
    pytest.importorskip("transformers")
    model = bnb_peft_llama(5, gen)
    ids = torch.randint(0, 96, (2, 16), generator=gen)
    logits, loss, grads = loss_and_grads(model, ids)
    (p_logits, p_loss, p_grads), ops = patched(loss_and_grads, model, ids)
    assert ops.of("qlora") == {"qlora::lora_linear": 14} and ops.of("bitsandbytes") == {}, ops.counts
    for ours, theirs, what in [(p_logits, logits, "logits"), (p_loss, loss, "loss")] + [
        (a, b, f"grad {i}") for i, (a, b) in enumerate(zip(p_grads, grads))
    ]:
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-5 * theirs.abs().max().item(), (what, err)


def test_tiny_llama_bf16_patched_within_twice_unpatched_error(gen):
    """bf16 model, compute and adapters: logits and adapter gradients of the patched model within
    twice the unpatched model's error (plus the rule's floor of 4 bf16 epsilons of the largest value)
    against the same model computed in fp32 (the same 4-bit codes and scales). With fp32 adapters the
    fused op computes the adapter products in bf16 where PEFT computes them in fp32: that layer is
    held to the bf16 composition in test_patched_peft_layer_runs_the_fused_op instead."""
    pytest.importorskip("transformers")
    model = bnb_peft_llama(6, gen, dtype=torch.bfloat16, compute_dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    reference = copy.deepcopy(model).float()
    for m in reference.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.float32
    ids = torch.randint(0, 96, (2, 16), generator=gen)
    exact_logits, _, exact_grads = loss_and_grads(reference, ids)
    logits, _, grads = loss_and_grads(model, ids)
    (p_logits, _, p_grads), ops = patched(loss_and_grads, model, ids)
    assert ops.of("qlora") == {"qlora::lora_linear": 14} and ops.of("bitsandbytes") == {}, ops.counts
    names = ["logits"] + [f"grad {i}" for i in range(len(grads))]
    assert_within_twice_the_reference_error([p_logits, *p_grads], [logits, *grads], [exact_logits, *exact_grads], names)


def train(model, steps, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    # eps 1e-6: an update of a gradient element within rounding of zero stays small (lr * g / eps)
    # instead of flipping between +-lr with the rounding's sign
    optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-6)
    losses = []
    for i in range(steps):
        loss = model(input_ids=ids[i % len(ids)], labels=ids[i % len(ids)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_steps_match_unpatched(gen):
    """Five AdamW steps (lr 1e-3) with gradient checkpointing (non-reentrant, as bench/e2e.py) on a
    tiny fp32 Llama with PEFT on bitsandbytes layers: the losses agree within 1e-5 relative and every
    adapter weight within 1e-4, a tenth of one step (AdamW moves each weight by about lr whatever its
    gradient's size, so a wrong gradient shows as a difference of order lr)."""
    pytest.importorskip("transformers")
    model = bnb_peft_llama(7, gen)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    twin = copy.deepcopy(model)
    ids = [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(3)]
    losses, weights = train(model, 5, ids)
    qlora_ext.patch_bitsandbytes()
    with OpCounter() as ops:
        p_losses, p_weights = train(twin, 5, ids)
    qlora_ext.unpatch_bitsandbytes()
    # each step's forward (checkpointing's recomputation runs inside the backward, which the counter
    # does not see)
    assert ops.of("qlora") == {"qlora::lora_linear": 5 * 14} and ops.of("bitsandbytes") == {}, ops.counts
    assert losses[3] < losses[0]  # the same batch, three steps later
    for a, b in zip(p_losses, losses):
        assert abs(a - b) <= 1e-5 * abs(b), (p_losses, losses)
    for name in weights:
        assert (p_weights[name] - weights[name]).abs().max().item() <= 1e-4, name


# ---------------------------------------------------------------------------------------------
# bitsandbytes' QuantState in qlora_ext's functions

STATE_FORMATS = {
    "nf4-dq-bf16": ("nf4", True, torch.uint8, torch.bfloat16),
    "fp4-fp16": ("fp4", False, torch.uint8, torch.float16),
    "nf4-bf16storage-fp32": ("nf4", False, torch.bfloat16, torch.float32),
    "fp4-dq-fp32storage-bf16": ("fp4", True, torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", STATE_FORMATS.values(), ids=STATE_FORMATS.keys())
def test_functions_take_bitsandbytes_state(gen, device, fmt):
    """Every function given bitsandbytes' QuantState gives the bits it gives with ours for the same
    weight (quantized by each library: the same bytes, the format's contract)."""
    quant_type, nested, storage, dtype = fmt
    w = weight(96, 192, gen, dtype).to(device)
    packed, theirs = bnbF.quantize_4bit(
        w, blocksize=64, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )
    our_packed, ours = F.quantize_4bit(w, 64, quant_type, nested, quant_storage=storage)
    assert_bits_equal(packed, our_packed, "packed")
    x = make_input((5, 192), dtype, device, gen)
    g = make_input((5, 96), dtype, device, gen)
    bias = make_input((96,), dtype, device, gen)
    A = make_input((8, 192), torch.float32, device, gen) * 0.05
    B = make_input((96, 8), torch.float32, device, gen) * 0.05
    seed = F.dropout_seed(torch.device(device))

    def lora_grads(state):
        inputs = [t.detach().requires_grad_() for t in (x, A, B)]
        y = F.lora_linear(inputs[0], packed, state, inputs[1], inputs[2], 2.0, 0.1, bias, seed)
        return [y.detach(), *torch.autograd.grad(y, inputs, g)]

    calls = {
        "dequantize_4bit": lambda s: F.dequantize_4bit(packed, s),
        "dequantize_absmax": lambda s: F.dequantize_absmax(s),
        "gemm_4bit": lambda s: F.gemm_4bit(x, packed, s, bias),
        "gemm_4bit_transposed": lambda s: F.gemm_4bit_transposed(g, packed, s),
        "matmul_4bit": lambda s: F.matmul_4bit(x, packed.t(), s, bias=bias),
        "lora_linear": lora_grads,
    }
    for name, call in calls.items():
        got, expected = call(theirs), call(ours)
        for i, (a, b) in enumerate(zip(got, expected) if isinstance(got, list) else [(got, expected)]):
            assert_bits_equal(a, b, f"{name} {i}")


def test_bitsandbytes_state_is_read_as_it_is_now(gen):
    """Nothing is converted or cached: a bitsandbytes state changed after a call is read as it is."""
    packed, state = bnbF.quantize_4bit(weight(96, 192, gen), compress_statistics=False, quant_type="nf4")
    first = F.dequantize_4bit(packed, state)
    state.absmax = state.absmax * 2  # a new tensor, as bitsandbytes' .to() puts there
    assert_bits_equal(F.dequantize_4bit(packed, state), first * 2)
    state.absmax.mul_(0.5)  # and in place
    assert_bits_equal(F.dequantize_4bit(packed, state), first)


def test_bitsandbytes_states_that_cannot_be_read(gen):
    packed, state = bnbF.quantize_4bit(weight(96, 192, gen, torch.float32), quant_type="nf4")
    repacked_w, repacked = bnbF._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
    shapeless = copy.deepcopy(state)
    shapeless.shape = None
    x = torch.zeros(2, 192)
    assert_each_raises(
        [
            (lambda: F.gemm_4bit(x, repacked_w, repacked), ValueError, "repacked for bitsandbytes' CPU kernel"),
            (lambda: F.dequantize_4bit(packed, shapeless), ValueError, "quant_state.shape is not set"),
            (lambda: F.gemm_4bit(x, packed, object()), TypeError, "qlora_ext's or bitsandbytes'"),
            (lambda: F.dequantize_absmax(object()), TypeError, "qlora_ext's or bitsandbytes'"),
            (lambda: QuantState.from_bitsandbytes(object()), TypeError, "bitsandbytes.functional.QuantState"),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Our QuantState answers bitsandbytes' look-ups


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_our_state_answers_bitsandbytes_lookups(gen, quant_type, nested):
    """Our state and bitsandbytes' of the same weight answer the same attributes, legacy indexing,
    packed entry names (FSDP resolves "weight.quant_state.bitsandbytes__nf4" with getattr) and
    serialized dicts; compare equal; convert both ways sharing tensors; bitsandbytes' functions take
    ours."""
    w = weight(96, 192, gen)
    packed, theirs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    _, ours = F.quantize_4bit(w, 64, quant_type, nested)

    def same(a, b, what):
        if isinstance(a, torch.Tensor):
            assert_bits_equal(a, b, what)
        elif isinstance(a, (list, tuple)) and any(isinstance(v, (torch.Tensor, QuantState)) for v in a):
            assert len(a) == len(b), what
            for i, (u, v) in enumerate(zip(a, b)):
                same(u, v, f"{what}[{i}]")
        elif isinstance(a, QuantState):
            assert a == b, what
        else:
            assert a == b, (what, a, b)

    for attr in ["absmax", "code", "nested", "offset", "quant_type", "blocksize", "shape", "dtype"]:
        same(getattr(ours, attr), getattr(theirs, attr), attr)
    if nested:
        for attr in ["absmax", "code", "blocksize", "dtype", "nested", "shape", "quant_type", "offset"]:
            same(getattr(ours.state2, attr), getattr(theirs.state2, attr), f"state2.{attr}")
    for i in range(6):
        same(ours[i], theirs[i], f"[{i}]")
    key = f"bitsandbytes__{quant_type}"
    other = "bitsandbytes__fp4" if quant_type == "nf4" else "bitsandbytes__nf4"
    assert_bits_equal(getattr(ours, key), getattr(theirs, key))
    assert hasattr(ours, other) is hasattr(theirs, other) is False
    holder = nn.Module()
    holder.quant_state = ours
    assert_bits_equal(functools.reduce(getattr, f"quant_state.{key}".split("."), holder), getattr(theirs, key))
    with pytest.raises(AttributeError, match="no attribute 'quant_maps'"):
        ours.quant_maps  # noqa: B018
    for packed_form in (False, True):
        a, b = ours.as_dict(packed=packed_form), theirs.as_dict(packed=packed_form)
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k], k)
    assert set(QuantState.valid_qs_keys) == set(bnbF.QuantState.valid_qs_keys)
    assert set(QuantState.valid_qs_type_keys) == set(bnbF.QuantState.valid_qs_type_keys)
    # equality, and conversion both ways without copies
    assert ours == theirs and theirs == ours.to_bitsandbytes()
    converted = QuantState.from_bitsandbytes(theirs)
    assert converted == ours and converted.absmax is theirs.absmax
    back = ours.to_bitsandbytes()
    assert isinstance(back, bnbF.QuantState) and back.absmax is ours.absmax
    if nested:
        assert converted.state2.absmax is theirs.state2.absmax and converted.offset is theirs.offset
    changed = copy.deepcopy(theirs)
    changed.blocksize = 128
    assert ours != changed
    # bitsandbytes' functions on ours
    assert_bits_equal(bnbF.dequantize_4bit(packed, ours), bnbF.dequantize_4bit(packed, theirs))
    x = make_input((3, 192), torch.bfloat16, "cpu", gen)
    assert_bits_equal(bnb.matmul_4bit(x, packed.t(), ours), bnb.matmul_4bit(x, packed.t(), theirs))
    # copies still work with the look-ups in place
    for copied in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert copied == ours and math.prod(copied.shape) == 96 * 192
