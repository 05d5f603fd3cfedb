// First-fit decreasing bin packing in O(n log n): a max segment tree over the room left in each
// bin finds the lowest-numbered bin that fits. Unopened bins hold full room, so the leftmost fit
// is either an open bin or the next one to open. Order contract: see megaswift/kernels/packing.py.
#include <algorithm>
#include <numeric>
#include <vector>

#include "ops.h"

namespace megaswift {

std::tuple<at::Tensor, at::Tensor> pack_first_fit_decreasing_cpu(const at::Tensor& lengths_in,
                                                                 int64_t capacity) {
  TORCH_CHECK_VALUE(capacity >= 1, "capacity must be >= 1, found ", capacity);
  TORCH_CHECK_VALUE(lengths_in.dim() == 1, "lengths must be 1-D, found ", lengths_in.sizes());
  at::Tensor lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t n = lengths.numel();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(len[i] >= 1, "sample ", i, " has length ", len[i], "; lengths must be >= 1");
    TORCH_CHECK_VALUE(len[i] <= capacity, "sample ", i, " has length ", len[i], " > capacity ", capacity,
                      "; samples are never split: truncate it or raise the packing capacity");
  }
  // Longest first, ties by index: a counting sort (stable) when the capacity is small enough.
  std::vector<int64_t> order(n);
  if (capacity <= (int64_t{1} << 22)) {
    std::vector<int64_t> start(capacity + 2, 0);
    for (int64_t i = 0; i < n; ++i) start[capacity - len[i] + 1] += 1;
    for (int64_t c = 0; c <= capacity; ++c) start[c + 1] += start[c];
    for (int64_t i = 0; i < n; ++i) order[start[capacity - len[i]]++] = i;
  } else {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [len](int64_t a, int64_t b) { return len[a] > len[b]; });
  }
  // First fit leaves at most one bin at most half full, so bins <= 2 * total / capacity + 1:
  // the tree covers only that many leaves (and stays in cache far longer than n leaves would).
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += len[i];
  const int64_t max_bins = std::min(n, 2 * (total / capacity) + 2);
  int64_t size = 1;
  while (size < max_bins) size *= 2;
  std::vector<int64_t> room(2 * size, capacity);
  std::vector<int64_t> bin_of(n);  // bin of the k-th placed sample
  int64_t num_bins = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t need = len[order[k]];
    int64_t node = 1;
    while (node < size) node = room[2 * node] >= need ? 2 * node : 2 * node + 1;
    TORCH_CHECK(room[node] >= need, "internal error: first-fit tree found no bin");
    const int64_t bin = node - size;
    num_bins = std::max(num_bins, bin + 1);
    bin_of[k] = bin;
    room[node] -= need;
    for (node /= 2; node; node /= 2) room[node] = std::max(room[2 * node], room[2 * node + 1]);
  }

  // Group by bin, keeping placement order (a counting sort: stable by construction).
  at::Tensor offsets = at::zeros({num_bins + 1}, at::kLong);
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) off[bin_of[k] + 1] += 1;
  for (int64_t b = 0; b < num_bins; ++b) off[b + 1] += off[b];
  std::vector<int64_t> cursor(off, off + num_bins);
  at::Tensor items = at::empty({n}, at::kLong);
  int64_t* out = items.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) out[cursor[bin_of[k]]++] = order[k];
  return {items, offsets};
}

}  // namespace megaswift
