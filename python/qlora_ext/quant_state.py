"""QuantState: what it takes to dequantize a 4-bit tensor, in bitsandbytes' layout and serialized keys.

The fields and ``as_dict`` / ``from_dict`` follow ``bitsandbytes.functional.QuantState`` (0.50.2), so a
state saved by one loads in the other. See ``docs/spec/nf4-format.md`` for the format.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Optional, Union

import torch

from .codebooks import _shared_table, code_tensor, dynamic_map_tensor

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QS_KEYS = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state",
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
)


_REPACKED = (
    "this bitsandbytes QuantState was repacked for bitsandbytes' CPU kernel (packing_format_for_cpu: "
    "its Linear4bit does that in eval mode without gradients on a CPU with AVX512-BF16); qlora_ext reads "
    "only the standard layout"
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pack_dict(d: dict[str, Any]) -> torch.Tensor:
    # The same bytes bitsandbytes writes: json.dumps with its default separators, UTF-8.
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_dict(t: torch.Tensor) -> dict[str, Any]:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("the quant_state.bitsandbytes__* entry must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        d = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the quant_state.bitsandbytes__* entry is not valid UTF-8 JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("the quant_state.bitsandbytes__* entry must hold a JSON object")
    return d


def bitsandbytes_state_type() -> Optional[type]:
    """``bitsandbytes.functional.QuantState`` where bitsandbytes is imported, else None. It does not
    import bitsandbytes: a state of its type can only exist once that module has been loaded."""
    module = sys.modules.get("bitsandbytes.functional")
    return getattr(module, "QuantState", None)


def _check_tensor(name: str, t: Any, dtype: torch.dtype, numel: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    return t


class QuantState:
    """The scales and format facts of one 4-bit tensor.

    Attributes:
        absmax: float32 block scales, one per ``blocksize`` elements; with double quantization
            (``nested``) their uint8 codes, decoded through ``state2`` and ``offset``.
        shape: the original tensor's shape.
        code: the 16 values of the 4-bit code (float32), bitsandbytes' ``quant_map``.
        blocksize: elements per block (32 .. 4096).
        quant_type: ``"nf4"`` or ``"fp4"``.
        dtype: the original tensor's dtype, and the dtype dequantization returns.
        offset: with double quantization, the float32 mean subtracted from the scales (0-dim).
        state2: with double quantization, a QuantState holding ``nested_absmax`` (as its
            ``absmax``), the 8-bit map (``code``), the nested blocksize (256) and dtype float32.

    It answers what code written for ``bitsandbytes.functional.QuantState`` asks of one: those
    attributes, ``nested``, ``as_dict`` / ``from_dict``, ``to``, ``valid_qs_keys`` /
    ``valid_qs_type_keys``, the packed entry's name as an attribute (``state.bitsandbytes__nf4``, as
    FSDP's state-dict traversal asks), the older list layout (``state[0]`` ... ``state[5]``), and
    equality with bitsandbytes' state; bitsandbytes' own functions take it. ``from_bitsandbytes`` /
    ``to_bitsandbytes`` convert either way without copying a tensor.
    """

    valid_quant_types = QUANT_TYPES
    # bitsandbytes' names for the entries of a serialized state (its QuantState has the same lists)
    valid_qs_type_keys = [f"bitsandbytes__{q}" for q in QUANT_TYPES]
    valid_qs_keys = list(_QS_KEYS)

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: Optional[Union[torch.Size, tuple[int, ...]]] = None,
        code: Optional[torch.Tensor] = None,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        offset: Optional[torch.Tensor] = None,
        state2: Optional["QuantState"] = None,
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self._code = code
        # Which standard table `code` is when it was not given: made on first access, since a copy
        # per quantization costs more than quantizing a large weight on a GPU.
        self._code_table = quant_type if quant_type in QUANT_TYPES else None
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def code(self) -> Optional[torch.Tensor]:
        """The code table (float32): 16 values for a 4-bit state, the 256 of the 8-bit map for state2."""
        if self._code is None and self._code_table is not None:
            self._code = code_tensor(self._code_table, self.absmax.device) if self._code_table in QUANT_TYPES \
                else dynamic_map_tensor(self.absmax.device)  # fmt: skip
        return self._code

    @code.setter
    def code(self, value: Optional[torch.Tensor]) -> None:
        self._code = value

    def _code_for_kernel(self) -> torch.Tensor:
        """The code table to read from, without making a copy of a standard one."""
        if self._code is None and self._code_table is not None:
            return _shared_table(self._code_table, self.absmax.device)
        return self.code

    @property
    def nested(self) -> bool:
        """Whether the block scales are themselves quantized (double quantization)."""
        return self.state2 is not None

    def __getattr__(self, name: str) -> Any:
        # Only for names the object does not have. bitsandbytes' QuantState answers its packed entry's
        # name as an attribute: FSDP's state-dict traversal resolves "weight.quant_state.bitsandbytes__nf4"
        # with getattr, one dotted part at a time.
        quant_type = self.__dict__.get("quant_type")
        if name.startswith("bitsandbytes__") and quant_type in QUANT_TYPES and name == f"bitsandbytes__{quant_type}":
            return self.as_dict(packed=True)["quant_state." + name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx):
        """bitsandbytes' older list layout, which its QuantState still answers:
        ``[absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def __repr__(self) -> str:
        return (
            f"QuantState(quant_type={self.quant_type!r}, blocksize={self.blocksize}, shape={tuple(self.shape or ())}, "
            f"dtype={self.dtype}, nested={self.nested}, device={self.absmax.device})"
        )

    def validate(self) -> "QuantState":
        """Checks that the fields fit together; raises ValueError/TypeError naming the one that does not."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.dtype not in _DTYPES.values():
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.shape is None:
            raise ValueError("shape must be set")
        nblocks = -(-math.prod(self.shape) // self.blocksize)
        if self.nested:
            _check_tensor("absmax", self.absmax, torch.uint8, nblocks)
            if self.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize must be {NESTED_BLOCKSIZE}, got {self.state2.blocksize!r}")
            _check_tensor("nested_absmax", self.state2.absmax, torch.float32, -(-nblocks // NESTED_BLOCKSIZE))
            _check_tensor("nested_quant_map", self.state2.code, torch.float32, 256)
            _check_tensor("offset", self.offset, torch.float32, 1)
            devices = {self.absmax.device, self.state2.absmax.device, self.state2.code.device, self.offset.device}
        else:
            _check_tensor("absmax", self.absmax, torch.float32, nblocks)
            devices = {self.absmax.device}
        if len(devices) != 1:
            raise ValueError(f"the state's tensors are on several devices: {sorted(map(str, devices))}")
        return self

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes serializes it.

        With ``packed=False``: tensors and plain values under bitsandbytes' names (``absmax``,
        ``quant_map``, ``nested_absmax``, ``nested_quant_map``, ``quant_type``, ``blocksize``, ``dtype``,
        ``shape``, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``). With ``packed=True``: only
        tensors, the plain values packed as UTF-8 JSON into ``quant_state.bitsandbytes__<quant_type>``,
        ready for a state dict or safetensors (prefix each key with ``"<weight name>."``).
        """
        qs: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors refuses tensors that share storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed:
            return qs
        tensors = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = _pack_dict(plain)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: Union[str, torch.device, None] = None) -> "QuantState":
        """Reads a state written by ``as_dict`` (ours or bitsandbytes'), packed or not, with or without
        the ``"<weight name>."`` prefix on its keys; moves its tensors to ``device``.

        Raises ValueError / TypeError naming the entry that is missing, unknown, or of the wrong
        dtype or size. The input dict is not modified.
        """
        if not isinstance(qs_dict, dict):
            raise TypeError(f"qs_dict must be a dict, got {type(qs_dict).__name__}")
        d = dict(qs_dict)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in d and not any(k.split(".")[-1] == "quant_type" for k in d):
            if len(packed_keys) != 1:
                raise ValueError(
                    "expected exactly one 'quant_state.bitsandbytes__nf4' or '...__fp4' entry (or unpacked "
                    f"entries), found {packed_keys or 'none'}"
                )
        if len(packed_keys) > 1:
            raise ValueError(f"expected one packed quant_state entry, found {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            suffix = key.split(".")[-1]
            if suffix not in ("bitsandbytes__nf4", "bitsandbytes__fp4"):
                raise ValueError(f"unknown packed quant_state entry {key!r}")
            plain = _unpack_dict(d.pop(key))
            if plain.get("quant_type") != suffix.removeprefix("bitsandbytes__"):
                raise ValueError(f"{key!r} says quant_type {plain.get('quant_type')!r}, its name says {suffix}")
            d.update(plain)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - set(_QS_KEYS)
        if unknown:
            raise ValueError(f"unknown quant_state entries: {sorted(unknown)}")
        for k in ("absmax", "quant_type", "blocksize", "dtype", "shape"):
            if k not in d:
                raise ValueError(f"the quant_state has no {k!r}")
        if d["dtype"] not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {d['dtype']!r}")
        shape = d["shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
        quant_type = d["quant_type"]
        code = d.get("quant_map")
        if code is None:
            code = code_tensor(quant_type) if quant_type in QUANT_TYPES else None
        nested = "nested_absmax" in d
        if nested:
            for k in ("nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"):
                if k not in d:
                    raise ValueError(f"the quant_state has nested_absmax but no {k!r}")
            if d["nested_dtype"] != "float32":
                raise ValueError(f"nested_dtype must be 'float32', got {d['nested_dtype']!r}")
            if not isinstance(d["nested_offset"], (int, float)):
                raise ValueError(f"nested_offset must be a number, got {d['nested_offset']!r}")
            state2 = cls(
                absmax=d["nested_absmax"],
                blocksize=d["nested_blocksize"],
                code=d["nested_quant_map"],
                dtype=torch.float32,
            )
            # A plain number in the dict: it goes where the scales are (or to `device`).
            offset_device = device if device is not None else getattr(d["absmax"], "device", None)
            offset = torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=offset_device)
        else:
            state2, offset = None, None
        state = cls(
            absmax=d["absmax"],
            shape=tuple(shape),
            code=code,
            blocksize=d["blocksize"],
            quant_type=quant_type,
            dtype=_DTYPES[d["dtype"]],
            offset=offset,
            state2=state2,
        )
        if code is not None:
            _check_tensor("quant_map", code, torch.float32, 16)
        if device is not None:
            state.to(device)
        return state.validate()

    @classmethod
    def from_bitsandbytes(cls, state: Any) -> "QuantState":
        """A QuantState that shares the tensors of ``state``, a ``bitsandbytes.functional.QuantState``
        (the same format: nothing is copied). Raises TypeError for another object, ValueError for a
        state that bitsandbytes repacked for its CPU kernel (``packing_format_for_cpu``: another layout
        of the codes and bfloat16 scales) or whose fields do not fit (see ``validate``).

        qlora_ext's functions take bitsandbytes' QuantState as it is; this is for holding one as ours.
        """
        bnb_type = bitsandbytes_state_type()
        if bnb_type is None or not isinstance(state, bnb_type):
            raise TypeError(f"state must be a bitsandbytes.functional.QuantState, got {type(state).__name__}")
        if state.__dict__.get("packing_format_for_cpu"):
            raise ValueError(_REPACKED)
        return cls._sharing(state).validate()

    @classmethod
    def _sharing(cls, state: Any) -> "QuantState":
        """``from_bitsandbytes`` without its checks (also for the nested 8-bit state, which has no
        shape or quant_type)."""
        s2 = state.state2 if state.nested else None
        return cls(
            absmax=state.absmax,
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
            offset=state.offset if s2 is not None else None,
            state2=None if s2 is None else cls._sharing(s2),
        )

    def to_bitsandbytes(self) -> Any:
        """This state as a ``bitsandbytes.functional.QuantState`` sharing its tensors (for
        ``bitsandbytes.nn.Params4bit`` or bitsandbytes' functions). Needs bitsandbytes."""
        try:
            from bitsandbytes.functional import QuantState as BnbQuantState
        except ImportError as e:
            raise ImportError(f"QuantState.to_bitsandbytes needs bitsandbytes (pip install bitsandbytes): {e}") from e
        state2 = None
        if self.nested:
            s2 = self.state2
            state2 = BnbQuantState(absmax=s2.absmax, code=s2.code, blocksize=s2.blocksize, dtype=s2.dtype)
        return BnbQuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=self.offset if self.nested else None,
            state2=state2,
        )

    def to(self, device: Union[str, torch.device]) -> "QuantState":
        """Moves every tensor of the state to ``device``, in place; returns the state."""
        self.absmax = self.absmax.to(device)
        if self._code is not None:
            self._code = self._code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        """Same format facts and the same tensor values; ``other`` may be bitsandbytes' QuantState."""
        if not isinstance(other, QuantState):
            bnb_type = bitsandbytes_state_type()
            if bnb_type is None or not isinstance(other, bnb_type) or other.__dict__.get("packing_format_for_cpu"):
                return NotImplemented
            other = QuantState._sharing(other)

        def same(a, b):
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())

        return (
            self.quant_type == other.quant_type
            and self.blocksize == other.blocksize
            and self.shape == other.shape
            and self.dtype == other.dtype
            and same(self.absmax, other.absmax)
            and same(self.code, other.code)
            and same(self.offset, other.offset)
            and (self.state2 == other.state2 if self.nested and other.nested else self.nested == other.nested)
        )

    __hash__ = None  # mutable container of tensors


__all__ = ["BLOCKSIZES", "NESTED_BLOCKSIZE", "QUANT_TYPES", "QuantState", "bitsandbytes_state_type"]
