/* The pieces shared by the native kernels: a bounded binary min-heap of (value, position) pairs whose root is
 * the worst kept pair, the float32 dot product that rescores candidates, and (AVX2) a horizontal sum.
 *
 * Ties keep the earlier position: a candidate must be strictly greater than the worst kept value to enter, and
 * among equal values the later position is the worse one.
 */
#ifndef TWOTOWER_HEAP_H
#define TWOTOWER_HEAP_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Is (va, pa) worse than (vb, pb)? Lower value, or equal value and later position. */
static inline int worse(float va, int64_t pa, float vb, int64_t pb) {
    return va < vb || (va == vb && pa > pb);
}

static inline void sift_down(float *values, int64_t *positions, int64_t n, int64_t i) {
    float v = values[i];
    int64_t p = positions[i];
    for (;;) {
        int64_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && worse(values[child + 1], positions[child + 1], values[child], positions[child])) ++child;
        if (!worse(values[child], positions[child], v, p)) break;
        values[i] = values[child];
        positions[i] = positions[child];
        i = child;
    }
    values[i] = v;
    positions[i] = p;
}

static inline void sift_up(float *values, int64_t *positions, int64_t i) {
    float v = values[i];
    int64_t p = positions[i];
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (!worse(v, p, values[parent], positions[parent])) break;
        values[i] = values[parent];
        positions[i] = positions[parent];
        i = parent;
    }
    values[i] = v;
    positions[i] = p;
}

static inline float push(float *values, int64_t *positions, int64_t *filled, int64_t k, float x, int64_t p) {
    int64_t n = *filled;
    if (n < k) {
        values[n] = x;
        positions[n] = p;
        sift_up(values, positions, n);
        *filled = ++n;
        return n < k ? -INFINITY : values[0];
    }
    values[0] = x;
    positions[0] = p;
    sift_down(values, positions, k, 0);
    return values[0];
}

#if defined(__AVX2__) && defined(__FMA__)
/* The sum of the 8 lanes, in one fixed order (halves, then pairs, then the last two). */
static inline float horizontal_sum8(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
#endif

/* The float32 dot product used to rescore screened candidates and, through twotower_pair_scores, to score
 * known positives: one fixed order of operations, so a candidate and its copy always get the same value. */
static inline float dot(const float *a, const float *b, int64_t d) {
    float total = 0.0f;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    total = horizontal_sum8(acc);
#endif
    for (; i < d; ++i) total = fmaf(a[i], b[i], total);
    return total;
}

/* Turn a heap of `filled` pairs into a list sorted by descending value, then ascending position (heap sort). */
static inline void heap_sort(float *v, int64_t *p, int64_t filled) {
    for (int64_t n = filled; n > 1; --n) {
        /* Move the worst remaining pair to the end: the list ends up best first. */
        float tv = v[0];
        int64_t tp = p[0];
        v[0] = v[n - 1];
        p[0] = p[n - 1];
        v[n - 1] = tv;
        p[n - 1] = tp;
        sift_down(v, p, n - 1, 0);
    }
}

#endif
