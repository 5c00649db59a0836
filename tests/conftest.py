"""pytest's hooks and fixtures: the run's seed in the header, fp32 cuBLAS reductions, a generator
seeded per test, bitsandbytes when installed. Helpers that tests import are in helpers.py."""

from __future__ import annotations

import logging
import os
import zlib

import pytest
import torch

import qlora_ext

from helpers import SEED

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# transformers 5 replaces layers with kernels downloaded from the Hub in from_pretrained on CUDA when
# the `kernels` package is installed: the tests run offline and compare our layers' own numbers.
os.environ.setdefault("USE_HUB_KERNELS", "0")


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"qlora_ext seed {SEED} (QLORA_TEST_SEED={SEED} repeats it); torch {torch.__version__}; "
        f"CUDA kernels built: {qlora_ext.cuda_kernels_available()}; GPU: {gpu}"
    )


@pytest.fixture(autouse=True)
def fp32_cublas_reductions():
    """cuBLAS accumulates in fp32 in every test, as the fused kernels do and as the bound of
    assert_close_to_reference (helpers.py) assumes.

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


@pytest.fixture(params=["qlora", "peft"])
def layer_kind(request, monkeypatch) -> str:
    """Runs a test once with each class of LoRA layer that prepare_model, load_adapter and from_pretrained
    can build (QLORA_EXT_LAYERS: QLoRALinear, or PEFT's LoraLinear4bit), while both exist
    (docs/plan-prepare-model-on-peft.md). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("layer_kind")``."""
    if request.param == "peft":
        pytest.importorskip("peft")
    monkeypatch.setenv("QLORA_EXT_LAYERS", request.param)
    return request.param


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
