// Every schema of the qlora namespace, once. Kernels register per backend in csrc/cpu and csrc/cuda;
// fake (meta) kernels live in python/qlora_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "qlora/format.h"
#include "qlora/lora.h"

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
  // grad @ W for grad of shape [..., N]: the product of the backward pass, [..., K].
  m.def(
      "gemm_4bit_transposed(Tensor grad, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int nested_blocksize, str quant_type, SymInt[] shape) -> Tensor");
  // LoRA's dropout: x * keep / (1 - p), keep drawn from `seed` (int64, one element, on x's device) and
  // each element's row-major index (qlora/dropout.h), so that the backward regenerates the mask.
  m.def("lora_dropout(Tensor x, Tensor seed, float p) -> Tensor");
  // base + lora_dropout(x, seed, p), to the bit: the adapter's share of the backward's dX.
  m.def("lora_dropout_add(Tensor base, Tensor x, Tensor seed, float p) -> Tensor");
  // The adapter products of the layer (qlora/lora.h), fused with the dropout on CUDA: drop(x) @ A^T,
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
}

// `import qlora_ext._C` loads this library, whose static initializers register the ops above.
// _set_gemm_fused_max_m(m) -> previous: for benchmarks that time the fused kernel and the
// dequantize + cuBLAS path at one M (-1 restores the default).
static PyObject* set_gemm_fused_max_m(PyObject*, PyObject* arg) {
  const long long m = PyLong_AsLongLong(arg);
  if (m == -1 && PyErr_Occurred()) return nullptr;
  if (m < -1) {
    PyErr_SetString(PyExc_ValueError, "_set_gemm_fused_max_m: m must be -1 (the default) or >= 0");
    return nullptr;
  }
  return PyLong_FromLongLong(qlora::g_gemm_fused_max_m.exchange(m));
}

static PyObject* set_gemm_variant(PyObject*, PyObject* arg) {
  const long v = PyLong_AsLong(arg);
  if (v == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLong(qlora::g_gemm_variant.exchange(static_cast<int>(v)));
}

static PyObject* release_gemm_workspaces(PyObject*, PyObject*) {
  if (qlora::g_release_gemm_workspaces != nullptr) qlora::g_release_gemm_workspaces();
  Py_RETURN_NONE;
}

static PyObject* set_lora_fused(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(qlora::g_lora_fused.exchange(on != 0));
}

static PyMethodDef qlora_methods[] = {
    {"_set_lora_fused", set_lora_fused, METH_O,
     "Whether the CUDA adapter products (lora_down, lora_grad_A, lora_dropout_add_mm) use the fused dropout "
     "kernels (off by default) or the dropout kernel + cuBLAS; returns the previous setting."},
    {"_set_gemm_variant", set_gemm_variant, METH_O,
     "The fused CUDA kernel for benchmarks (0: default by M and K; 1, 2, 5: register-fed; 8: stream; 9: "
     "warp-specialized; 10: warp-specialized with the other math-warp count (16 at M <= 8, 8 above); 11: wgmma; 12: wgmma without K splits; 13: warp-specialized wgmma; 14: wgmma with the bf16 pair table; 15, 16: that table fed by tensor copies (two, one "
     "CTA an SM); 17: warp-specialized with the deepest ring that fits; 19, 20: warp-specialized with tiles of two row "
     "groups, 4 stages / the deepest ring, M <= 64); returns the previous one."},
    {"_release_gemm_workspaces", release_gemm_workspaces, METH_NOARGS,
     "Frees the CUDA products' dequantization workspaces."},
    {"_set_gemm_fused_max_m", set_gemm_fused_max_m, METH_O, "Largest M of the fused CUDA product (-1: default)."},
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
}
