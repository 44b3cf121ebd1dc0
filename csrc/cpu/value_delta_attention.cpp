// CPU kernels of value-delta attention, fused for the decode regime (docs/design.md §2.2, §2.3).
//
// Per (batch b, kv-head g) the R = G*T query rows of the group (G = Hq/Hkv q-heads, T
// queries; row r = j*T + t is q-head g*G + j) share one pass over K and V. Value rows
// at span positions are modulated on the fly, per key and in fp32, never for all of N:
//   u = v + delta,   nu = max(||u||, eps),   v' = u * gain,   gain = ||v|| / nu,
// so a zero row v stays 0 (gain = 0).
//
// Forward. Scores s = (scale q) . k + bias (-inf where causal hides the key: query t
// sees key n iff n <= t + N - T). Keys are cut into fixed chunks (from the shapes,
// never from the thread count); each (b, g, chunk) task runs an online softmax over
// tiles of kBlock keys, keeping per row (m, l, acc) relative to its running max m:
//   m' = max(m, max_j s_j),  a = e^{m - m'},  l <- a l + sum_j e^{s_j - m'},
//   acc <- a acc + sum_j e^{s_j - m'} v'_j.
// The chunk partials are merged in ascending chunk order (flash-decoding):
//   M = max_c m_c,  L = sum_c e^{m_c - M} l_c,  out = sum_c e^{m_c - M} acc_c / L,
//   lse = M + log L.
// A row that sees no key has M = -inf: out = 0, lse = -inf (no e^{-inf - -inf}).
//
// Backward (FA2 with p recomputed from lse, so chunks need no rescaling):
//   p = e^{s - lse},  dp_n = dO . v'_n,  dS = p (dp - Delta),
//   dQ = scale sum_n dS_n k_n,
//   g_n = dL/dv'_n = sum_r p_rn dO_r   (all R rows of the group live in one task, so
//                                       g_n is complete there: no merge, no atomics).
// Delta = dO . O is taken as the p-weighted mean of the same fp32 dp values,
// sum_n p_n dp_n / sum_n p_n, not from the output rounded to fp16/bf16: a row whose p
// is one-hot then gets dS = 0 exactly, as its softmax is constant. Delta is known only
// once every chunk is done, so each chunk centres its dQ on its own running mean mu
// and keeps kbar = sum_n p_n k_n; whenever mu moves to mu', the sum so far is re-centred
// by (mu - mu') kbar. The merge re-centres the chunks on the row's Delta the same way:
//   dQ = scale sum_c (dQ_c + (mu_c - Delta) kbar_c),  Delta = sum_c m_c mu_c / sum_c m_c,
// with m_c = sum_{n in c} p_n, the chunk's probability mass. Each term stays centred
// (no cancellation between two large sums), and a one-hot row has mu_c = Delta = dp
// and dQ_c = 0.
// At a span key, through §2.2 with u_hat = u/nu:
//   d delta = gain (g - (g . u_hat) u_hat) = gain (g - (g . v') v' / ||v||^2),
// using v' = gain u, so only v' (already in the tile) and gain are needed. When
// ||u|| < eps the clamp is active and v' = u ||v|| / eps is linear in u: no projection.
//
// Every task runs sequentially in one thread and every sum has a fixed order, so the
// same input gives the same bits at any thread count. Any T works; decode (small T)
// is what the split targets, and the chunk count shrinks as T grows to bound the
// partials' memory.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/row_ops.h"

namespace vreason {
namespace {

constexpr float kEps = 1e-6f;           // the norm clamp of §2.2
constexpr int64_t kBlock = 64;          // keys per tile: K and V' tiles (64 x D fp32) stay in L2
constexpr int64_t kChunk = 512;         // keys per parallel task (flash-decoding split)
constexpr int64_t kPartialBudget = int64_t(1) << 24;  // floats of chunk partials (64 MB)

// ---------------------------------------------------------------- tile kernels

// Sixteen fp32 lanes (GCC/Clang vector extension): one AVX-512 register, two AVX2 or
// four SSE ones. Lane l of a dot product accumulates the elements d = l (mod 16).
// The helpers that pass them by value are inlined into the cloned kernels, so GCC's
// note that such an argument's ABI depends on -mavx512f does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Lanes __attribute__((vector_size(64)));
typedef float HalfLanes __attribute__((vector_size(32)));
typedef float QuarterLanes __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;

// Lanes of p[0, n), zero beyond (n < kLanes only at the tail of a row).
inline Lanes load_lanes(const float* p, int64_t n = kLanes) {
  Lanes v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// Sum of the lanes in a fixed tree order. (A `reduction` clause adds them one at a
// time, a serial chain per dot product that dominated the decode time.)
inline float sum_lanes(Lanes v) {
  const HalfLanes h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const QuarterLanes q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// Calls step(d, n) over [0, dim) in blocks of n = kLanes lanes and one shorter tail;
// the full blocks see a constant n, so their loads compile to plain vector loads.
template <typename Step>
inline void for_lanes(int64_t dim, Step step) {
  const int64_t body = dim / kLanes * kLanes;
  for (int64_t d = 0; d < body; d += kLanes) step(d, kLanes);
  if (body < dim) step(body, dim - body);
}

// s[r * lds + j] = a_r . x_j for `rows` rows of a (row stride dim) and nx rows of x
// (row stride ldx). Four x rows per a row: one load of a_r feeds four independent FMA
// chains (a single chain is latency-bound), whatever the number of rows.
VREASON_SIMD_CLONES void dot_tile(const float* __restrict a, int64_t rows, const float* __restrict x, int64_t ldx,
                                 int64_t nx, int64_t dim, float* __restrict s, int64_t lds) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * dim;
    float* sr = s + r * lds;
    int64_t j = 0;
    for (; j + 4 <= nx; j += 4) {
      const float* xj = x + j * ldx;
      Lanes acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
      for_lanes(dim, [&](int64_t d, int64_t n) {
        const Lanes av = load_lanes(ar + d, n);
        acc0 += av * load_lanes(xj + d, n);
        acc1 += av * load_lanes(xj + ldx + d, n);
        acc2 += av * load_lanes(xj + 2 * ldx + d, n);
        acc3 += av * load_lanes(xj + 3 * ldx + d, n);
      });
      sr[j] = sum_lanes(acc0);
      sr[j + 1] = sum_lanes(acc1);
      sr[j + 2] = sum_lanes(acc2);
      sr[j + 3] = sum_lanes(acc3);
    }
    for (; j < nx; ++j) {
      const float* xj = x + j * ldx;
      Lanes acc = {};
      for_lanes(dim, [&](int64_t d, int64_t n) { acc += load_lanes(ar + d, n) * load_lanes(xj + d, n); });
      sr[j] = sum_lanes(acc);
    }
  }
}

// out_r += sum_j c[r * cs_r + j * cs_j] x_j, j ascending, for `rows` rows of out (row
// stride dim) and nx rows of x (row stride ldx). The two coefficient strides let the
// same kernel take P (acc += P V', dQ += dS K) and P^T (g = P^T dO).
void accumulate_tile(float* __restrict out, int64_t rows, const float* __restrict c, int64_t cs_r, int64_t cs_j,
                     const float* __restrict x, int64_t ldx, int64_t nx, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) accumulate_rows(out + r * dim, c + r * cs_r, cs_j, x, ldx, nx, dim);
}

// ||x + dx|| (dx may be null) summed in double, for a row whose fp32 sum of squares
// overflowed although its entries are finite (rows past ~1.8e19): inf there made
// v' = u ||v|| / inf = 0. A row holding an inf gets NaN, as the torch and Triton
// backends' rescaling (inf / inf) gives it.
float wide_norm(const float* x, const float* dx, int64_t dim) {
  double sum = 0.0;
  for (int64_t d = 0; d < dim; ++d) {
    const float u = dx == nullptr ? x[d] : x[d] + dx[d];  // the fp32 u of the common path
    sum += static_cast<double>(u) * u;
  }
  return std::isinf(sum) ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(std::sqrt(sum));
}

// In place, v -> v' = u gain with u = v + dv, gain = ||v|| / max(||u||, eps); also
// inv_norm = 1 / ||v|| where the projection of the backward applies (||u|| >= eps and
// v != 0), else 0.
VREASON_SIMD_CLONES void modulate_row(float* __restrict v, const float* __restrict dv, int64_t dim, float* gain,
                                     float* inv_norm) {
  Lanes vv = {}, uu = {};
  for_lanes(dim, [&](int64_t d, int64_t n) {
    const Lanes x = load_lanes(v + d, n), u = x + load_lanes(dv + d, n);
    vv += x * x;
    uu += u * u;
  });
  float vnorm = std::sqrt(sum_lanes(vv)), unorm = std::sqrt(sum_lanes(uu));
  if (std::isinf(vnorm)) vnorm = wide_norm(v, nullptr, dim);
  if (std::isinf(unorm)) unorm = wide_norm(v, dv, dim);
  const float g = vnorm / std::max(unorm, kEps);
  for_lanes(dim, [&](int64_t d, int64_t n) {
    const Lanes u = (load_lanes(v + d, n) + load_lanes(dv + d, n)) * g;
    std::memcpy(v + d, &u, n * sizeof(float));
  });
  *gain = g;
  *inv_norm = (unorm >= kEps && vnorm > 0.f) ? 1.f / vnorm : 0.f;
}

typedef int32_t IntLanes __attribute__((vector_size(64)));

// x_j <- e^{x_j - shift} for j < n, returning their sum (fixed order). Cephes' expf:
// e^z = 2^k e^r with k = round(z / ln 2), |r| <= ln(2)/2 and a degree-7 polynomial
// for e^r (about 1 ulp); z below ln(FLT_MIN) gives exactly 0, so masked (-inf)
// scores drop out. Vectorised because one exp per score cost as much as the products.
VREASON_SIMD_CLONES float exp_shifted(float* x, int64_t n, float shift) {
  constexpr float kMinArg = -87.33654f, kMaxArg = 88.37626f;
  Lanes total = {};
  for_lanes(n, [&](int64_t j, int64_t m) {
    Lanes z;
    for (int64_t l = 0; l < kLanes; ++l) z[l] = l < m ? x[j + l] - shift : kNegInf;  // tail lanes give 0
    const Lanes zc = z < kMinArg ? kMinArg : (z > kMaxArg ? kMaxArg : z);
    // Round to nearest by the 1.5 * 2^23 trick (no -ffast-math here, so it survives).
    const Lanes k = (zc * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const Lanes r = (zc - k * 0.693359375f) - k * -2.12194440e-4f;
    Lanes poly = Lanes{} + 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.f;
    const IntLanes bits = (__builtin_convertvector(k, IntLanes) + 127) << 23;
    Lanes pow2k;
    std::memcpy(&pow2k, &bits, sizeof pow2k);
    const Lanes e = z < kMinArg ? 0.f : poly * pow2k;
    total += e;
    std::memcpy(x + j, &e, m * sizeof(float));
  });
  return sum_lanes(total);
}

// ---------------------------------------------------------------- problem layout

struct Layout {
  int64_t B, Hq, Hkv, G, T, N, D, S;
  int64_t rows;         // R = G * T query rows per (b, kv-head)
  int64_t chunk, nchunk;
  int64_t k_s[3], v_s[3], d_s[3];  // strides of key / value / delta_v over (b, h, n), unit along D
  const float* bias;    // expanded to [B, Hq, T, N] (stride-0 dims allowed), or null
  int64_t bias_s[4];
  bool causal;
};

// Per-thread scratch of one task.
struct Scratch {
  std::vector<float> s, dp, kbuf, vbuf, dbuf, gain, inv_norm, g, total;
  Scratch(int64_t rows, int64_t dim)
      : s(rows * kBlock), dp(rows * kBlock), kbuf(kBlock * dim), vbuf(kBlock * dim), dbuf(dim), gain(kBlock),
        inv_norm(kBlock), g(dim), total(rows) {}
};

// Upcasts nb rows (row stride ld) into buf (row stride dim).
template <typename scalar_t>
void convert_rows(const scalar_t* src, int64_t ld, int64_t nb, int64_t dim, float* buf) {
  for (int64_t j = 0; j < nb; ++j) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      std::memcpy(buf + j * dim, src + j * ld, dim * sizeof(float));
    } else {
      for (int64_t d = 0; d < dim; ++d) buf[j * dim + d] = static_cast<float>(src[j * ld + d]);
    }
  }
}

// A tile of nb rows (row stride ld) as fp32: float input is used in place, other
// dtypes are upcast into buf (row stride dim).
template <typename scalar_t>
const float* tile_as_float(const scalar_t* src, int64_t ld, int64_t nb, int64_t dim, float* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *ld_out = ld;
    return src;
  } else {
    convert_rows(src, ld, nb, dim, buf);
    *ld_out = dim;
    return buf;
  }
}

// V' for keys [n0, n0 + nb) of (b, kv-head h) as an fp32 tile (row stride *ld_out):
// V itself, like tile_as_float, when no key of the tile is in the span, else built in
// w.vbuf, with w.gain / w.inv_norm of its span keys (see modulate_row).
template <typename scalar_t>
const float* modulated_tile(const Layout& L, const scalar_t* value, const scalar_t* delta,
                            const int32_t* span_index, int64_t b, int64_t h, int64_t n0, int64_t nb, Scratch& w,
                            int64_t* ld_out) {
  const int64_t D = L.D;
  const scalar_t* vbase = value + b * L.v_s[0] + h * L.v_s[1] + n0 * L.v_s[2];
  const bool any_span =
      delta != nullptr && std::any_of(span_index + n0, span_index + n0 + nb, [](int32_t row) { return row >= 0; });
  if (!any_span) return tile_as_float(vbase, L.v_s[2], nb, D, w.vbuf.data(), ld_out);
  *ld_out = D;
  convert_rows(vbase, L.v_s[2], nb, D, w.vbuf.data());
  for (int64_t j = 0; j < nb; ++j) {
    const int32_t row = span_index[n0 + j];
    if (row < 0) continue;
    int64_t unused_ld;
    const float* dv = tile_as_float(delta + b * L.d_s[0] + h * L.d_s[1] + row * L.d_s[2], D, 1, D, w.dbuf.data(),
                                    &unused_ld);
    modulate_row(w.vbuf.data() + j * D, dv, D, &w.gain[j], &w.inv_norm[j]);
  }
  return w.vbuf.data();
}

// The largest of x[0, n), or NaN when one is NaN: std::max_element skips a NaN, which
// let a NaN query pass as a row that sees no key (output 0 and lse -inf, not NaN).
inline float max_or_nan(const float* x, int64_t n) {
  float mx = kNegInf;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) return x[j];
    mx = std::max(mx, x[j]);
  }
  return mx;
}

// Adds the bias to, and hides causally masked keys of, the scores s [R, kBlock] of
// keys [n0, n0 + nb) for (b, kv-head g).
void mask_scores(const Layout& L, int64_t b, int64_t g, int64_t n0, int64_t nb, float* s) {
  for (int64_t r = 0; r < L.rows; ++r) {
    const int64_t h = g * L.G + r / L.T, t = r % L.T;
    float* sr = s + r * kBlock;
    // Bottom-right aligned: query t sees keys n <= t + N - T.
    const int64_t visible = L.causal ? std::clamp<int64_t>(t + L.N - L.T + 1 - n0, 0, nb) : nb;
    if (L.bias != nullptr) {
      const float* br = L.bias + b * L.bias_s[0] + h * L.bias_s[1] + t * L.bias_s[2] + n0 * L.bias_s[3];
      for (int64_t j = 0; j < visible; ++j) sr[j] += br[j * L.bias_s[3]];
    }
    for (int64_t j = visible; j < nb; ++j) sr[j] = kNegInf;
  }
}

// ---------------------------------------------------------------- forward

// Masked scores of the group's R query rows against keys n0 .. n0+nb of one tile, into
// w.s (row stride kBlock); returns the fp32 key tile (row stride *ldk) for the dQ update.
template <typename scalar_t>
const float* score_tile(const Layout& L, const float* q, const scalar_t* kbase, int64_t b, int64_t g, int64_t n0,
                        int64_t nb, Scratch& w, int64_t* ldk) {
  const float* k = tile_as_float(kbase + n0 * L.k_s[2], L.k_s[2], nb, L.D, w.kbuf.data(), ldk);
  dot_tile(q, L.rows, k, *ldk, nb, L.D, w.s.data(), kBlock);
  mask_scores(L, b, g, n0, nb, w.s.data());
  return k;
}

// One (b, kv-head g, chunk c) task: online softmax over the chunk's tiles, leaving the
// partial (m [R], l [R], acc [R, D]) of the chunk.
template <typename scalar_t>
void forward_task(const Layout& L, const float* q32, const scalar_t* key, const scalar_t* value,
                  const scalar_t* delta, const int32_t* span_index, int64_t b, int64_t g, int64_t c, float* m,
                  float* l, float* acc, Scratch& w) {
  const int64_t R = L.rows, D = L.D;
  const float* q = q32 + (b * L.Hq + g * L.G) * L.T * D;  // the group's R rows are contiguous
  const scalar_t* kbase = key + b * L.k_s[0] + g * L.k_s[1];
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * D, 0.f);
  const int64_t end = std::min(L.N, (c + 1) * L.chunk);
  for (int64_t n0 = c * L.chunk; n0 < end; n0 += kBlock) {
    const int64_t nb = std::min(kBlock, end - n0);
    int64_t ldk;
    score_tile(L, q, kbase, b, g, n0, nb, w, &ldk);
    float* s = w.s.data();
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * kBlock;
      const float tile_max = max_or_nan(sr, nb);
      const float m_new = std::isnan(tile_max) ? tile_max : std::max(m[r], tile_max);  // keeps a NaN m
      if (std::isnan(m_new)) {  // NaN input: poison the partial, so the merge gives NaN, not "no key"
        m[r] = l[r] = m_new;
        std::fill(sr, sr + nb, m_new);
        continue;
      }
      if (m_new == kNegInf) {  // every key so far hidden: nothing to add, keep m = -inf
        std::fill(sr, sr + nb, 0.f);
        continue;
      }
      if (m_new > m[r]) {
        const float a = std::exp(m[r] - m_new);  // 0 when m was -inf (acc, l are 0 then)
        l[r] *= a;
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= a;
        m[r] = m_new;
      }
      l[r] += exp_shifted(sr, nb, m_new);
    }
    int64_t ldv;
    const float* v = modulated_tile(L, value, delta, span_index, b, g, n0, nb, w, &ldv);
    accumulate_tile(acc, R, s, kBlock, 1, v, ldv, nb, D);
  }
}

// ---------------------------------------------------------------- backward

// total / mass, or 0 for a row that has seen no probability mass yet.
inline float mean_or_zero(float total, float mass) { return mass > 0.f ? total / mass : 0.f; }

// One (b, kv-head g, chunk c) task: the chunk's centred dQ partial dq [R, D] (unscaled),
// kbar [R, D], mu [R] and mass [R] (see the header), and the finished grad_delta_v rows of
// the chunk's span keys.
template <typename scalar_t>
void backward_task(const Layout& L, const float* q32, const float* do32, const float* lse, const scalar_t* key,
                   const scalar_t* value, const scalar_t* delta, const int32_t* span_index, int64_t b, int64_t g,
                   int64_t c, float* dq, float* kbar, float* mu, float* mass, float* grad_delta, Scratch& w) {
  const int64_t R = L.rows, D = L.D;
  const int64_t row0 = (b * L.Hq + g * L.G) * L.T;  // first of the group's R contiguous rows
  const float* q = q32 + row0 * D;
  const float* dout = do32 + row0 * D;
  const scalar_t* kbase = key + b * L.k_s[0] + g * L.k_s[1];
  std::fill(dq, dq + R * D, 0.f);
  std::fill(kbar, kbar + R * D, 0.f);
  std::fill(mass, mass + R, 0.f);
  float* total = w.total.data();  // sum_n p_n dp_n so far
  std::fill(total, total + R, 0.f);
  const int64_t end = std::min(L.N, (c + 1) * L.chunk);
  for (int64_t n0 = c * L.chunk; n0 < end; n0 += kBlock) {
    const int64_t nb = std::min(kBlock, end - n0);
    int64_t ldk;
    const float* k = score_tile(L, q, kbase, b, g, n0, nb, w, &ldk);
    float* p = w.s.data();
    int64_t ldv;
    const float* v = modulated_tile(L, value, delta, span_index, b, g, n0, nb, w, &ldv);
    float* ds = w.dp.data();
    dot_tile(dout, R, v, ldv, nb, D, ds, kBlock);
    for (int64_t r = 0; r < R; ++r) {
      float* pr = p + r * kBlock;
      float* dsr = ds + r * kBlock;
      const float lr = lse[row0 + r];
      float tile_mass = 0.f, tile_total = 0.f;
      if (lr == kNegInf) {  // a row that sees no key: p = 0
        std::fill(pr, pr + nb, 0.f);
      } else {
        tile_mass = exp_shifted(pr, nb, lr);
        for (int64_t j = 0; j < nb; ++j) tile_total += pr[j] * dsr[j];
      }
      const float mu_old = mean_or_zero(total[r], mass[r]);
      total[r] += tile_total;
      mass[r] += tile_mass;
      const float mu_new = mean_or_zero(total[r], mass[r]);
      if (mu_new != mu_old) {  // re-centre the keys so far on the new mean
        const float shift = mu_old - mu_new;
        for (int64_t d = 0; d < D; ++d) dq[r * D + d] += shift * kbar[r * D + d];
      }
      for (int64_t j = 0; j < nb; ++j) dsr[j] = pr[j] * (dsr[j] - mu_new);
    }
    accumulate_tile(dq, R, ds, kBlock, 1, k, ldk, nb, D);
    accumulate_tile(kbar, R, p, kBlock, 1, k, ldk, nb, D);
    if (delta == nullptr) continue;
    for (int64_t j = 0; j < nb; ++j) {
      const int32_t row = span_index[n0 + j];
      if (row < 0) continue;
      float* gv = w.g.data();
      std::fill(gv, gv + D, 0.f);
      accumulate_tile(gv, 1, p + j, 0, kBlock, dout, D, R, D);  // g = sum_r p_rj dO_r
      const float* vj = v + j * ldv;
      float gdotv;
      dot_tile(gv, 1, vj, D, 1, D, &gdotv, 1);
      // (g . v') v' / ||v||^2 as ((g . v') / ||v||) (v' / ||v||): ||v||^2 overflows first.
      const float coef = gdotv * w.inv_norm[j] * w.inv_norm[j], gain = w.gain[j];
      float* out = grad_delta + (((b * L.Hkv + g) * L.S) + row) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = gain * (gv[d] - coef * vj[d]);
    }
  }
  for (int64_t r = 0; r < R; ++r) mu[r] = mean_or_zero(total[r], mass[r]);
}

// ---------------------------------------------------------------- argument checks

// Unit stride along D, as the tile kernels read rows directly.
Tensor dense_rows(const Tensor& x) { return x.stride(-1) == 1 ? x : torch::stable::contiguous(x); }

// Validates the shared arguments and fills the layout (without tensor pointers).
Layout make_layout(const Tensor& query, const Tensor& key, const Tensor& value, const std::optional<Tensor>& delta_v,
                   const Tensor& span_index, const std::optional<Tensor>& attn_bias, double scale, bool causal) {
  const char* op = "value_delta_attention (cpp): ";
  STD_TORCH_CHECK(query.is_cpu(), op, "query must be a CPU tensor, got ", device_str(query));
  STD_TORCH_CHECK(query.dim() == 4, op, "query must be [B, Hq, T, D], got shape ", shape_str(query.sizes()));
  const auto dtype = query.scalar_type();
  STD_TORCH_CHECK(is_float_kernel_dtype(dtype), op, "query must be float32, float16 or bfloat16, got ", dtype);
  Layout L{};
  L.B = query.size(0), L.Hq = query.size(1), L.T = query.size(2), L.D = query.size(3);
  STD_TORCH_CHECK(key.dim() == 4 && key.size(0) == L.B && key.size(3) == L.D, op,
                  "key must be [B, Hkv, N, D] with B = ", L.B, " and D = ", L.D, ", got shape ",
                  shape_str(key.sizes()));
  L.Hkv = key.size(1), L.N = key.size(2);
  STD_TORCH_CHECK(L.Hkv > 0 && L.Hq % L.Hkv == 0, op, "key heads Hkv = ", L.Hkv, " must divide query heads Hq = ",
                  L.Hq, " (GQA)");
  L.G = L.Hq / L.Hkv;
  L.rows = L.G * L.T;
  STD_TORCH_CHECK(same_shape(value, key), op, "value must have key's shape ", shape_str(key.sizes()),
                  ", got ", shape_str(value.sizes()));
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"key", &key}, std::pair{"value", &value}}) {
    STD_TORCH_CHECK(t->is_cpu() && t->scalar_type() == dtype, op, name, " must be a CPU tensor of dtype ", dtype,
                    ", got ", t->scalar_type(), " on ", device_str(*t));
  }
  L.S = 0;
  if (delta_v.has_value()) {
    const Tensor& dv = *delta_v;
    STD_TORCH_CHECK(dv.is_cpu() && dv.scalar_type() == dtype, op, "delta_v must be a CPU tensor of dtype ", dtype,
                    ", got ", dv.scalar_type(), " on ", device_str(dv));
    STD_TORCH_CHECK(dv.dim() == 4 && dv.size(0) == L.B && dv.size(1) == L.Hkv && dv.size(3) == L.D, op,
                    "delta_v must be [B, Hkv, S, D] = [", L.B, ", ", L.Hkv, ", S, ", L.D, "], got shape ",
                    shape_str(dv.sizes()));
    L.S = dv.size(2);
  }
  STD_TORCH_CHECK(span_index.is_cpu() && span_index.scalar_type() == ScalarType::Int && span_index.dim() == 1 &&
                      span_index.size(0) == L.N,
                  op, "span_index must be an int32 CPU tensor of shape [N] = [", L.N, "], got ",
                  span_index.scalar_type(), " of shape ", shape_str(span_index.sizes()));
  L.bias = nullptr;
  if (attn_bias.has_value()) {
    const Tensor& bias = *attn_bias;
    STD_TORCH_CHECK(bias.is_cpu() && bias.scalar_type() == ScalarType::Float, op,
                    "attn_bias must be a float32 CPU tensor, got ", bias.scalar_type(), " on ", device_str(bias));
    const int64_t full[4] = {L.B, L.Hq, L.T, L.N};
    bool ok = bias.dim() == 4;
    for (int64_t i = 0; ok && i < 4; ++i) ok = bias.size(i) == 1 || bias.size(i) == full[i];
    STD_TORCH_CHECK(ok, op, "attn_bias must be 4-D and broadcastable to [B, Hq, T, N] = ", shape_str(Shape(full, 4)),
                    ", got shape ", shape_str(bias.sizes()));
  }
  STD_TORCH_CHECK(std::isfinite(scale), op, "scale must be finite, got ", scale);
  L.causal = causal;
  // Chunks of kChunk keys, fewer (longer) when the partials would pass the budget;
  // both depend only on the shapes, so the split and the bits do not depend on threads.
  const int64_t max_chunks = std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(1, L.B * L.Hq * L.T * (L.D + 2)));
  const int64_t nchunk = std::min((L.N + kChunk - 1) / kChunk, max_chunks);
  L.chunk = nchunk == 0 ? kChunk : ((L.N + nchunk - 1) / nchunk + kBlock - 1) / kBlock * kBlock;
  L.nchunk = (L.N + L.chunk - 1) / L.chunk;
  return L;
}

// span_index must map the span positions one-to-one onto the S rows of delta_v, or an
// unmapped row would come back unwritten (and a repeated one silently double-counted).
void check_span_index(const Layout& L, const int32_t* span_index) {
  std::vector<char> seen(L.S, 0);
  int64_t mapped = 0;
  for (int64_t n = 0; n < L.N; ++n) {
    const int32_t row = span_index[n];
    STD_TORCH_CHECK(row >= -1 && row < L.S, "value_delta_attention (cpp): span_index[", n, "] = ", row,
                " is outside [-1, S) with S = ", L.S, " rows of delta_v");
    if (row < 0) continue;
    STD_TORCH_CHECK(!seen[row], "value_delta_attention (cpp): span_index maps two positions to row ", row,
                " of delta_v");
    seen[row] = 1;
    ++mapped;
  }
  STD_TORCH_CHECK(mapped == L.S, "value_delta_attention (cpp): span_index maps ", mapped,
              " positions, but delta_v has S = ", L.S, " rows");
}

// Resolves the tensor-dependent parts of the layout; returns the tensors it used so
// that they outlive the kernels.
struct Inputs {
  Tensor q32, key, value, delta, span_index;
};

Inputs prepare(Layout& L, const Tensor& query, const Tensor& key, const Tensor& value,
               const std::optional<Tensor>& delta_v, const Tensor& span_index, const std::optional<Tensor>& attn_bias,
               double scale) {
  Inputs in;
  // Scaling q once makes each score a plain dot product. The product is ATen's
  // fp32 q * float(scale), as torch's mul by a Python scalar computes it.
  const Tensor q = contiguous_float(query);
  in.q32 = empty_cpu(query.sizes(), ScalarType::Float);
  const float* src = q.const_data_ptr<float>();
  float* dst = in.q32.mutable_data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  for (int64_t i = 0, n = q.numel(); i < n; ++i) dst[i] = src[i] * fscale;
  in.key = dense_rows(key);
  in.value = dense_rows(value);
  for (int i = 0; i < 3; ++i) L.k_s[i] = in.key.stride(i), L.v_s[i] = in.value.stride(i);
  if (delta_v.has_value()) {
    in.delta = dense_rows(*delta_v);
    for (int i = 0; i < 3; ++i) L.d_s[i] = in.delta.stride(i);
  }
  in.span_index = torch::stable::contiguous(span_index);
  if (in.delta.defined()) check_span_index(L, in.span_index.const_data_ptr<int32_t>());
  if (attn_bias.has_value()) {
    // Read as if expanded to [B, Hq, T, N]: a broadcast dim gets stride 0.
    L.bias = attn_bias->const_data_ptr<float>();
    for (int i = 0; i < 4; ++i) L.bias_s[i] = attn_bias->size(i) == 1 ? 0 : attn_bias->stride(i);
  }
  return in;
}


// ---------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> value_delta_attention_fwd(const Tensor& query, const Tensor& key, const Tensor& value,
                                                     const std::optional<Tensor>& delta_v, const Tensor& span_index,
                                                     const std::optional<Tensor>& attn_bias, double scale,
                                                     bool causal) {
  Layout L = make_layout(query, key, value, delta_v, span_index, attn_bias, scale, causal);
  const Inputs in = prepare(L, query, key, value, delta_v, span_index, attn_bias, scale);
  Tensor out = new_output({L.B, L.Hq, L.T, L.D}, query.scalar_type());
  Tensor lse = new_output({L.B, L.Hq, L.T}, ScalarType::Float);
  const int64_t R = L.rows, D = L.D, tasks = L.B * L.Hkv * L.nchunk;
  // Partials of task i = (b * Hkv + g) * nchunk + c.
  std::vector<float> part_m(tasks * R), part_l(tasks * R), part_acc(tasks * R * D);
  THO_DISPATCH_SWITCH(query.scalar_type(), "value_delta_attention_fwd", VREASON_FLOAT_CASES([&] {
    const scalar_t* k = in.key.const_data_ptr<scalar_t>();
    const scalar_t* v = in.value.const_data_ptr<scalar_t>();
    const scalar_t* dv = in.delta.defined() ? in.delta.const_data_ptr<scalar_t>() : nullptr;
    const int32_t* si = in.span_index.const_data_ptr<int32_t>();
    const float* q32 = in.q32.const_data_ptr<float>();
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch w(R, D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % L.nchunk, bg = i / L.nchunk;
        forward_task(L, q32, k, v, dv, si, bg / L.Hkv, bg % L.Hkv, c, part_m.data() + i * R,
                     part_l.data() + i * R, part_acc.data() + i * R * D, w);
      }
    });
    // Merge, chunk by chunk in ascending order, per output row (b, h, t).
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    float* lse_p = lse.mutable_data_ptr<float>();
    torch::stable::parallel_for(0, L.B * L.Hq * L.T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = row % L.T, h = (row / L.T) % L.Hq, b = row / (L.T * L.Hq);
        const int64_t r = (h % L.G) * L.T + t, task0 = (b * L.Hkv + h / L.G) * L.nchunk;
        float mx = kNegInf;
        for (int64_t c = 0; c < L.nchunk; ++c) {
          const float pm = part_m[(task0 + c) * R + r];
          mx = std::isnan(pm) ? pm : std::max(mx, pm);  // a NaN partial stays NaN (std::max keeps a NaN mx)
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        float total = 0.f;
        if (mx != kNegInf) {
          for (int64_t c = 0; c < L.nchunk; ++c) {
            const int64_t i = (task0 + c) * R + r;
            if (part_m[i] == kNegInf) continue;  // a chunk this row sees none of
            const float a = std::exp(part_m[i] - mx);
            total += a * part_l[i];
            const float* pa = part_acc.data() + i * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += a * pa[d];
          }
        }
        // total >= 1 when mx is finite (the max chunk contributes e^0 * l >= 1).
        const float inv = mx == kNegInf ? 0.f : 1.f / total;
        for (int64_t d = 0; d < D; ++d) o[row * D + d] = static_cast<scalar_t>(acc[d] * inv);
        lse_p[row] = mx == kNegInf ? kNegInf : mx + std::log(total);
      }
    });
  }));
  return {out, lse};
}

std::tuple<Tensor, Tensor> value_delta_attention_bwd(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                     const Tensor& value, const std::optional<Tensor>& delta_v,
                                                     const Tensor& span_index, const std::optional<Tensor>& attn_bias,
                                                     double scale, bool causal, const Tensor& lse) {
  Layout L = make_layout(query, key, value, delta_v, span_index, attn_bias, scale, causal);
  const char* op = "value_delta_attention (cpp): ";
  STD_TORCH_CHECK(grad_out.is_cpu() && same_shape(grad_out, query) && is_floating(grad_out.scalar_type()), op,
                  "grad_out must be a floating CPU tensor of query's shape ", shape_str(query.sizes()), ", got ",
                  grad_out.scalar_type(), " of shape ", shape_str(grad_out.sizes()), " on ", device_str(grad_out));
  STD_TORCH_CHECK(lse.is_cpu() && lse.scalar_type() == ScalarType::Float && lse.dim() == 3 && lse.size(0) == L.B &&
                      lse.size(1) == L.Hq && lse.size(2) == L.T,
                  op, "lse must be a float32 CPU tensor of shape [B, Hq, T] = [", L.B, ", ", L.Hq, ", ", L.T,
                  "], got ", lse.scalar_type(), " of shape ", shape_str(lse.sizes()));
  const Inputs in = prepare(L, query, key, value, delta_v, span_index, attn_bias, scale);
  const Tensor do32 = contiguous_float(grad_out);
  const Tensor lse_c = torch::stable::contiguous(lse);
  const int64_t R = L.rows, D = L.D, rows = L.B * L.Hq * L.T, tasks = L.B * L.Hkv * L.nchunk;
  Tensor grad_query = new_output({L.B, L.Hq, L.T, D}, ScalarType::Float);
  Tensor grad_delta = delta_v.has_value() ? new_output({L.B, L.Hkv, L.S, D}, ScalarType::Float)
                                          : new_output({0}, ScalarType::Float);
  // Partials of task i: centred dQ and kbar [R, D], mean mu and mass [R] (see the header).
  std::vector<float> part_dq(tasks * R * D), part_kbar(tasks * R * D), part_mu(tasks * R), part_mass(tasks * R);
  THO_DISPATCH_SWITCH(query.scalar_type(), "value_delta_attention_bwd", VREASON_FLOAT_CASES([&] {
    const scalar_t* k = in.key.const_data_ptr<scalar_t>();
    const scalar_t* v = in.value.const_data_ptr<scalar_t>();
    const scalar_t* dv = in.delta.defined() ? in.delta.const_data_ptr<scalar_t>() : nullptr;
    const int32_t* si = in.span_index.const_data_ptr<int32_t>();
    float* gd = grad_delta.mutable_data_ptr<float>();
    torch::stable::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch w(R, D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % L.nchunk, bg = i / L.nchunk;
        backward_task(L, in.q32.const_data_ptr<float>(), do32.const_data_ptr<float>(), lse_c.const_data_ptr<float>(),
                      k, v, dv, si,
                      bg / L.Hkv, bg % L.Hkv, c, part_dq.data() + i * R * D, part_kbar.data() + i * R * D,
                      part_mu.data() + i * R, part_mass.data() + i * R, gd, w);
      }
    });
  }));
  // dQ = scale sum_c (dQ_c + (mu_c - Delta) kbar_c), in ascending chunk order.
  float* gq = grad_query.mutable_data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  torch::stable::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % L.T, h = (row / L.T) % L.Hq, b = row / (L.T * L.Hq);
      const int64_t r = (h % L.G) * L.T + t, task0 = (b * L.Hkv + h / L.G) * L.nchunk;
      float mass = 0.f, total = 0.f;
      for (int64_t c = 0; c < L.nchunk; ++c) {
        const int64_t i = (task0 + c) * R + r;
        mass += part_mass[i];
        total += part_mass[i] * part_mu[i];
      }
      const float delta_row = mean_or_zero(total, mass);
      float* o = gq + row * D;
      std::fill(o, o + D, 0.f);
      for (int64_t c = 0; c < L.nchunk; ++c) {
        const int64_t i = (task0 + c) * R + r;
        const float shift = part_mu[i] - delta_row;
        const float* pdq = part_dq.data() + i * D;
        const float* pkbar = part_kbar.data() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] += pdq[d] + shift * pkbar[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] *= fscale;
    }
  });
  return {grad_query, grad_delta};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(vreason_C, CPU, m) {
  m.impl("value_delta_attention_fwd", TORCH_BOX(&value_delta_attention_fwd));
  m.impl("value_delta_attention_bwd", TORCH_BOX(&value_delta_attention_bwd));
}

}  // namespace vreason
