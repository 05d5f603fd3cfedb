// Declarations of the CPU ops; the schemas are defined once in register_cpu.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace megaswift {

// `vocab_size` is the true vocabulary size: a shard starting at global column `vocab_start` uses
// only its columns below it (valid_columns); the rest are padding, outside the softmax.

// Per row of a [tokens, vocab_local] vocab shard: (max, sum of exp(x - max), logit of the label
// or 0 where the label is ignored or owned by another shard), all fp32 [tokens]. A shard of
// padding only gives (-inf, 0, 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_partials_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, int64_t vocab_size,
    int64_t ignore_index);

// out = (exp(logits - lse) - onehot(label)) * scale, row by row, and exactly 0 on padding
// columns; `out` may alias `logits`.
at::Tensor& cross_entropy_backward_cpu_(const at::Tensor& logits, const at::Tensor& labels,
                                        const at::Tensor& lse, const at::Tensor& scale,
                                        int64_t vocab_start, int64_t vocab_size, int64_t ignore_index,
                                        at::Tensor& out);

// First-fit decreasing: (items grouped by bin in placement order, bin offsets [num_bins + 1]).
std::tuple<at::Tensor, at::Tensor> pack_first_fit_decreasing_cpu(const at::Tensor& lengths,
                                                                 int64_t capacity);

// Shared argument checks, so the CPU and CUDA ops reject the same inputs with the same words.
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be [tokens, vocab_local], found ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                       logits.scalar_type() == at::kHalf,
                   "logits must be float32, bfloat16 or float16, found ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous, found strides ", logits.strides());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, found ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.is_contiguous(),
                    "labels must be contiguous [", logits.size(0), "], found ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels on ", labels.device(), ", logits on ",
                    logits.device());
}

inline void check_row_vector(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, found ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(), name,
                    " must be contiguous [", logits.size(0), "], found ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " on ", t.device(), ", logits on ", logits.device());
}

inline void check_backward_out(const at::Tensor& out, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() &&
                        out.is_contiguous() && out.device() == logits.device(),
                    "out must be a contiguous ", logits.scalar_type(), " tensor of shape ", logits.sizes(),
                    " on ", logits.device(), ", found ", out.scalar_type(), " ", out.sizes());
}

// How many columns of a shard of `vocab_local` columns starting at `vocab_start` are real vocabulary.
inline int64_t valid_columns(int64_t vocab_local, int64_t vocab_start, int64_t vocab_size) {
  TORCH_CHECK_VALUE(vocab_size > 0, "vocab_size must be positive (the true vocabulary size), found ", vocab_size);
  const int64_t valid = vocab_size - vocab_start;
  return valid < 0 ? 0 : (valid > vocab_local ? vocab_local : valid);
}

// Everything the backward ops (CPU and CUDA) check before touching memory.
inline void check_backward_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                const at::Tensor& scale, const at::Tensor& out) {
  check_cross_entropy_args(logits, labels);
  check_row_vector(lse, logits, "lse");
  check_row_vector(scale, logits, "scale");
  check_backward_out(out, logits);
}

}  // namespace megaswift
