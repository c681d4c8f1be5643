// CUDA implementations of the nepenthe_ext ops (schemas: csrc/nepenthe_ext.cpp; contract:
// nepenthe/ops/backends.py). This file is the ATen glue: it validates arguments with actionable messages,
// selects the device and the current stream, maps dtypes and calls the raw launchers of csrc/cuda/*.cu
// (declared in kernels.h), then checks the launch.
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "kernels.h"

namespace {

using nepenthe_cuda::DType;

constexpr const char* kSupported = "float32, float16, bfloat16 or float64";

std::optional<DType> kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: return std::nullopt;
  }
}

DType checked_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto d = kernel_dtype(t.scalar_type());
  TORCH_CHECK(d.has_value(), op, " (cuda backend): ", name, " has dtype ", t.scalar_type(), "; the CUDA kernels take ",
              kSupported, " (use the torch backend or convert the tensor)");
  return *d;
}

nepenthe_cuda::View3 view3(const at::Tensor& t) {
  nepenthe_cuda::View3 v;
  for (int d = 0; d < 3; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

int num_sms(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return sms;
}

void check_hist(const char* op, const at::Tensor& hist, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, " (cuda backend): x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 3, op, " (cuda backend): x must be a 3-D [outer, C, inner] view (see reference.as_3d), got ",
              "shape ", x.sizes());
  TORCH_CHECK(hist.device() == x.device(), op, " (cuda backend): hist is on ", hist.device(), " but x is on ",
              x.device(), "; allocate hist on x's device");
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.dim() == 2 && hist.is_contiguous() && hist.size(0) == x.size(1) &&
                  (hist.size(1) == 4 || hist.size(1) == 5),
              op, " (cuda backend): hist must be a contiguous int64 tensor of shape [C, 4] or [C, 5] with C = ",
              x.size(1), " (x.size(1)), got ", hist.scalar_type(), " ", hist.sizes(),
              hist.is_contiguous() ? "" : " (not contiguous)");
}

// byte extent of a strided tensor's elements (numel > 0)
std::pair<const char*, const char*> byte_range(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const char* begin = static_cast<const char*>(t.data_ptr());
  return {begin, begin + (last + 1) * t.element_size()};
}

bool same_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.data_ptr() != b.data_ptr() || a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// ----- histograms --------------------------------------------------------------------------------------------
void sign_histogram_cuda(const at::Tensor& hist, const at::Tensor& x, std::optional<double> upper) {
  constexpr const char* op = "nepenthe_ext::sign_histogram_";
  check_hist(op, hist, x);
  const DType dtype = checked_dtype(op, "x", x);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const char* err = nepenthe_cuda::sign_histogram(dtype, x.data_ptr(), view3(x), hist.data_ptr<int64_t>(),
                                                  static_cast<int>(hist.size(1)), upper.has_value(),
                                                  upper.value_or(0.0), num_sms(x), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, op, " (cuda backend): ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void activation_histogram_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& hist, int64_t kind,
                               double negative_slope, std::optional<double> upper) {
  constexpr const char* op = "nepenthe_ext::activation_histogram_";
  check_hist(op, hist, x);
  const DType dtype = checked_dtype(op, "x", x);
  TORCH_CHECK(kind >= 0 && kind < nepenthe_cuda::kNumActivations, op, " (cuda backend): kind must index ",
              "reference.ACTIVATIONS (0..", nepenthe_cuda::kNumActivations - 1, "), got ", kind);
  TORCH_CHECK(out.device() == x.device(), op, " (cuda backend): out is on ", out.device(), " but x is on ",
              x.device());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.sizes() == x.sizes(), op,
              " (cuda backend): out must have x's dtype and shape (", x.scalar_type(), " ", x.sizes(), "), got ",
              out.scalar_type(), " ", out.sizes());
  if (x.numel() == 0) return;
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              " (cuda backend): out has overlapping elements (an expanded / stride-0 view); write into a dense "
              "tensor instead");
  if (x.storage().is_alias_of(out.storage())) {
    const auto xr = byte_range(x), yr = byte_range(out);
    const bool overlap = xr.first < yr.second && yr.first < xr.second;
    TORCH_CHECK(!overlap || same_elements(x, out), op,
                " (cuda backend): out overlaps x without being exactly x (same data pointer and strides); pass "
                "out = x for an inplace activation or a separate tensor");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const char* err = nepenthe_cuda::activation_histogram(
      dtype, x.data_ptr(), view3(x), out.data_ptr(), view3(out), hist.data_ptr<int64_t>(),
      static_cast<int>(hist.size(1)), static_cast<int>(kind), negative_slope, upper.has_value(), upper.value_or(0.0),
      num_sms(x), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, op, " (cuda backend): ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----- masked optimizers ----------------------------------------------------------------------------------------
struct OptimCheck {
  const char* op;
  const at::Tensor& param;
  int64_t index;

  void same_as_param(const at::Tensor& t, const char* list) const {
    TORCH_CHECK(t.defined(), op, " (cuda backend): ", list, "[", index, "] is undefined");
    TORCH_CHECK(t.device() == param.device(), op, " (cuda backend): ", list, "[", index, "] is on ", t.device(),
                " but params[", index, "] is on ", param.device(), "; all tensors must be on one device");
    TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, " (cuda backend): ", list, "[", index, "] has dtype ",
                t.scalar_type(), " but params[", index, "] has ", param.scalar_type());
    TORCH_CHECK(t.sizes() == param.sizes(), op, " (cuda backend): ", list, "[", index, "] has shape ", t.sizes(),
                " but params[", index, "] has ", param.sizes());
    TORCH_CHECK(t.is_contiguous(), op, " (cuda backend): ", list, "[", index, "] must be contiguous (.contiguous())");
  }
};

void check_param(const char* op, const at::Tensor& p, int64_t i, const at::Device& device) {
  TORCH_CHECK(p.defined(), op, " (cuda backend): params[", i, "] is undefined");
  TORCH_CHECK(p.is_cuda() && p.device() == device, op, " (cuda backend): params[", i, "] is on ", p.device(),
              " but params[0] is on ", device, "; all tensors must be on one CUDA device");
  checked_dtype(op, "a parameter", p);
  TORCH_CHECK(p.is_contiguous(), op, " (cuda backend): params[", i, "] must be contiguous (.contiguous())");
  TORCH_CHECK(p.numel() < (int64_t(1) << 47), op, " (cuda backend): params[", i, "] is too large");
}

std::optional<at::Tensor> checked_mask(const char* op, const c10::List<std::optional<at::Tensor>>& masks, int64_t i,
                                       const at::Tensor& p) {
  std::optional<at::Tensor> m = masks.get(i);
  if (!m.has_value() || !m->defined()) return std::nullopt;
  TORCH_CHECK(m->scalar_type() == at::kBool || m->scalar_type() == at::kByte, op, " (cuda backend): masks[", i,
              "] must be a bool tensor (True = keep) or a packed uint8 one (nepenthe.ops.pack_mask), got ",
              m->scalar_type());
  TORCH_CHECK(m->device() == p.device(), op, " (cuda backend): masks[", i, "] is on ", m->device(), " but params[", i,
              "] is on ", p.device());
  if (m->scalar_type() == at::kByte) {  // packed: bit j % 8 of byte j / 8 is element j
    const int64_t packed_bytes = (p.numel() + 7) / 8;
    TORCH_CHECK(m->dim() == 1 && m->numel() == packed_bytes, op, " (cuda backend): masks[", i, "] is uint8 of shape ",
                m->sizes(), "; a packed mask of params[", i, "] (", p.numel(), " elements) must be 1-d with ",
                packed_bytes, " bytes (nepenthe.ops.pack_mask)");
    TORCH_CHECK(m->is_contiguous(), op, " (cuda backend): masks[", i, "] (packed) must be contiguous (.contiguous())");
    return m;
  }
  TORCH_CHECK(m->sizes() == p.sizes(), op, " (cuda backend): masks[", i, "] has shape ", m->sizes(), " but params[",
              i, "] has ", p.sizes());
  TORCH_CHECK(m->is_contiguous(), op, " (cuda backend): masks[", i, "] must be contiguous (.contiguous())");
  return m;
}

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// Group the records by dtype and run one launch per dtype with the chunk metadata on the device.
template <typename Launch>
void launch_grouped(const char* op, const std::vector<nepenthe_cuda::OptimTensor>& records,
                    const std::vector<DType>& dtypes, const at::Device& device, Launch&& launch) {
  constexpr int64_t kWords = sizeof(nepenthe_cuda::OptimTensor) / sizeof(int64_t);
  for (const DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    std::vector<int64_t> members;
    int64_t chunks = 0;
    for (size_t i = 0; i < records.size(); ++i) {
      if (dtypes[i] != dtype) continue;
      members.push_back(static_cast<int64_t>(i));
      chunks += (records[i].numel + nepenthe_cuda::kOptimChunk - 1) / nepenthe_cuda::kOptimChunk;
    }
    if (chunks == 0) continue;
    const int64_t n = static_cast<int64_t>(members.size());
    at::Tensor host = at::empty({n * kWords + chunks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.data_ptr<int64_t>();
    int64_t* entry = h + n * kWords;
    for (int64_t t = 0; t < n; ++t) {
      const auto& rec = records[static_cast<size_t>(members[t])];
      std::memcpy(h + t * kWords, &rec, sizeof rec);
      const int64_t nchunks = (rec.numel + nepenthe_cuda::kOptimChunk - 1) / nepenthe_cuda::kOptimChunk;
      for (int64_t k = 0; k < nchunks; ++k) *entry++ = (t << 32) | k;
    }
    // pinned + non_blocking: the caching host allocator keeps the buffer until the copy has run
    const at::Tensor meta = host.to(device, at::kLong, /*non_blocking=*/true);
    const char* err = launch(dtype, meta.data_ptr<int64_t>(), n, chunks);
    TORCH_CHECK(err == nullptr, op, " (cuda backend): ", err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const c10::List<std::optional<at::Tensor>>& masks, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool first_step) {
  constexpr const char* op = "nepenthe_ext::masked_sgd_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && masks.size() == n, op, " (cuda backend): params, grads and masks must have one ",
              "entry per parameter, got ", n, ", ", grads.size(), " and ", masks.size());
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == n, op, " (cuda backend): momentum = ", momentum,
              " needs one momentum buffer per parameter, got ", momentum_buffers.size(), " for ", n, " parameters");
  if (n == 0) return;
  const at::Device device = params[0].device();
  std::vector<nepenthe_cuda::OptimTensor> records(n);
  std::vector<DType> dtypes(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t idx = static_cast<int64_t>(i);
    check_param(op, p, idx, device);
    const OptimCheck check{op, p, idx};
    check.same_as_param(grads[i], "grads");
    auto& r = records[i];
    r = nepenthe_cuda::OptimTensor{};
    r.param = address(p);
    r.grad = address(grads[i]);
    if (has_momentum) {
      check.same_as_param(momentum_buffers[i], "momentum_buffers");
      r.state[0] = address(momentum_buffers[i]);
    }
    const auto mask = checked_mask(op, masks, idx, p);
    r.mask = mask.has_value() ? address(*mask) : 0;
    r.mask_bits = mask.has_value() && mask->scalar_type() == at::kByte ? 1 : 0;
    r.numel = p.numel();
    dtypes[i] = *kernel_dtype(p.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  nepenthe_cuda::SgdArgs args{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  launch_grouped(op, records, dtypes, device, [&](DType dtype, const int64_t* meta, int64_t tensors, int64_t chunks) {
    return nepenthe_cuda::masked_sgd(dtype, meta, tensors, chunks, args, stream);
  });
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                       const c10::List<std::optional<at::Tensor>>& masks, double lr, double beta1, double beta2,
                       double eps, double weight_decay, int64_t step, bool amsgrad, bool maximize) {
  constexpr const char* op = "nepenthe_ext::masked_adamw_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && masks.size() == n, op,
              " (cuda backend): params, grads, exp_avgs, exp_avg_sqs and masks must have one entry per parameter, "
              "got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), " and ", masks.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, op, " (cuda backend): amsgrad needs one max_exp_avg_sq per ",
              "parameter, got ", max_exp_avg_sqs.size(), " for ", n, " parameters");
  TORCH_CHECK(step >= 1, op, " (cuda backend): step must be >= 1 (the already incremented step count), got ", step);
  if (n == 0) return;
  const at::Device device = params[0].device();
  std::vector<nepenthe_cuda::OptimTensor> records(n);
  std::vector<DType> dtypes(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t idx = static_cast<int64_t>(i);
    check_param(op, p, idx, device);
    const OptimCheck check{op, p, idx};
    check.same_as_param(grads[i], "grads");
    check.same_as_param(exp_avgs[i], "exp_avgs");
    check.same_as_param(exp_avg_sqs[i], "exp_avg_sqs");
    auto& r = records[i];
    r = nepenthe_cuda::OptimTensor{};
    r.param = address(p);
    r.grad = address(grads[i]);
    r.state[0] = address(exp_avgs[i]);
    r.state[1] = address(exp_avg_sqs[i]);
    if (amsgrad) {
      check.same_as_param(max_exp_avg_sqs[i], "max_exp_avg_sqs");
      r.state[2] = address(max_exp_avg_sqs[i]);
    }
    const auto mask = checked_mask(op, masks, idx, p);
    r.mask = mask.has_value() ? address(*mask) : 0;
    r.mask_bits = mask.has_value() && mask->scalar_type() == at::kByte ? 1 : 0;
    r.numel = p.numel();
    dtypes[i] = *kernel_dtype(p.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  nepenthe_cuda::AdamWArgs args{lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize};
  launch_grouped(op, records, dtypes, device, [&](DType dtype, const int64_t* meta, int64_t tensors, int64_t chunks) {
    return nepenthe_cuda::masked_adamw(dtype, meta, tensors, chunks, args, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nepenthe_ext, CUDA, m) {
  m.impl("sign_histogram_", &sign_histogram_cuda);
  m.impl("activation_histogram_", &activation_histogram_cuda);
  m.impl("masked_sgd_", &masked_sgd_cuda);
  m.impl("masked_adamw_", &masked_adamw_cuda);
}
