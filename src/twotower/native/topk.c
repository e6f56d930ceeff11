/* Running top-k selection over blocks of scores, the inner loop of twotower's exact search.
 *
 * Each row keeps its k best (value, position) pairs in a binary min-heap whose root is the worst kept pair.
 * Scores are compared with the root's value while the block is hot in cache (64 at a time with AVX-512);
 * only the rare candidates that beat it are pushed. Ties keep the earlier position: a candidate must be
 * strictly greater than the worst kept value to enter, and among equal values the later position is the
 * worse one. twotower_topk_finish sorts each row by descending value, then ascending position.
 *
 * Built on first use by twotower._native with the system C compiler; the pure torch path is used without it.
 */
#include <float.h>
#include <stdint.h>

#include "heap.h"

static void update_row(const float *row, int64_t width, int64_t offset, float *values, int64_t *positions,
                       int64_t *filled, int64_t k) {
    float threshold = *filled < k ? -INFINITY : values[0];
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 64 <= width; j += 64) {
        __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(row + j + 16)),
                                 _mm512_max_ps(_mm512_loadu_ps(row + j + 32), _mm512_loadu_ps(row + j + 48)));
        if (!_mm512_cmp_ps_mask(m, _mm512_set1_ps(threshold), _CMP_GT_OQ)) continue;
        for (int64_t u = j; u < j + 64; ++u) {
            if (row[u] > threshold) threshold = push(values, positions, filled, k, row[u], offset + u);
        }
    }
#else
    for (; j + 64 <= width; j += 64) {
        float m = row[j];
        for (int64_t u = j + 1; u < j + 64; ++u) m = row[u] > m ? row[u] : m;
        if (!(m > threshold)) continue;
        for (int64_t u = j; u < j + 64; ++u) {
            if (row[u] > threshold) threshold = push(values, positions, filled, k, row[u], offset + u);
        }
    }
#endif
    for (; j < width; ++j) {
        if (row[j] > threshold) threshold = push(values, positions, filled, k, row[j], offset + j);
    }
}

static inline float bf16_to_float(uint16_t bits) {
    union { uint32_t u; float f; } value = {.u = (uint32_t)bits << 16};
    return value.f;
}

/* One row of the screened search: `screen` holds bfloat16 scores; a candidate whose screened score is within
 * `margin` of the worst kept exact value (or any candidate while fewer than k are kept) is rescored exactly
 * and pushed if its exact value is strictly greater. */
static void screen_row(const uint16_t *screen, int64_t width, int64_t offset, const float *query,
                       const float *candidates, int64_t d, float margin, float *values, int64_t *positions,
                       int64_t *filled, int64_t k) {
    float threshold = *filled < k ? -INFINITY : values[0];
    /* While fewer than k are kept every real candidate is rescored; excluded ones hold -inf and never are. */
    float bound = *filled < k ? -FLT_MAX : threshold - margin;
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 64 <= width; j += 64) {
        __m512 m = _mm512_setzero_ps();
        for (int64_t part = 0; part < 4; ++part) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(screen + j + 16 * part));
            __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            m = part == 0 ? wide : _mm512_max_ps(m, wide);
        }
        if (!_mm512_cmp_ps_mask(m, _mm512_set1_ps(bound), _CMP_GE_OQ)) continue;
        for (int64_t u = j; u < j + 64; ++u) {
            if (bf16_to_float(screen[u]) >= bound) {
                float exact = dot(query, candidates + u * d, d);
                if (exact > threshold) {
                    threshold = push(values, positions, filled, k, exact, offset + u);
                    bound = *filled < k ? -FLT_MAX : threshold - margin;
                }
            }
        }
    }
#endif
    for (; j < width; ++j) {
        if (bf16_to_float(screen[j]) >= bound) {
            float exact = dot(query, candidates + j * d, d);
            if (exact > threshold) {
                threshold = push(values, positions, filled, k, exact, offset + j);
                bound = *filled < k ? -FLT_MAX : threshold - margin;
            }
        }
    }
}

/* screen: [rows, width] bfloat16 scores with row stride `stride`; queries: [rows, d]; candidates: [width, d];
 * margins: [rows], the bound on |exact - screened| for each row. */
void twotower_topk_screen(const uint16_t *screen, int64_t rows, int64_t width, int64_t stride, int64_t offset,
                          const float *queries, const float *candidates, int64_t d, const float *margins,
                          float *values, int64_t *positions, int64_t *filled, int64_t k, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        screen_row(screen + r * stride, width, offset, queries + r * d, candidates, d, margins[r], values + r * k,
                   positions + r * k, filled + r, k);
    }
}

/* out[i] = dot(queries[i], candidates[i]) with the rescoring arithmetic. */
void twotower_pair_scores(const float *queries, const float *candidates, int64_t n, int64_t d, float *out,
                          int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) out[i] = dot(queries + i * d, candidates + i * d, d);
}

/* scores: [rows, width] with row stride `stride`; values/positions: [rows, k] heaps; filled: [rows]. */
void twotower_topk_update(const float *scores, int64_t rows, int64_t width, int64_t stride, int64_t offset,
                          float *values, int64_t *positions, int64_t *filled, int64_t k, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        update_row(scores + r * stride, width, offset, values + r * k, positions + r * k, filled + r, k);
    }
}

/* Turn each row's heap into a list sorted by descending value, then ascending position (heap sort). Slots
 * past `filled` keep their -inf / -1 sentinels. */
void twotower_topk_finish(float *values, int64_t *positions, const int64_t *filled, int64_t rows, int64_t k,
                          int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        float *v = values + r * k;
        int64_t *p = positions + r * k;
        heap_sort(v, p, filled[r]);
    }
}
