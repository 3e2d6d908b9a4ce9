// The in-memory sink: one detached CPU snapshot per forward for every
// (module name, hook type) that captured. Snapshots are copies, so a later
// in-place edit of the activation never changes them.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <c10/util/SmallVector.h>
#include <torch/types.h>

#include "flexmodel/hook_function.h"

namespace flexmodel {

namespace detail {
struct SnapshotBlock;

// Bytes copied into a shared block during a forward; turned into a tensor on first read.
struct PendingSnapshot {
  std::shared_ptr<SnapshotBlock> block;
  std::size_t offset = 0;
  c10::SmallVector<std::int64_t, 5> sizes;
  c10::ScalarType dtype = c10::ScalarType::Float;
};
}  // namespace detail

// numpy's name of a dtype ("float32", "int64", "bool"; "bfloat16" for bfloat16).
std::string dtype_name(c10::ScalarType dtype);

class OutputMap {
 public:
  using Key = std::pair<std::string, HookType>;

  // Snapshots of (module_name, type), in capture order: one per call, so a
  // module called twice in a forward has two there. Throws naming the key
  // and the keys present when nothing was captured there. The map keeps
  // every forward's until clear() (between experiments), or keeps none with
  // FlexModelOptions().outputs(false); run_with_cache holds one run apart.
  const std::vector<torch::Tensor>& at(const std::string& module_name,
                                       HookType type = HookType::forward) const;
  // The snapshots of forward `step` only (0 for the first forward; gradients
  // belong to the forward whose backward made them); a ConfigError naming the
  // forwards that captured there when `step` did not.
  std::vector<torch::Tensor> in_forward(const std::string& module_name, std::int64_t step,
                                        HookType type = HookType::forward) const;
  bool contains(const std::string& module_name, HookType type = HookType::forward) const;
  std::vector<Key> keys() const;
  std::size_t size() const;
  bool empty() const { return size() == 0; }
  void clear();

  // Used by the library while hooks run.
  struct Series {
    Key key;
    std::vector<torch::Tensor> tensors;  // undefined where a snapshot is still pending
    std::vector<std::int64_t> steps;     // the forward of each tensor
    std::vector<std::pair<std::size_t, detail::PendingSnapshot>> pending;
  };
  Series& series(const std::string& module_name, HookType type);
  void append(Series& series, torch::Tensor snapshot, std::int64_t step);
  // A snapshot into `series`: bytes still pending, or a tensor already copied.
  struct Capture {
    Series* series;
    detail::PendingSnapshot pending;
    torch::Tensor copied;
  };
  // Appends forward `step`'s captures under one lock, then empties `captures`.
  void append_all(std::vector<Capture>& captures, std::int64_t step);

 private:
  const Series& find(const std::string& module_name, HookType type) const;

  mutable std::mutex mutex_;
  mutable std::map<Key, Series> series_;
};

}  // namespace flexmodel
