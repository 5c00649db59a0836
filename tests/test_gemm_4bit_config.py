"""The CUDA forward product's dispatch table (csrc/gemm_4bit_config.cpp), read without a GPU through
_C._gemm_4bit_config: which kernel configuration gemm_4bit runs for x [M, K] and a 4-bit weight
[N, K] on an H100 / H200 (sm_90, 132 SMs) and an A100 (sm_80, 108 SMs).

The expectations are those of the dispatch before the table existed (the variant-0 path of
csrc/cuda/gemm_4bit.cu at 26789df, read branch by branch: the fused gate, the two-group
warp-specialized kernel where it fits, the wgmma kernels by dtype and weight size, the cut to
dequantize + cuBLAS above M = 64, the register-fed kernel on rows of more than 16384 k, the one-group
warp-specialized kernel, the stream kernel), so that a change of any choice fails here. bf16 with
double quantization, blocksize 64 and aligned tensors unless a case says otherwise."""

from __future__ import annotations

import pytest

from qlora_ext import _C

H200 = dict(sm_major=9, sm_minor=0, sms=132)
A100 = dict(sm_major=8, sm_minor=0, sms=108)

# (gpu, dtype, N, K, M, expected configuration, other arguments)
CASES = [
    # 4096x4096 (2^24 codes, rows of 4096 k): the stream kernel at M <= 8, the two-group
    # warp-specialized kernel up to M = 32, the tensor-copy wgmma kernel up to 128, then cuBLAS.
    (H200, "bfloat16", 4096, 4096, 1, "stream_16x8", {}),
    (H200, "bfloat16", 4096, 4096, 8, "stream_16x8", {}),
    (H200, "bfloat16", 4096, 4096, 9, "ws_32x16", {}),
    (H200, "bfloat16", 4096, 4096, 16, "ws_32x16", {}),
    (H200, "bfloat16", 4096, 4096, 17, "ws_32x32", {}),
    (H200, "bfloat16", 4096, 4096, 32, "ws_32x32", {}),
    (H200, "bfloat16", 4096, 4096, 33, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 4096, 4096, 64, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 4096, 4096, 65, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 4096, 4096, 128, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 4096, 4096, 129, "dequantize_cublas", {}),
    (H200, "bfloat16", 4096, 4096, 256, "dequantize_cublas", {}),
    (H200, "bfloat16", 4096, 4096, 1024, "dequantize_cublas", {}),
    # 11008x4096 (2^25 codes or more): the two-group kernel with 4 stages (K < 8192) up to M = 16,
    # the tensor-copy kernel from M = 17 up to 256 (bf16 and 2^25 codes).
    (H200, "bfloat16", 11008, 4096, 1, "ws_32x8", {}),
    (H200, "bfloat16", 11008, 4096, 8, "ws_32x8", {}),
    (H200, "bfloat16", 11008, 4096, 16, "ws_32x16", {}),
    (H200, "bfloat16", 11008, 4096, 17, "wgmma_tma_128x32", {}),
    (H200, "bfloat16", 11008, 4096, 64, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 11008, 4096, 128, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 11008, 4096, 129, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 11008, 4096, 256, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 11008, 4096, 257, "dequantize_cublas", {}),
    # Rows of 8192 k or more: the deepest ring at M <= 8.
    (H200, "bfloat16", 8192, 8192, 1, "ws_32x8_deep", {}),
    (H200, "bfloat16", 8192, 8192, 8, "ws_32x8_deep", {}),
    (H200, "bfloat16", 8192, 8192, 9, "ws_32x16", {}),
    (H200, "bfloat16", 8192, 8192, 17, "wgmma_tma_128x32", {}),
    (H200, "bfloat16", 8192, 8192, 256, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 4096, 11008, 1, "ws_32x8_deep", {}),
    (H200, "bfloat16", 4096, 11008, 16, "ws_32x16", {}),
    (H200, "bfloat16", 28672, 8192, 1, "ws_32x8_deep", {}),
    (H200, "bfloat16", 28672, 8192, 16, "ws_32x16", {}),
    (H200, "bfloat16", 28672, 8192, 32, "wgmma_tma_128x32", {}),
    (H200, "bfloat16", 28672, 8192, 128, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 28672, 8192, 200, "wgmma_tma_128x256", {}),
    # 8192x28672: two buffers of 32 rows' scales do not fit the shared memory; the one-group kernel
    # at M <= 8, the tensor-copy kernel from M = 9.
    (H200, "bfloat16", 8192, 28672, 1, "ws_16x8", {}),
    (H200, "bfloat16", 8192, 28672, 8, "ws_16x8", {}),
    (H200, "bfloat16", 8192, 28672, 9, "wgmma_tma_128x16", {}),
    (H200, "bfloat16", 8192, 28672, 16, "wgmma_tma_128x16", {}),
    (H200, "bfloat16", 8192, 28672, 17, "wgmma_tma_128x32", {}),
    (H200, "bfloat16", 8192, 28672, 64, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 8192, 28672, 256, "wgmma_tma_128x256", {}),
    # fp16: the same mma.sync kernels; the wgmma kernel's float decode from M = 33.
    (H200, "float16", 8192, 8192, 1, "ws_32x8_deep", {}),
    (H200, "float16", 8192, 8192, 16, "ws_32x16", {}),
    (H200, "float16", 8192, 8192, 17, "stream_16x32", {}),
    (H200, "float16", 8192, 8192, 32, "stream_16x32", {}),
    (H200, "float16", 8192, 8192, 33, "wgmma_128x64", {}),
    (H200, "float16", 8192, 8192, 64, "wgmma_128x64", {}),
    (H200, "float16", 8192, 8192, 65, "wgmma_128x128", {}),
    (H200, "float16", 8192, 8192, 129, "wgmma_128x256", {}),
    (H200, "float16", 8192, 8192, 256, "wgmma_128x256", {}),
    (H200, "float16", 8192, 8192, 257, "dequantize_cublas", {}),
    (H200, "float16", 11008, 4096, 100, "wgmma_128x128", {}),
    (H200, "float16", 11008, 4096, 129, "dequantize_cublas", {}),
    (H200, "float16", 4096, 4096, 17, "ws_32x32", {}),
    (H200, "float16", 4096, 4096, 33, "wgmma_128x64", {}),
    (H200, "float16", 8192, 28672, 9, "ws_16x16", {}),
    (H200, "float16", 8192, 28672, 17, "mma_32x32", {}),
    (H200, "float16", 8192, 28672, 33, "wgmma_128x64", {}),
    # float32: the dequantized weight and cuBLAS at every M.
    (H200, "float32", 8192, 8192, 1, "dequantize_cublas", {}),
    (A100, "float32", 4096, 4096, 16, "dequantize_cublas", {}),
    # A100: the stream kernel, or the register-fed kernel on rows of more than 16384 k; cuBLAS above 64.
    (A100, "bfloat16", 4096, 4096, 1, "stream_16x8", {}),
    (A100, "bfloat16", 4096, 4096, 16, "stream_16x16", {}),
    (A100, "bfloat16", 4096, 4096, 17, "stream_16x32", {}),
    (A100, "bfloat16", 4096, 4096, 64, "stream_16x64", {}),
    (A100, "bfloat16", 4096, 4096, 65, "dequantize_cublas", {}),
    (A100, "bfloat16", 28672, 8192, 1, "stream_16x8", {}),
    (A100, "bfloat16", 8192, 8192, 100, "dequantize_cublas", {}),
    (A100, "bfloat16", 8192, 28672, 1, "mma_16x8", {}),
    (A100, "bfloat16", 8192, 28672, 16, "mma_16x16", {}),
    (A100, "bfloat16", 8192, 28672, 17, "mma_32x32", {}),
    (A100, "bfloat16", 8192, 28672, 64, "mma_32x32", {}),
    (A100, "bfloat16", 8192, 28672, 65, "dequantize_cublas", {}),
    (A100, "float16", 8192, 8192, 40, "stream_16x64", {}),
    # the stream kernel's shared memory grows with K (84480 + 64 (blocks + 1) bytes: 100928 at 16384 k):
    # where the GPU offers less, the register-fed kernel
    (A100, "bfloat16", 4096, 16384, 1, "stream_16x8", dict(smem_optin=100928)),
    (A100, "bfloat16", 4096, 16384, 1, "mma_16x8", dict(smem_optin=100927)),
    # The query's fused_max_m (_gemm_4bit_with("fused") sets it): >= 0 forces a fused kernel at every M up
    # to it, 0 sends all to cuBLAS.
    (H200, "bfloat16", 4096, 4096, 1024, "stream_16x64", dict(fused_max_m=1 << 40)),
    (H200, "bfloat16", 8192, 28672, 1024, "mma_32x32", dict(fused_max_m=1 << 40)),
    (H200, "bfloat16", 8192, 8192, 1024, "stream_16x64", dict(fused_max_m=1 << 40)),
    (H200, "bfloat16", 4096, 4096, 129, "stream_16x64", dict(fused_max_m=200)),
    (H200, "bfloat16", 4096, 4096, 201, "dequantize_cublas", dict(fused_max_m=200)),
    (H200, "bfloat16", 8192, 8192, 1, "dequantize_cublas", dict(fused_max_m=0)),
    (A100, "bfloat16", 4096, 4096, 300, "stream_16x64", dict(fused_max_m=1 << 40)),
    # Alignment: 16-byte codes for the bulk copies, cp.async and wgmma, 8 for any fused kernel;
    # 16-byte x; scales read 4 at a time by the warp-specialized kernel, 8-bit codes as words by wgmma.
    (H200, "bfloat16", 8192, 8192, 1, "mma_16x8", dict(packed_alignment=8)),
    (H200, "bfloat16", 8192, 8192, 17, "mma_32x32", dict(packed_alignment=8)),
    (H200, "bfloat16", 8192, 8192, 1, "dequantize_cublas", dict(packed_alignment=4)),
    (H200, "bfloat16", 8192, 8192, 1, "dequantize_cublas", dict(x_alignment=8)),
    (H200, "bfloat16", 8192, 8192, 1, "stream_16x8", dict(scales_alignment=2)),
    (H200, "bfloat16", 8192, 8192, 17, "stream_16x32", dict(scales_alignment=2)),
    (H200, "bfloat16", 8192, 8192, 1, "ws_32x8_deep", dict(nested=False, scales_alignment=16)),
    (H200, "bfloat16", 8192, 8192, 1, "stream_16x8", dict(nested=False, scales_alignment=4)),
    (H200, "bfloat16", 8192, 8192, 17, "wgmma_tma_128x32", dict(nested=False, scales_alignment=4)),
    # Blocksizes: at least 64, whole blocks a row; the warp-specialized kernel needs blocks a row in
    # multiples of 4 up to 1536 and its layout within the shared memory.
    (H200, "bfloat16", 8192, 8192, 1, "dequantize_cublas", dict(blocksize=32)),
    (H200, "bfloat16", 8192, 8192, 1, "stream_16x8", dict(blocksize=4096)),
    (H200, "bfloat16", 8192, 8192, 17, "wgmma_tma_128x32", dict(blocksize=4096)),
    (H200, "bfloat16", 200, 4160, 1, "dequantize_cublas", dict(blocksize=128)),
    (H200, "bfloat16", 40, 16448, 1, "mma_16x8", {}),  # 257 blocks a row, rows of more than 16384 k
    (H200, "bfloat16", 40, 8256, 1, "stream_16x8", {}),  # 129 blocks a row
    (H200, "bfloat16", 4096, 98304, 1, "mma_16x8", {}),  # 1536 blocks a row: no warp-specialized layout fits
    (H200, "bfloat16", 4096, 98304, 17, "wgmma_tma_128x32", {}),
    (A100, "bfloat16", 4096, 98304, 17, "mma_32x32", {}),
    # The build: without sm_90a code no wgmma kernel, without sm_90 code no warp-specialized kernel.
    (H200, "bfloat16", 8192, 8192, 17, "stream_16x32", dict(sm90a_code=False)),
    (H200, "bfloat16", 8192, 8192, 100, "dequantize_cublas", dict(sm90a_code=False)),
    (H200, "bfloat16", 8192, 8192, 1, "ws_32x8_deep", dict(sm90a_code=False)),
    (H200, "bfloat16", 8192, 8192, 1, "stream_16x8", dict(sm90_code=False, sm90a_code=False)),
    # A GPU whose reserved shared memory leaves the tensor-copy kernel's table no room.
    (H200, "bfloat16", 8192, 8192, 17, "stream_16x32", dict(smem_reserved=40000)),
]


def case_ids(cases):
    return [
        f"sm{g['sm_major']}{g['sm_minor']}-{d}-{n}x{k}-M{m}-{expected}"
        + ("-" + "-".join(f"{a}={b}" for a, b in kw.items()) if kw else "")
        for g, d, n, k, m, expected, kw in cases
    ]


def assert_choice(gpu, dtype, n, k, m, expected, kwargs, transposed=False):
    args = dict(kwargs)
    nested = args.pop("nested", True)
    config = _C._gemm_4bit_config(m, n, k, dtype, "nf4", nested, **gpu, **args, transposed=transposed)
    assert config["name"] == expected, config
    # NF4 or FP4 does not change the choice
    assert _C._gemm_4bit_config(m, n, k, dtype, "fp4", nested, **gpu, **args, transposed=transposed) == config


@pytest.mark.parametrize("gpu,dtype,n,k,m,expected,kwargs", CASES, ids=case_ids(CASES))
def test_dispatch_table(gpu, dtype, n, k, m, expected, kwargs):
    assert_choice(gpu, dtype, n, k, m, expected, kwargs)


# The backward product's table (choose_transposed_config; grad [M, N], the weight [N, K]): above
# M = 16 (its own small-M kernel's reach, decided in csrc/cuda/gemm_4bit_transposed.cu) the
# tensor-copy wgmma kernel transposed, bf16 on sm_90a, M up to 128 (256 on weights of 2^25 elements
# or more), N and K whole 64s, 16-byte codes and grad; dequantize + cuBLAS otherwise.
TRANSPOSED_CASES = [
    (H200, "bfloat16", 4096, 4096, 17, "wgmma_tma_128x32", {}),
    (H200, "bfloat16", 4096, 4096, 32, "wgmma_tma_128x32", {}),
    (H200, "bfloat16", 4096, 11008, 33, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 28672, 8192, 64, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 8192, 28672, 65, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 8192, 8192, 128, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 8192, 8192, 129, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 8192, 8192, 256, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 8192, 8192, 257, "dequantize_cublas", {}),
    # above M = 128 only on weights of 2^25 elements or more
    (H200, "bfloat16", 4096, 4096, 128, "wgmma_tma_128x128", {}),
    (H200, "bfloat16", 4096, 4096, 129, "dequantize_cublas", {}),
    (H200, "bfloat16", 4096, 4096, 256, "dequantize_cublas", {}),
    (H200, "bfloat16", 8192, 4096, 256, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 8128, 4096, 256, "dequantize_cublas", {}),
    (H200, "bfloat16", 11008, 4096, 256, "wgmma_tma_128x256", {}),
    (H200, "bfloat16", 8192, 8192, 16, "dequantize_cublas", {}),  # (the small-M kernel's, not this table's)
    (H200, "bfloat16", 8192, 8192, 1, "dequantize_cublas", {}),
    (H200, "float16", 8192, 8192, 64, "dequantize_cublas", {}),
    (H200, "float32", 8192, 8192, 64, "dequantize_cublas", {}),
    (A100, "bfloat16", 8192, 8192, 64, "dequantize_cublas", {}),
    (H200, "bfloat16", 8192, 8192, 64, "dequantize_cublas", dict(sm90a_code=False)),
    (H200, "bfloat16", 136, 8192, 64, "dequantize_cublas", {}),  # N not whole stages of 64 rows
    (H200, "bfloat16", 192, 8192, 64, "wgmma_tma_128x64", {}),
    (H200, "bfloat16", 8192, 4160, 64, "wgmma_tma_128x64", {}),  # K: 32.5 tiles of 128 columns
    (H200, "bfloat16", 8192, 8192, 64, "dequantize_cublas", dict(blocksize=32)),
    (H200, "bfloat16", 8192, 8192, 64, "wgmma_tma_128x64", dict(blocksize=4096)),
    (H200, "bfloat16", 192, 4160, 64, "dequantize_cublas", dict(blocksize=128)),  # rows not whole blocks
    (H200, "bfloat16", 8192, 8192, 64, "dequantize_cublas", dict(x_alignment=8)),
    (H200, "bfloat16", 8192, 8192, 64, "dequantize_cublas", dict(packed_alignment=8)),
    (H200, "bfloat16", 8192, 8192, 64, "dequantize_cublas", dict(smem_reserved=40000)),
]


@pytest.mark.parametrize("gpu,dtype,n,k,m,expected,kwargs", TRANSPOSED_CASES, ids=case_ids(TRANSPOSED_CASES))
def test_transposed_dispatch_table(gpu, dtype, n, k, m, expected, kwargs):
    assert_choice(gpu, dtype, n, k, m, expected, kwargs, transposed=True)


def test_configs_are_named_and_whole():
    configs = _C._gemm_4bit_configs()
    names = [c["name"] for c in configs]
    assert len(set(names)) == len(names)
    expected = {c[5] for c in CASES}
    assert expected <= set(names), expected - set(names)
    by_name = {c["name"]: c for c in configs}
    # a choice returns the table's entry, fields and all
    assert _C._gemm_4bit_config(1, 8192, 8192, "bfloat16", "nf4", True, **H200) == by_name["ws_32x8_deep"]
    assert by_name["ws_32x8_deep"] == dict(
        name="ws_32x8_deep", kernel="ws", row_groups=2, token_octets=1, math_warps=8, max_stages=8
    )
    assert by_name["wgmma_tma_128x16"] == dict(
        name="wgmma_tma_128x16", kernel="wgmma", tokens=16, stages=10, tensor_copy=True, ctas_per_sm=2
    )
    assert by_name["mma_16x8"] == dict(name="mma_16x8", kernel="mma", row_groups=1, token_octets=1, unroll=2)
    assert by_name["stream_16x64"] == dict(name="stream_16x64", kernel="stream", token_octets=8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        _C._gemm_4bit_config(1, 64, 64, "float64", "nf4", True, **H200)
    with pytest.raises(ValueError, match="quant_type"):
        _C._gemm_4bit_config(1, 64, 64, "bfloat16", "int4", True, **H200)
    with pytest.raises(ValueError, match="positive"):
        _C._gemm_4bit_config(0, 64, 64, "bfloat16", "nf4", True, **H200)
