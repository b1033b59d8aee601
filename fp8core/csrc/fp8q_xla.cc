// XLA FFI handlers around fp8core's C kernel (fp8q.c), for fp8core_jax on CPU.
//
// This file holds no numerics: it unpacks XLA buffers and attributes and calls
// the kernel's fp8q_quantize / fp8q_dequantize through function pointers that
// fp8core_jax/_ffi.py binds at load time (the addresses of the functions in the
// installed fp8core._fp8q extension), so there is one compiled copy of the
// quantizer. Built on first use against jax.ffi.include_dir() (header-only
// XLA FFI API) and cached; see fp8core_jax/_ffi.py.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
typedef struct {
  float m, inv_m, floor_, ceiling;
  int32_t mant, emin, bits, negzero, fill_code;
  int32_t scale_rule;
  const float *pow2_thresholds;
} fp8q_format;  // as in fp8q.c

typedef int (*quantize_fn)(const void *, int, int64_t, int64_t, const fp8q_format *, uint8_t *,
                           void *, int, float *, int, int);
typedef int (*dequantize_fn)(const uint8_t *, int64_t, int64_t, const float *, const float *,
                             const fp8q_format *, void *, int, int, int);

static quantize_fn g_quantize = nullptr;
static dequantize_fn g_dequantize = nullptr;

// Called once from Python with the kernel's entry points.
void fp8q_xla_bind(void *quantize, void *dequantize) {
  g_quantize = reinterpret_cast<quantize_fn>(quantize);
  g_dequantize = reinterpret_cast<dequantize_fn>(dequantize);
}
}

namespace {

int DtypeCode(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return 0;
    case ffi::DataType::F16: return 1;
    case ffi::DataType::BF16: return 2;
    default: return -1;
  }
}

fp8q_format Format(float m, float inv_m, float floor_, float ceiling, int32_t mant, int32_t emin,
                   int32_t bits, int32_t negzero, int32_t fill_code) {
  return fp8q_format{m, inv_m, floor_, ceiling, mant, emin, bits, negzero, fill_code, 0, nullptr};
}

// x -> (values in vals' dtype, uint8 codes, float32 absmax). An output with no
// elements (while x has some) is not written: callers ask for what they need.
ffi::Error Quantize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> vals,
                    ffi::Result<ffi::Buffer<ffi::U8>> codes, ffi::Result<ffi::Buffer<ffi::F32>> absmax,
                    int64_t group, float m, float inv_m, float floor_, float ceiling, int32_t mant,
                    int32_t emin, int32_t bits, int32_t negzero, int32_t fill_code, int32_t nthreads) {
  const int64_t n = static_cast<int64_t>(x.element_count());
  if (g_quantize == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "fp8q kernel not bound");
  if (n == 0) return ffi::Error::Success();
  const bool want_vals = vals->element_count() == static_cast<size_t>(n);
  const bool want_codes = codes->element_count() == static_cast<size_t>(n);
  const fp8q_format f = Format(m, inv_m, floor_, ceiling, mant, emin, bits, negzero, fill_code);
  const int rc = g_quantize(x.untyped_data(), DtypeCode(x.element_type()), n, group > 0 ? group : n, &f,
                            want_codes ? codes->typed_data() : nullptr,
                            want_vals ? vals->untyped_data() : nullptr,
                            want_vals ? DtypeCode(vals->element_type()) : 0, absmax->typed_data(),
                            nthreads, /*openmp=*/0);  // XLA has no OpenMP pool: POSIX threads
  if (rc != 0) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fp8q_quantize rejected its arguments");
  return ffi::Error::Success();
}

// (codes, absmax, 256-entry value table) -> values in vals' dtype.
ffi::Error Dequantize(ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax, ffi::Buffer<ffi::F32> table,
                      ffi::Result<ffi::AnyBuffer> vals, int64_t group, float m, float inv_m, float floor_,
                      float ceiling, int32_t nthreads) {
  const int64_t n = static_cast<int64_t>(codes.element_count());
  if (g_dequantize == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "fp8q kernel not bound");
  if (n == 0) return ffi::Error::Success();
  const fp8q_format f = Format(m, inv_m, floor_, ceiling, 0, 0, 0, 0, 0);
  const int rc = g_dequantize(codes.typed_data(), n, group > 0 ? group : n, absmax.typed_data(),
                              table.typed_data(), &f, vals->untyped_data(),
                              DtypeCode(vals->element_type()), nthreads, /*openmp=*/0);
  if (rc != 0) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fp8q_dequantize rejected its arguments");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8q_xla_quantize, Quantize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<float>("m")
                                  .Attr<float>("inv_m")
                                  .Attr<float>("floor")
                                  .Attr<float>("ceiling")
                                  .Attr<int32_t>("mant")
                                  .Attr<int32_t>("emin")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("negzero")
                                  .Attr<int32_t>("fill_code")
                                  .Attr<int32_t>("nthreads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8q_xla_dequantize, Dequantize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("group")
                                  .Attr<float>("m")
                                  .Attr<float>("inv_m")
                                  .Attr<float>("floor")
                                  .Attr<float>("ceiling")
                                  .Attr<int32_t>("nthreads"));
