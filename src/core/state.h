// What a FlexModel holds between calls: its hook records, the sites they sit
// on, the selection tables a forward reads, and what is in flight. Shared by
// src/core (registry, pipeline, forward scope) and src/dist/routing.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "flexmodel/dist.h"
#include "flexmodel/flex_model.h"
#include "flexmodel/hook_function.h"
#include "flexmodel/output_map.h"
#include "flexmodel/sink.h"
#include "core/snapshot.h"

namespace flexmodel::detail {

constexpr std::size_t kModuleHookTypes = 4;  // every HookType but tensor

class ModelAdapter;
struct ModelState;
struct Site;

struct HookRecord : std::enable_shared_from_this<HookRecord> {
  explicit HookRecord(HookFunction hook) : function(std::move(hook)) {}

  std::uint64_t id = 0;
  HookType type = HookType::forward;
  HookFunction function;
  std::set<std::string> groups;
  // Null once the hook is removed; autograd may still hold the record then.
  ModelState* state = nullptr;
  Site* site = nullptr;
  OutputMap::Series* series = nullptr;
  torch::Tensor parameter;
  dist::Sharding parameter_sharding;  // as the parameter's module declares it
  unsigned parameter_hook_index = 0;
  // Position in ModelState::records; hooks registered since the last forward have none yet.
  static constexpr std::size_t kUnindexed = static_cast<std::size_t>(-1);
  std::size_t index = kUnindexed;
  bool fired = false;
  // Data parallelism: what this hook's tensor is, firing by firing within a
  // forward, found from the calibration forward (see dp_splits_rows).
  std::vector<std::vector<std::int64_t>> calibration_shapes;
  std::vector<char> split_rows;  // per firing: 1 split by rows over dp ranks, 0 the same on every rank
  bool calibrated = false;
  std::uint64_t firing_forward = 0;  // ModelState::forward_serial of the firings counted
  std::size_t firings = 0;
  bool warned_unfired = false;
  bool remote = false;  // its module lives on another pipeline stage

  std::uint64_t model = 0;  // ModelState::model_id of its FlexModel

  bool captures_gradients() const { return type != HookType::forward && type != HookType::forward_pre; }
  HookHandle handle() const { return HookHandle{model, id, function.module_name(), type}; }
};

struct Site {
  std::string module_name;
  torch::nn::Module* module = nullptr;
  std::array<std::vector<std::shared_ptr<HookRecord>>, kModuleHookTypes> hooks;

  std::vector<std::shared_ptr<HookRecord>>& of(HookType type) { return hooks[static_cast<std::size_t>(type)]; }
  bool empty() const {
    for (const auto& list : hooks) {
      if (!list.empty()) return false;
    }
    return true;
  }
};

// A hooked call runs its hooks in phases: its inputs' value hooks, then their
// gradient hooks, then the same for its outputs.
enum Phase : std::size_t { kInputValues, kInputGradients, kOutputValues, kOutputGradients };
constexpr std::array<HookType, kModuleHookTypes> kPhaseType{HookType::forward_pre, HookType::full_backward,
                                                            HookType::forward, HookType::full_backward_pre};

// One active hook as a hooked call reads it.
struct ActiveHook {
  HookRecord* record = nullptr;
  // Set only for a plain capture (capture only: no expected shape, slice or edit, one
  // process), which runs from this entry alone.
  OutputMap::Series* plain_capture_series = nullptr;
  std::size_t unpack_idx = 0;
};

// A module with active hooks in the running forward's selection, as a slot of
// that selection's open-addressing table, so that a hooked call reads one slot
// and then its hooks' entries, which lie together.
struct ActiveSite {
  const void* key = nullptr;
  // The hooks of phase p are ModelState::active_hooks[bounds[p], bounds[p + 1]).
  std::array<std::uint32_t, kModuleHookTypes + 1> bounds{};

  bool has(Phase first, Phase last) const { return bounds[first] != bounds[last + 1]; }
};

// A gradient captured in a backward, waiting to reach rank 0 (pipeline stages).
struct GradientCapture {
  OutputMap::Series* series = nullptr;
  std::int64_t step = 0;  // the forward whose graph it belongs to
  torch::Tensor snapshot;
};

struct ModelState {
  std::map<std::uint64_t, std::shared_ptr<HookRecord>> hooks;
  std::unordered_map<const void*, Site> sites;
  std::set<std::string> groups{kAllGroup};
  // Unique to this FlexModel in the process; part of every handle.
  const std::uint64_t model_id = next_model_id();
  std::uint64_t next_id = 1;
  static std::uint64_t next_model_id();

  ModelAdapter* adapter = nullptr;  // the FlexModel's, for messages
  std::shared_ptr<dist::Mesh> mesh;  // null in a single process
  std::vector<std::shared_ptr<Sink>> sinks;
  bool keep_outputs = true;
  bool distributed() const { return mesh != nullptr && mesh->distributed(); }
  bool staged() const { return distributed() && mesh->shape().pp > 1; }
  // Where the sinks are written: rank 0, or the one process.
  bool writes_sinks() const { return !sinks.empty() && (!distributed() || mesh->rank() == 0); }

  SaveContext save_ctx;
  TrainableModules trainable_modules;
  OutputMap outputs;
  std::int64_t step = 0;

  // What each group selection runs, computed once per selection and dropped
  // when hooks or memberships change, so that switching groups between
  // forwards only swaps tables.
  struct Selection {
    std::vector<char> hook_active;  // by HookRecord::index
    std::vector<ActiveSite> site_table;  // a power of two of slots, at most half full
    unsigned site_table_shift = 64;
    std::vector<ActiveHook> hooks;
    bool checked_unfired = false;
    bool captures_gradients = false;  // an active hook captures in backward
    bool needs_backward = false;      // an active hook runs in backward
    // Value firings (a site's hooks of one phase) of the last complete
    // forward, when every active hook had fired by its end; 0 when unknown.
    // A forward run to its last hook stops at this firing.
    mutable std::uint64_t last_hook_firing = 0;
  };
  std::map<std::pair<std::vector<std::string>, bool>, Selection> selections;
  std::vector<HookRecord*> records;
  const Selection* applied = nullptr;
  // Whether the applied selection runs a hook; one registered since then runs
  // until the next forward chooses.
  bool is_active(const HookRecord& record) const {
    return record.index == HookRecord::kUnindexed || applied == nullptr || applied->hook_active[record.index] != 0;
  }
  bool selections_valid = false;
  // The applied selection's tables, read by every hookable call of a forward.
  const ActiveSite* active_sites = nullptr;
  std::size_t active_site_mask = 0;
  unsigned active_site_shift = 64;
  const ActiveHook* active_hooks = nullptr;
  bool check_unfired = false;

  bool in_forward = false;
  // run_to_last_hook: set for its forward, which stops (stopped) after value
  // firing stop_at (0: runs to the end); value_firings counts this forward's.
  bool stop_requested = false;
  bool stopped = false;
  std::uint64_t stop_at = 0;
  std::uint64_t value_firings = 0;
  // Data parallelism: the calibration forward (one more row than the real
  // one) runs with hooks that only note the shapes they see.
  bool calibrating = false;
  std::uint64_t forward_serial = 0;  // counts forwards begun, failed ones too
  std::int64_t local_rows = 0;
  std::vector<std::vector<std::int64_t>> output_calibration_shapes;
  std::vector<char> output_split_rows;
  bool outputs_calibrated = false;
  SnapshotArena arena;
  std::vector<OutputMap::Capture> pending;

  // Gradient captures belong to the sinks' step of their forward, which stays
  // open (its end_step postponed) until end_backward: called by the program,
  // by the next forward, or by close_sinks. -1 when no step is open.
  std::int64_t open_gradient_step = -1;
  // Set by a forward whose selection captures gradients, on every rank alike;
  // end_backward does its work (collective under pp) only then.
  bool backward_outstanding = false;
  std::vector<GradientCapture> gradients_for_rank0;  // pipeline stages only
  // Set by DivertedCaptures: where captures go instead of the output map and the sinks.
  FlexModelBase::CaptureTap capture_tap;
};

// The forward running on this thread, read by every hookable call. Initial-exec:
// the library is linked, not dlopen'ed late, so the hot path reads it without
// a call into the TLS resolver.
extern __attribute__((tls_model("initial-exec"))) thread_local ModelState* g_current_forward;
// The innermost hookable module a failing forward left, for its message.
extern thread_local const torch::nn::Module* g_failing_module;

// What generate() tells the editing functions of the forward it runs on this thread.
struct GenerationStep {
  std::int64_t step = -1;
  std::int64_t position_begin = 0, position_end = 0;
};
extern thread_local GenerationStep g_generation_step;

// ---- shared by the registry, the pipeline and the forward scope ----------

std::string hook_label(const HookRecord& record);
std::string expected_text(const ExpectedShape& shape);
std::string list_text(const std::set<std::string>& names);
void check_expected_shape(const HookRecord& record, const torch::Tensor& tensor);
OutputMap::Series& series_of(ModelState& state, HookRecord& record);

// What the pipeline knows of one firing of a hook besides its tensor.
struct Firing {
  std::size_t leaf = 0;     // the tensor's place among the module's inputs or outputs
  std::int64_t step = 0;    // the forward it belongs to
  bool in_forward = true;   // false in a backward
  // Gradients under data parallelism: whether the forward tensor had rows split
  // over the dp ranks; if not (a parameter, a position table), each rank holds
  // a partial gradient and their sum is the one-process gradient.
  bool split_rows = false;
};

// The one pipeline every hook runs, in a single process and under any mesh:
// route → gather → check → capture → edit → check → scatter, in place.
void run_pipeline(ModelState& state, HookRecord& record, torch::Tensor& tensor, const Firing& firing);

// A gradient capture reaching the output map and the sinks (on rank 0, or in
// the one process); HookError naming it when its forward's step has ended.
void deliver_gradient(ModelState& state, OutputMap::Series& series, std::int64_t step, const torch::Tensor& snapshot);

// Hands one snapshot to every sink: a copy of it when the output map keeps it
// too, so that a program editing outputs() in place never races a background
// writer. When a sink throws, every sink forgets `step` (a step is all or
// nothing) and the error propagates.
void write_sinks(ModelState& state, const std::string& module_name, HookType type, std::int64_t step,
                 const torch::Tensor& snapshot);
// Ends `step` in every sink; when one throws, the sinks it has not reached
// forget the step, and the error propagates.
void end_sinks_step(ModelState& state, std::int64_t step);

// The slot of a module's key in a selection's open-addressing site table.
std::size_t site_slot(const void* key, unsigned shift) noexcept;

// A parameter's gradient hook, registered on the parameter itself.
torch::Tensor run_parameter_hook(HookRecord& record, const torch::Tensor& grad);

// Delivers the gradient captures of the open step (rank 0 gets the pipeline
// stages'), then ends that step in the sinks. Under pp it talks to the stage
// leaders: every rank calls it at the same point.
void end_backward(ModelState& state);

// Under a mesh, ends every rank with the error unless every rank of a single
// pipeline stage raised it (then the program may catch it). No-op otherwise.
void end_world_unless_raised_everywhere(const ModelState& state, std::exception_ptr error);

}  // namespace flexmodel::detail
