"""The one interface to a prepared model's LoRA layers, whichever class holds them: qlora_ext's own
``QLoRALinear``, or PEFT's LoRA layer on a ``Linear4bit`` (``peft_lora.LoraLinear4bit``). The functions
that walk a prepared model (adapters, merging, saving and loading, transformers' files) reach a layer's
adapters only through here, so that both classes keep one behaviour: one active adapter or none, only the
active adapter's parameters trainable, a 16-bit merge that unmerges exactly, and deleting the active
adapter leaves the base alone (PEFT would activate another).

``prepare_model`` builds PEFT's layers wherever PEFT can take them (``layer_kind``). Walking a model
imports PEFT only where a model can hold its layers (``sys.modules``), so a prepared model of
``QLoRALinear`` layers needs neither PEFT nor transformers.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import nn

from .lora_config import LoraConfig
from .nn import Linear4bit, QLoRALinear, check_adapter_name, merged_weight, new_adapter

__all__ = [
    "active_of",
    "all_layers",
    "add",
    "adapters_of",
    "base_of",
    "delete",
    "disabled",
    "is_lora_layer",
    "is_prepared",
    "layer_kind",
    "merge16",
    "merged_of",
    "merged_weight_of",
    "new_layer",
    "prepared_layers",
    "scaling_of",
    "set_active",
    "unmerge16",
    "weights_of",
]


# PEFT's LoRA layer on a Linear4bit: None until looked for, False where PEFT cannot give it.
_PEFT_LAYER: Optional[type] | bool = None
_PEFT_PROBLEM = ""  # why not, for the warning
_OLDEST_PEFT = (0, 21, 2)  # the oldest PEFT whose private LoRA API peft_lora was tested with
_FALLBACK_WARNED = False  # layer_kind has warned of the QLoRALinear fallback


def _peft_class(import_peft: bool = False) -> Optional[type]:
    """``LoraLinear4bit``, or None where PEFT is missing, older than ``_OLDEST_PEFT`` or fails to import;
    looked for once. Without ``import_peft`` only where PEFT is imported already (a model can hold the
    layer only then), so that walking a model of ``QLoRALinear`` layers never imports PEFT."""
    global _PEFT_LAYER, _PEFT_PROBLEM
    if _PEFT_LAYER is None and (import_peft or "peft" in sys.modules):
        try:
            import peft

            version = tuple(int(v) for v in re.findall(r"\d+", peft.__version__)[:3])
            if version < _OLDEST_PEFT:
                raise ImportError(f"PEFT {peft.__version__} is older than {'.'.join(map(str, _OLDEST_PEFT))}")
            from .peft_lora import LoraLinear4bit

            _PEFT_LAYER = LoraLinear4bit
        except Exception as e:  # not only ImportError: a PEFT that breaks on import (a mismatched transformers)
            _PEFT_LAYER, _PEFT_PROBLEM = False, f"{type(e).__name__}: {e}"
    return _PEFT_LAYER or None


def _is_peft(layer: nn.Module) -> bool:
    """Whether a layer of this interface is PEFT's (the other class is qlora_ext's QLoRALinear)."""
    return not isinstance(layer, QLoRALinear)


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer on a 4-bit base that this interface knows."""
    if isinstance(module, QLoRALinear):
        return True
    peft_class = _peft_class()
    return peft_class is not None and isinstance(module, peft_class)


def all_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's LoRA layers on 4-bit bases, with their names, whoever made them (prepare_model or
    PEFT's get_peft_model: the public functions walk only prepared models, ``adapters.qlora_layers``)."""
    for name, module in model.named_modules():
        if is_lora_layer(module):
            yield name, module


def prepared_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``all_layers`` that ``prepare_model`` made, in one walk: the LoRA layers inside a module holding
    ``qlora_config`` (``model`` itself, or a prepared model inside a wrapper, as sentence-transformers'
    ``model[0].auto_model``), and qlora_ext's own layers anywhere; none of a model that PEFT's
    ``get_peft_model`` wraps, whose layers may be the same class."""
    prepared: list[str] = []  # name prefixes of the modules holding qlora_config (named_modules: parents first)
    layers = []
    for name, module in model.named_modules():
        if "qlora_config" in module.__dict__:
            prepared.append(f"{name}." if name else "")
        if is_lora_layer(module) and (isinstance(module, QLoRALinear) or any(name.startswith(p) for p in prepared)):
            layers.append((name, module))
    return layers


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` was made by ``prepare_model`` (see ``prepared_layers``)."""
    return bool(prepared_layers(model))


def base_of(layer: nn.Module) -> Linear4bit:
    return layer.base_layer if not _is_peft(layer) else layer.get_base_layer()


def adapters_of(layer: nn.Module) -> list[str]:
    """The layer's adapters, in the order they were added."""
    return list(layer.lora_A)


def weights_of(layer: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """Adapter ``name``'s ``A`` ([r, in]) and ``B`` ([out, r])."""
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def scaling_of(layer: nn.Module, name: str) -> float:
    return float(layer.scaling[name])


def active_of(layer: nn.Module) -> Optional[str]:
    """The active adapter, or None (the base alone)."""
    if not _is_peft(layer):
        return layer.active_adapter
    active = [a for a in dict.fromkeys(layer.active_adapters) if a in layer.lora_A]
    if len(active) > 1:
        raise ValueError(f"{len(active)} adapters are active in one layer ({active}); qlora_ext runs one at a time")
    return active[0] if active else None


def set_active(layer: nn.Module, name: Optional[str]) -> None:
    """Makes ``name`` the layer's active adapter (None: the base alone); only its parameters require grad.
    The callers refuse a merged model first; this also runs under a merge (delete, load)."""
    if name is not None and name not in layer.lora_A:
        raise ValueError(f"no adapter {name!r} in this layer; it has {adapters_of(layer)}")
    if _is_peft(layer):
        # PEFT's own set_adapter, past LoraLinear4bit's, which refuses a user's call under merge16
        super(_peft_class(), layer).set_adapter([] if name is None else name)
    else:
        layer.active_adapter = name
    for adapter in adapters_of(layer):
        for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
            p.requires_grad_(adapter == name)


def _settings(config: LoraConfig, init, dtype) -> tuple:
    return (config.init if init is None else init), (config.adapter_dtype if dtype is None else dtype)


def _draw_peft_adapter(layer: nn.Module, name: str, config: LoraConfig, init, dtype) -> None:
    """Adapter ``name`` of a PEFT layer (made by PEFT on meta: no memory, no random draws) gets A and B
    drawn as ``QLoRALinear`` draws them (``nn.new_adapter``: the same bits from one seed), in the layer's
    mode (PEFT's new dropout module starts in training mode)."""
    lora_A, lora_B = new_adapter(base_of(layer), config.r, init, dtype)
    layer.lora_A[name], layer.lora_B[name] = lora_A, lora_B
    for module in (lora_A, lora_B, layer.lora_dropout[name]):
        module.train(layer.training)


def add(layer: nn.Module, name: str, config: LoraConfig, init=None, dtype: Optional[torch.dtype] = None) -> None:
    """Adds adapter ``name`` with ``config``'s settings (``init`` and ``dtype`` in place of the config's:
    loading passes ``False`` and the file's dtype); the active adapter stays as it was."""
    check_adapter_name(name)
    init, dtype = _settings(config, init, dtype)
    if not _is_peft(layer):
        layer.add_adapter(name, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, init, dtype)
        return
    if name in layer.lora_A:
        raise ValueError(f"adapter {name!r} exists already")
    from peft.utils.integrations import init_empty_weights

    active = active_of(layer)
    with init_empty_weights():
        layer.update_layer(name, config.r, config.lora_alpha, config=_peft_config(config))
    _draw_peft_adapter(layer, name, config, init, dtype)
    set_active(layer, active)


def layer_kind() -> str:
    """Which class ``new_layer`` builds: ``"peft"``, PEFT's ``LoraLinear4bit`` (the layer ``get_peft_model``
    builds on a ``Linear4bit``, running the same fused op), wherever PEFT can take it; else ``"qlora"``,
    qlora_ext's ``QLoRALinear``, which saves the same files and trains to the same bits, with a
    FutureWarning (once a process). The environment variable ``QLORA_EXT_LAYERS=qlora|peft`` forces one
    (the tests run both)."""
    global _FALLBACK_WARNED
    kind = os.environ.get("QLORA_EXT_LAYERS")
    if kind is None:
        if _peft_class(import_peft=True) is not None:
            return "peft"
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED = True
            warnings.warn(
                f"qlora_ext: prepare_model builds qlora_ext's QLoRALinear layers, since PEFT cannot give its own "
                f"({_PEFT_PROBLEM}; peft>=0.21.2, in the train extra, can). The files and the training are the "
                "same; prepared models of QLoRALinear layers will go in a future release.",
                FutureWarning,
                stacklevel=_callers_level(),
            )
        return "qlora"
    if kind not in ("qlora", "peft"):
        raise ValueError(f"QLORA_EXT_LAYERS must be 'qlora' or 'peft', got {kind!r}")
    return kind


def _callers_level() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller name the first frame outside
    qlora_ext (the user's call of prepare_model, or the library's that made it)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def new_layer(base: Linear4bit, name: str, config: LoraConfig, init=None, dtype: Optional[torch.dtype] = None):
    """A LoRA layer on ``base`` (of ``layer_kind()``'s class) with one adapter, ``name``, active and
    trainable; ``init`` and ``dtype`` as in ``add``. Either class draws the same adapter from one seed."""
    check_adapter_name(name)
    init, dtype = _settings(config, init, dtype)
    if layer_kind() == "qlora":
        return QLoRALinear(base, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, init, dtype, name)
    from peft.utils.integrations import init_empty_weights

    from .peft_lora import LoraLinear4bit

    with init_empty_weights():
        layer = LoraLinear4bit(base, name, config=_peft_config(config), r=config.r, lora_alpha=config.lora_alpha)
    _draw_peft_adapter(layer, name, config, init, dtype)
    set_active(layer, name)
    return layer


def _peft_config(config: LoraConfig):
    """The ``peft.LoraConfig`` that PEFT's ``update_layer`` reads ``config``'s settings from (the initial
    adapter is drawn by ``_draw_peft_adapter``, not by PEFT)."""
    import peft

    return peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           use_rslora=config.use_rslora, init_lora_weights=False)  # fmt: skip


def delete(layer: nn.Module, name: str) -> None:
    """Removes adapter ``name``; a layer whose active adapter it was runs its base alone."""
    if active_of(layer) == name:
        set_active(layer, None)  # first: PEFT's delete_adapter would activate another adapter
    if _is_peft(layer):
        layer.delete_adapter(name)
        return
    del layer.lora_A[name], layer.lora_B[name]
    for d in (layer.r, layer.lora_alpha, layer.scaling, layer.lora_dropout):
        d.pop(name, None)


def merged_of(layer: nn.Module) -> Optional[str]:
    """The adapter merged in 16 bits into the layer's weight, or None."""
    if _is_peft(layer):
        if layer.merged:
            raise ValueError(
                f"PEFT's merge put adapters {layer.merged_adapters} into this layer's 4-bit codes, which qlora_ext "
                "cannot undo or save as a prepared model: unmerge them with PEFT first"
            )
        return getattr(layer, "merged_adapter", None)
    return layer.merged_adapter


def merged_weight_of(layer: nn.Module, name: str) -> torch.Tensor:
    """``deq(W) + s B A`` of adapter ``name``, in the base weight's original dtype."""
    return merged_weight(base_of(layer), *weights_of(layer, name), scaling_of(layer, name))


def merge16(layer: nn.Module, name: str) -> None:
    """Runs the layer on its 16-bit weight with adapter ``name`` folded in until ``unmerge16``."""
    weight = merged_weight_of(layer, name)
    if _is_peft(layer):
        layer.merge16(name, weight)
    else:
        layer.merge(name, weight)


def unmerge16(layer: nn.Module) -> None:
    """Back to the 4-bit base + adapter, exactly as before ``merge16``."""
    if _is_peft(layer):
        layer.unmerge16()
    else:
        layer.unmerge()


def _set_disabled(layer: nn.Module, value: bool) -> None:
    if _is_peft(layer):
        layer._disable_adapters = value  # not enable_adapters(False), which clears requires_grad
    else:
        layer.disable_adapters = value


@contextlib.contextmanager
def disabled(layers: Iterable[nn.Module]):
    """Within the block ``layers`` run their 4-bit bases alone; what requires grad is left as it is."""
    layers = list(layers)
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        _set_disabled(layer, True)
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            _set_disabled(layer, value)
