/* Nearest-code search on CPU for short vectors, without the (N, K) distance matrix.
 *
 * Built and loaded by cpu_kernel.py (plain C, GCC/Clang vector extensions, no Python or torch
 * headers). For each block of ROWS vectors and each group of 2 x LANES codes, the distances
 * ||c||^2 - 2 x.c accumulate in SIMD registers over the D coordinates; each lane keeps the
 * smallest distance it has seen and that code's index, and one pass over the lanes at the end
 * gives the row's minimum, the smallest index among equal minima (as torch.argmin).
 *
 * Layout: x is (n, d) row-major; search_rows takes the codebook transposed, (d, k) row-major,
 * so that a group of codes is one contiguous load per coordinate, and code_sq (k,); k a
 * multiple of 2 * LANES, padded with codes whose code_sq is +inf, which never win (a row whose
 * distances are all NaN or +inf gets index 0).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

/* LANES: floats per vector, the width of the machine's registers (wider vector types than the
 * hardware has are emulated by GCC, here 45x slower). ROWS: vectors per block, so that the
 * 2 * ROWS accumulators and two code vectors fit in the register file. */
#if defined(__AVX512F__)
#define LANES 16
#define ROWS 8 /* 16 of 32 zmm registers; 8 rows ran 16% faster than 4 */
#elif defined(__AVX__)
#define LANES 8
#define ROWS 6 /* 12 of 16 ymm registers; 6 rows ran 28% faster than 4 */
#elif defined(__SSE2__) || defined(__ARM_NEON) || defined(__aarch64__)
#define LANES 4
#define ROWS 4
#else
#define LANES 4
#define ROWS 4
#define NO_KNOWN_SIMD 1 /* vq_simd_lanes() says so, and the caller does not use this build */
#endif

/* floats per SIMD register this build uses, or 0 when no vector instruction set is known */
int vq_simd_lanes(void) {
#ifdef NO_KNOWN_SIMD
    return 0;
#else
    return LANES;
#endif
}

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

static vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

/* where mask is set, a; elsewhere b (masks from vector comparisons are all ones or zeros) */
static vfloat select_float(vint mask, vfloat a, vfloat b) {
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

static void search_rows(const float *x, const float *code_t, const float *code_sq, int64_t n,
                        int64_t d, int64_t k, int64_t *out) {
    vint lane;
    for (int j = 0; j < LANES; j++) lane[j] = j;
    for (int64_t i = 0; i < n; i += ROWS) {
        const float *row[ROWS];
        vfloat best[ROWS];
        vint best_index[ROWS];
        for (int r = 0; r < ROWS; r++) {
            row[r] = x + (i + r < n ? i + r : n - 1) * d; /* a short last block repeats a row */
            for (int j = 0; j < LANES; j++) {
                best[r][j] = FLT_MAX;
                best_index[r][j] = 0;
            }
        }
        for (int64_t c = 0; c < k; c += 2 * LANES) {
            vfloat dot0[ROWS], dot1[ROWS];
            for (int r = 0; r < ROWS; r++) {
                dot0[r] = (vfloat){0};
                dot1[r] = (vfloat){0};
            }
            for (int64_t j = 0; j < d; j++) {
                vfloat codes0 = load(code_t + j * k + c), codes1 = load(code_t + j * k + c + LANES);
                for (int r = 0; r < ROWS; r++) {
                    float coordinate = row[r][j];
                    dot0[r] += coordinate * codes0;
                    dot1[r] += coordinate * codes1;
                }
            }
            vfloat sq0 = load(code_sq + c), sq1 = load(code_sq + c + LANES);
            vint index0 = lane + (int32_t)c, index1 = lane + (int32_t)(c + LANES);
            for (int r = 0; r < ROWS; r++) {
                vfloat dist0 = sq0 - 2.0f * dot0[r], dist1 = sq1 - 2.0f * dot1[r];
                vint closer = dist0 < best[r]; /* strict: the first of equal distances stays */
                best[r] = select_float(closer, dist0, best[r]);
                best_index[r] = (index0 & closer) | (best_index[r] & ~closer);
                closer = dist1 < best[r];
                best[r] = select_float(closer, dist1, best[r]);
                best_index[r] = (index1 & closer) | (best_index[r] & ~closer);
            }
        }
        for (int r = 0; r < ROWS && i + r < n; r++) {
            float value = best[r][0];
            int32_t index = best_index[r][0];
            for (int j = 1; j < LANES; j++) {
                if (best[r][j] < value || (best[r][j] == value && best_index[r][j] < index)) {
                    value = best[r][j];
                    index = best_index[r][j];
                }
            }
            out[i + r] = index;
        }
    }
}

/* codebook (k, d) row-major as it is stored; returns 1 if out of memory. The transposed,
 * padded copy and the squared norms are made here: cheaper than four tensor operations. */
int vq_nearest_code(const float *x, const float *codebook, int64_t n, int64_t d, int64_t k,
                    int64_t *out) {
    int64_t padded = (k + 2 * LANES - 1) / (2 * LANES) * (2 * LANES);
    /* 64-byte aligned, like torch's tensors: a vector load then never spans two cache lines
     * (malloc's 16-byte alignment made the search 1.5x slower) */
    float *code_t = NULL;
    if (posix_memalign((void **)&code_t, 64, (size_t)(d * padded + padded) * sizeof(float)))
        return 1;
    float *code_sq = code_t + d * padded;
    for (int64_t c = 0; c < padded; c++) {
        float sq = 0.0f;
        for (int64_t j = 0; j < d; j++) {
            float value = c < k ? codebook[c * d + j] : 0.0f;
            code_t[j * padded + c] = value;
            sq += value * value;
        }
        code_sq[c] = c < k ? sq : INFINITY; /* padding codes never win */
    }
    search_rows(x, code_t, code_sq, n, d, padded, out);
    free(code_t);
    return 0;
}

/* ------------------------------------------------------------------ EMA codebook update
 * The statistics and the update of VectorQuantize's EMA codebook (see _code_statistics and
 * _apply_ema in vector_quantize.py for the formulas), one call each instead of some twenty
 * small tensor operations. Split in two so that, under several processes, the statistics can
 * be all-reduced between them. */

/* counts (k) and sums (k, d) of the rows of h (n, d) assigned to each code by index (n);
 * returns 1 (and leaves the outputs partly written) if an index is out of range. */
int vq_code_statistics(const float *h, const int64_t *index, int64_t n, int64_t d, int64_t k,
                       float *counts, float *sums) {
    memset(counts, 0, (size_t)k * sizeof(float));
    memset(sums, 0, (size_t)(k * d) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        int64_t code = index[i];
        if (code < 0 || code >= k) return 1;
        counts[code] += 1.0f;
        float *sum = sums + code * d;
        const float *row = h + i * d;
        for (int64_t j = 0; j < d; j++) sum[j] += row[j];
    }
    return 0;
}

static double total(const float *values, int64_t k) {
    double sum = 0.0;
    for (int64_t c = 0; c < k; c++) sum += values[c];
    return sum;
}

/* One EMA step with Laplace smoothing, in place:
 *   embed_sum    = codebook * smoothed(cluster_size)   (the running sums, rebuilt)
 *   embed_sum   += (1 - decay) * (sums - embed_sum)
 *   cluster_size += (1 - decay) * (counts - cluster_size)
 *   codebook     = embed_sum / smoothed(cluster_size)
 * with smoothed(s) = (s + eps) * n / (n + k * eps), n = sum(s). Returns how many codes end
 * with a cluster size below threshold. */
int64_t vq_ema_update(float *codebook, float *cluster_size, const float *counts,
                      const float *sums, int64_t k, int64_t d, float decay, float eps,
                      float threshold) {
    float weight = 1.0f - decay;
    double n = total(cluster_size, k);
    float scale = n > 0 ? (float)(n / (n + (double)k * eps)) : 0.0f;
    for (int64_t c = 0; c < k; c++) {
        float smoothed = (cluster_size[c] + eps) * scale;
        float *code = codebook + c * d;
        const float *sum = sums + c * d;
        for (int64_t j = 0; j < d; j++) {
            float embed_sum = code[j] * smoothed;
            code[j] = embed_sum + weight * (sum[j] - embed_sum); /* the new running sum */
        }
        cluster_size[c] += weight * (counts[c] - cluster_size[c]);
    }
    n = total(cluster_size, k);
    scale = n > 0 ? (float)(n / (n + (double)k * eps)) : 0.0f;
    int64_t below = 0; /* codes whose cluster size is under threshold: the dead codes */
    for (int64_t c = 0; c < k; c++) {
        float smoothed = (cluster_size[c] + eps) * scale;
        float *code = codebook + c * d;
        for (int64_t j = 0; j < d; j++) code[j] /= smoothed;
        below += cluster_size[c] < threshold;
    }
    return below;
}
