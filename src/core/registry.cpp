// A FlexModel's registry: construction, hook registration and removal,
// groups and the selection of hook points, trainable modules, parameters.
#include "flexmodel/flex_model.h"

#include <algorithm>
#include <numeric>

#include "flexmodel/dist.h"
#include "flexmodel/logging.h"
#include "adapters/model_adapter.h"
#include "core/state.h"
#include "dist/routing.h"
#include "dist/wire.h"

namespace flexmodel {
namespace detail {

std::uint64_t ModelState::next_model_id() {
  static std::atomic<std::uint64_t> counter{0};
  return ++counter;
}

namespace {

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), 0);
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string close_names(const std::string& wanted, const std::vector<std::string>& names) {
  std::vector<std::pair<std::size_t, std::string>> ranked;
  for (const auto& name : names) ranked.emplace_back(edit_distance(wanted, name), name);
  std::sort(ranked.begin(), ranked.end());
  std::string out;
  for (std::size_t i = 0; i < ranked.size() && i < 3; ++i) {
    out += concat(i == 0 ? "" : ", ", "'", ranked[i].second, "'");
  }
  return out.empty() ? "(the model has none)" : out;
}

}  // namespace detail

using detail::HookRecord;
using detail::ModelState;
using detail::Site;

// ---- construction and registration --------------------------------------

FlexModelBase::FlexModelBase(std::shared_ptr<detail::ModelAdapter> adapter, FlexModelOptions options)
    : adapter_(std::move(adapter)), options_(options), state_(std::make_unique<ModelState>()) {
  const dist::MeshShape shape{options_.tensor_parallel_size, options_.pipeline_parallel_size,
                              options_.data_parallel_size};
  if (options_.mesh_to_use != nullptr) {
    const dist::MeshShape& given = options_.mesh_to_use->shape();
    FLEXMODEL_CHECK(shape.size() == 1 || (shape.tp == given.tp && shape.pp == given.pp && shape.dp == given.dp),
                    ConfigError, "FlexModelOptions: sizes tp ", shape.tp, ", pp ", shape.pp, ", dp ", shape.dp,
                    " differ from the given mesh's (", given.tp, ", ", given.pp, ", ", given.dp,
                    "); give the mesh alone, its shape sets them");
    options_.tp(given.tp).pp(given.pp).dp(given.dp);
    state_->mesh = options_.mesh_to_use;
  } else if (shape.size() != 1) {
    // Sizes (1, 1, 1) keep a FlexModel local to its process, even under mpirun.
    state_->mesh = dist::Mesh::create(shape);
  }
  state_->keep_outputs = options_.keep_outputs;
  state_->adapter = adapter_.get();
}

void FlexModelBase::add_sink(std::shared_ptr<Sink> sink) {
  FLEXMODEL_CHECK(sink != nullptr, ConfigError, "add_sink: the sink is empty");
  state_->sinks.push_back(std::move(sink));
}

void FlexModelBase::close_sinks() {
  if (state_->writes_sinks() && state_->open_gradient_step >= 0) {
    // Under pp the stages' gradient captures reach rank 0 only in a collective end_backward.
    FLEXMODEL_CHECK(!state_->staged(), ConfigError, "close_sinks: forward ", state_->open_gradient_step,
                    " has gradient hooks whose captures may still be on other pipeline stages; call "
                    "end_backward() on every rank first");
    detail::end_backward(*state_);
  }
  for (auto& sink : state_->sinks) sink->close();
  state_->sinks.clear();
}

FlexModelBase::~FlexModelBase() {
  try {
    restore();
  } catch (const std::exception& error) {
    logger()->error("restoring the model while destroying its FlexModel failed: {}", error.what());
  }
}

void FlexModelBase::end_backward() {
  try {
    detail::end_backward(*state_);
  } catch (...) {
    // Only rank 0 delivers to the sinks; the others have moved on.
    if (state_->distributed()) detail::end_world_unless_raised_everywhere(*state_, std::current_exception());
    throw;
  }
}

SaveContext& FlexModelBase::save_ctx() { return state_->save_ctx; }
const std::shared_ptr<dist::Mesh>& FlexModelBase::mesh() const { return state_->mesh; }
bool FlexModelBase::distributed() const { return state_->distributed(); }
const TrainableModules& FlexModelBase::trainable_modules() const { return state_->trainable_modules; }
OutputMap& FlexModelBase::outputs() { return state_->outputs; }
const OutputMap& FlexModelBase::outputs() const { return state_->outputs; }
std::int64_t FlexModelBase::forwards_run() const { return state_->step; }

HookHandle FlexModelBase::register_forward_hook(HookFunction hook) {
  return register_hook_function(std::move(hook), HookType::forward);
}
HookHandle FlexModelBase::register_forward_pre_hook(HookFunction hook) {
  return register_hook_function(std::move(hook), HookType::forward_pre);
}
HookHandle FlexModelBase::register_full_backward_hook(HookFunction hook) {
  return register_hook_function(std::move(hook), HookType::full_backward);
}
HookHandle FlexModelBase::register_full_backward_pre_hook(HookFunction hook) {
  return register_hook_function(std::move(hook), HookType::full_backward_pre);
}
HookHandle FlexModelBase::register_hook(HookFunction hook) {
  return register_hook_function(std::move(hook), HookType::tensor);
}

namespace {

std::vector<std::string> names_of(const detail::NamedTensors& tensors) {
  std::vector<std::string> names;
  for (const auto& [name, tensor] : tensors) names.push_back(name);
  return names;
}

const torch::Tensor* find_named(const detail::NamedTensors& tensors, const std::string& name) {
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return &tensor;
  }
  return nullptr;
}

}  // namespace

HookHandle FlexModelBase::register_hook_function(HookFunction hook, HookType type) {
  ModelState& state = *state_;
  if (hook.module_name() == kRootName) hook = hook.with_module_name("");
  const std::string name = hook.module_name();
  FLEXMODEL_CHECK(!state.in_forward, ConfigError, "cannot register a hook on '", name,
                  "' while a forward runs; register before calling forward");
  auto record = std::make_shared<HookRecord>(std::move(hook));
  record->id = state.next_id;
  record->model = state.model_id;
  record->type = type;
  record->groups = {kAllGroup};
  record->state = &state;

  // Everything that can fail is checked before anything is attached. Under
  // pp every rank registers every hook and a name lives on one stage: the
  // ranks exchange what they found (collective), so a stage that cannot
  // attach the hook fails every rank with its reason.
  // A value hook point lives where its module does.
  const std::string module = name.substr(0, name.find(kValueSeparator));
  const bool here = !state.staged() || (type == HookType::tensor
                                            ? find_named(adapter_->named_parameters(), name) != nullptr
                                            : adapter_->has_module(module == kRootName ? std::string() : module));
  detail::HookPoint point;
  std::exception_ptr failure;
  try {
    if (!here) {
      // Registered for its groups only: it fires on the stage that holds the module.
    } else if (type == HookType::tensor) {
      auto parameters = adapter_->named_parameters();
      const torch::Tensor* parameter = find_named(parameters, name);
      FLEXMODEL_CHECK(parameter != nullptr, ConfigError, "register_hook: the model has no parameter '", name,
                      "'; close names: ", detail::close_names(name, names_of(parameters)));
      FLEXMODEL_CHECK(parameter->requires_grad(), ConfigError, "register_hook: parameter '", name,
                      "' does not require grad, so its gradient hook would never fire; call "
                      "wrapped_module_requires_grad(true) or set requires_grad on it");
      record->parameter = *parameter;
      record->parameter_sharding = adapter_->parameter_sharding(name);
    } else {
      FLEXMODEL_CHECK(name.find(kValueSeparator) == std::string::npos || type == HookType::forward ||
                          type == HookType::full_backward_pre,
                      ConfigError, "'", name, "' is a value hook point, which has no inputs: hook it with forward "
                      "(the value) or full_backward_pre (its gradient), not ", to_string(type));
      point = adapter_->hook_point(name);
    }
  } catch (const std::exception&) {
    if (!state.staged()) throw;
    failure = std::current_exception();
  }
  if (state.staged()) {
    dist::Communicator& world = state.mesh->world();
    detail::agree_on_failure(world, failure);
    const auto holders = world.all_gather_ints(here ? 1 : 0);
    const bool anywhere = std::any_of(holders.begin(), holders.end(), [](std::int64_t v) { return v != 0; });
    FLEXMODEL_CHECK(anywhere, ConfigError, "no ", type == HookType::tensor ? "parameter" : "module", " named '",
                    name, "' on any pipeline stage; close names on this stage: ",
                    detail::close_names(name, type == HookType::tensor ? names_of(adapter_->named_parameters())
                                                                       : adapter_->module_names()));
    record->remote = !here;
  }
  if (record->remote) {
    // Nothing to attach on this stage.
  } else if (type == HookType::tensor) {
    std::weak_ptr<HookRecord> weak = record;
    record->parameter_hook_index = record->parameter.register_hook([weak](const torch::Tensor& grad) -> torch::Tensor {
      auto alive = weak.lock();
      return alive ? detail::run_parameter_hook(*alive, grad) : grad;
    });
  } else {
    Site& site = state.sites[point.key];
    site.module_name = name;
    site.module = point.module;
    site.of(type).push_back(record);
    record->site = &site;
  }
  state.hooks.emplace(record->id, record);
  ++state.next_id;
  state.selections_valid = false;
  if (type != HookType::tensor && !record->remote) announce_hook_points();
  logger()->debug("registered {} hook on '{}'", to_string(type), name);
  return record->handle();
}

namespace {

void detach_record(ModelState& state, HookRecord& record) {
  if (record.remote) {
    // Nothing was attached on this stage.
  } else if (record.type == HookType::tensor) {
    record.parameter.remove_hook(record.parameter_hook_index);
  } else if (record.site != nullptr) {
    auto& list = record.site->of(record.type);
    std::erase_if(list, [&](const auto& other) { return other.get() == &record; });
    if (record.site->empty()) {
      std::erase_if(state.sites, [&](const auto& entry) { return &entry.second == record.site; });
    }
    record.site = nullptr;
  }
  record.state = nullptr;
}

HookRecord& find_record(ModelState& state, const HookHandle& handle) {
  FLEXMODEL_CHECK(handle.model == state.model_id, ConfigError, "hook ", handle.id, " on '", handle.module_name, "' (",
                  to_string(handle.type), ") belongs to another FlexModel; use the handles this FlexModel returned");
  auto found = state.hooks.find(handle.id);
  FLEXMODEL_CHECK(found != state.hooks.end(), ConfigError, "no hook ", handle.id, " on '", handle.module_name,
                  "' (", to_string(handle.type), "): it was removed");
  return *found->second;
}

}  // namespace

void FlexModelBase::remove_hook(const HookHandle& handle) {
  ModelState& state = *state_;
  FLEXMODEL_CHECK(!state.in_forward, ConfigError, "cannot remove a hook while a forward runs");
  HookRecord& record = find_record(state, handle);
  const bool module_hook = record.type != HookType::tensor;
  detach_record(state, record);
  state.hooks.erase(handle.id);
  state.selections_valid = false;
  if (module_hook) announce_hook_points();
}

void FlexModelBase::restore() {
  ModelState& state = *state_;
  FLEXMODEL_CHECK(!state.in_forward, ConfigError, "cannot restore the model while a forward runs");
  for (auto& [id, record] : state.hooks) detach_record(state, *record);
  state.hooks.clear();
  state.sites.clear();
  state.groups = {kAllGroup};
  state.selections_valid = false;
  announce_hook_points();
}

void FlexModelBase::announce_hook_points() {
  std::vector<detail::HookPointUse> uses;
  for (auto& [key, site] : state_->sites) {
    uses.push_back(detail::HookPointUse{
        site.module_name, key, !site.of(HookType::forward_pre).empty() || !site.of(HookType::full_backward).empty(),
        !site.of(HookType::forward).empty() || !site.of(HookType::full_backward_pre).empty()});
  }
  adapter_->hook_points_changed(uses);
}

// ---- groups -------------------------------------------------------------

HookPointSelection FlexModelBase::select_hook_points(const Pattern& pattern, HookType type) const {
  HookPointSelection selection;
  if (type == HookType::tensor) {
    for (const auto& [name, parameter] : adapter_->named_parameters()) {
      if (pattern.matches(name)) selection.names.push_back(name);
    }
    return selection;
  }
  const auto separator = pattern.text().find(kValueSeparator);
  if (separator != std::string::npos) {
    // Value hook points: the module part and the value part are matched
    // apart (`**` in either spans their dots); a value reached by its op and
    // by its name is selected once.
    auto part = [&](std::string text) {
      return pattern.kind() == Pattern::Kind::substring ? Pattern::substring(std::move(text))
             : pattern.kind() == Pattern::Kind::exact   ? Pattern::exact(std::move(text))
                                                        : Pattern::glob(std::move(text));
    };
    const Pattern modules = part(pattern.text().substr(0, separator));
    const Pattern values = part(pattern.text().substr(separator + kValueSeparator.size()));
    std::set<const void*> seen;
    for (const auto& name : adapter_->value_point_names()) {
      const auto at = name.find(kValueSeparator);
      const std::string module = name.substr(0, at);
      if (modules.matches(module == kRootName ? std::string() : module) &&
          values.matches(name.substr(at + kValueSeparator.size())) &&
          seen.insert(adapter_->hook_point(name).key).second) {
        selection.names.push_back(name);
      }
    }
    return selection;
  }
  for (const auto& name : adapter_->module_names()) {
    if (!pattern.matches(name)) continue;
    // A wildcard over modules keeps the same names whether or not a model
    // (ParallelGPT, models::GPT) offers its values as HookPoint children.
    if (pattern.is_wildcard() && adapter_->is_value_point_module(name)) continue;
    std::string reason = adapter_->unhookable_reason(name);
    if (reason.empty()) {
      selection.names.push_back(name);
      continue;
    }
    // A module named exactly is meant; a wildcard means the hook points among its matches.
    FLEXMODEL_CHECK(pattern.is_wildcard(), ConfigError, "module '", name, "' ", reason);
    selection.skipped.emplace_back(name, std::move(reason));
  }
  return selection;
}

std::vector<HookHandle> FlexModelBase::create_hook_group(const std::string& group, const Pattern& pattern,
                                                         ExpectedShape expected_shape,
                                                         EditingFunction editing_function, std::size_t unpack_idx,
                                                         HookType type) {
  return create_hook_group(group, pattern,
                           HookFunction("", std::move(expected_shape), std::move(editing_function), unpack_idx), type);
}

std::vector<HookHandle> FlexModelBase::create_hook_group(const std::string& group, const Pattern& pattern,
                                                         const HookFunction& hook, HookType type) {
  FLEXMODEL_CHECK(group != kAllGroup, ConfigError, "create_hook_group: group 'all' is reserved (every hook is in it)");
  const bool staged = state_->distributed() && state_->mesh->shape().pp > 1;
  HookPointSelection selection;
  std::string failure;
  try {
    selection = select_hook_points(pattern, type);
  } catch (const Error& error) {
    if (!staged) throw;
    failure = error.what();
  }
  if (staged) {
    // A stage that cannot select tells the others before they wait in the exchange below.
    const auto failed = state_->mesh->world().all_gather_ints(failure.empty() ? 0 : 1);
    if (std::any_of(failed.begin(), failed.end(), [](std::int64_t flag) { return flag != 0; })) {
      if (!failure.empty()) throw ConfigError(failure);
      FLEXMODEL_FAIL(ConfigError, "create_hook_group('", group, "'): ", pattern.describe(),
                     " failed on another pipeline stage (its rank logs why)");
    }
  }
  for (const auto& [name, reason] : selection.skipped) {
    logger()->info("create_hook_group('{}'): {} skips '{}', which {}", group, pattern.describe(), name, reason);
  }
  std::vector<std::string>& matches = selection.names;
  if (staged) {
    // Each stage matches its own modules; every rank registers the union, in stage order.
    std::string local_names;
    for (const auto& name : matches) local_names += name + '\n';
    dist::Communicator& world = state_->mesh->world();
    const auto lengths = world.all_gather_ints(static_cast<std::int64_t>(local_names.size()));
    const std::int64_t longest = std::max<std::int64_t>(1, *std::max_element(lengths.begin(), lengths.end()));
    std::string padded = local_names;
    padded.resize(static_cast<std::size_t>(longest), '\0');
    torch::Tensor bytes = world.all_gather(torch::from_blob(padded.data(), {longest}, torch::kUInt8).clone(), 0);
    const char* gathered = static_cast<const char*>(bytes.data_ptr());
    std::string all_names;
    for (std::size_t r = 0; r < lengths.size(); ++r) {
      all_names.append(gathered + r * static_cast<std::size_t>(longest), static_cast<std::size_t>(lengths[r]));
    }
    matches.clear();
    std::set<std::string> seen;
    for (std::size_t start = 0, end; (end = all_names.find('\n', start)) != std::string::npos; start = end + 1) {
      std::string name = all_names.substr(start, end - start);
      if (seen.insert(name).second) matches.push_back(std::move(name));
    }
  }
  FLEXMODEL_CHECK(!matches.empty(), ConfigError, "create_hook_group('", group, "'): ", pattern.describe(),
                  " matches no ",
                  type == HookType::tensor                                          ? "parameter"
                  : pattern.text().find(kValueSeparator) != std::string::npos ? "value hook point"
                                                                                    : "module",
                  " of the model",
                  selection.skipped.empty()
                      ? std::string()
                      : detail::concat(" whose hooks can fire (it skipped ", selection.skipped.size(),
                                       ": containers or modules the forward never calls)"));
  std::vector<HookHandle> created;
  try {
    for (const auto& name : matches) created.push_back(register_hook_function(hook.with_module_name(name), type));
  } catch (...) {
    // None of the group's hooks stays behind (it would run in every forward of group "all").
    for (const auto& handle : created) remove_hook(handle);
    throw;
  }
  update_hook_groups(created, group);
  return created;
}

void FlexModelBase::update_hook_groups(const std::vector<HookHandle>& hooks, const std::string& group) {
  ModelState& state = *state_;
  FLEXMODEL_CHECK(!group.empty(), ConfigError, "update_hook_groups: a group needs a non-empty name");
  std::vector<HookRecord*> records;
  for (const auto& handle : hooks) records.push_back(&find_record(state, handle));
  for (HookRecord* record : records) record->groups.insert(group);
  state.groups.insert(group);
  state.selections_valid = false;
}

void FlexModelBase::delete_hook_group(const std::string& group) noexcept {
  ModelState& state = *state_;
  if (group == kAllGroup || state.groups.erase(group) == 0) return;
  for (auto& [id, record] : state.hooks) record->groups.erase(group);
  state.selections_valid = false;
}

void FlexModelBase::update_hook_groups(const HookHandle& hook, const std::string& group) {
  update_hook_groups(std::vector<HookHandle>{hook}, group);
}

namespace {

std::vector<HookHandle> hooks_matching(const ModelState& state, const Pattern& pattern, const char* caller) {
  std::vector<HookHandle> matched;
  for (const auto& [id, record] : state.hooks) {
    if (pattern.matches(record->function.module_name())) matched.push_back(record->handle());
  }
  FLEXMODEL_CHECK(!matched.empty(), ConfigError, caller, ": ", pattern.describe(), " matches no registered hook");
  return matched;
}

}  // namespace

void FlexModelBase::update_hook_groups(const Pattern& pattern, const std::string& group) {
  update_hook_groups(hooks_matching(*state_, pattern, "update_hook_groups"), group);
}

void FlexModelBase::remove_hook_groups(const std::vector<HookHandle>& hooks, const std::set<std::string>& groups) {
  ModelState& state = *state_;
  for (const auto& group : groups) {
    FLEXMODEL_CHECK(group != kAllGroup, ConfigError,
                    "remove_hook_groups: group 'all' cannot be removed; every hook stays in it");
    FLEXMODEL_CHECK(state.groups.count(group) != 0, ConfigError, "remove_hook_groups: no group '", group,
                    "'; groups: ", detail::list_text(state.groups));
  }
  std::vector<HookRecord*> records;
  for (const auto& handle : hooks) records.push_back(&find_record(state, handle));
  for (HookRecord* record : records) {
    for (const auto& group : groups) record->groups.erase(group);
  }
  state.selections_valid = false;
}

void FlexModelBase::remove_hook_groups(const HookHandle& hook, const std::set<std::string>& groups) {
  remove_hook_groups(std::vector<HookHandle>{hook}, groups);
}

void FlexModelBase::remove_hook_groups(const Pattern& pattern, const std::set<std::string>& groups) {
  remove_hook_groups(hooks_matching(*state_, pattern, "remove_hook_groups"), groups);
}

std::map<HookHandle, std::set<std::string>> FlexModelBase::get_hook_function_groups() const {
  std::map<HookHandle, std::set<std::string>> result;
  for (const auto& [id, record] : state_->hooks) result.emplace(record->handle(), record->groups);
  return result;
}

std::vector<HookHandle> FlexModelBase::get_group_hook_functions(const std::string& group) const {
  FLEXMODEL_CHECK(state_->groups.count(group) != 0, ConfigError, "no group '", group,
                  "'; groups: ", detail::list_text(state_->groups));
  std::vector<HookHandle> members;
  for (const auto& [id, record] : state_->hooks) {
    if (record->groups.count(group) != 0) members.push_back(record->handle());
  }
  return members;
}

std::set<std::string> FlexModelBase::hook_groups() const { return state_->groups; }

std::vector<std::pair<HookHandle, std::string>> FlexModelBase::unfired_hooks() const {
  std::vector<std::pair<HookHandle, std::string>> unfired;
  for (const auto& [id, record] : state_->hooks) {
    if (record->warned_unfired && !record->fired) {
      unfired.emplace_back(record->handle(), adapter_->unfired_advice(record->function.module_name()));
    }
  }
  return unfired;
}

std::vector<HookHandle> FlexModelBase::hooks() const {
  std::vector<HookHandle> handles;
  for (const auto& [id, record] : state_->hooks) handles.push_back(record->handle());
  return handles;
}

// ---- trainable modules and parameters -----------------------------------

void FlexModelBase::register_trainable_module(const std::string& name, std::shared_ptr<torch::nn::Module> module) {
  FLEXMODEL_CHECK(module != nullptr, ConfigError, "register_trainable_module('", name, "'): the module is empty");
  state_->trainable_modules[name] = std::move(module);
}

void FlexModelBase::wrapped_module_requires_grad(bool requires_grad) {
  for (auto& [name, parameter] : adapter_->named_parameters()) parameter.requires_grad_(requires_grad);
}

std::vector<std::pair<std::string, torch::Tensor>> FlexModelBase::named_parameters() const {
  return adapter_->named_parameters();
}

torch::Tensor FlexModelBase::get_module_parameter(const std::string& name, const ExpectedShape& expected_shape) const {
  auto parameters = adapter_->named_parameters();
  const torch::Tensor* parameter = find_named(parameters, name);
  auto buffers = adapter_->named_buffers();
  if (parameter == nullptr) parameter = find_named(buffers, name);
  HookRecord shape_check(HookFunction("get_module_parameter('" + name + "')", expected_shape));
  shape_check.type = HookType::tensor;
  if (!state_->distributed()) {
    FLEXMODEL_CHECK(parameter != nullptr, ConfigError, "get_module_parameter: the model has no parameter '", name,
                    "'; close names: ", detail::close_names(name, names_of(parameters)));
    detail::check_expected_shape(shape_check, *parameter);
    return detail::snapshot_copy(*parameter);
  }
  // Collective: the stage holding the parameter gathers its TP shards to its
  // leader, which hands the whole parameter to rank 0.
  const dist::Mesh& mesh = *state_->mesh;
  const auto holders = mesh.world().all_gather_ints(parameter != nullptr ? 1 : 0);
  const auto first_holder = std::find(holders.begin(), holders.end(), 1);
  FLEXMODEL_CHECK(first_holder != holders.end(), ConfigError, "get_module_parameter: no pipeline stage has a parameter '",
                  name, "'; close names on this stage: ", detail::close_names(name, names_of(parameters)));
  const auto stage_of = [&](std::int64_t rank) { return rank / (mesh.shape().tp * mesh.shape().dp); };
  const std::int64_t owner_stage = stage_of(first_holder - holders.begin());
  const int owner_leader = static_cast<int>(owner_stage * mesh.shape().tp * mesh.shape().dp);
  torch::Tensor full;
  std::exception_ptr failure;
  if (mesh.pp_rank() == owner_stage) {
    try {
      // Shapes are alike on the stage's ranks: a route error skips the gather on each.
      const detail::Route route =
          detail::route_of(shape_check, *parameter, mesh, /*split_rows=*/false, adapter_->parameter_sharding(name));
      full = route.tp_dim >= 0 ? detail::ranks_to_blocks(mesh.tp_group().gather(parameter->detach(), route.tp_dim, 0),
                                                         route.tp_dim, mesh.shape().tp, route.blocks)
                               : parameter->detach();
      if (mesh.stage_leader()) detail::check_expected_shape(shape_check, full);
    } catch (const std::exception&) {
      failure = std::current_exception();
    }
  }
  // The owning stage's failure reaches every rank before anyone waits for the tensor.
  detail::agree_on_failure(mesh.world(), failure);
  if (owner_leader != 0) {
    if (mesh.rank() == owner_leader) {
      detail::send_captures(mesh.world(), {detail::WireCapture{name, HookType::tensor, state_->step, full}}, 0);
    } else if (mesh.rank() == 0) {
      full = detail::receive_captures(mesh.world(), owner_leader).front().tensor;
    }
  }
  return mesh.rank() == 0 ? detail::snapshot_copy(full) : torch::Tensor();
}

}  // namespace flexmodel
