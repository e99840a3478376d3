// The compiled library's entry point. Kernel schemas are declared next to their implementations
// (csrc/cpu/<op>.cpp declares the schema and the CPU kernel, csrc/cuda/<op>.cpp adds the CUDA kernel);
// this file opens the namespace and tells Python what was built.
#include <torch/library.h>
#include <pybind11/pybind11.h>

TORCH_LIBRARY(rlhf_fast_C, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_fast compiled kernels (registered as torch.ops.rlhf_fast_C.*)";
#ifdef RLHF_FAST_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
