"""Property tests (hypothesis): every format op and the products against the format's definition and
a float64 reference, on shapes including 0, 1, odd and prime sizes, every dtype, blocksize and quant
type, strided and offset views, and values with NaN, Inf, subnormals, zeros and all-equal blocks."""

from __future__ import annotations

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from qlora_ext import functional as Q  # noqa: E402
from qlora_ext.codebooks import code_tensor  # noqa: E402
from qlora_ext.quant_state import BLOCKSIZES  # noqa: E402

from helpers import (  # noqa: E402
    DEVICES,
    Layer,
    assert_bits_equal,
    assert_close_to_reference,
    assert_within_twice_the_reference_error,
    ours_outputs,
    reference_dequantize,
    reference_outputs,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = st.sampled_from([0, 1, 2, 3, 7, 13, 31, 64, 97, 127, 257, 509, 1021])
# 60 examples a test in CI; QLORA_HYPOTHESIS_EXAMPLES=1000 for a longer search
SETTINGS = settings(max_examples=int(os.environ.get("QLORA_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@st.composite
def tensors(draw, finite: bool = False, max_numel: int = 6000):
    """A tensor (and how it was laid out): scales over decades a block, optionally NaN, Inf,
    subnormals, zeros and all-equal runs; contiguous, transposed or an offset view."""
    shape = draw(st.lists(SIZES, min_size=1, max_size=3).filter(lambda s: math.prod(s) <= max_numel))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n + 1, generator=g) * torch.exp(torch.randn(n + 1, generator=g) * 3).clamp(max=1e4)
    if n:
        k = max(1, n // 50)
        idx = torch.randint(0, n + 1, (4, k), generator=g)
        if draw(st.booleans()):
            x[idx[0]] = 0.0
        if draw(st.booleans()):
            x[idx[1]] = torch.finfo(dtype).tiny / 4  # subnormal in the dtype
        if draw(st.booleans()):
            run = int(torch.randint(0, n + 1, (1,), generator=g))
            x[run : run + 70] = float(x[run])  # an all-equal stretch
        if not finite and draw(st.booleans()):
            x[idx[2]] = float("nan")
        if not finite and draw(st.booleans()):
            x[idx[3]] = float("inf") * torch.sign(torch.randn(k, generator=g))
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "offset", "transposed"]))
    if layout == "offset":
        t = x[1:].reshape(shape)
    elif layout == "transposed" and len(shape) >= 2:
        t = x[:n].reshape(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    else:
        t = x[:n].reshape(shape)
    return t


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.cpu().reshape(-1).long()
    return torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n]


def formats():
    return st.tuples(st.sampled_from(BLOCKSIZES), st.sampled_from(["nf4", "fp4"]), st.booleans())


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(x=tensors(), fmt=formats())
def test_dequantize_is_the_formats_definition(device, x, fmt):
    blocksize, quant_type, dq = fmt
    x = x.to(device)
    packed, state = Q.quantize_4bit(x, blocksize, quant_type, dq)
    assert packed.shape == ((x.numel() + 1) // 2, 1) and state.absmax.numel() == -(-x.numel() // blocksize)
    out = Q.dequantize_4bit(packed, state)
    assert out.shape == x.shape and out.dtype == x.dtype
    # FP4's code 0b1000 is +0.0 in the table and -0.0 from the CUDA kernels (README: signed zero)
    assert_bits_equal(out, reference_dequantize(packed, state), "dequantize", signed_zeros=device == "cpu")
    # a strided or offset view quantizes as its contiguous copy
    p2, s2 = Q.quantize_4bit(x.contiguous(), blocksize, quant_type, dq)
    assert torch.equal(p2, packed)
    assert_bits_equal(s2.absmax, state.absmax, "absmax")


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(x=tensors(finite=True), fmt=formats())
def test_codes_are_nearest_and_requantizing_is_stable(device, x, fmt):
    """Finite input: each code is a nearest code value to x / absmax (float64, with the float32
    scaling's slack); and for float32, quantize(dequantize(quantize(x))) gives the same codes and
    block scales (the block maximum dequantizes to exactly +-absmax, every other value to a code
    point)."""
    blocksize, quant_type, _ = fmt
    x = x.to(device)
    n = x.numel()
    packed, state = Q.quantize_4bit(x, blocksize, quant_type, compress_statistics=False)
    if n:
        code = code_tensor(quant_type).double()
        nib = _nibbles(packed, n)
        absmax = state.absmax.cpu().double().repeat_interleave(blocksize)[:n]
        v = x.detach().cpu().double().reshape(-1) / absmax
        # Blocks whose absmax is under float32's smallest normal are scaled by 1 / 1e-38 (CPU) or
        # flushed (CUDA), as bitsandbytes does (README: scaling); their codes follow that, not x / absmax.
        live = absmax >= torch.finfo(torch.float32).tiny
        err_chosen = (v - code[nib]).abs()[live]
        err_best = (v[:, None] - code[None, :]).abs().min(1).values[live]
        assert bool((err_chosen <= err_best + 2.0**-21).all()), f"max excess {(err_chosen - err_best).max().item()}"
    if x.dtype == torch.float32 and bool((state.absmax >= torch.finfo(torch.float32).tiny).all()):
        again_p, again_s = Q.quantize_4bit(
            Q.dequantize_4bit(packed, state), blocksize, quant_type, compress_statistics=False
        )
        assert_bits_equal(again_s.absmax, state.absmax, "absmax")
        first, second = _nibbles(packed, n), _nibbles(again_p, n)
        # FP4 has two zero codes (0b0000, 0b1000); a zero may come back as the other one
        same = (first == second) | ((quant_type == "fp4") & ((first & 7) == 0) & ((second & 7) == 0))
        assert bool(same.all()), f"{int((~same).sum())} codes changed"


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(
    m=st.sampled_from([1, 2, 3, 7, 16, 33, 64, 129]),
    n=st.sampled_from([1, 7, 31, 64, 97, 130]),
    k=st.sampled_from([1, 13, 64, 100, 257]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    fmt=formats(),
    seed=st.integers(0, 2**31 - 1),
)
def test_products_against_float64(device, m, n, k, dtype, fmt, seed):
    blocksize, quant_type, dq = fmt
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(device)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(device)
    packed, state = Q.quantize_4bit(w, blocksize, quant_type, dq)
    wq = Q.dequantize_4bit(packed, state)
    assert_close_to_reference(Q.gemm_4bit(x, packed, state, bias), x, wq, bias, "gemm_4bit")
    grad = torch.randn(m, n, generator=g).to(dtype).to(device)
    assert_close_to_reference(
        Q.gemm_4bit_transposed(grad, packed, state), grad, wq.T.contiguous(), None, "gemm_4bit_transposed"
    )


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(
    m=st.sampled_from([1, 2, 5, 17, 64]),
    n=st.sampled_from([8, 31, 64, 96]),
    k=st.sampled_from([16, 64, 100, 136]),
    r=st.sampled_from([1, 4, 8, 16]),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**62),
)
def test_lora_layer_against_float64(device, m, n, k, r, p, dtype, seed):
    """The layer's output and its three gradients, on the mask its seed draws, within twice the error
    of the same composition in plain PyTorch at the same precision (plus a few units in the last place)."""
    g = torch.Generator().manual_seed(seed % 2**31)
    layer = Layer(n, k, r, device, g, dtype=dtype)
    x = (torch.randn(m, k, generator=g) * 0.5).to(dtype).to(device)
    grad = torch.randn(m, n, generator=g).to(dtype).to(device)
    s = torch.tensor(seed, dtype=torch.int64, device=device)
    ours = ours_outputs(layer, x, grad, p, s)
    low = reference_outputs(layer, x, grad, p, s, dtype)
    exact = reference_outputs(layer, x, grad, p, s, torch.float64)
    assert_within_twice_the_reference_error(ours, low, exact, ["y", "dx", "dA", "dB", "dbias"])
