// Flattens a module's inputs or outputs (a tensor, or tuples, pairs, vectors
// and optionals of them, nested) into pointers to its tensor leaves, in
// depth-first order, so a hook can see and replace leaf `unpack_idx`.
#pragma once

#include <array>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/SmallVector.h>
#include <torch/types.h>

namespace flexmodel::detail {

using TensorLeaves = c10::SmallVector<torch::Tensor*, 4>;

template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

template <class T>
concept TupleLike = requires { std::tuple_size<T>::value; };

template <class T>
concept OptionalLike = requires(T value) {
  value.has_value();
  *value;
  value.reset();
};

template <class T>
void collect_leaves(T& value, TensorLeaves& leaves) {
  using Plain = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<Plain, torch::Tensor>) {
    leaves.push_back(const_cast<torch::Tensor*>(&value));
  } else if constexpr (is_std_vector<Plain>::value) {
    for (auto& element : value) collect_leaves(element, leaves);
  } else if constexpr (TupleLike<Plain>) {
    std::apply([&](auto&... element) { (collect_leaves(element, leaves), ...); }, value);
  } else if constexpr (OptionalLike<Plain>) {
    if (value.has_value()) collect_leaves(*value, leaves);
  }
}

// dim 0 of the first tensor among `args` (the batch), or -1 when there is none.
template <class... Args>
std::int64_t batch_rows(const Args&... args) {
  std::int64_t rows = -1;
  auto visit = [&](const auto& arg) {
    if (rows >= 0) return;
    TensorLeaves leaves;
    collect_leaves(const_cast<std::remove_cvref_t<decltype(arg)>&>(arg), leaves);
    for (const torch::Tensor* leaf : leaves) {
      if (leaf->defined() && leaf->dim() > 0) {
        rows = leaf->size(0);
        return;
      }
    }
  };
  (visit(args), ...);
  return rows;
}

}  // namespace flexmodel::detail
