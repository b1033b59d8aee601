/*
 * fp8q: the fused CPU quantizer of fp8core (docs/numerics.md §3-§4), in plain C.
 *
 * One pass per block: the block's absmax is computed while the block sits in
 * cache, then the block is scaled, saturated, rounded and (optionally)
 * dequantized and written out -- codes and/or values, never an intermediate
 * tensor. Global quantization needs two passes (absmax first). Work is split
 * over `nthreads` threads (whole blocks per thread; element ranges for global
 * groups): an OpenMP team when the caller asks (torch: its intra-op pool is
 * libgomp too, so the team reuses those threads instead of competing with them
 * while they spin after torch's last parallel region), POSIX threads otherwise
 * (JAX/XLA and numpy callers, which have no OpenMP pool).
 *
 * 2-D tiles (fp8q_quantize_tiles / fp8q_dequantize_tiles): a row-major (R, C)
 * array in tiles of th x tw, worked on one band of th rows and a chunk of whole
 * tiles' columns at a time: one row sweep keeps a running max vector over the
 * chunk's columns, a second sweep quantizes the same rows with per-column scale
 * vectors -- long contiguous row segments, never a strided walk down one column
 * per group (one group per column is the transposed operand of a backward GEMM).
 * Tilings that are flat blocks of the row-major order (tw >= C, or th == 1 with
 * C a multiple of tw) take the blockwise / global path.
 *
 * Scale rules (fp8q_format.scale_rule, docs/numerics.md §3.3 / §9.2): fp32
 * (qscale = fl(M / a)), pow2 (the power of two given by q0 = fl(M / a)'s
 * exponent bits) and pow2_torchao (the same exponent, plus one where q0 >= the
 * caller's threshold table entry for it); and the four MX rules (docs/numerics.md
 * §11: an e8m0 byte per block, looked up from the absmax bits in the caller's
 * fp8core.mx.binade_table, powers of two as scales; see mx_scales). Every entry
 * point honours it.
 *
 * Stochastic rounding (docs/numerics.md §14; fp8q_quantize_sr, fp8q_quantize_given_sr,
 * fp8q_quantize_tiles_sr): the same absmax and scales, each element's random bits
 * computed in the loop from (seed, stream, its index in the quantizer's input) by
 * fp8core.random's counter-based hash (no random tensor), codes only.
 *
 * Numerics are the contract's float32 operation sequence, IEEE binary32 with
 * round-to-nearest-even. This file must be compiled WITHOUT -ffast-math and
 * with -ffp-contract=off: `(|s| + K) - K` is a rounding, not a no-op, and no
 * multiply may be fused into an add. Native (ml_dtypes) formats only; table
 * codebooks are searched by the callers. fp8core/_kernel.py is the only caller
 * of these functions (through ctypes); tests compare every path with
 * fp8core.reference bit for bit.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FP8Q_ABI_VERSION 6

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { SCALE_FP32 = 0, SCALE_POW2 = 1, SCALE_POW2_TORCHAO = 2,
       SCALE_MX_FLOOR = 3, SCALE_MX_CEIL = 4, SCALE_MX_EVEN = 5, SCALE_MX_RCEIL = 6 };

/* Per-codebook constants, filled in by fp8core/_kernel.py from fp8core.Codebook. */
typedef struct {
    float m;          /* largest finite magnitude M */
    float inv_m;      /* fl(1 / M) */
    float floor_;     /* scale floor (power of two) */
    float ceiling;    /* scale ceiling */
    int32_t mant;     /* mantissa bits */
    int32_t emin;     /* log2 of the smallest normal */
    int32_t bits;     /* total bits (sign bit is bit bits-1) */
    int32_t negzero;  /* format has -0 */
    int32_t fill_code;
    int32_t scale_rule;            /* SCALE_* */
    const float *pow2_thresholds;  /* float32[256], indexed by q0's biased exponent
                                      (fp8core.recipe.pow2_torchao_thresholds();
                                      SCALE_POW2_TORCHAO only, else may be NULL) */
    const int32_t *mx_table;       /* int32[1024]: fp8core.mx.binade_table(format, mode)'s
                                      base, step, qexp, dexp (SCALE_MX_* only, else may
                                      be NULL) */
} fp8q_format;

/* Stochastic rounding (§14) of one call, filled in by fp8core/_kernel.py. The array the
 * kernel is given is row-major (rows, cols); its element p has the index
 * i = transposed ? (p % cols) * rows + p / cols : p in the quantizer's input (the
 * array as passed to quantize_operand: a transposed operand is its transpose), and
 * gets the random bits rand(i) = mix32(mix32(i ^ k1) ^ k2) >> (32 - sr_bits) with
 * k1 = mix32(seed ^ SEED_SALT), k2 = mix32(k1 ^ stream ^ STREAM_SALT) (fp8core.random). */
typedef struct {
    uint32_t seed, stream;
    int32_t sr_bits;     /* 1..23 */
    int32_t transposed;
    int64_t rows, cols;  /* rows * cols = the call's element count */
} fp8q_sr;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FP8Q_NO_CLONES)
/* one build, vector code for the machine it runs on (resolved at load time) */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE int is_mx(const fp8q_format *f) { return f->scale_rule >= SCALE_MX_FLOOR; }

INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
/* c ? a : b as a mask (keeps gcc's vectorizer away from control flow) */
INLINE uint32_t sel(int c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - (uint32_t)(c != 0))); }

/* ------------------------------------------------------------ float16 / bfloat16 */
/* Branch-free integer conversions (they vectorize; _Float16 does not before
 * AVX512-FP16) with no float32-subnormal intermediate, so a flush-to-zero /
 * denormals-are-zero mode of the calling thread cannot change them. */
INLINE float f16_bits_to_f32(uint32_t h) {        /* exact */
    uint32_t sign = (h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t normal = (em << 13) + 0x38000000u;                    /* rebias 15 -> 127 */
    uint32_t special = (em << 13) | 0x7F800000u;                   /* inf / NaN */
    uint32_t sub = f2u((float)(int32_t)em * 0x1p-24f);             /* subnormal / 0: exact */
    uint32_t r = sel(em >= 0x7C00u, special, sel(em >= 0x0400u, normal, sub));
    return u2f(sign | r);
}
INLINE float f16_load(const void *p, int64_t i) { return f16_bits_to_f32(((const uint16_t *)p)[i]); }
INLINE void f16_store(void *p, int64_t i, float v) {  /* round half to even, IEEE overflow */
    uint32_t u = f2u(v), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    uint32_t normal = ((a + 0xFFFu + ((a >> 13) & 1u)) - 0x38000000u) >> 13;
    /* below 2**-14: fl(|v| + 0.5) has ulp 2**-24 = the binary16 quantum, so its
     * bits minus those of 0.5 count the quanta, rounded half to even (1024 = the
     * smallest normal when it rounds up) */
    uint32_t sub = f2u(u2f(a < 0x38800000u ? a : 0) + 0.5f) - 0x3F000000u;
    uint32_t r = sel(a > 0x7F800000u, 0x7E00u,
                     sel(a >= 0x477FF000u, 0x7C00u, sel(a >= 0x38800000u, normal, sub)));
    ((uint16_t *)p)[i] = (uint16_t)(sign | r);
}

INLINE float bf16_load(const void *p, int64_t i) { return u2f((uint32_t)((const uint16_t *)p)[i] << 16); }
/* round half to even; a finite v that rounds past the largest bfloat16 carries into
 * the exponent and gives inf, as IEEE rounding does. Not for NaN (see below). */
INLINE void bf16_store_nonnan(void *p, int64_t i, float v) {
    uint32_t u = f2u(v);
    ((uint16_t *)p)[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
INLINE void bf16_store(void *p, int64_t i, float v) {
    uint32_t u = f2u(v);
    uint32_t r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
    ((uint16_t *)p)[i] = (uint16_t)sel((u & 0x7FFFFFFFu) > 0x7F800000u, (u >> 16) | 0x40u, r);
}

INLINE float load(const void *p, int dt, int64_t i) {
    return dt == DT_F32 ? ((const float *)p)[i] : dt == DT_F16 ? f16_load(p, i) : bf16_load(p, i);
}
INLINE void store(void *p, int dt, int64_t i, float v) {
    if (dt == DT_F32) ((float *)p)[i] = v;
    else if (dt == DT_F16) f16_store(p, i, v);
    else bf16_store(p, i, v);
}
/* store() for values known not to be NaN (the scaled values of a finite group) */
INLINE void store_nonnan(void *p, int dt, int64_t i, float v) {
    if (dt == DT_BF16) bf16_store_nonnan(p, i, v);
    else store(p, dt, i, v);
}

/* ------------------------------------------------------------------ absmax (§3.2) */
/* Largest magnitude bit pattern in x[start, start+len), as float32 bits. Positive
 * floats order like their bit patterns and every NaN pattern is above inf, so an
 * integer max of |bits| is the NaN-propagating max |x| in any order. */
HOT static uint32_t absmax_bits(const void *x, int dt, int64_t start, int64_t len) {
    if (dt == DT_F32) {
        const uint32_t *p = (const uint32_t *)x + start;
        uint32_t m = 0;
        for (int64_t i = 0; i < len; i++) {
            uint32_t a = p[i] & 0x7FFFFFFFu;
            m = a > m ? a : m;
        }
        return m;
    }
    const uint16_t *p = (const uint16_t *)x + start;
    uint16_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        uint16_t a = p[i] & 0x7FFF;
        m = a > m ? a : m;
    }
    return dt == DT_F16 ? f2u(f16_bits_to_f32(m)) : (uint32_t)m << 16;
}

/* a magnitude in the input's own bits (max_cols) -> float32 bits (float16 ->
 * float32 is monotonic in the magnitude bits, NaN patterns above inf) */
static uint32_t mag_to_f32_bits(uint32_t m, int dt) {
    return dt == DT_F32 ? m : dt == DT_F16 ? f2u(f16_bits_to_f32(m)) : m << 16;
}

/* cm[j] = max over `nrows` runs (run r at start + r * stride) of |bits of x[j]|, in
 * the input's own bits: a running max vector over the columns, four rows per
 * sweep of cm (the narrow-tile absmax; never a walk down one column). */
HOT static void max_cols(const void *x, int dt, int64_t start, int64_t len, int64_t nrows,
                         int64_t stride, uint32_t *restrict cm) {
    for (int64_t j = 0; j < len; j++) cm[j] = 0;
    int64_t r = 0;
    if (dt == DT_F32) {
        const uint32_t *p = (const uint32_t *)x + start;
        for (; r + 4 <= nrows; r += 4) {
            const uint32_t *restrict p0 = p + r * stride, *restrict p1 = p0 + stride;
            const uint32_t *restrict p2 = p1 + stride, *restrict p3 = p2 + stride;
            for (int64_t j = 0; j < len; j++) {
                uint32_t a0 = p0[j] & 0x7FFFFFFFu, a1 = p1[j] & 0x7FFFFFFFu;
                uint32_t a2 = p2[j] & 0x7FFFFFFFu, a3 = p3[j] & 0x7FFFFFFFu;
                a0 = a0 > a1 ? a0 : a1;
                a2 = a2 > a3 ? a2 : a3;
                a0 = a0 > a2 ? a0 : a2;
                cm[j] = a0 > cm[j] ? a0 : cm[j];
            }
        }
        for (; r < nrows; r++) {
            const uint32_t *restrict p0 = p + r * stride;
            for (int64_t j = 0; j < len; j++) {
                uint32_t a0 = p0[j] & 0x7FFFFFFFu;
                cm[j] = a0 > cm[j] ? a0 : cm[j];
            }
        }
        return;
    }
    const uint16_t *p = (const uint16_t *)x + start;
    for (; r + 4 <= nrows; r += 4) {
        const uint16_t *restrict p0 = p + r * stride, *restrict p1 = p0 + stride;
        const uint16_t *restrict p2 = p1 + stride, *restrict p3 = p2 + stride;
        for (int64_t j = 0; j < len; j++) {
            uint32_t a0 = p0[j] & 0x7FFFu, a1 = p1[j] & 0x7FFFu;
            uint32_t a2 = p2[j] & 0x7FFFu, a3 = p3[j] & 0x7FFFu;
            a0 = a0 > a1 ? a0 : a1;
            a2 = a2 > a3 ? a2 : a3;
            a0 = a0 > a2 ? a0 : a2;
            cm[j] = a0 > cm[j] ? a0 : cm[j];
        }
    }
    for (; r < nrows; r++) {
        const uint16_t *restrict p0 = p + r * stride;
        for (int64_t j = 0; j < len; j++) {
            uint32_t a0 = p0[j] & 0x7FFFu;
            cm[j] = a0 > cm[j] ? a0 : cm[j];
        }
    }
}

/* float32 bits of a magnitude -> the stored absmax: NaN canonical, subnormal +0 */
static float finish_absmax(uint32_t a) {
    if (a > 0x7F800000u) return u2f(0x7FC00000u);
    if (a < 0x00800000u) return 0.0f;
    return u2f(a);
}

/* A group's scales. `edge` (MX rules only, see mx_scales): scale and decode with
 * qexp / dexp by integer exponent arithmetic (mx_edge_run), not qscale / dscale. */
typedef struct { int finite; float qscale, dscale; int edge; int32_t qexp, dexp; } scales_t;

/* §3.3 / §9.2 (and §4.1): a = clip(absmax, FLOOR, CEIL), q0 = fl(M / a).
 * fp32: qscale = q0, dscale = fl(a * INV_M).
 * pow2: qscale = 2**(E-127) with E = q0's biased exponent (q0 is a float32 normal,
 *       so this is the largest power of two <= q0); dscale = 2**(127-E) = 1/qscale exactly.
 * pow2_torchao: E += (q0 >= T[E]) first (torchao's float32 exp2(floor(log2(q0)))).
 * Non-finite absmax: dscale = NaN (qscale unused: such groups store the fill code). */
static scales_t group_scales(float absmax, const fp8q_format *f) {
    scales_t s = {0, 0.0f, 0.0f, 0, 0, 0};
    s.finite = isfinite(absmax);
    float a = s.finite ? absmax : 1.0f;
    a = a < f->floor_ ? f->floor_ : a;
    a = a > f->ceiling ? f->ceiling : a;
    float q0 = f->m / a;
    if (f->scale_rule == SCALE_FP32) {
        s.qscale = q0;
        s.dscale = a * f->inv_m;
    } else {
        uint32_t e = (f2u(q0) >> 23) & 0xFFu;
        if (f->scale_rule == SCALE_POW2_TORCHAO) e += q0 >= f->pow2_thresholds[e];
        s.qscale = u2f(e << 23);
        s.dscale = u2f((254u - e) << 23);   /* as the reference: uint32 arithmetic */
    }
    if (!s.finite) s.dscale = u2f(0x7FC00000u);
    return s;
}

/* §11 (MX rules): the block's e8m0 byte b from its §3.2 absmax bits u, as
 * fp8core.mx.binade_table lists it: b = base[E] + (u >= step[E]) with E = u >> 23
 * (integer compares: no float32 arithmetic that a flush-to-zero mode could change);
 * a NaN absmax is byte 255, a non-finite group (fill code, NaN values). Scales are
 * the powers of two qscale = 2**qexp[b], dscale = 2**dexp[b] (fp8core.mx.byte_scales).
 *
 * The ordinary float32 loops give the reference's bits for a block whether or not
 * the calling thread flushes subnormals (XLA:CPU's threads do) when -126 <= qexp <=
 * 109 and dexp >= -110: every non-zero MX element value is >= 2**-16 (e5m2's smallest
 * subnormal; the other formats' are larger), so every dequantized value is a normal,
 * and a float32-subnormal x scaled by qscale stays below 2**-17, half of that, and
 * rounds to a signed zero as the flushed x does. Other blocks (absmax below ~2**-100,
 * where qscale reaches 2**126 and dscale 2**-127, or rceil's 2**-127 qscale of an inf
 * block) are `edge` blocks: scaled and decoded by integer exponent arithmetic
 * (mul_pow2, mx_edge_run). */
static scales_t mx_scales(float absmax, const fp8q_format *f) {
    const int32_t *t = f->mx_table;
    const uint32_t u = f2u(absmax) & 0x7FFFFFFFu, e = u >> 23;
    scales_t s = {0, 0.0f, u2f(0x7FC00000u), 0, 0, 0};
    s.finite = u <= 0x7F800000u;
    if (!s.finite) return s;
    const int32_t b = t[e] + (u >= (uint32_t)t[256 + e]);
    s.qexp = t[512 + b];
    s.dexp = t[768 + b];
    s.edge = s.qexp > 109 || s.qexp < -126 || s.dexp < -110;
    if (!s.edge) {
        s.qscale = u2f((uint32_t)(s.qexp + 127) << 23);
        s.dscale = u2f((uint32_t)(s.dexp + 127) << 23);
    }
    return s;
}

static scales_t block_scales(float absmax, const fp8q_format *f) {
    return is_mx(f) ? mx_scales(absmax, f) : group_scales(absmax, f);
}

/* x * 2**k for k in [-127, 126] on the float32 bits, as fp8core_jax's _mul_pow2: a
 * normal or subnormal x (a subnormal's integer significand converts to float32
 * exactly) gets its exponent moved by k; a normal result is exact, one above the
 * float32 range is +-inf (the rounded product's overflow), a subnormal one is the
 * significand shifted into the subnormal field -- exact whenever the product is a
 * float32 (MX decoding: element values have <= 4 significant bits and are >= 2**-16),
 * truncated otherwise (MX scaling: then the product is far below half the smallest
 * element subnormal and rounds to +-0 either way). +-0, +-inf and NaN are returned
 * as they are; the sign is kept. */
INLINE float mul_pow2(float x, int32_t k) {
    const uint32_t b = f2u(x), sign = b & 0x80000000u, a = b & 0x7FFFFFFFu;
    const int32_t e = (int32_t)(a >> 23);
    if (a == 0 || e == 255) return x;
    const uint32_t an = e ? a : f2u((float)(int32_t)a);           /* exact: a < 2**23 */
    const int32_t en = (int32_t)(an >> 23) - (e ? 0 : 149) + k;
    const uint32_t frac = an & 0x7FFFFFu;
    uint32_t r;
    if (en >= 255) r = 0x7F800000u;
    else if (en >= 1) r = ((uint32_t)en << 23) | frac;
    else r = 1 - en > 24 ? 0u : (frac | 0x800000u) >> (1 - en);
    return u2f(r | sign);
}

/* The format fields every entry point relies on; `rounding`: quantizers (they
 * round to the format, so it must be a native format of at most 8 bits). */
static int bad_format(const fp8q_format *f, int rounding) {
    if (f->scale_rule < SCALE_FP32 || f->scale_rule > SCALE_MX_RCEIL) return 1;
    if (f->scale_rule == SCALE_POW2_TORCHAO && f->pow2_thresholds == 0) return 1;
    if (is_mx(f) && f->mx_table == 0) return 1;
    if (rounding && (f->mant < 1 || f->mant > 22 || f->bits < 2 || f->bits > 8)) return 1;
    return 0;
}

/* ------------------------------------------------------ scale, round, write (§3.4-§4.4) */
/* Everything constant for one call; the loops below are specialised on dtypes and
 * outputs by always_inline + constant arguments. */
typedef struct {
    const void *x;
    int in_dt, out_dt;
    uint8_t *codes;      /* NULL: no codes */
    void *vals;          /* NULL: no values */
    const fp8q_format *f;
    const struct sr_s *sr;   /* NULL: round to nearest; else §14 (codes only) */
} call_t;

/* The format's rounding constants (see round_bits) */
typedef struct {
    float m, sub_scale;
    uint32_t emin_bits, kshift, bias, mant, sign_shift;
} rk_t;

INLINE rk_t round_consts(const fp8q_format *f) {
    rk_t k;
    k.m = f->m;
    k.emin_bits = (uint32_t)(f->emin + 127) << 23;                     /* bits of 2**emin */
    k.kshift = (uint32_t)(23 - f->mant) << 23;
    k.sub_scale = u2f((uint32_t)(f->mant - f->emin + 127) << 23);      /* 2**(mant-emin) */
    k.bias = (uint32_t)(1 - f->emin);
    k.mant = (uint32_t)f->mant;
    k.sign_shift = (uint32_t)(f->bits - 1);
    return k;
}

/* §3.4-§3.5 for s = fl(x * qscale): saturate, round half to even to the format;
 * the float32 bits of the rounded value, sign kept by the format's -0 rule. */
INLINE uint32_t round_bits(float s, const rk_t k, int negzero) {
    s = s > k.m ? k.m : s;
    s = s < -k.m ? -k.m : s;                                      /* saturate before rounding */
    /* round half to even: with e = max(binade(|s|), 2**emin) and
     * K = 2**(e + 23 - mant), float32's ulp on [K, 2K) is the format's
     * quantum at |s|, so fl(|s| + K) - K is |s| rounded to the format
     * (K is an even multiple of the quantum: float32 "even" = format "even"). */
    float as = fabsf(s);
    uint32_t e = f2u(as) & 0x7F800000u;
    e = e < k.emin_bits ? k.emin_bits : e;
    float kk = u2f(e + k.kshift);
    float r = (as + kk) - kk;
    uint32_t rb = f2u(r);
    uint32_t sgn = f2u(s) & 0x80000000u;
    /* -0 rule: formats with -0 keep the sign; fnuz formats have one zero (+0) */
    return negzero ? (rb | sgn) : sel(rb != 0, rb | sgn, rb);
}

/* the code (bit pattern) of a rounded value's float32 bits */
INLINE uint32_t code_of(uint32_t rb, const rk_t k) {
    uint32_t mag = rb & 0x7FFFFFFFu;
    uint32_t normal = ((((mag >> 23) - 127 + k.bias) << k.mant) | ((mag & 0x7FFFFFu) >> (23 - k.mant)));
    /* subnormal: |r| * 2**(mant - emin) is an exact integer < 2**mant */
    uint32_t sub = (uint32_t)(int32_t)(u2f(mag < k.emin_bits ? mag : 0) * k.sub_scale);
    return (mag >= k.emin_bits ? normal : sub) | ((rb >> 31) << k.sign_shift);
}

INLINE void qdq_loop(const call_t *c, int64_t start, int64_t len, scales_t sc,
                     int in_dt, int want_codes, int want_vals, int out_dt, int negzero) {
    const fp8q_format *f = c->f;
    /* locals, restrict: a uint8_t store may alias anything, and would otherwise
     * force the loop to reload c->x etc. on every element (no vectorization) */
    const char *restrict x = (const char *)c->x;
    uint8_t *restrict codes = c->codes;
    char *restrict vals = (char *)c->vals;
    if (!sc.finite) {                                             /* §3.6, §4.3 */
        if (want_codes) memset(codes + start, f->fill_code, (size_t)len);
        if (want_vals)
            for (int64_t i = start; i < start + len; i++) store(vals, out_dt, i, u2f(0x7FC00000u));
        return;
    }
    const rk_t k = round_consts(f);
    const float qscale = sc.qscale, dscale = sc.dscale;
    const int64_t end = start + len;
    for (int64_t i = start; i < end; i++) {
        uint32_t rb = round_bits(load(x, in_dt, i) * qscale, k, negzero);  /* §3.4 fl(x * qscale) */
        if (want_codes) codes[i] = (uint8_t)code_of(rb, k);
        if (want_vals) store_nonnan(vals, out_dt, i, u2f(rb) * dscale);  /* §4.3, one final cast */
    }
}

/* Per-column scales: `nrows` runs of `len` elements (run r at start + r * stride),
 * element j of a run scaled by qs[j] / ds[j]; ok[j] = ~0 for a finite group, 0 for
 * a non-finite one (qs[j] = 0, ds[j] = NaN: fill code, NaN values). */
INLINE void qdq_cols_loop(const call_t *c, int64_t start, int64_t len, int64_t nrows, int64_t stride,
                          const float *restrict qs, const float *restrict ds,
                          const uint32_t *restrict ok, int in_dt, int want_codes, int want_vals,
                          int out_dt, int negzero) {
    const char *restrict x = (const char *)c->x;
    uint8_t *restrict codes = c->codes;
    char *restrict vals = (char *)c->vals;
    const rk_t k = round_consts(c->f);
    const uint32_t fill = (uint32_t)c->f->fill_code;
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t s0 = start + r * stride;
        for (int64_t j = 0; j < len; j++) {
            const int64_t i = s0 + j;
            uint32_t rb = round_bits(load(x, in_dt, i) * qs[j], k, negzero);
            if (want_codes) codes[i] = (uint8_t)((code_of(rb, k) & ok[j]) | (fill & ~ok[j]));
            if (want_vals) store(vals, out_dt, i, u2f(rb) * ds[j]);   /* NaN in non-finite groups */
        }
    }
}

/* every (outputs, output dtype, -0 rule) combination as its own specialised loop */
#define QDQ_CASES(LOOP, IN, NZ, ...)                                                    \
    if (!wv) { if (wc) LOOP(__VA_ARGS__, IN, 1, 0, DT_F32, NZ); }                       \
    else if (o == DT_F32 && wc) LOOP(__VA_ARGS__, IN, 1, 1, DT_F32, NZ);                \
    else if (o == DT_F32) LOOP(__VA_ARGS__, IN, 0, 1, DT_F32, NZ);                      \
    else if (o == DT_F16 && wc) LOOP(__VA_ARGS__, IN, 1, 1, DT_F16, NZ);                \
    else if (o == DT_F16) LOOP(__VA_ARGS__, IN, 0, 1, DT_F16, NZ);                      \
    else if (wc) LOOP(__VA_ARGS__, IN, 1, 1, DT_BF16, NZ);                              \
    else LOOP(__VA_ARGS__, IN, 0, 1, DT_BF16, NZ);
/* HOT on the outer functions so each clone inlines its own vector loop */
#define QDQ_OUT(IN)                                                                     \
    HOT static void qdq_in_##IN(const call_t *c, int64_t s, int64_t n, scales_t sc) {   \
        int wc = c->codes != 0, wv = c->vals != 0, o = c->out_dt;                       \
        if (c->f->negzero) { QDQ_CASES(qdq_loop, IN, 1, c, s, n, sc) }                  \
        else { QDQ_CASES(qdq_loop, IN, 0, c, s, n, sc) }                                \
    }                                                                                   \
    HOT static void qdqc_in_##IN(const call_t *c, int64_t s, int64_t n, int64_t nr, int64_t st, \
                             const float *qs, const float *ds, const uint32_t *ok) {    \
        int wc = c->codes != 0, wv = c->vals != 0, o = c->out_dt;                       \
        if (c->f->negzero) { QDQ_CASES(qdq_cols_loop, IN, 1, c, s, n, nr, st, qs, ds, ok) } \
        else { QDQ_CASES(qdq_cols_loop, IN, 0, c, s, n, nr, st, qs, ds, ok) }           \
    }
QDQ_OUT(DT_F32)
QDQ_OUT(DT_F16)
QDQ_OUT(DT_BF16)

static void qdq_range(const call_t *c, int64_t start, int64_t len, scales_t sc) {
    if (c->in_dt == DT_F32) qdq_in_DT_F32(c, start, len, sc);
    else if (c->in_dt == DT_F16) qdq_in_DT_F16(c, start, len, sc);
    else qdq_in_DT_BF16(c, start, len, sc);
}

static void qdq_cols(const call_t *c, int64_t start, int64_t len, int64_t nrows, int64_t stride,
                     const float *qs, const float *ds, const uint32_t *ok) {
    if (c->in_dt == DT_F32) qdqc_in_DT_F32(c, start, len, nrows, stride, qs, ds, ok);
    else if (c->in_dt == DT_F16) qdqc_in_DT_F16(c, start, len, nrows, stride, qs, ds, ok);
    else qdqc_in_DT_BF16(c, start, len, nrows, stride, qs, ds, ok);
}

/* An MX edge block's elements [start, start + len) (see mx_scales): §3.4-§4.3 with
 * the scaling and the decoding done by mul_pow2 -- s = clip(x * 2**qexp, -M, M),
 * rounded as in every block, values 2**dexp * the rounded value. Scalar, rare. */
static void mx_edge_run(const call_t *c, int64_t start, int64_t len, scales_t sc) {
    const rk_t k = round_consts(c->f);
    const int negzero = c->f->negzero;
    for (int64_t i = start; i < start + len; i++) {
        uint32_t rb = round_bits(mul_pow2(load(c->x, c->in_dt, i), sc.qexp), k, negzero);
        if (c->codes) c->codes[i] = (uint8_t)code_of(rb, k);
        if (c->vals) store(c->vals, c->out_dt, i, mul_pow2(u2f(rb), sc.dexp));
    }
}

/* the decoding of an MX edge block's codes [start, start + len) */
static void mx_edge_deq(const uint8_t *codes, const float *table, void *vals, int out_dt,
                        int64_t start, int64_t len, int32_t dexp) {
    for (int64_t i = start; i < start + len; i++)
        store(vals, out_dt, i, mul_pow2(table[codes[i]], dexp));
}

/* ------------------------------------------------------ §14: stochastic rounding */
#define SR_MUL1 0x7FEB352Du   /* fp8core.random.MIX_MUL1, MIX_MUL2, SEED_SALT, STREAM_SALT */
#define SR_MUL2 0x846CA68Bu
#define SR_SEED_SALT 0x243F6A88u
#define SR_STREAM_SALT 0x85A308D3u

INLINE uint32_t mix32(uint32_t v) {                  /* lowbias32, modulo 2**32 */
    v ^= v >> 16;
    v *= SR_MUL1;
    v ^= v >> 15;
    v *= SR_MUL2;
    v ^= v >> 16;
    return v;
}

/* one call's keys, index mapping and the format's constants of the rounding rule */
typedef struct sr_s {
    uint32_t k1, k2, shift;   /* shift = 32 - sr_bits */
    float two_r;              /* 2**sr_bits */
    int transposed;
    int64_t rows, cols;
    float m;
    int32_t mant, emin, negzero, sign_shift;
} sr_t;

INLINE uint32_t sr_rand(const sr_t *r, uint32_t i) { return mix32(mix32(i ^ r->k1) ^ r->k2) >> r->shift; }

/* §14.2 for one element x of a finite group: s = clip(fl(x * qscale), -M, M) (an MX
 * edge block: mul_pow2(x, qexp), as the nearest path), e' = max(e(|s|), emin),
 * f = |s| * 2**(mant - e') (exact), n = floor(f), D = rint((f - n) * 2**r) (half to
 * even), away from zero iff D + rand >= 2**r and x is not a float32 subnormal (read
 * from its bits: a flush-to-zero / denormals-are-zero mode of the calling thread may
 * zero a subnormal x or s -- then n = 0 and D = 0 as without it, since every float32
 * subnormal scaled by a non-edge scale stays below the format's smallest subnormal);
 * code = ((e' - emin) << mant) + n + up with s's sign (fnuz: only for a non-zero code). */
INLINE uint32_t sr_code(float x, float qscale, int edge, int32_t qexp, uint32_t rand,
                        const sr_t *k) {
    const uint32_t xa = f2u(x) & 0x7FFFFFFFu;
    float s = edge ? mul_pow2(x, qexp) : x * qscale;
    s = s > k->m ? k->m : s;
    s = s < -k->m ? -k->m : s;
    const uint32_t b = f2u(s), a = b & 0x7FFFFFFFu;
    int32_t e = (int32_t)(a >> 23) - 127;
    e = e < k->emin ? k->emin : e;
    const float inv_q = u2f((uint32_t)(k->mant - e + 127) << 23);
    const float fr = u2f(a) * inv_q;
    const float n = floorf(fr);
    const float d = (fr - n) * k->two_r;
    uint32_t up = (rintf(d) + (float)rand) >= k->two_r;
    up &= xa >= 0x00800000u;
    const uint32_t mag = ((uint32_t)(e - k->emin) << k->mant) + (uint32_t)(int32_t)n + up;
    uint32_t neg = b >> 31;
    if (!k->negzero) neg &= mag != 0;
    return mag | (neg << k->sign_shift);
}

/* elements [start, start + len) of a run with element j's index base + j * step (a row
 * segment: step 1, or the rows of a transposed array), not an MX edge block; one loop
 * per input dtype so that it vectorizes */
INLINE void sr_seg_loop(const call_t *c, int64_t start, int64_t len, float qscale, uint32_t base,
                        uint32_t step, int dt) {
    const sr_t k = *c->sr;        /* a local copy: the uint8_t stores may alias *c->sr */
    const char *restrict x = (const char *)c->x;
    uint8_t *restrict codes = c->codes + start;
    for (int64_t j = 0; j < len; j++)
        codes[j] = (uint8_t)sr_code(load(x, dt, start + j), qscale, 0, 0,
                                    sr_rand(&k, base + (uint32_t)j * step), &k);
}
#define SR_SEG(DT)                                                                          \
    HOT static void sr_seg_##DT(const call_t *c, int64_t s, int64_t n, float q, uint32_t b,   \
                                uint32_t st) { sr_seg_loop(c, s, n, q, b, st, DT); }
SR_SEG(DT_F32)
SR_SEG(DT_F16)
SR_SEG(DT_BF16)

/* elements [start, start + len) of one group (any run of the row-major array): row
 * segments of the vector loop, or (an MX edge block) scalar with mul_pow2 */
static void sr_run(const call_t *c, int64_t start, int64_t len, scales_t sc) {
    const sr_t *k = c->sr;
    if (!sc.finite) {
        memset(c->codes + start, c->f->fill_code, (size_t)len);
        return;
    }
    const int64_t end = start + len, R = k->rows, C = k->cols;
    int64_t i = start;
    while (i < end) {
        int64_t row = i / C, col = i - row * C, seg = C - col;
        seg = seg < end - i ? seg : end - i;
        uint32_t base = (uint32_t)i, step = 1;
        if (!k->transposed) seg = end - i;                    /* indices are positions */
        else base = (uint32_t)(col * R + row), step = (uint32_t)R;
        if (sc.edge) {
            for (int64_t j = 0; j < seg; j++)
                c->codes[i + j] = (uint8_t)sr_code(load(c->x, c->in_dt, i + j), 0.0f, 1, sc.qexp,
                                                   sr_rand(k, base + (uint32_t)j * step), k);
        } else if (c->in_dt == DT_F32) {
            sr_seg_DT_F32(c, i, seg, sc.qscale, base, step);
        } else if (c->in_dt == DT_F16) {
            sr_seg_DT_F16(c, i, seg, sc.qscale, base, step);
        } else {
            sr_seg_DT_BF16(c, i, seg, sc.qscale, base, step);
        }
        i += seg;
    }
}

/* qdq_cols for stochastic rounding: `nrows` runs of `len` (run r at start + r * stride,
 * the first at row row0, column col0 of the array), element j scaled by qs[j], ok[j] = 0:
 * the fill code (non-finite and MX edge groups, the latter redone by sr_run) */
INLINE void sr_cols_loop(const call_t *c, int64_t start, int64_t len, int64_t nrows,
                         int64_t stride, int64_t row0, int64_t col0, const float *restrict qs,
                         const uint32_t *restrict ok, int dt) {
    const sr_t k = *c->sr;
    const char *restrict x = (const char *)c->x;
    uint8_t *restrict codes = c->codes;
    const uint32_t fill = (uint32_t)c->f->fill_code;
    const uint32_t step = (uint32_t)(k.transposed ? k.rows : 1);
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t s0 = start + r * stride;
        const uint32_t i0 = (uint32_t)(k.transposed ? col0 * k.rows + row0 + r : s0);
        for (int64_t j = 0; j < len; j++) {
            const uint32_t rc = sr_code(load(x, dt, s0 + j), qs[j], 0, 0,
                                        sr_rand(&k, i0 + (uint32_t)j * step), &k);
            codes[s0 + j] = (uint8_t)((rc & ok[j]) | (fill & ~ok[j]));
        }
    }
}
#define SR_COLS(DT)                                                                          \
    HOT static void sr_cols_##DT(const call_t *c, int64_t s, int64_t n, int64_t nr, int64_t st, \
                                 int64_t r0, int64_t c0, const float *qs, const uint32_t *ok) { \
        sr_cols_loop(c, s, n, nr, st, r0, c0, qs, ok, DT);                                  \
    }
SR_COLS(DT_F32)
SR_COLS(DT_F16)
SR_COLS(DT_BF16)

static void sr_cols(const call_t *c, int64_t start, int64_t len, int64_t nrows, int64_t stride,
                    int64_t row0, int64_t col0, const float *qs, const uint32_t *ok) {
    if (c->in_dt == DT_F32) sr_cols_DT_F32(c, start, len, nrows, stride, row0, col0, qs, ok);
    else if (c->in_dt == DT_F16) sr_cols_DT_F16(c, start, len, nrows, stride, row0, col0, qs, ok);
    else sr_cols_DT_BF16(c, start, len, nrows, stride, row0, col0, qs, ok);
}

/* the call's sr_t from fp8q_sr; -1 for bad arguments (n: the call's element count) */
static int sr_setup(const fp8q_sr *in, const fp8q_format *f, int64_t n, sr_t *k) {
    if (!in || in->sr_bits < 1 || in->sr_bits > 23 || in->rows < 0 || in->cols < 0) return -1;
    if (in->rows * in->cols != n || n > (int64_t)0xFFFFFFFFu) return -1;
    k->k1 = mix32(in->seed ^ SR_SEED_SALT);
    k->k2 = mix32(k->k1 ^ in->stream ^ SR_STREAM_SALT);
    k->shift = (uint32_t)(32 - in->sr_bits);
    k->two_r = (float)(1u << in->sr_bits);
    k->transposed = in->transposed != 0;
    k->rows = in->rows;
    k->cols = in->cols;
    k->m = f->m;
    k->mant = f->mant;
    k->emin = f->emin;
    k->negzero = f->negzero;
    k->sign_shift = f->bits - 1;
    return 0;
}

/* one group's run of elements with its scales */
static void qdq_group(const call_t *c, int64_t start, int64_t len, scales_t sc) {
    if (c->sr) sr_run(c, start, len, sc);
    else if (sc.edge) mx_edge_run(c, start, len, sc);
    else qdq_range(c, start, len, sc);
}

/* ------------------------------------------------------------------- threading */
typedef struct {
    const call_t *c;
    int64_t n, group;      /* group == n: global */
    int64_t lo, hi;        /* blocks [lo, hi) or elements [lo, hi) */
    float *absmax;
    scales_t sc;           /* global phase 2 */
    uint32_t partial;      /* global phase 1 result */
    int phase;             /* 0 blockwise, 1 global absmax, 2 global qdq */
} job_t;

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    const call_t *c = j->c;
    if (j->phase == 0) {
        for (int64_t b = j->lo; b < j->hi; b++) {
            int64_t start = b * j->group, len = j->n - start < j->group ? j->n - start : j->group;
            float a = finish_absmax(absmax_bits(c->x, c->in_dt, start, len));
            j->absmax[b] = a;
            qdq_group(c, start, len, block_scales(a, c->f));
        }
    } else if (j->phase == 1) {
        j->partial = absmax_bits(c->x, c->in_dt, j->lo, j->hi - j->lo);
    } else {
        qdq_group(c, j->lo, j->hi - j->lo, j->sc);
    }
    return 0;
}

#define MAX_THREADS 64
#define MIN_PER_THREAD (1 << 15)   /* elements: below this a thread is not worth it */

/* POSIX-thread callers (JAX/XLA, numpy) get a persistent pool: creating and
 * joining a thread per call cost 20-40 us, as much as quantizing 64k elements,
 * so two threads were slower than one below ~10^6 elements. Workers sleep on a
 * condition variable between calls (no spinning: the caller's own thread pool
 * needs the cores right after a quantize). One dispatch at a time; a concurrent
 * caller (two custom calls run in parallel by XLA) falls back to per-call
 * threads. After fork() the child rebuilds the pool (its workers do not exist). */
typedef struct {
    void *(*fn)(void *);
    char *base;
    size_t job_size;
    int nj;              /* jobs of this dispatch (job 0 runs on the caller) */
    unsigned long gen;   /* dispatch generation */
    int pending;         /* worker jobs not finished */
} dispatch_t;

static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;   /* one dispatcher */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static dispatch_t pool_d;
static int pool_workers;      /* started workers: worker w runs job w (1 <= w <= pool_workers) */
static pid_t pool_pid;
static unsigned long pool_start_gen[MAX_THREADS];  /* the generation a worker was started in */

static void *pool_worker(void *arg) {
    const int w = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool_mu);
    unsigned long seen = pool_start_gen[w];   /* not pool_d.gen: a dispatch may already be posted */
    for (;;) {
        while (pool_d.gen == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = pool_d.gen;
        if (w < pool_d.nj) {
            dispatch_t d = pool_d;
            pthread_mutex_unlock(&pool_mu);
            d.fn(d.base + (size_t)w * d.job_size);
            pthread_mutex_lock(&pool_mu);
            if (--pool_d.pending == 0) pthread_cond_signal(&pool_done);
        }
    }
    return 0;
}

/* Run jobs 1..nj-1 on pool workers and job 0 here; 0, or -1 when the pool is busy
 * or has too few workers (the caller then uses per-call threads). */
static int pool_run(void *(*fn)(void *), char *base, size_t job_size, int nj) {
    if (pthread_mutex_trylock(&pool_busy) != 0) return -1;
    if (pool_pid != getpid()) {                 /* first use, or a forked child */
        pthread_mutex_init(&pool_mu, 0);
        pthread_cond_init(&pool_go, 0);
        pthread_cond_init(&pool_done, 0);
        memset(&pool_d, 0, sizeof pool_d);
        pool_workers = 0;
        pool_pid = getpid();
    }
    while (pool_workers < nj - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool_start_gen[pool_workers + 1] = pool_d.gen;
        int rc = pthread_create(&th, &attr, pool_worker, (void *)(intptr_t)(pool_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool_workers++;
    }
    if (pool_workers < nj - 1) {
        pthread_mutex_unlock(&pool_busy);
        return -1;
    }
    pthread_mutex_lock(&pool_mu);
    pool_d.fn = fn;
    pool_d.base = base;
    pool_d.job_size = job_size;
    pool_d.nj = nj;
    pool_d.pending = nj - 1;
    pool_d.gen++;
    pthread_cond_broadcast(&pool_go);
    pthread_mutex_unlock(&pool_mu);
    fn(base);
    pthread_mutex_lock(&pool_mu);
    while (pool_d.pending > 0) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
    pthread_mutex_unlock(&pool_busy);
    return 0;
}

/* Run fn(job t) for t in [0, nj): an OpenMP team if `openmp` (and built with
 * OpenMP), else the worker pool (or, when it is busy, POSIX threads started for
 * this call), with job 0 on the calling thread. */
static void run_parallel(void *(*fn)(void *), void *jobs, size_t job_size, int nj, int openmp) {
    char *base = (char *)jobs;
    if (nj <= 1) {
        fn(base);
        return;
    }
#ifdef _OPENMP
    if (openmp) {
#pragma omp parallel for num_threads(nj) schedule(static, 1)
        for (int t = 0; t < nj; t++) fn(base + (size_t)t * job_size);
        return;
    }
#else
    (void)openmp;
#endif
    if (pool_run(fn, base, job_size, nj) == 0) return;
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < nj; t++) started[t] = pthread_create(&th[t], 0, fn, base + (size_t)t * job_size) == 0;
    fn(base);
    for (int t = 1; t < nj; t++) {
        if (started[t]) pthread_join(th[t], 0);
        else fn(base + (size_t)t * job_size);   /* could not start a thread: do it here */
    }
}

static int clamp_threads(int nthreads, int64_t work_elems) {
    int64_t by_size = work_elems / MIN_PER_THREAD;
    int t = nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
    if (by_size < t) t = by_size < 1 ? 1 : (int)by_size;
    return t;
}

/* ----------------------------------------------------------------- entry points */
int fp8q_abi_version(void) { return FP8Q_ABI_VERSION; }

/* out[i] = in[i] converted with the kernel's own load/store (exported so tests can
 * check the float16 / bfloat16 conversions exhaustively). Returns 0, or -1. */
int fp8q_cast(const void *in, int in_dt, void *out, int out_dt, int64_t n) {
    if (n < 0 || in_dt < 0 || in_dt > 2 || out_dt < 0 || out_dt > 2) return -1;
    for (int64_t i = 0; i < n; i++) store(out, out_dt, i, load(in, in_dt, i));
    return 0;
}

/* Quantize n elements of x (in_dt) in groups of `group` consecutive elements
 * (the last may be partial; group >= n is global quantization). Writes
 * absmax[ceil(n/group)], and codes[n] (uint8) and/or vals[n] (out_dt) when not
 * NULL. `openmp`: run on an OpenMP team (see the top). Returns 0, or -1 on bad
 * arguments. */
static void quantize_run(const call_t *cp, int64_t n, int64_t group, float *absmax, int nthreads,
                         int openmp);

int fp8q_quantize(const void *x, int in_dt, int64_t n, int64_t group, const fp8q_format *f,
                  uint8_t *codes, void *vals, int out_dt, float *absmax, int nthreads, int openmp) {
    if (n < 0 || group <= 0 || in_dt < 0 || in_dt > 2 || out_dt < 0 || out_dt > 2) return -1;
    if (bad_format(f, 1)) return -1;
    if (n == 0) return 0;                              /* callers handle empty tensors */
    call_t c = {x, in_dt, out_dt, codes, vals, f, 0};
    quantize_run(&c, n, group, absmax, nthreads, openmp);
    return 0;
}

/* fp8q_quantize with §14 stochastic rounding (`sr`): the same groups, absmax and scales;
 * codes[n] and absmax written (no values: decoding does not depend on the rounding).
 * Returns 0, or -1 on bad arguments. */
int fp8q_quantize_sr(const void *x, int in_dt, int64_t n, int64_t group, const fp8q_format *f,
                     const fp8q_sr *sr, uint8_t *codes, float *absmax, int nthreads, int openmp) {
    if (n < 0 || group <= 0 || in_dt < 0 || in_dt > 2 || !codes || bad_format(f, 1)) return -1;
    sr_t k;
    if (sr_setup(sr, f, n, &k)) return -1;
    if (n == 0) return 0;
    call_t c = {x, in_dt, DT_F32, codes, 0, f, &k};
    quantize_run(&c, n, group, absmax, nthreads, openmp);
    return 0;
}

static void quantize_run(const call_t *cp, int64_t n, int64_t group, float *absmax, int nthreads,
                         int openmp) {
    const call_t c = *cp;
    const fp8q_format *f = c.f;
    job_t jobs[MAX_THREADS];
    if (group < n) {                                   /* blockwise */
        int64_t nb = (n + group - 1) / group;
        int nt = clamp_threads(nthreads, n);
        if (nt > nb) nt = (int)nb;
        for (int t = 0; t < nt; t++) {
            job_t j = {&c, n, group, nb * t / nt, nb * (t + 1) / nt, absmax, {0, 0, 0}, 0, 0};
            jobs[t] = j;
        }
        run_parallel(run_job, jobs, sizeof(job_t), nt, openmp);
        return;
    }
    int nt = clamp_threads(nthreads, n);               /* global: two passes */
    for (int t = 0; t < nt; t++) {
        job_t j = {&c, n, n, n * t / nt, n * (t + 1) / nt, absmax, {0, 0, 0}, 0, 1};
        jobs[t] = j;
    }
    run_parallel(run_job, jobs, sizeof(job_t), nt, openmp);
    uint32_t m = 0;
    for (int t = 0; t < nt; t++) m = jobs[t].partial > m ? jobs[t].partial : m;
    float a = finish_absmax(m);
    absmax[0] = a;
    scales_t sc = block_scales(a, f);
    for (int t = 0; t < nt; t++) { jobs[t].phase = 2; jobs[t].sc = sc; }
    run_parallel(run_job, jobs, sizeof(job_t), nt, openmp);
}

/* Global quantization of n elements with a given absmax (docs/numerics.md §10.2: the
 * amax all-reduced across ranks, already in §3.2 form) instead of x's own: the second
 * pass of fp8q_quantize only. absmax_in[0] is read; nothing else is written to it.
 * Returns 0, or -1 on bad arguments. */
static void given_run(const call_t *c, int64_t n, const float *absmax_in, int nthreads,
                      int openmp);

int fp8q_quantize_given(const void *x, int in_dt, int64_t n, const fp8q_format *f,
                        uint8_t *codes, void *vals, int out_dt, const float *absmax_in,
                        int nthreads, int openmp) {
    if (n < 0 || in_dt < 0 || in_dt > 2 || out_dt < 0 || out_dt > 2 || !absmax_in) return -1;
    if (bad_format(f, 1)) return -1;
    if (n == 0) return 0;
    call_t c = {x, in_dt, out_dt, codes, vals, f, 0};
    given_run(&c, n, absmax_in, nthreads, openmp);
    return 0;
}

/* fp8q_quantize_given with §14 stochastic rounding (`sr`): codes[n] only. Returns 0, or
 * -1 on bad arguments. */
int fp8q_quantize_given_sr(const void *x, int in_dt, int64_t n, const fp8q_format *f,
                           const fp8q_sr *sr, uint8_t *codes, const float *absmax_in,
                           int nthreads, int openmp) {
    if (n < 0 || in_dt < 0 || in_dt > 2 || !codes || !absmax_in || bad_format(f, 1)) return -1;
    sr_t k;
    if (sr_setup(sr, f, n, &k)) return -1;
    if (n == 0) return 0;
    call_t c = {x, in_dt, DT_F32, codes, 0, f, &k};
    given_run(&c, n, absmax_in, nthreads, openmp);
    return 0;
}

static void given_run(const call_t *c, int64_t n, const float *absmax_in, int nthreads,
                      int openmp) {
    const fp8q_format *f = c->f;
    job_t jobs[MAX_THREADS];
    scales_t sc = block_scales(absmax_in[0], f);
    int nt = clamp_threads(nthreads, n);
    for (int t = 0; t < nt; t++) {
        job_t j = {c, n, n, n * t / nt, n * (t + 1) / nt, NULL, sc, 0, 2};
        jobs[t] = j;
    }
    run_parallel(run_job, jobs, sizeof(job_t), nt, openmp);
}

/* ------------------------------------------------------------------ dequantize (§4) */
typedef struct {
    const uint8_t *codes;
    const float *table;    /* value of each of the 256 codes (NaN where none) */
    const float *absmax;
    const fp8q_format *f;
    void *vals;
    int out_dt;
    int64_t n, group, lo, hi;  /* elements [lo, hi) */
} djob_t;

#define DEQ_OUT(DT)                                                                       \
    HOT static void deq_##DT(const djob_t *j) {                                           \
        int64_t i = j->lo;                                                                \
        while (i < j->hi) {                                                               \
            int64_t b = i / j->group, end = (b + 1) * j->group;                           \
            if (end > j->hi) end = j->hi;                                                 \
            float d = group_scales(j->absmax[b], j->f).dscale;                            \
            for (; i < end; i++) store(j->vals, DT, i, j->table[j->codes[i]] * d);        \
        }                                                                                 \
    }
DEQ_OUT(DT_F32)
DEQ_OUT(DT_F16)
DEQ_OUT(DT_BF16)

/* DEQ_OUT under an MX rule (its own loop: the other rules' stays as it is) */
#define DEQ_MX_OUT(DT)                                                                    \
    HOT static void deqmx_##DT(const djob_t *j) {                                         \
        int64_t i = j->lo;                                                                \
        while (i < j->hi) {                                                               \
            int64_t b = i / j->group, end = (b + 1) * j->group;                           \
            if (end > j->hi) end = j->hi;                                                 \
            scales_t s = mx_scales(j->absmax[b], j->f);                                   \
            if (s.edge) {                                                                 \
                mx_edge_deq(j->codes, j->table, j->vals, DT, i, end - i, s.dexp);         \
                i = end;                                                                  \
                continue;                                                                 \
            }                                                                             \
            const float d = s.dscale;                                                     \
            for (; i < end; i++) store(j->vals, DT, i, j->table[j->codes[i]] * d);        \
        }                                                                                 \
    }
DEQ_MX_OUT(DT_F32)
DEQ_MX_OUT(DT_F16)
DEQ_MX_OUT(DT_BF16)

static void *run_djob(void *arg) {
    djob_t *j = (djob_t *)arg;
    if (is_mx(j->f)) {
        if (j->out_dt == DT_F32) deqmx_DT_F32(j);
        else if (j->out_dt == DT_F16) deqmx_DT_F16(j);
        else deqmx_DT_BF16(j);
        return 0;
    }
    if (j->out_dt == DT_F32) deq_DT_F32(j);
    else if (j->out_dt == DT_F16) deq_DT_F16(j);
    else deq_DT_BF16(j);
    return 0;
}

/* vals[i] = fl(table[codes[i]] * dscale(absmax[i / group])), cast once to out_dt.
 * Works for any 256-entry table (native or not). Returns 0, or -1 on bad arguments. */
int fp8q_dequantize(const uint8_t *codes, int64_t n, int64_t group, const float *absmax,
                    const float *table, const fp8q_format *f, void *vals, int out_dt, int nthreads,
                    int openmp) {
    if (n < 0 || group <= 0 || out_dt < 0 || out_dt > 2 || bad_format(f, 0)) return -1;
    if (n == 0) return 0;
    int nt = clamp_threads(nthreads, n);
    djob_t jobs[MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        djob_t j = {codes, table, absmax, f, vals, out_dt, n, group, n * t / nt, n * (t + 1) / nt};
        jobs[t] = j;
    }
    run_parallel(run_djob, jobs, sizeof(djob_t), nt, openmp);
    return 0;
}

/* ------------------------------------------------------------------ 2-D tiles */
/* A row-major (rows, cols) array in tiles of th x tw (edge tiles partial), absmax
 * as the row-major grid (ceil(rows/th), ceil(cols/tw)). A work item is one band
 * of th rows x one chunk of w columns (CHUNK_COLS_MAX, or fewer to give every
 * thread work, rounded up to whole tiles; per-column scratch: 16 bytes a column,
 * one allocation per thread). Measured on 4096x1000 and 4096x1024 (one thread):
 * chunks of whole rows (or 1024 columns) beat narrower ones sized to keep the
 * band's chunk in L2 between the sweeps (64-column chunks of a 4096-row band were
 * ~3x slower -- short row segments at a large stride; cache-set and TLB conflicts
 * are the likely cause), and this band sweep was as fast as or faster than a
 * tile-by-tile walk for every tile shape tried, so it is the only one.
 * Items are split over threads in contiguous ranges; with fewer bands than
 * threads the columns are split into more chunks. */
#ifndef CHUNK_COLS_MAX
#define CHUNK_COLS_MAX 1024
#endif

typedef struct {
    const call_t *c;            /* quantize; NULL: dequantize */
    const uint8_t *codes;       /* dequantize */
    const float *table;
    void *vals;
    int out_dt;
    const fp8q_format *f;
    float *absmax;              /* grid (written by quantize, read by dequantize) */
    int64_t rows, cols, th, tw, gc;
    int64_t w, nck;             /* chunk columns, chunks per band */
    int64_t lo, hi;             /* items [lo, hi) */
    int failed;                 /* out of memory for the scratch */
} tjob_t;

/* vals = table[codes] * ds[j] over nrows runs of len (run r at start + r * stride) */
#define DEQT_OUT(DT)                                                                      \
    HOT static void deqt_##DT(const uint8_t *restrict codes, const float *restrict table, \
                              char *restrict vals, int64_t start, int64_t len, int64_t nrows, \
                              int64_t stride, const float *restrict ds) {                 \
        for (int64_t r = 0; r < nrows; r++) {                                             \
            const int64_t s0 = start + r * stride;                                        \
            for (int64_t j = 0; j < len; j++)                                             \
                store(vals, DT, s0 + j, table[codes[s0 + j]] * ds[j]);                    \
        }                                                                                 \
    }
DEQT_OUT(DT_F32)
DEQT_OUT(DT_F16)
DEQT_OUT(DT_BF16)

/* scratch: qs, ds (float), ok, cm (uint32) of j->w columns each */
HOT static void tile_item(const tjob_t *j, int64_t item, float *qs, float *ds, uint32_t *ok,
                          uint32_t *cm) {
    const call_t *c = j->c;
    const int64_t C = j->cols, tw = j->tw;
    const int64_t b = item / j->nck, k = item % j->nck;
    const int64_t r0 = b * j->th, nr = j->rows - r0 < j->th ? j->rows - r0 : j->th;
    const int64_t c0 = k * j->w, cw = C - c0 < j->w ? C - c0 : j->w;
    const int mx = is_mx(j->f);
    int edges = 0;
    if (c) max_cols(c->x, c->in_dt, r0 * C + c0, cw, nr, C, cm);        /* sweep 1 */
    for (int64_t g0 = 0; g0 < cw; g0 += tw) {                           /* the chunk's groups */
        const int64_t glen = cw - g0 < tw ? cw - g0 : tw;
        float *am = j->absmax + b * j->gc + (c0 + g0) / tw;
        float a;
        if (c) {
            uint32_t m = 0;
            for (int64_t i = g0; i < g0 + glen; i++) m = cm[i] > m ? cm[i] : m;
            a = finish_absmax(mag_to_f32_bits(m, c->in_dt));
            *am = a;
        } else {
            a = *am;
        }
        scales_t sc;
        if (mx) {          /* an edge group: fill / NaN in the sweep, redone below */
            sc = mx_scales(a, j->f);
            edges |= sc.edge;
            if (sc.edge) sc.finite = 0;
        } else {
            sc = group_scales(a, j->f);
        }
        for (int64_t i = g0; i < g0 + glen; i++) {
            qs[i] = sc.finite ? sc.qscale : 0.0f;
            ds[i] = sc.dscale;
            ok[i] = sc.finite ? ~0u : 0u;
        }
    }
    if (c && c->sr) {
        sr_cols(c, r0 * C + c0, cw, nr, C, r0, c0, qs, ok);             /* sweep 2, §14 */
    } else if (c) {
        qdq_cols(c, r0 * C + c0, cw, nr, C, qs, ds, ok);               /* sweep 2 */
    } else {
        char *v = (char *)j->vals;
        if (j->out_dt == DT_F32) deqt_DT_F32(j->codes, j->table, v, r0 * C + c0, cw, nr, C, ds);
        else if (j->out_dt == DT_F16) deqt_DT_F16(j->codes, j->table, v, r0 * C + c0, cw, nr, C, ds);
        else deqt_DT_BF16(j->codes, j->table, v, r0 * C + c0, cw, nr, C, ds);
    }
    if (!edges) return;
    for (int64_t g0 = 0; g0 < cw; g0 += tw) {                           /* MX edge groups */
        const int64_t glen = cw - g0 < tw ? cw - g0 : tw;
        const scales_t sc = mx_scales(j->absmax[b * j->gc + (c0 + g0) / tw], j->f);
        if (!sc.edge) continue;
        for (int64_t r = 0; r < nr; r++) {
            const int64_t s0 = (r0 + r) * C + c0 + g0;
            if (c && c->sr) sr_run(c, s0, glen, sc);
            else if (c) mx_edge_run(c, s0, glen, sc);
            else mx_edge_deq(j->codes, j->table, j->vals, j->out_dt, s0, glen, sc.dexp);
        }
    }
}

static void *run_tjob(void *arg) {
    tjob_t *j = (tjob_t *)arg;
    if (j->lo >= j->hi) return 0;
    char *scratch = (char *)malloc((size_t)j->w * 16);
    if (!scratch) {
        j->failed = 1;
        return 0;
    }
    float *qs = (float *)scratch, *ds = qs + j->w;
    uint32_t *ok = (uint32_t *)(ds + j->w), *cm = ok + j->w;
    for (int64_t item = j->lo; item < j->hi; item++) tile_item(j, item, qs, ds, ok, cm);
    free(scratch);
    return 0;
}

/* Plan the items and run them (quantize when j0->c, else dequantize); 0, or -1
 * when the scratch could not be allocated. */
static int run_tiles(tjob_t *j0, int nthreads, int openmp) {
    const int64_t R = j0->rows, C = j0->cols, th = j0->th, tw = j0->tw;
    const int64_t nb = (R + th - 1) / th;
    int nt = clamp_threads(nthreads, R * C);
    int64_t w = C < CHUNK_COLS_MAX ? C : CHUNK_COLS_MAX;
    if (nb < nt) {                             /* fewer bands than threads: split the columns */
        int64_t per_band = (nt + nb - 1) / nb;
        int64_t wt = (C + per_band - 1) / per_band;
        w = wt < w ? wt : w;
    }
    w = (w + tw - 1) / tw * tw;                /* whole tiles */
    j0->gc = (C + tw - 1) / tw;
    j0->w = w;
    j0->nck = (C + w - 1) / w;
    const int64_t items = nb * j0->nck;
    if (nt > items) nt = (int)items;
    if (nt < 1) nt = 1;                        /* (items >= 1: callers exclude empty arrays) */
    tjob_t jobs[MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        jobs[t] = *j0;
        jobs[t].lo = items * t / nt;
        jobs[t].hi = items * (t + 1) / nt;
    }
    run_parallel(run_tjob, jobs, sizeof(tjob_t), nt, openmp);
    for (int t = 0; t < nt; t++)
        if (jobs[t].failed) return -1;
    return 0;
}

/* Quantize a row-major contiguous (rows, cols) array x (in_dt) in tiles of
 * tile_rows x tile_cols (edge tiles partial). Writes the absmax grid
 * absmax[ceil(rows/tile_rows) * ceil(cols/tile_cols)] (row-major), and
 * codes[rows*cols] (uint8) and/or vals[rows*cols] (out_dt) in x's layout when not
 * NULL. Same bits as fp8core.reference.quantize_tiles with f's scale rule.
 * Returns 0, or -1 on bad arguments (or no memory for 16 bytes of scratch per
 * column of a chunk). */
static int tiles_run(const call_t *c, int64_t rows, int64_t cols, int64_t tile_rows,
                     int64_t tile_cols, float *absmax, int nthreads, int openmp) {
    const int64_t th = tile_rows < rows ? tile_rows : rows, tw = tile_cols < cols ? tile_cols : cols;
    /* tilings that are flat blocks of the row-major order (tw == cols: whole rows,
     * contiguous; one tile of everything is global) */
    if (tw == cols) {
        quantize_run(c, rows * cols, th * cols, absmax, nthreads, openmp);
        return 0;
    }
    if (th == 1 && cols % tw == 0) {
        quantize_run(c, rows * cols, tw, absmax, nthreads, openmp);
        return 0;
    }
    tjob_t j = {c, 0, 0, 0, 0, c->f, absmax, rows, cols, th, tw, 0, 0, 0, 0, 0, 0};
    return run_tiles(&j, nthreads, openmp);
}

int fp8q_quantize_tiles(const void *x, int in_dt, int64_t rows, int64_t cols, int64_t tile_rows,
                        int64_t tile_cols, const fp8q_format *f, uint8_t *codes, void *vals,
                        int out_dt, float *absmax, int nthreads, int openmp) {
    if (rows < 0 || cols < 0 || tile_rows <= 0 || tile_cols <= 0) return -1;
    if (in_dt < 0 || in_dt > 2 || out_dt < 0 || out_dt > 2 || bad_format(f, 1)) return -1;
    if (rows == 0 || cols == 0) return 0;
    call_t c = {x, in_dt, out_dt, codes, vals, f, 0};
    return tiles_run(&c, rows, cols, tile_rows, tile_cols, absmax, nthreads, openmp);
}

/* fp8q_quantize_tiles with §14 stochastic rounding (`sr`, whose rows and cols are the
 * array's): codes[rows*cols] and the absmax grid. Returns 0, or -1 on bad arguments
 * (or no memory for the scratch). */
int fp8q_quantize_tiles_sr(const void *x, int in_dt, int64_t rows, int64_t cols, int64_t tile_rows,
                           int64_t tile_cols, const fp8q_format *f, const fp8q_sr *sr,
                           uint8_t *codes, float *absmax, int nthreads, int openmp) {
    if (rows < 0 || cols < 0 || tile_rows <= 0 || tile_cols <= 0) return -1;
    if (in_dt < 0 || in_dt > 2 || !codes || bad_format(f, 1)) return -1;
    if (!sr || sr->rows != rows || sr->cols != cols) return -1;
    sr_t k;
    if (sr_setup(sr, f, rows * cols, &k)) return -1;
    if (rows == 0 || cols == 0) return 0;
    call_t c = {x, in_dt, DT_F32, codes, 0, f, &k};
    return tiles_run(&c, rows, cols, tile_rows, tile_cols, absmax, nthreads, openmp);
}

/* vals = fl(table[codes] * dscale(absmax of the element's tile)), cast once to
 * out_dt, for codes a row-major (rows, cols) array in tiles of tile_rows x tile_cols
 * with the absmax grid of fp8q_quantize_tiles. Any 256-entry table. Returns 0, or
 * -1 on bad arguments. */
int fp8q_dequantize_tiles(const uint8_t *codes, int64_t rows, int64_t cols, int64_t tile_rows,
                          int64_t tile_cols, const float *absmax, const float *table,
                          const fp8q_format *f, void *vals, int out_dt, int nthreads, int openmp) {
    if (rows < 0 || cols < 0 || tile_rows <= 0 || tile_cols <= 0) return -1;
    if (out_dt < 0 || out_dt > 2 || bad_format(f, 0)) return -1;
    if (rows == 0 || cols == 0) return 0;
    const int64_t th = tile_rows < rows ? tile_rows : rows, tw = tile_cols < cols ? tile_cols : cols;
    if (tw == cols)
        return fp8q_dequantize(codes, rows * cols, th * cols, absmax, table, f, vals, out_dt,
                               nthreads, openmp);
    if (th == 1 && cols % tw == 0)
        return fp8q_dequantize(codes, rows * cols, tw, absmax, table, f, vals, out_dt, nthreads,
                               openmp);
    tjob_t j = {0, codes, table, vals, out_dt, f, (float *)absmax, rows, cols, th, tw, 0, 0, 0, 0, 0, 0};
    return run_tiles(&j, nthreads, openmp);
}
