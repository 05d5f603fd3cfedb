// CUDA cross-entropy partials and in-place backward. One block per row; each thread walks its
// share of the row once with an online softmax (running max and rescaled sum, fp32), 16-byte
// vector loads where the row is aligned, then the block merges the (max, sum) pairs.
// Rows are `vocab` apart; only their first `valid` columns are real vocabulary (valid_columns in
// ops.h): the rest is megatron's padding, left out of the softmax and given a zero gradient.
// Registers CUDA kernels for the megaswift:: ops that megaswift._kernels_cpu defines.
#include <Python.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "ops.h"

namespace megaswift {
namespace {

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// fp32 logits get the accurate expf; for bf16/fp16 the input rounding dominates, so __expf.
template <typename T>
__device__ __forceinline__ float exp_for(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(x);
  } else {
    return __expf(x);
  }
}

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float big = fmaxf(m, m2);
  if (big == -INFINITY) return;  // both sides saw only -inf (or nothing): the sum stays 0
  s = s * expf(m - big) + s2 * expf(m2 - big);
  m = big;
}

// Leaves the row's (max, sum) in thread 0.
__device__ void block_merge(float& m, float& s) {
  __shared__ float warp_m[32], warp_s[32];
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    m = lane < warps ? warp_m[lane] : -INFINITY;
    s = lane < warps ? warp_s[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
      merge(m, s, m2, s2);
    }
  }
}

__device__ __forceinline__ int64_t local_label(int64_t label, int64_t vocab_start, int64_t vocab, int64_t ignore) {
  const int64_t local = label - vocab_start;
  return (label != ignore && local >= 0 && local < vocab) ? local : -1;
}

template <typename T, int N>
__device__ __forceinline__ void online_update(const float (&v)[N], float& m, float& s) {
  float vm = v[0];
#pragma unroll
  for (int e = 1; e < N; ++e) vm = fmaxf(vm, v[e]);
  if (vm > m) {
    s *= exp_for<T>(m - vm);  // m == -inf: exp gives 0 and s is 0 anyway
    m = vm;
  }
  if (m == -INFINITY) return;
#pragma unroll
  for (int e = 0; e < N; ++e) s += exp_for<T>(v[e] - m);
}

template <typename T>
__global__ void partials_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t vocab,
                                int64_t valid, int64_t vocab_start, int64_t ignore, float* __restrict__ row_max,
                                float* __restrict__ sum_exp, float* __restrict__ target) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  float m = -INFINITY, s = 0.0f;
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    constexpr int kVec = Pack<T>::kSize;
    const int64_t packs = valid / kVec;
    const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(x);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const Pack<T> pk = xp[p];
      float v[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] = static_cast<float>(pk.v[e]);
      online_update<T>(v, m, s);
    }
    done = packs * kVec;
  }
  for (int64_t j = done + threadIdx.x; j < valid; j += blockDim.x) {
    const float v[1] = {static_cast<float>(x[j])};
    online_update<T>(v, m, s);
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {
    row_max[row] = m;
    sum_exp[row] = s;
    const int64_t l = local_label(labels[row], vocab_start, valid, ignore);
    target[row] = l >= 0 ? static_cast<float>(x[l]) : 0.0f;
  }
}

// out = (exp(x - lse) - onehot) * scale, 0 past `valid`; `out` may alias `logits` (each element is read, then
// written, by the same thread), so neither pointer is __restrict__.
template <typename T>
__global__ void backward_kernel(const T* logits, T* out, const int64_t* __restrict__ labels,
                                const float* __restrict__ lse, const float* __restrict__ scale, int64_t vocab,
                                int64_t valid, int64_t vocab_start, int64_t ignore) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  T* o = out + row * vocab;
  const float sc = scale[row], row_lse = lse[row];
  const int64_t l = local_label(labels[row], vocab_start, valid, ignore);
  const bool zero = sc == 0.0f;  // ignored or zero-weight token: write zeros, skip the reads
  int64_t done = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(o) % 16 == 0) {
    constexpr int kVec = Pack<T>::kSize;
    const int64_t packs = vocab / kVec;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<T> r;
      if (zero) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) r.v[e] = T(0.0f);
      } else {
        const Pack<T> pk = reinterpret_cast<const Pack<T>*>(x)[p];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int64_t j = p * kVec + e;
          const float g = j < valid ? exp_for<T>(static_cast<float>(pk.v[e]) - row_lse) * sc : 0.0f;
          r.v[e] = T(j == l ? g - sc : g);
        }
      }
      reinterpret_cast<Pack<T>*>(o)[p] = r;
    }
    done = packs * kVec;
  }
  for (int64_t j = done + threadIdx.x; j < vocab; j += blockDim.x) {
    const float g = (zero || j >= valid) ? 0.0f : exp_for<T>(static_cast<float>(x[j]) - row_lse) * sc;
    o[j] = T(j == l ? g - sc : g);
  }
}

int threads_for(int64_t vocab) { return vocab >= 8192 ? 512 : 128; }

template <typename T>
void launch_partials(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, int64_t valid,
                     int64_t ignore, at::Tensor& m, at::Tensor& s, at::Tensor& t) {
  const int64_t tokens = logits.size(0), vocab = logits.size(1);
  partials_kernel<T><<<tokens, threads_for(vocab), 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<T>(), labels.data_ptr<int64_t>(), vocab, valid, vocab_start, ignore, m.data_ptr<float>(),
      s.data_ptr<float>(), t.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                     const at::Tensor& scale, int64_t vocab_start, int64_t valid, int64_t ignore,
                     at::Tensor& out) {
  const int64_t tokens = logits.size(0), vocab = logits.size(1);
  backward_kernel<T><<<tokens, threads_for(vocab), 0, c10::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<T>(), out.data_ptr<T>(), labels.data_ptr<int64_t>(), lse.data_ptr<float>(),
      scale.data_ptr<float>(), vocab, valid, vocab_start, ignore);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_partials_cuda(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, int64_t vocab_size,
    int64_t ignore_index) {
  check_cross_entropy_args(logits, labels);
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits have an empty vocab dimension");
  const int64_t valid = valid_columns(logits.size(1), vocab_start, vocab_size);
  TORCH_CHECK_VALUE(logits.size(0) < (int64_t{1} << 31), "at most 2^31 - 1 tokens per call, found ", logits.size(0));
  c10::cuda::CUDAGuard guard(logits.device());
  auto opts = logits.options().dtype(at::kFloat);
  const int64_t tokens = logits.size(0);
  at::Tensor m = at::empty({tokens}, opts), s = at::empty({tokens}, opts), t = at::empty({tokens}, opts);
  if (tokens == 0) return {m, s, t};
  switch (logits.scalar_type()) {
    case at::kFloat: launch_partials<float>(logits, labels, vocab_start, valid, ignore_index, m, s, t); break;
    case at::kBFloat16:
      launch_partials<at::BFloat16>(logits, labels, vocab_start, valid, ignore_index, m, s, t);
      break;
    default: launch_partials<at::Half>(logits, labels, vocab_start, valid, ignore_index, m, s, t);
  }
  return {m, s, t};
}

at::Tensor& cross_entropy_backward_cuda_(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                         const at::Tensor& scale, int64_t vocab_start, int64_t vocab_size,
                                         int64_t ignore_index, at::Tensor& out) {
  check_backward_args(logits, labels, lse, scale, out);
  const int64_t valid = valid_columns(logits.size(1), vocab_start, vocab_size);
  TORCH_CHECK_VALUE(logits.size(0) < (int64_t{1} << 31), "at most 2^31 - 1 tokens per call, found ", logits.size(0));
  c10::cuda::CUDAGuard guard(logits.device());
  if (logits.size(0) == 0) return out;
  switch (logits.scalar_type()) {
    case at::kFloat: launch_backward<float>(logits, labels, lse, scale, vocab_start, valid, ignore_index, out); break;
    case at::kBFloat16:
      launch_backward<at::BFloat16>(logits, labels, lse, scale, vocab_start, valid, ignore_index, out);
      break;
    default: launch_backward<at::Half>(logits, labels, lse, scale, vocab_start, valid, ignore_index, out);
  }
  return out;
}

}  // namespace
}  // namespace megaswift

TORCH_LIBRARY_IMPL(megaswift, CUDA, m) {
  m.impl("cross_entropy_partials", &megaswift::cross_entropy_partials_cuda);
  m.impl("cross_entropy_backward_", &megaswift::cross_entropy_backward_cuda_);
}

extern "C" PyObject* PyInit__kernels_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels_cuda",
                               "megaswift CUDA kernels (ops in torch.ops.megaswift)", -1, nullptr};
  return PyModule_Create(&module);
}
