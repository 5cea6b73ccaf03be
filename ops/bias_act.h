// bias_act math shared by bias_act.cpp (CPU) and bias_act.cu (CUDA): activations, derivatives, one element.
#pragma once
#include "gf_common.h"

// Activation ids; bias_act.py (ACT_IDS) passes them in this order.
enum GfAct { GF_LINEAR = 0, GF_RELU, GF_LRELU, GF_TANH, GF_SIGMOID, GF_ELU, GF_SELU, GF_SOFTPLUS, GF_SWISH };

// X(id) for every activation: the one list behind each switch that picks an activation's instantiation.
#define GF_FOR_EACH_ACT(X) \
  X(GF_LINEAR) X(GF_RELU) X(GF_LRELU) X(GF_TANH) X(GF_SIGMOID) X(GF_ELU) X(GF_SELU) X(GF_SOFTPLUS) X(GF_SWISH)

// What one call computes: the forward value, or the incoming gradient times the first (from x or from the saved
// output y) or the second derivative with respect to x.
enum GfBiasActMode { GF_FWD = 0, GF_GRAD_X = 1, GF_GRAD2_X = 2, GF_GRAD_Y = 3 };

// SELU constants (Klambauer et al. 2017), as in torch.nn.functional.selu.
#define GF_SELU_ALPHA 1.6732632423543772848170429916717
#define GF_SELU_SCALE 1.0507009873554804934193349852946

// Activation ACT's value a(z), first derivative a'(z) and second derivative a''(z), each computing only itself
// (branch-free selects where possible so that CPU loops vectorize). Conventions at kinks follow PyTorch:
// relu'(0) = 0, lrelu'(0) = alpha, elu'(0) = 1; softplus is linear above 20.
template <int ACT, typename T>
GF_HD T gf_act_value(T z, T alpha) {
  if (ACT == GF_LINEAR) return z;
  if (ACT == GF_RELU) return z > T(0) ? z : T(0);
  if (ACT == GF_LRELU) return z > T(0) ? z : z * alpha;
  if (ACT == GF_TANH) return gf_tanh(z);
  if (ACT == GF_SIGMOID) return T(1) / (T(1) + gf_exp(-z));
  if (ACT == GF_ELU) return z > T(0) ? z : gf_expm1(z);
  if (ACT == GF_SELU) return T(GF_SELU_SCALE) * (z > T(0) ? z : T(GF_SELU_ALPHA) * gf_expm1(z));
  if (ACT == GF_SOFTPLUS) return z > T(20) ? z : gf_log1p(gf_exp(z));
  return z / (T(1) + gf_exp(-z));  // GF_SWISH: z * sigmoid(z)
}

template <int ACT, typename T>
GF_HD T gf_act_d1(T z, T alpha) {
  if (ACT == GF_LINEAR) return T(1);
  if (ACT == GF_RELU) return z > T(0) ? T(1) : T(0);
  if (ACT == GF_LRELU) return z > T(0) ? T(1) : alpha;
  if (ACT == GF_TANH) {
    const T t = gf_tanh(z);
    return T(1) - t * t;
  }
  if (ACT == GF_SIGMOID) {
    const T s = T(1) / (T(1) + gf_exp(-z));
    return s * (T(1) - s);
  }
  if (ACT == GF_SOFTPLUS) return z > T(20) ? T(1) : T(1) / (T(1) + gf_exp(-z));  // sigmoid
  if (ACT == GF_ELU) return z > T(0) ? T(1) : gf_exp(z);
  if (ACT == GF_SELU) return T(GF_SELU_SCALE) * (z > T(0) ? T(1) : T(GF_SELU_ALPHA) * gf_exp(z));
  const T s = T(1) / (T(1) + gf_exp(-z));  // GF_SWISH
  return s * (T(1) + z * (T(1) - s));
}

template <int ACT, typename T>
GF_HD T gf_act_d2(T z, T alpha) {
  if (ACT == GF_LINEAR || ACT == GF_RELU || ACT == GF_LRELU) return T(0);
  if (ACT == GF_TANH) {
    const T t = gf_tanh(z);
    return T(-2) * t * (T(1) - t * t);
  }
  if (ACT == GF_ELU) return z > T(0) ? T(0) : gf_exp(z);
  if (ACT == GF_SELU) return z > T(0) ? T(0) : T(GF_SELU_SCALE * GF_SELU_ALPHA) * gf_exp(z);
  const T s = T(1) / (T(1) + gf_exp(-z));
  if (ACT == GF_SIGMOID) return s * (T(1) - s) * (T(1) - T(2) * s);
  if (ACT == GF_SOFTPLUS) return z > T(20) ? T(0) : s * (T(1) - s);
  return s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));  // GF_SWISH
}

// clamp(y, -c, c), keeping NaN as NaN (like torch.clamp).
template <typename T>
GF_HD T gf_clamp(T y, T c) {
  const T lo = y < -c ? -c : y;
  return y > c ? c : lo;
}

// One element in mode MODE. v is x (FWD, GRAD_X, GRAD2_X; the bias is added here) or the saved output y (GRAD_Y,
// only for linear/relu/lrelu with gain > 0 and alpha >= 0, whose derivative follows from the sign of y). clamp < 0
// means no clamp; where the output is clamped the gradient is zero (PyTorch's clamp passes it at exactly +-clamp).
template <int ACT, int MODE, typename T>
GF_HD T gf_bias_act_point(T v, T bias, T grad, T alpha, T gain, T clamp) {
  if (MODE == GF_GRAD_Y) {
    const T d = ACT == GF_LINEAR ? T(1) : (v > T(0) ? T(1) : (ACT == GF_LRELU ? alpha : T(0)));
    const T r = grad * gain * d;
    return (clamp < T(0) || gf_abs(v) < clamp) ? r : T(0);
  }
  const T z = v + bias;
  if (MODE == GF_FWD) {
    const T y = gf_act_value<ACT, T>(z, alpha) * gain;
    return clamp < T(0) ? y : gf_clamp(y, clamp);
  }
  const T r = grad * gain * (MODE == GF_GRAD_X ? gf_act_d1<ACT, T>(z, alpha) : gf_act_d2<ACT, T>(z, alpha));
  if (clamp < T(0)) return r;
  return gf_abs(gf_act_value<ACT, T>(z, alpha) * gain) <= clamp ? r : T(0);
}

// One element in a run-time mode (uniform across a launch, so no divergence).
template <int ACT, typename T>
GF_HD T gf_bias_act_mode(int mode, T v, T bias, T grad, T alpha, T gain, T clamp) {
  switch (mode) {
    case GF_FWD: return gf_bias_act_point<ACT, GF_FWD, T>(v, bias, grad, alpha, gain, clamp);
    case GF_GRAD_X: return gf_bias_act_point<ACT, GF_GRAD_X, T>(v, bias, grad, alpha, gain, clamp);
    case GF_GRAD2_X: return gf_bias_act_point<ACT, GF_GRAD2_X, T>(v, bias, grad, alpha, gain, clamp);
    default: return gf_bias_act_point<ACT, GF_GRAD_Y, T>(v, bias, grad, alpha, gain, clamp);
  }
}

// ---- The CUDA launch geometry (bias_act.cu), shared with its host emulation (bias_act.cpp, for the tests) ----
// A dense tensor of n elements whose element i has channel (i / inner) % channels (inner = the stride of `dim`) is
// walked in one of two ways, neither dividing per element:
// * rows (inner > 1, e.g. NCHW): rows of `inner` elements, row r of channel r % channels. A work unit is `ty` rows
//   by one tile of tx * vec columns; a block takes units k = blockIdx.x, + gridDim.x, ...; thread (x, y) takes vec
//   consecutive elements of row (k / tiles) * ty + y (one division per unit). The bias-gradient partial sum of a
//   (row, tile) is the block's tree sum over x, written to partial[row * tiles + tile].
// * columns (inner == 1: channels-last, [N, C]): [rows, channels]; thread (x, y) of block (bx, by) takes the vec
//   channels from (bx * tx + x) * vec of rows by * ty + y, + gridDim.y * ty, ...; its per-channel sums (in
//   registers) go to partial[(by * ty + y) * channels + c].
// vec = 16 bytes / element size (one 16-byte load or store) when the row length (or channel count) is a multiple
// of it and every pointer is 16-byte aligned, else 1.
struct GfBiasActGeom {
  int cols;  // 0 = rows, 1 = columns
  int vec, tx, ty;
  int64_t rows, inner, channels, tiles, units;
  int64_t grid_x, grid_y, partials;  // blocks, and the entries of the partial-sum buffer
};

// Smallest power of two >= v (v >= 1), at most `cap`.
inline int gf_pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

// The geometry for n elements (host side); `aligned`: every pointer is 16-byte aligned; max_blocks caps the grid.
inline GfBiasActGeom gf_bias_act_geom(int64_t n, int64_t inner, int64_t channels, bool has_bias, bool aligned,
                                      int elem_size, int64_t max_blocks) {
  GfBiasActGeom g{};
  const int v16 = 16 / elem_size;
  if (!has_bias) {  // one row: the channel does not matter
    inner = n;
    channels = 1;
  }
  g.inner = inner;
  g.channels = channels;
  if (inner == 1) {
    g.cols = 1;
    g.rows = n / channels;
    g.vec = aligned && channels % v16 == 0 ? v16 : 1;
    const int64_t groups = (channels + g.vec - 1) / g.vec;
    g.tx = gf_pow2_at_least(groups, 32);
    g.ty = 256 / g.tx;
    g.grid_x = (groups + g.tx - 1) / g.tx;
    const int64_t want = (g.rows + g.ty - 1) / g.ty;
    const int64_t cap = max_blocks / g.grid_x > 1 ? max_blocks / g.grid_x : 1;
    g.grid_y = want < cap ? want : cap;
    if (g.grid_y > 65535) g.grid_y = 65535;
    g.tiles = 1;
    g.units = g.grid_x * g.grid_y;
    g.partials = g.grid_y * g.ty * channels;
  } else {
    g.cols = 0;
    g.rows = n / inner;
    g.vec = aligned && inner % v16 == 0 ? v16 : 1;
    const int64_t per_row = (inner + g.vec - 1) / g.vec;
    g.tx = gf_pow2_at_least(per_row, 256);
    if (g.tx < 32) g.tx = 32;
    g.ty = 256 / g.tx;
    g.tiles = (per_row + g.tx - 1) / g.tx;
    g.units = (g.rows + g.ty - 1) / g.ty * g.tiles;
    g.grid_x = g.units < max_blocks ? g.units : max_blocks;
    g.grid_y = 1;
    g.partials = g.rows * g.tiles;
  }
  return g;
}

// One thread's share of a work unit: the first element, how many (0 or vec in the vector case, up to vec at a
// row's end otherwise), the channel of its first element, and its partial-sum slot (-1: none).
struct GfBiasActSpan {
  int64_t start, channel, partial;
  int count;
};

// Rows walk: unit k, thread (x, y).
GF_HD GfBiasActSpan gf_rows_span(const GfBiasActGeom& g, int64_t k, int x, int y) {
  const int64_t group = k / g.tiles;  // once per unit and thread, not per element
  const int64_t tile = k - group * g.tiles;
  const int64_t row = group * g.ty + y;
  const int64_t col = (tile * g.tx + x) * g.vec;
  GfBiasActSpan s{0, 0, -1, 0};
  if (row < g.rows) {
    s.channel = row % g.channels;
    s.partial = row * g.tiles + tile;
    if (col < g.inner) {
      s.start = row * g.inner + col;
      s.count = (int)(g.inner - col < g.vec ? g.inner - col : g.vec);
    }
  }
  return s;
}

// Columns walk: the first channel of thread x of block bx (>= channels: idle) and its partial-sum row slot.
GF_HD int64_t gf_cols_channel(const GfBiasActGeom& g, int64_t bx, int x) { return (bx * g.tx + x) * g.vec; }

// `count` (0 or VEC) consecutive elements from i, with 16-byte loads and stores when VEC > 1, element j with
// bias[j]; returns the sum of the stored outputs (as rounded to scalar_t) and, with want_lanes, adds each output to
// lanes[j] (an array, not a pointer, so that it stays in registers; not touched without want_lanes).
template <typename scalar_t, int ACT, int VEC>
GF_HD typename GfAcc<scalar_t>::type gf_bias_act_vec(const scalar_t* v, const scalar_t* g, scalar_t* out, int64_t i,
                                                      int count, const typename GfAcc<scalar_t>::type* bias, int mode,
                                                      typename GfAcc<scalar_t>::type alpha,
                                                      typename GfAcc<scalar_t>::type gain,
                                                      typename GfAcc<scalar_t>::type clamp, bool want_lanes,
                                                      typename GfAcc<scalar_t>::type (&lanes)[VEC]) {
  using acc_t = typename GfAcc<scalar_t>::type;
  struct alignas(16) Pack { scalar_t e[VEC]; };
  acc_t sum = 0;
  if (VEC > 1 && count == VEC) {
    const Pack pv = *reinterpret_cast<const Pack*>(v + i);
    Pack pg = {};
    if (g) pg = *reinterpret_cast<const Pack*>(g + i);
    Pack po;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t r = gf_bias_act_mode<ACT, acc_t>(mode, (acc_t)pv.e[j], bias[j], (acc_t)pg.e[j], alpha, gain,
                                                   clamp);
      po.e[j] = (scalar_t)r;
      sum += (acc_t)po.e[j];
      if (want_lanes) lanes[j] += (acc_t)po.e[j];
    }
    *reinterpret_cast<Pack*>(out + i) = po;
    return sum;
  }
  if (VEC > 1) return sum;  // the geometry gives count 0 or VEC when VEC > 1 (no partial packs)
  if (count > 0) {
    const int j = 0;
    const acc_t r = gf_bias_act_mode<ACT, acc_t>(mode, (acc_t)v[i + j], bias[j], g ? (acc_t)g[i + j] : acc_t(0),
                                                 alpha, gain, clamp);
    out[i + j] = (scalar_t)r;
    sum += (acc_t)out[i + j];
    if (want_lanes) lanes[j] += (acc_t)out[i + j];
  }
  return sum;
}

// The block's tree sum over x of red[y * tx + x] (tx a power of two), in the order the CUDA kernel adds them
// (halving strides); the host emulation calls it to reproduce the kernel's sums bit for bit.
template <typename acc_t>
inline acc_t gf_tree_sum(acc_t* red, int tx) {
  for (int w = tx / 2; w > 0; w /= 2)
    for (int x = 0; x < w; ++x) red[x] += red[x + w];
  return red[0];
}
