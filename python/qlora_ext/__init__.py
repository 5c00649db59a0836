"""qlora_ext: NF4/FP4 4-bit quantization and QLoRA kernels for PyTorch.

Importing the package loads the compiled extension, which registers the ``torch.ops.qlora.*`` ops
(CPU kernels always, CUDA kernels when the extension was built with them).
"""

import torch  # noqa: F401  (the compiled library needs torch's symbols loaded first)

from . import (
    _C,  # noqa: F401  (registers torch.ops.qlora)
    _ops,  # noqa: F401  (fake kernels for torch.compile and opcheck)
    functional,
    nn,
)
from .bnb_patch import patch_bitsandbytes, unpatch_bitsandbytes
from .functional import dequantize_4bit, gemm_4bit, gemm_4bit_transposed, lora_linear, matmul_4bit, quantize_4bit
from .model import (
    LoraConfig,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    load_quantized,
    merge_adapter,
    prepare_model,
    save_adapter,
    save_quantized,
    set_adapter,
    unmerge_adapter,
)
from .nn import Linear4bit, QLoRALinear
from .quant_state import QuantState

__version__ = "0.1.0"

__all__ = [
    "Linear4bit",
    "LoraConfig",
    "QLoRALinear",
    "QuantState",
    "add_adapter",
    "cuda_kernels_available",
    "delete_adapter",
    "dequantize_4bit",
    "disable_adapters",
    "functional",
    "gemm_4bit",
    "gemm_4bit_transposed",
    "load_adapter",
    "load_quantized",
    "lora_linear",
    "matmul_4bit",
    "merge_adapter",
    "nn",
    "patch_bitsandbytes",
    "prepare_model",
    "quantize_4bit",
    "save_adapter",
    "save_quantized",
    "set_adapter",
    "unmerge_adapter",
    "unpatch_bitsandbytes",
]


def cuda_kernels_available() -> bool:
    """Whether this build of the extension has CUDA kernels (it may have none: a CPU-only build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("qlora::quantize_4bit", "CUDA")
