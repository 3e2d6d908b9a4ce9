// FlexModelBase and the hook pipeline:
//   unpack → check shape → capture (snapshot) → edit → check → repack.
#include "flexmodel/flex_model.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>

#include <torch/autograd.h>

#include "flexmodel/dist.h"
#include "flexmodel/logging.h"
#include "detail/model_adapter.h"
#include "detail/snapshot.h"

namespace flexmodel {
namespace detail {

std::atomic<int> hooked_forwards_in_flight{0};

constexpr std::size_t kModuleHookTypes = 4;  // every HookType but tensor

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

  HookHandle handle() const { return HookHandle{model, id, function.module_name(), type}; }
};

struct Site {
  std::string module_name;
  torch::nn::Module* module = nullptr;
  std::array<std::vector<std::shared_ptr<HookRecord>>, kModuleHookTypes> hooks;

  std::vector<std::shared_ptr<HookRecord>>& of(HookType type) { return hooks[static_cast<std::size_t>(type)]; }
  bool empty() const {
    return std::all_of(hooks.begin(), hooks.end(), [](const auto& list) { return list.empty(); });
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
  // Set only for a plain capture (capture only: no expected shape, no edit, one
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

struct ModelState {
  std::map<std::uint64_t, std::shared_ptr<HookRecord>> hooks;
  std::unordered_map<const void*, Site> sites;
  std::set<std::string> groups{kAllGroup};
  // Unique to this FlexModel in the process; part of every handle.
  const std::uint64_t model_id = next_model_id();
  std::uint64_t next_id = 1;
  static std::uint64_t next_model_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }

  ModelAdapter* adapter = nullptr;  // the FlexModel's, for messages
  std::shared_ptr<dist::Mesh> mesh;  // null in a single process
  std::vector<std::shared_ptr<Sink>> sinks;
  bool keep_outputs = true;
  bool distributed() const { return mesh != nullptr && mesh->distributed(); }

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
  };
  std::map<std::pair<std::vector<std::string>, bool>, Selection> selections;
  std::vector<HookRecord*> records;
  const Selection* applied = nullptr;
  // Whether the applied selection runs a hook; one registered since then runs
  // until the next forward chooses.
  bool is_active(const HookRecord& record) const {
    return record.index == HookRecord::kUnindexed || applied->hook_active[record.index] != 0;
  }
  bool selections_valid = false;
  // The applied selection's tables, read by every hookable call of a forward.
  const ActiveSite* active_sites = nullptr;
  std::size_t active_site_mask = 0;
  unsigned active_site_shift = 64;
  const ActiveHook* active_hooks = nullptr;
  bool check_unfired = false;

  bool in_forward = false;
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
};

namespace {
thread_local const torch::nn::Module* g_failing_module = nullptr;
}  // namespace

void note_failing_module(const torch::nn::Module* module) noexcept {
  if (g_failing_module == nullptr) g_failing_module = module;
}

namespace {

// Initial-exec: the library is linked, not dlopen'ed late, and the hot path
// then reads the pointer without a call into the TLS resolver.
__attribute__((tls_model("initial-exec"))) thread_local ModelState* g_current_forward = nullptr;

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

OutputMap::Series& series_of(ModelState& state, HookRecord& record) {
  if (record.series == nullptr) record.series = &state.outputs.series(record.function.module_name(), record.type);
  return *record.series;
}

void capture(ModelState& state, OutputMap::Series& series, const torch::Tensor& tensor, bool in_forward) {
  if (in_forward) {
    if (can_copy_into_arena(tensor)) {
      state.pending.push_back(OutputMap::Capture{&series, state.arena.copy(tensor), {}});
    } else {
      state.pending.push_back(OutputMap::Capture{&series, {}, snapshot_copy(tensor)});
    }
  } else {
    state.outputs.append(series, snapshot_copy(tensor));
  }
}

// A library error raised inside an editing function (save_ctx has no value,
// say), as the same error type with the hook's name in front.
[[noreturn]] void rethrow_naming_hook(const HookRecord& record, const Error& error) {
  constexpr std::string_view kPrefix = "flexmodel: ";
  std::string_view body = error.what();
  if (body.substr(0, kPrefix.size()) == kPrefix) body.remove_prefix(kPrefix.size());
  const std::string text = concat(kPrefix, "in the editing function of ", hook_label(record), ": ", body);
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
                      state.trainable_modules};
  torch::Tensor edited;
  {
    NoHooksWhileEditing no_nested_hooks;
    try {
      edited = record.function.editing_function()(tensor, context);
    } catch (const Error& error) {
      rethrow_naming_hook(record, error);
    } catch (const std::exception& cause) {
      FLEXMODEL_FAIL(HookError, "editing function of ", hook_label(record), " threw: ", cause.what());
    }
  }
  check_edit(record, tensor, edited);
  return edited;
}

// Set on every rank just before a hook error that every rank raises, so that
// the failing forward need not end the world.
thread_local bool g_error_raised_on_every_rank = false;

// How a hook's tensor is spread over the mesh: the tensor-parallel dimension
// (the one whose expected size differs from the local one), and whether its
// rows are split over data-parallel ranks.
struct Route {
  std::int64_t tp_dim = -1;
  std::int64_t blocks = 1;  // the declared blocks of a fused dimension
  bool gather_dp = false;
};

// What the hooked module declares about the hook's tensor (leaf `leaf` of its
// inputs or outputs, or the hooked parameter).
dist::Sharding declared_sharding(const HookRecord& record, std::size_t leaf) {
  if (record.type == HookType::tensor) return record.parameter_sharding;
  const auto* module =
      record.site != nullptr ? dynamic_cast<const dist::TensorParallelModule*>(record.site->module) : nullptr;
  if (module == nullptr) return dist::Sharding::replicated();
  const bool inputs = record.type == HookType::forward_pre || record.type == HookType::full_backward;
  return inputs ? module->input_sharding(leaf) : module->output_sharding(leaf);
}

// A fused dimension gathered rank by rank holds, per rank, its piece of every
// block; the model's order is block by block, each block's pieces in rank order.
torch::Tensor ranks_to_blocks(const torch::Tensor& gathered, std::int64_t dim, std::int64_t ranks,
                              std::int64_t blocks, bool inverse = false) {
  if (blocks == 1 || !gathered.defined()) return gathered;
  const auto pieces = gathered.chunk(ranks * blocks, dim);
  std::vector<torch::Tensor> ordered;
  for (std::int64_t outer = 0; outer < (inverse ? ranks : blocks); ++outer) {
    for (std::int64_t inner = 0; inner < (inverse ? blocks : ranks); ++inner) {
      ordered.push_back(pieces[static_cast<std::size_t>(inverse ? inner * ranks + outer : inner * blocks + outer)]);
    }
  }
  return torch::cat(ordered, dim);
}

// Under data parallelism, whether a tensor is split by rows over the dp ranks
// or the same on every one (a position embedding of arange(T)[None], a rotary
// table, a tied weight) is read off its shapes, never guessed from one size:
// the first forward after hooks change is preceded by a calibration forward
// with one more row per rank, and a tensor whose dim 0 grows in proportion
// (its other dims unchanged) has rows, one whose shape stays put has none.
// Anything else is an error naming the hook, as is a tensor without rows
// whose values differ across ranks (it depends on the batch).
bool rows_split(std::size_t rows, const std::vector<std::int64_t>& calibration, const torch::Tensor& real,
                const std::string& what) {
  const auto sizes = real.sizes();
  if (sizes.equals(calibration)) return false;
  bool split = !calibration.empty() && calibration.size() == sizes.size() &&
               calibration[0] * static_cast<std::int64_t>(rows) == sizes[0] * static_cast<std::int64_t>(rows + 1);
  for (std::size_t d = 1; split && d < sizes.size(); ++d) split = calibration[d] == sizes[d];
  FLEXMODEL_CHECK(split, ShapeError, what, " has shape ", sizes, " with ", rows, " row(s) per data-parallel rank and ",
                  c10::IntArrayRef(calibration), " with ", rows + 1,
                  ": it changes with the batch but not as rows in dim 0, so data parallelism cannot split it; "
                  "hook another module, or run with dp 1");
  return true;
}

bool dp_splits_rows(ModelState& state, HookRecord& record, const torch::Tensor& local) {
  if (record.type != HookType::forward && record.type != HookType::forward_pre) return local.dim() > 0;
  if (record.firing_forward != state.forward_serial) {
    record.firing_forward = state.forward_serial;
    record.firings = 0;
  }
  const std::size_t firing = record.firings++;
  if (firing < record.split_rows.size()) return record.split_rows[firing] != 0;
  FLEXMODEL_CHECK(firing < record.calibration_shapes.size(), ShapeError, hook_label(record), " fired ", firing + 1,
                  " times in this forward but ", record.calibration_shapes.size(),
                  " times in the calibration forward that tells data parallelism which tensors have rows; "
                  "a hook must fire equally often whatever the batch size under dp");
  record.split_rows.push_back(
      rows_split(static_cast<std::size_t>(state.local_rows), record.calibration_shapes[firing], local,
                 hook_label(record)) ? 1 : 0);
  return record.split_rows.back() != 0;
}

// FNV-1a over 8-byte words: equal on two ranks exactly when their bytes are, but for collisions.
std::uint64_t content_hash(const torch::Tensor& tensor) {
  const torch::Tensor bytes = tensor.detach().cpu().contiguous();
  const auto* data = static_cast<const unsigned char*>(bytes.data_ptr());
  const std::size_t size = bytes.nbytes();
  std::uint64_t hash = 1469598103934665603ull ^ size;
  std::size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, data + i, 8);
    hash = (hash ^ word) * 1099511628211ull;
  }
  for (; i < size; ++i) hash = (hash ^ data[i]) * 1099511628211ull;
  return hash;
}

// A tensor taken as the same on every rank of `group` (one without rows over
// dp, one its module does not declare split over tp) is captured once; if the
// ranks' copies differ, every rank ends with `why`.
void check_same_across(dist::Communicator& group, const torch::Tensor& tensor, const std::string& why) {
  const auto hashes = group.all_gather_ints(static_cast<std::int64_t>(content_hash(tensor)));
  if (std::all_of(hashes.begin(), hashes.end(), [&](std::int64_t hash) { return hash == hashes.front(); })) return;
  dist::abort_world("flexmodel: " + why);
}

// The tensor-parallel dimension comes from the module's declaration; an
// expected_shape must agree with it. Where nothing is declared, an
// expected_shape whose size in one dimension is the local size × tp names it.
Route route_of(const HookRecord& record, const torch::Tensor& local, const dist::Mesh& mesh, bool split_rows,
               const dist::Sharding& declared) {
  Route route;
  route.gather_dp = mesh.shape().dp > 1 && split_rows && local.dim() > 0;
  if (declared.is_split() && mesh.shape().tp > 1) {
    const std::int64_t d = *declared.dim < 0 ? *declared.dim + local.dim() : *declared.dim;
    FLEXMODEL_CHECK(d >= 0 && d < local.dim(), ShapeError, hook_label(record), ": its module declares the tensor split "
                    "along dimension ", *declared.dim, " but it has ", local.dim(), "; fix the module's declaration");
    FLEXMODEL_CHECK(declared.blocks >= 1 && local.size(d) % declared.blocks == 0, ShapeError, hook_label(record),
                    ": its module declares dimension ", d, " as ", declared.blocks, " blocks but its local size is ",
                    local.size(d), "; fix the module's declaration");
    route.tp_dim = d;
    route.blocks = declared.blocks;
  }
  const ExpectedShape& expected = record.function.expected_shape();
  if (expected.empty()) return route;
  FLEXMODEL_CHECK(static_cast<std::int64_t>(expected.size()) == local.dim(), ShapeError, hook_label(record),
                  " expected shape ", expected_text(expected), " has ", expected.size(),
                  " dimensions, the local tensor ", local.sizes(), " has ", local.dim());
  std::vector<std::int64_t> differing;
  for (std::int64_t d = 0; d < local.dim(); ++d) {
    const auto& size = expected[static_cast<std::size_t>(d)];
    if (size && !(d == 0 && route.gather_dp) && *size != local.size(d)) differing.push_back(d);
  }
  if (route.tp_dim >= 0) {
    const auto& size = expected[static_cast<std::size_t>(route.tp_dim)];
    const bool agrees = (differing.empty() && !size) || (differing.size() == 1 && differing.front() == route.tp_dim);
    FLEXMODEL_CHECK(agrees, ShapeError, hook_label(record), " expected shape ", expected_text(expected),
                    " contradicts its module's declaration: dimension ", route.tp_dim, " is split over ",
                    mesh.shape().tp, " tensor-parallel ranks (full size ", local.size(route.tp_dim) * mesh.shape().tp,
                    ") and the others are local sizes ", local.sizes(), "; fix expected_shape or leave it out");
  }
  FLEXMODEL_CHECK(differing.size() <= 1, ShapeError, hook_label(record), " expected shape ", expected_text(expected),
                  " differs from the local tensor ", local.sizes(), " in ", differing.size(),
                  " dimensions; only one dimension can be sharded over tensor-parallel ranks");
  if (differing.size() == 1) {
    const std::int64_t d = differing.front();
    const std::int64_t want = *expected[static_cast<std::size_t>(d)];
    FLEXMODEL_CHECK(want == local.size(d) * mesh.shape().tp && mesh.shape().tp > 1, ShapeError, hook_label(record),
                    " expects ", want, " in dimension ", d, " but the local tensor has ", local.size(d),
                    " and tp is ", mesh.shape().tp, "; a sharded dimension must be local size × tp");
    route.tp_dim = d;
  }
  return route;
}

// Single process: check → capture → edit → check, in place.
void apply_hook_locally(ModelState& state, HookRecord& record, torch::Tensor& tensor, std::int64_t step,
                        bool in_forward) {
  check_expected_shape(record, tensor);
  if (record.function.capture()) capture(state, series_of(state, record), tensor, in_forward);
  if (record.function.editing_function()) tensor = run_editing_function(state, record, tensor, step);
}

// Under a mesh: gather (TP, then DP) to the stage leader, which checks,
// captures and edits; the edit is then scattered back so that every rank
// continues with its own shard. Only the stage leader runs editing functions.
void apply_hook_distributed(ModelState& state, HookRecord& record, torch::Tensor& tensor, std::size_t leaf,
                            std::int64_t step, bool in_forward) {
  const dist::Mesh& mesh = *state.mesh;
  // Shapes are alike on every rank of a stage, so a route error is raised on each.
  bool split_rows = false;
  const Route route = [&] {
    try {
      split_rows = mesh.shape().dp > 1 && record.type != HookType::tensor && dp_splits_rows(state, record, tensor);
      return route_of(record, tensor, mesh, split_rows, declared_sharding(record, leaf));
    } catch (const Error&) {
      g_error_raised_on_every_rank = true;
      throw;
    }
  }();
  const bool editing = static_cast<bool>(record.function.editing_function());
  if (mesh.shape().dp > 1 && !split_rows && record.type != HookType::tensor) {
    check_same_across(mesh.dp_group(), tensor,
                      concat(hook_label(record), ": its tensor ", tensor.sizes(),
                             " has no rows (its shape does not change with the batch) but differs across "
                             "data-parallel ranks, so it depends on the batch and no dp run can reproduce it; "
                             "run with dp 1"));
  }
  if (mesh.shape().tp > 1 && route.tp_dim < 0) {
    check_same_across(mesh.tp_group(), tensor,
                      concat(hook_label(record), ": its tensor ", tensor.sizes(),
                             " differs across tensor-parallel ranks, but its module declares no sharding for it; "
                             "give expected_shape with the full size of the split dimension, or declare the "
                             "sharding (flexmodel::dist::TensorParallelModule)"));
  }

  torch::Tensor stage = route.tp_dim >= 0 ? ranks_to_blocks(mesh.tp_group().gather(tensor, route.tp_dim, 0),
                                                            route.tp_dim, mesh.shape().tp, route.blocks)
                                          : tensor;
  torch::Tensor full = stage;
  if (mesh.tp_rank() == 0 && route.gather_dp) full = mesh.dp_group().gather(stage, 0, 0);

  std::string failure;
  torch::Tensor edited;
  if (mesh.stage_leader()) {
    try {
      check_expected_shape(record, full);
      if (record.function.capture()) capture(state, series_of(state, record), full, in_forward);
      if (editing) edited = run_editing_function(state, record, full, step);
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
    g_error_raised_on_every_rank = true;
    throw HookError(failure);
  }
  torch::Tensor local_stage = edited;
  if (mesh.tp_rank() == 0 && route.gather_dp) {
    local_stage = mesh.dp_group().scatter(edited, stage, 0, 0);
  } else if (mesh.tp_rank() == 0 && mesh.shape().dp > 1) {
    // Replicated over data-parallel ranks (a parameter's gradient): the leader's edit for all.
    local_stage = mesh.stage_leader() ? edited.contiguous() : torch::empty_like(stage);
    mesh.dp_group().broadcast(local_stage, 0);
  }
  if (route.tp_dim >= 0) {
    local_stage = ranks_to_blocks(local_stage, route.tp_dim, mesh.shape().tp, route.blocks, /*inverse=*/true);
    tensor = mesh.tp_group().scatter(local_stage, tensor, route.tp_dim, 0);
  } else if (mesh.shape().tp > 1) {
    torch::Tensor replica = mesh.tp_rank() == 0 ? local_stage.contiguous() : torch::empty_like(tensor);
    mesh.tp_group().broadcast(replica, 0);
    tensor = replica;
  } else {
    tensor = local_stage;
  }
}

// The pipeline for one hook on one tensor.
// `leaf` is the tensor's place among the module's inputs or outputs.
void apply_hook(ModelState& state, HookRecord& record, torch::Tensor& tensor, std::size_t leaf, std::int64_t step,
                bool in_forward) {
  record.fired = true;
  if (state.distributed()) {
    apply_hook_distributed(state, record, tensor, leaf, step, in_forward);
  } else {
    apply_hook_locally(state, record, tensor, step, in_forward);
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
void attach_gradient_hook(HookRecord& record, torch::Tensor& tensor, std::size_t leaf, std::int64_t step) {
  if (!torch::GradMode::is_enabled() || !tensor.requires_grad()) return;
  record.fired = true;
  tensor = tensor.view_as(tensor);
  tensor.register_hook([weak = record.weak_from_this(), leaf, step](const torch::Tensor& grad) -> torch::Tensor {
    auto alive = weak.lock();
    if (!alive || alive->state == nullptr || !grad.defined()) return grad;
    torch::Tensor edited = grad;
    apply_hook(*alive->state, *alive, edited, leaf, step, /*in_forward=*/false);
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
    for (std::uint32_t i = site.bounds[values]; i < site.bounds[values + 1]; ++i) {
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
                             capture(state, *hook.plain_capture_series, leaf, true);
                           });
    } else {
      for_each_chosen_leaf(hook, leaves, [&](torch::Tensor& leaf, std::size_t index) {
        apply_hook(state, *hook.record, leaf, index, state.step, /*in_forward=*/true);
      });
    }
  }
  for (std::uint32_t i = site.bounds[values + 1]; i < site.bounds[values + 2]; ++i) {
    const ActiveHook& hook = hooks[i];
    for_each_chosen_leaf(hook, leaves, [&](torch::Tensor& leaf, std::size_t index) {
      attach_gradient_hook(*hook.record, leaf, index, state.step);
    });
  }
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

}  // namespace detail

using detail::HookRecord;
using detail::ModelState;
using detail::Site;
using detail::ActiveHook;
using detail::ActiveSite;

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

SaveContext& FlexModelBase::save_ctx() { return state_->save_ctx; }
const std::shared_ptr<dist::Mesh>& FlexModelBase::mesh() const { return state_->mesh; }
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

  if (state.distributed() && state.mesh->shape().pp > 1) {
    // Every rank registers every hook; a name lives on one stage. Collective.
    const bool here = type == HookType::tensor ? find_named(adapter_->named_parameters(), name) != nullptr
                                               : adapter_->has_module(name);
    const auto everywhere = state.mesh->world().all_gather_ints(here ? 1 : 0);
    const bool anywhere = std::any_of(everywhere.begin(), everywhere.end(), [](std::int64_t v) { return v != 0; });
    FLEXMODEL_CHECK(anywhere, ConfigError, "no ", type == HookType::tensor ? "parameter" : "module", " named '",
                    name, "' on any pipeline stage; close names on this stage: ",
                    detail::close_names(name, type == HookType::tensor ? names_of(adapter_->named_parameters())
                                                                       : adapter_->module_names()));
    record->remote = !here;
  }
  if (record->remote) {
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
    std::weak_ptr<HookRecord> weak = record;
    record->parameter_hook_index = record->parameter.register_hook([weak](const torch::Tensor& grad) -> torch::Tensor {
      auto alive = weak.lock();
      if (!alive || alive->state == nullptr || !alive->state->is_active(*alive) || !grad.defined()) return grad;
      torch::Tensor edited = grad;
      detail::apply_hook(*alive->state, *alive, edited, 0, alive->state->step - 1, /*in_forward=*/false);
      return edited;
    });
  } else {
    const detail::HookPoint point = adapter_->hook_point(name);
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
  for (const auto& name : adapter_->module_names()) {
    if (!pattern.matches(name)) continue;
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
                  " matches no ", type == HookType::tensor ? "parameter" : "module", " of the model",
                  selection.skipped.empty()
                      ? std::string()
                      : detail::concat(" whose hooks can fire (it skipped ", selection.skipped.size(),
                                       ": containers or modules the forward never calls)"));
  std::vector<HookHandle> created;
  for (const auto& name : matches) {
    created.push_back(
        register_hook_function(HookFunction(name, expected_shape, editing_function, unpack_idx), type));
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
  if (mesh.pp_rank() == owner_stage) {
    const detail::Route route =
        detail::route_of(shape_check, *parameter, mesh, /*split_rows=*/false, adapter_->parameter_sharding(name));
    full = route.tp_dim >= 0 ? detail::ranks_to_blocks(mesh.tp_group().gather(parameter->detach(), route.tp_dim, 0),
                                                       route.tp_dim, mesh.shape().tp, route.blocks)
                             : parameter->detach();
    if (mesh.stage_leader()) detail::check_expected_shape(shape_check, full);
  }
  if (owner_leader != 0) {
    if (mesh.rank() == owner_leader) {
      mesh.world().send(torch::tensor(full.dim()), 0);
      mesh.world().send(torch::tensor(full.sizes().vec()), 0);
      mesh.world().send(torch::tensor(static_cast<std::int64_t>(full.scalar_type())), 0);
      mesh.world().send(full, 0);
    } else if (mesh.rank() == 0) {
      torch::Tensor dims_tensor = torch::empty({}, torch::kLong);
      mesh.world().recv(dims_tensor, owner_leader);
      const std::int64_t dims = dims_tensor.item<std::int64_t>();
      torch::Tensor sizes = torch::empty({dims}, torch::kLong), dtype = torch::empty({}, torch::kLong);
      mesh.world().recv(sizes, owner_leader);
      mesh.world().recv(dtype, owner_leader);
      full = torch::empty(c10::IntArrayRef(sizes.data_ptr<std::int64_t>(), static_cast<std::size_t>(dims)),
                          torch::TensorOptions().dtype(static_cast<c10::ScalarType>(dtype.item<std::int64_t>())));
      mesh.world().recv(full, owner_leader);
    }
  }
  return mesh.rank() == 0 ? detail::snapshot_copy(full) : torch::Tensor();
}

// ---- forward ------------------------------------------------------------

namespace {

ActiveHook active_hook(ModelState& state, HookRecord& record) {
  const HookFunction& function = record.function;
  const bool plain_capture = function.capture() && !function.editing_function() &&
                             function.expected_shape().empty() && !state.distributed();
  return ActiveHook{&record, plain_capture ? &detail::series_of(state, record) : nullptr, function.unpack_idx()};
}

ModelState::Selection compute_selection(ModelState& state, const Groups& groups) {
  ModelState::Selection selection;
  for (const HookRecord* record : state.records) {
    const bool chosen = std::any_of(groups.names.begin(), groups.names.end(),
                                    [&](const std::string& name) { return record->groups.count(name) != 0; });
    selection.hook_active.push_back(chosen != groups.complemented);
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
  dist::Communicator& world = mesh.world();
  if (mesh.pp_rank() > 0) {
    world.send(torch::tensor(static_cast<std::int64_t>(state.pending.size())), 0);
    for (auto& capture : state.pending) {
      torch::Tensor tensor = capture.copied.defined() ? capture.copied : detail::materialize(capture.pending);
      const auto& [name, type] = capture.series->key;
      std::vector<std::int64_t> header{static_cast<std::int64_t>(name.size()), static_cast<std::int64_t>(type),
                                       static_cast<std::int64_t>(tensor.scalar_type()), tensor.dim()};
      for (auto size : tensor.sizes()) header.push_back(size);
      world.send(torch::tensor(static_cast<std::int64_t>(header.size())), 0);
      world.send(torch::tensor(header), 0);
      world.send(torch::from_blob(const_cast<char*>(name.data()), {static_cast<std::int64_t>(name.size())},
                                  torch::kUInt8),
                 0);
      world.send(tensor, 0);
    }
    state.pending.clear();
    return;
  }
  auto receive_long = [&](int source) {
    torch::Tensor value = torch::empty({}, torch::kLong);
    world.recv(value, source);
    return value.item<std::int64_t>();
  };
  for (std::int64_t stage = 1; stage < mesh.shape().pp; ++stage) {
    const int source = static_cast<int>(stage * mesh.shape().tp * mesh.shape().dp);
    const std::int64_t count = receive_long(source);
    for (std::int64_t i = 0; i < count; ++i) {
      torch::Tensor header = torch::empty({receive_long(source)}, torch::kLong);
      world.recv(header, source);
      const auto* fields = header.data_ptr<std::int64_t>();
      std::string name(static_cast<std::size_t>(fields[0]), '\0');
      torch::Tensor name_bytes = torch::from_blob(name.data(), {fields[0]}, torch::kUInt8);
      world.recv(name_bytes, source);
      torch::Tensor tensor = torch::empty(c10::IntArrayRef(fields + 4, static_cast<std::size_t>(fields[3])),
                                          torch::TensorOptions().dtype(static_cast<c10::ScalarType>(fields[2])));
      world.recv(tensor, source);
      auto& series = state.outputs.series(name, static_cast<HookType>(fields[1]));
      state.pending.push_back(OutputMap::Capture{&series, {}, tensor});
    }
  }
}

}  // namespace

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
  apply_selection(state_, groups);
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
  if (!state_.sinks.empty() && (!state_.distributed() || state_.mesh->rank() == 0)) {
    for (auto& capture : state_.pending) {
      const torch::Tensor tensor = capture.copied.defined() ? capture.copied : detail::materialize(capture.pending);
      for (auto& sink : state_.sinks) sink->write(capture.series->key.first, capture.series->key.second, state_.step, tensor);
    }
    for (auto& sink : state_.sinks) sink->end_step(state_.step);
  }
  if (state_.keep_outputs) {
    state_.outputs.append_all(state_.pending);
  } else {
    state_.pending.clear();
  }
  if (state_.check_unfired) warn_unfired(state_);
  ++state_.step;
  committed_ = true;
}

void FlexModelBase::ForwardScope::failed(std::exception_ptr error) {
  // A hook error reaches every rank of its stage; with one stage that is the world.
  const bool everywhere = std::exchange(detail::g_error_raised_on_every_rank, false) && state_.mesh != nullptr &&
                          state_.mesh->shape().pp == 1;
  if (!state_.distributed() || everywhere) return;
  std::string message = "forward failed";
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& cause) {
    message = cause.what();
  } catch (...) {
  }
  dist::abort_world(message);
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
    if ((record->type == HookType::forward || record->type == HookType::forward_pre) && !record->calibrated &&
        state_.is_active(*record)) {
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

// ---- the native adapter -------------------------------------------------

namespace detail {
namespace {

class NativeAdapter final : public ModelAdapter {
 public:
  explicit NativeAdapter(std::shared_ptr<torch::nn::Module> root) : root_(std::move(root)) {
    FLEXMODEL_CHECK(root_ != nullptr, ConfigError, "FlexModel needs a model; got an empty module holder");
  }

  std::vector<std::string> module_names() const override {
    refresh();
    return modules_.keys();
  }

  HookPoint hook_point(const std::string& name) const override {
    auto module = find(name);
    FLEXMODEL_CHECK(module != nullptr, ConfigError, "no module named '", name, "' in the model; close names: ",
                    close_names(name, module_names()));
    std::string reason = unhookable_reason(name);
    FLEXMODEL_CHECK(reason.empty(), ConfigError, "module '", name, "' (", module->name(), ") ", reason);
    return HookPoint{module.get(), module.get()};
  }

  std::string unhookable_reason(const std::string& name) const override {
    auto module = find(name);
    if (module == nullptr || module == root_ || is_hookable(module.get())) return {};
    return "is not called through a hookable holder, so a hook on it could never fire; declare it as "
           "flexmodel::Hooked<torch::nn::X> (or flexmodel::nn::X), use FLEX_MODULE(Name) instead of "
           "TORCH_MODULE(Name), or hold it in flexmodel::nn::Sequential / flexmodel::nn::ModuleList";
  }

  NamedTensors named_parameters() const override { return to_vector(root_->named_parameters(true)); }
  NamedTensors named_buffers() const override { return to_vector(root_->named_buffers(true)); }
  const void* root_key() const override { return root_.get(); }
  std::string description() const override { return concat("model ", root_->name()); }

  dist::Sharding parameter_sharding(const std::string& name) const override {
    const auto dot = name.rfind('.');
    auto module = find(dot == std::string::npos ? std::string() : name.substr(0, dot));
    const auto* parallel = dynamic_cast<const dist::TensorParallelModule*>(module.get());
    return parallel != nullptr ? parallel->parameter_sharding(name.substr(dot == std::string::npos ? 0 : dot + 1))
                               : dist::Sharding::replicated();
  }

  std::string name_of(const void* key) const override {
    refresh();
    for (const auto& item : modules_) {
      if (item.value().get() == key) return item.key().empty() ? std::string(kRootName) : item.key();
    }
    return {};
  }

  bool has_tensor_parallel_layers() const override {
    refresh();
    return std::any_of(modules_.begin(), modules_.end(), [](const auto& item) {
      return dynamic_cast<const dist::TensorParallelModule*>(item.value().get()) != nullptr;
    });
  }

  bool is_pipeline_stage() const override {
    return dynamic_cast<const dist::PipelineStageModule*>(root_.get()) != nullptr;
  }

 private:
  // The tree is cached; a name it lacks refreshes it once, for trees changed after wrapping.
  std::shared_ptr<torch::nn::Module> find(const std::string& name) const {
    const auto* found = modules_.find(name);
    if (found == nullptr) {
      refresh();
      found = modules_.find(name);
    }
    return found != nullptr ? *found : nullptr;
  }

  void refresh() const { modules_ = root_->named_modules("", true); }

  static NamedTensors to_vector(const torch::OrderedDict<std::string, torch::Tensor>& dict) {
    NamedTensors out;
    for (const auto& item : dict) out.emplace_back(item.key(), item.value());
    return out;
  }

  std::shared_ptr<torch::nn::Module> root_;
  mutable torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>> modules_;
};

}  // namespace

std::shared_ptr<ModelAdapter> make_native_adapter(std::shared_ptr<torch::nn::Module> root) {
  return std::make_shared<NativeAdapter>(std::move(root));
}

}  // namespace detail
}  // namespace flexmodel
