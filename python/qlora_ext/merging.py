"""Merging: ``merge_adapter`` folds an adapter into a 16-bit weight (optionally quantized again to 4 bits,
with a warning that states the error it adds); ``unmerge_adapter`` undoes a 16-bit merge."""

from __future__ import annotations

import math
import warnings
from typing import Optional

from torch import nn

from . import _lora_layers as lora_layers, functional as F
from .adapters import _parent, _refuse_if_merged, qlora_layers
from .nn import Linear4bit

__all__ = ["merge_adapter", "unmerge_adapter"]


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
        adapter = adapter_name or lora_layers.active_of(layer)
        if adapter is None or adapter not in lora_layers.adapters_of(layer):
            continue
        if not requantize:
            lora_layers.merge16(layer, adapter)
            continue
        merged = lora_layers.merged_weight_of(layer, adapter)
        base = lora_layers.base_of(layer)
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
        if lora_layers.merged_of(layer) is not None:
            lora_layers.unmerge16(layer)
            count += 1
    if count == 0:
        raise ValueError("no layer is merged in 16 bits (a merge with requantize=True cannot be undone)")
    return model
