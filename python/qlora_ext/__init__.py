"""qlora_ext: NF4/FP4 4-bit quantization and QLoRA kernels for PyTorch.

Importing the package loads the compiled extension, which registers the ``torch.ops.qlora.*`` ops
(CPU kernels always, CUDA kernels when the extension was built with them). Where transformers is
installed it also registers the quantization method ``"qlora_ext"`` (``QLoraExtConfig``) with
transformers' ``from_pretrained``; where PEFT is imported already, PEFT's LoRA learns qlora_ext's
4-bit layer (see ``qlora_ext.hf``).
"""

import importlib.util
import sys
import warnings

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
from .transformers_patch import patch_transformers, unpatch_transformers

__version__ = "0.1.0"

__all__ = [
    "Linear4bit",
    "LoraConfig",
    "QLoraExtConfig",
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
    "patch_transformers",
    "prepare_model",
    "quantize_4bit",
    "save_adapter",
    "save_quantized",
    "set_adapter",
    "unmerge_adapter",
    "unpatch_bitsandbytes",
    "unpatch_transformers",
]


def cuda_kernels_available() -> bool:
    """Whether this build of the extension has CUDA kernels (it may have none: a CPU-only build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("qlora::quantize_4bit", "CUDA")


def _register_hugging_face() -> None:
    """transformers' quantization method (imports transformers' quantizer registry, about a second); PEFT
    only where it is imported already (importing it takes seconds: otherwise loading a model with
    QLoraExtConfig, or qlora_ext.hf.register_peft(), does it)."""
    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from . import hf
    except ImportError as e:  # a transformers without the quantizer registry this needs (5.x)
        warnings.warn(f"qlora_ext: transformers' quantizer registry is not usable ({e}); QLoraExtConfig is unavailable",
                      stacklevel=3)  # fmt: skip
        return
    globals()["QLoraExtConfig"] = hf.QLoraExtConfig
    if "peft" in sys.modules:
        hf.register_peft()


def __getattr__(name: str):
    if name == "QLoraExtConfig":
        raise ImportError("qlora_ext.QLoraExtConfig needs transformers (5.x): pip install transformers")
    raise AttributeError(f"module 'qlora_ext' has no attribute {name!r}")


_register_hugging_face()
