"""Whole models: ``prepare_model`` makes a model a QLoRA model, and this module gathers the public names
of the pieces around it (``qlora_ext.model.<name>`` as before the split):

- ``prepare_model(model, LoraConfig(...))`` (here) replaces the targeted linear layers (``nn.Linear``, its
  subclasses, transformers' ``Conv1D``) in place by LoRA layers on a 4-bit frozen base (PEFT's
  ``LoraLinear4bit``, else ``QLoRALinear``; see ``_lora_layers.layer_kind``), optionally the other
  linears by frozen ``Linear4bit``, freezes everything else, and can stream the weights from safetensors
  shards one layer at a time into a model built on the meta device.
- ``lora_config.py``: ``LoraConfig``, PEFT's ``adapter_config.json`` and ``peft.LoraConfig`` converted.
- ``adapters.py``: several adapters (``add_adapter``, ``set_adapter``, ``delete_adapter``,
  ``disable_adapters``) and ``qlora_layers``.
- ``serialization.py``: ``save_adapter`` / ``load_adapter`` (PEFT's files) and ``save_quantized`` /
  ``load_quantized`` (the quantized base in bitsandbytes' keys).
- ``merging.py``: ``merge_adapter`` / ``unmerge_adapter``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _lora_layers as lora_layers
from .adapters import (
    _parent,
    _refuse_adapter_names_in_forward,
    add_adapter,
    delete_adapter,
    disable_adapters,
    qlora_layers,
    set_adapter,
)
from .lora_config import LoraConfig, as_lora_config
from .merging import merge_adapter, unmerge_adapter
from .nn import _COMPUTE_DTYPES, Linear4bit, _dtype, check_adapter_name
from .serialization import (
    _FLOAT_DTYPES,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    QUANTIZED_WEIGHTS_NAME,
    load_adapter,
    load_quantized,
    save_adapter,
    save_quantized,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "QUANTIZED_WEIGHTS_NAME",
    "LoraConfig",
    "add_adapter",
    "as_lora_config",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "load_quantized",
    "merge_adapter",
    "prepare_model",
    "qlora_layers",
    "save_adapter",
    "save_quantized",
    "set_adapter",
    "unmerge_adapter",
]


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return getattr(model, "lm_head", None)


class _WeightSource:
    """Tensors by name from a state dict, a safetensors file, or a directory of safetensors shards,
    read one at a time (safe_open maps the file; nothing is loaded until asked for)."""

    def __init__(self, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]], prefix: str = ""):
        self.prefix = prefix
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        if isinstance(weights, Mapping):
            self._dict = weights
            return
        self._dict = None
        path = Path(weights)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise ValueError(f"weights must be a .safetensors file or a directory of them (no pickle), got {path}")
        from safetensors import safe_open

        for f in files:
            handle = safe_open(str(f), framework="pt")
            self._files[str(f)] = handle
            for key in handle.keys():
                self._where[key] = str(f)

    def __contains__(self, name: str) -> bool:
        key = self.prefix + name
        return key in self._dict if self._dict is not None else key in self._where

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Tensor `name`, checked against the dtype class and shape of the module's `like`."""
        key = self.prefix + name
        if self._dict is not None:
            if key not in self._dict:
                raise KeyError(f"the weights have no {key!r}")
            t = self._dict[key]
        else:
            if key not in self._where:
                raise KeyError(f"the weights have no {key!r}")
            t = self._files[self._where[key]].get_tensor(key)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{key} has shape {tuple(t.shape)}, the model needs {tuple(like.shape)}")
        if t.is_floating_point() != like.is_floating_point():
            raise TypeError(f"{key} is {t.dtype}, the model needs {like.dtype}")
        return t


def _progress(items: list, enabled: bool, desc: str):
    if not enabled or not items:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a bar is a nicety: without tqdm, a line a tenth of the way

        def plain():
            step = max(1, len(items) // 10)
            for i, item in enumerate(items):
                if i % step == 0:
                    print(f"{desc}: {i}/{len(items)}", flush=True)
                yield item
            print(f"{desc}: {len(items)}/{len(items)}", flush=True)

        return plain()
    return tqdm(items, desc=desc, unit="layer")


def _float_linear(name: str, module: nn.Module, source: Optional[_WeightSource], device) -> nn.Linear:
    """`module` (an nn.Linear, or transformers' Conv1D, whose weight is [in, out]) as an nn.Linear with real
    weights on `device`: its own, or read from `source` when it is on meta or `source` has them."""
    conv1d = not isinstance(module, nn.Linear)
    if source is not None and (module.weight.is_meta or f"{name}.weight" in source):
        dtype = module.weight.dtype
        weight = source.get(f"{name}.weight", module.weight).to(device=device, dtype=dtype)
        bias = None if module.bias is None else source.get(f"{name}.bias", module.bias).to(device=device, dtype=dtype)
    elif module.weight.is_meta:
        raise ValueError(f"{name} is on the meta device and no weights were given for it")
    elif not conv1d:
        return module if device is None else module.to(device)
    else:
        weight = module.weight.detach().to(device)
        bias = None if module.bias is None else module.bias.detach().to(device)
    if conv1d:
        weight = weight.t()  # [out, in], as the 4-bit layer (and transformers + bitsandbytes) store it
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _conv1d_class() -> Optional[type]:
    """transformers' Conv1D (GPT-2's linears), where transformers is imported: a model holds one only then."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _refuse_quantized_models(model: nn.Module) -> None:
    """A model quantized by bitsandbytes (found by class, without importing bitsandbytes) is refused with
    what to do instead; so is one whose linears hold other quantized weights."""
    for name, module in model.named_modules():
        bnb = [c.__name__ for c in type(module).__mro__ if c.__module__.split(".")[0] == "bitsandbytes"]
        if not any("Linear" in c for c in bnb):
            continue
        if "Linear4bit" in bnb:
            raise ValueError(
                f"the model is quantized by bitsandbytes already ({name} is bitsandbytes' {type(module).__name__}); "
                "prepare_model quantizes a 16-bit model. To run this model on qlora_ext's kernels as it is, call "
                "qlora_ext.patch_bitsandbytes() (then peft.get_peft_model as usual); or load it with "
                "quantization_config=qlora_ext.QLoraExtConfig(...) in place of BitsAndBytesConfig, or in 16 bits"
            )
        raise ValueError(
            f"the model is quantized by bitsandbytes already ({name} is bitsandbytes' {type(module).__name__}), "
            "which qlora_ext cannot run: load it in 16 bits for prepare_model, or with "
            "quantization_config=qlora_ext.QLoraExtConfig(...)"
        )


def _linear_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], dict[str, str], dict[str, str]]:
    """The layers prepare_model can quantize: nn.Linear and its subclasses (qlora_ext's Linear4bit, already
    4-bit, among them) and transformers' Conv1D. Then, by name with the reason, those "all-linear" leaves
    out: subclasses with their own forward (quantized when named in target_modules, as x @ W.T + b); and
    those that cannot be replaced at all (nn.MultiheadAttention's out_proj, whose weight it reads without
    calling it)."""
    conv1d = _conv1d_class()
    kinds = (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)
    linears, own_forward, fixed = [], {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if name and isinstance(_parent(model, name)[0], nn.MultiheadAttention):
            fixed[name] = "read by nn.MultiheadAttention, which never calls it"
            continue
        if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
            if not isinstance(module, Linear4bit):
                own_forward[name] = f"{type(module).__name__}, an nn.Linear with its own forward"
        linears.append((name, module))
    return linears, own_forward, fixed


def _check_float(name: str, module: nn.Module) -> None:
    if not isinstance(module, Linear4bit) and module.weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} ({type(module).__name__}) holds a {module.weight.dtype} weight (quantized already?): "
            "prepare_model quantizes float weights"
        )


def prepare_model(
    model: nn.Module,
    lora_config: Any,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    compute_dtype: Union[str, torch.dtype, None] = torch.bfloat16,
    quantize_others: bool = False,
    weights: Union[str, os.PathLike, Mapping[str, torch.Tensor], None] = None,
    weights_prefix: str = "",
    device: Union[str, torch.device, None] = None,
    adapter_name: str = "default",
    progress: bool = True,
) -> nn.Module:
    """Makes ``model`` a QLoRA model, in place, and returns it.

    ``lora_config`` is a ``LoraConfig`` or a ``peft.LoraConfig`` (converted by
    ``LoraConfig.from_peft_config``: a field these layers cannot honour is a ValueError naming it). A
    PEFT model (``get_peft_model``'s, or one with PEFT's LoRA layers) is refused, and so is
    ``adapter_names=`` in the prepared model's forward (PEFT's mixed batches: one adapter runs a batch).

    Each linear layer that ``lora_config`` targets becomes a LoRA layer on a ``Linear4bit`` (its weight
    quantized, adapters added): PEFT's ``LoraLinear4bit`` (the layer ``get_peft_model`` builds, running the
    fused op) where PEFT can take it, else qlora_ext's ``QLoRALinear`` with a FutureWarning; the two save
    the same files and train to the same bits. With ``quantize_others`` the remaining linears (the output
    head excepted) become frozen ``Linear4bit``. Linear layers are ``nn.Linear`` and its subclasses, and transformers'
    ``Conv1D`` (GPT-2's, whose ``[in, out]`` weight is quantized as ``[out, in]``). ``"all-linear"``
    leaves out, with a warning, subclasses with their own forward (named in ``target_modules`` they are
    quantized as ``x @ W.T + b``) and ``nn.MultiheadAttention``'s ``out_proj``. ``Linear4bit`` layers (a
    model loaded with ``QLoraExtConfig``) keep their 4-bit weight and format; a model quantized by
    bitsandbytes is refused (``qlora_ext.patch_bitsandbytes()`` runs it on qlora_ext's kernels as it is).
    Every parameter but the adapters' and those of ``modules_to_save`` is frozen.
    Gradient checkpointing gets inputs that require grad (``enable_input_require_grads`` of
    transformers' models, else a hook on the first embedding), so that checkpointed blocks have a
    gradient to pass back.

    ``weights`` (a safetensors file, a directory of shards, or a state dict; keys ``weights_prefix`` +
    the module names) fills a model built on the meta device: each layer is read, quantized and
    dropped in turn, so the 16-bit model is never whole in memory; the other parameters are loaded as
    they are. ``device`` is where quantized layers go (default: where each weight is).
    """
    check_adapter_name(adapter_name)
    lora_config = as_lora_config(lora_config, model)
    compute_dtype = _dtype(compute_dtype, "compute_dtype", _COMPUTE_DTYPES)  # a name too, as QLoraExtConfig
    _refuse_quantized_models(model)  # first: for bitsandbytes + PEFT, patch_bitsandbytes() is the answer
    if lora_layers.is_prepared(model):
        raise ValueError("the model is prepared already; add more adapters with add_adapter")
    _refuse_peft_models(model)
    source = _WeightSource(weights, weights_prefix) if weights is not None else None
    head = _output_head(model)
    linears, own_forward, fixed = _linear_layers(model)
    all_linear = lora_config.target_modules == "all-linear"
    named = [n for n in fixed if lora_config.matches(n) and not all_linear]
    if named:
        raise ValueError(f"target_modules names {named[0]} ({fixed[named[0]]}): it cannot be replaced by a 4-bit layer")
    targets = [(n, m) for n, m in linears if lora_config.matches(n) and not lora_config.saves(n)
               and not (all_linear and (m is head or n in own_forward))]  # fmt: skip
    target_names = {n for n, _ in targets}
    others = [(n, m) for n, m in linears if quantize_others and n not in target_names and m is not head
              and n not in own_forward and not lora_config.saves(n)]  # fmt: skip
    special = {**own_forward, **fixed}
    skipped = [n for n in special if n not in target_names and (all_linear or quantize_others)]
    left_out = "; ".join(f"{n} ({special[n]})" for n in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    if not targets:
        raise ValueError(
            f"target_modules {lora_config.target_modules!r} matches no linear layer of the model (nn.Linear and its "
            "subclasses, transformers' Conv1D)" + (f"; left out: {left_out}" if skipped else "")
        )
    if skipped:
        warnings.warn(
            f"prepare_model leaves {len(skipped)} linear layers as they are: {left_out}. Name a subclass in "
            "target_modules to quantize it as an nn.Linear (x @ W.T + b)",
            stacklevel=2,
        )
    for name, module in targets + others:
        _check_float(name, module)
    work = [(n, m, True) for n, m in targets] + [(n, m, False) for n, m in others]
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module, adapt in _progress(work, progress, "quantizing"):
            if isinstance(module, Linear4bit):  # loaded in 4 bits already (QLoraExtConfig): kept as it is
                if module.quant_state is None:
                    raise ValueError(f"{name} is a Linear4bit without a weight: load its 4-bit weight first")
                linear = base = module if device is None else module.to(device)
            else:
                linear = _float_linear(name, module, source, device)
                base = Linear4bit.from_linear(linear, quant_type, blocksize, compress_statistics, compute_dtype)
            new = lora_layers.new_layer(base, adapter_name, lora_config) if adapt else base
            new.train(module.training)  # a new module starts in training mode: take the one it replaces
            parent, child = _parent(model, name)
            setattr(parent, child, new)
            replaced.append((parent, child, module))
            del linear
        if source is not None:
            _load_rest(model, source, device)
    except BaseException:
        # A weight missing or broken halfway (or an interrupt) leaves the model's layers as they were,
        # so that prepare_model can be called again on it rather than on half a prepared model.
        for parent, child, module in reversed(replaced):
            setattr(parent, child, module)
        raise
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers.all_layers(model):  # (qlora_layers walks a model with qlora_config, set below)
        lora_layers.set_active(layer, adapter_name)
    for name, module in model.named_modules():
        if lora_config.saves(name):
            module.requires_grad_(True)
    _enable_input_grads(model)
    _refuse_adapter_names_in_forward(model)
    model.qlora_config = {adapter_name: lora_config}
    _record_for_transformers(model, quant_type, blocksize, compress_statistics, compute_dtype)
    return model


def _record_for_transformers(model: nn.Module, *fmt) -> None:
    """A transformers model gets a QLoraExtConfig in ``config.quantization_config`` that lists its prepared
    layers (``qlora_ext.hf_prepared.record_prepared``): ``save_pretrained`` and transformers' Trainer then write
    checkpoints that ``from_pretrained`` builds again, not 16-bit linears with random weights."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return
    try:
        from . import hf_prepared
    except ImportError:  # a transformers without the quantizer registry (qlora_ext warned at import)
        return
    hf_prepared.record_prepared(model, *fmt)


def _refuse_peft_models(model: nn.Module) -> None:
    """A PEFT model (a PeftModel, or PEFT's tuner layers in it) is refused: its lora_A / lora_B would be
    quantized and adapters nested in adapters."""
    peft = sys.modules.get("peft")  # PEFT's layers exist only where PEFT is imported
    if peft is None:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = (f"{n} is PEFT's {type(m).__name__}" for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    layer = next(tuners, None)
    if layer is None and not isinstance(model, peft.PeftModel):
        return
    raise ValueError(
        f"the model is a PEFT model already ({layer or type(model).__name__}); prepare_model would quantize PEFT's "
        "lora_A / lora_B and put adapters inside adapters. Either keep PEFT: load the model with "
        "quantization_config=qlora_ext.QLoraExtConfig(...) before peft.get_peft_model (its LoRA layers then run "
        "qlora_ext's fused op) and add adapters with peft_model.add_adapter; or pass prepare_model the model "
        "without PEFT's layers (peft_model.unload(), or merge_and_unload() to keep the trained adapter)"
    )


def _load_rest(model: nn.Module, source: _WeightSource, device=None) -> None:
    """Loads every parameter and buffer that `source` has (and must have those still on the meta
    device), onto `device` when given. A parameter a
    checkpoint leaves out because it is tied to another (an output head sharing the embedding) is
    tied again by the model's own ``tie_weights``."""
    tied_later = []
    for module_name, module in model.named_modules():
        if isinstance(module, Linear4bit) or lora_layers.is_lora_layer(module):
            continue
        for kind in ("_parameters", "_buffers"):
            for pname, t in list(getattr(module, kind).items()):
                if t is None:
                    continue
                full = f"{module_name}.{pname}" if module_name else pname
                if not t.is_meta and full not in source:
                    continue  # a real tensor the weights do not have: the model's own
                if full not in source:
                    if kind == "_buffers":
                        raise ValueError(
                            f"buffer {full} is on the meta device and not in the weights: build the model with "
                            "parameters only on meta (accelerate.init_empty_weights()), so that computed buffers "
                            "such as rotary frequencies are real"
                        )
                    tied_later.append(full)
                    continue
                target_device = device if device is not None else (None if t.is_meta else t.device)
                value = source.get(full, t).to(device=target_device, dtype=t.dtype)
                if kind == "_parameters":
                    getattr(module, kind)[pname] = nn.Parameter(value, requires_grad=t.requires_grad)
                else:
                    getattr(module, kind)[pname] = value
    if tied_later and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    still = [n for n in tied_later if model.get_parameter(n).is_meta]
    if still:
        raise KeyError(f"the weights have no {', '.join(repr(source.prefix + n) for n in still[:5])}")


def _enable_input_grads(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        try:
            enable()
            return
        except (NotImplementedError, AttributeError):
            pass
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
            return
