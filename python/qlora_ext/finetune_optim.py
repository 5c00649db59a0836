"""The optimizers of ``qlora-ext finetune`` (torch's AdamW or bitsandbytes' 8-bit and paged AdamW) and
their state as safetensors + JSON, so that a checkpoint holds no pickle and resumes bit for bit."""

from __future__ import annotations

from typing import Optional

import torch


def optimizer_tensors(optimizer, state_dict: Optional[dict] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state_dict (or `state_dict`, one in its form: under FSDP2 the one gathered
    whole) as safetensors (its tensors, keyed ``optim.INDEX.NAME``, a nested
    dict's keys joined by "/": bitsandbytes keeps its quantization state in one) and JSON (the
    parameter groups and the state's plain numbers, such as bitsandbytes' integer ``step``, kept as
    numbers: a 0-d tensor in their place changes what its update computes with)."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors, values, seen = {}, {}, set()

    def walk(index, path, d):
        for name, value in d.items():
            sub = f"{path}/{name}" if path else str(name)
            key = f"optim.{index}.{sub}"
            if isinstance(value, dict):
                walk(index, sub, value)
            elif isinstance(value, torch.Tensor):
                # bitsandbytes gives every parameter's state the same quantization map (qmap1, qmap2):
                # safetensors refuses shared memory, so each is written as its own copy (256 numbers)
                ptr = value.untyped_storage().data_ptr() if value.numel() else None
                tensors[key] = value.clone() if ptr in seen else value
                seen.add(ptr)
            elif value is None or isinstance(value, (bool, int, float, str)):
                values[key] = value
            else:
                raise TypeError(f"optimizer state {key} is a {type(value).__name__}: not saved without pickle")

    for index, st in sd["state"].items():
        walk(index, "", st)
    return tensors, {"param_groups": sd["param_groups"], "indices": sorted(sd["state"]), "values": values}


def optimizer_state(opt: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The optimizer's state_dict back from what _optimizer_tensors wrote."""
    state = {}
    items = {k: v for k, v in tensors.items() if k.startswith("optim.")} | opt.get("values", {})
    for index in opt["indices"]:
        prefix = f"optim.{index}."
        st = state[index] = {}
        for key, value in items.items():
            if key.startswith(prefix):
                *parents, name = key[len(prefix) :].split("/")
                d = st
                for parent in parents:
                    d = d.setdefault(parent, {})
                d[name] = value
    return state


OPTIMIZERS = {
    # --optim: (bitsandbytes.optim's class, or None for torch.optim.AdamW)
    "adamw": None,
    "paged_adamw_32bit": "PagedAdamW32bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "adamw_8bit": "AdamW8bit",
}


def make_optimizer(name: str, params, lr: float):
    """AdamW (betas 0.9, 0.999, eps 1e-8, no weight decay, as qlora.py) in torch's implementation or
    bitsandbytes' paged and 8-bit ones (its 8-bit AdamW measured 1.42x torchao's speed at the same peak
    memory on a 7B step: docs/api.md)."""
    cls = OPTIMIZERS[name]
    if cls is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    try:
        import bitsandbytes
    except ImportError:
        raise SystemExit(f"--optim {name} is bitsandbytes' optimizer, and bitsandbytes is not installed: pip "
                         "install bitsandbytes, or pass --optim adamw") from None  # fmt: skip
    return getattr(bitsandbytes.optim, cls)(params, lr=lr, weight_decay=0.0)


def page_state(optimizer) -> None:
    """bitsandbytes' load_state_dict leaves a paged optimizer's state in ordinary GPU memory: copy the
    state that its step would have paged (1e5 elements and more, on CUDA) into paged buffers again."""
    if not getattr(optimizer, "is_paged", False):
        return
    import bitsandbytes.functional as F

    for p, st in optimizer.state.items():
        for key in ("state1", "state2"):
            v = st.get(key)
            if isinstance(v, torch.Tensor) and v.is_cuda and p.numel() >= 1e5 and not getattr(v, "is_paged", False):
                buf = F.get_paged(*v.shape, dtype=v.dtype, device=v.device)
                buf.copy_(v)
                optimizer.page_mng.paged_tensors.append(buf)
                st[key] = buf
