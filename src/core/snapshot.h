// Snapshots copied during a forward go into shared blocks with one memcpy;
// a tensor is made over the bytes only when the output map is read.
#pragma once

#include <cstddef>
#include <memory>

#include <torch/types.h>

#include "flexmodel/output_map.h"

namespace flexmodel::detail {

inline constexpr std::size_t kSnapshotAlignment = 64;

struct SnapshotBlock {
  explicit SnapshotBlock(std::size_t bytes);
  SnapshotBlock(const SnapshotBlock&) = delete;
  SnapshotBlock& operator=(const SnapshotBlock&) = delete;
  ~SnapshotBlock();

  static std::size_t round_up(std::size_t bytes);

  std::byte* data;
  std::size_t capacity;
  std::size_t used = 0;
};

class SnapshotArena {
 public:
  // Small snapshots share blocks of this size; larger ones get their own.
  static constexpr std::size_t kBlockBytes = std::size_t{1} << 20;

  PendingSnapshot copy(const torch::Tensor& contiguous_cpu);

 private:
  std::shared_ptr<SnapshotBlock> current_;
};

torch::Tensor materialize(const PendingSnapshot& snapshot);
bool can_copy_into_arena(const torch::Tensor& tensor);
// A detached copy on the CPU, for tensors the arena does not take.
torch::Tensor snapshot_copy(const torch::Tensor& tensor);

}  // namespace flexmodel::detail
