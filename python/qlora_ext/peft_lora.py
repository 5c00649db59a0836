"""PEFT's LoRA on ``qlora_ext.nn.Linear4bit``: ``LoraLinear4bit``, a PEFT ``LoraLayer`` (as PEFT's own
bitsandbytes ``Linear4bit`` LoRA layer is) whose forward and backward are qlora_ext's fused ``lora_linear``
op in the common case, and PEFT's own composition otherwise.

``install()`` (called by ``qlora_ext.hf.register_peft()``) hooks PEFT's LoRA dispatch: whenever PEFT
creates a LoRA layer for a ``Linear4bit``, the ``LoraConfig`` in use gets the mapping
``{Linear4bit: LoraLinear4bit}`` through ``LoraConfig._register_custom_module``, PEFT's extension point
for layer types it does not know, whose dispatcher PEFT tries first. Registering on the config at that
moment (rather than asking users to do it) covers every config: those made before qlora_ext was
imported, those ``PeftModel.from_pretrained`` reads from ``adapter_config.json`` (which does not save
the mapping), and those TRL's trainers pass to ``get_peft_model``.

This module needs PEFT.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora import layer as _lora_layer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import functional as F
from .nn import Linear4bit, _in_compute_dtype, _output, merged_forward

__all__ = ["LoraLinear4bit", "install"]

# init_lora_weights that need the base weight as a float matrix (PiSSA, OLoRA, LoftQ, ...): refused, as
# the base here is packed 4-bit codes
_INITS = (True, False, "gaussian")


@contextlib.contextmanager
def _float_weight(base: Linear4bit):
    """Within the block ``base.weight`` is the dequantized float weight ``[out, in]``: what PEFT's DoRA
    code reads through ``dequantize_module_weight`` (which knows bitsandbytes', HQQ's and torchao's
    layers, not ours). The packed codes come back afterwards."""
    packed = base._parameters["weight"]
    shown = nn.Parameter(base.dequantize(), requires_grad=False)
    base._parameters["weight"] = shown
    try:
        yield
    finally:
        if base._parameters["weight"] is shown:  # else a merge inside the block put new codes: keep them
            base._parameters["weight"] = packed


class _DoraVariant(DoraLinearVariant):
    """PEFT's DoRA on a 4-bit base: PEFT's own code, run while the base shows its dequantized weight."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        with _float_weight(module.get_base_layer()):
            DoraLinearVariant.init(module, adapter_name, **kwargs)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        with _float_weight(module.get_base_layer()):
            return DoraLinearVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        with _float_weight(module.get_base_layer()):
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)


class LoraLinear4bit(nn.Module, LoraLayer):
    """PEFT's LoRA layer on a ``qlora_ext.nn.Linear4bit`` base (``base_layer``), with PEFT's adapters
    (``lora_A[name]``, ``lora_B[name]``, ``lora_dropout[name]``, ``scaling[name]``) and PEFT's state dict.

    The forward is one call of qlora_ext's fused op ``torch.ops.qlora.lora_linear`` (base product, bias,
    dropout and adapter, one autograd node whose backward keeps only x, the down-projection and a
    dropout seed) when exactly one adapter of this layer is active and it is plain LoRA: not merged, no
    ``adapter_names`` in the call, no DoRA, no ``lora_bias``. Then the products run in the base's compute
    dtype (autocast's under autocast) with fp32 accumulation, and the dropout mask is the op's own
    (Philox, regenerated in the backward) rather than ``nn.Dropout``'s. Anything else runs PEFT's own
    composition (``peft.tuners.lora.layer.Linear.forward``): base output plus each active adapter, a
    mixed-adapter batch, DoRA (through PEFT's DoRA code, shown the dequantized weight).

    Merging follows PEFT's bitsandbytes layer: the weight is dequantized, the adapter added, and the
    result quantized again in the base's format (so unmerging is not exact either), with PEFT's warning.
    ``merge16`` / ``unmerge16`` are qlora_ext's merge (``qlora_ext.merge_adapter``): the layer runs on a
    16-bit weight with the adapter folded in, its codes and adapters untouched, until an exact unmerge.
    """

    merged_adapter: Optional[str] = None  # the adapter of a 16-bit merge (merge16), or None

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.register_buffer("merged_weight", None, persistent=False)  # merge16's weight
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if config.init_lora_weights not in _INITS:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} needs the base weight in 16 bits; on qlora_ext's "
                f"4-bit layers use one of {list(_INITS)}"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        if config.use_dora and not getattr(config, "alora_invocation_tokens", None):
            return _DoraVariant()
        # plain LoRA: None; any other variant: PEFT's "Invalid or unsupported variant combination" error
        return super().resolve_lora_variant(config=config, **kwargs)

    # -----------------------------------------------------------------------------------------
    # forward

    def _plain_modules(self, name: str) -> Optional[tuple[nn.Module, nn.Module, nn.Module]]:
        """Adapter ``name``'s ``lora_A``, ``lora_B`` and dropout modules where it is plain LoRA as the fused
        ops compute it (no variant, no bias, ``nn.Linear`` adapters, ``nn.Dropout`` or ``nn.Identity``), else
        None. It reads the module dicts directly, not through ``nn.Module.__getattr__``: it runs in every
        forward, and in decode the host's Python per layer bounds the step."""
        if name in self.lora_variant or self.lora_bias.get(name, False):
            return None
        modules = self._modules
        A, B = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
        dropout = modules["lora_dropout"]._modules[name]
        if type(A) is not nn.Linear or type(B) is not nn.Linear:
            return None
        if A._parameters["bias"] is not None or B._parameters["bias"] is not None:
            return None
        return (A, B, dropout) if type(dropout) in (nn.Identity, nn.Dropout) else None

    def _fused_adapter(self, args: tuple, kwargs: dict) -> Optional[tuple[str, tuple[nn.Module, nn.Module, nn.Module]]]:
        """The adapter that the fused op computes this call with and its modules, or None where PEFT's
        composition must."""
        if args or any(v is not None for v in kwargs.values()):
            return None  # adapter_names (a mixed batch), aLoRA offsets, anything the base must see
        if self._disable_adapters or self.merged_adapters:
            return None
        active = self._active_adapter
        present = self._modules["lora_A"]._modules
        names = [n for n in ([active] if isinstance(active, str) else active) if n in present]
        if len(names) != 1:
            return None
        modules = self._plain_modules(names[0])
        if modules is None or (type(modules[2]) is nn.Dropout and modules[2].p >= 1):
            return None
        return names[0], modules

    def _fused_mixed_batch(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """A mixed-adapter batch (``adapter_names``) in one call of ``lora_linear_indexed``, or None where
        PEFT's loop over the adapters must run: anything to differentiate, dropout in training mode,
        a merged or disabled layer, an adapter of the batch that is not plain LoRA."""
        names = kwargs.get("adapter_names")
        if args or names is None or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
            return None
        if self.disable_adapters or self.merged or len(names) != len(x):
            return None  # (PEFT's own checks raise for a length mismatch and merged adapters)
        used = sorted({n for n in names if n in self.lora_A})
        if not used or not all(self._plain_modules(n) is not None for n in used):
            return None
        if any(self.lora_dropout[n].training and getattr(self.lora_dropout[n], "p", 0) > 0 for n in used):
            return None
        base = self.get_base_layer()
        xc, bias = _in_compute_dtype(x, base)
        tensors = [xc, *(self.lora_A[n].weight for n in used), *(self.lora_B[n].weight for n in used)]
        tensors += [bias] if bias is not None else []
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        A, B, scaling, slot = self._stacked(used, xc.dtype)
        index = self._row_index(names, slot, xc)
        out = F.lora_linear_indexed(xc, base.weight, base._state(), A, B, scaling, index, bias)
        return _output(out, x)

    def _stacked(self, used: list[str], dtype: torch.dtype):
        """The adapters' A and B stacked in the compute dtype (``[adapters, r, in]``, ``[adapters, out, r]``,
        r the largest rank rounded up to 8, smaller ones zero-padded), their scalings and each name's
        slot. Made each call: a kept copy could miss a change of an adapter's values made through
        ``.data`` (as PEFT's hotswap makes it), which no version counter sees."""
        As = [self.lora_A[n].weight for n in used]
        Bs = [self.lora_B[n].weight for n in used]
        r = -(-max(a.shape[0] for a in As) // 8) * 8
        if all(a.shape[0] == r for a in As):
            A, B = torch.stack(As).to(dtype), torch.stack(Bs).to(dtype)
        else:
            A = As[0].new_zeros((len(As), r, As[0].shape[1]), dtype=dtype)
            B = Bs[0].new_zeros((len(Bs), Bs[0].shape[0], r), dtype=dtype)
            for i, (a, b) in enumerate(zip(As, Bs)):
                A[i, : a.shape[0]] = a
                B[i, :, : b.shape[1]] = b
        return A, B, [float(self.scaling[n]) for n in used], {n: i for i, n in enumerate(used)}

    def _row_index(self, names, slot: dict, x: torch.Tensor) -> torch.Tensor:
        """Each row's adapter slot (-1: ``__base__`` or an adapter this layer lacks), an entry a row of x
        (each sample's name repeated over its tokens); kept for the next call with the same names and
        shape (each step of ``generate``)."""
        key = (tuple(names), tuple(slot.items()), tuple(x.shape[:-1]), x.device)
        cached = getattr(self, "_qlora_row_index", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        per_sample = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64)
        index = per_sample.repeat_interleave(math.prod(x.shape[1:-1])).to(x.device)
        self._qlora_row_index = (key, index)
        return index

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged_adapter is not None and not self.disable_adapters:
            if args or any(v is not None for v in kwargs.values()):
                raise ValueError(f"adapter {self.merged_adapter!r} is merged into this layer (merge16): a forward "
                                 f"takes x alone, got {sorted(kwargs) or len(args)} more; unmerge first")  # fmt: skip
            return merged_forward(x, self._modules["base_layer"], self.merged_weight)
        if "adapter_names" in kwargs:
            self._check_forward_args(x, *args, **kwargs)
            out = self._fused_mixed_batch(x, args, kwargs)
            if out is not None:
                return out
        fused = self._fused_adapter(args, kwargs)
        if fused is None:
            return _lora_layer.Linear.forward(self, x, *args, **kwargs)
        name, (A, B, dropout) = fused
        self._check_forward_args(x, *args, **kwargs)
        base = self._modules["base_layer"]  # a Linear4bit, never another tuner layer: no get_base_layer() walk
        p = dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0
        xc, bias = _in_compute_dtype(x, base)
        out = F.lora_linear(xc, base.weight, base._state(), A.weight, B.weight, self.scaling[name], p, bias)
        return _output(out, x)

    # -----------------------------------------------------------------------------------------
    # qlora_ext's 16-bit merge

    def _refuse_if_merged16(self, what: str) -> None:
        if self.merged_adapter is not None:
            raise ValueError(
                f"{what}: adapter {self.merged_adapter!r} is merged into this layer (merge16); unmerge first"
            )

    def merge16(self, adapter_name: str, weight: torch.Tensor) -> None:
        """Runs on ``weight`` (``deq(W) + s B A`` of ``adapter_name``, in the base's dtype) until
        ``unmerge16``; the 4-bit codes and the adapters stay as they are."""
        self._refuse_if_merged16("merge16")
        if self.merged:
            raise ValueError(f"adapters {self.merged_adapters} are merged into the 4-bit codes (PEFT's merge)")
        self.merged_weight = weight
        self.merged_adapter = adapter_name

    def unmerge16(self) -> None:
        """Back to the 4-bit base + adapter, exactly as before ``merge16``."""
        if self.merged_adapter is None:
            raise ValueError("no adapter is merged")
        self.merged_weight = None
        self.merged_adapter = None

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        self._refuse_if_merged16("set_adapter")
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    # -----------------------------------------------------------------------------------------
    # merging (as PEFT's bitsandbytes Linear4bit layer: dequantize, add, quantize again)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def _requantize(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        state = base._state()
        # in the base's own dtype: the layer dequantizes to what it did before the merge
        packed, new_state = F.quantize_4bit(weight.to(state.dtype), state.blocksize, state.quant_type, state.nested)
        base.set_weight(packed, new_state, base.quant_storage)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._refuse_if_merged16("merge")
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            # PEFT's bitsandbytes layer's words
            warnings.warn(
                "Merge lora module to 4-bit linear may get different generations due to rounding errors.", stacklevel=2
            )
            base = self.get_base_layer()
            weight = base.dequantize()
            if name not in self.lora_variant:
                merged = weight.float() + self.get_delta_weight(name).float()
            else:
                merged = self.lora_variant[name].merge_safe(self, name, weight)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._requantize(merged)
            if self.lora_bias[name]:
                bias = base.bias.data + self.lora_B[name].bias.to(base.bias.dtype)
                if safe_merge and not torch.isfinite(bias).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.bias.data = bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            warnings.warn(
                "Unmerge lora module to 4-bit linear may get different generations due to rounding errors.",
                stacklevel=2,
            )
            base = self.get_base_layer()
            weight = base.dequantize()
            if name not in self.lora_variant:
                unmerged = weight.float() - self.get_delta_weight(name).float()
            else:
                unmerged = self.lora_variant[name].unmerge(self, name, weight)
            self._requantize(unmerged)
            if self.lora_bias[name]:
                base.bias.data -= self.lora_B[name].bias.to(base.bias.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _dispatch_target(target: nn.Module) -> nn.Module:
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


_original_create_new_module = None


def install() -> None:
    """Hooks PEFT's LoRA dispatch (idempotent): a LoraConfig about to make a LoRA layer for a Linear4bit
    gets ``{Linear4bit: LoraLinear4bit}`` registered through ``_register_custom_module`` first."""
    global _original_create_new_module
    if _original_create_new_module is not None:
        return
    original = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if isinstance(_dispatch_target(target), Linear4bit) and Linear4bit not in (lora_config._custom_modules or {}):
            lora_config._register_custom_module({Linear4bit: LoraLinear4bit})
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__wrapped__ = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _original_create_new_module = original
