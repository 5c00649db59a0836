"""Several adapters on a prepared model: ``add_adapter``, ``set_adapter``, ``delete_adapter``,
``disable_adapters``; ``qlora_layers`` walks the model's ``QLoRALinear`` layers. A prepared model's forward
refuses ``adapter_names=`` (PEFT's mixed batches), which it would otherwise ignore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from .lora_config import LoraConfig, as_lora_config
from .nn import QLoRALinear

__all__ = ["add_adapter", "delete_adapter", "disable_adapters", "qlora_layers", "set_adapter"]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def qlora_layers(model: nn.Module) -> Iterator[tuple[str, QLoRALinear]]:
    """The model's QLoRALinear layers with their names."""
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            yield name, module


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, "qlora_config", None)
    if not configs:
        raise ValueError("the model has no adapters: prepare it with qlora_ext.prepare_model first")
    return configs


def _refuse_if_merged(model: nn.Module, what: str) -> None:
    merged = [n for n, layer in qlora_layers(model) if layer.merged_adapter is not None]
    if merged:
        raise ValueError(f"{what}: {len(merged)} layers run a merged adapter ({merged[0]}, ...); unmerge_adapter first")


def _refuse_adapter_names(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("adapter_names") is not None:
        raise ValueError(
            "adapter_names (PEFT's mixed-adapter batches) is not supported by a model prepared with "
            "qlora_ext.prepare_model, which runs the active adapter (qlora_ext.set_adapter) on the whole batch: for "
            "mixed batches load the model with qlora_ext.QLoraExtConfig and use peft.get_peft_model"
        )


def _refuse_adapter_names_in_forward(model: nn.Module) -> None:
    """model(..., adapter_names=[...]) (and generate's) would reach transformers' **kwargs and be ignored: a
    forward pre-hook refuses it (once a model)."""
    if not any(hook is _refuse_adapter_names for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_refuse_adapter_names, with_kwargs=True)


def add_adapter(model: nn.Module, adapter_name: str, lora_config: Any) -> None:
    """Adds adapter ``adapter_name`` to the prepared layers that ``lora_config`` (a ``LoraConfig`` or a
    ``peft.LoraConfig``) targets (they keep the active adapter they had; the new one trains only once it
    is set active). Layers that are not QLoRALinear yet are not changed."""
    configs = _configs(model)
    lora_config = as_lora_config(lora_config, model)
    _refuse_if_merged(model, "add_adapter")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} exists already")
    added = 0
    for name, layer in qlora_layers(model):
        if lora_config.matches(name):
            layer.add_adapter(adapter_name, lora_config.r, lora_config.lora_alpha, lora_config.lora_dropout,
                              lora_config.use_rslora, lora_config.init, lora_config.adapter_dtype)  # fmt: skip
            added += 1
    if not added:
        raise ValueError(f"target_modules {lora_config.target_modules!r} matches no prepared layer")
    configs[adapter_name] = lora_config


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Makes ``adapter_name`` the active adapter of every layer that has it (the others run their
    base alone); only its parameters require grad."""
    if adapter_name not in _configs(model):
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(_configs(model))}")
    _refuse_if_merged(model, "set_adapter")
    for _, layer in qlora_layers(model):
        has = adapter_name in layer.lora_A
        layer.active_adapter = adapter_name if has else None
        for name in layer.lora_A:
            for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                p.requires_grad_(name == adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes ``adapter_name`` from every layer; a layer whose active adapter it was runs its base alone."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(configs)}")
    if any(layer.merged_adapter == adapter_name for _, layer in qlora_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged: unmerge it first")
    for _, layer in qlora_layers(model):
        if adapter_name in layer.lora_A:
            del layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            for d in (layer.r, layer.lora_alpha, layer.scaling, layer.lora_dropout):
                d.pop(adapter_name, None)
            if layer.active_adapter == adapter_name:
                layer.active_adapter = None
    del configs[adapter_name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model runs its 4-bit bases alone."""
    layers = [layer for _, layer in qlora_layers(model)]
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, b in zip(layers, before):
            layer.disable_adapters = b
