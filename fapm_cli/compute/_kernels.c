/* Fused CPU kernels for `fapm prune`'s hot loops; fapm_cli/native.py loads them with ctypes.
 *
 * Why hand-written (the brief prefers libraries): the same work as torch element-wise ops
 * costs ~17 torch calls per chunk, each a pass over memory with its own temporaries; here it
 * is one pass per element. On the project's 2-core machine the scoring pass drops from ~4 ns
 * to ~1 ns per element and the output pass from ~3.5 ns to under 1 ns (docs/benchmarks.md,
 * `make bench`). Nothing here is required: without a C compiler fapm uses the torch path, and
 * the tests check that both give the same keys, thresholds, masks and bytes, bit for bit.
 *
 * Exactness: every float operation is the IEEE single-precision operation that
 * scoring.score_keys_into performs, in the same order: widen (exact), subtract, abs, divide,
 * multiply, subtract. Compiled with -ffp-contract=off and without -ffast-math, so the compiler
 * vectorises but never fuses or reassociates. Only the float64 sums (of |base| and of tau^2)
 * are added in another order than torch's; each is deterministic (fixed lanes, fixed order).
 *
 * This file is also an (empty) Python extension module, so that setuptools builds it and pip
 * installs it inside the package. The functions hold no Python object: ctypes calls them with
 * the GIL released, and the scoring threads run them in parallel on disjoint slices.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define API __attribute__((visibility("default")))

/* Vector width is chosen at load time (ifunc) where the toolchain allows it: the same C, so
 * the same IEEE operations and results, compiled for AVX-512, AVX2 and the baseline. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { M_FAPM = 0, M_MAGNITUDE = 1, M_RATIO = 2 };

/* Bumped whenever a signature or a result changes; native.py refuses a stale build. */
#define ABI_VERSION 14

#define BLOCK 1024 /* elements per inner block: its float scratch stays in L1 */
#define BINS 65536

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int32_t float_bits(float f) {
    int32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

/* IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN payloads). */
static inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));
    if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
    float mag = (float)man * 5.9604644775390625e-8f; /* subnormal or zero: man * 2^-24, exact */
    return bits_to_float(sign | (uint32_t)float_bits(mag));
}

static inline float load(int dt, const void *p, int64_t i) {
    switch (dt) {
    case DT_BF16:
        return bf16_to_float(((const uint16_t *)p)[i]);
    case DT_F16:
        return f16_to_float(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

/* lane[j] += x[i] for i = j (mod 8), in order: 8 float64 accumulators that the compiler can
 * vectorise without reassociating (each lane's sum is in element order). */
static inline void add_lanes(double lane[8], const float *x, int64_t m) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += (double)x[i + j];
    for (; i < m; i++) lane[i & 7] += (double)x[i];
}

/* Order-preserving map of a float's bits to a signed integer (scoring.to_keys). */
static inline int32_t key_of(float s) {
    int32_t bits = float_bits(s);
    return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

API int fapm_kernels_abi(void) { return ABI_VERSION; }

/* Sum of |x| over p[0:n] in float64: 8 lanes, each element widened exactly, lanes added in a
 * fixed order at the end. Deterministic; the caller adds chunks' sums in chunk order. */
HOT API double fapm_sum_abs(int dt, const void *p, int64_t n) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float x[BLOCK];
    for (int64_t c = 0; c < n; c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        if (dt == DT_BF16) {
            const uint16_t *q = (const uint16_t *)p + c;
            for (int64_t i = 0; i < m; i++) x[i] = __builtin_fabsf(bf16_to_float(q[i]));
        } else {
            for (int64_t i = 0; i < m; i++) x[i] = __builtin_fabsf(load(dt, p, c + i));
        }
        add_lanes(lane, x, m);
    }
    double s = 0;
    for (int j = 0; j < 8; j++) s += lane[j];
    return s;
}

/* One block of scores -> keys; a2 gets tau^2 (float32). B(i) and F(i) load element i. */
#define SCORE_BLOCK(B, F)                                                                       \
    do {                                                                                        \
        if (method == M_MAGNITUDE) {                                                            \
            for (int64_t i = 0; i < m; i++) {                                                   \
                float a = __builtin_fabsf(F(i) - B(i));                                         \
                a2[i] = a * a;                                                                  \
                kp[i] = key_of(a);                                                              \
            }                                                                                   \
        } else if (method == M_FAPM) {                                                          \
            for (int64_t i = 0; i < m; i++) {                                                   \
                float b = B(i);                                                                 \
                float a = __builtin_fabsf(F(i) - b);                                            \
                a2[i] = a * a;                                                                  \
                float s = a - (a / __builtin_fabsf(b)) * coef;                                  \
                kp[i] = key_of(b == 0 ? -__builtin_inff() : s);                                 \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t i = 0; i < m; i++) {                                                   \
                float b = B(i);                                                                 \
                float a = __builtin_fabsf(F(i) - b);                                            \
                a2[i] = a * a;                                                                  \
                float s = -(a / __builtin_fabsf(b)) + 0.0f;                                     \
                kp[i] = key_of(b == 0 ? -__builtin_inff() : s);                                 \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* Scores of base[0:n], ft[0:n] (method: fapm, magnitude, ratio; coef = lam * m) as int32 keys
 * into keys[0:n]: the same keys as scoring.score_keys_into, bit for bit. When hist is not
 * NULL, adds the histogram of the keys' top 16 bits (offset by 2^15: bins in signed order)
 * to hist, 4 interleaved copies of 65536 uint32 counters (sum them; the copies break the
 * dependency chain of repeated bins). Returns sum(tau^2) (float32 squares, float64 sum): not
 * finite exactly when an input is not finite, or tau^2 overflowed. */
HOT API double fapm_score_keys(int method, int bdt, int fdt, const void *base, const void *ft,
                               int64_t n, float coef, int32_t *keys, uint32_t *hist) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float a2[BLOCK];
    for (int64_t c = 0; c < n; c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        int32_t *kp = keys + c;
        if (bdt == DT_BF16 && fdt == DT_BF16) {
            const uint16_t *bp = (const uint16_t *)base + c, *fp = (const uint16_t *)ft + c;
#define BB(i) bf16_to_float(bp[i])
#define FB(i) bf16_to_float(fp[i])
            SCORE_BLOCK(BB, FB);
        } else if (bdt == DT_F32 && fdt == DT_F32) {
            const float *bp = (const float *)base + c, *fp = (const float *)ft + c;
#define BF(i) bp[i]
#define FF(i) fp[i]
            SCORE_BLOCK(BF, FF);
        } else {
#define BG(i) load(bdt, base, c + (i))
#define FG(i) load(fdt, ft, c + (i))
            SCORE_BLOCK(BG, FG);
        }
        add_lanes(lane, a2, m);
        int64_t i;
        if (hist) {
            for (i = 0; i + 4 <= m; i += 4) {
                hist[(kp[i] >> 16) + 32768]++;
                hist[BINS + (kp[i + 1] >> 16) + 32768]++;
                hist[2 * BINS + (kp[i + 2] >> 16) + 32768]++;
                hist[3 * BINS + (kp[i + 3] >> 16) + 32768]++;
            }
            for (; i < m; i++) hist[(kp[i] >> 16) + 32768]++;
        }
    }
    double s = 0;
    for (int j = 0; j < 8; j++) s += lane[j];
    return s;
}

/* Adds to hist[65536] the count of each key in [low, low + 65536), by key - low. */
HOT API void fapm_bucket_hist(const int32_t *keys, int64_t n, int32_t low, int64_t *hist) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t d = (uint32_t)keys[i] - (uint32_t)low;
        if (d < (uint32_t)BINS) hist[d]++;
    }
}

/* The exact threshold of a small tensor: the k-th largest of keys[0:n] (1 <= k < n), by radix
 * select over 8-bit digits with the candidates compacted after each digit (4 passes, 256-bin
 * histograms). For the small tensors of MoE checkpoints the 16-bit histogram path's fixed cost
 * (a 65,536-bin histogram built, walked and summed per tensor, ~1 ms) is most of the work; this
 * is O(n) with no fixed cost. *key gets the threshold key, *above how many keys exceed it and
 * *eq how many equal it (so the first k - *above of those are kept). Returns 0, or -1 when no
 * scratch memory could be had. */
/* hist[256] = counts of digit (u >> shift) & 255 over u[0:m], from 4 interleaved copies: the
 * keys of a tensor crowd into few digits, and one counter incremented back to back waits on
 * its own store each time (~5x slower). */
static inline void digit_hist(const uint32_t *u, int64_t m, int shift, uint32_t flip,
                              int64_t hist[256]) {
    if (m < 256) { /* a few keys (the low digits of a sweep's select): one copy */
        memset(hist, 0, 256 * sizeof(int64_t));
        for (int64_t i = 0; i < m; i++) hist[((u[i] ^ flip) >> shift) & 255u]++;
        return;
    }
    int64_t h[4][256];
    memset(h, 0, sizeof h);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        h[0][((u[i] ^ flip) >> shift) & 255u]++;
        h[1][((u[i + 1] ^ flip) >> shift) & 255u]++;
        h[2][((u[i + 2] ^ flip) >> shift) & 255u]++;
        h[3][((u[i + 3] ^ flip) >> shift) & 255u]++;
    }
    for (; i < m; i++) h[0][((u[i] ^ flip) >> shift) & 255u]++;
    for (int b = 0; b < 256; b++) hist[b] = h[0][b] + h[1][b] + h[2][b] + h[3][b];
}

/* A per-thread scratch array of at least n uint32, kept for the thread's next call (small
 * tensors come by the thousand: a malloc of a few hundred kB each time can be an mmap and
 * its page faults). NULL when there is no memory. fapm calls the small-tensor kernels from
 * its main thread only; a thread that ends leaves its array (at most 512 kB) behind. */
static uint32_t *scratch(int64_t n) {
    static __thread uint32_t *buf;
    static __thread int64_t cap;
    if (n > cap) {
        uint32_t *grown = (uint32_t *)realloc(buf, (size_t)(n > 1024 ? n : 1024) * 4);
        if (!grown) return NULL;
        buf = grown;
        cap = n > 1024 ? n : 1024;
    }
    return buf;
}

static inline __attribute__((always_inline)) int select_into(const int32_t *keys, int64_t n,
                                                             int64_t k, uint32_t *cand,
                                                             int32_t *key, int64_t *above,
                                                             int64_t *eq) {
    int64_t need = k, m = 0;
    int64_t hist[256];
    digit_hist((const uint32_t *)keys, n, 24, 0x80000000u, hist);
    for (int shift = 24;; shift -= 8) {
        int b = 255;
        while (hist[b] < need) need -= hist[b--];
        /* keep the candidates whose digit is b: the k-th largest is among them (written
         * without a branch: which keys stay is data, and mispredicting it cost ~4x) */
        if (shift == 24) {
            for (int64_t i = 0; i < n; i++) {
                uint32_t u = (uint32_t)keys[i] ^ 0x80000000u;
                cand[m] = u;
                m += (u >> 24) == (uint32_t)b;
            }
        } else {
            int64_t j = 0;
            for (int64_t i = 0; i < m; i++) {
                uint32_t u = cand[i];
                cand[j] = u;
                j += ((u >> shift) & 255u) == (uint32_t)b;
            }
            m = j;
        }
        if (shift == 0) break;
        digit_hist(cand, m, shift - 8, 0, hist);
    }
    *key = (int32_t)(cand[0] ^ 0x80000000u);
    *above = k - need;
    *eq = m;
    return 0;
}

HOT API int fapm_select_small(const int32_t *keys, int64_t n, int64_t k, int32_t *key,
                              int64_t *above, int64_t *eq) {
    uint32_t *cand = scratch(n);
    if (!cand) return -1;
    return select_into(keys, n, k, cand, key, above, eq);
}

/* Adds the 4 interleaved uint32 histograms of fapm_score_keys into hist[65536] (int64) and
 * zeroes them: the flush that torch did in 4 full-size ops per tensor. */
HOT API void fapm_hist_flush(uint32_t *counts, int64_t *hist) {
    for (int64_t i = 0; i < BINS; i++)
        hist[i] += (int64_t)counts[i] + counts[BINS + i] + counts[2 * BINS + i] +
                   counts[3 * BINS + i];
    memset(counts, 0, 4 * BINS * sizeof(uint32_t));
}

/* A bool mask (one byte per entry, 0 or 1) packed into bits, entry 8i + j in bit j of byte i,
 * the last byte zero-padded (taskvector.pack_mask), and back (taskvector.unpack_mask). */
HOT API void fapm_pack_bits(const uint8_t *mask, int64_t n, uint8_t *out) {
    int64_t full = n / 8;
    for (int64_t i = 0; i < full; i++) {
        const uint8_t *m = mask + 8 * i;
        out[i] = (uint8_t)((m[0] != 0) | (m[1] != 0) << 1 | (m[2] != 0) << 2 | (m[3] != 0) << 3 |
                           (m[4] != 0) << 4 | (m[5] != 0) << 5 | (m[6] != 0) << 6 |
                           (m[7] != 0) << 7);
    }
    if (n % 8) {
        uint8_t last = 0;
        for (int64_t j = 0; j < n % 8; j++) last |= (uint8_t)((mask[8 * full + j] != 0) << j);
        out[full] = last;
    }
}

HOT API void fapm_unpack_bits(const uint8_t *packed, int64_t n, uint8_t *mask) {
    for (int64_t i = 0; i < n; i++) mask[i] = (packed[i >> 3] >> (i & 7)) & 1u;
}

/* How many of keys[0:n] equal t. */
HOT API int64_t fapm_count_eq(const int32_t *keys, int64_t n, int32_t t) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += keys[i] == t;
    return c;
}

/* One block of the output: o(i) = keep ? f(i) : b(i), d2 = tau^2 where kept, else 0. */
#define SELECT_BLOCK(T, LOADB, LOADF)                                                           \
    do {                                                                                        \
        const T *b = (const T *)base + c, *f = (const T *)ft + c;                               \
        T *o = (T *)out + c;                                                                    \
        if (ties + eq <= ties_left) { /* every key equal to t here is kept, or there is none */ \
            int32_t take_eq = eq > 0;                                                           \
            ties += eq;                                                                         \
            for (int64_t i = 0; i < m; i++) {                                                   \
                int32_t keep = (k[i] > t) | (take_eq & (k[i] == t));                            \
                float d = LOADF(f[i]) - LOADB(b[i]);                                            \
                d2[i] = keep ? d * d : 0.0f;                                                    \
                o[i] = keep ? f[i] : b[i];                                                      \
                nkept += keep;                                                                  \
            }                                                                                   \
        } else { /* the quota of tied keys runs out in this block: first in flat order */      \
            for (int64_t i = 0; i < m; i++) {                                                   \
                int32_t keep = k[i] > t;                                                        \
                if (k[i] == t) {                                                                \
                    keep = ties < ties_left;                                                    \
                    ties += keep;                                                               \
                }                                                                               \
                float d = LOADF(f[i]) - LOADB(b[i]);                                            \
                d2[i] = keep ? d * d : 0.0f;                                                    \
                o[i] = keep ? f[i] : b[i];                                                      \
                nkept += keep;                                                                  \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* The output of one chunk: ft's element where kept and base's elsewhere, bits copied (dt:
 * the dtype of base, ft and out alike). Kept: every key > t, then the first ties_left keys
 * equal to t in flat order. out may be ft itself (in place). Returns sum((out - base)^2)
 * (float32 squares, float64 sum) = tau^2 over the kept entries; *kept gets how many were kept
 * and *ties_used how many of them equal t. */
HOT API double fapm_select_write(const int32_t *keys, int64_t n, int32_t t, int64_t ties_left,
                                 int dt, const void *base, const void *ft, void *out,
                                 int64_t *kept, int64_t *ties_used) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t nkept = 0, ties = 0;
    float d2[BLOCK];
    for (int64_t c = 0; c < n; c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        const int32_t *k = keys + c;
        int64_t eq = 0;
        if (ties < ties_left)
            for (int64_t i = 0; i < m; i++) eq += k[i] == t;
        if (dt == DT_BF16)
            SELECT_BLOCK(uint16_t, bf16_to_float, bf16_to_float);
        else if (dt == DT_F16)
            SELECT_BLOCK(uint16_t, f16_to_float, f16_to_float);
        else
            SELECT_BLOCK(uint32_t, bits_to_float, bits_to_float); /* bits: NaNs untouched */
        add_lanes(lane, d2, m);
    }
    double s = 0;
    for (int j = 0; j < 8; j++) s += lane[j];
    *kept = nkept;
    *ties_used = ties;
    return s;
}

/* coef = lam * mean |base[0:n]| in float32 as compute.scoring rounds it (n = 0: mean 0): the
 * float64 mean of one chunk rounded once, lam rounded, their product (exact in float64)
 * rounded once. */
static inline float coef_of(int dt, const void *base, int64_t n, double lam) {
    float mean = n ? (float)(fapm_sum_abs(dt, base, n) / (double)n) : 0.0f;
    return (float)((double)(float)lam * (double)mean);
}

/* "Keep every key > t, then the first ties equal to it" for the k-th largest key, with tie of
 * the eq keys equal to it kept: when all of them are, keys > key - 1 and no ties (the form
 * scoring.settled gives, which lets the masks skip counting ties). */
static inline void settle(int32_t key, int64_t tie, int64_t eq, int32_t *t, int64_t *ties) {
    if (key > INT32_MIN && tie == eq) {
        *t = key - 1;
        *ties = 0;
    } else {
        *t = key;
        *ties = tie;
    }
}

/* fapm prune of one small tensor whose base, finetuned and output share the dtype dt, in one
 * call: the mean |base| and coef = lam * mean rounded as scoring._rank_small rounds them, the
 * keys (fapm_score_keys, into a per-thread scratch), the threshold (fapm_select_small, in
 * the form scoring.settled gives it) and the output (fapm_select_write): the same bytes and
 * sums as those steps, without a Python call between them. res[0] gets sum tau^2, res[1]
 * the kept tau^2, *kept the kept count. Returns 0; 1 when sum tau^2 is not finite and
 * force is 0 (nothing is written: the caller checks the inputs, then calls again with force
 * 1 if they are finite); -1 when no scratch memory could be had. */
HOT API int fapm_prune_small(int method, int dt, const void *base, const void *ft, int64_t n,
                             double lam, int64_t k, void *out, int force, double *res,
                             int64_t *kept) {
    uint32_t *buf = scratch(2 * n);
    if (!buf) return -1;
    int32_t *keys = (int32_t *)buf;
    float coef = coef_of(dt, base, method == M_FAPM ? n : 0, lam);
    double sq = fapm_score_keys(method, dt, dt, base, ft, n, coef, keys, NULL);
    if (!force && !(sq - sq == 0)) return 1; /* inf or nan */
    int32_t t;
    int64_t ties;
    if (k >= n) {
        t = INT32_MIN;
        ties = n;
    } else if (k <= 0) {
        t = INT32_MAX;
        ties = 0;
    } else {
        int32_t key;
        int64_t above, eq;
        /* the candidates of the select go after the keys in the same scratch */
        if (select_into(keys, n, k, buf + n, &key, &above, &eq)) return -1;
        settle(key, k - above, eq, &t, &ties);
    }
    int64_t used;
    res[0] = sq;
    res[1] = fapm_select_write(keys, n, t, ties, dt, base, ft, out, kept, &used);
    return 0;
}

/* float32 -> bfloat16, round to nearest even: torch's conversion of every non-NaN value.
 * (torch's NaN bits differ between its code paths: callers leave NaN results to torch.) */
static inline uint16_t float_to_bf16(float x) {
    uint32_t u = (uint32_t)float_bits(x);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* taskvector.reconstruct for a float32 delta and a bfloat16 (dt 1) or float32 (dt 0) model:
 * out[i] = base[i]'s bits where delta[i] == 0, else base[i] + delta[i] (float32) rounded to
 * the model dtype. Returns how many entries of out differ from base, bitwise, or -1 when a
 * bfloat16 sum is NaN (the caller then computes the chunk with torch). */
HOT API int64_t fapm_apply_delta_f32(int dt, const void *base, const float *delta, int64_t n,
                                     void *out) {
    int64_t changed = 0;
    if (dt == DT_BF16) {
        const uint16_t *b = (const uint16_t *)base;
        uint16_t *o = (uint16_t *)out;
        int64_t nan = 0;
        for (int64_t i = 0; i < n; i++) {
            float sum = bf16_to_float(b[i]) + delta[i];
            uint16_t v = delta[i] == 0 ? b[i] : float_to_bf16(sum);
            nan += delta[i] != 0 && sum != sum;
            changed += v != b[i];
            o[i] = v;
        }
        if (nan) return -1;
    } else {
        const uint32_t *b = (const uint32_t *)base;
        uint32_t *o = (uint32_t *)out;
        for (int64_t i = 0; i < n; i++) {
            uint32_t v = delta[i] == 0 ? b[i] : (uint32_t)float_bits(bits_to_float(b[i]) + delta[i]);
            changed += v != b[i];
            o[i] = v;
        }
    }
    return changed;
}

/* The dense float32 delta of one chunk (fapm diff): delta[i] = ft[i] - base[i] in float32, for
 * bfloat16 (dt 1) or float32 (dt 0) inputs of one dtype. Returns 1 when every entry comes back
 * bit for bit under taskvector.reconstruct (base's bits where the delta is 0, else base +
 * delta rounded to the model dtype), 0 otherwise (the caller then takes the torch path, which
 * decides); *kept gets the count of non-zero deltas. */
HOT API int fapm_delta_f32(int dt, const void *base, const void *ft, int64_t n, float *delta,
                           int64_t *kept) {
    int64_t bad = 0, nz = 0;
    if (dt == DT_BF16) {
        const uint16_t *b = (const uint16_t *)base, *f = (const uint16_t *)ft;
        for (int64_t i = 0; i < n; i++) {
            float bv = bf16_to_float(b[i]);
            float d = bf16_to_float(f[i]) - bv;
            delta[i] = d;
            float sum = bv + d;
            uint16_t back = d == 0 ? b[i] : float_to_bf16(sum);
            bad += (back != f[i]) | (d != 0 && sum != sum); /* NaN: torch decides */
            nz += d != 0;
        }
    } else if (dt == DT_F32) {
        const uint32_t *b = (const uint32_t *)base, *f = (const uint32_t *)ft;
        for (int64_t i = 0; i < n; i++) {
            float bv = bits_to_float(b[i]);
            float d = bits_to_float(f[i]) - bv;
            delta[i] = d;
            uint32_t back = d == 0 ? b[i] : (uint32_t)float_bits(bv + d);
            bad += back != f[i];
            nz += d != 0;
        }
    } else {
        return 0;
    }
    *kept = nz;
    return bad == 0;
}

/* -- fapm score: the statistics of both masks, for one or many sparsities ------------------
 *
 * On a large tensor score keeps no key array: each pass recomputes an element's FAPM key and
 * its magnitude key (|tau|'s bits) from the inputs, which costs what reading stored keys would
 * (4 bytes per element of bfloat16 inputs) and saves 8 bytes per element of memory; only the
 * keys in the buckets of the thresholds are gathered (fapm_score_gather). SCORE_KEYS fills, for
 * one block, the FAPM and magnitude keys, tau^2 and (when asked) |tau|, |base|, |tau|/|base|
 * (0 where base == 0) and the FAPM score (-inf where base == 0): the same IEEE operations as
 * fapm_score_keys, in vectorisable loops; the histograms and masks work on those arrays. */
#define SCORE_KEYS(B, F, FULL)                                                                  \
    for (int64_t i = 0; i < m; i++) {                                                           \
        float b = B(i);                                                                         \
        float a = __builtin_fabsf(F(i) - b);                                                    \
        float ab = __builtin_fabsf(b);                                                          \
        float r = a / ab;                                                                       \
        float sc = b == 0 ? -__builtin_inff() : a - r * coef;                                   \
        kf[i] = key_of(sc);                                                                     \
        km[i] = key_of(a);                                                                      \
        a2[i] = a * a;                                                                          \
        if (FULL) {                                                                             \
            aa[i] = a;                                                                          \
            bb[i] = ab;                                                                         \
            rr[i] = b != 0 ? r : 0.0f;                                                          \
            ss[i] = sc;                                                                         \
        }                                                                                       \
    }

#define BLOCK_KEYS(FULL)                                                                        \
    do {                                                                                        \
        if (bdt == DT_BF16 && fdt == DT_BF16) {                                                 \
            const uint16_t *bp = (const uint16_t *)base + c, *fp = (const uint16_t *)ft + c;    \
            SCORE_KEYS(BB, FB, FULL);                                                           \
        } else if (bdt == DT_F32 && fdt == DT_F32) {                                            \
            const float *bp = (const float *)base + c, *fp = (const float *)ft + c;             \
            SCORE_KEYS(BF, FF, FULL);                                                           \
        } else {                                                                                \
            SCORE_KEYS(BG, FG, FULL);                                                           \
        }                                                                                       \
    } while (0)

/* The first pass over one chunk: stats[0..3] += sum |tau|, sum |base|, sum |tau|/|base| (base
 * != 0), sum tau^2 (float64, 8 lanes each, in element order); counts[0..1] += entries with
 * base != 0, entries with FAPM score > 0. Optional outputs (NULL: not wanted): the FAPM and
 * magnitude keys, the top-16-bit histograms of both (4 interleaved uint32 copies each, as
 * fapm_score_keys), the FAPM scores as float32. Returns the chunk's sum tau^2 (not finite
 * exactly when an input is not, or tau^2 overflowed). */
HOT API double fapm_score_pass(int bdt, int fdt, const void *base, const void *ft, int64_t n,
                               float coef, int32_t *keys_f, int32_t *keys_m, uint32_t *hist_f,
                               uint32_t *hist_m, float *scores, double *stats,
                               int64_t *counts) {
    double l_tau[8] = {0}, l_base[8] = {0}, l_rel[8] = {0}, l_sq[8] = {0};
    int64_t nz = 0, pos = 0;
    int32_t kf[BLOCK], km[BLOCK];
    float a2[BLOCK], aa[BLOCK], bb[BLOCK], rr[BLOCK], ss[BLOCK];
    for (int64_t c = 0; c < n; c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        BLOCK_KEYS(1);
        add_lanes(l_tau, aa, m);
        add_lanes(l_base, bb, m);
        add_lanes(l_rel, rr, m);
        add_lanes(l_sq, a2, m);
        for (int64_t i = 0; i < m; i++) {
            nz += bb[i] != 0;
            pos += ss[i] > 0;
        }
        if (keys_f) memcpy(keys_f + c, kf, (size_t)m * 4);
        if (keys_m) memcpy(keys_m + c, km, (size_t)m * 4);
        if (scores) memcpy(scores + c, ss, (size_t)m * 4);
        if (hist_f) {
            int64_t i;
            for (i = 0; i + 2 <= m; i += 2) {
                hist_f[(kf[i] >> 16) + 32768]++;
                hist_m[(km[i] >> 16) + 32768]++;
                hist_f[BINS + (kf[i + 1] >> 16) + 32768]++;
                hist_m[BINS + (km[i + 1] >> 16) + 32768]++;
            }
            for (; i < m; i++) {
                hist_f[(kf[i] >> 16) + 32768]++;
                hist_m[(km[i] >> 16) + 32768]++;
            }
        }
    }
    double t = 0, bs = 0, r = 0, q = 0;
    for (int j = 0; j < 8; j++) {
        t += l_tau[j];
        bs += l_base[j];
        r += l_rel[j];
        q += l_sq[j];
    }
    stats[0] += t;
    stats[1] += bs;
    stats[2] += r;
    stats[3] += q;
    counts[0] += nz;
    counts[1] += pos;
    return q;
}

/* How one block takes the keys equal to t with *ties of them left to take (INT64_MAX: all):
 * 1 all of them (*ties lowered by their count), 0 none, -1 some (the quota runs out here:
 * keep_block takes them one by one). */
static inline int32_t take_ties(const int32_t *k, int64_t m, int32_t t, int64_t *ties) {
    if (*ties == 0) return 0;
    if (*ties == INT64_MAX) return 1;
    int64_t eq = 0;
    for (int64_t i = 0; i < m; i++) eq += k[i] == t;
    if (eq > *ties) return -1;
    *ties -= eq;
    return 1;
}

/* keep[i] for one block whose ties run out in it: keys > t, then keys equal to t while *ties
 * > 0 (decremented as they are taken, in flat order). Returns how many are kept; lane[] gets
 * the kept x (float64, 8 lanes in element order). */
static inline int64_t keep_block(const int32_t *k, int64_t m, int32_t t, int64_t *ties,
                                 const float *x, uint8_t *keep, double lane[8]) {
    /* The quota's last tie is found by a scan that stops there (a branch taken once); then
     * one branchless pass keeps every tie before that cut and none after. A branch per tie
     * was mispredicted wherever ties are common (bf16 magnitude keys): 5x slower. */
    int64_t left = *ties, cut = left > 0 ? m : 0, taken = 0; /* local: keep[] may alias */
    for (int64_t i = 0; i < m && left > 0; i++) {
        taken += k[i] == t;
        if (taken == left) {
            cut = i + 1;
            break;
        }
    }
    *ties = left - taken;
    float kx[BLOCK];
    int64_t kept = 0;
    for (int64_t i = 0; i < m; i++) {
        int32_t y = (k[i] > t) | ((k[i] == t) & (i < cut));
        keep[i] = (uint8_t)y;
        kx[i] = y ? x[i] : 0.0f;
        kept += y;
    }
    add_lanes(lane, kx, m);
    return kept;
}

/* keep_block for a block that takes all its ties (take_eq 1) or none (0). */
static inline int64_t keep_simple(const int32_t *k, int64_t m, int32_t t, int32_t take_eq,
                                  const float *x, uint8_t *keep, double lane[8]) {
    int64_t kept = 0;
    float kx[BLOCK];
    for (int64_t i = 0; i < m; i++) {
        int32_t y = (k[i] > t) | (take_eq & (k[i] == t));
        keep[i] = (uint8_t)y;
        kx[i] = y ? x[i] : 0.0f;
        kept += y;
    }
    add_lanes(lane, kx, m);
    return kept;
}

/* keep_block for both methods at once, when neither takes its ties one by one: one loop over
 * the block for both masks, their counts and overlap; the same lanes in the same order (the
 * same sums, bit for bit) as two keep_block calls. */
static inline void keep_both(const int32_t *kf, const int32_t *km, int64_t m, int32_t tf,
                             int32_t tm, int32_t eq_f, int32_t eq_m, const float *a2,
                             double lf[8], double lm[8], int64_t *kept_f, int64_t *kept_m,
                             int64_t *overlap) {
    float xf[BLOCK], xm[BLOCK];
    int64_t nf = 0, nm = 0, nb = 0;
    for (int64_t i = 0; i < m; i++) {
        int32_t f = (kf[i] > tf) | (eq_f & (kf[i] == tf));
        int32_t g = (km[i] > tm) | (eq_m & (km[i] == tm));
        xf[i] = f ? a2[i] : 0.0f;
        xm[i] = g ? a2[i] : 0.0f;
        nf += f;
        nm += g;
        nb += f & g;
    }
    add_lanes(lf, xf, m);
    add_lanes(lm, xm, m);
    *kept_f += nf;
    *kept_m += nm;
    *overlap += nb;
}

#define MAXS 64

/* The end of keep_group_G / keep_wide_G for one sparsity: entries i..m-1 (past the last full
 * 8) added in their lanes, then the block's counts (nf, nm, nb so far) to the totals. */
static inline __attribute__((always_inline)) void group_tail(
    const int32_t *kf, const int32_t *km, const float *a2, int64_t i, int64_t m, int32_t tf,
    int32_t tm, double lf[8], double lm[8], int64_t nf, int64_t nm, int64_t nb, int64_t *kept_f,
    int64_t *kept_m, int64_t *overlap) {
    for (; i < m; i++) {
        int32_t p = kf[i] > tf, q = km[i] > tm;
        lf[i & 7] += p ? (double)a2[i] : 0.0;
        lm[i & 7] += q ? (double)a2[i] : 0.0;
        nf += p, nm += q, nb += p & q;
    }
    *kept_f += nf, *kept_m += nm, *overlap += nb;
}

#if defined(__GNUC__) /* GCC and clang: vector extensions */
/* 256-bit vectors: GCC 12 fails (an internal error) on 512-bit ones in target_clones. */
typedef int32_t v4i __attribute__((vector_size(16)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
#define GROUPED 1

/* keep_both for G sparsities of one block at once, each keeping the keys > tf[idx[g]] and >
 * tm[idx[g]] (ties folded in: keys >= t are keys > t - 1): in one loop over the block, each
 * sparsity's 8 lanes in two vectors (lane l: entries i = l mod 8), so that their float64 sums
 * run as 4G independent chains instead of two after another, each waiting on its own adds (on
 * a sweep of six that wait was most of the final pass). The keys are compared as float64
 * (every int32 is one exactly), which gives the 64-bit mask of the lanes directly. Each lane
 * still adds its own entries in element order, a kept entry's tau^2 or +0.0 (its bits
 * masked), as keep_both does: the same sums, bit for bit. Written with vector extensions:
 * the compiler vectorised neither this loop nest nor its scalar form. */
#define KEEP_GROUP(G)                                                                           \
    static inline __attribute__((always_inline)) void keep_group_##G(                            \
        const int32_t *kf, const int32_t *km, const float *a2, int64_t m, const int *idx,      \
        const int32_t *tf, const int32_t *tm, double lf[][8], double lm[][8], int64_t *kept_f, \
        int64_t *kept_m, int64_t *overlap) {                                                    \
        v4d af[G][2], am[G][2], xf[G], xm[G];                                                   \
        v4l cf[G], cm[G], cb[G];                                                                \
        for (int g = 0; g < G; g++) {                                                           \
            double u = tf[idx[g]], w = tm[idx[g]];                                              \
            xf[g] = (v4d){0, 0, 0, 0} + u; /* every lane u (a {u, u, u, u} misleads GCC 12's */ \
            xm[g] = (v4d){0, 0, 0, 0} + w; /* warnings), exactly: int32 values */                \
            cf[g] = cm[g] = cb[g] = (v4l){0, 0, 0, 0};                                          \
            memcpy(af[g], lf[idx[g]], sizeof af[g]);                                            \
            memcpy(am[g], lm[idx[g]], sizeof am[g]);                                            \
        }                                                                                       \
        int64_t i = 0;                                                                          \
        for (; i + 8 <= m; i += 8)                                                              \
            for (int h = 0; h < 2; h++) {                                                       \
                v4i a32, b32;                                                                   \
                v4f x;                                                                          \
                memcpy(&a32, kf + i + 4 * h, sizeof a32);                                       \
                memcpy(&b32, km + i + 4 * h, sizeof b32);                                       \
                memcpy(&x, a2 + i + 4 * h, sizeof x);                                           \
                v4d a = __builtin_convertvector(a32, v4d), b = __builtin_convertvector(b32, v4d); \
                v4l bits = (v4l)__builtin_convertvector(x, v4d);                                \
                for (int g = 0; g < G; g++) {                                                   \
                    v4l p = a > xf[g], q = b > xm[g]; /* -1 kept, 0 not */                      \
                    af[g][h] += (v4d)(bits & p);                                                \
                    am[g][h] += (v4d)(bits & q);                                                \
                    cf[g] -= p, cm[g] -= q, cb[g] -= p & q;                                     \
                }                                                                               \
            }                                                                                   \
        for (int g = 0; g < G; g++) {                                                           \
            int j = idx[g];                                                                     \
            int64_t nf = 0, nm = 0, nb = 0;                                                     \
            memcpy(lf[j], af[g], sizeof af[g]);                                                 \
            memcpy(lm[j], am[g], sizeof am[g]);                                                 \
            for (int l = 0; l < 4; l++) nf += cf[g][l], nm += cm[g][l], nb += cb[g][l];         \
            group_tail(kf, km, a2, i, m, tf[j], tm[j], lf[j], lm[j], nf, nm, nb, &kept_f[j],      \
                       &kept_m[j], &overlap[j]);                                                \
        }                                                                                       \
    }
KEEP_GROUP(1)
KEEP_GROUP(2)
KEEP_GROUP(3)
KEEP_GROUP(4)
#else
#define GROUPED 0
#endif

#if GROUPED && defined(__x86_64__)
#include <immintrin.h>
/* keep_group_G on a CPU with AVX-512 (F and VL, checked at run time: the kernels are built
 * for any x86-64): the int32 keys compared into mask registers, each kept entry's tau^2 added
 * under its mask (a lane left alone, where keep_group adds +0.0: the same bits, lanes only
 * ever hold +0.0, positive sums or NaN), counts likewise. Fewer instructions per entry and
 * sparsity than the portable form (the final pass of a sweep of six: 57 -> 29 ms on a 16.7M
 * tensor, one thread; docs/benchmarks.md). */
#define KEEP_WIDE(G)                                                                            \
    __attribute__((target("avx512f,avx512vl"))) static void keep_wide_##G(                     \
        const int32_t *kf, const int32_t *km, const float *a2, int64_t m, const int *idx,      \
        const int32_t *tf, const int32_t *tm, double lf[][8], double lm[][8], int64_t *kept_f, \
        int64_t *kept_m, int64_t *overlap) {                                                    \
        __m512d af[G], am[G];                                                                   \
        __m256i xf[G], xm[G], cf[G], cm[G], cb[G];                                              \
        const __m256i one = _mm256_set1_epi32(1);                                               \
        for (int g = 0; g < G; g++) {                                                           \
            af[g] = _mm512_loadu_pd(lf[idx[g]]);                                                \
            am[g] = _mm512_loadu_pd(lm[idx[g]]);                                                \
            xf[g] = _mm256_set1_epi32(tf[idx[g]]);                                              \
            xm[g] = _mm256_set1_epi32(tm[idx[g]]);                                              \
            cf[g] = cm[g] = cb[g] = _mm256_setzero_si256();                                     \
        }                                                                                       \
        int64_t i = 0;                                                                          \
        for (; i + 8 <= m; i += 8) {                                                            \
            __m256i a = _mm256_loadu_si256((const __m256i *)(kf + i));                          \
            __m256i b = _mm256_loadu_si256((const __m256i *)(km + i));                          \
            __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(a2 + i));                               \
            for (int g = 0; g < G; g++) {                                                       \
                __mmask8 p = _mm256_cmpgt_epi32_mask(a, xf[g]);                                 \
                __mmask8 q = _mm256_cmpgt_epi32_mask(b, xm[g]);                                 \
                af[g] = _mm512_mask_add_pd(af[g], p, af[g], x);                                 \
                am[g] = _mm512_mask_add_pd(am[g], q, am[g], x);                                 \
                cf[g] = _mm256_mask_add_epi32(cf[g], p, cf[g], one);                            \
                cm[g] = _mm256_mask_add_epi32(cm[g], q, cm[g], one);                            \
                cb[g] = _mm256_mask_add_epi32(cb[g], (__mmask8)(p & q), cb[g], one);            \
            }                                                                                   \
        }                                                                                       \
        for (int g = 0; g < G; g++) {                                                           \
            int j = idx[g];                                                                     \
            int32_t n3[3][8];                                                                   \
            int64_t nf = 0, nm = 0, nb = 0;                                                     \
            _mm512_storeu_pd(lf[j], af[g]);                                                     \
            _mm512_storeu_pd(lm[j], am[g]);                                                     \
            _mm256_storeu_si256((__m256i *)n3[0], cf[g]);                                       \
            _mm256_storeu_si256((__m256i *)n3[1], cm[g]);                                       \
            _mm256_storeu_si256((__m256i *)n3[2], cb[g]);                                       \
            for (int l = 0; l < 8; l++) nf += n3[0][l], nm += n3[1][l], nb += n3[2][l];         \
            group_tail(kf, km, a2, i, m, tf[j], tm[j], lf[j], lm[j], nf, nm, nb, &kept_f[j],      \
                       &kept_m[j], &overlap[j]);                                                \
        }                                                                                       \
    }
KEEP_WIDE(1)
KEEP_WIDE(2)
KEEP_WIDE(3)
KEEP_WIDE(4)

/* 1 where the CPU (and the OS) has AVX-512 F and VL, set when the library is loaded, before
 * any scoring thread reads it; fapm_use_avx512(0) turns it off (the tests compare forms). */
static int wide;

API void fapm_use_avx512(int on) {
    __builtin_cpu_init(); /* a constructor may run before libgcc's own */
    wide = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

__attribute__((constructor)) static void detect_wide(void) { fapm_use_avx512(1); }

static inline int use_wide(void) { return wide; }
#else
API void fapm_use_avx512(int on) { (void)on; }
static inline int use_wide(void) { return 0; }
#endif

/* fapm_score_final's work on one block of keys (kf, km) and tau^2 (a2). */
static inline __attribute__((always_inline)) void final_block(
    const int32_t *kf, const int32_t *km, const float *a2, int64_t m, int ms, const int32_t *tf,
    int64_t *ties_f, const int32_t *tm, int64_t *ties_m, double lf[][8], double lm[][8],
    int64_t *kept_f, int64_t *kept_m, int64_t *overlap) {
    uint8_t keep_f[BLOCK], keep_m[BLOCK];
    int idx[MAXS], ng = 0;
    int32_t gf[MAXS], gm[MAXS]; /* the grouped sparsities' thresholds, ties folded in */
    for (int j = 0; j < ms; j++) {
        int32_t take_f = take_ties(kf, m, tf[j], &ties_f[j]);
        int32_t take_m = take_ties(km, m, tm[j], &ties_m[j]);
        if (take_f >= 0 && take_m >= 0) { /* the usual case: both masks in one loop */
            if (GROUPED && (ms > 1 || use_wide()) && !(take_f && tf[j] == INT32_MIN) &&
                !(take_m && tm[j] == INT32_MIN)) {
                gf[j] = tf[j] - take_f, gm[j] = tm[j] - take_m; /* keys >= t: keys > t - 1 */
                idx[ng++] = j;
            } else {
                keep_both(kf, km, m, tf[j], tm[j], take_f, take_m, a2, lf[j], lm[j], &kept_f[j],
                          &kept_m[j], &overlap[j]);
            }
            continue;
        }
        /* a quota runs out in this block: that mask one by one */
        kept_f[j] += take_f < 0 ? keep_block(kf, m, tf[j], &ties_f[j], a2, keep_f, lf[j])
                                : keep_simple(kf, m, tf[j], take_f, a2, keep_f, lf[j]);
        kept_m[j] += take_m < 0 ? keep_block(km, m, tm[j], &ties_m[j], a2, keep_m, lm[j])
                                : keep_simple(km, m, tm[j], take_m, a2, keep_m, lm[j]);
        int64_t both = 0;
        for (int64_t i = 0; i < m; i++) both += keep_f[i] & keep_m[i];
        overlap[j] += both;
    }
#if GROUPED
    int w = use_wide();
    for (int g = 0; g < ng;) { /* four at a time: what the registers hold */
        const int *at = idx + g;
        if (w) {
            int left = ng - g;
            if (left == 1)
                keep_wide_1(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            else if (left == 2)
                keep_wide_2(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            else if (left == 3)
                keep_wide_3(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            else
                keep_wide_4(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            g += left < 4 ? left : 4;
            continue;
        }
        switch (ng - g) {
        case 1:
            keep_group_1(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            g += 1;
            break;
        case 2:
            keep_group_2(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            g += 2;
            break;
        case 3:
            keep_group_3(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            g += 3;
            break;
        default:
            keep_group_4(kf, km, a2, m, at, gf, gm, lf, lm, kept_f, kept_m, overlap);
            g += 4;
        }
    }
#else
    (void)idx, (void)ng, (void)gf, (void)gm;
#endif
}

static inline void lanes_zero(int ms, double lf[][8], double lm[][8]) {
    for (int j = 0; j < ms; j++)
        for (int l = 0; l < 8; l++) lf[j][l] = lm[j][l] = 0;
}

static inline void lanes_out(int ms, double lf[][8], double lm[][8], double *sq_f,
                             double *sq_m) {
    for (int j = 0; j < ms; j++) {
        double x = 0, y = 0;
        for (int l = 0; l < 8; l++) {
            x += lf[j][l];
            y += lm[j][l];
        }
        sq_f[j] += x;
        sq_m[j] += y;
    }
}

/* Both masks of one chunk for each of m sparsities: sparsity j keeps the FAPM keys > tf[j],
 * then keys equal to tf[j] while ties_f[j] > 0 (see keep_block; updated), and likewise for
 * magnitude (tm, ties_m). Adds to sq_f[j], sq_m[j] the kept tau^2 (float64, 8 lanes each in
 * element order, lanes summed at the end), to kept_f[j], kept_m[j] the kept counts, to
 * overlap[j] the entries both keep. */
HOT API int fapm_score_final(int bdt, int fdt, const void *base, const void *ft, int64_t n,
                             float coef, int ms, const int32_t *tf, int64_t *ties_f,
                             const int32_t *tm, int64_t *ties_m, double *sq_f, double *sq_m,
                             int64_t *kept_f, int64_t *kept_m, int64_t *overlap) {
    if (ms < 1 || ms > MAXS) return -1;
    double lf[MAXS][8], lm[MAXS][8];
    lanes_zero(ms, lf, lm);
    int32_t kf[BLOCK], km[BLOCK];
    float a2[BLOCK], *aa = NULL, *bb = NULL, *rr = NULL, *ss = NULL;
    (void)aa, (void)bb, (void)rr, (void)ss;
    for (int64_t c = 0; c < n; c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        BLOCK_KEYS(0);
        final_block(kf, km, a2, m, ms, tf, ties_f, tm, ties_m, lf, lm, kept_f, kept_m, overlap);
    }
    lanes_out(ms, lf, lm, sq_f, sq_m);
    return 0;
}

/* -- fapm score of a small tensor, in one call ---------------------------------------------
 *
 * Several ranks among the same keys at once: an 8-bit radix select (as fapm_select_small)
 * whose histogram and compaction are shared by the ranks that fall in the same digit, level
 * by level. u[0:m] are candidates (keys xor 0x80000000: unsigned order) sharing every digit
 * above shift (prefix); want[] their ranks (1-based among u), ascending. Writes, for each
 * want w, key[w.idx], above[w.idx] (keys exceeding it) and eq[w.idx] (keys equal to it).
 * Returns 0, or -1 when no scratch memory could be had. fapm_select_many does the top two
 * digits in one pass, then calls this for the low two. */
typedef struct {
    int64_t need; /* rank among the current candidates */
    int64_t above; /* keys above the current candidates */
    int idx;
} Want;

HOT static int select_group(const uint32_t *u, int64_t m, int shift, uint32_t prefix, Want *want,
                            int nw, int32_t *key, int64_t *above, int64_t *eq) {
    int64_t hist[256];
    digit_hist(u, m, shift, 0, hist);
    int digit[MAXS + 1], first[MAXS + 1], ng = 0; /* group g: wants first[g]..first[g+1]-1 */
    int b = 255;
    int64_t acc = 0;
    for (int g = 0; g < nw;) {
        while (acc + hist[b] < want[g].need) acc += hist[b--];
        int h = g; /* want[g:h] fall in digit b */
        while (h < nw && want[h].need <= acc + hist[b]) {
            want[h].need -= acc;
            want[h].above += acc;
            h++;
        }
        digit[ng] = b, first[ng++] = g;
        acc += hist[b--];
        g = h;
    }
    first[ng] = nw;
    if (shift == 0) {
        for (int g = 0; g < ng; g++)
            for (int w = first[g]; w < first[g + 1]; w++) {
                key[want[w].idx] = (int32_t)((prefix | (uint32_t)digit[g]) ^ 0x80000000u);
                above[want[w].idx] = want[w].above;
                eq[want[w].idx] = hist[digit[g]];
            }
        return 0;
    }
    /* Each group's candidates into its own stretch of one array: with one group, compacted
     * (branchless, as fapm_select_small); with several, in one pass that sends each key to
     * its group's stretch or to a spare slot at the end (one pass instead of one per group:
     * a sweep's six thresholds often part in the second digit). */
    int64_t at[MAXS + 1], total = 0;
    for (int g = 0; g < ng; g++) at[g] = total, total += hist[digit[g]];
    uint32_t *cand = (uint32_t *)malloc((size_t)(total + 1) * sizeof(uint32_t));
    if (!cand) return -1;
    if (ng == 1) {
        int64_t j = 0;
        for (int64_t i = 0; i < m && j < total; i++) {
            cand[j] = u[i];
            j += ((u[i] >> shift) & 255u) == (uint32_t)digit[0];
        }
    } else {
        uint8_t group[256];
        int64_t pos[MAXS + 1];
        memset(group, ng, sizeof group); /* ng: the spare slot */
        for (int g = 0; g < ng; g++) group[digit[g]] = (uint8_t)g, pos[g] = at[g];
        pos[ng] = total;
        for (int64_t i = 0; i < m; i++) {
            int g = group[(u[i] >> shift) & 255u];
            cand[pos[g]] = u[i];
            pos[g] += g != ng;
        }
    }
    int rc = 0;
    for (int g = 0; g < ng && !rc; g++)
        rc = select_group(cand + at[g], hist[digit[g]], shift - 8,
                          prefix | ((uint32_t)digit[g] << shift), want + first[g],
                          first[g + 1] - first[g], key, above, eq);
    free(cand);
    return rc;
}

/* The ranks[0:nr] largest (1 <= rank <= n, any order) among keys[0:n] (n < 2^31) at once:
 * for each r, key[r] the key of that rank, above[r] how many keys exceed it, eq[r] how many
 * equal it. Returns 0, -1 (no scratch memory) or -2 (n, nr or a rank out of range). A thread
 * that calls it keeps a 256 kB array (its 16-bit counts) until it ends. */
HOT API int fapm_select_many(const int32_t *keys, int64_t n, int nr, const int64_t *ranks,
                             int32_t *key, int64_t *above, int64_t *eq) {
    if (nr < 0 || nr > MAXS || n > INT32_MAX) return -2; /* counts: uint32 */
    for (int r = 0; r < nr; r++)
        if (ranks[r] < 1 || ranks[r] > n) return -2;
    Want want[MAXS];
    for (int r = 0; r < nr; r++) { /* insertion by rank: want[] ascending */
        int w = r;
        while (w > 0 && want[w - 1].need > ranks[r]) {
            want[w] = want[w - 1];
            w--;
        }
        want[w] = (Want){ranks[r], 0, r};
    }
    if (!nr) return 0;
    /* The top two digits in one pass: the top 8 and the top 16 bits counted together (the
     * 16-bit counts in a per-thread array kept zeroed, cleared where the 8-bit counts say it
     * was touched), each rank's 16-bit bucket found by walking both, then one pass gathering
     * the keys of those buckets and the low two digits by select_group. The keys of one
     * tensor share their top digit, so the 8-bit levels passed over nearly every key twice
     * each for those two digits. */
    static __thread uint32_t *bins;
    if (!bins && !(bins = (uint32_t *)calloc(BINS, sizeof(uint32_t)))) return -1;
    int64_t h8[4][256];
    memset(h8, 0, sizeof h8);
    const uint32_t *u = (const uint32_t *)keys;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int c = 0; c < 4; c++) {
            uint32_t v = u[i + c] ^ 0x80000000u;
            h8[c][v >> 24]++;
            bins[v >> 16]++;
        }
    for (; i < n; i++) {
        uint32_t v = u[i] ^ 0x80000000u;
        h8[0][v >> 24]++;
        bins[v >> 16]++;
    }
    for (int d = 0; d < 256; d++) h8[0][d] += h8[1][d] + h8[2][d] + h8[3][d];
    /* each want's bucket: one walk down both histograms (the wants ascend) */
    int64_t bucket[MAXS], acc = 0, acc16 = 0;
    int d = 255, c = BINS - 1;
    for (int w = 0; w < nr; w++) {
        if (acc + h8[0][d] < want[w].need) {
            while (acc + h8[0][d] < want[w].need) acc += h8[0][d--];
            c = d * 256 + 255, acc16 = acc;
        }
        while (acc16 + bins[c] < want[w].need) acc16 += bins[c--];
        bucket[w] = c;
        want[w].need -= acc16;
        want[w].above = acc16;
    }
    /* one slot per distinct bucket (consecutive wants), its keys' stretch of one array */
    int first[MAXS + 1], ns = 0;
    int64_t at[MAXS + 1], pos[MAXS + 1], total = 0;
    for (int w = 0; w < nr; w++)
        if (w == 0 || bucket[w] != bucket[w - 1]) {
            first[ns] = w;
            at[ns] = total;
            total += bins[bucket[w]];
            ns++;
        }
    first[ns] = nr;
    for (int e = 0; e < 256; e++) /* back to zero, but for the buckets (marked below) */
        if (h8[0][e]) memset(bins + e * 256, 0, 256 * sizeof(uint32_t));
    for (int s = 0; s < ns; s++) bins[bucket[first[s]]] = (uint32_t)s + 1; /* 0: no slot */
    /* the keys of every slot compacted in flat order (the cursor in a register), then, when
     * there are several slots, sent to their own stretches from that much shorter list */
    uint32_t *cand = (uint32_t *)malloc((size_t)(2 * total + 1) * sizeof(uint32_t));
    if (!cand) {
        for (int s = 0; s < ns; s++) bins[bucket[first[s]]] = 0;
        return -1;
    }
    uint32_t *mixed = ns > 1 ? cand + total : cand;
    int64_t j = 0;
    for (i = 0; i < n && j < total; i++) {
        uint32_t v = u[i] ^ 0x80000000u;
        mixed[j] = v;
        j += bins[v >> 16] != 0;
    }
    for (int s = 0; s < ns; s++) pos[s + 1] = at[s];
    if (ns > 1)
        for (i = 0; i < total; i++) {
            uint32_t s = bins[mixed[i] >> 16];
            cand[pos[s]++] = mixed[i];
        }
    else
        pos[1] = total;
    int rc = 0;
    for (int s = 0; s < ns; s++) {
        bins[bucket[first[s]]] = 0;
        if (!rc)
            rc = select_group(cand + at[s], pos[s + 1] - at[s], 8,
                              (uint32_t)bucket[first[s]] << 16, want + first[s],
                              first[s + 1] - first[s], key, above, eq);
    }
    free(cand);
    return rc;
}

/* The keys of given ranks inside top-16-bit buckets, all at once: request r asks for the
 * rank[r]-th largest (1-based) of the keys[0:n] in bucket[r] (a bin of fapm_score_pass's
 * histograms, 0..65535). One pass counts the low 16 bits of the keys in the asked-for buckets
 * (one 65,536-bin histogram per bucket; other keys are skipped), then each request walks its
 * bucket's histogram from the top: key[r] gets the key, above[r] how many keys of that bucket
 * exceed it, eq[r] how many equal it. fapm score's select among the keys fapm_score_gather
 * collected: one pass, where a radix select from the top digit compacted the keys once per
 * threshold (a sweep's six thresholds: 36 -> 8 ms on a 16.7M tensor). Returns 0, -1 (no
 * memory) or -2 (nr, a bucket or a rank out of range). */
HOT API int fapm_bucket_select(const int32_t *keys, int64_t n, int nr, const int32_t *bucket,
                               const int64_t *rank, int32_t *key, int64_t *above,
                               int64_t *eq) {
    if (nr < 0 || nr > MAXS) return -2;
    uint8_t slot[BINS]; /* 255: a bucket nobody asked for */
    memset(slot, 255, sizeof slot);
    int ns = 0, at[MAXS];
    for (int r = 0; r < nr; r++) {
        if (bucket[r] < 0 || bucket[r] >= BINS) return -2;
        if (slot[bucket[r]] == 255) slot[bucket[r]] = (uint8_t)ns++;
        at[r] = slot[bucket[r]];
    }
    if (!nr) return 0;
    int64_t *hist = (int64_t *)calloc((size_t)ns * BINS, sizeof(int64_t));
    if (!hist) return -1;
    for (int64_t i = 0; i < n; i++) {
        uint32_t s = slot[(keys[i] >> 16) + 32768];
        if (s != 255) hist[s * BINS + ((uint32_t)keys[i] & 0xFFFFu)]++;
    }
    int rc = 0;
    for (int r = 0; r < nr && !rc; r++) {
        const int64_t *h = hist + (int64_t)at[r] * BINS;
        int64_t acc = 0;
        int d = BINS - 1;
        while (d >= 0 && acc + h[d] < rank[r]) acc += h[d--];
        if (rank[r] < 1 || d < 0) {
            rc = -2;
            break;
        }
        key[r] = (int32_t)(((uint32_t)(bucket[r] - 32768) << 16) | (uint32_t)d);
        above[r] = acc;
        eq[r] = h[d];
    }
    free(hist);
    return rc;
}

/* For each of spans (at, size) pairs into keys, how many of its keys equal each of t[0:nt]:
 * out[s * nt + j] (fapm score's per-chunk ties, from the gathered keys, in one call). */
HOT API void fapm_count_eq_spans(const int32_t *keys, int64_t spans, const int64_t *span,
                                 int nt, const int32_t *t, int64_t *out) {
    for (int64_t s = 0; s < spans; s++) {
        const int32_t *k = keys + span[2 * s];
        int64_t m = span[2 * s + 1];
        for (int j = 0; j < nt; j++) {
            int64_t c = 0;
            for (int64_t i = 0; i < m; i++) c += k[i] == t[j];
            out[s * nt + j] = c;
        }
    }
}

/* The thresholds of ks[0:ms] among keys[0:n] in score_final's form: keep keys > t[j], then
 * the first ties[j] keys equal to t[j] (INT64_MAX: all of them); the same forms as
 * scoring.edge_threshold / scoring.settled. */
static int thresholds_of(const int32_t *keys, int64_t n, int ms, const int64_t *ks, int32_t *t,
                         int64_t *ties) {
    int64_t ranks[MAXS] = {0}, above[MAXS], eq[MAXS]; /* = {0}: GCC cannot see nr guards it */
    int32_t key[MAXS];
    int at[MAXS], nr = 0;
    for (int j = 0; j < ms; j++) {
        if (ks[j] >= n) {
            t[j] = INT32_MIN;
            ties[j] = INT64_MAX;
        } else if (ks[j] <= 0) {
            t[j] = INT32_MAX;
            ties[j] = 0;
        } else {
            at[nr] = j;
            ranks[nr++] = ks[j];
        }
    }
    if (fapm_select_many(keys, n, nr, ranks, key, above, eq)) return -1;
    for (int r = 0; r < nr; r++) {
        int j = at[r];
        settle(key[r], ks[j] - above[r], eq[r], &t[j], &ties[j]);
    }
    return 0;
}

/* The first chosen bucket of sel (65536 bytes) and how far the last is past it; 0 when sel
 * chooses none. */
static inline int chosen_span(const uint8_t *sel, uint32_t *lo, uint32_t *span) {
    int first = 0, last = BINS - 1;
    while (first < BINS && !sel[first]) first++;
    if (first == BINS) return 0;
    while (!sel[last]) last--;
    *lo = (uint32_t)first;
    *span = (uint32_t)(last - first);
    return 1;
}

/* Appends to out[j..] the keys k[0:m] whose top-16-bit bucket sel chooses, in order; returns
 * the new j. Sixteen keys at a time are first compared with the chosen buckets' span (lo,
 * span: chosen_span), one vector compare, and skipped when none falls in it: the chosen
 * buckets hold a few keys in a thousand, and the appends (branchless, as fapm_select_small's)
 * cost a store per key. One score of a 589,824-entry tensor: 4.4 -> 3.7 ms (one thread). */
static inline __attribute__((always_inline)) int64_t append_chosen(
    const int32_t *k, int64_t m, const uint8_t *sel, uint32_t lo, uint32_t span, int32_t *out,
    int64_t j) {
    for (int64_t i0 = 0; i0 < m; i0 += 16) {
        int64_t e = m - i0 < 16 ? m : i0 + 16;
        if (e - i0 == 16) {
            uint32_t hit = 0;
            for (int i = 0; i < 16; i++)
                hit |= (uint32_t)((k[i0 + i] >> 16) + 32768) - lo <= span;
            if (!hit) continue;
        }
        for (int64_t i = i0; i < e; i++) {
            out[j] = k[i];
            j += sel[(k[i] >> 16) + 32768];
        }
    }
    return j;
}

/* The keys of one chunk that fall in chosen top-16-bit buckets, for both methods (sel_f,
 * sel_m: 65536 bytes, 1 for a bucket some threshold falls in), appended in flat order to
 * out_f, out_m (room for n each); counts[0..1] get how many. fapm score's second pass on a
 * large tensor: the thresholds are then selected among these few keys in memory, and each
 * chunk's ties counted from them, instead of one pass over the inputs per radix digit. */
HOT API void fapm_score_gather(int bdt, int fdt, const void *base, const void *ft, int64_t n,
                               float coef, const uint8_t *sel_f, const uint8_t *sel_m,
                               int32_t *out_f, int32_t *out_m, int64_t *counts) {
    int32_t kf[BLOCK], km[BLOCK];
    float a2[BLOCK], *aa = NULL, *bb = NULL, *rr = NULL, *ss = NULL;
    (void)aa, (void)bb, (void)rr, (void)ss, (void)a2; /* BLOCK_KEYS fills a2: not needed here */
    uint32_t lo_f = 0, span_f = 0, lo_m = 0, span_m = 0;
    int any_f = chosen_span(sel_f, &lo_f, &span_f), any_m = chosen_span(sel_m, &lo_m, &span_m);
    int64_t jf = 0, jm = 0;
    for (int64_t c = 0; c < n && (any_f || any_m); c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        BLOCK_KEYS(0);
        if (any_f) jf = append_chosen(kf, m, sel_f, lo_f, span_f, out_f, jf);
        if (any_m) jm = append_chosen(km, m, sel_m, lo_m, span_m, out_m, jm);
    }
    counts[0] = jf;
    counts[1] = jm;
}

/* fapm score of one small tensor (n <= a chunk) at ks[0:ms] kept entries, in one call: the
 * mean |base| and coef = lam * mean rounded as compute.score rounds them, fapm_score_pass
 * (stats, counts, optional scores) with both methods' keys kept in a per-thread scratch, both
 * methods' thresholds by the shared radix select, then fapm_score_final's figures from the
 * kept keys (tau^2 from the magnitude key: |tau|'s bits): the same figures, bit for bit, as
 * those steps, with no per-tensor histogram. out_f (4 + 2 ms) gets the four sums of
 * fapm_score_pass, then the kept tau^2 of FAPM and of magnitude per sparsity; out_i (2 + 3 ms)
 * its two counts, then per sparsity the FAPM, magnitude and overlap counts. out_f[3] (sum
 * tau^2) is not finite when an input is not (the caller checks). Returns 0, -1 (no memory) or
 * -2 (ms out of range). */
HOT API int fapm_score_small(int bdt, int fdt, const void *base, const void *ft, int64_t n,
                             double lam, int ms, const int64_t *ks, float *scores,
                             double *out_f, int64_t *out_i) {
    if (ms < 1 || ms > MAXS) return -2;
    uint32_t *buf = scratch(2 * n);
    if (!buf) return -1;
    int32_t *keys_f = (int32_t *)buf, *keys_m = (int32_t *)buf + n;
    memset(out_f, 0, (size_t)(4 + 2 * ms) * sizeof(double));
    memset(out_i, 0, (size_t)(2 + 3 * ms) * sizeof(int64_t));
    float coef = coef_of(bdt, base, n, lam);
    fapm_score_pass(bdt, fdt, base, ft, n, coef, keys_f, keys_m, NULL, NULL, scores, out_f,
                    out_i);
    int32_t tf[MAXS], tm[MAXS];
    int64_t ties_f[MAXS], ties_m[MAXS];
    if (thresholds_of(keys_f, n, ms, ks, tf, ties_f) || thresholds_of(keys_m, n, ms, ks, tm, ties_m))
        return -1;
    double lf[MAXS][8], lm[MAXS][8];
    lanes_zero(ms, lf, lm);
    float a2[BLOCK];
    int64_t *kept_f = out_i + 2, *kept_m = out_i + 2 + ms, *overlap = out_i + 2 + 2 * ms;
    for (int64_t c = 0; c < n; c += BLOCK) {
        int64_t m = n - c < BLOCK ? n - c : BLOCK;
        const int32_t *kf = keys_f + c, *km = keys_m + c;
        for (int64_t i = 0; i < m; i++) {
            float a = bits_to_float((uint32_t)km[i]);
            a2[i] = a * a;
        }
        final_block(kf, km, a2, m, ms, tf, ties_f, tm, ties_m, lf, lm, kept_f, kept_m, overlap);
    }
    lanes_out(ms, lf, lm, out_f + 4, out_f + 4 + ms);
    return 0;
}

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT,
    "_kernels",
    "fapm's fused CPU kernels, called through ctypes by fapm_cli.native.",
    -1,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
