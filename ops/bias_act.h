// bias_act math shared by bias_act.cpp (CPU) and bias_act.cu (CUDA): activations, derivatives, one element.
#pragma once
#include "gf_common.h"

// Activation ids; _fused.py passes them in this order.
enum GfAct { GF_LINEAR = 0, GF_RELU, GF_LRELU, GF_TANH, GF_SIGMOID, GF_ELU, GF_SELU, GF_SOFTPLUS, GF_SWISH };

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
