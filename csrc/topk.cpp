// Streaming cosine top-k with a fused score histogram (the CPU engine of deepssim_fast.all_pairs).
//
// One call folds every pair of a block of queries q (m, dp) and a chunk of database rows t (n, dp) into
// per-query top-k heaps, a histogram and class counts, without ever storing the m x n scores:
//   * t is packed once into panels of NR = 16 rows, k-major (panel[k][c] = t[c][k]);
//   * each worker takes MR = 6 query rows at a time and, for every panel, computes the 6 x 16 scores in
//     twelve AVX2 registers (the GEMM micro-kernel), then folds them at once: histogram, class counts,
//     and a top-k heap update behind a threshold early-out (a score below the row's current k-th best
//     cannot enter the top-k, and is only counted);
//   * the fold only computes each score's histogram slot; the increments themselves (one memory
//     read-modify-write each, about a cycle apiece on these cores) are handed to the next micro-kernel
//     call, which issues one per k step between its FMAs. The micro-kernel is bound by the FMA pipes and
//     leaves the load/store ports idle, so the increments cost almost nothing there: all-pairs at
//     20000^2 x 256 went from ~1.17 to ~1.10 s on 2 cores (the GEMM alone takes ~1.0 s).
//
// Exactness. A pair's score is its *canonical* fp32 dot product: acc = fma(q[k], t[k], acc) for
// k = 0, 1, ..., dp - 1, from acc = 0, rounded once per step. Every accumulator lane of the micro-kernel
// computes exactly that sequence, and so does the scalar path (fmaf), so scores — and therefore top-k,
// ties, histogram and class counts — do not depend on tiling, threads or SIMD level.
//
// Conventions (shared with deepssim_fast/all_pairs.py and reference.py)
//   bin(s)   = clamp(floor(((double)s - lo) / (hi - lo) * bins), 0, bins - 1)
//   class(s) : different if s <= low, similar if low < s <= high, duplicate if s > high (float64 compare)
//   top-k    : descending score, ties to the lower index; kept as a per-query binary heap whose root is
//              the worst kept entry (the driver sorts it at the end).
// The bin of a score is first computed in float32 as the slot y = s * scale + (1 - lo * scale) = x + 1,
// clamped to [0.5, bins + 1.5] (slot 0 and slot bins + 1 are the clamped ends, merged into the first and
// last bin when the sub-histograms are flushed); a score whose y lies within `margin` of an integer
// (~0.06 % of pairs) goes to the exact float64 rule. Excluded pairs (self pairs, padding columns) are
// marked NaN before the fold: NaN fails every ordered compare, so it never counts and never enters a heap.
#include "common.h"

#include <atomic>
#include <cmath>
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
constexpr int NC = 256;  // database rows per tile (16 panels; 256 KB packed at d = 256)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Params {
  const float* q;    // (m, dp) normalised queries
  const float* t;    // (n, dp) normalised database rows
  const float* tp;   // packed t: (ceil(n / NR), dp, NR), zero rows past n
  float* top_s;      // (m, k) heap scores
  int64_t* top_i;    // (m, k) heap indices (global)
  float* dense;      // optional (m, n) score output, else nullptr
  int64_t m, n, dp, k;
  int64_t row0, col0, self_offset;  // self_offset < 0: no self pairs
  int bins;
  double lo, hi, low, high;
  float scale_f, off_f, margin;        // float32 pre-binning: slot y = fma(s, scale_f, off_f)
  float low_t, high_t;                 // largest floats <= low / high: s > low_t  <=>  (double) s > low
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
  // 8 int32 sub-histograms (one per SIMD lane) of stride bins + 3, so that neighbouring scores falling in
  // the same bin do not chain through store-to-load forwarding. Slots 0 .. bins + 1 are the clamped
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

// A pair whose float32 slot lies within `margin` of an integer: exact float64 bin (its classes are counted
// with every other pair). Excluded pairs (NaN) are skipped.
inline void count_exact(const Params& p, float s, Local& lc) {
  if (std::isnan(s)) return;
  lc.hist[exact_bin(s, p)] += 1;
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

// ---- scalar path ---------------------------------------------------------------------------------

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

// Fold a block of nrows x NR scores (row stride NR) for query rows r0 .. r0 + nrows - 1. Returns how many
// histogram slots it left in `pend` for the next micro-kernel call (the scalar path counts at once: 0).
int64_t fold_block_scalar(const Params& p, const float* sc, int64_t nrows, int64_t r0, int64_t gcol0, Local& lc,
                          int32_t* /*pend*/) {
  for (int64_t r = 0; r < nrows; ++r) {
    const float* s16 = sc + r * NR;
    float* hs = p.top_s + (r0 + r) * p.k;
    int64_t* hi = p.top_i + (r0 + r) * p.k;
    for (int c = 0; c < NR; ++c) {
      const float s = s16[c];
      if (std::isnan(s)) continue;  // excluded self pair or padding column
      lc.gt_low += s > p.low_t;
      lc.gt_high += s > p.high_t;
      const float y = std::min(std::max(std::fmaf(s, p.scale_f, p.off_f), 0.5f), p.bins + 1.5f);
      const float fl = std::floor(y);
      if (std::fabs(y - fl - 0.5f) <= 0.5f - p.margin)
        lc.sub[static_cast<int>(fl)] += 1;
      else
        count_exact(p, s, lc);
      if (s >= hs[0]) offer(p, s, gcol0 + c, hs, hi);
    }
  }
  return 0;
}

// ---- AVX2 path -------------------------------------------------------------------------------------
#if DSF_X86
// One k step of the 6 x 16 micro-kernel: acc[r][c] = fma(a_r[kk], panel[kk][c], acc[r][c]).
#define DSF_MICRO_STEP_AVX2                           \
  {                                                   \
    const __m256 b0 = _mm256_load_ps(bp + kk * NR);     \
    const __m256 b1 = _mm256_load_ps(bp + kk * NR + 8); \
    __m256 av = _mm256_broadcast_ss(a0 + kk);         \
    c00 = _mm256_fmadd_ps(av, b0, c00);               \
    c01 = _mm256_fmadd_ps(av, b1, c01);               \
    av = _mm256_broadcast_ss(a1 + kk);                \
    c10 = _mm256_fmadd_ps(av, b0, c10);               \
    c11 = _mm256_fmadd_ps(av, b1, c11);               \
    av = _mm256_broadcast_ss(a2 + kk);                \
    c20 = _mm256_fmadd_ps(av, b0, c20);               \
    c21 = _mm256_fmadd_ps(av, b1, c21);               \
    av = _mm256_broadcast_ss(a3 + kk);                \
    c30 = _mm256_fmadd_ps(av, b0, c30);               \
    c31 = _mm256_fmadd_ps(av, b1, c31);               \
    av = _mm256_broadcast_ss(a4 + kk);                \
    c40 = _mm256_fmadd_ps(av, b0, c40);               \
    c41 = _mm256_fmadd_ps(av, b1, c41);               \
    av = _mm256_broadcast_ss(a5 + kk);                \
    c50 = _mm256_fmadd_ps(av, b0, c50);               \
    c51 = _mm256_fmadd_ps(av, b1, c51);               \
  }

// The micro-kernel; the first min(npend, dp) k steps each also apply one pending histogram increment
// (the rest, if dp < npend, after the loop). The increments do not touch the accumulators, so the
// scores are the same as without them.
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

// Vector fold: class counts, exact path for near-edge scores, top-k offers; the 8-lane slot vectors go
// to pend (row r, half h at pend + r * NR + 8 h) for the next micro-kernel call to count.
DSF_TARGET_AVX2 int64_t fold_block_avx2(const Params& p, const float* sc, int64_t nrows, int64_t r0,
                                        int64_t gcol0, Local& lc, int32_t* pend) {
  const __m256 vscale = _mm256_set1_ps(p.scale_f), voff = _mm256_set1_ps(p.off_f);
  const __m256 vhalf = _mm256_set1_ps(0.5f), vchi = _mm256_set1_ps(p.bins + 1.5f);  // slots clamped to [0.5, chi]
  const __m256 vlim = _mm256_set1_ps(0.5f - p.margin);
  const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 vlow = _mm256_set1_ps(p.low_t), vhigh = _mm256_set1_ps(p.high_t);
  const int st = p.bins + 3;
  const __m256i vdummy = _mm256_set1_epi32(p.bins + 2);
  const __m256i vlane = _mm256_setr_epi32(0, st, 2 * st, 3 * st, 4 * st, 5 * st, 6 * st, 7 * st);
  __m256i nlow = _mm256_setzero_si256(), nhigh = nlow;  // per-lane class counts (minus compare masks)
  for (int64_t r = 0; r < nrows; ++r) {
    const float* s16 = sc + r * NR;
    float* hs = p.top_s + (r0 + r) * p.k;
    int64_t* hi = p.top_i + (r0 + r) * p.k;
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_load_ps(s16 + 8 * h);
      // max/min return their second operand when it is NaN: excluded lanes stay NaN and fail `ok`
      const __m256 y = _mm256_min_ps(vchi, _mm256_max_ps(vhalf, _mm256_fmadd_ps(s, vscale, voff)));
      const __m256 fl = _mm256_floor_ps(y);
      const __m256 dist = _mm256_and_ps(_mm256_sub_ps(_mm256_sub_ps(y, fl), vhalf), vabs);
      const __m256 ok = _mm256_cmp_ps(dist, vlim, _CMP_LE_OQ);
      nlow = _mm256_sub_epi32(nlow, _mm256_castps_si256(_mm256_cmp_ps(s, vlow, _CMP_GT_OQ)));
      nhigh = _mm256_sub_epi32(nhigh, _mm256_castps_si256(_mm256_cmp_ps(s, vhigh, _CMP_GT_OQ)));
      const __m256i b = _mm256_add_epi32(
          _mm256_blendv_epi8(vdummy, _mm256_cvttps_epi32(fl), _mm256_castps_si256(ok)), vlane);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pend + r * NR + 8 * h), b);
      const unsigned okm = static_cast<unsigned>(_mm256_movemask_ps(ok));
      if (okm != 0xffu) {  // near a bin edge (rare), or excluded
        for (unsigned sp = ~okm & 0xffu; sp; sp &= sp - 1) count_exact(p, s16[8 * h + __builtin_ctz(sp)], lc);
      }
      // the threshold early-out: only scores reaching the row's current k-th best are offered
      const unsigned candm = static_cast<unsigned>(
          _mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_broadcast_ss(hs), _CMP_GE_OQ)));
      for (unsigned cm = candm; cm; cm &= cm - 1) {
        const int l = __builtin_ctz(cm);
        offer(p, s16[8 * h + l], gcol0 + 8 * h + l, hs, hi);
      }
    }
  }
  alignas(32) int32_t cnt[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(cnt), nlow);
  for (int l = 0; l < 8; ++l) lc.gt_low += cnt[l];
  _mm256_store_si256(reinterpret_cast<__m256i*>(cnt), nhigh);
  for (int l = 0; l < 8; ++l) lc.gt_high += cnt[l];
  return nrows * NR;
}
#endif

// ---- driver: rows [rb, re) against all of t ------------------------------------------------------

using MicroFn = void (*)(const float* const*, const float*, int64_t, float*, const int32_t*, int64_t, int32_t*);
using FoldFn = int64_t (*)(const Params&, const float*, int64_t, int64_t, int64_t, Local&, int32_t*);

void run_rows(const Params& p, int64_t rb, int64_t re, Local& lc, MicroFn micro, FoldFn fold,
              const float* zero_row) {
  alignas(32) float sc[MR * NR];
  alignas(32) int32_t pend[MR * NR];  // histogram slots of the last folded block, not yet counted
  int64_t npend = 0;
  const int64_t panels = (p.n + NR - 1) / NR;
  const int64_t flush_at = (int64_t{1} << 30);
  for (int64_t tb = 0; tb < panels; tb += NC / NR) {          // tile of NC database rows
    const int64_t te = std::min(panels, tb + NC / NR);
    for (int64_t r0 = rb; r0 < re; r0 += MR) {               // MR query rows
      const int64_t nrows = std::min<int64_t>(MR, re - r0);
      const float* a[MR];
      for (int r = 0; r < MR; ++r) a[r] = r < nrows ? p.q + (r0 + r) * p.dp : zero_row;
      for (int64_t pn = tb; pn < te; ++pn) {                  // one panel of NR database rows
        const int64_t c0 = pn * NR;
        micro(a, p.tp + pn * p.dp * NR, p.dp, sc, pend, npend, lc.sub.data());
        npend = 0;
        if (p.dense) {
          const int64_t nc = std::min<int64_t>(NR, p.n - c0);
          for (int64_t r = 0; r < nrows; ++r)
            std::memcpy(p.dense + (r0 + r) * p.n + c0, sc + r * NR, sizeof(float) * nc);
        }
        if (p.top_s == nullptr) continue;  // dense scores only
        lc.total += nrows * NR - mask_block(p, sc, r0, nrows, c0);
        lc.in_sub += nrows * NR;
        npend = fold(p, sc, nrows, r0, p.col0 + c0, lc, pend);
      }
      // (slots still pending are counted after a flush: at most MR * NR more than in_sub allows for)
      if (lc.in_sub > flush_at) lc.flush(p.bins);
    }
  }
  apply_pending(pend, npend, lc.sub.data());
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

// Pack t (n, dp) into panels (ceil(n / NR), dp, NR), zero rows past n.
std::vector<float, std::allocator<float>> pack_panels(const float* t, int64_t n, int64_t dp, float** aligned) {
  const int64_t panels = (n + NR - 1) / NR;
  std::vector<float> buf(static_cast<size_t>(panels * dp * NR) + 8, 0.0f);
  float* base = buf.data();
  while (reinterpret_cast<uintptr_t>(base) % 32) ++base;
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

void run(Params& p, int threads, int64_t* H, int64_t* C) {
  const Simd level = active_simd();
  MicroFn micro = &micro_scalar;
  FoldFn fold = &fold_block_scalar;
#if DSF_X86
  if (level >= Simd::AVX2) {
    micro = &micro_avx2;
    fold = &fold_block_avx2;
  }
#endif
  float* tp = nullptr;
  auto packed = pack_panels(p.t, p.n, p.dp, &tp);
  p.tp = tp;
  const std::vector<float> zero_row(static_cast<size_t>(p.dp), 0.0f);
  std::mutex mu;
  const int nt = threads > 0 ? std::min(threads, num_threads()) : num_threads();
  // chunks of whole MR groups, several per thread so the dynamic schedule balances the load
  int64_t grain = ((p.m + 4 * nt - 1) / (4 * nt) + MR - 1) / MR * MR;
  grain = std::max<int64_t>(MR, std::min<int64_t>(grain, 16 * MR));
  parallel_for(
      p.m, grain,
      [&](int64_t rb, int64_t re) {
        Local lc(p.bins);
        run_rows(p, rb, re, lc, micro, fold, zero_row.data());
        if (!H) return;
        lc.flush(p.bins);
        std::lock_guard<std::mutex> lk(mu);
        for (int b = 0; b < p.bins; ++b) H[b] += lc.hist[b];
        C[2] += lc.gt_high;
        C[1] += lc.gt_low - lc.gt_high;
        C[0] += lc.total - lc.gt_low;
      },
      nt);
}

void topk_fused(py::array q, py::array t, int64_t row0, int64_t col0, int64_t self_offset, py::array top_s,
                py::array top_i, py::array hist, py::array classes, double lo, double hi, double low, double high,
                int threads) {
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
  if (classes.ndim() != 1 || classes.shape(0) != 3 || classes.dtype().kind() != 'i' || classes.itemsize() != 8)
    throw py::value_error("classes: expected a 1-D int64 array of length 3");
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
  p.dense = nullptr;
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
  p.off_f = static_cast<float>(1.0 - lo * scale);
  // |y - (x + 1)| <= |s| |scale - scale_f| + |off - off_f| + ulp(y) / 2: a few float32 ulps of
  // (bins + 2 + |lo| scale) for every slot that is not clamped (|s| scale <= bins + |lo| scale + 1)
  p.margin = static_cast<float>(8.0 * 1.1920929e-7 * (bins + 2 + std::fabs(lo) * scale) + 1e-7);
  p.low_t = largest_float_le(low);
  p.high_t = largest_float_le(high);
  if (m == 0 || n == 0) return;
  int64_t* H = static_cast<int64_t*>(hist.mutable_data());
  int64_t* C = static_cast<int64_t*>(classes.mutable_data());
  py::gil_scoped_release nogil;
  run(p, threads, H, C);
}

void cosine_scores(py::array q, py::array t, py::array out) {
  check_c2d(q, "q", -1, -1, 'f', 4);
  const py::ssize_t m = q.shape(0), dp = q.shape(1);
  check_c2d(t, "t", -1, dp, 'f', 4);
  const py::ssize_t n = t.shape(0);
  check_c2d(out, "out", m, n, 'f', 4);
  if (!out.writeable()) throw py::value_error("out must be writeable");
  Params p{};
  p.q = static_cast<const float*>(q.data());
  p.t = static_cast<const float*>(t.data());
  p.dense = static_cast<float*>(out.mutable_data());
  p.m = m;
  p.n = n;
  p.dp = dp;
  p.k = 1;
  p.bins = 1;
  p.self_offset = -1;
  if (m == 0 || n == 0) return;
  py::gil_scoped_release nogil;
  run(p, 0, nullptr, nullptr);
}

// Rows of x (n, d) (float32 or float64) L2-normalised into out (n, dp >= d) float32: norm = sqrt of the
// float64 sum of squares (four interleaved partial sums, added as (s0 + s1) + (s2 + s3)), each element
// (double) x / norm rounded once to float32, columns d .. dp - 1 zero. Returns the first all-zero row, or -1.
template <typename T>
int64_t normalize_rows_impl(const T* x, int64_t n, int64_t d, float* out, int64_t dp) {
  std::atomic<int64_t> first_zero{std::numeric_limits<int64_t>::max()};
  parallel_for(n, 256, [&](int64_t rb, int64_t re) {
    for (int64_t i = rb; i < re; ++i) {
      const T* row = x + i * d;
      double s[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t c = 0;
      for (; c + 4 <= d; c += 4)
        for (int l = 0; l < 4; ++l) s[l] += static_cast<double>(row[c + l]) * static_cast<double>(row[c + l]);
      for (int l = 0; c < d; ++c, ++l) s[l] += static_cast<double>(row[c]) * static_cast<double>(row[c]);
      const double norm = std::sqrt((s[0] + s[1]) + (s[2] + s[3]));
      float* o = out + i * dp;
      if (norm == 0) {
        int64_t cur = first_zero.load();
        while (i < cur && !first_zero.compare_exchange_weak(cur, i)) {
        }
        std::fill(o, o + dp, 0.0f);
        continue;
      }
      for (int64_t k = 0; k < d; ++k) o[k] = static_cast<float>(static_cast<double>(row[k]) / norm);
      std::fill(o + d, o + dp, 0.0f);
    }
  });
  const int64_t z = first_zero.load();
  return z == std::numeric_limits<int64_t>::max() ? -1 : z;
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
  return f32 ? normalize_rows_impl(static_cast<const float*>(x.data()), n, d, o, dp)
             : normalize_rows_impl(static_cast<const double*>(x.data()), n, d, o, dp);
}

void register_topk(py::module_& m) {
  m.def("normalize_rows", &normalize_rows, py::arg("x"), py::arg("out"),
        "L2-normalise the rows of x (n, d) float32/float64 into out (n, dp >= d) float32 (float64 norm and\n"
        "division, rounded once; padding columns zero). Returns the first all-zero row, or -1. GIL released.");
  m.def("topk_fused", &topk_fused, py::arg("q"), py::arg("t"), py::arg("row0"), py::arg("col0"),
        py::arg("self_offset"), py::arg("top_s"), py::arg("top_i"), py::arg("hist"), py::arg("classes"),
        py::arg("lo"), py::arg("hi"), py::arg("low"), py::arg("high"), py::arg("threads") = 0,
        "Fold every pair of q (m, dp) x t (n, dp) (normalised float32 rows) into per-query top-k heaps\n"
        "top_s (m, k) float32 / top_i (m, k) int64 (root = worst; start from -inf / INT64_MAX), the histogram\n"
        "hist (bins,) int64 on [lo, hi] and classes = [different, similar, duplicate] (int64, added to).\n"
        "Global indices: query row0 + r, database col0 + j; with self_offset >= 0 the pair\n"
        "(r, self_offset + row0 + r) is excluded. Scores are canonical (sequential fp32 FMA over dp).\n"
        "threads: at most this many workers (0 = num_threads()). GIL released.");
  m.def("cosine_scores", &cosine_scores, py::arg("q"), py::arg("t"), py::arg("out"),
        "Canonical fp32 scores out[i, j] = sum_k q[i, k] t[j, k] by sequential FMA (q (m, dp), t (n, dp),\n"
        "out (m, n) float32): the scores topk_fused folds, identical on every SIMD level and thread count.");
}

static Registrar reg("topk", &register_topk);

}  // namespace
}  // namespace dsf
