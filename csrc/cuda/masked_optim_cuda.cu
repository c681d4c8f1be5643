// masked_sgd_ / masked_adamw_ on CUDA tensors: one torch.optim.SGD / AdamW step (the arithmetic of
// nepenthe.ops.reference, in fp32 for fp16/bf16/fp32 and fp64 for double), then masked entries of the
// parameter and of every state tensor set to exactly +0.0, each element read and written once.
//
// Multi-tensor: the glue groups the tensors of one dtype and uploads a metadata buffer (kernels.h:
// OptimTensor records + chunk entries); one launch covers all of them, one block per chunk of
// kOptimChunk elements. A chunk whose pointers are all 16-byte aligned (bool masks: VEC-byte aligned) moves
// 16-byte vectors; the rest of the chunk (and unaligned chunks) goes element by element through the same
// per-element function, so results do not depend on the path.
//
// Masks: one bool byte per element, or packed bits (OptimTensor::mask_bits: bit i % 8 of byte i / 8, least
// significant first, numpy.packbits(bitorder="little")), read as bits: a chunk starts on a multiple of 8
// elements (kOptimChunk), and a vector's V (2, 4 or 8) elements lie in one byte.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "kernels.h"

namespace nepenthe_cuda {
namespace optim {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Elem {
  using acc = float;
};
template <> struct Elem<double> {
  using acc = double;
};

using hist::load_elem;   // scalar load / store with conversion to / from the compute type (kernels.h)
using hist::store_elem;

__host__ __device__ inline float m_sqrt(float v) { return sqrtf(v); }
__host__ __device__ inline double m_sqrt(double v) { return sqrt(v); }
__host__ __device__ inline float m_max_nan(float a, float b) { return (a > b || a != a) ? a : b; }  // torch.maximum
__host__ __device__ inline double m_max_nan(double a, double b) { return (a > b || a != a) ? a : b; }

// 16 bytes of T, converted to/from the compute type element by element
template <typename T> struct alignas(16) Vec {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};
template <int N> struct alignas(N) MaskVec {
  unsigned char b[N];
};

__host__ __device__ inline bool aligned(int64_t address, int64_t bytes) { return (address & (bytes - 1)) == 0; }

// Element i of a chunk kept? `mask` is at the chunk's first mask byte (bool) or first bits byte (packed).
__host__ __device__ inline bool keep_at(const unsigned char* mask, bool bits, int64_t i) {
  if (mask == nullptr) return true;
  return bits ? ((mask[i >> 3] >> (i & 7)) & 1) != 0 : mask[i] != 0;
}

// The mask of the chunk starting at element `begin` (a multiple of 8), or null for no mask.
__host__ __device__ inline const unsigned char* chunk_mask(const OptimTensor& t, int64_t begin) {
  if (t.mask == 0) return nullptr;
  return reinterpret_cast<const unsigned char*>(t.mask) + (t.mask_bits ? begin >> 3 : begin);
}

// ----- per-element arithmetic (reference.masked_sgd_ / masked_adamw_) --------------------------------------
template <typename A> struct SgdScalars {
  A lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, has_weight_decay, nesterov, maximize, first_step;
};

template <typename A>
__host__ __device__ inline void sgd_elem(A& p, A g, A& buf, bool keep, const SgdScalars<A>& s) {
  if (s.maximize) g = -g;
  if (s.has_weight_decay) g = g + s.weight_decay * p;      // g.add(p, alpha=weight_decay)
  if (s.has_momentum) {
    if (s.first_step) {
      buf = g;                                             // buf = clone(g)
    } else {
      buf = buf * s.momentum + s.one_minus_dampening * g;  // buf.mul_(momentum).add_(g, alpha=1-dampening)
    }
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;                                        // p.add_(g, alpha=-lr)
  if (!keep) {
    p = A(0);
    buf = A(0);
  }
}

template <typename A> struct AdamWScalars {
  A decay;            // 1 - lr * weight_decay
  A lerp_w, lerp_1mw; // 1 - beta1 and beta1 (m.lerp_(g, 1 - beta1))
  A beta2, one_minus_beta2;
  A bias_correction2_sqrt, eps, step_size;
  bool amsgrad, maximize;
};

template <typename A>
__host__ __device__ inline void adamw_elem(A& p, A g, A& m, A& v, A& vmax, bool keep, const AdamWScalars<A>& s) {
  if (s.maximize) g = -g;
  p = p * s.decay;                                             // p.mul_(1 - lr * weight_decay)
  const A diff = g - m;                                        // torch's lerp: exact at both ends
  m = (s.lerp_w < A(0.5)) ? m + s.lerp_w * diff : g - diff * s.lerp_1mw;
  v = v * s.beta2 + s.one_minus_beta2 * g * g;                 // v.mul_(beta2).addcmul_(g, g, value=1-beta2)
  A second = v;
  if (s.amsgrad) {
    vmax = m_max_nan(vmax, v);                                 // torch.maximum(max_exp_avg_sq, v)
    second = vmax;
  }
  const A denom = m_sqrt(second) / s.bias_correction2_sqrt + s.eps;
  p = p - s.step_size * (m / denom);                           // p.addcdiv_(m, denom, value=-step_size)
  if (!keep) {
    p = A(0);
    m = A(0);
    v = A(0);
    vmax = A(0);
  }
}

// ----- kernels ----------------------------------------------------------------------------------------------
struct Chunk {
  OptimTensor t;
  int64_t begin, n;  // elements [begin, begin + n) of tensor t
};

__host__ __device__ inline Chunk chunk_of_block(const int64_t* meta, int64_t num_tensors, int64_t block) {
  const OptimTensor* tensors = reinterpret_cast<const OptimTensor*>(meta);
  const int64_t* entries = meta + num_tensors * (sizeof(OptimTensor) / sizeof(int64_t));
  const int64_t e = entries[block];
  Chunk c;
  c.t = tensors[e >> 32];
  c.begin = (e & 0xffffffffLL) * kOptimChunk;
  const int64_t left = c.t.numel - c.begin;
  c.n = left < kOptimChunk ? left : kOptimChunk;
  return c;
}

// One thread's share of block `block` (a chunk), threads striding by kThreads.
template <typename T>
__host__ __device__ void sgd_block(const int64_t* meta, int64_t num_tensors, const SgdScalars<typename Elem<T>::acc>& s,
                                   int64_t block, int tid) {
  using A = typename Elem<T>::acc;
  constexpr int V = Vec<T>::kN;
  const Chunk c = chunk_of_block(meta, num_tensors, block);
  T* p = reinterpret_cast<T*>(c.t.param) + c.begin;
  const T* g = reinterpret_cast<const T*>(c.t.grad) + c.begin;
  T* buf = s.has_momentum ? reinterpret_cast<T*>(c.t.state[0]) + c.begin : nullptr;
  const unsigned char* mask = chunk_mask(c.t, c.begin);
  const bool bits = c.t.mask_bits != 0;

  int64_t done = 0;
  const bool vec = aligned(reinterpret_cast<int64_t>(p), 16) && aligned(reinterpret_cast<int64_t>(g), 16) &&
                   (buf == nullptr || aligned(reinterpret_cast<int64_t>(buf), 16)) &&
                   (mask == nullptr || bits || aligned(reinterpret_cast<int64_t>(mask), V));
  if (vec) {
    const int64_t nv = c.n / V;
    for (int64_t i = tid; i < nv; i += kThreads) {
      Vec<T> pv = reinterpret_cast<const Vec<T>*>(p)[i];
      const Vec<T> gv = reinterpret_cast<const Vec<T>*>(g)[i];
      Vec<T> bv;
      if (buf != nullptr) bv = reinterpret_cast<const Vec<T>*>(buf)[i];
      MaskVec<V> mv;
      unsigned vbits = 0xffu;  // packed: this vector's V bits, in the low bits
      if (mask != nullptr && !bits) mv = reinterpret_cast<const MaskVec<V>*>(mask)[i];
      if (mask != nullptr && bits) vbits = mask[(i * V) >> 3] >> ((i * V) & 7);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A pa = load_elem(&pv.v[e]);
        A ba = buf != nullptr ? load_elem(&bv.v[e]) : A(0);
        const bool keep = mask == nullptr || (bits ? ((vbits >> e) & 1u) != 0 : mv.b[e] != 0);
        sgd_elem(pa, load_elem(&gv.v[e]), ba, keep, s);
        store_elem(&pv.v[e], pa);
        if (buf != nullptr) store_elem(&bv.v[e], ba);
      }
      reinterpret_cast<Vec<T>*>(p)[i] = pv;
      if (buf != nullptr) reinterpret_cast<Vec<T>*>(buf)[i] = bv;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < c.n; i += kThreads) {
    A pa = load_elem(p + i);
    A ba = buf != nullptr ? load_elem(buf + i) : A(0);
    sgd_elem(pa, load_elem(g + i), ba, keep_at(mask, bits, i), s);
    store_elem(p + i, pa);
    if (buf != nullptr) store_elem(buf + i, ba);
  }
}

template <typename T>
__host__ __device__ void adamw_block(const int64_t* meta, int64_t num_tensors,
                                     const AdamWScalars<typename Elem<T>::acc>& s, int64_t block, int tid) {
  using A = typename Elem<T>::acc;
  constexpr int V = Vec<T>::kN;
  const Chunk c = chunk_of_block(meta, num_tensors, block);
  T* p = reinterpret_cast<T*>(c.t.param) + c.begin;
  const T* g = reinterpret_cast<const T*>(c.t.grad) + c.begin;
  T* m = reinterpret_cast<T*>(c.t.state[0]) + c.begin;
  T* v = reinterpret_cast<T*>(c.t.state[1]) + c.begin;
  T* vmax = s.amsgrad ? reinterpret_cast<T*>(c.t.state[2]) + c.begin : nullptr;
  const unsigned char* mask = chunk_mask(c.t, c.begin);
  const bool bits = c.t.mask_bits != 0;

  int64_t done = 0;
  const bool vec = aligned(reinterpret_cast<int64_t>(p), 16) && aligned(reinterpret_cast<int64_t>(g), 16) &&
                   aligned(reinterpret_cast<int64_t>(m), 16) && aligned(reinterpret_cast<int64_t>(v), 16) &&
                   (vmax == nullptr || aligned(reinterpret_cast<int64_t>(vmax), 16)) &&
                   (mask == nullptr || bits || aligned(reinterpret_cast<int64_t>(mask), V));
  if (vec) {
    const int64_t nv = c.n / V;
    for (int64_t i = tid; i < nv; i += kThreads) {
      Vec<T> pv = reinterpret_cast<const Vec<T>*>(p)[i];
      const Vec<T> gv = reinterpret_cast<const Vec<T>*>(g)[i];
      Vec<T> mv = reinterpret_cast<const Vec<T>*>(m)[i];
      Vec<T> vv = reinterpret_cast<const Vec<T>*>(v)[i];
      Vec<T> xv;
      if (vmax != nullptr) xv = reinterpret_cast<const Vec<T>*>(vmax)[i];
      MaskVec<V> kv;
      unsigned vbits = 0xffu;  // packed: this vector's V bits, in the low bits
      if (mask != nullptr && !bits) kv = reinterpret_cast<const MaskVec<V>*>(mask)[i];
      if (mask != nullptr && bits) vbits = mask[(i * V) >> 3] >> ((i * V) & 7);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A pa = load_elem(&pv.v[e]), ma = load_elem(&mv.v[e]), va = load_elem(&vv.v[e]);
        A xa = vmax != nullptr ? load_elem(&xv.v[e]) : A(0);
        const bool keep = mask == nullptr || (bits ? ((vbits >> e) & 1u) != 0 : kv.b[e] != 0);
        adamw_elem(pa, load_elem(&gv.v[e]), ma, va, xa, keep, s);
        store_elem(&pv.v[e], pa);
        store_elem(&mv.v[e], ma);
        store_elem(&vv.v[e], va);
        if (vmax != nullptr) store_elem(&xv.v[e], xa);
      }
      reinterpret_cast<Vec<T>*>(p)[i] = pv;
      reinterpret_cast<Vec<T>*>(m)[i] = mv;
      reinterpret_cast<Vec<T>*>(v)[i] = vv;
      if (vmax != nullptr) reinterpret_cast<Vec<T>*>(vmax)[i] = xv;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < c.n; i += kThreads) {
    A pa = load_elem(p + i), ma = load_elem(m + i), va = load_elem(v + i);
    A xa = vmax != nullptr ? load_elem(vmax + i) : A(0);
    adamw_elem(pa, load_elem(g + i), ma, va, xa, keep_at(mask, bits, i), s);
    store_elem(p + i, pa);
    store_elem(m + i, ma);
    store_elem(v + i, va);
    if (vmax != nullptr) store_elem(vmax + i, xa);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    masked_sgd_kernel(const int64_t* __restrict__ meta, int64_t num_tensors, SgdScalars<typename Elem<T>::acc> s) {
  sgd_block<T>(meta, num_tensors, s, blockIdx.x, threadIdx.x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    masked_adamw_kernel(const int64_t* __restrict__ meta, int64_t num_tensors, AdamWScalars<typename Elem<T>::acc> s) {
  adamw_block<T>(meta, num_tensors, s, blockIdx.x, threadIdx.x);
}

const char* check_grid(int64_t num_tensors, int64_t num_chunks) {
  if (num_tensors <= 0 || num_tensors > INT32_MAX) return "bad number of tensors";
  if (num_chunks > INT32_MAX) return "too many chunks for one launch";
  return nullptr;
}

template <typename A> SgdScalars<A> sgd_scalars(const SgdArgs& a) {
  SgdScalars<A> s;
  s.lr = static_cast<A>(a.lr);
  s.momentum = static_cast<A>(a.momentum);
  s.one_minus_dampening = static_cast<A>(1.0 - a.dampening);
  s.weight_decay = static_cast<A>(a.weight_decay);
  s.has_momentum = a.momentum != 0.0;
  s.has_weight_decay = a.weight_decay != 0.0;
  s.nesterov = a.nesterov;
  s.maximize = a.maximize;
  s.first_step = a.first_step;
  return s;
}

template <typename A> AdamWScalars<A> adamw_scalars(const AdamWArgs& a) {
  // host scalars in double, as the reference computes them with Python floats
  const double bias_correction1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(a.beta2, static_cast<double>(a.step)));
  AdamWScalars<A> s;
  s.decay = static_cast<A>(1.0 - a.lr * a.weight_decay);
  s.lerp_w = static_cast<A>(1.0 - a.beta1);
  s.lerp_1mw = A(1) - s.lerp_w;  // torch computes 1 - weight in the compute type
  s.beta2 = static_cast<A>(a.beta2);
  s.one_minus_beta2 = static_cast<A>(1.0 - a.beta2);
  s.bias_correction2_sqrt = static_cast<A>(bias_correction2_sqrt);
  s.eps = static_cast<A>(a.eps);
  s.step_size = static_cast<A>(a.lr / bias_correction1);
  s.amsgrad = a.amsgrad;
  s.maximize = a.maximize;
  return s;
}

template <typename T>
const char* run_sgd(const int64_t* meta, int64_t num_tensors, int64_t num_chunks, const SgdArgs& a, cudaStream_t stream) {
  const auto s = sgd_scalars<typename Elem<T>::acc>(a);
  masked_sgd_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(meta, num_tensors, s);
  return nullptr;
}

template <typename T>
const char* run_adamw(const int64_t* meta, int64_t num_tensors, int64_t num_chunks, const AdamWArgs& a,
                      cudaStream_t stream) {
  const auto s = adamw_scalars<typename Elem<T>::acc>(a);
  masked_adamw_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(meta, num_tensors, s);
  return nullptr;
}

}  // namespace
}  // namespace optim

const char* masked_sgd(DType dtype, const int64_t* meta, int64_t num_tensors, int64_t num_chunks, const SgdArgs& args,
                       cudaStream_t stream) {
  if (num_chunks == 0) return nullptr;
  if (const char* err = optim::check_grid(num_tensors, num_chunks)) return err;
  switch (dtype) {
    case DType::kFloat32: return optim::run_sgd<float>(meta, num_tensors, num_chunks, args, stream);
    case DType::kFloat16: return optim::run_sgd<__half>(meta, num_tensors, num_chunks, args, stream);
    case DType::kBFloat16: return optim::run_sgd<__nv_bfloat16>(meta, num_tensors, num_chunks, args, stream);
    case DType::kFloat64: return optim::run_sgd<double>(meta, num_tensors, num_chunks, args, stream);
  }
  return "unsupported dtype (expected float32, float16, bfloat16 or float64)";
}

const char* masked_adamw(DType dtype, const int64_t* meta, int64_t num_tensors, int64_t num_chunks,
                         const AdamWArgs& args, cudaStream_t stream) {
  if (num_chunks == 0) return nullptr;
  if (const char* err = optim::check_grid(num_tensors, num_chunks)) return err;
  if (args.step < 1) return "step must be >= 1 (already incremented)";
  switch (dtype) {
    case DType::kFloat32: return optim::run_adamw<float>(meta, num_tensors, num_chunks, args, stream);
    case DType::kFloat16: return optim::run_adamw<__half>(meta, num_tensors, num_chunks, args, stream);
    case DType::kBFloat16: return optim::run_adamw<__nv_bfloat16>(meta, num_tensors, num_chunks, args, stream);
    case DType::kFloat64: return optim::run_adamw<double>(meta, num_tensors, num_chunks, args, stream);
  }
  return "unsupported dtype (expected float32, float16, bfloat16 or float64)";
}

}  // namespace nepenthe_cuda
