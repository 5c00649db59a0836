"""``patch_bitsandbytes()``: a model already loaded with bitsandbytes runs on qlora_ext's kernels.

The patch replaces the ``forward`` of two classes, as Liger-Kernel's ``apply_liger_kernel_to_*`` do,
so it reaches models loaded before and after it and changes nothing else: the weights, their format,
the parameters, the state dicts and every other method stay bitsandbytes' and PEFT's.

- ``bitsandbytes.nn.Linear4bit`` (with its subclasses ``LinearNF4`` / ``LinearFP4``): the product runs
  as ``functional.gemm_4bit`` on the layer's own packed bytes and its ``bitsandbytes`` QuantState,
  read in place (the same tensors: nothing converted, nothing cached, so ``.to(device)``, a new
  weight, FSDP's swaps of ``weight.data`` and ``quant_storage`` views are read as they are at each
  call). The rest of bitsandbytes' forward is kept as it is: its compute dtype (set from the first
  input when not given), its casts of the input and the bias, the output in the input's dtype.
- PEFT's ``peft.tuners.lora.bnb.Linear4bit`` (the LoRA layer ``get_peft_model`` puts on those
  layers): with one active adapter, plain LoRA (no DoRA or other variant, no ``lora_bias``), not
  merged, adapters enabled, no extra forward arguments (``adapter_names``) and no hooks on its
  pieces, the whole layer runs as the one autograd op ``functional.lora_linear``; otherwise PEFT's
  own forward runs (its base layer then on the patched forward above).

A layer whose weight bitsandbytes has repacked for its CPU kernel (its Linear4bit does that on the
first forward in eval mode without gradients on a CPU with AVX512-BF16, before the patch) keeps
bitsandbytes' forward: that layout is not the format. A patched layer never repacks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import functional as F

__all__ = ["patch_bitsandbytes", "unpatch_bitsandbytes"]

_NO_TORCH_FUNCTION = torch._C.DisableTorchFunctionSubclass
_MISSING = object()
# class -> the forward it had before the patch (_MISSING where it inherited one)
_ORIGINAL: dict[type, Any] = {}
_orig_linear4bit_forward: Optional[Callable] = None
_orig_lora_forward: Optional[Callable] = None
_fix_quant_state: Optional[Callable] = None  # bitsandbytes' fix_4bit_weight_quant_state_from_module


def _import_bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.nn.modules as modules
    except ImportError as e:
        raise ImportError(
            f"qlora_ext.patch_bitsandbytes needs bitsandbytes, which could not be imported: {e} "
            "(pip install bitsandbytes)"
        ) from e
    return bitsandbytes, modules


def _import_peft_layer():
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError as e:
        raise ImportError(
            f"qlora_ext.patch_bitsandbytes(peft=True) needs PEFT, which could not be imported: {e} (pip install peft)"
        ) from e
    cls = getattr(peft_bnb, "Linear4bit", None)
    if cls is None:  # PEFT defines it only where it finds bitsandbytes' 4-bit support
        raise ImportError("PEFT has no 4-bit bitsandbytes LoRA layer (peft.tuners.lora.bnb.Linear4bit) here")
    return cls


def patch_bitsandbytes(peft: Optional[bool] = None) -> tuple[type, ...]:
    """Makes bitsandbytes' 4-bit layers, and PEFT's LoRA layers on them, run on qlora_ext's kernels.

    Call it before or after the model is loaded; calling it again changes nothing. ``peft``: None
    patches PEFT's layer where PEFT is installed, True requires it, False leaves it alone. Raises
    ImportError naming bitsandbytes (or PEFT, with ``peft=True``) where it is not installed.
    ``unpatch_bitsandbytes()`` restores the original forwards.

    Returns the classes that are patched now.
    """
    global _orig_linear4bit_forward, _orig_lora_forward, _fix_quant_state
    bnb, modules = _import_bitsandbytes()
    targets: list[tuple[type, Callable]] = [(bnb.nn.Linear4bit, _linear4bit_forward)]
    if peft is not False:
        try:
            targets.append((_import_peft_layer(), _lora_forward))
        except ImportError:
            if peft:
                raise
    _fix_quant_state = modules.fix_4bit_weight_quant_state_from_module
    for cls, forward in targets:
        if cls in _ORIGINAL:
            continue
        original = cls.__dict__.get("forward", _MISSING)
        _ORIGINAL[cls] = original
        inherited = cls.forward if original is _MISSING else original
        if forward is _linear4bit_forward:
            _orig_linear4bit_forward = inherited
        else:
            _orig_lora_forward = inherited
        cls.forward = forward
    return tuple(_ORIGINAL)


def unpatch_bitsandbytes() -> bool:
    """Restores the forwards that ``patch_bitsandbytes`` replaced; returns whether any was patched."""
    was_patched = bool(_ORIGINAL)
    for cls, original in list(_ORIGINAL.items()):
        if original is _MISSING:
            del cls.forward
        else:
            cls.forward = original
        del _ORIGINAL[cls]
    return was_patched


# ---------------------------------------------------------------------------------------------
# The forwards


def _weight_and_state(layer: nn.Module):
    """The layer's packed weight (the parameter) and its bitsandbytes QuantState, or (weight, None)."""
    w = layer._parameters.get("weight")
    qs = getattr(w, "quant_state", None)
    if qs is None and w is not None:
        # bitsandbytes' own recovery, as its forward does: FSDP can replace the parameter by a plain one
        _fix_quant_state(layer)
        w = layer._parameters.get("weight")
        qs = getattr(w, "quant_state", None)
    return w, qs


def _runs_here(qs, x: torch.Tensor) -> bool:
    """Whether the fused product can take this state and input: the standard layout (not repacked
    for bitsandbytes' CPU kernel) and x's last dimension the weight's in_features (bitsandbytes also
    takes a weight quantized as [in, out], with a deprecation warning; that one keeps its path)."""
    d = qs.__dict__
    if d.get("packing_format_for_cpu"):
        return False
    shape = d.get("shape")
    return shape is not None and len(shape) == 2 and x.shape[-1] == shape[1]


def _packed(w: torch.Tensor) -> torch.Tensor:
    # A plain tensor on the parameter's bytes: Params4bit defines __torch_function__, which would cost
    # a Python round trip on every use of it (about 2 us each).
    with _NO_TORCH_FUNCTION():
        return w.detach()


def _inputs(layer: nn.Module, x: torch.Tensor):
    """bitsandbytes' Linear4bit.forward up to its product, line for line: the compute dtype (set from
    the first input where the layer has none), x and the bias cast to it (the bias parameter itself
    converted to x's dtype, as bitsandbytes does); then autocast's dtype where autocast is on, which
    bitsandbytes' dequantize-and-matmul gets from torch and qlora_ext's ops (no autocast kernels) do
    not. Returns (x, bias, the output dtype)."""
    if not layer.compute_type_is_set:
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    inp_dtype = x.dtype
    compute_dtype = layer.compute_dtype
    # (the dtype compared first: a .to() that changes nothing still costs a dispatch)
    if compute_dtype is not None and inp_dtype != compute_dtype:
        x = x.to(compute_dtype)
    bias = layer._parameters.get("bias")
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        if compute_dtype is not None and bias.dtype != compute_dtype:
            bias = bias.to(compute_dtype)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return x, bias, inp_dtype


def _output(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)


def _linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    w, qs = _weight_and_state(self)
    if qs is None or not _runs_here(qs, x):
        return _orig_linear4bit_forward(self, x)
    x_c, bias, inp_dtype = _inputs(self, x)
    return _output(F.gemm_4bit(x_c, _packed(w), qs, bias), inp_dtype)


_linear4bit_forward.__doc__ = "qlora_ext's patched bitsandbytes Linear4bit.forward (see qlora_ext.patch_bitsandbytes)."


def _plain(m: nn.Module) -> bool:
    """No hooks and no forward of its own: calling the module is calling its class's forward."""
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return False
    return "forward" not in m.__dict__


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    fused = _fused_args(self, x) if not (args or kwargs) else None
    if fused is None:
        return _orig_lora_forward(self, x, *args, **kwargs)
    base, w, qs, lora_A, lora_B, scaling, p = fused
    x_c, bias, inp_dtype = _inputs(base, x)
    return _output(F.lora_linear(x_c, _packed(w), qs, lora_A, lora_B, scaling, p, bias), inp_dtype)


_lora_forward.__doc__ = "qlora_ext's patched PEFT lora.bnb.Linear4bit.forward (see qlora_ext.patch_bitsandbytes)."


def _fused_args(layer, x: torch.Tensor):
    """What the fused op needs, or None where PEFT's forward must run: several adapters, a variant
    (DoRA, aLoRA, ...), a bias on lora_B, a merged or disabled adapter, a base that is not a patched
    bitsandbytes Linear4bit, a dropout that is not nn.Dropout / nn.Identity, or hooks on a piece whose
    call the fused op would skip."""
    if layer._disable_adapters or layer.merged_adapters or _module._global_forward_hooks:
        return None
    if _module._global_forward_pre_hooks or _module._global_backward_hooks:
        return None
    mods = layer._modules
    lora_As = mods["lora_A"]._modules
    active = layer._active_adapter
    if isinstance(active, str):
        name = active if active in lora_As else None
    else:
        names = [a for a in active if a in lora_As]
        name = names[0] if len(names) == 1 else None
    if name is None or name in layer.lora_variant or layer.lora_bias.get(name):
        return None
    base = mods["base_layer"]
    if type(base).forward is not _linear4bit_forward or not _plain(base):
        return None
    lora_A, lora_B, dropout = lora_As[name], mods["lora_B"]._modules[name], mods["lora_dropout"]._modules[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_B.bias is not None:
        return None
    if not (_plain(lora_A) and _plain(lora_B) and _plain(dropout)):
        return None
    if type(dropout) is nn.Identity:
        p = 0.0
    elif type(dropout) is nn.Dropout and dropout.p < 1:
        p = dropout.p if dropout.training else 0.0
    else:
        return None
    w, qs = _weight_and_state(base)
    if qs is None or not _runs_here(qs, x):
        return None
    return base, w, qs, lora_A.weight, lora_B.weight, layer.scaling[name], p
