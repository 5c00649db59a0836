"""The QLoRA layer at decode sizes and several adapters in one batch: lora_linear at up to 16 rows (on
CUDA, the adapter term in the product's epilogue) and lora_linear_indexed (PEFT's adapter_names),
against float64 within twice the error of PyTorch's composition in the same precision, rows without
an adapter against gemm_4bit to the bit, through opcheck, torch.compile and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_ext import functional as F

from helpers import (
    CAN_PROFILE,
    DEVICES,
    Layer,
    assert_bits_equal,
    assert_each_raises,
    assert_within_twice_the_reference_error,
    cuda_kernels_launched,
    make_input,
    ours_outputs,
    reference_outputs,
    requires_cuda,
)

# (n, k, r): small weights (the stream kernel on sm_90), N not a multiple of 16, K = 8192 (the
# warp-specialized kernels), a rank of three octets, a rank that is not whole octets (the composite).
DECODE_SHAPES = [(96, 128, 8), (130, 192, 16), (256, 8192, 16), (72, 320, 24), (64, 256, 12)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16, 17])
@pytest.mark.parametrize("n,k,r", DECODE_SHAPES)
def test_decode_layer_forward_and_gradients(gen, device, dtype, m, n, k, r):
    """Up to 16 rows without dropout the forward is the decode path (17: the first row past it); the
    backward uses the down-projection it returns."""
    layer = Layer(n, k, r, device, gen, dtype=dtype)
    x = make_input((m, k), dtype, device, gen) * 0.5
    g = make_input((m, n), dtype, device, gen)
    ours = ours_outputs(layer, x, g, 0.0, None)
    low = reference_outputs(layer, x, g, 0.0, None, dtype)
    exact = reference_outputs(layer, x, g, 0.0, None, torch.float64)
    assert_within_twice_the_reference_error(ours, low, exact, ["y", "dx", "dA", "dB", "dbias"])
    # the op's second output is lora_down's (its first is what the layer returned above: lora_linear
    # runs this op, so comparing the two could not fail)
    s = layer.state
    y, down = torch.ops.qlora.lora_linear_forward(
        x, layer.packed, s.absmax, s.state2.absmax, s.state2._code_for_kernel(), s.offset, 64, 256, "nf4", [n, k],
        layer.bias, layer.A, layer.B, layer.scaling, 0.0, None,
    )  # fmt: skip
    assert y.shape == (m, n)
    torch.testing.assert_close(down, torch.ops.qlora.lora_down(x, layer.A, None, 0.0), rtol=2**-7, atol=1e-3)


@requires_cuda
@pytest.mark.cuda
def test_decode_with_k_split(gen):
    """12 rows on 8192x28672, bf16: a weight too long-rowed for the warp-specialized kernel's 32-row
    tiles and too few 128-row tiles to fill the GPU, so the decode product is the wgmma kernel with K
    split, and the adapter term is added by add_splits_kernel's adapter variant (on sm_90a)."""
    n, k, m = 8192, 28672, 12
    layer = Layer(n, k, 16, "cuda", gen)
    x = make_input((m, k), torch.bfloat16, "cuda", gen) * 0.5
    g = make_input((m, n), torch.bfloat16, "cuda", gen)
    ours = ours_outputs(layer, x, g, 0.0, None)
    low = reference_outputs(layer, x, g, 0.0, None, torch.bfloat16)
    exact = reference_outputs(layer, x, g, 0.0, None, torch.float64)
    assert_within_twice_the_reference_error(ours, low, exact, ["y", "dx", "dA", "dB", "dbias"])
    if CAN_PROFILE and torch.cuda.get_device_capability() == (9, 0):
        names = cuda_kernels_launched(layer, x)
        assert any("gemm_4bit_wgmma_tma_kernel" in n for n in names), names
        assert any("add_splits_kernel" in n and "true>" in n for n in names), names


class Adapters:
    """`count` adapters of one base, ranks up to r (the smaller zero-padded), stacked, and their scalings."""

    def __init__(self, layer: Layer, count: int, r: int, device, gen, dtype):
        n, k = layer.W.shape
        ranks = [r] + [max(1, r - 8 * (i % 2)) for i in range(1, count)]
        self.A = torch.zeros(count, r, k, dtype=dtype)
        self.B = torch.zeros(count, n, r, dtype=dtype)
        for a, ra in enumerate(ranks):
            self.A[a, :ra] = torch.randn(ra, k, generator=gen) / math.sqrt(k)
            self.B[a, :, :ra] = torch.randn(n, ra, generator=gen) / math.sqrt(ra)
        self.A, self.B = self.A.to(device), self.B.to(device)
        self.scaling = [16 / ra * (1 + a / 4) for a, ra in enumerate(ranks)]

    def reference(self, layer: Layer, x, index, dtype):
        """PEFT's mixed batch composed of PyTorch ops in `dtype`: the base, then each adapter on its rows."""
        W = layer.W.to(dtype)
        xd = x.to(dtype)
        y = torch.nn.functional.linear(xd, W, layer.bias.to(dtype))
        flat, rows = y.view(-1, y.shape[-1]), xd.reshape(-1, xd.shape[-1])
        for a in range(self.A.shape[0]):
            mine = (index.reshape(-1) == a).nonzero().flatten()
            if len(mine):
                A, B = self.A[a].to(dtype), self.B[a].to(dtype)
                flat[mine] += self.scaling[a] * torch.nn.functional.linear(torch.nn.functional.linear(rows[mine], A), B)
        return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (4,), (2, 8), (40,)], ids=["1", "4", "2x8", "40"])
@pytest.mark.parametrize("n,k,r", DECODE_SHAPES)
def test_indexed_against_float64(gen, device, dtype, shape, n, k, r):
    """Each row its own adapter (or none), up to 16 rows on the decode kernels, 40 on the composite."""
    layer = Layer(n, k, r, device, gen, dtype=dtype)
    adapters = Adapters(layer, 5, r, device, gen, dtype)
    x = make_input((*shape, k), dtype, device, gen) * 0.5
    index = torch.randint(-1, 5, shape, generator=gen).to(device)
    index.view(-1)[0] = 4  # the last slot is used
    ours = F.lora_linear_indexed(x, layer.packed, layer.state, adapters.A, adapters.B, adapters.scaling, index,
                                 layer.bias)  # fmt: skip
    low = adapters.reference(layer, x, index, dtype)
    exact = adapters.reference(layer, x, index, torch.float64)
    assert_within_twice_the_reference_error([ours], [low], [exact], ["y"])
    # rows without an adapter are the base product's, to the bit
    base = F.gemm_4bit(x, layer.packed, layer.state, layer.bias)
    none = index == -1
    assert_bits_equal(ours[none], base[none], signed_zeros=False)


@pytest.mark.parametrize("device", DEVICES)
def test_indexed_one_adapter_is_lora_linear(gen, device):
    """Every row on one adapter: the layer of lora_linear (within the two forms' roundings)."""
    layer = Layer(96, 128, 16, device, gen)
    x = make_input((3, 128), torch.bfloat16, device, gen)
    index = torch.zeros(3, dtype=torch.int64, device=device)
    ours = F.lora_linear_indexed(x, layer.packed, layer.state, layer.A[None], layer.B[None], [layer.scaling], index,
                                 layer.bias)  # fmt: skip
    torch.testing.assert_close(ours, layer(x), rtol=2**-7, atol=2**-7 * layer(x).abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_indexed_opcheck_compile_and_meta(gen, device):
    layer = Layer(48, 128, 8, device, gen)
    adapters = Adapters(layer, 3, 8, device, gen, torch.bfloat16)
    s = layer.state
    for shape in ((1,), (2, 7), (33,)):
        x = make_input((*shape, 128), torch.bfloat16, device, gen)
        index = torch.randint(-1, 3, shape, generator=gen).to(device)
        torch.library.opcheck(
            torch.ops.qlora.lora_linear_indexed.default,
            (x, layer.packed, s.absmax, s.state2.absmax, s.state2._code_for_kernel(), s.offset, 64, 256, "nf4",
             [48, 128], layer.bias, adapters.A, adapters.B, adapters.scaling, index),
        )  # fmt: skip

    def f(x, index):
        return F.lora_linear_indexed(x, layer.packed, layer.state, adapters.A, adapters.B, adapters.scaling, index,
                                     layer.bias)  # fmt: skip

    x = make_input((4, 128), torch.bfloat16, device, gen)
    index = torch.tensor([2, -1, 0, 1], device=device)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, index), f(x, index), rtol=0, atol=0)
    meta = F.lora_linear_indexed(
        x.to("meta"), layer.packed.to("meta"), layer.state.to("meta"), adapters.A.to("meta"), adapters.B.to("meta"),
        adapters.scaling, index.to("meta"),
    )  # fmt: skip
    assert meta.shape == (4, 48) and meta.device.type == "meta"


def test_indexed_is_inference_only_and_names_bad_input(gen):
    layer = Layer(48, 128, 8, "cpu", gen)
    adapters = Adapters(layer, 3, 8, "cpu", gen, torch.bfloat16)
    x = make_input((4, 128), torch.bfloat16, "cpu", gen)
    index = torch.tensor([0, 1, 2, -1])

    def call(x=x, A=adapters.A, B=adapters.B, scaling=adapters.scaling, index=index):
        return F.lora_linear_indexed(x, layer.packed, layer.state, A, B, scaling, index, layer.bias)

    assert_each_raises([
        (lambda: call(A=adapters.A.clone().requires_grad_()), RuntimeError, "inference only"),
        (lambda: call(A=adapters.A[0]), ValueError, r"lora_A must have shape \[adapters, r, 128\]"),
        (lambda: call(B=adapters.B[:2]), ValueError, r"lora_B must have shape \[3, 48, 8\]"),
        (lambda: call(B=adapters.B[..., :4]), ValueError, r"lora_B must have shape \[3, 48, 8\]"),
        (lambda: call(scaling=[1.0, 2.0]), ValueError, "scaling must have one value an adapter"),
        (lambda: call(scaling=[1.0, 2.0, math.inf]), ValueError, "scaling must be finite"),
        (lambda: call(index=index.int()), TypeError, "adapter_index must be int64"),
        (lambda: call(index=index[:3]), ValueError, r"adapter_index must have one entry a row of x \(4\)"),
        (lambda: call(index=torch.tensor([0, 1, 3, -1])), RuntimeError, r"outside \[-1, adapters\)"),
        (lambda: call(index=torch.tensor([0, 1, -2, -1])), RuntimeError, r"outside \[-1, adapters\)"),
        (lambda: call(index=[0, 1, 2, -1]), TypeError, "adapter_index must be an int64 tensor"),
    ])  # fmt: skip
    with torch.no_grad():
        call(A=adapters.A.clone().requires_grad_())  # no graph to build: fine
