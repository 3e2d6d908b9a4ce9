// One forward's life: the group selection it runs, the data-parallel batch
// split and calibration, the commit of its captures to rank 0, the output map
// and the sinks, and what a failure does under a mesh; then end_backward,
// which closes the step for the gradient captures of its backward.
#include "flexmodel/flex_model.h"

#include <algorithm>

#include <torch/autograd.h>

#include "flexmodel/dist.h"
#include "flexmodel/logging.h"
#include "adapters/model_adapter.h"
#include "core/state.h"
#include "dist/routing.h"
#include "dist/wire.h"

namespace flexmodel {

using detail::ActiveHook;
using detail::ActiveSite;
using detail::HookRecord;
using detail::ModelState;

// ---- forward ------------------------------------------------------------

namespace {

ActiveHook active_hook(ModelState& state, HookRecord& record) {
  const HookFunction& function = record.function;
  const bool plain_capture = function.capture() && !function.editing_function() &&
                             function.expected_shape().empty() && function.slice().empty() && !state.distributed();
  return ActiveHook{&record, plain_capture ? &detail::series_of(state, record) : nullptr, function.unpack_idx()};
}

ModelState::Selection compute_selection(ModelState& state, const Groups& groups) {
  ModelState::Selection selection;
  for (const HookRecord* record : state.records) {
    const bool chosen = std::any_of(groups.names.begin(), groups.names.end(),
                                    [&](const std::string& name) { return record->groups.count(name) != 0; });
    selection.hook_active.push_back(chosen != groups.complemented);
    // The same on every rank: every rank registers every hook, remote ones too.
    if (chosen != groups.complemented && record->captures_gradients()) {
      selection.needs_backward = true;
      if (record->function.capture()) selection.captures_gradients = true;
    }
  }
  std::vector<ActiveSite> active_sites;
  for (auto& [key, site] : state.sites) {
    ActiveSite entry{key, {}};
    for (std::size_t phase = 0; phase < detail::kModuleHookTypes; ++phase) {
      entry.bounds[phase] = static_cast<std::uint32_t>(selection.hooks.size());
      for (const auto& record : site.of(detail::kPhaseType[phase])) {
        if (selection.hook_active[record->index] != 0) selection.hooks.push_back(active_hook(state, *record));
      }
    }
    entry.bounds[detail::kModuleHookTypes] = static_cast<std::uint32_t>(selection.hooks.size());
    if (entry.bounds.front() != entry.bounds.back()) active_sites.push_back(entry);
  }
  unsigned bits = 1;
  while ((std::size_t{1} << bits) < 2 * active_sites.size()) ++bits;
  selection.site_table.resize(std::size_t{1} << bits);
  selection.site_table_shift = 64 - bits;
  const std::size_t mask = selection.site_table.size() - 1;
  for (const ActiveSite& entry : active_sites) {
    std::size_t slot = detail::site_slot(entry.key, selection.site_table_shift);
    while (selection.site_table[slot].key != nullptr) slot = (slot + 1) & mask;
    selection.site_table[slot] = entry;
  }
  return selection;
}

void apply_selection(ModelState& state, const Groups& groups) {
  for (const auto& name : groups.names) {
    FLEXMODEL_CHECK(state.groups.count(name) != 0, ConfigError, "forward: no hook group '", name,
                    "'; groups: ", detail::list_text(state.groups));
  }
  if (!state.selections_valid) {
    state.selections.clear();
    state.records.clear();
    for (auto& [id, record] : state.hooks) {
      record->index = state.records.size();
      state.records.push_back(record.get());
    }
    state.applied = nullptr;
    state.selections_valid = true;
  }
  auto key = std::make_pair(groups.names, groups.complemented);
  auto found = state.selections.find(key);
  if (found == state.selections.end()) found = state.selections.emplace(key, compute_selection(state, groups)).first;
  ModelState::Selection& selection = found->second;
  if (state.applied != &selection) {
    state.active_sites = selection.site_table.data();
    state.active_site_mask = selection.site_table.size() - 1;
    state.active_site_shift = selection.site_table_shift;
    state.active_hooks = selection.hooks.data();
    state.applied = &selection;
  }
  if (!selection.checked_unfired) {
    selection.checked_unfired = true;
    state.check_unfired = true;
  }
}

// A hook that never fires is a module called around the library (native) or
// on a branch that did not run (TorchScript); say so once.
void warn_unfired(ModelState& state) {
  for (auto& [id, record] : state.hooks) {
    if (record->type == HookType::tensor || record->remote || !state.is_active(*record) || record->fired ||
        record->warned_unfired) {
      continue;
    }
    record->warned_unfired = true;
    logger()->warn("hook on '{}' ({}) did not fire in forward {}: {}", record->function.module_name(),
                   to_string(record->type), state.step, state.adapter->unfired_advice(record->function.module_name()));
  }
  state.check_unfired = false;
}

}  // namespace

namespace {

// Every way the mesh does not fit the model, each with its fix; empty if it fits.
std::string mesh_violations(const detail::ModelAdapter& adapter, const dist::MeshShape& shape,
                            std::int64_t batch_rows) {
  std::string violations;
  auto add = [&](const std::string& text) { violations += (violations.empty() ? "" : "; ") + text; };
  if (shape.tp > 1 && !adapter.has_tensor_parallel_layers()) {
    add(detail::concat("tp = ", shape.tp, " but the model has no tensor-parallel layers (build it from "
                       "flexmodel::parallel layers, or use tp 1)"));
  }
  if (shape.pp > 1 && !adapter.is_pipeline_stage()) {
    add(detail::concat("pp = ", shape.pp, " but the model is not split into pipeline stages (wrap one "
                       "flexmodel::parallel stage per rank, or use pp 1)"));
  }
  if (shape.dp > 1 && batch_rows >= 0 && batch_rows % shape.dp != 0) {
    add(detail::concat("dp = ", shape.dp, " does not divide the batch of ", batch_rows,
                       " rows (use a multiple of ", shape.dp, " rows, or another dp)"));
  }
  return violations;
}

// Pipeline stages: after a forward each stage leader hands its captures to
// rank 0, which keeps them in stage order, so in forward order.
void send_captures_to_rank0(ModelState& state) {
  const dist::Mesh& mesh = *state.mesh;
  if (mesh.shape().pp == 1 || !mesh.stage_leader()) return;
  std::vector<detail::WireCapture> captures;
  if (mesh.pp_rank() > 0) {
    for (auto& capture : state.pending) {
      const auto& [name, type] = capture.series->key;
      captures.push_back(detail::WireCapture{
          name, type, state.step, capture.copied.defined() ? capture.copied : detail::materialize(capture.pending)});
    }
    state.pending.clear();
  }
  // Rank 0 keeps its own pending captures and appends the other stages'.
  for (auto& capture : detail::collect_at_rank0(mesh, std::move(captures))) {
    auto& series = state.outputs.series(capture.name, capture.type);
    state.pending.push_back(OutputMap::Capture{&series, {}, std::move(capture.tensor)});
  }
}

// A complete forward tells where its last hook fired, for the forwards run to
// their last hook after it. A hook that never fired might fire later in a
// forward that stopped before it: then none stops.
void learn_last_hook_firing(ModelState& state) {
  const ModelState::Selection& selection = *state.applied;
  const bool every_hook_fired = std::all_of(selection.hooks.begin(), selection.hooks.end(),
                                            [](const ActiveHook& hook) { return hook.record->fired; });
  selection.last_hook_firing = every_hook_fired ? state.value_firings : 0;
}

}  // namespace

FlexModelBase::DivertedCaptures::DivertedCaptures(FlexModelBase& model, CaptureTap tap)
    : state_(*model.state_), previous_(std::exchange(state_.capture_tap, std::move(tap))) {}

FlexModelBase::DivertedCaptures::~DivertedCaptures() { state_.capture_tap = std::move(previous_); }

FlexModelBase::StopAtLastHook::StopAtLastHook(FlexModelBase& model) : state_(*model.state_) {
  state_.stop_requested = true;
}

FlexModelBase::StopAtLastHook::~StopAtLastHook() { state_.stop_requested = false; }

void FlexModelBase::fail_rejected_input(const std::exception& error) const {
  const std::string module =
      detail::g_failing_module != nullptr ? adapter_->name_of(detail::g_failing_module) : std::string();
  FLEXMODEL_FAIL(ShapeError, "the forward of ", adapter_->description(), " rejected its input",
                 module.empty() ? std::string() : detail::concat(" in module '", module, "' (",
                                                                 detail::g_failing_module->name(), ")"),
                 ": ", detail::error_reason(error));
}

FlexModelBase::ForwardScope::ForwardScope(FlexModelBase& model, const Groups& groups, std::int64_t batch_rows)
    : state_(*model.state_), batch_rows_(batch_rows) {
  FLEXMODEL_CHECK(!state_.in_forward, ConfigError,
                  "FlexModel::forward was called while a forward of the same FlexModel runs "
                  "(from a hook, or from another thread); forwards of one FlexModel run one at a time");
  if (state_.distributed()) {
    const std::string violations = mesh_violations(*model.adapter_, state_.mesh->shape(), batch_rows);
    FLEXMODEL_CHECK(violations.empty(), ConfigError, "the mesh (tp ", state_.mesh->shape().tp, ", pp ",
                    state_.mesh->shape().pp, ", dp ", state_.mesh->shape().dp, ") does not fit the model: ",
                    violations);
  }
  if (state_.backward_outstanding) {
    // The previous forward's backward is over once another forward begins.
    model.end_backward();
  }
  apply_selection(state_, groups);
  state_.value_firings = 0;
  state_.stopped = false;
  state_.stop_at = 0;
  if (state_.stop_requested) {
    FLEXMODEL_CHECK(!state_.applied->needs_backward, ConfigError,
                    "run_to_last_hook: a hook of the groups run is a gradient hook, which needs the whole forward "
                    "and a backward; call forward()");
    // Pipeline stages wait for each other's activations: every stage runs to its end.
    if (!state_.staged()) state_.stop_at = state_.applied->last_hook_firing;
  }
  ++state_.forward_serial;
  detail::g_failing_module = nullptr;
  state_.in_forward = true;
  state_.pending.clear();
  if (!state_.applied->hooks.empty()) {
    previous_ = detail::g_current_forward;
    detail::g_current_forward = &state_;
    detail::hooked_forwards_in_flight.fetch_add(1, std::memory_order_relaxed);
    counted_ = true;
    root_site_ = detail::find_active_site(model.adapter_->root_key());
  }
}

FlexModelBase::ForwardScope::~ForwardScope() {
  if (counted_) {
    detail::hooked_forwards_in_flight.fetch_sub(1, std::memory_order_relaxed);
    detail::g_current_forward = previous_;
  }
  if (!committed_) {
    state_.pending.clear();
    logger()->debug("forward {} failed; its captures were dropped", state_.step);
  }
  state_.in_forward = false;
}

void FlexModelBase::ForwardScope::commit() {
  if (state_.distributed()) {
    send_captures_to_rank0(state_);
    // Results land on rank 0 only.
    if (state_.mesh->rank() != 0) state_.pending.clear();
  }
  if (state_.capture_tap) {
    // The sinks' step stays, empty, so that step numbers match the forwards run.
    for (auto& capture : state_.pending) {
      state_.capture_tap(capture.series->key.first, capture.series->key.second,
                         capture.copied.defined() ? capture.copied : detail::materialize(capture.pending));
    }
    state_.pending.clear();
  }
  if (!state_.sinks.empty() && (!state_.distributed() || state_.mesh->rank() == 0)) {
    for (auto& capture : state_.pending) {
      const torch::Tensor tensor = capture.copied.defined() ? capture.copied : detail::materialize(capture.pending);
      detail::write_sinks(state_, capture.series->key.first, capture.series->key.second, state_.step, tensor);
    }
    if (state_.applied->captures_gradients && !state_.capture_tap) {
      // Its backward's gradient captures join this step; end_backward ends it.
      state_.open_gradient_step = state_.step;
    } else {
      detail::end_sinks_step(state_, state_.step);
    }
  }
  state_.backward_outstanding = state_.applied->captures_gradients;
  if (state_.keep_outputs) {
    state_.outputs.append_all(state_.pending, state_.step);
  } else {
    state_.pending.clear();
  }
  if (state_.check_unfired) warn_unfired(state_);
  if (!state_.stopped) learn_last_hook_firing(state_);
  ++state_.step;
  committed_ = true;
}

void FlexModelBase::ForwardScope::commit_stopped() {
  try {
    commit();
  } catch (...) {
    failed(std::current_exception());
    throw;
  }
}

void FlexModelBase::ForwardScope::failed(std::exception_ptr error) {
  detail::end_world_unless_raised_everywhere(state_, std::move(error));
}

bool FlexModelBase::ForwardScope::splits_batch() const {
  return state_.distributed() && state_.mesh->shape().dp > 1 && batch_rows_ > 0;
}

void FlexModelBase::ForwardScope::take_batch_shard(detail::TensorLeaves& inputs) {
  const std::int64_t dp = state_.mesh->shape().dp;
  const std::int64_t rows = batch_rows_ / dp;
  state_.local_rows = rows;
  split_inputs_.clear();
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    torch::Tensor* input = inputs[i];
    if (input->defined() && input->dim() > 0 && input->size(0) == batch_rows_) {
      *input = input->narrow(0, state_.mesh->dp_rank() * rows, rows);
      split_inputs_.push_back(i);
    }
  }
}

bool FlexModelBase::ForwardScope::needs_calibration() const {
  if (!splits_batch()) return false;
  if (!state_.outputs_calibrated) return true;
  for (const detail::HookRecord* record : state_.records) {
    if (record->type != HookType::tensor && !record->calibrated && state_.is_active(*record)) {
      return true;
    }
  }
  return false;
}

void FlexModelBase::ForwardScope::begin_calibration(detail::TensorLeaves& inputs) {
  for (std::size_t i : split_inputs_) *inputs[i] = torch::cat({*inputs[i], inputs[i]->narrow(0, 0, 1)});
  for (detail::HookRecord* record : state_.records) {
    if (record->calibrated || !state_.is_active(*record)) continue;
    record->calibration_shapes.clear();
    record->split_rows.clear();
  }
  state_.calibrating = true;
}

void FlexModelBase::ForwardScope::end_calibration(detail::TensorLeaves& outputs) {
  state_.calibrating = false;
  for (detail::HookRecord* record : state_.records) {
    if (state_.is_active(*record)) record->calibrated = true;
  }
  if (!state_.outputs_calibrated) {
    state_.output_calibration_shapes.clear();
    for (const torch::Tensor* output : outputs) {
      state_.output_calibration_shapes.push_back(output->defined() ? output->sizes().vec()
                                                                   : std::vector<std::int64_t>{});
    }
    state_.output_split_rows.clear();
    state_.outputs_calibrated = true;
  }
}

void FlexModelBase::ForwardScope::gather_batch(detail::TensorLeaves& outputs) const {
  dist::Communicator& dp_group = state_.mesh->dp_group();
  const auto& shapes = state_.output_calibration_shapes;
  FLEXMODEL_CHECK(outputs.size() == shapes.size(), ShapeError, "the model returned ", outputs.size(),
                  " tensors in this forward but ", shapes.size(),
                  " in the calibration forward that tells data parallelism which tensors have rows; under dp the "
                  "model must return the same structure whatever the batch size");
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    torch::Tensor* output = outputs[i];
    if (i == state_.output_split_rows.size() && !output->defined()) state_.output_split_rows.push_back(0);
    if (i == state_.output_split_rows.size()) {
      state_.output_split_rows.push_back(detail::rows_split(static_cast<std::size_t>(state_.local_rows), shapes[i],
                                                            *output, detail::concat("output ", i, " of the model"))
                                             ? 1
                                             : 0);
    }
    if (!output->defined()) continue;
    if (state_.output_split_rows[i] == 0 || output->dim() == 0) {
      // An output without rows must be the same on every rank: each keeps its own.
      detail::check_same_across(dp_group, *output,
                                detail::concat("output ", i, " of the model ", output->sizes(),
                                               " has no rows but differs across data-parallel ranks, so it depends "
                                               "on the batch; run with dp 1"));
      continue;
    }
    if (!(torch::GradMode::is_enabled() && output->requires_grad())) {
      torch::Tensor whole = dp_group.gather(*output, 0, 0);
      if (dp_group.rank() == 0) *output = whole;
      continue;
    }
    // Every rank gets the whole output, its own rows still in its graph: a
    // loss over the whole batch then gives each rank exactly the one-process
    // gradient of its rows (and gradient hooks see the one-process gradient).
    const torch::Tensor whole = dp_group.all_gather(output->detach(), 0);
    const std::int64_t rows = output->size(0), first = dp_group.rank() * rows;
    *output = torch::cat({whole.narrow(0, 0, first), *output, whole.narrow(0, first + rows, whole.size(0) - first - rows)});
  }
}

namespace detail {

void end_backward(ModelState& state) {
  if (!std::exchange(state.backward_outstanding, false)) return;
  if (state.staged() && state.mesh->stage_leader()) {
    std::vector<WireCapture> captures;
    for (auto& capture : state.gradients_for_rank0) {
      const auto& [name, type] = capture.series->key;
      captures.push_back(WireCapture{name, type, capture.step, std::move(capture.snapshot)});
    }
    state.gradients_for_rank0.clear();
    for (auto& capture : collect_at_rank0(*state.mesh, std::move(captures))) {
      deliver_gradient(state, state.outputs.series(capture.name, capture.type), capture.step, capture.tensor);
    }
  }
  if (state.open_gradient_step >= 0) {
    const std::int64_t step = std::exchange(state.open_gradient_step, -1);
    end_sinks_step(state, step);
  }
}

}  // namespace detail
}  // namespace flexmodel
