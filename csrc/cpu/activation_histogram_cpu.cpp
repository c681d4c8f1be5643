// CPU kernel of nepenthe_ext::activation_histogram_: out = φ(x) and the sign counts of x added into
// hist, in one pass over x (each element is read once, before its output is written, so out may be
// x itself). Contract: nepenthe/ops/backends.py; engine: common.h.
#include "common.h"

namespace nepenthe_cpu {
namespace {

template <class T, int KIND>
void run_kind(const Geometry& g, const T* x, T* y, bool inplace, int64_t* h, int64_t bins,
              std::optional<double> upper, double slope) {
  count_and_activate<T, KIND>(g, x, y, inplace, h, bins, upper, slope);
}

void activation_histogram_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& hist, int64_t kind,
                              double negative_slope, std::optional<double> upper) {
  constexpr const char* op = "nepenthe_ext::activation_histogram_";
  check_x3(x, op, "x");
  check_cpu(out, op, "out");
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have the shape of x ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": out must have the dtype of x (", x.scalar_type(),
              "), got ", out.scalar_type());
  check_hist(hist, x.size(1), op);
  TORCH_CHECK(kind >= 0 && kind < kNumKinds, op, ": kind ", kind, " is not an activation; expected an index "
              "into reference.ACTIVATIONS (0 relu, 1 relu6, 2 leaky_relu, 3 gelu, 4 gelu_tanh, 5 silu, 6 hardswish)");
  if (x.numel() == 0) return;
  at::assert_no_internal_overlap(out);
  const bool inplace = x.const_data_ptr() == out.const_data_ptr() && x.strides() == out.strides();
  if (!inplace) {
    TORCH_CHECK(at::get_overlap_status(x, out) != at::MemOverlapStatus::Partial, op,
                ": out partially overlaps x; pass out = x itself (inplace) or a separate tensor");
  }
  if (!inplace && out.is_non_overlapping_and_dense() && out.nbytes() >= (int64_t(1) << 24)) {
    // A fresh output (empty_like) is not mapped yet: its first-touch page faults, taken one by one
    // inside the pass, cost ~25% more than faulting the pages in first (measured on a 205 MB fp32
    // output). One store per 4 KiB page of out's own bytes (dense, so every byte is an element that
    // the pass overwrites); on an already mapped output this is ~50k stores.
    auto* bytes = static_cast<volatile char*>(static_cast<char*>(out.data_ptr()));
    const int64_t pages = (static_cast<int64_t>(out.nbytes()) + 4095) / 4096;
    nepenthe_cpu::parallel_for(0, pages, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) bytes[i * 4096] = 0;
    });
  }
  Geometry g{x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2),
             out.stride(0), out.stride(1), out.stride(2)};
  int64_t* h = hist.data_ptr<int64_t>();
  const int64_t bins = hist.size(1);
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* yp = static_cast<T*>(out.data_ptr());
    switch (kind) {
      case RELU: run_kind<T, RELU>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
      case RELU6: run_kind<T, RELU6>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
      case LEAKY_RELU: run_kind<T, LEAKY_RELU>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
      case GELU: run_kind<T, GELU>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
      case GELU_TANH: run_kind<T, GELU_TANH>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
      case SILU: run_kind<T, SILU>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
      default: run_kind<T, HARDSWISH>(g, xp, yp, inplace, h, bins, upper, negative_slope); break;
    }
  });
}

}  // namespace
}  // namespace nepenthe_cpu

TORCH_LIBRARY_IMPL(nepenthe_ext, CPU, m) {
  m.impl("activation_histogram_", &nepenthe_cpu::activation_histogram_cpu);
}
