#include "flexmodel/patching.h"

#include <algorithm>
#include <exception>
#include <map>
#include <set>

#include <torch/autograd.h>

#include "flexmodel/cache.h"
#include "flexmodel/dist.h"
#include "flexmodel/logging.h"
#include "flexmodel/scoped_hooks.h"
#include "dist/routing.h"
#include "dist/wire.h"

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

torch::Tensor detached(const torch::Tensor& tensor) { return tensor.defined() ? tensor.detach() : tensor; }

void check_patchable(const PatchingOptions& options, const char* what) {
  FLEXMODEL_CHECK(options.hook_type() == HookType::forward || options.hook_type() == HookType::forward_pre,
                  ConfigError, what, " patches forward or forward_pre hook points, not ", to_string(options.hook_type()));
  FLEXMODEL_CHECK(!options.heads() || *options.heads() > 0, ConfigError, what, ": heads must be positive");
}

// The clean run's activations at the chosen hook points, each from one call,
// and its logits: on every rank under a mesh, where each stage patches its own.
struct CleanRun {
  ActivationCache cache;
  torch::Tensor logits;
};

// Rank 0's clean run (the logits first, then each call of each hook point) to every rank.
void share(const FlexModelBase& model, CleanRun& run) {
  const auto shared = captures_decided_on_rank0(model.mesh().get(), [&] {
    FLEXMODEL_CHECK(run.logits.defined(), ConfigError, "activation patching: the clean forward returned no logits "
                                                       "tensor on rank 0");
    std::vector<WireCapture> captures{WireCapture{"", HookType::forward, 0, run.logits}};
    for (const auto& [name, type] : run.cache.keys()) {
      for (const auto& tensor : run.cache.calls(name, type)) captures.push_back(WireCapture{name, type, 0, tensor});
    }
    return captures;
  });
  run.logits = shared.front().tensor;
  ActivationCache cache(run.cache.options());
  for (std::size_t i = 1; i < shared.size(); ++i) cache.add(shared[i].name, shared[i].type, shared[i].tensor);
  run.cache = std::move(cache);
}

CleanRun run_clean(FlexModelBase& model, const Pattern& points, const LogitsRun& clean, const PatchingOptions& options) {
  CleanRun run{ActivationCache(CacheOptions().hook_type(options.hook_type())), {}};
  {
    ScopedHooks scope(model);
    const auto diverted = add_cache_hooks(model, scope, points, run.cache);
    run.logits = detached(clean(scope.only()));
  }
  if (model.distributed()) share(model, run);
  for (const auto& [name, type] : run.cache.keys()) {
    FLEXMODEL_CHECK(run.cache.calls(name, type).size() == 1, ConfigError, "activation patching: '", name,
                    "' ran ", run.cache.calls(name, type).size(),
                    " times in the clean forward; patch hook points that run once");
  }
  return run;
}

// The metric of `logits` (whole on rank 0 under a mesh), the same on every rank.
double metric_of(const FlexModelBase& model, const Metric& judge, const torch::Tensor& logits) {
  const auto value = decided_on_rank0(model.mesh().get(), [&] {
    const torch::Tensor judged = judge(logits);
    FLEXMODEL_CHECK(judged.defined() && judged.numel() == 1, ConfigError,
                    "activation patching: the metric returned ", judged.defined() ? "a tensor of shape " : "nothing",
                    judged.defined() ? judged.sizes() : c10::IntArrayRef{}, "; it must return one value");
    return std::vector<torch::Tensor>{judged.detach().reshape({}).to(torch::kFloat64)};
  });
  return value.front().item<double>();
}

// The default metric: per row, the clean run's top token at the last position against the corrupt run's.
Metric default_metric(const FlexModelBase& model, const torch::Tensor& clean_logits,
                      const torch::Tensor& corrupt_logits) {
  const auto ids = decided_on_rank0(model.mesh().get(), [&] {
    auto top = [](const torch::Tensor& logits) {
      FLEXMODEL_CHECK(logits.defined() && logits.dim() == 3, ShapeError, "activation patching: the default metric "
                      "takes [batch, positions, vocab] logits, not ", logits.defined() ? logits.sizes() : c10::IntArrayRef{},
                      "; pass a metric");
      return logits.select(1, -1).argmax(-1);
    };
    return std::vector<torch::Tensor>{top(clean_logits), top(corrupt_logits)};
  });
  if (torch::equal(ids[0], ids[1])) {
    logger()->warn("activation patching: the clean and corrupt runs predict the same tokens, so the default metric "
                   "(their logit difference) is 0 for every patch; pass a metric");
  }
  return logit_difference(ids[0], ids[1]);
}

// Whether a hook fired: under a mesh it runs on one stage's leader only.
bool fired_on_some_rank(const FlexModelBase& model, bool fired) {
  if (!model.distributed()) return fired;
  const auto flags = model.mesh()->world().all_gather_ints(fired ? 1 : 0);
  return std::any_of(flags.begin(), flags.end(), [](std::int64_t flag) { return flag != 0; });
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
  check_patchable(options, "activation_patching");
  torch::NoGradGuard no_grad;
  const CleanRun clean_run = run_clean(model, points, clean, options);
  const torch::Tensor corrupt_logits = detached(corrupt(Groups::none()));
  const Metric judge = metric ? *metric : default_metric(model, clean_run.logits, corrupt_logits);
  PatchingResult result;
  result.clean_metric = metric_of(model, judge, clean_run.logits);
  result.corrupt_metric = metric_of(model, judge, corrupt_logits);
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
      row.push_back(metric_of(model, judge, corrupt(scope.only())));
      FLEXMODEL_CHECK(fired_on_some_rank(model, fired), HookError, "activation patching: '", name,
                      "' ran in the clean forward but not in the corrupt one, so nothing was patched");
    }
    result.points.push_back(name);
    rows.push_back(torch::tensor(row, torch::kFloat64));
  }
  result.effect = torch::stack(rows);
  return result;
}

namespace {

// The corrupt run of attribution patching: each chosen point's activation and
// the metric's gradient with respect to it, per call, on rank 0 (or in the
// one process), and the metric.
struct CorruptRun {
  std::map<std::string, std::vector<torch::Tensor>> activations, gradients;
  torch::Tensor logits;  // detached
  Metric judge;
};

void check_carries_gradient(const torch::Tensor& logits) {
  FLEXMODEL_CHECK(logits.defined() && logits.requires_grad(), ConfigError,
                  "attribution_patching: the corrupt forward's logits carry no gradient; the model must compute them "
                  "from the hooked activations with autograd (flexmodel::parallel's layers carry none between ranks)");
}

// One process: each activation stays in the graph (one that does not require
// grad, of a frozen model, becomes a leaf that does) and autograd::grad takes
// the metric's gradient with respect to them. A floating-point activation the
// metric does not depend on gets a zero gradient.
CorruptRun corrupt_in_one_process(FlexModelBase& model, const CleanRun& clean_run, const LogitsRun& corrupt,
                                  const std::optional<Metric>& metric) {
  CorruptRun run;
  std::vector<std::pair<std::string, torch::Tensor>> kept;
  torch::AutoGradMode grad_mode(true);
  ScopedHooks scope(model);
  for (const auto& [name, type] : clean_run.cache.keys()) {
    scope.add(HookFunction(name).capture(false).editing_function([&kept, name = name](const torch::Tensor& x) {
                const bool leaf = !x.requires_grad() && x.is_floating_point();
                kept.emplace_back(name, leaf ? x.detach().requires_grad_(true) : x);
                return kept.back().second;
              }),
              type);
  }
  const torch::Tensor logits = corrupt(scope.only());
  check_carries_gradient(logits);
  run.logits = detached(logits);
  run.judge = metric ? *metric : default_metric(model, clean_run.logits, run.logits);
  const torch::Tensor value = run.judge(logits);
  FLEXMODEL_CHECK(value.defined() && value.numel() == 1 && value.requires_grad(), ConfigError,
                  "attribution_patching: the metric must return one value computed from the logits with autograd");
  std::vector<torch::Tensor> inputs;
  for (const auto& [name, activation] : kept) {
    run.activations[name].push_back(activation.detach());
    if (activation.requires_grad()) inputs.push_back(activation);
  }
  // autograd::grad, not backward: the model's parameters keep their .grad.
  const auto gradients = inputs.empty() ? std::vector<torch::Tensor>()
                                        : torch::autograd::grad({value.reshape({})}, inputs, {}, /*retain_graph=*/false,
                                                                /*create_graph=*/false, /*allow_unused=*/true);
  std::size_t next = 0;
  for (const auto& [name, activation] : kept) {
    if (!activation.requires_grad()) continue;
    const torch::Tensor& gradient = gradients[next++];
    run.gradients[name].push_back(gradient.defined() ? gradient : torch::zeros_like(activation));
  }
  return run;
}

// While it lives every floating-point parameter of the model requires grad
// (each tied tensor once), so that every activation that depends on one has
// a gradient; then each is as it was, also when the run fails.
class EveryParameterRequiresGrad {
 public:
  explicit EveryParameterRequiresGrad(const FlexModelBase& model) {
    std::set<const void*> seen;
    for (auto& [name, parameter] : model.named_parameters()) {
      if (!parameter.is_floating_point() || !seen.insert(parameter.unsafeGetTensorImpl()).second) continue;
      parameters_.push_back(parameter);
      was_.push_back(parameter.requires_grad());
    }
    for (auto& parameter : parameters_) parameter.requires_grad_(true);
  }
  EveryParameterRequiresGrad(const EveryParameterRequiresGrad&) = delete;
  EveryParameterRequiresGrad& operator=(const EveryParameterRequiresGrad&) = delete;
  ~EveryParameterRequiresGrad() {
    for (std::size_t i = 0; i < parameters_.size(); ++i) parameters_[i].requires_grad_(was_[i]);
  }
  const std::vector<torch::Tensor>& parameters() const { return parameters_; }

 private:
  std::vector<torch::Tensor> parameters_;
  std::vector<bool> was_;
};

// Under dp: the editing function of one process would run on rank 0 alone,
// outside the other ranks' graphs. Gradient hooks see the one-process
// gradient of each activation instead; with every parameter requiring grad,
// each activation that depends on one has a gradient (one that depends on
// none, a model input, gets none).
CorruptRun corrupt_under_dp(FlexModelBase& model, const CleanRun& clean_run, const LogitsRun& corrupt,
                            const std::optional<Metric>& metric, const PatchingOptions& options) {
  CorruptRun run;
  const HookType gradient_type =
      options.hook_type() == HookType::forward ? HookType::full_backward_pre : HookType::full_backward;
  FlexModelBase::DivertedCaptures diverted(model, [&](const std::string& name, HookType type, const torch::Tensor& x) {
    (type == gradient_type ? run.gradients : run.activations)[name].push_back(x);
  });
  torch::AutoGradMode grad_mode(true);
  const EveryParameterRequiresGrad requiring(model);
  ScopedHooks scope(model);
  for (const auto& [name, type] : clean_run.cache.keys()) {
    scope.add(HookFunction(name), type);
    scope.add(HookFunction(name), gradient_type);
  }
  // Every rank holds the whole logits, its own rows in its graph.
  const torch::Tensor logits = corrupt(scope.only());
  run.logits = detached(logits);
  run.judge = metric ? *metric : default_metric(model, clean_run.logits, run.logits);
  torch::Tensor value;
  std::exception_ptr failure;
  try {
    check_carries_gradient(logits);
    value = run.judge(logits);
    FLEXMODEL_CHECK(value.defined() && value.numel() == 1 && value.requires_grad(), ConfigError,
                    "attribution_patching: the metric must return one value computed from the logits with autograd");
  } catch (...) {
    failure = std::current_exception();
  }
  // The backward's hooks are collective: every rank runs it, or none.
  agree_on_failure(model.mesh()->world(), failure);
  // autograd::grad, not backward: the parameters' .grad stay as they were.
  torch::autograd::grad({value.reshape({})}, requiring.parameters(), {}, /*retain_graph=*/false,
                        /*create_graph=*/false, /*allow_unused=*/true);
  return run;
}

// The one call of `name` in `calls`, or nullptr when it has none.
const torch::Tensor* only_call(const std::map<std::string, std::vector<torch::Tensor>>& calls, const std::string& name) {
  const auto found = calls.find(name);
  if (found == calls.end()) return nullptr;
  FLEXMODEL_CHECK(found->second.size() == 1, HookError, "attribution_patching: '", name, "' ran ", found->second.size(),
                  " times in the corrupt forward but once in the clean one; patch hook points that run once");
  return &found->second.front();
}

}  // namespace

PatchingResult attribution_patching(FlexModelBase& model, const Pattern& points, const LogitsRun& clean,
                                    const LogitsRun& corrupt, const std::optional<Metric>& metric,
                                    const PatchingOptions& options) {
  check_patchable(options, "attribution_patching");
  FLEXMODEL_CHECK(!model.distributed() || (model.mesh()->shape().tp == 1 && model.mesh()->shape().pp == 1),
                  ConfigError, "attribution_patching needs a backward through the model, which flexmodel's "
                  "tensor-parallel layers and pipeline stages do not carry (tp ", model.mesh()->shape().tp, ", pp ",
                  model.mesh()->shape().pp, "); run it under dp alone, or use activation_patching");
  const CleanRun clean_run = [&] {
    torch::NoGradGuard no_grad;
    return run_clean(model, points, clean, options);
  }();
  const CorruptRun run = model.distributed() ? corrupt_under_dp(model, clean_run, corrupt, metric, options)
                                            : corrupt_in_one_process(model, clean_run, corrupt, metric);
  PatchingResult result;
  result.clean_metric = metric_of(model, run.judge, clean_run.logits);
  result.corrupt_metric = metric_of(model, run.judge, run.logits);
  const auto table = decided_on_rank0(model.mesh().get(), [&] {
    std::vector<torch::Tensor> rows;
    for (const auto& [name, type] : clean_run.cache.keys()) {
      const torch::Tensor& source = clean_run.cache.at(name, type);
      const torch::Tensor* activation = only_call(run.activations, name);
      FLEXMODEL_CHECK(activation != nullptr, ConfigError, "attribution_patching: '", name,
                      "' ran in the clean forward but not in the corrupt one");
      check_same_shape(*activation, source, name);
      const torch::Tensor difference =
          (source - activation->to(source.device(), source.scalar_type())).to(torch::kFloat64);
      const torch::Tensor* gradient = only_call(run.gradients, name);
      // Without a gradient the estimate would be the corrupt metric, which is right only where nothing differs.
      FLEXMODEL_CHECK(gradient != nullptr || !difference.ne(0).any().item<bool>(), HookError,
                      "attribution_patching: no gradient reached '", name, "' in the corrupt run's backward, though "
                      "its clean and corrupt activations differ: it depends on no parameter (a model input) or is "
                      "not floating-point; use activation_patching for it");
      const torch::Tensor product = gradient == nullptr
                                        ? torch::zeros_like(difference)
                                        : gradient->to(difference.device(), torch::kFloat64) * difference;
      const std::int64_t entries = entries_of(source, options, name);
      std::vector<double> row;
      for (std::int64_t entry = 0; entry < entries; ++entry) {
        row.push_back(entry_slice(options, entry).take(product).sum().item<double>() + result.corrupt_metric);
      }
      rows.push_back(torch::tensor(row, torch::kFloat64));
    }
    return std::vector<torch::Tensor>{torch::stack(rows)};
  });
  for (const auto& [name, type] : clean_run.cache.keys()) result.points.push_back(name);
  result.effect = table.front();
  return result;
}

}  // namespace detail
}  // namespace flexmodel
