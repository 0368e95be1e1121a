// The Python module vera_ext._C: loading it registers the operators (csrc/ops.cpp and the backends);
// build_info() says what this build contains, so tests and CI can tell a CPU-only build from a CUDA one.
#include <torch/extension.h>

#ifdef VERA_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef VERA_EXT_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["with_cuda"] = false;
  info["cuda_runtime_version"] = pybind11::none();
#endif
#ifdef NDEBUG
  info["debug"] = false;
#else
  info["debug"] = true;
#endif
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vera_ext compiled operators (registered in torch.ops.vera_ext)";
  m.def("build_info", &build_info, "What this build of vera_ext._C contains.");
}
