"""Layers: ``Linear4bit`` (a frozen linear layer whose weight is stored in 4 bits) and ``QLoRALinear``
(that layer with trainable LoRA adapters), in place of bitsandbytes' ``Linear4bit`` and PEFT's LoRA
layer on top of it.

``Linear4bit``'s state dict has bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``,
``bias``), so each loads the other's. ``QLoRALinear``'s has PEFT's layout: ``base_layer.*``,
``lora_A.<adapter>.weight`` ([r, in_features]) and ``lora_B.<adapter>.weight`` ([out_features, r]).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Union

import torch
from torch import nn

from . import functional as F
from .quant_state import BLOCKSIZES, QUANT_TYPES, QuantState

__all__ = ["Linear4bit", "QLoRALinear"]

_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# register_scales(): the parameters that hold the block scales and the nested ones
_ABSMAX, _NESTED_ABSMAX = "weight_absmax", "weight_nested_absmax"


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor's bytes as uint8 rows, one element a row: FSDP2 shards dim 0 in whole rows, so
    every rank holds whole scales, and mixed precision (which casts only floating parameters) leaves
    them alone."""
    return t.detach().contiguous().view(torch.uint8).reshape(t.numel(), t.element_size())


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _from_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 1-D tensor of ``dtype`` whose bytes ``_as_rows`` gave; a sharded (DTensor) parameter gives a
    DTensor sharded the same way (a shard of whole rows is a shard of whole elements)."""
    if _is_dtensor(rows):
        from torch.distributed.tensor import DTensor

        local = _from_rows(rows.to_local(), dtype)
        return DTensor.from_local(
            local, rows.device_mesh, rows.placements, run_check=False, shape=torch.Size([rows.shape[0]]), stride=(1,)
        )
    return rows.view(dtype).reshape(-1)


def _dtype(value: Union[str, torch.dtype, None], name: str, allowed: tuple) -> Optional[torch.dtype]:
    """None, one of ``allowed``, or its name (``"bfloat16"``, ``"torch.bfloat16"``: config files hold names)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {[str(d).removeprefix('torch.') for d in allowed]}, got {value!r}")
    return value


def _compute_dtype(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The products' dtype: autocast's where it is on for x's device, else the layer's, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return compute_dtype if compute_dtype is not None else x.dtype


def _in_compute_dtype(x: torch.Tensor, base: "Linear4bit") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x and the base's bias cast to the products' dtype."""
    dtype = _compute_dtype(x, base.compute_dtype)
    return x.to(dtype), (base.bias.to(dtype) if base.bias is not None else None)


def _output(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The result in x's dtype, or in autocast's under autocast (as torch's linear)."""
    return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


class Linear4bit(nn.Linear):
    """A frozen ``nn.Linear`` with its weight in 4 bits (NF4 or FP4, blockwise, optionally double
    quantized), computing ``x @ W.T + bias`` with the fused kernels of ``functional.gemm_4bit``.

    It is an ``nn.Linear`` subclass, as bitsandbytes' ``Linear4bit`` is, so that code which looks for linear
    layers by type finds it (PEFT's ``target_modules="all-linear"``, transformers' module lists); its
    ``weight`` is the packed uint8 codes, not a float ``[out, in]`` matrix (``dequantize()`` gives that).

    Build one with ``Linear4bit.from_linear(linear, ...)``, or as an empty shell
    (``Linear4bit(in_features, out_features, ...)``) that ``load_state_dict`` fills from a state dict in
    bitsandbytes' format. The packed codes are the uint8 parameter ``weight`` (requires_grad False,
    shape ``[(out * in + 1) // 2, 1]`` as in bitsandbytes), ``quant_state`` holds the scales; both move
    with ``.to(device)``, and dtype casts (``.half()``, ``.to(torch.bfloat16)``) leave them as they are.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: the products' dtype; None computes in the input's dtype. Under autocast,
            autocast's dtype. The output has the input's dtype (autocast's under autocast).
        compress_statistics, quant_type, blocksize: the format (see ``functional.quantize_4bit``),
            used by ``from_linear``; a loaded state dict brings its own.
        quant_storage: dtype of the packed bytes in the state dict (bitsandbytes' ``quant_storage``).
        device: where the empty shell's tensors go.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        quant_storage: torch.dtype = torch.uint8,
        device: Union[str, torch.device, None] = None,
    ):
        # nn.Module's, not nn.Linear's: that would allocate a float [out, in] weight
        nn.Module.__init__(self)
        if not (
            isinstance(in_features, int) and in_features > 0 and isinstance(out_features, int) and out_features > 0
        ):
            raise ValueError(
                f"in_features and out_features must be positive integers, got {in_features}, {out_features}"
            )
        if quant_storage not in _STORAGE_DTYPES:
            raise TypeError(f"quant_storage must be one of {_STORAGE_DTYPES}, got {quant_storage}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        compute_dtype = _dtype(compute_dtype, "compute_dtype", _COMPUTE_DTYPES)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.quant_storage = quant_storage
        n = in_features * out_features
        self.weight = nn.Parameter(
            torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device), requires_grad=False
        )
        # None until from_linear or load_state_dict gives the layer a weight.
        self.quant_state = None
        dtype = compute_dtype if compute_dtype is not None else torch.float32
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        quant_storage: torch.dtype = torch.uint8,
        device: Union[str, torch.device, None] = None,
    ) -> "Linear4bit":
        """Quantizes ``linear``'s weight (on ``device``, or where the weight is); the bias is kept as it
        is, in its own dtype (forward casts it to the compute dtype). ``linear`` itself is not changed."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, Linear4bit):
            raise TypeError(f"linear must be a torch.nn.Linear with a float weight, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.is_meta:
            raise ValueError("linear's weight is on the meta device: load its values first")
        if weight.dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"linear's weight must be float32, float16 or bfloat16 to quantize, got {weight.dtype}")
        if device is not None:
            weight = weight.to(device)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            blocksize=blocksize,
            quant_storage=quant_storage,
            device="meta",
        )
        packed, state = F.quantize_4bit(weight, blocksize, quant_type, compress_statistics)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.quant_state = state
        if linear.bias is not None:
            # the bias keeps its dtype (a float32 bias rounded to bfloat16 would change what a user
            # saved); forward casts it to the compute dtype, a vector of out_features
            layer.bias = nn.Parameter(linear.bias.detach().to(device=weight.device).clone(), requires_grad=False)
        return layer

    @property
    def quant_state(self) -> Optional[QuantState]:
        """The format and the block scales. After ``register_scales`` the scales are read from their
        parameters at each access (FSDP2 swaps those between the shard and the gathered tensor):
        DTensors while the layer is sharded, plain tensors inside its forward."""
        state = self.__dict__.get("_quant_state")
        if state is None or _ABSMAX not in self._parameters:
            return state
        state = copy.copy(state)
        state.absmax = _from_rows(self._parameters[_ABSMAX], state.absmax.dtype)
        if state.nested:
            state.state2 = copy.copy(state.state2)
            state.state2.absmax = _from_rows(self._parameters[_NESTED_ABSMAX], state.state2.absmax.dtype)
        return state

    @quant_state.setter
    def quant_state(self, state: Optional[QuantState]) -> None:
        if _ABSMAX in self._parameters:
            self._scales_to_parameters(state)
        else:
            self.__dict__["_quant_state"] = state

    @property
    def scales_registered(self) -> bool:
        """Whether ``register_scales`` made the block scales parameters of this layer."""
        return _ABSMAX in self._parameters

    def register_scales(self) -> None:
        """Makes the block scales (``absmax``; with double quantization its 8-bit codes and the nested
        float32 scales too) frozen parameters of this layer, ``weight_absmax`` and
        ``weight_nested_absmax``, so that FSDP2's ``fully_shard`` shards and gathers them as it does the
        packed codes (``weight``). Each holds its tensor's bytes as uint8 rows ``[n, element size]``:
        shards keep whole scales and mixed precision does not cast them. The small per-layer tables
        (the 16-value code, the 256-value nested map, the offset) stay replicated in ``quant_state``.

        The state dict keeps bitsandbytes' keys, and the products are computed as before; call it
        before ``fully_shard`` (``qlora_ext.distributed.prepare_fsdp`` does it for a whole model).
        """
        if self.scales_registered:
            return
        self._scales_to_parameters(self._state())

    def _scales_to_parameters(self, state: Optional[QuantState]) -> None:
        if state is None:
            raise ValueError("state must be a QuantState: a layer whose scales are parameters keeps a weight")
        self._refuse_if_sharded()
        # the state keeps the format, the tables and empty scales (their dtype and device); the scales
        # themselves are only in the parameters, so that sharding them frees them
        template = copy.copy(state)
        template.absmax = state.absmax.new_empty(0)
        self.weight_absmax = nn.Parameter(_as_rows(state.absmax), requires_grad=False)
        if state.nested:
            template.state2 = copy.copy(state.state2)
            template.state2.absmax = state.state2.absmax.new_empty(0)
            self.weight_nested_absmax = nn.Parameter(_as_rows(state.state2.absmax), requires_grad=False)
        elif _NESTED_ABSMAX in self._parameters:
            del self._parameters[_NESTED_ABSMAX]
        self.__dict__["_quant_state"] = template

    def _refuse_if_sharded(self) -> None:
        """A new weight replaces the parameters that fully_shard manages: refused, before any change."""
        if any(_is_dtensor(p) for p in self._parameters.values() if p is not None):
            raise RuntimeError(
                "this Linear4bit is sharded by fully_shard: give it its weight (load_state_dict, load_quantized, "
                "a merge) before fully_shard"
            )

    def dequantize(self) -> torch.Tensor:
        """The weight as a float tensor ``[out_features, in_features]`` of its original dtype."""
        return F.dequantize_4bit(self.weight, self._state())

    def reset_parameters(self) -> None:
        """Nothing to initialize: the weight comes from ``from_linear`` or a state dict (nn.Linear's
        initialization would write random floats into the packed codes)."""

    def _state(self) -> QuantState:
        """The state for the products; raises where they cannot run (no weight, or sharded)."""
        state = self.quant_state
        if state is None:
            raise RuntimeError("this Linear4bit has no weight yet: build it with from_linear or load a state dict")
        if self.scales_registered:
            if _is_dtensor(self.weight) or _is_dtensor(state.absmax):
                raise RuntimeError(
                    "this Linear4bit is sharded by fully_shard: its weight and scales are gathered in the forward "
                    "of the module that fully_shard wraps; call that module's unshard() to use them outside it"
                )
            template = self.__dict__["_quant_state"]
            if template.absmax.device != state.absmax.device:
                # FSDP2 moves parameters to its device without nn.Module._apply; the tables follow them
                template.to(state.absmax.device)
                state = self.quant_state
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` in the compute dtype, returned in x's dtype."""
        xc, bias = _in_compute_dtype(x, self)
        return _output(F.gemm_4bit(xc, self.weight, self._state(), bias), x)

    def _apply(self, fn, recurse=True):
        # Parameters go through fn (the uint8 codes are left alone by dtype casts); the state follows
        # the codes to their device.
        super()._apply(fn, recurse)
        state = self.__dict__.get("_quant_state")  # with registered scales: the tables (and empty scales)
        if state is not None and state.absmax.device != self.weight.device:
            state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        state = self.quant_state
        weight = self.weight if keep_vars else self.weight.detach()
        if self.quant_storage != torch.uint8:
            weight = F._view_storage(weight, self.quant_storage)
        destination[prefix + "weight"] = weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if state is None:
            # an empty shell (before from_linear or load_state_dict) has only the packed weight, as
            # bitsandbytes' does: transformers reads the keys of a model built on the meta device
            return
        for key, value in state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key = prefix + "weight"
        own = {k: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        if weight_key in state_dict:
            try:
                self._load_weight(state_dict[weight_key], own)
            except (ValueError, TypeError) as e:
                error_msgs.append(f"{weight_key}: {e}")
        rest = {k: v for k, v in state_dict.items() if k != weight_key and k not in own}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if weight_key in state_dict and weight_key in missing_keys:
            missing_keys.remove(weight_key)
        # registered scales are read and written under bitsandbytes' keys (weight.absmax, ...) only
        for key in (prefix + _ABSMAX, prefix + _NESTED_ABSMAX):
            if key in missing_keys:
                missing_keys.remove(key)

    def _load_weight(self, packed: torch.Tensor, entries: dict[str, Any]) -> None:
        codes, state = self.check_weight(packed, entries)
        self.set_weight(codes, state, packed.dtype)

    def set_weight(self, codes: torch.Tensor, state: QuantState, quant_storage: torch.dtype = torch.uint8) -> None:
        """Takes the codes and state that ``check_weight`` returned."""
        self._refuse_if_sharded()
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.quant_state = state
        self.quant_storage = quant_storage
        self.quant_type, self.blocksize, self.compress_statistics = state.quant_type, state.blocksize, state.nested

    def check_weight(self, packed: torch.Tensor, entries: dict[str, Any]) -> tuple[torch.Tensor, QuantState]:
        """The uint8 codes (on this layer's device) and QuantState that `packed` and its 4-bit entries
        (``weight.absmax``, ...) would give this layer; raises ValueError / TypeError naming what does
        not fit, and changes nothing."""
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"the weight must be a tensor, got {type(packed).__name__}")
        if not entries:
            raise ValueError(
                "the state dict has the weight but none of its 4-bit entries (weight.absmax, "
                "weight.quant_state.bitsandbytes__nf4, ...): is it a 4-bit checkpoint?"
            )
        device = self.weight.device if not self.weight.is_meta else packed.device
        state = QuantState.from_dict(entries, device=device)
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            raise ValueError(f"the 4-bit weight has shape {tuple(state.shape)}, this layer needs {expected}")
        if packed.dtype not in _STORAGE_DTYPES:
            raise TypeError(f"the packed weight must be one of {_STORAGE_DTYPES}, got {packed.dtype}")
        codes = F._as_bytes(packed.detach().contiguous()).reshape(-1, 1)
        n = self.in_features * self.out_features
        if codes.numel() != (n + 1) // 2:
            raise ValueError(
                f"the packed weight has {codes.numel()} bytes, a [{expected[0]}, {expected[1]}] weight needs "
                f"{(n + 1) // 2}"
            )
        return codes.to(device).clone(), state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"compress_statistics={self.compress_statistics}, compute_dtype={self.compute_dtype}"
        )


def check_adapter_name(adapter_name: Any) -> None:
    """An adapter's name keys the layers' ``nn.ModuleDict``s (``lora_A``, ``lora_B``) and the saved tensors'
    names (``...lora_A.<name>.weight``), so it is a non-empty string with no ``.`` and not one of
    ``nn.ModuleDict``'s own attributes (``"half"``, ``"cuda"``, ``"keys"``), which the dict cannot hold."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if "." in adapter_name:
        raise ValueError(f"adapter_name must not contain '.', got {adapter_name!r}")
    if hasattr(nn.ModuleDict, adapter_name) or hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} is an attribute of nn.ModuleDict; pick another name")


def check_adapter_settings(r: Any, lora_alpha: Any, lora_dropout: Any, init: Any, adapter_dtype: Any) -> None:
    """An adapter's settings, checked the same for every class of LoRA layer (``LoraConfig`` checks them
    when it is made, before PEFT's layer, which checks none of them, gets them)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if init not in ("kaiming", "gaussian", True, False):
        raise ValueError(f"init must be 'kaiming', 'gaussian', True or False, got {init!r}")
    if adapter_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"adapter_dtype must be a float dtype, got {adapter_dtype}")


def merged_forward(x: torch.Tensor, base: Linear4bit, weight: torch.Tensor) -> torch.Tensor:
    """A layer's output on its 16-bit merged ``weight`` (``merged_weight``), with the base's bias, in the
    products' dtype as the unmerged layer's."""
    xc, bias = _in_compute_dtype(x, base)
    return _output(nn.functional.linear(xc, weight.to(xc.dtype), bias), x)


def new_adapter(base: Linear4bit, r: int, init: Union[str, bool], dtype: torch.dtype) -> tuple[nn.Linear, nn.Linear]:
    """An adapter's ``lora_A`` (``nn.Linear(in, r)``) and ``lora_B`` (``nn.Linear(r, out)``) on the base's device,
    initialized as PEFT does (``init``: "kaiming" / True, "gaussian", False). The random draws, made on that
    device in this order, are the same for every class of LoRA layer, so that one seed gives one adapter."""
    device = base.weight.device
    lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
    lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        if init in ("kaiming", True):
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1.0 / r)
            nn.init.zeros_(lora_B.weight)
    return lora_A, lora_B


def merged_weight(base: Linear4bit, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``deq(W) + scaling B A`` in the base weight's original dtype, computed in float32: the weight of a
    16-bit merge."""
    W = base.dequantize().float() + scaling * (B.detach().float() @ A.detach().float())
    return W.to(base._state().dtype)


class QLoRALinear(nn.Module):
    """A frozen 4-bit linear layer with LoRA adapters: ``y = x W^T + b + s * B(A(dropout(x)))``.

    ``base_layer`` is the ``Linear4bit``; ``lora_A[name]`` (``nn.Linear(in, r)``, weight ``[r, in]``) and
    ``lora_B[name]`` (``nn.Linear(r, out)``) are the only trainable parameters, ``s = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with rsLoRA). One fused autograd op (``functional.lora_linear``) computes
    the layer: its backward keeps x, the ``[..., r]`` down-projection and a dropout seed, and
    regenerates the dropout mask instead of storing it.

    Build one with ``QLoRALinear.from_linear(linear, r=8, lora_alpha=16, ...)``.
    """

    def __init__(
        self,
        base_layer: Linear4bit,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init: Union[str, bool] = "kaiming",
        adapter_dtype: torch.dtype = torch.float32,
        adapter_name: str = "default",
    ):
        super().__init__()
        if not isinstance(base_layer, Linear4bit):
            raise TypeError(f"base_layer must be a qlora_ext.nn.Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapter: Optional[str] = adapter_name
        self.disable_adapters = False
        # merge(): the 16-bit weight with an adapter folded in, used in place of base + adapter
        self.merged_adapter: Optional[str] = None
        self.register_buffer("merged_weight", None, persistent=False)
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init: Union[str, bool] = "kaiming",
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        adapter_dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
    ) -> "QLoRALinear":
        """Quantizes ``linear``'s weight (on ``device``, or where the weight is: CPU or GPU) into a
        frozen ``Linear4bit`` and adds adapters initialized as PEFT does: ``init="kaiming"`` (or True)
        draws A kaiming-uniform with a = sqrt(5) and sets B to zero, so the layer starts as the
        quantized base; ``"gaussian"`` draws A from N(0, 1/r); False leaves both at nn.Linear's
        initialization. Adapters are ``adapter_dtype`` (float32 as PEFT keeps them; the products run
        in the compute dtype). Only A and B require grad."""
        base = Linear4bit.from_linear(linear, quant_type, blocksize, compress_statistics, compute_dtype, device=device)
        return cls(base, r, lora_alpha, lora_dropout, use_rslora, init, adapter_dtype)

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init: Union[str, bool] = "kaiming",
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Adds adapter ``adapter_name`` (it does not become the active one unless it is the first)."""
        check_adapter_name(adapter_name)
        check_adapter_settings(r, lora_alpha, lora_dropout, init, adapter_dtype)
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} exists already")
        lora_A, lora_B = new_adapter(self.base_layer, r, init, adapter_dtype)
        self.lora_A[adapter_name] = lora_A.train(self.training)
        self.lora_B[adapter_name] = lora_B.train(self.training)
        # only the active adapter trains (the first one added is active)
        lora_A.requires_grad_(adapter_name == self.active_adapter)
        lora_B.requires_grad_(adapter_name == self.active_adapter)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(lora_alpha)
        self.scaling[adapter_name] = float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.base_layer.requires_grad_(False)

    def merged_weight_for(self, adapter_name: str) -> torch.Tensor:
        """``deq(W) + s B A`` in the base weight's original dtype, computed in float32."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"no adapter {adapter_name!r} in this layer; it has {sorted(self.lora_A)}")
        return merged_weight(self.base_layer, self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight,
                             self.scaling[adapter_name])  # fmt: skip

    def merge(self, adapter_name: str, weight: Optional[torch.Tensor] = None) -> None:
        """Runs on the 16-bit weight with ``adapter_name`` folded in (``merged_weight_for``) until
        ``unmerge``; the 4-bit base and the adapters stay as they are."""
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged already; unmerge first")
        self.merged_weight = self.merged_weight_for(adapter_name) if weight is None else weight
        self.merged_adapter = adapter_name

    def unmerge(self) -> None:
        """Back to the 4-bit base + adapter, exactly as before ``merge``."""
        if self.merged_adapter is None:
            raise ValueError("no adapter is merged")
        self.merged_weight = None
        self.merged_adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus the active adapter's ``s * dropout(x) @ A.T @ B.T`` (the merged weight
        where one is merged; the base alone with adapters disabled or none active)."""
        base = self.base_layer
        name = self.active_adapter
        if self.merged_weight is not None and not self.disable_adapters:
            return merged_forward(x, base, self.merged_weight)
        if self.disable_adapters or name is None:
            return base(x)
        xc, bias = _in_compute_dtype(x, base)
        p = self.lora_dropout[name] if self.training else 0.0
        out = F.lora_linear(
            xc,
            base.weight,
            base._state(),
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            p,
            bias,
        )
        return _output(out, x)

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Makes ``adapter_name`` the active adapter (None: the base alone)."""
        if adapter_name is not None and adapter_name not in self.lora_A:
            raise ValueError(f"no adapter {adapter_name!r} in this layer; it has {sorted(self.lora_A)}")
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into this layer; unmerge first")
        self.active_adapter = adapter_name

    def extra_repr(self) -> str:
        name = self.active_adapter
        if name is None:
            return "no active adapter"
        return (
            f"r={self.r[name]}, lora_alpha={self.lora_alpha[name]}, lora_dropout={self.lora_dropout[name]}, "
            f"scaling={self.scaling[name]:.4g}"
        )
