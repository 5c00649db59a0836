"""Models made by ``qlora_ext.prepare_model`` in transformers' files: ``record_prepared`` writes their
layout (plain 4-bit layers, each adapter's settings and layers, the active adapter) into the
``QLoraExtConfig`` that ``save_pretrained`` writes, and the quantizer (``qlora_ext.hf``) builds those
layers again in ``from_pretrained`` (``build_prepared``, ``finish_prepared``). Needs transformers."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from . import _lora_layers as lora_layers
from .hf import QLoraExtConfig, QLoraExtHfQuantizer, _dtype, _dtype_name, _empty_linear4bit
from .lora_config import LoraConfig
from .nn import Linear4bit

__all__ = ["build_prepared", "finish_prepared", "prepared_layout", "record_prepared"]

_ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _lora_config_dict(config: LoraConfig) -> dict[str, Any]:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["adapter_dtype"] = _dtype_name(config.adapter_dtype)
    return d


def _lora_config_from_dict(d: dict[str, Any]) -> LoraConfig:
    d = dict(d)
    d["adapter_dtype"] = _dtype(d.get("adapter_dtype", "float32"), "adapter_dtype", _ADAPTER_DTYPES)
    return LoraConfig(**d)


def prepared_layout(model: nn.Module) -> dict[str, Any]:
    """The ``prepared`` entry of the config for a model with LoRA layers: the names of its plain
    Linear4bit layers, each adapter's settings and layers, and the active adapter."""
    configs = getattr(model, "qlora_config", None) or {}
    layers = dict(lora_layers.all_layers(model))
    merged = [n for n, m in layers.items() if lora_layers.merged_of(m) is not None]
    if merged:
        raise ValueError(
            f"qlora_ext: {len(merged)} layers run a merged adapter ({merged[0]}, ...), which a checkpoint does not "
            "keep: unmerge_adapter before saving"
        )
    bases = {f"{n}.base_layer" for n in layers}
    adapters = {}
    for adapter, config in configs.items():
        adapters[adapter] = {
            "config": _lora_config_dict(config),
            "layers": [n for n, m in layers.items() if adapter in lora_layers.adapters_of(m)],
        }
    bare = [n for n, m in layers.items() if not set(configs) & set(lora_layers.adapters_of(m))]
    if bare:
        raise ValueError(f"qlora_ext: {bare[0]} has no adapter that the model's qlora_config knows: it cannot be saved")
    actives = {lora_layers.active_of(m) for m in layers.values()} - {None}
    return {
        "linear4bit": [n for n, m in model.named_modules() if isinstance(m, Linear4bit) and n not in bases],
        "adapters": adapters,
        "active_adapter": next(iter(actives)) if len(actives) == 1 else None,
    }


def record_prepared(
    model: nn.Module, quant_type: str, blocksize: int, compress_statistics: bool, compute_dtype: Optional[torch.dtype]
) -> None:
    """Called by ``prepare_model`` on a transformers model: gives it a ``QLoraExtConfig`` (the one it was
    loaded with, else one in prepare_model's format) with the ``prepared`` layout, in
    ``model.config.quantization_config``, and the quantizer that ``save_pretrained`` asks for it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        config = QLoraExtConfig(quant_type=quant_type, blocksize=blocksize, compress_statistics=compress_statistics,
                                compute_dtype=compute_dtype)  # fmt: skip
        quantizer = QLoraExtHfQuantizer(config, pre_quantized=True)
        model.hf_quantizer = quantizer
    elif not isinstance(quantizer, QLoraExtHfQuantizer):
        raise ValueError(f"the model is quantized by {type(quantizer).__name__}, which prepare_model cannot keep")
    quantizer.quantization_config.prepared = prepared_layout(model)
    model.config.quantization_config = quantizer.quantization_config


def build_prepared(model: nn.Module, config: QLoraExtConfig, checkpoint_files) -> None:
    """Puts the prepared layers that ``config.prepared`` lists in place (empty, on the meta device), and
    checks that the checkpoint's files have every tensor of them before anything is loaded: a layer they
    lack would otherwise be left to transformers' random initialization, reported only as missing."""
    prepared = config.prepared
    adapters = {name: _lora_config_from_dict(d["config"]) for name, d in prepared["adapters"].items()}
    owners: dict[str, list[str]] = {}
    for adapter, d in prepared["adapters"].items():
        for name in d["layers"]:
            owners.setdefault(name, []).append(adapter)
    for name in list(prepared["linear4bit"]) + list(owners):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"qlora_ext: the checkpoint's config lists {name!r}, which this model does not have"
            ) from None
        new = _empty_linear4bit(module, config)
        if name in owners:
            first, *rest = owners[name]
            new = lora_layers.new_layer(new, first, adapters[first], init=False)
            for adapter in rest:
                lora_layers.add(new, adapter, adapters[adapter], init=False)
            new.train(module.training)
        model.set_submodule(name, new)
    prefixes = tuple(f"{name}." for name in owners)
    needed = [k for k in model.state_dict() if k.startswith(prefixes)]
    keys = set()
    for f in checkpoint_files or []:
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"qlora_ext: a prepared checkpoint is read from safetensors files only, got {f}")
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as handle:
            keys |= set(handle.keys())
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ValueError(
            f"qlora_ext: the checkpoint lacks {len(missing)} tensors of its prepared layers ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): it is incomplete, or not the checkpoint its config.json describes"
        )


def finish_prepared(model: nn.Module, prepared: dict[str, Any]) -> None:
    """After loading: the adapters' configs on the model, and what is trainable as prepare_model leaves it
    (the active adapter, and the modules_to_save of every adapter)."""
    from .adapters import _refuse_adapter_names_in_forward, set_adapter
    from .model import _enable_input_grads

    configs = {name: _lora_config_from_dict(d["config"]) for name, d in prepared["adapters"].items()}
    for name, m in lora_layers.all_layers(model):
        for adapter in lora_layers.adapters_of(m):
            for p in lora_layers.weights_of(m, adapter):
                if p.dtype != configs[adapter].adapter_dtype:
                    raise ValueError(f"qlora_ext: {name}'s adapter {adapter!r} loaded as {p.dtype}, its config "
                                     f"says {configs[adapter].adapter_dtype}")  # fmt: skip
    model.qlora_config = configs
    model.requires_grad_(False)
    active = prepared.get("active_adapter")
    if active is not None:
        set_adapter(model, active)
    else:
        for _, m in lora_layers.all_layers(model):
            lora_layers.set_active(m, None)
    for name, module in model.named_modules():  # one copy a model, shared by its adapters
        if any(config.saves(name) for config in configs.values()):
            module.requires_grad_(True)
    _refuse_adapter_names_in_forward(model)
    _enable_input_grads(model)
