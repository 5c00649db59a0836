"""Shared test helpers: devices, a fresh random seed each run, bitsandbytes when installed, output
poisoning and NaN-aware bit comparison."""

from __future__ import annotations

import logging
import os
import random
import zlib

import pytest
import torch

import qlora_ext

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Fresh data every run; the seed is printed in the header so that a failure can be repeated.
SEED = int(os.environ.get("QLORA_TEST_SEED") or random.SystemRandom().randrange(2**31))

HAS_CUDA = torch.cuda.is_available() and qlora_ext.cuda_kernels_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of qlora_ext")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda])]
# bench/sanitize.sh turns torch's caching allocator off under memcheck and initcheck, and CUDA graph
# capture refuses to run without it.
needs_caching_allocator = pytest.mark.skipif(
    os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1", reason="CUDA graph capture needs the caching allocator"
)


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"qlora_ext seed {SEED} (QLORA_TEST_SEED={SEED} repeats it); torch {torch.__version__}; "
        f"CUDA kernels built: {qlora_ext.cuda_kernels_available()}; GPU: {gpu}"
    )


@pytest.fixture(autouse=True)
def fp32_cublas_reductions():
    """cuBLAS accumulates in fp32 in every test, as the fused kernels do and as the bound of
    assert_close_to_reference (test_gemm_4bit.py, used by other modules too) assumes.

    torch lets cuBLAS reduce split-K partial sums of bf16 / fp16 products in bf16 / fp16 by default
    (allow_bf16_reduced_precision_reduction), which rounds each partial sum once more: on the H200
    the cuBLAS path at M = 7 on 130x1024 once came out 0.053 from the float64 value where the bound
    allows 0.052 (2026-11-29). The dequantize + cuBLAS path follows whatever the caller set, as
    torch.matmul does; the tests pin fp32 reductions so that the bound is the one derived there.
    """
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the run's seed and the test's id: distinct data per test."""
    g = torch.Generator()
    g.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture(scope="session")
def bnbf():
    """bitsandbytes.functional, or a skip where bitsandbytes is not installed."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


def random_weights(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, blocksize: int = 64) -> torch.Tensor:
    """Gaussian values whose scale varies block to block over several decades, with a few outliers:
    what a weight matrix looks like to a blockwise quantizer."""
    nb = max(1, -(-n // blocksize))
    scale = torch.exp(torch.randn(nb, generator=gen) * 1.5).repeat_interleave(blocksize)[:n]
    x = torch.randn(n, generator=gen) * scale
    if n >= 16:
        idx = torch.randint(0, n, (max(1, n // 500),), generator=gen)
        x[idx] *= 20
    return x.to(dtype=dtype).to(device)


def poison(device: str, nbytes: int) -> None:
    """Fills memory that the next allocations of about this size are likely to reuse with 0xFF
    (NaN for floats), so an element a kernel forgot to write shows up in a bit-exact comparison."""
    t = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device=device)
    del t


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "", signed_zeros: bool = True) -> None:
    """Same shape, dtype and bits; NaN matches NaN whatever its payload. signed_zeros=False lets
    +0.0 match -0.0 (and nothing else)."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype.is_floating_point:
        nan_a, nan_e = actual.isnan(), expected.isnan()
        assert torch.equal(nan_a, nan_e), f"{what}: NaN at different places ({nan_a.sum()} vs {nan_e.sum()})"
        same = (bits(actual) == bits(expected)) | nan_a
        if not signed_zeros:
            same |= (actual == 0) & (expected == 0)
    else:
        same = actual == expected
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].flatten().tolist()
        flat_a, flat_e = actual.reshape(-1), expected.reshape(-1)
        idx = (~same.reshape(-1)).nonzero()[:5].flatten()
        raise AssertionError(
            f"{what}: {(~same).sum().item()} of {same.numel()} elements differ; first at {bad}: "
            f"{flat_a[idx].tolist()} != {flat_e[idx].tolist()}"
        )


def assert_each_raises(cases) -> None:
    """Each (call, error type, message regex) raises that error with that message."""
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()
