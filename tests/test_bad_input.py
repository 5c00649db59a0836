"""Every public function and module fed its plausible mistakes: each raises a Python exception whose
message names the problem (and the process lives on). Then repeatability (the same bits run to run)
and a stress loop of random shapes that must not grow memory."""

from __future__ import annotations

import gc
import random

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import LoraConfig, QuantState, functional as F
from qlora_ext.nn import Linear4bit, QLoRALinear

from helpers import DEVICES, HAS_CUDA, assert_bits_equal, assert_each_raises


def bf16(*shape, device="cpu"):
    return torch.randn(*shape).to(torch.bfloat16).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_every_public_function_names_the_mistake(device):
    w = bf16(8, 64, device=device)
    packed, state = F.quantize_4bit(w)
    _, other = F.quantize_4bit(bf16(16, 64, device=device))  # a QuantState of another tensor
    x = bf16(3, 64, device=device)
    A, B = bf16(4, 64, device=device), bf16(8, 4, device=device)
    seed = torch.tensor(1, device=device)
    linear = nn.Linear(64, 8).to(device)
    layer = QLoRALinear.from_linear(linear, r=4)
    nested_state = (state.state2.absmax, state.state2._code_for_kernel(), state.offset)
    cases = [
        # quantize / dequantize
        (lambda: F.quantize_4bit("w"), TypeError, "A must be a tensor"),
        (lambda: F.quantize_4bit(w.int()), TypeError, "A must be float32, float16 or bfloat16"),
        (lambda: F.quantize_4bit(w, blocksize=100), ValueError, "blocksize must be one of"),
        (lambda: F.quantize_4bit(w, quant_type="nf5"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
        (
            lambda: F.dequantize_4bit(packed[:-1], state),
            ValueError,
            "packed has 255 bytes but a shape of 512 elements needs 256",
        ),
        (
            lambda: F.dequantize_4bit(packed, other),
            ValueError,
            "packed has 256 bytes but a shape of 1024 elements needs 512",
        ),
        (lambda: F.dequantize_4bit(packed, "state"), TypeError, "quant_state must be a QuantState"),
        # a float tensor is read as a view of the packed bytes (quant_storage): 4 times too many of them
        (
            lambda: F.dequantize_4bit(packed.float(), state),
            ValueError,
            "packed has 1024 bytes but a shape of 512 elements needs 256",
        ),
        (lambda: F.dequantize_4bit(packed.float().reshape(16, 16).t(), state), TypeError, "packed must be uint8"),
        (lambda: QuantState.from_dict({"absmax": state.absmax}), ValueError, "quant_state"),
        # products
        (lambda: F.gemm_4bit(bf16(3, 63, device=device), packed, state), ValueError, "in_features"),
        (lambda: F.gemm_4bit(x.int(), packed, state), TypeError, "x must be float32, float16 or bfloat16"),
        (lambda: F.gemm_4bit(x, packed, state, bf16(7, device=device)), ValueError, r"bias must have shape \[8\]"),
        (lambda: F.gemm_4bit(x, packed, other), ValueError, "packed has 256 bytes but a weight of shape"),
        (lambda: F.gemm_4bit_transposed(x, packed, state), ValueError, "out_features"),
        # a shape past int64: wrapped, its element count would let empty tensors pass to the kernels
        (
            lambda: torch.ops.qlora.gemm_4bit(
                x, packed[:0], state.absmax[:0], None, None, None, 64, 256, "nf4", [2**62, 64], None
            ),
            ValueError,
            r"shape \[4611686018427387904, 64\] has more elements than int64 counts",
        ),
        (
            lambda: torch.ops.qlora.dequantize_4bit(
                packed[:0], state.absmax[:0], None, None, None, 64, 256, "nf4", [2**40, 2**40], torch.bfloat16
            ),
            ValueError,
            "has more elements than int64 counts",
        ),
        # the double-quantized scales' own op names its own arguments
        (
            lambda: torch.ops.qlora.dequantize_absmax(state.absmax.float(), *nested_state, 256),
            TypeError,
            "dequantize_absmax: qabsmax must be uint8",
        ),
        (
            lambda: torch.ops.qlora.dequantize_absmax(state.absmax, *nested_state, 64),
            ValueError,
            "dequantize_absmax: blocksize must be 256",
        ),
        # the LoRA layer
        (lambda: F.lora_linear(x, packed, state, A[:, :60], B, 2.0), ValueError, r"lora_A must have shape \[r, 64\]"),
        (lambda: F.lora_linear(x, packed, state, A, B[:7], 2.0), ValueError, r"lora_B must have shape \[8, 4\]"),
        (lambda: F.lora_linear(x, packed, state, A, B, 2.0, 1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: F.lora_dropout(x, 0.1, seed.int()), TypeError, "seed must be int64"),
        (
            lambda: F.lora_linear_indexed(x, packed, state, A[None], B[None], 2.0, seed.expand(3)),
            TypeError,
            "scaling must be a sequence of floats, one an adapter, got 2.0",
        ),
        (
            lambda: F.lora_dropout(x, 0.1, torch.zeros(2, dtype=torch.int64, device=device)),
            ValueError,
            "seed must have one element",
        ),
        # modules
        (lambda: Linear4bit.from_linear("linear"), TypeError, "linear must be a torch.nn.Linear"),
        (lambda: Linear4bit(64, 8)(x), RuntimeError, "has no weight yet"),
        (lambda: Linear4bit(0, 8), ValueError, "in_features and out_features must be positive"),
        (lambda: Linear4bit(64, 8, quant_type="int4"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
        (lambda: Linear4bit(64, 8, blocksize=7), ValueError, "blocksize must be one of"),
        (lambda: Linear4bit(64, 8, compute_dtype=torch.int8), ValueError, "compute_dtype must be one of"),
        (
            lambda: Linear4bit.from_linear(nn.Linear(64, 8, dtype=torch.float64)),
            TypeError,
            "linear's weight must be float32, float16 or bfloat16 to quantize, got torch.float64",
        ),
        (lambda: QLoRALinear(linear, r=4), TypeError, "base_layer must be a qlora_ext.nn.Linear4bit"),
        (lambda: layer.add_adapter("x", r=0, lora_alpha=8), ValueError, "r must be a positive integer"),
        (
            lambda: layer.add_adapter("x", r=4, lora_alpha=8, lora_dropout=1.0),
            ValueError,
            r"lora_dropout must be in \[0, 1\)",
        ),
        (lambda: layer.add_adapter("x", r=4, lora_alpha=8, init="xavier"), ValueError, "init must be"),
        (lambda: layer.add_adapter("default", r=4, lora_alpha=8), ValueError, "exists already"),
        (lambda: layer.add_adapter("half", r=4, lora_alpha=8), ValueError, "'half' is an attribute of nn.ModuleDict"),
        (lambda: layer.add_adapter("a.b", r=4, lora_alpha=8), ValueError, "must not contain '.'"),
        (lambda: layer.add_adapter("", r=4, lora_alpha=8), ValueError, "adapter_name must be a non-empty string"),
        (lambda: layer.set_adapter("nope"), ValueError, "no adapter 'nope'"),
        (lambda: layer.unmerge(), ValueError, "no adapter is merged"),
        (lambda: layer(bf16(3, 65, device=device)), ValueError, "in_features"),
        # whole models
        (
            lambda: qlora_ext.prepare_model(nn.Sequential(linear), "config"),
            TypeError,
            "lora_config must be a qlora_ext.LoraConfig",
        ),
        (
            lambda: qlora_ext.set_adapter(nn.Sequential(linear), "a"),
            ValueError,
            "prepare it with qlora_ext.prepare_model",
        ),
        (lambda: LoraConfig(target_modules=3), TypeError, "target_modules must be"),
        # checked when the config is made: PEFT's layers, which prepare_model may build, check none of these
        (lambda: LoraConfig(lora_alpha=float("nan")), ValueError, "lora_alpha must be a finite number"),
        (lambda: LoraConfig(lora_alpha="16"), ValueError, "lora_alpha must be a finite number"),
        (lambda: LoraConfig(adapter_dtype=torch.int8), TypeError, "adapter_dtype must be a float dtype"),
        (lambda: LoraConfig(init="pissa"), ValueError, "init must be"),
        (lambda: LoraConfig(modules_to_save=["lm_head", 3]), TypeError, "modules_to_save must be a list of module"),
    ]
    assert_each_raises(cases)


@pytest.mark.parametrize("device", DEVICES)
def test_every_op_gives_the_same_bits_run_to_run(device):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 200, generator=g).to(torch.bfloat16).to(device)
    x = torch.randn(5, 200, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    A = (torch.randn(8, 200, generator=g) * 0.1).to(device).requires_grad_()
    B = (torch.randn(96, 8, generator=g) * 0.1).to(device).requires_grad_()
    seed = torch.tensor(11, device=device)

    def everything():
        packed, state = F.quantize_4bit(w, 64, "nf4", True)
        y = F.lora_linear(x, packed, state, A, B, 2.0, 0.1, None, seed)
        gx, gA, gB = torch.autograd.grad(y.float().square().sum(), [x, A, B])
        return [packed, state.absmax, state.state2.absmax, F.dequantize_4bit(packed, state),
                F.gemm_4bit(x, packed, state), F.gemm_4bit_transposed(y.detach(), packed, state),
                F.lora_dropout(x.detach(), 0.3, seed), y, gx, gA, gB]  # fmt: skip

    first = everything()
    for a, b in zip(first, everything()):
        assert_bits_equal(a, b)


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_stress_random_shapes_does_not_grow_memory(device):
    """10,000 calls of every op on random shapes: after a warm-up of 2,000, the CUDA allocator's
    allocated bytes come back to where they were, and the process's resident memory (CPU) grows by
    less than 64 MiB (allocator caches; keeping any one of a call's weights or products, tens of KiB
    each, would pass that over 8,000 calls)."""
    rng = random.Random(0)
    seed = torch.tensor(3, device=device)

    def call(i):
        n, k, m = rng.choice([1, 7, 64, 130]), rng.choice([64, 100, 256]), rng.choice([1, 3, 17])
        w = torch.randn(n, k, device=device).to(torch.bfloat16)
        packed, state = F.quantize_4bit(w, rng.choice([32, 64, 256]), rng.choice(["nf4", "fp4"]), rng.random() < 0.5)
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        op = i % 4
        if op == 0:
            F.dequantize_4bit(packed, state)
        elif op == 1:
            F.gemm_4bit(x, packed, state)
        elif op == 2:
            F.gemm_4bit_transposed(torch.randn(m, n, device=device).to(torch.bfloat16), packed, state)
        else:
            A = torch.randn(4, k, device=device, requires_grad=True)
            B = torch.randn(n, 4, device=device, requires_grad=True)
            F.lora_linear(x, packed, state, A, B, 2.0, 0.1, None, seed).float().sum().backward()

    for i in range(2000):
        call(i)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    rss = _resident_mib()
    for i in range(8000):
        call(i)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    assert _resident_mib() - rss < 64, f"resident memory grew by {_resident_mib() - rss:.1f} MiB"


def test_cuda_ops_refuse_cpu_tensors_without_crashing():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    packed, state = F.quantize_4bit(bf16(8, 64, device="cuda"))
    assert_each_raises([
        (lambda: F.gemm_4bit(bf16(2, 64), packed, state), ValueError, "is on"),
        (lambda: F.lora_linear(bf16(2, 64, device="cuda"), packed, state, bf16(4, 64), bf16(8, 4, device="cuda"), 2.0),
         ValueError, "lora_A is on cpu"),
    ])  # fmt: skip
