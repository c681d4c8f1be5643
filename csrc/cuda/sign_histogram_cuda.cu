// sign_histogram_ on CUDA tensors: the kernels are the shared histogram template of kernels.h
// (rows kernel for inner-contiguous layouts such as NCHW, cols kernel for channel-contiguous ones such as
// channels_last / [rows, C], a scalar strided variant of each for everything else) instantiated without an
// activation. fp16/bf16 with aligned 16-byte vectors count two elements per word (Packed16).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace nepenthe_cuda {
namespace {

template <typename T>
const char* run(const void* x, const View3& xv, int64_t* hist, int bins, bool has_upper, double upper, int num_sms,
                cudaStream_t stream) {
  hist::HistPlan plan;
  const char* err = hist::plan_hist<T>(x, xv, nullptr, nullptr, hist, bins, has_upper, upper, 0.0, num_sms, plan);
  if (err != nullptr || plan.blocks == 0) return err;
  hist::launch_plan<T, -1>(plan, stream);
  return nullptr;
}

}  // namespace

const char* sign_histogram(DType dtype, const void* x, const View3& xv, int64_t* hist, int bins, bool has_upper,
                           double upper, int num_sms, cudaStream_t stream) {
  if (bins != 4 && bins != 5) return "hist must have 4 or 5 columns";
  switch (dtype) {
    case DType::kFloat32: return run<float>(x, xv, hist, bins, has_upper, upper, num_sms, stream);
    case DType::kFloat16: return run<__half>(x, xv, hist, bins, has_upper, upper, num_sms, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(x, xv, hist, bins, has_upper, upper, num_sms, stream);
    case DType::kFloat64: return run<double>(x, xv, hist, bins, has_upper, upper, num_sms, stream);
  }
  return "unsupported dtype (expected float32, float16, bfloat16 or float64)";
}

}  // namespace nepenthe_cuda
