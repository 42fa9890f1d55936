/* SamOut's forward pass for the CPU, with no runtime under it: the cummax model of
 * models/model.py, step for step, over the weights of an export's native.safetensors
 * (native/weights.py). Matrices are fp32, or int4 in blocks of 32 along k (two a byte,
 * low nibble first; value (q - z) * s, z = 8 where the grid is symmetric), stored in
 * panels of 32 rows (see "matrices" below). Built by native/build.py with the machine's
 * own compiler.
 *
 * One function is called: samout_forward. x86 with AVX2 and FMA (or AVX-512) takes the
 * vector kernels below; every other CPU the plain C loops ("c"), written so that the
 * compiler vectorizes them for the CPU it builds for (NEON on a Jetson). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SAMOUT_AVX2 1 /* and AVX-512 where the build has it: 16 lanes instead of 8 */
#endif

typedef struct {
    int32_t n, k;     /* W is [n, k]: y = W x */
    const float *f;   /* fp32 panels [n / 32, k, 32], or NULL */
    const uint8_t *q; /* int4 panels [n / 32, k / 32, 16, 32] */
    const float *s;   /* [n / 32, k / 32, 32] */
    const uint8_t *z; /* [n / 32, k / 32, 32] zero points, or NULL: 8 */
} Mat;

typedef struct {
    Mat combined, ffn1, gate, ffn2;
    const float *b1, *bg, *b2, *ln_w, *ln_b;
    float alpha, eps;
} Layer;

typedef struct {
    int32_t vocab, hidden, heads, layers, em_block;
    const float *em_f;  /* fp32 [vocab, hidden], or NULL */
    const int8_t *em_q; /* int8 [vocab, hidden] */
    const float *em_s;  /* [vocab, hidden / em_block] */
    const int8_t *em_z; /* [vocab, hidden / em_block], or NULL: 0 */
    const Layer *layer;
    Mat head;
} Model;

const char *samout_kernels(void) {
#if defined(__AVX512F__) && defined(SAMOUT_AVX2)
    return "avx512";
#elif defined(SAMOUT_AVX2)
    return "avx2";
#else
    return "c";
#endif
}

int samout_threads(void) { /* 1 where the build has OpenMP: matmul shares its panels among threads */
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- vectors */

/* The widest float vector the build has: VL lanes, and the few operations the kernels use */
#if defined(__AVX512F__)
#define VL 16
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSET(a) _mm512_set1_ps(a)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VSTORE(p, a) _mm512_storeu_ps(p, a)
#elif defined(SAMOUT_AVX2)
#define VL 8
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSET(a) _mm256_set1_ps(a)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VSTORE(p, a) _mm256_storeu_ps(p, a)
#endif

/* ---------------------------------------------------------------- matrices */

/* Every matrix is stored in panels of P = 32 rows (native/weights.py writes them so; the last
 * panel padded with zero rows), so that a vector holds one entry of 8, 16 or 32 consecutive
 * rows and products accumulate whole vectors of outputs, never summing across a vector:
 *   fp32: f[panel][kk][r]                        = W[32 panel + r, kk]
 *   int4: q[panel][block][j][r]                  = byte j of row 32 panel + r's block: entries
 *         32 block + 2j (low nibble) and 32 block + 2j + 1 (high); s and z [panel][block][r].
 * The int4 layout is llama.cpp's "repacked" idea, done once at export instead of at every load. */
#define P 32
#define AHEAD 8 /* panel rows (128 bytes each) a decode step prefetches ahead: 1 KiB */
#define Q4_AHEAD 32 /* int4 panel bytes per row a decode step prefetches ahead: 1 KiB */
#define PREFETCH(p) __builtin_prefetch(p, 0, 3)

/* Each (block, j) of an int4 panel, as floats: lo[r] = (q_lo - z) * s, hi[r] = (q_hi - z) * s
 * (s == 1: unscaled, the decode kernel scales per block). */
#ifdef SAMOUT_AVX2
#if defined(__AVX512F__)
#define WIDEN(b16) _mm512_castsi512_ps(_mm512_or_si512(_mm512_cvtepu8_epi32(b16), _mm512_set1_epi32(0x4B000000)))
#else
#define WIDEN(b8) _mm256_castsi256_ps(_mm256_or_si256(_mm256_cvtepu8_epi32(b8), _mm256_set1_epi32(0x4B000000)))
#endif
/* the 32 rows' low and high nibbles of one byte column, as P / VL vectors each, minus (2^23 + z):
 * a nibble v zero-extended and or-ed into 2^23's exponent is the float 2^23 + v, so this is exactly v - z */
static inline void nibbles(const uint8_t *col, const vec *c, vec *lo, vec *hi) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)col);
    __m256i l = _mm256_and_si256(raw, _mm256_set1_epi8(15));
    __m256i h = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(15));
    for (int v = 0; v < P / VL; v++) {
        /* rows VL v .. VL v + VL: bytes of the low or high 16, shifted by 8 for AVX2's odd vectors */
        __m128i lb = VL * v < 16 ? _mm256_castsi256_si128(l) : _mm256_extracti128_si256(l, 1);
        __m128i hb = VL * v < 16 ? _mm256_castsi256_si128(h) : _mm256_extracti128_si256(h, 1);
        if ((VL * v) % 16) { lb = _mm_srli_si128(lb, 8); hb = _mm_srli_si128(hb, 8); }
        lo[v] = VSUB(WIDEN(lb), c[v]);
        hi[v] = VSUB(WIDEN(hb), c[v]);
    }
}
#undef WIDEN
static inline vec vzero_points(const Mat *w, size_t at, int v) { /* 2^23 + z for VL rows of one block */
    if (!w->z) return VSET(8388608.0f + 8.0f);
    float z[VL];
    for (int i = 0; i < VL; i++) z[i] = 8388608.0f + (float)w->z[at + VL * v + i];
    return VLOAD(z);
}
#endif

/* The fp32 panel of int4 panel p: out[kk * P + r] = (q - z) * s */
static void dequant_panel(const Mat *w, int p, float *out) {
    int nb = w->k / 32;
    for (int b = 0; b < nb; b++) {
        size_t at = ((size_t)p * nb + b) * P; /* this block's s and z */
        const uint8_t *q = w->q + at * 16;
#ifdef SAMOUT_AVX2
        vec c[P / VL], sc[P / VL], lo[P / VL], hi[P / VL];
        for (int v = 0; v < P / VL; v++) { c[v] = vzero_points(w, at, v); sc[v] = VLOAD(w->s + at + VL * v); }
        for (int j = 0; j < 16; j++) {
            nibbles(q + (size_t)j * P, c, lo, hi);
            for (int v = 0; v < P / VL; v++) {
                VSTORE(out + (size_t)(32 * b + 2 * j) * P + VL * v, VMUL(lo[v], sc[v]));
                VSTORE(out + (size_t)(32 * b + 2 * j + 1) * P + VL * v, VMUL(hi[v], sc[v]));
            }
        }
#else
        for (int j = 0; j < 16; j++)
            for (int r = 0; r < P; r++) {
                uint8_t byte = q[(size_t)j * P + r];
                float z = w->z ? (float)w->z[at + r] : 8.0f, sb = w->s[at + r];
                out[(size_t)(32 * b + 2 * j) * P + r] = ((float)(byte & 15) - z) * sb;
                out[(size_t)(32 * b + 2 * j + 1) * P + r] = ((float)(byte >> 4) - z) * sb;
            }
#endif
    }
}

/* y[0..P) = int4 panel p . x: one token (the decode step), straight from the int4 */
static void q4_panel_gemv(const Mat *w, int p, const float *x, float *y) {
    int nb = w->k / 32;
#ifdef SAMOUT_AVX2
    vec acc[P / VL], c[P / VL], lo[P / VL], hi[P / VL];
    for (int v = 0; v < P / VL; v++) acc[v] = VZERO();
    for (int b = 0; b < nb; b++) {
        size_t at = ((size_t)p * nb + b) * P;
        const uint8_t *q = w->q + at * 16;
        vec t[P / VL];
        for (int v = 0; v < P / VL; v++) { c[v] = vzero_points(w, at, v); t[v] = VZERO(); }
        PREFETCH(w->s + at + Q4_AHEAD * P / 16);
        for (int j = 0; j < 16; j++) {
            vec xe = VSET(x[32 * b + 2 * j]), xo = VSET(x[32 * b + 2 * j + 1]);
            PREFETCH(q + (size_t)j * P + Q4_AHEAD * P);
            nibbles(q + (size_t)j * P, c, lo, hi);
            for (int v = 0; v < P / VL; v++) t[v] = VFMA(hi[v], xo, VFMA(lo[v], xe, t[v]));
        }
        for (int v = 0; v < P / VL; v++) acc[v] = VFMA(t[v], VLOAD(w->s + at + VL * v), acc[v]);
    }
    for (int v = 0; v < P / VL; v++) VSTORE(y + VL * v, acc[v]);
#else
    float acc[P] = {0};
    for (int b = 0; b < nb; b++) {
        size_t at = ((size_t)p * nb + b) * P;
        const uint8_t *q = w->q + at * 16;
        float t[P] = {0};
        for (int j = 0; j < 16; j++) {
            float xe = x[32 * b + 2 * j], xo = x[32 * b + 2 * j + 1];
            for (int r = 0; r < P; r++) {
                float z = w->z ? (float)w->z[at + r] : 8.0f;
                t[r] += ((float)(q[(size_t)j * P + r] & 15) - z) * xe + ((float)(q[(size_t)j * P + r] >> 4) - z) * xo;
            }
        }
        for (int r = 0; r < P; r++) acc[r] += t[r] * w->s[at + r];
    }
    memcpy(y, acc, sizeof(acc));
#endif
}

/* y[0..P) = fp32 panel . x: one token */
static void f32_panel_gemv(int k, const float *panel, const float *x, float *y) {
#ifdef SAMOUT_AVX2
    vec acc[P / VL];
    for (int v = 0; v < P / VL; v++) acc[v] = VZERO();
    for (int kk = 0; kk < k; kk++) {
        vec xb = VSET(x[kk]);
        PREFETCH(panel + (size_t)(kk + AHEAD) * P); /* the stream the hardware prefetcher drops at each 4 KiB page */
        PREFETCH(panel + (size_t)(kk + AHEAD) * P + 16);
        for (int v = 0; v < P / VL; v++) acc[v] = VFMA(VLOAD(panel + (size_t)kk * P + VL * v), xb, acc[v]);
    }
    for (int v = 0; v < P / VL; v++) VSTORE(y + VL * v, acc[v]);
#else
    float acc[P] = {0};
    for (int kk = 0; kk < k; kk++)
        for (int r = 0; r < P; r++) acc[r] += x[kk] * panel[(size_t)kk * P + r];
    memcpy(y, acc, sizeof(acc));
#endif
}

/* Several tokens through an fp32 panel, MR at a time: each step broadcasts one entry of each
 * token into whole vectors of the panel's rows (BLAS's micro-kernel): out[i * P + r] */
#define MR 6
static void panel_gemm(int k, const float *panel, const float *const x[MR], float *out) {
#ifdef SAMOUT_AVX2
#define HALF (2 * VL) /* columns one pass keeps in registers: MR x 2 accumulators */
    for (int c0 = 0; c0 < P; c0 += HALF) {
        vec acc[MR][2];
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = VZERO();
        for (int kk = 0; kk < k; kk++) {
            vec w0 = VLOAD(panel + (size_t)kk * P + c0), w1 = VLOAD(panel + (size_t)kk * P + c0 + VL);
            for (int i = 0; i < MR; i++) {
                vec xb = VSET(x[i][kk]);
                acc[i][0] = VFMA(w0, xb, acc[i][0]);
                acc[i][1] = VFMA(w1, xb, acc[i][1]);
            }
        }
        for (int i = 0; i < MR; i++) { VSTORE(out + i * P + c0, acc[i][0]); VSTORE(out + i * P + c0 + VL, acc[i][1]); }
    }
#undef HALF
#else
    float acc[MR][P] = {{0}};
    for (int kk = 0; kk < k; kk++)
        for (int i = 0; i < MR; i++)
            for (int r = 0; r < P; r++) acc[i][r] += x[i][kk] * panel[(size_t)kk * P + r];
    memcpy(out, acc, sizeof(acc));
#endif
}

/* y[t, n] = W[n] . x[t] (+ bias[n]) for t < T, panel by panel: `threads` share the panels */
static void matmul(const Mat *w, int T, const float *x, const float *bias, float *y, int threads) {
    int k = w->k, panels = (w->n + P - 1) / P;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float out[MR * P];
        float *scratch = (w->q && T > 1) ? malloc(sizeof(float) * (size_t)k * P) : NULL; /* a dequantized panel */
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {
            int rows = w->n - p * P < P ? w->n - p * P : P;
            const float *panel = w->f + (size_t)p * k * P;
            if (T == 1) { /* the decode step: straight from the panel, int4 or fp32 */
                if (w->q) q4_panel_gemv(w, p, x, out);
                else f32_panel_gemv(k, panel, x, out);
                memcpy(y + (size_t)p * P, out, sizeof(float) * rows);
                continue;
            }
            if (w->q) {
                dequant_panel(w, p, scratch);
                panel = scratch;
            }
            for (int t = 0; t < T; t += MR) {
                const float *xs[MR];
                for (int i = 0; i < MR; i++) xs[i] = x + (size_t)(t + i < T ? t + i : T - 1) * k;
                panel_gemm(k, panel, xs, out);
                for (int i = 0; i < MR && t + i < T; i++)
                    memcpy(y + (size_t)(t + i) * w->n + (size_t)p * P, out + i * P, sizeof(float) * rows);
            }
        }
        free(scratch);
    }
    if (bias)
        for (int t = 0; t < T; t++)
            for (int n = 0; n < w->n; n++) y[(size_t)t * w->n + n] += bias[n];
}

/* ---------------------------------------------------------------- the model */

static float maxf(float a, float b) { return (b > a || b != b) ? b : a; } /* torch.maximum: NaN wins */

/* One decoder layer over T tokens; run: this layer's running max [hidden], updated */
static void layer_forward(const Model *m, const Layer *l, int T, float *x, float *run, float *c, float *y,
                          float *a, float *g, int threads) {
    int H = m->hidden, D = H / m->heads;
    matmul(&l->combined, T, x, NULL, c, threads); /* out, out1, out2 = combined(x).chunk(3) */
    for (int t = 0; t < T; t++) {
        const float *out = c + (size_t)t * 3 * H, *out1 = out + H, *out2 = out + 2 * H;
        float *yt = y + (size_t)t * H;
        for (int i = 0; i < H; i++) run[i] = maxf(run[i], out[i]); /* the running max over the sequence */
        for (int d = 0; d < D; d++) {                              /* then over the heads */
            float score = run[d];
            for (int h = 0; h < m->heads; h++) {
                int i = h * D + d;
                score = maxf(score, run[i]);
                yt[i] = (score + out1[i]) * out2[i] + out1[i];
            }
        }
    }
    matmul(&l->ffn1, T, y, l->b1, a, threads); /* ffn2(ffn1(y) * relu(gate(y))) */
    matmul(&l->gate, T, y, l->bg, g, threads);
    for (size_t i = 0; i < (size_t)T * H; i++) a[i] *= g[i] > 0 ? g[i] : (g[i] != g[i] ? g[i] : 0.0f);
    matmul(&l->ffn2, T, a, l->b2, g, threads);
    for (int t = 0; t < T; t++) { /* x + layer_norm(alpha * ffn + (1 - alpha) * x) */
        float *xt = x + (size_t)t * H, *ft = g + (size_t)t * H;
        float mean = 0, var = 0;
        for (int i = 0; i < H; i++) { ft[i] = l->alpha * ft[i] + (1.0f - l->alpha) * xt[i]; mean += ft[i]; }
        mean /= H;
        for (int i = 0; i < H; i++) { float e = ft[i] - mean; var += e * e; }
        float inv = 1.0f / sqrtf(var / H + l->eps);
        for (int i = 0; i < H; i++) xt[i] += (ft[i] - mean) * inv * l->ln_w[i] + l->ln_b[i];
    }
}

/* Logits for ids[0..T) after the state (per layer its running max, [layers, hidden], updated
 * in place): all T rows, or the last only; the matrix products on `threads` threads (OpenMP,
 * where the build has it). Returns 0, or -1 where memory ran out. */
int samout_forward(const Model *m, int T, const int64_t *ids, float *state, int all_logits, float *logits,
                   int threads) {
    int H = m->hidden;
    float *buf = malloc(sizeof(float) * (size_t)T * H * 7);
    if (!buf) return -1;
    float *x = buf, *c = x + (size_t)T * H, *y = c + (size_t)T * 3 * H, *a = y + (size_t)T * H, *g = a + (size_t)T * H;
    int nb = (H + m->em_block - 1) / m->em_block;
    for (int t = 0; t < T; t++) {
        int64_t id = ids[t];
        if (m->em_f) {
            memcpy(x + (size_t)t * H, m->em_f + (size_t)id * H, sizeof(float) * H);
        } else {
            const int8_t *q = m->em_q + (size_t)id * H;
            const float *s = m->em_s + (size_t)id * nb;
            for (int i = 0; i < H; i++) {
                int b = i / m->em_block;
                float z = m->em_z ? (float)m->em_z[(size_t)id * nb + b] : 0.0f;
                x[(size_t)t * H + i] = ((float)q[i] - z) * s[b];
            }
        }
    }
    for (int l = 0; l < m->layers; l++) layer_forward(m, &m->layer[l], T, x, state + (size_t)l * H, c, y, a, g, threads);
    if (all_logits) matmul(&m->head, T, x, NULL, logits, threads);
    else matmul(&m->head, 1, x + (size_t)(T - 1) * H, NULL, logits, threads);
    free(buf);
    return 0;
}
