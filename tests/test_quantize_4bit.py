"""quantize_4bit / dequantize_4bit: bit-exact with bitsandbytes 0.50.2 on each device, against a
float64 reference, through opcheck, compile and CUDA graphs, and on bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import qlora_ext
from qlora_ext import QuantState, functional as Q
from qlora_ext.codebooks import code_tensor

from helpers import (
    DEVICES,
    HAS_CUDA,
    assert_bits_equal,
    assert_state_equal,
    needs_caching_allocator,
    poison,
    random_weights,
    reference_dequantize,
    requires_cuda,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]


def _bnb_quantize(bnbf, x, blocksize, quant_type, dq):
    return bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)


def _zero_sign_matters(device, quant_type) -> bool:
    # bitsandbytes' CPU path decodes FP4's code 0b1000 to +0.0 (as we do there) or, under AVX-512,
    # to -0.0 (README: "Signed zero").
    return not (device == "cpu" and quant_type == "fp4")


def _tiniest(dtype) -> float:
    return {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}[dtype]


def _check_against_bnb(bnbf, x, blocksize, quant_type, dq, what):
    p_ref, s_ref = _bnb_quantize(bnbf, x, blocksize, quant_type, dq)
    poison(x.device.type, x.numel())
    p, s = Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    assert_bits_equal(p, p_ref, f"{what} packed")
    assert_state_equal(s, s_ref, what)
    d_ref = bnbf.dequantize_4bit(p_ref, s_ref).reshape(x.shape)  # bnb's CPU path returns 1-D shapes as (1, n)
    poison(x.device.type, x.numel() * x.element_size())
    d = Q.dequantize_4bit(p, s)
    assert d.shape == x.shape and d.dtype == x.dtype
    s_from_bnb = QuantState.from_dict(s_ref.as_dict(packed=True), device=x.device)  # bnb's state reads into ours
    d_from_bnb = Q.dequantize_4bit(p_ref, s_from_bnb)
    if x.device.type == "cuda":
        assert_bits_equal(d, d_ref, f"{what} dequantized")
        assert_bits_equal(d_from_bnb, d_ref, f"{what} dequantized from bnb's state")
    else:
        # bitsandbytes' CPU dequantization depends on the instruction set it picks (under AVX-512 the
        # sign of FP4's zero and the rounding of float16 subnormals change, and on the H100 machine's
        # CPU one float16 value of 0.066 came out one unit in the last place away); ours is the
        # definition, exactly, which its portable path also computes, and within one unit in the last
        # place (one subnormal step near zero) of any of them.
        expected = reference_dequantize(p, s)
        assert_bits_equal(d, expected, f"{what} dequantized")
        assert_bits_equal(d_from_bnb, expected, f"{what} dequantized from bnb's state")
        torch.testing.assert_close(
            d.float(), d_ref.float(), rtol=torch.finfo(x.dtype).eps, atol=_tiniest(x.dtype), equal_nan=True
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bitsandbytes(bnbf, gen, device, dtype, blocksize, quant_type, dq):
    # Several blocks, a partial last block and an odd element count.
    n = (
        blocksize * int(torch.randint(3, 40, (1,), generator=gen))
        + int(torch.randint(1, blocksize, (1,), generator=gen))
        | 1
    )
    x = random_weights(n, dtype, device, gen, blocksize)
    _check_against_bnb(bnbf, x, blocksize, quant_type, dq, f"n={n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bitsandbytes_shapes(bnbf, gen, device, dtype, dq):
    for shape in [(1,), (2,), (3,), (63,), (64,), (65,), (7, 13), (3, 5, 129), (1000, 37), (4097,)]:
        x = random_weights(math.prod(shape), dtype, device, gen).reshape(shape)
        for blocksize in (32, 64, 4096):
            _check_against_bnb(bnbf, x, blocksize, "nf4", dq, f"shape={shape} bs={blocksize}")


def _adversarial(dtype, device, gen, blocksize):
    """Blocks built to hit every edge: values on and next to each code boundary (the midpoints that
    bitsandbytes' CPU path uses and the pivots its CUDA path compares with), zero blocks, signed
    zeros, denormals, tiny and huge scales, all-equal blocks, single nonzero entries."""
    bounds = []
    for qt in QUANT_TYPES:
        c = torch.sort(code_tensor(qt)).values
        bounds.append((c[:-1] + c[1:]) / 2)
    pivots = torch.tensor(
        [-0.84809643030166625977, -0.61063289642333984375, -0.459995269775390625, -0.33967941999435424805,
         -0.23460739850997924805, -0.13791173696517944336, -0.045525018125772476196, 0.039790149778127670288,
         0.12025525420904159546, 0.20352125167846679688, 0.29201376438140869141, 0.38931253552436828613,
         0.50166338682174682617, 0.64278692007064819336, 0.86147838830947875977, 0.0026041700039058923721,
         0.0859375, 0.20833332836627960205, 0.2916666567325592041, 0.4166666865348815918, 0.58333301544189453125,
         0.8333333134651184082], dtype=torch.float32)  # fmt: skip
    b = torch.cat(bounds + [pivots, -pivots])
    edges = torch.cat([b, b.nextafter(torch.tensor(2.0)), b.nextafter(torch.tensor(-2.0))])
    blocks = []
    # Edges scaled by an absmax of 1 (exactly representable in every dtype), in blocks of blocksize.
    for start in range(0, edges.numel(), blocksize - 1):
        chunk = edges[start : start + blocksize - 1]
        blk = torch.cat([torch.ones(1), chunk, torch.zeros(blocksize - 1 - chunk.numel())])
        blocks.append(blk[torch.randperm(blocksize, generator=gen)])
    blocks.append(torch.zeros(blocksize))
    blocks.append(-torch.zeros(blocksize))
    blocks.append(torch.full((blocksize,), 0.37))
    blocks.append(torch.full((blocksize,), -2.5))
    one = torch.zeros(blocksize)
    one[int(torch.randint(0, blocksize, (1,), generator=gen))] = -3.0
    blocks.append(one)
    blocks.append(torch.randn(blocksize, generator=gen) * 1e-30)
    blocks.append(torch.randn(blocksize, generator=gen) * 1e-40)  # float32 denormals
    blocks.append(torch.randn(blocksize, generator=gen) * 1e-6)  # float16 denormals
    blocks.append(torch.randn(blocksize, generator=gen) * 1e30)
    x = torch.cat(blocks)
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_values_match_bitsandbytes(bnbf, gen, device, dtype, blocksize, quant_type, dq):
    x = _adversarial(dtype, device, gen, blocksize)
    _check_against_bnb(bnbf, x, blocksize, quant_type, dq, "adversarial")
    _check_against_bnb(bnbf, x[:-3], blocksize, quant_type, dq, "adversarial, odd tail")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nan_and_inf_as_bitsandbytes(bnbf, gen, device, quant_type):
    """NaN and Inf must neither crash nor reach outside their block; each device does what
    bitsandbytes does there (README: "NaN and Inf")."""
    blocksize = 64
    x = random_weights(blocksize * 8 + 5, torch.float32, device, gen)
    x[3] = float("nan")
    x[blocksize + 7] = float("inf")
    x[2 * blocksize + 1] = float("-inf")
    x[3 * blocksize : 4 * blocksize] = float("nan")
    x[-2] = float("nan")
    for dq in (False, True):
        _check_against_bnb(bnbf, x, blocksize, quant_type, dq, "nan/inf")
    p, s = Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    d = Q.dequantize_4bit(p, s)
    clean = [4, 5, 6, 7]  # blocks without NaN or Inf dequantize as if the others were not there
    for b in clean:
        pb, sb = Q.quantize_4bit(x[b * blocksize : (b + 1) * blocksize], blocksize, quant_type, False)
        assert_bits_equal(d[b * blocksize : (b + 1) * blocksize], Q.dequantize_4bit(pb, sb), f"block {b}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_codes_are_nearest_float64(gen, device, quant_type, blocksize):
    """Each element's code is the nearest code value to x / absmax, computed in float64; the slack
    2**-21 covers the float32 scaling (a correctly rounded reciprocal and product on the CPU, the
    GPU's approximate reciprocal within 2 ulp on CUDA, as bitsandbytes)."""
    n = blocksize * 64 + 17
    x = random_weights(n, torch.float32, device, gen, blocksize)
    p, s = Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    code = code_tensor(quant_type).double()
    packed = p.cpu().reshape(-1).long()
    nib = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    absmax = s.absmax.cpu().double().repeat_interleave(blocksize)[:n]
    xd = x.cpu().double()
    assert torch.equal(s.absmax.cpu().double(), torch.stack([b.abs().max() for b in xd.split(blocksize)]))
    v = xd / absmax
    err_chosen = (v - code[nib]).abs()
    err_best = (v[:, None] - code[None, :]).abs().min(1).values
    assert bool((err_chosen <= err_best + 2.0**-21).all()), f"max excess {(err_chosen - err_best).max().item()}"


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_error_matches_reference(gen, device):
    """||W - deq(q(W))|| / ||W|| of NF4 at blocksize 64 with double quantization on Gaussian weights
    is 0.092 for bitsandbytes (spec, measured on 4096x4096 to 28672x8192); ours is the same format."""
    w = torch.randn(1024, 1024, generator=gen).to(device)
    p, s = Q.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    d = Q.dequantize_4bit(p, s).double()
    rel = ((w.double() - d).norm() / w.double().norm()).item()
    assert 0.088 < rel < 0.096, rel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_and_offset_views(gen, device, dtype):
    base = random_weights(130 * 257, dtype, device, gen).reshape(130, 257)
    for name, view in [("transposed", base.t()), ("strided", base[:, ::2]), ("offset", base.reshape(-1)[1:])]:
        assert not view.is_contiguous() or view.data_ptr() % 16 != 0, name
        for dq in (False, True):
            p, s = Q.quantize_4bit(view, blocksize=64, compress_statistics=dq)
            p_ref, s_ref = Q.quantize_4bit(view.contiguous().clone(), blocksize=64, compress_statistics=dq)
            assert_bits_equal(p, p_ref, name)
            assert s == s_ref, name
            assert Q.dequantize_4bit(p, s).shape == view.shape


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_packed_dequantizes(gen, device):
    x = random_weights(64 * 33, torch.bfloat16, device, gen)
    p, s = Q.quantize_4bit(x, blocksize=64, compress_statistics=True)
    shifted = torch.empty(p.numel() + 1, dtype=torch.uint8, device=device)[1:].reshape(p.shape)
    shifted.copy_(p)
    assert_bits_equal(Q.dequantize_4bit(shifted, s), Q.dequantize_4bit(p, s), "misaligned packed")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
def test_empty_tensor(device, dq):
    x = torch.empty(0, 4096, device=device, dtype=torch.bfloat16)
    p, s = Q.quantize_4bit(x, compress_statistics=dq)
    assert p.shape == (0, 1) and p.dtype == torch.uint8
    assert s.absmax.numel() == 0
    d = Q.dequantize_4bit(p, s)
    assert d.shape == (0, 4096) and d.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(gen, device):
    x = random_weights(4096 * 17 + 3, torch.bfloat16, device, gen)
    p1, s1 = Q.quantize_4bit(x, compress_statistics=True)
    p2, s2 = Q.quantize_4bit(x, compress_statistics=True)
    assert_bits_equal(p1, p2, "packed")
    assert s1 == s2
    assert_bits_equal(Q.dequantize_4bit(p1, s1), Q.dequantize_4bit(p2, s2), "dequantized")


def test_cpu_threads_do_not_change_bits(gen):
    x = random_weights(64 * 5000 + 9, torch.float32, "cpu", gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p1, s1 = Q.quantize_4bit(x)
        d1 = Q.dequantize_4bit(p1, s1)
        torch.set_num_threads(max(2, threads))
        p2, s2 = Q.quantize_4bit(x)
        d2 = Q.dequantize_4bit(p2, s2)
    finally:
        torch.set_num_threads(threads)
    assert_bits_equal(p1, p2, "packed")
    assert s1 == s2
    assert_bits_equal(d1, d2, "dequantized")


@pytest.mark.parametrize("device", DEVICES)
def test_quant_storage_views(gen, device):
    x = random_weights(64 * 20, torch.bfloat16, device, gen)
    p, s = Q.quantize_4bit(x, quant_storage=torch.bfloat16)
    assert p.dtype == torch.bfloat16 and p.shape == (320, 1)
    p8, _ = Q.quantize_4bit(x)
    assert torch.equal(p.reshape(-1).view(torch.uint8), p8.reshape(-1))
    assert_bits_equal(Q.dequantize_4bit(p, s), Q.dequantize_4bit(p8, s), "dequantized from a bf16 view")


# ---------------------------------------------------------------------------------------------
# QuantState serialization


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
def test_state_dict_is_bitsandbytes(bnbf, gen, device, quant_type, dq):
    x = random_weights(96 * 64, torch.bfloat16, device, gen).reshape(96, 64)
    p, s = Q.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    ours = s.as_dict(packed=True)
    _, s_ref = bnbf.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=dq)
    theirs = s_ref.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for k in ours:
        assert_bits_equal(ours[k], theirs[k], k)  # the JSON entry too, byte for byte
    plain = s.as_dict(packed=False)
    plain_ref = s_ref.as_dict(packed=False)
    assert {k: v for k, v in plain.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in plain_ref.items() if not isinstance(v, torch.Tensor)
    }
    # Ours into bitsandbytes and back, with the module prefix a state dict carries.
    prefixed = {f"weight.{k}": v for k, v in ours.items()}
    s_bnb = bnbf.QuantState.from_dict(dict(prefixed), device=torch.device(device))
    assert_bits_equal(bnbf.dequantize_4bit(p, s_bnb), Q.dequantize_4bit(p, s), "bnb dequantizes our state",
                      signed_zeros=_zero_sign_matters(device, quant_type))  # fmt: skip
    s_back = QuantState.from_dict(prefixed, device=device)
    assert s_back == s
    assert set(prefixed) == {f"weight.{k}" for k in ours}  # from_dict left its input alone


def test_state_dict_roundtrip_unpacked_and_to(gen):
    x = random_weights(64 * 10, torch.float16, "cpu", gen).reshape(10, 64)
    _, s = Q.quantize_4bit(x, quant_type="fp4")
    s2 = QuantState.from_dict(s.as_dict(packed=False))
    assert s2 == s
    assert s2.to("cpu") is s2
    if HAS_CUDA:
        s3 = QuantState.from_dict(s.as_dict(packed=True), device="cuda")
        assert s3.absmax.is_cuda and s3.state2.absmax.is_cuda and s3.offset.is_cuda
        assert s3.to("cpu") == s


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda d: d.pop("weight.absmax"), ValueError, "absmax"),
        (lambda d: d.update({"weight.absmax": d["weight.absmax"].float()}), TypeError, "absmax must be torch.uint8"),
        (lambda d: d.update({"weight.absmax": d["weight.absmax"][:-1]}), ValueError, "absmax must have"),
        (lambda d: d.update({"weight.nested_absmax": d["weight.nested_absmax"].half()}), TypeError, "nested_absmax"),
        (lambda d: d.update({"weight.bogus": torch.zeros(1)}), ValueError, "unknown quant_state entries"),
        (lambda d: d.pop("weight.quant_state.bitsandbytes__nf4"), ValueError, "quant_state"),
        (
            lambda d: d.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)}),
            ValueError,
            "JSON",
        ),
    ],
)
def test_state_from_dict_rejects_bad_entries(gen, mutate, error, match):
    x = random_weights(64 * 300, torch.bfloat16, "cpu", gen).reshape(300, 64)
    _, s = Q.quantize_4bit(x)
    d = {f"weight.{k}": v for k, v in s.as_dict(packed=True).items()}
    mutate(d)
    with pytest.raises(error, match=match):
        QuantState.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Bad input: a Python exception naming the problem, the process alive.


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(gen, device):
    x = random_weights(64 * 8, torch.float32, device, gen).reshape(8, 64)
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16"):
        Q.quantize_4bit(torch.ones(64, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="A must be"):
        Q.quantize_4bit(torch.ones(64, dtype=torch.complex64, device=device))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Q.quantize_4bit(x, blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        Q.quantize_4bit(x, quant_type="int4")
    # The ops themselves check too, for callers that skip the wrappers.
    with pytest.raises(TypeError, match="A must be float32"):
        torch.ops.qlora.quantize_4bit(torch.ones(64, dtype=torch.int64, device=device), 64, "nf4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        torch.ops.qlora.quantize_4bit(x, 100, "nf4")
    with pytest.raises(ValueError, match="quant_type must be"):
        torch.ops.qlora.quantize_4bit(x, 64, "nf8")

    p, s = Q.quantize_4bit(x, compress_statistics=True)
    with pytest.raises(ValueError, match="packed has 255 bytes but a shape of 512 elements needs 256"):
        Q.dequantize_4bit(p[:-1], s)
    s_bad = QuantState.from_dict(s.as_dict(packed=True))
    s_bad.shape = torch.Size((8, 65))
    with pytest.raises(ValueError, match="packed has 256 bytes but a shape of 520 elements needs 260"):
        Q.dequantize_4bit(p, s_bad)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        Q.dequantize_4bit(p, {"absmax": s.absmax})
    with pytest.raises(ValueError, match="packed has"):
        torch.ops.qlora.dequantize_4bit(p, s.absmax, s.state2.absmax, s.state2.code, s.offset, 64, 256, "nf4", [8, 66],
                                        torch.float32)  # fmt: skip
    with pytest.raises(TypeError, match="packed must be uint8"):
        torch.ops.qlora.dequantize_4bit(p.float(), s.absmax, s.state2.absmax, s.state2.code, s.offset, 64, 256, "nf4",
                                        [8, 64], torch.float32)  # fmt: skip
    with pytest.raises(TypeError, match="absmax must be uint8 with double quantization"):
        torch.ops.qlora.dequantize_4bit(p, s.absmax.float(), s.state2.absmax, s.state2.code, s.offset, 64, 256, "nf4",
                                        [8, 64], torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="needs nested_absmax, nested_code and offset together"):
        torch.ops.qlora.dequantize_4bit(p, s.absmax, s.state2.absmax, None, s.offset, 64, 256, "nf4", [8, 64],
                                        torch.float32)  # fmt: skip
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        torch.ops.qlora.dequantize_4bit(p, s.absmax, s.state2.absmax, s.state2.code, s.offset, 64, 256, "nf4", [8, 64],
                                        torch.int32)  # fmt: skip
    with pytest.raises(ValueError, match="absmax must be 1-D"):
        torch.ops.qlora.quantize_absmax(torch.ones(2, 2, device=device), 256)
    with pytest.raises(ValueError, match="blocksize must be 256"):
        torch.ops.qlora.quantize_absmax(torch.ones(8, device=device), 64)
    # Still alive and correct afterwards.
    assert Q.dequantize_4bit(p, s).shape == x.shape


@requires_cuda
@pytest.mark.cuda
def test_device_mismatch_is_an_error(gen):
    x = random_weights(64 * 8, torch.float32, "cuda", gen)
    p, s = Q.quantize_4bit(x)
    with pytest.raises(ValueError, match="packed is on cuda:0 but quant_state is on cpu"):
        Q.dequantize_4bit(p, QuantState.from_dict(s.as_dict(packed=True), device="cpu"))
    with pytest.raises(ValueError, match="absmax is on cpu but packed is on cuda"):
        torch.ops.qlora.dequantize_4bit(p, s.absmax.cpu(), s.state2.absmax, s.state2.code, s.offset, 64, 256, "nf4",
                                        [512], torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="offset is on cpu but packed is on cuda"):
        torch.ops.qlora.dequantize_4bit(p, s.absmax, s.state2.absmax, s.state2.code, s.offset.cpu(), 64, 256, "nf4",
                                        [512], torch.float32)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The op contract: opcheck, meta tensors, torch.compile, CUDA graphs.


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    x = random_weights(64 * 40 + 3, torch.bfloat16, device, gen).reshape(-1)
    torch.library.opcheck(torch.ops.qlora.quantize_4bit.default, (x, 64, "nf4"))
    packed, absmax = torch.ops.qlora.quantize_4bit(x, 64, "fp4")
    torch.library.opcheck(torch.ops.qlora.quantize_absmax.default, (absmax, 256))
    q, nested, offset = torch.ops.qlora.quantize_absmax(absmax, 256)
    code2 = qlora_ext.codebooks.dynamic_map_tensor(device)
    torch.library.opcheck(torch.ops.qlora.dequantize_absmax.default, (q, nested, code2, offset, 256))
    shape = [x.numel()]
    torch.library.opcheck(
        torch.ops.qlora.dequantize_4bit.default,
        (packed, absmax, None, None, None, 64, 256, "fp4", shape, torch.float16),
    )
    torch.library.opcheck(
        torch.ops.qlora.dequantize_4bit.default,
        (packed, q, nested, code2, offset, 64, 256, "fp4", shape, torch.bfloat16),
    )


def test_meta_tensors():
    x = torch.empty(300, 70, device="meta", dtype=torch.bfloat16)
    packed, absmax = torch.ops.qlora.quantize_4bit(x, 64, "nf4")
    assert packed.shape == (10500, 1) and packed.dtype == torch.uint8 and absmax.shape == (329,)
    q, nested, offset = torch.ops.qlora.quantize_absmax(absmax, 256)
    assert q.shape == (329,) and nested.shape == (2,) and offset.shape == ()
    out = torch.ops.qlora.dequantize_4bit(packed, q, nested, torch.empty(256, device="meta"), offset, 64, 256, "nf4",
                                          [300, 70], torch.bfloat16)  # fmt: skip
    assert out.shape == (300, 70) and out.dtype == torch.bfloat16 and out.is_meta


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(gen, device):
    def roundtrip(w):
        packed, absmax = torch.ops.qlora.quantize_4bit(w, 64, "nf4")
        q, nested, offset = torch.ops.qlora.quantize_absmax(absmax, 256)
        code2 = torch.ops.qlora.dequantize_absmax(q, nested, code, offset, 256)
        return torch.ops.qlora.dequantize_4bit(packed, code2, None, None, None, 64, 256, "nf4", w.shape, w.dtype) * 2

    code = qlora_ext.codebooks.dynamic_map_tensor(device)
    w = random_weights(64 * 64, torch.bfloat16, device, gen).reshape(64, 64)
    compiled = torch.compile(
        roundtrip, fullgraph=True, dynamic=False, backend="aot_eager" if device == "cpu" else "inductor"
    )
    assert_bits_equal(compiled(w), roundtrip(w), "compiled")


@needs_caching_allocator
@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay(gen):
    x = random_weights(64 * 1000 + 5, torch.bfloat16, "cuda", gen)
    static_x = x.clone()
    Q.quantize_4bit(static_x)  # warm-up outside the graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            p, st = Q.quantize_4bit(static_x)
            Q.dequantize_4bit(p, st)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        p_g, st_g = Q.quantize_4bit(static_x)
        d_g = Q.dequantize_4bit(p_g, st_g)
    for _ in range(2):
        new = random_weights(x.numel(), torch.bfloat16, "cuda", gen)
        static_x.copy_(new)
        g.replay()
        p_e, st_e = Q.quantize_4bit(new)
        assert_bits_equal(p_g, p_e, "graph packed")
        assert st_g == st_e
        assert_bits_equal(d_g, Q.dequantize_4bit(p_e, st_e), "graph dequantized")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.slow
def test_past_2_to_the_31_elements(gen):
    """int64 indexing: a bf16 tensor of 2**31 + 12325 elements, checked block by block against the
    same blocks quantized on their own (blocks are independent without double quantization)."""
    blocksize = 64
    n = 2**31 + 3 * 4096 + 37
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    p, s = Q.quantize_4bit(x, blocksize=blocksize, compress_statistics=False)
    torch.cuda.synchronize()
    tail_start = (n // blocksize - 100) * blocksize
    mid_start = (2**31 // blocksize - 50) * blocksize
    for start in (0, mid_start, tail_start):
        stop = min(n, start + 200 * blocksize)
        pp, ss = Q.quantize_4bit(x[start:stop].clone(), blocksize=blocksize, compress_statistics=False)
        assert_bits_equal(p.reshape(-1)[start // 2 : (stop + 1) // 2], pp.reshape(-1), f"packed from {start}")
        assert_bits_equal(s.absmax[start // blocksize : -(-stop // blocksize)], ss.absmax, f"absmax from {start}")
    d = Q.dequantize_4bit(p, s)
    for start in (mid_start, tail_start):
        stop = min(n, start + 200 * blocksize)
        pp, ss = Q.quantize_4bit(x[start:stop].clone(), blocksize=blocksize, compress_statistics=False)
        assert_bits_equal(d[start:stop], Q.dequantize_4bit(pp, ss), f"dequantized from {start}")
    del d
    # With double quantization: the fused kernel against the scales decoded on their own.
    p2, s2 = Q.quantize_4bit(x, blocksize=blocksize, compress_statistics=True)
    d2 = Q.dequantize_4bit(p2, s2)
    absmax = Q.dequantize_absmax(s2)
    start = tail_start
    tail_state = QuantState(absmax[start // blocksize :].clone(), shape=(n - start,), code=s2.code,
                            blocksize=blocksize, quant_type="nf4", dtype=torch.bfloat16)  # fmt: skip
    assert_bits_equal(d2[start:], Q.dequantize_4bit(p2.reshape(-1)[start // 2 :].clone(), tail_state), "dq tail")


_ISA_SCRIPT = """
import sys, torch
from qlora_ext import functional as Q
out = []
for x, blocksize, qt, dq in torch.load(sys.argv[1]):
    p, s = Q.quantize_4bit(x, blocksize=blocksize, quant_type=qt, compress_statistics=dq)
    out.append(Q.dequantize_4bit(p, s))
torch.save(out, sys.argv[2])
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_cpu_simd_path_gives_the_same_bits(gen, tmp_path, isa):
    """The CPU dequantizer has AVX-512, AVX2 and scalar paths and takes the widest the CPU has;
    QLORA_CPU_ISA caps it, so the narrower ones are checked here too, against the definition.
    The cap is read once a process, and starting Python and torch is most of a process's time: one
    process an ISA takes every case."""
    cases = [
        (random_weights(blocksize * 7 + 21, dtype, "cpu", gen, blocksize), blocksize, qt, dq)
        for dtype in DTYPES
        for qt, dq, blocksize in (("nf4", True, 64), ("fp4", False, 32), ("nf4", False, 4096))
    ]
    torch.save(cases, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, env={**os.environ, "QLORA_CPU_ISA": isa})  # fmt: skip
    capped = torch.load(tmp_path / "out.pt")
    assert len(capped) == len(cases)
    for (x, blocksize, qt, dq), got in zip(cases, capped):
        p, s = Q.quantize_4bit(x, blocksize=blocksize, quant_type=qt, compress_statistics=dq)
        expected = reference_dequantize(p, s)
        assert_bits_equal(got, expected, f"{isa} {x.dtype} {qt} dq={dq}")
        assert_bits_equal(Q.dequantize_4bit(p, s), expected, f"default path {x.dtype} {qt} dq={dq}")
