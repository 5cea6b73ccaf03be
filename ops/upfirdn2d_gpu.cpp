// upfirdn2d's GPU kernels from the host: the call's parameters, the tiled variant, and the CUDA launch (upfirdn2d.cu)
// or, on the CPU, an emulation of the kernels over the same device functions (for tests).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <omp.h>

#include <algorithm>
#include <vector>

#include "upfirdn2d.h"

#ifdef GF_WITH_CUDA
// Defined in upfirdn2d.cu: runs tiled `variant` (or the general kernel for -1 or 64-bit offsets) on the GPU.
void gf_upfirdn2d_cuda(const at::Tensor& x, const GfUfdParams<int>& p32, const GfUfdParams<int64_t>& p64,
                       int variant, bool idx32);
#endif

// Below this many outputs the emulation runs on one thread.
static const int64_t kMinParallel = 1 << 15;

// The GPU kernels run on the CPU, for tests: the general kernel one output at a time (path 2), or tiled kernel K
// block by block with its threads' loops run one phase after the other (the GPU's barriers), over the same
// GfUfdTiled functions the CUDA kernels call (path 3).
template <typename scalar_t>
struct EmulateGpu {
  const GfUfdParams<int>& p;
  template <typename K>
  void run() {
    GfUfdParams<int> q = p;
    const int64_t blocks = gf_ufd_tiles<K>(q);
#pragma omp parallel if (blocks * K::TH * K::TW * K::CB >= kMinParallel)
    {
      std::vector<double> buf((K::SMEM_BYTES + sizeof(double) - 1) / sizeof(double));  // aligned like __shared__
      unsigned char* smem = reinterpret_cast<unsigned char*>(buf.data());
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b) {
        for (int t = 0; t < K::THREADS; ++t) K::load(q, (int)b, t, smem);
        if (K::HBUF > 0)
          for (int t = 0; t < K::THREADS; ++t) K::hpass(q, (int)b, t, smem);
        for (int t = 0; t < K::THREADS; ++t) K::store(q, (int)b, t, smem);
      }
    }
  }
};

// The general kernel emulated: one output at a time.
template <typename scalar_t, typename index_t>
static void emulate_general(const GfUfdParams<index_t>& p) {
  const int64_t n = (int64_t)p.N * p.C * p.OH * p.OW;
#pragma omp parallel for schedule(static) if (n >= kMinParallel)
  for (int64_t i = 0; i < n; ++i) gf_ufd_general_point<scalar_t, index_t>(p, (index_t)i);
}

// Largest element offset of a strided tensor (plus one): whether 32-bit indexing reaches all of it.
static int64_t span(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 0; d < t.dim(); ++d) s += (t.size(d) - 1) * t.stride(d);
  return s;
}

// The GPU design of the op on x (CUDA, or emulated on the CPU: path 2 forces the general kernel, 3 picks like
// CUDA): x is read through its strides, as it is; y is channels-last when x is (dense, not contiguous), else
// contiguous. The filter is read raw (1-D or 2-D, any float dtype) and flipped and scaled as the kernels load it.
at::Tensor upfirdn2d_gpu_design(const at::Tensor& x, at::Tensor f, int upx, int upy, int downx, int downy,
                                       int px0, int py0, int OH, int OW, bool flip, double gain, bool general) {
  const bool cl_out = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  auto y = at::empty({x.size(0), x.size(1), OH, OW},
                     x.options().memory_format(cl_out ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  f = f.contiguous();
  const auto ft = f.scalar_type();
  TORCH_CHECK(ft == at::kFloat || ft == at::kDouble || ft == at::kHalf || ft == at::kBFloat16,
              "upfirdn2d: filter must be a floating tensor");
  const int ftype = ft == at::kDouble ? GF_F64 : ft == at::kHalf ? GF_F16 : ft == at::kBFloat16 ? GF_BF16 : GF_F32;
  const int fdim = (int)f.dim(), fh = (int)f.size(0), fw = (int)(fdim == 1 ? f.size(0) : f.size(1));
  const bool idx32 = std::max(span(x), span(y)) < (int64_t)INT32_MAX;
  GfUfdParams<int64_t> p64{x.data_ptr(), y.data_ptr(), f.data_ptr(), ftype, fdim, fw, fh, (int)flip, gain,
                           (int)x.size(0), (int)x.size(1), (int)x.size(2), (int)x.size(3), OH, OW,
                           upx, upy, downx, downy, px0, py0,
                           x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                           y.stride(0), y.stride(1), y.stride(2), y.stride(3), 0, 0, 0};
  GfUfdParams<int> p32{p64.x, p64.y, p64.f, ftype, fdim, fw, fh, (int)flip, gain, p64.N, p64.C, p64.H, p64.W, OH, OW,
                       upx, upy, downx, downy, px0, py0,
                       (int)p64.sxn, (int)p64.sxc, (int)p64.sxh, (int)p64.sxw,
                       (int)p64.syn, (int)p64.syc, (int)p64.syh, (int)p64.syw, 0, 0, 0};
  // Channels-last tiles when the channel is x's fastest axis (and there is more than one channel).
  const bool cl = x.size(1) > 1 && x.stride(1) == 1;
  const int variant = general ? -1 : gf_ufd_variant(upx, upy, downx, downy, fw, fh, fdim, cl);
  if (x.is_cuda()) {
#ifdef GF_WITH_CUDA
    gf_upfirdn2d_cuda(x, p32, p64, variant, idx32);
    return y;
#else
    TORCH_CHECK(false, "upfirdn2d: this build of the extension has no CUDA support");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "upfirdn2d_emul",
                                  [&] {
    if (idx32 && gf_ufd_dispatch<scalar_t>(variant, EmulateGpu<scalar_t>{p32})) return;
    if (idx32)
      emulate_general<scalar_t, int>(p32);
    else
      emulate_general<scalar_t, int64_t>(p64);
  });
  return y;
}
