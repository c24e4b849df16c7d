#include "core/validate.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "core/errors.hpp"


namespace attention_echo {
namespace {

template <typename View>
std::string shape(const View& v) {
  return "[" + std::to_string(v.heads) + ", " + std::to_string(v.tokens) + ", " +
         std::to_string(v.dim) + "]";
}

template <typename View>
void require_data(std::string_view name, const View& v) {
  if (v.heads < 1 || v.tokens < 1 || v.dim < 1)
    throw_invalid(name, "every dimension must be >= 1, got " + shape(v));
  if constexpr (requires { v.pages; }) {
    if (v.data == nullptr && v.pages == nullptr) throw_invalid(name, "data is null");
  } else if (v.data == nullptr) {
    // A paged float32 view converts to one with null data: only attention()
    // and attention_rows() read pages.
    throw_invalid(name, "data is null (paged views are read by attention() and attention_rows() only)");
  }
}

void require_unpaged(std::string_view name, const HeadsView& v) {
  if (v.pages != nullptr) throw_invalid(name, "must not be paged (only key and value views may be)");
}

// Paged K/V: pages of whole kernel steps (tensor.hpp), and value paged like key.
void require_pages(const HeadsView& k, const HeadsView& v) {
  if (k.pages != nullptr && (k.page_tokens <= 0 || k.page_tokens % kKeyChunk != 0))
    throw_invalid("key", "page_tokens must be a positive multiple of " + std::to_string(kKeyChunk) + ", got " +
                             std::to_string(k.page_tokens));
  if ((v.pages == nullptr) != (k.pages == nullptr) || (v.pages != nullptr && v.page_tokens != k.page_tokens))
    throw_invalid("value", "must be paged exactly like key (both or neither, same page_tokens)");
}

// A float is NaN or Inf exactly when its exponent bits are all ones. Testing
// the bits (no branches, no libm) lets the compiler vectorise the scan, which
// matters: on an exact-tier hit this scan is a large share of the call.
bool row_is_finite(const float* row, int n) {
  std::uint32_t bad = 0;
  for (int d = 0; d < n; ++d) {
    std::uint32_t bits;
    std::memcpy(&bits, row + d, sizeof bits);
    bad |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// Tokens from t on whose rows lie token_stride apart: to the end of t's
// page, or of the view.
int rows_in_run(const HeadsView& v, int t) {
  return v.pages == nullptr ? v.tokens - t : std::min(v.page_tokens - t % v.page_tokens, v.tokens - t);
}

// Walks each run of rows by pointer: a paged view's row() divides, which
// cost 5% of a decode-sized attention() call when done for every row.
void require_finite(std::string_view name, const HeadsView& v) {
  for (int h = 0; h < v.heads; ++h)
    for (int t0 = 0, run = 0; t0 < v.tokens; t0 += run) {
      const float* first = v.row(h, t0);
      run = rows_in_run(v, t0);
      for (int i = 0; i < run; ++i) {
        const float* row = first + i * v.token_stride;
        if (row_is_finite(row, v.dim)) continue;
        for (int d = 0; d < v.dim; ++d)
          if (!std::isfinite(row[d]))
            throw_invalid(name, "contains NaN or Inf at [" + std::to_string(h) + ", " + std::to_string(t0 + i) +
                                    ", " + std::to_string(d) + "]");
      }
    }
}

template <typename View>
void require_device(std::string_view name, const View& v, const View& q) {
  if (v.device != q.device) throw_invalid(name, "on " + to_string(v.device) + ", query on " + to_string(q.device));
}

}  // namespace

namespace {

// What every attention entry point needs of q against k and v: q's rows are
// positions [query_offset, T) of k's T.
template <typename View>
void validate_keys(const View& q, const View& k, const View& v, int query_offset) {
  require_data("query", q);
  require_data("key", k);
  require_data("value", v);
  if constexpr (std::is_same_v<View, HeadsView>) {
    require_unpaged("query", q);
    require_pages(k, v);
  }
  require_device("key", k, q);
  require_device("value", v, q);
  if (k.dim != q.dim) throw_invalid("key", "head dim " + std::to_string(k.dim) + " != query's " + std::to_string(q.dim));
  if (query_offset < 0) throw_invalid("query_offset", "must be >= 0, got " + std::to_string(query_offset));
  if (k.tokens != query_offset + q.tokens)
    throw_invalid("key", "token count " + std::to_string(k.tokens) + " != query's " + std::to_string(q.tokens) +
                    (query_offset ? " + query_offset " + std::to_string(query_offset) : ""));
  if (q.heads % k.heads != 0)
    throw_invalid("key", std::to_string(k.heads) + " kv heads do not divide " + std::to_string(q.heads) + " query heads");
  if (v.heads != k.heads || v.tokens != k.tokens || v.dim != k.dim)
    throw_invalid("value", "shape " + shape(v) + " != key's " + shape(k));
}

// Shapes and devices of q, k, v and out, whatever their dtype.
template <typename View>
void validate_shapes(const View& q, const View& k, const View& v, const View& out, int prefix_length,
                     int query_offset) {
  validate_keys(q, k, v, query_offset);
  require_data("out", out);
  if constexpr (std::is_same_v<View, HeadsView>) require_unpaged("out", out);
  require_device("out", out, q);
  if (out.heads != q.heads || out.tokens != q.tokens || out.dim != q.dim)
    throw_invalid("out", "shape " + shape(out) + " != query's " + shape(q));
  if (prefix_length < 0 || prefix_length > k.tokens)
    throw_invalid("prefix_length", "must be in [0, " + std::to_string(k.tokens) + "], got " + std::to_string(prefix_length));
}

}  // namespace

void validate_attention_inputs(const HeadsView& q, const HeadsView& k, const HeadsView& v,
                               const MutableHeadsView& out, int prefix_length, int query_offset, bool check_finite) {
  validate_shapes(q, k, v, as_const(out), prefix_length, query_offset);
  if (q.device != Device::cpu() || !check_finite) return;
  require_finite("query", q);
  require_finite("key", k);
  require_finite("value", v);
}

void validate_attention_inputs(const AnyHeadsView& q, const AnyHeadsView& k, const AnyHeadsView& v,
                               const MutableAnyHeadsView& out, int prefix_length) {
  for (auto [name, view] : {std::pair{"key", k}, std::pair{"value", v}, std::pair{"out", as_const(out)}})
    if (view.dtype != q.dtype) throw_invalid(name, "dtype " + to_string(view.dtype) + " != query's " + to_string(q.dtype));
  if (q.dtype == DType::kF32 && q.device == Device::cpu())
    return validate_attention_inputs(as_float(q), as_float(k), as_float(v), as_float(out), prefix_length);
  validate_shapes(q, k, v, as_const(out), prefix_length, 0);
}

void validate_attention_rows(const HeadsView& q, const HeadsView& k, const HeadsView& v, std::span<const int> rows,
                             const MutableHeadsView& out, bool check_finite) {
  validate_keys(q, k, v, 0);
  require_data("out", as_const(out));
  require_unpaged("out", as_const(out));
  require_device("out", as_const(out), q);
  if (rows.empty()) throw_invalid("rows", "must not be empty");
  for (std::size_t r = 0; r < rows.size(); ++r)
    if (rows[r] < 0 || rows[r] >= q.tokens || (r > 0 && rows[r] <= rows[r - 1]))
      throw_invalid("rows", "must be ascending positions in [0, " + std::to_string(q.tokens) + ")");
  if (out.heads != q.heads || out.tokens != static_cast<int>(rows.size()) || out.dim != q.dim)
    throw_invalid("out", "shape " + shape(as_const(out)) + " != [query heads, rows, dim]");
  if (q.device != Device::cpu() || !check_finite) return;
  for (int t : rows) require_finite("query", {q.row(0, t), q.heads, 1, q.dim, q.head_stride, q.token_stride});
  require_finite("key", k);
  require_finite("value", v);
}

void validate_matrix(std::string_view name, const MatrixView& m) {
  if (m.data == nullptr || m.rows < 1 || m.cols < 1)
    throw_invalid(name, "must be a non-empty [rows, cols] matrix");
  if (m.device != Device::cpu()) throw_invalid(name, "must be in host memory, got " + to_string(m.device));
  for (long long i = 0; i < static_cast<long long>(m.rows) * m.cols; ++i)
    if (!std::isfinite(m.data[i])) throw_invalid(name, "contains NaN or Inf");
}

void validate_scale(float scale) {
  if (!std::isfinite(scale) || scale <= 0.0f) throw_invalid("scale", "must be finite and positive");
}

}  // namespace attention_echo
