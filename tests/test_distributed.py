"""Several processes on the CPU: 2 gloo processes train a tiny Llama prepared by qlora_ext (either path:
``prepare_model``, or ``from_pretrained`` with QLoraExtConfig + PEFT's ``get_peft_model``) under DDP and
under FSDP2 (``fully_shard`` per decoder layer, the 4-bit base's codes and block scales sharded), and
one process computes the same steps: the losses, the adapter gradients and the trained adapters are
the same bits, each rank holds its half of the codes and scales, and the adapter saved from the
sharded model reloads in one process to the same logits.

Why bit for bit: each rank's loss is one process's loss on that rank's batch, and both DDP and FSDP2
average two gradients as g0 / 2 + g1 / 2 (a halving is exact, a sum of two is the same either way), as
the one-process reference does. Every process runs on one thread, so the CPU products reduce in the
same order everywhere."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist

import qlora_ext
from qlora_ext._lora_layers import all_layers
from qlora_ext.nn import Linear4bit

from helpers import HAS_CUDA, SEED, one_thread, tiny_llama, tiny_lm_dir

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from qlora_ext.distributed import (  # noqa: E402  (after the skips: the module's tests need transformers)
    adapter_state_dict,
    full_state_dict,
    fully_shard_model,
    integer_parameters_without_grad,
    prepare_fsdp,
    save_adapter,
    save_quantized,
)
from qlora_ext.hf import QLoraExtConfig  # noqa: E402  (needs transformers)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

WORLD = 2
STEPS = 2
PATHS = ["prepare_model", "from_pretrained+peft"]
# gloo: CPU processes (CI). nccl: one GPU a process, where a machine lends two; the one-process reference
# then runs on the first GPU, and the same kernels on the same kind of GPU give the same bits.
NEEDS_TWO_GPUS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (HAS_CUDA and torch.cuda.device_count() >= WORLD and dist.is_nccl_available()),
                       reason=f"needs {WORLD} GPUs and NCCL"),
]  # fmt: skip
BACKENDS = [pytest.param("gloo", id="gloo"), pytest.param("nccl", id="nccl", marks=NEEDS_TWO_GPUS)]


# ---------------------------------------------------------------------------------------------
# the model, the data and the steps, the same in the workers and in the one-process reference


def compute_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16  # the fused CUDA kernels' dtype on a GPU


def build(path: str, seed: int, lm_dir: str, device: str = "cpu") -> torch.nn.Module:
    """The tiny Llama with adapters in float32, both A and B random (a zero B hides the adapter path's
    errors), the same bits in every process for the same seed."""
    if path == "prepare_model":
        config = qlora_ext.LoraConfig(r=4, init=False)
        model = tiny_llama(seed, device)
        return qlora_ext.prepare_model(model, config, compute_dtype=compute_dtype(device), progress=False).train()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        lm_dir, quantization_config=QLoraExtConfig(compute_dtype=compute_dtype(device)), device_map=device
    )
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, config).train()


def batch(seed: int, rank: int, step: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000 * step + rank)
    return torch.randint(0, 96, (2, 12), generator=g).to(device)


def eval_batch(seed: int, device: str = "cpu") -> torch.Tensor:
    return batch(seed, rank=WORLD, step=STEPS, device=device)


def worker_device() -> str:
    """This process's device: its GPU in an NCCL group, else the CPU."""
    return f"cuda:{dist.get_rank()}" if dist.get_backend() == "nccl" else "cpu"


def on_cpu(value):
    """`value` (tensors in dicts and lists) with every tensor on the CPU: what a worker returns."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # the single-tensor AdamW: the same elementwise steps on full tensors and on DTensor shards
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)


def full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.grad) for n, p in model.named_parameters() if p.requires_grad}


def adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters() if p.requires_grad}


@functools.lru_cache(maxsize=None)
def reference(path: str, seed: int, lm_dir: str, device: str = "cpu") -> dict:
    """One process: at each step, each rank's batch in turn, their gradients averaged as g0/2 + g1/2."""
    with one_thread():
        model = build(path, seed, lm_dir, device)
        base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        opt = optimizer(model)
        losses, grads = [], []
        for step in range(STEPS):
            per_rank = []
            for rank in range(WORLD):
                ids = batch(seed, rank, step, device)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                per_rank.append((loss.detach(), adapter_grads(model)))
                opt.zero_grad()
            losses.append([loss for loss, _ in per_rank])
            averaged = {n: per_rank[0][1][n] / 2 + per_rank[1][1][n] / 2 for n in per_rank[0][1]}
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad = averaged[n].clone()
            grads.append(averaged)
            opt.step()
            opt.zero_grad()
        return on_cpu({"losses": losses, "grads": grads, "adapters": adapters(model), "base": base})


# ---------------------------------------------------------------------------------------------
# two processes


def _run(rank: int, worker, tmp: str, args: tuple, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
        # as conftest's fp32_cublas_reductions sets them in the process that computes the reference
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.save(on_cpu(worker(rank, *args)), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, tmp_path, *args, backend: str = "gloo") -> list[dict]:
    """worker(rank, *args) in WORLD fresh processes of one group of `backend`; what each returns."""
    torch.multiprocessing.start_processes(
        _run, args=(worker, str(tmp_path), args, backend), nprocs=WORLD, start_method="spawn", join=True
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def train(model, wrapped, rank: int, seed: int) -> dict:
    opt = optimizer(model)
    losses, grads = [], []
    for step in range(STEPS):
        ids = batch(seed, rank, step, worker_device())
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append(adapter_grads(model))
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen, f"frozen parameters got gradients: {frozen[:3]}"
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "grads": grads, "adapters": adapters(model)}


def ddp_worker(rank: int, path: str, seed: int, lm_dir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    device = worker_device()
    model = build(path, seed, lm_dir, device)
    wrapped = DistributedDataParallel(model, device_ids=[rank] if device != "cpu" else None)
    return train(model, wrapped, rank, seed)


def shard_sizes(model) -> dict[str, tuple[int, int]]:
    """Rows held here and rows in all, of each sharded 4-bit tensor (codes, scales, nested scales)."""
    sizes = {}
    for name, layer in model.named_modules():
        if isinstance(layer, Linear4bit):
            assert layer.__dict__["_quant_state"].absmax.numel() == 0, "the state keeps the whole scales"
            for pname, p in layer.named_parameters(recurse=False):
                if pname != "bias":
                    sizes[f"{name}.{pname}"] = (p.to_local().shape[0], p.shape[0])
    return sizes


def simulate_torch_2_11() -> None:
    """fully_shard as on torch 2.11 and earlier (pytorch/pytorch#177844), and fully_shard_model on its
    torch-2.11 path (the workaround on): 2.11 makes each sharded parameter first as
    ``nn.Parameter(sharded DTensor)``, which requires grad and so fails for an integer shard, and sets
    the original's requires_grad only after. Here that first step runs on the DTensor of each parameter
    that FSDP shards, before torch's own (fixed) construction."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    import qlora_ext.distributed

    init, to_dtensor = FSDPParam._init_sharded_param, FSDPParam.to_sharded_dtensor
    inside = []

    def init_sharded_param(self, *args, **kwargs):
        inside.append(True)
        try:
            return init(self, *args, **kwargs)
        finally:
            inside.pop()

    def to_sharded_dtensor(self, tensor):
        dtensor = to_dtensor(self, tensor)
        if inside:
            torch.nn.Parameter(dtensor)  # torch 2.11's first step: requires grad
        return dtensor

    FSDPParam._init_sharded_param, FSDPParam.to_sharded_dtensor = init_sharded_param, to_sharded_dtensor
    qlora_ext.distributed.FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD = True


def fsdp_worker(
    rank: int, path: str, seed: int, lm_dir: str, out: str, checkpointing: bool, torch_2_11: bool = False
) -> dict:
    device = worker_device()
    model = build(path, seed, lm_dir, device)
    if checkpointing:  # the backward recomputes each layer's forward: the gathered scales again
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if torch_2_11:
        simulate_torch_2_11()
    fully_shard_model(model)
    result = {"sizes": shard_sizes(model), "layer classes": sorted({type(m).__name__ for _, m in all_layers(model)})}
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    try:
        layer.dequantize()  # outside the forward: the shards only
        result["outside"] = "no error"
    except RuntimeError as e:
        result["outside"] = str(e)
    try:
        layer.set_weight(layer.weight, layer.quant_state)  # a new weight would replace FSDP2's parameters
        result["new weight"] = "no error"
    except RuntimeError as e:
        result["new weight"] = str(e)
    result.update(train(model, model, rank, seed))
    with torch.no_grad():
        result["logits"] = model.eval()(input_ids=eval_batch(seed, device)).logits.clone()
    if path == "prepare_model":
        save_adapter(model, out)
        result["quantized"] = str(save_quantized(model, f"{out}-4bit"))
    else:
        state = adapter_state_dict(model)
        if rank == 0:
            model.save_pretrained(out, state_dict=state)
        dist.barrier()
    result["base"] = {k: v for k, v in full_state_dict(model).items() if "lora_" not in k}
    return result


# ---------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> str:
    return str(tiny_lm_dir(tmp_path_factory.mktemp("tiny-lm"), SEED % 2**31))


def assert_same(actual: dict, expected: dict, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], rtol=0, atol=0, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


def assert_matches_one_process(results: list[dict], ref: dict) -> None:
    for step in range(STEPS):
        assert any(g.abs().sum() > 0 for g in ref["grads"][step].values())
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["losses"][step], ref["losses"][step][rank], rtol=0, atol=0)
            assert_same(result["grads"][step], ref["grads"][step], f"rank {rank} step {step} gradient")
    for rank, result in enumerate(results):
        assert_same(result["adapters"], ref["adapters"], f"rank {rank} trained adapter")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_ddp_matches_one_process(path, backend, lm_dir, tmp_path):
    seed = SEED % 2**31
    results = spawn(ddp_worker, tmp_path, path, seed, lm_dir, backend=backend)
    assert_matches_one_process(results, reference(path, seed, lm_dir, "cpu" if backend == "gloo" else "cuda:0"))


@pytest.mark.parametrize(
    "path, checkpointing, torch_2_11, backend",
    [
        pytest.param(PATHS[0], False, False, "gloo", id=PATHS[0]),
        pytest.param(PATHS[1], False, False, "gloo", id=PATHS[1]),
        pytest.param(PATHS[0], True, False, "gloo", id=PATHS[0] + "+checkpointing"),
        pytest.param(PATHS[1], False, True, "gloo", id=PATHS[1] + "+torch-2.11"),
        pytest.param(PATHS[0], True, False, "nccl", id=PATHS[0] + "+checkpointing-nccl", marks=NEEDS_TWO_GPUS),
        pytest.param(PATHS[1], False, False, "nccl", id=PATHS[1] + "-nccl", marks=NEEDS_TWO_GPUS),
    ],
)
def test_fully_shard_matches_one_process_and_saves(path, checkpointing, torch_2_11, backend, lm_dir, tmp_path):
    """torch_2_11: fully_shard as on torch 2.11 (simulate_torch_2_11), with fully_shard_model's workaround."""
    seed = SEED % 2**31
    out = tmp_path / "adapter"
    device = "cpu" if backend == "gloo" else "cuda:0"
    results = spawn(fsdp_worker, tmp_path, path, seed, lm_dir, str(out), checkpointing, torch_2_11, backend=backend)
    ref = reference(path, seed, lm_dir, device)
    assert_matches_one_process(results, ref)
    fallback = path == PATHS[0] and os.environ.get("QLORA_EXT_LAYERS") == "qlora"
    assert [r["layer classes"] for r in results] == [["QLoRALinear" if fallback else "LoraLinear4bit"]] * WORLD

    # each rank holds its half (torch.chunk's) of the codes, the scales and the nested scales
    sizes = [r["sizes"] for r in results]
    names = sorted(sizes[0])
    assert sum(n.endswith(".weight") for n in names) == 14
    assert sum(n.endswith(".weight_absmax") for n in names) == 14
    assert sum(n.endswith(".weight_nested_absmax") for n in names) == 14
    for name in names:
        rows = sizes[0][name][1]
        assert [s[name] for s in sizes] == [(-(-rows // 2), rows), (rows - -(-rows // 2), rows)], name
    assert "sharded by fully_shard" in results[0]["outside"]
    assert "before fully_shard" in results[0]["new weight"]

    # the gathered state dict: the base untouched, in bitsandbytes' keys, bit for bit one process's
    for rank, result in enumerate(results):
        assert_same(result["base"], ref["base"], f"rank {rank} gathered base")

    if path == "prepare_model":  # the 4-bit checkpoint written by rank 0: one process's, and it loads
        assert results[1]["quantized"] == "None"
        from safetensors.torch import load_file

        written = load_file(results[0]["quantized"])
        assert_same(written, {k.replace(".base_layer.", "."): v for k, v in ref["base"].items()}, "4-bit checkpoint")
        qlora_ext.load_quantized(build(path, seed, lm_dir, device), results[0]["quantized"])

    # the saved adapter, in one process, gives the sharded model's logits
    with one_thread():
        if path == "prepare_model":
            model = build(path, seed, lm_dir, device)
            qlora_ext.load_adapter(model, out, adapter_name="trained")
        else:
            base = transformers.AutoModelForCausalLM.from_pretrained(
                lm_dir, quantization_config=QLoraExtConfig(compute_dtype=compute_dtype(device)), device_map=device
            )
            model = peft.PeftModel.from_pretrained(base, str(out))
        with torch.no_grad():
            logits = model.eval()(input_ids=eval_batch(seed, device)).logits.cpu()
    for rank, result in enumerate(results):
        torch.testing.assert_close(
            result["logits"], logits, rtol=0, atol=0, msg=lambda m, rank=rank: f"rank {rank}: {m}"
        )


def test_fully_shard_with_the_fallback_layers(lm_dir, tmp_path, monkeypatch):
    """prepare_model's layers where PEFT cannot give its own (qlora_ext's QLoRALinear) shard, train and save
    as PEFT's do: the same test, with the worker processes inheriting the switch."""
    monkeypatch.setenv("QLORA_EXT_LAYERS", "qlora")
    test_fully_shard_matches_one_process_and_saves(PATHS[0], False, False, "gloo", lm_dir, tmp_path)


def test_registered_scales_keep_state_dict_and_outputs(gen):
    """prepare_fsdp in one process: bitsandbytes' keys and bits in the state dict, which loads back
    strictly; the same outputs; dtype casts leave the scales as they are."""
    model = qlora_ext.prepare_model(tiny_llama(SEED % 2**31), qlora_ext.LoraConfig(r=4, init=False),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    ids = torch.randint(0, 96, (2, 9), generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(ids).logits
    assert prepare_fsdp(model) == 14
    assert prepare_fsdp(model) == 0
    assert_same(model.state_dict(), before, "state dict after prepare_fsdp")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "weight_" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    # another model's 4-bit weights load into the registered parameters (and the outputs follow)
    other = qlora_ext.prepare_model(tiny_llama(SEED % 2**31 + 1), qlora_ext.LoraConfig(r=4, init=False),
                                    compute_dtype=torch.float32, progress=False)  # fmt: skip
    model.load_state_dict(other.state_dict(), strict=True)
    assert_same(model.state_dict(), other.state_dict(), "state dict of the other model")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)
    model.load_state_dict(before, strict=True)
    model.half().float()
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight_absmax.dtype == torch.uint8 and layer.quant_state.absmax.dtype == torch.uint8
    assert layer.quant_state.state2.absmax.dtype == torch.float32
    assert_same({k: v for k, v in model.state_dict().items() if ".base_layer.weight" in k},
                {k: v for k, v in before.items() if ".base_layer.weight" in k}, "after .half().float()")  # fmt: skip


def simulated_torch_2_11_without_workaround_worker(rank: int, path: str, seed: int, lm_dir: str) -> dict:
    import qlora_ext.distributed

    model = build(path, seed, lm_dir)
    simulate_torch_2_11()
    qlora_ext.distributed.FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD = False  # the workaround off
    try:
        fully_shard_model(model)
        return {"error": "no error"}
    except RuntimeError as e:
        return {"error": str(e)}


def test_the_torch_2_11_simulation_fails_without_the_workaround(lm_dir, tmp_path):
    """The simulated torch 2.11 fails as torch 2.11 does when the workaround is off: the simulation that
    the +torch-2.11 case passes through is the bug, not a no-op."""
    for r in spawn(simulated_torch_2_11_without_workaround_worker, tmp_path, PATHS[0], SEED % 2**31, lm_dir):
        assert "tensors of floating point" in r["error"].lower(), r


def test_a_cpu_model_is_sharded_on_the_cpu_of_a_machine_with_a_gpu(tmp_path, monkeypatch):
    """fully_shard's default mesh is the machine's accelerator; fully_shard_model's is the model's device
    (these CPU tests, and finetune --fsdp --device cpu, also run on the GPU machines)."""
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # as on a GPU machine
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = build(PATHS[0], 0, "")
        fully_shard_model(model)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    finally:
        dist.destroy_process_group()


def test_integer_parameters_without_grad():
    codes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(codes)
    before = torch.nn.Parameter.__dict__["__new__"]
    with integer_parameters_without_grad():
        assert not torch.nn.Parameter(codes).requires_grad
        assert torch.nn.Parameter(torch.zeros(2)).requires_grad, "a float parameter is as before"
        assert not torch.nn.Parameter(torch.zeros(2), requires_grad=False).requires_grad
        assert type(torch.nn.Parameter(codes)) is torch.nn.Parameter
    assert torch.nn.Parameter.__dict__["__new__"] is before
    with pytest.raises(RuntimeError, match="floating point"):
        torch.nn.Parameter(codes)


def test_prepare_fsdp_refusals(monkeypatch):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_fsdp("model")
    with pytest.raises(ValueError, match="no qlora_ext Linear4bit"):
        prepare_fsdp(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="_no_split_modules"):
        fully_shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    import qlora_ext.distributed

    monkeypatch.setattr(qlora_ext.distributed, "FSDP_MAKES_INTEGER_PARAMETERS_REQUIRE_GRAD", True)
    model = build(PATHS[0], 0, "")
    with pytest.raises(ValueError, match="reshard_after_forward=2 needs torch 2.12"):
        fully_shard_model(model, reshard_after_forward=2)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    with pytest.raises(ValueError, match="param_dtype=torch.bfloat16 needs torch 2.12"):
        fully_shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
