/* The search of twotower's AnisotropicIVF index: partitions, 4-bit product-quantized residuals scanned with
 * 16-entry lookup tables, and an exact float32 reorder (the scheme of ScaNN's tree + asymmetric hashing).
 *
 * Per query:
 *  1. score every partition centroid, keep the best `leaves_to_search` (selected and sorted best first, so the
 *     candidate threshold rises quickly);
 *  2. build one lookup table per subspace, lut[m][c] = query_m . codebook[m][c], shared by every partition (the
 *     codes quantize residuals, x = centroid + residual, so a candidate's approximate score is
 *     query . centroid + sum_m lut[m][code_m]); quantize the tables to uint8 with one scale for all subspaces;
 *  3. scan the codes of the kept partitions 32 candidates at a time (one vpshufb looks up 64 codes with
 *     AVX-512BW, 32 with AVX2),
 *     summing uint8 entries into uint16 totals; a partition's integer base is its centroid score in the same
 *     units, and a candidate enters the buffer only when base + total beats the buffer's threshold. A full
 *     buffer is cut to its `reorder` best by quickselect, which raises the threshold;
 *  4. score the `reorder` best exactly (the float32 dot product of heap.h, on the original vectors stored in
 *     partition order), skip excluded rows, and keep the top k by score (equal scores by partition order),
 *     returned by score descending, then original row ascending.
 *
 * Codes are stored in blocks of 32 candidates, a partition's last block padded: block b, subspace pair p holds
 * 32 bytes, byte j = code(2p, j) | code(2p + 1, j) << 4. The number of subspaces is a multiple of 4.
 */
#include <float.h>
#include <stdint.h>
#include <string.h>

#include "heap.h"

#define BLOCK 32
/* how many candidates ahead the exact reorder requests vectors: enough to overlap the misses, few enough that
 * the requests are not dropped (requesting every candidate's vector at once was slower) */
#define AHEAD 24
/* bins of the candidate buffer's score histogram (scores within this many units of the best) */
#define HISTOGRAM 8192
/* bins of the partition scores' histogram (at most HISTOGRAM: it uses the same memory) */
#define LEAF_BINS 1024
_Static_assert(LEAF_BINS <= HISTOGRAM, "the partition histogram lives in the candidate histogram's memory");
/* partitions per group of the centroid table (native/ivf.c's best_leaves; the Python side lays it out) */
#define LEAF_GROUP 32

/* A candidate is one uint64: its integer score (offset to unsigned) above its position, so that keys compare as
 * (score, position) and move as single words. Positions stay below 2**32 (the index refuses larger corpora). */
static inline uint64_t candidate_key(int32_t score, int64_t position) {
    return ((uint64_t)((uint32_t)score ^ 0x80000000u) << 32) | (uint64_t)(uint32_t)position;
}

static inline int32_t key_score(uint64_t key) { return (int32_t)((uint32_t)(key >> 32) ^ 0x80000000u); }

/* Move the `keep` largest keys of buf[0..n) to its front (quickselect, Hoare partition, median of three). */
static void keep_best(uint64_t *buf, int64_t n, int64_t keep) {
    int64_t low = 0, high = n - 1;
    while (low < high) {
        int64_t mid = low + (high - low) / 2;
        uint64_t a = buf[low], b = buf[mid], c = buf[high];
        uint64_t pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = low, j = high;
        while (i <= j) {
            while (buf[i] > pivot) ++i;
            while (buf[j] < pivot) --j;
            if (i <= j) {
                uint64_t t = buf[i];
                buf[i] = buf[j];
                buf[j] = t;
                ++i;
                --j;
            }
        }
        /* [low, j] >= pivot >= [i, high] */
        if (keep - 1 <= j) high = j;
        else if (keep - 1 >= i) low = i;
        else break;
    }
}

static uint64_t lowest_key(const uint64_t *buf, int64_t n) {
    uint64_t lowest = UINT64_MAX;
    for (int64_t i = 0; i < n; ++i) lowest = buf[i] < lowest ? buf[i] : lowest;
    return lowest;
}

/* Cut buf[0..n) to `keep` entries of the highest scores; returns the lowest score kept (an entry must now score
 * more to enter). A histogram of the scores below the highest finds that score in two passes without a branch
 * per entry (quickselect mispredicts about every other comparison); scores spread wider than the histogram fall
 * back to quickselect. Among entries tied at the lowest kept score, the first in the buffer are kept. */
static int32_t cut_to_best(uint64_t *buf, int64_t n, int64_t keep, int32_t top, int32_t threshold,
                           uint32_t *histogram) {
    /* top is the highest score in the buffer, and every score exceeds threshold: only the bins down to
     * threshold + 1 are counted into (after the first cut the scores lie close together) */
    int64_t spread = (int64_t)top - ((int64_t)threshold + 1);
    memset(histogram, 0, sizeof(uint32_t) * (size_t)(spread < HISTOGRAM - 1 ? spread + 1 : HISTOGRAM));
    for (int64_t i = 0; i < n; ++i) {
        int64_t below = (int64_t)top - key_score(buf[i]);
        ++histogram[below < HISTOGRAM - 1 ? below : HISTOGRAM - 1];
    }
    int64_t above = 0, bin = 0;
    for (; bin < HISTOGRAM - 1 && above + histogram[bin] < keep; ++bin) above += histogram[bin];
    if (bin == HISTOGRAM - 1) {
        keep_best(buf, n, keep);
        return key_score(lowest_key(buf, keep));
    }
    int32_t lowest = (int32_t)(top - bin);
    int64_t ties = keep - above, kept = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint64_t key = buf[i];
        int32_t score = key_score(key);
        /* bitwise, not logical, operators: a branch here mispredicts for about every other entry */
        int64_t above = score > lowest, tied = (int64_t)(score == lowest) & (int64_t)(ties > 0);
        ties -= tied;
        buf[kept] = key;
        kept += above | tied;
    }
    return lowest;
}

/* A float score as a uint32 that orders as the score does (NaN, from an overflowed dot product, lowest). */
static inline uint32_t score_order(float score) {
    uint32_t bits;
    memcpy(&bits, &score, sizeof bits);
    if (score != score) return 0;
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

static inline float order_score(uint32_t order) {
    uint32_t bits = order & 0x80000000u ? order & 0x7FFFFFFFu : ~order;
    float score;
    memcpy(&score, &bits, sizeof score);
    return order == 0 ? NAN : score;
}

/* A key of a float score and a position (below 2**32): the score's order above the position's complement, so
 * that keys compare as (score, earlier position first) and move as single words. */
static inline uint64_t scored_key(float score, int64_t position) {
    return ((uint64_t)score_order(score) << 32) | (uint64_t)(~(uint32_t)position);
}

static inline float scored_key_score(uint64_t key) { return order_score((uint32_t)(key >> 32)); }

static inline int64_t scored_key_position(uint64_t key) { return (int64_t)(~(uint32_t)key); }

/* Sort keys[0..n) in descending order (quicksort, median of three; insertion sort for short runs). */
static void sort_descending(uint64_t *keys, int64_t n) {
    while (n > 24) {
        uint64_t a = keys[0], b = keys[n / 2], c = keys[n - 1];
        uint64_t pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = 0, j = n - 1;
        while (i <= j) {
            while (keys[i] > pivot) ++i;
            while (keys[j] < pivot) --j;
            if (i <= j) {
                uint64_t t = keys[i];
                keys[i++] = keys[j];
                keys[j--] = t;
            }
        }
        /* [0, j] >= pivot >= [i, n): recurse into the shorter side, loop on the longer */
        if (j + 1 < n - i) {
            sort_descending(keys, j + 1);
            keys += i;
            n -= i;
        } else {
            sort_descending(keys + i, n - i);
            n = j + 1;
        }
    }
    for (int64_t i = 1; i < n; ++i) {
        uint64_t key = keys[i];
        int64_t j = i;
        for (; j > 0 && keys[j - 1] < key; --j) keys[j] = keys[j - 1];
        keys[j] = key;
    }
}

/* The uint16 totals of one block's 32 candidates: even[i] is candidate 2i's, odd[i] candidate 2i + 1's. */
static inline void block_totals(const uint8_t *block, const uint8_t *luts, int64_t pairs, uint16_t *even,
                                uint16_t *odd) {
#ifdef __AVX512BW__
    /* luts: per two subspace pairs, 64 bytes for the low nibbles, then 64 for the high ones; each 128-bit lane
     * holds one subspace's 16 entries (lanes 0-1: pair p's subspace, lanes 2-3: pair p + 1's). */
    const __m512i nibble = _mm512_set1_epi8(0x0F), low_bytes = _mm512_set1_epi16(0x00FF);
    __m512i acc_even = _mm512_setzero_si512(), acc_odd = _mm512_setzero_si512();
    for (int64_t p = 0; p < pairs; p += 2) {
        __m512i codes = _mm512_loadu_si512((const void *)(block + p * BLOCK));
        __m512i lo = _mm512_and_si512(codes, nibble);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
        __m512i a = _mm512_shuffle_epi8(_mm512_loadu_si512((const void *)(luts + p * 64)), lo);
        __m512i b = _mm512_shuffle_epi8(_mm512_loadu_si512((const void *)(luts + p * 64 + 64)), hi);
        acc_even = _mm512_add_epi16(acc_even, _mm512_and_si512(a, low_bytes));
        acc_odd = _mm512_add_epi16(acc_odd, _mm512_srli_epi16(a, 8));
        acc_even = _mm512_add_epi16(acc_even, _mm512_and_si512(b, low_bytes));
        acc_odd = _mm512_add_epi16(acc_odd, _mm512_srli_epi16(b, 8));
    }
    __m256i e = _mm256_add_epi16(_mm512_castsi512_si256(acc_even), _mm512_extracti64x4_epi64(acc_even, 1));
    __m256i o = _mm256_add_epi16(_mm512_castsi512_si256(acc_odd), _mm512_extracti64x4_epi64(acc_odd, 1));
    _mm256_storeu_si256((__m256i *)even, e);
    _mm256_storeu_si256((__m256i *)odd, o);
#elif defined(__AVX2__)
    /* The same tables, 32 bytes (one subspace's 16 entries in both 128-bit lanes) per vpshufb. `all` sums each
     * looked-up pair of bytes as one uint16 (even candidate + 256 * odd one, modulo 2**16) and `odd` the odd
     * bytes alone: the even totals are all - 256 * odd, exact because they stay below 2**16. */
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i acc_all = _mm256_setzero_si256(), acc_odd = _mm256_setzero_si256();
    for (int64_t p = 0; p < pairs; p += 2) {
        const uint8_t *tables = luts + p * 64;
        __m256i first = _mm256_loadu_si256((const __m256i *)(block + p * BLOCK));
        __m256i second = _mm256_loadu_si256((const __m256i *)(block + (p + 1) * BLOCK));
        __m256i a = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)tables), _mm256_and_si256(first, nibble));
        __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(tables + 64)),
                                        _mm256_and_si256(_mm256_srli_epi16(first, 4), nibble));
        __m256i c = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(tables + 32)),
                                        _mm256_and_si256(second, nibble));
        __m256i e = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(tables + 96)),
                                        _mm256_and_si256(_mm256_srli_epi16(second, 4), nibble));
        acc_all = _mm256_add_epi16(_mm256_add_epi16(acc_all, _mm256_add_epi16(a, b)), _mm256_add_epi16(c, e));
        acc_odd = _mm256_add_epi16(acc_odd, _mm256_add_epi16(_mm256_add_epi16(_mm256_srli_epi16(a, 8),
                                                                              _mm256_srli_epi16(b, 8)),
                                                             _mm256_add_epi16(_mm256_srli_epi16(c, 8),
                                                                              _mm256_srli_epi16(e, 8))));
    }
    _mm256_storeu_si256((__m256i *)even, _mm256_sub_epi16(acc_all, _mm256_slli_epi16(acc_odd, 8)));
    _mm256_storeu_si256((__m256i *)odd, acc_odd);
#else
    for (int64_t i = 0; i < BLOCK / 2; ++i) even[i] = odd[i] = 0;
    for (int64_t p = 0; p < pairs; ++p) {
        /* the same table layout: pair p's low-nibble subspace sits in lane (p % 2) * 2 of group p / 2 */
        const uint8_t *lo_table = luts + (p / 2) * 128 + (p % 2) * 32;
        const uint8_t *hi_table = lo_table + 64;
        for (int64_t j = 0; j < BLOCK; ++j) {
            uint8_t code = block[p * BLOCK + j];
            uint16_t add = (uint16_t)(lo_table[code & 0x0F] + hi_table[code >> 4]);
            if (j % 2) odd[j / 2] += add;
            else even[j / 2] += add;
        }
    }
#endif
}

typedef struct {
    uint64_t *buf;
    uint32_t *histogram;
    int64_t filled, capacity, keep;
    int32_t threshold; /* a candidate must score strictly more to enter */
    int32_t top;       /* the highest score entered (so a cut needs no pass to find it) */
} candidate_buffer;

static inline void offer(candidate_buffer *c, int32_t score, int64_t position) {
    if (score <= c->threshold) return;
    if (c->filled == c->capacity) {
        c->threshold = cut_to_best(c->buf, c->filled, c->keep, c->top, c->threshold, c->histogram);
        c->filled = c->keep;
        if (score <= c->threshold) return;
    }
    c->top = score > c->top ? score : c->top;
    c->buf[c->filled++] = candidate_key(score, position);
}

static int excluded_row(const int64_t *excluded, int64_t width, int64_t row) {
    int64_t low = 0, high = width;
    while (low < high) {
        int64_t mid = low + (high - low) / 2;
        if (excluded[mid] < row) low = mid + 1;
        else high = mid;
    }
    return low < width && excluded[low] == row;
}

/* The `keep` best of `leaves` partitions for `query`, best first, into values / ids; returns how many. The
 * centroids are stored by groups of 32 partitions, each group by dimension ([groups, d, 32], zeros past the last
 * partition), so that 8 or 16 partitions are scored per FMA with no horizontal sum and the whole table is read
 * in order; every partition's score is the same sequence of FMAs over the dimensions in every build. `scores`
 * and `keys` are scratch space for groups * 32 floats and `leaves` keys, `bins` for LEAF_BINS counts. */
static int64_t best_leaves(const float *query, int64_t d, const float *blocks, int64_t leaves, float *scores,
                           uint64_t *keys, uint32_t *bins, int64_t keep, float *values, int64_t *ids) {
    int64_t groups = (leaves + LEAF_GROUP - 1) / LEAF_GROUP, l;
    for (int64_t g = 0; g < groups; ++g) {
        const float *block = blocks + g * d * LEAF_GROUP;
        float *out = scores + g * LEAF_GROUP;
#ifdef __AVX512F__
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t t = 0; t < d; ++t) {
            __m512 x = _mm512_set1_ps(query[t]);
            a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(block + t * LEAF_GROUP), a0);
            a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(block + t * LEAF_GROUP + 16), a1);
        }
        _mm512_storeu_ps(out, a0);
        _mm512_storeu_ps(out + 16, a1);
#elif defined(__AVX2__) && defined(__FMA__)
        /* four independent sums: one alone waits on each FMA's latency */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t t = 0; t < d; ++t) {
            __m256 x = _mm256_set1_ps(query[t]);
            const float *row = block + t * LEAF_GROUP;
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 8), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 16), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 24), a3);
        }
        _mm256_storeu_ps(out, a0);
        _mm256_storeu_ps(out + 8, a1);
        _mm256_storeu_ps(out + 16, a2);
        _mm256_storeu_ps(out + 24, a3);
#else
        for (int64_t j = 0; j < LEAF_GROUP; ++j) {
            float total = 0.0f;
            for (int64_t t = 0; t < d; ++t) total = fmaf(query[t], block[t * LEAF_GROUP + j], total);
            out[j] = total;
        }
#endif
    }
    /* The best `keep` as keys like the reorder's (equal scores: the lower partition first). A quickselect over
     * thousands of partitions mispredicts about every other comparison: a histogram of the scores over their
     * range first finds the bin the keep-th best falls in, and only the partitions from that bin up (a few more
     * than `keep`, found with vector compares) are selected among and sorted. */
    int64_t kept = keep < leaves ? keep : leaves, candidates = 0;
    float low = INFINITY, high = -INFINITY;
    int unordered = 0;
    l = 0;
#ifdef __AVX2__
    __m256 lows = _mm256_set1_ps(INFINITY), highs = _mm256_set1_ps(-INFINITY), nans = _mm256_setzero_ps();
    for (; l + 8 <= leaves; l += 8) {
        __m256 v = _mm256_loadu_ps(scores + l);
        lows = _mm256_min_ps(lows, v);
        highs = _mm256_max_ps(highs, v);
        nans = _mm256_or_ps(nans, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lane_lows[8], lane_highs[8];
    _mm256_storeu_ps(lane_lows, lows);
    _mm256_storeu_ps(lane_highs, highs);
    for (int j = 0; j < 8; ++j) {
        low = lane_lows[j] < low ? lane_lows[j] : low;
        high = lane_highs[j] > high ? lane_highs[j] : high;
    }
    unordered = _mm256_movemask_ps(nans) != 0;
#endif
    for (; l < leaves; ++l) {
        low = scores[l] < low ? scores[l] : low;
        high = scores[l] > high ? scores[l] : high;
        unordered |= scores[l] != scores[l];
    }
    float width = high - low;
    if (kept < leaves && !unordered && isfinite(width) && width > 0.0f) {
        /* bin = (score - low) * per_bin, truncated: the same float arithmetic in both passes */
        float per_bin = (float)(LEAF_BINS - 1) / width;
        memset(bins, 0, sizeof(uint32_t) * LEAF_BINS);
        for (l = 0; l < leaves; ++l) {
            int32_t bin = (int32_t)((scores[l] - low) * per_bin);
            ++bins[bin < LEAF_BINS - 1 ? bin : LEAF_BINS - 1];
        }
        int32_t bin = LEAF_BINS - 1;
        int64_t above = bins[bin];
        while (above < kept) above += bins[--bin];
        l = 0;
#ifdef __AVX2__
        const __m256 lowest = _mm256_set1_ps(low), scale = _mm256_set1_ps(per_bin);
        const __m256i below = _mm256_set1_epi32(bin - 1);
        for (; l + 8 <= leaves; l += 8) {
            __m256 shifted = _mm256_sub_ps(_mm256_loadu_ps(scores + l), lowest);
            __m256i bins8 = _mm256_cvttps_epi32(_mm256_mul_ps(shifted, scale));
            uint32_t over = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bins8, below)));
            while (over) {
                int64_t j = l + __builtin_ctz(over);
                over &= over - 1;
                keys[candidates++] = scored_key(scores[j], j);
            }
        }
#endif
        for (; l < leaves; ++l) {
            if ((int32_t)((scores[l] - low) * per_bin) >= bin) keys[candidates++] = scored_key(scores[l], l);
        }
    } else {
        for (l = 0; l < leaves; ++l) keys[l] = scored_key(scores[l], l);
        candidates = leaves;
    }
    if (kept < candidates) keep_best(keys, candidates, kept);
    sort_descending(keys, kept);
    for (l = 0; l < kept; ++l) {
        values[l] = scored_key_score(keys[l]);
        ids[l] = scored_key_position(keys[l]);
    }
    return kept;
}

/* The built index, as the Python side lays it out once per index (one pointer per call instead of ten
 * arguments): centroid_blocks [ceil(leaves / 32), d, 32] (best_leaves); leaf_offsets [leaves + 1] positions
 * in partition order; leaf_blocks [leaves] the first block of each partition; codes [blocks, subspaces / 2, 32];
 * codebooks [subspaces, 16, sub_dim]; vectors [n, d] in partition order; rows [n] the original row of each
 * position. d is a multiple of 4 * sub_dim (zero padded). ids [n] the integer id of each original row (NULL for
 * string ids); query_d the queries' own dimension (at most d) for twotower_ivf_search_one, which pads them
 * itself. */
typedef struct {
    const float *centroid_blocks;
    const int64_t *leaf_offsets;
    const int64_t *leaf_blocks;
    const uint8_t *codes;
    const float *codebooks;
    const float *vectors;
    const int64_t *rows;
    const int64_t *ids;
    int64_t leaves, subspaces, sub_dim, d, query_d;
} ivf_index;

/* Each thread's working memory, kept between calls and grown when a call needs more: a one-query search
 * allocates nothing. It is held until the process ends: at most about `reorder` * 64 bytes and the partition
 * scores per thread. */
typedef struct {
    float *leaf_scores, *leaf_values, *query;
    uint64_t *leaf_keys;
    int64_t *leaf_ids;
    uint8_t *luts;
    uint64_t *buf;
    uint32_t *histogram;
    size_t leaf_scores_size, leaf_keys_size, leaf_values_size, query_size, leaf_ids_size, luts_size, buf_size,
        histogram_size;
} workspace;

static __thread workspace thread_workspace;

/* Make *p hold at least `size` bytes (its contents need not survive); 0 when memory runs out. */
static int reserve(void **p, size_t *capacity, size_t size) {
    if (*capacity >= size && *p != NULL) return 1;
    free(*p);
    *p = malloc(size ? size : 1);
    *capacity = *p != NULL ? size : 0;
    return *p != NULL;
}

/* A full candidate buffer is cut to `reorder`: the larger it is, the fewer the cuts (each costs O(capacity)). */
static int64_t buffer_capacity(int64_t reorder) { return 8 * reorder + BLOCK; }

/* Make `w` large enough for one search of `index` with these settings; 0 when memory runs out. */
static int reserve_workspace(workspace *w, const ivf_index *index, int64_t leaves_to_search, int64_t reorder) {
    size_t groups = (size_t)((index->leaves + LEAF_GROUP - 1) / LEAF_GROUP);
    return reserve((void **)&w->leaf_scores, &w->leaf_scores_size, sizeof(float) * LEAF_GROUP * groups) &&
           reserve((void **)&w->leaf_keys, &w->leaf_keys_size, sizeof(uint64_t) * index->leaves) &&
           reserve((void **)&w->leaf_values, &w->leaf_values_size, sizeof(float) * leaves_to_search) &&
           reserve((void **)&w->query, &w->query_size, sizeof(float) * index->d) &&
           reserve((void **)&w->leaf_ids, &w->leaf_ids_size, sizeof(int64_t) * leaves_to_search) &&
           reserve((void **)&w->luts, &w->luts_size, (size_t)(index->subspaces / 4) * 128) &&
           reserve((void **)&w->buf, &w->buf_size, sizeof(uint64_t) * buffer_capacity(reorder)) &&
           reserve((void **)&w->histogram, &w->histogram_size, sizeof(uint32_t) * HISTOGRAM);
}

static void search_one(const ivf_index *index, workspace *w, const float *query, int64_t leaves_to_search,
                       int64_t reorder, int64_t k, const int64_t *excluded,
                       int64_t excluded_width, float *out_scores, int64_t *out_rows) {
    const int64_t d = index->d, leaves = index->leaves, subspaces = index->subspaces, sub_dim = index->sub_dim;
    const int64_t *leaf_offsets = index->leaf_offsets, *leaf_blocks = index->leaf_blocks, *rows = index->rows;
    const uint8_t *codes = index->codes;
    const float *codebooks = index->codebooks, *vectors = index->vectors;
    float *leaf_values = w->leaf_values;
    int64_t *leaf_ids = w->leaf_ids;
    uint8_t *luts = w->luts;
    int64_t pairs = subspaces / 2;
    /* 1. the best partitions, best first */
    int64_t kept_leaves = best_leaves(query, d, index->centroid_blocks, leaves, w->leaf_scores, w->leaf_keys,
                                      w->histogram, leaves_to_search,
                                      leaf_values, leaf_ids);

    /* 2. the lookup tables and their common scale */
    float lut[256 * 16];
    float widest = 0.0f; /* each table's minimum is dropped: it adds the same to every candidate */
    for (int64_t m = 0; m < subspaces; ++m) {
        float low = INFINITY, high = -INFINITY;
        for (int64_t c = 0; c < 16; ++c) {
            float v = 0.0f;
            for (int64_t t = 0; t < sub_dim; ++t) v += query[m * sub_dim + t] * codebooks[(m * 16 + c) * sub_dim + t];
            lut[m * 16 + c] = v;
            low = v < low ? v : low;
            high = v > high ? v : high;
        }
        for (int64_t c = 0; c < 16; ++c) lut[m * 16 + c] -= low;
        widest = high - low > widest ? high - low : widest;
    }
    /* A zero query (or codebook) has nothing to quantize: any positive scale gives all-zero tables. */
    float scale = widest > 0.0f ? widest / 255.0f : 1.0f;
    int32_t max_total = 0;
    for (int64_t m = 0; m < subspaces; ++m) {
        /* pair m / 2 of group m / 4: low nibble for even m, high for odd; lanes 0-1 for the group's first pair */
        int64_t group = m / 4, pair_in_group = (m / 2) % 2, high_nibble = m % 2;
        uint8_t *table = luts + group * 128 + high_nibble * 64 + pair_in_group * 32;
        int32_t top = 0;
        for (int64_t c = 0; c < 16; ++c) {
            int32_t q = (int32_t)lrintf(lut[m * 16 + c] / scale);
            q = q < 0 ? 0 : (q > 255 ? 255 : q);
            table[c] = table[16 + c] = (uint8_t)q;
            top = q > top ? q : top;
        }
        max_total += top;
    }

    /* 3. the scan */
    candidate_buffer cands = {w->buf, w->histogram, 0, buffer_capacity(reorder), reorder, INT32_MIN, INT32_MIN};
    float best_base = kept_leaves ? leaf_values[0] : 0.0f;
    uint16_t even[BLOCK / 2], odd[BLOCK / 2];
    for (int64_t i = 0; i < kept_leaves; ++i) {
        int64_t l = leaf_ids[i];
        /* the partition's base in table units, relative to the best partition's (so never positive) */
        double relative = ((double)leaf_values[i] - (double)best_base) / (double)scale;
        int32_t base = relative < -1e9 ? -1000000000 : (int32_t)lrint(relative);
        int64_t first = leaf_offsets[l], count = leaf_offsets[l + 1] - first;
        if (i + 1 < kept_leaves) { /* the next partition's first blocks, while this one is scanned */
            const char *next = (const char *)(codes + leaf_blocks[leaf_ids[i + 1]] * pairs * BLOCK);
            for (int64_t byte = 0; byte < 4 * pairs * BLOCK; byte += 64) __builtin_prefetch(next + byte);
        }
        /* Every candidate of this partition, and of every later one (their bases are no higher), scores at
         * most base + max_total: once that cannot beat the threshold the scan is over. */
        if ((int64_t)base + max_total <= (int64_t)cands.threshold) break;
        for (int64_t b = 0; b * BLOCK < count; ++b) {
            const uint8_t *block = codes + (leaf_blocks[l] + b) * pairs * BLOCK;
            for (int64_t byte = 0; byte < pairs * BLOCK; byte += 64) __builtin_prefetch(block + 4 * pairs * BLOCK + byte);
            block_totals(block, luts, pairs, even, odd);
            int64_t in_block = count - b * BLOCK < BLOCK ? count - b * BLOCK : BLOCK;
            /* bit j: candidate j of the block may enter (its total exceeds threshold - base) */
            uint32_t valid = in_block == BLOCK ? 0xFFFFFFFFu : (1u << in_block) - 1u;
            uint32_t over = valid;
            /* totals stay below 2**16: a larger need (the threshold rose within the partition) admits none */
            int64_t need = (int64_t)cands.threshold - base;
            need = need > 0xFFFF ? 0xFFFF : need;
            if (need >= 0) {
#ifdef __AVX512BW__
                __m256i bound = _mm256_set1_epi16((short)(uint16_t)need);
                uint32_t over_even = _mm256_cmpgt_epu16_mask(_mm256_loadu_si256((const __m256i *)even), bound);
                uint32_t over_odd = _mm256_cmpgt_epu16_mask(_mm256_loadu_si256((const __m256i *)odd), bound);
                over = (_pdep_u32(over_even, 0x55555555u) | _pdep_u32(over_odd, 0xAAAAAAAAu)) & valid;
#elif defined(__AVX2__)
                /* unsigned 16-bit compare as a signed one on values with the top bit flipped; the byte mask has
                 * two bits per total: bit 2i of the even totals' mask is candidate 2i, bit 2i + 1 of the odd
                 * totals' mask candidate 2i + 1 (no pdep, which is slow on some AMD CPUs) */
                const __m256i flip = _mm256_set1_epi16((short)0x8000);
                __m256i bound = _mm256_set1_epi16((short)(uint16_t)(need ^ 0x8000));
                __m256i e = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)even), flip);
                __m256i o = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)odd), flip);
                uint32_t over_even = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi16(e, bound));
                uint32_t over_odd = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi16(o, bound));
                over = ((over_even & 0x55555555u) | (over_odd & 0xAAAAAAAAu)) & valid;
#else
                over = 0;
                for (int64_t j = 0; j < in_block; ++j)
                    if ((int64_t)(j % 2 ? odd[j / 2] : even[j / 2]) > need) over |= 1u << j;
#endif
            }
            while (over) {
                int j = __builtin_ctz(over);
                over &= over - 1;
                offer(&cands, base + (int32_t)(j % 2 ? odd[j / 2] : even[j / 2]), first + b * BLOCK + j);
            }
        }
    }
    if (cands.filled > reorder) {
        cut_to_best(cands.buf, cands.filled, reorder, cands.top, cands.threshold, cands.histogram);
        cands.filled = reorder;
    }

    /* 4. the exact reorder. The candidates lie at random places among the scanned partitions' vectors and each
     * read misses the cache: vectors are requested AHEAD candidates before they are scored, so that the misses
     * overlap. The corpus rows (another random read each) are looked up for the k kept only (and for every
     * candidate when some are excluded). */
    for (int64_t i = 0; i < cands.filled && i < AHEAD; ++i) {
        const char *vector = (const char *)(vectors + (int64_t)(uint32_t)cands.buf[i] * d);
        for (int64_t byte = 0; byte < d * (int64_t)sizeof(float); byte += 64) __builtin_prefetch(vector + byte);
    }
    /* Each rescored candidate becomes one scored_key (equal scores: the earlier position first, as in the scan),
     * written over the buffer it is read from; the k largest are then selected and sorted, with no branch per
     * candidate on a heap. */
    int64_t filled = 0;
    for (int64_t i = 0; i < cands.filled; ++i) {
        if (i + AHEAD < cands.filled) {
            const char *vector = (const char *)(vectors + (int64_t)(uint32_t)cands.buf[i + AHEAD] * d);
            for (int64_t byte = 0; byte < d * (int64_t)sizeof(float); byte += 64) __builtin_prefetch(vector + byte);
        }
        int64_t position = (int64_t)(uint32_t)cands.buf[i];
        float s = dot(query, vectors + position * d, d);
        if (excluded != NULL && excluded_row(excluded, excluded_width, rows[position])) continue;
        cands.buf[filled++] = scored_key(s, position);
    }
    if (filled > k) {
        keep_best(cands.buf, filled, k);
        filled = k;
    }
    sort_descending(cands.buf, filled);
    for (int64_t i = 0; i < filled; ++i) {
        out_scores[i] = scored_key_score(cands.buf[i]);
        out_rows[i] = scored_key_position(cands.buf[i]);
    }
    /* positions to rows; a run of equal scores is put in row order (insertion sort: such runs are short) */
    for (int64_t i = 0; i < filled; ++i) {
        float s = out_scores[i];
        int64_t row = rows[out_rows[i]], j = i;
        for (; j > 0 && out_scores[j - 1] == s && out_rows[j - 1] > row; --j) out_rows[j] = out_rows[j - 1];
        out_rows[j] = row;
    }
    for (int64_t i = filled; i < k; ++i) {
        out_scores[i] = -INFINITY;
        out_rows[i] = -1;
    }
}

/* queries: [nq, d]; excluded: [nq, excluded_width] original rows sorted ascending (INT64_MAX pads) or NULL;
 * 1 <= k <= reorder <= the corpus size (the Python side's _reorder_depth, excluded rows counted in). Writes
 * out_scores / out_rows [nq, k]: -inf / -1 where fewer than k were found. Returns 0, or 1 when the working
 * memory could not be allocated (the outputs are then not filled). */
int twotower_ivf_search(const ivf_index *index, const float *queries, int64_t nq, int64_t leaves_to_search,
                        int64_t reorder, int64_t k, const int64_t *excluded, int64_t excluded_width,
                        float *out_scores, int64_t *out_rows, int64_t threads) {
    int64_t d = index->d;
    if (leaves_to_search > index->leaves) leaves_to_search = index->leaves;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (nq > 1)
    {
        workspace *w = &thread_workspace;
        int ok = reserve_workspace(w, index, leaves_to_search, reorder);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t q = 0; q < nq; ++q) {
            if (!ok) continue;
            search_one(index, w, queries + q * d, leaves_to_search, reorder, k,
                       excluded ? excluded + q * excluded_width : NULL, excluded_width, out_scores + q * k,
                       out_rows + q * k);
        }
    }
    return failed;
}

/* One query, as a server sends it (`query_d` floats, padded here; no threads, no exclusions), the whole path
 * from the query's check to its ids in one call (each call from Python costs microseconds). As for
 * twotower_ivf_search, 1 <= k <= reorder <= the corpus size. Writes out_scores / out_rows [k] as
 * twotower_ivf_search does and, with integer ids, out_ids[i] = ids[out_rows[i]] (-1 for an empty slot).
 * Returns 0; 1 when the working memory could not be allocated; 2 when the query holds a non-finite value
 * (nothing is written: the caller raises). */
int twotower_ivf_search_one(const ivf_index *index, const float *query, int64_t leaves_to_search, int64_t reorder,
                            int64_t k, float *out_scores, int64_t *out_ids, int64_t *out_rows) {
    for (int64_t t = 0; t < index->query_d; ++t)
        if (!isfinite(query[t])) return 2;
    if (leaves_to_search > index->leaves) leaves_to_search = index->leaves;
    workspace *w = &thread_workspace;
    if (!reserve_workspace(w, index, leaves_to_search, reorder)) return 1;
    memcpy(w->query, query, sizeof(float) * index->query_d);
    memset(w->query + index->query_d, 0, sizeof(float) * (index->d - index->query_d));
    search_one(index, w, w->query, leaves_to_search, reorder, k, NULL, 0, out_scores, out_rows);
    if (index->ids != NULL)
        for (int64_t i = 0; i < k; ++i) out_ids[i] = out_rows[i] < 0 ? -1 : index->ids[out_rows[i]];
    return 0;
}
