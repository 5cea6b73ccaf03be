// Fused bias + activation + gain + clamp (and its first/second-order gradients): CPU kernel (OpenMP) and bindings.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include <tuple>
#include <vector>

#include "bias_act.h"

#ifdef GF_WITH_CUDA
// Defined in bias_act.cu.
std::tuple<at::Tensor, at::Tensor> gf_bias_act_cuda(at::Tensor v, at::Tensor b, at::Tensor g, int act, int mode,
                                                    double alpha, double gain, double clamp, int64_t inner,
                                                    int64_t channels, bool bias_grad);
#endif

// The bias gradient (per-channel sums, in x's dtype) from the CUDA kernels' partial sums (see GfBiasActGeom); used
// by bias_act.cu and by the host emulation.
at::Tensor gf_bias_grad_from_partials(const at::Tensor& partial, const GfBiasActGeom& geom, int64_t channels,
                                      at::ScalarType dtype) {
  auto gb = geom.cols ? partial.view({-1, channels}).sum(0)
                      : partial.view({-1, channels, geom.tiles}).sum(at::IntArrayRef{0, 2});
  return gb.to(dtype);
}

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
    GF_FOR_EACH_ACT(GF_CASE)
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
    return gf_bias_act_cuda(v, b.contiguous(), g, (int)act, (int)mode, alpha, gain, clamp, inner, channels,
                            bias_grad);
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

// ---- Host emulation of the CUDA kernels (bias_act.cu), for tests on machines without a GPU: the same geometry,
// spans, 16-byte packs and reduction order, walked by loops over blocks and threads. ----

// Rows walk of every block and thread; partial sums by the kernel's tree over x.
template <typename scalar_t, int ACT, int VEC>
static void emulate_rows(const GfBiasActGeom& geom, const scalar_t* v, const scalar_t* b, const scalar_t* g,
                         scalar_t* out, typename GfAcc<scalar_t>::type* partial, int64_t* visits, int mode,
                         typename GfAcc<scalar_t>::type alpha, typename GfAcc<scalar_t>::type gain,
                         typename GfAcc<scalar_t>::type clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  std::vector<acc_t> red(256);
  for (int64_t bx = 0; bx < geom.grid_x; ++bx)
    for (int64_t k = bx; k < geom.units; k += geom.grid_x) {
      std::vector<int64_t> slot(geom.ty, -1);
      for (int y = 0; y < geom.ty; ++y)
        for (int x = 0; x < geom.tx; ++x) {
          const GfBiasActSpan s = gf_rows_span(geom, k, x, y);
          acc_t bias[VEC];
          for (int j = 0; j < VEC; ++j) bias[j] = (b && s.partial >= 0) ? (acc_t)b[s.channel] : acc_t(0);
          red[y * geom.tx + x] = gf_bias_act_vec<scalar_t, ACT, VEC>(v, g, out, s.start, s.count, bias, mode, alpha,
                                                                     gain, clamp, false, bias);
          for (int j = 0; j < s.count; ++j) ++visits[s.start + j];
          if (x == 0) slot[y] = s.partial;
        }
      for (int y = 0; y < geom.ty && partial; ++y) {
        const acc_t sum = gf_tree_sum(red.data() + y * geom.tx, geom.tx);
        if (slot[y] >= 0) partial[slot[y]] = sum;
      }
    }
}

// Columns walk of every block and thread.
template <typename scalar_t, int ACT, int VEC>
static void emulate_cols(const GfBiasActGeom& geom, const scalar_t* v, const scalar_t* b, const scalar_t* g,
                         scalar_t* out, typename GfAcc<scalar_t>::type* partial, int64_t* visits, int mode,
                         typename GfAcc<scalar_t>::type alpha, typename GfAcc<scalar_t>::type gain,
                         typename GfAcc<scalar_t>::type clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  for (int64_t by = 0; by < geom.grid_y; ++by)
    for (int64_t bx = 0; bx < geom.grid_x; ++bx)
      for (int y = 0; y < geom.ty; ++y)
        for (int x = 0; x < geom.tx; ++x) {
          const int64_t c0 = gf_cols_channel(geom, bx, x);
          if (c0 >= geom.channels) continue;
          const int count = (int)std::min<int64_t>(geom.channels - c0, VEC);
          acc_t bias[VEC], sums[VEC];
          for (int j = 0; j < VEC; ++j) {
            bias[j] = (b && j < count) ? (acc_t)b[c0 + j] : acc_t(0);
            sums[j] = 0;
          }
          const int64_t slot = by * geom.ty + y;
          for (int64_t r = slot; r < geom.rows; r += geom.grid_y * geom.ty) {
            gf_bias_act_vec<scalar_t, ACT, VEC>(v, g, out, r * geom.channels + c0, count, bias, mode, alpha, gain,
                                                clamp, partial != nullptr, sums);
            for (int j = 0; j < count; ++j) ++visits[r * geom.channels + c0 + j];
          }
          for (int j = 0; j < count && partial; ++j) partial[slot * geom.channels + c0 + j] = sums[j];
        }
}

// Pick the activation and vector width of the emulated kernel (outside the dtype-dispatch macro: no #define in it).
template <typename scalar_t>
static void emulate(int act, int mode, const GfBiasActGeom& geom, const scalar_t* vp, const scalar_t* bp,
                    const scalar_t* gp, scalar_t* op, typename GfAcc<scalar_t>::type* pp, int64_t* vis, double alpha,
                    double gain, double clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  constexpr int V = 16 / sizeof(scalar_t);
  const acc_t a = (acc_t)alpha, s = (acc_t)gain, c = (acc_t)clamp;
#define GF_EMU(ID)                                                                                               \
  case ID:                                                                                                       \
    if (geom.cols)                                                                                               \
      geom.vec == V ? emulate_cols<scalar_t, ID, V>(geom, vp, bp, gp, op, pp, vis, mode, a, s, c)            \
                    : emulate_cols<scalar_t, ID, 1>(geom, vp, bp, gp, op, pp, vis, mode, a, s, c);           \
    else                                                                                                         \
      geom.vec == V ? emulate_rows<scalar_t, ID, V>(geom, vp, bp, gp, op, pp, vis, mode, a, s, c)            \
                    : emulate_rows<scalar_t, ID, 1>(geom, vp, bp, gp, op, pp, vis, mode, a, s, c);           \
    break;
  switch (act) {
    GF_FOR_EACH_ACT(GF_EMU)
    default: TORCH_CHECK(false, "bias_act: unknown activation id ", act);
  }
#undef GF_EMU
}

// The CUDA path of bias_act run on the host: (out, bias gradient or empty, visits per element of v's storage, and
// the geometry [cols, vec, tx, ty, grid_x, grid_y]); max_blocks stands for the device's SM count x 8.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<int64_t>> bias_act_emulate_cuda(
    at::Tensor v, at::Tensor b, at::Tensor g, int64_t act, int64_t mode, double alpha, double gain, double clamp,
    int64_t inner, int64_t channels, bool bias_grad, int64_t max_blocks) {
  TORCH_CHECK(v.device().is_cpu() && v.is_non_overlapping_and_dense(), "bias_act_emulate_cuda: dense CPU x");
  auto bc = b.contiguous();
  auto out = at::empty_like(v);
  auto visits = at::zeros({v.numel()}, v.options().dtype(at::kLong));
  const bool has_bias = bc.numel() > 0;
  auto al = [](const void* p) { return ((uintptr_t)p & 15) == 0; };
  const bool aligned = al(v.data_ptr()) && al(out.data_ptr()) && (g.numel() == 0 || al(g.data_ptr()));
  const GfBiasActGeom geom = gf_bias_act_geom(v.numel(), inner, channels, has_bias, aligned, (int)v.element_size(),
                                              max_blocks);
  const auto acc_type = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = bias_grad && has_bias ? at::zeros({geom.partials}, v.options().dtype(acc_type)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, v.scalar_type(), "bias_act_emu",
                                  [&] {
    using acc_t = typename GfAcc<scalar_t>::type;
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.numel() ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* pp = partial.defined() ? partial.data_ptr<acc_t>() : nullptr;
    int64_t* vis = visits.data_ptr<int64_t>();
    emulate<scalar_t>((int)act, (int)mode, geom, vp, bp, gp, op, pp, vis, alpha, gain, clamp);
  });
  at::Tensor gb = partial.defined() ? gf_bias_grad_from_partials(partial, geom, geom.channels, v.scalar_type())
                                    : at::Tensor();
  return {out, gb, visits, {geom.cols, geom.vec, geom.tx, geom.ty, geom.grid_x, geom.grid_y}};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bias_act", &bias_act, "Fused bias + activation + gain + clamp, or its gradients (ganforge)");
  m.def("bias_act_emulate_cuda", &bias_act_emulate_cuda, "bias_act's CUDA kernels emulated on the host (tests)");
  m.def("has_cuda", &gf_has_cuda, "Whether this build holds the CUDA kernels");
}
