#include "flexmodel/patching.h"

#include <map>

#include <torch/autograd.h>

#include "flexmodel/cache.h"
#include "flexmodel/dist.h"
#include "flexmodel/logging.h"
#include "flexmodel/scoped_hooks.h"

namespace flexmodel {

Metric logit_difference(torch::Tensor correct, torch::Tensor wrong, std::int64_t position) {
  return [correct = std::move(correct), wrong = std::move(wrong), position](const torch::Tensor& logits) {
    FLEXMODEL_CHECK(logits.dim() == 3, ShapeError, "logit_difference takes [batch, positions, vocab] logits, not ",
                    logits.sizes());
    const torch::Tensor at = logits.select(1, position);
    auto pick = [&](const torch::Tensor& ids) {
      const torch::Tensor index = ids.to(logits.device(), torch::kInt64).reshape({-1, 1}).expand({at.size(0), 1});
      return at.gather(1, index).squeeze(1);
    };
    return (pick(correct) - pick(wrong)).mean();
  };
}

Metric logit_difference(std::int64_t correct, std::int64_t wrong, std::int64_t position) {
  return logit_difference(torch::tensor({correct}), torch::tensor({wrong}), position);
}

torch::Tensor PatchingResult::normalized() const {
  FLEXMODEL_CHECK(clean_metric != corrupt_metric, ConfigError,
                  "PatchingResult::normalized: the clean and corrupt runs have the same metric (", clean_metric,
                  "), so no patch can be measured against their difference");
  return (effect - corrupt_metric) / (clean_metric - corrupt_metric);
}

namespace detail {
namespace {

void check_patchable(const FlexModelBase& model, const PatchingOptions& options, const char* what) {
  FLEXMODEL_CHECK(model.mesh() == nullptr || !model.mesh()->distributed(), ConfigError, what,
                  " runs in one process; under a mesh patch with hooks of your own");
  FLEXMODEL_CHECK(options.hook_type() == HookType::forward || options.hook_type() == HookType::forward_pre,
                  ConfigError, what, " patches forward or forward_pre hook points, not ", to_string(options.hook_type()));
  FLEXMODEL_CHECK(!options.heads() || *options.heads() > 0, ConfigError, what, ": heads must be positive");
}

// The clean run's activations at the chosen hook points, each from one call.
struct CleanRun {
  ActivationCache cache;
  torch::Tensor logits;
};

CleanRun run_clean(FlexModelBase& model, const Pattern& points, const LogitsRun& clean, const PatchingOptions& options) {
  CleanRun run{ActivationCache(CacheOptions().hook_type(options.hook_type())), {}};
  ScopedHooks scope(model);
  add_cache_hooks(scope, points, run.cache);
  run.logits = clean(scope.only()).detach();
  for (const auto& [name, type] : run.cache.keys()) {
    FLEXMODEL_CHECK(run.cache.calls(name, type).size() == 1, ConfigError, "activation patching: '", name,
                    "' ran ", run.cache.calls(name, type).size(),
                    " times in the clean forward; patch hook points that run once");
  }
  return run;
}

// The default metric: per row, the clean run's top token at the last position against the corrupt run's.
Metric default_metric(const torch::Tensor& clean_logits, const torch::Tensor& corrupt_logits) {
  const torch::Tensor correct = clean_logits.select(1, -1).argmax(-1), wrong = corrupt_logits.select(1, -1).argmax(-1);
  if (torch::equal(correct, wrong)) {
    logger()->warn("activation patching: the clean and corrupt runs predict the same tokens, so the default metric "
                   "(their logit difference) is 0 for every patch; pass a metric");
  }
  return logit_difference(correct, wrong);
}

// Positions (dim 1) or heads of `activation`.
std::int64_t entries_of(const torch::Tensor& activation, const PatchingOptions& options, const std::string& name) {
  FLEXMODEL_CHECK(activation.dim() >= 2, ShapeError, "activation patching: '", name, "' has a tensor of shape ",
                  activation.sizes(), ", without positions (dim 1) to patch");
  return options.heads() ? *options.heads() : activation.size(1);
}

Slice entry_slice(const PatchingOptions& options, std::int64_t entry) {
  return options.heads() ? Slice().heads(Index::at(entry), *options.heads()) : Slice().positions(Index::at(entry));
}

void check_same_shape(const torch::Tensor& corrupt, const torch::Tensor& clean, const std::string& name) {
  FLEXMODEL_CHECK(corrupt.sizes() == clean.sizes(), ShapeError, "activation patching: '", name,
                  "' has a tensor of shape ", corrupt.sizes(), " in the corrupt run but ", clean.sizes(),
                  " in the clean one; give prompts of one length");
}

}  // namespace

PatchingResult activation_patching(FlexModelBase& model, const Pattern& points, const LogitsRun& clean,
                                   const LogitsRun& corrupt, const std::optional<Metric>& metric,
                                   const PatchingOptions& options) {
  check_patchable(model, options, "activation_patching");
  torch::NoGradGuard no_grad;
  const CleanRun clean_run = run_clean(model, points, clean, options);
  const torch::Tensor corrupt_logits = corrupt(Groups::none());
  const Metric judge = metric ? *metric : default_metric(clean_run.logits, corrupt_logits);
  PatchingResult result;
  result.clean_metric = judge(clean_run.logits).item<double>();
  result.corrupt_metric = judge(corrupt_logits).item<double>();
  std::vector<torch::Tensor> rows;
  for (const auto& [name, type] : clean_run.cache.keys()) {
    const torch::Tensor& source = clean_run.cache.at(name, type);
    const std::int64_t entries = entries_of(source, options, name);
    std::vector<double> row;
    for (std::int64_t entry = 0; entry < entries; ++entry) {
      const Slice slice = entry_slice(options, entry);
      const torch::Tensor patch = slice.take(source);
      bool fired = false;
      ScopedHooks scope(model);
      // The slice of a corrupt tensor of another shape could still fit: the whole is checked first.
      scope.add(HookFunction(name, {}, [&, name = name](const torch::Tensor& x) {
                  check_same_shape(x, source, name);
                  fired = true;
                }).capture(false),
                type);
      scope.add(HookFunction(name, {}, [&](const torch::Tensor& x) { return patch.to(x.device(), x.scalar_type()); })
                    .slice(slice)
                    .capture(false),
                type);
      row.push_back(judge(corrupt(scope.only())).item<double>());
      FLEXMODEL_CHECK(fired, HookError, "activation patching: '", name,
                      "' ran in the clean forward but not in the corrupt one, so nothing was patched");
    }
    result.points.push_back(name);
    rows.push_back(torch::tensor(row, torch::kFloat64));
  }
  result.effect = torch::stack(rows);
  return result;
}

PatchingResult attribution_patching(FlexModelBase& model, const Pattern& points, const LogitsRun& clean,
                                    const LogitsRun& corrupt, const std::optional<Metric>& metric,
                                    const PatchingOptions& options) {
  check_patchable(model, options, "attribution_patching");
  CleanRun clean_run = [&] {
    torch::NoGradGuard no_grad;
    return run_clean(model, points, clean, options);
  }();
  // The corrupt run keeps every chosen activation in the graph; one that does
  // not require grad (a model with frozen weights) becomes a leaf that does.
  torch::AutoGradMode grad_mode(true);
  std::map<OutputMap::Key, torch::Tensor> activations;
  ScopedHooks scope(model);
  scope.add(points,
            HookFunction("").capture(false).editing_function([&](const torch::Tensor& x, HookContext& ctx) {
              torch::Tensor kept = x.requires_grad() ? x : x.detach().requires_grad_(true);
              activations[{ctx.module_name, ctx.hook_type}] = kept;
              return kept;
            }),
            options.hook_type());
  const torch::Tensor corrupt_logits = corrupt(scope.only());
  const Metric judge = metric ? *metric : default_metric(clean_run.logits, corrupt_logits.detach());
  const torch::Tensor value = judge(corrupt_logits);
  PatchingResult result;
  result.clean_metric = judge(clean_run.logits).item<double>();
  result.corrupt_metric = value.item<double>();
  std::vector<torch::Tensor> inputs;
  for (const auto& [name, type] : clean_run.cache.keys()) {
    const auto found = activations.find({name, type});
    FLEXMODEL_CHECK(found != activations.end(), ConfigError, "attribution_patching: '", name,
                    "' ran in the clean forward but not in the corrupt one");
    inputs.push_back(found->second);
  }
  // autograd::grad, not backward: the model's parameters keep their .grad.
  const auto gradients = torch::autograd::grad({value}, inputs, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                               /*allow_unused=*/true);
  std::vector<torch::Tensor> rows;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const auto& [name, type] = clean_run.cache.keys()[i];
    const torch::Tensor& source = clean_run.cache.at(name, type);
    const torch::Tensor corrupt_activation = inputs[i].detach();
    check_same_shape(corrupt_activation, source, name);
    const std::int64_t entries = entries_of(source, options, name);
    // A metric that does not depend on an activation has no gradient there: it is 0.
    const torch::Tensor gradient = gradients[i].defined() ? gradients[i] : torch::zeros_like(corrupt_activation);
    torch::Tensor product = (gradient * (source.to(gradient.device(), gradient.scalar_type()) - corrupt_activation))
                                .to(torch::kFloat64);
    torch::Tensor per_entry;
    if (options.heads()) {
      FLEXMODEL_CHECK(product.size(-1) % entries == 0, ShapeError, "attribution_patching: the last dim of '", name,
                      "' (", product.sizes(), ") is not a multiple of ", entries, " heads");
      std::vector<std::int64_t> by_head(product.sizes().begin(), product.sizes().end() - 1);
      by_head.push_back(entries);
      by_head.push_back(product.size(-1) / entries);
      per_entry = product.reshape(by_head).transpose(0, -2).reshape({entries, -1});
    } else {
      per_entry = product.transpose(0, 1).reshape({entries, -1});
    }
    result.points.push_back(name);
    rows.push_back(per_entry.sum(1).cpu() + result.corrupt_metric);
  }
  result.effect = torch::stack(rows);
  return result;
}

}  // namespace detail
}  // namespace flexmodel
