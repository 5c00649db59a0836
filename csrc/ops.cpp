// Every schema of the qlora namespace, once. Kernels register per backend in csrc/cpu and csrc/cuda;
// fake (meta) kernels live in python/qlora_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

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
}

// `import qlora_ext._C` loads this library, whose static initializers register the ops above.
static PyModuleDef qlora_module = {PyModuleDef_HEAD_INIT, "_C", "qlora_ext's compiled ops (torch.ops.qlora)", -1,
                                   nullptr};

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
