// The one format in which captures travel to rank 0 (a pipeline stage's
// forward and backward captures, a parameter gathered on its stage): a count,
// then per capture a header [name length, hook type, step, dtype, dims,
// sizes...], the name's bytes and the tensor's bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

#include "flexmodel/dist.h"
#include "flexmodel/hook_function.h"

namespace flexmodel::detail {

struct WireCapture {
  std::string name;
  HookType type = HookType::forward;
  std::int64_t step = 0;
  torch::Tensor tensor;  // CPU, defined
};

void send_captures(dist::Communicator& group, const std::vector<WireCapture>& captures, int destination);
std::vector<WireCapture> receive_captures(dist::Communicator& group, int source);

// Called by every stage leader of a pipeline: each hands `captures` to rank 0,
// which gets back its own followed by every other stage's, in stage order;
// the other leaders get nothing back.
std::vector<WireCapture> collect_at_rank0(const dist::Mesh& mesh, std::vector<WireCapture> captures);

}  // namespace flexmodel::detail
