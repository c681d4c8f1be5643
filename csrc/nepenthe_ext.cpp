// Schemas of the compiled ops (namespace nepenthe_ext) and the Python module nepenthe._C.
//
// The public ops are the nepenthe:: custom ops defined in Python (nepenthe/ops/library.py); they pick
// a backend per call and, for the compiled ones, call these ops. One TORCH_LIBRARY_IMPL per backend
// file registers the kernels: csrc/cpu/*_cpu.cpp (CPU key) and csrc/cuda/ops_cuda.cpp (CUDA key).
// Argument contract (layouts, dtypes, aliasing): see nepenthe/ops/backends.py.
#include <Python.h>

#include <torch/library.h>

#ifdef NEPENTHE_WITH_CUDA
int nepenthe_cuda_runtime_version();  // csrc/cuda/version.cu: CUDART_VERSION the kernels were built with
#endif

TORCH_LIBRARY(nepenthe_ext, m) {
  m.def("sign_histogram_(Tensor(a!) hist, Tensor x, float? upper) -> ()");
  m.def("activation_histogram_(Tensor x, Tensor(a!) out, Tensor(b!) hist, int kind, float negative_slope, "
        "float? upper) -> ()");
  m.def("masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
        "bool first_step) -> ()");
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] masks, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, int step, bool amsgrad, bool maximize) -> ()");
}

namespace {

PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef NEPENTHE_WITH_CUDA
  return PyLong_FromLong(nepenthe_cuda_runtime_version());
#else
  return PyLong_FromLong(0);
#endif
}

PyMethodDef methods[] = {
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDA runtime version the CUDA kernels were built with (e.g. 13000), 0 when built without CUDA."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "nepenthe's compiled ops (torch.ops.nepenthe_ext)", -1, methods};

}  // namespace

// Importing nepenthe._C loads this library, whose static initialisers register the ops above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
