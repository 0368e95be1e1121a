// Memory layouts the backends' loops and kernels read, shared by every backend.
#pragma once

#include <ATen/ATen.h>

namespace vera {

// A 2-D tensor whose rows are contiguous (any row stride), copying only when the inner stride is not 1: slices of
// the shared projection (A[:r, :I], B[:O, :r]) come through without a copy.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace vera
