// Constants and vector row updates shared by the CPU kernels.
#pragma once

#include <cstdint>
#include <limits>

// The build passes no -march flag, so hot loops are compiled for several ISAs and the
// loader picks the best one the CPU supports (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VREASON_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VREASON_SIMD_CLONES
#endif

namespace vreason {
namespace {

// The masked logit / score, and the max of an empty set.
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// out[0:dim] += sum_i coef[i * coef_stride] * rows[i * ld : i * ld + dim], i ascending.
// Four rows per pass over `out` give one load/store of out per four FMAs; the fixed
// order keeps the result bit-identical from run to run.
VREASON_SIMD_CLONES void accumulate_rows(float* __restrict out, const float* __restrict coef, int64_t coef_stride,
                                         const float* __restrict rows, int64_t ld, int64_t n, int64_t dim) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float c0 = coef[i * coef_stride], c1 = coef[(i + 1) * coef_stride];
    const float c2 = coef[(i + 2) * coef_stride], c3 = coef[(i + 3) * coef_stride];
    const float* r0 = rows + i * ld;
    const float* r1 = r0 + ld;
    const float* r2 = r1 + ld;
    const float* r3 = r2 + ld;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] += c0 * r0[d] + c1 * r1[d] + c2 * r2[d] + c3 * r3[d];
  }
  for (; i < n; ++i) {
    const float c = coef[i * coef_stride];
    const float* r = rows + i * ld;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] += c * r[d];
  }
}

}  // namespace
}  // namespace vreason
