// Fused bias + activation + gain + clamp (and its first/second-order gradients): CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <tuple>

#include "bias_act.h"

// Rows walk (see GfBiasActGeom): blocks of tx x ty threads take work units; with `partial`, each (row, tile) sum of
// the outputs is reduced over x in shared memory (a fixed tree: deterministic) and written once.
template <typename scalar_t, int ACT, int VEC>
__global__ void __launch_bounds__(256) bias_act_rows_kernel(
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ b, const scalar_t* __restrict__ g,
    scalar_t* __restrict__ out, typename GfAcc<scalar_t>::type* __restrict__ partial, GfBiasActGeom geom, int mode,
    typename GfAcc<scalar_t>::type alpha, typename GfAcc<scalar_t>::type gain, typename GfAcc<scalar_t>::type clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  __shared__ acc_t red[256];
  const int x = threadIdx.x, y = threadIdx.y;
  for (int64_t k = blockIdx.x; k < geom.units; k += gridDim.x) {
    const GfBiasActSpan s = gf_rows_span(geom, k, x, y);
    acc_t bias[VEC];
    const acc_t bc = (b && s.partial >= 0) ? (acc_t)b[s.channel] : acc_t(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) bias[j] = bc;
    const acc_t sum =
        gf_bias_act_vec<scalar_t, ACT, VEC>(v, g, out, s.start, s.count, bias, mode, alpha, gain, clamp,
                                            false, bias);
    if (partial) {  // uniform across the launch
      red[y * geom.tx + x] = sum;
      __syncthreads();
      for (int w = geom.tx / 2; w > 0; w /= 2) {
        if (x < w) red[y * geom.tx + x] += red[y * geom.tx + x + w];
        __syncthreads();
      }
      if (x == 0 && s.partial >= 0) partial[s.partial] = red[y * geom.tx];
      __syncthreads();
    }
  }
}

// Columns walk (see GfBiasActGeom): each thread keeps its vec channels' biases and output sums in registers.
template <typename scalar_t, int ACT, int VEC>
__global__ void __launch_bounds__(256) bias_act_cols_kernel(
    const scalar_t* __restrict__ v, const scalar_t* __restrict__ b, const scalar_t* __restrict__ g,
    scalar_t* __restrict__ out, typename GfAcc<scalar_t>::type* __restrict__ partial, GfBiasActGeom geom, int mode,
    typename GfAcc<scalar_t>::type alpha, typename GfAcc<scalar_t>::type gain, typename GfAcc<scalar_t>::type clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const int64_t c0 = gf_cols_channel(geom, blockIdx.x, threadIdx.x);
  if (c0 >= geom.channels) return;
  constexpr int count = VEC;  // the geometry takes vec > 1 only when it divides the channel count
  acc_t bias[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) bias[j] = b ? (acc_t)b[c0 + j] : acc_t(0);
  const int64_t slot = (int64_t)blockIdx.y * geom.ty + threadIdx.y;
  const int64_t step = (int64_t)gridDim.y * geom.ty;
  acc_t sums[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[j] = 0;
#pragma unroll 1  // one row per iteration: unrolled copies would hold several packs in registers at once
  for (int64_t r = slot; r < geom.rows; r += step)
    gf_bias_act_vec<scalar_t, ACT, VEC>(v, g, out, r * geom.channels + c0, count, bias, mode, alpha, gain, clamp,
                                        partial != nullptr, sums);
  if (partial) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[slot * geom.channels + c0 + j] = sums[j];
  }
}

// Launch the rows or columns kernel for one activation and vector width.
template <typename scalar_t, int ACT, int VEC>
static void launch_vec(const GfBiasActGeom& geom, cudaStream_t stream, const scalar_t* v, const scalar_t* b,
                       const scalar_t* g, scalar_t* out, typename GfAcc<scalar_t>::type* partial, int mode,
                       double alpha, double gain, double clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const dim3 block(geom.tx, geom.ty);
  const dim3 grid((unsigned)geom.grid_x, (unsigned)geom.grid_y);
  if (geom.cols)
    bias_act_cols_kernel<scalar_t, ACT, VEC><<<grid, block, 0, stream>>>(v, b, g, out, partial, geom, mode,
                                                                         (acc_t)alpha, (acc_t)gain, (acc_t)clamp);
  else
    bias_act_rows_kernel<scalar_t, ACT, VEC><<<grid, block, 0, stream>>>(v, b, g, out, partial, geom, mode,
                                                                         (acc_t)alpha, (acc_t)gain, (acc_t)clamp);
}

// Pick the activation (a switch outside the dtype-dispatch macro: no #define inside it) and the vector width.
template <typename scalar_t>
static void launch(int act, const GfBiasActGeom& geom, cudaStream_t stream, const scalar_t* v, const scalar_t* b,
                   const scalar_t* g, scalar_t* out, typename GfAcc<scalar_t>::type* partial, int mode, double alpha,
                   double gain, double clamp) {
  constexpr int V = 16 / sizeof(scalar_t);
#define GF_LAUNCH(ID)                                                                                        \
  case ID:                                                                                                   \
    if (geom.vec == V)                                                                                       \
      launch_vec<scalar_t, ID, V>(geom, stream, v, b, g, out, partial, mode, alpha, gain, clamp);           \
    else                                                                                                     \
      launch_vec<scalar_t, ID, 1>(geom, stream, v, b, g, out, partial, mode, alpha, gain, clamp);           \
    break;
  switch (act) {
    GF_FOR_EACH_ACT(GF_LAUNCH)
    default: TORCH_CHECK(false, "bias_act: unknown activation id ", act);
  }
#undef GF_LAUNCH
}

// Defined in bias_act.cpp.
at::Tensor gf_bias_grad_from_partials(const at::Tensor& partial, const GfBiasActGeom& geom, int64_t channels,
                                      at::ScalarType dtype);

// Whether p is 16-byte aligned (null counts as aligned).
static bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// Run on the current stream of v's device; layout contract as in bias_act.cpp. Returns the output and, with
// bias_grad, the per-channel sum of the output (from the kernel's partial sums: no second pass over the output).
std::tuple<at::Tensor, at::Tensor> gf_bias_act_cuda(at::Tensor v, at::Tensor b, at::Tensor g, int act, int mode,
                                                    double alpha, double gain, double clamp, int64_t inner,
                                                    int64_t channels, bool bias_grad) {
  TORCH_CHECK(v.is_non_overlapping_and_dense(), "bias_act: x must be dense");
  TORCH_CHECK(b.numel() == 0 || b.is_cuda(), "bias_act: bias must be on the GPU with x");
  TORCH_CHECK(g.numel() == 0 || g.is_cuda(), "bias_act: grad must be on the GPU with x");
  const c10::cuda::CUDAGuard guard(v.device());
  auto b_c = b.contiguous();
  auto out = at::empty_like(v);
  const int64_t n = v.numel();
  at::Tensor gb;
  if (n == 0) return {out, gb};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, v.get_device()));
  const bool has_bias = b_c.numel() > 0;
  const bool aligned = aligned16(v.data_ptr()) && aligned16(out.data_ptr()) &&
                       (g.numel() == 0 || aligned16(g.data_ptr()));
  const GfBiasActGeom geom = gf_bias_act_geom(n, inner, channels, has_bias, aligned, (int)v.element_size(),
                                              (int64_t)sms * 8);
  const auto acc_type = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = bias_grad && has_bias ? at::zeros({geom.partials}, v.options().dtype(acc_type)) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, v.scalar_type(), "bias_act_cuda",
                                  [&] {
    using acc_t = typename GfAcc<scalar_t>::type;
    launch<scalar_t>(act, geom, stream, v.data_ptr<scalar_t>(), has_bias ? b_c.data_ptr<scalar_t>() : nullptr,
                     g.numel() ? g.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                     partial.defined() ? partial.data_ptr<acc_t>() : nullptr, mode, alpha, gain, clamp);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (partial.defined()) gb = gf_bias_grad_from_partials(partial, geom, geom.channels, v.scalar_type());
  return {out, gb};
}
