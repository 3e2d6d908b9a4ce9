// How a hook's tensor is spread over the mesh (declared sharding, an
// expected_shape, data-parallel rows) and the checks that keep ranks agreeing.
#include "dist/routing.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <tuple>
#include <utility>

#include "flexmodel/error.h"

namespace flexmodel::detail {

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
                              std::int64_t blocks, bool inverse) {
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

namespace {

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

}  // namespace

// Tensors without rows over dp and tensors their module does not declare
// split over tp are taken as replicated; this proves it.
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

namespace {

template <class ErrorType>
[[noreturn]] void raise_on_every_rank(const std::string& message) {
  ErrorType error(message);
  error.mark_raised_on_every_rank();
  throw error;
}

}  // namespace

void agree_on_failure(dist::Communicator& group, std::exception_ptr failure) {
  // The error's class travels as a code, so that every rank throws the same one.
  std::int64_t code = 0;
  std::string message;
  if (failure != nullptr) {
    try {
      std::rethrow_exception(failure);
    } catch (const ShapeError& error) {
      std::tie(code, message) = std::pair{2, error.what()};
    } catch (const HookError& error) {
      std::tie(code, message) = std::pair{3, error.what()};
    } catch (const DistributedError& error) {
      std::tie(code, message) = std::pair{4, error.what()};
    } catch (const IOError& error) {
      std::tie(code, message) = std::pair{5, error.what()};
    } catch (const std::exception& error) {
      std::tie(code, message) = std::pair{1, error.what()};
    } catch (...) {
      std::tie(code, message) = std::pair{1, "an unknown error"};
    }
  }
  const auto codes = group.all_gather_ints(code);
  const auto first = std::find_if(codes.begin(), codes.end(), [](std::int64_t c) { return c != 0; });
  if (first == codes.end()) return;
  message = group.broadcast_string(message, static_cast<int>(first - codes.begin()));
  switch (*first) {
    case 2: raise_on_every_rank<ShapeError>(message);
    case 3: raise_on_every_rank<HookError>(message);
    case 4: raise_on_every_rank<DistributedError>(message);
    case 5: raise_on_every_rank<IOError>(message);
    default: raise_on_every_rank<ConfigError>(message);
  }
}

}  // namespace flexmodel::detail
