// CPU kernels of the fused linear entropy (docs/design.md §2.1).
//
// Per row h of hidden, with z_j = (w_j . h + b_j) / tau and p = softmax(z):
//   H = logsumexp(z) - sum_j p_j z_j,   dH/dz_j = -p_j (z_j - mu),   mu = E_p[z],
//   dH/dh = sum_j dH/dz_j w_j / tau.
// The forward keeps, relative to a running max m of z,
//   s = sum e_j,  t = sum e_j d_j,  A = sum e_j w_j,  B = sum e_j d_j w_j,
//   with d_j = z_j - m and e_j = exp(d_j),
// so that H = log s - t/s, mu = m + t/s and
//   dH/dh = -(1/(s tau)) sum_j e_j (d_j - t/s) w_j = -(B - (t/s) A) / (s tau).
// When m rises to m' (r = e^{m-m'}, every d_j shifts by m-m'):
//   t <- r (t + (m-m') s),  B <- r (B + (m-m') A),  s <- r s,  A <- r A.
// The same rule merges two partial states: rebase both on the larger max, then add.
// Hence entropy and dH/dh need each row of W once, right after its logit: W is
// read in tiles that stay in cache between the logit (w_j . h) and the A/B update.
//
// Work split. The vocabulary is cut into fixed chunks of kChunk rows of W (never
// derived from the thread count); each (row, chunk) pair yields a partial state,
// and the partials are merged chunk by chunk in ascending order. So the same input
// gives the same bits at any thread count, with no atomics.
//   * Few rows (decode): a tile is kSubRows rows of W (L2-resident); logits come
//     from hand-vectorised dot products and A/B from vectorised row updates, so W
//     streams from memory exactly once.
//   * Many rows: a tile is a whole chunk and both products are ATen's GEMMs,
//     run single-threaded inside the chunk task, with rows in groups of kGemmRows
//     to bound the partials' memory.
// The weight gradient is a second pass: dW_j = sum_r g_r dH_r/dz_rj h_r / tau with
// dH/dz recomputed from the row statistics (m, log s, H) the forward saved; each
// chunk owns its rows of dW, so no merging. The statistics stay relative to m:
//   p_j = exp(d_j - log s),   z_j - mu = d_j - t/s,   t/s = log s - H,
// where the absolute lse = m + log s and mu = m + t/s, rounded to fp32, would each
// add an error of ulp(m) per coefficient (2-3x plain PyTorch's at logits ~1000).
//
// Masked vocabulary (z_j = -inf) gets e_j = 0 and contributes exactly 0: products
// e_j * d_j are formed only for e_j > 0, so 0 * inf never occurs.
//
// Label log-probabilities (docs/design.md §2.4) ride on the same loops. The forward
// copies z_y out of the logit tile that holds label y (one chunk owns it: one writer)
// and returns log p_y = (z_y - m) - log s, which is <= 0 as formed: m is the max of the
// same z values, and s >= 1 because the max's own term e^0 = 1 is in it. The backward
// adds the label's coefficients to dH/dz's, per (row, vocabulary entry):
//   dL/dz_j = -g_H p_j (z_j - mu) - g_L p_j + g_L [j == y]      (then / tau),
// so the one-hot term lands in dW[y] through the same GEMM as the rest (no scatter),
// and dL/dh = sum_j dL/dz_j w_j is the same coefficients against W, summed per chunk
// and the chunks added in ascending order. Without g_L or g_H its terms are skipped.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cpu/row_ops.h"

namespace vreason {
namespace {

constexpr int64_t kChunk = 2048;      // W rows per parallel task and per merged partial
constexpr int64_t kSubRows = 4;       // W rows per tile of the direct path (4 x D fp32 ~ L1)
constexpr int64_t kBlockRows = 64;    // W rows per block state of the direct path (two-level sums)
constexpr int64_t kDirectMaxRows = 16; // direct tiles measured faster than GEMM tiles up to here
constexpr int64_t kGemmRows = 128;    // hidden rows per group on the GEMM path

// ---------------------------------------------------------------- vector kernels

// out[j] = h . w_j for n rows of w (row stride ldw). Four rows at a time give four
// independent accumulator chains and one load of h per four FMAs.
VREASON_SIMD_CLONES void dot_rows(const float* __restrict h, const float* __restrict w, int64_t ldw, int64_t n,
                                  int64_t dim, float* __restrict out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* w0 = w + j * ldw;
    const float* w1 = w0 + ldw;
    const float* w2 = w1 + ldw;
    const float* w3 = w2 + ldw;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t d = 0; d < dim; ++d) {
      const float x = h[d];
      a0 += x * w0[d];
      a1 += x * w1[d];
      a2 += x * w2[d];
      a3 += x * w3[d];
    }
    out[j] = a0;
    out[j + 1] = a1;
    out[j + 2] = a2;
    out[j + 3] = a3;
  }
  for (; j < n; ++j) {
    const float* wj = w + j * ldw;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t d = 0; d < dim; ++d) a += h[d] * wj[d];
    out[j] = a;
  }
}

// The D-vector half of the rebase rule: B <- r (B + dm A), A <- r A.
VREASON_SIMD_CLONES void rebase_vectors(float* __restrict a, float* __restrict b, float r, float dm, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    b[d] = r * (b[d] + dm * a[d]);
    a[d] = r * a[d];
  }
}

// Upcasts at load. Both conversions are written on the bits so that they vectorise
// on any ISA (the _Float16 cast stays scalar without AVX512-FP16).
VREASON_SIMD_CLONES void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    dst[i] = f;
  }
}

// fp16 -> fp32: shift exponent and mantissa into place and rescale by 2^(127-15),
// which also turns fp16 subnormals into the right fp32 normals; inf/NaN keep an
// all-ones exponent.
VREASON_SIMD_CLONES void widen_fp16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i];
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t body = (h & 0x7fffu) << 13;
    float f;
    std::memcpy(&f, &body, sizeof f);
    f *= 0x1p112f;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits = (h & 0x7c00u) == 0x7c00u ? (body | 0x7f800000u) : bits;
    bits |= sign;
    std::memcpy(&f, &bits, sizeof f);
    dst[i] = f;
  }
}

template <typename scalar_t>
void widen(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, torch::headeronly::BFloat16>) {
    widen_bf16(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    static_assert(std::is_same_v<scalar_t, torch::headeronly::Half>);
    widen_fp16(reinterpret_cast<const uint16_t*>(src), dst, n);
  }
}

// ---------------------------------------------------------------- online state

// One row's (m, s, t, A, B) relative to the running max m; A and B point into the
// partial-state buffer (null when no gradient is wanted).
struct RowState {
  float* m;
  float* s;
  float* t;
  float* a;
  float* b;
};

// The states of a group of rows: stats [3][group] holds (m, s, t), ab [2][group][D]
// holds (A, B) (null when no gradient is wanted).
struct GroupStates {
  float* stats;
  float* ab;
  int64_t group, dim;

  RowState row(int64_t g) const {
    float* a = ab != nullptr ? ab + g * dim : nullptr;
    float* b = ab != nullptr ? ab + (group + g) * dim : nullptr;
    return {stats + g, stats + group + g, stats + 2 * group + g, a, b};
  }
  // The empty state: m = -inf, s = t = 0, A = B = 0.
  void reset() const {
    std::fill(stats, stats + group, kNegInf);
    std::fill(stats + group, stats + 3 * group, 0.f);
    if (ab != nullptr) std::fill(ab, ab + 2 * group * dim, 0.f);
  }
};

void rebase(const RowState& st, float m_new, int64_t dim) {
  // An empty state (m = -inf) holds exact zeros: only its max moves. This also keeps
  // (m - m_new) = -inf away from the products below.
  if (*st.m == kNegInf || *st.m == m_new) {
    *st.m = m_new;
    return;
  }
  const float dm = *st.m - m_new;
  const float r = std::exp(dm);
  *st.t = r * (*st.t + dm * *st.s);
  *st.s = r * *st.s;
  if (st.a != nullptr) rebase_vectors(st.a, st.b, r, dm, dim);
  *st.m = m_new;
}

// Sum of x[0, n) by pairwise halving: O(log n) ulps of error, as torch.sum, where a
// running sum over a 2048-row chunk loses O(sqrt n) and H and dH/dh then miss the
// 2x-of-PyTorch bound for all-positive logits. Fixed split points: same bits every run.
float pairwise_sum(const float* x, int64_t n) {
  if (n <= 16) {
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) acc += x[i];
    return acc;
  }
  const int64_t half = n / 2;
  return pairwise_sum(x, half) + pairwise_sum(x + half, n - half);
}

// acc <- acc (+) part: both rebased onto the larger max, then added (part is left rebased).
void merge_state(const RowState& acc, const RowState& part, int64_t dim) {
  const float top = std::max(*acc.m, *part.m);
  if (top == kNegInf) return;  // both fully masked so far
  rebase(acc, top, dim);
  rebase(part, top, dim);
  *acc.s += *part.s;
  *acc.t += *part.t;
  if (acc.a != nullptr) {
    const float one = 1.f;
    accumulate_rows(acc.a, &one, 1, part.a, dim, 1, dim);
    accumulate_rows(acc.b, &one, 1, part.b, dim, 1, dim);
  }
}

// Folds the scaled logits z[0, n) of one row into its state and writes the weights
// e_j, e_j d_j of the A/B update. Returns false when the whole tile is masked.
bool fold_tile(const RowState& st, const float* z, int64_t n, int64_t dim, float* e, float* f) {
  float tile_max = kNegInf;
  for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, z[j]);
  if (tile_max == kNegInf) {
    std::fill(e, e + n, 0.f);
    std::fill(f, f + n, 0.f);
    return false;
  }
  if (tile_max > *st.m) rebase(st, tile_max, dim);
  const float m = *st.m;
  for (int64_t j = 0; j < n; ++j) {
    const float d = z[j] - m;
    const float ej = std::exp(d);  // exp(-inf) = 0 for masked entries
    e[j] = ej;
    f[j] = ej > 0.f ? ej * d : 0.f;
  }
  *st.s += pairwise_sum(e, n);
  *st.t += pairwise_sum(f, n);
  return true;
}

// ---------------------------------------------------------------- shared tile logic

// Everything one call needs, in fp32 where the kernels read it.
template <typename scalar_t>
struct Problem {
  const float* hidden;      // [R, D] fp32 (upcast once)
  const scalar_t* weight;   // [V, D], row stride ldw
  int64_t ldw;
  const scalar_t* bias;     // [V] or null
  scalar_t* logits;         // [R, V] or null
  const int64_t* labels;    // [R] or null: a row's label, no label when outside [0, V)
  float* label_z;           // [R] (with labels): the forward copies z_y here
  int64_t rows, dim, vocab;
  float inv_tau;
  bool gemm;                // GEMM tiles (many rows) or direct tiles (few rows)
};

// Per-task scratch: the fp32 copy of a W tile (when W is not fp32) and the logit
// tile [group, tile]. The direct path works on raw pointers from here on: building
// tensors per 16-row tile would cost as much as the arithmetic.
struct TileScratch {
  Tensor wbuf_, z_;
  float* wbuf = nullptr;
  float* z = nullptr;
  int64_t tile = 0;
};

template <typename scalar_t>
TileScratch make_scratch(const Problem<scalar_t>& p, int64_t group, int64_t tile) {
  TileScratch sc;
  if (!std::is_same_v<scalar_t, float>) {
    sc.wbuf_ = empty_cpu({tile, p.dim}, ScalarType::Float);
    sc.wbuf = sc.wbuf_.mutable_data_ptr<float>();
  }
  sc.z_ = empty_cpu({group, tile}, ScalarType::Float);
  sc.z = sc.z_.mutable_data_ptr<float>();
  sc.tile = tile;
  return sc;
}

// fp32 rows of a W tile: the weight itself when fp32, else a widened copy.
struct WeightTile {
  const float* ptr;
  int64_t ld;
};

template <typename scalar_t>
WeightTile weight_tile(const Problem<scalar_t>& p, const TileScratch& sc, int64_t j0, int64_t n) {
  const scalar_t* src = p.weight + j0 * p.ldw;
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {src, p.ldw};
  } else {
    for (int64_t j = 0; j < n; ++j) widen(src + j * p.ldw, sc.wbuf + j * p.dim, p.dim);
    return {sc.wbuf, p.dim};
  }
}

// sc.z[g, j] = (w_{j0+j} . h_{r0+g} + b) / tau for the rows of a group (row stride
// sc.tile), also storing the unscaled logits when asked.
template <typename scalar_t>
void logit_tile(const Problem<scalar_t>& p, const TileScratch& sc, WeightTile w, int64_t r0, int64_t group,
                int64_t j0, int64_t n) {
  const float* h = p.hidden + r0 * p.dim;
  if (p.gemm) {
    // z [group, n] = h [group, D] @ W_tile^T (W_tile read through a transposed view)
    mm_into(float_matrix(sc.z, group, n, sc.tile), float_matrix(h, group, p.dim, p.dim),
            float_matrix(w.ptr, p.dim, n, 1, w.ld));
  } else {
    for (int64_t g = 0; g < group; ++g) dot_rows(h + g * p.dim, w.ptr, w.ld, n, p.dim, sc.z + g * sc.tile);
  }
  for (int64_t g = 0; g < group; ++g) {
    float* zr = sc.z + g * sc.tile;
    if (p.bias != nullptr)
      for (int64_t j = 0; j < n; ++j) zr[j] += static_cast<float>(p.bias[j0 + j]);
    if (p.logits != nullptr) {
      scalar_t* out = p.logits + (r0 + g) * p.vocab + j0;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(zr[j]);
    }
    for (int64_t j = 0; j < n; ++j) zr[j] *= p.inv_tau;
  }
}

// ---------------------------------------------------------------- forward

// Fills the partial states of rows [r0, r0 + group) over vocabulary chunk c (see
// GroupStates for the layout).
//
// Direct tiles are folded into a block state that is merged into the chunk's every
// kBlockRows rows of W: a two-level sum (16 tiles, then 32 blocks) instead of a running
// one over the chunk's 512 tiles, whose O(sqrt n) rounding the cancellation in
// B - (t/s) A amplifies (4x plain PyTorch's dH/dh error for all-positive weights).
// GEMM tiles span the whole chunk, so their state is the chunk's.
template <typename scalar_t>
void forward_chunk(const Problem<scalar_t>& p, int64_t r0, int64_t group, int64_t c, const GroupStates& chunk) {
  const int64_t j_begin = c * kChunk, j_end = std::min(p.vocab, j_begin + kChunk);
  const int64_t tile = p.gemm ? j_end - j_begin : kSubRows;
  const bool need_grad = chunk.ab != nullptr;
  TileScratch sc = make_scratch(p, group, tile);
  Tensor ef = empty_cpu({2 * group, tile}, ScalarType::Float);  // e rows, then e*d rows
  float* ep = ef.mutable_data_ptr<float>();
  Tensor block_buf;
  GroupStates block = chunk;
  if (!p.gemm) {
    block_buf = empty_cpu({(3 + (need_grad ? 2 * p.dim : 0)) * group}, ScalarType::Float);
    float* bp = block_buf.mutable_data_ptr<float>();
    block = GroupStates{bp, need_grad ? bp + 3 * group : nullptr, group, p.dim};
    block.reset();
  }
  chunk.reset();
  for (int64_t j0 = j_begin; j0 < j_end; j0 += tile) {
    const int64_t n = std::min(tile, j_end - j0);
    const WeightTile w = weight_tile(p, sc, j0, n);
    logit_tile(p, sc, w, r0, group, j0, n);
    if (p.labels != nullptr) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t y = p.labels[r0 + g];
        if (y >= j0 && y < j0 + n) p.label_z[r0 + g] = sc.z[g * tile + (y - j0)];
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      const RowState st = block.row(g);
      float* e = ep + g * tile;
      float* f = ep + (group + g) * tile;
      const bool live = fold_tile(st, sc.z + g * tile, n, p.dim, e, f);
      if (need_grad && live && !p.gemm) {
        accumulate_rows(st.a, e, 1, w.ptr, w.ld, n, p.dim);
        accumulate_rows(st.b, f, 1, w.ptr, w.ld, n, p.dim);
      }
    }
    if (need_grad && p.gemm) {
      // [A; B] += [E; F] @ W_tile, after fold_tile has rebased A and B.
      addmm_into(float_matrix(chunk.ab, 2 * group, p.dim, p.dim), float_matrix(ep, 2 * group, n, tile),
                 float_matrix(w.ptr, n, p.dim, w.ld));
    }
    if (!p.gemm && ((j0 + n - j_begin) % kBlockRows == 0 || j0 + n == j_end)) {
      for (int64_t g = 0; g < group; ++g) merge_state(chunk.row(g), block.row(g), p.dim);
      block.reset();
      // Restart at the chunk's max: the block then rebases only when the max rises.
      std::copy(chunk.stats, chunk.stats + group, block.stats);
    }
  }
}

// ---------------------------------------------------------------- argument checks

void check_inputs(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                  double temperature) {
  STD_TORCH_CHECK(hidden.is_cpu() && weight.is_cpu(), "linear_entropy (cpp): hidden and weight must be CPU tensors, got ",
                  device_str(hidden), " and ", device_str(weight));
  STD_TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(),
                  "linear_entropy (cpp): hidden must be a contiguous [R, D] tensor, got shape ", shape_str(hidden.sizes()));
  const auto dtype = hidden.scalar_type();
  STD_TORCH_CHECK(is_float_kernel_dtype(dtype), "linear_entropy (cpp): hidden must be float32, float16 or bfloat16, got ",
                  dtype);
  STD_TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
                  "linear_entropy (cpp): weight must have shape [V, D] with D = ", hidden.size(1), ", got ",
                  shape_str(weight.sizes()));
  STD_TORCH_CHECK(weight.size(0) > 0, "linear_entropy (cpp): weight must have V >= 1 rows");
  STD_TORCH_CHECK(weight.stride(1) == 1, "linear_entropy (cpp): weight must have unit stride along D, got strides ",
                  shape_str(weight.strides()));
  STD_TORCH_CHECK(weight.scalar_type() == dtype, "linear_entropy (cpp): weight dtype ", weight.scalar_type(),
                  " must match hidden dtype ", dtype);
  if (bias.has_value()) {
    const Tensor& b = *bias;
    STD_TORCH_CHECK(b.is_cpu() && b.dim() == 1 && b.size(0) == weight.size(0) && b.is_contiguous(),
                    "linear_entropy (cpp): bias must be a contiguous CPU tensor of shape [", weight.size(0), "], got ",
                    shape_str(b.sizes()));
    STD_TORCH_CHECK(b.scalar_type() == dtype, "linear_entropy (cpp): bias dtype ", b.scalar_type(),
                    " must match hidden dtype ", dtype);
  }
  STD_TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
                  "linear_entropy (cpp): temperature must be finite and > 0, got ", temperature);
}

void check_row_stat(const char* name, const Tensor& x, int64_t rows) {
  STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Float && x.dim() == 1 && x.size(0) == rows &&
                      x.is_contiguous(),
                  "linear_entropy backward (cpp): ", name, " must be a contiguous float32 CPU tensor of shape [",
                  rows, "], got ", x.scalar_type(), " ", shape_str(x.sizes()));
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const Tensor& hidden32, const Tensor& weight, const std::optional<Tensor>& bias,
                               double temperature, Tensor* logits) {
  Problem<scalar_t> p;
  p.hidden = hidden32.const_data_ptr<float>();
  p.weight = weight.const_data_ptr<scalar_t>();
  p.ldw = weight.stride(0);
  p.bias = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
  p.logits = logits != nullptr ? logits->mutable_data_ptr<scalar_t>() : nullptr;
  p.labels = nullptr;
  p.label_z = nullptr;
  p.rows = hidden32.size(0);
  p.dim = hidden32.size(1);
  p.vocab = weight.size(0);
  p.inv_tau = static_cast<float>(1.0 / temperature);
  p.gemm = p.rows > kDirectMaxRows;
  return p;
}

// The forward's per-row outputs; dh, mean (t/s = mu - m) and logp may be null.
struct RowOutputs {
  float* entropy;
  float* dh;
  float* row_max;
  float* log_sum;
  float* mean;
  float* logp;
};

template <typename scalar_t>
void forward_impl(const Problem<scalar_t>& p, const RowOutputs& out) {
  const bool need_grad = out.dh != nullptr;
  const int64_t chunks = (p.vocab + kChunk - 1) / kChunk;
  const int64_t group_max = p.gemm ? kGemmRows : p.rows;
  const int64_t dim = p.dim;
  Tensor stats = empty_cpu({chunks, 3, group_max}, ScalarType::Float);
  Tensor ab = need_grad ? empty_cpu({chunks, 2, group_max, dim}, ScalarType::Float) : Tensor();
  for (int64_t r0 = 0; r0 < p.rows; r0 += group_max) {
    const int64_t group = std::min(group_max, p.rows - r0);
    float* sp = stats.mutable_data_ptr<float>();
    float* abp = need_grad ? ab.mutable_data_ptr<float>() : nullptr;
    // Chunk c's partial sits at a fixed offset sized for a full group; inside it the
    // layout is [3][group] and [2][group][D] (see GroupStates).
    auto chunk_states = [&](int64_t c) {
      return GroupStates{sp + c * 3 * group_max, need_grad ? abp + c * 2 * group_max * dim : nullptr, group, dim};
    };
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) forward_chunk(p, r0, group, c, chunk_states(c));
    });
    // Merge every row's partials in ascending chunk order into chunk 0's slot.
    torch::stable::parallel_for(0, group, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const RowState acc = chunk_states(0).row(g);
        for (int64_t c = 1; c < chunks; ++c) merge_state(acc, chunk_states(c).row(g), dim);
        const int64_t r = r0 + g;
        const float s = *acc.s, ts = *acc.t / s;
        out.entropy[r] = std::log(s) - ts;
        out.row_max[r] = *acc.m;
        out.log_sum[r] = std::log(s);
        if (out.mean != nullptr) out.mean[r] = ts;
        if (out.logp != nullptr) {
          const int64_t y = p.labels[r];
          out.logp[r] = y >= 0 && y < p.vocab ? (p.label_z[r] - *acc.m) - std::log(s) : 0.f;
        }
        if (need_grad) {
          // dH/dh = -(B - (t/s) A) / (s tau)
          const float scale = -p.inv_tau / s;
          float* dh = out.dh + r * dim;
          for (int64_t d = 0; d < dim; ++d) dh[d] = scale * (acc.b[d] - ts * acc.a[d]);
        }
      }
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_entropy_fwd(const Tensor& hidden, const Tensor& weight,
                                                                      const std::optional<Tensor>& bias,
                                                                      double temperature, bool need_grad,
                                                                      bool return_logits) {
  check_inputs(hidden, weight, bias, temperature);
  const int64_t rows = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  const ScalarType f32 = ScalarType::Float;
  Tensor entropy = new_output({rows}, f32);
  Tensor dh = new_output(need_grad ? Shape{rows, dim} : Shape{0}, f32);
  Tensor row_max = new_output({rows}, f32);
  Tensor log_sum = new_output({rows}, f32);
  Tensor logits = new_output(return_logits ? Shape{rows, vocab} : Shape{0}, hidden.scalar_type());
  if (rows == 0) return {entropy, dh, row_max, log_sum, logits};
  const Tensor hidden32 = contiguous_float(hidden);
  THO_DISPATCH_SWITCH(hidden.scalar_type(), "linear_entropy_fwd", VREASON_FLOAT_CASES([&] {
    const auto p = make_problem<scalar_t>(hidden32, weight, bias, temperature, return_logits ? &logits : nullptr);
    forward_impl(p, RowOutputs{entropy.mutable_data_ptr<float>(), need_grad ? dh.mutable_data_ptr<float>() : nullptr,
                               row_max.mutable_data_ptr<float>(), log_sum.mutable_data_ptr<float>(), nullptr,
                               nullptr});
  }));
  return {entropy, dh, row_max, log_sum, logits};
}

// ---------------------------------------------------------------- backward

// What the backward's coefficients are made of, per row: the forward's statistics,
// the incoming gradients (g_ent, g_lp null when that output got none) and the labels.
struct GradInputs {
  const float* row_max;
  const float* log_sum;
  const float* mean;   // t/s = mu - m
  const float* g_ent;  // [R] or null
  const float* g_lp;   // [R] or null (then labels is unused)
  const int64_t* labels;
};

// The gradients for rows [r0, r0 + group) from the W rows of chunk c: dW/db rows of the
// chunk (gw/gb, null when not wanted) accumulate over the groups, which the caller runs
// in ascending order; dh_part [group, D] (null when not wanted) gets this chunk's
// sum_j c_rj w_j. Coefficients c_rj = dL/dz_rj / tau are laid out [j][r] so both paths
// read them as the weights of a sum over hidden rows.
template <typename scalar_t>
void grad_chunk(const Problem<scalar_t>& p, const GradInputs& in, int64_t c, int64_t r0, int64_t group, float* gw,
                float* gb, float* dh_part) {
  const int64_t j_begin = c * kChunk, j_end = std::min(p.vocab, j_begin + kChunk);
  const int64_t tile = p.gemm ? j_end - j_begin : kSubRows;
  TileScratch sc = make_scratch(p, group, tile);
  Tensor coef = empty_cpu({tile, group}, ScalarType::Float);
  float* cp = coef.mutable_data_ptr<float>();
  if (r0 == 0 && gw != nullptr) std::fill(gw + j_begin * p.dim, gw + j_end * p.dim, 0.f);
  if (r0 == 0 && gb != nullptr) std::fill(gb + j_begin, gb + j_end, 0.f);
  if (dh_part != nullptr) std::fill(dh_part, dh_part + group * p.dim, 0.f);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += tile) {
    const int64_t n = std::min(tile, j_end - j0);
    const WeightTile w = weight_tile(p, sc, j0, n);
    logit_tile(p, sc, w, r0, group, j0, n);
    const float* zp = sc.z;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = r0 + g;
      const float ent_scale = in.g_ent != nullptr ? -in.g_ent[r] * p.inv_tau : 0.f;
      const float lp_scale = in.g_lp != nullptr ? in.g_lp[r] * p.inv_tau : 0.f;
      const int64_t label = in.g_lp != nullptr ? in.labels[r] - j0 : -1;
      for (int64_t j = 0; j < n; ++j) {
        // An all-masked row (m = -inf) gives d = NaN, so prob > 0 fails: no contribution.
        const float d = zp[g * tile + j] - in.row_max[r];
        const float prob = std::exp(d - in.log_sum[r]);
        float cj = 0.f;
        if (prob > 0.f) {
          if (in.g_ent != nullptr) cj = ent_scale * prob * (d - in.mean[r]);
          if (in.g_lp != nullptr) cj -= lp_scale * prob;
        }
        if (j == label) cj += lp_scale;
        cp[j * group + g] = cj;
      }
    }
    const float* h = p.hidden + r0 * p.dim;
    if (gw != nullptr) {
      if (p.gemm) {
        addmm_into(float_matrix(gw + j0 * p.dim, n, p.dim, p.dim), float_matrix(cp, n, group, group),
                   float_matrix(h, group, p.dim, p.dim));
      } else {
        for (int64_t j = 0; j < n; ++j) accumulate_rows(gw + (j0 + j) * p.dim, cp + j * group, 1, h, p.dim, group, p.dim);
      }
    }
    if (gb != nullptr)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t g = 0; g < group; ++g) gb[j0 + j] += cp[j * group + g];
    if (dh_part != nullptr) {
      if (p.gemm) {
        // dh_part [group, D] += C^T [group, n] @ W_tile [n, D]
        addmm_into(float_matrix(dh_part, group, p.dim, p.dim), float_matrix(cp, group, n, 1, group),
                   float_matrix(w.ptr, n, p.dim, w.ld));
      } else {
        for (int64_t g = 0; g < group; ++g) accumulate_rows(dh_part + g * p.dim, cp + g, group, w.ptr, w.ld, n, p.dim);
      }
    }
  }
}

// dh [R, D], dW [V, D], db [V] (each null when not wanted). Rows go in groups, in
// ascending order; within a group every vocabulary chunk is a parallel task that owns
// its rows of dW/db and its slot of dh's per-chunk partials, which are then added in
// ascending chunk order: the same bits at any thread count.
template <typename scalar_t>
void backward_impl(const Problem<scalar_t>& p, const GradInputs& in, float* dh, float* gw, float* gb) {
  const int64_t chunks = (p.vocab + kChunk - 1) / kChunk;
  const int64_t group_max = p.gemm ? kGemmRows : p.rows;
  const int64_t dim = p.dim;
  Tensor parts = dh != nullptr ? empty_cpu({chunks, group_max, dim}, ScalarType::Float) : Tensor();
  float* pp = dh != nullptr ? parts.mutable_data_ptr<float>() : nullptr;
  for (int64_t r0 = 0; r0 < p.rows; r0 += group_max) {
    const int64_t group = std::min(group_max, p.rows - r0);
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        grad_chunk(p, in, c, r0, group, gw, gb, pp != nullptr ? pp + c * group_max * dim : nullptr);
    });
    if (dh == nullptr) continue;
    torch::stable::parallel_for(0, group, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        float* out = dh + (r0 + g) * dim;
        std::copy(pp + g * dim, pp + (g + 1) * dim, out);
        const float one = 1.f;
        for (int64_t c = 1; c < chunks; ++c) accumulate_rows(out, &one, 1, pp + (c * group_max + g) * dim, dim, 1, dim);
      }
    });
  }
}

std::tuple<Tensor, Tensor> linear_entropy_weight_grad(const Tensor& hidden, const Tensor& weight,
                                                      const std::optional<Tensor>& bias, double temperature,
                                                      const Tensor& row_max, const Tensor& log_sum,
                                                      const Tensor& entropy, const Tensor& grad_entropy,
                                                      bool need_bias) {
  check_inputs(hidden, weight, bias, temperature);
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  check_row_stat("row_max", row_max, rows);
  check_row_stat("log_sum", log_sum, rows);
  check_row_stat("entropy", entropy, rows);
  check_row_stat("grad_entropy", grad_entropy, rows);
  Tensor gw = new_output(weight.sizes(), ScalarType::Float);
  Tensor gb = new_output(need_bias ? Shape{vocab} : Shape{0}, ScalarType::Float);
  if (rows == 0) {
    torch::stable::zero_(gw);
    torch::stable::zero_(gb);
    return {gw, gb};
  }
  // t/s = log s - H: the weight gradient has no cancellation that would need the
  // forward's own t/s (docs/design.md §2.1).
  Tensor mean = empty_cpu({rows}, ScalarType::Float);
  float* mp = mean.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) mp[r] = log_sum.const_data_ptr<float>()[r] - entropy.const_data_ptr<float>()[r];
  const Tensor hidden32 = contiguous_float(hidden);
  THO_DISPATCH_SWITCH(hidden.scalar_type(), "linear_entropy_weight_grad", VREASON_FLOAT_CASES([&] {
    const auto p = make_problem<scalar_t>(hidden32, weight, bias, temperature, nullptr);
    const GradInputs in{row_max.const_data_ptr<float>(), log_sum.const_data_ptr<float>(), mp,
                        grad_entropy.const_data_ptr<float>(), nullptr, nullptr};
    backward_impl(p, in, nullptr, gw.mutable_data_ptr<float>(), need_bias ? gb.mutable_data_ptr<float>() : nullptr);
  }));
  return {gw, gb};
}

// ---------------------------------------------------------------- label log-probability

void check_labels(const Tensor& labels, int64_t rows) {
  STD_TORCH_CHECK(labels.is_cpu() && labels.scalar_type() == ScalarType::Long && labels.dim() == 1 &&
                      labels.size(0) == rows && labels.is_contiguous(),
                  "linear_logprob_entropy (cpp): labels must be a contiguous int64 CPU tensor of shape [", rows,
                  "], got ", labels.scalar_type(), " ", shape_str(labels.sizes()));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_logprob_entropy_fwd(const Tensor& hidden,
                                                                              const Tensor& weight,
                                                                              const std::optional<Tensor>& bias,
                                                                              const Tensor& labels,
                                                                              double temperature) {
  check_inputs(hidden, weight, bias, temperature);
  const int64_t rows = hidden.size(0);
  check_labels(labels, rows);
  const ScalarType f32 = ScalarType::Float;
  Tensor logp = new_output({rows}, f32);
  Tensor entropy = new_output({rows}, f32);
  Tensor row_max = new_output({rows}, f32);
  Tensor log_sum = new_output({rows}, f32);
  Tensor mean = new_output({rows}, f32);
  if (rows == 0) return {logp, entropy, row_max, log_sum, mean};
  const Tensor hidden32 = contiguous_float(hidden);
  Tensor label_z = empty_cpu({rows}, f32);
  THO_DISPATCH_SWITCH(hidden.scalar_type(), "linear_logprob_entropy_fwd", VREASON_FLOAT_CASES([&] {
    auto p = make_problem<scalar_t>(hidden32, weight, bias, temperature, nullptr);
    p.labels = labels.const_data_ptr<int64_t>();
    p.label_z = label_z.mutable_data_ptr<float>();
    forward_impl(p, RowOutputs{entropy.mutable_data_ptr<float>(), nullptr, row_max.mutable_data_ptr<float>(),
                               log_sum.mutable_data_ptr<float>(), mean.mutable_data_ptr<float>(),
                               logp.mutable_data_ptr<float>()});
  }));
  return {logp, entropy, row_max, log_sum, mean};
}

std::tuple<Tensor, Tensor, Tensor> linear_logprob_entropy_bwd(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& labels,
    double temperature, const Tensor& row_max, const Tensor& log_sum, const Tensor& mean,
    const std::optional<Tensor>& grad_logp, const std::optional<Tensor>& grad_entropy, bool need_hidden,
    bool need_weight, bool need_bias) {
  check_inputs(hidden, weight, bias, temperature);
  const int64_t rows = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  check_labels(labels, rows);
  check_row_stat("row_max", row_max, rows);
  check_row_stat("log_sum", log_sum, rows);
  check_row_stat("mean", mean, rows);
  if (grad_logp.has_value()) check_row_stat("grad_logp", *grad_logp, rows);
  if (grad_entropy.has_value()) check_row_stat("grad_entropy", *grad_entropy, rows);
  const ScalarType f32 = ScalarType::Float;
  Tensor dh = new_output(need_hidden ? Shape{rows, dim} : Shape{0}, f32);
  Tensor gw = new_output(need_weight ? Shape{vocab, dim} : Shape{0}, f32);
  Tensor gb = new_output(need_bias ? Shape{vocab} : Shape{0}, f32);
  if (rows == 0 || (!grad_logp.has_value() && !grad_entropy.has_value()) ||
      (!need_hidden && !need_weight && !need_bias)) {
    torch::stable::zero_(dh);
    torch::stable::zero_(gw);
    torch::stable::zero_(gb);
    return {dh, gw, gb};
  }
  const Tensor hidden32 = contiguous_float(hidden);
  THO_DISPATCH_SWITCH(hidden.scalar_type(), "linear_logprob_entropy_bwd", VREASON_FLOAT_CASES([&] {
    const auto p = make_problem<scalar_t>(hidden32, weight, bias, temperature, nullptr);
    const GradInputs in{row_max.const_data_ptr<float>(), log_sum.const_data_ptr<float>(),
                        mean.const_data_ptr<float>(),
                        grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr,
                        grad_logp.has_value() ? grad_logp->const_data_ptr<float>() : nullptr,
                        labels.const_data_ptr<int64_t>()};
    backward_impl(p, in, need_hidden ? dh.mutable_data_ptr<float>() : nullptr,
                  need_weight ? gw.mutable_data_ptr<float>() : nullptr,
                  need_bias ? gb.mutable_data_ptr<float>() : nullptr);
  }));
  return {dh, gw, gb};
}

}  // namespace
}  // namespace vreason

STABLE_TORCH_LIBRARY_IMPL(vreason_C, CPU, m) {
  m.impl("linear_entropy_fwd", TORCH_BOX(&vreason::linear_entropy_fwd));
  m.impl("linear_entropy_weight_grad", TORCH_BOX(&vreason::linear_entropy_weight_grad));
  m.impl("linear_logprob_entropy_fwd", TORCH_BOX(&vreason::linear_logprob_entropy_fwd));
  m.impl("linear_logprob_entropy_bwd", TORCH_BOX(&vreason::linear_logprob_entropy_bwd));
}
