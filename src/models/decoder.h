// Pieces the Hugging Face families share: causal attention over split heads
// and a whole-model container of one stage's layers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "flexmodel/dist.h"
#include "flexmodel/error.h"
#include "flexmodel/parallel.h"

namespace flexmodel::models::detail {

// Softmax over scaled scores [B, H, T, T'] under the causal mask, as Hugging
// Face's eager attention has it: the softmax in float32 and cast back when
// `float32_softmax` (LLaMA's), else in the scores' dtype (GPT-2's). With
// `window` > 0 query i sees keys i - window < j ≤ i only (Mistral's sliding
// window).
torch::Tensor causal_probabilities(const torch::Tensor& scores, bool float32_softmax, std::int64_t window = 0);

// [B, H, T, hd] → [B, T, H · hd].
torch::Tensor merge_heads(const torch::Tensor& z);

// This rank's pipeline stage and tensor-parallel size; one process is stage 0 of 1, tp 1.
struct Placement {
  std::int64_t stage = 0, stages = 1, tp = 1;
  bool first() const { return stage == 0; }
  bool last() const { return stage == stages - 1; }
};
Placement placement(const dist::Mesh* mesh);

// `count` of `what` (heads, say) split over tp, or a ConfigError naming the fix.
std::int64_t per_rank(std::int64_t count, std::int64_t tp, const std::string& what);

// The type name of the module holding a stage's layers under their global
// indices (Hugging Face's ModuleList; a stage's indices need not start at 0).
inline constexpr const char* kLayerContainer = "ModuleList";

// The layers this stage holds, registered under `name` in `parent` as a
// container whose children keep their whole-model numbers ("h.5").

template <class Layer, class Make>
std::vector<Layer> stage_layers(torch::nn::Module& parent, const std::string& name, std::int64_t layers,
                                const Placement& where, Make&& make) {
  FLEXMODEL_CHECK(layers >= where.stages, ConfigError, layers, " layers do not fill pp ", where.stages,
                  " stages; choose pp at most the layer count");
  auto container = parent.register_module(name, std::make_shared<torch::nn::Module>(kLayerContainer));
  const auto share = parallel::stage_layers(layers, where.stages, where.stage);
  std::vector<Layer> held;
  for (std::int64_t index = share.first; index < share.first + share.count; ++index) {
    held.push_back(container->register_module(std::to_string(index), make()));
  }
  return held;
}

}  // namespace flexmodel::models::detail
