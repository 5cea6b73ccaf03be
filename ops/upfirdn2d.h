// upfirdn2d index arithmetic shared by upfirdn2d.cpp (CPU) and upfirdn2d.cu (CUDA).
//
// Along one axis, with the filter w in correlation order (w[k] = f[F-1-k], or f[k] when flip_filter), gain folded in:
//   y[o] = sum_k xp[o*down + k] * w[k],   xp[u] = xu[u - pad0],   xu[m*up] = x[m] (0 between and outside).
// Only taps with (o*down + k - pad0) divisible by `up` and landing inside x contribute; they form an arithmetic
// progression k = k0, k0+up, ... reading x[i0], x[i0+1], ... which gf_taps finds in O(1) (polyphase evaluation:
// no zero-inserted or padded intermediate is ever built).
#pragma once
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

// One output of the 2-D op with a full [fh, fw] filter w (row-major, correlation order, gain folded in):
// plane is one [H, W] image (row stride W); ty/tx are gf_taps for the output's row and column.
template <typename acc_t, typename scalar_t>
GF_HD acc_t gf_upfirdn2d_point(const scalar_t* plane, int W, const acc_t* w, int fw, int upx, int upy,
                               GfTaps ty, GfTaps tx) {
  acc_t acc = acc_t(0);
  for (int a = 0; a < ty.n; ++a) {
    const scalar_t* row = plane + (long long)(ty.i0 + a) * W + tx.i0;
    const acc_t* wr = w + (long long)(ty.k0 + a * upy) * fw + tx.k0;
    for (int b = 0; b < tx.n; ++b) acc += (acc_t)row[b] * wr[b * upx];
  }
  return acc;
}

// Output length along one axis (the same formula as the Python wrapper).
GF_HD int gf_out_len(int in_len, int up, int down, int pad0, int pad1, int ftaps) {
  return (in_len * up + pad0 + pad1 - ftaps) / down + 1;
}
