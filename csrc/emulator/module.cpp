// hmmn_ops._C_emulated: the CUDA glue and kernels (csrc/cuda) built for the CUDA emulator. Loading
// it registers CPU kernels for the hmmn_ops_emulated::* ops (schemas defined from Python,
// hmmn_ops/backends.py), i.e. backend="cuda_emulated". No Python API beyond the module itself.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_emulated(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emulated", "hmmn_ops CUDA kernels, emulated on the CPU",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
}
