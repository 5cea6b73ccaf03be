// Shared by the C++ (CPU) and CUDA ganforge kernels: host/device qualifiers, accumulation types, scalar math.
#pragma once
#include <math.h>
#include <stdint.h>

// Functions usable from both the CPU code and CUDA kernels.
#ifdef __CUDACC__
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

// CPU hot loops get an AVX2 clone next to the baseline one, picked at load time by the CPU (GCC function
// multi-versioning), so the cached build stays portable across x86-64 machines.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GF_CPU_CLONES
#endif

// Helpers of those hot loops, inlined so that they are compiled for the caller's (cloned) target.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define GF_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define GF_ALWAYS_INLINE static inline
#endif

// Whether the extension was built with its CUDA kernels (GF_WITH_CUDA): each extension's has_cuda().
static inline bool gf_has_cuda() {
#ifdef GF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Accumulation ("opmath") type: float for float/half/bfloat16, double for double.
template <typename T> struct GfAcc { using type = float; };
template <> struct GfAcc<double> { using type = double; };

// Overloads of the math functions for float and double, identical on host and device.
GF_HD float gf_exp(float x) { return expf(x); }
GF_HD double gf_exp(double x) { return exp(x); }
GF_HD float gf_expm1(float x) { return expm1f(x); }
GF_HD double gf_expm1(double x) { return expm1(x); }
GF_HD float gf_log1p(float x) { return log1pf(x); }
GF_HD double gf_log1p(double x) { return log1p(x); }
GF_HD float gf_tanh(float x) { return tanhf(x); }
GF_HD double gf_tanh(double x) { return tanh(x); }
GF_HD float gf_abs(float x) { return fabsf(x); }
GF_HD double gf_abs(double x) { return fabs(x); }
