/* The search of twotower's AnisotropicIVF index: partitions, 4-bit product-quantized residuals scanned with
 * 16-entry lookup tables, and an exact float32 reorder (the scheme of ScaNN's tree + asymmetric hashing).
 *
 * Per query:
 *  1. score every partition centroid, keep the best `leaves_to_search` (a heap, then sorted best first, so the
 *     candidate threshold rises quickly);
 *  2. build one lookup table per subspace, lut[m][c] = query_m . codebook[m][c], shared by every partition (the
 *     codes quantize residuals, x = centroid + residual, so a candidate's approximate score is
 *     query . centroid + sum_m lut[m][code_m]); quantize the tables to uint8 with one scale for all subspaces;
 *  3. scan the codes of the kept partitions 32 candidates at a time (AVX-512BW: one vpshufb looks up 64 codes),
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
static int32_t cut_to_best(uint64_t *buf, int64_t n, int64_t keep, uint32_t *histogram) {
    int32_t top = INT32_MIN;
    for (int64_t i = 0; i < n; ++i) {
        int32_t score = key_score(buf[i]);
        top = score > top ? score : top;
    }
    memset(histogram, 0, sizeof(uint32_t) * HISTOGRAM);
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
        int take = score > lowest || (score == lowest && ties > 0);
        ties -= take & (score == lowest);
        buf[kept] = key;
        kept += take;
    }
    return lowest;
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
} candidate_buffer;

static inline void offer(candidate_buffer *c, int32_t score, int64_t position) {
    if (score <= c->threshold) return;
    if (c->filled == c->capacity) {
        c->threshold = cut_to_best(c->buf, c->filled, c->keep, c->histogram);
        c->filled = c->keep;
        if (score <= c->threshold) return;
    }
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
 * centroids are stored by dimension ([d, leaves]) so that 16 partitions are scored per FMA, with no horizontal
 * sum; `scores` is scratch space for `leaves` floats. */
static int64_t best_leaves(const float *query, int64_t d, const float *columns, int64_t leaves, float *scores,
                           int64_t keep, float *values, int64_t *ids) {
    int64_t l = 0;
#ifdef __AVX512F__
    for (; l + 16 <= leaves; l += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t t = 0; t < d; ++t)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(query[t]), _mm512_loadu_ps(columns + t * leaves + l), acc);
        _mm512_storeu_ps(scores + l, acc);
    }
#endif
    for (; l < leaves; ++l) {
        float total = 0.0f;
        for (int64_t t = 0; t < d; ++t) total = fmaf(query[t], columns[t * leaves + l], total);
        scores[l] = total;
    }
    int64_t kept = 0;
    float worst = -INFINITY;
    for (l = 0; l < leaves; ++l) {
        if (kept < keep || scores[l] > worst) worst = push(values, ids, &kept, keep, scores[l], l);
    }
    heap_sort(values, ids, kept);
    return kept;
}

/* The built index, as the Python side lays it out once per index (one pointer per call instead of ten
 * arguments): centroid_columns [d, leaves]; leaf_offsets [leaves + 1] positions in partition order; leaf_blocks
 * [leaves] the first block of each partition; codes [blocks, subspaces / 2, 32]; codebooks [subspaces, 16,
 * sub_dim]; vectors [n, d] in partition order; rows [n] the original row of each position. d is a multiple of
 * 4 * sub_dim (zero padded). */
typedef struct {
    const float *centroid_columns;
    const int64_t *leaf_offsets;
    const int64_t *leaf_blocks;
    const uint8_t *codes;
    const float *codebooks;
    const float *vectors;
    const int64_t *rows;
    int64_t leaves, subspaces, sub_dim, d;
} ivf_index;

/* Each thread's working memory, kept between calls and grown when a call needs more: a one-query search
 * allocates nothing. It is held until the process ends: at most about `reorder` * 64 bytes and the partition
 * scores per thread. */
typedef struct {
    float *leaf_scores, *leaf_values;
    int64_t *leaf_ids;
    uint8_t *luts;
    uint64_t *buf;
    uint32_t *histogram;
    size_t leaf_scores_size, leaf_values_size, leaf_ids_size, luts_size, buf_size, histogram_size;
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

static void search_one(const ivf_index *index, workspace *w, const float *query, int64_t leaves_to_search,
                       int64_t reorder, int64_t capacity, int64_t k, const int64_t *excluded,
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
    int64_t kept_leaves = best_leaves(query, d, index->centroid_columns, leaves, w->leaf_scores, leaves_to_search,
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
    candidate_buffer cands = {w->buf, w->histogram, 0, capacity, reorder, INT32_MIN};
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
            int64_t need = (int64_t)cands.threshold - base;
            if (need >= 0) {
#ifdef __AVX512BW__
                __m256i bound = _mm256_set1_epi16((short)(uint16_t)need);
                uint32_t over_even = _mm256_cmpgt_epu16_mask(_mm256_loadu_si256((const __m256i *)even), bound);
                uint32_t over_odd = _mm256_cmpgt_epu16_mask(_mm256_loadu_si256((const __m256i *)odd), bound);
                over = (_pdep_u32(over_even, 0x55555555u) | _pdep_u32(over_odd, 0xAAAAAAAAu)) & valid;
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
        cut_to_best(cands.buf, cands.filled, reorder, cands.histogram);
        cands.filled = reorder;
    }

    /* 4. the exact reorder. The candidates lie at random places among the scanned partitions' vectors and each
     * read misses the cache: vectors are requested AHEAD candidates before they are scored, so that the misses
     * overlap. The heap orders by (score, position); the corpus rows (another random read each) are looked up
     * for the k kept only (and for every candidate when some are excluded). */
    int64_t filled = 0;
    float threshold = -INFINITY;
    for (int64_t i = 0; i < cands.filled && i < AHEAD; ++i) {
        const char *vector = (const char *)(vectors + (int64_t)(uint32_t)cands.buf[i] * d);
        for (int64_t byte = 0; byte < d * (int64_t)sizeof(float); byte += 64) __builtin_prefetch(vector + byte);
    }
    for (int64_t i = 0; i < cands.filled; ++i) {
        if (i + AHEAD < cands.filled) {
            const char *vector = (const char *)(vectors + (int64_t)(uint32_t)cands.buf[i + AHEAD] * d);
            for (int64_t byte = 0; byte < d * (int64_t)sizeof(float); byte += 64) __builtin_prefetch(vector + byte);
        }
        int64_t position = (int64_t)(uint32_t)cands.buf[i];
        float s = dot(query, vectors + position * d, d);
        if (filled == k && !(s > threshold || (s == threshold && position < out_rows[0]))) continue;
        if (excluded != NULL && excluded_row(excluded, excluded_width, rows[position])) continue;
        threshold = push(out_scores, out_rows, &filled, k, s, position);
    }
    heap_sort(out_scores, out_rows, filled);
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

/* queries: [nq, d]; excluded: [nq, excluded_width] original rows sorted ascending (INT64_MAX pads) or NULL.
 * Writes out_scores / out_rows [nq, k]: -inf / -1 where fewer than k were found. Returns 0, or 1 when the
 * working memory could not be allocated (the outputs are then not filled). */
int twotower_ivf_search(const ivf_index *index, const float *queries, int64_t nq, int64_t leaves_to_search,
                        int64_t reorder, int64_t k, const int64_t *excluded, int64_t excluded_width,
                        float *out_scores, int64_t *out_rows, int64_t threads) {
    int64_t leaves = index->leaves, subspaces = index->subspaces, d = index->d;
    if (leaves_to_search > leaves) leaves_to_search = leaves;
    /* a full buffer is cut to `reorder`: the larger it is, the fewer the cuts (each costs O(capacity)) */
    int64_t capacity = 8 * reorder + BLOCK;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (nq > 1)
    {
        workspace *w = &thread_workspace;
        int ok = reserve((void **)&w->leaf_scores, &w->leaf_scores_size, sizeof(float) * leaves) &&
                 reserve((void **)&w->leaf_values, &w->leaf_values_size, sizeof(float) * leaves_to_search) &&
                 reserve((void **)&w->leaf_ids, &w->leaf_ids_size, sizeof(int64_t) * leaves_to_search) &&
                 reserve((void **)&w->luts, &w->luts_size, (size_t)(subspaces / 4) * 128) &&
                 reserve((void **)&w->buf, &w->buf_size, sizeof(uint64_t) * capacity) &&
                 reserve((void **)&w->histogram, &w->histogram_size, sizeof(uint32_t) * HISTOGRAM);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t q = 0; q < nq; ++q) {
            if (!ok) continue;
            search_one(index, w, queries + q * d, leaves_to_search, reorder, capacity, k,
                       excluded ? excluded + q * excluded_width : NULL, excluded_width, out_scores + q * k,
                       out_rows + q * k);
        }
    }
    return failed;
}
