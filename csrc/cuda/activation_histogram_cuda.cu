// activation_histogram_ on CUDA tensors: y = phi(x) and the sign counts of x in one pass over x, with the
// shared histogram template of kernels.h instantiated per activation kind (relu .. hardswish). Each element
// is read, counted and then written by the same thread, so y may be x itself (inplace). Vector loads/stores
// need y to have x's strides; otherwise the scalar variants walk y with its own strides.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace nepenthe_cuda {
namespace {

template <typename T>
const char* run(const void* x, const View3& xv, void* y, const View3& yv, int64_t* hist, int bins, int kind,
                double slope, bool has_upper, double upper, int num_sms, cudaStream_t stream) {
  hist::HistPlan plan;
  const char* err = hist::plan_hist<T>(x, xv, y, &yv, hist, bins, has_upper, upper, slope, num_sms, plan);
  if (err != nullptr || plan.blocks == 0) return err;
  switch (kind) {
    case 0: hist::launch_plan<T, 0>(plan, stream); break;
    case 1: hist::launch_plan<T, 1>(plan, stream); break;
    case 2: hist::launch_plan<T, 2>(plan, stream); break;
    case 3: hist::launch_plan<T, 3>(plan, stream); break;
    case 4: hist::launch_plan<T, 4>(plan, stream); break;
    case 5: hist::launch_plan<T, 5>(plan, stream); break;
    case 6: hist::launch_plan<T, 6>(plan, stream); break;
    default: return "unknown activation kind";
  }
  return nullptr;
}

}  // namespace

const char* activation_histogram(DType dtype, const void* x, const View3& xv, void* y, const View3& yv,
                                 int64_t* hist, int bins, int kind, double negative_slope, bool has_upper,
                                 double upper, int num_sms, cudaStream_t stream) {
  if (bins != 4 && bins != 5) return "hist must have 4 or 5 columns";
  if (kind < 0 || kind >= kNumActivations) return "unknown activation kind";
  for (int d = 0; d < 3; ++d)
    if (xv.size[d] != yv.size[d]) return "out must have the shape of x";
  switch (dtype) {
    case DType::kFloat32:
      return run<float>(x, xv, y, yv, hist, bins, kind, negative_slope, has_upper, upper, num_sms, stream);
    case DType::kFloat16:
      return run<__half>(x, xv, y, yv, hist, bins, kind, negative_slope, has_upper, upper, num_sms, stream);
    case DType::kBFloat16:
      return run<__nv_bfloat16>(x, xv, y, yv, hist, bins, kind, negative_slope, has_upper, upper, num_sms, stream);
    case DType::kFloat64:
      return run<double>(x, xv, y, yv, hist, bins, kind, negative_slope, has_upper, upper, num_sms, stream);
  }
  return "unsupported dtype (expected float32, float16, bfloat16 or float64)";
}

}  // namespace nepenthe_cuda
