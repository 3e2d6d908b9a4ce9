// Pieces of the library that know nothing of a particular model: errors,
// logging, patterns, the output map, and the registry of hookable modules.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <unordered_map>

#include <spdlog/sinks/stdout_color_sinks.h>

#include "flexmodel/error.h"
#include "flexmodel/hooked.h"
#include "flexmodel/logging.h"
#include "flexmodel/nn.h"
#include "flexmodel/output_map.h"
#include "flexmodel/pattern.h"
#include "core/snapshot.h"

namespace flexmodel {

// ---- errors -------------------------------------------------------------

namespace detail {
namespace {
std::atomic<int> g_message_rank{0};
}
int message_rank() noexcept { return g_message_rank.load(std::memory_order_relaxed); }
void set_message_rank(int rank) noexcept { g_message_rank.store(rank, std::memory_order_relaxed); }

std::string error_reason(const std::exception& error) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&error);
  std::string text = torch_error != nullptr ? torch_error->what_without_backtrace() : error.what();
  // The interpreter's message is a preamble, the TorchScript traceback, then
  // "RuntimeError: <the reason>" (or another Python exception's name).
  if (text.find("The following operation failed in the TorchScript interpreter") != std::string::npos) {
    static const std::regex kRaised(R"(^\s*[A-Za-z_.]*(Error|Exception): (.*)$)");
    std::istringstream lines(text);
    std::string reason;
    std::smatch match;
    for (std::string line; std::getline(lines, line);) {
      if (std::regex_match(line, match, kRaised)) reason = match[2];
    }
    if (!reason.empty()) return reason;
  }
  return text.substr(0, text.find('\n'));
}
}  // namespace detail

std::string_view to_string(HookType type) noexcept {
  switch (type) {
    case HookType::forward: return "forward";
    case HookType::forward_pre: return "forward_pre";
    case HookType::full_backward: return "full_backward";
    case HookType::full_backward_pre: return "full_backward_pre";
    case HookType::tensor: return "tensor";
  }
  return "unknown";
}

// ---- logging ------------------------------------------------------------

namespace {
std::mutex g_logger_mutex;
std::shared_ptr<spdlog::logger> g_logger;

std::shared_ptr<spdlog::logger> make_logger() {
  auto created = spdlog::get("flexmodel");
  if (!created) created = spdlog::stderr_color_mt("flexmodel");
  const char* level = std::getenv("FLEXMODEL_LOG_LEVEL");
  created->set_level(level != nullptr ? spdlog::level::from_str(level) : spdlog::level::warn);
  return created;
}
}  // namespace

std::shared_ptr<spdlog::logger> logger() {
  std::lock_guard lock(g_logger_mutex);
  if (!g_logger) g_logger = make_logger();
  return g_logger;
}

void set_logger(std::shared_ptr<spdlog::logger> replacement) {
  std::lock_guard lock(g_logger_mutex);
  g_logger = std::move(replacement);
}

// ---- patterns -----------------------------------------------------------

namespace {

// fnmatch-style `*` and `?` inside one dotted component.
bool component_matches(std::string_view pattern, std::string_view text) {
  std::size_t p = 0, t = 0, star = std::string_view::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == text[t])) {
      ++p;
      ++t;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = t;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::vector<std::string_view> split_dots(std::string_view text) {
  std::vector<std::string_view> parts;
  if (text.empty()) return parts;
  std::size_t start = 0;
  while (true) {
    std::size_t dot = text.find('.', start);
    parts.push_back(text.substr(start, dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return parts;
}

// Whether the dotted components of `pattern` match those of `name`, `**`
// matching any number of them. One pass per pattern component over which name
// prefixes it can end at: O(pattern × name), whatever the `**` (a recursion
// over where each `**` ends is exponential in their number).
bool glob_matches(const std::vector<std::string_view>& pattern, const std::vector<std::string_view>& name) {
  std::vector<char> ends(name.size() + 1, 0), next(name.size() + 1);
  ends[0] = 1;  // the empty prefix of the pattern matches the empty prefix of the name
  for (const auto& part : pattern) {
    std::fill(next.begin(), next.end(), 0);
    if (part == "**") {
      char reached = 0;
      for (std::size_t n = 0; n <= name.size(); ++n) next[n] = reached = reached || ends[n];
    } else {
      for (std::size_t n = 0; n < name.size(); ++n) next[n + 1] = ends[n] && component_matches(part, name[n]);
    }
    ends.swap(next);
  }
  return ends[name.size()] != 0;
}

}  // namespace

bool Pattern::matches(std::string_view name) const {
  // The name files and tools give the root module.
  if (text_ == kRootName) return name.empty();
  switch (kind_) {
    case Kind::exact: return name == text_;
    case Kind::substring: return name.find(text_) != std::string_view::npos;
    case Kind::glob: return glob_matches(split_dots(text_), split_dots(name));
  }
  return false;
}

bool Pattern::is_wildcard() const {
  switch (kind_) {
    case Kind::exact: return false;
    case Kind::substring: return true;
    case Kind::glob: return text_.find_first_of("*?") != std::string::npos;
  }
  return false;
}

std::string Pattern::describe() const {
  const char* kind = kind_ == Kind::glob ? "glob" : kind_ == Kind::substring ? "substring" : "name";
  return detail::concat(kind, " '", text_, "'");
}

// ---- snapshots and the output map ---------------------------------------

namespace detail {

SnapshotBlock::SnapshotBlock(std::size_t bytes)
    : data(static_cast<std::byte*>(std::aligned_alloc(kSnapshotAlignment, round_up(bytes)))),
      capacity(round_up(bytes)) {
  if (data == nullptr) throw std::bad_alloc();
}

SnapshotBlock::~SnapshotBlock() { std::free(data); }

std::size_t SnapshotBlock::round_up(std::size_t bytes) {
  return std::max<std::size_t>(kSnapshotAlignment,
                               (bytes + kSnapshotAlignment - 1) / kSnapshotAlignment * kSnapshotAlignment);
}

PendingSnapshot SnapshotArena::copy(const torch::Tensor& contiguous_cpu) {
  const std::size_t bytes = contiguous_cpu.nbytes();
  const std::size_t padded = SnapshotBlock::round_up(bytes);
  PendingSnapshot snapshot;
  if (padded > kBlockBytes / 4) {
    snapshot.block = std::make_shared<SnapshotBlock>(padded);
  } else {
    if (!current_ || current_->used + padded > current_->capacity) {
      current_ = std::make_shared<SnapshotBlock>(kBlockBytes);
    }
    snapshot.block = current_;
  }
  snapshot.offset = snapshot.block->used;
  snapshot.block->used += padded;
  if (bytes != 0) std::memcpy(snapshot.block->data + snapshot.offset, contiguous_cpu.data_ptr(), bytes);
  snapshot.sizes.assign(contiguous_cpu.sizes().begin(), contiguous_cpu.sizes().end());
  snapshot.dtype = contiguous_cpu.scalar_type();
  return snapshot;
}

torch::Tensor materialize(const PendingSnapshot& snapshot) {
  auto block = snapshot.block;
  return torch::from_blob(
      block->data + snapshot.offset, c10::IntArrayRef(snapshot.sizes.data(), snapshot.sizes.size()),
      [block](void*) {}, torch::TensorOptions().dtype(snapshot.dtype));
}

bool can_copy_into_arena(const torch::Tensor& tensor) {
  return tensor.device().is_cpu() && tensor.layout() == torch::kStrided && tensor.is_contiguous() &&
         !tensor.is_conj() && !tensor.is_neg();
}

torch::Tensor snapshot_copy(const torch::Tensor& tensor) {
  return tensor.detach().to(torch::kCPU, tensor.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

}  // namespace detail

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kBool: return "bool";
    case torch::kUInt8: return "uint8";
    case torch::kInt8: return "int8";
    case torch::kInt16: return "int16";
    case torch::kInt32: return "int32";
    case torch::kInt64: return "int64";
    case torch::kFloat16: return "float16";
    case torch::kBFloat16: return "bfloat16";
    case torch::kFloat32: return "float32";
    case torch::kFloat64: return "float64";
    case torch::kComplexFloat: return "complex64";
    case torch::kComplexDouble: return "complex128";
    default: return c10::toString(dtype);
  }
}

OutputMap::Series& OutputMap::series(const std::string& module_name, HookType type) {
  std::lock_guard lock(mutex_);
  Series& found = series_[Key(module_name, type)];
  found.key = Key(module_name, type);
  return found;
}

void OutputMap::append(Series& series, torch::Tensor snapshot, std::int64_t step) {
  std::lock_guard lock(mutex_);
  series.tensors.push_back(std::move(snapshot));
  series.steps.push_back(step);
}

void OutputMap::append_all(std::vector<Capture>& captures, std::int64_t step) {
  std::lock_guard lock(mutex_);
  for (auto& capture : captures) {
    Series& series = *capture.series;
    if (!capture.copied.defined()) series.pending.emplace_back(series.tensors.size(), std::move(capture.pending));
    series.tensors.push_back(std::move(capture.copied));
    series.steps.push_back(step);
  }
  captures.clear();
}

namespace {
// The root's captures are under "", which "(root)" names too.
OutputMap::Key output_key(const std::string& module_name, HookType type) {
  return OutputMap::Key(module_name == kRootName ? std::string() : module_name, type);
}
}  // namespace

const OutputMap::Series& OutputMap::find(const std::string& module_name, HookType type) const {
  auto found = series_.find(output_key(module_name, type));
  if (found == series_.end() || found->second.tensors.empty()) {
    std::string present;
    for (const auto& [key, series] : series_) {
      if (series.tensors.empty()) continue;
      present += detail::concat(present.empty() ? "" : ", ", "'", key.first, "' (", to_string(key.second), ")");
    }
    FLEXMODEL_FAIL(ConfigError, "no activations captured for module '", module_name, "' (",
                   to_string(type), "); captured: ", present.empty() ? "nothing yet" : present);
  }
  return found->second;
}

const std::vector<torch::Tensor>& OutputMap::at(const std::string& module_name, HookType type) const {
  std::lock_guard lock(mutex_);
  auto& series = const_cast<Series&>(find(module_name, type));
  for (auto& [index, snapshot] : series.pending) series.tensors[index] = detail::materialize(snapshot);
  series.pending.clear();
  return series.tensors;
}

std::vector<torch::Tensor> OutputMap::in_forward(const std::string& module_name, std::int64_t step,
                                                 HookType type) const {
  const std::vector<torch::Tensor>& tensors = at(module_name, type);
  std::lock_guard lock(mutex_);
  const Series& series = find(module_name, type);
  std::vector<torch::Tensor> picked;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (series.steps[i] == step) picked.push_back(tensors[i]);
  }
  if (picked.empty()) {
    std::string forwards;
    for (std::size_t i = 0; i < series.steps.size(); ++i) {
      if (i == 0 || series.steps[i] != series.steps[i - 1]) forwards += detail::concat(forwards.empty() ? "" : ", ", series.steps[i]);
    }
    FLEXMODEL_FAIL(ConfigError, "forward ", step, " captured nothing for module '", module_name, "' (",
                   to_string(type), "); forwards that did: ", forwards);
  }
  return picked;
}

bool OutputMap::contains(const std::string& module_name, HookType type) const {
  std::lock_guard lock(mutex_);
  auto found = series_.find(output_key(module_name, type));
  return found != series_.end() && !found->second.tensors.empty();
}

std::vector<OutputMap::Key> OutputMap::keys() const {
  std::lock_guard lock(mutex_);
  std::vector<Key> keys;
  for (const auto& [key, series] : series_) {
    if (!series.tensors.empty()) keys.push_back(key);
  }
  return keys;
}

std::size_t OutputMap::size() const { return keys().size(); }

void OutputMap::clear() {
  std::lock_guard lock(mutex_);
  // Entries stay so that hooks may keep pointing at them; only their contents go.
  for (auto& [key, series] : series_) {
    series.tensors.clear();
    series.steps.clear();
    series.pending.clear();
  }
}

// ---- the registry of hookable modules -----------------------------------

namespace detail {
namespace {
std::mutex g_hookable_mutex;
std::unordered_map<const torch::nn::Module*, std::weak_ptr<torch::nn::Module>> g_hookable;
std::size_t g_prune_at = 1024;
}  // namespace

void mark_hookable(const std::shared_ptr<torch::nn::Module>& module) {
  if (!module) return;
  std::lock_guard lock(g_hookable_mutex);
  g_hookable[module.get()] = module;
  if (g_hookable.size() >= g_prune_at) {
    std::erase_if(g_hookable, [](const auto& entry) { return entry.second.expired(); });
    g_prune_at = std::max<std::size_t>(1024, 2 * g_hookable.size());
  }
}

bool is_hookable(const torch::nn::Module* module) {
  std::lock_guard lock(g_hookable_mutex);
  auto found = g_hookable.find(module);
  if (found == g_hookable.end()) return false;
  auto alive = found->second.lock();
  return alive && alive.get() == module;
}

}  // namespace detail

// ---- hookable containers ------------------------------------------------

namespace nn {

torch::Tensor SequentialImpl::forward(torch::Tensor input) {
  for (auto& child : *this) {
    input = detail::dispatch(
        child.ptr().get(), [&child](torch::Tensor x) { return child.forward<torch::Tensor>(std::move(x)); },
        std::move(input));
  }
  return input;
}

void SequentialImpl::mark_children() {
  for (std::size_t i = 0; i < size(); ++i) detail::mark_hookable(ptr(i));
}

void ModuleListImpl::mark_children() {
  for (std::size_t i = 0; i < size(); ++i) detail::mark_hookable(ptr(i));
}

}  // namespace nn
}  // namespace flexmodel
