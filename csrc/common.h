// Helpers shared by the C++ kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdlib>
#include <cstring>
#include <limits>

// The build passes no -march flag, so hot loops are compiled for several ISAs and the
// loader picks the best one the CPU supports (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VREASON_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VREASON_SIMD_CLONES
#endif

// The dtypes the fused CPU kernels take (float64 goes to the torch backend).
#define VREASON_FLOAT_CASES(...)              \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

namespace vreason {

// With VREASON_POISON_OUTPUTS=1 (the test suite sets it) outputs start as NaN, so an
// element a kernel forgets to write fails the tests instead of passing on stale memory.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* v = std::getenv("VREASON_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  at::Tensor out = at::empty(shape, options);
  if (poison && out.is_floating_point()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace vreason
