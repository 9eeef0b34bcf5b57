/* Compiled CPU kernel for populations of GRU networks (loaded by mlds/nets/cpu_kernel.py).
 *
 * gru_forward / gru_backward: the GRU wavefront of mlds/nets/recurrent.py (same buffers, layouts
 * and equations as its _forward / _backward with save=True).
 * gru_mlp_step: a whole training step of GRU + MLP networks with a per-network mean BCE
 * (forward, loss, every gradient), or with y NULL the forward alone (evaluation).
 *
 * Everything runs one network at a time, so that its activations (about 2 MiB for DS1, a core's
 * L2) stay in cache; every inner loop runs over 16 batch lanes (GCC/Clang vector extensions).
 * The operator path stays the reference: tests/test_recurrent.py holds the two equal.
 *
 *   wp   [L, K, 4H, W]       packed weights on [input (wb) | h (H) | 1]; rows r, z, n_in, n_h,
 *                            the last two scaled by 2 (tanh(a) = 2 sigmoid(2a) - 1)
 *   hc   [S + 1, L, K, W, B] layer inputs per wavefront step (S = T + L - 1); the caller fills
 *                            x, the bias column, padding and the zero initial states
 *   acts [S, L, K, 4H, B]    saved gates: r, z, n, n_h pre-activation
 *   go   [K, H, T, B]        gradient of the last layer's states
 *   dwp  [L, K, 4H, W]       packed-weight gradient (written)
 *   dx   [T, K, n_in, B]     input gradient (written; may be NULL)
 */
#include <stddef.h>
#include <string.h>

/* Sixteen lanes of the batch at a time (GCC/Clang vector extensions: one AVX-512 register, two
 * AVX ones, four NEON ones); the caller keeps the batch a multiple of 16. */
typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));
#define VL 16

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf select(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* Copy n floats (a multiple of VL): inline, where a memcpy call would cost more than the copy. */
static inline void copy(float *restrict dst, const float *restrict src, size_t n) {
    for (size_t i = 0; i < n; i += VL) store(dst + i, load(src + i));
}

/* exp(x): Cephes' single-precision polynomial on the range reduced by powers of 2 (relative
 * error about 1e-7), clamped to [-87, 88] where float neither overflows nor goes denormal. */
static inline vf exp_approx(vf x) {
    const vf hi = x - x + 88.0f, lo = x - x - 87.0f;
    x = select(x > hi, hi, x);
    x = select(x < lo, lo, x);
    const vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);  /* floor(t): truncate, then step down below zero */
    n += (vi)(t < __builtin_convertvector(n, vf));
    const vf fx = __builtin_convertvector(n, vf);
    x = x - fx * 0.693359375f - fx * -2.12194440e-4f;
    const vf z = x * x;
    vf y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x
             + 4.1665795894e-2f) * x + 1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    return y * (vf)((n + 127) << 23);  /* times 2^n */
}

static inline vf sigmoid(vf x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* out[o * out_row + b] = sum_i w[o * so + i * si] * in[i * in_row + b] for o < n_out, i < n_sum,
 * b < batch: four rows by four vectors (long rows) or six rows by two vectors of the batch accumulate
 * in registers. */
static void matmul(float *restrict out, size_t out_row, const float *restrict w, int so, int si,
                   const float *restrict in, size_t in_row, int n_out, int n_sum, int batch) {
    int b = 0;
    for (; b + 4 * VL <= batch; b += 4 * VL) {  /* long rows (the head's T * B): four rows by four vectors */
        int o = 0;
        for (; o + 4 <= n_out; o += 4) {
            vf acc[4][4];
            for (int q = 0; q < 4; q++)
                for (int v = 0; v < 4; v++) acc[q][v] = (vf){0};
            const float *w0 = w + (size_t)o * so;
            for (int i = 0; i < n_sum; i++) {
                const float *row = in + i * in_row + b;
                const vf x0 = load(row), x1 = load(row + VL), x2 = load(row + 2 * VL), x3 = load(row + 3 * VL);
                for (int q = 0; q < 4; q++) {
                    const float wq = w0[(size_t)q * so + (size_t)i * si];
                    acc[q][0] += wq * x0;
                    acc[q][1] += wq * x1;
                    acc[q][2] += wq * x2;
                    acc[q][3] += wq * x3;
                }
            }
            for (int q = 0; q < 4; q++)
                for (int v = 0; v < 4; v++) store(out + (size_t)(o + q) * out_row + b + v * VL, acc[q][v]);
        }
        for (; o < n_out; o++)
            for (int v = 0; v < 4; v++) {
                vf a0 = (vf){0};
                for (int i = 0; i < n_sum; i++)
                    a0 += w[(size_t)o * so + (size_t)i * si] * load(in + i * in_row + b + v * VL);
                store(out + (size_t)o * out_row + b + v * VL, a0);
            }
    }
    for (; b + 2 * VL <= batch; b += 2 * VL) {
        int o = 0;
        const int six = n_out % 4 ? n_out - n_out % 6 : 0;  /* rows in blocks of six where fours leave a rest */
        for (; o + 6 <= six; o += 6) {  /* six rows by two vectors: twelve sums in flight */
            vf acc[6][2];
            for (int q = 0; q < 6; q++) acc[q][0] = acc[q][1] = (vf){0};
            const float *w0 = w + (size_t)o * so;
            for (int i = 0; i < n_sum; i++) {
                const float *row = in + i * in_row + b;
                const vf x0 = load(row), x1 = load(row + VL);
                for (int q = 0; q < 6; q++) {
                    const float wq = w0[(size_t)q * so + (size_t)i * si];
                    acc[q][0] += wq * x0;
                    acc[q][1] += wq * x1;
                }
            }
            for (int q = 0; q < 6; q++) {
                store(out + (size_t)(o + q) * out_row + b, acc[q][0]);
                store(out + (size_t)(o + q) * out_row + b + VL, acc[q][1]);
            }
        }
        for (; o + 4 <= n_out; o += 4) {
            vf a0 = (vf){0}, a1 = (vf){0}, c0 = (vf){0}, c1 = (vf){0};
            vf e0 = (vf){0}, e1 = (vf){0}, f0 = (vf){0}, f1 = (vf){0};
            const float *w0 = w + (size_t)o * so;
            for (int i = 0; i < n_sum; i++) {
                const float *row = in + i * in_row + b;
                const vf x0 = load(row), x1 = load(row + VL);
                const size_t at = (size_t)i * si;
                const float p = w0[at], q = w0[so + at], r = w0[2 * (size_t)so + at], t = w0[3 * (size_t)so + at];
                a0 += p * x0;
                a1 += p * x1;
                c0 += q * x0;
                c1 += q * x1;
                e0 += r * x0;
                e1 += r * x1;
                f0 += t * x0;
                f1 += t * x1;
            }
            float *dst = out + (size_t)o * out_row + b;
            store(dst, a0);
            store(dst + VL, a1);
            store(dst + out_row, c0);
            store(dst + out_row + VL, c1);
            store(dst + 2 * out_row, e0);
            store(dst + 2 * out_row + VL, e1);
            store(dst + 3 * out_row, f0);
            store(dst + 3 * out_row + VL, f1);
        }
        for (; o < n_out; o++) {
            vf a0 = (vf){0}, a1 = (vf){0};
            for (int i = 0; i < n_sum; i++) {
                const float wi = w[(size_t)o * so + (size_t)i * si];
                const float *row = in + i * in_row + b;
                a0 += wi * load(row);
                a1 += wi * load(row + VL);
            }
            float *dst = out + (size_t)o * out_row + b;
            store(dst, a0);
            store(dst + VL, a1);
        }
    }
    for (; b < batch; b += VL)
        for (int o = 0; o < n_out; o++) {
            vf a0 = (vf){0};
            for (int i = 0; i < n_sum; i++) a0 += w[(size_t)o * so + (size_t)i * si] * load(in + i * in_row + b);
            store(out + (size_t)o * out_row + b, a0);
        }
}

static inline float total(vf v) {
    float t = 0.0f;
    for (int i = 0; i < VL; i++) t += v[i];
    return t;
}

/* out[(o + q) * out_row + i] = sum_m g[(o + q) * g_row + m] * a[i * a_row + m] for q < rows (a constant
 * at each call, so the loops unroll), the sums kept per lane in registers. */
static inline void dot_rows(int rows, float *restrict out, size_t out_row, const float *restrict g, size_t g_row,
                            const float *restrict a, size_t a_row, int o, int i, size_t len) {
    vf s[8];
    for (int q = 0; q < rows; q++) s[q] = (vf){0};
    const float *g0 = g + (size_t)o * g_row, *ai = a + (size_t)i * a_row;
    for (size_t m = 0; m < len; m += VL) {
        const vf x = load(ai + m);
        for (int q = 0; q < rows; q++) s[q] += load(g0 + q * g_row + m) * x;
    }
    for (int q = 0; q < rows; q++) out[(size_t)(o + q) * out_row + i] = total(s[q]);
}

/* out[o * out_row + i] = sum_m g[o * g_row + m] * a[i * a_row + m] for o < n_out, i < n_in, m < len
 * (len a multiple of VL): eight rows of g against two rows of a at a time (then fewer), the sums kept
 * per lane in registers. */
static void dots(float *restrict out, size_t out_row, const float *restrict g, size_t g_row,
                 const float *restrict a, size_t a_row, int n_out, int n_in, size_t len) {
    int o = 0;
    for (; o + 8 <= n_out; o += 8) {
        int i = 0;
        for (; i + 2 <= n_in; i += 2) {  /* eight rows of g against two rows of a: 10 loads, 16 FMAs */
            vf s[8], t[8];
            for (int q = 0; q < 8; q++) s[q] = t[q] = (vf){0};
            const float *g0 = g + (size_t)o * g_row, *ai = a + (size_t)i * a_row;
            for (size_t m = 0; m < len; m += VL) {
                const vf x = load(ai + m), y = load(ai + a_row + m);
                for (int q = 0; q < 8; q++) {
                    const vf gq = load(g0 + q * g_row + m);
                    s[q] += gq * x;
                    t[q] += gq * y;
                }
            }
            for (int q = 0; q < 8; q++) {
                out[(size_t)(o + q) * out_row + i] = total(s[q]);
                out[(size_t)(o + q) * out_row + i + 1] = total(t[q]);
            }
        }
        for (; i < n_in; i++) dot_rows(8, out, out_row, g, g_row, a, a_row, o, i, len);
    }
    for (; o + 4 <= n_out; o += 4)
        for (int i = 0; i < n_in; i++) dot_rows(4, out, out_row, g, g_row, a, a_row, o, i, len);
    for (; o < n_out; o++)
        for (int i = 0; i < n_in; i++) dot_rows(1, out, out_row, g, g_row, a, a_row, o, i, len);
}

static inline void span(int s, int t_len, int n_layers, int *lo, int *hi) {
    *lo = s - t_len + 1 > 0 ? s - t_len + 1 : 0;
    *hi = s < n_layers - 1 ? s : n_layers - 1;
}

void gru_forward(const float *restrict wp, float *restrict hc, float *restrict acts, int n_layers, int k_nets,
                 int hidden, int width, int wb, int batch, int t_len) {
    const int gw = 4 * hidden, n_steps = t_len + n_layers - 1;
    const size_t hc_lk = (size_t)width * batch, act_lk = (size_t)gw * batch;
    for (int k = 0; k < k_nets; k++) {
        for (int s = 0; s < n_steps; s++) {
            int lo, hi;
            span(s, t_len, n_layers, &lo, &hi);
            for (int l = lo; l <= hi; l++) {
                const size_t lk = (size_t)l * k_nets + k;
                const float *w = wp + lk * gw * width;
                const float *in = hc + ((size_t)s * n_layers * k_nets + lk) * hc_lk;
                float *a = acts + ((size_t)s * n_layers * k_nets + lk) * act_lk;
                float *nxt = hc + ((size_t)(s + 1) * n_layers * k_nets + lk) * hc_lk;
                matmul(a, batch, w, width, 1, in, batch, gw, width, batch);  /* a = w @ in */
                for (int u = 0; u < hidden; u++) {  /* gates and the new state */
                    float *ra = a + (size_t)u * batch, *za = a + (size_t)(hidden + u) * batch;
                    float *na = a + (size_t)(2 * hidden + u) * batch;
                    const float *uh = a + (size_t)(3 * hidden + u) * batch;
                    const float *hp = in + (size_t)(wb + u) * batch;
                    float *hn = nxt + (size_t)(wb + u) * batch;
                    for (int b = 0; b < batch; b += VL) {
                        const vf r = sigmoid(load(ra + b)), z = sigmoid(load(za + b));
                        const vf n = 2.0f * sigmoid(load(na + b) + r * load(uh + b)) - 1.0f;
                        const vf h = load(hp + b);
                        store(ra + b, r);
                        store(za + b, z);
                        store(na + b, n);
                        store(hn + b, select(z < 0.5f, n + z * (h - n), h - (h - n) * (1.0f - z)));  /* torch.lerp */
                    }
                    if (l < n_layers - 1)  /* the next layer's input at the next step */
                        copy(nxt + (size_t)k_nets * hc_lk + (size_t)u * batch, hn, batch);
                }
            }
        }
    }
}

/* dwp[r][j] = sum over (t, b) of gl[r][t][b] * input[j] at step t + l: the inputs gathered into
 * rows like gl's (g_row floats apart), then :func:`dots`. */
static void weight_gradient(float *restrict out, const float *restrict gl, const float *restrict in0,
                            float *restrict rows, size_t step_stride, size_t g_row, int gw, int width, int batch,
                            int t_len) {
    for (int j = 0; j < width; j++)
        for (int t = 0; t < t_len; t++)
            copy(rows + j * g_row + (size_t)t * batch, in0 + t * step_stride + (size_t)j * batch, batch);
    dots(out, width, gl, g_row, rows, g_row, gw, width, (size_t)t_len * batch);
}

/* Floats of work gru_backward needs: the state gradients dh [L][H][B], one layer's input gradient
 * [W][B], one network's gate gradients [L][4H][T][B] and one layer's inputs [W][T][B], their rows
 * t_len * batch + VL floats apart (rows a multiple of 4 KiB apart would share cache sets). */
size_t gru_backward_work(int n_layers, int hidden, int width, int batch, int t_len) {
    const size_t g_row = (size_t)t_len * batch + VL;
    return (size_t)n_layers * hidden * batch + (size_t)width * batch + ((size_t)n_layers * 4 * hidden + width) * g_row;
}

void gru_backward(const float *restrict wp, const float *restrict hc, const float *restrict acts,
                  const float *restrict go, float *restrict dwp, float *restrict dx, float *restrict work,
                  int n_layers, int k_nets, int hidden, int width, int wb, int batch, int t_len, int n_in) {
    /* work: gru_backward_work(...) floats */
    const int gw = 4 * hidden, n_steps = t_len + n_layers - 1;
    const size_t hc_lk = (size_t)width * batch, act_lk = (size_t)gw * batch, g_row = (size_t)t_len * batch + VL;
    const size_t step_stride = (size_t)n_layers * k_nets * hc_lk;  /* hc from one step to the next */
    float *dh = work, *dinp = dh + (size_t)n_layers * hidden * batch, *gs = dinp + (size_t)width * batch;
    float *rows = gs + (size_t)n_layers * gw * g_row;
    for (int k = 0; k < k_nets; k++) {
        memset(dh, 0, sizeof(float) * n_layers * hidden * batch);
        for (int s = n_steps - 1; s >= 0; s--) {
            int lo, hi;
            span(s, t_len, n_layers, &lo, &hi);
            if (hi == n_layers - 1) {
                float *d = dh + (size_t)(n_layers - 1) * hidden * batch;
                const int t = s - n_layers + 1;
                for (int u = 0; u < hidden; u++) {
                    const float *gu = go + (((size_t)k * hidden + u) * t_len + t) * batch;
                    for (int b = 0; b < batch; b++) d[(size_t)u * batch + b] += gu[b];
                }
            }
            for (int l = lo; l <= hi; l++) {
                const size_t lk = (size_t)l * k_nets + k;
                const float *w = wp + lk * gw * width;
                const float *in = hc + (size_t)s * step_stride + lk * hc_lk;
                const float *a = acts + ((size_t)s * n_layers * k_nets + lk) * act_lk;
                float *d = dh + (size_t)l * hidden * batch;
                float *g = gs + (size_t)l * gw * g_row + (size_t)(s - l) * batch;  /* rows g_row apart */
                for (int u = 0; u < hidden; u++) {  /* gate pre-activation gradients */
                    const float *r = a + (size_t)u * batch, *z = a + (size_t)(hidden + u) * batch;
                    const float *n = a + (size_t)(2 * hidden + u) * batch, *uh = a + (size_t)(3 * hidden + u) * batch;
                    const float *hp = in + (size_t)(wb + u) * batch, *du_ = d + (size_t)u * batch;
                    float *gr = g + (size_t)u * g_row, *gz = g + (size_t)(hidden + u) * g_row;
                    float *gn = g + (size_t)(2 * hidden + u) * g_row, *gh = g + (size_t)(3 * hidden + u) * g_row;
                    for (int b = 0; b < batch; b++) {
                        const float dd = du_[b];
                        const float du = (dd - dd * z[b]) * (0.5f - 0.5f * n[b] * n[b]);
                        gn[b] = du;
                        gh[b] = du * r[b];
                        gr[b] = du * uh[b] * (r[b] - r[b] * r[b]);
                        gz[b] = dd * (hp[b] - n[b]) * (z[b] - z[b] * z[b]);
                    }
                }
                matmul(dinp, batch, w, 1, width, g, g_row, width, gw, batch);  /* dinp = w^T @ g */
                for (int u = 0; u < hidden; u++) {  /* the state gradient one time step back */
                    const float *z = a + (size_t)(hidden + u) * batch, *dh_in = dinp + (size_t)(wb + u) * batch;
                    float *du_ = d + (size_t)u * batch;
                    for (int b = 0; b < batch; b++) du_[b] = dh_in[b] + du_[b] * z[b];
                }
                if (l >= 1) {  /* this layer's input gradient goes to the output of the layer below */
                    float *below = dh + (size_t)(l - 1) * hidden * batch;
                    for (size_t i = 0; i < (size_t)hidden * batch; i++) below[i] += dinp[i];
                } else if (dx != NULL) {
                    copy(dx + ((size_t)s * k_nets + k) * n_in * batch, dinp, (size_t)n_in * batch);
                }
            }
        }
        for (int l = 0; l < n_layers; l++)  /* layer l works on time t at step t + l */
            weight_gradient(dwp + ((size_t)l * k_nets + k) * gw * width, gs + (size_t)l * gw * g_row,
                            hc + (size_t)l * step_stride + ((size_t)l * k_nets + k) * hc_lk, rows, step_stride, g_row,
                            gw, width, batch, t_len);
    }
}

/* ---- one training step of K GRU + MLP networks with a BCE loss, a network at a time ------- */

/* log(x) for x in [0.5, 1] and around (the loss's log sigmoid(|z|)): Cephes' single-precision
 * polynomial on the mantissa (relative error about 1e-7). */
static inline vf log_approx(vf x) {
    const vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126;
    vf m = (vf)((bits & 0x807fffff) | 0x3f000000);  /* in [0.5, 1) */
    const vi small = m < 0.707106781186547524f;
    e += small;  /* -1 where small */
    m = select(small, m + m - 1.0f, m - 1.0f);
    const vf z = m * m;
    vf y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m
                + 1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m
         + 3.3333331174e-1f) * m * z;
    const vf fe = __builtin_convertvector(e, vf);
    y += fe * -2.12194440e-4f;
    y += -0.5f * z;
    return m + y + fe * 0.693359375f;
}

#define MAX_HEAD 64  /* head layers at most */

/* Floats of work gru_mlp_step needs. */
size_t gru_mlp_work(const int *sizes, int n_head, int n_layers, int hidden, int width, int batch, int t_len) {
    const size_t gw = 4 * (size_t)hidden, n_steps = (size_t)t_len + n_layers - 1, n = (size_t)t_len * batch;
    size_t widest = 0, acts = 0;
    for (int i = 0; i <= n_head; i++) widest = sizes[i] > (int)widest ? (size_t)sizes[i] : widest;
    for (int i = 0; i < n_head; i++) acts += (size_t)(sizes[i] + 1) * n;
    return 2 * n_layers * gw * width                                   /* one network's wp and dwp */
           + (n_steps + 1) * n_layers * width * batch                  /* its hc */
           + n_steps * n_layers * gw * batch                           /* its acts */
           + gru_backward_work(n_layers, hidden, width, batch, t_len)
           + acts + 2 * (size_t)sizes[n_head] * n + 2 * widest * n    /* head: inputs, logits/y, gradients */
           + (size_t)hidden * n;                                       /* the states' gradient */
}

/* loss[k] = mean BCE of network k's head on its last layer's states against y, and the gradients of
 * loss[k] with respect to network k's wp (dwp) and head matrices (dhead), for every k. With y NULL,
 * the forward only: the logits into out [K, B, T, O] (loss, dwp, dhead unused).
 *   x     [1 or K, B, T, n_in]  (x_shared: one input for all networks)
 *   y     [K, B, T, O]
 *   head  for each head layer i: [K, F(i+1), F(i) + 1] (weight | bias), layers one after another;
 *         sizes = F(0) = H, F(1), ..., F(n_head) = O; ReLU between layers
 *   work  gru_mlp_work(...) floats
 */
void gru_mlp_step(const float *restrict wp, const float *restrict x, int x_shared, const float *restrict y,
                      const float *restrict head, const int *sizes, int n_head, float *restrict loss,
                      float *restrict out, float *restrict dwp, float *restrict dhead, float *restrict work,
                      int n_layers, int k_nets,
                      int hidden, int width, int wb, int batch, int t_len, int n_in) {
    const int gw = 4 * hidden, n_steps = t_len + n_layers - 1, n_out = sizes[n_head];
    const size_t n = (size_t)t_len * batch, per_w = (size_t)gw * width;
    const size_t hc_step = (size_t)n_layers * width * batch;
    float *wpk = work, *dwpk = wpk + n_layers * per_w, *hck = dwpk + n_layers * per_w;
    float *actk = hck + (n_steps + 1) * hc_step;
    float *bwork = actk + (size_t)n_steps * n_layers * gw * batch;
    float *hin = bwork + gru_backward_work(n_layers, hidden, width, batch, t_len);
    float *logits = hin, *target;
    size_t widest = 0;
    for (int i = 0; i <= n_head; i++) widest = sizes[i] > (int)widest ? (size_t)sizes[i] : widest;
    float *h_acts[MAX_HEAD];
    for (int i = 0; i < n_head; i++) {  /* each layer's input with a row of ones (the bias input) */
        h_acts[i] = logits;
        for (size_t m = 0; m < n; m++) h_acts[i][(size_t)sizes[i] * n + m] = 1.0f;
        logits += (size_t)(sizes[i] + 1) * n;
    }
    target = logits + (size_t)n_out * n;
    float *grad_a = target + (size_t)n_out * n, *grad_b = grad_a + widest * n, *go = grad_b + widest * n;
    /* the entries of hc no step writes: bias column, padding, zero initial states */
    memset(hck, 0, sizeof(float) * (n_steps + 1) * hc_step);
    for (int s = 0; s <= n_steps; s++)
        for (int l = 0; l < n_layers; l++)
            for (int b = 0; b < batch; b++) hck[s * hc_step + ((size_t)l * width + width - 1) * batch + b] = 1.0f;
    const float inv = 1.0f / (float)((size_t)n_out * n);
    for (int k = 0; k < k_nets; k++) {
        for (int l = 0; l < n_layers; l++) memcpy(wpk + l * per_w, wp + ((size_t)l * k_nets + k) * per_w, sizeof(float) * per_w);
        const float *xk = x + (x_shared ? 0 : (size_t)k * batch * t_len * n_in);
        for (int t = 0; t < t_len; t++)  /* layer 0's input at step t: x[b][t][:] */
            for (int i = 0; i < n_in; i++)
                for (int b = 0; b < batch; b++)
                    hck[t * hc_step + (size_t)i * batch + b] = xk[((size_t)b * t_len + t) * n_in + i];
        gru_forward(wpk, hck, actk, n_layers, 1, hidden, width, wb, batch, t_len);
        for (int u = 0; u < hidden; u++)  /* the head's input: the last layer's states, [H][T * B] */
            for (int t = 0; t < t_len; t++)
                copy(h_acts[0] + (size_t)u * n + (size_t)t * batch,
                       hck + (t + n_layers) * hc_step + ((size_t)(n_layers - 1) * width + wb + u) * batch, batch);
        size_t off = 0;
        const float *mats[MAX_HEAD];
        float *dmats[MAX_HEAD];
        for (int i = 0; i < n_head; i++) {  /* head forward */
            const size_t per = (size_t)sizes[i + 1] * (sizes[i] + 1);
            mats[i] = head + off + k * per;
            dmats[i] = y == NULL ? NULL : dhead + off + k * per;
            off += per * k_nets;
            float *next = i + 1 < n_head ? h_acts[i + 1] : logits;
            matmul(next, n, mats[i], sizes[i] + 1, 1, h_acts[i], n, sizes[i + 1], sizes[i] + 1, (int)n);
            if (i + 1 < n_head)
                for (size_t m = 0; m < (size_t)sizes[i + 1] * n; m += VL) {
                    const vf v = load(next + m);
                    store(next + m, select(v > 0.0f, v, v - v));
                }
        }
        if (y == NULL) {  /* forward only: logits [O][T * B] -> out[k] [B][T][O] */
            float *outk = out + (size_t)k * n * n_out;
            for (int b = 0; b < batch; b++)
                for (int t = 0; t < t_len; t++)
                    for (int o = 0; o < n_out; o++)
                        outk[((size_t)b * t_len + t) * n_out + o] = logits[(size_t)o * n + (size_t)t * batch + b];
            continue;
        }
        const float *yk = y + (size_t)k * batch * t_len * n_out;
        for (int o = 0; o < n_out; o++)  /* targets in the logits' layout, [O][T * B] */
            for (int t = 0; t < t_len; t++)
                for (int b = 0; b < batch; b++)
                    target[(size_t)o * n + (size_t)t * batch + b] = yk[((size_t)b * t_len + t) * n_out + o];
        vf sum = (vf){0};
        for (size_t m = 0; m < (size_t)n_out * n; m += VL) {  /* BCE and its gradient */
            const vf z = load(logits + m), yy = load(target + m);
            const vf az = select(z > 0.0f, z, -z);
            sum += select(z > 0.0f, z, z - z) - z * yy - log_approx(sigmoid(az));
            store(grad_a + m, (sigmoid(z) - yy) * inv);
        }
        loss[k] = total(sum) * inv;
        float *g = grad_a, *spare = grad_b;
        for (int i = n_head - 1; i >= 0; i--) {  /* head backward */
            dots(dmats[i], sizes[i] + 1, g, n, h_acts[i], n, sizes[i + 1], sizes[i] + 1, n);
            float *below = i > 0 ? spare : go;  /* layer 0: the gradient of the states, [H][T][B] */
            matmul(below, n, mats[i], 1, sizes[i] + 1, g, n, sizes[i], sizes[i + 1], (int)n);
            if (i > 0) {
                for (size_t m = 0; m < (size_t)sizes[i] * n; m += VL) {  /* ReLU */
                    const vf a = load(h_acts[i] + m), d = load(below + m);
                    store(below + m, select(a > 0.0f, d, d - d));
                }
                spare = g;
                g = below;
            }
        }
        gru_backward(wpk, hck, actk, go, dwpk, NULL, bwork, n_layers, 1, hidden, width, wb, batch, t_len, n_in);
        for (int l = 0; l < n_layers; l++) memcpy(dwp + ((size_t)l * k_nets + k) * per_w, dwpk + l * per_w, sizeof(float) * per_w);
    }
}
