// CPU cross-entropy partials and in-place backward: OpenMP over rows, one pass over each row.
// A row is walked in L1-sized chunks: the chunk's max updates the running max (rescaling the
// running sum: an online softmax at chunk granularity), then the chunk's exponentials are summed
// while it is still in L1. The exp is a polynomial in plain float arithmetic so that GCC
// vectorises the loops; target_clones compiles the row functions for AVX-512, AVX2 and baseline
// x86-64 and picks one at load time.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEGASWIFT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEGASWIFT_ISA_CLONES
#endif
#define MEGASWIFT_INLINE __attribute__((always_inline)) inline

namespace megaswift {
namespace {

constexpr int64_t kChunk = 512;  // floats per chunk: 2 KiB, stays in L1

// exp(x) to ~2 ulp (Cephes-style range reduction + degree-6 polynomial). Below -87 it returns
// exactly 0 (so -inf logits give 0, not NaN), above 88 it saturates; NaN stays NaN.
MEGASWIFT_INLINE float exp_poly(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23 trick)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : p * two_n;
}

template <typename T>
MEGASWIFT_INLINE float load_float(const T& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<float>(v);
  }
}

// Points at the chunk as floats: the row itself for fp32, else a converted copy in `buf`.
template <typename T>
MEGASWIFT_INLINE const float* chunk_as_float(const T* x, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = load_float(x[j]);
    return buf;
  }
}

template <typename T>
MEGASWIFT_INLINE void row_partials(const T* x, int64_t vocab, float* row_max, float* sum_exp) {
  alignas(64) float buf[kChunk];
  float m = -std::numeric_limits<float>::infinity();
  double s = 0.0;  // the cross-chunk combination is in double: rescales then add no drift
  for (int64_t lo = 0; lo < vocab; lo += kChunk) {
    const int64_t n = std::min(kChunk, vocab - lo);
    const float* xs = chunk_as_float(x + lo, n, buf);
    float cm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) cm = xs[j] > cm ? xs[j] : cm;
    if (cm > m) {
      s = s == 0.0 ? 0.0 : s * std::exp(static_cast<double>(m) - static_cast<double>(cm));
      m = cm;
    }
    if (m == -std::numeric_limits<float>::infinity()) continue;  // all -inf so far: nothing to add
    float cs = 0.0f;
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < n; ++j) cs += exp_poly(xs[j] - m);
    s += cs;
  }
  *row_max = m;
  *sum_exp = static_cast<float>(s);
}

// out = exp(x - lse) * scale, then the label's entry gets -scale; out may alias x (same index
// read then written, which `omp simd` lets the compiler vectorise without alias checks).
template <typename T>
MEGASWIFT_INLINE void row_backward(const T* x, T* out, int64_t vocab, float lse, float scale, int64_t label) {
  if (scale == 0.0f) {  // ignored or zero-weight token: its gradient is exactly zero, skip the reads
    std::fill(out, out + vocab, T(0.0f));
    return;
  }
  const float x_label = label >= 0 ? load_float(x[label]) : 0.0f;
  alignas(64) float buf[kChunk];
  for (int64_t lo = 0; lo < vocab; lo += kChunk) {
    const int64_t n = std::min(kChunk, vocab - lo);
    const float* xs = chunk_as_float(x + lo, n, buf);
    T* o = out + lo;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = T(exp_poly(xs[j] - lse) * scale);
  }
  if (label >= 0) out[label] = T((exp_poly(x_label - lse) - 1.0f) * scale);
}

// Non-template entry points, so target_clones can multiversion them.
MEGASWIFT_ISA_CLONES void partials_f32(const float* x, int64_t v, float* m, float* s) { row_partials(x, v, m, s); }
MEGASWIFT_ISA_CLONES void partials_bf16(const c10::BFloat16* x, int64_t v, float* m, float* s) {
  row_partials(x, v, m, s);
}
MEGASWIFT_ISA_CLONES void partials_f16(const c10::Half* x, int64_t v, float* m, float* s) { row_partials(x, v, m, s); }
MEGASWIFT_ISA_CLONES void backward_f32(const float* x, float* o, int64_t v, float lse, float sc, int64_t l) {
  row_backward(x, o, v, lse, sc, l);
}
MEGASWIFT_ISA_CLONES void backward_bf16(const c10::BFloat16* x, c10::BFloat16* o, int64_t v, float lse, float sc,
                                        int64_t l) {
  row_backward(x, o, v, lse, sc, l);
}
MEGASWIFT_ISA_CLONES void backward_f16(const c10::Half* x, c10::Half* o, int64_t v, float lse, float sc, int64_t l) {
  row_backward(x, o, v, lse, sc, l);
}

inline void row_partials_any(const float* x, int64_t v, float* m, float* s) { partials_f32(x, v, m, s); }
inline void row_partials_any(const c10::BFloat16* x, int64_t v, float* m, float* s) { partials_bf16(x, v, m, s); }
inline void row_partials_any(const c10::Half* x, int64_t v, float* m, float* s) { partials_f16(x, v, m, s); }
inline void row_backward_any(const float* x, float* o, int64_t v, float lse, float sc, int64_t l) {
  backward_f32(x, o, v, lse, sc, l);
}
inline void row_backward_any(const c10::BFloat16* x, c10::BFloat16* o, int64_t v, float lse, float sc, int64_t l) {
  backward_bf16(x, o, v, lse, sc, l);
}
inline void row_backward_any(const c10::Half* x, c10::Half* o, int64_t v, float lse, float sc, int64_t l) {
  backward_f16(x, o, v, lse, sc, l);
}

// The label's column in this shard, or -1 when the token is ignored or its label lives elsewhere.
inline int64_t local_label(int64_t label, int64_t vocab_start, int64_t vocab, int64_t ignore_index) {
  const int64_t local = label - vocab_start;
  return (label != ignore_index && local >= 0 && local < vocab) ? local : -1;
}

// Rows are `vocab` apart; only their first `valid` columns are real vocabulary (the rest is padding).
template <typename T>
void partials_all_rows(const T* x, const int64_t* labels, int64_t tokens, int64_t vocab, int64_t valid,
                       int64_t vocab_start, int64_t ignore_index, float* row_max, float* sum_exp, float* target) {
  const int threads = at::get_num_threads();  // honours torch.set_num_threads
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tokens; ++i) {
    const T* row = x + i * vocab;
    if (valid > 0) {
      row_partials_any(row, valid, row_max + i, sum_exp + i);
    } else {  // a shard of padding only: adds nothing to the softmax
      row_max[i] = -std::numeric_limits<float>::infinity();
      sum_exp[i] = 0.0f;
    }
    const int64_t l = local_label(labels[i], vocab_start, valid, ignore_index);
    target[i] = l >= 0 ? load_float(row[l]) : 0.0f;
  }
}

template <typename T>
void backward_all_rows(const T* x, T* out, const int64_t* labels, const float* lse, const float* scale,
                       int64_t tokens, int64_t vocab, int64_t valid, int64_t vocab_start, int64_t ignore_index) {
  const int threads = at::get_num_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < tokens; ++i) {
    const int64_t l = local_label(labels[i], vocab_start, valid, ignore_index);
    if (valid > 0) row_backward_any(x + i * vocab, out + i * vocab, valid, lse[i], scale[i], l);
    std::fill(out + i * vocab + valid, out + (i + 1) * vocab, T(0.0f));  // padding: no gradient
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_partials_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, int64_t vocab_size,
    int64_t ignore_index) {
  check_cross_entropy_args(logits, labels);
  const int64_t tokens = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0, "logits have an empty vocab dimension");
  const int64_t valid = valid_columns(vocab, vocab_start, vocab_size);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor row_max = at::empty({tokens}, opts), sum_exp = at::empty({tokens}, opts),
             target = at::empty({tokens}, opts);
  const int64_t* lab = labels.data_ptr<int64_t>();
  float *m = row_max.data_ptr<float>(), *s = sum_exp.data_ptr<float>(), *t = target.data_ptr<float>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      partials_all_rows(logits.data_ptr<float>(), lab, tokens, vocab, valid, vocab_start, ignore_index, m, s, t);
      break;
    case at::kBFloat16:
      partials_all_rows(logits.data_ptr<c10::BFloat16>(), lab, tokens, vocab, valid, vocab_start, ignore_index, m, s,
                        t);
      break;
    default:
      partials_all_rows(logits.data_ptr<c10::Half>(), lab, tokens, vocab, valid, vocab_start, ignore_index, m, s, t);
  }
  return {row_max, sum_exp, target};
}

at::Tensor& cross_entropy_backward_cpu_(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                        const at::Tensor& scale, int64_t vocab_start, int64_t vocab_size,
                                        int64_t ignore_index, at::Tensor& out) {
  check_backward_args(logits, labels, lse, scale, out);
  const int64_t tokens = logits.size(0), vocab = logits.size(1);
  const int64_t valid = valid_columns(vocab, vocab_start, vocab_size);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float *l = lse.data_ptr<float>(), *s = scale.data_ptr<float>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      backward_all_rows(logits.data_ptr<float>(), out.data_ptr<float>(), lab, l, s, tokens, vocab, valid,
                        vocab_start, ignore_index);
      break;
    case at::kBFloat16:
      backward_all_rows(logits.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), lab, l, s, tokens, vocab,
                        valid, vocab_start, ignore_index);
      break;
    default:
      backward_all_rows(logits.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), lab, l, s, tokens, vocab, valid,
                        vocab_start, ignore_index);
  }
  return out;
}

}  // namespace megaswift
