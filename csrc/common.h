// What the kernels take from libtorch, all through its stable ABI (torch/csrc/stable,
// torch/headeronly and the C shims under them), so that one build loads into every
// torch from TORCH_TARGET_VERSION (2.10) on: tensor creation, dtype dispatch, argument
// checks and the few ATen calls the kernels make.
#pragma once

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>

// The dtypes the fused CPU kernels take (float64 goes to the torch backend).
#define VREASON_FLOAT_CASES(...)                                           \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::Float, __VA_ARGS__)    \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::Half, __VA_ARGS__)     \
  THO_DISPATCH_CASE(torch::headeronly::ScalarType::BFloat16, __VA_ARGS__)

namespace vreason {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using Shape = torch::headeronly::IntHeaderOnlyArrayRef;

inline bool is_float_kernel_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// ATen's floating types (what Tensor::is_floating_point() accepted), float8 included.
inline bool is_floating(ScalarType t) {
  switch (t) {
    case ScalarType::Half:
    case ScalarType::Float:
    case ScalarType::Double:
    case ScalarType::BFloat16:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu:
      return true;
    default:
      return false;
  }
}

// Argument checks print shapes as ATen did ("[2, 3]"); the stable array ref has no operator<<.
inline std::string shape_str(Shape s) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << ']';
  return out.str();
}

// "cpu", "cuda:0", "meta", ...: the device names of ATen's messages for the devices a
// caller can hand us; other types print as their number.
inline std::string device_str(const Tensor& t) {
  using torch::headeronly::DeviceType;
  const torch::stable::Device device = t.device();
  std::ostringstream out;
  switch (device.type()) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: out << "cuda"; break;
    case DeviceType::Meta: return "meta";
    case DeviceType::MPS: out << "mps"; break;
    case DeviceType::XPU: out << "xpu"; break;
    default: out << "device type " << static_cast<int>(device.type()); break;
  }
  if (device.index() >= 0) out << ':' << static_cast<int>(device.index());
  return out.str();
}

inline Tensor empty_cpu(Shape shape, ScalarType dtype) {
  return torch::stable::empty(shape, dtype, std::nullopt, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

// With VREASON_POISON_OUTPUTS=1 (the test suite sets it) outputs start as NaN, so an
// element a kernel forgets to write fails the tests instead of passing on stale memory.
// Every output is floating (float32 or the inputs' dtype).
inline Tensor new_output(Shape shape, ScalarType dtype) {
  static const bool poison = [] {
    const char* v = std::getenv("VREASON_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  Tensor out = empty_cpu(shape, dtype);
  if (poison) torch::stable::fill_(out, std::numeric_limits<double>::quiet_NaN());
  return out;
}

// Equal shapes, compared size by size: torch 2.10's IntHeaderOnlyArrayRef has no operator==.
inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i) {
    if (a.size(i) != b.size(i)) return false;
  }
  return true;
}

// x as float32 with unit strides: x itself when it already is.
inline Tensor contiguous_float(const Tensor& x) {
  return torch::stable::contiguous(torch::stable::to(x, ScalarType::Float));
}

// A float32 matrix view of memory the caller owns; col_stride != 1 gives a transposed view.
inline Tensor float_matrix(const float* ptr, int64_t rows, int64_t cols, int64_t row_stride,
                           int64_t col_stride = 1) {
  return torch::stable::from_blob(const_cast<float*>(ptr), {rows, cols}, {row_stride, col_stride},
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU), ScalarType::Float);
}

// out = a @ b and out += a @ b with ATen's CPU GEMM, through the AOTInductor C shim: the
// stable ops offer only an allocating matmul, and a product added afterwards would round
// differently from the GEMM's own accumulation into out.
// Headers from torch 2.13 on carry the original error message across the C boundary
// (looked up at run time, so a 2.10 target still loads); building against torch 2.10's
// headers, which lack that macro, falls back to the header-only check.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define VREASON_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define VREASON_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

inline void mm_into(const Tensor& out, const Tensor& a, const Tensor& b) {
  VREASON_SHIM_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
}

inline void addmm_into(const Tensor& out, const Tensor& a, const Tensor& b) {
  VREASON_SHIM_CHECK(aoti_torch_cpu_addmm_out(out.get(), out.get(), a.get(), b.get(), 1.0, 1.0));
}

}  // namespace vreason
