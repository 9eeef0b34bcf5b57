/* The GRU wavefront of mlds/nets/recurrent.py as two C loops: forward (saving what the
 * backward needs) and backward through time, for K independent networks.
 *
 * Same buffers, layouts and equations as the operator path (_forward / _backward with
 * save=True), which stays the reference: tests/test_recurrent.py holds the two equal.
 * One network at a time, so that its activations (about 0.6 MiB for DS1) stay in cache;
 * every inner loop runs over the batch and is vectorised by the compiler.
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

/* out[o][b] = sum_i w[o * so + i * si] * in[i * in_row + b] for o < n_out, i < n_sum: two vectors of the
 * batch accumulate in registers while the row of w is broadcast. */
static void matmul(float *restrict out, const float *restrict w, int so, int si, const float *restrict in,
                   size_t in_row, int n_out, int n_sum, int batch) {
    int b = 0;
    for (; b + 2 * VL <= batch; b += 2 * VL)
        for (int o = 0; o < n_out; o++) {
            vf a0 = (vf){0}, a1 = (vf){0};
            for (int i = 0; i < n_sum; i++) {
                const float wi = w[(size_t)o * so + (size_t)i * si];
                const float *row = in + i * in_row + b;
                a0 += wi * load(row);
                a1 += wi * load(row + VL);
            }
            float *dst = out + (size_t)o * batch + b;
            store(dst, a0);
            store(dst + VL, a1);
        }
    for (; b < batch; b += VL)
        for (int o = 0; o < n_out; o++) {
            vf a0 = (vf){0};
            for (int i = 0; i < n_sum; i++) a0 += w[(size_t)o * so + (size_t)i * si] * load(in + i * in_row + b);
            store(out + (size_t)o * batch + b, a0);
        }
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
                matmul(a, w, width, 1, in, batch, gw, width, batch);  /* a = w @ in */
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
                        memcpy(nxt + (size_t)k_nets * hc_lk + (size_t)u * batch, hn, sizeof(float) * batch);
                }
            }
        }
    }
}

/* dwp[r][j] = sum over (t, b) of gl[r][t][b] * input[j] at step t + l: the inputs gathered into
 * rows like gl's (g_row floats apart), then four rows of gl at a time, the sums kept per lane in
 * registers and added up at the end. */
static void weight_gradient(float *restrict out, const float *restrict gl, const float *restrict in0,
                            float *restrict rows, size_t step_stride, size_t g_row, int gw, int width, int batch,
                            int t_len) {
    for (int j = 0; j < width; j++)
        for (int t = 0; t < t_len; t++)
            memcpy(rows + j * g_row + (size_t)t * batch, in0 + t * step_stride + (size_t)j * batch,
                   sizeof(float) * batch);
    const size_t n = (size_t)t_len * batch;
    for (int r = 0; r < gw; r += 4)
        for (int j = 0; j < width; j++) {
            vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
            const float *g0 = gl + (size_t)r * g_row, *inj = rows + j * g_row;
            for (size_t i = 0; i < n; i += VL) {
                const vf x = load(inj + i);
                a0 += load(g0 + i) * x;
                a1 += load(g0 + g_row + i) * x;
                a2 += load(g0 + 2 * g_row + i) * x;
                a3 += load(g0 + 3 * g_row + i) * x;
            }
            float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
            for (int v = 0; v < VL; v++) {
                t0 += a0[v];
                t1 += a1[v];
                t2 += a2[v];
                t3 += a3[v];
            }
            out[(size_t)r * width + j] = t0;
            out[(size_t)(r + 1) * width + j] = t1;
            out[(size_t)(r + 2) * width + j] = t2;
            out[(size_t)(r + 3) * width + j] = t3;
        }
}

void gru_backward(const float *restrict wp, const float *restrict hc, const float *restrict acts,
                  const float *restrict go, float *restrict dwp, float *restrict dx, float *restrict work,
                  int n_layers, int k_nets, int hidden, int width, int wb, int batch, int t_len, int n_in) {
    /* work: n_layers * hidden * batch (dh) + width * batch (dinp) + (n_layers * 4 * hidden + width) * g_row
     * (one network's gate gradients [L][4H][T][B] and one layer's inputs [W][T][B], rows g_row apart) floats,
     * g_row = t_len * batch + VL: rows a multiple of 4 KiB apart would share cache sets */
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
                matmul(dinp, w, 1, width, g, g_row, width, gw, batch);  /* dinp = w^T @ g */
                for (int u = 0; u < hidden; u++) {  /* the state gradient one time step back */
                    const float *z = a + (size_t)(hidden + u) * batch, *dh_in = dinp + (size_t)(wb + u) * batch;
                    float *du_ = d + (size_t)u * batch;
                    for (int b = 0; b < batch; b++) du_[b] = dh_in[b] + du_[b] * z[b];
                }
                if (l >= 1) {  /* this layer's input gradient goes to the output of the layer below */
                    float *below = dh + (size_t)(l - 1) * hidden * batch;
                    for (size_t i = 0; i < (size_t)hidden * batch; i++) below[i] += dinp[i];
                } else if (dx != NULL) {
                    memcpy(dx + ((size_t)s * k_nets + k) * n_in * batch, dinp, sizeof(float) * n_in * batch);
                }
            }
        }
        for (int l = 0; l < n_layers; l++)  /* layer l works on time t at step t + l */
            weight_gradient(dwp + ((size_t)l * k_nets + k) * gw * width, gs + (size_t)l * gw * g_row,
                            hc + (size_t)l * step_stride + ((size_t)l * k_nets + k) * hc_lk, rows, step_stride, g_row,
                            gw, width, batch, t_len);
    }
}
