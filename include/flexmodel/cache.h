// One run's activations of chosen hook points, kept apart from the output map
// (which does not grow): TransformerLens's run_with_cache.
//
//   auto [logits, cache] = flexmodel::run_with_cache(fm, "layers.*.mlp", tokens);
//   torch::Tensor mlp0 = cache.at("layers.0.mlp");
//   torch::Tensor mlps = cache.stack("layers.*.mlp");  // [layers, batch, T, d]
//   cache.save("run.h5");                              // flex-dump's file layout
//   auto last = flexmodel::CacheOptions().slice(flexmodel::Slice().positions(flexmodel::Index::last()));
//
// The run's hooks are only the cache's (the model's own stay registered and
// do not run); they copy what they see, so later edits never change it.
// Under a mesh it is collective (every rank calls it) and the cache is filled
// on rank 0, with whole tensors in forward order, as CPU copies; the other
// ranks' caches are empty.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "flexmodel/flex_model.h"
#include "flexmodel/io/hdf5_writer.h"
#include "flexmodel/scoped_hooks.h"

namespace flexmodel {

class ActivationCache;
namespace detail {
// Hooks of `scope` (on `model`) that fill `cache` at every hook point
// `pattern` selects. In one process they copy what they see; under a mesh
// they capture, and rank 0's captures reach `cache` through the diversion
// returned (null in one process), which must outlive the forward.
std::unique_ptr<FlexModelBase::DivertedCaptures> add_cache_hooks(FlexModelBase& model, ScopedHooks& scope,
                                                                 const Pattern& pattern, ActivationCache& cache);
}  // namespace detail

struct CacheOptions {
  // Which hooks fill the cache: forward (outputs) or forward_pre (inputs).
  TORCH_ARG(HookType, hook_type) = HookType::forward;
  // Floating-point tensors are cast as captured (bfloat16 or float16 halves
  // float32's memory); integer and bool tensors keep their dtype.
  TORCH_ARG(std::optional<c10::ScalarType>, dtype) = std::nullopt;
  // CUDA activations stay on their device (else the cache holds CPU copies);
  // under a mesh they come through rank 0's capture path as CPU copies.
  TORCH_ARG(bool, keep_device) = false;
  // Only this part of each tensor is cached (the last position, say).
  TORCH_ARG(Slice, slice) = Slice();
};

class ActivationCache {
 public:
  using Key = OutputMap::Key;

  explicit ActivationCache(CacheOptions options = {}) : options_(std::move(options)) {}

  // The tensor of one hook point; a ConfigError naming what the cache holds
  // when it has none, or when the module ran more than once (see calls()).
  const torch::Tensor& at(const std::string& module_name, HookType type = HookType::forward) const;
  // Every call's tensor, in call order (a module used twice in a forward).
  const std::vector<torch::Tensor>& calls(const std::string& module_name, HookType type = HookType::forward) const;
  bool contains(const std::string& module_name, HookType type = HookType::forward) const;
  // In the order the hook points first fired.
  const std::vector<Key>& keys() const { return order_; }
  std::size_t size() const { return order_.size(); }
  // The tensors of the hook points `pattern` matches, in forward order,
  // stacked along a new dim 0; a ShapeError naming two that differ in shape.
  torch::Tensor stack(const Pattern& pattern, HookType type = HookType::forward) const;
  // Writes the cache as one step of an HDF5 file, in flex-dump's layout.
  void save(const std::string& path, io::HDF5WriterOptions options = {}) const;

  // A copy of `tensor` (cast and moved as the options say) as the next call of the hook point.
  void add(const std::string& module_name, HookType type, const torch::Tensor& tensor);
  const CacheOptions& options() const { return options_; }

 private:
  friend std::unique_ptr<FlexModelBase::DivertedCaptures> detail::add_cache_hooks(FlexModelBase&, ScopedHooks&,
                                                                                   const Pattern&, ActivationCache&);
  const std::vector<torch::Tensor>& find(const std::string& module_name, HookType type) const;
  // A ConfigError beginning with `what` on a rank whose cache rank 0 holds.
  void check_filled_here(const std::string& what) const;

  CacheOptions options_;
  bool filled_on_another_rank_ = false;  // a rank other than 0 under a mesh
  std::vector<Key> order_;
  std::map<Key, std::vector<torch::Tensor>> tensors_;
};

namespace detail {
// A ConfigError unless `options` asks for forward or forward_pre hooks
// (gradient hooks would fire after the run).
void check_cacheable(const CacheOptions& options);
template <class... Args>
inline constexpr bool first_is_cache_options = false;
template <class First, class... Rest>
inline constexpr bool first_is_cache_options<First, Rest...> = std::is_same_v<std::decay_t<First>, CacheOptions>;
}  // namespace detail

// Runs `model` once on `inputs` with hooks on the hook points `pattern`
// selects and returns its output with their activations.
template <class Model, class... Args>
auto run_with_cache(Model& model, const Pattern& pattern, const CacheOptions& options, Args&&... inputs) {
  detail::check_cacheable(options);
  ActivationCache cache(options);
  ScopedHooks scope(model);
  const auto diverted = detail::add_cache_hooks(model, scope, pattern, cache);
  auto output = model.forward(scope.only(), std::forward<Args>(inputs)...);
  return std::pair<decltype(output), ActivationCache>(std::move(output), std::move(cache));
}

template <class Model, class... Args>
  requires(!detail::first_is_cache_options<Args...>)
auto run_with_cache(Model& model, const Pattern& pattern, Args&&... inputs) {
  return run_with_cache(model, pattern, CacheOptions{}, std::forward<Args>(inputs)...);
}

}  // namespace flexmodel
