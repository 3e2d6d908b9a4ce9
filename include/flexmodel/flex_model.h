// FlexModel: wraps a model, registers hooks by qualified module name,
// organises them in groups and runs forwards with chosen groups active.
//
//   flexmodel::FlexModel fm(model);                  // model: a holder or shared_ptr
//   fm.register_forward_hook(flexmodel::HookFunction("layers.0.mlp"));
//   auto logits = fm.forward(tokens);                // hooks of group "all"
//   torch::Tensor mlp0 = fm.outputs().at("layers.0.mlp")[0];
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/utils.h>

#include "flexmodel/error.h"
#include "flexmodel/hook_function.h"
#include "flexmodel/hooked.h"
#include "flexmodel/output_map.h"
#include "flexmodel/pattern.h"
#include "flexmodel/sink.h"

namespace flexmodel {

namespace dist {
class Mesh;
}

inline constexpr const char* kAllGroup = "all";

// Which hook groups a forward runs: the union of `names`, or every hook
// outside it when complemented.
struct Groups {
  Groups() = default;
  Groups(std::initializer_list<std::string> group_names) : names(group_names) {}
  explicit Groups(std::vector<std::string> group_names) : names(std::move(group_names)) {}

  Groups& complement(bool value = true) {
    complemented = value;
    return *this;
  }
  // No hooks at all: the model as if unwrapped (a baseline next to an edit).
  static Groups none() { return Groups{kAllGroup}.complement(); }

  std::vector<std::string> names{kAllGroup};
  bool complemented = false;
};

struct FlexModelOptions {
  // Parallel sizes; all 1 in a single process.
  std::int64_t tensor_parallel_size = 1;
  std::int64_t pipeline_parallel_size = 1;
  std::int64_t data_parallel_size = 1;

  FlexModelOptions& tp(std::int64_t size) {
    tensor_parallel_size = size;
    return *this;
  }
  FlexModelOptions& pp(std::int64_t size) {
    pipeline_parallel_size = size;
    return *this;
  }
  FlexModelOptions& dp(std::int64_t size) {
    data_parallel_size = size;
    return *this;
  }

  // A mesh made by dist::Mesh::create, to share one set of communicators
  // between several FlexModels (and the program's own parallel layers); its
  // shape is the parallel sizes. Without one, a FlexModel with sizes other
  // than (1, 1, 1) creates its own.
  std::shared_ptr<dist::Mesh> mesh_to_use;
  FlexModelOptions& mesh(std::shared_ptr<dist::Mesh> shared) {
    mesh_to_use = std::move(shared);
    return *this;
  }

  // Whether captures go to the output map; off when sinks (an HDF5 file) are
  // the only destination, so that a long run holds no activations in memory.
  bool keep_outputs = true;
  FlexModelOptions& outputs(bool keep) {
    keep_outputs = keep;
    return *this;
  }
};

// What a pattern selects: the hook points among its matches, in model order,
// and the modules a wildcard skipped because their hooks could never fire
// (containers, modules the forward never calls), each with the reason.
struct HookPointSelection {
  std::vector<std::string> names;
  std::vector<std::pair<std::string, std::string>> skipped;
};

namespace detail {
struct ModelState;
class ModelAdapter;

// The adapter of native torch::nn::Module trees.
std::shared_ptr<ModelAdapter> make_native_adapter(std::shared_ptr<torch::nn::Module> root);

// Thrown after the last hook of a forward run to its last hook, and caught by
// run_to_last_hook once the forward's captures are committed.
class ForwardStopped final : public Error {
 public:
  ForwardStopped() : Error("flexmodel: the forward stopped after its last hook (run_to_last_hook)") {}
};

template <class... Args>
inline constexpr bool first_is_groups = false;
template <class First, class... Rest>
inline constexpr bool first_is_groups<First, Rest...> = std::is_same_v<std::decay_t<First>, Groups>;
}  // namespace detail

// Everything of a FlexModel that does not depend on the model's C++ type.
class FlexModelBase {
 public:
  FlexModelBase(const FlexModelBase&) = delete;
  FlexModelBase& operator=(const FlexModelBase&) = delete;
  virtual ~FlexModelBase();

  // Registration: `hook.module_name()` is a name from named_modules() (or, for
  // register_hook, from named_parameters()). Each returns the new hook's handle;
  // the hook joins group "all".
  HookHandle register_forward_hook(HookFunction hook);
  HookHandle register_forward_pre_hook(HookFunction hook);
  HookHandle register_full_backward_hook(HookFunction hook);
  HookHandle register_full_backward_pre_hook(HookFunction hook);
  HookHandle register_hook(HookFunction hook);  // a parameter's gradient
  HookHandle register_hook_function(HookFunction hook, HookType type);
  void remove_hook(const HookHandle& handle);

  // The hook points of this process's model that `pattern` selects for hooks
  // of `type` (parameter names for HookType::tensor). A pattern without
  // wildcards that names a module whose hooks could never fire is an error
  // with the reason; `(root)` names the root module.
  HookPointSelection select_hook_points(const Pattern& pattern, HookType type = HookType::forward) const;

  // Hooks that did not fire in the first forward that ran them, each with the
  // likely reason and its fix.
  std::vector<std::pair<HookHandle, std::string>> unfired_hooks() const;

  // Groups. create_hook_group makes one hook of `type` on every hook point
  // `pattern` selects (an error if none) and puts them in `group`.
  std::vector<HookHandle> create_hook_group(const std::string& group, const Pattern& pattern,
                                            ExpectedShape expected_shape = {},
                                            EditingFunction editing_function = {},
                                            std::size_t unpack_idx = 0,
                                            HookType type = HookType::forward);
  // The same for any editing callable HookFunction accepts (observe or replace).
  template <class F>
    requires(!std::is_same_v<std::decay_t<F>, EditingFunction>)
  std::vector<HookHandle> create_hook_group(const std::string& group, const Pattern& pattern,
                                            ExpectedShape expected_shape, F&& editing_function,
                                            std::size_t unpack_idx = 0, HookType type = HookType::forward) {
    return create_hook_group(group, pattern, std::move(expected_shape),
                             detail::to_editing_function(std::forward<F>(editing_function)), unpack_idx, type);
  }
  // `hook` (its module name aside: slice, capture, shape, edit) on every hook point `pattern` selects.
  std::vector<HookHandle> create_hook_group(const std::string& group, const Pattern& pattern, const HookFunction& hook,
                                            HookType type = HookType::forward);
  void update_hook_groups(const std::vector<HookHandle>& hooks, const std::string& group);
  void update_hook_groups(const HookHandle& hook, const std::string& group);
  void update_hook_groups(const Pattern& pattern, const std::string& group);
  // Takes hooks out of groups; hooks the pattern matches that are not members
  // are left alone. Group "all" cannot be removed.
  void remove_hook_groups(const std::vector<HookHandle>& hooks, const std::set<std::string>& groups);
  void remove_hook_groups(const HookHandle& hook, const std::set<std::string>& groups);
  void remove_hook_groups(const Pattern& pattern, const std::set<std::string>& groups);
  // Forgets `group`: its hooks leave it and stay registered. Group "all", and
  // a group that does not exist, are left alone.
  void delete_hook_group(const std::string& group) noexcept;
  std::map<HookHandle, std::set<std::string>> get_hook_function_groups() const;
  std::vector<HookHandle> get_group_hook_functions(const std::string& group) const;
  std::set<std::string> hook_groups() const;
  std::vector<HookHandle> hooks() const;

  // Named values shared by all hooks, kept across forwards.
  SaveContext& save_ctx();

  // Modules that editing functions may run and train (probes, steering vectors).
  void register_trainable_module(const std::string& name, std::shared_ptr<torch::nn::Module> module);
  template <class Impl>
  void register_trainable_module(const std::string& name, const torch::nn::ModuleHolder<Impl>& module) {
    register_trainable_module(name, std::static_pointer_cast<torch::nn::Module>(module.ptr()));
  }
  const TrainableModules& trainable_modules() const;
  // Sets requires_grad on every parameter of the wrapped model.
  void wrapped_module_requires_grad(bool requires_grad);
  // The wrapped model's parameters by name (this rank's shards under tp), as
  // the model holds them: an optimizer over them trains the model itself.
  std::vector<std::pair<std::string, torch::Tensor>> named_parameters() const;

  // A detached CPU copy of a parameter; expected_shape is checked where given.
  torch::Tensor get_module_parameter(const std::string& name, const ExpectedShape& expected_shape = {}) const;

  // Sinks get every forward's captures (on rank 0 under a mesh) once the
  // forward succeeded, then end_step; close_sinks() closes them all.
  void add_sink(std::shared_ptr<Sink> sink);
  void close_sinks();

  // Gradient captures (full_backward, full_backward_pre and parameter hooks)
  // belong to the step of the forward whose graph they come from: when the
  // forward's hooks capture gradients, its step in the sinks stays open until
  // end_backward(), which the next forward and close_sinks() call when the
  // program has not. Under pp it is collective (every rank calls it, after
  // the backward): the stages' gradient captures reach rank 0 there, stage
  // by stage, each stage's in the order they fired; close_sinks() there is a
  // ConfigError while a step is open. A parameter's gradient belongs to the
  // latest forward. A gradient captured after its step ended (a backward run
  // after the next forward) is a HookError when there are sinks (under a mesh
  // it ends every rank), and reaches the output map otherwise.
  void end_backward();

  // Captured activations: (module name, hook type) → one tensor per forward.
  OutputMap& outputs();
  const OutputMap& outputs() const;

  // Removes every hook and group; the model then runs exactly as unwrapped.
  void restore();

  // While it lives, what this model's hooks capture (on rank 0 under a mesh,
  // the captures of every stage, in forward order; gradients as their
  // backward delivers them) goes to `tap` instead of the output map and the
  // sinks: run_with_cache and the patching helpers take one run's captures so.
  using CaptureTap = std::function<void(const std::string& module_name, HookType type, const torch::Tensor& snapshot)>;
  class DivertedCaptures {
   public:
    DivertedCaptures(FlexModelBase& model, CaptureTap tap);
    DivertedCaptures(const DivertedCaptures&) = delete;
    DivertedCaptures& operator=(const DivertedCaptures&) = delete;
    ~DivertedCaptures();

   private:
    detail::ModelState& state_;
    CaptureTap previous_;
  };

  const FlexModelOptions& options() const { return options_; }
  // The mesh this FlexModel runs on; null in a single process.
  const std::shared_ptr<dist::Mesh>& mesh() const;
  // Whether it runs on more than one rank (a mesh of size 1 is one process).
  bool distributed() const;
  std::int64_t forwards_run() const;

 protected:
  FlexModelBase(std::shared_ptr<detail::ModelAdapter> adapter, FlexModelOptions options);

  // Active for the duration of one forward; commits captures only on success.
  // `batch_rows` is the first input tensor's dim 0 (-1 if none), for the mesh checks.
  class ForwardScope {
   public:
    ForwardScope(FlexModelBase& model, const Groups& groups, std::int64_t batch_rows);
    ForwardScope(const ForwardScope&) = delete;
    ForwardScope& operator=(const ForwardScope&) = delete;
    ~ForwardScope();
    void commit();
    // commit() after the forward stopped at its last hook; what commit throws
    // goes through failed() first, as any other error of the forward.
    void commit_stopped();
    // Called with the exception a forward is failing with. Under a mesh, an
    // error not raised on every rank ends every rank, so none waits forever.
    void failed(std::exception_ptr error);
    // Data parallel: keeps this rank's rows of each input tensor with the
    // batch's dim 0, and concatenates the outputs' rows back on dp rank 0
    // (on every dp rank for outputs that require grad); outputs without rows
    // stay as they are.
    bool splits_batch() const;
    void take_batch_shard(detail::TensorLeaves& inputs);
    void gather_batch(detail::TensorLeaves& outputs) const;
    // Data parallel: which tensors have rows is learnt from a calibration
    // forward on this rank's shard plus one row, run before the first forward
    // after hooks change. `inputs` are the leaves of a copy of the shard.
    bool needs_calibration() const;
    void begin_calibration(detail::TensorLeaves& inputs);
    void end_calibration(detail::TensorLeaves& outputs);
    // The root module's site when it has active hooks, else nullptr.
    const detail::ActiveSite* root_site() const { return root_site_; }

   private:
    detail::ModelState& state_;
    std::int64_t batch_rows_ = -1;
    std::vector<std::size_t> split_inputs_;  // leaves take_batch_shard split
    detail::ModelState* previous_ = nullptr;
    const detail::ActiveSite* root_site_ = nullptr;
    bool counted_ = false;
    bool committed_ = false;
  };

  // While it lives, this model's forwards stop after their last hook (see run_to_last_hook).
  class StopAtLastHook {
   public:
    explicit StopAtLastHook(FlexModelBase& model);
    StopAtLastHook(const StopAtLastHook&) = delete;
    StopAtLastHook& operator=(const StopAtLastHook&) = delete;
    ~StopAtLastHook();

   private:
    detail::ModelState& state_;
  };
  // Runs `forward()` as a forward that stops after its last hook; whether it stopped.
  template <class Forward>
  bool stopping_at_last_hook(Forward&& forward) {
    StopAtLastHook stop(*this);
    try {
      forward();
    } catch (const detail::ForwardStopped&) {
      return true;
    }
    return false;
  }

  // Throws the ShapeError for a LibTorch error that left the model's forward:
  // one line naming the model, the innermost hookable module it left, and the cause.
  [[noreturn]] void fail_rejected_input(const std::exception& error) const;

 private:
  // Tells the adapter which hook points have hooks, after registration changes.
  void announce_hook_points();

  std::shared_ptr<detail::ModelAdapter> adapter_;
  FlexModelOptions options_;
  std::unique_ptr<detail::ModelState> state_;
};

// A FlexModel over a native torch::nn::Module of type ModuleImpl.
template <class ModuleImpl>
class FlexModel : public FlexModelBase {
 public:
  explicit FlexModel(std::shared_ptr<ModuleImpl> model, FlexModelOptions options = {})
      : FlexModelBase(detail::make_native_adapter(model), options), model_(std::move(model)) {}
  explicit FlexModel(const torch::nn::ModuleHolder<ModuleImpl>& model, FlexModelOptions options = {})
      : FlexModel(model.ptr(), options) {}

  // Runs the model with the hooks of group "all".
  template <class... Args>
    requires(!detail::first_is_groups<Args...>)
  auto forward(Args&&... inputs) {
    return forward(Groups{}, std::forward<Args>(inputs)...);
  }

  // Runs the model with the hooks of the chosen groups.
  template <class... Args>
  auto forward(const Groups& groups, Args&&... inputs) {
    ForwardScope scope(*this, groups, detail::batch_rows(inputs...));
    auto forward = detail::forward_of(*model_);
    auto run = [&](auto&&... args) {
      return scope.root_site() != nullptr
                 ? detail::invoke_with_hooks(*scope.root_site(), forward, std::forward<decltype(args)>(args)...)
                 : forward(std::forward<decltype(args)>(args)...);
    };
    try {
      if (!scope.splits_batch()) {
        auto output = run(std::forward<Args>(inputs)...);
        scope.commit();
        return output;
      }
      std::tuple<std::decay_t<Args>...> shard(std::forward<Args>(inputs)...);
      detail::TensorLeaves input_leaves;
      detail::collect_leaves(shard, input_leaves);
      scope.take_batch_shard(input_leaves);
      if (scope.needs_calibration()) {
        auto calibration = shard;
        detail::TensorLeaves calibration_leaves;
        detail::collect_leaves(calibration, calibration_leaves);
        scope.begin_calibration(calibration_leaves);
        torch::NoGradGuard no_grad;
        auto calibration_output = std::apply(run, calibration);
        detail::TensorLeaves output_leaves;
        detail::collect_leaves(calibration_output, output_leaves);
        scope.end_calibration(output_leaves);
      }
      auto output = std::apply(run, shard);
      detail::TensorLeaves output_leaves;
      detail::collect_leaves(output, output_leaves);
      scope.gather_batch(output_leaves);
      scope.commit();
      return output;
    } catch (const detail::ForwardStopped&) {
      scope.commit_stopped();
      throw;
    } catch (const c10::Error& error) {
      scope.failed(std::current_exception());
      fail_rejected_input(error);
    } catch (...) {
      scope.failed(std::current_exception());
      throw;
    }
  }

  // Runs the forward only as far as the hooks of `groups` need it: once the
  // last of them has fired, the rest of the model does not run (TransformerLens's
  // stop_at_layer, nnsight's tracer.stop()), and there is no output. Captures,
  // sinks and edits before that point are those of forward(). The first call
  // for a set of groups (and any after the hooks change) runs the whole forward
  // to learn where its last hook fires, as does a set with a hook that has not
  // fired yet. Returns whether this forward stopped early. For a model whose
  // number of calls depends on its input (values or shape), use forward(). Under
  // pp every stage runs to its end; gradient hooks are a ConfigError.
  template <class... Args>
  bool run_to_last_hook(const Groups& groups, Args&&... inputs) {
    return stopping_at_last_hook([&] { forward(groups, std::forward<Args>(inputs)...); });
  }

  const std::shared_ptr<ModuleImpl>& module() const { return model_; }

 private:
  std::shared_ptr<ModuleImpl> model_;
};

template <class ModuleImpl>
FlexModel(std::shared_ptr<ModuleImpl>) -> FlexModel<ModuleImpl>;
template <class ModuleImpl>
FlexModel(std::shared_ptr<ModuleImpl>, FlexModelOptions) -> FlexModel<ModuleImpl>;
template <class ModuleImpl>
FlexModel(const torch::nn::ModuleHolder<ModuleImpl>&) -> FlexModel<ModuleImpl>;
template <class ModuleImpl>
FlexModel(const torch::nn::ModuleHolder<ModuleImpl>&, FlexModelOptions) -> FlexModel<ModuleImpl>;

}  // namespace flexmodel
