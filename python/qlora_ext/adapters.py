"""Several adapters on a prepared model: ``add_adapter``, ``set_adapter``, ``delete_adapter``,
``disable_adapters``; ``qlora_layers`` walks the model's LoRA layers (through ``_lora_layers``, the one
interface to them). A prepared model's forward refuses ``adapter_names=`` (PEFT's mixed batches), which it
would otherwise ignore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from . import _lora_layers as lora_layers
from .lora_config import LoraConfig, as_lora_config
from .nn import check_adapter_name

__all__ = ["add_adapter", "delete_adapter", "disable_adapters", "qlora_layers", "set_adapter"]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def qlora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The LoRA layers of a model that ``prepare_model`` made, with their names; none of a model that PEFT's
    ``get_peft_model`` wraps (its adapters are PEFT's to change, through the PeftModel)."""
    return iter(lora_layers.prepared_layers(model))


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, "qlora_config", None)
    if not configs:
        raise ValueError("the model has no adapters: prepare it with qlora_ext.prepare_model first")
    return configs


def _refuse_if_merged(model: nn.Module, what: str) -> None:
    merged = [n for n, layer in qlora_layers(model) if lora_layers.merged_of(layer) is not None]
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
    is set active). Layers without adapters yet are not changed."""
    check_adapter_name(adapter_name)
    configs = _configs(model)
    lora_config = as_lora_config(lora_config, model)
    _refuse_if_merged(model, "add_adapter")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} exists already")
    added = 0
    for name, layer in qlora_layers(model):
        if lora_config.matches(name):
            lora_layers.add(layer, adapter_name, lora_config)
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
        lora_layers.set_active(layer, adapter_name if adapter_name in lora_layers.adapters_of(layer) else None)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes ``adapter_name`` from every layer; a layer whose active adapter it was runs its base alone."""
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(configs)}")
    if any(lora_layers.merged_of(layer) == adapter_name for _, layer in qlora_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged: unmerge it first")
    for _, layer in qlora_layers(model):
        if adapter_name in lora_layers.adapters_of(layer):
            lora_layers.delete(layer, adapter_name)
    del configs[adapter_name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model runs its 4-bit bases alone."""
    with lora_layers.disabled(layer for _, layer in qlora_layers(model)):
        yield model
