// Fused upsample + pad + FIR filter + downsample: CPU kernels (OpenMP, polyphase, separable when possible), bindings.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/outer.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include <algorithm>
#include <vector>

#include "upfirdn2d.h"

// Defined in upfirdn2d_gpu.cpp: the GPU kernels' call on CUDA, or emulated on the CPU (`general`: no tiles).
at::Tensor upfirdn2d_gpu_design(const at::Tensor& x, at::Tensor f, int upx, int upy, int downx, int downy, int px0,
                                int py0, int OH, int OW, bool flip, double gain, bool general);

// Below this many outputs a call runs on one thread (a parallel region costs more than it saves, and on a busy
// machine a descheduled worker stalls the whole region).
static const int64_t kMinParallel = 1 << 15;

// Geometry of one call.
struct Geom {
  int64_t planes;
  int H, W, OH, OW, upx, upy, downx, downy, px0, py0, px1, py1;
};

// The taps of every output column / row (shared by all planes).
static std::vector<GfTaps> taps_table(int out_len, int up, int down, int pad0, int in_len, int ftaps) {
  std::vector<GfTaps> t(out_len);
  for (int o = 0; o < out_len; ++o) t[o] = gf_taps(o, up, down, pad0, in_len, ftaps);
  return t;
}

// Floor and ceiling of a / b for b > 0.
static inline int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
static inline int ceil_div(int a, int b) { return floor_div(a + b - 1, b); }

// acc[o] = sum_k w[k] * row[o*down + k - pad0] for one row with up == 1 and F taps known at compile time, in one
// vectorized pass with the sum in registers. When some taps fall outside the row, the row is first copied into the
// zero-padded buffer `padbuf` (at least (out_len-1)*down + F long), so the loop has no edge cases.
template <int F, typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE void row_filter_fixed(const scalar_t* row, int in_len, acc_t* acc, int out_len, const acc_t* w,
                                      int down, int pad0, scalar_t* padbuf) {
  const int lo = std::min(out_len, std::max(0, ceil_div(pad0, down)));
  const int hi = std::max(lo, std::min(out_len, floor_div(in_len - F + pad0, down) + 1));
  const scalar_t* base = row - pad0;  // output o reads base[o*down + k]
  if (lo > 0 || hi < out_len) {
    const int len = (out_len - 1) * down + F;  // padbuf[j] = row[j - pad0], zero outside the row
    const int c0 = std::min(std::max(pad0, 0), len), c1 = std::min(std::max(pad0 + in_len, c0), len);
    std::fill(padbuf, padbuf + c0, scalar_t(0));
    std::copy(row + (c0 - pad0), row + (c1 - pad0), padbuf + c0);
    std::fill(padbuf + c1, padbuf + len, scalar_t(0));
    base = padbuf;
  }
  acc_t wk[F];
  for (int k = 0; k < F; ++k) wk[k] = w[k];
  if (down == 1) {
#pragma omp simd
    for (int o = 0; o < out_len; ++o) {
      acc_t s = acc_t(0);
      for (int k = 0; k < F; ++k) s += wk[k] * (acc_t)base[o + k];
      acc[o] = s;
    }
  } else {
#pragma omp simd
    for (int o = 0; o < out_len; ++o) {
      acc_t s = acc_t(0);
      for (int k = 0; k < F; ++k) s += wk[k] * (acc_t)base[o * down + k];
      acc[o] = s;
    }
  }
}

// acc[o] (+)= sum_k w[k] * row[o*down + k - pad0 (/up)] for one row (assigns when `assign`, else accumulates):
// fixed-size register sums for up == 1 and up to 8 taps, shifted multiply-adds for other up == down == 1 cases,
// else the polyphase gather of each output's taps.
template <typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE void row_filter(const scalar_t* row, int in_len, acc_t* acc, int out_len, const acc_t* w,
                                int ftaps, int up, int down, int pad0, const GfTaps* tab, bool assign,
                                scalar_t* padbuf) {
  if (assign && up == 1 && ftaps <= 8 && padbuf) {
#define GF_FIXED(F) \
  case F: return row_filter_fixed<F, acc_t, scalar_t>(row, in_len, acc, out_len, w, down, pad0, padbuf);
    switch (ftaps) { GF_FIXED(1) GF_FIXED(2) GF_FIXED(3) GF_FIXED(4) GF_FIXED(5) GF_FIXED(6) GF_FIXED(7) GF_FIXED(8) }
#undef GF_FIXED
  }
  if (up == 1 && down == 1) {
    if (assign) std::fill(acc, acc + out_len, acc_t(0));
    for (int k = 0; k < ftaps; ++k) {
      const int off = k - pad0;  // output o reads row[o + off]
      const int lo = std::max(0, -off), hi = std::min(out_len, in_len - off);
      const acc_t wk = w[k];
      const scalar_t* src = row + off;
#pragma omp simd
      for (int o = lo; o < hi; ++o) acc[o] += wk * (acc_t)src[o];
    }
    return;
  }
  for (int o = 0; o < out_len; ++o) {
    const GfTaps t = tab[o];
    acc_t s = acc_t(0);
    for (int b = 0; b < t.n; ++b) s += (acc_t)row[t.i0 + b] * w[t.k0 + b * up];
    acc[o] = assign ? s : acc[o] + s;
  }
}

// out[o] = sum_a w[a] * rows[a][o] for N rows known at compile time, in one vectorized pass.
template <int N, typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE void weighted_rows_fixed(scalar_t* out, const acc_t* const* rows, const acc_t* w, int len) {
  acc_t wk[N];
  const acc_t* r[N];
  for (int a = 0; a < N; ++a) {
    wk[a] = w[a];
    r[a] = rows[a];
  }
#pragma omp simd
  for (int o = 0; o < len; ++o) {
    acc_t s = acc_t(0);
    for (int a = 0; a < N; ++a) s += wk[a] * r[a][o];
    out[o] = (scalar_t)s;
  }
}

// Rows `rows[a]` weighted by w[a], summed into out (converted to scalar_t); zero when there are no rows.
template <typename acc_t, typename scalar_t>
GF_ALWAYS_INLINE void weighted_rows(scalar_t* out, const acc_t* const* rows, const acc_t* w, int n, int len,
                                   acc_t* acc) {
#define GF_FIXED(N) \
  case N: return weighted_rows_fixed<N, acc_t, scalar_t>(out, rows, w, len);
  switch (n) { GF_FIXED(1) GF_FIXED(2) GF_FIXED(3) GF_FIXED(4) GF_FIXED(5) GF_FIXED(6) GF_FIXED(7) GF_FIXED(8) }
#undef GF_FIXED
  if (n == 0) {
    std::fill(out, out + len, scalar_t(0));
    return;
  }
  const acc_t w0 = w[0];
  const acc_t* r0 = rows[0];
#pragma omp simd
  for (int o = 0; o < len; ++o) acc[o] = w0 * (acc_t)r0[o];
  for (int a = 1; a < n; ++a) {
    const acc_t wa = w[a];
    const acc_t* ra = rows[a];
#pragma omp simd
    for (int o = 0; o < len; ++o) acc[o] += wa * (acc_t)ra[o];
  }
#pragma omp simd
  for (int o = 0; o < len; ++o) out[o] = (scalar_t)acc[o];
}

// Per-thread scratch buffers.
template <typename scalar_t>
struct Scratch {
  using acc_t = typename GfAcc<scalar_t>::type;
  std::vector<acc_t> tmp, acc, wrow;
  std::vector<const acc_t*> rows;
  std::vector<scalar_t> pad;
};

// One plane with a separable filter (wy[fh] x wx[fw]): each input row filtered horizontally into tmp [H, OW], then
// each output row is a weighted sum of its (at most ceil(fh/up)) tmp rows. One call per plane, so the AVX2 clone
// is picked once per plane rather than per row.
template <typename scalar_t>
GF_CPU_CLONES static void plane_separable(const scalar_t* xp, scalar_t* yp, const Geom* g,
                                          const typename GfAcc<scalar_t>::type* wx, int fw,
                                          const typename GfAcc<scalar_t>::type* wy, const GfTaps* tx,
                                          const GfTaps* ty, Scratch<scalar_t>* s) {
  using acc_t = typename GfAcc<scalar_t>::type;
  for (int iy = 0; iy < g->H; ++iy)
    row_filter<acc_t, scalar_t>(xp + (int64_t)iy * g->W, g->W, s->tmp.data() + (int64_t)iy * g->OW, g->OW, wx, fw,
                                g->upx, g->downx, g->px0, tx, true, s->pad.data());
  for (int oy = 0; oy < g->OH; ++oy) {
    const GfTaps t = ty[oy];
    for (int a = 0; a < t.n; ++a) {
      s->rows[a] = s->tmp.data() + (int64_t)(t.i0 + a) * g->OW;
      s->wrow[a] = wy[t.k0 + a * g->upy];
    }
    weighted_rows<acc_t, scalar_t>(yp + (int64_t)oy * g->OW, s->rows.data(), s->wrow.data(), t.n, g->OW,
                                          s->acc.data());
  }
}

// One plane, no resampling, non-negative padding, square separable F-tap filter: the plane is copied into the
// interior of a zero-bordered [Hp, Wp] buffer (the border is zeroed once per thread), filtered horizontally as one
// long 1-D signal (each row's valid outputs only read that row), then vertically row by row into y. No per-row edge
// handling, which is what dominates small planes (8x8 to 32x32 with hundreds of channels).
template <int F, typename scalar_t>
GF_ALWAYS_INLINE void plane_padded_fixed(const scalar_t* xp, scalar_t* yp, const Geom* g,
                                         const typename GfAcc<scalar_t>::type* wx,
                                         const typename GfAcc<scalar_t>::type* wy, Scratch<scalar_t>* s) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const int Wp = g->W + g->px0 + g->px1, Hp = g->H + g->py0 + g->py1;
  scalar_t* pb = s->pad.data();
  for (int iy = 0; iy < g->H; ++iy)
    std::copy(xp + (int64_t)iy * g->W, xp + (int64_t)(iy + 1) * g->W, pb + (int64_t)(iy + g->py0) * Wp + g->px0);
  acc_t wxk[F], wyk[F];
  for (int k = 0; k < F; ++k) {
    wxk[k] = wx[k];
    wyk[k] = wy[k];
  }
  acc_t* tmp = s->tmp.data();
  const int64_t n = (int64_t)Hp * Wp;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t t = acc_t(0);
    for (int k = 0; k < F; ++k) t += wxk[k] * (acc_t)pb[j + k];
    tmp[j] = t;
  }
  for (int oy = 0; oy < g->OH; ++oy) {
    const acc_t* src = tmp + (int64_t)oy * Wp;
    scalar_t* out = yp + (int64_t)oy * g->OW;
#pragma omp simd
    for (int ox = 0; ox < g->OW; ++ox) {
      acc_t t = acc_t(0);
      for (int k = 0; k < F; ++k) t += wyk[k] * src[(int64_t)k * Wp + ox];
      out[ox] = (scalar_t)t;
    }
  }
}

// plane_padded_fixed for a runtime tap count (1..8), compiled with an AVX2 clone.
template <typename scalar_t>
GF_CPU_CLONES static void plane_padded(const scalar_t* xp, scalar_t* yp, const Geom* g, int f,
                                       const typename GfAcc<scalar_t>::type* wx,
                                       const typename GfAcc<scalar_t>::type* wy, Scratch<scalar_t>* s) {
#define GF_FIXED(F) \
  case F: return plane_padded_fixed<F, scalar_t>(xp, yp, g, wx, wy, s);
  switch (f) { GF_FIXED(1) GF_FIXED(2) GF_FIXED(3) GF_FIXED(4) GF_FIXED(5) GF_FIXED(6) GF_FIXED(7) GF_FIXED(8) }
#undef GF_FIXED
}

// Separable filter over all planes (N*C), in parallel.
template <typename scalar_t>
static void upfirdn2d_separable(const scalar_t* x, scalar_t* y, const Geom& g, const std::vector<double>& wx_d,
                                const std::vector<double>& wy_d) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const std::vector<acc_t> wx(wx_d.begin(), wx_d.end()), wy(wy_d.begin(), wy_d.end());
  const int fw = (int)wx.size(), fh = (int)wy.size();
  const auto tx = taps_table(g.OW, g.upx, g.downx, g.px0, g.W, fw);
  const auto ty = taps_table(g.OH, g.upy, g.downy, g.py0, g.H, fh);
  const bool padded = g.upx == 1 && g.upy == 1 && g.downx == 1 && g.downy == 1 && fw == fh && fw <= 8 &&
                      g.px0 >= 0 && g.px1 >= 0 && g.py0 >= 0 && g.py1 >= 0;
  const size_t padded_len = (size_t)(g.H + g.py0 + g.py1) * (g.W + g.px0 + g.px1) + fw;
#pragma omp parallel if (g.planes * g.OH * g.OW >= kMinParallel)
  {
    Scratch<scalar_t> s;
    if (padded) {
      s.pad.assign(padded_len, scalar_t(0));
      s.tmp.resize(padded_len);
    } else {
      s.pad.resize((size_t)g.OW * g.downx + fw);
      s.tmp.resize((size_t)g.H * g.OW);
      s.acc.resize(g.OW);
      s.rows.resize(fh);
      s.wrow.resize(fh);
    }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < g.planes; ++p) {
      if (padded)
        plane_padded<scalar_t>(x + p * g.H * g.W, y + p * g.OH * g.OW, &g, fw, wx.data(), wy.data(), &s);
      else
        plane_separable<scalar_t>(x + p * g.H * g.W, y + p * g.OH * g.OW, &g, wx.data(), fw, wy.data(), tx.data(),
                                  ty.data(), &s);
    }
  }
}

// One plane with a full 2-D filter w[fh, fw]: each output row accumulates its contributing input rows.
template <typename scalar_t>
GF_CPU_CLONES static void plane_direct(const scalar_t* xp, scalar_t* yp, const Geom* g,
                                       const typename GfAcc<scalar_t>::type* w, int fw, const GfTaps* tx,
                                       const GfTaps* ty, typename GfAcc<scalar_t>::type* acc) {
  using acc_t = typename GfAcc<scalar_t>::type;
  for (int oy = 0; oy < g->OH; ++oy) {
    const GfTaps t = ty[oy];
    std::fill(acc, acc + g->OW, acc_t(0));
    for (int a = 0; a < t.n; ++a)
      row_filter<acc_t, scalar_t>(xp + (int64_t)(t.i0 + a) * g->W, g->W, acc, g->OW,
                                  w + (int64_t)(t.k0 + a * g->upy) * fw, fw, g->upx, g->downx, g->px0, tx, false,
                                  nullptr);
    scalar_t* out = yp + (int64_t)oy * g->OW;
    for (int o = 0; o < g->OW; ++o) out[o] = (scalar_t)acc[o];
  }
}

// Full 2-D filter over all planes, in parallel.
template <typename scalar_t>
static void upfirdn2d_direct(const scalar_t* x, scalar_t* y, const Geom& g, const std::vector<double>& w_d, int fh,
                             int fw) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const std::vector<acc_t> w(w_d.begin(), w_d.end());
  const auto tx = taps_table(g.OW, g.upx, g.downx, g.px0, g.W, fw);
  const auto ty = taps_table(g.OH, g.upy, g.downy, g.py0, g.H, fh);
#pragma omp parallel if (g.planes * g.OH * g.OW >= kMinParallel)
  {
    std::vector<acc_t> acc(g.OW);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < g.planes; ++p)
      plane_direct<scalar_t>(x + p * g.H * g.W, y + p * g.OH * g.OW, &g, w.data(), fw, tx.data(), ty.data(),
                             acc.data());
  }
}

// o[c] = sum_k w[k] * src[k*stride + c] for c < len, N taps known at compile time: the sum stays in registers and
// each output is written once.
template <int N, typename out_t, typename acc_t, typename in_t>
GF_ALWAYS_INLINE void taps_cl_fixed(out_t* o, const in_t* src, int64_t stride, const acc_t* w, int64_t len) {
  acc_t wk[N];
  for (int k = 0; k < N; ++k) wk[k] = w[k];
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    acc_t s = acc_t(0);
    for (int k = 0; k < N; ++k) s += wk[k] * (acc_t)src[k * stride + c];
    o[c] = (out_t)s;
  }
}

// The same for any n (zero taps: zeros), through the fixed versions for 1..8 taps; `acc` holds len values.
template <typename out_t, typename acc_t, typename in_t>
GF_ALWAYS_INLINE void taps_cl(out_t* o, const in_t* src, int64_t stride, const acc_t* w, int n, int64_t len,
                              acc_t* acc) {
#define GF_FIXED(N) \
  case N: return taps_cl_fixed<N, out_t, acc_t, in_t>(o, src, stride, w, len);
  switch (n) { GF_FIXED(1) GF_FIXED(2) GF_FIXED(3) GF_FIXED(4) GF_FIXED(5) GF_FIXED(6) GF_FIXED(7) GF_FIXED(8) }
#undef GF_FIXED
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) acc[c] = acc_t(0);
  for (int k = 0; k < n; ++k) {
    const acc_t wk = w[k];
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) acc[c] += wk * (acc_t)src[k * stride + c];
  }
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) o[c] = (out_t)acc[c];
}

// Channels-last image n (x [H, W, C], y [OH, OW, C] in memory): every tap multiplies a whole C-vector, so the inner
// loops run over channels, contiguous in memory (no copy to contiguous and back). Output rows go in bands of kBand:
// with a separable filter, each input row the band reads is filtered horizontally once into tmp [rows, OW, C], then
// each output row sums its vertical taps of tmp; otherwise each output pixel sums its 2-D taps of x.
static const int kBand = 8;

template <typename scalar_t>
GF_CPU_CLONES static void band_cl(const scalar_t* x, scalar_t* y, const Geom* g, int C, int oy0, int oy1,
                                  const typename GfAcc<scalar_t>::type* w, int fw,
                                  const typename GfAcc<scalar_t>::type* wx, const typename GfAcc<scalar_t>::type* wy,
                                  bool separable, const GfTaps* tx, const GfTaps* ty,
                                  typename GfAcc<scalar_t>::type* tmp, typename GfAcc<scalar_t>::type* acc,
                                  typename GfAcc<scalar_t>::type* wv) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const int64_t rowlen = (int64_t)g->W * C, orowlen = (int64_t)g->OW * C;
  if (separable) {
    int r0 = g->H, r1 = 0;  // the input rows the band reads
    for (int oy = oy0; oy < oy1; ++oy)
      if (ty[oy].n > 0) {
        r0 = std::min(r0, ty[oy].i0);
        r1 = std::max(r1, ty[oy].i0 + ty[oy].n);
      }
    for (int iy = r0; iy < r1; ++iy) {
      const scalar_t* xr = x + iy * rowlen;
      acc_t* tr = tmp + (int64_t)(iy - r0) * orowlen;
      for (int ox = 0; ox < g->OW; ++ox) {
        const GfTaps t = tx[ox];
        for (int b = 0; b < t.n; ++b) wv[b] = wx[t.k0 + b * g->upx];
        taps_cl<acc_t, acc_t, scalar_t>(tr + (int64_t)ox * C, xr + (int64_t)t.i0 * C, C, wv, t.n, C, acc);
      }
    }
    for (int oy = oy0; oy < oy1; ++oy) {
      const GfTaps t = ty[oy];
      for (int a = 0; a < t.n; ++a) wv[a] = wy[t.k0 + a * g->upy];
      const acc_t* t0 = tmp + (int64_t)(t.n > 0 ? t.i0 - r0 : 0) * orowlen;
      taps_cl<scalar_t, acc_t, acc_t>(y + oy * orowlen, t0, orowlen, wv, t.n, orowlen, acc);
    }
    return;
  }
  for (int oy = oy0; oy < oy1; ++oy) {
    const GfTaps t = ty[oy];
    for (int ox = 0; ox < g->OW; ++ox) {
      const GfTaps u = tx[ox];
#pragma omp simd
      for (int c = 0; c < C; ++c) acc[c] = acc_t(0);
      for (int a = 0; a < t.n; ++a) {
        const scalar_t* xr = x + (t.i0 + a) * rowlen + (int64_t)u.i0 * C;
        const acc_t* wr = w + (int64_t)(t.k0 + a * g->upy) * fw + u.k0;
        for (int b = 0; b < u.n; ++b) {
          const acc_t wk = wr[b * g->upx];
          const scalar_t* src = xr + (int64_t)b * C;
#pragma omp simd
          for (int c = 0; c < C; ++c) acc[c] += wk * (acc_t)src[c];
        }
      }
      scalar_t* o = y + oy * orowlen + (int64_t)ox * C;
#pragma omp simd
      for (int c = 0; c < C; ++c) o[c] = (scalar_t)acc[c];
    }
  }
}

// All images of a channels-last x, in parallel over (image, band of output rows).
template <typename scalar_t>
static void upfirdn2d_cl(const scalar_t* x, scalar_t* y, const Geom& g, int N, int C, const std::vector<double>& w_d,
                         int fh, int fw, const std::vector<double>& wx_d, const std::vector<double>& wy_d,
                         bool separable) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const std::vector<acc_t> w(w_d.begin(), w_d.end()), wx(wx_d.begin(), wx_d.end()), wy(wy_d.begin(), wy_d.end());
  const auto tx = taps_table(g.OW, g.upx, g.downx, g.px0, g.W, fw);
  const auto ty = taps_table(g.OH, g.upy, g.downy, g.py0, g.H, fh);
  const int bands = (g.OH + kBand - 1) / kBand;
  const int rows = ((kBand - 1) * g.downy) / g.upy + 2 + fh;  // input rows one band can read, at most
  const int64_t work = (int64_t)N * bands;
#pragma omp parallel if ((int64_t)N * C * g.OH * g.OW >= kMinParallel)
  {
    std::vector<acc_t> tmp(separable ? (size_t)std::min(rows, g.H) * g.OW * C : 0);
    std::vector<acc_t> acc(separable ? (size_t)g.OW * C : (size_t)C), wv(std::max(fw, fh));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < work; ++i) {
      const int n = (int)(i / bands), oy0 = (int)(i % bands) * kBand;
      band_cl<scalar_t>(x + (int64_t)n * g.H * g.W * C, y + (int64_t)n * g.OH * g.OW * C, &g, C, oy0,
                        std::min(oy0 + kBand, g.OH), w.data(), fw, wx.data(), wy.data(), separable, tx.data(),
                        ty.data(), tmp.data(), acc.data(), wv.data());
    }
  }
}

// Factor a [fh, fw] filter as col (x) row when it is rank one to within `tol` of its largest tap.
static bool factor_rank1(const std::vector<double>& w, int fh, int fw, double tol, std::vector<double>& col,
                         std::vector<double>& row) {
  int best = 0;
  for (int i = 1; i < fh * fw; ++i)
    if (std::abs(w[i]) > std::abs(w[best])) best = i;
  const double m = w[best];
  if (m == 0) return false;
  const int bi = best / fw, bj = best % fw;
  col.assign(fh, 0);
  row.assign(fw, 0);
  for (int i = 0; i < fh; ++i) col[i] = w[i * fw + bj] / m;
  for (int j = 0; j < fw; ++j) row[j] = w[bi * fw + j];
  for (int i = 0; i < fh; ++i)
    for (int j = 0; j < fw; ++j)
      if (std::abs(col[i] * row[j] - w[i * fw + j]) > tol * std::abs(m)) return false;
  return true;
}

// The filter in correlation order with the gain folded in: w[ky, kx] = gain * f[fh-1-ky, fw-1-kx] (true
// convolution), or gain * f[ky, kx] when flip_filter. A 1-D filter f becomes the separable pair (f', f').
static at::Tensor correlation_filter(at::Tensor f, bool flip, double gain, at::ScalarType dtype) {
  auto w = f.to(dtype);
  if (!flip) w = w.flip(f.dim() == 1 ? std::vector<int64_t>{0} : std::vector<int64_t>{0, 1});
  if (f.dim() == 1) {
    w = at::outer(w, w);
  }
  return w.mul(gain).contiguous();
}

// y = upfirdn2d(x, f, ...) for x [N, C, H, W]. On the CPU, path 0 picks the fastest CPU kernel, 1 forces the direct
// 2-D kernel, 2 and 3 run the GPU kernels emulated (2: the general kernel, 3: the tiled variant CUDA would pick).
at::Tensor upfirdn2d(at::Tensor x, at::Tensor f, int64_t upx, int64_t upy, int64_t downx, int64_t downy,
                        int64_t px0, int64_t px1, int64_t py0, int64_t py1, bool flip, double gain, int64_t path) {
  TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be [N, C, H, W]");
  TORCH_CHECK(f.dim() == 1 || f.dim() == 2, "upfirdn2d: filter must be 1-D or 2-D");
  TORCH_CHECK(upx >= 1 && upy >= 1 && downx >= 1 && downy >= 1, "upfirdn2d: factors must be >= 1");
  const int fw = (int)(f.dim() == 1 ? f.size(0) : f.size(1)), fh = (int)f.size(0);
  const int H = (int)x.size(2), W = (int)x.size(3);
  const int OW = gf_out_len(W, (int)upx, (int)downx, (int)px0, (int)px1, fw);
  const int OH = gf_out_len(H, (int)upy, (int)downy, (int)py0, (int)py1, fh);
  TORCH_CHECK(OW >= 1 && OH >= 1 && W * upx + px0 + px1 >= fw && H * upy + py0 + py1 >= fh,
              "upfirdn2d: empty output");
  TORCH_CHECK(f.device() == x.device(), "upfirdn2d: the filter must be on x's device");
  if (x.is_cuda() || path >= 2)
    return upfirdn2d_gpu_design(x, f, (int)upx, (int)upy, (int)downx, (int)downy, (int)px0, (int)py0, OH, OW, flip,
                                gain, path == 2);
  TORCH_CHECK(x.device().is_cpu() && f.device().is_cpu(), "upfirdn2d: unsupported device");
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);  // kept channels-last
  if (!cl) x = x.contiguous();
  auto y = at::empty({x.size(0), x.size(1), OH, OW},
                     x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const Geom g{x.size(0) * x.size(1), H, W, OH, OW, (int)upx, (int)upy, (int)downx, (int)downy, (int)px0, (int)py0,
               (int)px1, (int)py1};

  // Filter taps in double on the host, correlation order, gain folded in.
  std::vector<double> w2, wx, wy;
  {
    auto w = correlation_filter(f, flip, gain, at::kDouble);
    w2.assign(w.data_ptr<double>(), w.data_ptr<double>() + w.numel());
  }
  bool separable = false;
  if (path == 0) {
    if (f.dim() == 1) {  // exact: w2 = f' f'^T * gain; keep the gain on one axis
      auto f1 = f.to(at::kDouble).contiguous();
      std::vector<double> v(f1.data_ptr<double>(), f1.data_ptr<double>() + f1.numel());
      if (!flip) std::reverse(v.begin(), v.end());
      wy = v;
      wx = v;
      for (auto& t : wx) t *= gain;
      separable = true;
    } else {
      const double tol = x.scalar_type() == at::kDouble ? 1e-13 : 1e-7;
      separable = factor_rank1(w2, fh, fw, tol, wy, wx);
    }
  }
  if (g.planes == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "upfirdn2d_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (cl)
      upfirdn2d_cl<scalar_t>(xp, yp, g, (int)x.size(0), (int)x.size(1), w2, fh, fw, wx, wy, separable);
    else if (separable)
      upfirdn2d_separable<scalar_t>(xp, yp, g, wx, wy);
    else
      upfirdn2d_direct<scalar_t>(xp, yp, g, w2, fh, fw);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d, "Fused upsample + pad + FIR filter + downsample (ganforge)");
  m.def("tiled_variant", &gf_ufd_variant, "The tiled kernel variant a call would use (-1: the general kernel)");
  m.def("has_cuda", &gf_has_cuda, "Whether this build holds the CUDA kernels");
}
