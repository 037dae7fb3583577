// Streaming cosine top-k with a fused score histogram (the CPU engine of deepssim_fast.all_pairs).
//
// The canonical score. A pair's score is s = fl32(D) computed in float32 as follows: 16 lanes, lane l
// accumulates q[k] t[k] over k = l, l + 16, l + 32, ... < dp in order, acc = fma(q[k], t[k], acc) from
// acc = 0 (one rounding per step); then the lanes are added pairwise in a fixed tree,
// v[l] = L[l] + L[l + 8] (l < 8), w[l] = v[l] + v[l + 4] (l < 4), u[l] = w[l] + w[l + 2] (l < 2),
// s = u[0] + u[1]. Rows longer than kCanonBlock = 4096 columns are cut into blocks of 4096 (the last one
// shorter): each block's sum is formed as above, the block sums are added in order in float64 and the total
// is rounded to float32 once (for dp <= 4096 this is the same number as the unblocked sum). The scalar, AVX2
// and AVX-512 code compute exactly these operations, so scores — and therefore top-k, ties, histogram and
// class counts — do not depend on tiling, threads or SIMD level.
// (|s - exact dot| <= gamma(min(dp, 4096) / 16 + 4) sum |q[k] t[k]| + the float64 sum's and the final
// rounding's share: about 2e-6 at d = 256 in the worst case, typically ~1e-8, and bounded by ~2e-5 whatever
// dp: one unblocked chain of 16 lanes had drifted 2.6e-3 on an 8.7e6-voxel volume against itself.)
//
// How a call finds them without scoring every pair canonically. One call folds every pair of a block of
// queries q (m, dp) and a chunk of database rows t (n, dp) into per-query top-k heaps, a histogram and class
// counts, without ever storing the m x n scores:
//   1. A GEMM micro-kernel computes an *approximate* score a for every pair, with a proven bound
//      |a - s| <= E for the call:
//        * int16 kernels: each row quantised to int16 with its own scale, z = round(x / u) (u a float32 per
//          row); exact int32 dot products of the int16 rows, a = I u_x u_y. E follows from the quantisation
//          residuals r = x - z u by Cauchy-Schwarz, |x.y - zx.zy ux uy| <= |rx| |y| + |zx ux| |ry| (plus
//          the float32 roundings of the sums), per pair from its row's and column's residuals: at d = 256
//          ~1e-4 (VNNI) or ~1.5e-4 (AVX2).
//          The int32 sums span chunks of columns and are added in float32, so a row's scale need only keep
//          each chunk's partial sum below 2^31 against any other row (every chunk of every z at most
//          ~46340 long) and every entry within int16: the row's largest chunk and largest entry set u.
//          - VNNI (AVX-512 VNNI: AMD Zen 4, Intel Ice Lake and later): vpdpwssd, twice the fp32 FMA rate.
//            Chunks of 32 columns: at d = 256 the scales are ~2.4x what one int32 sum over all of dp with
//            one scale for the call allows (~1.8x from the chunks, ~1.35x from per-row scales);
//          - AVX2: vpmaddwd + vpaddd, the same products; four chunks (a quarter of dp each): ~1.8x
//            (~1.5x, ~1.2x).
//        * fp32 kernel (scalar, or where int16 does not pay): one sequential fma chain per pair,
//          E = (gamma(dp) + gamma(dp / 16 + 4)) |q| |t| (~1.6e-5 at d = 256).
//      t is packed once per call into panels of NR = 16 rows (k-major); each worker takes MR = 6 query
//      rows at a time (6 x 16 or, int16, 6 x 32 scores in registers).
//      An int16 kernel is used where the CPU has one unless the bins are so fine that its larger E would
//      send most pairs to step 3 (prepare() compares the costs).
//   2. The fold decides, per pair, from a alone: its histogram slot when no bin edge lies within E of a
//      (int16: E of that pair, from its row's and column's own residuals), its class when no threshold
//      lies within E (else "unsure"), and whether it may enter the top-k (a + E >= the row's current k-th
//      best canonical score). Undecided pairs go to a per-worker queue (branch-free compress).
//      When each threshold separates two bins (the last float32 at or below it and the next one up fall in
//      different bins, as 0.6 and 0.85 do on 200 bins of [-1, 1]), the bins alone tell a pair's class: the
//      fold skips its class compares and the class counts are sums of the call's histogram (cls_in_hist).
//   3. The queued pairs (measured at 3000 x 20000 x 256, 200 bins, k = 10: VNNI 2.3 %, AVX2 int16 2.8 %,
//      fp32 0.9 %; near a bin edge for the int16 kernels, mostly top-k candidates for fp32) get their
//      canonical score s, four at a time (canon_dot4): exact bin, exact class, heap offer of s.
//   The histogram increments of 2 (one memory read-modify-write each, about a cycle apiece here) are
//   handed to the next micro-kernel call, which issues them between its multiply-adds: that loop is bound
//   by its arithmetic pipes and leaves the load/store ports idle.
//   Measured on 2 Zen 4 cores, 20000^2 x 256, 200 bins (BENCHMARKS.md): VNNI ~0.9 s per call,
//   AVX2 int16 ~1.1 s, fp32 ~1.2 s.
//
// Conventions (shared with deepssim_fast/all_pairs.py and reference.py)
//   bin(s)   = clamp(floor(((double)s - lo) / (hi - lo) * bins), 0, bins - 1)
//   class(s) : different if s <= low, similar if low < s <= high, duplicate if s > high (float64 compare)
//   top-k    : descending score, ties to the lower index; kept as a per-query binary heap whose root is
//              the worst kept entry (the driver sorts it at the end).
// The bin of a pair is first computed in float32 as the slot y = a * scale + (1 - lo * scale) = x + 1,
// clamped to [0.5, bins + 1.5] (slot 0 and slot bins + 1 are the clamped ends, merged into the first and
// last bin when the sub-histograms are flushed); a pair whose y lies within `margin` (float32 rounding
// plus E * scale) of an integer goes to step 3. Excluded pairs (self pairs, padding columns) are marked
// NaN before the fold: NaN fails every ordered compare, so it never counts and never enters a heap.
#include "common.h"

#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>

#if DSF_X86
#include <immintrin.h>
#endif

namespace dsf {
namespace {

constexpr int MR = 6;    // query rows per micro-kernel
constexpr int NR = 16;   // database rows per packed panel
constexpr int NC = 256;  // database rows per tile (16 panels; 256 KB packed at d = 256, fp32)
constexpr int LIST = 2 * MR * NR;  // flagged pairs of one micro-kernel call, at most
constexpr int KC = 16;   // micro_vnni: k pairs (32 columns) per int32 partial sum, then added in float32
constexpr int kI16Chunks = 4;
constexpr int64_t kMaxGrainRows = 427 * MR;  // query rows per parallel chunk, at most (see run())
// micro_i16_avx2: k pairs per chunk (the last may be shorter); at least 1, so that the chunk width is never 0
// (prepare() computes it for every dp, also dp = 1, where no int16 kernel runs but the chunks still divide)
inline int64_t i16_avx2_kc(int64_t dp) { return std::max<int64_t>(1, (dp / 2 + kI16Chunks - 1) / kI16Chunks); }
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// int16 micro-kernel: 6 query rows x 2 panels of int16 rows -> approximate scores (see micro_vnni)
using Micro16Fn = void (*)(const int32_t*, const int16_t*, const int16_t*, int64_t, const float*, const float*,
                           float*, const int32_t*, int64_t, int32_t*);

struct Params {
  const float* q;      // (m, dp) normalised queries
  const float* t;      // (n, dp) normalised database rows
  const float* tp;     // fp32 kernel: packed t (ceil(n / NR), dp, NR), zero rows past n
  const int32_t* qpk;  // int16 kernel: quantised q in blocks of MR rows (ceil(m / MR), dp / 2, MR): the k pairs
                       // of a block's rows interleaved, zero rows past m (see pack_blocks_i16)
  const int16_t* tpi;  // int16 kernel: packed t (even number of panels, dp / 2, NR, 2), zero rows past n
  const float* qu;     // int16 kernel: per-row dequantisation factors (q row i: x ~ z u_i), a = I u_i v_j
  const float* tu;     //   and per database row (padded with 1 to the packed panels)
  float* top_s;        // (m, k) heap scores
  int64_t* top_i;      // (m, k) heap indices (global)
  int64_t m, n, dp, k;
  int64_t row0, col0, self_offset;  // self_offset < 0: no self pairs
  int bins;
  double lo, hi, low, high;
  float scale_f, off_f, margin;  // float32 pre-binning: slot y = fma(a, scale_f, off_f); margin includes E
  float margin0;                 // the same margin for an exact score (float32 rounding only)
  float low_t, high_t;           // largest floats <= low / high: s > low_t  <=>  (double) s > low
  float low_up, low_dn, high_up, high_dn;  // a > low_up => s > low_t;  a <= low_dn => s <= low_t
  float e_cand;                  // a + e_cand >= (row's k-th best) for every pair that may enter the top-k
  const float* row_m;            // int16: per-pair histogram margin row_m[i] + col_m[j] (else nullptr: margin)
  const float* col_m;
  bool cls_in_hist;              // the thresholds fall between bins: class counts come from the histogram
  int bin_low, bin_high;         // then: s <= low <=> bin(s) <= bin_low; s <= high <=> bin(s) <= bin_high
  bool int16;                    // which kernel
  Micro16Fn micro16;             // int16: micro_vnni or micro_i16_avx2
  int choice;                    // topk_kernel_choice() at the call
  const char* kernel;            // its name, for the caller: "int16-vnni", "int16-avx2" or "fp32"
};

// ---- heap of the k best (root = worst) ---------------------------------------------------------

// worse(a, b): a ranks below b (lower score, or equal score and higher index).
inline bool worse(float as, int64_t ai, float bs, int64_t bi) { return as < bs || (as == bs && ai > bi); }

inline void heap_replace_root(float* hs, int64_t* hi, int64_t k, float s, int64_t i) {
  int64_t pos = 0;
  for (;;) {
    int64_t c = 2 * pos + 1;
    if (c >= k) break;
    if (c + 1 < k && worse(hs[c + 1], hi[c + 1], hs[c], hi[c])) ++c;
    if (!worse(hs[c], hi[c], s, i)) break;
    hs[pos] = hs[c];
    hi[pos] = hi[c];
    pos = c;
  }
  hs[pos] = s;
  hi[pos] = i;
}

struct Local {
  std::vector<int64_t> hist;
  // 8 int32 sub-histograms (one per lane of an 8-lane vector; the 16-lane fold uses lane mod 8) of stride
  // bins + 3, so that neighbouring scores falling in the same bin do not chain through store-to-load
  // forwarding. Slots 0 .. bins + 1 are the clamped
  // slots y (see above); slot bins + 2 is a dummy that absorbs the lanes counted elsewhere, so the vector
  // path scatters unconditionally.
  std::vector<int32_t> sub;
  int64_t in_sub = 0;  // increments since the last flush (bounds every int32 slot)
  int64_t total = 0, gt_low = 0, gt_high = 0;
  explicit Local(int bins) : hist(bins, 0), sub(8 * (static_cast<size_t>(bins) + 3), 0) {}
  void flush(int bins) {
    const int st = bins + 3;
    for (int y = 0; y <= bins + 1; ++y) {
      int64_t v = 0;
      for (int l = 0; l < 8; ++l) v += sub[l * st + y];
      hist[std::min(std::max(y - 1, 0), bins - 1)] += v;
    }
    std::fill(sub.begin(), sub.end(), 0);
    in_sub = 0;
  }
};

inline int exact_bin(float s, const Params& p) {
  const double x = std::floor((static_cast<double>(s) - p.lo) / (p.hi - p.lo) * p.bins);
  if (!(x >= 0)) return 0;
  if (x > p.bins - 1) return p.bins - 1;
  return static_cast<int>(x);
}

// The float32 slot of a score (floor of the clamped y, in fl_out), and whether it is more than `margin`
// from a slot edge (false for NaN). The scalar twin of the vector folds' slot test.
inline bool slot_ok(const Params& p, float a, float margin, float* fl_out) {
  const float y = std::min(std::max(std::fmaf(a, p.scale_f, p.off_f), 0.5f), p.bins + 1.5f);
  const float fl = std::floor(y);
  *fl_out = fl;
  return std::fabs(y - fl - 0.5f) <= 0.5f - margin;
}

// The same bin, through the float32 slot where that slot is provably right (all but ~0.06 % of scores).
inline int exact_bin_fast(float s, const Params& p) {
  float fl;
  if (slot_ok(p, s, p.margin0, &fl))
    return std::min(std::max(static_cast<int>(fl) - 1, 0), p.bins - 1);  // slot y = bin + 1, ends clamped
  return exact_bin(s, p);
}

// A pair that reaches the row's top-k threshold: offer it to the heap (exact total order, so the final
// set does not depend on the order of offers).
inline void offer(const Params& p, float s, int64_t gcol, float* hs, int64_t* hi) {
  if (worse(hs[0], hi[0], s, gcol)) heap_replace_root(hs, hi, p.k, s, gcol);
}

// Mark the excluded self pair and the padding columns of a 6 x 16 block NaN; returns how many of the
// first nrows rows' pairs are excluded.
inline int64_t mask_block(const Params& p, float* sc, int64_t r0, int64_t nrows, int64_t c0) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t valid_cols = std::min<int64_t>(NR, p.n - c0);
  int64_t excluded = (NR - valid_cols) * nrows;
  for (int r = 0; r < MR; ++r) {
    float* row = sc + r * NR;
    for (int64_t c = valid_cols; c < NR; ++c) row[c] = nan;
    if (p.self_offset >= 0 && r < nrows) {
      const int64_t sc_col = p.self_offset + p.row0 + r0 + r - p.col0 - c0;
      if (sc_col >= 0 && sc_col < valid_cols) {
        row[sc_col] = nan;
        excluded += 1;
      }
    }
  }
  return excluded;
}

// ---- the canonical score --------------------------------------------------------------------------

// Lanes -> score, the fixed tree of the header: v = L[0:8] + L[8:16], w = v[0:4] + v[4:8], u = w[0:2] + w[2:4].
inline float canon_tree(const float* L) {
  float v[8], w[4];
  for (int l = 0; l < 8; ++l) v[l] = L[l] + L[l + 8];
  for (int l = 0; l < 4; ++l) w[l] = v[l] + v[l + 4];
  return (w[0] + w[2]) + (w[1] + w[3]);
}

float canon_dot_scalar(const float* x, const float* y, int64_t dp) {
  float L[16] = {};
  for (int64_t k = 0; k < dp; ++k) L[k % 16] = std::fmaf(x[k], y[k], L[k % 16]);
  return canon_tree(L);
}

// Four pairs at once (independent chains for the out-of-order core).
void canon_dot4_scalar(const float* const* x, const float* const* y, int64_t dp, float* out) {
  for (int i = 0; i < 4; ++i) out[i] = canon_dot_scalar(x[i], y[i], dp);
}

#if DSF_X86
// lanes 0-7 in a, 8-15 in b
DSF_TARGET_AVX2 inline float canon_tree_avx2(__m256 a, __m256 b) {
  const __m256 v = _mm256_add_ps(a, b);                                                 // v[l], l < 8
  const __m128 w = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // v[l] + v[l + 4]
  const __m128 u = _mm_add_ps(w, _mm_movehl_ps(w, w));                                  // w[l] + w[l + 2]
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps(u, u, 1)));
}

DSF_TARGET_AVX2 void canon_dot4_avx2(const float* const* x, const float* const* y, int64_t dp, float* out) {
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
  int64_t k = 0;
  for (; k + 16 <= dp; k += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x[0] + k), _mm256_loadu_ps(y[0] + k), a0);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x[0] + k + 8), _mm256_loadu_ps(y[0] + k + 8), b0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x[1] + k), _mm256_loadu_ps(y[1] + k), a1);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x[1] + k + 8), _mm256_loadu_ps(y[1] + k + 8), b1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x[2] + k), _mm256_loadu_ps(y[2] + k), a2);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x[2] + k + 8), _mm256_loadu_ps(y[2] + k + 8), b2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x[3] + k), _mm256_loadu_ps(y[3] + k), a3);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x[3] + k + 8), _mm256_loadu_ps(y[3] + k + 8), b3);
  }
  if (k < dp) {
    // tail: fewer than 16 columns, through a zero-padded copy; lanes past dp keep their sums (blend): adding
    // 0 * 0 to a lane would turn a -0.0 sum (products that underflowed to -0) into +0.0, where the scalar
    // form, which never touches them, keeps -0.0
    alignas(32) float xt[4][16] = {}, yt[4][16] = {};
    for (int i = 0; i < 4; ++i) {
      std::memcpy(xt[i], x[i] + k, sizeof(float) * (dp - k));
      std::memcpy(yt[i], y[i] + k, sizeof(float) * (dp - k));
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int rest = static_cast<int>(dp - k);
    const __m256 lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rest), lane));
    const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(rest - 8), lane));
#define DSF_CANON_TAIL(i, a, b)                                                                              \
  a = _mm256_blendv_ps(a, _mm256_fmadd_ps(_mm256_load_ps(xt[i]), _mm256_load_ps(yt[i]), a), lo);            \
  b = _mm256_blendv_ps(b, _mm256_fmadd_ps(_mm256_load_ps(xt[i] + 8), _mm256_load_ps(yt[i] + 8), b), hi);
    DSF_CANON_TAIL(0, a0, b0)
    DSF_CANON_TAIL(1, a1, b1)
    DSF_CANON_TAIL(2, a2, b2)
    DSF_CANON_TAIL(3, a3, b3)
#undef DSF_CANON_TAIL
  }
  out[0] = canon_tree_avx2(a0, b0);
  out[1] = canon_tree_avx2(a1, b1);
  out[2] = canon_tree_avx2(a2, b2);
  out[3] = canon_tree_avx2(a3, b3);
}
#endif

#if DSF_X86
// AVX-512: the 16 lanes are one register.
DSF_TARGET_AVX512 void canon_dot4_avx512(const float* const* x, const float* const* y, int64_t dp, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 16 <= dp; k += 16) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x[0] + k), _mm512_loadu_ps(y[0] + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x[1] + k), _mm512_loadu_ps(y[1] + k), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x[2] + k), _mm512_loadu_ps(y[2] + k), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x[3] + k), _mm512_loadu_ps(y[3] + k), a3);
  }
  if (k < dp) {  // tail: masked FMAs (lanes past dp keep their sums, -0.0 included: see canon_dot4_avx2)
    const __mmask16 mk = static_cast<__mmask16>((1u << (dp - k)) - 1);
    a0 = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[0] + k), _mm512_maskz_loadu_ps(mk, y[0] + k), a0, mk);
    a1 = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[1] + k), _mm512_maskz_loadu_ps(mk, y[1] + k), a1, mk);
    a2 = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[2] + k), _mm512_maskz_loadu_ps(mk, y[2] + k), a2, mk);
    a3 = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(mk, x[3] + k), _mm512_maskz_loadu_ps(mk, y[3] + k), a3, mk);
  }
  alignas(64) float L[4][16];
  _mm512_store_ps(L[0], a0);
  _mm512_store_ps(L[1], a1);
  _mm512_store_ps(L[2], a2);
  _mm512_store_ps(L[3], a3);
  for (int i = 0; i < 4; ++i)  // lanes 0-7 and 8-15: the same tree as the AVX2 form
    out[i] = canon_tree_avx2(_mm256_load_ps(L[i]), _mm256_load_ps(L[i] + 8));
}
#endif

using Canon4Fn = void (*)(const float* const*, const float* const*, int64_t, float*);

// The canonical score of rows longer than one block (see the header): blocks of kCanonBlock columns, each
// scored by `core` (the 16-lane sum and tree), their sums added in float64, rounded once. Rows of at most
// one block go to `core` as they are.
constexpr int64_t kCanonBlock = 4096;

template <Canon4Fn core>
void canon_blocked(const float* const* x, const float* const* y, int64_t dp, float* out) {
  if (dp <= kCanonBlock) {
    core(x, y, dp, out);
    return;
  }
  double total[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t b = 0; b < dp; b += kCanonBlock) {
    const float* xs[4] = {x[0] + b, x[1] + b, x[2] + b, x[3] + b};
    const float* ys[4] = {y[0] + b, y[1] + b, y[2] + b, y[3] + b};
    float part[4];
    core(xs, ys, std::min(kCanonBlock, dp - b), part);
    for (int i = 0; i < 4; ++i) total[i] += static_cast<double>(part[i]);
  }
  for (int i = 0; i < 4; ++i) out[i] = static_cast<float>(total[i]);
}

// ---- approximate scores: fp32 micro-kernels ---------------------------------------------------------

// Apply the slot increments a fold handed over (see run_rows).
inline void apply_pending(const int32_t* pend, int64_t npend, int32_t* S) {
  for (int64_t j = 0; j < npend; ++j) S[pend[j]] += 1;
}

void micro_scalar(const float* const* a, const float* bp, int64_t dp, float* out, const int32_t* pend,
                  int64_t npend, int32_t* S) {
  apply_pending(pend, npend, S);
  float acc[MR][NR] = {};
  for (int64_t kk = 0; kk < dp; ++kk) {
    const float* b = bp + kk * NR;
    for (int r = 0; r < MR; ++r) {
      const float av = a[r][kk];
      for (int c = 0; c < NR; ++c) acc[r][c] = std::fmaf(av, b[c], acc[r][c]);
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

#if DSF_X86
// The six rows of one k step of every 6 x 16 (x 2) micro-kernel below: ROW(row pointer, its two
// accumulators), for the query rows a0..a5 and the accumulators c00..c51 each kernel declares.
#define DSF_SIX_ROWS(ROW) \
  ROW(a0, c00, c01) ROW(a1, c10, c11) ROW(a2, c20, c21) ROW(a3, c30, c31) ROW(a4, c40, c41) ROW(a5, c50, c51)

// One k step of the 6 x 16 micro-kernel: acc[r][c] = fma(a_r[kk], panel[kk][c], acc[r][c]).
// One row of it: broadcast a_r[kk], two FMAs.
#define DSF_F32_ROW(ar, x0, x1)         \
  av = _mm256_broadcast_ss(ar + kk);    \
  x0 = _mm256_fmadd_ps(av, b0, x0);     \
  x1 = _mm256_fmadd_ps(av, b1, x1);
#define DSF_MICRO_STEP_AVX2                             \
  {                                                     \
    const __m256 b0 = _mm256_load_ps(bp + kk * NR);     \
    const __m256 b1 = _mm256_load_ps(bp + kk * NR + 8); \
    __m256 av;                                          \
    DSF_SIX_ROWS(DSF_F32_ROW)                           \
  }

// The micro-kernel; the first min(npend, dp) k steps each also apply one pending histogram increment
// (the rest, if dp < npend, after the loop). The increments do not touch the accumulators.
DSF_TARGET_AVX2 void micro_avx2(const float* const* a, const float* bp, int64_t dp, float* out,
                                const int32_t* pend, int64_t npend, int32_t* S) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  const int64_t inter = std::min(npend, dp);
  int64_t kk = 0;
  for (; kk < inter; ++kk) {
    DSF_MICRO_STEP_AVX2
    S[pend[kk]] += 1;
  }
  for (; kk < dp; ++kk) DSF_MICRO_STEP_AVX2
  apply_pending(pend + inter, npend - inter, S);
  _mm256_store_ps(out + 0, c00);
  _mm256_store_ps(out + 8, c01);
  _mm256_store_ps(out + 16, c10);
  _mm256_store_ps(out + 24, c11);
  _mm256_store_ps(out + 32, c20);
  _mm256_store_ps(out + 40, c21);
  _mm256_store_ps(out + 48, c30);
  _mm256_store_ps(out + 56, c31);
  _mm256_store_ps(out + 64, c40);
  _mm256_store_ps(out + 72, c41);
  _mm256_store_ps(out + 80, c50);
  _mm256_store_ps(out + 88, c51);
}
#undef DSF_MICRO_STEP_AVX2
#undef DSF_F32_ROW

// ---- approximate scores: int16 micro-kernel (AVX-512 VNNI) -----------------------------------------
#define DSF_TARGET_VNNI __attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl,avx512bw,avx512vnni")))

// 6 query rows x 2 panels (32 database rows): out[0:96] = panel 0 (row-major 6 x 16), out[96:192] =
// panel 1, each a = fl(fl(sum of fl(I_c)) u_r) v_c with I_c the exact int32 dot product of the int16 rows over
// chunk c (KC k pairs), the chunks added in order in float32. a[r] are int16 rows (dp even); bp0/bp1 the
// packed panels (dp / 2, 16, 2). Pending histogram increments: two per k pair.
#pragma GCC diagnostic push  // (the AVX-512 headers' _mm512_undefined_* again: see fold_avx512)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
DSF_TARGET_VNNI void micro_vnni(const int32_t* ap, const int16_t* bp0, const int16_t* bp1, int64_t dp,
                                const float* ru, const float* cu, float* out, const int32_t* pend, int64_t npend,
                                int32_t* S) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m512 f00 = _mm512_setzero_ps(), f01 = f00, f10 = f00, f11 = f00, f20 = f00, f21 = f00;
  __m512 f30 = f00, f31 = f00, f40 = f00, f41 = f00, f50 = f00, f51 = f00;
  const int64_t steps = dp / 2;
  // the block's rows (k pair kk of row r at ap[kk * MR + r]): one base register for the six broadcasts
  const int32_t *a0 = ap, *a1 = ap + 1, *a2 = ap + 2, *a3 = ap + 3, *a4 = ap + 4, *a5 = ap + 5;
  int64_t j = 0;
  // One row of one k step as one asm block: with the intrinsics GCC 12 copied every accumulator between
  // registers each step (vmovdqa64 x 12; ~25 % of the kernel's time).
#define DSF_VNNI_ROW(ar, x0, x1)                                           \
  {                                                                        \
    __m512i av;                                                            \
    asm("vpbroadcastd %[m], %[av]\n\t"                                     \
        "vpdpwssd %[b0], %[av], %[c0]\n\t"                                 \
        "vpdpwssd %[b1], %[av], %[c1]"                                     \
        : [c0] "+v"(x0), [c1] "+v"(x1), [av] "=&v"(av)                     \
        : [m] "m"(ar[kk * MR]), [b0] "v"(b0), [b1] "v"(b1));            \
  }
#define DSF_MICRO_STEP_VNNI                                     \
  {                                                             \
    const __m512i b0 = _mm512_load_si512(bp0 + kk * 2 * NR);    \
    const __m512i b1 = _mm512_load_si512(bp1 + kk * 2 * NR);    \
    DSF_SIX_ROWS(DSF_VNNI_ROW)                                  \
  }
  // one chunk of KC k pairs: exact int32 partial sums, then added to the float32 sums
#define DSF_FLUSH(f, c)                             \
  f = _mm512_add_ps(f, _mm512_cvtepi32_ps(c));      \
  c = _mm512_setzero_si512();
  // (one loop per chunk, the increments under a predictable branch: with a second loop for the steps
  // after them, GCC copied all 12 accumulators between registers every step)
  for (int64_t k0 = 0; k0 < steps; k0 += KC) {
    const int64_t k1 = std::min(steps, k0 + KC);
    for (int64_t kk = k0; kk < k1; ++kk) {
      DSF_MICRO_STEP_VNNI
      if (j + 1 < npend) {
        S[pend[j]] += 1;
        S[pend[j + 1]] += 1;
        j += 2;
      }
    }
    DSF_FLUSH(f00, c00) DSF_FLUSH(f01, c01) DSF_FLUSH(f10, c10) DSF_FLUSH(f11, c11)
    DSF_FLUSH(f20, c20) DSF_FLUSH(f21, c21) DSF_FLUSH(f30, c30) DSF_FLUSH(f31, c31)
    DSF_FLUSH(f40, c40) DSF_FLUSH(f41, c41) DSF_FLUSH(f50, c50) DSF_FLUSH(f51, c51)
  }
#undef DSF_FLUSH
#undef DSF_MICRO_STEP_VNNI
#undef DSF_VNNI_ROW
  apply_pending(pend + j, npend - j, S);
  const __m512 v0 = _mm512_loadu_ps(cu), v1 = _mm512_loadu_ps(cu + NR);
#define put(r, f0, f1)                                                                                \
  {                                                                                                   \
    const __m512 u = _mm512_set1_ps(ru[r]);                                                           \
    _mm512_storeu_ps(out + (r) * NR, _mm512_mul_ps(_mm512_mul_ps(f0, u), v0));                        \
    _mm512_storeu_ps(out + MR * NR + (r) * NR, _mm512_mul_ps(_mm512_mul_ps(f1, u), v1));              \
  }
  put(0, f00, f01);
  put(1, f10, f11);
  put(2, f20, f21);
  put(3, f30, f31);
  put(4, f40, f41);
  put(5, f50, f51);
#undef put
}
#pragma GCC diagnostic pop

// ---- approximate scores: int16 micro-kernel for AVX2 (vpmaddwd + vpaddd) ---------------------------
// The same integer dot products as micro_vnni (so the same a), for CPUs without VNNI: vpmaddwd multiplies
// 16 int16 pairs and adds each pair into an int32 (exact: |z| <= 32767, so a pair sum stays below 2^31),
// vpaddd accumulates. Each row of a k step is one asm block (vpbroadcastd, 2 x vpmaddwd, 2 x vpaddd). From
// the same intrinsics GCC 12 ordered the loop so that, run back to back without the interleaved histogram
// increments (as topk_kernel_rates runs it), it multiply-added at 56-57 G/s on one Zen 4 core against
// 92-95 G/s in this order (the fp32 kernel: 57-58 G/s); in whole calls, where most steps carry
// increments, both orders take the same time. The two panels run one after the other
// (6 x 16 each: 12 accumulators, two panel registers, a broadcast and a product fill the 16 registers).
// Unlike micro_vnni's 32-column chunks it keeps kI16Chunks = 4 int32 sums (a quarter of dp each): with no
// registers left for float32 sums, the earlier chunks' go through the stack. History, single thread at
// 3000 x 20000 x 256 (Zen 4, capped to AVX2): one sum over all of dp, 0.319-0.333 s; two sums,
// 0.308-0.318 s; with one scale for the call, four (or 32-/64-column) chunks measured no better than two,
// but with per-row scales (each row fills its own range) four cut the re-scored pairs from 3.5 % to 2.8 %
// of all and took 0.298-0.318 s against 0.309-0.326 s for two.
#pragma GCC diagnostic push  // (GCC 12 cannot see that chunk 0, which always runs, fills f0 below)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
DSF_TARGET_AVX2 void micro_i16_avx2(const int32_t* ap, const int16_t* bp0, const int16_t* bp1, int64_t dp,
                                    const float* ru, const float* cu, float* out, const int32_t* pend,
                                    int64_t npend, int32_t* S) {
  const int64_t steps = dp / 2, kc = i16_avx2_kc(dp);
  const int32_t *a0 = ap, *a1 = ap + 1, *a2 = ap + 2, *a3 = ap + 3, *a4 = ap + 4, *a5 = ap + 5;  // as micro_vnni
  int64_t j = 0;
  for (int h = 0; h < 2; ++h) {
    const int16_t* bp = h ? bp1 : bp0;
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256i c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    int64_t kk = 0;
#define DSF_I16_ROW(ar, x0, x1)                                       \
  asm("vpbroadcastd %[m], %[av]\n\t"                                 \
      "vpmaddwd %[b0], %[av], %[p0]\n\t"                             \
      "vpmaddwd %[b1], %[av], %[av]\n\t"                             \
      "vpaddd %[p0], %[c0], %[c0]\n\t"                               \
      "vpaddd %[av], %[c1], %[c1]"                                    \
      : [c0] "+x"(x0), [c1] "+x"(x1), [av] "=&x"(av), [p0] "=&x"(p0) \
      : [m] "m"(ar[kk * MR]), [b0] "x"(b0), [b1] "x"(b1));
#define DSF_MICRO_STEP_I16                                                                          \
  {                                                                                                 \
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + kk * 2 * NR));      \
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + kk * 2 * NR + 16)); \
    __m256i av, p0;                                                                                 \
    DSF_SIX_ROWS(DSF_I16_ROW)                                                                       \
  }
    // the chunks' sums in float32: chunk 0 stored, later ones but the last added (it stays in the registers)
    alignas(32) float f0[2 * MR * 8];
    for (int64_t k0 = 0; k0 < steps; k0 += kc) {
      const int64_t end = std::min(steps, k0 + kc);
      const int64_t e1 = std::min(end, kk + std::max<int64_t>(0, (npend - j) / 2));  // steps with two increments
      for (; kk < e1; ++kk, j += 2) {
        DSF_MICRO_STEP_I16
        S[pend[j]] += 1;
        S[pend[j + 1]] += 1;
      }
      for (; kk < end; ++kk) DSF_MICRO_STEP_I16
      if (k0 == 0) {
#define keep(off, c)                                  \
  _mm256_store_ps(f0 + (off), _mm256_cvtepi32_ps(c)); \
  c = _mm256_setzero_si256();
        keep(0, c00) keep(8, c01) keep(16, c10) keep(24, c11) keep(32, c20) keep(40, c21)
        keep(48, c30) keep(56, c31) keep(64, c40) keep(72, c41) keep(80, c50) keep(88, c51)
#undef keep
      } else if (end < steps) {
#define keep(off, c)                                                                                \
  _mm256_store_ps(f0 + (off), _mm256_add_ps(_mm256_load_ps(f0 + (off)), _mm256_cvtepi32_ps(c))); \
  c = _mm256_setzero_si256();
        keep(0, c00) keep(8, c01) keep(16, c10) keep(24, c11) keep(32, c20) keep(40, c21)
        keep(48, c30) keep(56, c31) keep(64, c40) keep(72, c41) keep(80, c50) keep(88, c51)
#undef keep
      }
    }
#undef DSF_MICRO_STEP_I16
#undef DSF_I16_ROW
#undef DSF_SIX_ROWS
    float* o = out + h * MR * NR;
    const __m256 v0 = _mm256_loadu_ps(cu + h * NR), v1 = _mm256_loadu_ps(cu + h * NR + 8);
#define put(r, c0, c1)                                                                                   \
  {                                                                                                      \
    const __m256 u = _mm256_broadcast_ss(ru + (r));                                                      \
    const __m256 s0 = _mm256_add_ps(_mm256_load_ps(f0 + 16 * (r)), _mm256_cvtepi32_ps(c0));              \
    const __m256 s1 = _mm256_add_ps(_mm256_load_ps(f0 + 16 * (r) + 8), _mm256_cvtepi32_ps(c1));          \
    _mm256_storeu_ps(o + 16 * (r), _mm256_mul_ps(_mm256_mul_ps(s0, u), v0));                             \
    _mm256_storeu_ps(o + 16 * (r) + 8, _mm256_mul_ps(_mm256_mul_ps(s1, u), v1));                         \
  }
    put(0, c00, c01);
    put(1, c10, c11);
    put(2, c20, c21);
    put(3, c30, c31);
    put(4, c40, c41);
    put(5, c50, c51);
#undef put
  }
  apply_pending(pend + j, npend - j, S);
}
#pragma GCC diagnostic pop
#endif

// ---- the fold: decide from the approximate scores, flag the rest ------------------------------------

// The pairs the fold could not decide: local row and column, approximate score, and what is undecided.
enum : int32_t { kNearEdge = 1, kLowUnsure = 2, kHighUnsure = 4, kCandidate = 8 };
constexpr int QCAP = 256;   // capacity: >= QDRAIN - 1 + LIST (one micro-kernel call's blocks)
constexpr int QDRAIN = 64;  // score the queue once it holds this many
static_assert(QCAP >= QDRAIN - 1 + LIST, "queue too small");
struct Queue {  // structure of arrays, 16 spare slots for the full-width stores of the vector folds
  alignas(64) int32_t row[QCAP + 16], col[QCAP + 16], what[QCAP + 16];
  alignas(64) float a[QCAP + 16];
  int n = 0;
};

inline void enqueue(Queue& q, int32_t row, int32_t col, float a, int32_t what) {
  q.row[q.n] = row;
  q.col[q.n] = col;
  q.a[q.n] = a;
  q.what[q.n] = what;
  ++q.n;
}

// Fetch the t row of a flagged pair while the queue fills (the fp32 kernel flags ~0.5 % of pairs, so the row
// is usually not in cache; the int16 kernels flag 3-5 %, and their rows mostly are).
inline void prefetch_row(const Params& p, int64_t col) {
#if DSF_X86
  const char* line = reinterpret_cast<const char*>(p.t + col * p.dp);
  for (int64_t off = 0; off < p.dp * 4; off += 64) _mm_prefetch(line + off, _MM_HINT_T0);
#else
  (void)p;
  (void)col;
#endif
}

// lane-compress permutations: perm[m] lists the set lanes of the 8-bit mask m first
struct CompressLut {
  alignas(32) int32_t perm[256][8];
  CompressLut() {
    for (int m = 0; m < 256; ++m) {
      int j = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) perm[m][j++] = l;
      for (; j < 8; ++j) perm[m][j] = 0;
    }
  }
};
const CompressLut kCompress;

// Fold one block (rows r0.., columns c0.. of this call): histogram slots to pend (returned: how many),
// class counts of the decided pairs, and the undecided pairs to the queue.
using FoldFn = int64_t (*)(const Params&, const float*, int64_t, int64_t, int64_t, Local&, int32_t*, Queue&);


int64_t fold_scalar(const Params& p, const float* sc, int64_t nrows, int64_t r0, int64_t c0, Local& lc,
                    int32_t* pend, Queue& queue) {
  for (int64_t r = 0; r < nrows; ++r) {
    const float thr = p.top_s[(r0 + r) * p.k];
    for (int c = 0; c < NR; ++c) {
      const int e = static_cast<int>(r * NR + c);
      const float a = sc[e];
      float fl;
      const bool ok = slot_ok(p, a, p.margin, &fl);  // false for NaN (excluded)
      pend[e] = ok ? static_cast<int32_t>(fl) : p.bins + 2;
      if (std::isnan(a)) continue;
      const bool cls = !p.cls_in_hist;
      lc.gt_low += cls && a > p.low_up;
      lc.gt_high += cls && a > p.high_up;
      const uint8_t what = (ok ? 0 : kNearEdge) | (cls && a > p.low_dn && !(a > p.low_up) ? kLowUnsure : 0) |
                           (cls && a > p.high_dn && !(a > p.high_up) ? kHighUnsure : 0) |
                           (a + p.e_cand >= thr ? kCandidate : 0);
      if (what) enqueue(queue, static_cast<int32_t>(r0 + r), static_cast<int32_t>(c0 + c), a, what);
    }
  }
  return nrows * NR;
}

#if DSF_X86
// The 8-lane fold: lane l of a vector counts into sub-histogram l (stride bins + 3).
template <bool CLS>  // CLS: count classes here (false: they come from the histogram, see cls_in_hist)
DSF_TARGET_AVX2 int64_t fold_avx2(const Params& p, const float* sc, int64_t nrows, int64_t r0, int64_t c0,
                                  Local& lc, int32_t* pend, Queue& queue) {
  const __m256i vlanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), four = _mm256_set1_epi32(4);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256 vscale = _mm256_set1_ps(p.scale_f), voff = _mm256_set1_ps(p.off_f);
  const __m256 vhalf = _mm256_set1_ps(0.5f), vchi = _mm256_set1_ps(p.bins + 1.5f);  // slots clamped to [0.5, chi]
  const __m256 vlim = _mm256_set1_ps(0.5f - p.margin);
  const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 vlu = _mm256_set1_ps(p.low_up), vld = _mm256_set1_ps(p.low_dn);
  const __m256 vhu = _mm256_set1_ps(p.high_up), vhd = _mm256_set1_ps(p.high_dn);
  const __m256 vec = _mm256_set1_ps(p.e_cand);
  const int st = p.bins + 3;
  const __m256i vdummy = _mm256_set1_epi32(p.bins + 2);
  const __m256i vlane = _mm256_setr_epi32(0, st, 2 * st, 3 * st, 4 * st, 5 * st, 6 * st, 7 * st);
  __m256i nlow = _mm256_setzero_si256(), nhigh = nlow;  // per-lane class counts (minus compare masks)
  for (int64_t r = 0; r < nrows; ++r) {
    const __m256 thr = _mm256_broadcast_ss(p.top_s + (r0 + r) * p.k);
    const __m256 vrm = _mm256_set1_ps(p.row_m ? p.row_m[r0 + r] : 0.0f);
    for (int h = 0; h < 2; ++h) {
      const int e0 = static_cast<int>(r * NR + 8 * h);
      const __m256 s = _mm256_load_ps(sc + e0);
      // max/min return their second operand when it is NaN: excluded lanes stay NaN and fail `ok`
      const __m256 y = _mm256_min_ps(vchi, _mm256_max_ps(vhalf, _mm256_fmadd_ps(s, vscale, voff)));
      const __m256 fl = _mm256_floor_ps(y);
      const __m256 dist = _mm256_and_ps(_mm256_sub_ps(_mm256_sub_ps(y, fl), vhalf), vabs);
      const __m256 lim = p.row_m ? _mm256_sub_ps(vhalf, _mm256_add_ps(vrm, _mm256_loadu_ps(p.col_m + c0 + 8 * h)))
                                 : vlim;
      const __m256 ok = _mm256_cmp_ps(dist, lim, _CMP_LE_OQ);
      __m256 ul = _mm256_setzero_ps(), uh = ul;
      if constexpr (CLS) {
        const __m256 lu = _mm256_cmp_ps(s, vlu, _CMP_GT_OQ), hu = _mm256_cmp_ps(s, vhu, _CMP_GT_OQ);
        nlow = _mm256_sub_epi32(nlow, _mm256_castps_si256(lu));
        nhigh = _mm256_sub_epi32(nhigh, _mm256_castps_si256(hu));
        ul = _mm256_andnot_ps(lu, _mm256_cmp_ps(s, vld, _CMP_GT_OQ));
        uh = _mm256_andnot_ps(hu, _mm256_cmp_ps(s, vhd, _CMP_GT_OQ));
      }
      const __m256 cand = _mm256_cmp_ps(_mm256_add_ps(s, vec), thr, _CMP_GE_OQ);
      const __m256i b = _mm256_add_epi32(
          _mm256_blendv_epi8(vdummy, _mm256_cvttps_epi32(fl), _mm256_castps_si256(ok)), vlane);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pend + e0), b);
      // undecided lanes (branch-free): near an edge (and not excluded), class unsure, or a candidate
      const __m256 nok = _mm256_andnot_ps(ok, _mm256_cmp_ps(s, s, _CMP_ORD_Q));
      const __m256i what = _mm256_or_si256(
          _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(nok), one), _mm256_and_si256(_mm256_castps_si256(ul), two)),
          _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(uh), four), _mm256_and_si256(_mm256_castps_si256(cand), eight)));
      const unsigned m = static_cast<unsigned>(
          _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(what, _mm256_setzero_si256()))));
      if (!p.int16) {  // fp32 kernel: flags are rare (this branch predicts well) and their t rows cold
        if (m == 0) continue;
        for (unsigned b = m; b; b &= b - 1) prefetch_row(p, c0 + 8 * h + __builtin_ctz(b));
      }
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.perm[m]));
      const int n0 = queue.n;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(queue.what + n0), _mm256_permutevar8x32_epi32(what, perm));
      _mm256_storeu_ps(queue.a + n0, _mm256_permutevar8x32_ps(s, perm));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(queue.col + n0),
                          _mm256_add_epi32(_mm256_permutevar8x32_epi32(vlanes, perm),
                                           _mm256_set1_epi32(static_cast<int32_t>(c0 + 8 * h))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(queue.row + n0), _mm256_set1_epi32(static_cast<int32_t>(r0 + r)));
      queue.n = n0 + __builtin_popcount(m);
    }
  }
  alignas(32) int32_t cntv[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(cntv), nlow);
  for (int l = 0; l < 8; ++l) lc.gt_low += cntv[l];
  _mm256_store_si256(reinterpret_cast<__m256i*>(cntv), nhigh);
  for (int l = 0; l < 8; ++l) lc.gt_high += cntv[l];
  return nrows * NR;
}
#endif

#if DSF_X86
// (GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*(), which -Wall reports as
// uninitialised; the value is never read.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// The 16-lane fold (AVX-512): one register per block row; lane l counts into sub-histogram l mod 8.
template <bool CLS>  // as fold_avx2
DSF_TARGET_AVX512 int64_t fold_avx512(const Params& p, const float* sc, int64_t nrows, int64_t r0, int64_t c0,
                                      Local& lc, int32_t* pend, Queue& queue) {
  const __m512 vscale = _mm512_set1_ps(p.scale_f), voff = _mm512_set1_ps(p.off_f);
  const __m512 vhalf = _mm512_set1_ps(0.5f), vchi = _mm512_set1_ps(p.bins + 1.5f);
  const __m512 vlim = _mm512_set1_ps(0.5f - p.margin);
  const __m512 vlu = _mm512_set1_ps(p.low_up), vld = _mm512_set1_ps(p.low_dn);
  const __m512 vhu = _mm512_set1_ps(p.high_up), vhd = _mm512_set1_ps(p.high_dn);
  const __m512 vec = _mm512_set1_ps(p.e_cand);
  const int st = p.bins + 3;
  const __m512i vlanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vlane = _mm512_mullo_epi32(_mm512_and_si512(vlanes, _mm512_set1_epi32(7)), _mm512_set1_epi32(st));
  const __m512i vdummy = _mm512_add_epi32(vlane, _mm512_set1_epi32(p.bins + 2));
  const __m512i vcols = _mm512_add_epi32(vlanes, _mm512_set1_epi32(static_cast<int32_t>(c0)));
  const __m512 col_m = p.row_m ? _mm512_loadu_ps(p.col_m + c0) : _mm512_setzero_ps();
  int64_t nlow = 0, nhigh = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    const int e0 = static_cast<int>(r * NR);
    const __m512 s = _mm512_loadu_ps(sc + e0);
    const __m512 thr = _mm512_set1_ps(p.top_s[(r0 + r) * p.k]);
    // max/min return their second operand when it is NaN: excluded lanes stay NaN and fail `ok`
    const __m512 y = _mm512_min_ps(vchi, _mm512_max_ps(vhalf, _mm512_fmadd_ps(s, vscale, voff)));
    const __m512 fl = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 dist = _mm512_abs_ps(_mm512_sub_ps(_mm512_sub_ps(y, fl), vhalf));
    const __m512 lim = p.row_m ? _mm512_sub_ps(vhalf, _mm512_add_ps(_mm512_set1_ps(p.row_m[r0 + r]), col_m)) : vlim;
    const __mmask16 ok = _mm512_cmp_ps_mask(dist, lim, _CMP_LE_OQ);
    __mmask16 ul = 0, uh = 0;
    if constexpr (CLS) {
      const __mmask16 lu = _mm512_cmp_ps_mask(s, vlu, _CMP_GT_OQ), hu = _mm512_cmp_ps_mask(s, vhu, _CMP_GT_OQ);
      nlow += __builtin_popcount(lu);
      nhigh += __builtin_popcount(hu);
      ul = static_cast<__mmask16>(_mm512_cmp_ps_mask(s, vld, _CMP_GT_OQ) & ~lu);
      uh = static_cast<__mmask16>(_mm512_cmp_ps_mask(s, vhd, _CMP_GT_OQ) & ~hu);
    }
    const __mmask16 cand = _mm512_cmp_ps_mask(_mm512_add_ps(s, vec), thr, _CMP_GE_OQ);
    const __mmask16 nok = static_cast<__mmask16>(~ok & _mm512_cmp_ps_mask(s, s, _CMP_ORD_Q));
    _mm512_storeu_si512(pend + e0, _mm512_mask_add_epi32(vdummy, ok, _mm512_cvttps_epi32(fl), vlane));
    const __mmask16 m = static_cast<__mmask16>(nok | ul | uh | cand);
    if (!p.int16) {  // fp32 kernel: flags are rare (this branch predicts well) and their t rows cold
      if (m == 0) continue;
      for (unsigned b = m; b; b &= b - 1) prefetch_row(p, c0 + __builtin_ctz(b));
    }
    const __m512i what = _mm512_or_si512(
        _mm512_or_si512(_mm512_maskz_mov_epi32(nok, _mm512_set1_epi32(kNearEdge)),
                        _mm512_maskz_mov_epi32(ul, _mm512_set1_epi32(kLowUnsure))),
        _mm512_or_si512(_mm512_maskz_mov_epi32(uh, _mm512_set1_epi32(kHighUnsure)),
                        _mm512_maskz_mov_epi32(cand, _mm512_set1_epi32(kCandidate))));
    const int n0 = queue.n;
    _mm512_storeu_si512(queue.what + n0, _mm512_maskz_compress_epi32(m, what));
    _mm512_storeu_ps(queue.a + n0, _mm512_maskz_compress_ps(m, s));
    _mm512_storeu_si512(queue.col + n0, _mm512_maskz_compress_epi32(m, vcols));
    _mm512_storeu_si512(queue.row + n0, _mm512_set1_epi32(static_cast<int32_t>(r0 + r)));
    queue.n = n0 + __builtin_popcount(m);
  }
  lc.gt_low += nlow;
  lc.gt_high += nhigh;
  return nrows * NR;
}
#pragma GCC diagnostic pop
#endif

// Score the queued pairs canonically (four at a time), then: exact bin, exact class, heap offer. One body,
// compiled twice: plain x86-64 for the scalar kernels, and for AVX2 (where std::floor of the slot test is
// one roundss instead of a conversion and its corrections).
__attribute__((always_inline)) inline void drain_body(const Params& p, Queue& q, Local& lc, Canon4Fn canon4) {
  const int n = q.n;
  for (int e = 0; e < n; e += 4) {
    const int g = std::min(4, n - e);
    const float* xs[4];
    const float* ys[4];
    for (int u = 0; u < 4; ++u) {
      const int i = e + std::min(u, g - 1);
      xs[u] = p.q + static_cast<int64_t>(q.row[i]) * p.dp;
      ys[u] = p.t + static_cast<int64_t>(q.col[i]) * p.dp;
    }
    float s4[4];
    canon4(xs, ys, p.dp, s4);
    for (int u = 0; u < g; ++u) {
      const int i = e + u;
      const float s = s4[u];
      const int32_t what = q.what[i];
      if (what & kNearEdge) lc.hist[exact_bin_fast(s, p)] += 1;
      if (what & kLowUnsure) lc.gt_low += s > p.low_t;
      if (what & kHighUnsure) lc.gt_high += s > p.high_t;
      float* hs = p.top_s + static_cast<int64_t>(q.row[i]) * p.k;
      if ((what & kCandidate) && q.a[i] + p.e_cand >= hs[0])
        offer(p, s, p.col0 + q.col[i], hs, p.top_i + static_cast<int64_t>(q.row[i]) * p.k);
    }
  }
  q.n = 0;
}

using DrainFn = void (*)(const Params&, Queue&, Local&, Canon4Fn);
void drain(const Params& p, Queue& q, Local& lc, Canon4Fn canon4) { drain_body(p, q, lc, canon4); }
#if DSF_X86
DSF_TARGET_AVX2 void drain_avx2(const Params& p, Queue& q, Local& lc, Canon4Fn canon4) {
  drain_body(p, q, lc, canon4);
}
#endif

// ---- driver: rows [rb, re) against all of t ------------------------------------------------------

using MicroFn = void (*)(const float* const*, const float*, int64_t, float*, const int32_t*, int64_t, int32_t*);

struct Kernels {
  MicroFn micro;
  FoldFn fold;
  Canon4Fn canon4;
  DrainFn drain;
};

void run_rows(const Params& p, int64_t rb, int64_t re, Local& lc, const Kernels& kf, const float* zero_row) {
  alignas(64) float sc[2 * MR * NR];
  alignas(64) int32_t pend[2 * MR * NR];  // histogram slots of the last folded blocks, not yet counted
  Queue queue;
  int64_t npend = 0;
  const int64_t panels = (p.n + NR - 1) / NR;
  const int step = p.int16 ? 2 : 1;
  const int64_t flush_at = (int64_t{1} << 30);
  int32_t* const S = lc.sub.data();
  for (int64_t tb = 0; tb < panels; tb += NC / NR) {          // tile of NC database rows
    interruption_point();  // (a chunk of rows against a whole tile of t can take seconds: Ctrl-C stops it)
    const int64_t te = std::min(panels, tb + NC / NR);
    for (int64_t r0 = rb; r0 < re; r0 += MR) {               // MR query rows
      const int64_t nrows = std::min<int64_t>(MR, re - r0);
      const float* a[MR];
      float ru[MR];
      for (int r = 0; r < MR; ++r) {
        a[r] = r < nrows ? p.q + (r0 + r) * p.dp : zero_row;
        ru[r] = r < nrows && p.qu ? p.qu[r0 + r] : 1.0f;
      }
      const int32_t* apk = p.qpk ? p.qpk + r0 / MR * (p.dp / 2) * MR : nullptr;  // int16: this block's rows
#if DSF_X86
      // int16: start fetching the next block's rows, float32 (its re-scores) and int16 (the micro-kernel):
      // each tile's pass streams every query row from L3 again
      if (p.int16 && r0 + 2 * MR <= re) {
        const char* nf = reinterpret_cast<const char*>(p.q + (r0 + MR) * p.dp);
        for (int64_t off = 0; off < MR * p.dp * 4; off += 64) _mm_prefetch(nf + off, _MM_HINT_T1);
        const char* ni = reinterpret_cast<const char*>(apk + (p.dp / 2) * MR);
        for (int64_t off = 0; off < MR * p.dp * 2; off += 64) _mm_prefetch(ni + off, _MM_HINT_T0);
      }
#endif
      for (int64_t pn = tb; pn < te; pn += step) {           // one or two panels of NR database rows
        if (p.int16)
          p.micro16(apk, p.tpi + pn * p.dp * NR, p.tpi + (pn + 1) * p.dp * NR, p.dp, ru, p.tu + pn * NR, sc, pend,
                    npend, S);
        else
          kf.micro(a, p.tp + pn * p.dp * NR, p.dp, sc, pend, npend, S);
        npend = 0;
        for (int h = 0; h < step; ++h) {
          const int64_t c0 = (pn + h) * NR;
          if (c0 >= p.n) break;
          float* blk = sc + h * MR * NR;
          lc.total += nrows * NR - mask_block(p, blk, r0, nrows, c0);
          lc.in_sub += nrows * NR;
          npend += kf.fold(p, blk, nrows, r0, c0, lc, pend + npend, queue);
        }
        if (queue.n >= QDRAIN) kf.drain(p, queue, lc, kf.canon4);
      }
      // (slots still pending are counted after a flush: at most 2 MR NR more than in_sub allows for)
      if (lc.in_sub > flush_at) lc.flush(p.bins);
    }
  }
  apply_pending(pend, npend, S);
  kf.drain(p, queue, lc, kf.canon4);
}

// ---- bindings --------------------------------------------------------------------------------------

void check_c2d(const py::array& a, const char* name, py::ssize_t rows, py::ssize_t cols, char kind, int itemsize) {
  if (a.ndim() != 2) throw py::value_error(std::string(name) + ": expected a 2-D array");
  if (a.dtype().kind() != kind || a.itemsize() != itemsize)
    throw py::value_error(std::string(name) + ": wrong dtype (expected " + (kind == 'f' ? "float32" : "int64") +
                          ")");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if ((rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols))
    throw py::value_error(std::string(name) + ": shape (" + std::to_string(a.shape(0)) + ", " +
                          std::to_string(a.shape(1)) + ") does not match (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + ")");
}

float largest_float_le(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = std::nextafter(f, kNegInf);
  return f;
}

float smallest_float_ge(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Pack t (n, dp) into panels (ceil(n / NR), dp, NR), zero rows past n.
std::vector<float> pack_panels(const float* t, int64_t n, int64_t dp, float** aligned) {
  const int64_t panels = (n + NR - 1) / NR;
  std::vector<float> buf(static_cast<size_t>(panels * dp * NR) + 16, 0.0f);
  float* base = buf.data();
  while (reinterpret_cast<uintptr_t>(base) % 64) ++base;
  parallel_for(panels, 4, [&](int64_t pb, int64_t pe) {
    for (int64_t pn = pb; pn < pe; ++pn) {
      float* dst = base + pn * dp * NR;
      const int64_t rows = std::min<int64_t>(NR, n - pn * NR);
      for (int64_t c = 0; c < rows; ++c) {
        const float* src = t + (pn * NR + c) * dp;
        for (int64_t kk = 0; kk < dp; ++kk) dst[kk * NR + c] = src[kk];
      }
    }
  });
  *aligned = base;
  return buf;
}

// gamma_n = n u / (1 - n u), u = 2^-24: the bound on the relative error of n float32 roundings in a chain. It
// holds only for n u < 1; from n = 2^24 on there is none (the formula turns infinite, then negative, which
// made the fp32 kernel of rows past 2^24 columns (whole volumes: 512 x 512 x 80) trust approximate scores
// that a sequential float32 chain of that length gets wrong by ~0.03, and skip every later top-k
// candidate): +inf then, so every pair the bound concerns is re-scored canonically.
inline double gamma_n(double n) {
  const double u = std::ldexp(1.0, -24);
  return n * u < 1.0 ? n * u / (1.0 - n * u) : std::numeric_limits<double>::infinity();
}

// The canonical score's relative error bound (times sum |q[k] t[k]| <= |q||t|): each block's 16-lane sum and
// tree, gamma(min(dp, block) / 16 + 4) of its own sum |q t| (summed over blocks: of the whole); then, for
// more than one block, the float64 sum of the block sums (gamma_53(blocks) of their magnitudes, which are
// within (1 + gamma) of the blocks' sum |q t|) and the final rounding to float32 (2^-24 of the total).
inline double canon_gamma(int64_t dp) {
  const double g = gamma_n(std::ceil(static_cast<double>(std::min(dp, kCanonBlock)) / 16.0) + 4);
  if (dp <= kCanonBlock) return g;
  const double blocks = std::ceil(static_cast<double>(dp) / static_cast<double>(kCanonBlock));
  const double g53 = blocks * std::ldexp(1.0, -53) / (1.0 - blocks * std::ldexp(1.0, -53));
  return g + (1.0 + g) * g53 + (1.0 + g) * (1.0 + g53) * std::ldexp(1.0, -24);
}

// gamma times a product of norms, 0 when the norms are (all-zero rows: no error, and no inf * 0 = NaN).
inline double error_bound(double gamma, double norms) { return norms > 0 ? gamma * norms : 0.0; }

// An int16 kernel's chunks (the spans of its int32 partial sums): columns [c * cw, min(dp, (c + 1) * cw)),
// cw = 2 KC for micro_vnni, 2 i16_avx2_kc(dp) (kI16Chunks chunks) for micro_i16_avx2.
inline int64_t n_chunks(int64_t dp, int64_t cw) { return (dp + cw - 1) / cw; }

struct RowStats {
  double norm = 0, maxabs = 0;  // largest row norm, largest |entry|
  std::vector<double> chunk;    // per chunk: largest squared norm of a row's part in it
};

RowStats row_stats(const float* x, int64_t rows, int64_t dp, int64_t cw) {
  std::mutex mu;
  RowStats all;
  const int64_t nch = n_chunks(dp, cw);
  all.chunk.assign(static_cast<size_t>(nch), 0.0);
  parallel_for(rows, 512, [&](int64_t rb, int64_t re) {
    RowStats st;
    st.chunk.assign(static_cast<size_t>(nch), 0.0);
    for (int64_t i = rb; i < re; ++i) {
      double s = 0;
      for (int64_t c = 0; c < nch; ++c) {
        double sc = 0;
        for (int64_t k = c * cw; k < std::min(dp, (c + 1) * cw); ++k) {
          const double v = x[i * dp + k];
          sc += v * v;
          st.maxabs = std::max(st.maxabs, std::fabs(v));
        }
        st.chunk[c] = std::max(st.chunk[c], sc);
        s += sc;
      }
      st.norm = std::max(st.norm, std::sqrt(s));
    }
    std::lock_guard<std::mutex> lk(mu);
    all.norm = std::max(all.norm, st.norm);
    all.maxabs = std::max(all.maxabs, st.maxabs);
    for (int64_t c = 0; c < nch; ++c) all.chunk[c] = std::max(all.chunk[c], st.chunk[c]);
  });
  all.norm *= 1 + 1e-12;  // sqrt and sum roundings
  return all;
}

// One row: z = round(x * S) into out; *rr_out = |x - z inv_s|^2 and *qq_out = |z|^2 (in double).
#if DSF_X86
DSF_TARGET_AVX2 void quantize_row_avx2(const float* x, int64_t dp, double S, double inv_s, int16_t* out,
                                       double* rr_out, double* qq_out) {
  const __m256d vs = _mm256_set1_pd(S), vinv = _mm256_set1_pd(inv_s);
  __m256d rr = _mm256_setzero_pd(), qq = rr;
  int64_t k = 0;
  for (; k + 4 <= dp; k += 4) {
    const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + k));
    const __m256d z = _mm256_round_pd(_mm256_mul_pd(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256d res = _mm256_fnmadd_pd(z, vinv, v);
    rr = _mm256_fmadd_pd(res, res, rr);
    qq = _mm256_fmadd_pd(z, z, qq);
    const __m128i zi = _mm256_cvtpd_epi32(z);  // |z| <= 32767: the saturating pack is exact
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi32(zi, zi));
  }
  alignas(32) double lr[4], lq[4];
  _mm256_store_pd(lr, rr);
  _mm256_store_pd(lq, qq);
  double r2 = (lr[0] + lr[1]) + (lr[2] + lr[3]), q2 = (lq[0] + lq[1]) + (lq[2] + lq[3]);
  for (; k < dp; ++k) {
    const double v = x[k];
    const double z = std::nearbyint(v * S);
    const double res = v - z * inv_s;
    r2 += res * res;
    q2 += z * z;
    out[k] = static_cast<int16_t>(z);
  }
  *rr_out = r2;
  *qq_out = q2;
}

#endif

struct Quantised {
  double res = 0, norm = 0;   // largest row residual norm |x_i - z_i u_i| and largest |z_i| u_i (rounded up)
  std::vector<int64_t> chunk;  // per chunk: largest squared |z| of a row's part in it (exact)
  bool ok = true;              // every u_i a float32 in [2^-100, 2^100] (the rounding bounds assume normal floats)
};

// Quantise each row of x (rows, dp) to int16 with its own scale: z_i = round(x_i / u_i) into dst, u_i (a float32,
// in u_out) the smallest that keeps |z_i| <= 32767 entrywise and the norm of every chunk of z_i at most about
// K (K^2 < 2^31, so no chunk's int32 partial sum against any other row can overflow; checked exactly by the
// caller from `chunk`, as rounding can lengthen a chunk by up to sqrt(cw) / 2). A row's own scale, rather than
// one for the call, lets every row fill that range: at d = 256 on random unit rows the residuals, and with
// them E and the pairs re-scored, are ~1.13x (two chunks), ~1.2x (four) to ~1.35x (32-column chunks) smaller.
// row_res[i]: the row's residual norm, rounded up. Only the int16 kernels use it, so it is written for AVX2,
// which every CPU with an int16 kernel has (any rounding of x / u would do: the bound uses the residuals made).
Quantised quantize(const float* x, int64_t rows, int64_t dp, int64_t cw, double K, int16_t* dst, float* row_res,
                   float* u_out) {
  std::mutex mu;
  double rmax = 0, qmax = 0;
  const int64_t nch = n_chunks(dp, cw);
  Quantised out;
  out.chunk.assign(static_cast<size_t>(nch), 0);
  parallel_for(rows, 512, [&](int64_t rb, int64_t re) {
    double rl = 0, ql = 0;
    bool ok = true;
    std::vector<int64_t> ch(static_cast<size_t>(nch), 0);
    for (int64_t i = rb; i < re; ++i) {
      const float* xi = x + i * dp;
      double maxabs = 0, hmax = 0;
      for (int64_t c = 0; c < nch; ++c) {
        double sc = 0;
        for (int64_t k = c * cw; k < std::min(dp, (c + 1) * cw); ++k) {
          const double v = xi[k];
          sc += v * v;
          maxabs = std::max(maxabs, std::fabs(v));
        }
        hmax = std::max(hmax, sc);
      }
      hmax = std::sqrt(hmax) * (1 + 1e-12);
      float u = 1.0f;
      if (maxabs > 0) {
        const double S = std::min(32766.5 / maxabs, K / hmax);
        u = static_cast<float>(1.0 / S);
        if (static_cast<double>(u) < 1.0 / S) u = std::nextafter(u, kInf);  // 1 / u <= S
        ok = ok && u >= 0x1p-100f && u <= 0x1p100f;
      }
      u_out[i] = u;
      double rr = 0, qq = 0;
#if DSF_X86
      quantize_row_avx2(xi, dp, 1.0 / static_cast<double>(u), static_cast<double>(u), dst + i * dp, &rr, &qq);
#endif
      rl = std::max(rl, std::sqrt(rr));
      ql = std::max(ql, std::sqrt(qq) * static_cast<double>(u));
      if (row_res) row_res[i] = static_cast<float>(std::sqrt(rr) * (1 + 1e-6));
      const int16_t* z = dst + i * dp;
      for (int64_t c = 0; c < nch; ++c) {
        int64_t sc = 0;
        for (int64_t k = c * cw; k < std::min(dp, (c + 1) * cw); ++k) sc += int64_t{z[k]} * z[k];
        ch[c] = std::max(ch[c], sc);
      }
    }
    std::lock_guard<std::mutex> lk(mu);
    rmax = std::max(rmax, rl);
    qmax = std::max(qmax, ql);
    out.ok = out.ok && ok;
    for (int64_t c = 0; c < nch; ++c) out.chunk[c] = std::max(out.chunk[c], ch[c]);
  });
  out.res = rmax * (1 + 1e-9) + 1e-300;
  out.norm = qmax * (1 + 1e-12);
  return out;
}

// int16 rows (n, dp) -> panels (even count, dp / 2, NR, 2): each k pair of a row is one int32.
void pack_panels_i16(const int16_t* src, int64_t n, int64_t dp, int16_t* dst) {
  const int64_t panels = (n + NR - 1) / NR;
  parallel_for(panels, 4, [&](int64_t pb, int64_t pe) {
    for (int64_t pn = pb; pn < pe; ++pn) {
      const int64_t rows = std::min<int64_t>(NR, n - pn * NR);
      for (int64_t c = 0; c < rows; ++c) {
        const int16_t* row = src + (pn * NR + c) * dp;
        int16_t* d = dst + pn * dp * NR + 2 * c;
        for (int64_t kk = 0; kk < dp / 2; ++kk) std::memcpy(d + kk * 2 * NR, row + 2 * kk, 2 * sizeof(int16_t));
      }
    }
  });
}

// int16 query rows (m, dp) -> blocks of MR rows (ceil(m / MR), dp / 2, MR) in dst: k pair kk of row r of a
// block at [kk * MR + r], so the micro-kernels broadcast a block's six rows from one base register (with six
// row pointers, the AVX2 kernel spent a register reload and six pointer increments per k step); zero rows
// past m. run_rows' blocks start at multiples of MR (the worker chunks are whole MR groups).
void pack_blocks_i16(const int16_t* src, int64_t m, int64_t dp, std::vector<int32_t>& dst) {
  const int64_t blocks = (m + MR - 1) / MR, steps = dp / 2;
  dst.assign(static_cast<size_t>(blocks * steps * MR), 0);
  int32_t* out = dst.data();
  parallel_for(blocks, 64, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b)
      for (int64_t r = 0; r < MR && b * MR + r < m; ++r) {
        const int16_t* row = src + (b * MR + r) * dp;
        int32_t* d = out + b * steps * MR + r;
        for (int64_t kk = 0; kk < steps; ++kk) std::memcpy(d + kk * MR, row + 2 * kk, sizeof(int32_t));
      }
  });
}

bool cpu_has_vnni() {
#if DSF_X86
  static const bool v = __builtin_cpu_supports("avx512vnni");
  return v;
#else
  return false;
#endif
}

// The micro-kernels' timing (time_micro_kernels): rows of this many columns, 2 x MR x NR x kTimedDp
// multiply-adds a call.
constexpr int64_t kTimedDp = 256;

#if DSF_X86
// Seconds for `iters` calls of each approximate-score micro-kernel on one core, panels in L1 (kTimedDp
// columns): t[0] fp32, t[1] int16 AVX2, t[2] VNNI (where `vnni`; else left alone), the best of `reps` runs,
// the kernels interleaved (a busy neighbour slows all alike). Needs AVX2.
constexpr int kWarmReps = 6;
void time_micro_kernels(int iters, int reps, bool vnni, double t[3]) {
  constexpr int64_t dp = kTimedDp;
  // (every operand 64-byte aligned, as the engine's panels and blocks are)
  std::vector<float> fa(static_cast<size_t>(MR * dp) + 16, 0.01f), fp(static_cast<size_t>(2 * dp * NR) + 16, 0.02f);
  std::vector<int16_t> ia(static_cast<size_t>(MR * dp), 3), ip(static_cast<size_t>(2 * dp * NR) + 32, 5);
  std::vector<int32_t> packed;  // the six int16 rows as one block (see pack_blocks_i16)
  pack_blocks_i16(ia.data(), MR, dp, packed);
  std::vector<int32_t> ir_buf(packed.size() + 16);
  int32_t* ir = ir_buf.data();
  while (reinterpret_cast<uintptr_t>(ir) % 64) ++ir;
  std::copy(packed.begin(), packed.end(), ir);
  float* fpa = fp.data();
  while (reinterpret_cast<uintptr_t>(fpa) % 64) ++fpa;
  int16_t* ipa = ip.data();
  while (reinterpret_cast<uintptr_t>(ipa) % 64) ++ipa;
  float* fa0 = fa.data();
  while (reinterpret_cast<uintptr_t>(fa0) % 64) ++fa0;
  const float* fr[MR];
  for (int r = 0; r < MR; ++r) fr[r] = fa0 + r * dp;
  alignas(64) float sc[2 * MR * NR];
  alignas(64) float ones[2 * NR];
  std::fill(ones, ones + 2 * NR, 1.0f);
  int32_t S[1] = {};
  using clk = std::chrono::steady_clock;
  const IeeeFloats ieee;
  t[0] = t[1] = 1e30;
  if (vnni) t[2] = 1e30;
  // (the first kWarmReps rounds are not timed: a process's first timing of the fp32 kernel ran ~15 % slow on a
  // Zen 3, so its first measured int16 speed-up read 1.4-1.9 where later calls in the same process read a
  // steady 1.3 or 1.48, the VM's slow or fast phase)
  for (int rep = -kWarmReps; rep < reps; ++rep) {
    const auto t0 = clk::now();
    for (int i = 0; i < iters; ++i) {
      micro_avx2(fr, fpa, dp, sc, nullptr, 0, S);
      micro_avx2(fr, fpa + dp * NR, dp, sc + MR * NR, nullptr, 0, S);
    }
    const auto t1 = clk::now();
    for (int i = 0; i < iters; ++i) micro_i16_avx2(ir, ipa, ipa + dp * NR, dp, ones, ones, sc, nullptr, 0, S);
    const auto t2 = clk::now();
    if (vnni)
      for (int i = 0; i < iters; ++i) micro_vnni(ir, ipa, ipa + dp * NR, dp, ones, ones, sc, nullptr, 0, S);
    const auto t3 = clk::now();
    if (rep < 0) continue;
    t[0] = std::min(t[0], std::chrono::duration<double>(t1 - t0).count());
    t[1] = std::min(t[1], std::chrono::duration<double>(t2 - t1).count());
    if (vnni) t[2] = std::min(t[2], std::chrono::duration<double>(t3 - t2).count());
  }
}
#endif

// Multiply-add rate of each approximate-score micro-kernel on one core, panels in L1 (time_micro_kernels):
// the arithmetic floor of a GEMM, for the benchmarks. Kernels this CPU lacks are left out.
py::dict topk_kernel_rates(int iters, int reps) {
  if (iters < 1 || reps < 1) throw py::value_error("topk_kernel_rates: iters and reps must be >= 1");
  py::dict out;
#if DSF_X86
  if (detected_simd() < Simd::AVX2) return out;
  const bool vnni = detected_simd() >= Simd::AVX512 && cpu_has_vnni();
  double t[3] = {1e30, 1e30, 1e30};
  {
    py::gil_scoped_release nogil;
    time_micro_kernels(iters, reps, vnni, t);
  }
  const double macs = 2.0 * MR * NR * kTimedDp * iters;
  out["fp32"] = macs / t[0];
  out["int16-avx2"] = macs / t[1];
  if (vnni) out["int16-vnni"] = macs / t[2];
#else
  (void)iters;
  (void)reps;
#endif
  return out;
}

// How many times faster the int16 AVX2 micro-kernel multiply-adds than the fp32 one on this CPU, measured
// once per process (5-10 ms, at the first call that could use it): ~1.6 on Zen 4, where the cost model was
// fitted, ~1.45 on Zen 3, ~1.0 on Zen 1, whose 256-bit vpmaddwd is two 128-bit halves on one pipe (and on
// Haswell, one port). set_topk_int16_speedup overrides it (tests; 0 measures again).
std::atomic<double> g_i16_speedup{0.0};

double i16_avx2_speedup() {
  const double v = g_i16_speedup.load();
  if (v > 0) return v;
  double measured = 1.0;  // (no AVX2: no int16 AVX2 kernel to weigh, and none to time)
#if DSF_X86
  if (detected_simd() >= Simd::AVX2) {
    double t[3];
    time_micro_kernels(150, 7, false, t);
    measured = t[1] > 0 ? t[0] / t[1] : 1.0;
  }
#endif
  double expected = 0.0;  // (another thread may have measured meanwhile: either value will do)
  g_i16_speedup.compare_exchange_strong(expected, measured);
  return g_i16_speedup.load();
}

struct Buffers {
  std::vector<float> packed;
  std::vector<int16_t> tpi;
  std::vector<int32_t> qpk;
  std::vector<float> qu, tu;
  std::vector<float> row_m, col_m;
};

// Approximate-kernel choice: 0 = by estimated cost, 1 = fp32, 2 = int16 wherever the SIMD level has one
// (AVX2 and up) and the scale admits it. Results never depend on it; speed does. set_topk_kernel sets it;
// -1 (unset) defers to DEEPSSIM_FAST_TOPK_KERNEL, else 0.
std::atomic<int> g_topk_kernel{-1};
constexpr const char* kTopkEnv = "DEEPSSIM_FAST_TOPK_KERNEL";

int parse_topk_kernel(const std::string& name) {
  return name == "auto" ? 0 : name == "fp32" ? 1 : name == "int16" ? 2 : -1;
}

// The choice in force (called with the GIL held: a bad environment value is a ValueError naming it).
int topk_kernel_choice() {
  const int v = g_topk_kernel.load();
  if (v >= 0) return v;
  const char* e = std::getenv(kTopkEnv);
  if (!e || !*e) return 0;
  std::string name(e);  // (any case, as DEEPSSIM_FAST_SIMD)
  for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const int c = parse_topk_kernel(name);
  if (c < 0)
    throw py::value_error(std::string(kTopkEnv) + "='" + e + "': expected 'auto', 'fp32' or 'int16'");
  return c;
}

// The kernel choice's cost model, per pair, in units of one pair of the fp32 path at coarse bins: GEMM and
// fold of the int16 kernels, and one re-scored pair (a fraction 2 E scale of the pairs lie within E of a
// bin edge). Fitted to single-thread runs of 3000 x 20000 x 256 on Zen 4 at 200 to 2000 bins
// (VNNI 0.255 / 0.314 / 0.399 / 0.556 s, AVX2 int16 0.32 / 0.42 / 0.58 / 0.84 s, fp32 0.35 / 0.37 / 0.41 /
// 0.47 s): measured, the int16 kernels win below ~1000 bins (VNNI) and ~350 bins (AVX2) on [-1, 1]; the
// model switches to fp32 at ~800 and ~300.
// kCostI16Avx2 is scaled by the int16 AVX2 kernel's speed-up on the CPU at hand against Zen 4's (1.61: the fp32
// and int16 floors at 20000^2 x 256 were 0.871 and 0.541 s), measured (i16_avx2_speedup).
// Only a speed-up under kI16Edge (no edge: Zen 1 measures 0.95-1.05, where the fp32 kernel ran 14 % faster in
// the 20000^2 bench) scales that cost; from it up the kernel is taken at (at least) the fitted rate. On a Zen 3
// the measure, ~5 ms at the call's start, reads the VM's phase of the moment: 1.48 in its fast phase, 1.22-1.33
// in its slow one, within seconds; scaled by it, the choice fell on fp32 in 2 of 3 bench processes, each time
// slower than the int16 kernel over the whole 2-s call (2.10 and 2.54 s against 2.00 and 2.04 s).
constexpr double kCostVnni = 0.67, kCostI16Avx2 = 0.74, kCostRescore = 4.4, kI16FitSpeedup = 1.61, kI16Edge = 1.15;

// The int16 AVX2 kernel's speed-up over fp32 as the cost model weighs it (see kI16Edge).
double i16_avx2_weighed_speedup() {
  const double s = i16_avx2_speedup();
  return s < kI16Edge ? s : std::max(s, kI16FitSpeedup);
}

// Choose the kernel for this call, build its inputs, and set E and everything derived from it.
void prepare(Params& p, Simd level, Buffers& buf) {
  const int choice = p.choice;
  const bool vnni = level >= Simd::AVX512 && cpu_has_vnni();
  const int64_t cw = vnni ? 2 * KC : 2 * i16_avx2_kc(p.dp);  // the int16 kernel's chunk width (see n_chunks)
  const RowStats sq = row_stats(p.q, p.m, p.dp, cw), st = row_stats(p.t, p.n, p.dp, cw);
  const double scale = p.bins / (p.hi - p.lo);
  const double e_canon = error_bound(canon_gamma(p.dp), sq.norm * st.norm);
  const double e_fp32 = error_bound(gamma_n(static_cast<double>(p.dp)), sq.norm * st.norm) + e_canon;
  double e = e_fp32;
  p.int16 = false;
  p.kernel = "fp32";
  // int16: up to twice the multiply-add rate, but ~10x the bound, so more pairs near an edge take the exact
  // path (each ~4x a pair of the fp32 path): worth it while 2 E scale stays small (see kCostRescore).
  // |y - (x + 1)| <= |s| |scale - scale_f| + |off - off_f| + ulp(y) / 2: a few float32 ulps of
  // (bins + 2 + |lo| scale) for every slot that is not clamped (the margin of an exact score)
  const double base = 8.0 * 1.1920929e-7 * (p.bins + 2 + std::fabs(p.lo) * scale) + 1e-7;
  const double maxabs = std::max(sq.maxabs, st.maxabs), nmax = std::max(sq.norm, st.norm);
  if (DSF_X86 && level >= Simd::AVX2 && choice != 1 && p.dp % 2 == 0 && maxabs > 0 && nmax > 0) {
    // Per-row scales (see quantize): every int16 entry |z| <= 32767, and every chunk's int32 partial sum
    // below 2^31 in magnitude (Cauchy-Schwarz on the chunk: |partial| <= |zq_c| |zt_c| <= K^2 (1 + 1 %);
    // checked exactly below; a failed check retries with a smaller K)
    const int64_t nch = n_chunks(p.dp, cw);
    double K = 46340.0 * 0.995;  // the 0.5 %: room for the rounding
    for (int attempt = 0; attempt < 8; ++attempt, K *= 0.97) {
      const int64_t panels = ((p.n + NR - 1) / NR + 1) / 2 * 2;
      buf.tpi.assign(static_cast<size_t>(panels * p.dp * NR) + 32, 0);
      int16_t* tpi = buf.tpi.data();
      while (reinterpret_cast<uintptr_t>(tpi) % 64) ++tpi;
      std::vector<float> row_res(static_cast<size_t>(p.m)), col_res(static_cast<size_t>(panels * NR), 0.0f);
      buf.qu.assign(static_cast<size_t>(p.m), 1.0f);
      buf.tu.assign(static_cast<size_t>(panels * NR), 1.0f);  // padding columns: 1 (their scores are masked)
      std::vector<int16_t> qi(static_cast<size_t>(p.m * p.dp));
      const auto rq = quantize(p.q, p.m, p.dp, cw, K, qi.data(), row_res.data(), buf.qu.data());
      pack_blocks_i16(qi.data(), p.m, p.dp, buf.qpk);
      std::vector<int16_t> ti(static_cast<size_t>(p.n * p.dp));
      const auto rt = quantize(p.t, p.n, p.dp, cw, K, ti.data(), col_res.data(), buf.tu.data());
      pack_panels_i16(ti.data(), p.n, p.dp, tpi);
      if (!rq.ok || !rt.ok) break;  // scales out of range: fp32 kernel
      bool fits = true;  // no chunk's int32 partial sum can overflow
      for (int64_t c = 0; c < nch; ++c)
        fits = fits && static_cast<double>(rq.chunk[c]) * static_cast<double>(rt.chunk[c]) < 4.611686e18;
      if (!fits) continue;
      const double qn = rq.norm, tn = rt.norm;  // largest |z_i| u_i, |z_j| v_j
      // a = fl(fl(fl(sum of the chunks' fl(I_c), in order) u_i) v_j): nch + 2 roundings, each relative to
      // at most u_i v_j sum |I_c| <= |z_i| u_i |z_j| v_j (Cauchy-Schwarz over chunks)
      const double e_round = error_bound(gamma_n(static_cast<double>(nch) + 3), 1.01 * qn * tn);
      const double e_int16 = rq.res * st.norm + qn * rt.res + e_round + e_canon;
      const double k16 =
          vnni ? kCostVnni : choice == 2 ? kCostI16Avx2 : kCostI16Avx2 * kI16FitSpeedup / i16_avx2_weighed_speedup();
      const double c16 = k16 + kCostRescore * 2 * e_int16 * scale;
      if (choice == 2 || c16 < 1 + kCostRescore * 2 * e_fp32 * scale) {
        p.int16 = true;
#if DSF_X86
        p.micro16 = vnni ? &micro_vnni : &micro_i16_avx2;
#endif
        p.kernel = vnni ? "int16-vnni" : "int16-avx2";
        p.qpk = buf.qpk.data();
        p.tpi = tpi;
        p.qu = buf.qu.data();
        p.tu = buf.tu.data();
        e = e_int16;
        // per pair, the histogram needs only |rx_i| |y| + |zx_i u_i| |ry_j| (the maxima above are the worst
        // row and the worst column): margin_ij = row_m[i] + col_m[j], in slot units
        const double rest = e_round + e_canon;
        buf.row_m.resize(row_res.size());
        buf.col_m.resize(col_res.size());
        for (size_t i = 0; i < buf.row_m.size(); ++i)
          buf.row_m[i] = static_cast<float>((base + (row_res[i] * st.norm + rest) * scale * (1 + 1e-6)) * (1 + 1e-6));
        for (size_t j = 0; j < buf.col_m.size(); ++j)
          buf.col_m[j] = static_cast<float>(qn * col_res[j] * scale * (1 + 1e-6) * (1 + 1e-6));
        p.row_m = buf.row_m.data();
        p.col_m = buf.col_m.data();
      }
      break;
    }
    if (!p.int16) {
      buf.qpk.clear();
      buf.tpi.clear();
      buf.qu.clear();
      buf.tu.clear();
    }
  }
  if (!p.int16) {
    float* tp = nullptr;
    buf.packed = pack_panels(p.t, p.n, p.dp, &tp);
    p.tp = tp;
  }
  e = e * (1 + 1e-6) + 1e-12;
  p.margin0 = static_cast<float>(base);
  p.margin = static_cast<float>(base + e * scale * (1 + 1e-6));  // plus |a - s| scale <= E scale
  p.low_up = smallest_float_ge(static_cast<double>(p.low_t) + e);
  p.low_dn = largest_float_le(static_cast<double>(p.low_t) - e);
  p.high_up = smallest_float_ge(static_cast<double>(p.high_t) + e);
  p.high_dn = largest_float_le(static_cast<double>(p.high_t) - e);
  p.e_cand = smallest_float_ge(e + 2.4e-7);  // + half an ulp of a + e_cand (< 2)
}

Kernels kernels(Simd level, bool cls) {
  Kernels kf{&micro_scalar, &fold_scalar, &canon_blocked<canon_dot4_scalar>, &drain};
#if DSF_X86
  if (level >= Simd::AVX2) kf = Kernels{&micro_avx2, cls ? &fold_avx2<true> : &fold_avx2<false>,
                                        &canon_blocked<canon_dot4_avx2>, &drain_avx2};
  if (level >= Simd::AVX512) {
    kf.fold = cls ? &fold_avx512<true> : &fold_avx512<false>;
    kf.canon4 = &canon_blocked<canon_dot4_avx512>;
  }
#endif
  return kf;
}

void run(Params& p, int threads, int64_t* H, int64_t* C) {
  const Simd level = active_simd();
  Buffers buf;
  prepare(p, level, buf);
  const Kernels kf = kernels(level, !p.cls_in_hist);
  const std::vector<float> zero_row(static_cast<size_t>(p.dp) + 16, 0.0f);
  std::mutex mu;
  const int nt = threads > 0 ? std::min(threads, num_threads()) : num_threads();
  // chunks of whole MR groups, several per thread so the dynamic schedule balances the load; up to
  // kMaxGrainRows rows: each chunk streams all of t, so larger chunks read t (the int16 panels, and the fp32
  // rows the flagged pairs re-score) fewer times. At 96 rows that traffic cost ~0.1 s of the 20000^2 x 256
  // problem. Raising the cap from 384 rows to 2562 made whole calls 2.5-4 % faster, alternated in one process
  // on 2 Zen 4 cores: 20000^2 AVX2 int16 0.985 s against 1.010 s, VNNI 0.777-0.790 s against 0.806-0.815 s;
  // 60000 x 20000 VNNI 2.375-2.397 s against 2.47-2.56 s. With no cap (7500-row chunks there) VNNI took
  // 2.46-2.54 s.
  int64_t grain = ((p.m + 4 * nt - 1) / (4 * nt) + MR - 1) / MR * MR;
  grain = std::max<int64_t>(MR, std::min<int64_t>(grain, kMaxGrainRows));
  parallel_for(
      p.m, grain,
      [&](int64_t rb, int64_t re) {
        Local lc(p.bins);
        run_rows(p, rb, re, lc, kf, zero_row.data());
        lc.flush(p.bins);
        if (p.cls_in_hist) {  // every counted pair is in one bin, and the bins separate the classes
          lc.gt_low = lc.gt_high = 0;
          for (int b = p.bin_low + 1; b < p.bins; ++b) lc.gt_low += lc.hist[b];
          for (int b = p.bin_high + 1; b < p.bins; ++b) lc.gt_high += lc.hist[b];
        }
        std::lock_guard<std::mutex> lk(mu);
        for (int b = 0; b < p.bins; ++b) H[b] += lc.hist[b];
        C[2] += lc.gt_high;
        C[1] += lc.gt_low - lc.gt_high;
        C[0] += lc.total - lc.gt_low;
      },
      nt);
}

std::string topk_fused(py::array q, py::array t, int64_t row0, int64_t col0, int64_t self_offset, py::array top_s,
                       py::array top_i, py::array hist, py::array classes, double lo, double hi, double low,
                       double high, int threads) {
  check_c2d(q, "q", -1, -1, 'f', 4);
  const py::ssize_t m = q.shape(0), dp = q.shape(1);
  check_c2d(t, "t", -1, dp, 'f', 4);
  const py::ssize_t n = t.shape(0);
  check_c2d(top_s, "top_s", m, -1, 'f', 4);
  const py::ssize_t k = top_s.shape(1);
  if (k < 1) throw py::value_error("top_s: k must be >= 1");
  check_c2d(top_i, "top_i", m, k, 'i', 8);
  if (hist.ndim() != 1 || hist.dtype().kind() != 'i' || hist.itemsize() != 8 ||
      !(hist.flags() & py::array::c_style))
    throw py::value_error("hist: expected a contiguous 1-D int64 array");
  if (classes.ndim() != 1 || classes.shape(0) != 3 || classes.dtype().kind() != 'i' || classes.itemsize() != 8 ||
      !(classes.flags() & py::array::c_style))
    throw py::value_error("classes: expected a contiguous 1-D int64 array of length 3");
  if (!top_s.writeable() || !top_i.writeable() || !hist.writeable() || !classes.writeable())
    throw py::value_error("top_s/top_i/hist/classes must be writeable");
  const int64_t bins = hist.shape(0);
  if (bins < 1 || bins > (1 << 24)) throw py::value_error("hist: need 1 to 2^24 bins");
  if (!(hi > lo)) throw py::value_error("histogram range: hi must be > lo");
  if (dp < 1) throw py::value_error("q/t: need at least one column");

  Params p{};
  p.q = static_cast<const float*>(q.data());
  p.t = static_cast<const float*>(t.data());
  p.top_s = static_cast<float*>(top_s.mutable_data());
  p.top_i = static_cast<int64_t*>(top_i.mutable_data());
  p.m = m;
  p.n = n;
  p.dp = dp;
  p.k = k;
  p.row0 = row0;
  p.col0 = col0;
  p.self_offset = self_offset;
  p.bins = static_cast<int>(bins);
  p.lo = lo;
  p.hi = hi;
  p.low = low;
  p.high = high;
  const double scale = bins / (hi - lo);
  p.scale_f = static_cast<float>(scale);
  p.off_f = static_cast<float>(1.0 - lo * scale);  // (margin, E and the class bounds: prepare())
  p.low_t = largest_float_le(low);
  p.high_t = largest_float_le(high);
  // The bin of a score is monotone in it; when the last float32 at or below a threshold and the next one up
  // fall in different bins, the bins alone tell which side of it every score lies, and the class counts are
  // sums of the histogram (the fold then skips its class compares). True for the defaults (0.6, 0.85 on
  // 200 bins of [-1, 1]); otherwise the fold counts classes itself.
  p.bin_low = exact_bin(p.low_t, p);
  p.bin_high = exact_bin(p.high_t, p);
  p.cls_in_hist = exact_bin(std::nextafter(p.low_t, kInf), p) > p.bin_low &&
                  exact_bin(std::nextafter(p.high_t, kInf), p) > p.bin_high;
  p.choice = topk_kernel_choice();
  if (m == 0 || n == 0) return "none";
  int64_t* H = static_cast<int64_t*>(hist.mutable_data());
  int64_t* C = static_cast<int64_t*>(classes.mutable_data());
  {
    py::gil_scoped_release nogil;
    const IeeeFloats ieee;
    run(p, threads, H, C);
  }
  return p.kernel;
}

void cosine_scores(py::array q, py::array t, py::array out) {
  check_c2d(q, "q", -1, -1, 'f', 4);
  const py::ssize_t m = q.shape(0), dp = q.shape(1);
  check_c2d(t, "t", -1, dp, 'f', 4);
  const py::ssize_t n = t.shape(0);
  check_c2d(out, "out", m, n, 'f', 4);
  if (!out.writeable()) throw py::value_error("out must be writeable");
  const float* Q = static_cast<const float*>(q.data());
  const float* T = static_cast<const float*>(t.data());
  float* O = static_cast<float*>(out.mutable_data());
  if (m == 0 || n == 0) return;
  const Canon4Fn canon4 = kernels(active_simd(), true).canon4;
  py::gil_scoped_release nogil;
  const IeeeFloats ieee;
  parallel_for(m, 4, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const float* xs[4] = {Q + i * dp, Q + i * dp, Q + i * dp, Q + i * dp};
      for (int64_t j = 0; j < n; j += 4) {
        const float* ys[4];
        for (int u = 0; u < 4; ++u) ys[u] = T + std::min<int64_t>(j + u, n - 1) * dp;
        float s4[4];
        canon4(xs, ys, dp, s4);
        for (int u = 0; u < 4 && j + u < n; ++u) O[i * n + j + u] = s4[u];
      }
    }
  });
}

// Rows of x (n, d) (float32 or float64) L2-normalised into out (n, dp >= d) float32: norm = sqrt of the
// float64 sum of squares (four interleaved partial sums, added as (s0 + s1) + (s2 + s3)), each element
// (double) x / norm rounded once to float32, columns d .. dp - 1 zero. A row whose norm falls outside
// [2^-450, 2^450] is first scaled by a power of two (see below), so no finite non-zero row is lost to
// overflow or underflow. Returns the first all-zero row, or -1.
// One row's L2 norm by the rule of normalize_rows: float64 squares summed in four lanes (column c in lane
// c % 4, in order), the lanes added pairwise, sqrt. A norm outside [2^-450, 2^450] (float64 rows whose squares
// may over- or underflow) is summed again with the row times scale * scale2 (powers of two bringing its largest
// entry into [0.5, 1); the rule of _NORM_SAFE in all_pairs.py). The row is then used as row * scale * scale2 /
// norm; rows inside the range keep scale = scale2 = 1, so their results stay bit for bit.
template <typename T>
double row_norm(const T* row, int64_t d, double* scale_out, double* scale2_out) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t c = 0;
  for (; c + 4 <= d; c += 4)
    for (int l = 0; l < 4; ++l) s[l] += static_cast<double>(row[c + l]) * static_cast<double>(row[c + l]);
  for (int l = 0; c < d; ++c, ++l) s[l] += static_cast<double>(row[c]) * static_cast<double>(row[c]);
  double norm = std::sqrt((s[0] + s[1]) + (s[2] + s[3]));
  double scale = 1.0, scale2 = 1.0;
  if (!(norm >= 0x1p-450 && norm <= 0x1p450)) {
    double m = 0;
    for (int64_t c2 = 0; c2 < d; ++c2) m = std::max(m, std::fabs(static_cast<double>(row[c2])));
    if (m > 0) {
      int e = 0;
      std::frexp(m, &e);
      // 2^-e itself overflows when the largest entry is below 2^-1024 (a subnormal): then it is applied as
      // 2^1023 times the rest (two exact up-scalings, to entries below 1); otherwise scale2 stays 1
      scale = std::ldexp(1.0, std::min(-e, 1023));
      scale2 = std::ldexp(1.0, -e - std::min(-e, 1023));
      double t[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t c3 = 0;
      for (; c3 + 4 <= d; c3 += 4)
        for (int l = 0; l < 4; ++l) {
          const double v = static_cast<double>(row[c3 + l]) * scale * scale2;
          t[l] += v * v;
        }
      for (int l = 0; c3 < d; ++c3, ++l) {
        const double v = static_cast<double>(row[c3]) * scale * scale2;
        t[l] += v * v;
      }
      norm = std::sqrt((t[0] + t[1]) + (t[2] + t[3]));
    }
  }
  *scale_out = scale;
  *scale2_out = scale2;
  return norm;
}

// Columns [c0, c1) of one normalised row into o (c1 - c0 floats): entries past d are the zero padding.
template <typename T>
inline void write_normalised(const T* row, int64_t d, int64_t c0, int64_t c1, double scale, double scale2,
                             double norm, float* o) {
  const int64_t e = std::min(c1, d);
  for (int64_t k = c0; k < e; ++k) o[k - c0] = static_cast<float>(static_cast<double>(row[k]) * scale * scale2 / norm);
  if (e < c1) std::fill(o + std::max<int64_t>(0, e - c0), o + (c1 - c0), 0.0f);
}

inline void note_zero(std::atomic<int64_t>& first_zero, int64_t i) {
  int64_t cur = first_zero.load();
  while (i < cur && !first_zero.compare_exchange_weak(cur, i)) {
  }
}

template <typename T>
int64_t normalize_rows_impl(const T* x, int64_t n, int64_t d, float* out, int64_t dp) {
  std::atomic<int64_t> first_zero{std::numeric_limits<int64_t>::max()};
  // chunks of at least ~2^16 elements: 256 rows at d = 256, one row each for wide rows (48 rows of 2e6 ran
  // on one thread with a grain of 256 rows)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(d, 1));
  parallel_for(n, grain, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const T* row = x + i * d;
      double scale = 1.0, scale2 = 1.0;
      const double norm = row_norm(row, d, &scale, &scale2);
      float* o = out + i * dp;
      if (norm == 0) {
        note_zero(first_zero, i);
        std::fill(o, o + dp, 0.0f);
        continue;
      }
      write_normalised(row, d, 0, dp, scale, scale2, norm, o);
    }
  });
  const int64_t z = first_zero.load();
  return z == std::numeric_limits<int64_t>::max() ? -1 : z;
}

// Per row of x (n, d): norm, scale, scale2 of row_norm into norms (n, 3) float64. Returns the first row of norm
// 0, or -1.
template <typename T>
int64_t row_norms_impl(const T* x, int64_t n, int64_t d, double* norms) {
  std::atomic<int64_t> first_zero{std::numeric_limits<int64_t>::max()};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(d, 1));
  parallel_for(n, grain, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      double* r = norms + 3 * i;
      r[0] = row_norm(x + i * d, d, &r[1], &r[2]);
      if (r[0] == 0) note_zero(first_zero, i);
    }
  });
  const int64_t z = first_zero.load();
  return z == std::numeric_limits<int64_t>::max() ? -1 : z;
}

// Columns [c0, c0 + w) of the normalised rows of x (n, d), by the norms of row_norms, into out (n, w).
template <typename T>
void normalize_cols_impl(const T* x, int64_t n, int64_t d, const double* norms, int64_t c0, float* out, int64_t w) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(w, 1));
  parallel_for(n, grain, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const double* r = norms + 3 * i;
      float* o = out + i * w;
      if (r[0] == 0) {
        std::fill(o, o + w, 0.0f);
        continue;
      }
      write_normalised(x + i * d, d, c0, c0 + w, r[1], r[2], r[0], o);
    }
  });
}

int64_t row_norms(py::array x, py::array norms) {
  if (x.ndim() != 2 || !(x.flags() & py::array::c_style)) throw py::value_error("x: expected a C-contiguous 2-D array");
  const bool f32 = x.dtype().kind() == 'f' && x.itemsize() == 4, f64 = x.dtype().kind() == 'f' && x.itemsize() == 8;
  if (!f32 && !f64) throw py::value_error("x: expected float32 or float64");
  const py::ssize_t n = x.shape(0), d = x.shape(1);
  if (norms.ndim() != 2 || norms.shape(0) != n || norms.shape(1) != 3 || norms.dtype().kind() != 'f' ||
      norms.itemsize() != 8 || !(norms.flags() & py::array::c_style) || !norms.writeable())
    throw py::value_error("norms: expected a writeable C-contiguous (n, 3) float64 array");
  double* o = static_cast<double*>(norms.mutable_data());
  py::gil_scoped_release nogil;
  const IeeeFloats ieee;
  return f32 ? row_norms_impl(static_cast<const float*>(x.data()), n, d, o)
             : row_norms_impl(static_cast<const double*>(x.data()), n, d, o);
}

void normalize_cols(py::array x, py::array norms, int64_t c0, py::array out) {
  if (x.ndim() != 2 || !(x.flags() & py::array::c_style)) throw py::value_error("x: expected a C-contiguous 2-D array");
  const bool f32 = x.dtype().kind() == 'f' && x.itemsize() == 4, f64 = x.dtype().kind() == 'f' && x.itemsize() == 8;
  if (!f32 && !f64) throw py::value_error("x: expected float32 or float64");
  const py::ssize_t n = x.shape(0), d = x.shape(1);
  if (norms.ndim() != 2 || norms.shape(0) != n || norms.shape(1) != 3 || norms.dtype().kind() != 'f' ||
      norms.itemsize() != 8 || !(norms.flags() & py::array::c_style))
    throw py::value_error("norms: expected a C-contiguous (n, 3) float64 array (row_norms)");
  check_c2d(out, "out", n, -1, 'f', 4);
  if (!out.writeable()) throw py::value_error("out must be writeable");
  if (c0 < 0) throw py::value_error("c0 must be >= 0");
  const py::ssize_t w = out.shape(1);
  float* o = static_cast<float*>(out.mutable_data());
  const double* r = static_cast<const double*>(norms.data());
  py::gil_scoped_release nogil;
  const IeeeFloats ieee;
  if (f32) normalize_cols_impl(static_cast<const float*>(x.data()), n, d, r, c0, o, w);
  else normalize_cols_impl(static_cast<const double*>(x.data()), n, d, r, c0, o, w);
}

int64_t normalize_rows(py::array x, py::array out) {
  if (x.ndim() != 2 || !(x.flags() & py::array::c_style)) throw py::value_error("x: expected a C-contiguous 2-D array");
  const bool f32 = x.dtype().kind() == 'f' && x.itemsize() == 4, f64 = x.dtype().kind() == 'f' && x.itemsize() == 8;
  if (!f32 && !f64) throw py::value_error("x: expected float32 or float64");
  const py::ssize_t n = x.shape(0), d = x.shape(1);
  check_c2d(out, "out", n, -1, 'f', 4);
  const py::ssize_t dp = out.shape(1);
  if (dp < d) throw py::value_error("out: fewer columns than x");
  if (!out.writeable()) throw py::value_error("out must be writeable");
  float* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release nogil;
  const IeeeFloats ieee;
  return f32 ? normalize_rows_impl(static_cast<const float*>(x.data()), n, d, o, dp)
             : normalize_rows_impl(static_cast<const double*>(x.data()), n, d, o, dp);
}

void register_topk(py::module_& m) {
  m.def("normalize_rows", &normalize_rows, py::arg("x"), py::arg("out"),
        "L2-normalise the rows of x (n, d) float32/float64 into out (n, dp >= d) float32 (float64 norm and\n"
        "division, rounded once; padding columns zero). Returns the first all-zero row, or -1. GIL released.");
  m.def("row_norms", &row_norms, py::arg("x"), py::arg("norms"),
        "Per row of x (n, d) float32/float64, the L2 norm and the two power-of-two factors normalize_rows\n"
        "applies, into norms (n, 3) float64. Returns the first all-zero row, or -1. GIL released.");
  m.def("normalize_cols", &normalize_cols, py::arg("x"), py::arg("norms"), py::arg("c0"), py::arg("out"),
        "Columns [c0, c0 + w) of normalize_rows(x) into out (n, w) float32 (columns past d: 0), by the norms\n"
        "of row_norms: bit for bit those columns of normalize_rows' output. GIL released.");
  m.def("topk_fused", &topk_fused, py::arg("q"), py::arg("t"), py::arg("row0"), py::arg("col0"),
        py::arg("self_offset"), py::arg("top_s"), py::arg("top_i"), py::arg("hist"), py::arg("classes"),
        py::arg("lo"), py::arg("hi"), py::arg("low"), py::arg("high"), py::arg("threads") = 0,
        "Fold every pair of q (m, dp) x t (n, dp) (normalised float32 rows) into per-query top-k heaps\n"
        "top_s (m, k) float32 / top_i (m, k) int64 (root = worst; start from -inf / INT64_MAX), the histogram\n"
        "hist (bins,) int64 on [lo, hi] and classes = [different, similar, duplicate] (int64, added to).\n"
        "Global indices: query row0 + r, database col0 + j; with self_offset >= 0 the pair\n"
        "(r, self_offset + row0 + r) is excluded. Scores are canonical (16-lane fp32 FMA, fixed tree).\n"
        "threads: at most this many workers (0 = num_threads()). GIL released. Returns the approximate-score\n"
        "kernel it used: 'int16-vnni' (AVX-512 VNNI), 'int16-avx2' (vpmaddwd) or 'fp32' ('none' for an empty\n"
        "block).");
  m.def(
      "topk_int16_kernel",
      []() -> py::object {
        const Simd level = active_simd();
        if (level >= Simd::AVX512 && cpu_has_vnni()) return py::str("int16-vnni");
        if (DSF_X86 && level >= Simd::AVX2) return py::str("int16-avx2");
        return py::none();
      },
      "The int16 approximate-score kernel topk_fused can use at the current SIMD level: 'int16-vnni',\n"
      "'int16-avx2', or None (scalar level, non-x86).");
  m.def("topk_kernel_rates", &topk_kernel_rates, py::arg("iters") = 2000, py::arg("reps") = 5,
        "Multiply-adds per second of each approximate-score micro-kernel on one core with its panels in L1\n"
        "({'fp32', 'int16-avx2', 'int16-vnni'}, those this CPU has): the arithmetic floor of the all-pairs GEMM.");
  m.def(
      "topk_int16_speedup",
      []() {
        py::gil_scoped_release nogil;  // (the first call times the kernels, ~10 ms)
        return i16_avx2_speedup();
      },
      "How many times faster the int16 AVX2 micro-kernel multiply-adds than the fp32 one here, as the automatic\n"
      "kernel choice sees it (measured once per process, ~5 ms; set_topk_int16_speedup overrides it; 1.0 on a\n"
      "CPU without AVX2, which has no such kernel).");
  m.def(
      "set_topk_int16_speedup",
      [](double v) {
        if (!(v >= 0) || !std::isfinite(v)) throw py::value_error("set_topk_int16_speedup: expected a finite v >= 0");
        g_i16_speedup.store(v == 0 ? 0.0 : v);  // (-0.0: 0, measure again; stored as is, the reader measured at
                                                // every call and the store of its measure never matched -0.0's bits)
      },
      py::arg("v"),
      "Set the int16 AVX2 kernel's speed-up the automatic choice assumes (0: measure it again at the next\n"
      "call). For tests and experiments: results never depend on it, only which kernel computes them.");
  m.def(
      "set_topk_kernel",
      [](const std::string& name) {
        const int v = parse_topk_kernel(name);
        if (v < 0) throw py::value_error("set_topk_kernel: expected 'auto', 'fp32' or 'int16', got '" + name + "'");
        g_topk_kernel.store(v == 0 ? -1 : v);
      },
      py::arg("name"),
      "Override topk_fused's choice of approximate-score kernel: 'fp32', 'int16' (wherever the SIMD level\n"
      "has one), or 'auto' (clears the override: DEEPSSIM_FAST_TOPK_KERNEL if set, else by estimated cost).\n"
      "Results are identical; only speed changes.");
  m.def(
      "topk_kernel_override",
      []() {
        const int v = g_topk_kernel.load();
        return std::string(v == 1 ? "fp32" : v == 2 ? "int16" : "auto");
      },
      "The choice set_topk_kernel set ('auto': none; DEEPSSIM_FAST_TOPK_KERNEL or the estimated cost decides),\n"
      "to pass on to another process or restore later.");
  m.def(
      "topk_kernel_choice",
      []() {
        const int v = topk_kernel_choice();
        return std::string(v == 1 ? "fp32" : v == 2 ? "int16" : "auto");
      },
      "The kernel choice in force: set_topk_kernel's, else DEEPSSIM_FAST_TOPK_KERNEL's, else 'auto'.");
  m.def("cosine_scores", &cosine_scores, py::arg("q"), py::arg("t"), py::arg("out"),
        "Canonical fp32 scores out[i, j] = sum_k q[i, k] t[j, k] (16 lanes of sequential FMA, fixed tree;\n"
        "q (m, dp), t (n, dp), out (m, n) float32): the scores topk_fused reports, identical on every SIMD\n"
        "level and thread count.");
}

static Registrar reg("topk", &register_topk);

}  // namespace
}  // namespace dsf
