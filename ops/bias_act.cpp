// Fused bias + activation + gain + clamp (and its first/second-order gradients): CPU kernel (OpenMP) and bindings.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include <tuple>
#include <vector>

#include "bias_act.h"

#ifdef GF_WITH_CUDA
// Defined in bias_act.cu.
at::Tensor gf_bias_act_cuda(at::Tensor v, at::Tensor b, at::Tensor g, int act, int mode, double alpha, double gain,
                            double clamp, int64_t inner, int64_t channels);
#endif

// Elements per OpenMP work item: large enough to amortize scheduling, small enough to balance.
static const int64_t kChunk = 16384;

// One call's arguments. Element i of the dense buffers uses bias b[(i / inner) % channels]; g (incoming gradient)
// and b may be null; bias_grad (when not null) receives per-thread partial sums of out per channel.
template <typename scalar_t>
struct Args {
  const scalar_t* v;
  const scalar_t* b;
  const scalar_t* g;
  scalar_t* out;
  int64_t n, inner, channels;
  scalar_t alpha, gain, clamp;
  double* bias_grad;  // [threads, channels]
};

// n elements sharing one bias value (g may be null); returns their sum when `want_sum` (for the bias gradient).
template <typename scalar_t, int ACT, int MODE>
GF_CPU_CLONES static double bias_act_run(const scalar_t* v, const scalar_t* g, scalar_t* out, int64_t n,
                                         scalar_t bias, scalar_t alpha, scalar_t gain, scalar_t clamp,
                                         bool want_sum) {
  if (g) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      out[j] = gf_bias_act_point<ACT, MODE, scalar_t>(v[j], bias, g[j], alpha, gain, clamp);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      out[j] = gf_bias_act_point<ACT, MODE, scalar_t>(v[j], bias, scalar_t(0), alpha, gain, clamp);
  }
  if (!want_sum) return 0;
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += (double)out[j];
  return sum;
}

// One element-wise pass over the dense buffer in parallel chunks (static schedule: the bias-gradient partial sums
// are combined in a fixed order, so results are deterministic for a given thread count).
template <typename scalar_t, int ACT, int MODE>
static void bias_act_loop(const Args<scalar_t>& a) {
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 2)
  for (int64_t k = 0; k < chunks; ++k) {
    double* partial = a.bias_grad ? a.bias_grad + (int64_t)omp_get_thread_num() * a.channels : nullptr;
    const int64_t end = std::min(a.n, (k + 1) * kChunk);
    int64_t i = k * kChunk;
    if (a.inner == 1 && a.b != nullptr) {  // the channel advances with every element (channels-last, [N, C])
      int64_t c = i % a.channels;
      for (; i < end; ++i) {
        const scalar_t gi = a.g ? a.g[i] : scalar_t(0);
        a.out[i] = gf_bias_act_point<ACT, MODE, scalar_t>(a.v[i], a.b[c], gi, a.alpha, a.gain, a.clamp);
        if (partial) partial[c] += (double)a.out[i];
        if (++c == a.channels) c = 0;
      }
      continue;
    }
    while (i < end) {  // runs of `inner` elements share one channel
      const int64_t seg = a.b ? std::min(end, (i / a.inner + 1) * a.inner) : end;
      const int64_t c = (i / a.inner) % a.channels;
      const scalar_t bias = a.b ? a.b[c] : scalar_t(0);
      const double sum = bias_act_run<scalar_t, ACT, MODE>(a.v + i, a.g ? a.g + i : nullptr, a.out + i, seg - i,
                                                           bias, a.alpha, a.gain, a.clamp, partial != nullptr);
      if (partial) partial[c] += sum;
      i = seg;
    }
  }
}

// Pick the (activation, mode) instantiation.
template <typename scalar_t, int ACT>
static void bias_act_mode(int mode, const Args<scalar_t>& a) {
  switch (mode) {
    case GF_FWD: return bias_act_loop<scalar_t, ACT, GF_FWD>(a);
    case GF_GRAD_X: return bias_act_loop<scalar_t, ACT, GF_GRAD_X>(a);
    case GF_GRAD2_X: return bias_act_loop<scalar_t, ACT, GF_GRAD2_X>(a);
    case GF_GRAD_Y: return bias_act_loop<scalar_t, ACT, GF_GRAD_Y>(a);
    default: TORCH_CHECK(false, "bias_act: bad mode ", mode);
  }
}

// Pick the activation instantiation.
template <typename scalar_t>
static void bias_act_cpu(int act, int mode, const Args<scalar_t>& a) {
#define GF_CASE(ID) \
  case ID: return bias_act_mode<scalar_t, ID>(mode, a);
  switch (act) {
    GF_CASE(GF_LINEAR) GF_CASE(GF_RELU) GF_CASE(GF_LRELU) GF_CASE(GF_TANH) GF_CASE(GF_SIGMOID)
    GF_CASE(GF_ELU) GF_CASE(GF_SELU) GF_CASE(GF_SOFTPLUS) GF_CASE(GF_SWISH)
    default: TORCH_CHECK(false, "bias_act: unknown activation id ", act);
  }
#undef GF_CASE
}

// out = op(v, b, g) element-wise (mode: GfBiasActMode). v, g and out share v's dense layout (contiguous or
// channels-last); b is 1-D with `channels` entries (or empty) and element i uses b[(i / inner) % channels], inner
// being v's stride along `dim`. With bias_grad, also returns the per-channel sum of out (the bias gradient),
// else an empty tensor.
std::tuple<at::Tensor, at::Tensor> bias_act(at::Tensor v, at::Tensor b, at::Tensor g, int64_t act, int64_t mode,
                                            double alpha, double gain, double clamp, int64_t inner,
                                            int64_t channels, bool bias_grad) {
  TORCH_CHECK(b.numel() == 0 || (b.dim() == 1 && b.numel() == channels), "bias_act: bias must have ", channels,
              " entries");
  TORCH_CHECK(b.numel() == 0 || (b.scalar_type() == v.scalar_type() && b.device() == v.device()),
              "bias_act: bias dtype/device must match x");
  TORCH_CHECK(g.numel() == 0 || (g.sizes() == v.sizes() && g.strides() == v.strides() &&
                                 g.scalar_type() == v.scalar_type()), "bias_act: grad must match x's layout");
  TORCH_CHECK(inner >= 1 && channels >= 1 && v.numel() % channels == 0, "bias_act: bad bias layout");
  TORCH_CHECK(v.is_non_overlapping_and_dense(), "bias_act: x must be dense");
  if (v.is_cuda()) {
#ifdef GF_WITH_CUDA
    auto out = gf_bias_act_cuda(v, b.contiguous(), g, (int)act, (int)mode, alpha, gain, clamp, inner, channels);
    at::Tensor gb;
    if (bias_grad)  // the storage viewed as [outer, channels, inner]
      gb = out.as_strided({v.numel() / (channels * inner), channels, inner}, {channels * inner, inner, 1})
               .sum(at::IntArrayRef{0, 2});
    return {out, gb};
#else
    TORCH_CHECK(false, "bias_act: this build of the extension has no CUDA support");
#endif
  }
  TORCH_CHECK(v.device().is_cpu(), "bias_act: unsupported device");
  auto out = at::empty_like(v);
  at::Tensor gb;
  const int threads = omp_get_max_threads();
  std::vector<double> partial(bias_grad ? (size_t)threads * channels : 0, 0.0);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bias_act_cpu", [&] {
    auto bc = b.contiguous();
    const Args<scalar_t> a{v.data_ptr<scalar_t>(), bc.numel() ? bc.data_ptr<scalar_t>() : nullptr,
                           g.numel() ? g.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), v.numel(), inner,
                           channels, (scalar_t)alpha, (scalar_t)gain, (scalar_t)clamp,
                           bias_grad ? partial.data() : nullptr};
    bias_act_cpu<scalar_t>((int)act, (int)mode, a);
    if (bias_grad) {
      gb = at::empty({channels}, v.options());
      scalar_t* gp = gb.data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) {
        double s = 0;
        for (int t = 0; t < threads; ++t) s += partial[(size_t)t * channels + c];
        gp[c] = (scalar_t)s;
      }
    }
  });
  return {out, gb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bias_act", &bias_act, "Fused bias + activation + gain + clamp, or its gradients (ganforge)");
  m.def("has_cuda", [] {
#ifdef GF_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
