// Every schema of the qlora namespace, once. Kernels register per backend in csrc/cpu and csrc/cuda;
// fake (meta) kernels live in python/qlora_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "qlora/format.h"
#include "qlora/gemm_4bit_config.h"

TORCH_LIBRARY(qlora, m) {
  // Blockwise 4-bit quantization, bitsandbytes' format: packed uint8 ((n + 1) // 2, 1), two codes a
  // byte (element 2j in the high nibble), and one float32 absmax a block of `blocksize` elements.
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor packed, Tensor absmax)");
  // Double quantization of the block scales: offset = mean(absmax); absmax - offset quantized to the
  // signed 8-bit dynamic map in blocks of `blocksize` (256). Returns (uint8 codes, float32 nested
  // absmax, float32 0-dim offset).
  m.def("quantize_absmax(Tensor absmax, int blocksize) -> (Tensor qabsmax, Tensor nested_absmax, Tensor offset)");
  // The float32 block scales back from their double quantization.
  m.def(
      "dequantize_absmax(Tensor qabsmax, Tensor nested_absmax, Tensor nested_code, Tensor offset, int blocksize) "
      "-> Tensor");
  // Packed 4-bit codes back to a tensor of `shape` and `dtype`. Without double quantization absmax is
  // float32 and nested_absmax, nested_code, offset are None; with it absmax is uint8 and one kernel
  // decodes the scales and the codes.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, ScalarType dtype) -> Tensor");
  // x @ W^T (+ bias) for x of shape [..., K] and the 4-bit weight W of `shape` [N, K] (its packed
  // codes and scales as in dequantize_4bit); the result has x's dtype and shape [..., N].
  m.def(
      "gemm_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, Tensor? bias) -> Tensor");
  // Private, for tests and benchmarks: gemm_4bit with the named kernel configuration (the names of
  // csrc/gemm_4bit_config.cpp; _C._gemm_4bit_configs() lists them), or "fused" (the fused kernel
  // the dispatch picks at this M, at any M), in place of the dispatch's choice, CUDA only;
  // NotImplementedError where that configuration cannot run.
  m.def(
      "_gemm_4bit_with(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, Tensor? bias, "
      "str config) -> Tensor");
  // grad @ W for grad of shape [..., N]: the product of the backward pass, [..., K].
  m.def(
      "gemm_4bit_transposed(Tensor grad, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape) -> Tensor");
  // LoRA's dropout: x * keep / (1 - p), keep drawn from `seed` (int64, one element, on x's device) and
  // each element's row-major index (qlora/dropout.h), so that the backward regenerates the mask.
  m.def("lora_dropout(Tensor x, Tensor seed, float p) -> Tensor");
  // base + lora_dropout(x, seed, p), to the bit: the adapter's share of the backward's dX.
  m.def("lora_dropout_add(Tensor base, Tensor x, Tensor seed, float p) -> Tensor");
  // The adapter products of the layer (qlora/lora.h), the first two fused with the dropout on CUDA: drop(x) @ A^T,
  // grad_down^T @ drop(x) and base + drop(grad_down @ A); x / base [M, K], lora_A [r, K],
  // grad_down [M, r], one dtype; seed may be None when p is 0. Not differentiable themselves: they
  // are the pieces of lora_linear's forward and backward.
  m.def("lora_down(Tensor x, Tensor lora_A, Tensor? seed, float p) -> Tensor");
  m.def("lora_grad_A(Tensor grad_down, Tensor x, Tensor? seed, float p) -> Tensor");
  m.def("lora_dropout_add_mm(Tensor base, Tensor grad_down, Tensor lora_A, Tensor? seed, float p) -> Tensor");
  // The QLoRA layer: x @ W^T + bias + scaling * (lora_dropout(x) @ lora_A^T) @ lora_B^T, W the frozen
  // 4-bit weight [N, K] (arguments as in gemm_4bit), lora_A [r, K], lora_B [N, r] in any float dtype
  // (the products run in x's); seed may be None when dropout_p is 0. Its backward returns the
  // gradients of x, bias, lora_A and lora_B, and keeps only x, x's down-projection [M, r] and the seed.
  m.def(
      "lora_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed) -> Tensor");
  // lora_linear's forward below autograd: its output and the down-projection lora_down(x, lora_A,
  // seed, dropout_p) ([M, r], x's dtype) that its backward keeps. On CUDA at decode sizes (up to 16
  // rows, no dropout) one kernel makes the down-projection while the product's kernel streams the
  // weight, and the product adds the adapter term in its epilogue.
  m.def(
      "lora_linear_forward(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // Several adapters of one base in one batch (PEFT's adapter_names): x @ W^T + bias, and each row m
  // of x (its leading dimensions flattened) adds scaling[a] * (x[m] @ lora_A[a]^T) @ lora_B[a]^T for its
  // adapter a = adapter_index[m] (-1: none, the base alone). lora_A [adapters, r, K], lora_B
  // [adapters, N, r] (adapters of smaller rank zero-padded), one scaling an adapter, adapter_index
  // int64 with an entry a row. Inference only: no dropout, no backward.
  m.def(
      "lora_linear_indexed(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, float[] scaling, Tensor adapter_index) -> Tensor");
  // Rotary position embedding of one tensor, transformers' apply_rotary_pos_emb in one pass: x
  // [batch, heads, seq, head_dim] (head_dim even, h = head_dim / 2; any strides), cos and sin broadcast
  // to x's shape, one float dtype; out[i] = x[i] cos[i] - x[i+h] sin[i], out[i+h] = x[i+h] cos[i+h] +
  // x[i] sin[i+h] for i < h, in float (double for float64) rounded once. backward=True applies the
  // transposed map, x's gradient given the output's (csrc/rotary.cpp); differentiable in x only.
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool backward=False) -> Tensor");
  // SwiGLU's gating in one pass, transformers' act_fn(gate_proj(x)) * up_proj(x) with SiLU (LlamaMLP
  // and its copies): out = silu(gate) * up = gate / (1 + exp(-gate)) * up, gate and up of one shape and
  // float dtype (any strides), in float (double for float64) rounded once. silu_mul_backward gives
  // (grad_gate, grad_up) for the output's gradient (csrc/silu_mul.cpp); silu_mul's autograd keeps gate
  // and up only, not silu(gate). Differentiable once.
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

// `import qlora_ext._C` loads this library, whose static initializers register the ops above.
// A configuration as a dict: its name, kernel family and the family's fields.
static PyObject* config_dict(const qlora::GemmConfig& c) {
  switch (c.kernel) {
    case qlora::GemmKernel::kMma:
      return Py_BuildValue("{s:s,s:s,s:i,s:i,s:i}", "name", c.name, "kernel", "mma", "row_groups", c.mma.row_groups,
                           "token_octets", c.mma.token_octets, "unroll", c.mma.unroll);
    case qlora::GemmKernel::kStream:
      return Py_BuildValue("{s:s,s:s,s:i}", "name", c.name, "kernel", "stream", "token_octets", c.stream.token_octets);
    case qlora::GemmKernel::kWarpSpecialized:
      return Py_BuildValue("{s:s,s:s,s:i,s:i,s:i,s:i}", "name", c.name, "kernel", "ws", "row_groups", c.ws.row_groups,
                           "token_octets", c.ws.token_octets, "math_warps", c.ws.math_warps, "max_stages",
                           c.ws.max_stages);
    case qlora::GemmKernel::kWgmma:
      return Py_BuildValue("{s:s,s:s,s:i,s:i,s:O,s:i}", "name", c.name, "kernel", "wgmma", "tokens", c.wgmma.tokens,
                           "stages", c.wgmma.stages, "tensor_copy", c.wgmma.tensor_copy ? Py_True : Py_False,
                           "ctas_per_sm", c.wgmma.ctas_per_sm);
    default: return Py_BuildValue("{s:s,s:s}", "name", c.name, "kernel", "dequantize_cublas");
  }
}

// The configuration the CUDA gemm_4bit picks (csrc/gemm_4bit_config.cpp) for a problem on a GPU
// described by the arguments, as a config_dict. Host code: tests read the dispatch table without a
// GPU. The GPU's shared memory defaults to the H100 / H200's (sm_90), the A100's (sm_80) or 99 KB;
// on sm_90 the build is taken to have sm_90 and sm_90a code unless the arguments say otherwise.
static PyObject* gemm_4bit_config(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {// required ("LLLsspiii" below)
                                   "M", "N", "K", "dtype", "quant_type", "nested", "sm_major", "sm_minor", "sms",
                                   // optional ("LLiiiLLppp")
                                   "blocksize", "fused_max_m", "x_alignment", "packed_alignment", "scales_alignment",
                                   "smem_optin", "smem_reserved", "sm90_code", "sm90a_code", "transposed", nullptr};
  long long M = 0, N = 0, K = 0, blocksize = 64, fused_max_m = -1, smem_optin = -1, smem_reserved = 1024;
  const char* dtype = nullptr;
  const char* quant_type = nullptr;
  int nested = 0, major = 0, minor = 0, sms = 0, x_alignment = 16, packed_alignment = 16, scales_alignment = 16;
  int sm90_code = -1, sm90a_code = -1, transposed = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLLsspiii|LLiiiLLppp", const_cast<char**>(keywords), &M, &N, &K,
                                   &dtype, &quant_type, &nested, &major, &minor, &sms, &blocksize, &fused_max_m,
                                   &x_alignment, &packed_alignment, &scales_alignment, &smem_optin, &smem_reserved,
                                   &sm90_code, &sm90a_code, &transposed))
    return nullptr;
  const std::string d = dtype;
  if (d != "float32" && d != "float16" && d != "bfloat16") {
    PyErr_SetString(PyExc_ValueError, "_gemm_4bit_config: dtype must be float32, float16 or bfloat16");
    return nullptr;
  }
  if (M < 1 || N < 1 || K < 1 || blocksize < 1 || (blocksize & (blocksize - 1)) != 0) {
    PyErr_SetString(PyExc_ValueError, "_gemm_4bit_config: M, N and K must be positive, blocksize a power of 2");
    return nullptr;
  }
  try {
    qlora::parse_quant_type(quant_type);  // NF4 or FP4: the choice does not depend on it
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  const qlora::GemmQuery q{M,
                           N,
                           K,
                           d == "float32"   ? qlora::GemmDtype::kFloat32
                           : d == "float16" ? qlora::GemmDtype::kFloat16
                                            : qlora::GemmDtype::kBFloat16,
                           nested != 0,
                           blocksize,
                           x_alignment,
                           packed_alignment,
                           scales_alignment,
                           fused_max_m};
  const bool sm90 = major == 9 && minor == 0;
  const size_t optin = smem_optin >= 0                            ? static_cast<size_t>(smem_optin)
                       : major == 9                               ? 232448   // 227 KB
                       : major == 8 && (minor == 0 || minor == 7) ? 166912   // 163 KB
                                                                  : 101376;  // 99 KB
  const qlora::GpuInfo gpu{major,
                           minor,
                           sms,
                           optin,
                           static_cast<uint32_t>(smem_reserved),
                           sm90_code >= 0 ? sm90_code != 0 : sm90,
                           sm90a_code >= 0 ? sm90a_code != 0 : sm90};
  return config_dict(transposed != 0 ? qlora::choose_transposed_config(q, gpu) : qlora::choose_gemm_config(q, gpu));
}

// Every configuration _gemm_4bit_with takes, as config_dict's.
static PyObject* gemm_4bit_configs(PyObject*, PyObject*) {
  const int n = static_cast<int>(qlora::GemmConfigId::kCount);
  PyObject* configs = PyList_New(n);
  if (configs == nullptr) return nullptr;
  for (int i = 0; i < n; ++i) {
    PyObject* c = config_dict(qlora::gemm_config(static_cast<qlora::GemmConfigId>(i)));
    if (c == nullptr) {
      Py_DECREF(configs);
      return nullptr;
    }
    PyList_SET_ITEM(configs, i, c);
  }
  return configs;
}

static PyMethodDef qlora_methods[] = {
    {"_gemm_4bit_config", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(gemm_4bit_config)),
     METH_VARARGS | METH_KEYWORDS,
     "_gemm_4bit_config(M, N, K, dtype, quant_type, nested, sm_major, sm_minor, sms, *, blocksize=64, "
     "fused_max_m=-1, x_alignment=16, packed_alignment=16, scales_alignment=16, smem_optin=-1 (the GPU's), "
     "smem_reserved=1024, sm90_code=sm_90, sm90a_code=sm_90, transposed=False) -> dict: the kernel configuration the "
     "CUDA gemm_4bit picks for x [M, K] of dtype ('bfloat16', 'float16', 'float32') and a 4-bit weight [N, K] on that "
     "GPU; transposed: gemm_4bit_transposed's for grad [M, N] (x_alignment: grad's) above M = 16, where its own "
     "small-M kernel does not take the product."},
    {"_gemm_4bit_configs", gemm_4bit_configs, METH_NOARGS,
     "Every kernel configuration torch.ops.qlora._gemm_4bit_with takes, as _gemm_4bit_config's dicts."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef qlora_module = {PyModuleDef_HEAD_INIT, "_C", "qlora_ext's compiled ops (torch.ops.qlora)", -1,
                                   qlora_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&qlora_module); }

// None of these ops is differentiable (codes and scales are integers or frozen statistics), so
// autograd has nothing to record: falling through skips its boxed not-implemented fallback, a few
// microseconds a call that show on small weights.
TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("quantize_4bit", torch::CppFunction::makeFallthrough());
  m.impl("quantize_absmax", torch::CppFunction::makeFallthrough());
  m.impl("dequantize_absmax", torch::CppFunction::makeFallthrough());
  m.impl("dequantize_4bit", torch::CppFunction::makeFallthrough());
  m.impl("_gemm_4bit_with", torch::CppFunction::makeFallthrough());
}
