/* Nearest-code search on CPU for short vectors, without the (N, K) distance matrix.
 *
 * Built and loaded by cpu_kernel.py (plain C, GCC/Clang vector extensions, no Python or torch
 * headers). For each block of ROWS vectors and each group of 2 x LANES codes, the distances
 * ||c||^2 - 2 x.c accumulate in SIMD registers over the D coordinates; each lane keeps the
 * smallest distance it has seen and that code's index, and one pass over the lanes at the end
 * gives the row's minimum, the smallest index among equal minima (as torch.argmin).
 *
 * Layout: x is (n, d) row-major; code_t is the codebook transposed, (d, k) row-major, so that a
 * group of codes is one contiguous load per coordinate; code_sq is (k,). k must be a multiple
 * of 2 * LANES: the caller pads with codes whose code_sq is +inf, which never win (a row whose
 * distances are all NaN or +inf gets index 0).
 */
#include <float.h>
#include <stdint.h>
#include <string.h>

#define LANES 16 /* floats per vector: one AVX-512 register, two AVX2 ones */
#define ROWS 4   /* vectors per block: 8 accumulators of LANES floats */

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

int vq_nearest_code(const float *x, const float *code_t, const float *code_sq, int64_t n,
                    int64_t d, int64_t k, int64_t *out) {
    if (k % (2 * LANES) != 0) return 1;
    search_rows(x, code_t, code_sq, n, d, k, out);
    return 0;
}
