"""The fused rotary position embedding (qlora::rotary_embedding): forward against float64 and against
the same arithmetic in torch to the bit, against transformers' apply_rotary_pos_emb, strided x
(transformers' transposed view), the backward and double backward with general cos / sin, opcheck,
the output's layout, bad input, and on CUDA both kernel paths against the CPU kernel."""

from __future__ import annotations

import pytest
import torch

from qlora_ext import functional as F

from helpers import DEVICES, assert_bits_equal, assert_each_raises, make_input, poison, requires_cuda

B, H, S = 2, 3, 5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rotate(x, cos, sin, backward=False):
    """The op's map written with torch ops in x's dtype's compute type (float for 16-bit dtypes,
    float64 for float64), each product rounded on its own, as the kernels compute: transformers'
    x * cos + rotate_half(x) * sin, or its transpose applied to x (the gradient) when backward."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, cos, sin = x.to(acc), cos.to(acc), sin.to(acc)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    if backward:
        return torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)


def magnitude(x, cos, sin):
    """|x_i cos_i| + |x_other sin_i| per element in float64: the scale of a rounding error's bound."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    h = x.shape[-1] // 2
    swapped = torch.cat((x[..., h:], x[..., :h]), dim=-1)
    return (x * cos).abs() + (swapped * sin).abs()


def unit_roundoff(dtype):
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}[dtype]


def error_bound(dtype, exact, m):
    """The op's error against the exact value `exact` (float64) of elements of magnitude `m`: products
    and sum in float32 (float64 for float64), within 2 u_acc m (4 here, for room), then one rounding to
    the dtype, within u |exact| where the result is normal and half a subnormal step below."""
    u_acc = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    u = unit_roundoff(dtype)
    return u * exact.abs() + 4 * u_acc * m + u * torch.finfo(dtype).smallest_normal


def make_x(layout, D, dtype, device, gen, shape=(B, H, S)):
    b, h, s = shape
    if layout == "contiguous":
        return make_input((b, h, s, D), dtype, device, gen)
    if layout == "transposed":  # transformers: q_proj(x).view(B, S, H, D).transpose(1, 2)
        return make_input((b, s, h * D), dtype, device, gen).view(b, s, h, D).transpose(1, 2)
    assert layout == "offset"  # contiguous, but one element past an aligned address: the scalar path on CUDA
    return make_input((b * h * s * D + 1,), dtype, device, gen)[1:].view(b, h, s, D)


def make_cos_sin(shape, dtype, device, gen, general=True):
    """cos and sin of `shape`: Llama's (the angles of positions 0..S-1, each half repeated) or general
    values whose two halves differ."""
    if general:
        cos = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        sin = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    else:
        D, seq = shape[-1], shape[-2]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1).expand(shape)
        cos, sin = emb.cos(), emb.sin()
    return cos.to(dtype).to(device), sin.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 128, 6])  # 6: h = 3, not a multiple of 4 (the scalar path on CUDA)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("cos_batch", [B, 1])
def test_forward_against_float64(gen, device, dtype, D, layout, cos_batch):
    x = make_x(layout, D, dtype, device, gen)
    cos, sin = make_cos_sin((cos_batch, 1, S, D), dtype, device, gen)
    poison(device, x.numel() * x.element_size())
    out = F.rotary_embedding(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype
    exact = rotate(x.double(), cos.double(), sin.double())
    err = (out.double() - exact).abs()
    bound = error_bound(dtype, exact, magnitude(x, cos, sin))
    assert bool((err <= bound).all()), f"max error {err.max().item()}, excess {(err - bound).max().item()}"
    # And to the bit: the same products and sum as torch computes them, rounded once.
    assert_bits_equal(out, rotate(x, cos, sin).to(dtype), "rotary_embedding")


@pytest.mark.parametrize("device", DEVICES)
def test_float64_and_general_strides(gen, device):
    # x with the head dimension innermost (its last dimension not: the op copies it), cos with a
    # stride of 2 along head_dim, sin a [S, D] that broadcasts over batch and heads.
    D = 10
    x = make_input((B, S, D, H), torch.float64, device, gen).permute(0, 3, 1, 2)
    cos_full, sin = make_cos_sin((1, 1, S, 2 * D), torch.float64, device, gen)
    cos = cos_full[..., ::2]
    sin = sin[0, 0, :, :D]
    out = F.rotary_embedding(x, cos, sin)
    assert out.stride(3) == 1
    assert_bits_equal(out, rotate(x, cos.expand(x.shape), sin.expand(x.shape)), "float64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_matches_transformers_apply_rotary_pos_emb(gen, device, layout):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = llama.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    rope = llama.LlamaRotaryEmbedding(config).to(device)
    b, s, D = 2, 16, 64
    q = make_x(layout, D, torch.bfloat16, device, gen, shape=(b, 4, s))
    k = make_x(layout, D, torch.bfloat16, device, gen, shape=(b, 2, s))
    position_ids = torch.arange(s, device=device).expand(b, s) + torch.tensor([[0], [7]], device=device)
    cos, sin = rope(q, position_ids)  # [b, s, D], bf16
    theirs = llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours = F.rotary_embedding(q, cos.unsqueeze(1), sin.unsqueeze(1)), F.rotary_embedding(k, cos[:, None], sin[:, None])
    for name, x, o, t in zip("qk", (q, k), ours, theirs):
        # Theirs rounds both products and the sum to bf16 (within (2 u + u^2) m of the exact value),
        # ours once after float32 (error_bound: within u m + 2^-22 m): u = 2^-8.
        m = magnitude(x, cos.unsqueeze(1), sin.unsqueeze(1))
        diff = (o.double() - t.double()).abs()
        u = 2.0**-8
        assert bool((diff <= (3 * u + u * u + 2.0**-22) * m).all()), f"{name}: max difference {diff.max().item()}"
        assert o.stride() == x.stride(), name


@pytest.mark.parametrize("device", DEVICES)
def test_output_keeps_the_transposed_layout(gen, device):
    D = 16
    for layout in ("contiguous", "transposed"):
        x = make_x(layout, D, torch.bfloat16, device, gen)
        cos, sin = make_cos_sin((1, 1, S, D), torch.bfloat16, device, gen)
        out = F.rotary_embedding(x, cos, sin)
        assert out.stride() == x.stride(), layout
        # The transposed output reshapes to [B, S, H * D] without a copy, as attention's o_proj input does.
        if layout == "transposed":
            assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_x(device):
    x = torch.empty(0, H, S, 8, device=device)
    cos = torch.ones(1, 1, S, 8, device=device)
    out = F.rotary_embedding(x, cos, cos)
    assert out.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Backward


def test_gradcheck_general_cos_sin(gen):
    D = 6
    x = make_input((B, H, S, D), torch.float64, "cpu", gen).requires_grad_()
    cos, sin = make_cos_sin((B, 1, S, D), torch.float64, "cpu", gen)
    assert not torch.equal(sin[..., : D // 2], sin[..., D // 2 :])  # the halves differ
    fn = lambda x: F.rotary_embedding(x, cos, sin)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
    # The transposed view, as transformers passes it.
    xt = make_x("transposed", D, torch.float64, "cpu", gen).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xt,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_grad_against_autograd_of_the_formula(gen, device, dtype, layout):
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("float64 is the CPU's")
    D = 64
    x = make_x(layout, D, dtype, device, gen).requires_grad_()
    cos, sin = make_cos_sin((B, 1, S, D), dtype, device, gen)
    g = make_input((B, H, S, D), dtype, device, gen)
    F.rotary_embedding(x, cos, sin).backward(g)
    x64 = x.detach().double().requires_grad_()
    rotate(x64, cos.double(), sin.double()).backward(g.double())
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    # The backward op is g's transposed map in the compute type, rounded once: the forward's bound,
    # with g for x and the sin halves swapped (out[i] reads sin[i + h], out[i + h] sin[i]).
    sin_read = torch.cat((sin[..., D // 2 :], sin[..., : D // 2]), dim=-1)
    err = (x.grad.double() - x64.grad).abs()
    bound = error_bound(dtype, x64.grad, magnitude(g, cos, sin_read))
    assert bool((err <= bound).all()), f"max error {err.max().item()}, excess {(err - bound).max().item()}"
    assert_bits_equal(x.grad, rotate(g, cos, sin, backward=True).to(dtype), "x.grad")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_a_sum_and_double_backward(gen, device):
    # out.sum()'s gradient is an expanded tensor (stride 0 everywhere): the op reads it through a copy.
    D = 8
    x = make_input((B, H, S, D), torch.float32, device, gen).requires_grad_()
    cos, sin = make_cos_sin((1, 1, S, D), torch.float32, device, gen)
    (gx,) = torch.autograd.grad(F.rotary_embedding(x, cos, sin).sum(), x, create_graph=True)
    assert_bits_equal(gx, rotate(torch.ones_like(x), cos, sin, backward=True), "x.grad")
    # The backward is linear in g with x's gradient 0: what the second derivative needs is its
    # gradient with respect to g, the forward map, exercised through a product with v.
    g = make_input((B, H, S, D), torch.float32, device, gen).requires_grad_()
    (gx,) = torch.autograd.grad(F.rotary_embedding(x, cos, sin), x, g, create_graph=True)
    v = make_input((B, H, S, D), torch.float32, device, gen)
    (gg,) = torch.autograd.grad(gx, g, v)
    assert_bits_equal(gg, rotate(v, cos, sin), "d(x.grad)/dg")


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_inputs_without_grad(gen, device):
    x = make_input((B, H, S, 8), torch.float32, device, gen)
    cos, sin = make_cos_sin((1, 1, S, 8), torch.float32, device, gen)
    assert F.rotary_embedding(x, cos, sin).grad_fn is None
    with torch.no_grad():
        # cos requiring grad is fine where nothing records a graph.
        out = F.rotary_embedding(x.requires_grad_(), cos.clone().requires_grad_(), sin)
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck(gen, device, layout):
    x = make_x(layout, 8, torch.float32, device, gen).requires_grad_()
    cos, sin = make_cos_sin((B, 1, S, 8), torch.float32, device, gen)
    for backward in (False, True):
        torch.library.opcheck(torch.ops.qlora.rotary_embedding.default, (x, cos, sin, backward))
    # x whose last dimension is not innermost: the fake kernel must pick the kernels' layout.
    xp = make_input((B, S, 8, H), torch.float32, device, gen).permute(0, 3, 1, 2)
    torch.library.opcheck(torch.ops.qlora.rotary_embedding.default, (xp, cos, sin, False))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument():
    x = torch.randn(B, H, S, 8)
    cos = torch.randn(1, 1, S, 8)
    cases = [
        (lambda: F.rotary_embedding(x[0], cos[0], cos[0]), ValueError, "x must be 4-D"),
        (lambda: F.rotary_embedding(x[..., :7], cos[..., :7], cos[..., :7]), ValueError, "last dimension .* even"),
        (lambda: F.rotary_embedding(x, cos.double(), cos), TypeError, "cos must have x's dtype"),
        (lambda: F.rotary_embedding(x, cos, cos.half()), TypeError, "sin must have x's dtype"),
        (lambda: F.rotary_embedding(x.int(), cos.int(), cos.int()), TypeError, "x must be float16, bfloat16"),
        (lambda: F.rotary_embedding(x, cos[..., :4], cos), ValueError, r"cos of shape \[1, 1, 5, 4\] does not broad"),
        (lambda: F.rotary_embedding(x, cos, torch.randn(1, 2, S, 8)), ValueError, "sin of shape .* x's shape"),
        (lambda: F.rotary_embedding(x, cos.clone().requires_grad_(), cos), ValueError, "cos and sin are not diff"),
        (lambda: F.rotary_embedding(x, cos, cos.clone().requires_grad_()), ValueError, "cos and sin are not diff"),
        (lambda: F.rotary_embedding(x, 1.0, cos), TypeError, "cos must be a tensor"),
    ]
    assert_each_raises(cases)


@requires_cuda
@pytest.mark.cuda
def test_bad_device_names_the_argument():
    x = torch.randn(B, H, S, 8, device="cuda")
    cos = torch.randn(1, 1, S, 8)
    assert_each_raises(
        [
            (lambda: F.rotary_embedding(x, cos, cos.cuda()), ValueError, "cos is on cpu but x is on cuda"),
            (lambda: F.rotary_embedding(x.cpu(), cos, cos.cuda()), ValueError, "sin is on cuda:0 but x is on cpu"),
        ]
    )


# ---------------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize(
    "shape, D, layout",
    [
        ((2, 32, 512, 128), 128, "transposed"),  # the vector path, more threads than the grid: its stride loop
        ((2, 32, 512, 128), 128, "contiguous"),
        ((2, 4, 33, 8), 8, "offset"),  # misaligned x: the scalar path
        ((2, 4, 33, 6), 6, "transposed"),  # h = 3: the scalar path
        ((1, 3, 7, 24), 24, "contiguous"),  # h = 12, strides multiples of 4
    ],
)
def test_cuda_matches_cpu_to_the_bit(gen, dtype, backward, shape, D, layout):
    x = make_x(layout, D, dtype, "cpu", gen, shape=shape[:3])
    cos, sin = make_cos_sin((shape[0], 1, shape[2], D), dtype, "cpu", gen, general=True)
    op = torch.ops.qlora.rotary_embedding
    cpu = op(x, cos, sin, backward)
    xc = make_x(layout, D, dtype, "cuda", gen, shape=shape[:3])
    xc.copy_(x)
    poison("cuda", x.numel() * x.element_size())
    cuda = op(xc, cos.cuda(), sin.cuda(), backward)
    assert cuda.stride() == xc.stride()
    assert_bits_equal(cuda, cpu, f"{dtype} {shape} {layout}")
