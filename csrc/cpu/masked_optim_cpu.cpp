// CPU kernels of nepenthe_ext::masked_sgd_ and nepenthe_ext::masked_adamw_: one torch.optim.SGD /
// AdamW step over lists of contiguous tensors, with the arithmetic of reference.masked_sgd_ /
// masked_adamw_ done per element in one pass over each parameter (fp32 compute for fp16/bf16/fp32,
// fp64 for fp64), then the masked entries (mask False) of the parameter and of every state tensor
// *set* to +0.0. Multi-tensor: all parameters form one virtual concatenated range of elements that
// one parallel region splits evenly between the threads. Contract: nepenthe/ops/backends.py.
#include "common.h"

#if NEP_X86
#include <immintrin.h>
#endif

namespace nepenthe_cpu {
namespace {

constexpr int64_t kOptimGrain = 32768;  // elements; smaller steps run on one thread (measured crossover ~36k)
// A thread's piece of a tensor starts at a multiple of this many elements, so that a bit-packed mask
// piece starts on a byte (and the SIMD blocks on a whole lane word).
constexpr int64_t kPieceAlign = 64;

// How a parameter's mask is stored: none, one bool byte per element, or one bit per element (packed
// least significant bit first, as nepenthe/ops/mask_bits.py writes it).
enum MaskKind : int { kNoMask = 0, kByteMask = 1, kBitMask = 2 };

// The keep flag (0 / 1) of element j of a piece whose mask starts at `mask`.
template <int MK>
NEP_INLINE uint8_t keep_at(const uint8_t* mask, int64_t j) {
  if constexpr (MK == kBitMask) {
    return (mask[j >> 3] >> (j & 7)) & 1;
  } else {
    return mask[j];
  }
}

// The mask of a piece's elements from j on (j a multiple of 8 when the mask is packed).
template <int MK>
NEP_INLINE const uint8_t* mask_from(const uint8_t* mask, int64_t j) {
  return MK == kBitMask ? mask + (j >> 3) : mask + j;
}

// AVX2 copy where the loop vectorises (fp16 <-> fp32 conversions stay scalar without F16C).
template <class T, class K, class... A>
NEP_INLINE void run_opt(A... a) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    run_baseline<K>(a...);
  } else {
    run_best<K>(a...);
  }
}

// ----- SGD ----------------------------------------------------------------------------------------------
struct SgdScalars {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

template <class T, bool HAS_BUF, int MK>
struct SgdKernel {
  static NEP_INLINE void run(T* __restrict__ p, const T* __restrict__ gr, T* __restrict__ buf,
                             const uint8_t* __restrict__ mask, int64_t n, const SgdScalars* s) {
    using A = acc_t<T>;
    const A wd = static_cast<A>(s->weight_decay), mom = static_cast<A>(s->momentum);
    const A damp1 = static_cast<A>(1 - s->dampening), neg_lr = static_cast<A>(-s->lr);
    const bool use_wd = s->weight_decay != 0, maximize = s->maximize, nesterov = s->nesterov, first = s->first_step;
    for (int64_t j = 0; j < n; ++j) {
      const A pv = load<T>(p[j]);
      A g = load<T>(gr[j]);
      g = maximize ? -g : g;
      g = use_wd ? g + wd * pv : g;
      A b = A(0);
      if constexpr (HAS_BUF) {
        const A old = load<T>(buf[j]);
        b = first ? g : old * mom + damp1 * g;
        g = nesterov ? g + mom * b : b;
      }
      A np = pv + neg_lr * g;
      if constexpr (MK != kNoMask) {
        const uint8_t keep = keep_at<MK>(mask, j);
        np = keep_or_zero(keep, np);
        b = keep_or_zero(keep, b);
      }
      p[j] = store<T>(np);
      if constexpr (HAS_BUF) buf[j] = store<T>(b);
    }
  }
};

// ----- AdamW --------------------------------------------------------------------------------------------
struct AdamScalars {
  double decay;        // 1 - lr * weight_decay
  double lerp_weight;  // 1 - beta1
  double beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size;
  bool maximize;
};

// In-place square roots of buf[0..n). std::sqrt keeps the loops around it scalar (gcc guards it
// with an errno branch unless -fno-math-errno), so the roots are taken here with SSE/SSE2 (part of
// baseline x86-64, VEX-encoded inside the AVX2 clone) and the arithmetic around them stays in
// plain loops that auto-vectorise.
template <class A>
NEP_INLINE void sqrt_inplace(A* buf, int64_t n) {
  int64_t j = 0;
#if NEP_X86
  if constexpr (std::is_same_v<A, float>) {
    for (; j + 4 <= n; j += 4) _mm_storeu_ps(buf + j, _mm_sqrt_ps(_mm_loadu_ps(buf + j)));
  } else {
    for (; j + 2 <= n; j += 2) _mm_storeu_pd(buf + j, _mm_sqrt_pd(_mm_loadu_pd(buf + j)));
  }
#endif
  for (; j < n; ++j) buf[j] = std::sqrt(buf[j]);
}

template <class T, bool AMSGRAD, int MK>
struct AdamKernel {
  using A = acc_t<T>;
  static constexpr int64_t kBlock = 256;  // elements per pass; the three scratch rows stay in L1

  // Pass 1 of a block: moments (stored), and p*decay, m, v(max) into the scratch rows.
  static NEP_INLINE void moments(T* __restrict__ p, const T* __restrict__ gr, T* __restrict__ m, T* __restrict__ v,
                                 T* __restrict__ vmax, const uint8_t* __restrict__ mask, int64_t n,
                                 const AdamScalars* s, A* __restrict__ pbuf, A* __restrict__ mbuf,
                                 A* __restrict__ root) {
    const A decay = static_cast<A>(s->decay), w = static_cast<A>(s->lerp_weight);
    const A b2 = static_cast<A>(s->beta2), omb2 = static_cast<A>(s->one_minus_beta2);
    // Loop-invariant choices as arithmetic (exact), which keeps the loop free of branches:
    // -g == g * -1, and torch.lerp's `weight < 0.5 ? self + w*(end-self) : end - (end-self)*(1-w)`
    // is `base + coef*(end-self)` with base = self, coef = w or base = end, coef = -(1-w).
    const A gsign = s->maximize ? A(-1) : A(1);
    const bool small_weight = s->lerp_weight < 0.5;
    const A coef = small_weight ? w : -(A(1) - w), from_self = small_weight ? A(1) : A(0);
    for (int64_t j = 0; j < n; ++j) {
      const A g = load<T>(gr[j]) * gsign;
      const A mo = load<T>(m[j]);
      const A base = from_self != A(0) ? mo : g;
      const A mv = base + coef * (g - mo);
      const A vv = load<T>(v[j]) * b2 + omb2 * g * g;
      A vm = vv;
      if constexpr (AMSGRAD) {
        const A old = load<T>(vmax[j]);
        const A larger = old >= vv ? old : vv;  // vv when vv is NaN
        vm = old != old ? old : larger;          // torch.maximum: a NaN in either wins
      }
      pbuf[j] = load<T>(p[j]) * decay;
      mbuf[j] = mv;
      root[j] = vm;
      if constexpr (MK != kNoMask) {
        const uint8_t keep = keep_at<MK>(mask, j);
        m[j] = store<T>(keep_or_zero(keep, mv));
        v[j] = store<T>(keep_or_zero(keep, vv));
        if constexpr (AMSGRAD) vmax[j] = store<T>(keep_or_zero(keep, vm));
      } else {
        m[j] = store<T>(mv);
        v[j] = store<T>(vv);
        if constexpr (AMSGRAD) vmax[j] = store<T>(vm);
      }
    }
  }
  // Pass 2: p = p*decay - step_size * m / (sqrt(v)/bc2 + eps), then the mask.
  static NEP_INLINE void update(T* __restrict__ p, const uint8_t* __restrict__ mask, int64_t n, const AdamScalars* s,
                                const A* __restrict__ pbuf, const A* __restrict__ mbuf, const A* __restrict__ root) {
    const A bc2 = static_cast<A>(s->bc2_sqrt), eps = static_cast<A>(s->eps), neg_step = static_cast<A>(s->neg_step_size);
    for (int64_t j = 0; j < n; ++j) {
      const A denom = root[j] / bc2 + eps;
      const A pv = pbuf[j] + neg_step * (mbuf[j] / denom);
      if constexpr (MK != kNoMask) {
        p[j] = store<T>(keep_or_zero(keep_at<MK>(mask, j), pv));
      } else {
        p[j] = store<T>(pv);
      }
    }
  }
  static NEP_INLINE void run(T* p, const T* gr, T* m, T* v, T* vmax, const uint8_t* mask, int64_t n,
                             const AdamScalars* s) {
    alignas(64) A pbuf[kBlock], mbuf[kBlock], root[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      const uint8_t* mk = MK != kNoMask ? mask_from<MK>(mask, b) : nullptr;  // b: a multiple of 256
      moments(p + b, gr + b, m + b, v + b, AMSGRAD ? vmax + b : nullptr, mk, len, s, pbuf, mbuf, root);
      sqrt_inplace(root, len);
      update(p + b, mk, len, s, pbuf, mbuf, root);
    }
  }
};

// ----- SIMD kernels for fp32 and bf16 storage ------------------------------------------------------------
// One pass with explicit intrinsics (gcc does not vectorise the bf16 rounding, the mask widening or
// the square root around a division well): load, the step's arithmetic in fp32 lanes, the mask
// (masked lanes become exactly +0.0 whatever the arithmetic gave), store. The kernels are written
// once over a lane type V: V8 (AVX2 + FMA, 8 lanes) and V16 (AVX-512 F/BW/VL/DQ, 16 lanes; what
// torch's own fused steps use where the CPU has it). The last n % V::N elements go through the same
// body on zero-padded copies, so every element of a tensor gets the same arithmetic wherever a
// thread's share of the tensor starts or ends. gcc only (the per-ISA copies are made with `#pragma
// GCC target`); other compilers build the portable loops.
#if NEP_X86 && !defined(__clang__)
#define NEP_OPTIM_SIMD 1
#else
#define NEP_OPTIM_SIMD 0
#endif
#if NEP_OPTIM_SIMD
// (common.h's NEP_TARGET_AVX512 is noinline, for whole activation blocks; these lane helpers inline)
#define NEP_AVX2_INLINE NEP_TARGET_AVX2 inline __attribute__((always_inline))
#define NEP_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) inline \
  __attribute__((always_inline))
// cpu_has_avx512() (common.h): NEPENTHE_CPU_NO_AVX512=1 keeps these kernels on AVX2 too.

// bf16 rounding as c10 does it: nearest even, (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0.
struct V8 {
  static constexpr int N = 8;
  using R = __m256;
  using K = __m256;  // all-ones lanes = keep
  static NEP_AVX2_INLINE R set1(float x) { return _mm256_set1_ps(x); }
  static NEP_AVX2_INLINE R zero() { return _mm256_setzero_ps(); }
  static NEP_AVX2_INLINE R sign_mask(bool neg) {
    return _mm256_castsi256_ps(_mm256_set1_epi32(neg ? int32_t(0x80000000u) : 0));
  }
  static NEP_AVX2_INLINE R ld(const float* p) { return _mm256_loadu_ps(p); }
  static NEP_AVX2_INLINE R ld(const c10::BFloat16* p) {  // bf16 -> fp32 is exact: the bits shifted up
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static NEP_AVX2_INLINE void st(float* p, R v) { _mm256_storeu_ps(p, v); }
  static NEP_AVX2_INLINE void st(c10::BFloat16* p, R v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // every lane is in [0, 0xFFFF], so the unsigned-saturating pack is exact
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  static NEP_AVX2_INLINE K keep(const uint8_t* mk) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mk)));
    return _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(w, _mm256_setzero_si256()), _mm256_set1_epi32(-1)));
  }
  static NEP_AVX2_INLINE K keep_bits(const uint8_t* mk) {  // the 8 bits of one byte
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(*mk), bit), bit));
  }
  static NEP_AVX2_INLINE R apply(K k, R v) { return _mm256_and_ps(v, k); }
  static NEP_AVX2_INLINE R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static NEP_AVX2_INLINE R fnmadd(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static NEP_AVX2_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static NEP_AVX2_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  static NEP_AVX2_INLINE R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static NEP_AVX2_INLINE R div(R a, R b) { return _mm256_div_ps(a, b); }
  static NEP_AVX2_INLINE R sqrt(R a) { return _mm256_sqrt_ps(a); }
  static NEP_AVX2_INLINE R bxor(R a, R b) { return _mm256_xor_ps(a, b); }
  // torch.maximum(old, v): the larger, a NaN in either wins
  static NEP_AVX2_INLINE R maximum_nan(R old, R v) {
    const R m = _mm256_blendv_ps(v, old, _mm256_cmp_ps(old, v, _CMP_GE_OQ));
    return _mm256_blendv_ps(m, old, _mm256_cmp_ps(old, old, _CMP_UNORD_Q));
  }
};

struct V16 {
  static constexpr int N = 16;
  using R = __m512;
  using K = __mmask16;  // bit set = keep
  static NEP_AVX512_INLINE R set1(float x) { return _mm512_set1_ps(x); }
  static NEP_AVX512_INLINE R zero() { return _mm512_setzero_ps(); }
  static NEP_AVX512_INLINE R sign_mask(bool neg) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(neg ? int32_t(0x80000000u) : 0));
  }
  static NEP_AVX512_INLINE R ld(const float* p) { return _mm512_loadu_ps(p); }
  static NEP_AVX512_INLINE R ld(const c10::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static NEP_AVX512_INLINE void st(float* p, R v) { _mm512_storeu_ps(p, v); }
  static NEP_AVX512_INLINE void st(c10::BFloat16* p, R v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));  // lanes <= 0xFFFF: exact
  }
  static NEP_AVX512_INLINE K keep(const uint8_t* mk) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mk));
    return _mm_test_epi8_mask(b, b);
  }
  static NEP_AVX512_INLINE K keep_bits(const uint8_t* mk) {  // two bytes are the lane mask itself
    uint16_t bits;
    std::memcpy(&bits, mk, sizeof bits);
    return static_cast<K>(bits);
  }
  static NEP_AVX512_INLINE R apply(K k, R v) { return _mm512_maskz_mov_ps(k, v); }
  static NEP_AVX512_INLINE R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static NEP_AVX512_INLINE R fnmadd(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }
  static NEP_AVX512_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static NEP_AVX512_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
  static NEP_AVX512_INLINE R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static NEP_AVX512_INLINE R div(R a, R b) { return _mm512_div_ps(a, b); }
  static NEP_AVX512_INLINE R sqrt(R a) { return _mm512_sqrt_ps(a); }
  static NEP_AVX512_INLINE R bxor(R a, R b) { return _mm512_xor_ps(a, b); }
  static NEP_AVX512_INLINE R maximum_nan(R old, R v) {
    const R m = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(old, v, _CMP_GE_OQ), old);
    return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(old, old, _CMP_UNORD_Q), old);
  }
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using V = V8;
#include "masked_optim_simd.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
using V = V16;
#include "masked_optim_simd.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // NEP_OPTIM_SIMD

// fp32 and bf16 on an AVX2 / AVX-512 machine: the SIMD kernels; otherwise (and for fp16 / fp64)
// the portable loops above (their AVX2 clone where gcc vectorises them).
template <class T>
constexpr bool kHasSimdKernel = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

template <class T, bool HAS_BUF, int MK>
void sgd_piece(T* p, const T* g, T* b, const uint8_t* mk, int64_t n, const SgdScalars* s) {
#if NEP_OPTIM_SIMD
  if constexpr (kHasSimdKernel<T>) {
    if (cpu_has_avx512()) return avx512::run_simd<avx512::SgdSimd<T, HAS_BUF, MK>>(p, g, b, mk, n, s);
    if (cpu_has_avx2()) return avx2::run_simd<avx2::SgdSimd<T, HAS_BUF, MK>>(p, g, b, mk, n, s);
  }
#endif
  run_opt<T, SgdKernel<T, HAS_BUF, MK>>(p, g, b, mk, n, s);
}

template <class T, bool AMSGRAD, int MK>
void adam_piece(T* p, const T* g, T* m, T* v, T* vmax, const uint8_t* mk, int64_t n, const AdamScalars* s) {
#if NEP_OPTIM_SIMD
  if constexpr (kHasSimdKernel<T>) {
    if (cpu_has_avx512()) return avx512::run_simd<avx512::AdamSimd<T, AMSGRAD, MK>>(p, g, m, v, vmax, mk, n, s);
    if (cpu_has_avx2()) return avx2::run_simd<avx2::AdamSimd<T, AMSGRAD, MK>>(p, g, m, v, vmax, mk, n, s);
  }
#endif
  run_opt<T, AdamKernel<T, AMSGRAD, MK>>(p, g, m, v, vmax, mk, n, s);
}

// ----- checks and the multi-tensor driver ---------------------------------------------------------------
void check_list_len(size_t got, size_t want, const char* op, const char* name, const char* why) {
  TORCH_CHECK(got == want, op, ": ", name, " has ", got, " tensors but params has ", want, "; pass one per parameter",
              why);
}

// t: contiguous, CPU, the dtype and shape of the parameter.
void check_like_param(const at::Tensor& t, const at::Tensor& p, const char* op, const char* name, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
              "; every tensor of the CPU kernel must be on the CPU");
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              " but params[", i, "] has ", p.scalar_type(), "; keep each parameter's gradient and state in its dtype");
  TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i,
              "] has ", p.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] is not contiguous (strides ", t.strides(),
              "); the fused optimizer needs contiguous tensors (call .contiguous() when creating the state)");
}

void check_param(const at::Tensor& p, const char* op, size_t i) {
  TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(),
              "; every tensor of the CPU kernel must be on the CPU");
  TORCH_CHECK(is_kernel_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ", p.scalar_type(),
              "; supported: float32, float16, bfloat16, float64");
  TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] is not contiguous (strides ", p.strides(),
              "); the fused optimizer needs contiguous parameters");
}

struct MaskArg {
  const uint8_t* data = nullptr;  // null: no mask
  int kind = kNoMask;
};

MaskArg checked_mask(const c10::List<std::optional<at::Tensor>>& masks, size_t i, const at::Tensor& p, const char* op) {
  const std::optional<at::Tensor> mo = masks.get(i);
  if (!mo.has_value() || !mo->defined()) return {};
  const at::Tensor& mk = *mo;
  TORCH_CHECK(mk.device().is_cpu(), op, ": masks[", i, "] is on ", mk.device(), "; keep the masks on the CPU too");
  const int64_t packed_bytes = (p.numel() + 7) / 8;
  if (mk.scalar_type() == at::kByte) {
    TORCH_CHECK(mk.dim() == 1 && mk.numel() == packed_bytes, op, ": masks[", i, "] is uint8 of shape ", mk.sizes(),
                "; a packed mask of params[", i, "] (", p.numel(), " elements) must be 1-d with ", packed_bytes,
                " bytes (nepenthe.ops.pack_mask)");
    TORCH_CHECK(mk.is_contiguous(), op, ": masks[", i, "] (packed) is not contiguous; pass mask.contiguous()");
    return {mk.const_data_ptr<uint8_t>(), kBitMask};
  }
  TORCH_CHECK(mk.scalar_type() == at::kBool, op, ": masks[", i, "] must be a bool tensor (True = keep) or a packed ",
              "uint8 one (nepenthe.ops.pack_mask), got ", mk.scalar_type());
  TORCH_CHECK(mk.sizes() == p.sizes(), op, ": masks[", i, "] has shape ", mk.sizes(), " but params[", i,
              "] has ", p.sizes());
  TORCH_CHECK(mk.is_contiguous(), op, ": masks[", i, "] is not contiguous (strides ", mk.strides(),
              "); pass mask.contiguous()");
  return {reinterpret_cast<const uint8_t*>(mk.const_data_ptr<bool>()), kByteMask};  // bool: one byte, 0 or 1
}

// f(std::integral_constant<int, kind>) for a runtime mask kind, so the kernels take it as a template argument.
template <class F>
void with_mask_kind(int kind, F&& f) {
  switch (kind) {
    case kByteMask:
      return f(std::integral_constant<int, kByteMask>{});
    case kBitMask:
      return f(std::integral_constant<int, kBitMask>{});
    default:
      return f(std::integral_constant<int, kNoMask>{});
  }
}

// Elements [begin, end) of the concatenation of all tensors: f(tensor index, offset, count) per piece.
template <class F>
void for_each_piece(const std::vector<int64_t>& prefix, int64_t begin, int64_t end, F&& f) {
  size_t t = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
  for (int64_t e = begin; e < end; ++t) {
    const int64_t stop = std::min(end, prefix[t + 1]);
    if (stop > e) f(t, e - prefix[t], stop - e);
    e = std::max(e, stop);
  }
}

// Where each tensor starts in the virtual concatenation, every length rounded up to kPieceAlign.
std::vector<int64_t> prefix_sums(at::TensorList params) {
  std::vector<int64_t> prefix(params.size() + 1, 0);
  for (size_t i = 0; i < params.size(); ++i) {
    prefix[i + 1] = prefix[i] + (params[i].numel() + kPieceAlign - 1) / kPieceAlign * kPieceAlign;
  }
  return prefix;
}

// One parallel region over all tensors: f(tensor index, offset, count) for each thread's pieces, every
// offset a multiple of kPieceAlign (the padding past a tensor's end is skipped).
template <class F>
void parallel_pieces(at::TensorList params, F&& f) {
  const std::vector<int64_t> prefix = prefix_sums(params);
  const int64_t units = prefix.back() / kPieceAlign;
  nepenthe_cpu::parallel_for(0, units, kOptimGrain / kPieceAlign, [&](int64_t begin, int64_t end) {
    for_each_piece(prefix, begin * kPieceAlign, end * kPieceAlign, [&](size_t i, int64_t off, int64_t len) {
      len = std::min(len, params[i].numel() - off);
      if (len > 0) f(i, off, len);
    });
  });
}

template <class T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<std::optional<at::Tensor>>& masks, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, bool first_step) {
  constexpr const char* op = "nepenthe_ext::masked_sgd_";
  const size_t n = params.size();
  check_list_len(grads.size(), n, op, "grads", "");
  check_list_len(masks.size(), n, op, "masks", " (None for an unmasked one)");
  const bool has_buf = momentum != 0;
  if (has_buf) {
    check_list_len(momentum_buffers.size(), n, op, "momentum_buffers", " when momentum != 0");
  } else {
    TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, op, ": momentum_buffers has ",
                momentum_buffers.size(), " tensors; pass none when momentum == 0 (or one per parameter)");
  }
  std::vector<MaskArg> mask_args(n);
  for (size_t i = 0; i < n; ++i) {
    check_param(params[i], op, i);
    check_like_param(grads[i], params[i], op, "grads", i);
    if (has_buf) check_like_param(momentum_buffers[i], params[i], op, "momentum_buffers", i);
    mask_args[i] = checked_mask(masks, i, params[i], op);
  }
  const SgdScalars s{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  parallel_pieces(params, [&](size_t i, int64_t off, int64_t len) {
    dispatch_float(params[i].scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      T* p = ptr<T>(params[i]) + off;
      const T* g = ptr<T>(grads[i]) + off;
      T* b = has_buf ? ptr<T>(momentum_buffers[i]) + off : nullptr;
      with_mask_kind(mask_args[i].kind, [&](auto kind) {
        constexpr int MK = decltype(kind)::value;
        const uint8_t* mk = MK == kNoMask ? nullptr : mask_from<MK>(mask_args[i].data, off);
        if (has_buf) {
          sgd_piece<T, true, MK>(p, g, b, mk, len, &s);
        } else {
          sgd_piece<T, false, MK>(p, g, b, mk, len, &s);
        }
      });
    });
  });
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      const c10::List<std::optional<at::Tensor>>& masks, double lr, double beta1, double beta2,
                      double eps, double weight_decay, int64_t step, bool amsgrad, bool maximize) {
  constexpr const char* op = "nepenthe_ext::masked_adamw_";
  const size_t n = params.size();
  check_list_len(grads.size(), n, op, "grads", "");
  check_list_len(exp_avgs.size(), n, op, "exp_avgs", "");
  check_list_len(exp_avg_sqs.size(), n, op, "exp_avg_sqs", "");
  check_list_len(masks.size(), n, op, "masks", " (None for an unmasked one)");
  if (amsgrad) {
    check_list_len(max_exp_avg_sqs.size(), n, op, "max_exp_avg_sqs", " when amsgrad=True");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, op, ": max_exp_avg_sqs has ",
                max_exp_avg_sqs.size(), " tensors; pass none when amsgrad=False (or one per parameter)");
  }
  TORCH_CHECK(step >= 1, op, ": step must be the already-incremented step count (>= 1), got ", step);
  std::vector<MaskArg> mask_args(n);
  for (size_t i = 0; i < n; ++i) {
    check_param(params[i], op, i);
    check_like_param(grads[i], params[i], op, "grads", i);
    check_like_param(exp_avgs[i], params[i], op, "exp_avgs", i);
    check_like_param(exp_avg_sqs[i], params[i], op, "exp_avg_sqs", i);
    if (amsgrad) check_like_param(max_exp_avg_sqs[i], params[i], op, "max_exp_avg_sqs", i);
    mask_args[i] = checked_mask(masks, i, params[i], op);
  }
  // Step constants in double, as reference.masked_adamw_ computes them in Python.
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, static_cast<double>(step)));
  const AdamScalars s{1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps,
                      -(lr / bias_correction1), maximize};
  parallel_pieces(params, [&](size_t i, int64_t off, int64_t len) {
    dispatch_float(params[i].scalar_type(), op, [&](auto tag) {
      using T = decltype(tag);
      T* p = ptr<T>(params[i]) + off;
      const T* g = ptr<T>(grads[i]) + off;
      T* m = ptr<T>(exp_avgs[i]) + off;
      T* v = ptr<T>(exp_avg_sqs[i]) + off;
      T* vmax = amsgrad ? ptr<T>(max_exp_avg_sqs[i]) + off : nullptr;
      with_mask_kind(mask_args[i].kind, [&](auto kind) {
        constexpr int MK = decltype(kind)::value;
        const uint8_t* mk = MK == kNoMask ? nullptr : mask_from<MK>(mask_args[i].data, off);
        if (amsgrad) {
          adam_piece<T, true, MK>(p, g, m, v, vmax, mk, len, &s);
        } else {
          adam_piece<T, false, MK>(p, g, m, v, vmax, mk, len, &s);
        }
      });
    });
  });
}

}  // namespace
}  // namespace nepenthe_cpu

TORCH_LIBRARY_IMPL(nepenthe_ext, CPU, m) {
  m.impl("masked_sgd_", &nepenthe_cpu::masked_sgd_cpu);
  m.impl("masked_adamw_", &nepenthe_cpu::masked_adamw_cpu);
}
