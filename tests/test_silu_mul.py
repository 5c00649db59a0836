"""SwiGLU's gating in one op (qlora::silu_mul, silu(gate) * up): forward and both gradients against
float64 with a stated bound, on every dtype and layout and, on CUDA, both kernel paths and the
grid-stride loop; gradcheck, the missing second derivative as an error, opcheck, no grad, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_ext import functional as F

from helpers import DEVICES, assert_each_raises, make_input, poison, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def unit_roundoff(dtype):
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}[dtype]


def make_pair(shape, dtype, device, gen, layout="contiguous"):
    """gate (Gaussian of deviation 5: a few percent past +-10, where the sigmoid saturates) and up,
    contiguous, transposed or one element past an aligned address (the scalar path on CUDA)."""
    stored = shape[::-1] if layout == "transposed" else (math.prod(shape) + (layout == "offset"),)
    gate = (5 * torch.randn(stored, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    up = make_input(stored, dtype, device, gen)
    if layout == "transposed":
        return gate.t(), up.t()
    return gate[-math.prod(shape) :].view(shape), up[-math.prod(shape) :].view(shape)


def exact(gate, up, grad=None):
    """In float64: silu(gate) * up, or (grad_gate, grad_up) and the magnitude of grad_gate's terms."""
    g, u = gate.double().cpu(), up.double().cpu()
    s = torch.sigmoid(g)
    if grad is None:
        return g * s * u
    dy = grad.double().cpu()
    # grad_gate's magnitude: 1 - s is 1 + exp(-g) rounded near 1, so its error is absolute (a unit of
    # float32), not relative: |dy u| s (1 + |g|), not (1 + |g| (1 - s))
    return dy * u * s * (1 + g * (1 - s)), dy * g * s, (dy * u).abs() * s * (1 + g.abs())


def assert_within(got, want, magnitude, dtype, what):
    """|got - want| <= u |want| (the one rounding to dtype) + 16 u_acc magnitude (exp, the division and
    the products in float32, float64 for float64) + half a subnormal step: an element off by a wrong
    index or formula is off by the order of the value itself."""
    u_acc = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    u = unit_roundoff(dtype)
    got = got.double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not got.isnan().any(), f"{what}: NaN in the output"
    bound = u * want.abs() + 16 * u_acc * magnitude + u * torch.finfo(dtype).smallest_normal
    bad = (got - want).abs() > bound
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} past the bound, first at {bad.nonzero()[0]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("shape", [(7, 11), (2, 64, 88)], ids=str)
def test_forward_and_gradients_against_float64(gen, device, dtype, layout, shape):
    if layout == "transposed" and len(shape) != 2:
        pytest.skip("transposed: 2-D")
    gate, up = make_pair(shape, dtype, device, gen, layout)
    out = F.silu_mul(gate, up)
    assert out.dtype == dtype and out.device == gate.device and out.is_contiguous()
    want = exact(gate, up)
    assert_within(out, want, want.abs(), dtype, f"forward {dtype} {layout}")
    gate.requires_grad_()
    up.requires_grad_()
    grad = make_input(shape, dtype, device, gen)
    F.silu_mul(gate, up).backward(grad)
    grad_gate, grad_up, magnitude = exact(gate.detach(), up.detach(), grad)
    assert_within(gate.grad, grad_gate, magnitude, dtype, f"grad_gate {dtype} {layout}")
    assert_within(up.grad, grad_up, grad_up.abs(), dtype, f"grad_up {dtype} {layout}")


def test_float64_and_gradcheck(gen):
    gate, up = make_pair((5, 6), torch.float64, "cpu", gen)
    want = exact(gate, up)
    assert_within(F.silu_mul(gate, up), want, want.abs(), torch.float64, "float64")
    assert torch.autograd.gradcheck(F.silu_mul, (gate.requires_grad_(), up.requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_silu_times_up_within_its_two_roundings(gen, device):
    gate, up = make_pair((16, 96), torch.bfloat16, device, gen)
    ours, theirs = F.silu_mul(gate, up), torch.nn.functional.silu(gate) * up
    # torch rounds silu(gate) and then the product: the two differ by at most ~2 bf16 units
    torch.testing.assert_close(ours, theirs, rtol=2 * 2.0**-8, atol=1e-6)


def test_a_second_derivative_is_an_error_not_zero(gen):
    gate, up = make_pair((3, 4), torch.float64, "cpu", gen)
    gate.requires_grad_()
    (g,) = torch.autograd.grad(F.silu_mul(gate, up).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError, match="silu_mul_backward"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_one_input_with_grad(gen, device):
    gate, up = make_pair((4, 8), torch.float32, device, gen)
    with torch.no_grad():
        assert F.silu_mul(gate.requires_grad_(), up).grad_fn is None
    out = F.silu_mul(gate.detach(), up.requires_grad_())
    out.sum().backward()
    assert up.grad is not None and up.grad.shape == up.shape


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    gate = torch.empty(0, 5, device=device)
    assert F.silu_mul(gate, gate.clone()).shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(gen, device, layout):
    gate, up = make_pair((6, 10), torch.float32, device, gen, layout)
    torch.library.opcheck(torch.ops.qlora.silu_mul.default, (gate.requires_grad_(), up.requires_grad_()))
    grad = make_input((6, 10), torch.float32, device, gen)
    torch.library.opcheck(torch.ops.qlora.silu_mul_backward.default, (grad, gate.detach(), up.detach()))


def test_bad_input_names_the_argument():
    gate = torch.randn(3, 4)
    assert_each_raises(
        [
            (lambda: F.silu_mul(gate, gate[:, :3]), ValueError, r"up must have gate's shape \[3, 4\], got \[3, 3\]"),
            (lambda: F.silu_mul(gate, gate.double()), TypeError, "up must have gate's dtype"),
            (lambda: F.silu_mul(gate.int(), gate.int()), TypeError, "gate must be float16, bfloat16"),
            (lambda: F.silu_mul(gate, 1.0), TypeError, "up must be a tensor"),
            (lambda: F.silu_mul([1.0], gate), TypeError, "gate must be a tensor"),
            (lambda: torch.ops.qlora.silu_mul_backward(gate[:2], gate, gate), ValueError, "grad must have gate's"),
        ]
    )


@requires_cuda
@pytest.mark.cuda
def test_bad_device_names_the_argument():
    gate = torch.randn(3, 4, device="cuda")
    assert_each_raises(
        [
            (lambda: F.silu_mul(gate, gate.cpu()), ValueError, "up is on cpu but gate is on cuda"),
            (lambda: F.silu_mul(gate.cpu(), gate), ValueError, "up is on cuda:0 but gate is on cpu"),
        ]
    )


# Both kernel paths and the grid-stride loop: 16-byte vectors where every pointer is aligned (a tail
# of n % 8 elements after them), one element at a time otherwise; 4.3 M elements (vectors) and 3 M
# (one at a time) pass one grid's reach on any GPU of 132 SMs or fewer (8 CTAs an SM x 256 threads,
# 8 elements a thread and step on the vector path, 1 on the other).
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [((2, 2048, 1056), "contiguous"), ((1, 4099, 3), "contiguous"),
                                           ((3, 1001), "offset"), ((3, 1000003), "offset"),
                                           ((64, 120), "transposed")])  # fmt: skip
def test_cuda_kernel_paths(gen, dtype, shape, layout):
    gate, up = make_pair(shape, dtype, "cuda", gen, layout)
    grad = make_input(shape, dtype, "cuda", gen)
    poison("cuda", 3 * gate.numel() * gate.element_size())
    out = F.silu_mul(gate, up)
    want = exact(gate, up)
    assert_within(out, want, want.abs(), dtype, f"{shape} {layout}")
    del out
    poison("cuda", 3 * gate.numel() * gate.element_size())
    grad_gate, grad_up = torch.ops.qlora.silu_mul_backward(grad, gate, up)
    eg, eu, magnitude = exact(gate, up, grad)
    assert_within(grad_gate, eg, magnitude, dtype, f"grad_gate {shape} {layout}")
    assert_within(grad_up, eu, eu.abs(), dtype, f"grad_up {shape} {layout}")
