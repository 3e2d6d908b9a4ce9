// Ready-made editing functions for the common interventions: ablation,
// scaling, steering, activation patching and probes. Each returns an
// EditingFunction for HookFunction::editing_function or create_hook_group.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include "flexmodel/error.h"
#include "flexmodel/hook_function.h"
#include "flexmodel/interventions.h"

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

namespace detail {
// `key` with every "{module}" replaced by the hook's module name.
inline std::string key_for(const std::string& key, const HookContext& ctx) {
  static constexpr std::string_view kModule = "{module}";
  std::string out;
  for (std::size_t start = 0;;) {
    const std::size_t found = key.find(kModule, start);
    out.append(key, start, found == std::string::npos ? std::string::npos : found - start);
    if (found == std::string::npos) return out;
    out += ctx.module_name;
    start = found + kModule.size();
  }
}
}  // namespace detail

// Stores the activation in save_ctx under `key` (the source run of a patch).
// "{module}" in the key stands for the hook's module, so one save_to serves a
// group: save_to("clean.{module}") keeps "clean.layers.0", "clean.layers.1"...
// A key without it that a second module of the same group would write in the
// same forward is a HookError, not an overwrite.
inline EditingFunction save_to(std::string key) {
  // Shared by the copies create_hook_group makes: (module, forward) of the last write.
  auto last = std::make_shared<std::pair<std::string, std::int64_t>>("", -1);
  return [key = std::move(key), last](const torch::Tensor& x, HookContext& ctx) {
    const std::string name = detail::key_for(key, ctx);
    FLEXMODEL_CHECK(name != key || last->second != ctx.step || last->first == ctx.module_name, HookError, "save_to('",
                    key, "') on '", ctx.module_name, "' would overwrite what '", last->first,
                    "' saved in this forward; put {module} in the key for one entry per module");
    *last = {ctx.module_name, ctx.step};
    ctx.save_ctx.set(name, x.detach().clone());
    return x;
  };
}

// Replaces the activation with the tensor stored under `key` (activation
// patching); "{module}" as in save_to.
inline EditingFunction patch(std::string key) {
  return [key = std::move(key)](const torch::Tensor& x, HookContext& ctx) {
    const std::string name = detail::key_for(key, ctx);
    const torch::Tensor& source = ctx.save_ctx.get<torch::Tensor>(name);
    FLEXMODEL_CHECK(source.sizes() == x.sizes(), ShapeError, "patch on '", ctx.module_name, "': save_ctx['", name,
                    "'] has shape ", source.sizes(), ", the activation ", x.sizes());
    return source.to(x.device(), x.scalar_type());
  };
}

// Runs the trainable intervention registered as `name` (flexmodel/interventions.h)
// on the activation: the edit it learnt or was loaded with.
inline EditingFunction intervene(std::string name) {
  return [name = std::move(name)](const torch::Tensor& x, HookContext& ctx) {
    return ctx.trainable_module<InterventionImpl>(name).forward(x);
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
