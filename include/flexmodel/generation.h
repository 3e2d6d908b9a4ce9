// Generation with hooks: a causal LM's loop, greedy or sampled with a seed.
// Every step is one forward with the chosen groups' hooks, so captures and
// sink steps come one per generated token, and HookContext tells an editing
// function the step and the positions the step covers.
//
//   torch::Tensor ids = flexmodel::generate(fm, flexmodel::Groups{"steer"}, prompt,
//                                           flexmodel::GenerationOptions().max_new_tokens(20));
//
// models::GPT runs with its key/value cache (step 0 the prompt, then one
// position per step); a TorchScript model that maps [B, T] ids to [B, T,
// vocab] logits (first_tensor of its output), and any other native model
// that does (parallel::ParallelGPT), runs the whole sequence each step.
// Under a mesh it is collective: every rank calls it with the same prompt,
// each step's forward runs on the mesh (models::GPT's whole sequence too),
// rank 0 chooses the next tokens from its whole logits and every rank gets
// them, so every rank returns the same ids.
#pragma once

#include <cstdint>
#include <functional>

#include <torch/arg.h>
#include <torch/types.h>

#include "flexmodel/flex_model.h"
#include "flexmodel/models/gpt.h"
#include "flexmodel/torchscript.h"

namespace flexmodel {

struct GenerationOptions {
  TORCH_ARG(std::int64_t, max_new_tokens) = 16;
  // false: sample from softmax(logits / temperature), among the top_k tokens when top_k > 0.
  TORCH_ARG(bool, greedy) = true;
  TORCH_ARG(double, temperature) = 1.0;
  TORCH_ARG(std::int64_t, top_k) = 0;
  // The sampler's own generator: the same seed, the same tokens.
  TORCH_ARG(std::uint64_t, seed) = 0;
  // Called before each step's forward with the step and the ids so far
  // (flex-dump writes them beside the step's activations).
  TORCH_ARG(std::function<void(std::int64_t step, const torch::Tensor& ids)>, before_step) = nullptr;
};

// The prompt (int64 [B, T]) followed by max_new_tokens generated ids: [B, T + max_new_tokens].
torch::Tensor generate(FlexModel<models::GPTImpl>& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options = {});
torch::Tensor generate(ScriptFlexModel& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options = {});

namespace detail {
// The loop of a model whose forward `logits_of` maps [B, T] ids to [B, T, vocab] logits.
torch::Tensor generate_whole_sequences(const FlexModelBase& model, const torch::Tensor& prompt,
                                       const GenerationOptions& options,
                                       const std::function<torch::Tensor(const torch::Tensor&)>& logits_of);
}  // namespace detail

template <class ModuleImpl>
torch::Tensor generate(FlexModel<ModuleImpl>& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options = {}) {
  return detail::generate_whole_sequences(model, prompt, options,
                                          [&](const torch::Tensor& ids) { return model.forward(groups, ids); });
}

}  // namespace flexmodel
