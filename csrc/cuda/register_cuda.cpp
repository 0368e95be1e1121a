// CUDA implementations of every vera_ext operator: the shared orchestration (cuBLAS GEMMs through ATen on the
// current stream) over our CUDA kernels.
#include <torch/library.h>

#include "common/vera_impl.h"
#include "cuda/prims_cuda.h"

TORCH_LIBRARY_IMPL(vera_ext, CUDA, m) {
  using P = vera::cuda::Prims;
  m.impl("vera_forward", &vera::vera_forward<P>);
  m.impl("vera_linear_forward", &vera::vera_linear_forward<P>);
  m.impl("vera_backward", &vera::vera_backward<P>);
  m.impl("vera_project", &vera::vera_project<P>);
  m.impl("vera_apply", &vera::vera_apply<P>);
  m.impl("vera_linear_apply", &vera::vera_linear_apply<P>);
  m.impl("vera_apply_backward", &vera::vera_apply_backward<P>);
  m.impl("vera_delta_weight", &vera::vera_delta_weight<P>);
  m.impl("vera_merge_", &vera::vera_merge_<P>);
}
