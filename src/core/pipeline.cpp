// The hook pipeline: what every hook does with the tensor it fires on, in a
// single process and under any mesh (see run_pipeline), and how hooked calls
// and autograd reach it.
#include <algorithm>

#include <torch/autograd.h>

#include "flexmodel/dist.h"
#include "flexmodel/logging.h"
#include "adapters/model_adapter.h"
#include "core/state.h"
#include "dist/routing.h"

namespace flexmodel::detail {

std::atomic<int> hooked_forwards_in_flight{0};
__attribute__((tls_model("initial-exec"))) thread_local ModelState* g_current_forward = nullptr;
thread_local const torch::nn::Module* g_failing_module = nullptr;
thread_local GenerationStep g_generation_step;

void note_failing_module(const torch::nn::Module* module) noexcept {
  if (g_failing_module == nullptr) g_failing_module = module;
}

std::string list_text(const std::set<std::string>& names) {
  std::string out;
  for (const auto& name : names) out += concat(out.empty() ? "" : ", ", "'", name, "'");
  return out;
}

std::string expected_text(const ExpectedShape& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    out += concat(i == 0 ? "" : ", ", shape[i] ? std::to_string(*shape[i]) : std::string("*"));
  }
  return out + "]";
}

std::string hook_label(const HookRecord& record) {
  const std::string& name = record.function.module_name();
  return concat("hook on '", name.empty() ? std::string(kRootName) : name, "' (", to_string(record.type), ")");
}

void check_expected_shape(const HookRecord& record, const torch::Tensor& tensor) {
  const ExpectedShape& expected = record.function.expected_shape();
  if (expected.empty()) return;
  bool ok = static_cast<std::int64_t>(expected.size()) == tensor.dim();
  for (std::size_t d = 0; ok && d < expected.size(); ++d) {
    ok = !expected[d] || *expected[d] == tensor.size(static_cast<std::int64_t>(d));
  }
  FLEXMODEL_CHECK(ok, ShapeError, hook_label(record), " expected shape ", expected_text(expected), ", got ",
                  tensor.sizes(), "; fix expected_shape (std::nullopt leaves a dimension free)");
}

void check_edit(const HookRecord& record, const torch::Tensor& before, const torch::Tensor& after) {
  FLEXMODEL_CHECK(after.defined(), ShapeError, "editing function of ", hook_label(record),
                  " returned an undefined tensor; return the input to leave it unchanged");
  FLEXMODEL_CHECK(after.sizes() == before.sizes(), ShapeError, "editing function of ", hook_label(record),
                  " changed the shape from ", before.sizes(), " to ", after.sizes(), "; an edit must keep the shape");
  FLEXMODEL_CHECK(after.scalar_type() == before.scalar_type(), ShapeError, "editing function of ",
                  hook_label(record), " changed the dtype from ", before.scalar_type(), " to ",
                  after.scalar_type(), "; cast the result back with .to(x.scalar_type())");
  FLEXMODEL_CHECK(after.device() == before.device(), ShapeError, "editing function of ", hook_label(record),
                  " moved the tensor from ", before.device(), " to ", after.device(),
                  "; return it on the input's device");
}

OutputMap::Series& series_of(ModelState& state, HookRecord& record) {
  if (record.series == nullptr) record.series = &state.outputs.series(record.function.module_name(), record.type);
  return *record.series;
}

// Gradient captures go to the sinks in the step of their forward, which stays
// open until end_backward; one that comes later has no step to go to.
void deliver_gradient(ModelState& state, OutputMap::Series& series, std::int64_t step, const torch::Tensor& snapshot) {
  if (state.capture_tap) {
    state.capture_tap(series.key.first, series.key.second, snapshot);
    return;
  }
  if (state.writes_sinks()) {
    const auto& [name, type] = series.key;
    FLEXMODEL_CHECK(step == state.open_gradient_step, HookError, "hook on '", name.empty() ? std::string(kRootName) : name,
                    "' (", to_string(type), ") captured a gradient of forward ", step,
                    ", whose step in the sinks has ended (a later forward began, or end_backward() or close_sinks() "
                    "ran); call backward before the next forward, and end_backward() after it");
    write_sinks(state, name, type, step, snapshot);
  }
  if (state.keep_outputs) state.outputs.append(series, snapshot, step);
}

void write_sinks(ModelState& state, const std::string& module_name, HookType type, std::int64_t step,
                 const torch::Tensor& snapshot) {
  const torch::Tensor owned = state.keep_outputs ? snapshot.clone() : snapshot;
  try {
    for (auto& sink : state.sinks) sink->write(module_name, type, step, owned);
  } catch (...) {
    for (auto& sink : state.sinks) sink->abort_step(step);
    if (state.open_gradient_step == step) state.open_gradient_step = -1;
    logger()->debug("step {} of the sinks was dropped: a sink failed to take a snapshot of '{}'", step, module_name);
    throw;
  }
}

void end_sinks_step(ModelState& state, std::int64_t step) {
  std::size_t ended = 0;
  try {
    for (; ended < state.sinks.size(); ++ended) state.sinks[ended]->end_step(step);
  } catch (...) {
    for (std::size_t i = ended + 1; i < state.sinks.size(); ++i) state.sinks[i]->abort_step(step);
    throw;
  }
}

namespace {

// Hooks fire only in the forward that runs them, never inside editing functions.
class NoHooksWhileEditing {
 public:
  NoHooksWhileEditing() : saved_(g_current_forward) { g_current_forward = nullptr; }
  NoHooksWhileEditing(const NoHooksWhileEditing&) = delete;
  NoHooksWhileEditing& operator=(const NoHooksWhileEditing&) = delete;
  ~NoHooksWhileEditing() { g_current_forward = saved_; }

 private:
  ModelState* saved_;
};

// A library error raised inside an editing function (save_ctx has no value,
// say) or by a hook's slice, as the same error type with `lead`, which names
// the hook, in front.
[[noreturn]] void rethrow_after(const std::string& lead, const Error& error) {
  constexpr std::string_view kPrefix = "flexmodel: ";
  std::string_view body = error.what();
  if (body.substr(0, kPrefix.size()) == kPrefix) body.remove_prefix(kPrefix.size());
  const std::string text = concat(kPrefix, lead, ": ", body);
  if (dynamic_cast<const ConfigError*>(&error) != nullptr) throw ConfigError(text);
  if (dynamic_cast<const ShapeError*>(&error) != nullptr) throw ShapeError(text);
  if (dynamic_cast<const HookError*>(&error) != nullptr) throw HookError(text);
  if (dynamic_cast<const DistributedError*>(&error) != nullptr) throw DistributedError(text);
  if (dynamic_cast<const IOError*>(&error) != nullptr) throw IOError(text);
  throw Error(text);
}

torch::Tensor run_editing_function(ModelState& state, HookRecord& record, const torch::Tensor& tensor,
                                   std::int64_t step) {
  torch::nn::Module* module = record.site != nullptr ? record.site->module : nullptr;
  HookContext context{record.function.module_name(), record.type, step, module, state.save_ctx,
                      state.trainable_modules, g_generation_step.step, g_generation_step.position_begin,
                      g_generation_step.position_end};
  torch::Tensor edited;
  {
    NoHooksWhileEditing no_nested_hooks;
    try {
      edited = record.function.editing_function()(tensor, context);
    } catch (const Error& error) {
      rethrow_after(concat("in the editing function of ", hook_label(record)), error);
    } catch (const std::exception& cause) {
      FLEXMODEL_FAIL(HookError, "editing function of ", hook_label(record), " threw: ", cause.what());
    }
  }
  check_edit(record, tensor, edited);
  return edited;
}

// The slice a hook acts on; a ShapeError naming the hook when the tensor has no such slice.
torch::Tensor slice_of(const HookRecord& record, const torch::Tensor& whole) {
  try {
    return record.function.slice().take(whole);
  } catch (const Error& error) {
    rethrow_after(concat(hook_label(record), ", slicing a tensor of shape ", whole.sizes()), error);
  }
}

// Forward captures wait in the forward's pending list until it succeeds.
void capture_in_forward(ModelState& state, OutputMap::Series& series, const torch::Tensor& tensor) {
  if (can_copy_into_arena(tensor)) {
    state.pending.push_back(OutputMap::Capture{&series, state.arena.copy(tensor), {}});
  } else {
    state.pending.push_back(OutputMap::Capture{&series, {}, snapshot_copy(tensor)});
  }
}

void capture_gradient(ModelState& state, HookRecord& record, const torch::Tensor& tensor, std::int64_t step) {
  torch::Tensor snapshot = snapshot_copy(tensor);
  if (state.staged()) {
    // Rank 0 collects every stage's at end_backward, in stage order.
    state.gradients_for_rank0.push_back(GradientCapture{&series_of(state, record), step, std::move(snapshot)});
    return;
  }
  deliver_gradient(state, series_of(state, record), step, snapshot);
}

// The route of a firing under the mesh. Shapes are alike on every rank of a
// stage, so its errors are raised on each.
Route plan_route(ModelState& state, HookRecord& record, const torch::Tensor& tensor, const Firing& firing) {
  const dist::Mesh& mesh = *state.mesh;
  try {
    bool split_rows = firing.split_rows;
    if (firing.in_forward && mesh.shape().dp > 1) split_rows = dp_splits_rows(state, record, tensor);
    Route route = route_of(record, tensor, mesh, split_rows, declared_sharding(record, firing.leaf));
    route.sum_dp = !firing.in_forward && mesh.shape().dp > 1 && !split_rows;
    return route;
  } catch (Error& error) {
    error.mark_raised_on_every_rank();
    throw;
  }
}

// A tensor without rows over dp is one tensor, the same on every dp rank,
// else it depends on the batch.
void check_dp_replicas(const dist::Mesh& mesh, const HookRecord& record, const torch::Tensor& tensor) {
  check_same_across(mesh.dp_group(), tensor,
                    concat(hook_label(record), ": its tensor ", tensor.sizes(),
                           " has no rows (its shape does not change with the batch) but differs across "
                           "data-parallel ranks, so it depends on the batch and no dp run can reproduce it; "
                           "run with dp 1"));
}

// Tensors the route takes as replicated must be: forward tensors without rows
// over dp, tensors not declared split over tp.
void check_replicas(const dist::Mesh& mesh, const HookRecord& record, const torch::Tensor& tensor, const Route& route,
                    bool in_forward) {
  if (mesh.shape().dp > 1 && in_forward && !route.gather_dp) check_dp_replicas(mesh, record, tensor);
  if (mesh.shape().tp > 1 && route.tp_dim < 0) {
    check_same_across(mesh.tp_group(), tensor,
                      concat(hook_label(record), ": its tensor ", tensor.sizes(),
                             " differs across tensor-parallel ranks, but its module declares no sharding for it; "
                             "give expected_shape with the full size of the split dimension, or declare the "
                             "sharding (flexmodel::dist::TensorParallelModule)"));
  }
}

// TP shards to tp rank 0 (in the model's block order), then DP rows to the
// stage leader; what a rank that is not the leader holds is not used.
torch::Tensor gather_to_leader(const dist::Mesh& mesh, const Route& route, const torch::Tensor& local,
                               torch::Tensor& stage_piece) {
  stage_piece = route.tp_dim >= 0 ? ranks_to_blocks(mesh.tp_group().gather(local, route.tp_dim, 0), route.tp_dim,
                                                    mesh.shape().tp, route.blocks)
                                  : local;
  if (mesh.tp_rank() == 0 && route.gather_dp) return mesh.dp_group().gather(stage_piece, 0, 0);
  return stage_piece;
}

// The inverse: the leader's edit back to every rank's place, shaped like `local`.
torch::Tensor scatter_from_leader(const dist::Mesh& mesh, const Route& route, const torch::Tensor& edited,
                                  const torch::Tensor& stage_piece, const torch::Tensor& local) {
  torch::Tensor piece = edited;
  if (mesh.tp_rank() == 0 && route.gather_dp) {
    piece = mesh.dp_group().scatter(edited, stage_piece, 0, 0);
  } else if (mesh.tp_rank() == 0 && mesh.shape().dp > 1) {
    // The same on every dp rank (or summed over them): the leader's edit for all.
    piece = mesh.stage_leader() ? edited.contiguous() : torch::empty_like(stage_piece);
    mesh.dp_group().broadcast(piece, 0);
  }
  if (route.tp_dim >= 0) {
    piece = ranks_to_blocks(piece, route.tp_dim, mesh.shape().tp, route.blocks, /*inverse=*/true);
    return mesh.tp_group().scatter(piece, local, route.tp_dim, 0);
  }
  if (mesh.shape().tp > 1) {
    torch::Tensor replica = mesh.tp_rank() == 0 ? piece.contiguous() : torch::empty_like(local);
    mesh.tp_group().broadcast(replica, 0);
    return replica;
  }
  return piece;
}

}  // namespace

// One process is the trivial route: the tensor is already whole and this
// process is the leader. Under a mesh, the stage leader (tp 0, dp 0) sees the
// whole tensor and alone captures and edits. A gradient that each dp rank
// holds a partial of (a parameter's, a replicated tensor's) is summed first,
// so the hook sees the one-process gradient; after an edit e each rank keeps
// its partial plus 1/dp of (e − sum), so the dp sum of the gradients is e.
void run_pipeline(ModelState& state, HookRecord& record, torch::Tensor& tensor, const Firing& firing) {
  record.fired = true;
  const bool editing = static_cast<bool>(record.function.editing_function());
  const Slice& slice = record.function.slice();
  auto at_leader = [&](const torch::Tensor& whole) {
    const torch::Tensor part = slice.empty() ? whole : slice_of(record, whole);
    check_expected_shape(record, part);
    if (record.function.capture()) {
      if (firing.in_forward) {
        capture_in_forward(state, series_of(state, record), part);
      } else {
        capture_gradient(state, record, part, firing.step);
      }
    }
    if (!editing) return torch::Tensor();
    torch::Tensor edited = run_editing_function(state, record, part, firing.step);
    if (slice.empty()) return edited;
    // An observer returns its input: the tensor stays the model's own, unless
    // the slice is a copy (a list of indices), which an in-place edit changed alone.
    return edited.is_same(part) && part.is_alias_of(whole) ? whole : slice.put(whole, edited);
  };
  if (!state.distributed()) {
    torch::Tensor edited = at_leader(tensor);
    if (editing) tensor = std::move(edited);
    return;
  }
  const dist::Mesh& mesh = *state.mesh;
  const dist::MessageLabel label(concat(hook_label(record), ", tensor ", firing.leaf, ", step ", firing.step,
                                        firing.in_forward ? "" : " (backward)"));
  const Route route = plan_route(state, record, tensor, firing);
  check_replicas(mesh, record, tensor, route, firing.in_forward);
  const torch::Tensor local = route.sum_dp ? mesh.dp_group().all_reduce_sum(tensor) : tensor;
  torch::Tensor stage_piece;
  const torch::Tensor whole = gather_to_leader(mesh, route, local, stage_piece);

  std::string failure;
  torch::Tensor edited;
  if (mesh.stage_leader()) {
    try {
      edited = at_leader(whole);
    } catch (const std::exception& error) {
      // The other ranks wait in the scatter of an edit, or in a later collective.
      if (!editing) dist::abort_world(error.what());
      failure = error.what();
    }
  }
  if (!editing) return;
  if (mesh.tp_rank() == 0) failure = mesh.dp_group().broadcast_string(failure, 0);
  failure = mesh.tp_group().broadcast_string(failure, 0);
  if (!failure.empty()) {
    HookError error(failure);
    error.mark_raised_on_every_rank();
    throw error;
  }
  const torch::Tensor mine = scatter_from_leader(mesh, route, edited, stage_piece, local);
  tensor = route.sum_dp ? tensor + (mine - local) / static_cast<double>(mesh.shape().dp) : mine;
}

void end_world_unless_raised_everywhere(const ModelState& state, std::exception_ptr error) {
  if (!state.distributed()) return;
  std::string message = "flexmodel: a forward or backward failed";
  bool everywhere = false;
  try {
    std::rethrow_exception(error);
  } catch (const Error& cause) {
    message = cause.what();
    everywhere = cause.raised_on_every_rank();
  } catch (const std::exception& cause) {
    message = cause.what();
  } catch (...) {
  }
  // With several stages, the other stages wait in the program's own transfers.
  if (everywhere && state.mesh->shape().pp == 1) return;
  dist::abort_world(message);
}

namespace {

// A gradient hook run by autograd: an error leaves backward() on every rank
// only where every rank raised it; otherwise it ends the world.
void run_in_backward(HookRecord& record, torch::Tensor& grad, const Firing& firing) {
  ModelState& state = *record.state;
  try {
    run_pipeline(state, record, grad, firing);
  } catch (...) {
    end_world_unless_raised_everywhere(state, std::current_exception());
    throw;
  }
}

[[noreturn]] void fail_unpack(const HookRecord& record, const TensorLeaves& leaves) {
  const std::size_t index = record.function.unpack_idx();
  FLEXMODEL_FAIL(ShapeError, hook_label(record), " has unpack_idx ", index, " but the module's ",
                 record.type == HookType::forward_pre || record.type == HookType::full_backward ? "input" : "output",
                 " has ", leaves.size(), " tensor(s)", index < leaves.size() ? " and that one is undefined" : "",
                 "; choose an index below ", leaves.size());
}

// Gradient hooks: a fresh alias of the tensor gets an autograd hook, so the hook
// sees only the gradient that flows through this module's input or output.
// Under dp, whether the tensor has rows is known now, in the forward.
void attach_gradient_hook(ModelState& state, HookRecord& record, torch::Tensor& tensor, std::size_t leaf) {
  Firing firing{leaf, state.step, /*in_forward=*/false, /*split_rows=*/false};
  // Counted in every forward, as the calibration forward counted it.
  if (state.distributed() && state.mesh->shape().dp > 1) {
    try {
      firing.split_rows = dp_splits_rows(state, record, tensor);
    } catch (Error& error) {
      error.mark_raised_on_every_rank();
      throw;
    }
  }
  if (!torch::GradMode::is_enabled() || !tensor.requires_grad()) return;
  if (state.distributed() && state.mesh->shape().dp > 1 && !firing.split_rows) {
    // Its gradients are summed as partials of one tensor: it must be one.
    check_dp_replicas(*state.mesh, record, tensor);
  }
  record.fired = true;
  tensor = tensor.view_as(tensor);
  tensor.register_hook([weak = record.weak_from_this(), firing](const torch::Tensor& grad) -> torch::Tensor {
    auto alive = weak.lock();
    if (!alive || alive->state == nullptr || !grad.defined()) return grad;
    torch::Tensor edited = grad;
    run_in_backward(*alive, edited, firing);
    return edited;
  });
}

// Calls `apply(tensor, leaf index)` on the leaf the hook's unpack_idx names, or on every defined leaf.
template <class Apply>
void for_each_chosen_leaf(const ActiveHook& hook, TensorLeaves& leaves, Apply&& apply) {
  if (hook.unpack_idx != HookFunction::kAllLeaves) {
    if (hook.unpack_idx >= leaves.size() || !leaves[hook.unpack_idx]->defined()) fail_unpack(*hook.record, leaves);
    apply(*leaves[hook.unpack_idx], hook.unpack_idx);
    return;
  }
  for (std::size_t i = 0; i < leaves.size(); ++i) {
    if (leaves[i]->defined()) apply(*leaves[i], i);
  }
}

// Runs a site's value hooks of phase `values`, then attaches its gradient hooks
// of the phase after it.
void run_hooks(ModelState& state, const ActiveSite& site, Phase values, TensorLeaves& leaves) {
  const ActiveHook* hooks = state.active_hooks;
  if (state.calibrating) {
    // Value and gradient hooks alike note the shapes of the tensors they fire on.
    for (std::uint32_t i = site.bounds[values]; i < site.bounds[values + 2]; ++i) {
      HookRecord& record = *hooks[i].record;
      if (record.calibrated) continue;
      for_each_chosen_leaf(hooks[i], leaves,
                           [&](torch::Tensor& leaf, std::size_t) {
                             record.calibration_shapes.push_back(leaf.sizes().vec());
                           });
    }
    return;
  }
  for (std::uint32_t i = site.bounds[values]; i < site.bounds[values + 1]; ++i) {
    const ActiveHook& hook = hooks[i];
    if (hook.plain_capture_series != nullptr) {
      // Only the check for hooks that never fire reads `fired`.
      if (state.check_unfired) hook.record->fired = true;
      for_each_chosen_leaf(hook, leaves,
                           [&](torch::Tensor& leaf, std::size_t) {
                             capture_in_forward(state, *hook.plain_capture_series, leaf);
                           });
    } else {
      for_each_chosen_leaf(hook, leaves, [&](torch::Tensor& leaf, std::size_t index) {
        run_pipeline(state, *hook.record, leaf, Firing{index, state.step, /*in_forward=*/true});
      });
    }
  }
  if (site.bounds[values] != site.bounds[values + 1] && ++state.value_firings == state.stop_at) {
    // The last firing of a forward run to its last hook (which has no gradient hooks).
    state.stopped = true;
    throw ForwardStopped();
  }
  for (std::uint32_t i = site.bounds[values + 1]; i < site.bounds[values + 2]; ++i) {
    const ActiveHook& hook = hooks[i];
    for_each_chosen_leaf(hook, leaves, [&](torch::Tensor& leaf, std::size_t index) {
      attach_gradient_hook(state, *hook.record, leaf, index);
    });
  }
}

}  // namespace

torch::Tensor run_parameter_hook(HookRecord& record, const torch::Tensor& grad) {
  if (record.state == nullptr || !record.state->is_active(record) || !grad.defined()) return grad;
  torch::Tensor edited = grad;
  // A parameter is the same on every dp rank: its gradient there is a partial.
  run_in_backward(record, edited, Firing{0, record.state->step - 1, /*in_forward=*/false, /*split_rows=*/false});
  return edited;
}

std::size_t site_slot(const void* key, unsigned shift) noexcept {
  return static_cast<std::size_t>((reinterpret_cast<std::uintptr_t>(key) >> 4) * 0x9E3779B97F4A7C15ull >> shift);
}

const ActiveSite* find_active_site(const void* module) noexcept {
  const ModelState* state = g_current_forward;
  if (state == nullptr) return nullptr;
  for (std::size_t slot = site_slot(module, state->active_site_shift);; slot = (slot + 1) & state->active_site_mask) {
    const ActiveSite& entry = state->active_sites[slot];
    if (entry.key == module) return &entry;
    if (entry.key == nullptr) return nullptr;
  }
}

bool site_wants_inputs(const ActiveSite& site) noexcept { return site.has(kInputValues, kInputGradients); }
bool site_wants_outputs(const ActiveSite& site) noexcept { return site.has(kOutputValues, kOutputGradients); }

void run_input_hooks(const ActiveSite& site, TensorLeaves& leaves) {
  run_hooks(*g_current_forward, site, kInputValues, leaves);
}

void run_output_hooks(const ActiveSite& site, TensorLeaves& leaves) {
  run_hooks(*g_current_forward, site, kOutputValues, leaves);
}

}  // namespace flexmodel::detail
