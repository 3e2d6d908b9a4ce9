// How a hook's tensor is spread over the mesh, and the checks that make ranks
// agree or end together: the distributed half of the hook pipeline.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include <torch/types.h>

#include "flexmodel/dist.h"
#include "core/state.h"

namespace flexmodel::detail {

// The tensor-parallel dimension (declared by the module or named by an
// expected_shape) and what data parallelism does with the tensor.
struct Route {
  std::int64_t tp_dim = -1;
  std::int64_t blocks = 1;  // the declared blocks of a fused dimension
  bool gather_dp = false;   // rows split over dp ranks: gathered to dp rank 0
  bool sum_dp = false;      // a gradient each dp rank holds a partial of: summed
};

// What the hooked module declares about the hook's tensor (leaf `leaf` of its
// inputs or outputs, or the hooked parameter).
dist::Sharding declared_sharding(const HookRecord& record, std::size_t leaf);

// The route of `local` for `record`; ShapeError naming the hook when the
// declaration, the expected_shape and the tensor disagree.
Route route_of(const HookRecord& record, const torch::Tensor& local, const dist::Mesh& mesh, bool split_rows,
               const dist::Sharding& declared);

// A fused dimension gathered rank by rank holds, per rank, its piece of every
// block; the model's order is block by block (inverse: back to rank order).
torch::Tensor ranks_to_blocks(const torch::Tensor& gathered, std::int64_t dim, std::int64_t ranks,
                              std::int64_t blocks, bool inverse = false);

// Whether `real` has rows split over dp ranks, read off its shape in the
// calibration forward (one more row per rank); ShapeError naming `what` when
// it changes with the batch but not as rows.
bool rows_split(std::size_t rows, const std::vector<std::int64_t>& calibration, const torch::Tensor& real,
                const std::string& what);
// The same for the current firing of a module hook in the running forward.
bool dp_splits_rows(ModelState& state, HookRecord& record, const torch::Tensor& local);

// A tensor taken as the same on every rank of `group` is captured once; if the
// ranks' copies differ, every rank ends with `why`.
void check_same_across(dist::Communicator& group, const torch::Tensor& tensor, const std::string& why);

// Collective over `group`: when any rank has a `failure` (null: none), every
// rank throws the first failing rank's error, of its class (a ConfigError for
// one that is not a flexmodel error), marked as raised on every rank;
// otherwise returns on every rank.
void agree_on_failure(dist::Communicator& group, std::exception_ptr failure);

}  // namespace flexmodel::detail
