"""``LoraConfig``: which layers get adapters and what the adapters are (PEFT's ``LoraConfig`` fields), read
from and written to PEFT's ``adapter_config.json``, and converted from a ``peft.LoraConfig``
(``LoraConfig.from_peft_config``; a field these layers cannot honour is a ValueError naming it)."""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from .nn import check_adapter_settings

__all__ = ["LoraConfig", "as_lora_config"]


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
            precision and saved with the adapter, such as a classification head (a string is one name).
        adapter_dtype: dtype of the adapters' parameters (float32, as PEFT keeps them).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str] = "all-linear"
    use_rslora: bool = False
    init: Union[str, bool] = "kaiming"
    modules_to_save: Union[list[str], str, None] = None
    adapter_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_adapter_settings(self.r, self.lora_alpha, self.lora_dropout, self.init, self.adapter_dtype)
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
        if isinstance(self.modules_to_save, str):  # one name, not its characters
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple, set)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
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
