"""Hugging Face integration: a quantization method for transformers' ``from_pretrained`` and a LoRA layer
for PEFT, so that the usual QLoRA code runs on qlora_ext's kernels with one changed line::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qlora_ext.QLoraExtConfig(...))
    model = peft.get_peft_model(model, peft.LoraConfig(...))   # LoRA layers on qlora_ext's fused op

- ``QLoraExtConfig`` / ``QLoraExtHfQuantizer`` are registered with transformers under the method name
  ``"qlora_ext"`` when ``qlora_ext`` is imported (transformers installed). Loading quantizes each targeted
  ``nn.Linear`` as its weight is read from the checkpoint, into a ``qlora_ext.nn.Linear4bit`` (the 16-bit
  model is never whole in memory); ``save_pretrained`` writes bitsandbytes' keys and the config, which
  ``from_pretrained`` reads back to the same bits.
- A model made by ``qlora_ext.prepare_model`` (LoRA layers, no PEFT model) gets a ``QLoraExtConfig``
  and quantizer too (``hf_prepared.record_prepared``), whose ``prepared`` entry lists its 4-bit layers and adapters:
  ``save_pretrained`` (and so transformers' ``Trainer`` checkpoints) writes the whole prepared model (the
  4-bit bases under ``<layer>.base_layer.weight...``, the adapters under ``<layer>.lora_A.<name>.weight``),
  and ``from_pretrained`` of that directory builds the same layers and loads them, or raises naming what
  the checkpoint lacks.
- PEFT: ``register_peft()`` makes PEFT's LoRA wrap ``qlora_ext.nn.Linear4bit`` in
  ``qlora_ext.peft_lora.LoraLinear4bit`` (through ``LoraConfig._register_custom_module``). It runs by
  itself when a model is loaded with ``QLoraExtConfig`` and at import when PEFT is imported already;
  call it for models built otherwise (``Linear4bit.from_linear``).

This module needs transformers; ``qlora_ext`` imports it only where transformers is installed.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import functional as F
from ._lora_layers import is_prepared
from .nn import _COMPUTE_DTYPES, _STORAGE_DTYPES, Linear4bit, _dtype
from .quant_state import BLOCKSIZES, QUANT_TYPES

__all__ = ["METHOD", "QLoraExtConfig", "QLoraExtHfQuantizer", "register_peft", "replace_linears"]

METHOD = "qlora_ext"


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# BitsAndBytesConfig's names for what QLoraExtConfig takes, for users who swap one for the other.
_BITSANDBYTES_NAMES = {
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "compress_statistics",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_quant_storage": "quant_storage",
    "llm_int8_skip_modules": "modules_to_not_convert",
}


def _unknown_keywords_message(kwargs: dict[str, Any]) -> str:
    hints = []
    for key in kwargs:
        if key in _BITSANDBYTES_NAMES:
            hints.append(f"{key} is {_BITSANDBYTES_NAMES[key]} here")
        elif key in ("load_in_4bit", "load_in_8bit"):
            hints.append(f"{key}: QLoraExtConfig always loads in 4 bits; leave it out")
    names = ", ".join(repr(k) for k in kwargs)
    return f"QLoraExtConfig got unexpected keyword arguments {names}" + (f" ({'; '.join(hints)})" if hints else "")


class QLoraExtConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of ``from_pretrained`` that loads a model's linear layers into
    ``qlora_ext.nn.Linear4bit``, in place of ``BitsAndBytesConfig(load_in_4bit=True, ...)``.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"`` (``bnb_4bit_quant_type``).
        blocksize: elements per scale, 32 ... 4096 (bitsandbytes' 64).
        compress_statistics: double quantization of the scales (``bnb_4bit_use_double_quant``).
        compute_dtype: the products' dtype (``bnb_4bit_compute_dtype``); None: the input's dtype.
        quant_storage: dtype the packed bytes are saved as (``bnb_4bit_quant_storage``).
        modules_to_not_convert: module names (or regexes) left in 16 bits, besides transformers' own
            list (the output head, tied weights, ``_keep_in_fp32_modules``), as ``llm_int8_skip_modules``.

    Saved in ``config.json`` with ``"quant_method": "qlora_ext"``: ``from_pretrained`` of such a
    directory needs ``import qlora_ext`` first (which registers the method) and no other argument.

    The config of a model made by ``prepare_model`` also has ``prepared``: its plain 4-bit layers
    (``"linear4bit"``), each adapter's settings and layers (``"adapters"``) and the active adapter, which
    ``from_pretrained`` of a saved directory builds again. It is written by qlora_ext (at each
    ``save_pretrained``), not by hand.
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Union[str, torch.dtype, None] = None,
        quant_storage: Union[str, torch.dtype] = torch.uint8,
        modules_to_not_convert: Optional[list[str]] = None,
        quant_method: str = METHOD,
        prepared: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ):
        if kwargs:
            raise TypeError(_unknown_keywords_message(kwargs))
        if quant_method != METHOD:
            raise ValueError(f"quant_method must be {METHOD!r}, got {quant_method!r}")
        self.quant_method = METHOD
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        if not isinstance(compress_statistics, bool):
            raise TypeError(f"compress_statistics must be a bool, got {compress_statistics!r}")
        names = modules_to_not_convert
        if names is not None and not (isinstance(names, (list, tuple)) and all(isinstance(m, str) for m in names)):
            raise TypeError(f"modules_to_not_convert must be a list of names, got {modules_to_not_convert!r}")
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype", _COMPUTE_DTYPES)
        self.quant_storage = _dtype(quant_storage, "quant_storage", _STORAGE_DTYPES)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        if prepared is not None:  # written by qlora_ext (hf_prepared), read back from config.json
            self.prepared = prepared

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config saved in a ``config.json``, as transformers reads it. Keys a newer qlora_ext may
        write there are kept (and written back), not refused: only a config made in code refuses them."""
        known = inspect.signature(cls.__init__).parameters
        newer = {k: v for k, v in config_dict.items() if k not in known}
        result = super().from_dict(
            {k: v for k, v in config_dict.items() if k in known}, return_unused_kwargs=return_unused_kwargs, **kwargs
        )
        config = result[0] if return_unused_kwargs else result
        for key, value in newer.items():
            setattr(config, key, value)
        return result

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` holds it: dtypes by name (``"bfloat16"``), the rest as set."""
        out = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("compute_dtype", "quant_storage")})
        out["compute_dtype"] = _dtype_name(self.compute_dtype)
        out["quant_storage"] = _dtype_name(self.quant_storage)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__} {self.to_json_string()}"


def replace_linears(
    model: nn.Module, config: QLoraExtConfig, modules_to_not_convert: Optional[list[str]] = None
) -> list[str]:
    """Puts an empty ``Linear4bit`` (parameters on the meta device) in place of each ``nn.Linear`` (and
    transformers' ``Conv1D``) that ``modules_to_not_convert`` does not name; returns their names. The
    weights come later, from ``from_pretrained``'s loader."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover (every transformers 5 has it)
        Conv1D = ()
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, modules_to_not_convert):
            continue
        # exactly nn.Linear, as transformers' bitsandbytes integration takes it (subclasses stay 16-bit):
        # the same layers quantized as with BitsAndBytesConfig, so the same checkpoint keys both ways
        if type(module) is not nn.Linear and not isinstance(module, Conv1D):
            continue
        new = _empty_linear4bit(module, config)
        model.set_submodule(name, new)
        replaced.append(name)
    return replaced


def _empty_linear4bit(module: nn.Module, config: QLoraExtConfig) -> Linear4bit:
    """An empty Linear4bit (parameters on the meta device) in ``config``'s format for the linear ``module``
    (an ``nn.Linear``, a subclass, or transformers' ``Conv1D``); its weight comes from the loader."""
    if isinstance(module, nn.Linear):
        in_features, out_features = module.in_features, module.out_features
    elif type(module).__name__ == "Conv1D":
        in_features, out_features = module.weight.shape
    else:
        raise ValueError(f"a {type(module).__name__} is not a linear layer")
    new = Linear4bit(in_features, out_features, bias=module.bias is not None, compute_dtype=config.compute_dtype,
                     compress_statistics=config.compress_statistics, quant_type=config.quant_type,
                     blocksize=config.blocksize, quant_storage=config.quant_storage, device="meta")  # fmt: skip
    if module.bias is not None:
        # the bias keeps the model's dtype, as nn.Linear's (and bitsandbytes' Linear4bit's) does
        new.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"), requires_grad=False)
    # a Conv1D stores its weight as [in, out]: transposed when quantized (checkpoints in our keys are [out, in])
    new.source_cls = type(module)
    # transformers' weight initialization must not touch it (random floats into the codes, or a crash on
    # uint8): a layer that the checkpoint leaves empty is an error (QLoraExtHfQuantizer, after loading)
    new._is_hf_initialized = True
    new.requires_grad_(False)
    return new.train(module.training)


class _Quantize(ConversionOps):
    """Quantizes a 16-bit weight as the loader reads it, into the Linear4bit it belongs to."""

    def __init__(self, hf_quantizer: "QLoraExtHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs) -> dict[str, torch.Tensor]:
        config = self.hf_quantizer.quantization_config
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            source_cls = getattr(module, "source_cls", None)
            if source_cls is not None and source_cls.__name__ == "Conv1D":
                value = value.T
            packed, state = F.quantize_4bit(value, config.blocksize, config.quant_type, config.compress_statistics)
            module.set_weight(packed, state, module.quant_storage)
            module._is_hf_initialized = True
            result[name] = module.weight
        return result


class _Keep(ConversionOps):
    """The reverse of ``_Deserialize`` when a model is saved: every tensor as it is."""

    def convert(self, input_dict, **kwargs) -> dict[str, torch.Tensor]:
        return input_dict


class _Deserialize(ConversionOps):
    """Reads a 4-bit weight and its entries (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...)
    from a checkpoint into the Linear4bit it belongs to, checking them (``Linear4bit.check_weight``)."""

    def __init__(self, hf_quantizer: "QLoraExtHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs) -> dict[str, torch.Tensor]:
        if len(input_dict) == 1:
            return input_dict  # a weight without 4-bit entries: another module's, loaded as it is
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        packed = entries.pop("weight", None)
        module, _ = get_module_from_name(model, full_layer_name)
        if packed is None or not isinstance(module, Linear4bit):
            raise ValueError(
                f"{full_layer_name}: the checkpoint has 4-bit entries {sorted(entries)} but the model's module is a "
                f"{type(module).__name__}" + ("" if packed is not None else " and the checkpoint has no weight")
            )
        codes, state = module.check_weight(packed, entries)
        module.set_weight(codes, state, packed.dtype)
        module._is_hf_initialized = True
        return {"weight": module.weight}

    @property
    def reverse_op(self) -> ConversionOps:
        # saving again (save_pretrained reverts the conversions a model was loaded with): the Linear4bit's state
        # dict holds bitsandbytes' keys already, each written as it is
        return _Keep()


class QLoraExtHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``QLoraExtConfig``, following its bitsandbytes 4-bit quantizer's hooks:
    ``preprocess_model`` puts empty Linear4bit layers in place of the linears; the loader then calls
    ``get_quantize_ops`` for each 16-bit weight those layers take (``param_needs_quantization``), or, for a
    checkpoint saved in 4 bits, the ``deserialize`` op of ``get_load_operations`` on the weight and its
    ``serialized_names`` entries."""

    requires_calibration = False
    quantization_config: QLoraExtConfig

    # The keys a 4-bit weight is saved under (Linear4bit's state dict, bitsandbytes' format).
    serialized_names = {
        "weight": [
            "weight",
            "weight.nested_absmax",
            "weight.nested_quant_map",
            "weight.quant_map",
            "weight.absmax",
            "weight.quant_state.bitsandbytes__nf4",
            "weight.quant_state.bitsandbytes__fp4",
        ]
    }

    @property
    def quantized_element_size(self) -> float:
        """Bytes a quantized weight element takes, for transformers' memory estimates."""
        return 0.5

    def validate_environment(self, *args, **kwargs) -> None:
        """Refuses a ``device_map`` that offloads modules, before anything loads."""
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            values = {str(v) for v in device_map.values()}
            if "disk" in values or ("cpu" in values and values != {"cpu"}):
                raise ValueError(
                    "qlora_ext: a device_map that offloads modules to the CPU or the disk is not supported (the 4-bit "
                    "layers must stay where they were quantized); put every module on a GPU, or all on the CPU"
                )

    def update_device_map(self, device_map: Union[dict, str, None]) -> Union[dict, str]:
        """Without a ``device_map``, the GPU where there is one, as bitsandbytes' quantizer."""
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory: dict[str, Union[int, str]]) -> dict[str, Union[int, str]]:
        """10% of each device left free: room for the 16-bit weight being quantized."""
        return {key: val * 0.90 for key, val in max_memory.items()}

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        """Whether ``param_name`` is the weight of a ``Linear4bit``: the loader quantizes it (``_Quantize``)."""
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        prepared = getattr(self.quantization_config, "prepared", None)
        if prepared is not None:
            if not self.pre_quantized:
                raise ValueError(
                    "qlora_ext: this QLoraExtConfig describes a saved prepare_model checkpoint (it has 'prepared'), "
                    "but the checkpoint being loaded is not quantized: load a 16-bit checkpoint with "
                    "QLoraExtConfig(quant_type=..., ...) or prepare it with qlora_ext.prepare_model"
                )
            from .hf_prepared import build_prepared

            build_prepared(model, self.quantization_config, checkpoint_files)
            return model
        # the user's list adds to transformers' own (output head, tied weights, _keep_in_fp32_modules); with
        # BitsAndBytesConfig, llm_int8_skip_modules replaces it, which would quantize the head
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        )
        replace_linears(model, self.quantization_config, self.modules_to_not_convert)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        empty = [name for name, m in model.named_modules() if isinstance(m, Linear4bit) and m.quant_state is None]
        if empty:
            raise ValueError(
                f"qlora_ext: the checkpoint has no weight for {len(empty)} quantized layers ({', '.join(empty[:3])}"
                f"{', ...' if len(empty) > 3 else ''}): name them in QLoraExtConfig(modules_to_not_convert=...) to "
                "leave them in 16 bits, or load a checkpoint that has them"
            )
        prepared = getattr(self.quantization_config, "prepared", None)
        if prepared is not None:
            from .hf_prepared import finish_prepared

            finish_prepared(model, prepared)
        # Not `is_loaded_in_4bit`: transformers reads it as "bitsandbytes is loaded" (num_parameters imports it)
        register_peft()
        return model

    def get_state_dict_and_metadata(self, model):
        """Called by ``save_pretrained`` before it writes ``config.json``: the ``prepared`` entry is brought up
        to date with the model's LoRA layers and adapters as they are now (the state dict itself is
        the model's own)."""
        if is_prepared(model):
            from .hf_prepared import prepared_layout

            self.quantization_config.prepared = prepared_layout(model)
        elif getattr(self.quantization_config, "prepared", None) is not None:
            del self.quantization_config.prepared  # no adapters left (merged and unloaded): a plain 4-bit model
        model.config.quantization_config = self.quantization_config
        return None, {}

    @property
    def is_qat_trainable(self) -> bool:
        # a prepared model carries its own trainable adapters (no PEFT model on top): transformers' Trainer
        # otherwise refuses a quantized model that is not a PeftModel as "purely quantized"
        return getattr(self.quantization_config, "prepared", None) is not None

    def is_serializable(self) -> bool:
        """``save_pretrained`` writes the 4-bit weights (bitsandbytes' keys)."""
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (PEFT's or ``prepare_model``'s) train on the 4-bit layers."""
        return True

    def get_quantize_ops(self) -> ConversionOps:
        """What quantizes a 16-bit weight as the loader reads it."""
        return _Quantize(self)

    def get_load_operations(self) -> dict:
        """What reads a saved 4-bit weight and its scales back into a ``Linear4bit``."""
        return {"deserialize": _Deserialize}

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: each Linear4bit becomes an nn.Linear with its dequantized weight."""
        if is_prepared(model):
            raise ValueError(
                "qlora_ext: dequantize() of a prepared model would take the 4-bit bases from under its LoRA "
                "layers: qlora_ext.merge_adapter(model) runs them on 16-bit weights with the adapter folded in"
            )
        if isinstance(dtype, str):  # model.config.dtype, which save_pretrained turns into a name
            dtype = getattr(torch, dtype)
        for name, module in list(model.named_modules()):
            if not isinstance(module, Linear4bit):
                continue
            weight = module.dequantize()
            if dtype is not None:
                weight = weight.to(dtype)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
            model.set_submodule(name, linear.train(module.training))
        return model


def _register_with_transformers() -> None:
    # idempotent: importing this module twice (importlib.reload, a second copy) must not raise
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is None:
        register_quantization_config(METHOD)(QLoraExtConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is None:
        register_quantizer(METHOD)(QLoraExtHfQuantizer)


def register_peft() -> bool:
    """Makes PEFT's LoRA put ``qlora_ext.peft_lora.LoraLinear4bit`` on ``qlora_ext.nn.Linear4bit`` layers
    (whose forward and backward are the fused ``lora_linear`` op). Idempotent; returns False where PEFT is
    not installed. Runs by itself when a model is loaded with ``QLoraExtConfig``."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    try:
        from . import peft_lora
    except ImportError as e:  # a PEFT without the pieces the layer builds on (tested with 0.21.2)
        warnings.warn(f"qlora_ext: PEFT {peft.__version__} cannot take qlora_ext's LoRA layer ({e})", stacklevel=2)
        return False
    peft_lora.install()
    return True


_register_with_transformers()
