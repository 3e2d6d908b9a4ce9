// Native hookability. C++ modules have no hooks, so a call must pass through
// the library to be hookable: `flexmodel::Hooked<torch::nn::Linear> fc{nullptr};`
// is a drop-in for `torch::nn::Linear fc{nullptr};`, FLEX_MODULE(Name) is the twin
// of TORCH_MODULE(Name), and flexmodel::call(impl, args...) hooks a call made
// through a pointer (a ModuleList child, say). While no FlexModel forward with
// hooks runs, a call costs one predictable branch more than the plain holder.
#pragma once

#include <atomic>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "flexmodel/detail/tensor_tree.h"

namespace flexmodel {
namespace detail {

struct ActiveSite;

// Number of FlexModel forwards with module hooks running in this process.
extern std::atomic<int> hooked_forwards_in_flight;

// The site of `module` (a native module, or a TorchScript module object) in
// the forward running on this thread when it has active hooks, else nullptr.
const ActiveSite* find_active_site(const void* module) noexcept;
bool site_wants_inputs(const ActiveSite& site) noexcept;
bool site_wants_outputs(const ActiveSite& site) noexcept;
void run_input_hooks(const ActiveSite& site, TensorLeaves& leaves);
void run_output_hooks(const ActiveSite& site, TensorLeaves& leaves);

// Remembers the innermost hookable module whose forward a LibTorch error left,
// so that the forward's error can name it; the first call in a forward wins.
void note_failing_module(const torch::nn::Module* module) noexcept;

// Records that calls to `module` go through the library, so hooks on it can fire.
void mark_hookable(const std::shared_ptr<torch::nn::Module>& module);
bool is_hookable(const torch::nn::Module* module);

// Runs `forward(args...)` between the site's input hooks and output hooks.
template <class Forward, class... Args>
std::invoke_result_t<Forward&, Args...> invoke_with_hooks(const ActiveSite& site, Forward& forward, Args&&... args) {
  using Result = std::invoke_result_t<Forward&, Args...>;
  static_assert(!std::is_reference_v<Result>, "a hooked module's forward() must return by value");
  Result output = [&]() -> Result {
    if (!site_wants_inputs(site)) return forward(std::forward<Args>(args)...);
    std::tuple<std::decay_t<Args>...> inputs(std::forward<Args>(args)...);
    TensorLeaves leaves;
    collect_leaves(inputs, leaves);
    run_input_hooks(site, leaves);
    return std::apply(forward, inputs);
  }();
  if (site_wants_outputs(site)) {
    TensorLeaves leaves;
    collect_leaves(output, leaves);
    run_output_hooks(site, leaves);
  }
  return output;
}

// The hook point of every hookable call: `module` is the impl whose hooks apply.
template <class Forward, class... Args>
std::invoke_result_t<Forward&, Args...> dispatch(const torch::nn::Module* module, Forward&& forward,
                                                 Args&&... args) {
  if (hooked_forwards_in_flight.load(std::memory_order_relaxed) == 0) [[likely]] {
    return forward(std::forward<Args>(args)...);
  }
  try {
    if (const ActiveSite* site = find_active_site(module)) {
      return invoke_with_hooks(*site, forward, std::forward<Args>(args)...);
    }
    return forward(std::forward<Args>(args)...);
  } catch (const c10::Error&) {
    note_failing_module(module);
    throw;
  }
}

template <class Impl>
auto forward_of(Impl& impl) {
  return [&impl](auto&&... args) -> decltype(auto) {
    return impl.forward(std::forward<decltype(args)>(args)...);
  };
}

}  // namespace detail

// Calls impl.forward(args...) with the hooks registered on `impl` in the
// running FlexModel forward, if any.
template <class Impl, class... Args>
auto call(Impl& impl, Args&&... args) -> decltype(impl.forward(std::forward<Args>(args)...)) {
  return detail::dispatch(&impl, detail::forward_of(impl), std::forward<Args>(args)...);
}

template <class Impl, class... Args>
auto call(const std::shared_ptr<Impl>& impl, Args&&... args) -> decltype(impl->forward(std::forward<Args>(args)...)) {
  return call(*impl, std::forward<Args>(args)...);
}

// A module holder whose call operator is hookable. Holder is a torch holder
// type (torch::nn::Linear) or torch::nn::ModuleHolder<SomeImpl>.
template <class Holder>
class Hooked : public Holder {
 public:
  using Impl = typename Holder::ContainedType;

  Hooked(std::nullptr_t) : Holder(nullptr) {}  // NOLINT: mirrors ModuleHolder
  Hooked(std::shared_ptr<Impl> module) : Holder(std::move(module)) { mark(); }  // NOLINT
  Hooked(const Holder& holder) : Holder(holder) { mark(); }                    // NOLINT

  template <class... Args>
    requires(std::is_constructible_v<Holder, Args...> &&
             !(sizeof...(Args) == 1 &&
               (std::is_base_of_v<Holder, std::decay_t<Args>> || ... ) ) &&
             !(sizeof...(Args) == 1 && (std::is_same_v<std::decay_t<Args>, std::nullptr_t> || ...)))
  explicit Hooked(Args&&... args) : Holder(std::forward<Args>(args)...) {
    mark();
  }

  Hooked(const Hooked&) = default;
  Hooked(Hooked&&) noexcept = default;
  Hooked& operator=(const Hooked&) = default;
  Hooked& operator=(Hooked&&) noexcept = default;

  template <class... Args>
  auto operator()(Args&&... args) -> decltype(flexmodel::call(std::declval<Impl&>(), std::forward<Args>(args)...)) {
    return call(*this->impl_, std::forward<Args>(args)...);
  }

 private:
  void mark() {
    if (!this->is_empty()) detail::mark_hookable(this->ptr());
  }
};

}  // namespace flexmodel

// Twin of TORCH_MODULE(Name): declares the holder `Name` for `NameImpl`, hookable.
#define FLEX_MODULE(Name)                                                              \
  class Name : public ::flexmodel::Hooked<::torch::nn::ModuleHolder<Name##Impl>> {     \
   public:                                                                             \
    using ::flexmodel::Hooked<::torch::nn::ModuleHolder<Name##Impl>>::Hooked;          \
    using Impl = Name##Impl;                                                           \
  }
