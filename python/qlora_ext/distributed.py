"""Training on several processes with PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``) and
DDP. See docs/distributed.md.

DDP needs nothing from qlora_ext: the adapters are the only parameters with gradients. For FSDP2,
``prepare_fsdp`` makes each 4-bit layer's block scales parameters (``Linear4bit.register_scales``),
so that ``fully_shard`` shards them with the packed codes instead of every rank keeping all of them;
``fully_shard_model`` does that and wraps each decoder layer and the root.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from torch import nn

from .nn import Linear4bit

__all__ = ["decoder_layers", "fully_shard_model", "prepare_fsdp"]


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


def fully_shard_model(model: nn.Module, layers: Optional[Iterable[nn.Module]] = None, **fsdp_kwargs: Any) -> nn.Module:
    """``prepare_fsdp(model)``, then ``fully_shard`` on each of ``layers`` (default: ``decoder_layers``)
    and on ``model``, with ``fsdp_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...).
    Needs an initialized process group; returns ``model``, now an ``FSDPModule``."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers must name at least one module to shard")
    prepare_fsdp(model)
    for layer in layers:
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model
