// Where captured activations go besides (or instead of) the output map.
// A FlexModel hands every sink each forward's snapshots when the forward has
// succeeded, then ends the step; a sink may write them in the background. A
// step is all or nothing: when handing it over fails (a sink throws), every
// sink is told to forget it.
#pragma once

#include <cstdint>
#include <string>

#include <torch/types.h>

#include "flexmodel/hook_function.h"

namespace flexmodel {

class Sink {
 public:
  virtual ~Sink() = default;

  // One snapshot (detached, on the CPU, never written to by anyone else, the
  // output map included; every sink gets the same one, so none may write to
  // it) of `module_name`'s `type` hook in forward `step`.
  virtual void write(const std::string& module_name, HookType type, std::int64_t step,
                     const torch::Tensor& snapshot) = 0;
  // Forward `step` is complete: everything written for it may be made durable.
  virtual void end_step(std::int64_t step) { (void)step; }
  // Makes everything durable and releases the sink's resources; rethrows an
  // error a background write met. Further writes are errors.
  virtual void close() {}
  // Forward `step` failed after some of its snapshots were written: nothing of
  // it may reach the sink's output, and the next write begins another step.
  virtual void abort_step(std::int64_t step) noexcept { (void)step; }
};

}  // namespace flexmodel
