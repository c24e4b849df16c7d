// Row operations on host memory the cache needs besides the attention
// kernels: the k fingerprint of the exact tier's match and copies of prefix
// rows into and out of a stored payload. Kept together because they are what
// a compute backend with its own memory has to provide.
#pragma once

#include <cstdint>
#include <vector>

#include "attention_echo/tensor.hpp"

namespace attention_echo::cache {

// A hash of k's rows [0, prefix) of every kv head: any change to them changes
// it (with overwhelming probability), so the same tokens under other weights
// do not match.
std::uint64_t fingerprint(const HeadsView& k, int prefix);

// Rows [0, rows) of every head of src, packed [heads, rows, dim].
std::vector<float> copy_rows_out(const HeadsView& src, int rows);

// The inverse: packed [heads, rows, dim] into rows [0, rows) of dst.
void copy_rows_in(const std::vector<float>& src, int rows, const MutableHeadsView& dst);

}  // namespace attention_echo::cache
