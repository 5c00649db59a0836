"""Helpers shared by the test modules (which import them from here, never from each other or from
conftest.py, which keeps the fixtures and hooks): devices, a fresh random seed each run, inputs
and weights, output poisoning, NaN-aware bit comparison, float64 references and their bounds, the
extension's switches, a counter of the ops that run, the LoRA layer under test and a tiny Llama."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

import qlora_ext
from qlora_ext import functional as F
from qlora_ext.codebooks import code_tensor
from qlora_ext.quant_state import QuantState

# Fresh data every run; the seed is printed in the header so that a failure can be repeated.
SEED = int(os.environ.get("QLORA_TEST_SEED") or random.SystemRandom().randrange(2**31))

HAS_CUDA = torch.cuda.is_available() and qlora_ext.cuda_kernels_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of qlora_ext")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda])]
# the LoRA layer class that each value of conftest's layer_kind (QLORA_EXT_LAYERS) builds
LAYER_CLASS = {"qlora": "QLoRALinear", "peft": "LoraLinear4bit"}
# bench/sanitize.sh turns torch's caching allocator off under memcheck and initcheck, and CUDA graph
# capture refuses to run without it.
needs_caching_allocator = pytest.mark.skipif(
    os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1", reason="CUDA graph capture needs the caching allocator"
)


def random_weights(n: int, dtype: torch.dtype, device: str, gen: torch.Generator, blocksize: int = 64) -> torch.Tensor:
    """Gaussian values whose scale varies block to block over several decades, with a few outliers:
    what a weight matrix looks like to a blockwise quantizer."""
    nb = max(1, -(-n // blocksize))
    scale = torch.exp(torch.randn(nb, generator=gen) * 1.5).repeat_interleave(blocksize)[:n]
    x = torch.randn(n, generator=gen) * scale
    if n >= 16:
        idx = torch.randint(0, n, (max(1, n // 500),), generator=gen)
        x[idx] *= 20
    return x.to(dtype=dtype).to(device)


def poison(device: str, nbytes: int) -> None:
    """Fills memory that the next allocations of about this size are likely to reuse with 0xFF
    (NaN for floats), so an element a kernel forgot to write shows up in a bit-exact comparison."""
    t = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device=device)
    del t


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "", signed_zeros: bool = True) -> None:
    """Same shape, dtype and bits; NaN matches NaN whatever its payload. signed_zeros=False lets
    +0.0 match -0.0 (and nothing else)."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype.is_floating_point:
        nan_a, nan_e = actual.isnan(), expected.isnan()
        assert torch.equal(nan_a, nan_e), f"{what}: NaN at different places ({nan_a.sum()} vs {nan_e.sum()})"
        same = (bits(actual) == bits(expected)) | nan_a
        if not signed_zeros:
            same |= (actual == 0) & (expected == 0)
    else:
        same = actual == expected
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].flatten().tolist()
        flat_a, flat_e = actual.reshape(-1), expected.reshape(-1)
        idx = (~same.reshape(-1)).nonzero()[:5].flatten()
        raise AssertionError(
            f"{what}: {(~same).sum().item()} of {same.numel()} elements differ; first at {bad}: "
            f"{flat_a[idx].tolist()} != {flat_e[idx].tolist()}"
        )


def assert_state_equal(ours: QuantState, theirs, what: str) -> None:
    """Two quantization states (ours, or bitsandbytes' QuantState) hold the same scales and facts, bit for bit."""
    assert_bits_equal(ours.absmax, theirs.absmax, f"{what} absmax")
    assert ours.nested == theirs.nested
    if ours.nested:
        assert_bits_equal(ours.state2.absmax, theirs.state2.absmax, f"{what} nested_absmax")
        assert_bits_equal(ours.offset.reshape(()), theirs.offset.reshape(()), f"{what} offset")
        assert_bits_equal(ours.state2.code, theirs.state2.code, f"{what} nested_quant_map")
    assert_bits_equal(ours.code, theirs.code, f"{what} quant_map")
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.blocksize == theirs.blocksize


def assert_each_raises(cases) -> None:
    """Each (call, error type, message regex) raises that error with that message."""
    for fn, error, match in cases:
        with pytest.raises(error, match=match):
            fn()


# ---------------------------------------------------------------------------------------------
# The CUDA product's paths

# The forward product's paths on CUDA: the dispatch's choice, the fused kernel it picks at this M
# forced at every M, and dequantize + cuBLAS at every M. On the CPU there is one path.
GEMM_PATHS = ("default", "fused", "cublas")


def gemm_on_path(path: str, x, packed, state, bias=None):
    """F.gemm_4bit(x, packed, state, bias) on one of GEMM_PATHS ("fused" and "cublas" through the
    private op, which is not differentiable)."""
    if path == "default":
        return F.gemm_4bit(x, packed, state, bias)
    return F._gemm_4bit_with(x, packed, state, {"fused": "fused", "cublas": "dequantize_cublas"}[path], bias)


# ---------------------------------------------------------------------------------------------
# Which ops run


class OpCounter(TorchFunctionMode):
    """Inside ``with OpCounter() as ops:``, counts every call of a registered op made from Python
    (``torch.ops.<namespace>.<name>...``, e.g. ``qlora::gemm_4bit``, ``bitsandbytes::gemm_4bit``), by
    its name; ``ops.of("qlora")`` is the counts of one namespace. Only the forward's calls: ops that
    C++ calls (an op's own sub-ops) do not pass through Python, and backward passes (the autograd
    engine's, checkpointing's recomputation inside them included) run outside the mode."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.OpOverload):
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))

    def of(self, namespace: str) -> dict:
        return {k: v for k, v in self.counts.items() if k.startswith(namespace + "::")}


# ---------------------------------------------------------------------------------------------
# Weights, inputs and the products' reference


def make_weight(n, k, device, gen, dtype=torch.bfloat16, blocksize=64, quant_type="nf4", dq=True):
    w = random_weights(n * k, torch.float32, "cpu", gen, blocksize).reshape(n, k)
    # an RMS of 0.05, as in trained layers, so that float16 products stay in range
    w = (w * (0.05 / w.pow(2).mean().sqrt().clamp_min(1e-30))).to(dtype).to(device)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    return packed, state


# Under compute-sanitizer (bench/sanitize.sh sets QLORA_SANITIZER) CUPTI cannot subscribe, so the
# profiler-based checks of which kernel ran are left to the plain GPU run.
CAN_PROFILE = not os.environ.get("QLORA_SANITIZER")


def cuda_kernels_launched(fn, *args) -> list[str]:
    """The names of the CUDA kernels fn(*args) launches (torch.profiler), so that a test can tell a
    fused kernel from the fallback it would silently take."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def make_input(shape, dtype, device, gen):
    # Activations: unit Gaussians with a few large channels, as in transformer layers.
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 7)] *= 8
    return x.to(dtype).to(device)


def unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]


def assert_close_to_reference(out, x, w, bias=None, what=""):
    """out against x @ w^T + bias in float64, w the dequantized weight (float64 here).

    The bound, element by element, with u the unit roundoff of the output dtype (2^-8 for bf16):
    the output's own rounding (u * |ref|) plus the weight as the kernel sees it: the fused kernel
    multiplies bf16(code) by the fp32 scale where the dequantized weight is bf16(code * scale), two
    roundings of at most u each, so up to 2u * |x| @ |w|^T; fp32 accumulation adds
    K * 2^-24 * |x| @ |w|^T. Where the output or a weight falls below the dtype's normal range the
    relative terms fail (float16's subnormals are spaced 2^-24 apart, whatever their size): half that
    spacing for the output and for each weight times |x| is added (found by tests/test_properties.py:
    an fp16 product of 2.4e-6 off by 1.7e-8). A wrong index or scale is off by the order of
    |x| @ |w|^T itself, far past the bound.
    """
    u = unit_roundoff(out.dtype)
    xd, wd = x.double().cpu(), w.double().cpu()
    ref = xd @ wd.T
    if bias is not None:
        ref = ref + bias.double().cpu()
    mag = xd.abs() @ wd.abs().T
    k = x.shape[-1]
    sub = torch.finfo(out.dtype).tiny * torch.finfo(out.dtype).eps / 2  # half the subnormal spacing
    bound = u * ref.abs() + (2 * u + k * 2.0**-24) * mag + sub * (1 + xd.abs().sum(-1, keepdim=True)) + 1e-30
    got = out.double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not got.isnan().any(), f"{what}: NaN in the output"
    err = (got - ref).abs()
    bad = err > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements past the bound; at {i}: got {got[tuple(i)].item()}, "
            f"ref {ref[tuple(i)].item()}, bound {bound[tuple(i)].item()}"
        )


# ---------------------------------------------------------------------------------------------
# The format's definition


def unpack_codes(p: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes of packed `p`, in order (a byte's high nibble first), as int64."""
    packed = p.reshape(-1).view(torch.uint8).long()
    return torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]


def reference_dequantize(p: torch.Tensor, s: QuantState) -> torch.Tensor:
    """Dequantization by the format's definition, in torch's float32 arithmetic (IEEE, no flush):
    scale = code2[q] * nested_absmax + offset, each rounded; value = code[nibble] * scale, rounded to
    the dtype to nearest even (FP4's code 0b1000 is +0.0 in the spec's table)."""
    n = math.prod(s.shape)
    nib = unpack_codes(p, n)
    table = code_tensor(s.quant_type, p.device)
    if s.nested:
        scales = s.state2.code[s.absmax.long()] * s.state2.absmax.repeat_interleave(256)[: s.absmax.numel()]
        scales = scales + s.offset
    else:
        scales = s.absmax
    vals = table[nib] * scales.repeat_interleave(s.blocksize)[:n]
    return vals.to(s.dtype).reshape(s.shape)


def transposed_kernel_weight(p: torch.Tensor, s: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as gemm_4bit_transposed's own kernel (M <= 16 on CUDA) rounds it: the code's value
    in the dtype times the block scale in the dtype, the product rounded once (dequantize_4bit rounds
    code * scale once instead). Both factors have at most 11 significant bits, so float32 holds their
    product exactly and `.to` rounds once, as the kernel's HMUL2 does. fp16: the weight its mmas
    multiply. bf16, where the kernel scales grad instead (bf16(grad * bf16(scale)) times bf16(code)):
    each term is off grad times this weight by two roundings at most (grad * scale's and this
    weight's), which assert_close_to_reference allows a fused kernel's weight; a one-hot grad gives
    this weight's rows to the bit. `dtype`: grad's, where the kernel rounds (default the weight's)."""
    dtype = dtype or s.dtype
    n = math.prod(s.shape)
    nib = unpack_codes(p, n)
    code = code_tensor(s.quant_type, p.device).to(dtype)[nib].float()
    scale = F.dequantize_absmax(s).to(dtype).float().repeat_interleave(s.blocksize)[:n]
    return (code * scale).to(dtype).reshape(s.shape)


# ---------------------------------------------------------------------------------------------
# The LoRA layer


def fp32_scale(p: float) -> float:
    """The kernels' scale: 1 / (1 - p) rounded to float32, as torch's dropout computes it."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)) if p < 1 else 0.0


def mask_of(shape, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The kept elements (bool) of a tensor of `shape` under `seed`."""
    ones = torch.ones(shape, dtype=torch.float32, device=seed.device)
    return F.lora_dropout(ones, p, seed) != 0


class Layer:
    """A 4-bit weight, its bias and adapters, with fresh random values (B not zero: a zero B would
    hide every error of the adapter path)."""

    def __init__(self, n, k, r, device, gen, dtype=torch.bfloat16, adapter_dtype=None, bias=True, **fmt):
        self.packed, self.state = make_weight(n, k, device, gen, dtype=dtype, **fmt)
        adapter_dtype = adapter_dtype or dtype
        self.bias = make_input((n,), dtype, device, gen) * 0.1 if bias else None
        self.A = (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(adapter_dtype).to(device)
        self.B = (torch.randn(n, r, generator=gen) / math.sqrt(r)).to(adapter_dtype).to(device)
        self.scaling = 16 / r
        self.W = F.dequantize_4bit(self.packed, self.state)

    def __call__(self, x, p=0.0, seed=None, A=None, B=None, bias=None):
        return F.lora_linear(
            x,
            self.packed,
            self.state,
            self.A if A is None else A,
            self.B if B is None else B,
            self.scaling,
            p,
            self.bias if bias is None else bias,
            seed,
        )

    def reference(self, x, p, seed, dtype):
        """The layer composed of plain PyTorch ops in `dtype` with the same mask, and its function."""
        mask = mask_of(x.shape, seed, p) if p > 0 else None
        scale = fp32_scale(p)
        W = self.W.to(dtype)

        def f(x, A, B, bias):
            xd = x if mask is None else x * mask * scale
            y = torch.nn.functional.linear(x, W, bias)
            return y + self.scaling * torch.nn.functional.linear(torch.nn.functional.linear(xd, A), B)

        return f


def reference_outputs(layer, x, g, p, seed, dtype):
    """y, dx, dA, dB (and dbias) of the PyTorch composition with every input cast to `dtype`."""
    f = layer.reference(x, p, seed, dtype)
    inputs = [
        x.detach().to(dtype).requires_grad_(),
        layer.A.detach().to(dtype).requires_grad_(),
        layer.B.detach().to(dtype).requires_grad_(),
    ]
    bias = layer.bias.detach().to(dtype).requires_grad_() if layer.bias is not None else None
    y = f(*inputs, bias)
    grads = torch.autograd.grad(y, inputs + ([bias] if bias is not None else []), g.to(dtype))
    return [y.detach(), *grads]


def ours_outputs(layer, x, g, p, seed):
    x = x.detach().requires_grad_()
    A = layer.A.detach().requires_grad_()
    B = layer.B.detach().requires_grad_()
    bias = layer.bias.detach().requires_grad_() if layer.bias is not None else None
    y = layer(x, p, seed, A, B, bias)
    grads = torch.autograd.grad(y, [x, A, B] + ([bias] if bias is not None else []), g)
    return [y.detach(), *grads]


def assert_within_twice_the_reference_error(ours, low, exact, names):
    """flash-attention's rule: our error against float64 within 2x that of plain PyTorch in the same
    precision (plus a floor of a few units in the last place for outputs PyTorch gets exactly)."""
    for o, lo, ex, name in zip(ours, low, exact, names):
        assert o.shape == ex.shape and o.dtype == lo.dtype, (name, o.shape, ex.shape, o.dtype, lo.dtype)
        ex = ex.double().cpu()
        err = (o.double().cpu() - ex).abs().max().item()
        ref_err = (lo.double().cpu() - ex).abs().max().item()
        floor = 4 * torch.finfo(o.dtype).eps * ex.abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs PyTorch's {ref_err:.3g} (floor {floor:.3g})"


# ---------------------------------------------------------------------------------------------
# Whole models


WORDS = (
    "the a model weight layer adapter quantized four bit train step loss token prompt response answer is of to".split()
)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]


def tiny_llama(seed: int, device: str = "cpu", meta: bool = False):
    import transformers  # the modules that call this skip without it

    cfg = transformers.LlamaConfig(
        # rows of a multiple of 64 k: bitsandbytes 0.50.2's C++ CPU dequantize disagrees with its own format
        # (and with its flat torch path) on a 64 x 96 weight with blocksize 64; see the README
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if meta:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg).eval()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model if device == "cpu" else model.to(device)


def tiny_lm_dir(path, seed: int, dtype: torch.dtype = torch.float32):
    """tiny_llama(seed) in `dtype` and a word-level tokenizer over WORDS, written to `path` with
    save_pretrained, as a model on the Hub is: what from_pretrained and the trainers read."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")  # fmt: skip
    fast.save_pretrained(str(path))
    model = tiny_llama(seed).to(dtype)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 1, 2, 3
    model.save_pretrained(str(path))
    return path


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread within the block: the CPU products then reduce in the order of a
    process that torchrun (OMP_NUM_THREADS=1) or the spawn helper of test_distributed.py runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
