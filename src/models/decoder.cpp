#include "models/decoder.h"

#include "flexmodel/models/causal_lm.h"

#include <limits>

namespace flexmodel::models::detail {

torch::Tensor causal_probabilities(const torch::Tensor& scores, bool float32_softmax, std::int64_t window) {
  const auto time = scores.size(2), keys = scores.size(3);
  const auto options = torch::TensorOptions().dtype(torch::kLong).device(scores.device());
  // Query i sits at position keys - time + i.
  const auto distance = (torch::arange(time, options).unsqueeze(1) + (keys - time)) - torch::arange(keys, options);
  auto hidden = distance < 0;
  if (window > 0) hidden = hidden | (distance >= window);
  const auto masked = scores.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  if (!float32_softmax) return torch::softmax(masked, -1);
  return torch::softmax(masked, -1, torch::kFloat).to(scores.scalar_type());
}

torch::Tensor merge_heads(const torch::Tensor& z) {
  return z.transpose(1, 2).reshape({z.size(0), z.size(2), z.size(1) * z.size(3)});
}

Placement placement(const dist::Mesh* mesh) {
  if (mesh == nullptr) return {};
  return {mesh->pp_rank(), mesh->shape().pp, mesh->shape().tp};
}

std::int64_t per_rank(std::int64_t count, std::int64_t tp, const std::string& what) {
  FLEXMODEL_CHECK(count % tp == 0, ConfigError, what, " (", count, ") does not split over tp ", tp,
                  "; choose a tp that divides it");
  return count / tp;
}

}  // namespace flexmodel::models::detail

namespace flexmodel::models {

std::vector<std::string> CausalLMImpl::hook_points() const {
  std::vector<std::string> names;
  for (const auto& item : whole_model()->named_modules()) {
    // The layers' container is never called, here as in Hugging Face's
    // models (a ModuleList there): no hook on it could fire.
    if (item.value()->name() == detail::kLayerContainer) continue;
    names.push_back(item.key());
  }
  return names;
}

torch::Tensor CausalLMImpl::forward_stages(const torch::Tensor& tokens, std::int64_t width,
                                           const std::function<torch::Tensor()>& whole,
                                           const parallel::StageSteps& steps) {
  FLEXMODEL_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong, ShapeError, name(),
                  " expects int64 token ids [batch, time], got ", tokens.scalar_type(), " ", tokens.sizes());
  if (detail::placement(mesh_.get()).stages == 1) return whole();
  const auto dtype = parameters().front().scalar_type();
  return parallel::run_pipeline_stage(mesh_.get(), tokens, width, vocab_size(), tokens.options().dtype(dtype), steps);
}

std::vector<std::string> CausalLMImpl::checkpoint_names() const {
  std::vector<std::string> names;
  for (const auto& item : whole_model()->named_parameters()) {
    if (tied_to(item.key()).empty()) names.push_back(item.key());
  }
  return names;
}

}  // namespace flexmodel::models
