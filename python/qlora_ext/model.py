"""Whole models: prepare a model for QLoRA, and save, load, switch and merge adapters in PEFT's format.

- ``prepare_model(model, LoraConfig(...))`` replaces the targeted ``nn.Linear`` layers in place by
  ``QLoRALinear`` (4-bit frozen base + trainable adapters), optionally the other linears by frozen
  ``Linear4bit``, freezes everything else, and can stream the weights from safetensors shards one
  layer at a time into a model built on the meta device.
- ``save_adapter`` / ``load_adapter`` write and read PEFT's files (``adapter_config.json`` and
  ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``), so PEFT loads ours
  and we load PEFT's.
- ``save_quantized`` / ``load_quantized`` write and read the quantized base in bitsandbytes' keys, as
  transformers + bitsandbytes save a 4-bit model (safetensors only).
- ``merge_adapter`` folds an adapter into a 16-bit weight (optionally quantized again to 4 bits,
  with a warning that states the error it adds); ``unmerge_adapter`` undoes a 16-bit merge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import functional as F
from .nn import Linear4bit, QLoRALinear

__all__ = [
    "LoraConfig",
    "add_adapter",
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

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _named(name: str, names) -> bool:
    """PEFT's matching of a module by name: the full name, or a ``.name`` suffix of it."""
    return any(name == t or name.endswith("." + t) for t in names)


@dataclasses.dataclass
class LoraConfig:
    """Which layers get adapters and what the adapters are (PEFT's ``LoraConfig`` fields).

    Args:
        r, lora_alpha, lora_dropout, use_rslora: as in PEFT (scaling ``lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with rsLoRA).
        target_modules: a list of module names (a module matches when its full name is one of them
            or ends with ``"." + name``), a regex matched against the full name, or ``"all-linear"``
            (every ``nn.Linear`` but the output head).
        init: ``"kaiming"`` / True (B zero), ``"gaussian"`` (B zero), False (both random), as PEFT's
            ``init_lora_weights``.
        modules_to_save: modules (names as in target_modules' list form) kept trainable in full
            precision and saved with the adapter, such as a classification head.
        adapter_dtype: dtype of the adapters' parameters (float32, as PEFT keeps them).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str] = "all-linear"
    use_rslora: bool = False
    init: Union[str, bool] = "kaiming"
    modules_to_save: Optional[list[str]] = None
    adapter_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be non-empty names, got {self.target_modules!r}")
            self.target_modules = sorted(self.target_modules)
        elif isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise ValueError(f"target_modules is not a valid regex: {e}") from None
        else:
            raise TypeError(
                f"target_modules must be a list of names, a regex or 'all-linear', got {self.target_modules!r}"
            )
        if self.init not in ("kaiming", "gaussian", True, False):
            raise ValueError(f"init must be 'kaiming', 'gaussian', True or False, got {self.init!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def matches(self, name: str) -> bool:
        """Whether the module of full name ``name`` is a target (all-linear is decided by the caller)."""
        if isinstance(self.target_modules, str):
            return self.target_modules == "all-linear" or re.fullmatch(self.target_modules, name) is not None
        return _named(name, self.target_modules)

    def saves(self, name: str) -> bool:
        """Whether the module of full name ``name`` is one of ``modules_to_save``."""
        return _named(name, self.modules_to_save or [])

    def to_peft(self, base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
        """The ``adapter_config.json`` that PEFT (0.21) writes for these settings."""
        init = {"kaiming": True, True: True, "gaussian": "gaussian", False: False}[self.init]
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "init_lora_weights": init,
            "modules_to_save": self.modules_to_save,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
        }

    @classmethod
    def from_peft(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Reads a PEFT ``adapter_config.json``; refuses what these layers cannot do (DoRA, biases on the
        adapters, per-module ranks). ``fan_in_fan_out`` (True for GPT-2's Conv1D) only tells how the base
        weight is laid out, which the layer's type decides here: the adapters' shapes are the same."""
        if d.get("peft_type") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type must be 'LORA', got {d.get('peft_type')!r}")
        for key, allowed in (("use_dora", (False, None)), ("bias", ("none", None))):
            if d.get(key) not in allowed:
                raise ValueError(f"adapter_config.json: {key}={d.get(key)!r} is not supported (only {allowed[0]!r})")
        for key in ("rank_pattern", "alpha_pattern"):
            if d.get(key):
                raise ValueError(f"adapter_config.json: {key} is not supported")
        init = d.get("init_lora_weights", True)
        target = d.get("target_modules")
        if target is None:
            raise ValueError("adapter_config.json has no target_modules")
        return cls(
            r=int(d["r"]),
            lora_alpha=d.get("lora_alpha", 8),
            lora_dropout=float(d.get("lora_dropout", 0.0)),
            target_modules=list(target) if isinstance(target, (list, tuple)) else target,
            use_rslora=bool(d.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else bool(init) if init in (True, False) else True,
            modules_to_save=d.get("modules_to_save"),
        )

    @classmethod
    def from_peft_config(cls, config: Any, model_type: Optional[str] = None) -> "LoraConfig":
        """A ``peft.LoraConfig`` as this class: ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``
        (None: PEFT's default for ``model_type``), ``use_rslora``, ``modules_to_save`` (plus the heads that
        PEFT's ``task_type`` adds: ``classifier`` / ``score``, ``qa_outputs``), ``init_lora_weights`` (True,
        False, ``"gaussian"``), ``bias="none"`` and ``fan_in_fan_out`` (the layer's type decides the
        layout). Any other field set to a value that is not PEFT's default is a ValueError naming it."""
        peft = sys.modules.get("peft")
        if peft is None or not isinstance(config, peft.LoraConfig):
            raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")

        def refuse(field: str, why: str):
            raise ValueError(f"peft.LoraConfig({field}={getattr(config, field)!r}): {why}")

        default = peft.LoraConfig()
        for f in dataclasses.fields(config):
            if f.name in _PEFT_CONVERTED or f.name in _PEFT_IGNORED:
                continue
            value, base = getattr(config, f.name), getattr(default, f.name)
            if value != base and (value or base):
                refuse(f.name, "qlora_ext's layers do not support it (only PEFT's default)")
        if config.use_dora:
            refuse(
                "use_dora",
                "DoRA is not supported by qlora_ext's QLoRALinear; load the model with qlora_ext.QLoraExtConfig and "
                "use peft.get_peft_model, which runs DoRA on the 4-bit layers",
            )
        if config.bias != "none":
            refuse("bias", "only 'none' is supported (the adapters have no bias; the base layer's bias stays frozen)")
        if config.inference_mode:
            refuse(
                "inference_mode",
                "prepare_model builds a model to train; to run a trained adapter, prepare with inference_mode=False "
                "and load it with qlora_ext.load_adapter(model, dir) (is_trainable=False)",
            )
        if config.init_lora_weights not in (True, False, "gaussian"):
            refuse("init_lora_weights", "only True, False and 'gaussian' are supported on 4-bit layers")
        task = getattr(config.task_type, "value", config.task_type)
        if task not in _TASK_HEADS:
            refuse("task_type", f"one of {sorted(t for t in _TASK_HEADS if t)} or None is supported")
        target = config.target_modules
        if target is None:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

            if model_type not in defaults:
                refuse("target_modules", f"PEFT has no default target modules for model type {model_type!r}: name them")
            target = list(defaults[model_type])
        elif isinstance(target, str):
            target = "all-linear" if target.lower() == "all-linear" else target
        else:
            target = list(target)
        saved = list(config.modules_to_save) if config.modules_to_save is not None else None
        if _TASK_HEADS[task]:
            saved = (saved or []) + [h for h in _TASK_HEADS[task] if h not in (saved or [])]
        return cls(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=target,
            use_rslora=config.use_rslora,
            init="kaiming" if config.init_lora_weights is True else config.init_lora_weights,
            modules_to_save=saved,
        )


# peft.LoraConfig's fields: those from_peft_config converts or checks, and those that change nothing here
_PEFT_CONVERTED = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "modules_to_save",
                   "init_lora_weights", "fan_in_fan_out", "task_type", "use_dora", "inference_mode"}  # fmt: skip
_PEFT_IGNORED = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "runtime_config",
                 "megatron_core", "qalora_group_size"}  # fmt: skip
# PEFT's task types and the heads that its PeftModel for each adds to modules_to_save
_TASK_HEADS = {None: [], "CAUSAL_LM": [], "SEQ_2_SEQ_LM": [], "FEATURE_EXTRACTION": [], "QUESTION_ANS": ["qa_outputs"],
               "SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"]}  # fmt: skip


def as_lora_config(config: Any, model: Optional[nn.Module] = None) -> LoraConfig:
    """``config`` if it is a qlora_ext ``LoraConfig``; a ``peft.LoraConfig`` converted
    (``LoraConfig.from_peft_config``, PEFT's default targets by the model's type)."""
    if isinstance(config, LoraConfig):
        return config
    peft = sys.modules.get("peft")  # a peft.LoraConfig exists only where PEFT is imported
    if peft is not None and isinstance(config, peft.LoraConfig):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return LoraConfig.from_peft_config(config, model_type)
    raise TypeError(f"lora_config must be a qlora_ext.LoraConfig or a peft.LoraConfig, got {type(config).__name__}")


def _write_atomically(path: Path, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it into place: a crash mid-write
    leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return getattr(model, "lm_head", None)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def qlora_layers(model: nn.Module) -> Iterator[tuple[str, QLoRALinear]]:
    """The model's QLoRALinear layers with their names."""
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            yield name, module


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
    compute_dtype: Optional[torch.dtype] = torch.bfloat16,
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

    Each linear layer that ``lora_config`` targets becomes a ``QLoRALinear`` (its weight quantized,
    adapters added); with ``quantize_others`` the remaining linears (the output head excepted) become
    frozen ``Linear4bit``. Linear layers are ``nn.Linear`` and its subclasses, and transformers'
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
    lora_config = as_lora_config(lora_config, model)
    if any(True for _ in qlora_layers(model)):
        raise ValueError("the model is prepared already; add more adapters with add_adapter")
    _refuse_quantized_models(model)  # first: for bitsandbytes + PEFT, patch_bitsandbytes() is the answer
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
    for name, module, adapt in _progress(work, progress, "quantizing"):
        if isinstance(module, Linear4bit):  # loaded in 4 bits already (QLoraExtConfig): kept as it is
            if module.quant_state is None:
                raise ValueError(f"{name} is a Linear4bit without a weight: load its 4-bit weight first")
            linear = base = module if device is None else module.to(device)
        else:
            linear = _float_linear(name, module, source, device)
            base = Linear4bit.from_linear(linear, quant_type, blocksize, compress_statistics, compute_dtype)
        new = (
            QLoRALinear(base, lora_config.r, lora_config.lora_alpha, lora_config.lora_dropout, lora_config.use_rslora,
                        lora_config.init, lora_config.adapter_dtype, adapter_name)
            if adapt
            else base
        )  # fmt: skip
        new.train(module.training)  # a new module starts in training mode: take the one it replaces
        parent, child = _parent(model, name)
        setattr(parent, child, new)
        del linear
    if source is not None:
        _load_rest(model, source, device)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in qlora_layers(model):
        for p in layer.lora_A.parameters():
            p.requires_grad_(True)
        for p in layer.lora_B.parameters():
            p.requires_grad_(True)
    for name, module in model.named_modules():
        if lora_config.saves(name):
            module.requires_grad_(True)
    _enable_input_grads(model)
    _refuse_adapter_names_in_forward(model)
    model.qlora_config = {adapter_name: lora_config}
    return model


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


def _load_rest(model: nn.Module, source: _WeightSource, device=None) -> None:
    """Loads every parameter and buffer that `source` has (and must have those still on the meta
    device), onto `device` when given. A parameter a
    checkpoint leaves out because it is tied to another (an output head sharing the embedding) is
    tied again by the model's own ``tie_weights``."""
    tied_later = []
    for module_name, module in model.named_modules():
        if isinstance(module, (Linear4bit, QLoRALinear)):
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


# ---------------------------------------------------------------------------------------------
# Several adapters


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, "qlora_config", None)
    if not configs:
        raise ValueError("the model has no adapters: prepare it with qlora_ext.prepare_model first")
    return configs


def _refuse_if_merged(model: nn.Module, what: str) -> None:
    merged = [n for n, layer in qlora_layers(model) if layer.merged_adapter is not None]
    if merged:
        raise ValueError(f"{what}: {len(merged)} layers run a merged adapter ({merged[0]}, ...); unmerge_adapter first")


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


# ---------------------------------------------------------------------------------------------
# PEFT's files


def save_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    adapter_name: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's ``save_pretrained``
    does (each to a temporary file renamed into place, so a crash never leaves a half-written one):
    keys ``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``...lora_B.weight`` ([out, r]),
    plus the parameters of ``modules_to_save`` under ``base_model.model.<module>.<name>``. Default
    adapter: the active one of the first layer."""
    from safetensors.torch import save_file

    configs = _configs(model)
    if adapter_name is None:
        adapter_name = next((layer.active_adapter for _, layer in qlora_layers(model) if layer.active_adapter), None)
    if adapter_name not in configs:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(configs)}")
    config = configs[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in qlora_layers(model):
        if adapter_name in layer.lora_A:
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (
                layer.lora_A[adapter_name].weight.detach().contiguous().cpu()
            )
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (
                layer.lora_B[adapter_name].weight.detach().contiguous().cpu()
            )
    for name, module in model.named_modules():
        if config.saves(name):
            for pname, p in module.named_parameters():
                tensors[f"{_PEFT_PREFIX}{name}.{pname}"] = p.detach().contiguous().cpu()
    if not tensors:
        raise ValueError(f"adapter {adapter_name!r} has no layers")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / ADAPTER_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(config.to_peft(base_model_name_or_path), indent=2) + "\n"
    _write_atomically(directory / ADAPTER_CONFIG_NAME, lambda p: p.write_text(text))


def load_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
    set_active: bool = True,
) -> LoraConfig:
    """Loads an adapter saved by PEFT (or by ``save_adapter``) under ``adapter_name``.

    The model must be prepared (``prepare_model``) or hold ``Linear4bit`` layers where the adapter has
    weights (those become QLoRALinear). Reads safetensors only. Everything is checked before the
    model is touched: the config, every key (it must name a layer or parameter of the model), every
    tensor's float dtype and shape; a file that fails (truncated, corrupt, wrong shapes, missing or
    extra keys) raises an error naming it and leaves the model as it was. Tensors keep their dtype.
    Returns the adapter's config; with ``set_active`` the adapter becomes the active one.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    if not weights_path.exists():
        found = sorted(p.name for p in directory.glob("adapter_model.*")) if directory.is_dir() else []
        raise FileNotFoundError(f"no {weights_path}" + (f" (found {found}: only safetensors is read)" if found else ""))
    try:
        config = LoraConfig.from_peft(json.loads(config_path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {config_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not a valid adapter config ({type(e).__name__}: {e})") from None
    tensors = _read_safetensors(weights_path)
    configs = getattr(model, "qlora_config", None) or {}
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} exists already; delete it first or pick another name")
    _refuse_if_merged(model, "load_adapter")
    # Plan: every check first.
    layers: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{weights_path}: key {key!r} does not start with {_PEFT_PREFIX!r}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{weights_path}: {key} is {value.dtype}, not a float tensor")
        rest = key[len(_PEFT_PREFIX) :]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", rest)
        if m:
            layers.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            saved[rest] = value
    if not layers:
        raise ValueError(f"{weights_path}: no lora_A / lora_B weights")
    plan = []
    for name, pair in layers.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: {name} has {sorted(pair)} but needs lora_A and lora_B")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{weights_path}: the model has no module {name!r}") from None
        if not isinstance(module, (Linear4bit, QLoRALinear)):
            raise ValueError(
                f"{name} is a {type(module).__name__}: prepare the model (prepare_model) before loading an adapter"
            )
        if isinstance(module, QLoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"{name} has an adapter {adapter_name!r} already")
        A, B = pair["lora_A"], pair["lora_B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if (
            A.dim() != 2
            or B.dim() != 2
            or r < 1
            or A.shape[1] != module.in_features
            or tuple(B.shape) != (module.out_features, r)
        ):
            raise ValueError(
                f"{weights_path}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; the layer needs "
                f"[r, {module.in_features}] and [{module.out_features}, r]"
            )
        plan.append((name, module, A, B))
    targets = []
    for key, value in saved.items():
        module_name, _, pname = key.rpartition(".")
        try:
            target = model.get_submodule(module_name).get_parameter(pname)
        except AttributeError:
            raise ValueError(f"{weights_path}: the model has no parameter {key!r}") from None
        if target.shape != value.shape or target.dtype != value.dtype:
            raise ValueError(f"{weights_path}: {key} is {value.dtype} {tuple(value.shape)}, the model's "
                             f"{target.dtype} {tuple(target.shape)}")  # fmt: skip
        targets.append((target, value))
    # Apply.
    for name, module, A, B in plan:
        if isinstance(module, Linear4bit):
            module = QLoRALinear(module, A.shape[0], config.lora_alpha, config.lora_dropout, config.use_rslora, False,
                                 A.dtype, adapter_name).train(module.training)  # fmt: skip
            module.active_adapter = None
            parent, child = _parent(model, name)
            setattr(parent, child, module)
        else:
            module.add_adapter(
                adapter_name, A.shape[0], config.lora_alpha, config.lora_dropout, config.use_rslora, False, A.dtype
            )
        with torch.no_grad():
            module.lora_A[adapter_name].weight.copy_(A)
            module.lora_B[adapter_name].weight.copy_(B)
        for p in (*module.lora_A[adapter_name].parameters(), *module.lora_B[adapter_name].parameters()):
            p.requires_grad_(is_trainable)
    with torch.no_grad():
        for target, value in targets:  # modules_to_save: one copy a model, shared by its adapters
            target.copy_(value)
            target.requires_grad_(is_trainable)
    configs[adapter_name] = config
    model.qlora_config = configs
    _refuse_adapter_names_in_forward(model)
    if set_active:
        set_adapter(model, adapter_name)
        if not is_trainable:
            for _, layer in qlora_layers(model):
                for p in layer.parameters():
                    p.requires_grad_(False)
    return config


# ---------------------------------------------------------------------------------------------
# The quantized base in bitsandbytes' keys


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters and with ``base_layer.`` folded away: the keys a
    transformers + bitsandbytes 4-bit model has."""
    out = {}
    for key, value in model.state_dict().items():
        if re.search(r"\.lora_[AB]\.", key):
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


QUANTIZED_WEIGHTS_NAME = "model.safetensors"
_QUANT_STATE_KEY = ".quant_state.bitsandbytes__"


def _is_4bit_checkpoint(path: Path) -> bool:
    """Whether `path` is a safetensors file with bitsandbytes' 4-bit entries (reads its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return any(_QUANT_STATE_KEY in k for k in f.keys())
    except Exception:  # not safetensors, truncated, unreadable: something else
        return False


def _quantized_target(path: Union[str, os.PathLike]) -> Path:
    """The file save_quantized writes for `path`: `path` itself when it ends in .safetensors (and is not a
    directory), else `path`/model.safetensors, the directory made where missing. Refuses to replace anything
    but a 4-bit checkpoint, and a directory that holds other safetensors weights (two checkpoints in one
    directory: from_pretrained would read one of them)."""
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise ValueError(f"{path}: only safetensors is written (a .safetensors file or a directory), no pickle")
    if path.suffix == ".safetensors" and not path.is_dir():
        file = path
    elif path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is neither a directory nor a .safetensors file: not overwritten")
    else:
        path.mkdir(parents=True, exist_ok=True)
        file = path / QUANTIZED_WEIGHTS_NAME
        others = sorted(p.name for p in path.iterdir() if p.name != file.name and
                        (p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json")))  # fmt: skip
        if others:
            raise ValueError(
                f"{path} holds other weights ({', '.join(others[:3])}): a directory with two checkpoints loads one of "
                "them; save to another directory or remove them"
            )
    if file.is_dir():
        raise ValueError(f"{file} is a directory: not overwritten")
    if file.exists() and not _is_4bit_checkpoint(file):
        raise ValueError(
            f"{file} exists and is not a 4-bit checkpoint in bitsandbytes' keys (a 16-bit model's weights?): not "
            "overwritten; remove it or save elsewhere"
        )
    return file


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Writes the model's weights (4-bit layers in bitsandbytes' keys, adapters left out) to one
    safetensors file, as transformers + bitsandbytes save a 4-bit model, and returns its path.

    ``path``: a ``.safetensors`` file, or a directory (made where missing) that gets ``model.safetensors``
    (transformers' name). It replaces only an earlier 4-bit checkpoint (any other file there is an error,
    never overwritten) and is written to a temporary file renamed into place."""
    from safetensors.torch import save_file

    file = _quantized_target(path)
    # safetensors refuses tensors that share storage (tied embeddings): keep the first name of each,
    # found on the tensors as they are (a copy to the CPU would hide the sharing); load_quantized
    # knows the others from the model's own ties
    tensors, seen = {}, set()
    for k, t in _base_state_dict(model).items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        tensors[k] = t.detach().contiguous().cpu()
    _write_atomically(file, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return file


def _read_quantized(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a 4-bit checkpoint: a .safetensors file, or a directory with model.safetensors or
    transformers' shards (model.safetensors.index.json). Never pickle."""
    if not path.is_dir():
        if path.suffix != ".safetensors":
            raise ValueError(f"weights must be a .safetensors file or a directory of them (no pickle), got {path}")
        return _read_safetensors(path)
    if (path / QUANTIZED_WEIGHTS_NAME).exists():
        return _read_safetensors(path / QUANTIZED_WEIGHTS_NAME)
    index = path / f"{QUANTIZED_WEIGHTS_NAME}.index.json"
    if not index.exists():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise FileNotFoundError(
            f"no {path / QUANTIZED_WEIGHTS_NAME} nor {index.name}" + (f" (found {found}: no pickle)" if found else "")
        )
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid index ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise ValueError(f"{index}: {shard!r} is not a .safetensors file name in {path}")
        for key, value in _read_safetensors(path / shard).items():
            if key in out:
                raise ValueError(f"{index}: {key} is in two shards")
            out[key] = value
    missing = [k for k in weight_map if k not in out]
    if missing:
        raise ValueError(f"{index}: its shards lack {missing[:3]}")
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is a ValueError naming it."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"no {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_quantized(
    model: nn.Module, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]], strict: bool = True
) -> nn.Module:
    """Loads a 4-bit checkpoint in bitsandbytes' keys (saved by ``save_quantized``, or by transformers +
    bitsandbytes) into a model whose quantized layers are ``Linear4bit`` / ``QLoRALinear`` (built
    empty or prepared); adapters are left as they are.

    ``weights``: a state dict, a ``.safetensors`` file, or a directory holding ``model.safetensors`` or
    transformers' shards (``model.safetensors.index.json``); never pickle. Everything is checked before anything is
    loaded: each 4-bit weight's entries (``QuantState.from_dict``, the layer's shape, the byte count),
    every other tensor's dtype and shape against the model's, and with ``strict`` missing and
    unexpected keys. A checkpoint that fails raises ValueError / TypeError naming the key and leaves
    the model as it was."""
    if not isinstance(weights, Mapping):
        weights = _read_quantized(Path(weights))
    bases = [name for name, _ in qlora_layers(model)]
    own = {}
    for key, value in weights.items():
        head = next((b for b in bases if key.startswith(b + ".") and not key.startswith(b + ".base_layer.")), None)
        own[f"{head}.base_layer{key[len(head) :]}" if head is not None else key] = value
    current = model.state_dict()
    linear4 = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    checked, consumed, missing = {}, set(), []
    for name, layer in linear4.items():
        wkey = f"{name}.weight"
        entries = {k: v for k, v in own.items() if k.startswith(wkey + ".")}
        consumed |= set(entries) | {wkey}
        if wkey not in own:
            if entries:
                raise ValueError(f"{wkey}: the checkpoint has its 4-bit entries but not the weight")
            missing.append(wkey)
            continue
        try:
            checked[name] = (layer.check_weight(own[wkey], entries), own[wkey].dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{wkey}: {e}") from None
    others, unexpected = {}, []
    for key, value in own.items():
        if key in consumed:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(value).__name__}")
        ref = current.get(key)
        if ref is None:
            unexpected.append(key)
            continue
        if ref.dtype != value.dtype or ref.shape != value.shape:
            raise ValueError(
                f"{key} is {value.dtype} {tuple(value.shape)}, the model has {ref.dtype} {tuple(ref.shape)}"
            )
        others[key] = value
    # a key the checkpoint leaves out is not missing when its parameter is tied to one it has
    loaded = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in own}
    tied = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in loaded}
    missing += [k for k in current if k not in own and k not in consumed and k not in tied
                and not re.search(r"\.lora_[AB]\.", k)
                and not any(k.startswith(f"{n}.weight.") for n in linear4)]  # fmt: skip
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_quantized: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}; nothing was loaded"
        )
    for name, ((codes, state), storage) in checked.items():
        linear4[name].set_weight(codes, state, storage)
    model.load_state_dict(others, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# Merging


def merge_adapter(model: nn.Module, adapter_name: Optional[str] = None, requantize: bool = False) -> nn.Module:
    """Folds adapter ``adapter_name`` (default: each layer's active one) into its layer's weight.

    Without ``requantize`` each layer keeps its 4-bit base and adapters and gets a 16-bit weight
    ``W = deq(W_4bit) + s B A`` (in the base's dtype) that its forward uses; ``unmerge_adapter`` drops it.
    With ``requantize`` the merged weight is quantized again to the base's format and the layer becomes
    a ``Linear4bit`` (no unmerge): a warning states the relative error this adds,
    ``||q(W) - W|| / ||W||`` over all merged weights, measured here. Returns the model.
    """
    errors_num, errors_den = 0.0, 0.0
    if not requantize:
        _refuse_if_merged(model, "merge_adapter")
    for name, layer in list(qlora_layers(model)):
        adapter = adapter_name or layer.active_adapter
        if adapter is None or adapter not in layer.lora_A:
            continue
        merged = layer.merged_weight_for(adapter)
        if not requantize:
            layer.merge(adapter, merged)
            continue
        base = layer.base_layer
        state = base.quant_state
        packed, new_state = F.quantize_4bit(merged, state.blocksize, state.quant_type, state.nested)
        back = F.dequantize_4bit(packed, new_state).double()
        errors_num += (back - merged.double()).pow(2).sum().item()
        errors_den += merged.double().pow(2).sum().item()
        new = Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                         compute_dtype=base.compute_dtype, compress_statistics=state.nested,
                         quant_type=state.quant_type, blocksize=state.blocksize, quant_storage=base.quant_storage,
                         device="meta")  # fmt: skip
        new.weight = nn.Parameter(packed, requires_grad=False)
        new.quant_state = new_state
        new.bias = base.bias
        new.train(layer.training)
        parent, child = _parent(model, name)
        setattr(parent, child, new)
    if requantize and errors_den > 0:
        warnings.warn(
            f"merge_adapter(requantize=True): the merged weights were quantized again; that adds a relative error "
            f"of {math.sqrt(errors_num / errors_den):.4f} (||q(W) - W|| / ||W|| over all merged weights)",
            stacklevel=2,
        )
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undoes ``merge_adapter`` (without requantize): the layers run 4-bit base + adapter again, exactly
    as before the merge."""
    count = 0
    for _, layer in qlora_layers(model):
        if layer.merged_adapter is not None:
            layer.unmerge()
            count += 1
    if count == 0:
        raise ValueError("no layer is merged in 16 bits (a merge with requantize=True cannot be undone)")
    return model
