"""Files: adapters in PEFT's format (``save_adapter`` / ``load_adapter``: ``adapter_config.json`` and
``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``, so PEFT loads ours and we
load PEFT's) and the quantized base in bitsandbytes' keys (``save_quantized`` / ``load_quantized``, as
transformers + bitsandbytes save a 4-bit model). Safetensors only; every file is checked before the model
is touched, and written through a temporary file renamed into place."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import _lora_layers as lora_layers
from .adapters import _configs, _parent, _refuse_adapter_names_in_forward, _refuse_if_merged, qlora_layers, set_adapter
from .lora_config import LoraConfig
from .nn import Linear4bit, check_adapter_name

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "QUANTIZED_WEIGHTS_NAME",
    "load_adapter",
    "load_quantized",
    "save_adapter",
    "save_quantized",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
QUANTIZED_WEIGHTS_NAME = "model.safetensors"  # transformers' name, in a directory that save_quantized is given
_PEFT_PREFIX = "base_model.model."
_QUANT_STATE_KEY = ".quant_state.bitsandbytes__"  # in the keys of every 4-bit weight's entries
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it into place: a crash mid-write
    leaves the previous file whole."""
    _write_together([(Path(path), write)])


def _write_together(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Each write(tmp) into a temporary file beside its path, all of them before any is renamed into
    place: a crash mid-write leaves every previous file whole, never a new one beside an old one (an
    adapter's weights beside another adapter's config)."""
    tmps = [path.with_name(f".{path.name}.tmp-{os.getpid()}") for path, _ in files]
    try:
        for (_, write), tmp in zip(files, tmps):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is a ValueError naming it."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"no {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


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
    config, tensors = _adapter_tensors(model, adapter_name)
    _write_adapter(directory, config, tensors, base_model_name_or_path)


def _adapter_tensors(model: nn.Module, adapter_name: Optional[str]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """save_adapter's config and tensors (PEFT's keys), as the parameters are: DTensors where sharded."""
    configs = _configs(model)
    if adapter_name is None:
        adapter_name = next(filter(None, (lora_layers.active_of(layer) for _, layer in qlora_layers(model))), None)
    if adapter_name not in configs:
        raise ValueError(f"no adapter {adapter_name!r}; the model has {sorted(configs)}")
    config = configs[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in qlora_layers(model):
        if adapter_name in lora_layers.adapters_of(layer):
            A, B = lora_layers.weights_of(layer, adapter_name)
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().contiguous().cpu()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().contiguous().cpu()
    for name, module in model.named_modules():
        if config.saves(name):
            for pname, p in module.named_parameters():
                tensors[f"{_PEFT_PREFIX}{name}.{pname}"] = p.detach().contiguous().cpu()
    if not tensors:
        raise ValueError(f"adapter {adapter_name!r} has no layers")
    return config, tensors


def _write_adapter(
    directory: Union[str, os.PathLike],
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    base_model_name_or_path: Optional[str],
) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_peft(base_model_name_or_path), indent=2) + "\n"
    _write_together([
        (directory / ADAPTER_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})),
        (directory / ADAPTER_CONFIG_NAME, lambda p: p.write_text(text)),
    ])  # fmt: skip


def load_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
    set_active: bool = True,
) -> LoraConfig:
    """Loads an adapter saved by PEFT (or by ``save_adapter``) under ``adapter_name``.

    The model must be prepared (``prepare_model``) or hold ``Linear4bit`` layers where the adapter has
    weights (those become LoRA layers). Reads safetensors only. Everything is checked before the
    model is touched: the config, every key (it must name a layer or parameter of the model), every
    tensor's float dtype and shape; a file that fails (truncated, corrupt, wrong shapes, missing or
    extra keys) raises an error naming it and leaves the model as it was. Tensors keep their dtype.
    Returns the adapter's config. With ``set_active`` the adapter becomes the active one, as
    ``set_adapter`` makes it (PEFT's ``load_adapter`` leaves the active adapter as it was). The adapter
    is loaded frozen, for inference, unless ``is_trainable``; with ``set_active`` and not
    ``is_trainable`` nothing in the model's LoRA layers is then left trainable. The file's
    ``modules_to_save`` tensors replace the model's, which all its adapters share (PEFT keeps a copy
    an adapter). The adapter's recorded config takes the tensors' dtype, and a config whose ``r``
    disagrees with the tensors is refused.
    """
    check_adapter_name(adapter_name)
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
            pair = layers.setdefault(m.group(1), {})
            if m.group(2) in pair:  # lora_A.weight and lora_A.<name>.weight: which one is meant?
                raise ValueError(f"{weights_path}: {m.group(1)} has two {m.group(2)} tensors (key {key!r})")
            pair[m.group(2)] = value
        else:
            saved[rest] = value
    if not layers:
        raise ValueError(f"{weights_path}: no lora_A / lora_B weights")
    plan = []
    prepared = lora_layers.is_prepared(model)  # a PEFT model's own layers are PEFT's to load into
    for name, pair in layers.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: {name} has {sorted(pair)} but needs lora_A and lora_B")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{weights_path}: the model has no module {name!r}") from None
        if not (isinstance(module, Linear4bit) or (prepared and lora_layers.is_lora_layer(module))):
            raise ValueError(
                f"{name} is a {type(module).__name__}: prepare the model (prepare_model) before loading an adapter"
            )
        if lora_layers.is_lora_layer(module) and adapter_name in lora_layers.adapters_of(module):
            raise ValueError(f"{name} has an adapter {adapter_name!r} already")
        A, B = pair["lora_A"], pair["lora_B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if r != config.r:  # (per-module ranks are refused with the config): the tensors say otherwise
            raise ValueError(
                f"{weights_path}: {name}'s lora_A has rank {r} but {config_path.name} says r={config.r}: the "
                "files do not belong together"
            )
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
    # What the model records (and save_pretrained writes) is what was loaded: the tensors' dtype.
    dtypes = {t.dtype for pair in layers.values() for t in pair.values()}
    if len(dtypes) == 1:
        config = dataclasses.replace(config, adapter_dtype=dtypes.pop())
    # Apply.
    for name, module, A, B in plan:
        if isinstance(module, Linear4bit):
            module = lora_layers.new_layer(module, adapter_name, config, init=False, dtype=A.dtype).train(
                module.training
            )
            lora_layers.set_active(module, None)
            parent, child = _parent(model, name)
            setattr(parent, child, module)
        else:
            lora_layers.add(module, adapter_name, config, init=False, dtype=A.dtype)
        A_param, B_param = lora_layers.weights_of(module, adapter_name)
        with torch.no_grad():
            A_param.copy_(A)
            B_param.copy_(B)
        A_param.requires_grad_(is_trainable)
        B_param.requires_grad_(is_trainable)
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
                layer.requires_grad_(False)
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


def _4bit_checkpoint_keys(path: Path) -> Optional[set[str]]:
    """The keys of `path` when it is a safetensors file with bitsandbytes' 4-bit entries (its header
    only), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # not safetensors, truncated, unreadable: something else
        return None
    return keys if any(_QUANT_STATE_KEY in k for k in keys) else None


def _quantized_target(path: Union[str, os.PathLike], keys: set[str]) -> Path:
    """The file save_quantized writes for `path`: `path` itself when it ends in .safetensors (and is not a
    directory), else `path`/model.safetensors, the directory made where missing. Replaces only a 4-bit
    checkpoint whose tensors are all among `keys` (this model's earlier one): not another file, not a
    checkpoint that holds more (a prepared model's adapters, another model), and not in a directory that
    holds other safetensors weights (two checkpoints in one directory: from_pretrained would read one)."""
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
    if file.exists():
        existing = _4bit_checkpoint_keys(file)
        if existing is None:
            raise ValueError(
                f"{file} exists and is not a 4-bit checkpoint in bitsandbytes' keys (a 16-bit model's weights?): not "
                "overwritten; remove it or save elsewhere"
            )
        lost = sorted(existing - keys)
        if lost:
            raise ValueError(
                f"{file} holds {len(lost)} tensors this save would drop ({', '.join(lost[:3])}"
                f"{', ...' if len(lost) > 3 else ''}: adapters of a prepared model's save_pretrained, or another "
                "model's weights): not overwritten; remove it or save elsewhere"
            )
    return file


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Writes the model's weights (4-bit layers in bitsandbytes' keys, adapters left out) to one
    safetensors file, as transformers + bitsandbytes save a 4-bit model, and returns its path.

    ``path``: a ``.safetensors`` file, or a directory (made where missing) that gets ``model.safetensors``
    (transformers' name). It replaces only an earlier 4-bit checkpoint (any other file there is an error,
    never overwritten) and is written to a temporary file renamed into place."""
    return _write_quantized(path, _base_state_dict(model))


def _write_quantized(path: Union[str, os.PathLike], state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    file = _quantized_target(path, set(state_dict))
    # safetensors refuses tensors that share storage (tied embeddings): keep the first name of each,
    # found on the tensors as they are (a copy to the CPU would hide the sharing); load_quantized
    # knows the others from the model's own ties
    tensors, seen = {}, set()
    for k, t in state_dict.items():
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


def load_quantized(
    model: nn.Module, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]], strict: bool = True
) -> nn.Module:
    """Loads a 4-bit checkpoint in bitsandbytes' keys (saved by ``save_quantized``, or by transformers +
    bitsandbytes) into a model whose quantized layers are ``Linear4bit`` / LoRA layers (built
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
