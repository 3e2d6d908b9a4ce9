// The distributed world and the TP×PP×DP mesh. Launched by mpirun (Open MPI),
// the world is MPI's; otherwise it is one process and nothing changes.
//
// Rank layout (flex_model's): with sizes (TP, PP, DP), global rank
//   r = (pp·DP + dp)·TP + tp,
// so tensor-parallel groups are contiguous ranks.
//
// Collective contract: every rank of a communicator calls each collective, in
// the same order, with tensors of the same shape and dtype. Each message
// carries what it is (the call, its root, dtype and shape, and the caller's
// MessageLabel): ranks whose next messages differ end every rank with an error
// naming both, and never mix one's bytes into another's.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

namespace flexmodel::dist {

// The process's place in the world. Initialises MPI on first use when the
// process was started by mpirun; never changes afterwards.
int world_rank();
int world_size();
bool launched_by_mpi();

// A group of ranks that talk to each other. CPU tensors travel over MPI as
// bytes, so every dtype (bf16 and fp16 included) moves the same way.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Shards are equal: every rank passes a tensor of the same shape and dtype,
  // so one collective moves the data, with no size exchange before it.

  // Concatenation along `dim` of every rank's shard, on `root` only (an
  // undefined tensor elsewhere).
  virtual torch::Tensor gather(const torch::Tensor& shard, std::int64_t dim, int root) = 0;
  // The inverse of gather: `full` on `root` is split along `dim` into equal
  // pieces, one per rank; `like` has the shape and dtype of a piece.
  virtual torch::Tensor scatter(const torch::Tensor& full, const torch::Tensor& like, std::int64_t dim,
                                int root) = 0;
  // Every rank's shard concatenated along `dim`, on every rank.
  virtual torch::Tensor all_gather(const torch::Tensor& shard, std::int64_t dim) = 0;
  virtual torch::Tensor all_reduce_sum(const torch::Tensor& tensor) = 0;
  // `tensor` from `root` into `tensor` on every rank (same shape everywhere).
  virtual void broadcast(torch::Tensor& tensor, int root) = 0;
  // Every rank's integer, on every rank.
  virtual std::vector<std::int64_t> all_gather_ints(std::int64_t value) = 0;
  // A string from `root` to every rank.
  virtual std::string broadcast_string(const std::string& text, int root) = 0;
  virtual void send(const torch::Tensor& tensor, int destination) = 0;
  // Receives into `tensor`, whose shape and dtype the sender's match.
  virtual void recv(torch::Tensor& tensor, int source) = 0;
  virtual void barrier() = 0;
};

// Names what the collectives this thread starts are for while it lives (the
// innermost label counts): "hook on 'layers.0.mlp' (forward), step 3" turns a
// disagreement into one between two named hooks rather than two shapes.
class MessageLabel {
 public:
  explicit MessageLabel(std::string what);
  ~MessageLabel();
  MessageLabel(const MessageLabel&) = delete;
  MessageLabel& operator=(const MessageLabel&) = delete;

 private:
  std::string previous_;
};

// Sizes of a mesh; every size ≥ 1.
struct MeshShape {
  std::int64_t tp = 1;
  std::int64_t pp = 1;
  std::int64_t dp = 1;
  std::int64_t size() const { return tp * pp * dp; }
};

// A rank's coordinates in the mesh and its communicators.
class Mesh {
 public:
  // Builds the mesh on every rank; a world whose size is not tp·pp·dp is a
  // DistributedError on every rank, raised before any collective.
  static std::shared_ptr<Mesh> create(MeshShape shape);

  const MeshShape& shape() const { return shape_; }
  int rank() const { return rank_; }
  std::int64_t tp_rank() const { return tp_rank_; }
  std::int64_t pp_rank() const { return pp_rank_; }
  std::int64_t dp_rank() const { return dp_rank_; }
  bool distributed() const { return shape_.size() > 1; }
  // tp 0 and dp 0 of its pipeline stage: where a stage's hooks see full tensors.
  bool stage_leader() const { return tp_rank_ == 0 && dp_rank_ == 0; }

  Communicator& world() const { return *world_; }
  Communicator& tp_group() const { return *tp_; }
  Communicator& pp_group() const { return *pp_; }
  Communicator& dp_group() const { return *dp_; }

 private:
  Mesh() = default;

  MeshShape shape_;
  int rank_ = 0;
  std::int64_t tp_rank_ = 0, pp_rank_ = 0, dp_rank_ = 0;
  std::shared_ptr<Communicator> world_, tp_, pp_, dp_;
};

// How one tensor of a tensor-parallel module is laid out over the TP group:
// replicated (every rank holds all of it), or split into equal shards along
// `dim` (negative counts from the end) in rank order. With `blocks` > 1 the
// dimension holds that many stacked blocks (a fused q|k|v), each split over
// the ranks, so rank r holds block 0's r-th piece, then block 1's, ...
struct Sharding {
  std::optional<std::int64_t> dim;
  std::int64_t blocks = 1;

  static Sharding replicated() { return {}; }
  static Sharding split(std::int64_t dimension, std::int64_t block_count = 1) { return {dimension, block_count}; }
  bool is_split() const { return dim.has_value(); }
};

// A native module whose parameters or activations are sharded over the
// tensor-parallel group, and how: hooks on it gather what it declares split,
// so an editing function sees the full tensor without an expected_shape, and
// scatter an edit back. `leaf` counts the tensors of its inputs (forward-pre
// and full-backward hooks) or outputs (forward and full-backward-pre hooks)
// depth first; `name` is a parameter's name within the module ("weight").
// A hooked tensor that a module does not declare split must be the same on
// every TP rank, or the hook is an error naming it. The flexmodel::parallel
// layers declare theirs; a user's own tensor-parallel module does the same.
class TensorParallelModule {
 public:
  virtual ~TensorParallelModule() = default;
  virtual Sharding input_sharding(std::size_t leaf) const {
    (void)leaf;
    return Sharding::replicated();
  }
  virtual Sharding output_sharding(std::size_t leaf) const {
    (void)leaf;
    return Sharding::replicated();
  }
  virtual Sharding parameter_sharding(const std::string& name) const {
    (void)name;
    return Sharding::replicated();
  }
};

// Marks a native model that is one pipeline stage of a larger model: its
// module names are the full model's, and only its stage's modules exist.
class PipelineStageModule {
 public:
  virtual ~PipelineStageModule() = default;
};

// Ends every rank after `message` (logged on this rank): for failures that
// would otherwise leave the other ranks waiting in a collective.
[[noreturn]] void abort_world(const std::string& message);

}  // namespace flexmodel::dist
