"""Functional API: blockwise 4-bit quantization with bitsandbytes' names and format.

``quantize_4bit`` / ``dequantize_4bit`` produce and read the same bytes as
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (0.50.2) on the same device.

Every function that takes a ``quant_state`` takes bitsandbytes' ``QuantState`` as well as ours (a
weight quantized by bitsandbytes, ``Params4bit.quant_state``), read in place: its tensors are the
format's, so nothing is converted or cached, and the check for our type comes first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import torch

from .quant_state import _REPACKED, BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES, QuantState, bitsandbytes_state_type

__all__ = [
    "dequantize_4bit",
    "dequantize_absmax",
    "dropout_seed",
    "gemm_4bit",
    "gemm_4bit_transposed",
    "lora_dropout",
    "lora_linear",
    "lora_linear_indexed",
    "matmul_4bit",
    "quantize_4bit",
    "release_gemm_workspaces",
    "rotary_embedding",
    "silu_mul",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The overloads themselves: calling them skips the overload lookup of torch.ops.qlora.<name>(...),
# a few microseconds that show on small weights.
_quantize_4bit_op = torch.ops.qlora.quantize_4bit.default
_quantize_absmax_op = torch.ops.qlora.quantize_absmax.default
_dequantize_4bit_op = torch.ops.qlora.dequantize_4bit.default
_gemm_4bit_op = torch.ops.qlora.gemm_4bit.default
_gemm_4bit_transposed_op = torch.ops.qlora.gemm_4bit_transposed.default
_lora_linear_op = torch.ops.qlora.lora_linear.default
_lora_linear_indexed_op = torch.ops.qlora.lora_linear_indexed.default
_lora_dropout_op = torch.ops.qlora.lora_dropout.default
_rotary_embedding_op = torch.ops.qlora.rotary_embedding.default
_silu_mul_op = torch.ops.qlora.silu_mul.default


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    *,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes ``A`` to 4 bits in blocks of ``blocksize`` consecutive elements.

    Args:
        A: float32, float16 or bfloat16 tensor of any shape, contiguous or not, on the CPU or a GPU.
            It is read in row-major order; a block may cross rows.
        blocksize: elements per block sharing one scale: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        quant_type: ``"nf4"`` (NormalFloat) or ``"fp4"`` (bitsandbytes' FP4).
        compress_statistics: double quantization: store the block scales as 8-bit codes of
            ``absmax - mean`` in blocks of 256 (0.127 bits a weight at blocksize 64, against 0.5).
        quant_storage: dtype to view the packed bytes as (FSDP wants the weights' dtype); the bytes
            are the same.

    Returns:
        ``(packed, state)``: packed codes, uint8 of shape ``((A.numel() + 1) // 2, 1)`` with element
        2j in the high nibble of byte j, and the QuantState that dequantizes them.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a tensor, got {type(A).__name__}")
    if A.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"A must be float32, float16 or bfloat16, got {A.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    packed, absmax = _quantize_4bit_op(A, blocksize, quant_type)
    # The code tables (state.code, state.state2.code) are made when first read.
    if compress_statistics:
        qabsmax, nested_absmax, offset = _quantize_absmax_op(absmax, NESTED_BLOCKSIZE)
        state2 = QuantState(absmax=nested_absmax, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state2._code_table = "dynamic"
        state = QuantState(
            absmax=qabsmax,
            shape=A.shape,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=A.dtype,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(absmax=absmax, shape=A.shape, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype)
    if quant_storage != torch.uint8:
        packed = _view_storage(packed, quant_storage)
    return packed, state


def _view_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % size:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed byte count ({packed.numel()}) to be a multiple of {size}"
        )
    return packed.reshape(-1).view(quant_storage).unsqueeze(1)


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    if packed.dtype == torch.uint8:
        return packed
    if packed.dtype.is_complex or not packed.is_contiguous():
        raise TypeError(f"packed must be uint8 (or a contiguous view of its bytes), got {packed.dtype}")
    return packed.reshape(-1).view(torch.uint8)


def _state_args(packed: torch.Tensor, quant_state: QuantState) -> tuple:
    """The op arguments that describe a 4-bit weight: packed bytes, scales, format facts."""
    if not isinstance(quant_state, QuantState):
        return _bitsandbytes_state_args(packed, quant_state)
    packed = _as_bytes(packed)
    if quant_state.shape is None:
        raise ValueError("quant_state.shape is not set")
    if packed.device != quant_state.absmax.device:
        raise ValueError(
            f"packed is on {packed.device} but quant_state is on {quant_state.absmax.device}; "
            "move one of them (quant_state.to(device))"
        )
    if quant_state.nested:
        nested = (quant_state.state2.absmax, quant_state.state2._code_for_kernel(), quant_state.offset)
        nested_blocksize = quant_state.state2.blocksize
    else:
        nested = (None, None, None)
        nested_blocksize = NESTED_BLOCKSIZE
    return (packed, quant_state.absmax, *nested, quant_state.blocksize, nested_blocksize, quant_state.quant_type)


def _bitsandbytes_state_args(packed: torch.Tensor, quant_state) -> tuple:
    """``_state_args`` of a ``bitsandbytes.functional.QuantState``, read in place: its tensors are the
    format's (the same absmax, nested absmax, 8-bit map and offset), so nothing is converted or
    cached, and a state that bitsandbytes moves (``.to``) or replaces is read as it is now. The ops
    check the tensors' sizes, dtypes and devices."""
    bnb_type = bitsandbytes_state_type()
    if bnb_type is None or not isinstance(quant_state, bnb_type):
        raise TypeError(
            f"quant_state must be a QuantState (qlora_ext's or bitsandbytes'), got {type(quant_state).__name__}"
        )
    d = quant_state.__dict__  # plain attributes; skips bitsandbytes' __getattr__ for absent ones
    if d.get("packing_format_for_cpu"):
        raise ValueError(_REPACKED)
    if d.get("shape") is None:
        raise ValueError("quant_state.shape is not set")
    packed = _as_bytes(packed)
    absmax = d["absmax"]
    if packed.device != absmax.device:
        raise ValueError(
            f"packed is on {packed.device} but quant_state is on {absmax.device}; "
            "move one of them (quant_state.to(device))"
        )
    if d.get("nested"):
        s2 = d["state2"]
        nested = (s2.absmax, s2.code, d["offset"])
        nested_blocksize = s2.blocksize
    else:
        nested = (None, None, None)
        nested_blocksize = NESTED_BLOCKSIZE
    return (packed, absmax, *nested, d["blocksize"], nested_blocksize, d["quant_type"])


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """Dequantizes ``packed`` with ``quant_state``: a tensor of ``quant_state.shape`` and ``.dtype``.

    With double quantization one kernel decodes the block scales and the codes. ``packed`` may be
    the uint8 codes or a view of their bytes as another dtype (``quant_storage``). Raises a
    ValueError / TypeError naming the argument when packed and state do not match (length, device,
    dtype, shape).
    """
    # The op checks sizes, dtypes and devices itself (naming the argument); only what it cannot see
    # is checked here, to keep the per-call cost low.
    return _dequantize_4bit_op(*_state_args(packed, quant_state), quant_state.shape, quant_state.dtype)


def dequantize_absmax(quant_state: QuantState) -> torch.Tensor:
    """The float32 block scales of ``quant_state``, decoded from the double quantization if nested."""
    if not isinstance(quant_state, QuantState):
        bnb_type = bitsandbytes_state_type()
        if bnb_type is None or not isinstance(quant_state, bnb_type):
            raise TypeError(
                f"quant_state must be a QuantState (qlora_ext's or bitsandbytes'), got {type(quant_state).__name__}"
            )
        quant_state = QuantState.from_bitsandbytes(quant_state)
    if not quant_state.nested:
        return quant_state.absmax
    s2: Optional[QuantState] = quant_state.state2
    return torch.ops.qlora.dequantize_absmax(
        quant_state.absmax, s2.absmax, s2._code_for_kernel(), quant_state.offset, s2.blocksize
    )


def gemm_4bit(
    x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the 4-bit weight ``W`` of shape ``[out_features, in_features]``.

    The forward product of a linear layer (``torch.nn.functional.linear(x, W, bias)``), with ``W``
    given by its packed codes and ``quant_state`` as ``quantize_4bit`` returned them; in place of
    ``bitsandbytes.matmul_4bit(x, packed.t(), quant_state, bias=bias)``.

    Args:
        x: ``[..., in_features]``, bfloat16 or float16 (float32 too, through the dequantized
            weight), on the weight's device; any strides.
        packed: the packed codes (uint8, or a view of their bytes as ``quant_storage``).
        quant_state: the weight's state; its ``shape`` must be 2-D.
        bias: ``[out_features]`` in x's dtype, or None.

    Returns:
        ``[..., out_features]`` in x's dtype, accumulated in float32. On CUDA, small M (rows of x)
        runs one fused kernel that decodes the codes in registers; large M dequantizes into a
        buffer of the call's own (from the caching allocator) and calls cuBLAS. Differentiable in
        ``x`` and ``bias``; the weight is frozen.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    return _gemm_4bit_op(x, *_state_args(packed, quant_state), quant_state.shape, bias)


def _gemm_4bit_with(
    x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, config: str, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``gemm_4bit`` on CUDA with the named kernel configuration (one of ``_C._gemm_4bit_configs()``;
    ``_C._gemm_4bit_config`` tells which one the dispatch picks; ``"fused"``: the fused kernel the
    dispatch picks at this M, at any M) in place of the dispatch's choice, for tests and benchmarks.
    Raises NotImplementedError where that configuration cannot run (the GPU, the build, the dtype or
    the weight's layout). Not differentiable."""
    return torch.ops.qlora._gemm_4bit_with(x, *_state_args(packed, quant_state), quant_state.shape, bias, config)


def gemm_4bit_transposed(grad: torch.Tensor, packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """``grad @ W`` for the 4-bit weight ``W`` of shape ``[out_features, in_features]``.

    The product of a linear layer's backward pass: ``grad`` is ``[..., out_features]`` (bfloat16,
    float16 or float32) and the result ``[..., in_features]`` in its dtype. Differentiable in
    ``grad``.
    """
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a tensor, got {type(grad).__name__}")
    return _gemm_4bit_transposed_op(grad, *_state_args(packed, quant_state), quant_state.shape)


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """bitsandbytes' ``matmul_4bit`` signature: ``A @ W.T + bias`` where ``B`` is the packed weight as
    bitsandbytes' Linear4bit passes it (``weight.t()``; any view of the packed bytes works) and
    ``quant_state`` describes ``W``. Same as ``gemm_4bit(A, B, quant_state, bias)``; on the CPU the
    result is bitsandbytes' to the bit. ``out``, when given, receives the result and is returned."""
    result = gemm_4bit(A, B, quant_state, bias)
    if out is None:
        return result
    return out.copy_(result)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed on ``device``: an int64 tensor of one element drawn from torch's generator
    of that device, so that ``torch.manual_seed`` repeats it, ``torch.utils.checkpoint`` (which
    restores the generator's state) regenerates it, and a CUDA graph draws a new one each replay."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``x * keep / (1 - p)``: LoRA's dropout with the mask that ``lora_linear`` draws from ``seed``.

    Element ``i`` of ``x`` (row-major) is kept when the Philox4x32-10 draw for ``(seed, i)`` is at least
    ``p * 2**32``; the CPU and CUDA kernels draw the same mask. Differentiable in ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    return _lora_dropout_op(x, seed, float(p))


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of one tensor in one kernel each way: transformers'
    ``apply_rotary_pos_emb`` (``x * cos + rotate_half(x) * sin``) for q or k alone, with cos and sin
    already unsqueezed to broadcast over the heads.

    For ``i < h = D / 2``::

        out[..., i]     = x[..., i] * cos[..., i]         - x[..., i + h] * sin[..., i]
        out[..., i + h] = x[..., i + h] * cos[..., i + h] + x[..., i] * sin[..., i + h]

    computed in float32 (float64 for float64) and rounded once to x's dtype.

    Args:
        x: ``[batch, heads, seq, head_dim]``, head_dim even; float16, bfloat16 or float32 (float64
            too); any strides (the transposed view ``[batch, seq, heads, head_dim] -> [batch, heads,
            seq, head_dim]`` is read in place and the result keeps its layout).
        cos, sin: x's dtype and device, broadcastable to x's shape: typically ``[batch, 1, seq,
            head_dim]`` or ``[1, 1, seq, head_dim]``.

    Returns:
        x's shape and dtype. Differentiable in x (and twice); cos and sin are not (an error if they
        require grad).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not isinstance(cos, torch.Tensor):
        raise TypeError(f"cos must be a tensor, got {type(cos).__name__}")
    if not isinstance(sin, torch.Tensor):
        raise TypeError(f"sin must be a tensor, got {type(sin).__name__}")
    return _rotary_embedding_op(x, cos, sin, False)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating in one kernel each way: ``torch.nn.functional.silu(gate) * up``, what
    transformers' ``LlamaMLP`` (and Mistral's, Qwen2's, Qwen3's) computes between its projections.

    ``out = gate / (1 + exp(-gate)) * up``, computed in float32 (float64 for float64) and rounded once
    to the inputs' dtype, where torch rounds ``silu(gate)`` and then the product. Its backward keeps
    ``gate`` and ``up`` only: the ``silu(gate)`` activation that autograd otherwise keeps beside them (a
    third tensor of the MLP's width) is not made.

    Args:
        gate, up: one shape, dtype (float16, bfloat16, float32 or float64) and device; any strides.

    Returns:
        gate's shape and dtype, contiguous. Differentiable in both, once.
    """
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate must be a tensor, got {type(gate).__name__}")
    if not isinstance(up, torch.Tensor):
        raise TypeError(f"up must be a tensor, got {type(up).__name__}")
    return _silu_mul_op(gate, up)


def lora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The QLoRA layer: ``x @ W.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    Args:
        x: ``[..., in_features]``, bfloat16 or float16 (float32 too; float64 on the CPU).
        packed, quant_state: the frozen 4-bit weight ``W`` of shape ``[out_features, in_features]``.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``; any float dtype (cast to x's
            for the products; their gradients come back in their own dtypes).
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_p: the adapter input's dropout probability (0 in eval mode).
        bias: ``[out_features]`` in x's dtype, or None.
        seed: the dropout seed (see ``dropout_seed``); drawn here when ``dropout_p > 0`` and None.

    Returns:
        ``[..., out_features]`` in x's dtype. Differentiable in x, lora_A, lora_B and bias; for the
        backward it keeps x, the ``[..., r]`` down-projection and the seed, nothing else.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if dropout_p > 0 and seed is None:
        seed = dropout_seed(x.device)
    return _lora_linear_op(
        x,
        *_state_args(packed, quant_state),
        quant_state.shape,
        bias,
        lora_A,
        lora_B,
        float(scaling),
        float(dropout_p),
        seed,
    )


def lora_linear_indexed(
    x: torch.Tensor,
    packed: torch.Tensor,
    quant_state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: Sequence[float],
    adapter_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One 4-bit base, several LoRA adapters, one batch (PEFT's ``adapter_names``): row ``m`` of x gets
    ``x[m] @ W.T + bias + scaling[a] * (x[m] @ lora_A[a].T) @ lora_B[a].T``, ``a = adapter_index[m]``, and
    the base alone where ``a = -1``. Inference only (no dropout, no backward).

    On CUDA, up to 16 rows in bfloat16 / float16, one kernel makes every row's down-projection with its
    own adapter and the base product's kernel adds the up-projections as it writes its output; more
    rows take one product a direction for all adapters at once.

    Args:
        x: ``[..., in_features]``.
        packed, quant_state: the frozen 4-bit weight ``W`` of shape ``[out_features, in_features]``.
        lora_A: ``[adapters, r, in_features]``, the adapters' A stacked (an adapter of smaller rank
            zero-padded to r); lora_B: ``[adapters, out_features, r]``; any float dtype (cast to x's).
        scaling: one float an adapter (``lora_alpha / r`` each).
        adapter_index: int64, one entry a row of x (``x.shape[:-1]`` or flat), in ``[-1, adapters)``;
            on CUDA an entry out of range stops with a device-side assert.
        bias: ``[out_features]`` in x's dtype, or None.

    Returns:
        ``[..., out_features]`` in x's dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be an int64 tensor, got {type(adapter_index).__name__}")
    if isinstance(scaling, (str, bytes)) or not isinstance(scaling, (Sequence, torch.Tensor)):
        raise TypeError(f"scaling must be a sequence of floats, one an adapter, got {scaling!r}")
    return _lora_linear_indexed_op(
        x,
        *_state_args(packed, quant_state),
        quant_state.shape,
        bias,
        lora_A,
        lora_B,
        [float(s) for s in scaling],
        adapter_index,
    )


def release_gemm_workspaces() -> None:
    """Deprecated; does nothing. The CUDA products no longer keep a buffer between calls: each
    call's dequantized weight goes back to PyTorch's caching allocator when its product is launched
    (``torch.cuda.empty_cache()`` hands cached memory back to the driver)."""
    warnings.warn(
        "release_gemm_workspaces() does nothing: the products keep no workspace between calls",
        DeprecationWarning,
        stacklevel=2,
    )
