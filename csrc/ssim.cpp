// Native CPU SSIM: scikit-image-compatible windowed SSIM for batches of pairs (2D and 3D) and for
// whole SSIM matrices with per-image moment reuse.
//
// Uniform windows (the default convention) in ssim_pairs run on a running-sum ("box") kernel instead: fp64
// column and row (and, in 3D, plane) running sums over segment-interleaved rows, O(1) work per pixel; see
// box2d_rows_t / box3d_planes_t below; 2D uniform ssim_matrix reuses per-image moments on the same layout
// (box_image_2d / box_cross_2d). The separable kernel described next serves Gaussian windows, 3D
// ssim_matrix, and DEEPSSIM_FAST_SSIM_BOX=0.
//
// Algorithm (per pair): each image is shifted by its minimum (the background level of MRI; z-scored for
// the deepssim preset) into a float32 buffer, then the window is applied separably as "valid" filtering:
//   2D: a vertical pass forms, for every column of one output row, the window's mean, variance and
//       covariance of the K input rows below it; a horizontal pass combines K such columns and evaluates
//       the SSIM formula at once; the row's sum is accumulated in fp64. Nothing image-sized is kept.
//   3D: a z-pass forms the five statistics of one output plane, then the same 2D passes run on them.
// fp32 exactness: a plain E[x^2] - E[x]^2 in fp32 drifts ~1e-5 from scikit-image on MRI (flat regions far
// from the centring value). Every pass here centres each lane on the value at the window's middle tap and
// combines partial statistics by the law of total variance (var = mean of variances + variance of means),
// so all squared quantities are local differences: flat regions give exact zeros, and results stay within
// ~3e-7 of scikit-image's float64 on real MRI (2D/3D, uniform/Gaussian, the deepssim preset).
//
// The hot loops run on 8-float vectors (GCC vector extensions) inside always-inline templates that are
// instantiated twice, plainly (portable baseline: pairs of SSE registers) and inside functions marked
// DSF_TARGET_AVX2 (ymm, FMA contraction allowed there only); dsf::active_simd() picks one at run time.
//
// Conventions (see deepssim_fast/_ssim_common.py): range_mode 0 = a fixed data range `range_value`;
// 1 = per pair max - min over both images; 2 = the deepssim preset (each image z-scored, population
// std, data range = max - min of the FIRST z-scored image, or the pair's range if that is 0). A pair
// whose resolved range is 0 is two equal constant images and scores 1.
#include "common.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// Let the AVX2 instantiation fuse multiply-adds (the baseline has no FMA instruction, so it is unchanged);
// vector-extension types in the baseline functions trigger ABI notes that do not apply (all inlined).
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dsf {
namespace ssim_native {

#define DSF_INLINE inline __attribute__((always_inline))

struct Window {
  int K = 7;                  // taps
  std::vector<float> w;       // K weights summing to 1
  bool uniform = true;        // all weights equal: kernels sum and scale once
  float cov_norm = 1.0f;      // N / (N - 1) or 1
  double cov_norm_d = 1.0;    // the same in fp64
  double k1 = 0.01, k2 = 0.03;
  int range_mode = 1;
  double range_value = 0.0;
};

// Shape of one image: D = 1 for 2D.
struct Geom {
  int64_t D = 1, H = 0, W = 0;
  int64_t n() const { return D * H * W; }
};

struct ImgStats {
  double mean = 0, std = 0, mn = 0, mx = 0;
};

// How one image is prepared: a = (x - centre) * scale (float), luminance offset added back to means.
struct Prep {
  double centre = 0, scale = 1;
  float lum_offset = 0;
  double lum = 0;   // lum_offset in fp64 (box kernels)
  double span = 0;  // largest prepared value, (max - centre) * scale (see pair_const)
};

// Resolve centring of both images and the pair's data range. Returns the range (0 => score 1).
double resolve_pair(const ImgStats& sx, const ImgStats& sy, const Window& win, Prep& px, Prep& py) {
  if (win.range_mode == 2) {
    px.centre = sx.mn;
    px.scale = sx.std > 0 ? 1.0 / sx.std : 0.0;
    py.centre = sy.mn;
    py.scale = sy.std > 0 ? 1.0 / sy.std : 0.0;
    px.lum = (sx.mn - sx.mean) * px.scale;
    py.lum = (sy.mn - sy.mean) * py.scale;
    px.lum_offset = static_cast<float>(px.lum);
    py.lum_offset = static_cast<float>(py.lum);
    const double zx_hi = (sx.mx - sx.mean) * px.scale, zx_lo = (sx.mn - sx.mean) * px.scale;
    const double zy_hi = (sy.mx - sy.mean) * py.scale, zy_lo = (sy.mn - sy.mean) * py.scale;
    px.span = zx_hi - zx_lo;
    py.span = zy_hi - zy_lo;
    const double first = zx_hi - zx_lo;
    if (first > 0) return first;
    return std::max(zx_hi, zy_hi) - std::min(zx_lo, zy_lo);
  }
  px.centre = sx.mn;
  py.centre = sy.mn;
  px.scale = py.scale = 1.0;
  px.lum = sx.mn;
  py.lum = sy.mn;
  px.lum_offset = static_cast<float>(sx.mn);
  py.lum_offset = static_cast<float>(sy.mn);
  px.span = sx.mx - sx.mn;
  py.span = sy.mx - sy.mn;
  if (win.range_mode == 0) return win.range_value;
  return std::max(sx.mx, sy.mx) - std::min(sx.mn, sy.mn);
}


// Constants of one pair for the separable kernels' formula. s: the power of two nearest 1 / range^2 by which
// both factors of the formula's numerator and denominator are multiplied (see pair_const), or NaN for a range
// too small for fp32 statistics (the pair then scores NaN and the caller recomputes it in float64).
struct PairConst {
  float c1, c2, cov_norm, ox, oy, s;
};

// ---------------------------------------------------------------------------------------------------
// Register-blocked kernels on 8-float vectors (GCC vector extensions: ymm registers inside the AVX2
// instantiation, pairs of xmm registers in the baseline one). Rows are processed in blocks of 8 columns;
// loads may run up to 7 floats past the end of a row, so every buffer read here has >= 16 floats of
// zeroed padding at its end, and lanes past the valid width are masked out of the sums.

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

DSF_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DSF_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
DSF_INLINE v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

constexpr int64_t kPad = 16;
inline int64_t padded(int64_t n) { return (n + kPad + 15) & ~int64_t(15); }

DSF_INLINE void prepare(const float* __restrict src, float* __restrict dst, int64_t n, const Prep& p) {
  const float c = static_cast<float>(p.centre);
  const float s = static_cast<float>(p.scale);
  if (p.scale == 1.0) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] - c;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = (src[i] - c) * s;
  }
}

DSF_INLINE double hsum8(v8f v) {
  double t = 0;
  for (int l = 0; l < 8; ++l) t += v[l];
  return t;
}

// Mean, population std (only when need_std), min and max of n floats; fp32 lanes per block, fp64 across.
DSF_INLINE ImgStats image_stats_t(const float* __restrict p, int64_t n, bool need_std) {
  ImgStats st;
  const int64_t n8 = n & ~int64_t(7);
  v8f lo = splat8(std::numeric_limits<float>::infinity()), hi = -lo;
  double sum = 0;
  for (int64_t b = 0; b < n8; b += 1024) {
    const int64_t e = std::min(n8, b + 1024);
    v8f acc = splat8(0);
    for (int64_t i = b; i < e; i += 8) {
      const v8f x = load8(p + i);
      acc += x;
      lo = x < lo ? x : lo;
      hi = x > hi ? x : hi;
    }
    sum += hsum8(acc);
  }
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
  for (int l = 0; l < 8; ++l) {
    mn = std::min(mn, lo[l]);
    mx = std::max(mx, hi[l]);
  }
  for (int64_t i = n8; i < n; ++i) {
    sum += p[i];
    mn = std::min(mn, p[i]);
    mx = std::max(mx, p[i]);
  }
  st.mean = sum / static_cast<double>(n);
  st.mn = mn;
  st.mx = mx;
  if (need_std && std::isfinite(st.mean)) {
    // The values are first multiplied by a power of two s that brings the largest |x| to [1, 2). That is
    // exact (it only moves exponents, so every rounding below is the one unscaled values would get) and
    // keeps the squares inside float32's range, which plain squares leave from |x| ~ 1e19 up (the lane
    // sums overflow: std = inf) and from ~1e-23 down (d * d underflows: std = 0); either made the
    // z-scores all zeros and unrelated images score 1. s stays within 2^[-126, 126] (a normal float32;
    // images of subnormals then scale to >= 2^-23, whose squares are still normal). A non-finite mean
    // (NaN/Inf, or a sum that overflowed) needs no std: the caller reports it.
    const double big = std::max(std::fabs(st.mn), std::fabs(st.mx));
    const int ex = big > 0 ? std::clamp(-std::ilogb(big), -126, 126) : 0;
    const float s = std::ldexp(1.0f, ex);
    const float m = static_cast<float>(st.mean * s);
    double ss = 0, s1 = 0;
    for (int64_t b = 0; b < n8; b += 1024) {
      const int64_t e = std::min(n8, b + 1024);
      v8f acc = splat8(0), acc1 = splat8(0);
      const v8f vm = splat8(m), vs = splat8(s);
      for (int64_t i = b; i < e; i += 8) {
        const v8f d = load8(p + i) * vs - vm;
        acc += d * d;
        acc1 += d;
      }
      ss += hsum8(acc);
      s1 += hsum8(acc1);
    }
    for (int64_t i = n8; i < n; ++i) {
      const double d = static_cast<double>(p[i] * s - m);
      ss += d * d;
      s1 += d;
    }
    // The first pass's fp32 lane sums leave the mean off by ~1e-7 of its magnitude (large for an offset
    // image with a small spread); the sum of the small differences x - m refines it: mean = m + s1 / n,
    // and var = sum (x - m)^2 / n - (s1 / n)^2, all of the scaled values (divided by s again in fp64).
    const double nn = static_cast<double>(n), r = s1 / nn;
    st.mean = (static_cast<double>(m) + r) / s;
    const double var = ss / nn - r * r;
    st.std = std::sqrt(std::max(0.0, var)) / s;
  }
  return st;
}

// Window accumulation with per-lane local centring (law of total variance). This is what keeps fp32
// exact to ~1e-7 on MRI: every value entering a square is a difference from the value at the window's
// middle tap, so flat regions (background or tissue) produce small numbers and E[x^2] - E[x]^2 never
// cancels large terms.
//   FROM_RAW: channels c[0] = a, c[1] = b are prepared image values (within-window variance 0 per tap).
//   else:     c = (mean_a, mean_b, var_a, var_b, cov_ab) of the previous (orthogonal) pass.
//   CROSS:    only means and the covariance are formed (ssim_matrix has the variances per image).
// Result (per lane): out = (mean_a, mean_b, var_a, var_b, cov_ab) over the combined window.
template <bool UNI, bool FROM_RAW, bool CROSS>
DSF_INLINE void ltv_accumulate(const float* const* c, int64_t off, int64_t step, const Window& win, v8f out[5]) {
  const int K = win.K, h = (K - 1) / 2;
  const float* w = win.w.data();
  const v8f ca = load8(c[0] + off + h * step), cb = load8(c[1] + off + h * step);
  const v8f z = splat8(0);
  v8f ea = z, eb = z, eaa = z, ebb = z, eab = z, sva = z, svb = z, sc = z;
  for (int k = 0; k < K; ++k) {
    const int64_t o = off + k * step;
    const v8f da = load8(c[0] + o) - ca, db = load8(c[1] + o) - cb;
    if (UNI) {
      ea += da;
      eb += db;
      if (!CROSS) {
        eaa += da * da;
        ebb += db * db;
      }
      eab += da * db;
      if (!FROM_RAW) {
        if (!CROSS) {
          sva += load8(c[2] + o);
          svb += load8(c[3] + o);
        }
        sc += load8(c[4] + o);
      }
    } else {
      const v8f wk = splat8(w[k]);
      const v8f ta = wk * da, tb = wk * db;
      ea += ta;
      eb += tb;
      if (!CROSS) {
        eaa += ta * da;
        ebb += tb * db;
      }
      eab += ta * db;
      if (!FROM_RAW) {
        if (!CROSS) {
          sva += wk * load8(c[2] + o);
          svb += wk * load8(c[3] + o);
        }
        sc += wk * load8(c[4] + o);
      }
    }
  }
  if (UNI) {
    const v8f s = splat8(1.0f / static_cast<float>(K));
    ea *= s;
    eb *= s;
    eaa *= s;
    ebb *= s;
    eab *= s;
    sva *= s;
    svb *= s;
    sc *= s;
  }
  out[0] = ca + ea;
  out[1] = cb + eb;
  out[2] = sva + eaa - ea * ea;
  out[3] = svb + ebb - eb * eb;
  out[4] = sc + eab - ea * eb;
}

// One separable pass over columns [0, n) (blocks of 8; stores may run 7 floats past n into padding).
template <bool UNI, bool FROM_RAW, bool CROSS>
DSF_INLINE void ltv_pass(const float* const* c, int64_t step, int64_t n, const Window& win, float* const* out) {
  for (int64_t j = 0; j < n; j += 8) {
    v8f r[5];
    ltv_accumulate<UNI, FROM_RAW, CROSS>(c, j, step, win, r);
    for (int q = 0; q < 5; ++q) {
      if (CROSS && (q == 2 || q == 3)) continue;
      store8(out[q] + j, r[q]);
    }
  }
}

DSF_INLINE v8f mask_tail(v8f r, int64_t remaining) {
  const v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  const int m = static_cast<int>(remaining);
  const v8i lim = {m, m, m, m, m, m, m, m};
  return lanes < lim ? r : splat8(0.0f);
}

DSF_INLINE v8f ssim_formula(v8f ma, v8f mb, v8f vx, v8f vy, v8f vxy, const PairConst& pc) {
  const v8f c1 = splat8(pc.c1), c2 = splat8(pc.c2), cn = splat8(pc.cov_norm), two = splat8(2.0f);
  const v8f ux = ma + splat8(pc.ox), uy = mb + splat8(pc.oy), s = splat8(pc.s);
  // each factor is of order range^2: times s ~ 1 / range^2 (exact) their products stay normal numbers
  const v8f num = ((two * ux * uy + c1) * s) * ((two * cn * vxy + c2) * s);
  const v8f den = ((ux * ux + uy * uy + c1) * s) * ((cn * (vx + vy) + c2) * s);
  // a statistic past the fp32 range (inf) makes den inf or NaN: NaN, which the caller recomputes in float64
  // (not num / inf = 0, a silent score)
  const v8f inf = splat8(std::numeric_limits<float>::infinity());
  return den < inf ? num / den : splat8(std::numeric_limits<float>::quiet_NaN());
}

// Last pass (along rows) fused with the SSIM formula; returns the sum over output columns [0, n).
template <bool UNI>
DSF_INLINE double ltv_ssim(const float* const* c, int64_t n, const Window& win, const PairConst& pc) {
  v8f acc = splat8(0);
  for (int64_t j = 0; j < n; j += 8) {
    v8f r[5];
    ltv_accumulate<UNI, false, false>(c, j, 1, win, r);
    v8f s = ssim_formula(r[0], r[1], r[2], r[3], r[4], pc);
    if (j + 8 > n) s = mask_tail(s, n - j);
    acc += s;
  }
  return hsum8(acc);
}

// 2D: sum of the SSIM map over output rows [r0, r1) of prepared images a, b (H x W, padded).
template <bool UNI>
DSF_INLINE double ssim2d_rows_t(const float* a, const float* b, const Geom& g, const Window& win,
                                const PairConst& pc, int64_t r0, int64_t r1, float* scratch) {
  const int64_t W = g.W, Wo = g.W - win.K + 1;
  const int64_t rs = padded(W);
  float* v[5];
  for (int q = 0; q < 5; ++q) {
    v[q] = scratch + q * rs;
    for (int64_t j = W; j < rs; ++j) v[q][j] = 0.0f;
  }
  double total = 0;
  for (int64_t oy = r0; oy < r1; ++oy) {
    const float* src[2] = {a + oy * W, b + oy * W};
    ltv_pass<UNI, true, false>(src, W, W, win, v);
    total += ltv_ssim<UNI>(v, Wo, win, pc);
  }
  return total;
}

// 3D: sum of the SSIM map over output plane oz of prepared volumes a, b (D x H x W, padded).
template <bool UNI>
DSF_INLINE double ssim3d_plane_t(const float* a, const float* b, const Geom& g, const Window& win,
                                 const PairConst& pc, int64_t oz, float* scratch) {
  const int64_t HW = g.H * g.W, W = g.W, Ho = g.H - win.K + 1, Wo = g.W - win.K + 1;
  const int64_t ps = padded(HW), rs = padded(W);
  float* p[5];
  float* v[5];
  for (int q = 0; q < 5; ++q) {
    p[q] = scratch + q * ps;
    for (int64_t j = HW; j < ps; ++j) p[q][j] = 0.0f;
  }
  float* rows = scratch + 5 * ps;
  for (int q = 0; q < 5; ++q) {
    v[q] = rows + q * rs;
    for (int64_t j = W; j < rs; ++j) v[q][j] = 0.0f;
  }
  const float* src[2] = {a + oz * HW, b + oz * HW};
  ltv_pass<UNI, true, false>(src, HW, HW, win, p);
  double total = 0;
  for (int64_t oy = 0; oy < Ho; ++oy) {
    const float* ps5[5] = {p[0] + oy * W, p[1] + oy * W, p[2] + oy * W, p[3] + oy * W, p[4] + oy * W};
    ltv_pass<UNI, false, false>(ps5, W, W, win, v);
    total += ltv_ssim<UNI>(v, Wo, win, pc);
  }
  return total;
}

DSF_INLINE double ssim2d_rows(const float* a, const float* b, const Geom& g, const Window& win,
                              const PairConst& pc, int64_t r0, int64_t r1, float* s, bool uni) {
  return uni ? ssim2d_rows_t<true>(a, b, g, win, pc, r0, r1, s) : ssim2d_rows_t<false>(a, b, g, win, pc, r0, r1, s);
}
DSF_INLINE double ssim3d_plane(const float* a, const float* b, const Geom& g, const Window& win,
                               const PairConst& pc, int64_t oz, float* s, bool uni) {
  return uni ? ssim3d_plane_t<true>(a, b, g, win, pc, oz, s) : ssim3d_plane_t<false>(a, b, g, win, pc, oz, s);
}

// ---------------------------------------------------------------------------------------------------
// Uniform window, 2D: O(1) running (box) sums in fp64. Each row is split into 4 segments of S output
// columns; the prepared input row is stored "segment-interleaved" (float t*4 + l = column l*S + t,
// T = S + K - 1 columns per segment), so that lane l of a 4-double vector walks segment l. Then both
// running sums are lane-parallel: a vertical one (4 column sums, updated by the row entering minus the
// row leaving the window; the K + 1 most recent interleaved rows are kept in a ring) and a horizontal one
// along t (kept in registers). Values are prepared fp32 numbers (x - min) * scale; their products are exact
// in fp64 and the running sums of them do not drift measurably, so the cancelling differences
// N sum(x^2) - (sum x)^2 in fp64 match scikit-image's float64 ones; measured on MRI: ~3e-8 from
// scikit-image (the fp32 formula tail dominates).

typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

struct PairConstD {
  double c1, c2, cov_norm, ox, oy, range;
};

DSF_INLINE v4d splat4(double x) { return v4d{x, x, x, x}; }
DSF_INLINE v4d load4d(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DSF_INLINE void store4d(double* p, v4d v) { std::memcpy(p, &v, sizeof(v)); }
DSF_INLINE v4f load4f(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DSF_INLINE void store4f(float* p, v4f v) { std::memcpy(p, &v, sizeof(v)); }

// Channels of the column sums, per step t (4 lanes each): A = sum a, B = sum b, Q = sum (a^2 + b^2),
// P = sum a b. Only var_x + var_y enters SSIM, so the two squares share one channel.
constexpr int kCh = 4;

// float -> double, 4 lanes (written element-wise: GCC then emits one vcvtps2pd ymm in the AVX2 build,
// where __builtin_convertvector is split into halves).
DSF_INLINE v4d widen(v4f f) {
  return v4d{static_cast<double>(f[0]), static_cast<double>(f[1]), static_cast<double>(f[2]),
             static_cast<double>(f[3])};
}

// Unaligned load / store of any vector type from / to its element type.
template <class V, class T>
DSF_INLINE V loadv(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V, class T>
DSF_INLINE void storev(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// 4 steps t .. t + 3 of one row, prepared ((x - c) * s; SCALE = false when s is 1) and segment-interleaved
// by a 4 x 4 register transpose: x[q] = the 4 segments' values at step t + q (segment l starts at column l S).
template <bool SCALE>
DSF_INLINE void interleave4(const float* p, int64_t S, int64_t t, v4f c, v4f s, v4f x[4]) {
  v4f r0 = load4f(p + t) - c, r1 = load4f(p + S + t) - c, r2 = load4f(p + 2 * S + t) - c, r3 = load4f(p + 3 * S + t) - c;
  if (SCALE) {
    r0 *= s;
    r1 *= s;
    r2 *= s;
    r3 *= s;
  }
  const v4f t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5), t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
  const v4f t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5), t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
  x[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  x[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  x[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  x[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

// Where the interleave of the row starting at src reads from (it reads 4 S + T4 floats): in place when that
// much of the image follows (what lies past the row only reaches masked outputs), else a copy of the row
// in the zero-padded buffer pad.
DSF_INLINE const float* row_source(const float* src, const float* end, int64_t W, int64_t S, int64_t T4,
                                   float* pad) {
  if (src + 4 * S + T4 <= end) return src;
  std::memcpy(pad, src, W * sizeof(float));
  return pad;
}

// The kCh channels' column sums of one step at c (lanes contiguous per channel: A, B, Q, P; L lanes of VD)
// after the values va, vb enter and, if LEAVE, wa, wb leave.
template <bool LEAVE, class VD>
DSF_INLINE void update_columns(double* __restrict c, VD va, VD vb, VD wa, VD wb) {
  constexpr int L = sizeof(VD) / sizeof(double);
  if (LEAVE) {
    storev(c, loadv<VD>(c) + (va - wa));
    storev(c + L, loadv<VD>(c + L) + (vb - wb));
    storev(c + 2 * L, loadv<VD>(c + 2 * L) + ((va * va + vb * vb) - (wa * wa + wb * wb)));
    storev(c + 3 * L, loadv<VD>(c + 3 * L) + (va * vb - wa * wb));
  } else {
    storev(c, loadv<VD>(c) + va);
    storev(c + L, loadv<VD>(c + L) + vb);
    storev(c + 2 * L, loadv<VD>(c + 2 * L) + (va * va + vb * vb));
    storev(c + 3 * L, loadv<VD>(c + 3 * L) + va * vb);
  }
}

// One new row enters the window (and, if LEAVE, row `old` leaves it): the raw rows are copied into
// zero-padded buffers, prepared ((x - centre) * scale; SCALE = false when scale is 1), segment-interleaved
// 4 x 4 by register transposes, widened to fp64, stored into the ring (they leave the window K rows later)
// and added to the column sums.
template <bool LEAVE, bool SCALE>
DSF_INLINE void box_ingest_row(const float* src_a, const float* src_b, const float* const end[2], int64_t W,
                               float* pad_a, float* pad_b, float* __restrict na, float* __restrict nb,
                               const float* oa, const float* ob, double* __restrict c0, int64_t S, int64_t T4,
                               float ca, float sa, float cb, float sb) {
  const float* pa = row_source(src_a, end[0], W, S, T4, pad_a);
  const float* pb = row_source(src_b, end[1], W, S, T4, pad_b);
  const v4f vca = {ca, ca, ca, ca}, vsa = {sa, sa, sa, sa}, vcb = {cb, cb, cb, cb}, vsb = {sb, sb, sb, sb};
  for (int64_t t = 0; t < T4; t += 4) {
    v4f xa[4], xb[4];
    interleave4<SCALE>(pa, S, t, vca, vsa, xa);
    interleave4<SCALE>(pb, S, t, vcb, vsb, xb);
    for (int q = 0; q < 4; ++q) {
      const int64_t i = 4 * (t + q);
      store4f(na + i, xa[q]);
      store4f(nb + i, xb[q]);
      const v4d va = widen(xa[q]), vb = widen(xb[q]);
      if (LEAVE)
        update_columns<true>(c0 + kCh * i, va, vb, widen(load4f(oa + i)), widen(load4f(ob + i)));
      else
        update_columns<false>(c0 + kCh * i, va, vb, va, vb);
    }
  }
}

// Horizontal running sums along t (lanes = segments) of the column sums, fused with the SSIM formula.
// With window sums A, B, Q, P over N taps, N^2 (var_x + var_y) = N Q - A^2 - B^2 and N^2 cov = N P - A B;
// the contrast-structure term (2 cov + c2) / (var_x + var_y + c2) is the same ratio of these scaled by
// N^2 / cov_norm, so only the two cancelling differences are formed in fp64; the rest of the formula runs
// on 8 fp32 lanes (two steps of t at once), where nothing cancels and fp32 keeps ~1e-7 relative.
// (one 8-lane conversion: converting the halves and concatenating made GCC add a register move per half)
typedef double v8d __attribute__((vector_size(64)));
DSF_INLINE v8f cat8(v4d lo, v4d hi) {
  return __builtin_convertvector(__builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7), v8f);
}

// Outputs per lane (segment) of a row of Wo outputs cut into 4 segments of S; lanes 4-7 repeat 0-3 (two
// steps of t share a v8f).
DSF_INLINE v8i lane_limits(int64_t Wo, int64_t S) {
  int l4[4];
  for (int l = 0; l < 4; ++l) l4[l] = static_cast<int>(std::clamp(Wo - l * S, int64_t(0), S));
  return v8i{l4[0], l4[1], l4[2], l4[3], l4[0], l4[1], l4[2], l4[3]};
}

// The SSIM formula on any number of fp32 lanes, with the scaled constants c1, c2 (see BoxFormula).
template <class VF>
DSF_INLINE VF box_ssim(VF ux, VF uy, VF vsum, VF vxy, VF c1, VF c2) {
  const VF num = (2.0f * (ux * uy) + c1) * (2.0f * vxy + c2);
  const VF den = (ux * ux + uy * uy + c1) * (vsum + c2);
  return num / den;
}

// Constants of the running-sum formula. Luminance on U = mean_x / range = (A + N ox) / (N range), V likewise;
// the variance terms divided by (N range)^2: both ratios are invariant to these scales, and every fp32 value
// stays O(1) (no overflow).
struct BoxFormula {
  v4d vn, vsu, vsv, nox, noy;
  v8f c1, c2;
  BoxFormula(double n_taps, const PairConstD& pc) {
    const double su = 1.0 / (n_taps * pc.range);
    vn = splat4(n_taps);
    vsu = splat4(su);
    vsv = splat4(su * su);
    nox = splat4(n_taps * pc.ox * su);
    noy = splat4(n_taps * pc.oy * su);
    c1 = splat8(static_cast<float>(pc.c1 / (pc.range * pc.range)));
    c2 = splat8(static_cast<float>(pc.c2 / (pc.range * pc.range) / pc.cov_norm));
  }
  // SSIM of 8 outputs from U, V, the scaled variance sum and the scaled covariance; masked lanes give 0.
  DSF_INLINE v8f ssim(v8f ux, v8f uy, v8f vsum, v8f vxy, v8i keep) const {
    return keep ? box_ssim(ux, uy, vsum, vxy, c1, c2) : splat8(0.0f);
  }
};

// Two steps of L fp64 lanes as one 2L-lane fp32 vector; the lanes' limits and first output steps likewise.
DSF_INLINE v8f cat2(v4d lo, v4d hi) { return cat8(lo, hi); }
DSF_INLINE void lanes2(v8i lim, v8i& lim2, v8i& ov) {
  lim2 = lim;
  ov = v8i{0, 0, 0, 0, 1, 1, 1, 1};
}

// The same for 8 lanes (the AVX-512 two-band kernel below).
typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

DSF_INLINE v8d widen8(v8f f) { return __builtin_convertvector(f, v8d); }
DSF_INLINE v16f cat2(v8d lo, v8d hi) {
  const v8f a = __builtin_convertvector(lo, v8f), b = __builtin_convertvector(hi, v8f);
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
// lanes 0-7: step t (band 1 segments 0-3, band 2 segments 0-3), lanes 8-15: step t + 1
DSF_INLINE void lanes2(v8i lim, v16i& lim2, v16i& ov) {
  lim2 = v16i{lim[0], lim[1], lim[2], lim[3], lim[0], lim[1], lim[2], lim[3],
              lim[0], lim[1], lim[2], lim[3], lim[0], lim[1], lim[2], lim[3]};
  ov = v16i{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
}

// The row pass: horizontal running sums of the column sums c0 (4 channels x L lanes per step) and the
// formula; returns the 2L per-lane sums of the row's SSIM map (lanes [0, L) step t, [L, 2L) step t + 1).
// Instantiated on 4 lanes (4 segments) and, on AVX-512, on 8 (two bands of 4 segments).
template <class VD, class VF, class VI>
DSF_INLINE VF box_row_acc(const double* __restrict c0, int K, int64_t T, const BoxFormula& f, v8i lim) {
  constexpr int L = sizeof(VD) / sizeof(double);
  const VD vn = VD{} + f.vn[0], vsu = VD{} + f.vsu[0], vsv = VD{} + f.vsv[0];
  const VD nox = VD{} + f.nox[0], noy = VD{} + f.noy[0];
  const VF c1 = VF{} + f.c1[0], c2 = VF{} + f.c2[0];
  VI lim2, ov;  // ov: output step of each lane
  lanes2(lim, lim2, ov);
  VD h0 = VD{}, h1 = h0, h2 = h0, h3 = h0;
  VF acc = VF{};
  for (int64_t t = 0; t < K - 1; ++t) {
    const double* c = c0 + 4 * L * t;
    h0 += loadv<VD>(c);
    h1 += loadv<VD>(c + L);
    h2 += loadv<VD>(c + 2 * L);
    h3 += loadv<VD>(c + 3 * L);
  }
  // Steps past T read zero column sums (the buffer has spare steps) and are masked out.
  for (int64_t t = K - 1; t < T; t += 2) {
    VD m[2][4];
    for (int u = 0; u < 2; ++u) {
      const double* c = c0 + 4 * L * (t + u);
      h0 += loadv<VD>(c);
      h1 += loadv<VD>(c + L);
      h2 += loadv<VD>(c + 2 * L);
      h3 += loadv<VD>(c + 3 * L);
      m[u][0] = h0 * vsu + nox;
      m[u][1] = h1 * vsu + noy;
      m[u][2] = (vn * h2 - (h0 * h0 + h1 * h1)) * vsv;
      m[u][3] = (vn * h3 - h0 * h1) * vsv;
      const double* d = c0 + 4 * L * (t + u - K + 1);
      h0 -= loadv<VD>(d);
      h1 -= loadv<VD>(d + L);
      h2 -= loadv<VD>(d + 2 * L);
      h3 -= loadv<VD>(d + 3 * L);
    }
    const VF ux = cat2(m[0][0], m[1][0]), uy = cat2(m[0][1], m[1][1]);
    const VF vsum = cat2(m[0][2], m[1][2]), vxy = cat2(m[0][3], m[1][3]);
    acc += ov < lim2 ? box_ssim(ux, uy, vsum, vxy, c1, c2) : VF{};
    ov += 2;
  }
  return acc;
}

DSF_INLINE double box_row_ssim(const double* __restrict c0, int K, int64_t T, double n_taps, const PairConstD& pc,
                               v8i lim) {
  return hsum8(box_row_acc<v4d, v8f, v8i>(c0, K, T, BoxFormula(n_taps, pc), lim));
}

// Geometry and buffers of a 2D running-sum pass on L lanes (L / 4 bands of 4 segments): a ring of the
// R = K + 1 most recent interleaved rows per image, the column sums (4 channels x L lanes per step, with
// spare zero steps), and one zero-padded copy of the raw row per image and band.
struct BoxRowBuffers {
  int64_t L, S, T, T4, R, padn;
  std::vector<float> ring, pad;
  std::vector<double> cs;
  BoxRowBuffers(int K, int64_t W, int lanes) : L(lanes) {
    const int64_t Wo = W - K + 1;
    S = (Wo + 3) / 4;
    T = S + K - 1;
    T4 = (T + 3) & ~int64_t(3);
    R = K + 1;
    padn = 4 * S + T4 + 16;  // >= W, and past every read of the interleave
    ring.assign(2 * R * T4 * L, 0.0f);
    pad.assign(L / 2 * padn, 0.0f);
    cs.assign(4 * L * (T4 + 4), 0.0);
  }
  float* slot(int img, int64_t y) { return ring.data() + (img * R + y % R) * T4 * L; }
  float* pad_row(int i) { return pad.data() + i * padn; }
};

// Sum of the SSIM map over output rows [r0, r1) of the raw images a, b (H x W), uniform window.
template <bool SCALE>
DSF_INLINE double box2d_rows_t(const float* a, const float* b, const Geom& g, const Window& win, const Prep& px,
                               const Prep& py, const PairConstD& pc, int64_t r0, int64_t r1) {
  const int K = win.K;
  const int64_t W = g.W;
  BoxRowBuffers bu(K, W, 4);
  const int64_t S = bu.S, T = bu.T, T4 = bu.T4;
  double* c0 = bu.cs.data();
  const float ca = static_cast<float>(px.centre), sa = static_cast<float>(px.scale);
  const float cb = static_cast<float>(py.centre), sb = static_cast<float>(py.scale);
  const double n_taps = static_cast<double>(K) * K;
  const v8i lim = lane_limits(W - K + 1, S);
  const float* const end[2] = {a + g.H * W, b + g.H * W};
  // Column sums of the first output row's window: rows r0 .. r0 + K - 1.
  for (int64_t y = r0; y < r0 + K; ++y)
    box_ingest_row<false, SCALE>(a + y * W, b + y * W, end, W, bu.pad_row(0), bu.pad_row(1), bu.slot(0, y),
                                 bu.slot(1, y), nullptr, nullptr, c0, S, T4, ca, sa, cb, sb);
  double total = box_row_ssim(c0, K, T, n_taps, pc, lim);
  for (int64_t oy = r0 + 1; oy < r1; ++oy) {
    // Row oy + K - 1 enters the window, row oy - 1 leaves it.
    const int64_t y = oy + K - 1;
    box_ingest_row<true, SCALE>(a + y * W, b + y * W, end, W, bu.pad_row(0), bu.pad_row(1), bu.slot(0, y),
                                bu.slot(1, y), bu.slot(0, oy - 1), bu.slot(1, oy - 1), c0, S, T4, ca, sa, cb, sb);
    total += box_row_ssim(c0, K, T, n_taps, pc, lim);
  }
  return total;
}

// 3D, uniform window: a third running sum along z. zs holds, for every row y of the plane and step t, the
// 4 channels summed over the K planes of the current output plane's window. One sweep over the rows per
// output plane adds the row of the plane entering and subtracts that of the plane leaving (both
// re-interleaved from the raw volumes), and right behind it runs the y running sum over zs (rows y and
// y - K, still in cache) and the row pass with the formula, with N = K^3 taps.
template <bool SCALE>
DSF_INLINE void box_interleave_row(const float* src, const float* end, int64_t W, float* pad,
                                   float* __restrict dst, int64_t S, int64_t T4, float c, float s) {
  const float* p = row_source(src, end, W, S, T4, pad);
  const v4f vc = {c, c, c, c}, vs = {s, s, s, s};
  for (int64_t t = 0; t < T4; t += 4) {
    v4f x[4];
    interleave4<SCALE>(p, S, t, vc, vs, x);
    for (int q = 0; q < 4; ++q) store4f(dst + 4 * (t + q), x[q]);
  }
}

// Sum of the SSIM map over output planes [z0, z1) of the raw volumes a, b (D x H x W), uniform window.
template <bool SCALE>
DSF_INLINE double box3d_planes_t(const float* a, const float* b, const Geom& g, const Window& win, const Prep& px,
                                 const Prep& py, const PairConstD& pc, int64_t z0, int64_t z1) {
  const int K = win.K;
  const int64_t H = g.H, W = g.W, HW = g.H * g.W, Wo = W - K + 1;
  const int64_t S = (Wo + 3) / 4, T = S + K - 1, T4 = (T + 3) & ~int64_t(3);
  const float* const a_end = a + g.D * HW;
  const float* const b_end = b + g.D * HW;
  const int64_t row = kCh * 4 * T4;  // doubles per row of column sums
  std::vector<double> zs(H * row, 0.0), cs(row + kCh * 16, 0.0);
  std::vector<float> tmp(4 * 4 * T4);
  const int64_t padn = 4 * S + T4 + 16;
  std::vector<float> pad(padn, 0.0f);
  float* na = tmp.data();
  float* nb = na + 4 * T4;
  float* oa = nb + 4 * T4;
  float* ob = oa + 4 * T4;
  const float ca = static_cast<float>(px.centre), sa = static_cast<float>(px.scale);
  const float cb = static_cast<float>(py.centre), sb = static_cast<float>(py.scale);
  const double n_taps = static_cast<double>(K) * K * K;
  const v8i lim = lane_limits(Wo, S);
  double* c0 = cs.data();
  const int64_t nc = kCh * 4 * T;  // doubles of a row that carry data
  double total = 0;
  for (int64_t oz = z0; oz < z1; ++oz) {
    const bool first = oz == z0;
    for (int64_t y = 0; y < H; ++y) {
      double* zr = zs.data() + y * row;
      // z running sum of row y: planes z0 .. z0 + K - 1 for the first output plane, then one in, one out.
      for (int64_t z = first ? z0 : oz + K - 1; z < oz + K; ++z) {
        box_interleave_row<SCALE>(a + z * HW + y * W, a_end, W, pad.data(), na, S, T4, ca, sa);
        box_interleave_row<SCALE>(b + z * HW + y * W, b_end, W, pad.data(), nb, S, T4, cb, sb);
        if (!first) {
          box_interleave_row<SCALE>(a + (oz - 1) * HW + y * W, a_end, W, pad.data(), oa, S, T4, ca, sa);
          box_interleave_row<SCALE>(b + (oz - 1) * HW + y * W, b_end, W, pad.data(), ob, S, T4, cb, sb);
        }
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = 4 * t;
          const v4d va = widen(load4f(na + i)), vb = widen(load4f(nb + i));
          if (!first)
            update_columns<true>(zr + kCh * i, va, vb, widen(load4f(oa + i)), widen(load4f(ob + i)));
          else
            update_columns<false>(zr + kCh * i, va, vb, va, vb);
        }
      }
      // y running sum over rows of zs, then the row pass for output row y - K + 1.
      if (y < K - 1) continue;
      if (y == K - 1) {
        for (int64_t i = 0; i < nc; ++i) c0[i] = 0.0;
        for (int64_t yy = 0; yy < K; ++yy) {
          const double* s = zs.data() + yy * row;
          for (int64_t i = 0; i < nc; i += 4) store4d(c0 + i, load4d(c0 + i) + load4d(s + i));
        }
      } else {
        const double* out = zs.data() + (y - K) * row;
        for (int64_t i = 0; i < nc; i += 4) store4d(c0 + i, load4d(c0 + i) + (load4d(zr + i) - load4d(out + i)));
      }
      total += box_row_ssim(c0, K, T, n_taps, pc, lim);
    }
  }
  return total;
}

DSF_INLINE double box3d_planes(const float* a, const float* b, const Geom& g, const Window& win, const Prep& px,
                               const Prep& py, const PairConstD& pc, int64_t z0, int64_t z1) {
  if (px.scale == 1.0 && py.scale == 1.0) return box3d_planes_t<false>(a, b, g, win, px, py, pc, z0, z1);
  return box3d_planes_t<true>(a, b, g, win, px, py, pc, z0, z1);
}

DSF_INLINE double box2d_rows(const float* a, const float* b, const Geom& g, const Window& win, const Prep& px,
                             const Prep& py, const PairConstD& pc, int64_t r0, int64_t r1) {
  if (px.scale == 1.0 && py.scale == 1.0) return box2d_rows_t<false>(a, b, g, win, px, py, pc, r0, r1);
  return box2d_rows_t<true>(a, b, g, win, px, py, pc, r0, r1);
}

// ---------------------------------------------------------------------------------------------------
// Uniform window, 2D, on 8 fp64 lanes (AVX-512 CPUs): the running-sum kernel above, run on two bands of
// output rows at once. The rows [r0, r1) are cut in two halves; lanes 0-3 carry the 4 segments of the first
// half's rows and lanes 4-7 those of the second half, so each instruction does the work of two. Every lane
// performs exactly the arithmetic of box2d_rows_t, the row sums are added in the same row order, and the
// results are bit-identical to the 4-lane kernel's.

// 4 steps of one prepared row of each band, segment-interleaved (as box_ingest_row, both bands in one 8-lane
// transpose): x[q] = band 1's 4 segments at step t + q, then band 2's.
template <bool SCALE>
DSF_INLINE void interleave4x2(const float* p1, const float* p2, int64_t S, int64_t t, v8f c, v8f s, v8f x[4]) {
  v8f r[4];
  for (int l = 0; l < 4; ++l) {
    r[l] = __builtin_shufflevector(load4f(p1 + l * S + t), load4f(p2 + l * S + t), 0, 1, 2, 3, 4, 5, 6, 7) - c;
    if (SCALE) r[l] *= s;
  }
  const v8f t0 = __builtin_shufflevector(r[0], r[1], 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f t1 = __builtin_shufflevector(r[0], r[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const v8f t2 = __builtin_shufflevector(r[2], r[3], 0, 8, 1, 9, 4, 12, 5, 13);
  const v8f t3 = __builtin_shufflevector(r[2], r[3], 2, 10, 3, 11, 6, 14, 7, 15);
  x[0] = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  x[1] = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  x[2] = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  x[3] = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
}

// One row enters each band's window (and, if LEAVE, one leaves): ring slots hold 8 floats per step (band 1's
// segments, then band 2's), column sums 4 channels x 8 lanes per step.
template <bool LEAVE, bool SCALE>
DSF_INLINE void box2_ingest_rows(const float* const src[4], const float* const end[2], int64_t W, float* const pad[4],
                                 float* __restrict na, float* __restrict nb, const float* oa, const float* ob,
                                 double* __restrict c0, int64_t S, int64_t T4, float ca, float sa, float cb,
                                 float sb) {
  const float* p[4];
  for (int i = 0; i < 4; ++i) p[i] = row_source(src[i], end[i & 1], W, S, T4, pad[i]);
  const v8f vca = splat8(ca), vsa = splat8(sa), vcb = splat8(cb), vsb = splat8(sb);
  for (int64_t t = 0; t < T4; t += 4) {
    v8f xa[4], xb[4];
    interleave4x2<SCALE>(p[0], p[2], S, t, vca, vsa, xa);
    interleave4x2<SCALE>(p[1], p[3], S, t, vcb, vsb, xb);
    for (int q = 0; q < 4; ++q) {
      const int64_t i = t + q;
      const v8f fa = xa[q], fb = xb[q];
      std::memcpy(na + 8 * i, &fa, sizeof(fa));
      std::memcpy(nb + 8 * i, &fb, sizeof(fb));
      const v8d va = widen8(fa), vb = widen8(fb);
      if (LEAVE)
        update_columns<true>(c0 + 32 * i, va, vb, widen8(load8(oa + 8 * i)), widen8(load8(ob + 8 * i)));
      else
        update_columns<false>(c0 + 32 * i, va, vb, va, vb);
    }
  }
}

// The row pass of both bands; s1, s2 = the two rows' sums, each added in box_row_ssim's lane order.
DSF_INLINE void box2_row_ssim(const double* __restrict c0, int K, int64_t T, double n_taps, const PairConstD& pc,
                              v8i lim, double& s1, double& s2) {
  const v16f acc = box_row_acc<v8d, v16f, v16i>(c0, K, T, BoxFormula(n_taps, pc), lim);
  s1 = hsum8(__builtin_shufflevector(acc, acc, 0, 1, 2, 3, 8, 9, 10, 11));
  s2 = hsum8(__builtin_shufflevector(acc, acc, 4, 5, 6, 7, 12, 13, 14, 15));
}

template <bool SCALE>
DSF_INLINE double box2d_rows_x2_t(const float* a, const float* b, const Geom& g, const Window& win,
                                  const Prep& px, const Prep& py, const PairConstD& pc, int64_t r0, int64_t r1) {
  const int K = win.K;
  const int64_t W = g.W;
  const int64_t half = (r1 - r0 + 1) / 2;  // band 1: rows r0 .. r0 + half - 1; band 2: the rest (half or half - 1)
  const int64_t r2 = r0 + half, n2 = r1 - r2;
  BoxRowBuffers bu(K, W, 8);
  const int64_t S = bu.S, T = bu.T, T4 = bu.T4;
  float* const pad[4] = {bu.pad_row(0), bu.pad_row(1), bu.pad_row(2), bu.pad_row(3)};
  double* c0 = bu.cs.data();
  const float ca = static_cast<float>(px.centre), sa = static_cast<float>(px.scale);
  const float cb = static_cast<float>(py.centre), sb = static_cast<float>(py.scale);
  const double n_taps = static_cast<double>(K) * K;
  const v8i lim = lane_limits(W - K + 1, S);
  auto slot_a = [&](int64_t j) { return bu.slot(0, j); };
  auto slot_b = [&](int64_t j) { return bu.slot(1, j); };
  // Input row y of band 1 and row y + half of band 2 (band 2's rows past the image, read only in a last
  // iteration whose band-2 result is dropped, are replaced by band 1's).
  auto rows = [&](int64_t y, const float* src[4]) {
    const int64_t y2 = y + half < g.H ? y + half : y;
    src[0] = a + y * W;
    src[1] = b + y * W;
    src[2] = a + y2 * W;
    src[3] = b + y2 * W;
  };
  const float* src[4];
  const float* const end[2] = {a + g.H * W, b + g.H * W};  // src[0], src[2] are rows of a; src[1], src[3] of b
  for (int64_t j = 0; j < K; ++j) {
    rows(r0 + j, src);
    box2_ingest_rows<false, SCALE>(src, end, W, pad, slot_a(j), slot_b(j), nullptr, nullptr, c0, S, T4, ca, sa, cb, sb);
  }
  std::vector<double> band2(static_cast<size_t>(half));
  double total = 0;
  for (int64_t j = 0; j < half; ++j) {
    if (j > 0) {
      rows(r0 + j + K - 1, src);
      box2_ingest_rows<true, SCALE>(src, end, W, pad, slot_a(j + K - 1), slot_b(j + K - 1), slot_a(j - 1),
                                    slot_b(j - 1), c0, S, T4, ca, sa, cb, sb);
    }
    double s1, s2;
    box2_row_ssim(c0, K, T, n_taps, pc, lim, s1, s2);
    total = j == 0 ? s1 : total + s1;
    band2[j] = s2;
  }
  for (int64_t j = 0; j < n2; ++j) total += band2[j];  // rows in order, as box2d_rows_t adds them
  return total;
}

DSF_INLINE double box2d_rows_x2(const float* a, const float* b, const Geom& g, const Window& win, const Prep& px,
                                const Prep& py, const PairConstD& pc, int64_t r0, int64_t r1) {
  if (r1 - r0 < 2 * win.K) return box2d_rows(a, b, g, win, px, py, pc, r0, r1);  // too few rows to split
  if (px.scale == 1.0 && py.scale == 1.0) return box2d_rows_x2_t<false>(a, b, g, win, px, py, pc, r0, r1);
  return box2d_rows_x2_t<true>(a, b, g, win, px, py, pc, r0, r1);
}

// ---------------------------------------------------------------------------------------------------
// Uniform window, 2D, ssim_matrix with moment reuse on the running-sum layout. Per image (box_image_2d):
// the prepared rows, segment-interleaved once (no transposes left for the pairs), and for every output
// pixel the window sum A = sum a (fp64) and the variance numerator N sum a^2 - A^2 (fp64, stored fp32: it
// no longer cancels). Per pair (box_cross_2d) only the cross channel remains: a vertical running sum of
// the products a b (exact in fp64) and a horizontal one, then N^2 cov = N P - A_x A_y in fp64 and the
// formula as in box_row_ssim. Layout of the maps: output row, output step s < S2 (S rounded up to even,
// spare steps zero), 4 lanes (segments).
struct BoxImage {
  std::vector<float> il;     // H x T4 x 4 prepared, interleaved
  std::vector<double> amap;  // Ho x S2 x 4
  std::vector<float> vmap;   // Ho x S2 x 4
};

struct BoxDims {
  int K;
  int64_t H, W, Ho, Wo, S, T, T4, S2;
  explicit BoxDims(const Geom& g, int k) : K(k), H(g.H), W(g.W) {
    Ho = H - K + 1;
    Wo = W - K + 1;
    S = (Wo + 3) / 4;
    T = S + K - 1;
    T4 = (T + 3) & ~int64_t(3);
    S2 = (S + 1) & ~int64_t(1);
  }
};

template <bool SCALE>
DSF_INLINE void box_image_2d_t(const float* src, const BoxDims& d, float c, float s, double vscale, BoxImage& out) {
  const int K = d.K;
  const int64_t rowf = 4 * d.T4;
  out.il.assign(d.H * rowf, 0.0f);
  out.amap.assign(d.Ho * d.S2 * 4, 0.0);
  out.vmap.assign(d.Ho * d.S2 * 4, 0.0f);
  std::vector<float> pad(4 * d.S + d.T4 + 16, 0.0f);
  for (int64_t y = 0; y < d.H; ++y)
    box_interleave_row<SCALE>(src + y * d.W, src + d.H * d.W, d.W, pad.data(), out.il.data() + y * rowf, d.S,
                              d.T4, c, s);
  std::vector<double> ca(rowf + 8, 0.0), cq(rowf + 8, 0.0);  // column sums of a and a^2, per (t, lane)
  const v4d vn = splat4(static_cast<double>(K) * K), vsc = splat4(vscale);
  for (int64_t oy = 0; oy < d.Ho; ++oy) {
    if (oy == 0) {
      for (int64_t y = 0; y < K; ++y) {
        const float* r = out.il.data() + y * rowf;
        for (int64_t i = 0; i < 4 * d.T; i += 4) {
          const v4d v = widen(load4f(r + i));
          store4d(ca.data() + i, load4d(ca.data() + i) + v);
          store4d(cq.data() + i, load4d(cq.data() + i) + v * v);
        }
      }
    } else {
      const float* rn = out.il.data() + (oy + K - 1) * rowf;
      const float* ro = out.il.data() + (oy - 1) * rowf;
      for (int64_t i = 0; i < 4 * d.T; i += 4) {
        const v4d v = widen(load4f(rn + i)), w = widen(load4f(ro + i));
        store4d(ca.data() + i, load4d(ca.data() + i) + (v - w));
        store4d(cq.data() + i, load4d(cq.data() + i) + (v * v - w * w));
      }
    }
    v4d ha = splat4(0.0), hq = ha;
    for (int64_t t = 0; t < K - 1; ++t) {
      ha += load4d(ca.data() + 4 * t);
      hq += load4d(cq.data() + 4 * t);
    }
    double* am = out.amap.data() + oy * d.S2 * 4;
    float* vm = out.vmap.data() + oy * d.S2 * 4;
    for (int64_t t = K - 1; t < d.T; ++t) {
      ha += load4d(ca.data() + 4 * t);
      hq += load4d(cq.data() + 4 * t);
      const int64_t o = t - K + 1;
      store4d(am + 4 * o, ha);
      store4f(vm + 4 * o, __builtin_convertvector((vn * hq - ha * ha) * vsc, v4f));
      ha -= load4d(ca.data() + 4 * o);
      hq -= load4d(cq.data() + 4 * o);
    }
  }
}

// vscale = 1 / (N r)^2 with r the image's own range (prepared units), so that the stored fp32 variance
// numerators are O(1) whatever the data's scale; box_cross_2d rescales them by (r / range)^2.
DSF_INLINE void box_image_2d(const float* src, const BoxDims& d, const Prep& p, double vscale, BoxImage& out) {
  if (p.scale == 1.0)
    box_image_2d_t<false>(src, d, static_cast<float>(p.centre), 1.0f, vscale, out);
  else
    box_image_2d_t<true>(src, d, static_cast<float>(p.centre), static_cast<float>(p.scale), vscale, out);
}

// Sum of the SSIM map of one pair from the two images' BoxImage data. cp: 4 T4 + 8 doubles of scratch.
DSF_INLINE double box_cross_2d(const BoxImage& X, const BoxImage& Y, const BoxDims& d, const PairConstD& pc,
                               float fx, float fy, double* __restrict cp) {
  const int K = d.K;
  const int64_t rowf = 4 * d.T4, nT = 4 * d.T;
  const BoxFormula f(static_cast<double>(K) * K, pc);
  const v4d vn = f.vn, vsu = f.vsu, vsv = f.vsv, nox = f.nox, noy = f.noy;
  const v8f vfx = splat8(fx), vfy = splat8(fy);
  const v8i lim = lane_limits(d.Wo, d.S);
  for (int64_t i = 0; i < rowf + 8; ++i) cp[i] = 0.0;
  const float* xa = X.il.data();
  const float* ya = Y.il.data();
  double total = 0;
  for (int64_t oy = 0; oy < d.Ho; ++oy) {
    v8f acc = splat8(0.0f);
    if (oy == 0) {
      for (int64_t y = 0; y < K; ++y) {
        const float* ra = xa + y * rowf;
        const float* rb = ya + y * rowf;
        for (int64_t i = 0; i < nT; i += 4)
          store4d(cp + i, load4d(cp + i) + widen(load4f(ra + i)) * widen(load4f(rb + i)));
      }
    } else {
      const float* na = xa + (oy + K - 1) * rowf;
      const float* nb = ya + (oy + K - 1) * rowf;
      const float* oa = xa + (oy - 1) * rowf;
      const float* ob = ya + (oy - 1) * rowf;
      for (int64_t i = 0; i < nT; i += 4)
        store4d(cp + i, load4d(cp + i) + (widen(load4f(na + i)) * widen(load4f(nb + i)) -
                                          widen(load4f(oa + i)) * widen(load4f(ob + i))));
    }
    const double* ax = X.amap.data() + oy * d.S2 * 4;
    const double* ay = Y.amap.data() + oy * d.S2 * 4;
    const float* vx = X.vmap.data() + oy * d.S2 * 4;
    const float* vy = Y.vmap.data() + oy * d.S2 * 4;
    v4d h = splat4(0.0);
    for (int64_t t = 0; t < K - 1; ++t) h += load4d(cp + 4 * t);
    v8i ov = {0, 0, 0, 0, 1, 1, 1, 1};
    // Steps past T read zero sums (spare steps of cp and of the maps) and are masked out.
    for (int64_t t = K - 1; t < d.T; t += 2) {
      const int64_t o = t - K + 1;
      v4d m[2][3];
      for (int u = 0; u < 2; ++u) {
        h += load4d(cp + 4 * (t + u));
        const v4d a = load4d(ax + 4 * (o + u)), b = load4d(ay + 4 * (o + u));
        m[u][0] = a * vsu + nox;
        m[u][1] = b * vsu + noy;
        m[u][2] = (vn * h - a * b) * vsv;
        h -= load4d(cp + 4 * (o + u));
      }
      const v8f ux = cat8(m[0][0], m[1][0]), uy = cat8(m[0][1], m[1][1]), vxy = cat8(m[0][2], m[1][2]);
      const v8f vsum = load8(vx + 4 * o) * vfx + load8(vy + 4 * o) * vfy;
      acc += f.ssim(ux, uy, vsum, vxy, ov < lim);
      ov += 2;
    }
    total += hsum8(acc);  // per row: an fp32 sum over the whole image would lose ~1e-6
  }
  return total;
}

size_t scratch_floats(const Geom& g) {
  return (g.D > 1 ? 5 * padded(g.H * g.W) : 0) + 5 * padded(g.W) + 64;
}

// Dual instantiation: the same always-inline bodies compiled for the baseline and for AVX2+FMA.
#define DSF_SSIM_VARIANT(SUFFIX, ATTR)                                                                        \
  ATTR double ssim2d_rows_##SUFFIX(const float* a, const float* b, const Geom& g, const Window& win,          \
                                   const PairConst& pc, int64_t r0, int64_t r1, float* s, bool uni) {        \
    return ssim2d_rows(a, b, g, win, pc, r0, r1, s, uni);                                                    \
  }                                                                                                          \
  ATTR double ssim3d_plane_##SUFFIX(const float* a, const float* b, const Geom& g, const Window& win,         \
                                    const PairConst& pc, int64_t oz, float* s, bool uni) {                   \
    return ssim3d_plane(a, b, g, win, pc, oz, s, uni);                                                       \
  }                                                                                                          \
  ATTR void prepare_##SUFFIX(const float* src, float* dst, int64_t n, const Prep& p) { prepare(src, dst, n, p); } \
  ATTR ImgStats image_stats_##SUFFIX(const float* p, int64_t n, bool need_std) {                             \
    return image_stats_t(p, n, need_std);                                                                    \
  } \
  ATTR double box2d_rows_##SUFFIX(const float* a, const float* b, const Geom& g, const Window& win, const Prep& px, \
                                  const Prep& py, const PairConstD& pc, int64_t r0, int64_t r1) {             \
    return box2d_rows(a, b, g, win, px, py, pc, r0, r1);                                                     \
  }                                                                                                          \
  ATTR double box3d_planes_##SUFFIX(const float* a, const float* b, const Geom& g, const Window& win,         \
                                    const Prep& px, const Prep& py, const PairConstD& pc, int64_t z0,        \
                                    int64_t z1) {                                                            \
    return box3d_planes(a, b, g, win, px, py, pc, z0, z1);                                                   \
  }

DSF_SSIM_VARIANT(base, )
#if DSF_X86
DSF_SSIM_VARIANT(avx2, DSF_TARGET_AVX2)
DSF_TARGET_AVX512 double box2d_rows_avx512(const float* a, const float* b, const Geom& g, const Window& win,
                                           const Prep& px, const Prep& py, const PairConstD& pc, int64_t r0,
                                           int64_t r1) {
  return box2d_rows_x2(a, b, g, win, px, py, pc, r0, r1);
}
#endif

struct Kernels {
  double (*rows2d)(const float*, const float*, const Geom&, const Window&, const PairConst&, int64_t, int64_t,
                   float*, bool);
  double (*plane3d)(const float*, const float*, const Geom&, const Window&, const PairConst&, int64_t, float*,
                    bool);
  void (*prep)(const float*, float*, int64_t, const Prep&);
  ImgStats (*stats)(const float*, int64_t, bool);
  double (*box2d)(const float*, const float*, const Geom&, const Window&, const Prep&, const Prep&,
                  const PairConstD&, int64_t, int64_t);
  double (*box3d)(const float*, const float*, const Geom&, const Window&, const Prep&, const Prep&,
                  const PairConstD&, int64_t, int64_t);
};

Kernels pick_kernels() {
#if DSF_X86
  const Simd level = active_simd();
  if (level >= Simd::AVX2)
    return {ssim2d_rows_avx2, ssim3d_plane_avx2, prepare_avx2, image_stats_avx2,
            level == Simd::AVX512 ? box2d_rows_avx512 : box2d_rows_avx2, box3d_planes_avx2};
#endif
  return {ssim2d_rows_base, ssim3d_plane_base, prepare_base, image_stats_base, box2d_rows_base,
          box3d_planes_base};
}

// The formula's numerator and denominator are products of two factors of order range^2 (means ~ range,
// variances and C1, C2 ~ range^2), so in fp32 they went subnormal below ranges of ~1e-9 (ADC maps in m^2/s,
// say) and lost digits silently (scores up to 5e-2 off), or overflowed above ~4e9. pc.s, the power of two
// nearest 1 / range^2, scales each factor to O(1) exactly: where nothing was subnormal the scores are the same
// bit for bit. A range so small that range^2, C1 or C2 are below 2^-100 leaves the statistics themselves too
// near the fp32 subnormals: s = NaN, the pair scores NaN and the caller recomputes it in float64.
//
// The same NaN where the prepared values span more than kMaxSpanRatio times sqrt(C2) = k2 range (an explicit
// data range far below the images' own, or a tiny k2): the fp32 statistics keep each window's means to an ulp
// of that span, and the variances to about ulp * sigma, which is no longer small against C2 there. Seen: values
// 1000 +- 1e-3 with one 0-valued pixel, data_range=0.01, Gaussian window: 3e-4 off float64 (the ratio is
// 3.3e6). Where the images' own variation is of the order of sqrt(C2) the error grows faster: values 3000 +-
// 0.09 with one 0-valued pixel, Gaussian window, were 1.6e-5 off at a ratio of 3.3e4 (the limit was 32768
// then), 2.2e-6 at 8192 and 6e-7 at 4096. At the default range the ratio is 1 / k2 = 33, and real MRI stayed
// within 3e-8 of float64 up to ~8e3 (a slice spanning 0..236 at data_range=1 is ~7.9e3: kept on fp32).
constexpr double kMaxSpanRatio = 8192.0;

PairConst pair_const(double range, const Window& win, const Prep& px, const Prep& py) {
  PairConst pc;
  const double c1 = (win.k1 * range) * (win.k1 * range), c2 = (win.k2 * range) * (win.k2 * range);
  pc.c1 = static_cast<float>(c1);
  pc.c2 = static_cast<float>(c2);
  pc.cov_norm = win.cov_norm;
  pc.ox = px.lum_offset;
  pc.oy = py.lum_offset;
  const double tiny = std::ldexp(1.0, -100);
  const bool spans = std::max(px.span, py.span) <= kMaxSpanRatio * std::sqrt(c2);
  if (!(range * range >= tiny && c1 >= tiny && c2 >= tiny && spans)) {
    pc.s = std::numeric_limits<float>::quiet_NaN();
  } else {
    const int e = std::max(-62, std::min(62, std::ilogb(range)));  // range in [2^e, 2^(e+1)) (clamped)
    pc.s = std::ldexp(1.0f, -2 * e);
  }
  return pc;
}

// The running-sum (box) kernels are on unless DEEPSSIM_FAST_SSIM_BOX=0 (read once per call), or k1 or k2 is
// below 1e-5. A running fp64 sum swallows the small squares added while a bright voxel is in the window and
// keeps that loss after the voxel leaves: ~eps64 * range^2 per window, which is small beside C2 = (k2 range)^2
// only for k2 well above 1e-8 (measured with one voxel of 1 beside values ~k: 2e-3 off at k = 1e-9, 3e-6 at
// 1e-7, within 4e-8 of float64 from 1e-6 up). The separable kernel sums each window afresh.
// DEEPSSIM_FAST_SSIM_BOX: "0", "off", "false" or "no" (any case, blanks) turn the box kernels off (only "0" did,
// and "off" left them on without a word). Also read by deepssim_fast.ssim (the _native function ssim_box_off).
bool box_off_env() {
  const char* e = std::getenv("DEEPSSIM_FAST_SSIM_BOX");
  if (e == nullptr) return false;
  std::string t;
  for (const char* c = e; *c; ++c)
    if (!std::isspace(static_cast<unsigned char>(*c))) t += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  const bool off = t == "0" || t == "off" || t == "false" || t == "no";
  // any other value but the words for "on" leaves the kernels on, said once per process, as the other
  // variables' unknown values are (this runs without the GIL: it cannot raise)
  static std::atomic<bool> warned{false};
  if (!off && !t.empty() && t != "1" && t != "on" && t != "true" && t != "yes" && !warned.exchange(true))
    std::fprintf(stderr,
                 "deepssim_fast: DEEPSSIM_FAST_SSIM_BOX='%s' is not one of 0/off/false/no or 1/on/true/yes; the "
                 "running-sum kernels stay on\n",
                 e);
  return off;
}

bool box_enabled(const Window& win) {
  if (win.k1 < 1e-5 || win.k2 < 1e-5) return false;
  return !box_off_env();
}

// The running-sum kernels' constants. Where the prepared values span more than kMaxSpanRatio * k2 range (see
// pair_const), C1 and C2 are NaN: the pair scores NaN and the caller recomputes it in float64. A running fp64 sum
// keeps the small squares it adds to ~eps64 * span^2, which is no longer small beside C2 there: a slice spanning
// [0, 1000] at data_range=0.001 scored 1.5e-3 off float64 on these kernels (the fp32 ones already refused it).
PairConstD pair_const_d(double range, const Window& win, const Prep& px, const Prep& py) {
  PairConstD pc;
  pc.c1 = (win.k1 * range) * (win.k1 * range);
  pc.c2 = (win.k2 * range) * (win.k2 * range);
  if (!(std::max(px.span, py.span) <= kMaxSpanRatio * std::sqrt(pc.c2))) {
    pc.c1 = pc.c2 = std::numeric_limits<double>::quiet_NaN();
  }
  pc.cov_norm = win.cov_norm_d;
  pc.ox = px.lum;
  pc.oy = py.lum;
  pc.range = range;
  return pc;
}

Window make_window(py::array_t<double, py::array::c_style | py::array::forcecast> weights, bool sample_cov,
                   int spatial_dims, double k1, double k2, int range_mode, double range_value) {
  Window win;
  win.K = static_cast<int>(weights.size());
  if (win.K < 1) throw py::value_error("ssim: empty window");
  auto w = weights.unchecked<1>();
  win.w.resize(win.K);
  for (int k = 0; k < win.K; ++k) {
    win.w[k] = static_cast<float>(w(k));
    if (w(k) != w(0)) win.uniform = false;
  }
  const double n = std::pow(static_cast<double>(win.K), spatial_dims);
  win.cov_norm_d = sample_cov ? n / (n - 1.0) : 1.0;
  win.cov_norm = static_cast<float>(win.cov_norm_d);
  win.k1 = k1;
  win.k2 = k2;
  if (range_mode < 0 || range_mode > 2) throw py::value_error("ssim: range_mode must be 0, 1 or 2");
  win.range_mode = range_mode;
  win.range_value = range_value;
  return win;
}

Geom geom_of(const py::buffer_info& bi, int spatial_dims, const char* name) {
  if (bi.ndim != spatial_dims + 1)
    throw py::value_error(std::string("ssim: ") + name + " must have shape (N, *spatial) with " +
                          std::to_string(spatial_dims) + " spatial dims, got rank " + std::to_string(bi.ndim));
  Geom g;
  if (spatial_dims == 3) g.D = bi.shape[1];
  g.H = bi.shape[spatial_dims - 1];
  g.W = bi.shape[spatial_dims];
  return g;
}

using FArr = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IArr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Mean SSIM for pairs (x[ix[p]], y[iy[p]]), p < len(ix). x: (Nx, *spatial) float32, y: (Ny, *spatial).
py::array_t<double> ssim_pairs(FArr x, FArr y, IArr ix, IArr iy, int spatial_dims, py::array_t<double> weights,
                               bool sample_cov, double k1, double k2, int range_mode, double range_value) {
  if (spatial_dims != 2 && spatial_dims != 3) throw py::value_error("ssim: spatial_dims must be 2 or 3");
  const Window win = make_window(weights, sample_cov, spatial_dims, k1, k2, range_mode, range_value);
  const auto bx = x.request(), by = y.request();
  const Geom g = geom_of(bx, spatial_dims, "x");
  const Geom gy = geom_of(by, spatial_dims, "y");
  if (g.D != gy.D || g.H != gy.H || g.W != gy.W) throw py::value_error("ssim: x and y spatial shapes differ");
  if (g.H < win.K || g.W < win.K || (spatial_dims == 3 && g.D < win.K))
    throw py::value_error("ssim: image smaller than the window");
  const int64_t nx = bx.shape[0], ny = by.shape[0];
  if (ix.ndim() != 1 || iy.ndim() != 1 || ix.size() != iy.size())
    throw py::value_error("ssim: ix and iy must be 1D of equal length");
  const int64_t B = ix.size();
  const int64_t* pix = ix.data();
  const int64_t* piy = iy.data();
  for (int64_t p = 0; p < B; ++p)
    if (pix[p] < 0 || pix[p] >= nx || piy[p] < 0 || piy[p] >= ny)
      throw py::index_error("ssim: pair index out of range at pair " + std::to_string(p));
  const float* px = static_cast<const float*>(bx.ptr);
  const float* py_ = static_cast<const float*>(by.ptr);
  py::array_t<double> out(B);
  double* po = out.mutable_data();
  const int64_t n = g.n();
  const int64_t Do = spatial_dims == 3 ? g.D - win.K + 1 : 1;
  const double count = static_cast<double>(Do) * (g.H - win.K + 1) * (g.W - win.K + 1);
  const Kernels kern = pick_kernels();
  const int nt = num_threads();
  {
    py::gil_scoped_release release;
    const IeeeFloats ieee;
    // Per-image statistics, once per distinct image index used.
    const bool need_std = win.range_mode == 2;
    std::vector<ImgStats> sx(nx), sy(ny);
    std::vector<int> usex(nx, 0), usey(ny, 0);
    for (int64_t p = 0; p < B; ++p) {
      ++usex[pix[p]];
      ++usey[piy[p]];
    }
    const bool pair_parallel = spatial_dims == 2 && B >= 2 * nt;
    // Uniform 2D windows use the fp64 running-sum kernel (env DEEPSSIM_FAST_SSIM_BOX=0 disables it).
    const bool box2d = spatial_dims == 2 && win.uniform && box_enabled(win);
    const bool box3d = spatial_dims == 3 && win.uniform && box_enabled(win);
    // In the pair-parallel box path, an image used by one pair only gets its statistics right before that
    // pair is computed ("lazy"), so the kernel reads it from cache instead of from memory a second time.
    const bool lazy = pair_parallel && box2d;
    auto eager = [&](int uses) { return uses > (lazy ? 1 : 0); };
    parallel_for(nx + ny, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        if (i < nx) {
          if (eager(usex[i])) sx[i] = kern.stats(px + i * n, n, need_std);
        } else if (eager(usey[i - nx])) {
          sy[i - nx] = kern.stats(py_ + (i - nx) * n, n, need_std);
        }
      }
    });
    // A NaN or Inf anywhere makes the image's sum non-finite (the caller then names the pair).
    auto check_finite = [&](bool only_eager) {
      for (int64_t i = 0; i < nx; ++i)
        if (usex[i] && (!only_eager || eager(usex[i])) && !std::isfinite(sx[i].mean)) {
          py::gil_scoped_acquire acquire;
          throw py::value_error("nonfinite: x image " + std::to_string(i) + " has NaN or Inf values");
        }
      for (int64_t i = 0; i < ny; ++i)
        if (usey[i] && (!only_eager || eager(usey[i])) && !std::isfinite(sy[i].mean)) {
          py::gil_scoped_acquire acquire;
          throw py::value_error("nonfinite: y image " + std::to_string(i) + " has NaN or Inf values");
        }
    };
    check_finite(true);
    if (pair_parallel) {
      const int64_t grain = std::max<int64_t>(1, B / (8 * nt));
      parallel_for(B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<float> ab(2 * padded(n), 0.0f), scratch(scratch_floats(g));
        float* a = ab.data();
        float* b = ab.data() + padded(n);
        for (int64_t p = b0; p < b1; ++p) {
          if ((p - b0) % 64 == 63) interruption_point();  // (a chunk is 1/8 of a thread's pairs: Ctrl-C)
          if (!eager(usex[pix[p]])) sx[pix[p]] = kern.stats(px + pix[p] * n, n, need_std);
          if (!eager(usey[piy[p]])) sy[piy[p]] = kern.stats(py_ + piy[p] * n, n, need_std);
          Prep prx, pry;
          const double range = resolve_pair(sx[pix[p]], sy[piy[p]], win, prx, pry);
          if (!(range > 0)) {
            po[p] = 1.0;
            continue;
          }
          if (box2d) {
            po[p] = kern.box2d(px + pix[p] * n, py_ + piy[p] * n, g, win, prx, pry,
                               pair_const_d(range, win, prx, pry), 0, g.H - win.K + 1) / count;
            continue;
          }
          kern.prep(px + pix[p] * n, a, n, prx);
          kern.prep(py_ + piy[p] * n, b, n, pry);
          const PairConst pc = pair_const(range, win, prx, pry);
          po[p] = kern.rows2d(a, b, g, win, pc, 0, g.H - win.K + 1, scratch.data(), win.uniform) / count;
        }
      });
      if (lazy) check_finite(false);  // NaN/Inf in a lazily checked image: its pair's value is discarded
    } else {
      // Few pairs or volumes: parallel inside each pair, over output rows (2D) or planes (3D).
      std::vector<float> ab(2 * padded(n), 0.0f);
      float* a = ab.data();
      float* b = ab.data() + padded(n);
      for (int64_t p = 0; p < B; ++p) {
        Prep prx, pry;
        const double range = resolve_pair(sx[pix[p]], sy[piy[p]], win, prx, pry);
        if (!(range > 0)) {
          po[p] = 1.0;
          continue;
        }
        if (box3d) {
          // One band of output planes per thread (each band first sums K planes).
          const PairConstD pcd = pair_const_d(range, win, prx, pry);
          std::vector<double> partial(Do, 0.0);
          parallel_for(
              Do, std::max<int64_t>(1, (Do + nt - 1) / nt),
              [&](int64_t u0, int64_t u1) {
                partial[u0] = kern.box3d(px + pix[p] * n, py_ + piy[p] * n, g, win, prx, pry, pcd, u0, u1);
              },
              0, Serial::Whole);
          double total = 0;
          for (double v : partial) total += v;
          po[p] = total / count;
          continue;
        }
        if (box2d) {
          const int64_t units = g.H - win.K + 1;
          const PairConstD pcd = pair_const_d(range, win, prx, pry);
          std::vector<double> partial(units, 0.0);
          parallel_for(
              units, std::max<int64_t>(8, units / (2 * nt)),
              [&](int64_t u0, int64_t u1) {
                partial[u0] = kern.box2d(px + pix[p] * n, py_ + piy[p] * n, g, win, prx, pry, pcd, u0, u1);
              },
              0, Serial::Whole);
          double total = 0;
          for (double v : partial) total += v;
          po[p] = total / count;
          continue;
        }
        const int64_t chunk = 1 << 16;
        parallel_for(n, chunk, [&](int64_t i0, int64_t i1) {
          kern.prep(px + pix[p] * n + i0, a + i0, i1 - i0, prx);
          kern.prep(py_ + piy[p] * n + i0, b + i0, i1 - i0, pry);
        });
        const PairConst pc = pair_const(range, win, prx, pry);
        const int64_t units = spatial_dims == 3 ? Do : g.H - win.K + 1;
        std::vector<double> partial(units, 0.0);
        const int64_t grain = spatial_dims == 3 ? 1 : std::max<int64_t>(1, units / (4 * nt));
        parallel_for(
            units, grain,
            [&](int64_t u0, int64_t u1) {
              std::vector<float> scratch(scratch_floats(g));
              if (spatial_dims == 3) {
                for (int64_t u = u0; u < u1; ++u)
                  partial[u] = kern.plane3d(a, b, g, win, pc, u, scratch.data(), win.uniform);
              } else {
                partial[u0] = kern.rows2d(a, b, g, win, pc, u0, u1, scratch.data(), win.uniform);
              }
            },
            0, Serial::Whole);  // (one partial sum per chunk: one thread keeps its single chunk)
        double total = 0;
        for (double v : partial) total += v;
        po[p] = total / count;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// SSIM matrix with moment reuse: per image, the prepared image and its windowed variance map are computed
// once; a pair then costs only the means and the cross term (three channels instead of five), with the
// same locally centred accumulation as the pair kernels.

struct ImgMoments {
  std::vector<float> a;   // prepared image (padded)
  std::vector<float> v;   // windowed variance (no cov_norm), valid region, padded rows of Wo
  Prep prep;
};

inline int64_t vrow(const Geom& g, const Window& win) { return padded(g.W - win.K + 1); }

// Windowed variance map of one prepared image (2D or 3D) into v (rows of stride vrow()).
template <bool UNI>
DSF_INLINE void single_moments_t(const float* a, const Geom& g, const Window& win, float* vmap, float* scratch) {
  const int64_t HW = g.H * g.W, W = g.W, Ho = g.H - win.K + 1, Wo = g.W - win.K + 1;
  const int64_t Do = g.D > 1 ? g.D - win.K + 1 : 1;
  const int64_t ps = padded(HW), rs = padded(W), vs = vrow(g, win);
  float* p[5];
  float* r[5];
  float* h[5];
  for (int q = 0; q < 5; ++q) {
    p[q] = scratch + q * ps;
    r[q] = scratch + 5 * ps + q * rs;
    h[q] = scratch + 5 * ps + (5 + q) * rs;
  }
  for (int64_t i = 0; i < 5 * ps + 10 * rs; ++i) scratch[i] = 0.0f;
  for (int64_t oz = 0; oz < Do; ++oz) {
    if (g.D > 1) {
      const float* src[2] = {a + oz * HW, a + oz * HW};
      ltv_pass<UNI, true, false>(src, HW, HW, win, p);
    }
    for (int64_t oy = 0; oy < Ho; ++oy) {
      if (g.D > 1) {
        const float* s5[5] = {p[0] + oy * W, p[1] + oy * W, p[2] + oy * W, p[3] + oy * W, p[4] + oy * W};
        ltv_pass<UNI, false, false>(s5, W, W, win, r);
      } else {
        const float* src[2] = {a + oy * W, a + oy * W};
        ltv_pass<UNI, true, false>(src, W, W, win, r);
      }
      ltv_pass<UNI, false, false>(r, 1, Wo, win, h);
      float* vo = vmap + (oz * Ho + oy) * vs;
      for (int64_t j = 0; j < Wo; ++j) vo[j] = h[2][j];
    }
  }
}

// Sum of the SSIM map of one pair from its prepared images and precomputed variance maps.
template <bool UNI>
DSF_INLINE double cross_pair_t(const ImgMoments& A, const ImgMoments& B, const Geom& g, const Window& win,
                               const PairConst& pc, float* scratch) {
  const int64_t HW = g.H * g.W, W = g.W, Ho = g.H - win.K + 1, Wo = g.W - win.K + 1;
  const int64_t Do = g.D > 1 ? g.D - win.K + 1 : 1;
  const int64_t ps = padded(HW), rs = padded(W), vs = vrow(g, win);
  float* p[5];
  float* r[5];
  for (int q = 0; q < 5; ++q) {
    p[q] = scratch + q * ps;
    r[q] = scratch + 5 * ps + q * rs;
  }
  const float* a = A.a.data();
  const float* b = B.a.data();
  double total = 0;
  for (int64_t oz = 0; oz < Do; ++oz) {
    if (g.D > 1) {
      const float* src[2] = {a + oz * HW, b + oz * HW};
      ltv_pass<UNI, true, true>(src, HW, HW, win, p);
    }
    for (int64_t oy = 0; oy < Ho; ++oy) {
      if (g.D > 1) {
        const float* s5[5] = {p[0] + oy * W, p[1] + oy * W, p[2] + oy * W, p[3] + oy * W, p[4] + oy * W};
        ltv_pass<UNI, false, true>(s5, W, W, win, r);
      } else {
        const float* src[2] = {a + oy * W, b + oy * W};
        ltv_pass<UNI, true, true>(src, W, W, win, r);
      }
      const float* va = A.v.data() + (oz * Ho + oy) * vs;
      const float* vb = B.v.data() + (oz * Ho + oy) * vs;
      v8f acc = splat8(0);
      for (int64_t j = 0; j < Wo; j += 8) {
        v8f o[5];
        ltv_accumulate<UNI, false, true>(r, j, 1, win, o);
        v8f s = ssim_formula(o[0], o[1], load8(va + j), load8(vb + j), o[4], pc);
        if (j + 8 > Wo) s = mask_tail(s, Wo - j);
        acc += s;
      }
      total += hsum8(acc);
    }
  }
  return total;
}

size_t matrix_scratch_floats(const Geom& g) { return 5 * padded(g.H * g.W) + 10 * padded(g.W) + 64; }

#define DSF_MATRIX_VARIANT(SUFFIX, ATTR)                                                                      \
  ATTR void single_moments_##SUFFIX(const float* a, const Geom& g, const Window& win, float* v, float* s) {   \
    if (win.uniform) single_moments_t<true>(a, g, win, v, s);                                                \
    else single_moments_t<false>(a, g, win, v, s);                                                           \
  }                                                                                                          \
  ATTR double cross_pair_##SUFFIX(const ImgMoments& A, const ImgMoments& B, const Geom& g, const Window& win, \
                                  const PairConst& pc, float* s) {                                           \
    return win.uniform ? cross_pair_t<true>(A, B, g, win, pc, s) : cross_pair_t<false>(A, B, g, win, pc, s);  \
  }                                                                                                          \
  ATTR void box_image_2d_##SUFFIX(const float* src, const BoxDims& d, const Prep& p, double vs, BoxImage& o) { \
    box_image_2d(src, d, p, vs, o);                                                                          \
  }                                                                                                          \
  ATTR double box_cross_2d_##SUFFIX(const BoxImage& X, const BoxImage& Y, const BoxDims& d,                   \
                                    const PairConstD& pc, float fx, float fy, double* cp) {                  \
    return box_cross_2d(X, Y, d, pc, fx, fy, cp);                                                            \
  }

DSF_MATRIX_VARIANT(base, )
#if DSF_X86
DSF_MATRIX_VARIANT(avx2, DSF_TARGET_AVX2)
#endif

// ssim_matrix: images 0 .. na - 1 of st are A's, the rest B's; a non-finite mean names the first bad one
// (called with the GIL released).
void check_finite_images(const std::vector<ImgStats>& st, int64_t na) {
  for (int64_t i = 0; i < static_cast<int64_t>(st.size()); ++i)
    if (!std::isfinite(st[i].mean)) {
      py::gil_scoped_acquire acquire;
      throw py::value_error(std::string("nonfinite: ") + (i < na ? "A image " : "B image ") +
                            std::to_string(i < na ? i : i - na) + " has NaN or Inf values");
    }
}

// ssim_matrix_block for uniform 2D windows: BoxImage data per image, then pairs in blocks of 8 x 8 images
// (the blocks' data stays in cache while its 64 pairs run), parallel over blocks.
void box_matrix_2d(const float* pa, const float* pb, int64_t na, int64_t nb, const Geom& g, const Window& win,
                   bool avx2, float* po) {
  auto image_fn = avx2 ? box_image_2d_avx2 : box_image_2d_base;
  auto cross_fn = avx2 ? box_cross_2d_avx2 : box_cross_2d_base;
  auto stats_fn = avx2 ? image_stats_avx2 : image_stats_base;
  const BoxDims d(g, win.K);
  const int64_t n = g.n();
  const double nvalid = static_cast<double>(d.Ho) * d.Wo;
  py::gil_scoped_release release;
  const IeeeFloats ieee;
  std::vector<ImgStats> st(na + nb);
  std::vector<BoxImage> img(na + nb);
  std::vector<Prep> prep(na + nb);
  std::vector<double> own(na + nb, 0.0);  // each image's own range in prepared units
  const double n_taps = static_cast<double>(win.K) * win.K;
  parallel_for(na + nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* src = i < na ? pa + i * n : pb + (i - na) * n;
      st[i] = stats_fn(src, n, win.range_mode == 2);
      if (!std::isfinite(st[i].mean)) continue;  // reported below
      Prep p2;
      resolve_pair(st[i], st[i], win, prep[i], p2);
      own[i] = (st[i].mx - st[i].mn) * prep[i].scale;
      image_fn(src, d, prep[i], own[i] > 0 ? 1.0 / ((n_taps * own[i]) * (n_taps * own[i])) : 1.0, img[i]);
    }
  });
  check_finite_images(st, na);
  constexpr int64_t kBlk = 8;
  const int64_t bi = (na + kBlk - 1) / kBlk, bj = (nb + kBlk - 1) / kBlk;
  parallel_for(bi * bj, 1, [&](int64_t q0, int64_t q1) {
    std::vector<double> cp(4 * d.T4 + 8);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i0 = (q / bj) * kBlk, j0 = (q % bj) * kBlk;
      for (int64_t i = i0; i < std::min(na, i0 + kBlk); ++i)
        for (int64_t j = j0; j < std::min(nb, j0 + kBlk); ++j) {
          Prep prx, pry;
          const double range = resolve_pair(st[i], st[na + j], win, prx, pry);
          if (!(range > 0)) {
            po[i * nb + j] = 1.0f;
            continue;
          }
          const PairConstD pc = pair_const_d(range, win, prx, pry);
          const float fx = static_cast<float>((own[i] / range) * (own[i] / range));
          const float fy = static_cast<float>((own[na + j] / range) * (own[na + j] / range));
          po[i * nb + j] = static_cast<float>(cross_fn(img[i], img[na + j], d, pc, fx, fy, cp.data()) / nvalid);
        }
    }
  });
}

// SSIM for every pair (A[i], B[j]) -> float32 (Na, Nb). A[i] is "the first image" (deepssim preset range).
py::array_t<float> ssim_matrix_block(FArr A, FArr B, int spatial_dims, py::array_t<double> weights,
                                     bool sample_cov, double k1, double k2, int range_mode, double range_value) {
  if (spatial_dims != 2 && spatial_dims != 3) throw py::value_error("ssim_matrix: spatial_dims must be 2 or 3");
  const Window win = make_window(weights, sample_cov, spatial_dims, k1, k2, range_mode, range_value);
  const auto ba = A.request(), bb = B.request();
  const Geom g = geom_of(ba, spatial_dims, "A");
  const Geom gb = geom_of(bb, spatial_dims, "B");
  if (g.D != gb.D || g.H != gb.H || g.W != gb.W)
    throw py::value_error("ssim_matrix: A and B spatial shapes differ");
  if (g.H < win.K || g.W < win.K || (spatial_dims == 3 && g.D < win.K))
    throw py::value_error("ssim_matrix: image smaller than the window");
  const int64_t na = ba.shape[0], nb = bb.shape[0], n = g.n();
  const int64_t Do = spatial_dims == 3 ? g.D - win.K + 1 : 1;
  const int64_t nvalid = Do * (g.H - win.K + 1) * (g.W - win.K + 1);
  const float* pa = static_cast<const float*>(ba.ptr);
  const float* pb = static_cast<const float*>(bb.ptr);
  py::array_t<float> out({na, nb});
  float* po = out.mutable_data();
  bool avx2 = false;
#if DSF_X86
  avx2 = active_simd() >= Simd::AVX2;
#endif
  auto moments_fn = avx2 ? single_moments_avx2 : single_moments_base;
  auto cross_fn = avx2 ? cross_pair_avx2 : cross_pair_base;
  auto prep_fn = avx2 ? prepare_avx2 : prepare_base;
  auto stats_fn = avx2 ? image_stats_avx2 : image_stats_base;

  if (spatial_dims == 2 && win.uniform && box_enabled(win)) {
    box_matrix_2d(pa, pb, na, nb, g, win, avx2, po);
    return out;
  }
  {
    py::gil_scoped_release release;
    const IeeeFloats ieee;
    std::vector<ImgStats> st(na + nb);
    std::vector<ImgMoments> mom(na + nb);
    // The preparation of an image depends only on the image (not on the pair) for every range mode.
    parallel_for(na + nb, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scratch(matrix_scratch_floats(g));
      for (int64_t i = i0; i < i1; ++i) {
        const float* src = i < na ? pa + i * n : pb + (i - na) * n;
        st[i] = stats_fn(src, n, win.range_mode == 2);
        Prep p1, p2;
        resolve_pair(st[i], st[i], win, p1, p2);
        ImgMoments& M = mom[i];
        M.prep = p1;
        M.a.assign(padded(n), 0.0f);
        M.v.assign(Do * (g.H - win.K + 1) * vrow(g, win) + kPad, 0.0f);
        prep_fn(src, M.a.data(), n, p1);
        moments_fn(M.a.data(), g, win, M.v.data(), scratch.data());
      }
    });
    check_finite_images(st, na);
    const int64_t total = na * nb;
    const int64_t grain = std::max<int64_t>(1, total / (16 * num_threads()));
    parallel_for(total, grain, [&](int64_t q0, int64_t q1) {
      std::vector<float> scratch(matrix_scratch_floats(g));
      for (int64_t q = q0; q < q1; ++q) {
        if ((q - q0) % 64 == 63) interruption_point();  // (a chunk is 1/16 of a thread's pairs: Ctrl-C)
        const int64_t i = q / nb, j = q % nb;
        Prep prx, pry;
        const double range = resolve_pair(st[i], st[na + j], win, prx, pry);
        if (!(range > 0)) {
          po[q] = 1.0f;
          continue;
        }
        const PairConst pc = pair_const(range, win, prx, pry);
        po[q] = static_cast<float>(cross_fn(mom[i], mom[na + j], g, win, pc, scratch.data()) /
                                   static_cast<double>(nvalid));
      }
    });
  }
  return out;
}

}  // namespace ssim_native

void register_ssim(py::module_& m) {
  m.def("ssim_box_off", &ssim_native::box_off_env,
        "Whether DEEPSSIM_FAST_SSIM_BOX turns the running-sum (box) kernels off ('0', 'off', 'false', 'no').");
  m.def("ssim_pairs", &ssim_native::ssim_pairs, py::arg("x"), py::arg("y"), py::arg("ix"), py::arg("iy"),
        py::arg("spatial_dims"), py::arg("weights"), py::arg("sample_covariance"), py::arg("k1"), py::arg("k2"),
        py::arg("range_mode"), py::arg("range_value"),
        "Mean SSIM (float64, shape (P,)) of pairs (x[ix[p]], y[iy[p]]). x: (Nx, *spatial), y: (Ny, *spatial) "
        "float32; weights: the 1D window taps. range_mode 0: fixed range_value; 1: per-pair max-min over both "
        "images; 2: deepssim preset (z-score, range of the first image). Inputs must be finite (checked by "
        "the caller). Releases the GIL; multithreaded over pairs (2D) or rows/planes (few pairs, 3D).");
  m.def("ssim_matrix_block", &ssim_native::ssim_matrix_block, py::arg("A"), py::arg("B"), py::arg("spatial_dims"),
        py::arg("weights"), py::arg("sample_covariance"), py::arg("k1"), py::arg("k2"), py::arg("range_mode"),
        py::arg("range_value"),
        "SSIM of every pair (A[i], B[j]) as float32 (Na, Nb); per-image moments computed once. Same "
        "conventions as ssim_pairs; A[i] is the first image of each pair.");
}

namespace {
static dsf::Registrar reg("ssim", &dsf::register_ssim);
}

}  // namespace dsf
