#include "flexmodel/slice.h"

#include <algorithm>
#include <charconv>
#include <set>

#include "flexmodel/error.h"

namespace flexmodel {

namespace {

std::int64_t parse_int(std::string_view text, std::string_view whole) {
  std::int64_t value = 0;
  const char* end = text.data() + text.size();
  auto [stop, error] = std::from_chars(text.data(), end, value);
  FLEXMODEL_CHECK(error == std::errc() && stop == end && !text.empty(), ConfigError, "index '", whole,
                  "' is not 'all', 'last', a range A:B or a list i,j,k of integers");
  return value;
}

}  // namespace

Index Index::last() {
  Index index;
  index.kind_ = Kind::last;
  return index;
}

Index Index::range(std::int64_t start, std::optional<std::int64_t> stop) {
  Index index;
  index.kind_ = Kind::range;
  index.start_ = start;
  index.stop_ = stop;
  return index;
}

Index Index::list(std::vector<std::int64_t> indices) {
  FLEXMODEL_CHECK(!indices.empty(), ConfigError, "Index::list needs at least one index");
  // A repeated index would be written twice by an edit, in no defined order.
  std::set<std::int64_t> seen;
  for (std::int64_t i : indices) {
    FLEXMODEL_CHECK(seen.insert(i).second, ConfigError, "Index::list repeats index ", i, "; give each index once");
  }
  Index index;
  index.kind_ = Kind::list;
  index.list_ = std::move(indices);
  return index;
}

Index Index::parse(std::string_view text) {
  if (text == "all") return Index();
  if (text == "last") return last();
  if (const auto colon = text.find(':'); colon != std::string_view::npos) {
    const std::string_view start = text.substr(0, colon), stop = text.substr(colon + 1);
    return range(start.empty() ? 0 : parse_int(start, text),
                 stop.empty() ? std::nullopt : std::optional<std::int64_t>(parse_int(stop, text)));
  }
  std::vector<std::int64_t> indices;
  for (std::size_t begin = 0;;) {
    const std::size_t comma = text.find(',', begin);
    indices.push_back(parse_int(text.substr(begin, comma - begin), text));
    if (comma == std::string_view::npos) break;
    begin = comma + 1;
  }
  return list(std::move(indices));
}

std::string Index::describe() const {
  switch (kind_) {
    case Kind::every:
      return "all";
    case Kind::last:
      return "last";
    case Kind::range:
      return detail::concat(start_, ":", stop_ ? std::to_string(*stop_) : std::string());
    case Kind::list:
      break;
  }
  std::string out;
  for (std::int64_t i : list_) out += detail::concat(out.empty() ? "[" : ", ", i);
  return out + "]";
}

std::pair<std::int64_t, std::int64_t> Index::span(std::int64_t size, std::int64_t dim, std::string_view what) const {
  if (kind_ == Kind::every) return {0, size};
  if (kind_ == Kind::last) {
    FLEXMODEL_CHECK(size > 0, ShapeError, what, " last: dim ", dim, " is empty");
    return {size - 1, 1};
  }
  const std::int64_t start = start_ < 0 ? start_ + size : start_;
  const std::int64_t stop = !stop_ ? size : *stop_ < 0 ? *stop_ + size : *stop_;
  FLEXMODEL_CHECK(0 <= start && start < stop && stop <= size, ShapeError, what, " ", describe(),
                  " is not a non-empty range inside dim ", dim, " of size ", size);
  return {start, stop - start};
}

torch::Tensor Index::positions(std::int64_t size, std::int64_t dim, std::string_view what,
                               const torch::Device& device) const {
  std::vector<std::int64_t> resolved;
  std::set<std::int64_t> seen;
  for (std::int64_t i : list_) {
    FLEXMODEL_CHECK(-size <= i && i < size, ShapeError, what, " ", describe(), ": index ", i, " is outside dim ",
                    dim, " of size ", size);
    resolved.push_back(i < 0 ? i + size : i);
    // 1 and -5 of 6 are one index: an edit would write it twice, in no defined order.
    FLEXMODEL_CHECK(seen.insert(resolved.back()).second, ShapeError, what, " ", describe(), ": indices ",
                    "name position ", resolved.back(), " of dim ", dim, " twice");
  }
  return torch::tensor(resolved, torch::kInt64).to(device);
}

torch::Tensor Index::take(const torch::Tensor& tensor, std::int64_t dim, std::string_view what) const {
  if (kind_ == Kind::list) return tensor.index_select(dim, positions(tensor.size(dim), dim, what, tensor.device()));
  const auto [start, length] = span(tensor.size(dim), dim, what);
  return tensor.narrow(dim, start, length);
}

void Index::put(torch::Tensor& target, std::int64_t dim, const torch::Tensor& part, std::string_view what) const {
  if (kind_ == Kind::list) {
    target.index_copy_(dim, positions(target.size(dim), dim, what, target.device()), part);
    return;
  }
  const auto [start, length] = span(target.size(dim), dim, what);
  target.narrow(dim, start, length).copy_(part);
}

Slice& Slice::rows(Index index) {
  rows_ = std::move(index);
  return *this;
}

Slice& Slice::positions(Index index, std::int64_t dim) {
  positions_ = std::move(index);
  position_dim_ = dim;
  return *this;
}

Slice& Slice::heads(Index index, std::int64_t count) {
  FLEXMODEL_CHECK(count > 0, ConfigError, "Slice::heads: the head count must be positive, not ", count);
  heads_ = std::move(index);
  head_count_ = count;
  return *this;
}

Slice& Slice::heads_along(std::int64_t dim, Index index) {
  heads_ = std::move(index);
  head_count_ = 0;
  head_dim_ = dim;
  return *this;
}

std::string Slice::describe() const {
  std::string out;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : ", ") + part; };
  if (!rows_.every()) add("rows " + rows_.describe());
  if (!positions_.every()) add(detail::concat("positions ", positions_.describe(), position_dim_ == 1 ? "" : detail::concat(" of dim ", position_dim_)));
  if (!heads_.every()) {
    add(head_count_ > 0 ? detail::concat("heads ", heads_.describe(), " of ", head_count_)
                        : detail::concat("heads ", heads_.describe(), " of dim ", head_dim_));
  }
  return out;
}

std::vector<std::int64_t> Slice::head_view(const torch::Tensor& whole) const {
  FLEXMODEL_CHECK(whole.dim() >= 1, ShapeError, "slice heads of ", head_count_, ": the tensor is 0-dimensional");
  const std::int64_t width = whole.size(-1);
  FLEXMODEL_CHECK(width % head_count_ == 0, ShapeError, "slice heads of ", head_count_, ": the last dim of ",
                  whole.sizes(), " is not a multiple of ", head_count_);
  std::vector<std::int64_t> shape(whole.sizes().begin(), whole.sizes().end() - 1);
  shape.push_back(head_count_);
  shape.push_back(width / head_count_);
  return shape;
}

std::vector<Slice::Step> Slice::steps(const torch::Tensor& viewed) const {
  // Dimensions are the tensor's own: the heads view adds one at the end, so
  // a negative position dim is counted before it.
  const std::int64_t own_rank = viewed.dim() - (head_count_ > 0 && !heads_.every() ? 1 : 0);
  std::vector<Step> steps;
  auto add = [&](const Index& index, std::int64_t dim, const char* what) {
    if (index.every()) return;
    const std::int64_t resolved = dim < 0 ? dim + own_rank : dim;
    FLEXMODEL_CHECK(0 <= resolved && resolved < own_rank, ShapeError, "slice ", what, " ", index.describe(),
                    ": a tensor of shape ", viewed.sizes().slice(0, own_rank), " has no dim ", dim);
    for (const Step& step : steps) {
      FLEXMODEL_CHECK(step.dim != resolved, ConfigError, "slice: ", step.what, " and ", what,
                      " both select along dim ", resolved);
    }
    steps.push_back({resolved, &index, what});
  };
  add(rows_, 0, "rows");
  add(positions_, position_dim_, "positions");
  if (head_count_ > 0) {
    if (!heads_.every()) {
      FLEXMODEL_CHECK(std::none_of(steps.begin(), steps.end(), [&](const Step& s) { return s.dim == own_rank - 1; }),
                      ConfigError, "slice: heads view the last dim, which another part of the slice selects along");
      steps.push_back({viewed.dim() - 2, &heads_, "heads"});
    }
  } else {
    add(heads_, head_dim_, "heads");
  }
  return steps;
}

torch::Tensor Slice::take(const torch::Tensor& whole) const {
  if (empty()) return whole;
  torch::Tensor part = head_count_ > 0 && !heads_.every() ? whole.reshape(head_view(whole)) : whole;
  for (const Step& step : steps(part)) part = step.index->take(part, step.dim, step.what);
  return part;
}

torch::Tensor Slice::put(const torch::Tensor& whole, const torch::Tensor& part) const {
  if (empty()) return part;
  torch::Tensor result = whole.clone(at::MemoryFormat::Contiguous);
  const bool viewed = head_count_ > 0 && !heads_.every();
  torch::Tensor target = viewed ? result.view(head_view(whole)) : result;
  const std::vector<Step> all = steps(target);
  // Ranges narrow to views of the result; a list index copies out, is
  // written into, and is copied back.
  auto write = [&](auto& self, torch::Tensor into, std::size_t i) -> void {
    if (i == all.size()) {
      into.copy_(part);
      return;
    }
    const Step& step = all[i];
    torch::Tensor inner = step.index->take(into, step.dim, step.what);
    self(self, inner, i + 1);
    if (!inner.is_alias_of(into)) step.index->put(into, step.dim, inner, step.what);
  };
  write(write, target, 0);
  return result;
}

}  // namespace flexmodel
