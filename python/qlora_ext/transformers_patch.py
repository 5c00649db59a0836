"""``patch_transformers()``: the model's own work around the linears (RMSNorm, rotary embedding, the
MLP's SwiGLU gating), fused.

In a QLoRA step the linears are not the only cost. transformers' ``LlamaRMSNorm`` runs a float32 chain
(a cast, ``pow``, ``mean``, an add and ``rsqrt``, two multiplies, a cast back: eight kernels forward,
more backward, each a pass over the activations), ``apply_rotary_pos_emb`` five elementwise
kernels on each of q and k (multiply, ``neg``, ``cat``, multiply, add), and the MLP's
``act_fn(gate) * up`` two kernels each way and a third tensor of the MLP's width kept for the
backward. The patch replaces them, as Liger-Kernel's ``apply_liger_kernel_to_*`` do, for every model
of the listed architectures in the process, loaded before or after it:

- each architecture's RMSNorm class gets a ``forward`` that is ``torch.nn.functional.rms_norm`` (one
  fused kernel each way on CUDA, outside autocast, whose float32 list holds it) wherever the norm's
  weight has the input's dtype; elsewhere (norms
  kept in float32, as PEFT's ``prepare_model_for_kbit_training`` leaves them, whose output is float32)
  transformers' own forward runs;
- the architecture's ``apply_rotary_pos_emb`` becomes ``functional.rotary_embedding`` on q and on k
  (one kernel each way a tensor) wherever q, k, cos and sin share a dtype and cos and sin need no
  gradient (transformers computes them without one); elsewhere transformers' own function runs;
- the MLP class's ``forward`` (Llama, Mistral, Qwen2, Qwen3; not Mixtral's experts) computes
  ``down_proj(functional.silu_mul(gate_proj(x), up_proj(x)))`` where ``act_fn`` is SiLU (the
  configs' ``hidden_act="silu"``); elsewhere transformers' own forward runs.

Measured (norms and rotary) on an H100, bfloat16 adapters, 1 x 2048: a Llama-65B QLoRA step 1.947 -> 1.721 s, Llama-7B
0.283 -> 0.227 s (``bench/results/e2e-fused-h100-2026-12-07-05fb9f3.json``).
Each rounds once where transformers rounds after each operation: outputs agree with transformers'
within bfloat16's rounding, not to the bit. The weights, parameters and state dicts are untouched;
``unpatch_transformers()`` restores transformers' functions. Kernels from the Hub (transformers'
``kernelize`` / ``use_kernels``) for these norms, rotary and MLP are meant to be used instead of this
patch, not with it (not tested together).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Iterable

import torch

from . import functional as F

__all__ = ["ARCHITECTURES", "patch_transformers", "patched", "unpatch_transformers"]

# transformers' model type -> its RMSNorm class. Each one's forward and apply_rotary_pos_emb are the
# same code as Llama's (transformers copies them); tests/test_transformers_patch.py checks every one
# against transformers' own on random inputs.
_NORMS = {
    "llama": "LlamaRMSNorm",
    "mistral": "MistralRMSNorm",
    "mixtral": "MixtralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm",
}
# The MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)); Mixtral's experts are not.
_MLPS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}
ARCHITECTURES = tuple(_NORMS)
# (owner, attribute) -> what it was before the patch: a class's forward or a module's function
_ORIGINAL: dict[tuple[Any, str], Any] = {}


def patch_transformers(
    architectures: Iterable[str] = ARCHITECTURES, *, rms_norm: bool = True, rotary: bool = True, swiglu: bool = True
) -> list[str]:
    """Runs the RMSNorm, the rotary embedding and (swiglu) the MLP's gating of transformers' models of
    ``architectures`` on fused kernels (see the module's docstring); returns what it replaced, as
    ``"module.name"``. Calling it again is harmless; ``unpatch_transformers()`` undoes it."""
    if isinstance(architectures, str):
        architectures = [architectures]
    architectures = list(architectures)
    for arch in architectures:
        if arch not in _NORMS:
            raise ValueError(f"architectures: {arch!r} is not one of {list(ARCHITECTURES)}")
    # every module first: a transformers without one of them patches none
    modules = [importlib.import_module(f"transformers.models.{arch}.modeling_{arch}") for arch in architectures]
    patched = []
    for arch, module in zip(architectures, modules):
        if rms_norm:
            cls = getattr(module, _NORMS[arch])
            _replace(cls, "forward", _rms_norm_forward)
            patched.append(f"{module.__name__}.{cls.__name__}.forward")
        if rotary:
            original = _ORIGINAL.get((module, "apply_rotary_pos_emb"), module.apply_rotary_pos_emb)
            _replace(module, "apply_rotary_pos_emb", _fused_rotary(original))
            patched.append(f"{module.__name__}.apply_rotary_pos_emb")
        if swiglu and arch in _MLPS:
            cls = getattr(module, _MLPS[arch])
            _replace(cls, "forward", _swiglu_mlp_forward)
            patched.append(f"{module.__name__}.{cls.__name__}.forward")
    return patched


def patched() -> list[str]:
    """What ``patch_transformers()`` has replaced and ``unpatch_transformers()`` not yet restored, as
    ``"module.name"``."""
    return [f"{getattr(owner, '__module__', '')}.{getattr(owner, '__name__', owner)}.{name}".lstrip(".")
            for owner, name in _ORIGINAL]  # fmt: skip


def _parts_for(architecture: str) -> list[str]:
    """The keyword parts of patch_transformers() that change a model of `architecture` (a model type)."""
    if architecture not in _NORMS:
        return []
    return ["rms_norm", "rotary"] + (["swiglu"] if architecture in _MLPS else [])


def _state() -> dict[tuple[Any, str], tuple[Any, Any]]:
    """(owner, name) -> (transformers' own, what is there now) for everything patched: what
    ``_restore`` puts back exactly (for a program that patches for a while, as the CLI does)."""
    return {key: (original, getattr(*key)) for key, original in _ORIGINAL.items()}


def _restore(state: dict[tuple[Any, str], tuple[Any, Any]]) -> None:
    unpatch_transformers()
    for (owner, name), (original, current) in state.items():
        _ORIGINAL[(owner, name)] = original
        setattr(owner, name, current)


def unpatch_transformers() -> bool:
    """Puts back every function ``patch_transformers()`` replaced; whether there was any."""
    for (owner, name), original in _ORIGINAL.items():
        setattr(owner, name, original)
    had = bool(_ORIGINAL)
    _ORIGINAL.clear()
    return had


def _replace(owner: Any, name: str, new: Any) -> None:
    _ORIGINAL.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, new)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.dtype == hidden_states.dtype:
        # CUDA autocast runs rms_norm in float32 (its fp32 list) and returns float32 where transformers'
        # norm returns the input's dtype: the dtypes already agree, so autocast has nothing to do here.
        with torch.autocast(hidden_states.device.type, enabled=False):
            return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
    # transformers multiplies the bf16 normalized value by a float32 weight into float32: its forward
    return _original_forward(self)(self, hidden_states)


def _original_forward(module: torch.nn.Module) -> Callable:
    for cls in type(module).__mro__:
        original = _ORIGINAL.get((cls, "forward"))
        if original is not None:
            return original
    raise RuntimeError(f"{type(module).__name__}: patch_transformers' forward without transformers' own")


@functools.cache
def _silu_types() -> tuple[type, ...]:
    import transformers.activations as activations

    return (torch.nn.SiLU, getattr(activations, "SiLUActivation", torch.nn.SiLU))


def _is_silu(act: Any) -> bool:
    return type(act) in _silu_types()  # (a subclass may compute something else)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    # gate_proj before up_proj, as transformers calls them: the adapters' dropout draws in the same order
    if _is_silu(getattr(self, "act_fn", None)):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype == up.dtype and gate.shape == up.shape:
            return self.down_proj(F.silu_mul(gate, up))
        return self.down_proj(self.act_fn(gate) * up)
    return _original_forward(self)(self, x)


def _fused_rotary(original: Callable) -> Callable:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) on the fused op, falling back
    to `original` where the op does not apply."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (
            cos.requires_grad
            or sin.requires_grad
            or not (q.dtype == k.dtype == cos.dtype == sin.dtype)
            or not (q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3)
            or q.shape[-1] % 2
        ):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return F.rotary_embedding(q, cos, sin), F.rotary_embedding(k, cos, sin)

    apply_rotary_pos_emb.__doc__ = original.__doc__
    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb
