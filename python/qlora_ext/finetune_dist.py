"""``qlora-ext finetune`` under torchrun: the process group, the split of each global batch over the
ranks, DDP or FSDP2 (``--fsdp``), and the gathering that lets rank 0 write the same checkpoint as one
device. Without torchrun (``WORLD_SIZE`` unset) ``Ranks.single()`` makes every method a no-op, so the
training loop is one loop for both.

How a step is split: ``--grad-accum`` counts the forward passes of an optimizer step in all, on every
rank together, so a step's global batch is ``--batch-size`` x ``--grad-accum`` examples whatever the
number of ranks. The step's micro-batch ``k`` (the one-device run's order) goes to rank
``k % world``: each rank runs ``grad_accum / world`` of them and backpropagates
``loss / (grad_accum / world)``; DDP and FSDP2 average the ranks' gradients, which gives the
one-device sum of ``loss / grad_accum`` (bit for bit with 2 ranks and 1 pass each, where the
average is ``g0 / 2 + g1 / 2`` both ways). Each micro-batch's dropout is seeded from (``--seed``,
its index), so it draws the same masks on whichever rank runs it.

Checkpoints: the adapter and the optimizer state are gathered whole to rank 0, which writes them in
the one-device format (safetensors + JSON): ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` with ``full_state_dict`` under FSDP2. Not
a sharded ``torch.distributed.checkpoint``: its ``.metadata`` file is a pickle, its files are read
back only through DCP at the same layout of FQNs, and what is saved (the adapters and their AdamW
state, not the 4-bit base, which is read again from ``--model``) is small enough to gather. So a
checkpoint resumes on any number of ranks, or on one device, and PEFT reads its adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


class DistError(ValueError):
    """An argument that cannot run under this launch (the CLI prints it and returns 2)."""


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets its environment) started this process."""
    return "WORLD_SIZE" in os.environ


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_args(fsdp: bool, optim: str, grad_accum: int, device: Optional[str]) -> None:
    """What the launch allows, checked before anything is read or loaded: a DistError that names the
    argument."""
    if fsdp and not launched_by_torchrun():
        raise DistError("--fsdp shards the model over the processes of torchrun, and this process was not "
                        "started by it (WORLD_SIZE is unset): torchrun --nproc-per-node N -m qlora_ext finetune ... "
                        "--fsdp")  # fmt: skip
    if fsdp and optim != "adamw":
        raise DistError(f"--optim {optim} is bitsandbytes' optimizer, which does not step FSDP2's sharded "
                        "parameters (DTensors): pass --optim adamw with --fsdp, or leave --fsdp out (DDP)")  # fmt: skip
    world = world_size_from_env()
    if grad_accum % world:
        raise DistError(f"--grad-accum {grad_accum} is the forward passes of a step on all {world} ranks together "
                        f"and must be a multiple of the {world} ranks (each runs --grad-accum / {world})")  # fmt: skip
    if device is not None and world > 1 and device.startswith("cuda:"):
        raise DistError(f"--device {device}: under torchrun each rank takes the GPU of its LOCAL_RANK; pass --device "
                        "cuda (or cpu), and choose the GPUs with CUDA_VISIBLE_DEVICES")  # fmt: skip


@dataclass
class Ranks:
    """The processes of a run: `rank` of `world`, wrapping the model as `mode` says ("single", "ddp" or
    "fsdp"). Every method is collective (every rank calls it, in the same order) unless it says not."""

    rank: int = 0
    world: int = 1
    mode: str = "single"
    device: torch.device = torch.device("cpu")

    @classmethod
    def single(cls, device: torch.device) -> "Ranks":
        return cls(device=device)

    @classmethod
    def init(cls, fsdp: bool, device: Optional[str]) -> "Ranks":
        """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
        MASTER_PORT): NCCL and the GPU of LOCAL_RANK where a GPU is asked for (or found, without
        --device), gloo on the CPU."""
        import qlora_ext

        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = (device or "").startswith("cuda") or (
            device is None and torch.cuda.is_available() and qlora_ext.cuda_kernels_available()
        )
        if use_cuda:
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            torch.distributed.init_process_group("nccl", device_id=dev)
        else:
            dev = torch.device("cpu")
            torch.distributed.init_process_group("gloo")
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), "fsdp" if fsdp else "ddp", dev)

    @property
    def distributed(self) -> bool:
        return self.mode != "single"

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints (not collective)."""
        return self.rank == 0

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    # -----------------------------------------------------------------------------------------
    # the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training loop calls: `model` itself (FSDP2 wraps it in place, per decoder
        layer and at the root), DDP around it, or `model` alone. Checkpoints and the adapter are
        taken from `model`, whose parameter names stay those of one device."""
        if self.mode == "ddp":
            # init_sync=False: every rank built the same model from the same files and seed (or loaded
            # the same checkpoint), so broadcasting rank 0's parameters, the 4-bit base included,
            # would copy equal bytes
            # nor the buffers (rotary frequencies) at each forward: they are constants. torch 2.14 names
            # that forward_sync_buffers and deprecates broadcast_buffers, which older versions take
            import inspect

            ddp = nn.parallel.DistributedDataParallel
            params = inspect.signature(ddp.__init__).parameters
            buffers = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
            ids = [self.device.index] if self.device.type == "cuda" else None
            return ddp(model, device_ids=ids, init_sync=False, **{buffers: False})
        if self.mode == "fsdp":
            from qlora_ext.distributed import decoder_layers, fully_shard_model

            try:
                layers = decoder_layers(model)
            except ValueError as e:
                raise DistError(
                    f"--fsdp shards the model per decoder layer, and --model has none to shard: {e}"
                ) from None
            if not layers:
                raise DistError("--fsdp shards the model per decoder layer, and --model has none to shard")
            fully_shard_model(model, layers)
        return model

    @contextlib.contextmanager
    def accumulating(self, wrapped: nn.Module, sync: bool) -> Iterator[None]:
        """Within it, a backward reduces the gradients across ranks only if `sync` (the rank's last
        forward pass of the step); otherwise they accumulate on the rank (not collective)."""
        if self.mode == "ddp" and not sync:
            with wrapped.no_sync():
                yield
        elif self.mode == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    def owns(self, micro: int) -> bool:
        """Whether this rank runs the micro-batch of global index `micro` (not collective)."""
        return micro % self.world == self.rank

    # -----------------------------------------------------------------------------------------
    # numbers of the step

    def step_losses(self, local: list[float]) -> list[float]:
        """Every rank's micro-batch losses of the step, in the one-device order (micro-batch k of the
        step ran on rank k % world as its (k // world)-th): float64 carries each float32 loss exactly,
        so their sum is the one-device sum."""
        if not self.distributed:
            return list(local)
        mine = torch.tensor(local, dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        rows = [t.tolist() for t in every]
        return [rows[k % self.world][k // self.world] for k in range(len(local) * self.world)]

    def sum_int(self, value: int) -> int:
        return int(self._reduce(torch.tensor([value], dtype=torch.int64), torch.distributed.ReduceOp.SUM)[0])

    def max_float(self, value: float) -> float:
        return float(self._reduce(torch.tensor([value], dtype=torch.float64), torch.distributed.ReduceOp.MAX)[0])

    def sum_exact(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks of lists where at most one rank holds a non-zero entry (so the
        sum is that entry, exactly)."""
        return self._reduce(torch.tensor(values, dtype=torch.float64), torch.distributed.ReduceOp.SUM).tolist()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device)
            torch.distributed.all_reduce(t, op)
        return t.cpu()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """clip_grad_norm_'s clipping, returning the total norm, with the same bits as one process. Under
        FSDP2 torch's clip_grad_norm_ adds up each rank's shard first, an order of additions one process
        does not share: its norm, and with it the clipping factor and every clipped gradient, could differ
        from one process's in the last bit. So the norm is taken here of the whole gradients, gathered
        (the adapters': small), and each rank scales its own shard by the factor. max_norm 0 measures
        the norm and clips nothing, as transformers' Trainer reads it (clipping to 0 would zero every
        gradient)."""
        if self.mode != "fsdp" and max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        grads = [p.grad for p in params if p.grad is not None]
        whole = [g.full_tensor() for g in grads] if self.mode == "fsdp" else grads
        total = torch.nn.utils.get_total_norm(whole, 2.0)
        if max_norm > 0:
            factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grads_with_norm_ computes it
            for g in grads:
                g.to_local().mul_(factor)
        return float(total)

    # -----------------------------------------------------------------------------------------
    # checkpoints

    def adapter(self, model: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
        """save_adapter's config and tensors, gathered whole (on every rank)."""
        from qlora_ext.distributed import gathered_adapter

        return gathered_adapter(model)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` as one device has it (the state keyed by the parameter's index,
        whole tensors): the optimizer's own under DDP (every rank holds all of it), gathered to
        rank 0 by ``get_optimizer_state_dict`` under FSDP2 (the other ranks get an empty state)."""
        if self.mode != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        index = {name: i for i, name in enumerate(self._param_names(model, optimizer))}
        state = {index[name]: st for name, st in full.get("state", {}).items()}
        return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        """Loads what optimizer_state_dict gave (read from the checkpoint by every rank): under FSDP2
        ``set_optimizer_state_dict`` keeps each rank's shard of every tensor."""
        if self.mode != "fsdp":
            optimizer.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._param_names(model, optimizer)
        groups = [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]
        by_name = {"state": {names[i]: st for i, st in sd["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    @staticmethod
    def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
        """The names of the optimizer's parameters, in its order (the indices of its state_dict)."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def micro_seed(seed: int, micro: int) -> int:
    """The seed of torch's generators for micro-batch `micro` of a run seeded `seed`: its dropout
    masks then do not depend on which rank runs it, nor on what ran before (a resume)."""
    return (seed * 1_000_003 + micro) % 2**63
