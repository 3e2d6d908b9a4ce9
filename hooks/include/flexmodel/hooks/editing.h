// Ready-made editing functions for the common interventions: ablation,
// scaling, steering, activation patching and probes. Each returns an
// EditingFunction for HookFunction::editing_function or create_hook_group.
#pragma once

#include <string>
#include <utility>

#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include "flexmodel/error.h"
#include "flexmodel/hook_function.h"

namespace flexmodel::hooks {

// Replaces the activation with zeros.
inline EditingFunction zero_ablation() {
  return [](const torch::Tensor& x, HookContext&) { return torch::zeros_like(x); };
}

// Replaces every slice along `dim` with the mean over `dim` (the batch by default).
inline EditingFunction mean_ablation(std::int64_t dim = 0) {
  return [dim](const torch::Tensor& x, HookContext&) { return x.mean(dim, /*keepdim=*/true).expand_as(x).clone(); };
}

inline EditingFunction scale(double factor) {
  return [factor](const torch::Tensor& x, HookContext&) { return x * factor; };
}

// Adds coefficient·direction, broadcast over the leading dimensions (activation steering).
inline EditingFunction add_vector(torch::Tensor direction, double coefficient = 1.0) {
  return [direction = std::move(direction), coefficient](const torch::Tensor& x, HookContext& ctx) {
    FLEXMODEL_CHECK(direction.dim() >= 1 && direction.size(-1) == x.size(-1), ShapeError, "add_vector on '",
                    ctx.module_name, "': the direction has ", direction.sizes(), ", the activation ", x.sizes(),
                    "; their last dimensions must agree");
    return x + coefficient * direction.to(x.device(), x.scalar_type());
  };
}

// Stores the activation in save_ctx under `key` (the source run of a patch).
inline EditingFunction save_to(std::string key) {
  return [key = std::move(key)](const torch::Tensor& x, HookContext& ctx) {
    ctx.save_ctx.set(key, x.detach().clone());
    return x;
  };
}

// Replaces the activation with the tensor stored under `key` (activation patching).
inline EditingFunction patch(std::string key) {
  return [key = std::move(key)](const torch::Tensor& x, HookContext& ctx) {
    const torch::Tensor& source = ctx.save_ctx.get<torch::Tensor>(key);
    FLEXMODEL_CHECK(source.sizes() == x.sizes(), ShapeError, "patch on '", ctx.module_name, "': save_ctx['", key,
                    "'] has shape ", source.sizes(), ", the activation ", x.sizes());
    return source.to(x.device(), x.scalar_type());
  };
}

// Runs the trainable torch::nn::Linear `probe` on the (detached) activation and
// stores its output, with its graph, in save_ctx under `key` for the loss.
inline EditingFunction linear_probe(std::string probe, std::string key) {
  return [probe = std::move(probe), key = std::move(key)](const torch::Tensor& x, HookContext& ctx) {
    auto& linear = ctx.trainable_module<torch::nn::LinearImpl>(probe);
    ctx.save_ctx.set(key, linear.forward(x.detach()));
    return x;
  };
}

}  // namespace flexmodel::hooks
