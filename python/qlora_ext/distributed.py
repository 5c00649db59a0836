"""Training on several processes with PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``) and
DDP. See docs/distributed.md.

DDP needs nothing from qlora_ext: the adapters are the only parameters with gradients. For FSDP2,
``prepare_fsdp`` makes each 4-bit layer's block scales parameters (``Linear4bit.register_scales``),
so that ``fully_shard`` shards them with the packed codes instead of every rank keeping all of them;
``fully_shard_model`` does that and wraps each decoder layer and the root.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .nn import Linear4bit, _is_dtensor
from .serialization import _adapter_tensors, _base_state_dict, _write_adapter, _write_quantized

__all__ = [
    "adapter_state_dict",
    "decoder_layers",
    "full_state_dict",
    "fully_shard_model",
    "gathered_adapter",
    "prepare_fsdp",
    "save_adapter",
    "save_quantized",
]


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def prepare_fsdp(model: nn.Module) -> int:
    """Registers the block scales of every ``Linear4bit`` of ``model`` as frozen parameters (see
    ``Linear4bit.register_scales``); returns how many layers it changed. Call it before ``fully_shard``.

    Works on either kind of prepared model (``prepare_model``, or ``from_pretrained`` with
    ``QLoraExtConfig`` + PEFT's ``get_peft_model``); the state dict keeps bitsandbytes' keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _is_sharded(model):
        raise ValueError("model is already wrapped by fully_shard: call prepare_fsdp before fully_shard")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("model has no qlora_ext Linear4bit layer: prepare or load it with qlora_ext first")
    changed = 0
    for layer in layers:
        if not layer.scales_registered:
            layer.register_scales()
            changed += 1
    return changed


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that transformers names as not to be split (``_no_split_modules``: the decoder
    layers), found through PEFT's wrapping."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    if not names:
        raise ValueError("model names no decoder layer class (_no_split_modules): pass the layers to fully_shard_model")
    return [m for m in model.modules() if type(m).__name__ in names]


# torch 2.11 and earlier: fully_shard makes each sharded parameter as nn.Parameter(shard), which requires
# grad, and only then sets the original's requires_grad (pytorch/pytorch#177844, fixed in 2.12); a uint8
# shard (the 4-bit codes and scales) cannot require grad, so that first step fails.
FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD = torch.torch_version.TorchVersion(torch.__version__) < (2, 12)
# one patch at a time: two threads restoring out of order would leave it in place for good
_PARAMETER_PATCH = threading.RLock()


@contextlib.contextmanager
def integer_parameters_without_grad():
    """Within the block, ``nn.Parameter(t)`` of an integer ``t`` does not require grad (instead of
    raising): the workaround for torch 2.11's ``fully_shard`` (``FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD``),
    which sets the right ``requires_grad`` itself right after. Only a call that would raise changes."""
    with _PARAMETER_PATCH:
        original = nn.Parameter.__dict__["__new__"]
        new = original.__func__ if isinstance(original, staticmethod) else original

        def integer_without_grad(cls, data=None, requires_grad=True):
            if requires_grad and data is not None and not (data.is_floating_point() or data.is_complex()):
                requires_grad = False
            return new(cls, data, requires_grad)

        nn.Parameter.__new__ = staticmethod(integer_without_grad)
        try:
            yield
        finally:
            nn.Parameter.__new__ = original


def _refuse_what_torch_2_11_breaks(fsdp_kwargs: dict) -> None:
    """What torch 2.11's fully_shard does to integer parameters past the workaround (both fixed in 2.12 by
    the change for pytorch/pytorch#177844): an integer reshard_after_forward makes new sharded
    parameters in every forward, and a mixed-precision param_dtype casts them (the codes) to floats."""
    after_forward = fsdp_kwargs.get("reshard_after_forward")
    if isinstance(after_forward, int) and not isinstance(after_forward, bool):
        raise ValueError(
            f"reshard_after_forward={after_forward} needs torch 2.12 or newer for 4-bit layers "
            f"(pytorch/pytorch#177844); this is torch {torch.__version__}: pass True or False"
        )
    mp_policy = fsdp_kwargs.get("mp_policy")
    if getattr(mp_policy, "param_dtype", None) is not None:
        raise ValueError(
            f"mp_policy with param_dtype={mp_policy.param_dtype} needs torch 2.12 or newer for 4-bit layers: torch "
            f"{torch.__version__} would cast their uint8 codes and scales to it (pytorch/pytorch#177844); load "
            "the model in that dtype instead"
        )


def _cpu_model_in_a_gloo_group(model: nn.Module) -> bool:
    """A model on the CPU sharded over gloo: fully_shard's default mesh is the machine's accelerator, and on
    a machine with a GPU it would move the model there, where gloo cannot run the collectives."""
    return {p.device.type for p in model.parameters()} == {"cpu"} and torch.distributed.get_backend() == "gloo"


def fully_shard_model(model: nn.Module, layers: Optional[Iterable[nn.Module]] = None, **fsdp_kwargs: Any) -> nn.Module:
    """``prepare_fsdp(model)``, then ``fully_shard`` on each of ``layers`` (default: ``decoder_layers``)
    and on ``model``, with ``fsdp_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...). A CPU
    model in a gloo group gets a CPU mesh by default (fully_shard's default, the machine's accelerator,
    would move it to a GPU where there is one). Needs an initialized process group; returns ``model``, now
    an ``FSDPModule``. On torch 2.11 and earlier, an integer ``reshard_after_forward`` and an ``mp_policy``
    with a ``param_dtype`` are refused (``_refuse_what_torch_2_11_breaks``)."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers must name at least one module to shard")
    if FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD:
        _refuse_what_torch_2_11_breaks(fsdp_kwargs)
    if fsdp_kwargs.get("mesh") is None and _cpu_model_in_a_gloo_group(model):
        from torch.distributed.device_mesh import init_device_mesh

        fsdp_kwargs["mesh"] = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    prepare_fsdp(model)
    workaround = (
        integer_parameters_without_grad() if FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD else contextlib.nullcontext()
    )
    with workaround:
        for layer in layers:
            fully_shard(layer, **fsdp_kwargs)
        fully_shard(model, **fsdp_kwargs)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: a DTensor is gathered (a collective: every rank calls it)."""
    t = t.detach()
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.cpu()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded entry gathered whole, on the CPU: for a prepared model,
    bitsandbytes' keys for the 4-bit layers (``weight``, ``weight.absmax``, ...) and PEFT's for the
    adapters. Every rank must call it (it gathers in the state dict's order); every rank gets it."""
    return {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters, and ``modules_to_save``) gathered whole, on the CPU, by
    name: what PEFT's ``save_pretrained(dir, state_dict=...)`` needs from a sharded PEFT model, without
    gathering the 4-bit base. Every rank must call it."""
    return {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}


def gathered_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """``save_adapter``'s config and tensors (PEFT's keys), each gathered whole on the CPU, on every
    rank. Every rank must call it."""
    config, tensors = _adapter_tensors(model, adapter_name)
    return config, {k: _full(v) for k, v in tensors.items()}


def save_adapter(
    model: nn.Module,
    directory: Union[str, os.PathLike],
    adapter_name: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
) -> None:
    """``qlora_ext.save_adapter`` for a model prepared by ``prepare_model`` and sharded (or replicated)
    over a process group: every rank must call it; the adapter is gathered and rank 0 writes PEFT's
    files, which load in one process (``qlora_ext.load_adapter``, PEFT's ``from_pretrained``)."""
    config, tensors = gathered_adapter(model, adapter_name)
    if _rank() == 0:
        _write_adapter(directory, config, tensors, base_model_name_or_path)
    _barrier()


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> Optional[Path]:
    """``qlora_ext.save_quantized`` for a model sharded over a process group: the 4-bit base in
    bitsandbytes' keys (adapters left out), gathered whole (on every rank: the whole base must fit
    each rank's CPU memory) and written by rank 0, which gets the file's path (the others None).
    Every rank must call it. ``qlora_ext.load_quantized`` loads it in any number of processes,
    before ``fully_shard``."""
    state = {k: _full(v) for k, v in _base_state_dict(model).items()}
    file = _write_quantized(path, state) if _rank() == 0 else None
    _barrier()
    return file


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the files are whole before any rank goes on to read them
