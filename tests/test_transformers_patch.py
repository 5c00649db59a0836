"""patch_transformers(): the RMSNorm, rotary embedding and SwiGLU gating of transformers' Llama-family
models on fused kernels, against transformers' own functions (within bfloat16's rounding: one rounding where
transformers rounds after each operation), the fallbacks to transformers' own to the bit, whole
models, and the undo."""

from __future__ import annotations

import importlib

import pytest
import torch

import qlora_ext
from qlora_ext import functional
from qlora_ext.transformers_patch import ARCHITECTURES

from helpers import DEVICES, tiny_llama

transformers = pytest.importorskip("transformers")

NORMS = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "mixtral": "MixtralRMSNorm",
         "qwen2": "Qwen2RMSNorm", "qwen3": "Qwen3RMSNorm"}  # fmt: skip


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with transformers' own functions."""
    qlora_ext.unpatch_transformers()
    yield
    qlora_ext.unpatch_transformers()


def modeling(arch: str):
    return importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")


def assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within two bfloat16 roundings of the larger values (one each side's), elementwise relative,
    with an absolute floor of that much times the tensor's largest magnitude (for cancellations)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=2**-7 * scale, msg=what)


def test_every_architecture_is_listed():
    assert set(ARCHITECTURES) == set(NORMS)


def output_and_grads(module, x, g):
    """module(x), then, after its backward of g, the gradients of x and of each of module's parameters."""
    xi = x.clone().requires_grad_()
    module.zero_grad()
    y = module(xi)
    y.backward(g)
    return (y, xi.grad, *(p.grad for p in module.parameters()))


@pytest.mark.parametrize("arch", sorted(NORMS))
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_transformers(arch, device, gen):
    cls = getattr(modeling(arch), NORMS[arch])
    norm = cls(96, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(96, generator=gen))
    x = (4 * torch.randn(3, 7, 96, generator=gen)).to(device=device, dtype=torch.bfloat16)
    g = torch.randn(3, 7, 96, generator=gen).to(device=device, dtype=torch.bfloat16)

    before = output_and_grads(norm, x, g)
    calls = []
    real = torch.nn.functional.rms_norm
    torch.nn.functional.rms_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        qlora_ext.patch_transformers([arch], rotary=False)
        after = output_and_grads(norm, x, g)
    finally:
        torch.nn.functional.rms_norm = real
    assert calls, "the patched forward did not run torch's rms_norm"
    for a, b, name in zip(after, before, ("output", "grad x", "grad weight")):
        assert a.dtype == b.dtype, name
        assert_close_bf16(a, b, f"{arch} {name}")


@pytest.mark.parametrize("arch", sorted(NORMS))
def test_rms_norm_with_a_float32_weight_is_transformers_own(arch, gen):
    """A float32 norm on bf16 activations (PEFT's prepare_model_for_kbit_training) returns float32 in
    transformers: the patch leaves it to transformers' forward, to the bit."""
    norm = getattr(modeling(arch), NORMS[arch])(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen))
    x = torch.randn(5, 32, generator=gen).to(torch.bfloat16)
    before = norm(x)
    qlora_ext.patch_transformers([arch], rotary=False)
    after = norm(x)
    assert after.dtype == before.dtype == torch.float32
    assert torch.equal(after, before)


MLPS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP", "qwen3": "Qwen3MLP"}


def make_mlp(arch, device, gen, hidden_act="silu"):
    config = transformers.AutoConfig.for_model(arch, hidden_size=64, intermediate_size=96, hidden_act=hidden_act)
    mlp = getattr(modeling(arch), MLPS[arch])(config).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return mlp


@pytest.mark.parametrize("arch", sorted(MLPS))
@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_mlp_matches_transformers(arch, device, gen):
    mlp = make_mlp(arch, device, gen)
    x = (2 * torch.randn(3, 7, 64, generator=gen)).to(device=device, dtype=torch.bfloat16)
    g = torch.randn(3, 7, 64, generator=gen).to(device=device, dtype=torch.bfloat16)

    before = output_and_grads(mlp, x, g)
    calls = []
    real = functional.silu_mul
    functional.silu_mul = lambda *a: calls.append(1) or real(*a)
    try:
        qlora_ext.patch_transformers([arch], rms_norm=False, rotary=False)
        after = output_and_grads(mlp, x, g)
    finally:
        functional.silu_mul = real
    assert calls == [1], "the patched forward did not run the fused gating once"
    for i, (a, b) in enumerate(zip(after, before)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert_close_bf16(a, b, f"{arch} output / grad {i}")


def test_swiglu_mlp_with_another_activation_is_transformers_own(gen):
    mlp = make_mlp("llama", "cpu", gen, hidden_act="gelu")
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    before = mlp(x)
    assert "transformers.models.llama.modeling_llama.LlamaMLP.forward" in qlora_ext.patch_transformers(["llama"])
    assert torch.equal(mlp(x), before)
    assert "LlamaMLP" not in str(qlora_ext.patch_transformers(["mixtral"])), "Mixtral has no such MLP"


def rotary_inputs(gen, device, dtype=torch.bfloat16, batch=2, heads=4, kv_heads=2, seq=16, dim=64):
    """q and k as transformers makes them (views of [B, S, H, D] transposed to [B, H, S, D]) and cos,
    sin as LlamaRotaryEmbedding does ([B, S, D], the two halves of the angles equal)."""
    q = torch.randn(batch, seq, heads, dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    positions = torch.arange(seq, dtype=torch.float32)[None, :] + torch.randint(0, 50, (batch, 1), generator=gen)
    angles = positions[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return q, k, emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("arch", sorted(NORMS))
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_matches_transformers(arch, device, gen):
    mod = modeling(arch)
    q, k, cos, sin = rotary_inputs(gen, device)
    gq, gk = torch.randn(q.shape, generator=gen).to(q), torch.randn(k.shape, generator=gen).to(k)

    def run(fn):
        qi, ki = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        out_q, out_k = fn(qi, ki, cos, sin)
        torch.autograd.backward((out_q, out_k), (gq, gk))
        return out_q, out_k, qi.grad, ki.grad

    before = run(mod.apply_rotary_pos_emb)
    calls = []
    real = functional.rotary_embedding
    functional.rotary_embedding = lambda *a: calls.append(1) or real(*a)
    try:
        qlora_ext.patch_transformers([arch], rms_norm=False)
        after = run(mod.apply_rotary_pos_emb)
    finally:
        functional.rotary_embedding = real
    assert len(calls) == 2, "the patched function did not run the fused op on q and k"
    for a, b, name in zip(after, before, ("q", "k", "grad q", "grad k")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close_bf16(a, b, f"{arch} {name}")


def test_rotary_falls_back_to_transformers_where_the_op_does_not_apply(gen):
    """cos needing a gradient, a dtype mix (float32 cos on bf16 q: transformers promotes) and a
    3-D q run transformers' own function: the same bits."""
    mod = modeling("llama")
    eager = mod.apply_rotary_pos_emb
    q, k, cos, sin = rotary_inputs(gen, "cpu")
    cases = [
        (q, k, cos.float().requires_grad_(), sin.float()),
        (q, k, cos.float(), sin.float()),
        (q[0], k[0], cos[0], sin[0], 0),
    ]
    expected = [eager(*c) for c in cases]
    qlora_ext.patch_transformers(["llama"])
    assert mod.apply_rotary_pos_emb is not eager
    for case, want in zip(cases, expected):
        got = mod.apply_rotary_pos_emb(*case)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_matches_and_unpatch_restores(device, gen):
    """A tiny Llama in bf16, forward and backward: the patched model's loss and gradients within
    bf16's rounding of the unpatched one's; unpatch_transformers() brings back transformers' own
    functions, and the model's forward to the bit."""
    model = tiny_llama(0, device).to(torch.bfloat16).train()
    ids = torch.randint(0, 96, (2, 24), generator=gen).to(device)
    mod = modeling("llama")
    own = (mod.LlamaRMSNorm.forward, mod.apply_rotary_pos_emb, mod.LlamaMLP.forward)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.float().clone() for p in model.parameters() if p.grad is not None]
        return out.logits.float(), out.loss.float(), grads

    logits0, loss0, grads0 = run()
    calls, gates = [], []
    real, real_gate = functional.rotary_embedding, functional.silu_mul
    functional.rotary_embedding = lambda *a: calls.append(1) or real(*a)
    functional.silu_mul = lambda *a: gates.append(1) or real_gate(*a)
    patched = qlora_ext.patch_transformers()
    assert "transformers.models.llama.modeling_llama.apply_rotary_pos_emb" in patched
    assert qlora_ext.patch_transformers() == patched  # again: the same, nothing wrapped twice
    try:
        logits1, loss1, grads1 = run()
    finally:
        functional.rotary_embedding, functional.silu_mul = real, real_gate
    assert len(calls) == 2 * 2, "q and k of each of the 2 layers: the fused rotary did not run"
    assert len(gates) == 2, "the MLP of each of the 2 layers: the fused gating did not run"
    assert not torch.equal(logits1, logits0), "the patched model ran transformers' own functions"
    assert_close_bf16(logits1, logits0, "logits")
    assert abs(loss1.item() - loss0.item()) < 0.01 * abs(loss0.item())
    assert len(grads1) == len(grads0)
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads1, grads0))
    assert rel < 0.05, f"a gradient moved by {rel:.3f} of its norm"
    assert qlora_ext.unpatch_transformers() is True
    assert (mod.LlamaRMSNorm.forward, mod.apply_rotary_pos_emb, mod.LlamaMLP.forward) == own
    logits2, _, _ = run()
    assert torch.equal(logits2, logits0)
    assert qlora_ext.unpatch_transformers() is False


def test_bad_architecture_names_the_argument():
    with pytest.raises(ValueError, match=r"architectures: 'gpt2' is not one of"):
        qlora_ext.patch_transformers(["llama", "gpt2"])
    assert qlora_ext.unpatch_transformers() is False  # nothing was patched before the check failed


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_under_autocast_keeps_the_input_dtype(device, gen):
    """CUDA autocast lists rms_norm as float32; transformers' norm returns bf16 there (its float32 chain
    is cast back): the patched norm must too, or every activation after it becomes float32."""
    norm = modeling("llama").LlamaRMSNorm(64).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(4, 64, generator=gen).to(device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        before = norm(x)
        qlora_ext.patch_transformers(["llama"], rotary=False)
        after = norm(x)
    assert before.dtype == after.dtype == torch.bfloat16
    assert_close_bf16(after, before, "under autocast")


def test_a_missing_architecture_patches_nothing(monkeypatch):
    """A transformers without one of the modules: the import error, and every other architecture
    left as it was."""
    real = importlib.import_module

    def without_qwen3(name, *args):
        if name.endswith("modeling_qwen3"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_qwen3)
    own = modeling("llama").LlamaRMSNorm.forward
    with pytest.raises(ModuleNotFoundError, match="qwen3"):
        qlora_ext.patch_transformers()
    assert modeling("llama").LlamaRMSNorm.forward is own
    assert qlora_ext.unpatch_transformers() is False
