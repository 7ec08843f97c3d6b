// The operator schemas of hmmn_ops (see docs/internals.md for the canonical argument forms
// the Python front passes in). Kernels live in cpu/ and cuda/; fake (meta) kernels and
// autograd formulas are registered from Python (hmmn_ops/_fake.py, hmmn_ops/_autograd.py),
// so torch.compile sees one op with one fake and one backward.
#include <torch/library.h>

TORCH_LIBRARY(hmmn_ops, m) {
  // Fake kernels are in this Python module; torch imports it when it needs them.
  m.set_python_module("hmmn_ops._fake");

  m.def(
      "kernel_guided_read(Tensor query_key, Tensor memory_key, Tensor memory_value, "
      "Tensor? centers, Tensor? sigma, float scale, int topk, int[] topk_frames) "
      "-> (Tensor out, Tensor lse, Tensor topk_indices)");
  m.def(
      "kernel_guided_read_backward(Tensor grad_out, Tensor query_key, Tensor memory_key, "
      "Tensor memory_value, Tensor? centers, Tensor? sigma, Tensor out, Tensor lse, float scale) "
      "-> (Tensor grad_query_key, Tensor grad_memory_key, Tensor grad_memory_value)");

  m.def("gaussian_softmax(Tensor affinity, Tensor centers, Tensor sigma, int height, int width) -> Tensor");
  m.def("gaussian_softmax_backward(Tensor grad_output, Tensor output) -> Tensor");

  m.def("local_track(Tensor memory_key, Tensor query_key, int window) -> Tensor");
  m.def("global_track(Tensor memory_key, Tensor query_key) -> Tensor");

  m.def(
      "topk_guided_read(Tensor query_key, Tensor memory_key, Tensor memory_value, "
      "Tensor topk_indices, float scale, int ratio) -> (Tensor out, Tensor lse)");
  m.def(
      "topk_guided_read_backward(Tensor grad_out, Tensor query_key, Tensor memory_key, "
      "Tensor memory_value, Tensor topk_indices, Tensor out, Tensor lse, float scale, int ratio) "
      "-> (Tensor grad_query_key, Tensor grad_memory_key, Tensor grad_memory_value)");

  m.def(
      "memory_read(Tensor query_key, Tensor memory_key, Tensor memory_value, "
      "Tensor? memory_shrinkage, Tensor? query_selection, str similarity, float scale, int topk, "
      "bool return_usage) -> (Tensor out, Tensor lse, Tensor topk_indices, Tensor usage)");
  m.def(
      "memory_read_backward(Tensor grad_out, Tensor query_key, Tensor memory_key, Tensor memory_value, "
      "Tensor? memory_shrinkage, Tensor? query_selection, Tensor out, Tensor lse, Tensor topk_indices, "
      "str similarity, float scale) -> (Tensor grad_query_key, Tensor grad_memory_key, "
      "Tensor grad_memory_value, Tensor grad_memory_shrinkage, Tensor grad_query_selection)");
}

#ifdef HMMN_OPS_PY_MODULE
// `import hmmn_ops._C` loads this library so the static registrations above run.
// No Python API is exposed from C++: everything goes through torch.ops.hmmn_ops.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "hmmn_ops native kernels", -1, nullptr};
  return PyModule_Create(&module);
}
}
#endif
