"""Fake (meta) kernels of the ``torch.ops.qlora`` ops: output shapes and dtypes without data, for
``torch.compile``, ``torch.library.opcheck`` and meta tensors. The schemas are in csrc/ops.cpp."""

import math
from collections.abc import Sequence

import torch


def _ceil_div(a, b):
    return (a + b - 1) // b


@torch.library.register_fake("qlora::quantize_4bit")
def _quantize_4bit_fake(A: torch.Tensor, blocksize: int, quant_type: str):
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = A.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("qlora::quantize_absmax")
def _quantize_absmax_fake(absmax: torch.Tensor, blocksize: int):
    n = absmax.numel()
    q = absmax.new_empty((n,), dtype=torch.uint8)
    nested = absmax.new_empty((_ceil_div(n, blocksize),), dtype=torch.float32)
    offset = absmax.new_empty((), dtype=torch.float32)
    return q, nested, offset


@torch.library.register_fake("qlora::dequantize_absmax")
def _dequantize_absmax_fake(qabsmax, nested_absmax, nested_code, offset, blocksize):
    return qabsmax.new_empty((qabsmax.numel(),), dtype=torch.float32)


@torch.library.register_fake("qlora::dequantize_4bit")
def _dequantize_4bit_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax,
    nested_code,
    offset,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
):
    return packed.new_empty(shape, dtype=dtype)


def _weight_dims(op: str, x: torch.Tensor, shape: Sequence[int]):
    """(out_features, in_features) of the weight's `shape`, checked against x's last dimension."""
    torch._check(len(shape) == 2, lambda: f"{op}: the weight's shape must be 2-D, got {list(shape)}")
    n, k = shape
    torch._check(x.shape[-1] == k, lambda: f"{op}: x has {x.shape[-1]} in its last dimension, the weight needs {k}")
    return n, k


def _gemm_shape(x: torch.Tensor, shape: Sequence[int], transposed: bool):
    n, k = shape
    return (*x.shape[:-1], k if transposed else n)


@torch.library.register_fake("qlora::gemm_4bit")
def _gemm_4bit_fake(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, bias
):
    _weight_dims("gemm_4bit", x, shape)
    return x.new_empty(_gemm_shape(x, shape, False))


@torch.library.register_fake("qlora::_gemm_4bit_with")
def _gemm_4bit_with_fake(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, bias, config
):
    return _gemm_4bit_fake(
        x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, bias
    )


@torch.library.register_fake("qlora::gemm_4bit_transposed")
def _gemm_4bit_transposed_fake(
    grad, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
):
    torch._check(len(shape) == 2, lambda: f"gemm_4bit_transposed: the weight's shape must be 2-D, got {list(shape)}")
    torch._check(
        grad.shape[-1] == shape[0],
        lambda: f"gemm_4bit_transposed: grad has {grad.shape[-1]} in its last dimension, the weight needs {shape[0]}",
    )
    return grad.new_empty(_gemm_shape(grad, shape, True))


# Autograd of the two products is registered in C++ (csrc/autograd.cpp).


@torch.library.register_fake("qlora::lora_dropout")
def _lora_dropout_fake(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qlora::lora_dropout_add")
def _lora_dropout_add_fake(base, x, seed, p):
    torch._check(
        base.shape == x.shape, lambda: f"lora_dropout_add: base has shape {list(base.shape)}, x {list(x.shape)}"
    )
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# qlora::lora_linear is built from the ops above and lora_linear_forward (a CompositeExplicitAutograd
# kernel, csrc/lora.cpp): its fake kernel is that composition run on fake tensors.


@torch.library.register_fake("qlora::lora_linear_forward")
def _lora_linear_forward_fake(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, bias,
    lora_A, lora_B, scaling, dropout_p, seed,
):  # fmt: skip
    op = "lora_linear"
    n, k = _weight_dims(op, x, shape)
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == k, lambda: f"{op}: lora_A must have shape [r, {k}]")
    torch._check(
        lora_B.dim() == 2 and lora_B.shape[0] == n and lora_B.shape[1] == lora_A.shape[0],
        lambda: f"{op}: lora_B must have shape [{n}, r]",
    )
    y = x.new_empty(_gemm_shape(x, shape, False))
    return y, x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]))


@torch.library.register_fake("qlora::lora_linear_indexed")
def _lora_linear_indexed_fake(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, bias,
    lora_A, lora_B, scaling, adapter_index,
):  # fmt: skip
    op = "lora_linear_indexed"
    n, k = _weight_dims(op, x, shape)
    torch._check(lora_A.dim() == 3 and lora_A.shape[2] == k, lambda: f"{op}: lora_A must have shape [adapters, r, {k}]")
    torch._check(
        lora_B.dim() == 3 and tuple(lora_B.shape) == (lora_A.shape[0], n, lora_A.shape[1]),
        lambda: f"{op}: lora_B must have shape [adapters, {n}, r]",
    )
    torch._check(len(scaling) == lora_A.shape[0], lambda: f"{op}: scaling must have one value an adapter")
    torch._check(adapter_index.dtype == torch.int64, lambda: f"{op}: adapter_index must be int64")
    torch._check(adapter_index.numel() == math.prod(x.shape[:-1]), lambda: f"{op}: one adapter_index a row of x")
    return x.new_empty(_gemm_shape(x, shape, False))


@torch.library.register_fake("qlora::rotary_embedding")
def _rotary_embedding_fake(x, cos, sin, backward=False):
    torch._check(x.dim() == 4, lambda: f"rotary_embedding: x must be 4-D, got shape {list(x.shape)}")
    torch._check(x.shape[3] % 2 == 0, lambda: f"rotary_embedding: x's last dimension must be even, got {x.shape[3]}")
    out = torch.empty_like(x)
    # As the kernels (csrc/rotary.cpp): x's layout unless it does not keep the last dimension innermost.
    return out if out.stride(3) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _check_silu_mul(op, gate, up, grad=None):
    for name, t in (("up", up), ("grad", grad)):
        if t is not None:
            message = f"{op}: {name} must have gate's dtype and shape ({gate.dtype}, {list(gate.shape)})"
            torch._check(t.dtype == gate.dtype and t.shape == gate.shape, lambda m=message: m)


@torch.library.register_fake("qlora::silu_mul")
def _silu_mul_fake(gate, up):
    _check_silu_mul("silu_mul", gate, up)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("qlora::silu_mul_backward")
def _silu_mul_backward_fake(grad, gate, up):
    _check_silu_mul("silu_mul_backward", gate, up, grad)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)
