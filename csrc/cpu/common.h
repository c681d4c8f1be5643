// Shared pieces of the C++ CPU kernels (csrc/cpu/*_cpu.cpp): argument checks, dtype dispatch, the
// AVX2 clone mechanism, and the one-pass "count signs (+ apply an activation)" engine used by both
// sign_histogram_ (no output) and activation_histogram_ (writes φ(x)).
//
// Vectorisation: the extension is built for baseline x86-64 (SSE2), so every hot loop is compiled
// twice — once as is, once inside a function with __attribute__((target("avx2,fma"))) — and the
// AVX2 copy is taken at run time when the CPU has it. The loops themselves are plain C++ that gcc
// auto-vectorises at -O3 (int32 counters `on += v > 0`, flushed to int64 long before they overflow),
// except two hand-vectorised pieces: the fp16/bf16 counts on the 16-bit patterns (AVX2 intrinsics,
// count16_*), and an AVX-512 copy of the GELU/SiLU activation blocks (activate_block) where the CPU
// has AVX-512, as ATen's own kernels use it there.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>
#include <mutex>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace nepenthe_cpu {

// ----- AVX2 clones ---------------------------------------------------------------------------------------
#if defined(__GNUC__) && defined(__x86_64__)
#define NEP_X86 1
#define NEP_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define NEP_X86 0
#define NEP_TARGET_AVX2
#endif
#define NEP_INLINE inline __attribute__((always_inline))

// NEPENTHE_CPU_BASELINE=1 forces the baseline copies (to test them on an AVX2 machine).
inline bool cpu_has_avx2() {
#if NEP_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(std::getenv("NEPENTHE_CPU_BASELINE") && std::getenv("NEPENTHE_CPU_BASELINE")[0] == '1');
  return ok;
#else
  return false;
#endif
}

// K::run is an always_inline static template; these wrappers instantiate it once for baseline
// x86-64 and once for AVX2+FMA, and run_best picks one per call (the check is a cached bool).
template <class K, class... A>
void run_baseline(A... a) {
  K::run(a...);
}
#if NEP_X86
template <class K, class... A>
NEP_TARGET_AVX2 void run_avx2(A... a) {
  K::run(a...);
}
#endif
template <class K, class... A>
void run_best(A... a) {
#if NEP_X86
  if (cpu_has_avx2()) {
    run_avx2<K>(a...);
    return;
  }
#endif
  run_baseline<K>(a...);
}

// ----- parallel loops that stay serial while threads would only wait ----------------------------------------
// On a machine whose cores other processes keep busy, a worker thread of a parallel region waits for a
// time slice (milliseconds) while the calling thread, done with its own share, spins at the region's
// barrier: measured on 2 shared cores, a 65k-element step cost 500x the CPU of one thread and 370x the
// wall time (bench/cpu_under_load.py, bench/RESULTS.md). A grain size cannot fix that (the delay is the
// scheduler's, not the work's), so each region checks what it cost: when its threads, done with their
// shares, waited at the barrier for longer than a quarter of the time they worked, the region spent over
// 1.25x the CPU of a serial loop (a worker late to start or preempted, or sharing its core with another
// process at half speed, which costs 1.5x). Then the following calls run serially for a back-off window (100 ms, doubling up to 2 s while
// regions keep coming late; a region in time shortens the next window by one step), after which one
// region tries again: a late try costs a time slice of spinning, a few ms per window. On an idle machine
// workers start within microseconds and nothing changes (a spurious late region costs 100 ms of serial
// calls). NEPENTHE_CPU_ALWAYS_PARALLEL=1 turns the check off (to measure plain OpenMP).
struct ParallelBackoff {
  std::atomic<int64_t> serial_until_ns{0};
  std::atomic<int> late_streak{0};
};
inline ParallelBackoff& parallel_backoff() {
  static ParallelBackoff state;
  return state;
}
inline int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline bool always_parallel() {
  static const bool on = std::getenv("NEPENTHE_CPU_ALWAYS_PARALLEL") &&
                         std::getenv("NEPENTHE_CPU_ALWAYS_PARALLEL")[0] == '1';
  return on;
}
constexpr int64_t kBackoffFirstNs = 100'000'000, kBackoffMaxNs = 2'000'000'000;
constexpr int kBackoffMaxStreak = 5;  // 100 ms << 5 > 2 s

// at::parallel_for(begin, end, grain, f) (same chunks, same grain rule), or f(begin, end) on the calling
// thread while the back-off window is open.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const bool parallel = end - begin > grain && at::get_num_threads() > 1 && !at::in_parallel_region();
  if (!parallel || always_parallel()) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  ParallelBackoff& state = parallel_backoff();
  if (steady_ns() < state.serial_until_ns.load(std::memory_order_relaxed)) {
    at::parallel_for(begin, end, end - begin, f);  // grain = the whole range: one call, this thread
    return;
  }
  const int64_t start = steady_ns();
  std::atomic<int64_t> worked{0}, done_sum{0};
  std::atomic<int> shares{0};
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const int64_t t0 = b == begin ? start : steady_ns();  // thread 0 (the caller) takes the first chunk
    f(b, e);
    const int64_t t1 = steady_ns();
    worked.fetch_add(t1 - t0, std::memory_order_relaxed);
    done_sum.fetch_add(t1, std::memory_order_relaxed);
    shares.fetch_add(1, std::memory_order_relaxed);
  });
  const int64_t waited = shares.load() * steady_ns() - done_sum.load();  // summed over the threads
  const bool late = waited * 4 > worked.load();
  const int streak = state.late_streak.load(std::memory_order_relaxed);
  if (late) {
    state.late_streak.store(std::min(streak + 1, kBackoffMaxStreak), std::memory_order_relaxed);
    const int64_t window = std::min(kBackoffMaxNs, kBackoffFirstNs << streak);
    state.serial_until_ns.store(steady_ns() + window, std::memory_order_relaxed);
  } else if (streak != 0) {
    state.late_streak.store(streak - 1, std::memory_order_relaxed);
  }
}

// ----- dtypes --------------------------------------------------------------------------------------------
// Compute type: fp32 for fp16/bf16/fp32 (fp16/bf16 -> fp32 is exact), fp64 for fp64.
template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <class T>
using acc_t = typename Acc<T>::type;

// Loads and stores between a storage type and its compute type, written as branch-free bit
// arithmetic (c10's conversions are not always inlined into the loops, which stops vectorisation).
// Results are identical to c10's: fp16 -> fp32 and bf16 -> fp32 exact, fp32 -> bf16 rounds to
// nearest even with NaN -> 0x7FC0, fp32 -> fp16 is c10's fp16_ieee_from_fp32_value.
NEP_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
NEP_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
template <class T>
NEP_INLINE acc_t<T> load(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bits_f32(uint32_t(v.x) << 16);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::detail::fp16_ieee_to_fp32_value(v.x);
  } else {
    return v;
  }
}
template <class T>
NEP_INLINE T store(acc_t<T> a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = f32_bits(a);
    // NaN selected on the 32-bit lanes, before the narrowing (cheaper once vectorised)
    const uint32_t r = a != a ? 0x7FC00000u : u + (((u >> 16) & 1u) + 0x7FFFu);
    return c10::BFloat16(static_cast<uint16_t>(r >> 16), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(c10::detail::fp16_ieee_from_fp32_value(a), c10::Half::from_bits());
  } else {
    return a;
  }
}

// x when keep, else exactly +0.0 (bitwise, so a NaN or -0.0 does not survive and loops stay branch-free).
template <class A>
NEP_INLINE A keep_or_zero(uint8_t keep, A x) {
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  U bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= U(0) - U(keep != 0);
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// fp16 <-> fp32 for a whole block. Without F16C the per-element bit arithmetic above stays scalar
// (gcc does not vectorise it), so fp16 kernels convert blocks with F16C (vcvtph2ps / vcvtps2ph,
// round to nearest even, as c10 does) into fp32 scratch and run the fp32 loops on it.
#if NEP_X86
__attribute__((target("avx2,f16c"))) inline void half_to_float_f16c(const c10::Half* x, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j))));
  for (; j < n; ++j) out[j] = load<c10::Half>(x[j]);
}
__attribute__((target("avx2,f16c"))) inline void float_to_half_f16c(const float* in, c10::Half* y, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j), _mm256_cvtps_ph(_mm256_loadu_ps(in + j), _MM_FROUND_TO_NEAREST_INT));
  for (; j < n; ++j) y[j] = store<c10::Half>(in[j]);
}
inline bool cpu_has_f16c() {
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("f16c");
  return ok;
}
#endif
inline void half_to_float(const c10::Half* x, float* out, int64_t n) {
#if NEP_X86
  if (cpu_has_f16c()) return half_to_float_f16c(x, out, n);
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = load<c10::Half>(x[j]);
}
inline void float_to_half(const float* in, c10::Half* y, int64_t n) {
#if NEP_X86
  if (cpu_has_f16c()) return float_to_half_f16c(in, y, n);
#endif
  for (int64_t j = 0; j < n; ++j) y[j] = store<c10::Half>(in[j]);
}
constexpr int64_t kStage = 512;  // fp16 elements per conversion block (2 x 2 KiB of fp32 scratch)

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// f(T{}) with T the C++ type of `t` (fp32, fp16, bf16, fp64).
template <class F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default:
      TORCH_CHECK(false, what, ": no CPU kernel for dtype ", t, "; supported: float32, float16, bfloat16, float64 "
                  "(convert the tensor, or use the pure-PyTorch backend: nepenthe.ops.use_backend(\"torch\"))");
  }
}

// ----- argument checks -----------------------------------------------------------------------------------
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              " but this is the CPU kernel; move every tensor of the call to the CPU (or use the CUDA backend)");
}

// hist: contiguous int64 [C, 4|5] on the CPU.
inline void check_hist(const at::Tensor& hist, int64_t channels, const char* op) {
  check_cpu(hist, op, "hist");
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.dim() == 2 && hist.size(0) == channels &&
                  (hist.size(1) == 4 || hist.size(1) == 5),
              op, ": hist must be int64[", channels, ", 4] (ON, OFF, ZERO, SAT) or int64[", channels,
              ", 5] (+ NONFINITE) for an input with ", channels, " channels, got ", hist.scalar_type(), hist.sizes());
  TORCH_CHECK(hist.is_contiguous(), op, ": hist must be contiguous (got strides ", hist.strides(),
              "); pass hist.contiguous() and add the result back");
}

inline void check_x3(const at::Tensor& x, const char* op, const char* name) {
  check_cpu(x, op, name);
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be a 3-d [outer, C, inner] view (reference.as_3d), got ",
              x.dim(), " dims of shape ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": ", name, " has dtype ", x.scalar_type(),
              "; supported: float32, float16, bfloat16, float64");
}

// ----- the counting (+ activation) engine ----------------------------------------------------------------
enum Col : int { ON = 0, OFF = 1, ZERO = 2, SAT = 3, NONFINITE = 4, NCOLS = 5 };

// Activation kinds, the indices of reference.ACTIVATIONS; NONE = count only, write nothing.
enum Kind : int { RELU = 0, RELU6 = 1, LEAKY_RELU = 2, GELU = 3, GELU_TANH = 4, SILU = 5, HARDSWISH = 6, NONE = 7 };
constexpr int kNumKinds = 7;

// ----- branch-free fp32 math for the activations ---------------------------------------------------------
// erf / tanh / exp are libm calls that gcc cannot vectorise, which made the fused GELU/SiLU 4x slower
// than ATen's vectorised ones. These are written so that gcc vectorises the loops around them (no
// branches, no calls: selects, bit casts, float->int conversion). mad() is an FMA in the AVX2+FMA
// clones (the build is ISO C++, so gcc does not contract a*b+c by itself) and a libm fma in the
// baseline copies, which then stay scalar (only for CPUs without AVX2, or NEPENTHE_CPU_BASELINE=1).
NEP_INLINE float mad(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
// c ? a : b on the bits: a ternary whose arms compute (and could raise an FP flag) is a branch to gcc
// (-ftrapping-math), which stops vectorisation; this computes both and selects.
NEP_INLINE float select(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return bits_f32((f32_bits(a) & m) | (f32_bits(b) & ~m));
}

// e^-w: 2^n e^-s with n = round(-w / ln 2), s = w + n ln 2 in [-ln2/2, ln2/2] (one FMA with ln 2
// rounded to fp32: |n| <= 127 keeps its error under 2.5e-7 relative), e^-s = 1 - s (1 - s P(s)) with
// P a cubic fit (relative error 1.2e-7 on the interval). w is clamped to [-88, 87] first (NaN -> -88):
// 2^n stays a normal number, built from the low bits of the rounding constant 1.5 * 2^23 + n.
// Outside the clamp the result is e^88 or e^-87, which the sigmoids below treat explicitly or only
// add to 1.
template <bool NONNEG = false>  // NONNEG: w >= 0 or NaN is known (no lower clamp needed)
NEP_INLINE float exp_neg(float w) {
  float wc = w;
  if constexpr (!NONNEG) wc = wc > -88.0f ? wc : -88.0f;
  wc = wc < 87.0f ? wc : 87.0f;
  const float k = mad(wc, -1.44269504f, 12582912.0f);
  const float nf = k - 12582912.0f;  // n, exactly
  const float sr = mad(nf, 0.693147182f, wc);
  float p = mad(-8.333841339e-3f, sr, 4.189882800e-2f);
  p = mad(p, sr, -1.666688621e-1f);
  p = mad(p, sr, 4.999914169e-1f);
  p = mad(-p, sr, 1.0f);
  p = mad(-p, sr, 1.0f);
  return p * bits_f32((f32_bits(k) + 127u) << 23);  // * 2^n
}
// x / (1 + e^-t) (x sigmoid(t)); e^-t is +inf for t < -88, so that x = -inf gives NaN (-inf / inf)
// and a large negative x gives -0, like PyTorch's silu.
NEP_INLINE float x_sigmoid(float x, float t) {
  const float e = exp_neg(t);
  return x / (1.0f + select(t < -88.0f, std::numeric_limits<float>::infinity(), e));
}
// 0.5 x (1 + erf(x / sqrt 2)). erf(|z|) = 1 - q with q = t P(t) e^{-z^2}, t = 1 / (1 + p|z|)
// (Abramowitz & Stegun 7.1.26, absolute error <= 1.5e-7, the approximation ATen vectorises too);
// with h = q / 2 the result is x h for z < 0 and x (1 - h) otherwise, without cancellation in the
// tail. +-inf: t = 0, h = 0, so +inf -> +inf and -inf -> -inf * 0 = NaN (activate() passes -FLT_MAX instead).
NEP_INLINE float gelu_erf(float x) {
  const float z = x * 0.707106781186547524f;
  const float az = bits_f32(f32_bits(z) & 0x7FFFFFFFu);
  const float t = 1.0f / mad(0.3275911f, az, 1.0f);
  float p = mad(0.5f * 1.061405429f, t, 0.5f * -1.453152027f);  // P / 2
  p = mad(p, t, 0.5f * 1.421413741f);
  p = mad(p, t, 0.5f * -0.284496736f);
  p = mad(p, t, 0.5f * 0.254829592f);
  const float h = p * t * exp_neg<true>(az * az);
  return x * select(z < 0.0f, h, 1.0f - h);
}
// 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function as
// PyTorch's tanh form, without tanh (+inf -> +inf; -inf -> NaN, which activate() avoids).
NEP_INLINE float gelu_tanh(float x) {
  const float two_beta = 1.59576912160573071f, kappa = 0.044715f;
  return x_sigmoid(x, two_beta * x * mad(kappa * x, x, 1.0f));
}

// -inf as the most negative finite value, for the activations whose limit at -inf is 0 (GELU, SiLU,
// hardswish): their formulas multiply -inf by 0 (NaN, PyTorch's result) but map the lowest finite
// value to -0.0, the limit with the sign of their negative tail (the rule of every backend:
// reference.activation). NaN stays NaN (the comparison is false); a select gcc vectorises.
template <class A>
NEP_INLINE A finite_below(A v) {
  constexpr A lowest = std::numeric_limits<A>::lowest();
  return v < lowest ? lowest : v;
}
constexpr bool zero_at_minus_inf(int kind) {
  return kind == GELU || kind == GELU_TANH || kind == SILU || kind == HARDSWISH;
}

// φ(v) with PyTorch's CPU formulas (NaN propagates like PyTorch's: every branch keeps a NaN), but
// at -inf the limit (finite_below). fp32 (and fp16/bf16, computed in fp32) GELU/SiLU use the
// vectorisable forms above, fp64 libm.
template <int KIND, class A>
NEP_INLINE A activate(A v, A slope) {
  if constexpr (zero_at_minus_inf(KIND)) v = finite_below(v);
  if constexpr (std::is_same_v<A, float> && KIND == GELU) {
    return gelu_erf(v);
  } else if constexpr (std::is_same_v<A, float> && KIND == GELU_TANH) {
    return gelu_tanh(v);
  } else if constexpr (std::is_same_v<A, float> && KIND == SILU) {
    return x_sigmoid(v, v);
  } else if constexpr (KIND == RELU) {
    return v < A(0) ? A(0) : v;
  } else if constexpr (KIND == RELU6) {
    return v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
  } else if constexpr (KIND == LEAKY_RELU) {
    return v > A(0) ? v : v * slope;
  } else if constexpr (KIND == GELU) {
    return v * A(0.5) * (A(1) + std::erf(v * A(M_SQRT1_2)));
  } else if constexpr (KIND == GELU_TANH) {
    const A beta = A(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = A(0.044715);
    return A(0.5) * v * (A(1) + std::tanh(beta * (v + kappa * v * v * v)));
  } else if constexpr (KIND == SILU) {
    return v / (A(1) + std::exp(-v));
  } else if constexpr (KIND == HARDSWISH) {
    return v * std::min(std::max(v + A(3), A(0)), A(6)) / A(6);
  } else {
    return v;
  }
}

// Output modes: NOOUT (sign_histogram_), CONTIG (y contiguous, distinct from x), INPLACE (y is x),
// STRIDED (y with its own element stride).
enum Mode : int { NOOUT = 0, CONTIG = 1, INPLACE = 2, STRIDED = 3 };

// Loops gcc vectorises gain from an AVX2 copy; the others (a strided output is written element by
// element; fp64 GELU/SiLU call libm) are compiled once, and so are all fp64 activations (rare; their
// baseline SSE2 loops are vectorised where they can be), which keeps the build short.
template <class T>
constexpr bool worth_avx2_clone(int kind, int mode) {
  return mode != STRIDED && (kind == NONE || !std::is_same_v<T, double>);
}
template <bool CLONE, class K, class... A>
NEP_INLINE void run_kernel(A... a) {
  if constexpr (CLONE) {
    run_best<K>(a...);
  } else {
    run_baseline<K>(a...);
  }
}

// Elements per int32 counter run before a flush into int64 (far below 2^31).
constexpr int64_t kFlush = int64_t(1) << 28;

// The five tests of one value, added to 32-bit counters (gcc vectorises `c += v > 0`).
template <class A>
NEP_INLINE void count1(A v, A upper, int32_t& on, int32_t& off, int32_t& zero, int32_t& sat, int32_t& nf) {
  on += v > A(0);
  off += v < A(0);
  zero += v == A(0);
  sat += v >= upper;
  nf += !(std::abs(v) <= std::numeric_limits<A>::max());  // NaN, +-Inf
}

// y + off, or nullptr for a count-only call (no arithmetic on a null pointer).
template <class T>
NEP_INLINE T* offset(T* y, int64_t off) {
  return y ? y + off : y;
}

// ----- fp16 / bf16 counts on the 16-bit patterns (AVX2) --------------------------------------------------
// Converting to fp32 made the 16-bit count compute-bound (half the bytes of fp32, the same time). The
// five tests are exact on the bit patterns u (sign-magnitude; E = the all-ones exponent, 0x7F80 bf16,
// 0x7C00 fp16; a = u & 0x7FFF):
//   ON    0 < u <= E             (positive, not zero, not NaN; +Inf included)
//   OFF   0x8000 < u <= 0x8000+E (negative, likewise)
//   ZERO  a == 0                 NONFINITE  a >= E
//   SAT   U <= u <= E            where U = the bits of upper in the input dtype, for 0 < upper <= +Inf
//                                (any other threshold goes through the fp32 loops)
// A range test lo <= u <= hi is one add and one signed compare: (int16)(u + 0x8000 - lo) <
// (int16)(0x8000 + hi - lo + 1). Lanes count in int16 for at most kLanes16 vectors, then widen.
template <class T>
constexpr uint16_t exp_mask16() {
  return std::is_same_v<T, c10::BFloat16> ? 0x7F80 : 0x7C00;
}
// The bits of upper in T when the 16-bit counts can test it (0 < upper <= +Inf), else 0; 1 without upper.
template <class T>
inline uint16_t upper_bits16(std::optional<double> upper_opt) {
  if (!upper_opt) return 1;
  const uint16_t u = static_cast<T>(*upper_opt).x;
  return u >= 1 && u <= exp_mask16<T>() ? u : 0;
}
constexpr int64_t kLanes16 = 16384;  // int16 lane counts stay below 2^15

template <class T>
NEP_INLINE void count1_16(uint16_t u, uint16_t U, int64_t* out) {  // the tests above, one element
  constexpr uint16_t E = exp_mask16<T>();
  const uint16_t a = u & 0x7FFF;
  out[ON] += u >= 1 && u <= E;
  out[OFF] += u >= 0x8001 && u <= 0x8000 + E;
  out[ZERO] += a == 0;
  out[SAT] += u >= U && u <= E;
  out[NONFINITE] += a >= E;
}

#if NEP_X86
struct Tests16 {
  __m256i mag, em1, on_add, off_add, bound, sat_add, sat_bound;
  NEP_TARGET_AVX2 NEP_INLINE Tests16(uint16_t E, uint16_t U) {
    mag = _mm256_set1_epi16(0x7FFF);
    em1 = _mm256_set1_epi16(static_cast<int16_t>(E - 1));
    on_add = _mm256_set1_epi16(0x7FFF);                        // lo = 1
    off_add = _mm256_set1_epi16(-1);                           // lo = 0x8001
    bound = _mm256_set1_epi16(static_cast<int16_t>(0x8000 + E));  // hi - lo + 1 = E for both
    sat_add = _mm256_set1_epi16(static_cast<int16_t>(0x8000 - U));
    sat_bound = _mm256_set1_epi16(static_cast<int16_t>(0x8000 + E - U + 1));
  }
  // acc[ON..NONFINITE] += the tests of 16 patterns (int16 lanes).
  template <bool SAT_>
  NEP_TARGET_AVX2 NEP_INLINE void add(__m256i v, __m256i* acc) const {
    const __m256i a = _mm256_and_si256(v, mag);
    acc[ON] = _mm256_sub_epi16(acc[ON], _mm256_cmpgt_epi16(bound, _mm256_add_epi16(v, on_add)));
    acc[OFF] = _mm256_sub_epi16(acc[OFF], _mm256_cmpgt_epi16(bound, _mm256_add_epi16(v, off_add)));
    acc[ZERO] = _mm256_sub_epi16(acc[ZERO], _mm256_cmpeq_epi16(a, _mm256_setzero_si256()));
    acc[NONFINITE] = _mm256_sub_epi16(acc[NONFINITE], _mm256_cmpgt_epi16(a, em1));
    if constexpr (SAT_) acc[SAT] = _mm256_sub_epi16(acc[SAT], _mm256_cmpgt_epi16(sat_bound, _mm256_add_epi16(v, sat_add)));
  }
};

// Path A: n contiguous patterns of one channel; adds the counts into out[0..4].
template <class T, bool SAT_>
NEP_TARGET_AVX2 void count16_run(const uint16_t* x, int64_t n, uint16_t U, int64_t* out) {
  const Tests16 t(exp_mask16<T>(), U);
  int64_t j = 0;
  while (j + 16 <= n) {
    const int64_t end = j + std::min<int64_t>((n - j) / 16, kLanes16) * 16;
    __m256i acc[NCOLS];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (; j + 32 <= end; j += 32) {
      t.add<SAT_>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), acc);
      t.add<SAT_>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j + 16)), acc);
    }
    for (; j < end; j += 16) t.add<SAT_>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), acc);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int col = 0; col < NCOLS; ++col) {  // 16 int16 lanes -> 8 int32 -> int64
      alignas(32) int32_t w[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_madd_epi16(acc[col], ones));
      out[col] += int64_t(w[0]) + w[1] + w[2] + w[3] + w[4] + w[5] + w[6] + w[7];
    }
  }
  for (; j < n; ++j) count1_16<T>(x[j], U, out);  // (without a threshold U = 1 and SAT is ignored)
}

// Path B: nrows rows of len patterns, row r at x + r * stride; position j adds into cnt[col * L + j]
// (int32). Rows go in tiles of ~4 KiB (16 rows of 64 channels) while each 16-position column of
// the tile is counted in registers: measured on 256x64x56x56 channels_last, 4 KiB tiles read at
// ~90% of torch.sum's rate, 16 KiB tiles at ~75%, 64 KiB at ~50% (the column walk over a large
// tile defeats the prefetchers).
template <class T, bool SAT_>
NEP_TARGET_AVX2 void count16_rows(const uint16_t* x, int64_t nrows, int64_t len, int64_t stride, uint16_t U,
                                  int32_t* cnt, int64_t L) {
  const Tests16 t(exp_mask16<T>(), U);
  const int64_t tile = std::clamp<int64_t>(2048 / std::max<int64_t>(len, 1), 16, kLanes16);
  const int64_t vec_end = len / 16 * 16;
  for (int64_t r0 = 0; r0 < nrows; r0 += tile) {
    const int64_t r1 = std::min(nrows, r0 + tile);
    for (int64_t j = 0; j < vec_end; j += 16) {
      __m256i acc[NCOLS];
      for (auto& a : acc) a = _mm256_setzero_si256();
      const uint16_t* p = x + r0 * stride + j;
      int64_t r = r0;
      for (; r + 2 <= r1; r += 2, p += 2 * stride) {
        t.add<SAT_>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), acc);
        t.add<SAT_>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + stride)), acc);
      }
      if (r < r1) t.add<SAT_>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), acc);
      for (int col = 0; col < NCOLS; ++col) {
        if (!SAT_ && col == SAT) continue;
        __m256i* c = reinterpret_cast<__m256i*>(cnt + col * L + j);
        const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[col]));
        const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[col], 1));
        _mm256_storeu_si256(c, _mm256_add_epi32(_mm256_loadu_si256(c), lo));
        _mm256_storeu_si256(c + 1, _mm256_add_epi32(_mm256_loadu_si256(c + 1), hi));
      }
    }
    for (int64_t j = vec_end; j < len; ++j) {  // positions past the last full vector
      int64_t h[NCOLS] = {0, 0, 0, 0, 0};
      for (int64_t r = r0; r < r1; ++r) count1_16<T>(x[r * stride + j], U, h);
      for (int col = 0; col < NCOLS; ++col) cnt[col * L + j] += static_cast<int32_t>(h[col]);
    }
  }
}
#endif

template <class T>
constexpr bool is_16bit() {
  return std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
}

// The activation half of the split fp32 GELU / SiLU loops (count a block, then activate it):
// y[j] = φ(x[j]) over a block. Where the CPU has AVX-512 (as ATen's own kernels use it there), an
// AVX-512 copy with 512-bit vectors halves the instructions of the polynomial code; the arithmetic
// per element is the same FMAs (GELU takes its reciprocal as rcp14 + a Newton step instead of a
// division: results within an fp32 ulp or so of the AVX2 copy).
#if NEP_X86
inline bool cpu_has_avx512() {
  // NEPENTHE_CPU_NO_AVX512=1 keeps the AVX2 copies (to test them on an AVX-512 machine)
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                         !(std::getenv("NEPENTHE_CPU_NO_AVX512") && std::getenv("NEPENTHE_CPU_NO_AVX512")[0] == '1');
  return ok;
}
#define NEP_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"), noinline))
// GELU (erf form) on 16 lanes: gelu_erf() with 1 / (1 + p|z|) as rcp14 + one Newton step instead of
// a division (a 512-bit division is the slowest instruction of the loop on AMD Zen 4); the
// reciprocal's relative error (~1e-8) is far below the approximation's own. Above |z| = 1e4 (erf is
// 1 there in fp32) t is set to exactly 0, as 1 / (1 + p|z|) rounds to for |z| = Inf, so that
// x = -Inf is first taken as -FLT_MAX (finite_below), which gives -0 (rcp14's Newton step would give
// NaN at +Inf itself). max_ps returns its second operand when either is NaN: a NaN x stays.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))) inline __m512 gelu_erf16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(std::numeric_limits<float>::lowest()), x);
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.707106781186547524f));
  const __m512 az = _mm512_abs_ps(z);
  const __mmask16 moderate = _mm512_cmp_ps_mask(az, _mm512_set1_ps(1e4f), _CMP_LE_OQ);  // false for Inf, NaN
  const __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), _mm512_min_ps(az, _mm512_set1_ps(1e4f)),
                                   _mm512_set1_ps(1.0f));
  const __m512 r0 = _mm512_rcp14_ps(d);
  const __m512 t = _mm512_maskz_mul_ps(moderate, r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.5f * 1.061405429f), t, _mm512_set1_ps(0.5f * -1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f * 1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f * -0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.5f * 0.254829592f));
  // e^-w, w = az^2 in [0, 1e8]: exp_neg<true>
  const __m512 w = _mm512_min_ps(_mm512_mul_ps(az, az), _mm512_set1_ps(87.0f));  // NaN -> 87 (x keeps the NaN)
  const __m512 k = _mm512_fmadd_ps(w, _mm512_set1_ps(-1.44269504f), _mm512_set1_ps(12582912.0f));
  const __m512 nf = _mm512_sub_ps(k, _mm512_set1_ps(12582912.0f));
  const __m512 sr = _mm512_fmadd_ps(nf, _mm512_set1_ps(0.693147182f), w);
  __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(-8.333841339e-3f), sr, _mm512_set1_ps(4.189882800e-2f));
  e = _mm512_fmadd_ps(e, sr, _mm512_set1_ps(-1.666688621e-1f));
  e = _mm512_fmadd_ps(e, sr, _mm512_set1_ps(4.999914169e-1f));
  e = _mm512_fnmadd_ps(e, sr, _mm512_set1_ps(1.0f));
  e = _mm512_fnmadd_ps(e, sr, _mm512_set1_ps(1.0f));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(k), _mm512_set1_epi32(127)), 23);
  e = _mm512_mul_ps(e, _mm512_castsi512_ps(scale));
  const __m512 h = _mm512_mul_ps(_mm512_mul_ps(p, t), e);
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 f = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.0f), h), h);
  return _mm512_mul_ps(x, f);
}
template <class T, int KIND>
NEP_TARGET_AVX512 void activate_block_avx512(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  int64_t j = 0;
  if constexpr (KIND == GELU && std::is_same_v<T, float>) {  // (bf16 GELU is a table lookup)
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(y + j, gelu_erf16(_mm512_loadu_ps(x + j)));
  }
  for (; j < n; ++j) y[j] = store<T>(activate<KIND>(load<T>(x[j]), acc_t<T>(0)));
}
template <class T, int KIND>
NEP_TARGET_AVX512 void activate_block_avx512_inplace(T* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j) p[j] = store<T>(activate<KIND>(load<T>(p[j]), acc_t<T>(0)));
}
#endif
// y = φ(x) over n elements (MODE INPLACE: y is x), inlined into the caller's copy unless AVX-512.
template <class T, int KIND, int MODE>
NEP_INLINE void activate_block(const T* __restrict__ xi, T* __restrict__ yo, int64_t n, acc_t<T> slope) {
#if NEP_X86
  if (cpu_has_avx512()) {
    if constexpr (MODE == INPLACE) {
      activate_block_avx512_inplace<T, KIND>(yo, n);
    } else {
      activate_block_avx512<T, KIND>(xi, yo, n);
    }
    return;
  }
#endif
  if constexpr (MODE == INPLACE) {
    T* p = yo;
    for (int64_t j = 0; j < n; ++j) p[j] = store<T>(activate<KIND>(load<T>(p[j]), slope));
  } else {
    for (int64_t j = 0; j < n; ++j) yo[j] = store<T>(activate<KIND>(load<T>(xi[j]), slope));
  }
}

// bf16 GELU / SiLU / hardswish as a table lookup. A bf16 input has 65,536 bit patterns, so phi of
// every one of them is a 128 KiB table (it stays in L2) and the activation becomes one load per
// element, where the polynomial costs ~45 vector instructions per 16 elements (compute-bound at one
// thread: 1.17x ATen's own bf16 GELU before). The table is filled once per kind, on first use, with
// table_value (fp64, rounded to fp32 and then to bf16), which is also more accurate than the fp32
// polynomial of the other layouts: in GELU's negative tail (x < -2) the polynomial's absolute error of
// 1.5e-7 is a relative error of up to 1e-2, visible in bf16.
// phi(x) for a table entry: fp64 in forms without cancellation (0.5 x erfc(-x / sqrt 2) for GELU, x
// sigmoid(2u) for its tanh form: 1 + erf and 1 + tanh lose every digit in the negative tail, even in
// fp64), rounded to fp32; hardswish in fp32, as PyTorch computes it.
template <int KIND>
float table_value(float xf) {
  const double x = zero_at_minus_inf(KIND) ? finite_below(xf) : xf;
  if constexpr (KIND == GELU) {
    return static_cast<float>(0.5 * x * std::erfc(-x * M_SQRT1_2));
  } else if constexpr (KIND == GELU_TANH) {
    const double u = M_SQRT2 * M_2_SQRTPI * 0.5 * (x + 0.044715 * x * x * x);
    return static_cast<float>(x / (1.0 + std::exp(-2.0 * u)));
  } else if constexpr (KIND == SILU) {
    return static_cast<float>(x / (1.0 + std::exp(-x)));
  } else {
    return activate<KIND>(xf, 0.0f);
  }
}
template <int KIND>
const uint16_t* bf16_activation_table() {
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> out(65536 + 1);  // +1: the vector gathers read 4 bytes per entry
    for (uint32_t u = 0; u < 65536; ++u) {
      out[u] = store<c10::BFloat16>(table_value<KIND>(bits_f32(u << 16))).x;
    }
    return out;
  }();
  return table.data();
}
// y[j] = table[x[j]] on the 16-bit patterns (y may be x: each block is loaded before it is stored).
// Vector gathers of 32 bits at table + 2 x[j] (the low half is the entry): a scalar loop spends its
// time in one 2-byte store per element.
#if NEP_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx2"))) inline void lookup_block_avx512(
    const uint16_t* table, const uint16_t* x, uint16_t* y, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)));
    const __m512i v = _mm512_i32gather_epi32(idx, static_cast<const void*>(table), 2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), _mm512_cvtepi32_epi16(v));  // keeps the low halves
  }
  for (; j < n; ++j) y[j] = table[x[j]];
}
NEP_TARGET_AVX2 inline void lookup_block_avx2(const uint16_t* table, const uint16_t* x, uint16_t* y, int64_t n) {
  int64_t j = 0;
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  for (; j + 8 <= n; j += 8) {
    const __m256i idx = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
    const __m256i v = _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(table), idx, 2), low);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j),
                     _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  for (; j < n; ++j) y[j] = table[x[j]];
}
#endif
inline void lookup_block(const uint16_t* table, const uint16_t* x, uint16_t* y, int64_t n) {
#if NEP_X86
  if (cpu_has_avx512()) return lookup_block_avx512(table, x, y, n);
  if (cpu_has_avx2()) return lookup_block_avx2(table, x, y, n);
#endif
  for (int64_t j = 0; j < n; ++j) y[j] = table[x[j]];
}
constexpr bool has_activation_table(int kind) {
  return kind == GELU || kind == GELU_TANH || kind == SILU || kind == HARDSWISH;
}

// Path A: one run of `n` elements of one channel (x at element stride xs; XCONTIG: xs == 1). Adds
// the 5 counts into out[0..4] (int64). y written per MODE. Pointers are __restrict__ function
// parameters, which is what lets gcc vectorise without run-time alias checks.
template <class T, int KIND, int MODE, bool XCONTIG>
struct RowKernel {
  using A = acc_t<T>;
  static NEP_INLINE void chunk(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t xs, int64_t ys, A upper,
                               A slope, int64_t* out) {
    int32_t on = 0, off = 0, zero = 0, sat = 0, nf = 0;
    for (int64_t j = 0; j < n; ++j) {
      const A v = load<T>(XCONTIG ? x[j] : x[j * xs]);
      count1(v, upper, on, off, zero, sat, nf);
      if constexpr (MODE == CONTIG) y[j] = store<T>(activate<KIND>(v, slope));
      if constexpr (MODE == STRIDED) y[j * ys] = store<T>(activate<KIND>(v, slope));
    }
    out[ON] += on, out[OFF] += off, out[ZERO] += zero, out[SAT] += sat, out[NONFINITE] += nf;
  }
  // y is x (same memory and strides): read each element, then overwrite it.
  static NEP_INLINE void chunk_inplace(T* __restrict__ p, int64_t n, int64_t xs, A upper, A slope, int64_t* out) {
    int32_t on = 0, off = 0, zero = 0, sat = 0, nf = 0;
    for (int64_t j = 0; j < n; ++j) {
      T& ref = XCONTIG ? p[j] : p[j * xs];
      const A v = load<T>(ref);
      count1(v, upper, on, off, zero, sat, nf);
      ref = store<T>(activate<KIND>(v, slope));
    }
    out[ON] += on, out[OFF] += off, out[ZERO] += zero, out[SAT] += sat, out[NONFINITE] += nf;
  }
  static NEP_INLINE void run(const T* x, T* y, int64_t n, int64_t xs, int64_t ys, A upper, A slope, int64_t* out) {
#if NEP_X86
    // bf16 activations: count each block on the 16-bit patterns (count16_run), then activate it
    // (a loop without the counters, which gcc vectorises better); the block is still in L1.
    if constexpr (std::is_same_v<T, c10::BFloat16> && XCONTIG && (MODE == CONTIG || MODE == INPLACE)) {
      const uint16_t U = static_cast<uint16_t>(f32_bits(upper) >> 16);  // upper is a bf16 value (+Inf: none)
      if (cpu_has_avx2() && U >= 1 && U <= exp_mask16<T>()) {
        constexpr int64_t kBlock = 2048;
        const T* src = MODE == INPLACE ? y : x;
        for (int64_t b = 0; b < n; b += kBlock) {
          const int64_t len = std::min(n - b, kBlock);
          count16_run<T, true>(reinterpret_cast<const uint16_t*>(src + b), len, U, out);
          if constexpr (has_activation_table(KIND)) {
            lookup_block(bf16_activation_table<KIND>(), reinterpret_cast<const uint16_t*>(src + b),
                         reinterpret_cast<uint16_t*>(y + b), len);
          } else {
            const T* __restrict__ xi = src + b;
            T* __restrict__ yo = y + b;
            if constexpr (MODE == INPLACE) {
              T* p = y + b;
              for (int64_t j = 0; j < len; ++j) p[j] = store<T>(activate<KIND>(load<T>(p[j]), slope));
            } else {
              for (int64_t j = 0; j < len; ++j) yo[j] = store<T>(activate<KIND>(load<T>(xi[j]), slope));
            }
          }
        }
        return;
      }
    }
#endif
    // fp32 GELU / SiLU: counting and activating in one loop keeps too many registers live (the
    // counters and the polynomial constants); count a block, then activate it while it is in L1.
    if constexpr (std::is_same_v<T, float> && XCONTIG && (MODE == CONTIG || MODE == INPLACE) &&
                  (KIND == GELU || KIND == GELU_TANH || KIND == SILU)) {
      constexpr int64_t kBlock = 2048;
      const T* src = MODE == INPLACE ? y : x;
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t len = std::min(n - b, kBlock);
        RowKernel<T, NONE, NOOUT, true>::chunk(src + b, nullptr, len, 1, 1, upper, slope, out);
        activate_block<T, KIND, MODE>(src + b, y + b, len, slope);
      }
      return;
    }
    if constexpr (std::is_same_v<T, c10::Half> && XCONTIG) {  // fp16: through fp32 scratch (see half_to_float)
      using F = RowKernel<float, KIND, MODE == NOOUT ? NOOUT : CONTIG, true>;
      alignas(64) float xb[kStage], yb[kStage];
      for (int64_t b = 0; b < n; b += kStage) {
        const int64_t len = std::min(n - b, kStage);
        half_to_float((MODE == INPLACE ? y : x) + b, xb, len);
        F::chunk(xb, yb, len, 1, 1, upper, slope, out);
        if constexpr (MODE == CONTIG || MODE == INPLACE) float_to_half(yb, y + b, len);
        if constexpr (MODE == STRIDED) {
          for (int64_t j = 0; j < len; ++j) y[(b + j) * ys] = store<T>(yb[j]);
        }
      }
      return;
    }
    for (int64_t b = 0; b < n; b += kFlush) {
      const int64_t len = std::min(n - b, kFlush);
      if constexpr (MODE == INPLACE) {
        chunk_inplace(y + b * xs, len, xs, upper, slope, out);
      } else {
        chunk(x + b * xs, offset(y, b * ys), len, xs, ys, upper, slope, out);
      }
    }
  }
};

// Path B: `nrows` rows of C channel-contiguous elements (x row r at x + r*xrs, channel stride 1;
// y row at y + r*yrs, channel stride ycs). cnt: int32 [5][L] per-position counters, L >= C. When
// FLAT (x rows back to back, xrs == C, and y the same or absent) k rows are handled as one run of
// L = k*C elements, so a small C still fills the vector lanes; position j is channel j % C. Four
// runs go through the loop together so the counters are loaded and stored once per 4 elements.
template <class T, int KIND, int MODE>
struct ChannelBlock {
  using A = acc_t<T>;
  static NEP_INLINE void one(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t ycs, A upper, A slope,
                             int32_t* __restrict__ c0, int32_t* __restrict__ c1, int32_t* __restrict__ c2,
                             int32_t* __restrict__ c3, int32_t* __restrict__ c4) {
    for (int64_t j = 0; j < n; ++j) {
      const A v = load<T>(x[j]);
      count1(v, upper, c0[j], c1[j], c2[j], c3[j], c4[j]);
      if constexpr (MODE == CONTIG) y[j] = store<T>(activate<KIND>(v, slope));
      if constexpr (MODE == STRIDED) y[j * ycs] = store<T>(activate<KIND>(v, slope));
    }
  }
  static NEP_INLINE void one_inplace(T* __restrict__ p, int64_t n, A upper, A slope, int32_t* __restrict__ c0,
                                     int32_t* __restrict__ c1, int32_t* __restrict__ c2, int32_t* __restrict__ c3,
                                     int32_t* __restrict__ c4) {
    for (int64_t j = 0; j < n; ++j) {
      const A v = load<T>(p[j]);
      count1(v, upper, c0[j], c1[j], c2[j], c3[j], c4[j]);
      p[j] = store<T>(activate<KIND>(v, slope));
    }
  }
  static NEP_INLINE void four(const T* __restrict__ x0, const T* __restrict__ x1, const T* __restrict__ x2,
                              const T* __restrict__ x3, T* __restrict__ y0, T* __restrict__ y1, T* __restrict__ y2,
                              T* __restrict__ y3, int64_t n, int64_t ycs, A upper, A slope, int32_t* __restrict__ c0,
                              int32_t* __restrict__ c1, int32_t* __restrict__ c2, int32_t* __restrict__ c3,
                              int32_t* __restrict__ c4) {
    for (int64_t j = 0; j < n; ++j) {
      const A v0 = load<T>(x0[j]), v1 = load<T>(x1[j]), v2 = load<T>(x2[j]), v3 = load<T>(x3[j]);
      int32_t on = 0, off = 0, zero = 0, sat = 0, nf = 0;
      count1(v0, upper, on, off, zero, sat, nf);
      count1(v1, upper, on, off, zero, sat, nf);
      count1(v2, upper, on, off, zero, sat, nf);
      count1(v3, upper, on, off, zero, sat, nf);
      c0[j] += on, c1[j] += off, c2[j] += zero, c3[j] += sat, c4[j] += nf;
      if constexpr (MODE == CONTIG) {
        y0[j] = store<T>(activate<KIND>(v0, slope));
        y1[j] = store<T>(activate<KIND>(v1, slope));
        y2[j] = store<T>(activate<KIND>(v2, slope));
        y3[j] = store<T>(activate<KIND>(v3, slope));
      }
      if constexpr (MODE == STRIDED) {
        y0[j * ycs] = store<T>(activate<KIND>(v0, slope));
        y1[j * ycs] = store<T>(activate<KIND>(v1, slope));
        y2[j * ycs] = store<T>(activate<KIND>(v2, slope));
        y3[j * ycs] = store<T>(activate<KIND>(v3, slope));
      }
    }
  }
  static NEP_INLINE void four_inplace(T* __restrict__ p0, T* __restrict__ p1, T* __restrict__ p2, T* __restrict__ p3,
                                      int64_t n, A upper, A slope, int32_t* __restrict__ c0, int32_t* __restrict__ c1,
                                      int32_t* __restrict__ c2, int32_t* __restrict__ c3, int32_t* __restrict__ c4) {
    for (int64_t j = 0; j < n; ++j) {
      const A v0 = load<T>(p0[j]), v1 = load<T>(p1[j]), v2 = load<T>(p2[j]), v3 = load<T>(p3[j]);
      int32_t on = 0, off = 0, zero = 0, sat = 0, nf = 0;
      count1(v0, upper, on, off, zero, sat, nf);
      count1(v1, upper, on, off, zero, sat, nf);
      count1(v2, upper, on, off, zero, sat, nf);
      count1(v3, upper, on, off, zero, sat, nf);
      c0[j] += on, c1[j] += off, c2[j] += zero, c3[j] += sat, c4[j] += nf;
      p0[j] = store<T>(activate<KIND>(v0, slope));
      p1[j] = store<T>(activate<KIND>(v1, slope));
      p2[j] = store<T>(activate<KIND>(v2, slope));
      p3[j] = store<T>(activate<KIND>(v3, slope));
    }
  }
  // One run of n elements at x / y.
  static NEP_INLINE void do1(const T* x, T* y, int64_t n, int64_t ycs, A upper, A slope, int32_t* c, int64_t L) {
    if constexpr (std::is_same_v<T, c10::Half>) {  // fp16: through fp32 scratch (see half_to_float)
      using F = ChannelBlock<float, KIND, MODE == NOOUT ? NOOUT : CONTIG>;
      alignas(64) float xb[kStage], yb[kStage];
      for (int64_t b = 0; b < n; b += kStage) {
        const int64_t len = std::min(n - b, kStage);
        half_to_float((MODE == INPLACE ? y : x) + b, xb, len);
        F::one(xb, yb, len, 1, upper, slope, c + b, c + L + b, c + 2 * L + b, c + 3 * L + b, c + 4 * L + b);
        if constexpr (MODE == CONTIG || MODE == INPLACE) float_to_half(yb, y + b, len);
        if constexpr (MODE == STRIDED) {
          for (int64_t j = 0; j < len; ++j) y[(b + j) * ycs] = store<T>(yb[j]);
        }
      }
    } else if constexpr (MODE == INPLACE) {
      one_inplace(y, n, upper, slope, c, c + L, c + 2 * L, c + 3 * L, c + 4 * L);
    } else {
      one(x, y, n, ycs, upper, slope, c, c + L, c + 2 * L, c + 3 * L, c + 4 * L);
    }
  }
  // Four runs of n elements at x + q*xrs / y + q*yrs.
  static NEP_INLINE void do4(const T* x, T* y, int64_t n, int64_t xrs, int64_t yrs, int64_t ycs, A upper, A slope,
                             int32_t* c, int64_t L) {
    if constexpr (MODE == INPLACE) {
      four_inplace(y, y + yrs, y + 2 * yrs, y + 3 * yrs, n, upper, slope, c, c + L, c + 2 * L, c + 3 * L, c + 4 * L);
    } else {
      four(x, x + xrs, x + 2 * xrs, x + 3 * xrs, y, offset(y, yrs), offset(y, 2 * yrs), offset(y, 3 * yrs), n, ycs,
           upper, slope, c, c + L, c + 2 * L, c + 3 * L, c + 4 * L);
    }
  }
  static NEP_INLINE void run(const T* x, T* y, int64_t nrows, int64_t C, int64_t k, int64_t xrs, int64_t yrs,
                             int64_t ycs, bool flat, A upper, A slope, int32_t* cnt, int64_t L) {
    // Four runs at a time only pays where the loop vectorises (elsewhere the libm call or the
    // strided store dominates): the others take one run at a time, which also keeps the build short.
    constexpr bool by_four = worth_avx2_clone<T>(KIND, MODE) && !std::is_same_v<T, c10::Half>;
    if (flat) {  // runs of k rows = L elements back to back (x and y alike)
      const int64_t groups = nrows / k;
      int64_t g = 0;
      if constexpr (by_four) {
        for (; g + 4 <= groups; g += 4) do4(x + g * L, offset(y, g * L), L, L, L, ycs, upper, slope, cnt, L);
      }
      for (; g < groups; ++g) do1(x + g * L, offset(y, g * L), L, ycs, upper, slope, cnt, L);
      const int64_t tail = (nrows - groups * k) * C;
      if (tail) do1(x + groups * L, offset(y, groups * L), tail, ycs, upper, slope, cnt, L);
    } else {
      int64_t r = 0;
      if constexpr (by_four) {
        for (; r + 4 <= nrows; r += 4) do4(x + r * xrs, offset(y, r * yrs), C, xrs, yrs, ycs, upper, slope, cnt, L);
      }
      for (; r < nrows; ++r) do1(x + r * xrs, offset(y, r * yrs), C, ycs, upper, slope, cnt, L);
    }
  }
};

// Geometry of one call: x (and y) as [outer, C, inner] with element strides.
struct Geometry {
  int64_t outer, C, inner;
  int64_t xso, xsc, xsi;
  int64_t yso, ysc, ysi;
  int64_t mult = 1;  // every count is multiplied by this (stride-0 dims collapsed, count-only)
};

// Simplify the geometry: a size-1 dim takes no stride; count-only calls collapse stride-0 outer/inner
// dims into a multiplier (the 2^32-element expand() view becomes 2 elements); [outer, C, 1] becomes
// [1, C, outer]; outer and inner merge when both x and y allow it.
inline void normalize(Geometry& g, bool has_output) {
  for (int it = 0; it < 4; ++it) {
    if (g.inner == 1 && g.outer > 1) {
      g.inner = g.outer;
      g.xsi = g.xso;
      g.ysi = g.yso;
      g.outer = 1;
    }
    if (g.outer == 1) g.xso = g.yso = 0;
    if (!has_output) {
      if (g.inner > 1 && g.xsi == 0) {
        g.mult *= g.inner;
        g.inner = 1;
        continue;
      }
      if (g.outer > 1 && g.xso == 0) {
        g.mult *= g.outer;
        g.outer = 1;
        continue;
      }
    }
    if (g.outer > 1 && g.inner > 1 && g.xso == g.inner * g.xsi && (!has_output || g.yso == g.inner * g.ysi)) {
      g.inner *= g.outer;
      g.outer = 1;
      g.xso = g.yso = 0;
      continue;
    }
    break;
  }
  if (g.C == 1) g.xsc = g.ysc = 1;
}

// Thread-local int64 [C][5] partial counts, added into hist with atomic adds when a task ends. Not
// under a mutex: when both threads finished together, the second slept in the kernel (futex) and, on a
// loaded machine, its wake-up waited for a time slice: every 2-thread histogram region of 64k-1M
// elements took 3-8 ms where one thread needed 0.05-1 ms (bench/cpu_under_load.py --crossover).
struct Merger {
  int64_t* hist;
  int64_t bins, C, mult;
  bool has_upper;
  static NEP_INLINE void put(int64_t* h, int64_t v) {
    if (v != 0) __atomic_fetch_add(h, v, __ATOMIC_RELAXED);
  }
  void add(const std::vector<int64_t>& local) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t* l = local.data() + c * NCOLS;
      int64_t* h = hist + c * bins;
      put(h + ON, l[ON] * mult);
      put(h + OFF, l[OFF] * mult);
      put(h + ZERO, l[ZERO] * mult);
      if (has_upper) put(h + SAT, l[SAT] * mult);
      if (bins > NONFINITE) put(h + NONFINITE, l[NONFINITE] * mult);
    }
  }
};

constexpr int64_t kGrainElems = 32768;   // below this many elements a call runs on one thread (crossover ~36k)
constexpr int64_t kPieceElems = 65536;   // path A splits longer runs into pieces of this size
constexpr int64_t kRowsPerFlush = int64_t(1) << 20;  // path B flushes its int32 counters this often
constexpr int64_t kFlatRun = 64;  // path B, flat layout: rows per run so that a run has >= this many elements

// f(std::integral_constant<int, MODE>) for the run-time mode; a count-only call (KIND == NONE)
// instantiates NOOUT only, an activation every mode but NOOUT.
template <int KIND, class F>
NEP_INLINE void with_mode(int mode, F&& f) {
  if constexpr (KIND == NONE) {
    f(std::integral_constant<int, NOOUT>{});
  } else {
    switch (mode) {
      case INPLACE: f(std::integral_constant<int, INPLACE>{}); break;
      case CONTIG: f(std::integral_constant<int, CONTIG>{}); break;
      default: f(std::integral_constant<int, STRIDED>{}); break;
    }
  }
}

// Count the sign states of x (and write y = φ(x) unless MODE == NOOUT) over geometry g.
template <class T, int KIND>
void count_and_activate(Geometry g, const T* x, T* y, bool inplace, int64_t* hist, int64_t bins,
                        std::optional<double> upper_opt, double negative_slope) {
  using A = acc_t<T>;
  const bool has_output = y != nullptr;
  normalize(g, has_output);
  const int64_t numel = g.outer * g.C * g.inner;
  if (numel == 0) return;
  // The threshold in the input dtype, as PyTorch's `z >= upper` compares (6.0 is exact everywhere).
  const A upper = upper_opt ? static_cast<A>(static_cast<T>(*upper_opt)) : std::numeric_limits<A>::infinity();
  const A slope = static_cast<A>(negative_slope);
  Merger merger{hist, bins, g.C, g.mult, upper_opt.has_value()};
  const int64_t C = g.C;
  // fp16 / bf16 count-only calls: the 16-bit pattern tests (AVX2), when the threshold allows them.
  uint16_t U16 = 0;
  if constexpr (is_16bit<T>() && KIND == NONE) {
    if (NEP_X86 && cpu_has_avx2()) U16 = upper_bits16<T>(upper_opt);
  }
  const bool fast16 = U16 != 0;
  const bool sat16 = upper_opt.has_value();

  const bool path_a = g.inner > 1 && g.xsi == 1;
  const bool path_b = !path_a && g.xsc == 1;
  if (path_a || !path_b) {
    // ----- path A: runs along inner (contiguous, or the generic strided fallback) -----
    const int64_t pieces = std::max<int64_t>(1, (g.inner + kPieceElems - 1) / kPieceElems);
    const int64_t piece = (g.inner + pieces - 1) / pieces;
    const int64_t units = g.outer * C * pieces;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, piece));
    const int mode = !has_output ? NOOUT : inplace ? INPLACE : (path_a && g.ysi == 1) ? CONTIG : STRIDED;
    nepenthe_cpu::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> local(C * NCOLS, 0);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t row = u / pieces, s = u % pieces;
        const int64_t o = row / C, c = row % C;
        const int64_t i0 = s * piece, n = std::min(g.inner, i0 + piece) - i0;
        if (n <= 0) continue;
        const T* xr = x + o * g.xso + c * g.xsc + i0 * g.xsi;
        T* yr = has_output ? y + o * g.yso + c * g.ysc + i0 * g.ysi : nullptr;
        int64_t* out = local.data() + c * NCOLS;
#if NEP_X86
        if constexpr (is_16bit<T>() && KIND == NONE) {
          if (path_a && fast16) {
            const auto* xu = reinterpret_cast<const uint16_t*>(xr);
            sat16 ? count16_run<T, true>(xu, n, U16, out) : count16_run<T, false>(xu, n, U16, out);
            continue;
          }
        }
#endif
        if (path_a && mode != STRIDED) {
          with_mode<KIND>(mode, [&](auto m) {
            constexpr int M = decltype(m)::value;
            if constexpr (M != STRIDED) {
              run_kernel<worth_avx2_clone<T>(KIND, M), RowKernel<T, KIND, M, true>>(xr, yr, n, g.xsi, g.ysi, upper,
                                                                                slope, out);
            }
          });
        } else {  // a strided output or generic strides: element by element (NOOUT, INPLACE or STRIDED)
          with_mode<KIND>(mode == CONTIG ? STRIDED : mode, [&](auto m) {
            constexpr int M = decltype(m)::value;
            if constexpr (M != CONTIG) RowKernel<T, KIND, M, false>::run(xr, yr, n, g.xsi, g.ysi, upper, slope, out);
          });
        }
      }
      merger.add(local);
    });
    return;
  }

  // ----- path B: channel-contiguous rows (channels_last, Linear [rows, C]) -----
  const int64_t rows = g.outer * g.inner;
  const bool flat = g.xsi == C && (!has_output || (g.ysi == C && g.ysc == 1));
  int64_t k = flat ? std::max<int64_t>(1, (kFlatRun + C - 1) / C) : 1;
  if (flat && fast16) {  // runs of whole vectors: L a multiple of 16 (and >= kFlatRun)
    const int64_t step = 16 / std::gcd<int64_t>(C, 16);
    k = std::max<int64_t>(1, (kFlatRun + step * C - 1) / (step * C)) * step;
  }
  const int64_t L = k * C;
  const int mode = !has_output ? NOOUT : inplace ? INPLACE : g.ysc == 1 ? CONTIG : STRIDED;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
  nepenthe_cpu::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local(C * NCOLS, 0);
    std::vector<int32_t> cnt(NCOLS * L, 0);
    auto flush = [&]() {
      for (int col = 0; col < NCOLS; ++col) {
        int32_t* cc = cnt.data() + col * L;
        for (int64_t j = 0; j < L; ++j) {
          local[(j % C) * NCOLS + col] += cc[j];
          cc[j] = 0;
        }
      }
    };
    int64_t since_flush = 0;  // rows counted into cnt since the last flush (each adds <= 1 per slot)
    for (int64_t r = begin; r < end;) {
      const int64_t o = r / g.inner, i0 = r % g.inner;
      const int64_t nrows = std::min({end - r, g.inner - i0, kRowsPerFlush});
      if (since_flush + nrows > kRowsPerFlush) {
        flush();
        since_flush = 0;
      }
      const T* xr = x + o * g.xso + i0 * g.xsi;
      T* yr = has_output ? y + o * g.yso + i0 * g.ysi : nullptr;
#if NEP_X86
      if constexpr (is_16bit<T>() && KIND == NONE) {
        if (fast16) {
          const auto* xu = reinterpret_cast<const uint16_t*>(xr);
          const int64_t groups = flat ? nrows / k : nrows;
          auto rows16 = [&](const uint16_t* p, int64_t nr, int64_t len, int64_t stride) {
            sat16 ? count16_rows<T, true>(p, nr, len, stride, U16, cnt.data(), L)
                  : count16_rows<T, false>(p, nr, len, stride, U16, cnt.data(), L);
          };
          if (flat) {
            rows16(xu, groups, L, L);                        // k rows at a time as one run of L
            const int64_t tail = (nrows - groups * k) * C;   // the last < k rows: one short run
            if (tail) rows16(xu + groups * L, 1, tail, L);
          } else {
            rows16(xu, nrows, C, g.xsi);
          }
          since_flush += nrows;
          r += nrows;
          continue;
        }
      }
#endif
      with_mode<KIND>(mode, [&](auto m) {
        constexpr int M = decltype(m)::value;
        run_kernel<worth_avx2_clone<T>(KIND, M), ChannelBlock<T, KIND, M>>(xr, yr, nrows, C, k, g.xsi, g.ysi, g.ysc, flat,
                                                                     upper, slope, cnt.data(), L);
      });
      since_flush += nrows;
      r += nrows;
    }
    flush();
    merger.add(local);
  });
}

}  // namespace nepenthe_cpu
