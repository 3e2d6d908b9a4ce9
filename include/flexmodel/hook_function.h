// HookFunction: what to do at one hook point. A hook without an editing
// function only captures; one with an editing function may observe (return
// nothing) or replace the activation (return a tensor).
#pragma once

#include <any>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include <c10/util/Type.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include "flexmodel/error.h"
#include "flexmodel/slice.h"

namespace flexmodel {

enum class HookType : std::uint8_t {
  forward,            // a module's output
  forward_pre,        // a module's input
  full_backward,      // the gradient with respect to a module's input
  full_backward_pre,  // the gradient with respect to a module's output
  tensor,             // a parameter's gradient
};

inline constexpr std::size_t kHookTypeCount = 5;

std::string_view to_string(HookType type) noexcept;

// One entry per dimension; std::nullopt leaves that dimension free.
using ExpectedShape = std::vector<std::optional<std::int64_t>>;

// Named values shared by every hook of a FlexModel, kept across forwards.
class SaveContext {
 public:
  template <class T>
  void set(const std::string& key, T value) {
    values_[key] = std::move(value);
  }

  // A number set as another arithmetic type (set("pos", 3) is an int) is
  // converted when T holds it exactly, and kept from then on as T (so a
  // reference got as the other type no longer refers to it).
  template <class T>
  T& get(const std::string& key) {
    auto found = values_.find(key);
    FLEXMODEL_CHECK(found != values_.end(), ConfigError, "save_ctx has no value '", key, "'");
    if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) {
      if (std::any_cast<T>(&found->second) == nullptr) convert_number<T>(found->second);
    }
    T* value = std::any_cast<T>(&found->second);
    FLEXMODEL_CHECK(value != nullptr, ConfigError, "save_ctx['", key, "'] holds ",
                    c10::demangle(found->second.type().name()), ", asked for ",
                    c10::demangle(typeid(T).name()));
    return *value;
  }

  bool contains(const std::string& key) const { return values_.count(key) != 0; }
  void erase(const std::string& key) { values_.erase(key); }
  void clear() { values_.clear(); }
  std::size_t size() const { return values_.size(); }

 private:
  // `from` as a T when T holds it exactly (3 as a double; not 0.5 as an int, nor -1 as an unsigned).
  template <class T, class From>
  static bool exactly(From from, T& to) {
    if constexpr (std::is_integral_v<T> && std::is_integral_v<From>) {
      if (!std::in_range<T>(from)) return false;
    } else if constexpr (std::is_integral_v<T>) {
      // Checked before the cast, which is undefined out of range.
      if (!(from >= static_cast<From>(std::numeric_limits<T>::lowest()) &&
            from <= static_cast<From>(std::numeric_limits<T>::max()))) {
        return false;
      }
    }
    to = static_cast<T>(from);
    return static_cast<From>(to) == from;
  }
  template <class T, class... From>
  static bool convert_from(std::any& value) {
    T converted{};
    return ((value.type() == typeid(From) && exactly(std::any_cast<From>(value), converted) &&
             (value = converted, true)) ||
            ...);
  }
  template <class T>
  static void convert_number(std::any& value) {
    convert_from<T, int, long, long long, unsigned, unsigned long, unsigned long long, short, unsigned short,
                 signed char, unsigned char, float, double>(value);
  }

  std::unordered_map<std::string, std::any> values_;
};

using TrainableModules = std::map<std::string, std::shared_ptr<torch::nn::Module>>;

// What an editing function knows about the call it runs in.
struct HookContext {
  const std::string& module_name;
  HookType hook_type;
  std::int64_t step;             // index of the forward (0 for the first)
  torch::nn::Module* module;     // the hooked module, or nullptr for a parameter's hook
  SaveContext& save_ctx;
  const TrainableModules& trainable_modules;
  // In generate(): the generation step (0 runs the prompt) and the positions
  // [position_begin, position_end) of the sequence this forward's tensors
  // cover (with a key/value cache, the new token's only); outside
  // generation -1, and the whole tensor's positions are unknown (0, 0).
  std::int64_t generation_step = -1;
  std::int64_t position_begin = 0;
  std::int64_t position_end = 0;

  template <class Impl>
  Impl& trainable_module(const std::string& name) const {
    auto found = trainable_modules.find(name);
    FLEXMODEL_CHECK(found != trainable_modules.end(), ConfigError, "hook on '", module_name,
                    "' asked for trainable module '", name,
                    "', which is not registered: call register_trainable_module first");
    auto* typed = found->second->as<Impl>();
    FLEXMODEL_CHECK(typed != nullptr, ConfigError, "trainable module '", name, "' is a ",
                    found->second->name(), ", asked for ", c10::demangle(typeid(Impl).name()));
    return *typed;
  }
};

// The normalised form: returns the tensor the model continues with.
using EditingFunction = std::function<torch::Tensor(const torch::Tensor&, HookContext&)>;

namespace detail {

// Accepts f(tensor, ctx) or f(tensor), returning a tensor (replace) or void (observe).
template <class F>
EditingFunction to_editing_function(F&& function) {
  using Fn = std::decay_t<F>;
  if constexpr (std::is_same_v<Fn, EditingFunction>) {
    return std::forward<F>(function);
  } else if constexpr (std::is_same_v<Fn, std::nullptr_t>) {
    return {};
  } else if constexpr (std::is_invocable_v<Fn&, const torch::Tensor&, HookContext&>) {
    using Result = std::invoke_result_t<Fn&, const torch::Tensor&, HookContext&>;
    if constexpr (std::is_void_v<Result>) {
      return [f = Fn(std::forward<F>(function))](const torch::Tensor& x, HookContext& ctx) mutable {
        f(x, ctx);
        return x;
      };
    } else {
      static_assert(std::is_convertible_v<Result, torch::Tensor>,
                    "an editing function returns void (observe) or a torch::Tensor (replace)");
      return Fn(std::forward<F>(function));
    }
  } else {
    static_assert(std::is_invocable_v<Fn&, const torch::Tensor&>,
                  "an editing function is callable as f(tensor, HookContext&) or f(tensor)");
    using Result = std::invoke_result_t<Fn&, const torch::Tensor&>;
    return [f = Fn(std::forward<F>(function))](const torch::Tensor& x, HookContext&) mutable {
      if constexpr (std::is_void_v<Result>) {
        f(x);
        return x;
      } else {
        return torch::Tensor(f(x));
      }
    };
  }
}

}  // namespace detail

class HookFunction {
 public:
  // unpack_idx that applies the hook to every tensor of the input or output,
  // in depth-first order: one capture (and one edit) per tensor per call.
  static constexpr std::size_t kAllLeaves = static_cast<std::size_t>(-1);

  explicit HookFunction(std::string module_name, ExpectedShape expected_shape = {})
      : module_name_(std::move(module_name)), expected_shape_(std::move(expected_shape)) {}

  template <class F>
  HookFunction(std::string module_name, ExpectedShape expected_shape, F&& editing_function,
               std::size_t unpack_idx = 0)
      : module_name_(std::move(module_name)),
        expected_shape_(std::move(expected_shape)),
        editing_function_(detail::to_editing_function(std::forward<F>(editing_function))),
        unpack_idx_(unpack_idx) {}

  HookFunction& expected_shape(ExpectedShape shape) {
    expected_shape_ = std::move(shape);
    return *this;
  }
  template <class F>
  HookFunction& editing_function(F&& function) {
    editing_function_ = detail::to_editing_function(std::forward<F>(function));
    return *this;
  }
  // Which tensor of a tuple/vector/nested output (depth-first) the hook sees.
  HookFunction& unpack_idx(std::size_t index) {
    unpack_idx_ = index;
    return *this;
  }
  // The part of the tensor the hook acts on (positions, heads, rows): the
  // capture keeps it, the editing function sees and returns it, and
  // expected_shape describes it. Default: the whole tensor.
  HookFunction& slice(Slice part) {
    slice_ = std::move(part);
    return *this;
  }
  // Whether the activation (before the edit) is copied to the outputs. Default true.
  HookFunction& capture(bool enabled) {
    capture_ = enabled;
    return *this;
  }

  // The same hook on another module.
  HookFunction with_module_name(std::string name) const {
    HookFunction copy = *this;
    copy.module_name_ = std::move(name);
    return copy;
  }

  const std::string& module_name() const { return module_name_; }
  const ExpectedShape& expected_shape() const { return expected_shape_; }
  const EditingFunction& editing_function() const { return editing_function_; }
  std::size_t unpack_idx() const { return unpack_idx_; }
  bool capture() const { return capture_; }
  const Slice& slice() const { return slice_; }

 private:
  std::string module_name_;
  ExpectedShape expected_shape_;
  EditingFunction editing_function_;
  std::size_t unpack_idx_ = 0;
  Slice slice_;
  bool capture_ = true;
};

// Identifies one registered hook of one FlexModel: `model` is unique to the
// FlexModel in this process, so a handle never names another model's hook.
struct HookHandle {
  std::uint64_t model = 0;
  std::uint64_t id = 0;
  std::string module_name;
  HookType type = HookType::forward;

  friend bool operator==(const HookHandle& a, const HookHandle& b) { return a.model == b.model && a.id == b.id; }
  friend bool operator<(const HookHandle& a, const HookHandle& b) {
    return a.model != b.model ? a.model < b.model : a.id < b.id;
  }
};

}  // namespace flexmodel
