// Slices: the part of a hook's tensor the hook acts on. A capture keeps only
// the slice, an edit replaces the slice and leaves the rest of the tensor as
// it was, and expected_shape is checked against the slice.
//
//   using flexmodel::Index, flexmodel::Slice;
//   HookFunction("layers.3").slice(Slice().positions(Index::last()));            // [B, 1, d] of [B, T, d]
//   HookFunction("layers.3.attn.qkv").slice(Slice().heads(Index::at(2), 12));    // [B, T, 1, d_head]
//   HookFunction("layers.3.attn").slice(Slice().heads_along(1, Index::at(2)));  // [B, 1, T, T] of [B, heads, T, T]
//
// Every dimension a slice selects along stays in the result (the last
// position of [B, T, d] is [B, 1, d]), so the same code reads a slice of one
// index and of many.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <torch/types.h>

namespace flexmodel {

// Indices along one dimension: every one, the last, a range or a list.
// Negative indices count from the end, as in Python; unlike Python's slices,
// an index outside the dimension is a ShapeError, never clipped.
class Index {
 public:
  Index() = default;  // every index
  static Index last();
  // [start, stop); no stop: to the end.
  static Index range(std::int64_t start, std::optional<std::int64_t> stop = std::nullopt);
  // Distinct indices, in the order given; a ConfigError on a repeat.
  static Index list(std::vector<std::int64_t> indices);
  static Index at(std::int64_t index) { return list({index}); }
  // flex-dump's syntax: "all", "last", "A:B" (A or B may be left out), "i" or "i,j,k".
  static Index parse(std::string_view text);

  bool every() const { return kind_ == Kind::every; }
  // "all", "last", "2:5", "[0, 3]".
  std::string describe() const;

  // The part of `tensor` along `dim` (a view unless the index is a list);
  // ShapeError naming `what` when an index lies outside the dimension.
  torch::Tensor take(const torch::Tensor& tensor, std::int64_t dim, std::string_view what) const;
  // Writes `part` (shaped as take's result) into `target` along `dim`, in place.
  void put(torch::Tensor& target, std::int64_t dim, const torch::Tensor& part, std::string_view what) const;

 private:
  enum class Kind : std::uint8_t { every, last, range, list };
  // [start, start + length) of a dimension of `size`, for every kind but list.
  std::pair<std::int64_t, std::int64_t> span(std::int64_t size, std::int64_t dim, std::string_view what) const;
  torch::Tensor positions(std::int64_t size, std::int64_t dim, std::string_view what, const torch::Device& device) const;

  Kind kind_ = Kind::every;
  std::int64_t start_ = 0;
  std::optional<std::int64_t> stop_;
  std::vector<std::int64_t> list_;
};

class Slice {
 public:
  // Along dim 0 (the batch's rows).
  Slice& rows(Index index);
  // Along `dim` (1: a [B, T, ...] activation's positions).
  Slice& positions(Index index, std::int64_t dim = 1);
  // Heads of the last dimension viewed as [count, d_head]: the slice has one
  // dimension more than the tensor ([B, T, heads·d_head] → [B, T, k, d_head]).
  Slice& heads(Index index, std::int64_t count);
  // Heads along the tensor's own dimension `dim` (1 of [B, heads, T, T]).
  Slice& heads_along(std::int64_t dim, Index index);

  bool empty() const { return rows_.every() && positions_.every() && heads_.every(); }
  // "positions last, heads [2] of 12"; "" for an empty slice.
  std::string describe() const;

  // The slice of `whole` (a view where it can be); ShapeError when `whole`
  // lacks a dimension the slice selects along or an index lies outside it.
  torch::Tensor take(const torch::Tensor& whole) const;
  // A new tensor: `whole` with its slice replaced by `part` (take's shape).
  // Autograd sees it as the same replacement.
  torch::Tensor put(const torch::Tensor& whole, const torch::Tensor& part) const;

 private:
  struct Step {
    std::int64_t dim;
    const Index* index;
    const char* what;
  };
  // The dimensions a slice of `whole` (viewed by heads) selects along, outer first.
  std::vector<Step> steps(const torch::Tensor& viewed) const;
  std::vector<std::int64_t> head_view(const torch::Tensor& whole) const;

  Index rows_, positions_, heads_;
  std::int64_t position_dim_ = 1;
  std::int64_t head_count_ = 0;  // > 0: heads of the last dim viewed as [count, d_head]
  std::int64_t head_dim_ = 1;    // with head_count_ 0: the tensor's own head dim
};

}  // namespace flexmodel
