"""bitsandbytes' objects with qlora_ext: bitsandbytes' QuantState passed to qlora_ext's functions (the
same bits as ours), and our QuantState answering bitsandbytes' look-ups."""

from __future__ import annotations

import copy
import functools
import math
import pickle

import pytest
import torch
from torch import nn

from qlora_ext import QuantState, functional as F

from helpers import DEVICES, assert_bits_equal, assert_each_raises, make_input, random_weights

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
import bitsandbytes.functional as bnbF  # noqa: E402  (after the skip)


def weight(n, k, gen, dtype=torch.bfloat16):
    w = random_weights(n * k, torch.float32, "cpu", gen).reshape(n, k)
    return (w * (0.05 / w.pow(2).mean().sqrt())).to(dtype)


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
