// Activation patching: which hook points, at which positions (or heads), carry
// what makes a clean prompt's answer differ from a corrupt one's.
// TransformerLens's get_act_patch_* family and attribution patching.
//
//   auto table = flexmodel::activation_patching(fm, "layers.*", clean, corrupt,
//                                               flexmodel::logit_difference(correct_id, wrong_id));
//   table.effect[3][5];  // the metric of the corrupt run with layers.3's output at position 5 from the clean run
//   auto fast = flexmodel::attribution_patching(fm, "layers.*", clean, corrupt, metric);  // the same table, estimated
//
// Clean and corrupt inputs must give each hook point tensors of one shape
// (prompts of one length). Only the sweep's own hooks run: the model's stay
// registered and do not; the model's parameter gradients are never touched.
// Under a mesh both are collective (every rank calls them with its inputs)
// and every rank gets the same table: the clean activations go from rank 0
// to every rank, each stage patches its own hook points, the metric runs on
// rank 0, which holds the whole logits. attribution_patching needs a
// backward through the model: one process or dp alone (the tensor-parallel
// layers and pipeline stages carry no gradient).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "flexmodel/flex_model.h"
#include "flexmodel/torchscript.h"

namespace flexmodel {

// What a run is judged by: a 0-dim tensor of the logits (differentiable, for attribution patching).
using Metric = std::function<torch::Tensor(const torch::Tensor& logits)>;

// The mean over rows of logits[row, position, correct] − logits[row, position, wrong]
// of [B, T, vocab] logits; `correct` and `wrong` hold one id, or one per row.
Metric logit_difference(torch::Tensor correct, torch::Tensor wrong, std::int64_t position = -1);
Metric logit_difference(std::int64_t correct, std::int64_t wrong, std::int64_t position = -1);

struct PatchingOptions {
  // The hook points' outputs (forward) or inputs (forward_pre).
  TORCH_ARG(HookType, hook_type) = HookType::forward;
  // Set: patch each head of the last dim viewed as [heads, d_head] instead of each position (dim 1).
  TORCH_ARG(std::optional<std::int64_t>, heads) = std::nullopt;
};

struct PatchingResult {
  std::vector<std::string> points;  // in forward order
  torch::Tensor effect;             // float64 [points, positions or heads]: the metric of each patched run
  double clean_metric = 0;          // the metric of the clean run
  double corrupt_metric = 0;        // and of the corrupt run, unpatched

  // (effect − corrupt) / (clean − corrupt): 0 where a patch changes nothing, 1 where it restores the clean metric.
  torch::Tensor normalized() const;
};

namespace detail {

using LogitsRun = std::function<torch::Tensor(const Groups&)>;

inline torch::Tensor logits_of(const torch::Tensor& output) { return output; }
inline torch::Tensor logits_of(const torch::IValue& output) { return first_tensor(output); }

PatchingResult activation_patching(FlexModelBase& model, const Pattern& points, const LogitsRun& clean,
                                   const LogitsRun& corrupt, const std::optional<Metric>& metric,
                                   const PatchingOptions& options);
PatchingResult attribution_patching(FlexModelBase& model, const Pattern& points, const LogitsRun& clean,
                                    const LogitsRun& corrupt, const std::optional<Metric>& metric,
                                    const PatchingOptions& options);

// A forward of `model` on `input` (a tensor for a native model, a vector of IValues for TorchScript).
template <class Model, class Input>
LogitsRun logits_run(Model& model, const Input& input) {
  return [&model, &input](const Groups& groups) { return logits_of(model.forward(groups, input)); };
}

}  // namespace detail

// For every hook point `points` selects and every position (or head), the
// metric of the corrupt run with that slice of the activation taken from the
// clean run: one forward per entry. Without a metric: the logit difference,
// at the last position, between the clean run's top token and the corrupt
// run's (per row).
template <class Model, class Input>
PatchingResult activation_patching(Model& model, const Pattern& points, const Input& clean, const Input& corrupt,
                                   std::optional<Metric> metric = std::nullopt, PatchingOptions options = {}) {
  return detail::activation_patching(model, points, detail::logits_run(model, clean), detail::logits_run(model, corrupt),
                                     metric, options);
}

// The same table estimated to first order from one clean forward and one
// corrupt forward and backward: metric(corrupt) + Σ ∂metric/∂activation ·
// (clean − corrupt) over the entry's slice (Nanda's attribution patching).
// The gradients come from gradient hooks, with every parameter requiring
// grad for the run; a hook point that differs between the runs but gets no
// gradient (it depends on no parameter) is a HookError naming it.
template <class Model, class Input>
PatchingResult attribution_patching(Model& model, const Pattern& points, const Input& clean, const Input& corrupt,
                                    std::optional<Metric> metric = std::nullopt, PatchingOptions options = {}) {
  return detail::attribution_patching(model, points, detail::logits_run(model, clean),
                                      detail::logits_run(model, corrupt), metric, options);
}

}  // namespace flexmodel
