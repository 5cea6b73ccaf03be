// upfirdn2d index arithmetic and GPU kernel bodies, shared by upfirdn2d.cpp (CPU, and a host emulation of the GPU
// kernels that tests run) and upfirdn2d.cu (CUDA).
//
// Along one axis, with the filter w in correlation order (w[k] = f[F-1-k], or f[k] when flip_filter), gain folded in:
//   y[o] = sum_k xp[o*down + k] * w[k],   xp[u] = xu[u - pad0],   xu[m*up] = x[m] (0 between and outside).
// Only taps with (o*down + k - pad0) divisible by `up` contribute; they form an arithmetic progression
// k = k0, k0+up, ... reading x[i0], x[i0+1], ... (polyphase evaluation: no zero-inserted or padded intermediate).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "gf_common.h"

// The contributing taps of one output position: n taps, filter index k0 + t*up reads input index i0 + t.
struct GfTaps {
  int k0;
  int i0;
  int n;
};

// Taps of output `o` for an axis with the given up/down factors, leading padding, input length and filter length.
GF_HD GfTaps gf_taps(int o, int up, int down, int pad0, int in_len, int ftaps) {
  const long long u0 = (long long)o * down - pad0;        // position of tap 0 in the zero-inserted signal
  long long k0 = ((-u0) % up + up) % up;                    // first tap landing on a multiple of `up`
  long long i0 = (u0 + k0) / up;                            // exact division
  if (i0 < 0) {                                             // skip taps that fall before the signal
    k0 += -i0 * up;
    i0 = 0;
  }
  GfTaps t;
  t.k0 = (int)k0;
  t.i0 = (int)i0;
  t.n = 0;
  if (k0 < ftaps && i0 < in_len) {
    long long n = (ftaps - k0 + up - 1) / up;
    if (n > in_len - i0) n = in_len - i0;
    t.n = (int)n;
  }
  return t;
}

// Output length along one axis (the same formula as the Python wrapper).
GF_HD int gf_out_len(int in_len, int up, int down, int pad0, int pad1, int ftaps) {
  return (in_len * up + pad0 + pad1 - ftaps) / down + 1;
}

// Floor and ceiling of a / b for b > 0 and any sign of a.
GF_HD int gf_floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
GF_HD int gf_ceil_div(int a, int b) { return gf_floor_div(a + b - 1, b); }

// Element types of the raw filter tensor, read as it is (no conversion kernel per call).
enum GfFilterType { GF_F32 = 0, GF_F64 = 1, GF_F16 = 2, GF_BF16 = 3 };

// Element i of the raw filter, as acc_t.
template <typename acc_t>
GF_HD acc_t gf_filter_at(const void* f, int ftype, int i) {
  switch (ftype) {
    case GF_F64: return (acc_t) static_cast<const double*>(f)[i];
    case GF_F16: return (acc_t)(float) static_cast<const c10::Half*>(f)[i];
    case GF_BF16: return (acc_t)(float) static_cast<const c10::BFloat16*>(f)[i];
    default: return (acc_t) static_cast<const float*>(f)[i];
  }
}

// One call's geometry and raw pointers (the kernel argument). Strides are in elements; the filter is the user's
// taps (1-D: the same taps on both axes; 2-D: [fh, fw] row-major), flipped and scaled by `gain` as they are read.
template <typename index_t>
struct GfUfdParams {
  const void* x;
  void* y;
  const void* f;
  int ftype, fdim, fw, fh, flip;
  double gain;
  int N, C, H, W, OH, OW;
  int upx, upy, downx, downy, px0, py0;
  index_t sxn, sxc, sxh, sxw, syn, syc, syh, syw;
  int tiles_x, tiles_y, cgroups;  // the tiled kernels' block grid: blocks = tiles_x * tiles_y * cgroups * N
};

// Correlation-order tap k of a 1-D filter of F taps (the raw f[F-1-k], or f[k] when flipped), times `scale`.
template <typename acc_t, typename index_t>
GF_HD acc_t gf_tap1(const GfUfdParams<index_t>& p, int F, int k, acc_t scale) {
  return scale * gf_filter_at<acc_t>(p.f, p.ftype, p.flip ? k : F - 1 - k);
}

// Correlation-order tap (ky, kx) of the filter with the gain: a 1-D filter is the outer product of its taps.
template <typename acc_t, typename index_t>
GF_HD acc_t gf_tap2(const GfUfdParams<index_t>& p, int ky, int kx) {
  if (p.fdim == 1) return gf_tap1<acc_t>(p, p.fh, ky, (acc_t)p.gain) * gf_tap1<acc_t>(p, p.fw, kx, acc_t(1));
  const int fy = p.flip ? ky : p.fh - 1 - ky, fx = p.flip ? kx : p.fw - 1 - kx;
  return (acc_t)p.gain * gf_filter_at<acc_t>(p.f, p.ftype, fy * p.fw + fx);
}

// The general kernel's body: output element `i` (flat index over [N, C, OH, OW] in that order), any strides, any
// factors and filter sizes, taps read through gf_tap2. The CUDA kernel runs it per thread; the CPU's path 2 per i.
template <typename scalar_t, typename index_t>
GF_HD void gf_ufd_general_point(const GfUfdParams<index_t>& p, index_t i) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const int ox = (int)(i % p.OW);
  const index_t r = i / p.OW;
  const int oy = (int)(r % p.OH);
  const index_t r2 = r / p.OH;
  const int c = (int)(r2 % p.C), n = (int)(r2 / p.C);
  const GfTaps ty = gf_taps(oy, p.upy, p.downy, p.py0, p.H, p.fh);
  const GfTaps tx = gf_taps(ox, p.upx, p.downx, p.px0, p.W, p.fw);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + n * p.sxn + c * p.sxc;
  acc_t acc = acc_t(0);
  for (int a = 0; a < ty.n; ++a) {
    const scalar_t* row = x + (index_t)(ty.i0 + a) * p.sxh + (index_t)tx.i0 * p.sxw;
    for (int b = 0; b < tx.n; ++b)
      acc += (acc_t)row[b * p.sxw] * gf_tap2<acc_t>(p, ty.k0 + a * p.upy, tx.k0 + b * p.upx);
  }
  static_cast<scalar_t*>(p.y)[n * p.syn + c * p.syc + oy * p.syh + ox * p.syw] = (scalar_t)acc;
}

// The tiled kernels: one block computes a TH x TW tile of output pixels for CB channels of one image, with UP, DOWN
// (both axes) and the square filter's F taps per axis known at compile time, 32-bit indexing. Three phases,
// separated by barriers on the GPU:
//   load:  the input tile the outputs need ([IH][IW][CB], zero outside the image) and the taps into shared memory;
//   hpass: (separable filters) each input row of the tile filtered horizontally into [IH][TW][CB];
//   store: each output from its vertical taps of the hpass rows (separable), or its 2-D taps of the input tile.
// Threads walk each phase's elements with the channel fastest when CL (channels-last: x[n, h, w, c] in memory,
// so consecutive threads touch consecutive addresses), the column fastest otherwise (CB = 1).
template <typename scalar_t, int UP, int DOWN, int F, bool SEP, bool CL>
struct GfUfdTiled {
  using acc_t = typename GfAcc<scalar_t>::type;
  using P = GfUfdParams<int>;
  static constexpr int THREADS = 256;
  static constexpr int CB = CL ? (int)(64 / sizeof(scalar_t)) : 1;  // 64-byte runs of channels
  static constexpr int TW = CL ? 8 : (DOWN > 1 ? 32 : 64);
  static constexpr int TH = CL ? 8 : 16;
  static constexpr int NT = (F + UP - 1) / UP;                       // most taps per output along one axis
  static constexpr int IW = ((TW - 1) * DOWN + UP - 1) / UP + NT;    // input columns a tile can read
  static constexpr int IH = ((TH - 1) * DOWN + UP - 1) / UP + NT;
  static constexpr int NTAPS = SEP ? 2 * F : F * F;
  static constexpr int HBUF = SEP ? IH * TW * CB : 0;
  static constexpr int SMEM_BYTES = (NTAPS + HBUF) * (int)sizeof(acc_t) + IH * IW * CB * (int)sizeof(scalar_t);

  // The block's image, first channel and first output column/row.
  struct Block {
    int n, c0, ox0, oy0;
  };
  GF_HD static Block block(const P& p, int b) {
    Block k;
    k.ox0 = (b % p.tiles_x) * TW;
    b /= p.tiles_x;
    k.oy0 = (b % p.tiles_y) * TH;
    b /= p.tiles_y;
    k.c0 = (b % p.cgroups) * CB;
    k.n = b / p.cgroups;
    return k;
  }
  GF_HD static acc_t* taps(unsigned char* smem) { return reinterpret_cast<acc_t*>(smem); }
  GF_HD static acc_t* hbuf(unsigned char* smem) { return reinterpret_cast<acc_t*>(smem) + NTAPS; }
  GF_HD static scalar_t* tile(unsigned char* smem) {
    return reinterpret_cast<scalar_t*>(smem + (NTAPS + HBUF) * sizeof(acc_t));
  }
  // First input column (row) of the tile: the first one read by its first output column (row).
  GF_HD static int in0(int o0, int pad0) { return gf_ceil_div(o0 * DOWN - pad0, UP); }
  // Output o's first tap k0 and its input index relative to the tile's first input i0.
  GF_HD static void phase(int o, int pad0, int i0, int& k0, int& li) {
    const int u = o * DOWN - pad0;
    k0 = UP == 1 ? 0 : ((-u) % UP + UP) % UP;
    li = (u + k0) / UP - i0;
  }

  // Phase 1 for thread `tid`: the taps (correlation order, gain folded in) and the zero-padded input tile.
  GF_HD static void load(const P& p, int b, int tid, unsigned char* smem) {
    const Block k = block(p, b);
    acc_t* w = taps(smem);
    for (int i = tid; i < NTAPS; i += THREADS) {
      if (SEP)  // wx then wy; the gain goes on wx
        w[i] = i < F ? gf_tap1<acc_t>(p, F, i, (acc_t)p.gain) : gf_tap1<acc_t>(p, F, i - F, acc_t(1));
      else
        w[i] = gf_tap2<acc_t>(p, i / F, i % F);
    }
    const int ix0 = in0(k.ox0, p.px0), iy0 = in0(k.oy0, p.py0);
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + k.n * p.sxn;
    scalar_t* t = tile(smem);
    for (int i = tid; i < IH * IW * CB; i += THREADS) {
      const int c = i % CB, lx = (i / CB) % IW, ly = i / (CB * IW);
      const int gx = ix0 + lx, gy = iy0 + ly, gc = k.c0 + c;
      const bool in = gx >= 0 && gx < p.W && gy >= 0 && gy < p.H && gc < p.C;
      t[i] = in ? x[gc * p.sxc + gy * p.sxh + gx * p.sxw] : scalar_t(0);
    }
  }

  // Phase 2 (separable filters): hbuf[ly][lx][c] = sum_t wx[k0 + t*UP] * tile[ly][li + t][c].
  GF_HD static void hpass(const P& p, int b, int tid, unsigned char* smem) {
    const Block k = block(p, b);
    const acc_t* wx = taps(smem);
    const scalar_t* t = tile(smem);
    acc_t* h = hbuf(smem);
    const int ix0 = in0(k.ox0, p.px0);
    for (int i = tid; i < IH * TW * CB; i += THREADS) {
      const int c = i % CB, lx = (i / CB) % TW, ly = i / (CB * TW);
      int k0, li;
      phase(k.ox0 + lx, p.px0, ix0, k0, li);
      const scalar_t* src = t + (ly * IW + li) * CB + c;
      acc_t s = acc_t(0);
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (F % UP == 0 || k0 + j * UP < F) s += wx[k0 + j * UP] * (acc_t)src[j * CB];
      h[i] = s;
    }
  }

  // Phase 3: the outputs of the tile that lie inside y.
  GF_HD static void store(const P& p, int b, int tid, unsigned char* smem) {
    const Block k = block(p, b);
    const acc_t* w = taps(smem);
    const int ix0 = in0(k.ox0, p.px0), iy0 = in0(k.oy0, p.py0);
    scalar_t* y = static_cast<scalar_t*>(p.y) + k.n * p.syn;
    for (int i = tid; i < TH * TW * CB; i += THREADS) {
      const int c = i % CB, lx = (i / CB) % TW, ly = i / (CB * TW);
      const int ox = k.ox0 + lx, oy = k.oy0 + ly, gc = k.c0 + c;
      if (ox >= p.OW || oy >= p.OH || gc >= p.C) continue;
      int ky0, liy;
      phase(oy, p.py0, iy0, ky0, liy);
      acc_t s = acc_t(0);
      if (SEP) {
        const acc_t* wy = w + F;
        const acc_t* src = hbuf(smem) + (liy * TW + lx) * CB + c;
#pragma unroll
        for (int j = 0; j < NT; ++j)
          if (F % UP == 0 || ky0 + j * UP < F) s += wy[ky0 + j * UP] * src[j * TW * CB];
      } else {
        int kx0, lix;
        phase(ox, p.px0, ix0, kx0, lix);
        const scalar_t* src = tile(smem) + (liy * IW + lix) * CB + c;
#pragma unroll
        for (int a = 0; a < NT; ++a) {
          if (!(F % UP == 0 || ky0 + a * UP < F)) continue;
          const acc_t* wr = w + (ky0 + a * UP) * F + kx0;
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (F % UP == 0 || kx0 + j * UP < F) s += wr[j * UP] * (acc_t)src[(a * IW + j) * CB];
        }
      }
      y[gc * p.syc + oy * p.syh + ox * p.syw] = (scalar_t)s;
    }
  }
};

// The tiled variants, by (UP, DOWN, F, SEP): what training calls. 1x1 pad-only (conv2d_resample's padding, the
// reference's up-only path), the 4-tap filter alone (after G's transposed conv, before D's strided conv), 4-tap up 2
// and down 2 (upsample2d/downsample2d, and each other's backward), ADA's 12-tap separable up 2 / down 2 (images,
// contiguous only: a channels-last tile of them would not fit in shared memory). -1: the general kernel.
// `cl` says whether x is channels-last (channel stride 1); the host wrappers pass the square filter's F and fdim.
inline int gf_ufd_variant(int upx, int upy, int downx, int downy, int fw, int fh, int fdim, bool cl) {
  if (upx != upy || downx != downy || fw != fh) return -1;
  const int up = upx, down = downx, F = fw;
  const bool sep = fdim == 1;
  if (F == 1 && up == 1 && down == 1) return cl ? 10 : 0;
  if (F == 4 && up * down <= 2) {
    const int r = up == 2 ? 1 : (down == 2 ? 2 : 0);  // 0: filter only, 1: up 2, 2: down 2
    return (cl ? 11 : 1) + r + (sep ? 3 : 0);
  }
  if (F == 12 && sep && !cl && up * down == 2) return up == 2 ? 7 : 8;
  return -1;
}

// Calls fn.template run<GfUfdTiled<...>>() for variant v (see gf_ufd_variant); false for -1.
template <typename scalar_t, typename Fn>
bool gf_ufd_dispatch(int v, Fn&& fn) {
#define GF_V(ID, UP, DOWN, F, SEP, CL) \
  case ID: fn.template run<GfUfdTiled<scalar_t, UP, DOWN, F, SEP, CL>>(); return true;
  switch (v) {
    GF_V(0, 1, 1, 1, false, false)
    GF_V(1, 1, 1, 4, false, false) GF_V(2, 2, 1, 4, false, false) GF_V(3, 1, 2, 4, false, false)
    GF_V(4, 1, 1, 4, true, false) GF_V(5, 2, 1, 4, true, false) GF_V(6, 1, 2, 4, true, false)
    GF_V(7, 2, 1, 12, true, false) GF_V(8, 1, 2, 12, true, false)
    GF_V(10, 1, 1, 1, false, true)
    GF_V(11, 1, 1, 4, false, true) GF_V(12, 2, 1, 4, false, true) GF_V(13, 1, 2, 4, false, true)
    GF_V(14, 1, 1, 4, true, true) GF_V(15, 2, 1, 4, true, true) GF_V(16, 1, 2, 4, true, true)
    default: return false;
  }
#undef GF_V
}

// Fills a call's params from dense-or-strided x [N, C, H, W] and y [N, C, OH, OW] (strides in elements) and sets
// the tiled grid for kernel K (blocks returned).
template <typename K, typename index_t>
long long gf_ufd_tiles(GfUfdParams<index_t>& p) {
  p.tiles_x = (p.OW + K::TW - 1) / K::TW;
  p.tiles_y = (p.OH + K::TH - 1) / K::TH;
  p.cgroups = (p.C + K::CB - 1) / K::CB;
  return (long long)p.tiles_x * p.tiles_y * p.cgroups * p.N;
}
