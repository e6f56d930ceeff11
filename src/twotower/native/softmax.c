/* Row statistics of the in-batch softmax, the elementwise part of the single-block loss.
 *
 * For each row of a [rows, cols] block of logits: its maximum m, then exp(l - m) written over the logits and
 * their sum s, in one visit of the row while it is in cache. torch needs four passes over the whole block for
 * the same (amax, sub, exp, sum), each reading it from memory again.
 *
 * exp is Cephes's single-precision expf (range reduction by ln 2 split in two, a degree-6 polynomial): within
 * 2 ulp of the exact value. Arguments below -87.3365 (where expf leaves the normal range) give exactly 0; they
 * only arise at least 87 below the row's maximum, whose own term is 1, so the sum is unchanged in float32.
 * NaN propagates into the row's sum.
 */
#include <math.h>
#include <stdint.h>

#include "heap.h" /* immintrin.h where vectors are built, horizontal_sum8 */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SOFTMAX_AVX2 1
#endif

#define EXP_LOWEST -87.33654475f
/* Cephes's reduction and polynomial, shared by both vector widths: x = n ln 2 + r with ln 2 = LN2_HIGH + LN2_LOW
 * (LN2_HIGH exact in few bits, so n * it is exact), then exp(r) = 1 + r + r^2 P(r), P's coefficients highest
 * first. */
#define LOG2E 1.44269504088896341f
#define LN2_HIGH 0.693359375f
#define LN2_LOW -2.12194440e-4f
#if defined(__AVX512F__) || defined(SOFTMAX_AVX2)
static const float EXP_COEFFICIENTS[6] = {
    1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f,
};
#endif

static inline float exp_scalar(float x) {
    return x < EXP_LOWEST ? 0.0f : expf(x);
}

#ifdef __AVX512F__
static inline __m512 exp16(__m512 x) {
    /* Lanes far below the normal range are zeroed at the end; NaN lanes compare unordered and are kept. */
    __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_LOWEST), _CMP_NLT_UQ);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
    __m512 p = _mm512_set1_ps(EXP_COEFFICIENTS[0]);
    for (int c = 1; c < 6; ++c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_COEFFICIENTS[c]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
#endif

#ifdef SOFTMAX_AVX2
/* exp16's arithmetic on 8 lanes: the same reduction and polynomial, 2^n built in the exponent bits (n is at
 * least -126 for every lane kept, at most 127 up to 88). Arguments above 88 (never passed here: every one is at
 * most 0) are left to expf. NaN lanes compare unordered, are kept and stay NaN. */
static inline __m256 exp8(__m256 x) {
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_GT_OQ))) {
        float lanes[8];
        _mm256_storeu_ps(lanes, x);
        for (int j = 0; j < 8; ++j) lanes[j] = exp_scalar(lanes[j]);
        return _mm256_loadu_ps(lanes);
    }
    __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LOWEST), _CMP_NLT_UQ);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);
    __m256 p = _mm256_set1_ps(EXP_COEFFICIENTS[0]);
    for (int c = 1; c < 6; ++c) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_COEFFICIENTS[c]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
    return _mm256_and_ps(keep, _mm256_mul_ps(p, two_n));
}

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#endif

/* logits: [rows, cols] with row stride `stride`, overwritten by exp(l - max); maxima, sums: [rows]. */
void twotower_softmax_rows(float *logits, int64_t rows, int64_t cols, int64_t stride, float *maxima, float *sums,
                           int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = logits + r * stride;
        float m = -INFINITY;
        int64_t j = 0;
#ifdef __AVX512F__
        __m512 block_max = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= cols; j += 16) block_max = _mm512_max_ps(block_max, _mm512_loadu_ps(row + j));
        m = _mm512_reduce_max_ps(block_max);
#elif defined(SOFTMAX_AVX2)
        __m256 block_max = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= cols; j += 8) block_max = _mm256_max_ps(block_max, _mm256_loadu_ps(row + j));
        m = max8(block_max);
#endif
        for (; j < cols; ++j) m = row[j] > m ? row[j] : m;
        float s = 0.0f;
        j = 0;
#ifdef __AVX512F__
        __m512 block_sum = _mm512_setzero_ps(), shift = _mm512_set1_ps(m);
        for (; j + 16 <= cols; j += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
            _mm512_storeu_ps(row + j, e);
            block_sum = _mm512_add_ps(block_sum, e);
        }
        s = _mm512_reduce_add_ps(block_sum);
#elif defined(SOFTMAX_AVX2)
        __m256 block_sum = _mm256_setzero_ps(), shift = _mm256_set1_ps(m);
        for (; j + 8 <= cols; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
            _mm256_storeu_ps(row + j, e);
            block_sum = _mm256_add_ps(block_sum, e);
        }
        s = horizontal_sum8(block_sum);
#endif
        for (; j < cols; ++j) {
            row[j] = exp_scalar(row[j] - m);
            s += row[j];
        }
        maxima[r] = m;
        sums[r] = s;
    }
}

/* The backward's elementwise pass over a block of recomputed logits: row r becomes exp(l - n_r) * s_r, with n_r
 * the row's log-normaliser (max + log of the sum of exponentials, from the forward) and s_r its gradient scale.
 * One visit of the row where torch needs three passes (sub, exp, mul). Arguments of exp below -87.34 give 0. */
void twotower_softmax_gradient_rows(float *logits, int64_t rows, int64_t cols, int64_t stride,
                                    const float *log_normalisers, const float *scales, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = logits + r * stride;
        const float n = log_normalisers[r], s = scales[r];
        int64_t j = 0;
#ifdef __AVX512F__
        __m512 shift = _mm512_set1_ps(n), scale = _mm512_set1_ps(s);
        for (; j + 16 <= cols; j += 16)
            _mm512_storeu_ps(row + j, _mm512_mul_ps(exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift)), scale));
#elif defined(SOFTMAX_AVX2)
        __m256 shift = _mm256_set1_ps(n), scale = _mm256_set1_ps(s);
        for (; j + 8 <= cols; j += 8)
            _mm256_storeu_ps(row + j, _mm256_mul_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift)), scale));
#endif
        for (; j < cols; ++j) row[j] = exp_scalar(row[j] - n) * s;
    }
}

/* bfloat16 <-> float32. Widening is exact; narrowing rounds to nearest even (exponentials are finite or NaN,
 * and a quiet NaN stays NaN), as torch's .to(torch.bfloat16) does. */
static inline float widen_bf16(uint16_t bits) {
    union { uint32_t u; float f; } value = {(uint32_t)bits << 16};
    return value.f;
}

static inline uint16_t narrow_bf16(float x) {
    union { float f; uint32_t u; } value = {x};
    return (uint16_t)((value.u + 0x7FFFu + ((value.u >> 16) & 1u)) >> 16);
}

#ifdef __AVX512F__
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store16_bf16(uint16_t *p, __m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(u));
}
#endif

#ifdef SOFTMAX_AVX2
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline void store8_bf16(uint16_t *p, __m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    /* the 32-bit lanes hold values below 2^16: pack them to 16 bits, the two halves in order */
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}
#endif

/* The row statistics of a block whose exponentials are kept in bfloat16 (the bf16 products' operand): for each
 * row of `input` (bfloat16 when input_is_bf16, else float32; row stride in_stride) its maximum m, exp(l - m)
 * computed in float32 and stored rounded to bfloat16 in `output` (row stride out_stride; it may be `input`
 * itself when that is bfloat16), and the float32 sum of the unrounded exponentials. One visit of each row, where
 * torch needs a widening copy, four passes and a narrowing copy. */
void twotower_softmax_rows_bf16(const void *input, int64_t input_is_bf16, int64_t rows, int64_t cols,
                                int64_t in_stride, uint16_t *output, int64_t out_stride, float *maxima, float *sums,
                                int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *row16 = (const uint16_t *)input + r * in_stride;
        const float *row32 = (const float *)input + r * in_stride;
        uint16_t *out = output + r * out_stride;
        float m = -INFINITY;
        int64_t j = 0;
#ifdef __AVX512F__
        __m512 block_max = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= cols; j += 16)
            block_max = _mm512_max_ps(block_max, input_is_bf16 ? load16_bf16(row16 + j) : _mm512_loadu_ps(row32 + j));
        m = _mm512_reduce_max_ps(block_max);
#elif defined(SOFTMAX_AVX2)
        __m256 block_max = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= cols; j += 8)
            block_max = _mm256_max_ps(block_max, input_is_bf16 ? load8_bf16(row16 + j) : _mm256_loadu_ps(row32 + j));
        m = max8(block_max);
#endif
        for (; j < cols; ++j) {
            float value = input_is_bf16 ? widen_bf16(row16[j]) : row32[j];
            m = value > m ? value : m;
        }
        float s = 0.0f;
        j = 0;
#ifdef __AVX512F__
        __m512 block_sum = _mm512_setzero_ps(), shift = _mm512_set1_ps(m);
        for (; j + 16 <= cols; j += 16) {
            __m512 value = input_is_bf16 ? load16_bf16(row16 + j) : _mm512_loadu_ps(row32 + j);
            __m512 e = exp16(_mm512_sub_ps(value, shift));
            store16_bf16(out + j, e);
            block_sum = _mm512_add_ps(block_sum, e);
        }
        s = _mm512_reduce_add_ps(block_sum);
#elif defined(SOFTMAX_AVX2)
        __m256 block_sum = _mm256_setzero_ps(), shift = _mm256_set1_ps(m);
        for (; j + 8 <= cols; j += 8) {
            __m256 value = input_is_bf16 ? load8_bf16(row16 + j) : _mm256_loadu_ps(row32 + j);
            __m256 e = exp8(_mm256_sub_ps(value, shift));
            store8_bf16(out + j, e);
            block_sum = _mm256_add_ps(block_sum, e);
        }
        s = horizontal_sum8(block_sum);
#endif
        for (; j < cols; ++j) {
            float e = exp_scalar((input_is_bf16 ? widen_bf16(row16[j]) : row32[j]) - m);
            out[j] = narrow_bf16(e);
            s += e;
        }
        maxima[r] = m;
        sums[r] = s;
    }
}

/* Whether a vectorised path (AVX-512, or AVX2 with FMA) was compiled in (the scalar one is slower than torch's
 * passes). */
int twotower_softmax_rows_vectorized(void) {
#if defined(__AVX512F__) || defined(SOFTMAX_AVX2)
    return 1;
#else
    return 0;
#endif
}
