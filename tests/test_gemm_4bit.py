"""The products with a 4-bit weight (gemm_4bit: x @ W^T + b; gemm_4bit_transposed: grad @ W) against
a float64 reference on the dequantized weight, on every dispatch path, through opcheck, autograd,
torch.compile and CUDA graphs, and on bad input."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from qlora_ext import _C, functional as F
from qlora_ext.quant_state import QuantState

from helpers import (
    CAN_PROFILE,
    DEVICES,
    GEMM_PATHS,
    assert_close_to_reference,
    assert_each_raises,
    cuda_kernels_launched,
    gemm_on_path,
    make_input,
    make_weight,
    needs_caching_allocator,
    requires_cuda,
    transposed_kernel_weight,
)


def device_paths():
    out = [pytest.param("cpu", "default", id="cpu")]
    for path in GEMM_PATHS:
        out.append(pytest.param("cuda", path, id=f"cuda-{path}", marks=[requires_cuda, pytest.mark.cuda]))
    return out


# M from decode to training; N and K odd, a multiple of the blocksize, or neither.
MS = [1, 2, 3, 7, 16, 33, 64, 129, 1024]
SHAPES = [(67, 192), (130, 1024), (33, 100), (48, 77)]


@pytest.mark.parametrize("device,path", device_paths())
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES, ids=lambda v: str(v))
def test_gemm_matches_float64_reference(gen, device, path, m, n, k):
    packed, state = make_weight(n, k, device, gen)
    x = make_input((m, k), torch.bfloat16, device, gen)
    bias = make_input((n,), torch.bfloat16, device, gen)
    w = F.dequantize_4bit(packed, state)
    out = gemm_on_path(path, x, packed, state, bias)
    out_nobias = gemm_on_path(path, x, packed, state)
    assert out.dtype == torch.bfloat16 and out.device == x.device
    assert_close_to_reference(out, x, w, bias, f"{path} M={m} {n}x{k}")
    assert_close_to_reference(out_nobias, x, w, None, f"{path} M={m} {n}x{k} no bias")


@pytest.mark.parametrize("device,path", device_paths())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_gemm_formats(gen, device, path, dtype, quant_type, dq, blocksize):
    n, k = 72, 4096 + 512
    packed, state = make_weight(n, k, device, gen, dtype=dtype, blocksize=blocksize, quant_type=quant_type, dq=dq)
    w = F.dequantize_4bit(packed, state)
    for m in (1, 9, 40):
        x = make_input((m, k), dtype, device, gen)
        out = gemm_on_path(path, x, packed, state)
        assert out.dtype == dtype
        assert_close_to_reference(out, x, w, None, f"{path} {dtype} {quant_type} dq={dq} bs={blocksize} M={m}")


# Every kernel configuration of the CUDA dispatch table (csrc/gemm_4bit_config.cpp), by name, and its
# fields; tests and benchmarks run one through F._gemm_4bit_with.
CONFIGS = {c["name"]: c for c in _C._gemm_4bit_configs()}
FUSED_CONFIGS = [name for name, c in CONFIGS.items() if c["kernel"] != "dequantize_cublas"]


def config_dtype(name: str) -> torch.dtype:
    """The dtype a configuration multiplies: the wgmma kernels' float decode is fp16 only, their
    tensor-copy form bf16 only; the others take either (bf16 here)."""
    c = CONFIGS[name]
    return torch.float16 if c["kernel"] == "wgmma" and not c["tensor_copy"] else torch.bfloat16


def runs_here(name: str, k: int, blocksize: int = 64) -> bool:
    """Whether the configuration can run on this GPU for rows of k codes (a default build: sm_90a
    code where the GPU is sm_90): the warp-specialized kernel needs sm_90 and blocks a row in
    multiples of 4, the wgmma kernels sm_90."""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    kernel = CONFIGS[name]["kernel"]
    if kernel == "ws":
        return hopper and (k // blocksize) % 4 == 0
    return hopper or kernel != "wgmma"


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("config", FUSED_CONFIGS)
@pytest.mark.parametrize("n,k", [(200, 1024), (40, 16384 + 64), (5000, 4096)], ids=lambda v: str(v))
def test_every_fused_kernel(gen, config, n, k):
    """Each kernel configuration the dispatch or a benchmark can pick, at every M from 1 to 100 (a
    configuration's token tile repeats over M), with double quantization, in its dtype. 5000 rows
    are not a multiple of 32. 5000 x 4096 gives each CTA of the warp-specialized kernel two or three
    tiles of 16 rows on a GPU of up to 156 SMs (its copy warp runs across tile boundaries; the first
    tile's scales are decoded by all warps, the second's and third's by the two scale warps in turn);
    40 x 16448 has 257 blocks a row, not a multiple of 4 (the warp-specialized kernel cannot run:
    NotImplementedError), and rows longer than 16384. Where a configuration cannot run on this GPU
    it must say so, not fall back."""
    dtype = config_dtype(config)
    packed, state = make_weight(n, k, "cuda", gen, dtype=dtype)
    w = F.dequantize_4bit(packed, state)
    for m in (1, 5, 8, 16, 40, 64, 100):
        x = make_input((m, k), dtype, "cuda", gen)
        if not runs_here(config, k):
            with pytest.raises(NotImplementedError, match="cannot run here"):
                F._gemm_4bit_with(x, packed, state, config)
            continue
        out = F._gemm_4bit_with(x, packed, state, config)
        assert_close_to_reference(out, x, w, None, f"{config} M={m} {n}x{k}")


def test_unknown_config_is_an_error(gen):
    packed, state = make_weight(32, 128, "cpu", gen)
    x = make_input((4, 128), torch.bfloat16, "cpu", gen)
    # no CPU kernel: the configurations are CUDA's
    with pytest.raises(NotImplementedError, match=r"Could not run 'qlora::_gemm_4bit_with' .*'CPU' backend"):
        F._gemm_4bit_with(x, packed, state, "mma_16x8")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="no configuration named 'variant 9'"):
            F._gemm_4bit_with(x.cuda(), packed.cuda(), state.to("cuda"), "variant 9")


@requires_cuda
@pytest.mark.cuda
def test_default_kernel_by_m(gen):
    """The default dispatch on a weight of 2^26 codes (bf16, double quantization): the
    warp-specialized mma.sync kernel with tiles of two row groups (its last template argument) up to
    M = 16, the tensor-copy wgmma kernel from M = 17 (on an sm_90 GPU; elsewhere whatever runs must
    still be right)."""
    n, k = 8192, 8192
    packed, state = make_weight(n, k, "cuda", gen)
    w = F.dequantize_4bit(packed, state)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for m, kernel in (
        (1, "gemm_4bit_ws_kernel"),
        (8, "gemm_4bit_ws_kernel"),
        (9, "gemm_4bit_ws_kernel"),
        (16, "gemm_4bit_ws_kernel"),
        (17, "gemm_4bit_wgmma_tma_kernel"),
        (33, "gemm_4bit_wgmma_tma_kernel"),
    ):
        x = make_input((m, k), torch.bfloat16, "cuda", gen)
        out = F.gemm_4bit(x, packed, state)
        assert_close_to_reference(out, x, w, None, f"default M={m} {n}x{k}")
        if hopper and CAN_PROFILE:
            names = cuda_kernels_launched(F.gemm_4bit, x, packed, state)
            assert any(kernel + "<" in name for name in names), (m, names)
            if kernel == "gemm_4bit_ws_kernel":
                assert any(name.split(">")[0].endswith(", 2") for name in names if kernel + "<" in name), (m, names)


WGMMA_CONFIGS = [name for name in FUSED_CONFIGS if CONFIGS[name]["kernel"] == "wgmma"]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("config", WGMMA_CONFIGS)
def test_wgmma_kernel(gen, quant_type, dq, blocksize, config):
    """Each wgmma configuration (fp16: the float decode; bf16: the pair table fed by tensor copies,
    two or one CTA an SM) in every format, with a bias, at M from 1 to 300 (one partial token tile
    to several), with a partial row tile (200 rows: 128 + 72) and K split over CTAs (4096 k on 2 row
    tiles). Its weight is dequantize_4bit's, so it must agree with dequantize + cuBLAS within fp32
    accumulation, and give the same bits run to run (the splits are added in a fixed order). On an
    sm_90 GPU the configuration's own kernel must be the one that ran (its tile and stages in the
    template arguments); elsewhere it must refuse."""
    c = CONFIGS[config]
    dtype = config_dtype(config)
    n, k = 200, 4096
    packed, state = make_weight(n, k, "cuda", gen, dtype=dtype, blocksize=blocksize, quant_type=quant_type, dq=dq)
    w = F.dequantize_4bit(packed, state)
    bias = make_input((n,), dtype, "cuda", gen)
    kernel = "gemm_4bit_wgmma_tma_kernel<" if c["tensor_copy"] else "gemm_4bit_wgmma_kernel<"
    for m in (1, 17, 33, 64, 100, 129, 256, 300):
        x = make_input((m, k), dtype, "cuda", gen)
        if not runs_here(config, k, blocksize):
            with pytest.raises(NotImplementedError, match="cannot run here"):
                F._gemm_4bit_with(x, packed, state, config, bias)
            continue
        out = F._gemm_4bit_with(x, packed, state, config, bias)
        again = F._gemm_4bit_with(x, packed, state, config, bias)
        if CAN_PROFILE and m == 64:
            names = cuda_kernels_launched(F._gemm_4bit_with, x, packed, state, config, bias)
            tile = f", {c['tokens']}, {c['stages']}"
            assert any(kernel in name and tile in name.split(">")[0] for name in names), names
        what = f"{config} {dtype} {quant_type} dq={dq} bs={blocksize} M={m}"
        assert_close_to_reference(out, x, w, bias, what)
        assert torch.equal(out, again), f"{what}: two runs differ"


@pytest.mark.parametrize("device,path", device_paths())
def test_gemm_leading_dims_noncontiguous_and_views(gen, device, path):
    n, k = 96, 256
    packed, state = make_weight(n, k, device, gen)
    w = F.dequantize_4bit(packed, state)
    bias = make_input((n,), torch.bfloat16, device, gen)
    base = make_input((3, 5, 2 * k), torch.bfloat16, device, gen)
    cases = {
        "leading dims": make_input((2, 3, 4, k), torch.bfloat16, device, gen),
        "strided last dim": base[..., ::2],
        "transposed leading": make_input((5, 3, k), torch.bfloat16, device, gen).transpose(0, 1),
        "offset view": base[..., 1 : k + 1],
        "1-D": make_input((k,), torch.bfloat16, device, gen),
    }
    for what, x in cases.items():
        out = gemm_on_path(path, x, packed, state, bias)
        assert out.shape == (*x.shape[:-1], n), what
        assert_close_to_reference(out.reshape(-1, n), x.reshape(-1, k), w, bias, what)
    # the packed codes as another storage dtype, and through bitsandbytes' transposed view
    x = cases["leading dims"]
    ref = gemm_on_path(path, x, packed, state)
    assert torch.equal(gemm_on_path(path, x, packed.view(-1).view(torch.float16).unsqueeze(1), state), ref)
    assert torch.equal(gemm_on_path(path, x, packed.t(), state), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 7, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gemm_transposed_matches_reference(gen, device, m, dtype):
    n, k = 136, 320
    packed, state = make_weight(n, k, device, gen, dtype=dtype)
    w = F.dequantize_4bit(packed, state)
    g = make_input((m, n), dtype, device, gen)
    out = F.gemm_4bit_transposed(g, packed, state)
    assert out.shape == (m, k) and out.dtype == dtype
    # grad @ w is x @ (w^T)^T: the same bound with w^T; the dequantized weight is used as is, but at
    # M <= 16 on a CUDA GPU with bf16 mma (sm_80 on) the transposed kernel's own (transposed_kernel_weight).
    own_kernel = device == "cuda" and dtype != torch.float32 and torch.cuda.get_device_capability()[0] >= 8
    own = transposed_kernel_weight(packed, state) if own_kernel else w
    assert_close_to_reference(out, g, (own if m <= 16 else w).T.contiguous(), None, f"transposed M={m}")
    g3 = make_input((2, 3, n), dtype, device, gen)[:, :, :]
    out3 = F.gemm_4bit_transposed(g3.transpose(0, 1), packed, state)
    assert out3.shape == (3, 2, k)
    assert_close_to_reference(out3.reshape(-1, k), g3.transpose(0, 1).reshape(-1, n), own.T.contiguous(), None, "3-D")


# The cuBLAS path dequantizes W a band of rows at a time, at most 128 MiB a band (csrc/cuda/
# gemm_4bit.cu), so that a large weight's dequantized copy does not sit whole in a training step's
# peak memory: 16384 x 4160 is 130 MiB in bf16 (two bands) and 260 MiB in float32 (three), and K =
# 65 blocks puts a band's start on a nested scales' group only every 256 rows. Both products stay
# within the float64 bound (the backward's later bands add to the output: one more rounding of a
# partial sum each, inside the bound's 2u), and a call's memory stays well under the whole weight's.
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
def test_cublas_path_dequantizes_a_large_weight_in_bands(gen, dtype, dq):
    n, k, m = 16384, 4160, 64
    packed, state = make_weight(n, k, "cuda", gen, dtype=dtype, dq=dq)
    w = F.dequantize_4bit(packed, state)
    whole = w.numel() * w.element_size()
    x = make_input((m, k), dtype, "cuda", gen)
    bias = make_input((n,), dtype, "cuda", gen)
    g = make_input((300, n), dtype, "cuda", gen)  # past the backward's fused kernels (M <= 256)
    caching = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1"  # (the sanitizer's runs turn it off)
    for what, call in [
        ("forward", lambda: gemm_on_path("cublas", x, packed, state, bias)),
        ("backward", lambda: F.gemm_4bit_transposed(g, packed, state)),
    ]:
        call()  # (the first call of a process may allocate cuBLAS's workspace, outside the bands)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        if caching:
            assert extra < 0.6 * whole, f"{what}: {extra} bytes over the call, the whole weight is {whole}"
        if what == "forward":
            assert_close_to_reference(out, x, w, bias, f"banded forward {dtype} dq={dq}")
        else:
            assert_close_to_reference(out, g, w.T.contiguous(), None, f"banded backward {dtype} dq={dq}")
            # one 1 a row of grad picks a row of W: a band's share, the other bands adding zeros (300
            # rows: the cuBLAS path, past the fused kernels' M <= 256)
            rows = torch.tensor([0, 255, 256, n // 2, n - 1, *range(5000, 5295)])
            one_hot = torch.zeros(len(rows), n, dtype=dtype, device="cuda")
            one_hot[torch.arange(len(rows)), rows.cuda()] = 1
            assert torch.equal(F.gemm_4bit_transposed(one_hot, packed, state), w[rows.cuda()])


# The backward's own kernel at M <= 16 (csrc/cuda/gemm_4bit_transposed.cu) against float64, on the
# formats and on shapes that end a 16-row step or a split of N inside the weight; N not a multiple of
# 8 (grad is copied 8 rows at a time), K not whole 64-column slabs, blocksize 32, a round of steps
# (128 rows) not a multiple of 4 blocks with 8-bit scale codes, and M = 17 take dequantize + cuBLAS
# (or, bf16 on Hopper with N and K whole 64s, the wgmma kernel: test_gemm_transposed_wgmma), which
# must give the same bound.
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 3, 16, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n,k,blocksize,quant_type,dq",
    [
        (136, 320, 64, "nf4", True),  # 8.5 steps of 16 rows
        (2056, 192, 128, "fp4", True),  # several splits of N, the last one short
        (64, 64, 256, "nf4", False),  # one slab; a block longer than a row
        (136, 192, 256, "nf4", True),  # 102 blocks: the last 8-bit scale codes' word is partial
        (48, 192, 512, "nf4", True),  # 18 blocks: a whole step whose last scale word is partial
        (4096, 8192, 64, "nf4", True),  # a warp's steps go round its ring of copies several times
        (4096, 128, 64, "fp4", False),
        (135, 320, 64, "nf4", True),  # N odd: the cuBLAS path
        (138, 320, 64, "nf4", True),  # N even, not a multiple of 8: the cuBLAS path
        (136, 96, 64, "nf4", True),  # K not whole slabs: the cuBLAS path
        (136, 128, 32, "nf4", True),  # blocksize 32 (two scales a slab row): the cuBLAS path
        (136, 192, 4096, "nf4", True),  # a round of steps 6 blocks, not a multiple of 4: the cuBLAS path
        (136, 192, 4096, "fp4", False),  # the same with float scales: the kernel
    ],
    ids=str,
)
def test_gemm_transposed_small_m(gen, m, dtype, n, k, blocksize, quant_type, dq):
    packed, state = make_weight(n, k, "cuda", gen, dtype=dtype, blocksize=blocksize, quant_type=quant_type, dq=dq)
    scale_words_in_place = 128 * k % ((4 if dq else 1) * blocksize) == 0
    tensor_cores = torch.cuda.get_device_capability()[0] >= 8  # mma.sync with bf16
    own_kernel = m <= 16 and n % 8 == 0 and k % 64 == 0 and blocksize >= 64 and scale_words_in_place and tensor_cores
    # the weight the product multiplies: the own kernel's (or the wgmma kernel's) rounding of it, or
    # dequantize_4bit's
    rounded = own_kernel or transposed_wgmma_runs(m, n, k, dtype, blocksize)
    w = transposed_kernel_weight(packed, state) if rounded else F.dequantize_4bit(packed, state)
    g = make_input((m, n), dtype, "cuda", gen)
    out = F.gemm_4bit_transposed(g, packed, state)
    assert out.shape == (m, k) and out.dtype == dtype
    assert_close_to_reference(out, g, w.T.contiguous(), None, f"transposed M={m} {n}x{k}")
    assert torch.equal(out, F.gemm_4bit_transposed(g, packed, state)), "not the same bits run to run"
    # One 1 a row of grad picks a row of W: the product is that row to the bit (a rounding other
    # than the one stated, a wrong scale, or a column out of place would show here).
    picked = torch.randint(0, n, (m,), generator=gen)
    one_hot = torch.zeros(m, n, dtype=dtype)
    one_hot[torch.arange(m), picked] = 1
    assert torch.equal(F.gemm_4bit_transposed(one_hot.to("cuda"), packed, state), w[picked.to("cuda")])
    if CAN_PROFILE:
        names = cuda_kernels_launched(F.gemm_4bit_transposed, g, packed, state)
        assert any("gemm_4bit_transposed_kernel" in name for name in names) == own_kernel, names
        if own_kernel and n >= 2048:  # N / (64 M) >= 2 and the GPU wants more CTAs than slabs: N splits
            assert any("sum_splits_kernel" in name for name in names), names
    # grad 2 bytes past a 16-byte boundary (the kernel copies 16 bytes at a time): the cuBLAS path,
    # within the same bound
    storage = make_input((m * n + 1,), dtype, "cuda", gen)
    shifted = storage[1:].view(m, n)
    shifted.copy_(g)
    shifted_out = F.gemm_4bit_transposed(shifted, packed, state)
    w_dequantized = F.dequantize_4bit(packed, state).T.contiguous()
    assert_close_to_reference(shifted_out, g, w_dequantized, None, f"transposed M={m} {n}x{k}, grad misaligned")
    if CAN_PROFILE:
        names = cuda_kernels_launched(F.gemm_4bit_transposed, shifted, packed, state)
        assert not any("gemm_4bit_transposed_kernel" in name for name in names), names
        assert not transposed_wgmma_launched(names), names


# The backward above M = 16 on Hopper: the tensor-copy wgmma kernel transposed (A = W^T decoded from
# pairs of W's rows, grad the tensor copies' B tile), bf16, M up to 128 (256 on weights of 2^25
# elements or more), N and K whole 64s. Shapes with one 128-column tile, a half-empty last tile
# (K = 192), K split over CTAs (few tiles for the SMs), a block longer than a warpgroup's 64 columns
# (256) or than a row (4096), every scale format; N not a multiple of 64, fp16, M = 257 and M above
# 128 on the small weights take dequantize + cuBLAS and must meet the same bound.
def transposed_wgmma_runs(m: int, n: int, k: int, dtype: torch.dtype, blocksize: int) -> bool:
    """Whether gemm_4bit_transposed runs the wgmma kernel here (choose_transposed_config; a default
    build has sm_90a code for an sm_90 GPU)."""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    whole = n % 64 == 0 and k % 64 == 0 and blocksize >= 64 and k % blocksize == 0
    reach = 16 < m <= 128 or (128 < m <= 256 and n * k >= 2**25)
    return hopper and dtype == torch.bfloat16 and reach and whole


def transposed_wgmma_launched(names: list[str]) -> bool:
    """Whether the profiled kernel names include the wgmma kernel in its transposed form (the
    template's last flag, TRANSPOSED, true)."""
    return any("gemm_4bit_wgmma_tma_kernel<" in name and name.split(">")[0].endswith("true") for name in names)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", [17, 32, 33, 64, 100, 128, 200, 256, 257])
@pytest.mark.parametrize(
    "n,k,blocksize,quant_type,dq,dtype",
    [
        (256, 128, 64, "nf4", True, torch.bfloat16),  # one tile, four stages
        (1024, 192, 64, "fp4", True, torch.bfloat16),  # the last tile's second warpgroup past K
        (4096, 1024, 128, "nf4", False, torch.bfloat16),  # 8 tiles: the sum split over CTAs
        (640, 4096, 256, "nf4", True, torch.bfloat16),  # a block of 256: both warpgroups' columns in one
        (192, 4096, 4096, "fp4", False, torch.bfloat16),  # a block a row
        (64, 64, 64, "nf4", True, torch.bfloat16),  # one stage, half a tile (a tiny Llama's q and o)
        (128, 64, 64, "nf4", True, torch.bfloat16),  # two stages, half a tile (its gate and up)
        (64, 128, 64, "nf4", True, torch.bfloat16),  # one stage, one tile (its down)
        (136, 320, 64, "nf4", True, torch.bfloat16),  # N not whole stages of 64: cuBLAS
        (1024, 192, 64, "nf4", True, torch.float16),  # fp16: cuBLAS
    ],
    ids=str,
)
def test_gemm_transposed_wgmma(gen, m, n, k, blocksize, quant_type, dq, dtype):
    check_transposed_wgmma(gen, m, n, k, blocksize, quant_type, dq, dtype)


# The 256-token tile (M above 128) runs only on weights of 2^25 elements or more: the smallest.
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", [129, 200, 256])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
def test_gemm_transposed_wgmma_large_weight(gen, m, dq):
    check_transposed_wgmma(gen, m, 8192, 4096, 64, "nf4", dq, torch.bfloat16)


def check_transposed_wgmma(gen, m, n, k, blocksize, quant_type, dq, dtype):
    packed, state = make_weight(n, k, "cuda", gen, dtype=dtype, blocksize=blocksize, quant_type=quant_type, dq=dq)
    wgmma = transposed_wgmma_runs(m, n, k, dtype, blocksize)
    # the weight the product multiplies: the pair table's bf16(bf16(code) * bf16(scale)), or dequantize_4bit's
    w = transposed_kernel_weight(packed, state) if wgmma else F.dequantize_4bit(packed, state)
    g = make_input((m, n), dtype, "cuda", gen)
    out = F.gemm_4bit_transposed(g, packed, state)
    assert out.shape == (m, k) and out.dtype == dtype
    what = f"transposed M={m} {n}x{k} bs={blocksize} {quant_type} dq={dq} {dtype}"
    assert_close_to_reference(out, g, w.T.contiguous(), None, what)
    assert torch.equal(out, F.gemm_4bit_transposed(g, packed, state)), f"{what}: not the same bits run to run"
    # One 1 a row of grad picks a row of W: that row to the bit (a column out of place, a wrong
    # scale or row pair, a rounding other than the one stated would show here).
    picked = torch.randint(0, n, (m,), generator=gen)
    one_hot = torch.zeros(m, n, dtype=dtype)
    one_hot[torch.arange(m), picked] = 1
    assert torch.equal(F.gemm_4bit_transposed(one_hot.to("cuda"), packed, state), w[picked.to("cuda")]), what
    if CAN_PROFILE and m in (64, 200):
        names = cuda_kernels_launched(F.gemm_4bit_transposed, g, packed, state)
        assert transposed_wgmma_launched(names) == wgmma, names


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(gen, device):
    packed, state = make_weight(32, 64, device, gen)
    assert F.gemm_4bit(torch.empty(0, 64, dtype=torch.bfloat16, device=device), packed, state).shape == (0, 32)
    assert F.gemm_4bit_transposed(torch.empty(2, 0, 32, dtype=torch.bfloat16, device=device), packed, state).shape == (
        2,
        0,
        64,
    )
    # a weight with K = 0: the empty sum is zero, plus the bias
    packed0, state0 = F.quantize_4bit(torch.empty(5, 0, dtype=torch.bfloat16, device=device))
    bias = make_input((5,), torch.bfloat16, device, gen)
    x = torch.empty(3, 0, dtype=torch.bfloat16, device=device)
    assert torch.equal(F.gemm_4bit(x, packed0, state0, bias), bias.expand(3, 5))
    assert torch.equal(F.gemm_4bit(x, packed0, state0), torch.zeros(3, 5, dtype=torch.bfloat16, device=device))


# One path: the gradients are gemm_4bit_transposed's and the bias's sum whatever kernel ran forward
# (test_gemm_matches_float64_reference holds each forward path).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
def test_autograd(gen, device, dq):
    n, k = 80, 192
    packed, state = make_weight(n, k, device, gen, dq=dq)
    w = F.dequantize_4bit(packed, state).float()
    for m in (1, 33):
        x = make_input((m, k), torch.bfloat16, device, gen).requires_grad_()
        bias = make_input((n,), torch.bfloat16, device, gen).requires_grad_()
        y = F.gemm_4bit(x, packed, state, bias)
        gy = make_input(y.shape, torch.bfloat16, device, gen)
        y.backward(gy)
        assert_close_to_reference(x.grad, gy, w.T.contiguous(), None, "dx")
        # bias.grad is the column sum of gy, rounded once to bf16
        torch.testing.assert_close(bias.grad.double(), gy.double().sum(0), rtol=2**-8, atol=0)
    # only the bias, or only x, asks for a gradient
    x = make_input((3, k), torch.bfloat16, device, gen)
    bias = make_input((n,), torch.bfloat16, device, gen).requires_grad_()
    F.gemm_4bit(x, packed, state, bias).sum().backward()
    assert torch.equal(bias.grad, torch.full_like(bias, 3.0))
    x.requires_grad_()
    F.gemm_4bit(x, packed, state, bias.detach()).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert not F.gemm_4bit(x, packed, state, bias).requires_grad
    # the transposed product's own gradient is the forward product
    g = make_input((4, n), torch.bfloat16, device, gen).requires_grad_()
    out = F.gemm_4bit_transposed(g, packed, state)
    go = make_input(out.shape, torch.bfloat16, device, gen)
    out.backward(go)
    assert torch.equal(g.grad, F.gemm_4bit(go, packed, state))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(gen, device):
    packed, state = make_weight(48, 128, device, gen)
    na, nc, off = state.state2.absmax, state.state2._code_for_kernel(), state.offset
    for m in (1, 3, 100):
        x = make_input((m, 128), torch.bfloat16, device, gen).requires_grad_()
        bias = make_input((48,), torch.bfloat16, device, gen)
        torch.library.opcheck(
            torch.ops.qlora.gemm_4bit.default,
            (x, packed, state.absmax, na, nc, off, 64, 256, "nf4", [48, 128], bias),
        )
        g = make_input((m, 48), torch.bfloat16, device, gen).requires_grad_()
        torch.library.opcheck(
            torch.ops.qlora.gemm_4bit_transposed.default,
            (g, packed, state.absmax, na, nc, off, 64, 256, "nf4", [48, 128]),
        )


def test_meta_tensors(gen):
    packed, state = make_weight(48, 128, "cpu", gen)
    x = torch.empty(2, 7, 128, dtype=torch.bfloat16, device="meta")
    out = F.gemm_4bit(x, packed.to("meta"), state.to("meta"))
    assert out.shape == (2, 7, 48) and out.device.type == "meta"


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(gen, device):
    packed, state = make_weight(64, 256, device, gen)
    bias = make_input((64,), torch.bfloat16, device, gen)

    def layer(x):
        return torch.relu(F.gemm_4bit(x, packed, state, bias)) * 2

    compiled = torch.compile(
        layer, fullgraph=True, dynamic=False, backend="aot_eager" if device == "cpu" else "inductor"
    )
    for m in (1, 40):
        x = make_input((m, 256), torch.bfloat16, device, gen)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@needs_caching_allocator
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
def test_cuda_graph_capture_and_replay(gen, m):
    n, k = 256, 512
    packed, state = make_weight(n, k, "cuda", gen)
    bias = make_input((n,), torch.bfloat16, "cuda", gen)
    x = make_input((m, k), torch.bfloat16, "cuda", gen)
    g_in = make_input((m, n), torch.bfloat16, "cuda", gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Warm-up before capture, as torch.cuda.graphs asks: cuBLAS creates its handle on first use,
        # which a capture cannot do (the first test of a worker process would fail for that alone).
        F.gemm_4bit(x, packed, state, bias)
        F.gemm_4bit_transposed(g_in, packed, state)
    torch.cuda.current_stream().wait_stream(stream)
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y = F.gemm_4bit(x, packed, state, bias)
        dx = F.gemm_4bit_transposed(g_in, packed, state)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        x.copy_(make_input((m, k), torch.bfloat16, "cuda", gen))
        g_in.copy_(make_input((m, n), torch.bfloat16, "cuda", gen))
        y.fill_(float("nan"))
        dx.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, F.gemm_4bit(x, packed, state, bias))
        assert torch.equal(dx, F.gemm_4bit_transposed(g_in, packed, state))


@needs_caching_allocator
@requires_cuda
@pytest.mark.cuda
def test_graph_keeps_its_dequantized_weight_from_eager_calls(gen):
    """A graph's dequantized weight is its own (the capture's pool): eager calls between replays,
    with a larger weight, and the tensors made after them on the same stream (here `bystander`)
    take other memory, so that replay writes nowhere another tensor lives."""
    n, k, m = 256, 512, 1024  # M = 1024: dequantize + cuBLAS, a 256 KB dequantized weight
    packed, state = make_weight(n, k, "cuda", gen)
    big_packed, big_state = make_weight(2048, 1024, "cuda", gen)  # a 4 MB one
    x = make_input((m, k), torch.bfloat16, "cuda", gen)
    x_big = make_input((m, 1024), torch.bfloat16, "cuda", gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.gemm_4bit(x, packed, state)  # warm-up (cuBLAS's handle)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y = F.gemm_4bit(x, packed, state)
    with torch.cuda.stream(stream):
        F.gemm_4bit(x_big, big_packed, big_state)  # its 4 MB go back to the allocator
        bystander = torch.full((n * k // 2,), 7.0, device="cuda")  # 256 KB, on the same stream
    torch.cuda.current_stream().wait_stream(stream)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert bool((bystander == 7.0).all()), "the graph wrote into memory it no longer owns"
    assert torch.equal(y, F.gemm_4bit(x, packed, state))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("path", GEMM_PATHS)
def test_cuda_deterministic_and_every_element_written(gen, path):
    n, k = 1000, 2048
    packed, state = make_weight(n, k, "cuda", gen)
    for m in (1, 5, 16, 50):
        x = make_input((m, k), torch.bfloat16, "cuda", gen)
        first = gemm_on_path(path, x, packed, state)
        for _ in range(3):
            torch.full((m * n * 4,), float("nan"), device="cuda")  # poison what the next output reuses
            assert torch.equal(gemm_on_path(path, x, packed, state), first)
        assert not first.isnan().any()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("config", [name for name in FUSED_CONFIGS if CONFIGS[name]["kernel"] == "ws"])
def test_ws_kernel_many_tiles_a_cta(gen, config):
    """The warp-specialized kernel with many tiles a CTA and short rows: 25344 x 1024 is 1584
    tiles of 16 rows (792 of 32), 12 (6) a CTA on 132 SMs, one ring stage a row group, so the
    reduction buffers (5 with the 4-stage ring; 9 with the deepest) and the scale buffers are each
    reused several times and fast math warps run tiles ahead of the one adding up; at 16 tokens two
    octets, whose reduction meets at a barrier. Right against the float64 reference, the same bits
    run to run with poisoned memory between calls, and on an sm_90 GPU the kernel that ran has the
    configuration's row groups (its last template argument)."""
    n, k = 16 * 132 * 12, 1024
    if not runs_here(config, k):
        pytest.skip("the warp-specialized kernel runs on sm_90")
    row_groups = CONFIGS[config]["row_groups"]
    packed, state = make_weight(n, k, "cuda", gen)
    w = F.dequantize_4bit(packed, state)
    for m in (1, 8, 16):
        x = make_input((m, k), torch.bfloat16, "cuda", gen)
        first = F._gemm_4bit_with(x, packed, state, config)
        assert_close_to_reference(first, x, w, None, f"{config} M={m} {n}x{k}")
        if CAN_PROFILE:
            names = [
                s
                for s in cuda_kernels_launched(F._gemm_4bit_with, x, packed, state, config)
                if "gemm_4bit_ws_kernel<" in s
            ]
            assert len(names) == 1 and names[0].split(">")[0].endswith(f", {row_groups}"), names
        for _ in range(5):
            torch.full((m * n * 4,), float("nan"), device="cuda")  # poison what the next output reuses
            assert torch.equal(F._gemm_4bit_with(x, packed, state, config), first)


@needs_caching_allocator
@requires_cuda
@pytest.mark.cuda
def test_cuda_products_keep_no_memory_between_calls(gen):
    """The dequantized weight of the cuBLAS path (both products) is allocated for the call and given
    back when it returns: nothing stays allocated but the result, and the call's peak holds the
    weight's N x K bf16 once, not more."""
    n, k, m = 512, 1024, 300
    packed, state = make_weight(n, k, "cuda", gen)
    x = make_input((m, k), torch.bfloat16, "cuda", gen)
    g_in = make_input((m, n), torch.bfloat16, "cuda", gen)
    gemm_on_path("cublas", x, packed, state)  # cuBLAS's handle and workspace, once a process
    F.gemm_4bit_transposed(g_in, packed, state)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        y = gemm_on_path("cublas", x, packed, state)
        dx = F.gemm_4bit_transposed(g_in, packed, state)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before + y.nbytes + dx.nbytes
        del y, dx
    assert torch.cuda.memory_allocated() == before
    weight = n * k * 2
    slack = 64 * 1024  # what else the libraries might take per call; far below a second weight's 1 MiB
    assert weight <= torch.cuda.max_memory_allocated() - before <= weight + m * n * 2 + m * k * 2 + slack
    with pytest.warns(DeprecationWarning, match="does nothing"):
        F.release_gemm_workspaces()


@requires_cuda
@pytest.mark.cuda
def test_threads_on_one_stream_each_multiply_their_own_weight(gen):
    """Two host threads on the default stream, each at M = 1024 (dequantize + cuBLAS through the
    call's own dequantized weight) with its own weight of the same size: a thread's dequantization must not
    land between another's dequantization and its product (the ops release the GIL)."""
    n, k, m = 1024, 2048, 1024
    weights = [make_weight(n, k, "cuda", gen) for _ in range(2)]
    x = make_input((m, k), torch.bfloat16, "cuda", gen)
    g_in = make_input((m, n), torch.bfloat16, "cuda", gen)
    expected = [(F.gemm_4bit(x, *w), F.gemm_4bit_transposed(g_in, *w)) for w in weights]
    mixed: list = []

    def work(i: int) -> None:
        try:
            for _ in range(100):
                y, dx = F.gemm_4bit(x, *weights[i]), F.gemm_4bit_transposed(g_in, *weights[i])
                if not (torch.equal(y, expected[i][0]) and torch.equal(dx, expected[i][1])):
                    mixed.append(i)
                    return
        except Exception as e:  # reported below, not lost in the thread
            mixed.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mixed, mixed


def test_bad_input_names_the_argument(gen):
    packed, state = make_weight(32, 128, "cpu", gen)
    x = make_input((4, 128), torch.bfloat16, "cpu", gen)
    cases = [
        (
            lambda: F.gemm_4bit(make_input((4, 100), torch.bfloat16, "cpu", gen), packed, state),
            ValueError,
            "in_features",
        ),
        (lambda: F.gemm_4bit(x.to(torch.int32), packed, state), TypeError, "x must be float32, float16 or bfloat16"),
        (lambda: F.gemm_4bit(x, packed, state, torch.zeros(32)), TypeError, "bias must have x's dtype"),
        (
            lambda: F.gemm_4bit(x, packed, state, torch.zeros(31, dtype=torch.bfloat16)),
            ValueError,
            "bias must have shape",
        ),
        (lambda: F.gemm_4bit(x, packed[:-1], state), ValueError, "packed has"),
        (lambda: F.gemm_4bit(x, packed, "state"), TypeError, "quant_state must be a QuantState"),
        (lambda: F.gemm_4bit("x", packed, state), TypeError, "x must be a tensor"),
        (lambda: F.gemm_4bit_transposed(x, packed, state), ValueError, "out_features"),
        (
            lambda: F.gemm_4bit_transposed(
                make_input((4, 32), torch.float64, "cpu", gen).to(torch.int64), packed, state
            ),
            TypeError,
            "grad must be",
        ),
    ]
    flat_packed, flat_state = F.quantize_4bit(make_input((4096,), torch.bfloat16, "cpu", gen))
    cases.append(
        (lambda: F.gemm_4bit(x, flat_packed, flat_state), ValueError, r"shape must be \[out_features, in_features\]")
    )
    assert_each_raises(cases)


@requires_cuda
@pytest.mark.cuda
def test_device_mismatch_is_an_error(gen):
    packed, state = make_weight(32, 128, "cuda", gen)
    x = make_input((4, 128), torch.bfloat16, "cpu", gen)
    with pytest.raises(ValueError, match="is on"):
        F.gemm_4bit(x, packed, state)
    with pytest.raises(ValueError, match="bias is on"):
        F.gemm_4bit(x.cuda(), packed, state, torch.zeros(32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="is on"):
        F.gemm_4bit_transposed(torch.zeros(4, 32, dtype=torch.bfloat16), packed, state)
    with pytest.raises(TypeError, match=r"or float64 on the CPU\), got Double on cuda"):
        F.gemm_4bit(x.cuda().double(), packed, state)


def test_matmul_4bit_is_bitsandbytes_on_the_cpu(bnbf, gen):
    """The drop-in name: bitsandbytes.matmul_4bit's arguments (the packed weight transposed, as its
    Linear4bit passes it), and on the CPU its result to the bit (both dequantize, then multiply)."""
    import bitsandbytes as bnb

    w = make_input((96, 256), torch.bfloat16, "cpu", gen) * 0.05
    packed, bstate = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state = QuantState.from_dict({f"weight.{k}": v for k, v in bstate.as_dict(packed=True).items()}, device="cpu")
    bias = make_input((96,), torch.bfloat16, "cpu", gen)
    for m in (1, 7):
        x = make_input((m, 256), torch.bfloat16, "cpu", gen)
        assert torch.equal(
            F.matmul_4bit(x, packed.t(), state, bias=bias), bnb.matmul_4bit(x, packed.t(), bstate, bias=bias)
        )
    out = torch.full((7, 96), float("nan"), dtype=torch.bfloat16)
    assert F.matmul_4bit(x, packed.t(), state, out=out) is out
    assert torch.equal(out, bnb.matmul_4bit(x, packed.t(), bstate))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("path", ["default", "cublas"])
def test_weight_past_2_to_the_31_elements(gen, path):
    """int64 indexing in the products: an 81920 x 32769 weight (2**31 + 536 million codes, rows that
    cross blocks; element 2**31 in row 65534, 16k rows before the end), checked on row ranges at its
    start, across element 2**31 and at its end against the float64 product on the dequantized weight."""
    n, k = 81920, 32769
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True)
    del w
    wq = F.dequantize_4bit(packed, state)
    mid = 2**31 // k  # the row that holds element 2**31
    rows = [(0, 64), (mid - 32, mid + 32), (n - 64, n)]
    for m in (1, 16, 300):
        x = make_input((m, k), torch.bfloat16, "cuda", gen)
        y = gemm_on_path(path, x, packed, state)
        for r0, r1 in rows:
            assert_close_to_reference(y[:, r0:r1], x, wq[r0:r1], None, f"gemm M={m} rows {r0}-{r1}")
        del y
    g = make_input((3, n), torch.bfloat16, "cuda", gen)
    dx = F.gemm_4bit_transposed(g, packed, state)
    cols = [(0, 64), (k - 64, k)]
    for c0, c1 in cols:
        assert_close_to_reference(dx[:, c0:c1], g, wq[:, c0:c1].T.contiguous(), None, f"gemm_t cols {c0}-{c1}")
