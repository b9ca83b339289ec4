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

/* Threads. Built with -fopenmp (cpu_kernel.py does so where torch's own OpenMP runtime,
 * libgomp.so.1, is the one loaded, so the two share one pool of worker threads), a kernel with
 * enough work splits its rows over omp_get_max_threads() threads, which is what torch's
 * set_num_threads sets: the workers that torch's last parallel operation left spinning take
 * the rows at once. Sums over rows are kept per thread and added in thread order afterwards,
 * so that a given thread count always gives the same bits. Without OpenMP, one thread. */
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#else
#define THREAD_ID() 0
#endif
#define PRAGMA(text) _Pragma(#text)
/* the threads of a parallel region: all of torch's for at least PARALLEL_WORK units of work
 * (floats read or written by a row kernel; multiply-adds / 32 in the search), else one;
 * as torch's GRAIN_SIZE, the work below which a second thread costs more than it saves */
#define PARALLEL_WORK 32768
/* most threads whose sums a kernel keeps on its stack; more are not used */
#define MAX_THREADS 256
static int team(double work) {
#ifdef _OPENMP
    int most = omp_get_max_threads();
    return work < PARALLEL_WORK ? 1 : (most < MAX_THREADS ? most : MAX_THREADS);
#else
    (void)work;
    return 1;
#endif
}

/* whether this build runs its kernels on several threads */
int vq_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

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

/* every lane value (a scalar operand of a vector operation is broadcast: one instruction,
 * where filling the lanes one by one compiled to a masked broadcast per lane) */
static vfloat splat(float value) {
    return (vfloat){0} + value;
}

/* where mask is set, a; elsewhere b (masks from vector comparisons are all ones or zeros) */
static vfloat select_float(vint mask, vfloat a, vfloat b) {
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

/* the sum of a vector's lanes, halves folded onto each other in registers (a vector stored
 * and read back by lanes stalls the load on the store) */
static float fold(vfloat v) {
#if LANES == 16
    v += __builtin_shuffle(v, (vint){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
#endif
#if LANES >= 8
    v += __builtin_shuffle(v, (vint){4, 5, 6, 7, 0, 1, 2, 3
#if LANES == 16
                                     , 12, 13, 14, 15, 8, 9, 10, 11
#endif
                                    });
#endif
    float sum = 0.0f;
    for (int l = 0; l < 4; l++) sum += v[l];
    return sum;
}

static void search_rows(const float *x, const float *code_t, const float *code_sq, int64_t n,
                        int64_t d, int64_t k, int64_t *out) {
    vint lane;
    for (int j = 0; j < LANES; j++) lane[j] = j;
    int threads = team((double)n * (double)d * (double)k / 32.0);
    PRAGMA(omp parallel for schedule(static) num_threads(threads))
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

/* ------------------------------------------------------------------ int8 pre-search re-check
 * The second stage of int8_presearch.py for one row block, in two passes over each row of the
 * integer products instead of some thirty tensor operations over the (n, k) block.
 *
 * products (n, k) int32 = qx.qc, row_scale (n,) = sx.sc, so the approximate distance is
 * a_c = code_sq_c - 2 (row_scale . P_c). For each row: the anchor j, the first code at the
 * smallest a; its float32 distance f_j = code_sq_j - 2 x.c_j; the candidates, every code with
 * a_c <= f_j + slack (slack: the row's bound e + 3 rho; NaN admits every code); and the answer,
 * the first candidate at the smallest float32 distance (a row with one candidate gets it
 * without a re-check). Returns 0, or 1 as soon as the candidates of the block exceed
 * max_candidates (the caller then searches the block in float32; out is partly written). */

static float dot(const float *a, const float *b, int64_t d) {
    vfloat acc[4] = {{0}, {0}, {0}, {0}}; /* four chains: the FMA latency, not one chain */
    int64_t j = 0;
    for (; j + 4 * LANES <= d; j += 4 * LANES)
        for (int u = 0; u < 4; u++) acc[u] += load(a + j + u * LANES) * load(b + j + u * LANES);
    for (; j + LANES <= d; j += LANES) acc[0] += load(a + j) * load(b + j);
    float total = fold((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; j < d; j++) total += a[j] * b[j];
    return total;
}

/* whether any lane of a comparison mask is set (words ORed, not lanes one by one) */
static int any_set(vint mask) {
    uint64_t words[LANES / 2], any = 0;
    memcpy(words, &mask, sizeof words);
    for (int w = 0; w < LANES / 2; w++) any |= words[w];
    return any != 0;
}

/* float32 distance of code c, as the float32 search forms it: code_sq_c - 2 x.c */
static float exact_at(const float *row, const float *codebook, const float *code_sq,
                      int64_t c, int64_t d) {
    return code_sq[c] - 2.0f * dot(row, codebook + c * d, d);
}

/* approximate distance of code c: code_sq_c - 2 (scale . P_c), the vector form's order */
static float approx_at(const int32_t *p, const float *code_sq, int64_t c, float scale) {
    return code_sq[c] - 2.0f * ((float)p[c] * scale);
}

static vfloat load_approx(const int32_t *p, const float *sq, vfloat scale) {
    vint integers;
    memcpy(&integers, p, sizeof integers);
    return load(sq) - 2.0f * (__builtin_convertvector(integers, vfloat) * scale);
}

/* the first code at the smallest approximate distance of one row (NaN never wins) */
static int64_t first_smallest(const int32_t *p, const float *code_sq, float scale, int64_t k) {
    vint lane, best_index = {0};
    for (int l = 0; l < LANES; l++) lane[l] = l;
    vfloat best = splat(INFINITY), scale_v = splat(scale);
    int64_t c = 0;
    for (; c + LANES <= k; c += LANES) {
        vfloat a = load_approx(p + c, code_sq + c, scale_v);
        vint closer = a < best; /* strict: the first of equal distances stays */
        best = select_float(closer, a, best);
        best_index = ((lane + (int32_t)c) & closer) | (best_index & ~closer);
    }
    float value = best[0];
    int64_t index = best_index[0];
    for (int l = 1; l < LANES; l++)
        if (best[l] < value || (best[l] == value && best_index[l] < index)) {
            value = best[l];
            index = best_index[l];
        }
    for (; c < k; c++) {
        float a = approx_at(p, code_sq, c, scale);
        if (a < value) {
            value = a;
            index = c;
        }
    }
    return index;
}

/* one row of the re-check; adds its candidates to *count and returns 1 as soon as that
 * exceeds max_candidates */
static int recheck_row(const int32_t *p, float scale, const float *code_sq, const float *row,
                       const float *codebook, float slack, int64_t d, int64_t k,
                       int64_t max_candidates, int64_t *count_so_far, int64_t *out) {
    int64_t anchor = first_smallest(p, code_sq, scale, k);
    float anchor_exact = exact_at(row, codebook, code_sq, anchor, d);
    float threshold = anchor_exact + slack;
    if (isnan(threshold)) threshold = INFINITY;
    int64_t first = -1, count = 0, best_index = k - 1;
    float best = INFINITY;
    vfloat scale_v = splat(scale), threshold_v = splat(threshold);
    for (int64_t start = 0; start < k; start += LANES) {
        int64_t width = k - start < LANES ? k - start : LANES;
        vint passed = {0};
        if (width == LANES)
            passed = load_approx(p + start, code_sq + start, scale_v) <= threshold_v;
        else
            for (int l = 0; l < width; l++)
                passed[l] = approx_at(p, code_sq, start + l, scale) <= threshold ? -1 : 0;
        if (!any_set(passed)) continue; /* the common case: no candidate among these */
        for (int l = 0; l < width; l++) {
            if (!passed[l]) continue;
            int64_t c = start + l;
            if (++*count_so_far > max_candidates) return 1;
            float exact = c == anchor ? anchor_exact : exact_at(row, codebook, code_sq, c, d);
            if (count++ == 0) first = c;
            if (exact < best) { /* strict: the first code at the minimum stays */
                best = exact;
                best_index = c;
            }
        }
    }
    /* one candidate: it, unchecked; none (NaN distances): an index in range, as the
     * float32 search gives, for the caller's finiteness check to report */
    *out = count == 1 ? first : (count == 0 ? k - 1 : (best < INFINITY ? best_index : first));
    return 0;
}

/* the candidate count is the block's: each thread adds its rows' count to a shared total
 * every RECHECK_SHARE rows and stops once that total is over the limit */
#define RECHECK_SHARE 16
int vq_int8_recheck(const int32_t *products, const float *row_scale, const float *code_sq,
                    const float *x, const float *codebook, const float *slack, int64_t n,
                    int64_t d, int64_t k, int64_t max_candidates, int64_t *out) {
    int64_t shared = 0;
    int over = 0;
    int threads = team((double)n * (double)k);
    PRAGMA(omp parallel num_threads(threads))
    {
        int64_t mine = 0, rows = 0;
        PRAGMA(omp for schedule(static))
        for (int64_t i = 0; i < n; i++) {
            int stop;
            PRAGMA(omp atomic read)
            stop = over;
            if (stop) continue;
            int64_t seen; /* a stale total only raises this row's limit */
            PRAGMA(omp atomic read)
            seen = shared;
            int64_t limit = max_candidates - seen;
            if (recheck_row(products + i * k, row_scale[i], code_sq, x + i * d, codebook,
                            slack[i], d, k, limit, &mine, out + i)
                || ++rows % RECHECK_SHARE == 0) {
                int64_t total;
                PRAGMA(omp atomic capture)
                {
                    shared += mine;
                    total = shared;
                }
                mine = 0;
                if (total > max_candidates) {
                    PRAGMA(omp atomic write)
                    over = 1;
                }
            }
        }
        PRAGMA(omp atomic)
        shared += mine;
    }
    return over || shared > max_candidates;
}

/* ------------------------------------------------------------------ int8 rounding of rows
 * quantize_rows of int8_presearch.py in two passes over v (n, d) instead of seven tensor
 * operations: the peak (of each row, or of the whole matrix unless per_row; with pairs, of
 * |v_2i| + |v_2i+1|, d even), floored at peak_floor; then per row m = qmax / peak,
 * q = rint(v m) (ties to even, as torch.round), scale = peak / qmax, and the float32 norm of
 * v - scale q. A NaN anywhere in a row (anywhere, unless per_row) makes its peak NaN, an Inf
 * makes it Inf: the caller sees a non-finite scale. */

static vfloat vabs(vfloat v) {
    return (vfloat)((vint)v & 0x7fffffff);
}

static float row_peak(const float *v, int64_t d, int pairs, int *nan) {
    vfloat best = splat(0.0f);
    vint bad = {0};
    vint swap; /* lane l and its pair neighbour l ^ 1 */
    for (int l = 0; l < LANES; l++) swap[l] = l ^ 1;
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES) {
        vfloat magnitude = vabs(load(v + j));
        if (pairs) magnitude = magnitude + __builtin_shuffle(magnitude, swap); /* b + a = a + b */
        bad |= magnitude != magnitude;
        best = select_float(magnitude > best, magnitude, best);
    }
    float peak = 0.0f;
    for (int l = 0; l < LANES; l++) {
        *nan |= bad[l] != 0;
        peak = best[l] > peak ? best[l] : peak;
    }
    for (int step = pairs ? 2 : 1; j + step <= d; j += step) {
        float magnitude = pairs ? fabsf(v[j]) + fabsf(v[j + 1]) : fabsf(v[j]);
        *nan |= magnitude != magnitude;
        peak = magnitude > peak ? magnitude : peak;
    }
    return peak;
}

/* each lane rounded to the nearest integer, ties to even (as torch.round). rintf, not a magic
 * number added and subtracted: the compiler may fuse that addition with the product before it
 * (one rounding instead of two) */
static vfloat round_even(vfloat v) {
    for (int l = 0; l < LANES; l++) v[l] = rintf(v[l]);
    return v;
}

void vq_quantize_rows(const float *v, int64_t n, int64_t d, float qmax, int pairs, int per_row,
                      float peak_floor, int8_t *q, float *scale, float *residual_norm) {
    float shared = 0.0f;
    int shared_nan = 0;
    int threads = team((double)n * (double)d);
    if (!per_row) { /* the maximum and the OR do not depend on the order of the rows */
        PRAGMA(omp parallel for schedule(static) num_threads(threads)
               reduction(max:shared) reduction(|:shared_nan))
        for (int64_t i = 0; i < n; i++) {
            int nan = 0;
            float peak = row_peak(v + i * d, d, pairs, &nan);
            shared = peak > shared ? peak : shared;
            shared_nan |= nan;
        }
    }
    PRAGMA(omp parallel for schedule(static) num_threads(threads))
    for (int64_t i = 0; i < n; i++) {
        const float *row = v + i * d;
        int nan = shared_nan;
        float peak = per_row ? row_peak(row, d, pairs, &nan) : shared;
        peak = nan ? NAN : (peak < peak_floor ? peak_floor : peak);
        float multiplier = qmax / peak, step = peak / qmax;
        int8_t *out = q + i * d;
        if (!(multiplier == multiplier && step == step && step <= FLT_MAX)) {
            memset(out, 0, (size_t)d); /* a non-finite row: its scale says so */
            scale[i] = step;
            residual_norm[i] = NAN;
            continue;
        }
        vfloat m = splat(multiplier), s = splat(step), acc = splat(0.0f);
        int64_t j = 0;
        for (; j + LANES <= d; j += LANES) {
            vfloat values = load(row + j);
            vfloat rounded = round_even(values * m);
            vint integers = __builtin_convertvector(rounded, vint);
            for (int l = 0; l < LANES; l++) out[j + l] = (int8_t)integers[l];
            vfloat residual = values - rounded * s;
            acc += residual * residual;
        }
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[l];
        for (; j < d; j++) {
            float rounded = rintf(row[j] * multiplier);
            out[j] = (int8_t)rounded;
            float residual = row[j] - rounded * step;
            sum += residual * residual;
        }
        scale[i] = step;
        residual_norm[i] = sqrtf(sum);
    }
}

/* ------------------------------------------------------------------ SimVQ's estimator
 * The forward and backward of simvq.py's _Estimator (its docstring has the formulas) in one
 * pass over the rows each, where the tensor form makes some twelve passes over (n, d) blocks.
 *
 * Forward: returns the sum of ||x - q||^2 over all rows; with rotation also writes each row's
 * ||x|| and ||q|| (floored at eps) and cos = x.q / (||x|| ||q||). */

/* one row of the forward: ||x - q||^2, and with rotation the row's norms and cosine */
static float estimator_row(const float *xr, const float *qr, int64_t d, int rotation,
                           float eps, float *x_norm, float *q_norm, float *cos) {
    vfloat dd0 = splat(0.0f), dd1 = splat(0.0f), xx = splat(0.0f), qq = splat(0.0f),
           xq = splat(0.0f);
    int64_t j = 0;
    for (; j + 2 * LANES <= d; j += 2 * LANES) {
        vfloat a0 = load(xr + j), b0 = load(qr + j);
        vfloat a1 = load(xr + j + LANES), b1 = load(qr + j + LANES);
        vfloat e0 = a0 - b0, e1 = a1 - b1;
        dd0 += e0 * e0;
        dd1 += e1 * e1;
        if (rotation) {
            xx += a0 * a0 + a1 * a1;
            qq += b0 * b0 + b1 * b1;
            xq += a0 * b0 + a1 * b1;
        }
    }
    float diff = fold(dd0 + dd1), sx = fold(xx), sq = fold(qq), sxq = fold(xq);
    for (; j < d; j++) {
        float e = xr[j] - qr[j];
        diff += e * e;
        sx += xr[j] * xr[j];
        sq += qr[j] * qr[j];
        sxq += xr[j] * qr[j];
    }
    if (rotation) {
        float nx = sqrtf(sx), nq = sqrtf(sq);
        nx = nx < eps ? eps : nx;
        nq = nq < eps ? eps : nq;
        *x_norm = nx;
        *q_norm = nq;
        *cos = sxq / (nx * nq);
    }
    return diff;
}

double vq_estimator_forward(const float *x, const float *q, int64_t n, int64_t d, int rotation,
                            float eps, float *x_norm, float *q_norm, float *cos) {
    int threads = team(2.0 * (double)n * (double)d);
    double partial[MAX_THREADS] = {0}; /* each thread's sum, added in thread order */
    PRAGMA(omp parallel num_threads(threads))
    {
        double total = 0.0;
        PRAGMA(omp for schedule(static))
        for (int64_t i = 0; i < n; i++)
            total += estimator_row(x + i * d, q + i * d, d, rotation, eps,
                                   rotation ? x_norm + i : NULL, rotation ? q_norm + i : NULL,
                                   rotation ? cos + i : NULL);
        partial[THREAD_ID()] = total;
    }
    double total = 0.0;
    for (int t = 0; t < threads; t++) total += partial[t];
    return total;
}

/* Backward: grad_x from g (n, d) by the rotation trick (or straight through) plus
 * commit * (x - q); grad_q (unless NULL) = codebook * (x - q). commit and codebook carry the
 * loss gradient's scale; floor is the floor of ||u + v||^2 = 2 + 2 cos. */
void vq_estimator_backward(const float *g, const float *x, const float *q, const float *x_norm,
                           const float *q_norm, const float *cos, int64_t n, int64_t d,
                           int rotation, float commit, float codebook, float floor,
                           float *grad_x, float *grad_q) {
    int threads = team(4.0 * (double)n * (double)d);
    PRAGMA(omp parallel for schedule(static) num_threads(threads))
    for (int64_t i = 0; i < n; i++) {
        const float *gr = g + i * d, *xr = x + i * d, *qr = q + i * d;
        float *gx = grad_x + i * d;
        float along_g = 1.0f, along_x = commit, along_q = -commit;
        if (rotation) {
            vfloat xg = splat(0.0f), qg = splat(0.0f);
            int64_t j = 0;
            for (; j + LANES <= d; j += LANES) {
                vfloat gv = load(gr + j);
                xg += load(xr + j) * gv;
                qg += load(qr + j) * gv;
            }
            float sxg = fold(xg), sqg = fold(qg);
            for (; j < d; j++) {
                sxg += xr[j] * gr[j];
                sqg += qr[j] * gr[j];
            }
            float nx = x_norm[i], nq = q_norm[i], ratio = nq / nx;
            float a = sxg / nx, b = sqg / nq, s2 = 2.0f + 2.0f * cos[i];
            float pull = 2.0f * (a + b) / (s2 < floor ? floor : s2);
            along_g = ratio;
            along_x = ratio * (2.0f * b - pull) / nx + commit;
            along_q = -ratio * pull / nq - commit;
        }
        vfloat cg = splat(along_g), cx = splat(along_x), cq = splat(along_q);
        vfloat cb = splat(codebook);
        int64_t j = 0;
        for (; j + LANES <= d; j += LANES) {
            vfloat xv = load(xr + j), qv = load(qr + j);
            vfloat out = load(gr + j) * cg + xv * cx + qv * cq;
            memcpy(gx + j, &out, sizeof out);
            if (grad_q) {
                vfloat other = (xv - qv) * cb;
                memcpy(grad_q + i * d + j, &other, sizeof other);
            }
        }
        for (; j < d; j++) {
            gx[j] = gr[j] * along_g + xr[j] * along_x + qr[j] * along_q;
            if (grad_q) grad_q[i * d + j] = (xr[j] - qr[j]) * codebook;
        }
    }
}

/* ------------------------------------------------------------------ FSQ
 * The projected FSQ call of fsq.py (_ProjectedFSQ, its code-table form) past project_in: one
 * pass over the rows forward and one backward, where the tensor form takes some twenty
 * operations (and as many Python calls) on narrow (n, c) blocks and several passes over the
 * (n, dim) ones.
 *
 * The forward's products are not contracted into fused multiply-adds: its values are then
 * those of the tensor form, bit for bit, and so are its codes at rounding ties. */

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* u (n, c) = project_in(x) + shift. Per channel j: t = clamp(u, -1, 1), or bounded[i, j]
 * when given (tanh(u), which the caller computes with torch's tanh);
 * standard: level = rint(bias_j + t scale_j), code = level / centre_j, digit = level + centre_j;
 * symmetric: level = floor((t + 1) scale_j + 0.5), code = level step_j - 1, digit = level.
 * index = sum_j digit_j basis_j; out row = rows[index] (rows: project_out of every code,
 * (codebook_size, dim)); without rows, out is not written (the caller projects the codes).
 * Writes code (n, c) for the backward. Returns 1 (out partly written)
 * where a u is not finite, or a digit is outside [0, levels_j). */
static int fsq_row(const float *u, const float *bounded, int64_t c, const float *scale,
                   const float *bias, const float *centre, const float *step,
                   const int32_t *levels, const int64_t *basis, int symmetric, const float *rows,
                   int64_t dim, float *out, int64_t *index, float *code_out) {
    int64_t at = 0;
    for (int64_t j = 0; j < c; j++) {
        float value = u[j];
        if (!isfinite(value)) return 1;
        float t = bounded ? bounded[j] : (value < -1.0f ? -1.0f : (value > 1.0f ? 1.0f : value));
        float level, code, digit;
        if (symmetric) {
            float scaled = (t + 1.0f) * scale[j];
            level = floorf(scaled + 0.5f);
            float spaced = level * step[j];
            code = spaced - 1.0f;
            digit = level;
        } else {
            float scaled = t * scale[j];
            level = rintf(bias[j] + scaled);
            code = level / centre[j];
            digit = level + centre[j];
        }
        if (!(digit >= 0.0f && digit < (float)levels[j])) return 1;
        at += (int64_t)digit * basis[j];
        code_out[j] = code;
    }
    *index = at;
    if (rows) memcpy(out, rows + at * dim, (size_t)dim * sizeof(float));
    return 0;
}

int vq_fsq_forward(const float *u, const float *bounded, int64_t n, int64_t c,
                   const float *scale, const float *bias, const float *centre, const float *step,
                   const int32_t *levels, const int64_t *basis, int symmetric, const float *rows,
                   int64_t dim, float *out, int64_t *index, float *code_out) {
    int bad = 0;
    int threads = team((double)n * (double)((rows ? dim : 0) + 2 * c));
    PRAGMA(omp parallel for schedule(static) num_threads(threads) reduction(|:bad))
    for (int64_t i = 0; i < n; i++)
        bad |= fsq_row(u + i * c, bounded ? bounded + i * c : NULL, c, scale, bias, centre, step,
                       levels, basis, symmetric, rows, dim, rows ? out + i * dim : NULL,
                       index + i, code_out + i * c);
    return bad;
}
#pragma GCC pop_options

/* The backward of that call with project_in and project_out (w_in (c, dim), w_out (dim, c)):
 * from g (n, dim), the gradient of the output (its rows g_stride floats apart: dim, or 0
 * for one row broadcast to all, as the gradient of a sum arrives),
 *   grad_w_out = g^T [code], grad_b_out = sum g          (into grad_w_out (dim, c), grad_b_out)
 *   s = (g w_out) slope; grad_h = s - s t^2 (bound 0, tanh: saved = t), or s kept where
 *   |u| <= 1 (bound 1, clamp: saved = u; bound 2, inward clamp: also where u s > 0)
 *   grad_x = grad_h w_in, grad_w_in = grad_h^T x, grad_b_in = sum grad_h
 * Sums over rows in float32 by blocks of 64 rows, the blocks added in double. */
#define FSQ_MAX_CHANNELS 32
#define FSQ_BLOCK 64

/* the gradient of the bound at one channel: s, the gradient of the code, times tanh' or the
 * clamp's mask (see vq_fsq_backward) */
static float bound_gradient(float s, float v, int bound) {
    if (bound == 0) return s - s * (v * v); /* tanh' = 1 - t^2 */
    int keep = v >= -1.0f && v <= 1.0f;
    if (bound == 2) keep |= v * s > 0.0f;
    return keep ? s : 0.0f;
}

/* rows i .. i + rows - 1 of the backward (rows at most FSQ_ROWS, a constant where it is
 * called, so that the loops over it unroll): grad_x written, the sums (w_out, w_in, b_in,
 * b_out: the layout of vq_fsq_backward's) added to block. Several rows at a time load and
 * store each accumulator once for all of them; how many is vq_fsq_backward's choice. */
#define FSQ_ROWS 4
static inline __attribute__((always_inline)) void fsq_backward_step(
        const float *g, int64_t g_stride, const float *x, const float *saved, const float *code,
        const float *w_in, const float *columns, int bound, int64_t i, int rows, int64_t c,
        int64_t dim, float *grad_x, float *block) {
    float *b_w_out = block, *b_w_in = block + c * dim, *b_b_in = block + 2 * c * dim,
          *b_b_out = block + 2 * c * dim + c;
    const float *gr[FSQ_ROWS], *xr[FSQ_ROWS];
    float *gx[FSQ_ROWS];
    float h[FSQ_ROWS][FSQ_MAX_CHANNELS], cd[FSQ_ROWS][FSQ_MAX_CHANNELS];
    /* the c products g . column_j of each row side by side: independent chains of additions
     * (one product after another waits on each addition's latency) */
    vfloat acc[FSQ_ROWS][FSQ_MAX_CHANNELS];
    for (int r = 0; r < rows; r++) {
        gr[r] = g + (i + r) * g_stride;
        xr[r] = x + (i + r) * dim;
        gx[r] = grad_x + (i + r) * dim;
        for (int64_t j = 0; j < c; j++) acc[r][j] = splat(0.0f);
    }
    int64_t e = 0;
    for (; e + LANES <= dim; e += LANES) {
        for (int64_t j = 0; j < c; j++) {
            vfloat column = load(columns + j * dim + e);
            for (int r = 0; r < rows; r++) acc[r][j] += load(gr[r] + e) * column;
        }
    }
    for (int r = 0; r < rows; r++) {
        for (int64_t j = 0; j < c; j++) {
            float s = fold(acc[r][j]);
            for (int64_t d = e; d < dim; d++) s += gr[r][d] * columns[j * dim + d];
            h[r][j] = bound_gradient(s, saved[(i + r) * c + j], bound);
            cd[r][j] = code[(i + r) * c + j];
            b_b_in[j] += h[r][j];
        }
    }
    /* grad_x = h w_in, summed in registers and stored once; the weight sums: each
     * accumulator loaded and stored once for the rows */
    int64_t d = 0;
    for (; d + LANES <= dim; d += LANES) {
        vfloat gv[FSQ_ROWS], xv[FSQ_ROWS], sum[FSQ_ROWS], b_out = load(b_b_out + d);
        for (int r = 0; r < rows; r++) {
            gv[r] = load(gr[r] + d);
            xv[r] = load(xr[r] + d);
            sum[r] = splat(0.0f);
            b_out += gv[r];
        }
        for (int64_t j = 0; j < c; j++) {
            vfloat w = load(w_in + j * dim + d);
            vfloat out_sum = load(b_w_out + j * dim + d), in_sum = load(b_w_in + j * dim + d);
            for (int r = 0; r < rows; r++) {
                sum[r] += splat(h[r][j]) * w;
                out_sum += splat(cd[r][j]) * gv[r];
                in_sum += splat(h[r][j]) * xv[r];
            }
            memcpy(b_w_out + j * dim + d, &out_sum, sizeof out_sum);
            memcpy(b_w_in + j * dim + d, &in_sum, sizeof in_sum);
        }
        memcpy(b_b_out + d, &b_out, sizeof b_out);
        for (int r = 0; r < rows; r++) memcpy(gx[r] + d, &sum[r], sizeof sum[r]);
    }
    for (; d < dim; d++) {
        for (int r = 0; r < rows; r++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < c; j++) {
                sum += h[r][j] * w_in[j * dim + d];
                b_w_out[j * dim + d] += cd[r][j] * gr[r][d];
                b_w_in[j * dim + d] += h[r][j] * xr[r][d];
            }
            b_b_out[d] += gr[r][d];
            gx[r][d] = sum;
        }
    }
}

/* the rows [first, end) of the backward, step rows at a time, their sums added to block;
 * inlined where c and step are constants (see vq_fsq_backward) */
static inline __attribute__((always_inline)) void fsq_backward_rows(
        const float *g, int64_t g_stride, const float *x, const float *saved,
        const float *code, const float *w_in, const float *columns, int bound, int64_t first,
        int64_t end,
        int64_t c, int64_t dim, int step, float *grad_x, float *block) {
    int64_t i = first;
    for (; i + step <= end; i += step)
        fsq_backward_step(g, g_stride, x, saved, code, w_in, columns, bound, i, step, c, dim,
                          grad_x, block);
    for (; i < end; i++)
        fsq_backward_step(g, g_stride, x, saved, code, w_in, columns, bound, i, 1, c, dim,
                          grad_x, block);
}

/* the backward's rows per step: at 128 features or more 4, else 2 (measured with a cold cache,
 * one and two threads: at (8192, 256) rows and 4 channels, 4 rows took 0.86x the time of 2; at
 * (4096, 512) and 8 channels 0.58-0.81x; at (2048, 16) and 3 channels 0.9-1.0x, at (8192, 64)
 * and 4 channels 1.3-1.7x) */
#define FSQ_WIDE 128

int vq_fsq_backward(const float *g, const float *x, const float *saved, const float *code,
                    const float *w_in, const float *w_out, const float *slope, int bound,
                    int64_t n, int64_t c, int64_t dim, int64_t g_stride, float *grad_x,
                    float *grad_w_in,
                    float *grad_b_in, float *grad_w_out, float *grad_b_out) {
    if (c > FSQ_MAX_CHANNELS) return 1;
    int threads = team(3.0 * (double)n * (double)dim);
    int64_t sums = 2 * c * dim + c + dim;
    /* per thread: its sums in double, and the current block's in float */
    double *total = calloc((size_t)(threads * sums), sizeof(double));
    float *block = calloc((size_t)(threads * sums), sizeof(float));
    float *columns = malloc((size_t)(c * dim) * sizeof(float));
    if (!total || !block || !columns) {
        free(total);
        free(block);
        free(columns);
        return 2;
    }
    /* column j of w_out times the channel's slope, contiguous */
    for (int64_t j = 0; j < c; j++)
        for (int64_t d = 0; d < dim; d++) columns[j * dim + d] = w_out[d * c + j] * slope[j];
    int64_t blocks = (n + FSQ_BLOCK - 1) / FSQ_BLOCK;
    PRAGMA(omp parallel num_threads(threads))
    {
        double *mine = total + THREAD_ID() * sums;
        float *current = block + THREAD_ID() * sums;
        PRAGMA(omp for schedule(static))
        for (int64_t b = 0; b < blocks; b++) {
            int64_t first = b * FSQ_BLOCK, end = first + FSQ_BLOCK < n ? first + FSQ_BLOCK : n;
            /* with c a constant the loops over the channels unroll and the products stay in
             * registers (with c a variable they went through memory: 1.5-2x slower) */
            switch (c) {
#define FSQ_CHANNELS_CASE(C)                                                                  \
            case C:                                                                           \
                if (dim >= FSQ_WIDE)                                                          \
                    fsq_backward_rows(g, g_stride, x, saved, code, w_in, columns, bound,     \
                                      first, end, C, dim, 4, grad_x, current);               \
                else                                                                          \
                    fsq_backward_rows(g, g_stride, x, saved, code, w_in, columns, bound,     \
                                      first, end, C, dim, 2, grad_x, current);               \
                break;
            FSQ_CHANNELS_CASE(1) FSQ_CHANNELS_CASE(2) FSQ_CHANNELS_CASE(3) FSQ_CHANNELS_CASE(4)
            FSQ_CHANNELS_CASE(5) FSQ_CHANNELS_CASE(6) FSQ_CHANNELS_CASE(7) FSQ_CHANNELS_CASE(8)
#undef FSQ_CHANNELS_CASE
            default:
                fsq_backward_rows(g, g_stride, x, saved, code, w_in, columns, bound, first, end,
                                  c, dim, 2, grad_x, current);
            }
            for (int64_t k = 0; k < sums; k++) {
                mine[k] += current[k];
                current[k] = 0.0f;
            }
        }
    }
    for (int t = 1; t < threads; t++) /* in thread order: the same bits for a thread count */
        for (int64_t k = 0; k < sums; k++) total[k] += total[t * sums + k];
    for (int64_t j = 0; j < c; j++) {
        for (int64_t d = 0; d < dim; d++) {
            grad_w_out[d * c + j] = (float)total[j * dim + d];
            grad_w_in[j * dim + d] = (float)total[c * dim + j * dim + d];
        }
        if (grad_b_in) grad_b_in[j] = (float)total[2 * c * dim + j];
    }
    if (grad_b_out)
        for (int64_t d = 0; d < dim; d++) grad_b_out[d] = (float)total[2 * c * dim + c + d];
    free(total);
    free(block);
    free(columns);
    return 0;
}
