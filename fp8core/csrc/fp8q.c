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
#include <string.h>

#define FP8Q_ABI_VERSION 2

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

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
} fp8q_format;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FP8Q_NO_CLONES)
/* one build, vector code for the machine it runs on (resolved at load time) */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif
#define INLINE static inline __attribute__((always_inline))

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

/* float32 bits of a magnitude -> the stored absmax: NaN canonical, subnormal +0 */
static float finish_absmax(uint32_t a) {
    if (a > 0x7F800000u) return u2f(0x7FC00000u);
    if (a < 0x00800000u) return 0.0f;
    return u2f(a);
}

typedef struct { int finite; float qscale, dscale; } scales_t;

/* §3.3 (and §4.1): qscale = fl(M / a), dscale = fl(a * INV_M), a = clip(absmax, FLOOR, CEIL) */
static scales_t group_scales(float absmax, const fp8q_format *f) {
    scales_t s;
    s.finite = isfinite(absmax);
    float a = s.finite ? absmax : 1.0f;
    a = a < f->floor_ ? f->floor_ : a;
    a = a > f->ceiling ? f->ceiling : a;
    s.qscale = f->m / a;
    s.dscale = s.finite ? a * f->inv_m : u2f(0x7FC00000u);
    return s;
}

/* ------------------------------------------------------ scale, round, write (§3.4-§4.4) */
/* Everything constant for one call; the loop below is specialised on dtypes and
 * outputs by always_inline + constant arguments. */
typedef struct {
    const void *x;
    int in_dt, out_dt;
    uint8_t *codes;      /* NULL: no codes */
    void *vals;          /* NULL: no values */
    const fp8q_format *f;
} call_t;

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
    const float m = f->m, qscale = sc.qscale, dscale = sc.dscale;
    const uint32_t emin_bits = (uint32_t)(f->emin + 127) << 23;  /* bits of 2**emin */
    const uint32_t kshift = (uint32_t)(23 - f->mant) << 23;
    const float sub_scale = u2f((uint32_t)(f->mant - f->emin + 127) << 23);  /* 2**(mant-emin) */
    const uint32_t bias = (uint32_t)(1 - f->emin), mant = (uint32_t)f->mant;
    const uint32_t sign_shift = (uint32_t)(f->bits - 1);
    const int64_t end = start + len;
    for (int64_t i = start; i < end; i++) {
        float s = load(x, in_dt, i) * qscale;                     /* §3.4 fl(x * qscale) */
        s = s > m ? m : s;
        s = s < -m ? -m : s;                                      /* saturate before rounding */
        /* §3.5 round half to even: with e = max(binade(|s|), 2**emin) and
         * K = 2**(e + 23 - mant), float32's ulp on [K, 2K) is the format's
         * quantum at |s|, so fl(|s| + K) - K is |s| rounded to the format
         * (K is an even multiple of the quantum: float32 "even" = format "even"). */
        float as = fabsf(s);
        uint32_t e = f2u(as) & 0x7F800000u;
        e = e < emin_bits ? emin_bits : e;
        float k = u2f(e + kshift);
        float r = (as + k) - k;
        uint32_t rb = f2u(r);
        uint32_t sgn = f2u(s) & 0x80000000u;
        /* -0 rule: formats with -0 keep the sign; fnuz formats have one zero (+0) */
        rb = negzero ? (rb | sgn) : sel(rb != 0, rb | sgn, rb);
        if (want_codes) {
            uint32_t mag = rb & 0x7FFFFFFFu;
            uint32_t normal = ((((mag >> 23) - 127 + bias) << mant) | ((mag & 0x7FFFFFu) >> (23 - mant)));
            /* subnormal: |r| * 2**(mant - emin) is an exact integer < 2**mant */
            uint32_t sub = (uint32_t)(int32_t)(u2f(mag < emin_bits ? mag : 0) * sub_scale);
            uint32_t code = (mag >= emin_bits ? normal : sub) | ((rb >> 31) << sign_shift);
            codes[i] = (uint8_t)code;
        }
        if (want_vals) store_nonnan(vals, out_dt, i, u2f(rb) * dscale);  /* §4.3, one final cast */
    }
}

/* every (outputs, output dtype, -0 rule) combination as its own specialised loop */
#define QDQ_CASES(IN, NZ)                                                               \
    if (!wv) { if (wc) qdq_loop(c, s, n, sc, IN, 1, 0, DT_F32, NZ); }                   \
    else if (o == DT_F32 && wc) qdq_loop(c, s, n, sc, IN, 1, 1, DT_F32, NZ);            \
    else if (o == DT_F32) qdq_loop(c, s, n, sc, IN, 0, 1, DT_F32, NZ);                  \
    else if (o == DT_F16 && wc) qdq_loop(c, s, n, sc, IN, 1, 1, DT_F16, NZ);            \
    else if (o == DT_F16) qdq_loop(c, s, n, sc, IN, 0, 1, DT_F16, NZ);                  \
    else if (wc) qdq_loop(c, s, n, sc, IN, 1, 1, DT_BF16, NZ);                          \
    else qdq_loop(c, s, n, sc, IN, 0, 1, DT_BF16, NZ);
#define QDQ_OUT(IN)                                                                     \
    static void qdq_in_##IN(const call_t *c, int64_t s, int64_t n, scales_t sc) {       \
        int wc = c->codes != 0, wv = c->vals != 0, o = c->out_dt;                       \
        if (c->f->negzero) { QDQ_CASES(IN, 1) } else { QDQ_CASES(IN, 0) }               \
    }
/* HOT on the outer function so each clone inlines its own vector loop */
HOT QDQ_OUT(DT_F32)
HOT QDQ_OUT(DT_F16)
HOT QDQ_OUT(DT_BF16)

static void qdq_range(const call_t *c, int64_t start, int64_t len, scales_t sc) {
    if (c->in_dt == DT_F32) qdq_in_DT_F32(c, start, len, sc);
    else if (c->in_dt == DT_F16) qdq_in_DT_F16(c, start, len, sc);
    else qdq_in_DT_BF16(c, start, len, sc);
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
            qdq_range(c, start, len, group_scales(a, c->f));
        }
    } else if (j->phase == 1) {
        j->partial = absmax_bits(c->x, c->in_dt, j->lo, j->hi - j->lo);
    } else {
        qdq_range(c, j->lo, j->hi - j->lo, j->sc);
    }
    return 0;
}

#define MAX_THREADS 64
#define MIN_PER_THREAD (1 << 15)   /* elements: below this a thread is not worth it */

/* Run fn(job t) for t in [0, nj): an OpenMP team if `openmp` (and built with
 * OpenMP), else POSIX threads with job 0 on the calling thread. */
static void run_parallel(void *(*fn)(void *), void *jobs, size_t job_size, int nj, int openmp) {
    char *base = (char *)jobs;
#ifdef _OPENMP
    if (openmp && nj > 1) {
#pragma omp parallel for num_threads(nj) schedule(static, 1)
        for (int t = 0; t < nj; t++) fn(base + (size_t)t * job_size);
        return;
    }
#else
    (void)openmp;
#endif
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
int fp8q_quantize(const void *x, int in_dt, int64_t n, int64_t group, const fp8q_format *f,
                  uint8_t *codes, void *vals, int out_dt, float *absmax, int nthreads, int openmp) {
    if (n < 0 || group <= 0 || in_dt < 0 || in_dt > 2 || out_dt < 0 || out_dt > 2) return -1;
    if (f->mant < 1 || f->mant > 22 || f->bits < 2 || f->bits > 8) return -1;
    if (n == 0) return 0;                              /* callers handle empty tensors */
    call_t c = {x, in_dt, out_dt, codes, vals, f};
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
        return 0;
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
    scales_t sc = group_scales(a, f);
    for (int t = 0; t < nt; t++) { jobs[t].phase = 2; jobs[t].sc = sc; }
    run_parallel(run_job, jobs, sizeof(job_t), nt, openmp);
    return 0;
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

static void *run_djob(void *arg) {
    djob_t *j = (djob_t *)arg;
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
    if (n < 0 || group <= 0 || out_dt < 0 || out_dt > 2) return -1;
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
