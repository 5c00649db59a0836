"""LoRA on the 4-bit base: the dropout mask (Philox from a seed), the fused layer op lora_linear
(forward and every gradient against float64 and against plain PyTorch in the same precision, what
it saves for backward, gradcheck, opcheck, checkpointing, autocast, torch.compile) and the modules
Linear4bit / QLoRALinear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils.checkpoint

from qlora_ext import functional as F
from qlora_ext.nn import Linear4bit, QLoRALinear

from helpers import (
    DEVICES,
    Layer,
    assert_bits_equal,
    assert_each_raises,
    assert_within_twice_the_reference_error,
    fp32_scale,
    make_input,
    mask_of,
    needs_caching_allocator,
    ours_outputs,
    reference_outputs,
    requires_cuda,
)


def seed_tensor(value: int, device: str) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# The dropout mask


def philox4x32_10(seed: int, counter: int) -> list[int]:
    """Philox4x32-10 in plain Python (Salmon et al. 2011), the spec the kernels follow."""
    m32 = 0xFFFFFFFF
    c = [counter & m32, (counter >> 32) & m32, 0, 0]
    k0, k1 = seed & m32, (seed >> 32) & m32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & m32, p1 & m32, ((p0 >> 32) ^ c[3] ^ k1) & m32, p0 & m32]
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return c


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_is_philox_of_the_element_index(gen, device):
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    p = 0.3
    n = 1001  # a partial last group of four
    mask = mask_of((n,), seed_tensor(seed, device), p).cpu()
    threshold = round(p * 2**32)
    expected = torch.tensor([philox4x32_10(seed, i // 4)[i % 4] >= threshold for i in range(n)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_values_and_rate(gen, device, dtype, p):
    x = make_input((37, 515), dtype, device, gen)
    seed = seed_tensor(int(torch.randint(0, 2**62, (), generator=gen)), device)
    out = F.lora_dropout(x, p, seed)
    mask = mask_of(x.shape, seed, p)
    # Kept: x * float32(1 / (1 - p)), rounded once to x's dtype (float64 scales in float64).
    scale = 1.0 / (1.0 - p) if dtype == torch.float64 else fp32_scale(p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.where(mask, (x.to(acc) * scale).to(dtype), torch.zeros((), dtype=dtype, device=device))
    assert_bits_equal(out, expected, "lora_dropout", signed_zeros=False)
    # The rate: a binomial count of n draws, within 6 standard deviations of n p.
    n = x.numel()
    dropped = int((~mask).sum())
    assert abs(dropped - n * p) < 6 * math.sqrt(n * p * (1 - p)), (dropped, n * p)
    # The mask is the seed's: the same in every dtype, another for another seed.
    assert torch.equal(mask_of(x.shape, seed, p), (F.lora_dropout(x.double(), p, seed) != 0) | (x == 0))
    other = mask_of(x.shape, seed + 1, p)
    assert (other != mask).float().mean() > p * (1 - p)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_edge_probabilities_and_strides(gen, device):
    x = make_input((16, 40), torch.bfloat16, device, gen)
    seed = seed_tensor(7, device)
    assert torch.equal(F.lora_dropout(x, 0.0, seed), x)
    assert not F.lora_dropout(x, 1.0, seed).any()
    # The mask follows the logical (row-major) index, whatever x's strides.
    xt = make_input((40, 16), torch.bfloat16, device, gen).t()
    assert_bits_equal(F.lora_dropout(xt, 0.25, seed), F.lora_dropout(xt.contiguous(), 0.25, seed))
    # An odd offset into storage takes the unaligned path.
    flat = make_input((1 + 4 * 33,), torch.bfloat16, device, gen)
    assert_bits_equal(F.lora_dropout(flat[1:], 0.25, seed), F.lora_dropout(flat[1:].clone(), 0.25, seed))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_add_is_base_plus_dropout(gen, device):
    base = make_input((9, 130), torch.bfloat16, device, gen)
    x = make_input((9, 130), torch.bfloat16, device, gen)
    seed = seed_tensor(12345, device)
    got = torch.ops.qlora.lora_dropout_add(base, x, seed, 0.2)
    assert_bits_equal(got, base + F.lora_dropout(x, 0.2, seed))


@requires_cuda
@pytest.mark.cuda
def test_dropout_same_mask_on_cpu_and_cuda(gen):
    for dtype in (torch.bfloat16, torch.float32):
        x = make_input((33, 4097), dtype, "cpu", gen)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        cpu = F.lora_dropout(x, 0.1, seed_tensor(seed, "cpu"))
        cuda = F.lora_dropout(x.cuda(), 0.1, seed_tensor(seed, "cuda"))
        assert_bits_equal(cuda, cpu, f"{dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_autograd_and_opcheck(gen, device):
    x = make_input((6, 70), torch.float32, device, gen).requires_grad_()
    base = make_input((6, 70), torch.float32, device, gen).requires_grad_()
    seed = seed_tensor(99, device)
    g = make_input((6, 70), torch.float32, device, gen)
    torch.ops.qlora.lora_dropout_add(base, x, seed, 0.3).backward(g)
    assert torch.equal(base.grad, g)
    assert_bits_equal(x.grad, F.lora_dropout(g, 0.3, seed))
    torch.library.opcheck(torch.ops.qlora.lora_dropout.default, (x, seed, 0.3))
    torch.library.opcheck(torch.ops.qlora.lora_dropout_add.default, (base, x, seed, 0.3))


def test_dropout_bad_input_names_the_argument():
    x = torch.ones(4, 8)
    s = seed_tensor(1, "cpu")
    cases = [
        (lambda: F.lora_dropout(x, 1.5, s), ValueError, "p must be in"),
        (lambda: F.lora_dropout(x, 0.1, s.int()), TypeError, "seed must be int64"),
        (lambda: F.lora_dropout(x, 0.1, torch.zeros(2, dtype=torch.int64)), ValueError, "seed must have one element"),
        (lambda: F.lora_dropout(x.int(), 0.1, s), TypeError, "x must be a float tensor"),
        (lambda: torch.ops.qlora.lora_dropout_add(torch.ones(4, 9), x, s, 0.1), ValueError, "base must have x's shape"),
        (lambda: torch.ops.qlora.lora_dropout_add(x.double(), x, s, 0.1), TypeError, "base must have x's dtype"),
    ]
    assert_each_raises(cases)


# ---------------------------------------------------------------------------------------------
# The adapter products: drop(x) @ A^T, grad_down^T @ drop(x), base + drop(grad_down @ A)


def product_inputs(m, k, r, dtype, device, gen):
    x = make_input((m, k), dtype, device, gen)
    A = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(dtype).to(device)
    gd = make_input((m, r), dtype, device, gen)
    base = make_input((m, k), dtype, device, gen)
    return x, A, gd, base


def product_references(x, A, gd, base, seed, p):
    """The three products in float64 on the same mask (the dropped values rounded to x's dtype, as
    the ops multiply them)."""
    xd = F.lora_dropout(x, p, seed).double().cpu()
    A64, gd64 = A.double().cpu(), gd.double().cpu()
    prod = (gd64 @ A64).to(x.dtype)  # the op rounds the product to x's dtype before the dropout
    added = base.double().cpu() + F.lora_dropout(prod.to(x.device), p, seed).double().cpu()
    return xd @ A64.T, gd64.T @ xd, added


def run_products(x, A, gd, base, seed, p):
    return (
        torch.ops.qlora.lora_down(x, A, seed, p),
        torch.ops.qlora.lora_grad_A(gd, x, seed, p),
        torch.ops.qlora.lora_dropout_add_mm(base, gd, A, seed, p),
    )


def composite_products(x, A, gd, base, seed, p):
    """The three products as their composite forms, written with the dropout op and torch's products."""
    xd = F.lora_dropout(x, p, seed) if p > 0 else x
    added = base + F.lora_dropout(gd @ A, p, seed) if p > 0 else torch.addmm(base, gd, A)
    return xd @ A.T, gd.T @ xd, added


# Where the CUDA ops run a fused kernel (csrc/cuda/lora.cu, fused_applies): dropout on, K and r multiples
# of 8, 16-bit floats, r <= 128 (lora_grad_A: r <= 16). Elsewhere they are the composite form, to the bit.
def fused_on_cuda(dtype, k, r, p):
    down = p > 0 and dtype in (torch.bfloat16, torch.float16) and k % 8 == 0 and r % 8 == 0 and 8 <= r <= 128
    return down, down and r <= 16, False


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.15])
def test_products_composite(gen, device, p):
    x, A, gd, base = product_inputs(37, 200, 8, torch.bfloat16, device, gen)
    seed = seed_tensor(41, device)
    ours = run_products(x, A, gd, base, seed, p)
    fused = fused_on_cuda(torch.bfloat16, 200, 8, p) if device == "cuda" else (False, False, False)
    refs = product_references(x, A, gd, base, seed, p)
    composite = composite_products(x, A, gd, base, seed, p)
    names = ("lora_down", "lora_grad_A", "lora_dropout_add_mm")
    for name, got, want, ref, is_fused in zip(names, ours, composite, refs, fused):
        if is_fused:  # its own summation order: as close to float64 as the composite form (or 2 ulp of the largest)
            err = (got.double().cpu() - ref).abs().max().item()
            c_err = (want.double().cpu() - ref).abs().max().item()
            assert err <= 2 * c_err + 2 * torch.finfo(got.dtype).eps * ref.abs().max().item(), name
        else:
            assert_bits_equal(got, want, name)
    for op, args in [
        (torch.ops.qlora.lora_down.default, (x, A, seed, p)),
        (torch.ops.qlora.lora_grad_A.default, (gd, x, seed, p)),
        (torch.ops.qlora.lora_dropout_add_mm.default, (base, gd, A, seed, p)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,k,r",
    [
        (1, 64, 8),
        (63, 72, 8),
        (65, 200, 24),
        (70, 200, 24),
        (257, 1032, 64),
        (64, 136, 72),
        (130, 520, 128),
        (4100, 256, 16),
    ],
)
def test_fused_products_against_float64(gen, dtype, m, k, r):
    """The CUDA products within 2x the composite form's error against float64, on tiles that M, K and r
    do not fill; the same bits run to run; the composite form's bits where no fused kernel runs."""
    x, A, gd, base = product_inputs(m, k, r, dtype, "cuda", gen)
    seed = seed_tensor(int(torch.randint(0, 2**62, (), generator=gen)), "cuda")
    refs = product_references(x, A, gd, base, seed, 0.1)
    composite = composite_products(x, A, gd, base, seed, 0.1)
    torch.cuda.synchronize()
    ours = run_products(x, A, gd, base, seed, 0.1)
    again = run_products(x, A, gd, base, seed, 0.1)
    fused = fused_on_cuda(dtype, k, r, 0.1)
    names = ("lora_down", "lora_grad_A", "lora_dropout_add_mm")
    for name, f, c, ref, a, is_fused in zip(names, ours, composite, refs, again, fused):
        assert f.shape == c.shape and f.dtype == c.dtype, name
        assert not f.isnan().any(), name
        err = (f.double().cpu() - ref).abs().max().item()
        c_err = (c.double().cpu() - ref).abs().max().item()
        floor = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= 2 * c_err + floor, f"{name}: error {err:.3g}, composite {c_err:.3g}"
        assert_bits_equal(a, f, f"{name} run to run")
        if not is_fused:
            assert_bits_equal(f, c, f"{name}: the composite form")


@requires_cuda
@pytest.mark.cuda
def test_fused_products_fall_back_where_they_do_not_apply(gen):
    """r or K not a multiple of 8, float32, r over 128, p = 0, empty x, lora_grad_A over r = 16: the
    composite form, to the bit."""
    for dtype, m, k, r, p in [(torch.bfloat16, 9, 100, 8, 0.1), (torch.bfloat16, 9, 128, 12, 0.1),
                              (torch.float32, 9, 128, 8, 0.1), (torch.bfloat16, 9, 128, 136, 0.1),
                              (torch.bfloat16, 9, 128, 8, 0.0), (torch.bfloat16, 9, 0, 8, 0.1),
                              (torch.bfloat16, 0, 64, 8, 0.1), (torch.bfloat16, 9, 128, 24, 0.1)]:  # fmt: skip
        x, A, gd, base = product_inputs(m, k, r, dtype, "cuda", gen)
        seed = seed_tensor(3, "cuda")
        composite = composite_products(x, A, gd, base, seed, p)
        ours = run_products(x, A, gd, base, seed, p)
        fused = fused_on_cuda(dtype, k, r, p) if m and k else (False, False, False)  # empty x: composite
        for name, o, c, is_fused in zip(("lora_down", "lora_grad_A", "lora_dropout_add_mm"), ours, composite,
                                        fused):  # fmt: skip
            if not is_fused:
                assert_bits_equal(o, c, f"{name} {dtype} {m}x{k} r={r} p={p}")


@requires_cuda
@pytest.mark.cuda
def test_dropout_add_mm_holds_two_buffers_not_three(gen):
    """lora_dropout_add_mm on CUDA writes base + drop(grad_down @ A) over the product: its peak above
    its inputs is the result alone (plus cuBLAS's workspace), not the product and the result."""
    x, A, gd, base = product_inputs(4096, 4096, 16, torch.bfloat16, "cuda", gen)
    seed = seed_tensor(7, "cuda")
    torch.ops.qlora.lora_dropout_add_mm(base, gd, A, seed, 0.1)  # cuBLAS's workspace, once
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = torch.ops.qlora.lora_dropout_add_mm(base, gd, A, seed, 0.1)
    torch.cuda.synchronize()
    result = out.numel() * out.element_size()
    assert torch.cuda.max_memory_allocated() - before < 1.5 * result
    assert_bits_equal(out, composite_products(x, A, gd, base, seed, 0.1)[2], "lora_dropout_add_mm")


def test_products_bad_input_names_the_argument():
    x, A = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(2, 16, dtype=torch.bfloat16)
    gd = torch.ones(4, 2, dtype=torch.bfloat16)
    s = seed_tensor(1, "cpu")
    cases = [
        (lambda: torch.ops.qlora.lora_down(x, A[:, :8], s, 0.1), ValueError, r"lora_A must have shape \[r, 16\]"),
        (lambda: torch.ops.qlora.lora_down(x, A.float(), s, 0.1), TypeError, "lora_A must have x's dtype"),
        (lambda: torch.ops.qlora.lora_down(x, A, None, 0.1), ValueError, "seed is None"),
        (lambda: torch.ops.qlora.lora_grad_A(gd[:3], x, s, 0.1), ValueError, r"grad_down must have shape \[4, r\]"),
        (
            lambda: torch.ops.qlora.lora_dropout_add_mm(x, gd[:, :1], A, s, 0.1),
            ValueError,
            r"grad_down must have shape \[4, 2\]",
        ),
        (lambda: torch.ops.qlora.lora_down(x[0], A, s, 0.1), ValueError, "x must be 2-D"),
        (lambda: torch.ops.qlora.lora_down(x, A, s.int(), 0.1), TypeError, "lora_down: seed must be int64"),
        (
            lambda: torch.ops.qlora.lora_grad_A(gd, x, torch.zeros(2, dtype=torch.int64), 0.1),
            ValueError,
            "lora_grad_A: seed must have one element",
        ),
    ]
    if torch.cuda.is_available():
        # A CUDA seed beside CPU tensors, even with p = 0, must name the seed rather than reach a kernel.
        cuda_seed = seed_tensor(1, "cuda")
        cases += [
            (lambda: torch.ops.qlora.lora_down(x, A, cuda_seed, 0.0), ValueError, "seed is on cuda"),
            (lambda: torch.ops.qlora.lora_grad_A(gd, x, cuda_seed, 0.1), ValueError, "seed is on cuda"),
            (lambda: torch.ops.qlora.lora_dropout_add_mm(x, gd, A, cuda_seed, 0.1), ValueError, "seed is on cuda"),
        ]
    assert_each_raises(cases)


# ---------------------------------------------------------------------------------------------
# The layer op


LAYER_PATHS = [pytest.param("cpu", id="cpu"),
               pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda])]  # fmt: skip


@pytest.mark.parametrize("device", LAYER_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m,n,k,r", [(1, 96, 128, 8), (33, 130, 192, 16), (129, 67, 100, 64), (200, 72, 328, 24)])
def test_layer_forward_and_gradients(gen, device, dtype, p, m, n, k, r):
    layer = Layer(n, k, r, device, gen, dtype=dtype)
    x = make_input((m, k), dtype, device, gen) * 0.5
    g = make_input((m, n), dtype, device, gen)
    seed = seed_tensor(int(torch.randint(0, 2**62, (), generator=gen)), device)
    ours = ours_outputs(layer, x, g, p, seed)
    low = reference_outputs(layer, x, g, p, seed, dtype)
    exact = reference_outputs(layer, x, g, p, seed, torch.float64)
    assert_within_twice_the_reference_error(ours, low, exact, ["y", "dx", "dA", "dB", "dbias"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapter_dtypes_and_leading_dims(gen, device, adapter_dtype):
    layer = Layer(48, 64, 8, device, gen, dtype=torch.bfloat16, adapter_dtype=adapter_dtype, bias=False)
    x = make_input((2, 3, 5, 64), torch.bfloat16, device, gen)
    g = make_input((2, 3, 5, 48), torch.bfloat16, device, gen)
    seed = seed_tensor(5, device)
    y, dx, dA, dB = ours_outputs(layer, x, g, 0.1, seed)
    assert y.shape == (2, 3, 5, 48) and dx.shape == x.shape
    assert dA.dtype == adapter_dtype and dB.dtype == adapter_dtype
    # The same as the flattened batch: leading dims are rows.
    y2, dx2, dA2, dB2 = ours_outputs(layer, x.reshape(30, 64), g.reshape(30, 48), 0.1, seed)
    assert_bits_equal(y, y2.reshape(y.shape))
    assert_bits_equal(dx, dx2.reshape(dx.shape))
    assert_bits_equal(dA, dA2)
    assert_bits_equal(dB, dB2)
    # A non-contiguous x gives the same as its contiguous copy.
    xt = make_input((64, 30), torch.bfloat16, device, gen).t()
    assert_bits_equal(layer(xt, 0.1, seed), layer(xt.contiguous(), 0.1, seed))


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False)])
def test_gradcheck_float64_cpu(gen, p, quant_type, dq):
    layer = Layer(12, 40, 4, "cpu", gen, dtype=torch.float32, quant_type=quant_type, dq=dq, blocksize=32)
    x = torch.randn(3, 2, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    A = layer.A.double().requires_grad_()
    B = layer.B.double().requires_grad_()
    bias = torch.randn(12, dtype=torch.float64, generator=gen, requires_grad=True)
    seed = seed_tensor(2024, "cpu")

    def f(x, A, B, bias):
        return F.lora_linear(x, layer.packed, layer.state, A, B, 1.7, p, bias, seed)

    assert torch.autograd.gradcheck(f, (x, A, B, bias))
    # Second derivatives are not provided: asking for them is an error, not a silent wrong value.
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(f(x, A, B, bias).sum(), x, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saves_only_x_and_the_down_projection(gen, device, p):
    m, n, k, r = 64, 96, 256, 16
    module = QLoRALinear.from_linear(
        torch.nn.Linear(k, n).to(torch.bfloat16), r=r, lora_dropout=p, compute_dtype=torch.bfloat16
    ).to(device)
    torch.nn.init.normal_(module.lora_B.default.weight)
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    state = module.base_layer.quant_state
    own |= {
        t.untyped_storage().data_ptr()
        for t in (state.absmax, state.state2.absmax, state.state2._code_for_kernel(), state.offset)
    }
    x = make_input((2, m // 2, k), torch.bfloat16, device, gen).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    foreign = [t for t in saved if t.untyped_storage().data_ptr() not in own]
    sizes = sorted(
        (tuple(t.shape), t.dtype) for t in foreign if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    )
    expected = sorted([((m, r), torch.bfloat16)] + ([((), torch.int64)] if p > 0 else []))
    assert sizes == expected, sizes
    assert any(t is x or t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in foreign)
    extra = sum(t.nbytes for t in foreign if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
    assert extra == m * r * 2 + (8 if p > 0 else 0)
    y.float().sum().backward()
    assert x.grad is not None and module.lora_A.default.weight.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_meta(gen, device):
    layer = Layer(48, 128, 8, device, gen)
    s = layer.state
    seed = seed_tensor(3, device)
    for m, p in ((1, 0.0), (7, 0.1), (100, 0.2)):
        x = make_input((m, 128), torch.bfloat16, device, gen).requires_grad_()
        A = layer.A.clone().requires_grad_()
        B = layer.B.clone().requires_grad_()
        torch.library.opcheck(
            torch.ops.qlora.lora_linear.default,
            (x, layer.packed, s.absmax, s.state2.absmax, s.state2._code_for_kernel(), s.offset, 64, 256, "nf4",
             [48, 128], layer.bias, A, B, layer.scaling, p, seed),
        )  # fmt: skip


def test_meta_tensors(gen):
    layer = Layer(48, 128, 8, "cpu", gen)
    state = layer.state.to("meta")
    out = F.lora_linear(
        torch.empty(2, 5, 128, dtype=torch.bfloat16, device="meta"), layer.packed.to("meta"), state,
        layer.A.to("meta"), layer.B.to("meta"), 2.0, 0.1, None, seed_tensor(1, "meta"),
    )  # fmt: skip
    assert out.shape == (2, 5, 48) and out.device.type == "meta"


def test_bad_input_names_the_argument(gen):
    layer = Layer(32, 64, 4, "cpu", gen)
    x = make_input((3, 64), torch.bfloat16, "cpu", gen)
    cases = [
        (lambda: layer(x, A=layer.A[:, :60]), ValueError, r"lora_A must have shape \[r, 64\]"),
        (lambda: layer(x, B=layer.B[:, :3]), ValueError, r"lora_B must have shape \[32, 4\]"),
        (lambda: layer(x, A=layer.A.int()), TypeError, "lora_A must be a float tensor"),
        (lambda: torch.ops.qlora.lora_linear(x, layer.packed, layer.state.absmax, None, None, None, 64, 256, "nf4",
                                             [32, 64], None, layer.A, layer.B, 1.0, 0.1, None),
         ValueError, "seed is None"),
        (lambda: layer(x, p=1.5, seed=seed_tensor(1, "cpu")), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: layer(make_input((3, 63), torch.bfloat16, "cpu", gen)), ValueError, "in_features"),
        (lambda: F.lora_linear(x, layer.packed, layer.state, layer.A, layer.B, float("nan")), ValueError,
         "scaling must be finite"),
        (lambda: layer(x, p=0.1, seed=seed_tensor(1, "cpu").int()), TypeError, "lora_linear: seed must be int64"),
        # A seed is checked where p = 0 leaves it unused too: it is an argument like any other.
        (lambda: layer(x, p=0.0, seed=torch.zeros(2, dtype=torch.int64)), ValueError,
         "lora_linear: seed must have one element"),
    ]  # fmt: skip
    assert_each_raises(cases)


@requires_cuda
@pytest.mark.cuda
def test_device_mismatch_is_an_error(gen):
    layer = Layer(32, 64, 4, "cuda", gen)
    x = make_input((3, 64), torch.bfloat16, "cuda", gen)
    with pytest.raises(ValueError, match="lora_A is on cpu"):
        layer(x, A=layer.A.cpu())
    with pytest.raises(ValueError, match="seed is on cpu"):
        layer(x, p=0.1, seed=seed_tensor(1, "cpu"))


# ---------------------------------------------------------------------------------------------
# The modules


def make_linear(n, k, dtype, gen, bias=True):
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return linear.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_linear_from_linear(gen, device):
    linear = make_linear(96, 128, torch.bfloat16, gen)
    module = QLoRALinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.1, device=device)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == [
        "lora_A.default.weight",
        "lora_B.default.weight",
    ]
    assert module.lora_A.default.weight.shape == (8, 128) and module.lora_B.default.weight.shape == (96, 8)
    assert module.lora_A.default.weight.dtype == torch.float32
    assert module.scaling["default"] == 2.0
    assert not module.lora_B.default.weight.any()  # B starts at zero: the layer starts as its base
    # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(in_features).
    a = module.lora_A.default.weight
    assert a.abs().max() <= 1 / math.sqrt(128) and a.std() > 0.5 / math.sqrt(3 * 128)
    x = make_input((5, 128), torch.bfloat16, device, gen)
    module.train()
    assert_bits_equal(module(x), module.base_layer(x))
    # The base is the quantized linear: its output is gemm_4bit's.
    assert_bits_equal(
        module.base_layer(x),
        F.gemm_4bit(x, module.base_layer.weight, module.base_layer.quant_state, module.base_layer.bias),
    )
    rs = QLoRALinear.from_linear(linear, r=16, lora_alpha=8, use_rslora=True, init="gaussian", device=device)
    assert rs.scaling["default"] == 8 / 4
    assert abs(rs.lora_A.default.weight.std().item() - 1 / 16) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_linear_train_eval_and_dropout(gen, device):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    module = QLoRALinear.from_linear(make_linear(64, 96, torch.bfloat16, gen), r=8, lora_dropout=0.3, device=device)
    torch.nn.init.normal_(module.lora_B.default.weight)
    x = make_input((17, 96), torch.bfloat16, device, gen)
    module.eval()
    y_eval = module(x)
    assert_bits_equal(y_eval, module(x))  # no dropout in eval mode
    layer_args = (
        module.base_layer.weight,
        module.base_layer.quant_state,
        module.lora_A.default.weight,
        module.lora_B.default.weight,
        2.0,
    )
    assert_bits_equal(y_eval, F.lora_linear(x, *layer_args, 0.0, module.base_layer.bias))
    module.train()
    y1, y2 = module(x), module(x)
    assert not torch.equal(y1, y2)  # a fresh mask each step
    torch.manual_seed(11)
    y3 = module(x)
    torch.manual_seed(11)
    assert_bits_equal(module(x), y3)  # torch.manual_seed repeats it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recomputes_the_same_mask(gen, device, use_reentrant):
    module = QLoRALinear.from_linear(make_linear(64, 96, torch.bfloat16, gen), r=8, lora_dropout=0.2, device=device)
    torch.nn.init.normal_(module.lora_B.default.weight)
    x = make_input((2, 9, 96), torch.bfloat16, device, gen)
    g = make_input((2, 9, 64), torch.bfloat16, device, gen)

    def run(checkpointed):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(77)
        y = torch.utils.checkpoint.checkpoint(module, xi, use_reentrant=use_reentrant) if checkpointed else module(xi)
        y.backward(g)
        return y.detach(), xi.grad, module.lora_A.default.weight.grad.clone(), module.lora_B.default.weight.grad.clone()

    for a, b in zip(run(False), run(True)):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_and_input_without_grad(gen, device):
    module = QLoRALinear.from_linear(make_linear(64, 96, torch.float32, gen), r=8, device=device)
    torch.nn.init.normal_(module.lora_B.default.weight)
    x = make_input((5, 96), torch.float32, device, gen)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    expected = F.lora_linear(
        x.bfloat16(),
        module.base_layer.weight,
        module.base_layer.quant_state,
        module.lora_A.default.weight,
        module.lora_B.default.weight,
        2.0,
        0.0,
        module.base_layer.bias.bfloat16(),
    )
    assert_bits_equal(y, expected)
    # Without autocast and without a compute dtype: float32 throughout, output float32.
    y32 = module(x)
    assert y32.dtype == torch.float32
    y32.sum().backward()  # x needs no grad: only the adapters get one
    assert module.lora_A.default.weight.grad is not None and x.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(gen, device):
    module = QLoRALinear.from_linear(make_linear(64, 128, torch.bfloat16, gen), r=8, lora_dropout=0.1, device=device)
    torch.nn.init.normal_(module.lora_B.default.weight)
    compiled = torch.compile(
        module, fullgraph=True, dynamic=False, backend="aot_eager" if device == "cpu" else "inductor"
    )
    x = make_input((33, 128), torch.bfloat16, device, gen)
    g = make_input((33, 64), torch.bfloat16, device, gen)
    module.eval()
    assert_bits_equal(compiled(x), module(x))
    module.train()
    results = []
    for fn in (module, compiled):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        with torch._inductor.config.patch(fallback_random=True):
            y = fn(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, module.lora_A.default.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_linear4bit_state_dict_round_trip(gen, device):
    linear = make_linear(40, 96, torch.bfloat16, gen)
    layer = Linear4bit.from_linear(linear, blocksize=32, compute_dtype=torch.bfloat16, device=device)
    sd = layer.state_dict()
    assert sorted(sd) == sorted(
        [
            "weight",
            "bias",
            "weight.absmax",
            "weight.quant_map",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4",
        ]
    )
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (40 * 96 // 2, 1)
    shell = Linear4bit(96, 40, compute_dtype=torch.bfloat16, device=device)
    shell.load_state_dict(sd)
    x = make_input((3, 96), torch.bfloat16, device, gen)
    assert_bits_equal(shell(x), layer(x))
    assert_bits_equal(shell.dequantize(), layer.dequantize())
    # Dtype casts leave the codes and scales alone; .to(device) moves both.
    layer.half()
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    wrong = Linear4bit(96, 41, device=device)
    with pytest.raises(RuntimeError, match=r"has shape \(40, 96\), this layer needs \(41, 96\)"):
        wrong.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="none of its 4-bit entries"):
        Linear4bit(96, 40, device=device).load_state_dict({"weight": sd["weight"], "bias": sd["bias"]})


def test_linear4bit_is_an_nn_linear_with_packed_codes(gen):
    """An nn.Linear subclass (as bitsandbytes' Linear4bit), so that searches by type find it, whose empty
    shell's state dict has the packed weight alone (transformers reads a meta-built model's keys), and
    which nn.Linear's initialization leaves alone."""
    layer = Linear4bit.from_linear(make_linear(40, 96, torch.bfloat16, gen))
    assert isinstance(layer, torch.nn.Linear) and (layer.in_features, layer.out_features) == (96, 40)
    codes = layer.weight.clone()
    layer.reset_parameters()
    assert_bits_equal(layer.weight, codes)
    shell = Linear4bit(96, 40, quant_storage=torch.bfloat16, device="meta")
    sd = shell.state_dict()
    assert sorted(sd) == ["bias", "weight"] and sd["weight"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="a torch.nn.Linear with a float weight, got Linear4bit"):
        Linear4bit.from_linear(layer)


def test_linear4bit_loads_bitsandbytes_state_dict(gen):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    linear = make_linear(40, 128, torch.bfloat16, gen)
    theirs = bnb.nn.Linear4bit(
        128, 40, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cuda" if torch.cuda.is_available() else "cpu")  # bitsandbytes quantizes on .to()
    assert theirs.weight.quant_state is not None
    sd = {k: v.cpu() for k, v in theirs.state_dict().items()}
    ours = Linear4bit(128, 40, compute_dtype=torch.bfloat16)
    ours.load_state_dict(sd)
    expected = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).cpu()
    assert_bits_equal(ours.dequantize(), expected)
    assert_bits_equal(ours.bias, sd["bias"].to(torch.bfloat16))


@needs_caching_allocator
@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_draws_a_new_mask_each_replay(gen):
    module = QLoRALinear.from_linear(make_linear(64, 128, torch.bfloat16, gen), r=8, lora_dropout=0.3, device="cuda")
    torch.nn.init.normal_(module.lora_B.default.weight)
    x = make_input((16, 128), torch.bfloat16, "cuda", gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        module(x)  # warm-up outside the capture (cuBLAS handles)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = module(x)
    torch.cuda.current_stream().wait_stream(stream)
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(y.clone())
    assert not torch.equal(outs[0], outs[1])  # the seed is drawn on the device each replay
    module.eval()
    with torch.no_grad():
        eval_graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(eval_graph, stream=stream):
            y_eval = module(x)
        torch.cuda.current_stream().wait_stream(stream)
        eval_graph.replay()
        torch.cuda.synchronize()
        assert_bits_equal(y_eval, module(x))
