// The one format in which captures travel to rank 0 (a pipeline stage's
// forward and backward captures, a parameter gathered on its stage) and from
// it (what rank 0 alone decided): a count,
// then per capture a header [name length, hook type, step, dtype, dims,
// sizes...], the name's bytes and the tensor's bytes.
#pragma once

#include <cstdint>
#include <functional>
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

// Collective over the world: every rank gets rank 0's `captures` (what the
// others held is replaced).
void share_from_rank0(const dist::Mesh& mesh, std::vector<WireCapture>& captures);

// Runs `decide` on rank 0 alone (in one process, or without a mesh, here) and
// gives every rank CPU copies of the defined tensors it returns; an error it
// raises is raised on every rank, so that none waits for the others. For
// what only rank 0 holds: a metric of the logits, the next tokens.
std::vector<torch::Tensor> decided_on_rank0(const dist::Mesh* mesh,
                                            const std::function<std::vector<torch::Tensor>()>& decide);
// The same for named tensors.
std::vector<WireCapture> captures_decided_on_rank0(const dist::Mesh* mesh,
                                                   const std::function<std::vector<WireCapture>()>& decide);

}  // namespace flexmodel::detail
