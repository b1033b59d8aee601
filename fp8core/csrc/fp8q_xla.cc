// XLA FFI handlers around fp8core's C kernel (fp8q.c), for fp8core_jax on CPU.
//
// This file holds no numerics: it unpacks XLA buffers and attributes and calls
// the kernel's fp8q_quantize / fp8q_dequantize / fp8q_quantize_tiles /
// fp8q_dequantize_tiles (and the stochastic fp8q_quantize_sr / fp8q_quantize_tiles_sr,
// whose seed and stream arrive as a uint32[2] operand: traced values, so a new stream
// does not recompile) through function pointers that fp8core_jax/_ffi.py binds
// at load time (the addresses of the functions in the installed fp8core._fp8q
// extension), so there is one compiled copy of the quantizer. The codebook's
// constants and the scale rule arrive as attributes (the pow2_torchao threshold
// table as a float32[256] array attribute, empty for the other rules; an MX rule's
// fp8core.mx.binade_table as an int32[1024] one, empty for the others). Built at
// install time (setup.py) or by `python -m fp8core_jax.build` against
// jax.ffi.include_dir() (header-only XLA FFI API); see fp8core_jax/_ffi.py.
//
// Two ABI numbers guard the binding: FP8Q_XLA_ABI_VERSION (this file's handlers
// and exports; fp8core_jax/_ffi.py's FFI_ABI_VERSION) and FP8Q_XLA_KERNEL_ABI (the
// fp8q.c ABI whose fp8q_format and signatures are copied below; fp8q_abi_version()).
// fp8q_xla_bind refuses a kernel of another ABI.
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#define FP8Q_XLA_ABI_VERSION 3
#define FP8Q_XLA_KERNEL_ABI 6

namespace ffi = xla::ffi;

extern "C" {
typedef struct {
  float m, inv_m, floor_, ceiling;
  int32_t mant, emin, bits, negzero, fill_code;
  int32_t scale_rule;
  const float *pow2_thresholds;
  const int32_t *mx_table;
} fp8q_format;  // as in fp8q.c

typedef struct {
  uint32_t seed, stream;
  int32_t sr_bits, transposed;
  int64_t rows, cols;
} fp8q_sr;  // as in fp8q.c

typedef int (*quantize_fn)(const void *, int, int64_t, int64_t, const fp8q_format *, uint8_t *,
                           void *, int, float *, int, int);
typedef int (*dequantize_fn)(const uint8_t *, int64_t, int64_t, const float *, const float *,
                             const fp8q_format *, void *, int, int, int);
typedef int (*quantize_tiles_fn)(const void *, int, int64_t, int64_t, int64_t, int64_t,
                                 const fp8q_format *, uint8_t *, void *, int, float *, int, int);
typedef int (*dequantize_tiles_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t,
                                   const float *, const float *, const fp8q_format *, void *, int,
                                   int, int);

typedef int (*quantize_sr_fn)(const void *, int, int64_t, int64_t, const fp8q_format *,
                              const fp8q_sr *, uint8_t *, float *, int, int);
typedef int (*quantize_tiles_sr_fn)(const void *, int, int64_t, int64_t, int64_t, int64_t,
                                    const fp8q_format *, const fp8q_sr *, uint8_t *, float *, int,
                                    int);

static quantize_fn g_quantize = nullptr;
static quantize_sr_fn g_quantize_sr = nullptr;
static quantize_tiles_sr_fn g_quantize_tiles_sr = nullptr;
static dequantize_fn g_dequantize = nullptr;
static quantize_tiles_fn g_quantize_tiles = nullptr;
static dequantize_tiles_fn g_dequantize_tiles = nullptr;

// This file's ABI (checked by fp8core_jax/_ffi.py before binding).
int fp8q_xla_abi(void) { return FP8Q_XLA_ABI_VERSION; }
// The kernel ABI (fp8q_abi_version()) these declarations were copied from.
int fp8q_xla_kernel_abi(void) { return FP8Q_XLA_KERNEL_ABI; }

// Called once from Python with the loaded kernel's fp8q_abi_version() and its
// entry points. Returns 0, or -1 (nothing bound) for a kernel of another ABI or a
// missing entry point.
int fp8q_xla_bind(int kernel_abi, void *quantize, void *dequantize, void *quantize_tiles,
                  void *dequantize_tiles, void *quantize_sr, void *quantize_tiles_sr) {
  if (kernel_abi != FP8Q_XLA_KERNEL_ABI || !quantize || !dequantize || !quantize_tiles ||
      !dequantize_tiles || !quantize_sr || !quantize_tiles_sr)
    return -1;
  g_quantize_sr = reinterpret_cast<quantize_sr_fn>(quantize_sr);
  g_quantize_tiles_sr = reinterpret_cast<quantize_tiles_sr_fn>(quantize_tiles_sr);
  g_quantize = reinterpret_cast<quantize_fn>(quantize);
  g_dequantize = reinterpret_cast<dequantize_fn>(dequantize);
  g_quantize_tiles = reinterpret_cast<quantize_tiles_fn>(quantize_tiles);
  g_dequantize_tiles = reinterpret_cast<dequantize_tiles_fn>(dequantize_tiles);
  return 0;
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

// The scale constants, the scale rule and (pow2_torchao) the threshold table;
// the rounding fields are zero for dequantize (any codebook).
struct Scales {
  float m, inv_m, floor_, ceiling;
  int32_t scale_rule;
  ffi::Span<const float> pow2_thresholds;
  ffi::Span<const int32_t> mx_table;
};

fp8q_format Format(const Scales &s, int32_t mant = 0, int32_t emin = 0, int32_t bits = 0,
                   int32_t negzero = 0, int32_t fill_code = 0) {
  // a table of the wrong size is passed as NULL, which the kernel rejects for pow2_torchao
  // (and an MX table of the wrong size likewise for the MX rules)
  const float *t = s.pow2_thresholds.size() == 256 ? s.pow2_thresholds.begin() : nullptr;
  const int32_t *mx = s.mx_table.size() == 1024 ? s.mx_table.begin() : nullptr;
  return fp8q_format{s.m, s.inv_m, s.floor_, s.ceiling, mant, emin, bits, negzero, fill_code,
                     s.scale_rule, t, mx};
}

ffi::Error Rejected(const char *what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(what) + " rejected its arguments");
}

ffi::Error Unbound() { return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "fp8q kernel not bound"); }

// x -> (values in vals' dtype, uint8 codes, float32 absmax). An output with no
// elements (while x has some) is not written: callers ask for what they need.
ffi::Error Quantize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> vals,
                    ffi::Result<ffi::Buffer<ffi::U8>> codes, ffi::Result<ffi::Buffer<ffi::F32>> absmax,
                    int64_t group, float m, float inv_m, float floor_, float ceiling, int32_t mant,
                    int32_t emin, int32_t bits, int32_t negzero, int32_t fill_code, int32_t nthreads,
                    int32_t scale_rule, ffi::Span<const float> pow2_thresholds,
                    ffi::Span<const int32_t> mx_table) {
  const int64_t n = static_cast<int64_t>(x.element_count());
  if (g_quantize == nullptr) return Unbound();
  if (n == 0) return ffi::Error::Success();
  const bool want_vals = vals->element_count() == static_cast<size_t>(n);
  const bool want_codes = codes->element_count() == static_cast<size_t>(n);
  const fp8q_format f = Format({m, inv_m, floor_, ceiling, scale_rule, pow2_thresholds, mx_table}, mant, emin,
                               bits, negzero, fill_code);
  const int rc = g_quantize(x.untyped_data(), DtypeCode(x.element_type()), n, group > 0 ? group : n, &f,
                            want_codes ? codes->typed_data() : nullptr,
                            want_vals ? vals->untyped_data() : nullptr,
                            want_vals ? DtypeCode(vals->element_type()) : 0, absmax->typed_data(),
                            nthreads, /*openmp=*/0);  // XLA has no OpenMP pool: POSIX threads
  if (rc != 0) return Rejected("fp8q_quantize");
  return ffi::Error::Success();
}

// (codes, absmax, 256-entry value table) -> values in vals' dtype.
ffi::Error Dequantize(ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax, ffi::Buffer<ffi::F32> table,
                      ffi::Result<ffi::AnyBuffer> vals, int64_t group, float m, float inv_m, float floor_,
                      float ceiling, int32_t nthreads, int32_t scale_rule,
                      ffi::Span<const float> pow2_thresholds,
                      ffi::Span<const int32_t> mx_table) {
  const int64_t n = static_cast<int64_t>(codes.element_count());
  if (g_dequantize == nullptr) return Unbound();
  if (n == 0) return ffi::Error::Success();
  const fp8q_format f = Format({m, inv_m, floor_, ceiling, scale_rule, pow2_thresholds, mx_table});
  const int rc = g_dequantize(codes.typed_data(), n, group > 0 ? group : n, absmax.typed_data(),
                              table.typed_data(), &f, vals->untyped_data(),
                              DtypeCode(vals->element_type()), nthreads, /*openmp=*/0);
  if (rc != 0) return Rejected("fp8q_dequantize");
  return ffi::Error::Success();
}

// 2-D x (row-major) -> (values (R, C), uint8 codes (R, C), float32 absmax grid), in
// tiles of tile_rows x tile_cols. Unwanted outputs have no elements, as Quantize.
ffi::Error QuantizeTiles(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> vals,
                         ffi::Result<ffi::Buffer<ffi::U8>> codes,
                         ffi::Result<ffi::Buffer<ffi::F32>> absmax, int64_t tile_rows,
                         int64_t tile_cols, float m, float inv_m, float floor_, float ceiling,
                         int32_t mant, int32_t emin, int32_t bits, int32_t negzero, int32_t fill_code,
                         int32_t nthreads, int32_t scale_rule, ffi::Span<const float> pow2_thresholds,
                         ffi::Span<const int32_t> mx_table) {
  if (g_quantize_tiles == nullptr) return Unbound();
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fp8q_xla_quantize_tiles: x must be 2-D");
  const int64_t rows = dims[0], cols = dims[1], n = rows * cols;
  if (n == 0) return ffi::Error::Success();
  const bool want_vals = vals->element_count() == static_cast<size_t>(n);
  const bool want_codes = codes->element_count() == static_cast<size_t>(n);
  const fp8q_format f = Format({m, inv_m, floor_, ceiling, scale_rule, pow2_thresholds, mx_table}, mant, emin,
                               bits, negzero, fill_code);
  const int rc = g_quantize_tiles(x.untyped_data(), DtypeCode(x.element_type()), rows, cols, tile_rows,
                                  tile_cols, &f, want_codes ? codes->typed_data() : nullptr,
                                  want_vals ? vals->untyped_data() : nullptr,
                                  want_vals ? DtypeCode(vals->element_type()) : 0,
                                  absmax->typed_data(), nthreads, /*openmp=*/0);
  if (rc != 0) return Rejected("fp8q_quantize_tiles");
  return ffi::Error::Success();
}

// (2-D codes, absmax grid, 256-entry value table) -> values (R, C) in vals' dtype.
ffi::Error DequantizeTiles(ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax,
                           ffi::Buffer<ffi::F32> table, ffi::Result<ffi::AnyBuffer> vals,
                           int64_t tile_rows, int64_t tile_cols, float m, float inv_m, float floor_,
                           float ceiling, int32_t nthreads, int32_t scale_rule,
                           ffi::Span<const float> pow2_thresholds,
                           ffi::Span<const int32_t> mx_table) {
  if (g_dequantize_tiles == nullptr) return Unbound();
  const auto dims = codes.dimensions();
  if (dims.size() != 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fp8q_xla_dequantize_tiles: codes must be 2-D");
  const int64_t rows = dims[0], cols = dims[1];
  if (rows * cols == 0) return ffi::Error::Success();
  const fp8q_format f = Format({m, inv_m, floor_, ceiling, scale_rule, pow2_thresholds, mx_table});
  const int rc = g_dequantize_tiles(codes.typed_data(), rows, cols, tile_rows, tile_cols,
                                    absmax.typed_data(), table.typed_data(), &f, vals->untyped_data(),
                                    DtypeCode(vals->element_type()), nthreads, /*openmp=*/0);
  if (rc != 0) return Rejected("fp8q_dequantize_tiles");
  return ffi::Error::Success();
}

// Stochastic rounding (docs/numerics.md §14): x (flat, or 2-D for tiles) and keys =
// uint32[2] {seed, stream} -> (uint8 codes like x, float32 absmax). `transposed`: x is
// the transpose of the quantizer's input, whose (rows, cols) = x's shape read as
// (rows, cols) attributes (flat) or x's dimensions (tiles), so element p has the index
// (p % cols) * rows + p / cols there.
ffi::Error QuantizeSr(ffi::AnyBuffer x, ffi::Buffer<ffi::U32> keys, ffi::Result<ffi::Buffer<ffi::U8>> codes,
                      ffi::Result<ffi::Buffer<ffi::F32>> absmax, int64_t group, int64_t rows,
                      int64_t cols, int32_t transposed, int32_t sr_bits, float m, float inv_m,
                      float floor_, float ceiling, int32_t mant, int32_t emin, int32_t bits,
                      int32_t negzero, int32_t fill_code, int32_t nthreads, int32_t scale_rule,
                      ffi::Span<const float> pow2_thresholds, ffi::Span<const int32_t> mx_table) {
  const int64_t n = static_cast<int64_t>(x.element_count());
  if (g_quantize_sr == nullptr) return Unbound();
  if (keys.element_count() != 2) return Rejected("fp8q_quantize_sr (keys)");
  if (n == 0) return ffi::Error::Success();
  const fp8q_format f = Format({m, inv_m, floor_, ceiling, scale_rule, pow2_thresholds, mx_table}, mant, emin,
                               bits, negzero, fill_code);
  const uint32_t *k = keys.typed_data();
  const fp8q_sr sr{k[0], k[1], sr_bits, transposed, rows, cols};
  const int rc = g_quantize_sr(x.untyped_data(), DtypeCode(x.element_type()), n, group > 0 ? group : n, &f,
                               &sr, codes->typed_data(), absmax->typed_data(), nthreads, /*openmp=*/0);
  if (rc != 0) return Rejected("fp8q_quantize_sr");
  return ffi::Error::Success();
}

ffi::Error QuantizeTilesSr(ffi::AnyBuffer x, ffi::Buffer<ffi::U32> keys,
                           ffi::Result<ffi::Buffer<ffi::U8>> codes,
                           ffi::Result<ffi::Buffer<ffi::F32>> absmax, int64_t tile_rows,
                           int64_t tile_cols, int32_t transposed, int32_t sr_bits, float m,
                           float inv_m, float floor_, float ceiling, int32_t mant, int32_t emin,
                           int32_t bits, int32_t negzero, int32_t fill_code, int32_t nthreads,
                           int32_t scale_rule, ffi::Span<const float> pow2_thresholds,
                           ffi::Span<const int32_t> mx_table) {
  if (g_quantize_tiles_sr == nullptr) return Unbound();
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fp8q_xla_quantize_tiles_sr: x must be 2-D");
  if (keys.element_count() != 2) return Rejected("fp8q_quantize_tiles_sr (keys)");
  const int64_t rows = dims[0], cols = dims[1];
  if (rows * cols == 0) return ffi::Error::Success();
  const fp8q_format f = Format({m, inv_m, floor_, ceiling, scale_rule, pow2_thresholds, mx_table}, mant, emin,
                               bits, negzero, fill_code);
  const uint32_t *k = keys.typed_data();
  const fp8q_sr sr{k[0], k[1], sr_bits, transposed, rows, cols};
  const int rc = g_quantize_tiles_sr(x.untyped_data(), DtypeCode(x.element_type()), rows, cols, tile_rows,
                                     tile_cols, &f, &sr, codes->typed_data(), absmax->typed_data(),
                                     nthreads, /*openmp=*/0);
  if (rc != 0) return Rejected("fp8q_quantize_tiles_sr");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8q_xla_quantize_sr, QuantizeSr,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols")
                                  .Attr<int32_t>("transposed")
                                  .Attr<int32_t>("sr_bits")
                                  .Attr<float>("m")
                                  .Attr<float>("inv_m")
                                  .Attr<float>("floor")
                                  .Attr<float>("ceiling")
                                  .Attr<int32_t>("mant")
                                  .Attr<int32_t>("emin")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("negzero")
                                  .Attr<int32_t>("fill_code")
                                  .Attr<int32_t>("nthreads")
                                  .Attr<int32_t>("scale_rule")
                                  .Attr<ffi::Span<const float>>("pow2_thresholds")
                                  .Attr<ffi::Span<const int32_t>>("mx_table"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8q_xla_quantize_tiles_sr, QuantizeTilesSr,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols")
                                  .Attr<int32_t>("transposed")
                                  .Attr<int32_t>("sr_bits")
                                  .Attr<float>("m")
                                  .Attr<float>("inv_m")
                                  .Attr<float>("floor")
                                  .Attr<float>("ceiling")
                                  .Attr<int32_t>("mant")
                                  .Attr<int32_t>("emin")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("negzero")
                                  .Attr<int32_t>("fill_code")
                                  .Attr<int32_t>("nthreads")
                                  .Attr<int32_t>("scale_rule")
                                  .Attr<ffi::Span<const float>>("pow2_thresholds")
                                  .Attr<ffi::Span<const int32_t>>("mx_table"));

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
                                  .Attr<int32_t>("nthreads")
                                  .Attr<int32_t>("scale_rule")
                                  .Attr<ffi::Span<const float>>("pow2_thresholds")
                                  .Attr<ffi::Span<const int32_t>>("mx_table"));

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
                                  .Attr<int32_t>("nthreads")
                                  .Attr<int32_t>("scale_rule")
                                  .Attr<ffi::Span<const float>>("pow2_thresholds")
                                  .Attr<ffi::Span<const int32_t>>("mx_table"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8q_xla_quantize_tiles, QuantizeTiles,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols")
                                  .Attr<float>("m")
                                  .Attr<float>("inv_m")
                                  .Attr<float>("floor")
                                  .Attr<float>("ceiling")
                                  .Attr<int32_t>("mant")
                                  .Attr<int32_t>("emin")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("negzero")
                                  .Attr<int32_t>("fill_code")
                                  .Attr<int32_t>("nthreads")
                                  .Attr<int32_t>("scale_rule")
                                  .Attr<ffi::Span<const float>>("pow2_thresholds")
                                  .Attr<ffi::Span<const int32_t>>("mx_table"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(fp8q_xla_dequantize_tiles, DequantizeTiles,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tile_rows")
                                  .Attr<int64_t>("tile_cols")
                                  .Attr<float>("m")
                                  .Attr<float>("inv_m")
                                  .Attr<float>("floor")
                                  .Attr<float>("ceiling")
                                  .Attr<int32_t>("nthreads")
                                  .Attr<int32_t>("scale_rule")
                                  .Attr<ffi::Span<const float>>("pow2_thresholds")
                                  .Attr<ffi::Span<const int32_t>>("mx_table"));
