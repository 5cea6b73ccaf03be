// Fused upsample + pad + FIR filter + downsample: the CUDA launches of the kernels in upfirdn2d.h (tiled variants
// for training's shapes, the general kernel for the rest); upfirdn2d.cpp prepares the call and picks the variant.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "upfirdn2d.h"

// One tiled block: the three phases of GfUfdTiled over a static shared-memory buffer, barriers between them.
template <typename K>
__global__ void __launch_bounds__(K::THREADS) upfirdn2d_tiled_kernel(GfUfdParams<int> p) {
  static_assert(K::SMEM_BYTES <= 48 * 1024, "upfirdn2d tile exceeds static shared memory");
  __shared__ __align__(16) unsigned char smem[K::SMEM_BYTES];
  const int b = (int)blockIdx.x, t = (int)threadIdx.x;
  K::load(p, b, t, smem);
  __syncthreads();
  if (K::HBUF > 0) {
    K::hpass(p, b, t, smem);
    __syncthreads();
  }
  K::store(p, b, t, smem);
}

// The general kernel: one output per thread, grid-stride over all outputs.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(256) upfirdn2d_general_kernel(GfUfdParams<index_t> p, index_t n) {
  const index_t stride = (index_t)blockDim.x * gridDim.x;
  for (index_t i = (index_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    gf_ufd_general_point<scalar_t, index_t>(p, i);
}

// Launches the tiled kernel K (called by gf_ufd_dispatch).
struct GfTiledLaunch {
  GfUfdParams<int> p;
  cudaStream_t stream;
  template <typename K>
  void run() {
    GfUfdParams<int> q = p;
    const long long blocks = gf_ufd_tiles<K>(q);
    TORCH_CHECK(blocks < (1LL << 31), "upfirdn2d: too many tiles");
    upfirdn2d_tiled_kernel<K><<<(unsigned)blocks, K::THREADS, 0, stream>>>(q);
  }
};

// The general kernel's grid: enough blocks to fill the GPU, grid-stride beyond.
template <typename scalar_t, typename index_t>
static void launch_general(const GfUfdParams<index_t>& p, int device, cudaStream_t stream) {
  const int64_t n = (int64_t)p.N * p.C * p.OH * p.OW;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = (int)std::min<int64_t>((n + 255) / 256, (int64_t)sms * 32);
  upfirdn2d_general_kernel<scalar_t, index_t><<<blocks, 256, 0, stream>>>(p, (index_t)n);
}

// x and y on the GPU (any strides, given in p32/p64 with the filter's raw pointer), `variant` from gf_ufd_variant
// (-1: the general kernel), `idx32` whether every offset fits in 32 bits (p32 is filled then, else p64).
void gf_upfirdn2d_cuda(const at::Tensor& x, const GfUfdParams<int>& p32, const GfUfdParams<int64_t>& p64,
                       int variant, bool idx32) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "upfirdn2d_cuda",
                                  [&] {
    if (idx32 && gf_ufd_dispatch<scalar_t>(variant, GfTiledLaunch{p32, stream})) return;
    if (idx32)
      launch_general<scalar_t, int>(p32, x.get_device(), stream);
    else
      launch_general<scalar_t, int64_t>(p64, x.get_device(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
