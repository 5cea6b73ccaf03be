// Fused bias + activation + gain + clamp (and its first/second-order gradients): CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "bias_act.h"

// One thread per element (grid-stride); math in float (double for double), bias of element i is
// b[(i / inner) % channels], exactly as in the CPU loop.
template <typename scalar_t, int ACT>
__global__ void bias_act_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ b,
                                const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t n, int64_t inner,
                                int64_t channels, int mode, typename GfAcc<scalar_t>::type alpha,
                                typename GfAcc<scalar_t>::type gain, typename GfAcc<scalar_t>::type clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t bias = b ? (acc_t)b[(i / inner) % channels] : acc_t(0);
    const acc_t gi = g ? (acc_t)g[i] : acc_t(0);
    const acc_t vi = (acc_t)v[i];
    acc_t r;
    switch (mode) {  // uniform across the grid: no divergence
      case GF_FWD: r = gf_bias_act_point<ACT, GF_FWD, acc_t>(vi, bias, gi, alpha, gain, clamp); break;
      case GF_GRAD_X: r = gf_bias_act_point<ACT, GF_GRAD_X, acc_t>(vi, bias, gi, alpha, gain, clamp); break;
      case GF_GRAD2_X: r = gf_bias_act_point<ACT, GF_GRAD2_X, acc_t>(vi, bias, gi, alpha, gain, clamp); break;
      default: r = gf_bias_act_point<ACT, GF_GRAD_Y, acc_t>(vi, bias, gi, alpha, gain, clamp); break;
    }
    out[i] = (scalar_t)r;
  }
}

// Launch the kernel for activation `act` (a switch outside the dtype-dispatch macro: no #define inside it).
template <typename scalar_t>
static void launch(int act, int blocks, int threads, cudaStream_t stream, const scalar_t* v, const scalar_t* b,
                   const scalar_t* g, scalar_t* out, int64_t n, int64_t inner, int64_t channels, int mode,
                   double alpha, double gain, double clamp) {
  using acc_t = typename GfAcc<scalar_t>::type;
  const acc_t a = (acc_t)alpha, s = (acc_t)gain, c = (acc_t)clamp;
#define GF_LAUNCH(ID)                                                                                               \
  case ID:                                                                                                          \
    bias_act_kernel<scalar_t, ID><<<blocks, threads, 0, stream>>>(v, b, g, out, n, inner, channels, mode, a, s, c); \
    break;
  switch (act) {
    GF_LAUNCH(GF_LINEAR) GF_LAUNCH(GF_RELU) GF_LAUNCH(GF_LRELU) GF_LAUNCH(GF_TANH) GF_LAUNCH(GF_SIGMOID)
    GF_LAUNCH(GF_ELU) GF_LAUNCH(GF_SELU) GF_LAUNCH(GF_SOFTPLUS) GF_LAUNCH(GF_SWISH)
    default: TORCH_CHECK(false, "bias_act: unknown activation id ", act);
  }
#undef GF_LAUNCH
}

// Launch on the current stream of v's device; layout contract as in bias_act.cpp.
at::Tensor gf_bias_act_cuda(at::Tensor v, at::Tensor b, at::Tensor g, int act, int mode, double alpha, double gain,
                            double clamp, int64_t inner, int64_t channels) {
  TORCH_CHECK(v.is_non_overlapping_and_dense(), "bias_act: x must be dense");
  TORCH_CHECK(b.numel() == 0 || b.is_cuda(), "bias_act: bias must be on the GPU with x");
  TORCH_CHECK(g.numel() == 0 || g.is_cuda(), "bias_act: grad must be on the GPU with x");
  const c10::cuda::CUDAGuard guard(v.device());
  auto b_c = b.contiguous();
  auto out = at::empty_like(v);
  const int64_t n = v.numel();
  if (n == 0) return out;
  const int threads = 256;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, v.get_device()));
  const int blocks = (int)std::min<int64_t>((n + threads - 1) / threads, (int64_t)sms * 32);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, v.scalar_type(), "bias_act_cuda",
                                  [&] {
    launch<scalar_t>(act, blocks, threads, stream, v.data_ptr<scalar_t>(),
                     b_c.numel() ? b_c.data_ptr<scalar_t>() : nullptr, g.numel() ? g.data_ptr<scalar_t>() : nullptr,
                     out.data_ptr<scalar_t>(), n, inner, channels, mode, alpha, gain, clamp);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
