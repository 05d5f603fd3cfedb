// Defines the megaswift:: op schemas and their CPU kernels, and makes the .so importable as the
// Python module megaswift._kernels_cpu (importing it is what registers the ops).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(megaswift, m) {
  // vocab_size: the true vocabulary size; columns at or past it (megatron's padding) are ignored.
  m.def("cross_entropy_partials(Tensor logits, Tensor labels, int vocab_start, int vocab_size, int ignore_index)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_backward_(Tensor logits, Tensor labels, Tensor lse, Tensor scale, int vocab_start,"
        " int vocab_size, int ignore_index, Tensor(a!) out) -> Tensor(a!)");
  m.def("pack_first_fit_decreasing(Tensor lengths, int capacity) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(megaswift, CPU, m) {
  m.impl("cross_entropy_partials", &megaswift::cross_entropy_partials_cpu);
  m.impl("cross_entropy_backward_", &megaswift::cross_entropy_backward_cpu_);
  m.impl("pack_first_fit_decreasing", &megaswift::pack_first_fit_decreasing_cpu);
}

extern "C" PyObject* PyInit__kernels_cpu(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels_cpu",
                               "megaswift CPU kernels (ops in torch.ops.megaswift)", -1, nullptr};
  return PyModule_Create(&module);
}
