// The SIMD step kernels of masked_optim_cpu.cpp, written once over a lane type V. Included twice
// by masked_optim_cpu.cpp, inside `#pragma GCC target` regions and namespaces that define V (V8:
// AVX2 + FMA, V16: AVX-512), so that every function here is compiled for that ISA only. No include
// guard on purpose; not a public header.

// Zero-padded copy of a stream's last r < N elements, written back on store() when the kernel writes it.
template <class T, int N>
struct Tail {
  alignas(64) T buf[N];
  T* src = nullptr;
  int64_t r = 0;
  NEP_INLINE T* load(const T* s, int64_t rem, bool writes) {
    src = writes ? const_cast<T*>(s) : nullptr, r = rem;
    for (int k = 0; k < N; ++k) buf[k] = k < rem ? s[k] : T(0);
    return buf;
  }
  NEP_INLINE void store() {
    if (src) std::memcpy(static_cast<void*>(src), buf, r * sizeof(T));
  }
};

// The keep lanes of the N elements whose mask starts at mk (bytes, or bits from a byte boundary).
template <int MK>
NEP_INLINE typename V::K keep_lanes(const uint8_t* mk) {
  if constexpr (MK == kBitMask) {
    return V::keep_bits(mk);
  } else {
    return V::keep(mk);
  }
}

// Mask bytes of the last r < N elements, zero-padded to a whole lane word.
template <int MK>
NEP_INLINE void tail_mask(uint8_t* dst, const uint8_t* mask, int64_t r) {
  if constexpr (MK == kBitMask) {
    std::memcpy(dst, mask, (r + 7) / 8);
  } else if constexpr (MK == kByteMask) {
    std::memcpy(dst, mask, r);
  }
}

// The body's loop-invariant lanes, built inside the ISA's own function.
struct SgdLanes {
  V::R gsign, wd, mom, damp1, neg_lr;
  bool use_wd, nesterov, first;
};

template <class T, bool HAS_BUF, int MK>
struct SgdSimd {
  using R = typename V::R;
  static NEP_INLINE void body(T* p, const T* gr, T* buf, const uint8_t* mk, const SgdLanes& c) {
    const R pv = V::ld(p);
    R g = V::bxor(V::ld(gr), c.gsign);                 // -g when maximize (the sign bit)
    if (c.use_wd) g = V::fmadd(c.wd, pv, g);           // g.add(p, alpha=wd)
    R b = V::zero();
    if constexpr (HAS_BUF) {                           // buf.mul_(mom).add_(g, alpha=1-dampening)
      b = c.first ? g : V::fmadd(c.damp1, g, V::mul(V::ld(buf), c.mom));
      g = c.nesterov ? V::fmadd(c.mom, b, g) : b;      // g.add(buf, alpha=mom) or buf
    }
    R np = V::fmadd(c.neg_lr, g, pv);                  // p.add_(g, alpha=-lr)
    if constexpr (MK != kNoMask) {
      const auto k = keep_lanes<MK>(mk);
      np = V::apply(k, np);
      if constexpr (HAS_BUF) b = V::apply(k, b);
    }
    V::st(p, np);
    if constexpr (HAS_BUF) V::st(buf, b);
  }
  static NEP_INLINE void run(T* p, const T* gr, T* buf, const uint8_t* mask, int64_t n, const SgdScalars* s) {
    constexpr int N = V::N;
    SgdLanes c;
    c.gsign = V::sign_mask(s->maximize);
    c.wd = V::set1(static_cast<float>(s->weight_decay));
    c.mom = V::set1(static_cast<float>(s->momentum));
    c.damp1 = V::set1(static_cast<float>(1 - s->dampening));
    c.neg_lr = V::set1(static_cast<float>(-s->lr));
    c.use_wd = s->weight_decay != 0, c.nesterov = s->nesterov, c.first = s->first_step;
    int64_t j = 0;
    for (; j + N <= n; j += N) {
      body(p + j, gr + j, HAS_BUF ? buf + j : buf, MK != kNoMask ? mask_from<MK>(mask, j) : mask, c);
    }
    if (j < n) {
      const int64_t r = n - j;
      Tail<T, N> tp, tg, tb;
      alignas(64) uint8_t tk[N] = {};
      if constexpr (MK != kNoMask) tail_mask<MK>(tk, mask_from<MK>(mask, j), r);
      T* pp = tp.load(p + j, r, true);
      const T* gg = tg.load(gr + j, r, false);
      T* bb = HAS_BUF ? tb.load(buf + j, r, true) : nullptr;
      body(pp, gg, bb, tk, c);
      tp.store();
      if constexpr (HAS_BUF) tb.store();
    }
  }
};

struct AdamLanes {
  V::R gsign, decay, w, one_minus_w, b2, omb2, bc2, eps, neg_step;
  bool small_weight;
};

template <class T, bool AMSGRAD, int MK>
struct AdamSimd {
  using R = typename V::R;
  static NEP_INLINE void body(T* p, const T* gr, T* m, T* v, T* vmax, const uint8_t* mk, const AdamLanes& c) {
    const R pd = V::mul(V::ld(p), c.decay);            // p.mul_(1 - lr*wd)
    const R g = V::bxor(V::ld(gr), c.gsign);
    const R mo = V::ld(m);
    const R d = V::sub(g, mo);
    // m.lerp_(g, w): m + w*(g-m) when w < 0.5, else g - (1-w)*(g-m) (torch.lerp's two forms)
    R mv = c.small_weight ? V::fmadd(c.w, d, mo) : V::fnmadd(c.one_minus_w, d, g);
    R vv = V::fmadd(V::mul(c.omb2, g), g, V::mul(V::ld(v), c.b2));  // v.mul_(b2).addcmul_(g, g, value=1-b2)
    R vm = vv;
    if constexpr (AMSGRAD) vm = V::maximum_nan(V::ld(vmax), vv);
    const R denom = V::add(V::div(V::sqrt(vm), c.bc2), c.eps);      // sqrt(v) / bc2_sqrt + eps
    R np = V::fmadd(c.neg_step, V::div(mv, denom), pd);             // p.addcdiv_(m, denom, value=-step_size)
    if constexpr (MK != kNoMask) {
      const auto k = keep_lanes<MK>(mk);
      np = V::apply(k, np);
      mv = V::apply(k, mv);
      vv = V::apply(k, vv);
      if constexpr (AMSGRAD) vm = V::apply(k, vm);
    }
    V::st(p, np);
    V::st(m, mv);
    V::st(v, vv);
    if constexpr (AMSGRAD) V::st(vmax, vm);
  }
  static NEP_INLINE void run(T* p, const T* gr, T* m, T* v, T* vmax, const uint8_t* mask, int64_t n,
                             const AdamScalars* s) {
    constexpr int N = V::N;
    AdamLanes c;
    c.gsign = V::sign_mask(s->maximize);
    c.decay = V::set1(static_cast<float>(s->decay));
    c.w = V::set1(static_cast<float>(s->lerp_weight));
    c.one_minus_w = V::set1(1.0f - static_cast<float>(s->lerp_weight));
    c.b2 = V::set1(static_cast<float>(s->beta2));
    c.omb2 = V::set1(static_cast<float>(s->one_minus_beta2));
    c.bc2 = V::set1(static_cast<float>(s->bc2_sqrt));
    c.eps = V::set1(static_cast<float>(s->eps));
    c.neg_step = V::set1(static_cast<float>(s->neg_step_size));
    c.small_weight = s->lerp_weight < 0.5;
    int64_t j = 0;
    for (; j + N <= n; j += N) {
      body(p + j, gr + j, m + j, v + j, AMSGRAD ? vmax + j : vmax, MK != kNoMask ? mask_from<MK>(mask, j) : mask, c);
    }
    if (j < n) {
      const int64_t r = n - j;
      Tail<T, N> tp, tg, tm, tv, tx;
      alignas(64) uint8_t tk[N] = {};
      if constexpr (MK != kNoMask) tail_mask<MK>(tk, mask_from<MK>(mask, j), r);
      T* pp = tp.load(p + j, r, true);
      const T* gg = tg.load(gr + j, r, false);
      T* mm = tm.load(m + j, r, true);
      T* vv = tv.load(v + j, r, true);
      T* xx = AMSGRAD ? tx.load(vmax + j, r, true) : nullptr;
      body(pp, gg, mm, vv, xx, tk, c);
      tp.store(), tm.store(), tv.store();
      if constexpr (AMSGRAD) tx.store();
    }
  }
};

template <class K, class... A>
void run_simd(A... a) {
  K::run(a...);
}
