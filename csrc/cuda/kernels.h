// CUDA kernels of the "cuda" backend: launcher declarations (plain C/C++ types) shared by the glue
// csrc/cuda/ops_cuda.cpp (host compiler, ATen) and the kernel files csrc/cuda/*.cu (nvcc, no ATen).
//
// Argument contract (layouts, dtypes, aliasing, counting rules): nepenthe/ops/backends.py. The glue
// validates arguments; the launchers assume what the glue checks (see each declaration), launch on
// `stream` and return nullptr on success or a static message for a request they cannot serve. They do
// not synchronise; the glue checks cudaGetLastError after each call.
//
// The section at the end (only under nvcc) holds the histogram kernel template shared by
// sign_histogram_cuda.cu and activation_histogram_cuda.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nepenthe_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// A strided view [outer, C, inner]; sizes and strides in elements (strides >= 0, 0 allowed).
struct View3 {
  int64_t size[3];
  int64_t stride[3];
};

// hist: contiguous int64 [C, bins], bins 4 or 5, C = x.size[1]. upper used when has_upper (rounded to
// the dtype of x as torch does for a Python-float comparison). Any size may be 0 (no launch).
const char* sign_histogram(DType dtype, const void* x, const View3& xv, int64_t* hist, int bins, bool has_upper,
                           double upper, int num_sms, cudaStream_t stream);

// y = phi(x), counts of x into hist. y has x's sizes and its own strides (yv.size must equal xv.size); it is
// either disjoint from x or exactly x (same pointer and strides, an inplace activation), and has no
// internal overlap. kind: index into reference.ACTIVATIONS (0 relu .. 6 hardswish).
const char* activation_histogram(DType dtype, const void* x, const View3& xv, void* y, const View3& yv,
                                 int64_t* hist, int bins, int kind, double negative_slope, bool has_upper,
                                 double upper, int num_sms, cudaStream_t stream);

constexpr int kNumActivations = 7;

// ----- masked optimizer steps (multi-tensor) ------------------------------------------------------------
// Device metadata, built by the glue in one int64 buffer and copied to the device:
//   [num_tensors x OptimTensor][num_chunks x int64 chunk entries]
// A chunk entry is (tensor_index << 32) | chunk_index; chunk k of a tensor covers elements
// [k * kOptimChunk, min((k + 1) * kOptimChunk, numel)). One CUDA block per chunk, one launch per dtype.
constexpr int64_t kOptimChunk = 65536;

struct OptimTensor {  // 64 bytes; addresses as integers, 0 = absent
  int64_t param;      // T*, contiguous
  int64_t grad;       // const T*
  int64_t state[3];   // T*: SGD momentum_buffer | AdamW exp_avg, exp_avg_sq, max_exp_avg_sq
  int64_t mask;       // const uint8*: one bool byte per element (nonzero = keep), packed bits, or 0 for no mask
  int64_t numel;
  int64_t mask_bits;  // 1: mask holds packed bits (bit i % 8 of byte i / 8 is element i), 0: one byte each
};
static_assert(sizeof(OptimTensor) == 64, "OptimTensor is 8 int64 words");

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;  // momentum != 0 <=> state[0] holds the momentum buffers
};

struct AdamWArgs {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // >= 1, already incremented
  bool amsgrad, maximize;
};

// meta: device pointer to the buffer above (8-byte aligned).
const char* masked_sgd(DType dtype, const int64_t* meta, int64_t num_tensors, int64_t num_chunks,
                       const SgdArgs& args, cudaStream_t stream);
const char* masked_adamw(DType dtype, const int64_t* meta, int64_t num_tensors, int64_t num_chunks,
                         const AdamWArgs& args, cudaStream_t stream);

}  // namespace nepenthe_cuda

// =====================================================================================================
// Device code shared by the histogram kernels (nvcc only).
// =====================================================================================================
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace nepenthe_cuda {
namespace hist {

// Design. x is [outer, C, inner] with any strides. Each thread counts into private counters (Counts), a block
// reduces them (warp shuffles / shared atomics) and adds one 64-bit atomic per (channel, bin) into hist.
// The work of one block is bounded (kMaxChunk*), so 32-bit per-block counts cannot overflow.
//   rows kernel (CHMAJOR = false): a block owns one channel c and a chunk of its positions (o, i); threads
//     stride over the positions, 16-byte vectors along `inner` when it is contiguous and aligned (NCHW).
//   cols kernel (CHMAJOR = true): channels are contiguous (stride 1: channels_last, [rows, C]); a thread owns
//     1 or VEC adjacent channels of a tile and strides over the rows (o, i); lanes of a warp read one row.
// Positions (o, i) are walked incrementally (no division per element): see Walker.
// For fp16/bf16 16-byte vectors a packed path counts two elements per 32-bit word with integer carries
// (see Packed16); everything else compares in fp32 (fp64 for double).

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                   // independent loads in flight per thread
#ifndef NEPENTHE_HIST_FLUSH_ITERS  // overridable only to exercise the flush in host-emulation tests
#define NEPENTHE_HIST_FLUSH_ITERS 1024
#endif
constexpr int kFlushIters = NEPENTHE_HIST_FLUSH_ITERS;  // packed counters flushed every <= kUnroll * kFlushIters vectors
static_assert(kUnroll * kFlushIters * 4 < 65536, "packed 16-bit lane counters must not overflow between flushes");
constexpr int kMaxTileChannels = 512;        // channels per block in the cols kernel (shared counters)
constexpr int64_t kMaxChunkRows = int64_t(1) << 24;  // positions (vectors of <= 8) per block, rows kernel
constexpr int64_t kMaxChunkCols = int64_t(1) << 26;  // rows per block, cols kernel
enum { kOn = 0, kOff = 1, kZero = 2, kSat = 3, kNonfinite = 4, kCounters = 5 };

// ----- element types ---------------------------------------------------------------------------------
template <typename T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  static constexpr int kVec = 4;
  static constexpr bool k16 = false;
};
template <> struct Elem<double> {
  using acc = double;
  static constexpr int kVec = 1;  // no vector path for fp64 (fewer kernels; not a performance target)
  static constexpr bool k16 = false;
};
template <> struct Elem<__half> {
  using acc = float;
  static constexpr int kVec = 8;
  static constexpr bool k16 = true;
  static constexpr uint32_t kInfBits = 0x7c00u;
};
template <> struct Elem<__nv_bfloat16> {
  using acc = float;
  static constexpr int kVec = 8;
  static constexpr bool k16 = true;
  static constexpr uint32_t kInfBits = 0x7f80u;
};

__host__ __device__ inline float bits_to_float(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}
__host__ __device__ inline uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// scalar loads/stores with conversion to/from the compute type
__host__ __device__ inline float load_elem(const float* p) { return *p; }
__host__ __device__ inline double load_elem(const double* p) { return *p; }
__host__ __device__ inline float load_elem(const __half* p) { return __half2float(*p); }
__host__ __device__ inline float load_elem(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__host__ __device__ inline void store_elem(float* p, float v) { *p = v; }
__host__ __device__ inline void store_elem(double* p, double v) { *p = v; }
__host__ __device__ inline void store_elem(__half* p, float v) { *p = __float2half_rn(v); }
__host__ __device__ inline void store_elem(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// 16 bytes as 4 words; element e of a vector of T (e a compile-time constant after unrolling)
struct alignas(16) Words {
  uint32_t w[4];
};
template <typename T> __host__ __device__ inline typename Elem<T>::acc word_elem(const Words& v, int e);
template <> __host__ __device__ inline float word_elem<float>(const Words& v, int e) { return bits_to_float(v.w[e]); }
template <> __host__ __device__ inline float word_elem<__half>(const Words& v, int e) {
  __half_raw r;
  r.x = static_cast<unsigned short>((v.w[e >> 1] >> ((e & 1) * 16)) & 0xffffu);
  return __half2float(__half(r));
}
template <> __host__ __device__ inline float word_elem<__nv_bfloat16>(const Words& v, int e) {
  const uint32_t w = v.w[e >> 1];
  return bits_to_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
}
// raw 16-bit (fp16/bf16) or 32-bit (fp32) pattern of a value rounded to T
__host__ __device__ inline uint32_t elem_bits(float v, const float*) { return float_to_bits(v); }
__host__ __device__ inline uint32_t elem_bits(float v, const __half*) {
  __half_raw r = __float2half_rn(v);
  return r.x;
}
__host__ __device__ inline uint32_t elem_bits(float v, const __nv_bfloat16*) {
  __nv_bfloat16_raw r = __float2bfloat16_rn(v);
  return r.x;
}
template <typename T> __host__ __device__ inline void set_word_elem(Words& v, int e, float value) {
  const uint32_t b = elem_bits(value, static_cast<const T*>(nullptr));
  if (sizeof(T) == 4) {
    v.w[e] = b;
  } else if (e & 1) {
    v.w[e >> 1] = (v.w[e >> 1] & 0x0000ffffu) | (b << 16);
  } else {
    v.w[e >> 1] = (v.w[e >> 1] & 0xffff0000u) | b;
  }
}

// ----- activations: PyTorch's formulas in the compute type (fp32, fp64 for double), NaN propagating ----
__host__ __device__ inline float m_erf(float v) { return erff(v); }
__host__ __device__ inline double m_erf(double v) { return erf(v); }
__host__ __device__ inline float m_tanh(float v) { return tanhf(v); }
__host__ __device__ inline double m_tanh(double v) { return tanh(v); }
__host__ __device__ inline float m_exp(float v) { return expf(v); }
__host__ __device__ inline double m_exp(double v) { return exp(v); }

// -inf as the lowest finite value for the activations whose limit at -inf is 0 (gelu, gelu_tanh, silu,
// hardswish): their formulas multiply -inf by 0 (NaN) but map it to -0.0, the limit with the sign of
// their negative tail (the rule of every backend: reference.activation). NaN stays NaN.
__host__ __device__ inline float finite_below(float v) { return v < -FLT_MAX ? -FLT_MAX : v; }
__host__ __device__ inline double finite_below(double v) { return v < -DBL_MAX ? -DBL_MAX : v; }

template <int KIND, typename A> __host__ __device__ inline A activation(A x, A slope) {
  if (KIND >= 3) x = finite_below(x);
  if (KIND == 0) {  // relu = clamp_min(x, 0): NaN stays NaN, -0.0 stays -0.0 (as torch on the CPU)
    return x != x ? x : (x < A(0) ? A(0) : x);
  } else if (KIND == 1) {  // relu6 = hardtanh(x, 0, 6)
    if (x != x) return x;
    const A lo = x < A(0) ? A(0) : x;
    return lo > A(6) ? A(6) : lo;
  } else if (KIND == 2) {  // leaky_relu
    return x > A(0) ? x : x * slope;
  } else if (KIND == 3) {  // gelu (erf): x * 0.5 * (1 + erf(x / sqrt(2)))
    const A kAlpha = A(0.70710678118654752440);  // M_SQRT1_2
    return x * A(0.5) * (A(1) + m_erf(x * kAlpha));
  } else if (KIND == 4) {  // gelu tanh approximation
    const A kBeta = A(0.79788456080286535588);  // M_SQRT2 * M_2_SQRTPI * 0.5
    const A kKappa = A(0.044715);
    const A x_cube = x * x * x;
    const A inner = kBeta * (x + kKappa * x_cube);
    return A(0.5) * x * (A(1) + m_tanh(inner));
  } else if (KIND == 5) {  // silu
    return x / (A(1) + m_exp(-x));
  } else {  // hardswish: x * min(max(x + 3, 0), 6) / 6 with std::max/min NaN semantics
    const A t = x + A(3);
    const A mx = (t < A(0)) ? A(0) : t;   // std::max(t, 0)
    const A mn = (A(6) < mx) ? A(6) : mx;  // std::min(mx, 6)
    return x * mn / A(6);
  }
}

// ----- counting ----------------------------------------------------------------------------------------
__host__ __device__ inline bool is_nonfinite(float v) { return !(fabsf(v) <= FLT_MAX); }
__host__ __device__ inline bool is_nonfinite(double v) { return !(fabs(v) <= DBL_MAX); }

// Per-thread counters of NW channel slots (slot s: the block's channel in the rows kernel, channel
// cvi * VEC + s in the cols kernel).
//   NW == 1: five 32-bit counters; the work of a block is bounded (kMaxChunk*), so they cannot overflow.
//   NW > 1: 16-bit fields, two per register ((on | off << 16), (zero | sat << 16), nonfinite), 3 registers a
//     slot instead of 5; drained into the block's shared counters after every period of at most
//     kUnroll * kFlushIters rows, so each field stays below 2^16. A field may go transiently "negative" (the
//     packed NaN correction subtracts): the register stays exact modulo 2^32 and decodes exactly once every
//     field's true value is back in [0, 2^16), which holds at each drain.
template <int NW> struct Counts {
  static constexpr bool kWide = NW == 1;
  uint32_t r[kWide ? kCounters : 3 * NW];

  __host__ __device__ void reset() {
#pragma unroll
    for (int i = 0; i < (kWide ? kCounters : 3 * NW); ++i) r[i] = 0;
  }
  // add d (modulo 2^32, may be a wrapped negative) to bin b of slot s
  __host__ __device__ void add(int s, int b, uint32_t d) {
    if (kWide) {
      r[b] += d;
    } else if (b == kNonfinite) {
      r[3 * s + 2] += d;
    } else {
      r[3 * s + (b >> 1)] += (b & 1) ? (d << 16) : d;  // kOn 0, kOff 1, kZero 2, kSat 3
    }
  }
  // up is NaN when there is no upper kink (the SAT comparison is then always false)
  template <typename A> __host__ __device__ void count(int s, A v, A up) {
    if (kWide) {
      r[kOn] += v > A(0) ? 1u : 0u;
      r[kOff] += v < A(0) ? 1u : 0u;
      r[kZero] += v == A(0) ? 1u : 0u;
      r[kSat] += v >= up ? 1u : 0u;
      r[kNonfinite] += is_nonfinite(v) ? 1u : 0u;
    } else {
      r[3 * s] += (v > A(0) ? 1u : 0u) + (v < A(0) ? 0x10000u : 0u);
      r[3 * s + 1] += (v == A(0) ? 1u : 0u) + (v >= up ? 0x10000u : 0u);
      r[3 * s + 2] += is_nonfinite(v) ? 1u : 0u;
    }
  }
  __host__ __device__ uint32_t get(int s, int b) const {
    if (kWide) return r[b];
    if (b == kNonfinite) return r[3 * s + 2];
    const uint32_t w = r[3 * s + (b >> 1)];
    return (b & 1) ? (w >> 16) : (w & 0xffffu);
  }
  // hand every nonzero counter to sink(slot, bin, value) and reset
  template <typename Sink> __host__ __device__ void drain(Sink& sink) {
#pragma unroll
    for (int s = 0; s < NW; ++s)
#pragma unroll
      for (int b = 0; b < kCounters; ++b) {
        const uint32_t v = get(s, b);
        if (v != 0) sink(s, b, v);
      }
    reset();
  }
};

// Packed counting of fp16/bf16 words (two elements per 32-bit word, lane = 16 bits).
// With m = magnitude bits (sign cleared) of a lane, m + K never carries into the next lane (m <= 0x7fff,
// K <= 0x7fff), and bit 15 of the lane is set iff m >= 0x8000 - K. Per lane:
//   nz  : m >= 1                      (NaN included)       -> ZERO = n - nz
//   neg : sign & nz                   (negative NaN incl.) -> OFF  = neg - negNaN
//   sat : !sign & m >= bits(upper)    (+NaN included)      -> SAT  = sat - posNaN; ON = nz - neg - posNaN
// A vector holding any m >= INF (NaN or Inf, rare) takes a slow path that applies the NaN corrections and
// counts NONFINITE. Requires upper > 0 rounded to T (bits(upper) in [1, INF]); without an upper k_sat = 0.
// Lane counters take <= kUnroll * kFlushIters * 4 = 16384 per period before flush (< 2^16).
template <typename T, int NW> struct Packed16 {
  static constexpr int kWords = 4;  // 8 elements of 16 bits
  static constexpr int kVec = 8;
  static constexpr int NP = (NW == 1) ? 1 : kWords;
  static constexpr uint32_t kInf = Elem<T>::kInfBits;
  static constexpr uint32_t kFin = (0x8000u - kInf) * 0x10001u;
  static constexpr uint32_t kH = 0x80008000u;
  uint32_t nz[NP], neg[NP], sat[NP];
  uint32_t nvec;

  __host__ __device__ void reset() {
#pragma unroll
    for (int p = 0; p < NP; ++p) nz[p] = neg[p] = sat[p] = 0;
    nvec = 0;
  }
  __host__ __device__ void add(const Words& v, uint32_t k_sat, bool has_upper, Counts<NW>& c) {
    uint32_t any = 0;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int p = (NP == 1) ? 0 : k;
      const uint32_t w = v.w[k];
      const uint32_t m = w & 0x7fff7fffu;
      const uint32_t tnz = m + 0x7fff7fffu;
      const uint32_t tsat = m + k_sat;
      any |= m + kFin;
      nz[p] += (tnz & kH) >> 15;
      neg[p] += (w & tnz & kH) >> 15;
      sat[p] += (~w & tsat & kH) >> 15;
    }
    nvec += 1;
    if (any & kH) rare(v, has_upper, c);
  }
  __host__ __device__ void rare(const Words& v, bool has_upper, Counts<NW>& c) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int s = (NW == 1) ? 0 : e;
      const uint32_t b = (v.w[e >> 1] >> ((e & 1) * 16)) & 0xffffu;
      const uint32_t m = b & 0x7fffu;
      if (m >= kInf) c.add(s, kNonfinite, 1u);
      if (m > kInf) {  // NaN: counted above as nonzero (and SAT when positive): undo (wraps, fixed by flush)
        if (b & 0x8000u) {
          c.add(s, kOff, ~0u);  // -1
        } else {
          c.add(s, kOn, ~0u);
          if (has_upper) c.add(s, kSat, ~0u);
        }
      }
    }
  }
  __host__ __device__ void flush(Counts<NW>& c) {
#pragma unroll
    for (int p = 0; p < NP; ++p) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int s = (NW == 1) ? 0 : 2 * p + half;
        const uint32_t z = (nz[p] >> (16 * half)) & 0xffffu;
        const uint32_t n = (neg[p] >> (16 * half)) & 0xffffu;
        const uint32_t t = (sat[p] >> (16 * half)) & 0xffffu;
        c.add(s, kOn, z - n);
        c.add(s, kOff, n);
        c.add(s, kSat, t);
        c.add(s, kZero, 0u - z);
      }
    }
#pragma unroll
    for (int s = 0; s < NW; ++s) c.add(s, kZero, nvec * uint32_t(kVec / NW));
    reset();
  }
};

struct NoPacked {};

// ----- walking positions (o, i) of a 2-level index j = o * inner + i, offset o * so + i * si ------------
struct WalkParams {
  int64_t inner, so, si;  // extent of i; strides (elements) of o and i
  int64_t di, doff, wrap; // per step of `step` positions: i += di, off += doff; on i >= inner: i -= inner, off += wrap
};
inline WalkParams make_walk(int64_t inner, int64_t so, int64_t si, int64_t step) {
  WalkParams w;
  w.inner = inner;
  w.so = so;
  w.si = si;
  const int64_t dq = step / inner;
  w.di = step - dq * inner;
  w.doff = dq * so + w.di * si;
  w.wrap = so - inner * si;
  return w;
}
struct Walker {
  int64_t i, off;
  __host__ __device__ void init(int64_t j, const WalkParams& w) {
    const int64_t o = j / w.inner;
    i = j - o * w.inner;
    off = o * w.so + i * w.si;
  }
  __host__ __device__ void advance(const WalkParams& w) {
    i += w.di;
    off += w.doff;
    if (i >= w.inner) {  // di < inner, so one wrap at most
      i -= w.inner;
      off += w.wrap;
    }
  }
};

struct HistParams {
  const void* x;
  void* y;               // nullptr for a sign histogram
  unsigned long long* hist;
  int64_t C;
  int64_t npos;          // rows kernel: positions per channel (vectors); cols kernel: rows
  int64_t chunk;         // positions per block
  int64_t nchunks;       // rows kernel: chunks per channel
  int64_t ntiles;        // cols kernel: channel tiles
  int64_t cv;            // cols kernel: channel groups (C / VEC)
  int64_t xsc, ysc;      // channel strides (rows kernel; cols kernel: y only, x's is 1)
  WalkParams wx, wy;     // wy only when !same_layout
  int bx, by;            // cols kernel: channel lanes x row lanes (bx * by <= kThreads)
  int bins;
  bool has_upper;
  bool same_layout;      // y has x's strides: y offsets = x offsets
  uint32_t k_sat;        // packed path
  float up_f, slope_f;   // up: upper rounded to the dtype, NaN without upper
  double up_d, slope_d;
};

template <typename A> __host__ __device__ inline A param_up(const HistParams& P);
template <> __host__ __device__ inline float param_up<float>(const HistParams& P) { return P.up_f; }
template <> __host__ __device__ inline double param_up<double>(const HistParams& P) { return P.up_d; }
template <typename A> __host__ __device__ inline A param_slope(const HistParams& P);
template <> __host__ __device__ inline float param_slope<float>(const HistParams& P) { return P.slope_f; }
template <> __host__ __device__ inline double param_slope<double>(const HistParams& P) { return P.slope_d; }

// One thread's share of a block: counts into cnt and, when KIND >= 0, writes y = phi(x). With NW > 1 the
// counters are drained into sink(slot, bin, value) after every period; what is left at the end (NW == 1:
// everything) the caller reduces. VEC > 1 only with 16-byte aligned vectors that never straddle a
// row / channel group, and for y only with same_layout (checked by the planner). PACKED: fp16/bf16 with
// VEC == 8 (always used there).
template <typename T, int VEC, bool CHMAJOR, int KIND, bool PACKED> struct HistThread {
  using A = typename Elem<T>::acc;
  static constexpr int NW = CHMAJOR ? VEC : 1;
  static_assert(VEC == 1 || VEC * sizeof(T) == 16, "vectors are 16 bytes");
  static_assert(!PACKED || (Elem<T>::k16 && VEC == 8), "packed counting: fp16/bf16 16-byte vectors");
  using Loaded = typename std::conditional<(VEC > 1), Words, A>::type;
  using PK = typename std::conditional<PACKED, Packed16<T, NW>, NoPacked>::type;
  // loads in flight per thread per iteration; activations on 16-byte vectors use 2 (enough bytes in flight,
  // half the inlined copies of erf/tanh/exp to compile)
  static constexpr int U = (KIND >= 0 && VEC > 1) ? 2 : kUnroll;

  __host__ __device__ static Loaded load(const T* p) {
    if constexpr (VEC > 1) {
      return *reinterpret_cast<const Words*>(p);
    } else {
      return load_elem(p);
    }
  }

  template <typename Sink>
  __host__ __device__ static void run(const HistParams& P, int64_t block, int tid, Counts<NW>& cnt, Sink& sink) {
    cnt.reset();
    int64_t j, j1, step, xbase, ybase;
    if (!CHMAJOR) {
      const int64_t ch = block / P.nchunks;
      const int64_t k = block - ch * P.nchunks;
      const int64_t j0 = k * P.chunk;
      j1 = (P.npos - j0 < P.chunk) ? P.npos : j0 + P.chunk;
      j = j0 + tid;
      step = kThreads;
      xbase = ch * P.xsc;
      ybase = ch * P.ysc;
    } else {
      const int64_t tile = block % P.ntiles;
      const int64_t k = block / P.ntiles;
      const int cl = tid % P.bx, ry = tid / P.bx;
      const int64_t cvi = tile * P.bx + cl;
      if (ry >= P.by || cvi >= P.cv) return;
      const int64_t j0 = k * P.chunk;
      j1 = (P.npos - j0 < P.chunk) ? P.npos : j0 + P.chunk;
      j = j0 + ry;
      step = P.by;
      xbase = cvi * VEC;
      ybase = cvi * VEC * P.ysc;
    }
    if (j >= j1) return;

    const T* x = static_cast<const T*>(P.x) + xbase;
    T* y = (KIND >= 0) ? static_cast<T*>(P.y) + ybase : nullptr;
    const bool same = P.same_layout;
    const A up = param_up<A>(P);
    const A slope = param_slope<A>(P);
    Walker wx, wy;
    wx.init(j, P.wx);
    if (KIND >= 0 && !same) wy.init(j, P.wy);
    PK pk;
    if constexpr (PACKED) pk.reset();

    while (j < j1) {  // periods of at most U * kFlushIters positions per thread
      for (int it = 0; it < kFlushIters && j < j1; ++it) {
        bool ok[U];
        int64_t xo[U], yo[U];
        Loaded val[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          ok[u] = j + u * step < j1;
          xo[u] = wx.off;
          yo[u] = wx.off;
          wx.advance(P.wx);
          if (KIND >= 0 && !same) {
            yo[u] = wy.off;
            wy.advance(P.wy);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (ok[u]) val[u] = load(x + xo[u]);  // all loads of the iteration before any store (inplace-safe)
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (ok[u]) process(val[u], cnt, pk, up, slope, P, y, yo[u]);
        }
        j += U * step;
      }
      if constexpr (PACKED) pk.flush(cnt);
      if constexpr (NW > 1) cnt.drain(sink);
    }
  }

  __host__ __device__ static void process(const Loaded& v, Counts<NW>& cnt, PK& pk, A up, A slope,
                                          const HistParams& P, T* y, int64_t yo) {
    if constexpr (PACKED) {
      pk.add(v, P.k_sat, P.has_upper, cnt);  // counts from the raw words
      if constexpr (KIND >= 0) {
        Words out = {};
#pragma unroll
        for (int e = 0; e < VEC; ++e) set_word_elem<T>(out, e, activation<KIND>(word_elem<T>(v, e), slope));
        *reinterpret_cast<Words*>(y + yo) = out;  // same layout: yo is x's offset
      }
    } else if constexpr (VEC > 1) {
      Words out = {};
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const A a = word_elem<T>(v, e);
        cnt.count(NW == 1 ? 0 : e, a, up);
        if constexpr (KIND >= 0) set_word_elem<T>(out, e, activation<KIND>(a, slope));
      }
      if constexpr (KIND >= 0) *reinterpret_cast<Words*>(y + yo) = out;  // same layout: yo is x's offset
    } else {
      cnt.count(0, v, up);
      if constexpr (KIND >= 0) store_elem(y + yo, activation<KIND>(v, slope));
    }
  }
};

__host__ __device__ inline bool bin_wanted(const HistParams& P, int b) {
  return b < kSat || (b == kSat && P.has_upper) || (b == kNonfinite && P.bins > kNonfinite);
}

struct NoSink {
  __host__ __device__ void operator()(int, int, uint32_t) const {}
};

// rows kernel: one channel per block; block reduction by warp shuffles
template <typename T, int VEC, int KIND, bool PACKED>
__global__ void __launch_bounds__(kThreads) hist_rows_kernel(const HistParams P) {
  Counts<1> cnt;
  NoSink none;
  const int64_t block = blockIdx.x;
  HistThread<T, VEC, false, KIND, PACKED>::run(P, block, threadIdx.x, cnt, none);
  __shared__ uint32_t s[kCounters];
  if (threadIdx.x < kCounters) s[threadIdx.x] = 0;
  __syncthreads();
#pragma unroll
  for (int b = 0; b < kCounters; ++b) {
    uint32_t v = cnt.r[b];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0 && v != 0) atomicAdd(&s[b], v);
  }
  __syncthreads();
  if (threadIdx.x < kCounters) {
    const int b = threadIdx.x;
    const int64_t ch = block / P.nchunks;
    if (s[b] != 0 && bin_wanted(P, b)) atomicAdd(P.hist + ch * P.bins + b, static_cast<unsigned long long>(s[b]));
  }
}

// shared-memory sink of the cols kernel: slot s of thread lane cl is channel cl * VEC + s of the tile
template <int VEC> struct SharedSink {
  uint32_t* s;
  int cl;
  __device__ void operator()(int slot, int b, uint32_t v) const { atomicAdd(&s[(cl * VEC + slot) * kCounters + b], v); }
};

// cols kernel: a tile of bx * VEC contiguous channels per block; block reduction by shared atomics
template <typename T, int VEC, int KIND, bool PACKED>
__global__ void __launch_bounds__(kThreads) hist_cols_kernel(const HistParams P) {
  __shared__ uint32_t s[kMaxTileChannels * kCounters];
  const int nslots = P.bx * VEC * kCounters;
  for (int i = threadIdx.x; i < nslots; i += kThreads) s[i] = 0;
  __syncthreads();
  Counts<VEC> cnt;
  SharedSink<VEC> sink{s, static_cast<int>(threadIdx.x % P.bx)};
  const int64_t block = blockIdx.x;
  HistThread<T, VEC, true, KIND, PACKED>::run(P, block, threadIdx.x, cnt, sink);
  cnt.drain(sink);  // threads without work hold zeros and add nothing
  __syncthreads();
  const int64_t ch0 = (block % P.ntiles) * P.bx * VEC;
  for (int i = threadIdx.x; i < nslots; i += kThreads) {
    const uint32_t v = s[i];
    const int b = i % kCounters;
    const int64_t ch = ch0 + i / kCounters;
    if (v != 0 && ch < P.C && bin_wanted(P, b)) atomicAdd(P.hist + ch * P.bins + b, static_cast<unsigned long long>(v));
  }
}

// ----- planning (host) -----------------------------------------------------------------------------------
struct HistPlan {
  HistParams P;
  bool chmajor;
  int vec;
  bool packed;
  int64_t blocks;  // 0: nothing to do
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// upper rounded to T as torch rounds a Python float compared with a tensor of T (double -> float -> T)
inline double round_to(double v, const float*) { return static_cast<float>(v); }
inline double round_to(double v, const double*) { return v; }
inline double round_to(double v, const __half*) { return __half2float(__float2half_rn(static_cast<float>(v))); }
inline double round_to(double v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(static_cast<float>(v)));
}

template <typename T>
inline const char* plan_hist(const void* x, const View3& xv, void* y, const View3* yv, int64_t* hist, int bins,
                             bool has_upper, double upper, double slope, int num_sms, HistPlan& plan) {
  HistParams& P = plan.P;
  P = HistParams{};
  plan.blocks = 0;
  plan.chmajor = false;
  plan.vec = 1;
  plan.packed = false;
  int64_t outer = xv.size[0], C = xv.size[1], inner = xv.size[2];
  if (outer <= 0 || C <= 0 || inner <= 0) return nullptr;
  if (C > INT_MAX) return "too many channels (more than 2^31 - 1)";
  int64_t so = xv.stride[0], sc = xv.stride[1], si = xv.stride[2];
  int64_t yso = 0, ysc = 0, ysi = 0;
  const bool has_y = y != nullptr;
  if (has_y) {
    yso = yv->stride[0];
    ysc = yv->stride[1];
    ysi = yv->stride[2];
  }
  // normalise: strides of size-1 dims do not matter; [outer, C, 1] is walked as [1, C, outer]
  if (outer == 1) so = yso = 0;
  if (C == 1) sc = ysc = 0;
  if (inner == 1) {
    inner = outer;
    si = so;
    ysi = yso;
    outer = 1;
    so = yso = 0;
  }
  const bool same = !has_y || (so == yso && sc == ysc && si == ysi);
  const bool chmajor = C > 1 && sc == 1 && si != 1;
  const int vec = Elem<T>::kVec;
  bool vec_ok = vec > 1 && aligned16(x) && (!has_y || (same && aligned16(y)));
  if (chmajor) {
    vec_ok = vec_ok && C % vec == 0 && si % vec == 0 && so % vec == 0;
  } else {
    vec_ok = vec_ok && si == 1 && inner % vec == 0 && sc % vec == 0 && so % vec == 0;
  }
  bool packed = Elem<T>::k16;
  const T* tag = nullptr;
  const double up = has_upper ? round_to(upper, tag) : std::numeric_limits<double>::quiet_NaN();
  uint32_t k_sat = 0;
  if constexpr (Elem<T>::k16) {
    if (packed && has_upper) {
      const uint32_t ubits = elem_bits(static_cast<float>(up), tag);
      if (up > 0 && ubits >= 1 && ubits <= Elem<T>::kInfBits) {  // +Inf gives the Inf pattern
        k_sat = (0x8000u - ubits) * 0x10001u;
      } else {
        vec_ok = false;  // upper <= 0 or NaN (never for relu6): the scalar fp32 path compares instead
      }
    }
  }
  const int V = vec_ok ? vec : 1;
  packed = packed && V > 1;

  P.x = x;
  P.y = y;
  P.hist = reinterpret_cast<unsigned long long*>(hist);
  P.C = C;
  P.bins = bins;
  P.has_upper = has_upper;
  P.same_layout = same;
  P.k_sat = k_sat;
  P.up_d = up;
  P.up_f = static_cast<float>(up);
  P.slope_d = slope;
  P.slope_f = static_cast<float>(slope);
  const int64_t target = int64_t(num_sms > 0 ? num_sms : 132) * 16;  // blocks: ~2 waves of 8 blocks per SM

  if (!chmajor) {
    const int64_t inner_w = inner / V;
    P.npos = outer * inner_w;
    P.wx = make_walk(inner_w, so, si * V, kThreads);
    P.wy = make_walk(inner_w, yso, ysi, kThreads);
    P.xsc = sc;
    P.ysc = ysc;
    const int64_t per_ch = ceil_div(target, C);
    int64_t chunk = ceil_div(P.npos, per_ch);
    chunk = chunk < 2 * kThreads * kUnroll ? 2 * kThreads * kUnroll : chunk;
    chunk = chunk > kMaxChunkRows ? kMaxChunkRows : chunk;
    P.chunk = chunk;
    P.nchunks = ceil_div(P.npos, chunk);
    if (P.nchunks > INT_MAX / C) return "tensor too large for the histogram grid";
    plan.blocks = C * P.nchunks;
  } else {
    P.cv = C / V;
    const int64_t max_lanes = (kMaxTileChannels / V < kThreads) ? kMaxTileChannels / V : kThreads;
    P.bx = static_cast<int>(P.cv < max_lanes ? P.cv : max_lanes);
    P.by = kThreads / P.bx;
    P.ntiles = ceil_div(P.cv, P.bx);
    P.npos = outer * inner;
    P.wx = make_walk(inner, so, si, P.by);
    P.wy = make_walk(inner, yso, ysi, P.by);
    P.xsc = 1;
    P.ysc = ysc;
    const int64_t per_tile = ceil_div(target, P.ntiles);
    int64_t chunk = ceil_div(P.npos, per_tile);
    const int64_t min_chunk = int64_t(P.by) * kUnroll * 4;
    chunk = chunk < min_chunk ? min_chunk : chunk;
    chunk = chunk > kMaxChunkCols ? kMaxChunkCols : chunk;
    P.chunk = chunk;
    P.nchunks = ceil_div(P.npos, chunk);
    if (P.nchunks > INT_MAX / P.ntiles) return "tensor too large for the histogram grid";
    plan.blocks = P.ntiles * P.nchunks;
  }
  plan.chmajor = chmajor;
  plan.vec = V;
  plan.packed = packed;
  return nullptr;
}

// Launch the kernel instance the plan asks for. fp16/bf16 vectors always count with the packed path.
template <typename T, int KIND>
inline void launch_plan(const HistPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(kThreads);
  constexpr int V = Elem<T>::kVec;
  if constexpr (V > 1) {
    if (plan.vec == V) {
      constexpr bool kPacked = Elem<T>::k16;
      if (plan.chmajor) {
        hist_cols_kernel<T, V, KIND, kPacked><<<grid, block, 0, stream>>>(plan.P);
      } else {
        hist_rows_kernel<T, V, KIND, kPacked><<<grid, block, 0, stream>>>(plan.P);
      }
      return;
    }
  }
  if (plan.chmajor) {
    hist_cols_kernel<T, 1, KIND, false><<<grid, block, 0, stream>>>(plan.P);
  } else {
    hist_rows_kernel<T, 1, KIND, false><<<grid, block, 0, stream>>>(plan.P);
  }
}

}  // namespace hist
}  // namespace nepenthe_cuda
#endif  // __CUDACC__
