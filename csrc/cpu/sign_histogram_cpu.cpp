// CPU kernel of nepenthe_ext::sign_histogram_: add the per-channel sign counts of x [outer, C, inner]
// (any strides) into hist int64[C, 4|5]. Contract: nepenthe/ops/backends.py; engine: common.h.
#include "common.h"

namespace nepenthe_cpu {
namespace {

void sign_histogram_cpu(const at::Tensor& hist, const at::Tensor& x, std::optional<double> upper) {
  constexpr const char* op = "nepenthe_ext::sign_histogram_";
  check_x3(x, op, "x");
  check_hist(hist, x.size(1), op);
  if (x.numel() == 0) return;
  Geometry g{x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2), 0, 0, 0};
  int64_t* h = hist.data_ptr<int64_t>();
  const int64_t bins = hist.size(1);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    count_and_activate<T, NONE>(g, static_cast<const T*>(x.const_data_ptr()), nullptr, false, h, bins, upper, 0.0);
  });
}

}  // namespace
}  // namespace nepenthe_cpu

TORCH_LIBRARY_IMPL(nepenthe_ext, CPU, m) {
  m.impl("sign_histogram_", &nepenthe_cpu::sign_histogram_cpu);
}
