// Runs the CUDA masked SGD / AdamW kernels' per-block code (sgd_block / adamw_block are __host__ __device__)
// on the CPU, so a machine without a GPU still executes the kernel's mask handling: for each dtype, tensors
// spanning several chunks, a short tail and an unaligned start, the step with packed masks must leave every
// parameter and state element bit-identical to the step with bool masks, and masked entries +0.0.
// Built and run by tests/ops/test_packed_masks_kernels.py (nvcc, host code only; prints "ok" or the failure).
#include "../../csrc/cuda/masked_optim_cuda.cu"

#include <cstdio>
#include <cstring>
#include <vector>

namespace {

using nepenthe_cuda::OptimTensor;
using nepenthe_cuda::kOptimChunk;

uint32_t rng_state = 12345u;
uint32_t next_u32() {
  rng_state = rng_state * 1664525u + 1013904223u;
  return rng_state >> 8;
}
float uniform() { return static_cast<float>(next_u32() & 0xffff) / 65536.0f; }

template <typename T> std::vector<T> values(int64_t n, bool positive) {
  std::vector<T> out(static_cast<size_t>(n));
  for (auto& x : out) nepenthe_cuda::hist::store_elem(&x, positive ? uniform() : uniform() * 2.0f - 1.0f);
  return out;
}

// The metadata the glue uploads: OptimTensor records, then one (tensor << 32 | chunk) entry per chunk.
std::vector<int64_t> metadata(const std::vector<OptimTensor>& records, int64_t& chunks) {
  constexpr int64_t kWords = sizeof(OptimTensor) / sizeof(int64_t);
  std::vector<int64_t> meta(records.size() * kWords);
  std::memcpy(meta.data(), records.data(), records.size() * sizeof(OptimTensor));
  chunks = 0;
  for (size_t t = 0; t < records.size(); ++t) {
    const int64_t nchunks = (records[t].numel + kOptimChunk - 1) / kOptimChunk;
    for (int64_t k = 0; k < nchunks; ++k, ++chunks) meta.push_back((static_cast<int64_t>(t) << 32) | k);
  }
  return meta;
}

struct Tensors {  // one parameter and its state, with both forms of its mask
  std::vector<unsigned char> keep, bits;
  int64_t n, offset;
};

template <typename T> bool check_dtype(const char* name) {
  // several chunks + a vector tail; a tail-only tensor; one starting 1 element past an aligned address
  const std::vector<Tensors> shapes = {{{}, {}, 2 * kOptimChunk + 37, 0}, {{}, {}, 45, 0}, {{}, {}, 1031, 1}};
  std::vector<std::vector<T>> runs[2][5];  // [bool | packed][param, grad, s0, s1, s2]
  std::vector<Tensors> masks = shapes;
  for (auto& m : masks) {
    m.keep.resize(static_cast<size_t>(m.n));
    m.bits.assign(static_cast<size_t>((m.n + 7) / 8), 0);
    for (int64_t i = 0; i < m.n; ++i) {
      m.keep[i] = (next_u32() % 3) != 0;
      if (m.keep[i]) m.bits[i >> 3] |= static_cast<unsigned char>(1u << (i & 7));
    }
  }
  for (const auto& m : masks) {
    const int64_t len = m.n + m.offset;
    std::vector<T> init[5] = {values<T>(len, false), values<T>(len, false), values<T>(len, false),
                              values<T>(len, true), values<T>(len, true)};
    for (int r = 0; r < 2; ++r)
      for (int k = 0; k < 5; ++k) runs[r][k].push_back(init[k]);
  }
  for (int op = 0; op < 2; ++op) {  // 0: SGD (nesterov, weight decay), 1: AdamW (amsgrad)
    for (int r = 0; r < 2; ++r) {
      std::vector<OptimTensor> records;
      for (size_t t = 0; t < masks.size(); ++t) {
        OptimTensor rec{};
        const int64_t off = masks[t].offset;
        rec.param = reinterpret_cast<int64_t>(runs[r][0][t].data() + off);
        rec.grad = reinterpret_cast<int64_t>(runs[r][1][t].data() + off);
        for (int s = 0; s < 3; ++s) rec.state[s] = reinterpret_cast<int64_t>(runs[r][2 + s][t].data() + off);
        rec.mask = reinterpret_cast<int64_t>(r == 0 ? masks[t].keep.data() : masks[t].bits.data());
        rec.mask_bits = r;
        rec.numel = masks[t].n;
        records.push_back(rec);
      }
      int64_t chunks = 0;
      const std::vector<int64_t> meta = metadata(records, chunks);
      const int64_t n = static_cast<int64_t>(records.size());
      using A = typename nepenthe_cuda::optim::Elem<T>::acc;
      if (op == 0) {
        nepenthe_cuda::SgdArgs args{0.1, 0.9, 0.0, 1e-2, true, false, false};
        const auto s = nepenthe_cuda::optim::sgd_scalars<A>(args);
        for (int64_t b = 0; b < chunks; ++b)
          for (int tid = 0; tid < nepenthe_cuda::optim::kThreads; ++tid)
            nepenthe_cuda::optim::sgd_block<T>(meta.data(), n, s, b, tid);
      } else {
        nepenthe_cuda::AdamWArgs args{1e-2, 0.9, 0.999, 1e-8, 1e-2, 3, true, false};
        const auto s = nepenthe_cuda::optim::adamw_scalars<A>(args);
        for (int64_t b = 0; b < chunks; ++b)
          for (int tid = 0; tid < nepenthe_cuda::optim::kThreads; ++tid)
            nepenthe_cuda::optim::adamw_block<T>(meta.data(), n, s, b, tid);
      }
    }
  }
  for (size_t t = 0; t < masks.size(); ++t) {
    const int64_t off = masks[t].offset;
    for (int k = 0; k < 5; ++k) {
      if (k == 1) continue;  // the gradient is read only
      const auto& a = runs[0][k][t];
      const auto& b = runs[1][k][t];
      if (std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) != 0) {
        std::printf("FAIL %s: tensor %zu, list %d differs between bool and packed masks\n", name, t, k);
        return false;
      }
      for (int64_t i = 0; i < masks[t].n; ++i) {
        const T zero{};
        if (!masks[t].keep[i] && std::memcmp(&b[off + i], &zero, sizeof(T)) != 0) {
          std::printf("FAIL %s: tensor %zu, list %d, element %lld masked but not +0\n", name, t, k,
                      static_cast<long long>(i));
          return false;
        }
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  const bool ok = check_dtype<float>("float32") && check_dtype<double>("float64") &&
                  check_dtype<__half>("float16") && check_dtype<__nv_bfloat16>("bfloat16");
  if (ok) std::printf("ok\n");
  return ok ? 0 : 1;
}
