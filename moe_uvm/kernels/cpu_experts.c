/* MoE experts on the CPU, reading bf16 or e4m3 weights where they lie (host memory, or managed
 * pages advised to the host) for the CPU/GPU hybrid (cpu_experts.py builds and calls this).
 *
 * One call computes, for m experts and the token rows routed to each (CSR: pair_offsets),
 *   out[t] += w_p * w2[e][:, :c] @ (silu(w1[e][:c] @ x_t) * (w3[e][:c] @ x_t))
 * in fp32, c the expert's leading intermediate columns (all of them, or the CPU's part of an
 * expert the hybrid splits with the GPU), with one OpenMP region of two phases: gate/up over
 * every (expert, row of w13), then down over output columns h, experts in the given order, so
 * out's bits do not depend on the thread count. Each weight row is widened once into a
 * per-thread fp32 buffer (L1-resident) and dotted with every token routed to its expert:
 * weights stream from DRAM once per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

enum { W_BF16 = 0, W_E4M3 = 1 };
enum { SCALE_NONE = 0, SCALE_CHANNEL = 1, SCALE_BLOCK = 2 };

/* e4m3 -> fp32 in SIMD-friendly ops, exact for finite codes (the two NaN codes read as +-480,
 * which no quantised weight holds). Normal codes: the 7 exponent-and-mantissa bits shifted into
 * fp32's fields, the bias difference (120) added to the exponent. Subnormal codes (exponent 0):
 * m * 2^-9 from the integer m. No fp32 subnormal is ever formed: Intel cores take a microcode
 * assist on each (an earlier version built them: 1-2 GB/s on the H200 host's Xeon, where bf16
 * ran at 51 GB/s). */
static inline float e4m3_value(uint8_t code) {
    uint32_t sign = (uint32_t)(code & 0x80) << 24;
    uint32_t normal_bits = (((uint32_t)(code & 0x7f) << 20) + (120u << 23)) | sign;
    float subnormal = (float)(code & 7) * 0x1p-9f;
    uint32_t subnormal_bits;
    memcpy(&subnormal_bits, &subnormal, sizeof subnormal_bits);
    /* a select in integer ops (no branch: the loop stays vectorised) */
    uint32_t is_normal = 0u - (uint32_t)((code & 0x78) != 0);
    uint32_t bits = (normal_bits & is_normal) | ((subnormal_bits | sign) & ~is_normal);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float bf16_value(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef struct {
    const void *base;      /* expert 0's matrix */
    int64_t expert_stride; /* elements between experts */
    int kind;              /* W_BF16 or W_E4M3 */
    const float *scale;    /* e4m3 only: the layouts of kernels/fp8.py */
    int scale_kind;
    int64_t scale_stride_e, scale_stride_r; /* block: [E, row blocks, col blocks] */
    int block_n, block_k, halves;            /* halves: 2 for w13 (w1's blocks, then w3's) */
} Matrix;

/* The first `count` elements of row `row` of expert e's matrix (cols wide), widened (and
 * scaled) into wf. */
static void widen_row(const Matrix *m, int64_t e, int64_t row, int64_t rows, int64_t cols,
                      int64_t count, float *wf) {
    if (m->kind == W_BF16) {
        const uint16_t *w = (const uint16_t *)m->base + e * m->expert_stride + row * cols;
        for (int64_t k = 0; k < count; k++) wf[k] = bf16_value(w[k]);
        return;
    }
    const uint8_t *w = (const uint8_t *)m->base + e * m->expert_stride + row * cols;
    if (m->scale_kind == SCALE_CHANNEL) {
        float s = m->scale[e * m->scale_stride_e + row];
        for (int64_t k = 0; k < count; k++) wf[k] = e4m3_value(w[k]) * s;
        return;
    }
    int64_t half_rows = rows / m->halves;
    int64_t per_half = (half_rows + m->block_n - 1) / m->block_n;
    int64_t block_row = (row / half_rows) * per_half + (row % half_rows) / m->block_n;
    const float *s = m->scale + e * m->scale_stride_e + block_row * m->scale_stride_r;
    for (int64_t k0 = 0; k0 < count; k0 += m->block_k) {
        int64_t k1 = k0 + m->block_k < count ? k0 + m->block_k : count;
        float sk = s[k0 / m->block_k];
        for (int64_t k = k0; k < k1; k++) wf[k] = e4m3_value(w[k]) * sk;
    }
}

/* Dots of one row `a` with nb <= 4 token vectors at once, so each load of the row feeds nb
 * FMAs. 32 lanes of partial sums per token (independent FMA chains), then the tail, then the
 * lanes in order: a token's dot has the same bits whichever group it is computed in. */
#define DOT_GROUP(NB)                                                                    \
    for (int64_t i = 0; i < full; i += 32) {                                             \
        for (int t = 0; t < NB; t++) {                                                   \
            _Pragma("omp simd") for (int l = 0; l < 32; l++) lanes[t][l] +=              \
                a[i + l] * b[t][i + l];                                                  \
        }                                                                                \
    }

static void dot_group(const float *a, const float *const *b, int nb, int64_t n, float *out) {
    float lanes[4][32];
    memset(lanes, 0, sizeof lanes);
    int64_t full = n / 32 * 32;
    switch (nb) {
    case 4: DOT_GROUP(4) break;
    case 3: DOT_GROUP(3) break;
    case 2: DOT_GROUP(2) break;
    default: DOT_GROUP(1) break;
    }
    for (int t = 0; t < nb; t++) {
        float s = 0.0f;
        for (int64_t k = full; k < n; k++) s += a[k] * b[t][k];
        for (int l = 0; l < 32; l++) s += lanes[t][l];
        out[t] = s;
    }
}

/* The ABI version (cpu_experts.py checks it after loading). */
int moe_uvm_cpu_experts_init(void) { return 5; }

/* Reads one byte of every `page` bytes of `count` ranges (starts[i], nbytes[i] bytes) on
 * `threads` threads and returns their sum (so the reads are not optimised away): the CPU's
 * first touch of managed pages, each a fault that maps the page for the CPU (or brings it
 * back to host memory), done once up front rather than inside decode steps. */
int64_t moe_uvm_touch_pages(const uint64_t *starts, const int64_t *nbytes, int64_t count,
                            int64_t page, int threads) {
    int64_t sum = 0;
#ifdef _OPENMP
    if (threads < 1) threads = omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sum) num_threads(threads)
#endif
    for (int64_t i = 0; i < count; i++) {
        const volatile uint8_t *base = (const volatile uint8_t *)(uintptr_t)starts[i];
        for (int64_t off = 0; off < nbytes[i]; off += page) sum += base[off];
    }
    return sum;
}

/* x [T, H] fp32; experts [m]; pair_offsets [m + 1]; pair_tokens, pair_weights [P] (pairs of
 * expert j: pair_offsets[j] .. pair_offsets[j + 1]); gate_up scratch [P, 2I] fp32; out [T, H]
 * fp32, accumulated into; expert_cols [m]: the leading intermediate columns computed of each
 * expert (1..I), or NULL for all. Returns 0, or -1 when buffers cannot be allocated. */
int moe_uvm_cpu_experts(const float *x, int64_t hidden, int64_t intermediate, int64_t m,
                        const int64_t *experts, const int64_t *pair_offsets,
                        const int64_t *pair_tokens, const float *pair_weights,
                        const void *w13, int64_t w13_stride, const void *w2, int64_t w2_stride,
                        int kind, const float *w13_scale, const float *w2_scale,
                        int scale_kind, const int64_t *scale_strides, int block_n, int block_k,
                        float *gate_up, float *out, int threads, const int64_t *expert_cols) {
    Matrix m13 = {w13, w13_stride, kind, w13_scale, scale_kind, scale_strides[0],
                  scale_strides[1], block_n, block_k, 2};
    Matrix m2 = {w2, w2_stride, kind, w2_scale, scale_kind, scale_strides[2], scale_strides[3],
                 block_n, block_k, 1};
    int64_t two_i = 2 * intermediate;
    /* expert j's gate/up rows: [0, c_j) of w1 and of w3, at row_start[j] .. row_start[j + 1]
     * of the flat list the threads share */
    int64_t *row_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(m + 1));
    if (row_start == NULL) return -1;
    row_start[0] = 0;
    for (int64_t j = 0; j < m; j++)
        row_start[j + 1] = row_start[j] + 2 * (expert_cols ? expert_cols[j] : intermediate);
    int64_t gate_up_rows = row_start[m];
    int64_t width = hidden > intermediate ? hidden : intermediate;
    int failed = 0;
#ifdef _OPENMP
    if (threads < 1) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#endif
    {
        float *wf = (float *)malloc(sizeof(float) * (size_t)width);
        if (wf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            int64_t j = 0; /* static schedule: each thread's rows ascend, and so does j */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < gate_up_rows; r++) {
                while (r >= row_start[j + 1]) j++;
                int64_t c = (row_start[j + 1] - row_start[j]) / 2, q = r - row_start[j];
                int64_t row = q < c ? q : intermediate + (q - c);
                widen_row(&m13, experts[j], row, two_i, hidden, hidden, wf);
                for (int64_t p = pair_offsets[j]; p < pair_offsets[j + 1]; p += 4) {
                    int nb = pair_offsets[j + 1] - p < 4 ? (int)(pair_offsets[j + 1] - p) : 4;
                    const float *xs[4];
                    float y[4];
                    for (int t = 0; t < nb; t++) xs[t] = x + pair_tokens[p + t] * hidden;
                    dot_group(wf, xs, nb, hidden, y);
                    for (int t = 0; t < nb; t++) gate_up[(p + t) * two_i + row] = y[t];
                }
            }
            /* silu(gate) * up, in place over the gate half of each pair's row */
#pragma omp for schedule(static)
            for (int64_t jj = 0; jj < m; jj++) {
                int64_t c = (row_start[jj + 1] - row_start[jj]) / 2;
                for (int64_t p = pair_offsets[jj]; p < pair_offsets[jj + 1]; p++) {
                    float *g = gate_up + p * two_i;
                    for (int64_t i = 0; i < c; i++)
                        g[i] = g[i] / (1.0f + expf(-g[i])) * g[intermediate + i];
                }
            }
            /* Each thread owns a range of output columns h and walks the experts one after
             * the other over it: one contiguous stream of w2 at a time (the prefetchers lose
             * track of dozens of interleaved ones), and each out[t, h] still sums the
             * experts in the given order. */
            int thread = 0, team = 1;
#ifdef _OPENMP
            thread = omp_get_thread_num();
            team = omp_get_num_threads();
#endif
            int64_t h0 = hidden * thread / team, h1 = hidden * (thread + 1) / team;
            for (int64_t jj = 0; jj < m; jj++) {
                int64_t c = (row_start[jj + 1] - row_start[jj]) / 2;
                for (int64_t h = h0; h < h1; h++) {
                    widen_row(&m2, experts[jj], h, hidden, intermediate, c, wf);
                    for (int64_t p = pair_offsets[jj]; p < pair_offsets[jj + 1]; p += 4) {
                        int nb = pair_offsets[jj + 1] - p < 4 ? (int)(pair_offsets[jj + 1] - p)
                                                              : 4;
                        const float *acts[4];
                        float y[4];
                        for (int t = 0; t < nb; t++) acts[t] = gate_up + (p + t) * two_i;
                        dot_group(wf, acts, nb, c, y);
                        for (int t = 0; t < nb; t++)
                            out[pair_tokens[p + t] * hidden + h] += pair_weights[p + t] * y[t];
                    }
                }
            }
        }
        free(wf);
    }
    free(row_start);
    return failed ? -1 : 0;
}

/* ---- The hybrid's host function (moe_uvm/hybrid.py) ----
 * `moe_uvm_hybrid_compute` runs as a CUDA host node (cuLaunchHostFunc: in stream order, inside
 * a captured CUDA graph as well) on the driver's callback thread, so it takes everything from
 * one state struct and calls no CUDA API. When it runs, the GPU has written the layer's routing
 * and token rows into pinned buffers and its split kernel (kernels/hybrid_split.py) has written
 * the CPU's columns of each expert in `cols`; this groups the CPU's pairs by expert and
 * computes them into `out` (fp32, which the GPU then adds to its output), beside the GPU's
 * kernel. The struct's
 * layout is mirrored by hybrid.py's _State (checked through moe_uvm_hybrid_state_size). */
#include <time.h>

#define HYBRID_RING 256
/* A step that gives the CPU nothing moves its per-expert estimate this fraction of `ema`
 * back toward the calibrated one (a layer's 1/16 of 0.25: a 24-layer model closes a third of
 * the gap each token the CPU sits idle). */
#define RELAX (1.0 / 16.0)

typedef struct {
    /* shapes */
    int64_t tokens, top_k, num_experts, hidden, intermediate;
    int64_t threads;
    /* the kernel's weights (host aliases of the managed store) */
    const void *w13, *w2;
    int64_t w13_stride, w2_stride;
    const float *w13_scale, *w2_scale;
    const int64_t *scale_strides;
    int64_t kind, scale_kind, block_n, block_k;
    /* pinned buffers: written by the GPU (ids, weights, x, cols), by the CPU (out, costs) */
    const int64_t *ids;      /* [T * k] */
    const float *weights;    /* [T * k] */
    const float *x;          /* [T, H] */
    const int32_t *cols;     /* [E]: the leading intermediate columns the CPU computes (0: none) */
    float *out;              /* [T, H] */
    const uint8_t *resident; /* [E]: 1 where the GPU holds the expert (for the counts only) */
    double *costs;           /* [5]: ExpertCosts' fields, which the GPU's split reads */
    /* scratch */
    float *gate_up;        /* [T * k, 2I] */
    int64_t *experts;      /* [min(T * k, E)]: the CPU's experts, ascending */
    int64_t *expert_cols;  /* [min(T * k, E)]: their columns */
    int64_t *offsets;      /* [T * k + 1] */
    int64_t *pair_tokens;  /* [T * k] */
    float *pair_weights;   /* [T * k] */
    uint8_t *seen;         /* [E] */
    /* the doorbell's second word of this state (NULL with host nodes): the GPU's stream sets
     * it to 0 before asking and to 1 once its own kernel is done, so the host sees which
     * side finished first */
    const volatile uint32_t *gpu_done;
    double ema; /* weight of a new observation of the CPU's per-expert time; 0: fixed */
    double cpu_expert_start; /* the per-expert time given at the start (calibrated) */
    /* the last step */
    int64_t m, pairs;
    double share; /* the CPU's experts, a split one counting its fraction of the columns */
    int64_t offloaded; /* the routed experts the split could give either side */
    /* totals (experts as in `share`) */
    int64_t steps;
    double cpu_experts, gpu_offloaded_experts;
    int64_t timed, status;
    int64_t balanced, gpu_first; /* steps balanced through gpu_done; of them, the GPU first */
    double cpu_us[HYBRID_RING]; /* wall time of the last steps' CPU side that had experts */
} HybridState;

enum { COST_GPU_EXPERT = 0, COST_CPU_EXPERT = 1, COST_CPU_PAIR = 2 };

int64_t moe_uvm_hybrid_state_size(void) { return (int64_t)sizeof(HybridState); }

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}

/* The CPU's pairs grouped by expert (ascending), each group in pair order; the counts. */
static void hybrid_group(HybridState *s) {
    int64_t n_pairs = s->tokens * s->top_k, E = s->num_experts;
    int64_t n_cpu = 0, pairs = 0, offloaded = 0;
    double share = 0.0;
    s->offsets[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        if (s->cols[e] <= 0) continue;
        int64_t first = pairs;
        for (int64_t p = 0; p < n_pairs; p++) {
            if (s->ids[p] == e) {
                s->pair_tokens[pairs] = p / s->top_k;
                s->pair_weights[pairs] = s->weights[p];
                pairs++;
            }
        }
        if (pairs > first) {
            int64_t c = s->cols[e] < s->intermediate ? s->cols[e] : s->intermediate;
            s->experts[n_cpu] = e;
            s->expert_cols[n_cpu++] = c;
            s->offsets[n_cpu] = pairs;
            share += (double)c / (double)s->intermediate;
        }
    }
    memset(s->seen, 0, (size_t)E);
    for (int64_t p = 0; p < n_pairs; p++) {
        int64_t e = s->ids[p];
        if (e >= 0 && e < E && !s->seen[e] && (!s->resident[e] || s->cols[e] > 0)) {
            s->seen[e] = 1;
            offloaded++;
        }
    }
    s->m = n_cpu;
    s->pairs = pairs;
    s->share = share;
    s->offloaded = offloaded;
    s->steps++;
    s->cpu_experts += share;
    s->gpu_offloaded_experts += (double)offloaded > share ? (double)offloaded - share : 0.0;
}

/* The last step's CPU experts in whole experts (at least one column's worth). */
static double share_of(const HybridState *s) {
    double least = 1.0 / (double)s->intermediate;
    return s->share > least ? s->share : least;
}

/* With the doorbell, adaptation balances the two sides directly: when the CPU is done, the
 * GPU's word says whether its kernel finished first; the CPU's per-expert cost the split
 * uses goes up BALANCE_STEP if so (the CPU had too much), down otherwise, within
 * BALANCE_RANGE of the calibrated one. No model of the CPU's time is needed (its fixed cost,
 * a split expert's strided w2 rows, the GPU beside it), and none can drift off: a step that
 * gives the CPU nothing counts as the CPU first. Steps with nothing offloaded say nothing. */
#define BALANCE_STEP 0.02
#define BALANCE_RANGE 16.0

static void balance(HybridState *s, double *c) {
    if (s->offloaded == 0) return;
    int gpu_first = *s->gpu_done != 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    double v = c[COST_CPU_EXPERT] * (gpu_first ? 1.0 + BALANCE_STEP : 1.0 - BALANCE_STEP);
    double lo = s->cpu_expert_start / BALANCE_RANGE, hi = s->cpu_expert_start * BALANCE_RANGE;
    c[COST_CPU_EXPERT] = v < lo ? lo : v > hi ? hi : v;
    s->balanced++;
    s->gpu_first += gpu_first;
}

void moe_uvm_hybrid_compute(void *state) {
    HybridState *s = (HybridState *)state;
    memset(s->out, 0, sizeof(float) * (size_t)(s->tokens * s->hidden));
    hybrid_group(s);
    double *c = s->costs;
    int by_balance = s->ema > 0 && s->gpu_done != NULL;
    if (s->m == 0 && by_balance) {
        balance(s, c);
        return;
    }
    if (s->m == 0) {
        /* Given nothing, the CPU is not observed, so an estimate pushed up by a slow spell
         * (another process on the cores) would keep it idle for good: it drifts back toward
         * the calibrated time instead, until the split hands the CPU a share and a real
         * observation corrects it either way. */
        if (s->ema > 0 && c[COST_CPU_EXPERT] > s->cpu_expert_start)
            c[COST_CPU_EXPERT] += s->ema * RELAX * (s->cpu_expert_start - c[COST_CPU_EXPERT]);
        return;
    }
    double start = now_us();
    int failed = moe_uvm_cpu_experts(
        s->x, s->hidden, s->intermediate, s->m, s->experts, s->offsets, s->pair_tokens,
        s->pair_weights, s->w13, s->w13_stride, s->w2, s->w2_stride, (int)s->kind,
        s->w13_scale, s->w2_scale, (int)s->scale_kind, s->scale_strides, (int)s->block_n,
        (int)s->block_k, s->gate_up, s->out, (int)s->threads, s->expert_cols);
    if (failed) {
        s->status = 1; /* hybrid.py raises at its next look */
        memset(s->out, 0, sizeof(float) * (size_t)(s->tokens * s->hidden));
        return;
    }
    double us = now_us() - start;
    s->cpu_us[s->timed % HYBRID_RING] = us;
    s->timed++;
    if (by_balance) {
        balance(s, c);
        return;
    }
    double per_expert = (us - c[4] - c[COST_CPU_PAIR] * (double)s->pairs) / share_of(s);
    /* A share under one expert weighs less: its time is mostly the fixed part, whose error,
     * divided by a small share, would otherwise swing the per-expert estimate (and with it
     * the next split) far off. */
    double weight = s->share < 1.0 ? s->share : 1.0;
    if (s->ema > 0 && per_expert > 0)
        c[COST_CPU_EXPERT] += s->ema * weight * (per_expert - c[COST_CPU_EXPERT]);
}

/* ---- The doorbell: a host thread that serves the GPU's requests without the driver ----
 * The second way to run moe_uvm_hybrid_compute in stream order (hybrid.py picks it where the
 * GPU's stream memory operations work, host nodes elsewhere). Each registered state has a word
 * in a pinned array: the GPU's stream writes 1 into it (cuStreamWriteValue32, which fences the
 * layer's earlier writes first), this thread, spinning over the words, sees the 1, computes the
 * layer and writes 2, and the stream, which went on with its own kernel, waits for the 2
 * (cuStreamWaitValue32) before it adds the CPU's sum. No driver thread wakes up and no
 * interrupt is taken on the way, as for a host node. A word per state, so layers of several
 * streams never overwrite each other's requests. The thread spins for `spin_us` after each
 * request (decode's layers come back-to-back), then polls every 50 us, every 1 ms after a
 * second idle. States are never unregistered: a captured graph keeps naming them; hybrid.py
 * keeps them, and the words, alive until it stops the thread. */
#include <pthread.h>

enum { BELL_IDLE = 0, BELL_REQUEST = 1, BELL_DONE = 2 };

typedef struct {
    volatile uint32_t *words; /* [capacity], pinned */
    HybridState **states;     /* [capacity] */
    int64_t capacity, registered;
    double spin_us;
    int64_t served;
    int stop;
    pthread_t thread;
} Doorbell;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *doorbell_loop(void *arg) {
    Doorbell *d = (Doorbell *)arg;
    double last = now_us();
    while (!__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
        int64_t n = __atomic_load_n(&d->registered, __ATOMIC_ACQUIRE);
        int served = 0;
        for (int64_t i = 0; i < n; i++) {
            if (__atomic_load_n(&d->words[i], __ATOMIC_ACQUIRE) != BELL_REQUEST) continue;
            moe_uvm_hybrid_compute(d->states[i]);
            __atomic_store_n(&d->words[i], (uint32_t)BELL_DONE, __ATOMIC_RELEASE);
            d->served++;
            served = 1;
        }
        if (served) {
            last = now_us();
            continue;
        }
        double idle = now_us() - last;
        if (idle < d->spin_us) {
            for (int i = 0; i < 16; i++) cpu_relax();
            continue;
        }
        struct timespec t = {0, idle < 1e6 ? 50000 : 1000000};
        nanosleep(&t, NULL);
    }
    return NULL;
}

/* A doorbell over `words` (a pinned array of `capacity` zeroed words the GPU writes), its
 * thread started; NULL when the thread cannot be created. It runs until moe_uvm_doorbell_stop,
 * which the caller must call before `words` or any registered state goes away. */
void *moe_uvm_doorbell_start(uint32_t *words, int64_t capacity, double spin_us) {
    Doorbell *d = (Doorbell *)calloc(1, sizeof(Doorbell));
    if (d == NULL) return NULL;
    d->states = (HybridState **)calloc((size_t)capacity, sizeof(HybridState *));
    if (d->states == NULL) {
        free(d);
        return NULL;
    }
    d->words = words;
    d->capacity = capacity;
    d->spin_us = spin_us;
    if (pthread_create(&d->thread, NULL, doorbell_loop, d) != 0) {
        free(d->states);
        free(d);
        return NULL;
    }
    return d;
}

/* Stops the thread (within one poll: at most 1 ms) and frees the doorbell. */
void moe_uvm_doorbell_stop(void *doorbell) {
    Doorbell *d = (Doorbell *)doorbell;
    __atomic_store_n(&d->stop, 1, __ATOMIC_RELEASE);
    pthread_join(d->thread, NULL);
    free(d->states);
    free(d);
}

/* Registers a state (one caller at a time): the index of its word, or -1 when full. */
int64_t moe_uvm_doorbell_register(void *doorbell, void *state) {
    Doorbell *d = (Doorbell *)doorbell;
    int64_t i = d->registered;
    if (i >= d->capacity) return -1;
    d->states[i] = (HybridState *)state;
    __atomic_store_n(&d->registered, i + 1, __ATOMIC_RELEASE); /* the state before the count */
    return i;
}

/* Requests served since the start. */
int64_t moe_uvm_doorbell_served(void *doorbell) {
    return __atomic_load_n(&((Doorbell *)doorbell)->served, __ATOMIC_RELAXED);
}
