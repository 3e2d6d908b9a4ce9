#include "flexmodel/generation.h"

#include <functional>
#include <limits>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>

#include "flexmodel/dist.h"
#include "core/state.h"
#include "dist/routing.h"
#include "dist/wire.h"

namespace flexmodel {
namespace {

// The next token of each row from its last position's logits [B, vocab].
class Sampler {
 public:
  explicit Sampler(const GenerationOptions& options)
      : options_(options), generator_(at::make_generator<at::CPUGeneratorImpl>(options.seed())) {}

  torch::Tensor next(const torch::Tensor& logits) {
    if (options_.greedy()) return logits.argmax(-1, /*keepdim=*/true);
    torch::Tensor scaled = (logits.detach().to(torch::kCPU, torch::kFloat64) / options_.temperature());
    if (options_.top_k() > 0 && options_.top_k() < scaled.size(-1)) {
      const torch::Tensor kth = std::get<0>(scaled.topk(options_.top_k(), -1)).narrow(-1, options_.top_k() - 1, 1);
      scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<double>::infinity());
    }
    return torch::multinomial(torch::softmax(scaled, -1), 1, /*replacement=*/false, generator_).to(logits.device());
  }

 private:
  GenerationOptions options_;
  at::Generator generator_;
};

// Sets what HookContext reports for one step's forward.
class StepScope {
 public:
  StepScope(std::int64_t step, std::int64_t begin, std::int64_t end)
      : previous_(std::exchange(detail::g_generation_step, {step, begin, end})) {}
  StepScope(const StepScope&) = delete;
  StepScope& operator=(const StepScope&) = delete;
  ~StepScope() { detail::g_generation_step = previous_; }

 private:
  detail::GenerationStep previous_;
};

// `step_logits(ids, step)`: the logits of a forward over the newest
// positions of `ids` ([B, positions, vocab]; whole on rank 0 under a mesh)
// and how many positions it covered (it tells StepScope which).
using Step = std::function<std::pair<torch::Tensor, std::int64_t>(const torch::Tensor& ids, std::int64_t step)>;

torch::Tensor run_loop(const FlexModelBase& model, const torch::Tensor& prompt, const GenerationOptions& options,
                       const Step& step_logits) {
  FLEXMODEL_CHECK(prompt.dim() == 2 && prompt.scalar_type() == torch::kLong && prompt.size(1) > 0, ShapeError,
                  "generate: the prompt must be int64 ids [batch, positions], not ", prompt.scalar_type(), " ",
                  prompt.sizes());
  FLEXMODEL_CHECK(options.max_new_tokens() >= 0 && options.temperature() > 0 && options.top_k() >= 0, ConfigError,
                  "generate: max_new_tokens and top_k must not be negative, temperature must be positive");
  if (model.distributed()) {
    // Each rank goes on from its own prompt with rank 0's tokens.
    detail::check_same_across(model.mesh()->world(), prompt,
                              "generate: the prompt differs across ranks; under a mesh every rank passes the same one");
  }
  torch::NoGradGuard no_grad;
  Sampler sampler(options);
  torch::Tensor ids = prompt;
  for (std::int64_t step = 0; step < options.max_new_tokens(); ++step) {
    if (options.before_step()) options.before_step()(step, ids);
    const auto [logits, positions] = step_logits(ids, step);
    // Rank 0 samples and every rank continues with its tokens.
    const auto next = detail::decided_on_rank0(model.mesh().get(), [&, &logits = logits, positions = positions] {
      FLEXMODEL_CHECK(logits.defined() && logits.dim() == 3 && logits.size(0) == ids.size(0) &&
                          logits.size(1) == positions,
                      ShapeError, "generate: the model's first output tensor is ",
                      logits.defined() ? logits.sizes() : c10::IntArrayRef{}, ", not [", ids.size(0), ", ", positions,
                      ", vocab] logits of the ", positions, " positions the step ran");
      return std::vector<torch::Tensor>{sampler.next(logits.select(1, -1))};
    });
    ids = torch::cat({ids, next.front().to(ids.device())}, 1);
  }
  return ids;
}

}  // namespace

torch::Tensor detail::generate_whole_sequences(const FlexModelBase& model, const torch::Tensor& prompt,
                                               const GenerationOptions& options,
                                               const std::function<torch::Tensor(const torch::Tensor&)>& logits_of) {
  return run_loop(model, prompt, options, [&](const torch::Tensor& ids, std::int64_t step) {
    StepScope scope(step, 0, ids.size(1));
    return std::pair{logits_of(ids), ids.size(1)};
  });
}

torch::Tensor generate(FlexModel<models::GPTImpl>& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options) {
  if (model.distributed()) {
    // dp's calibration forward, one row larger, would run with the cache and extend it.
    return detail::generate_whole_sequences(model, prompt, options,
                                            [&](const torch::Tensor& ids) { return model.forward(groups, ids); });
  }
  models::KVCache cache;
  return run_loop(model, prompt, options, [&](const torch::Tensor& ids, std::int64_t step) {
    // The cache holds every position but the newest token's.
    const std::int64_t begin = cache.length(), end = ids.size(1);
    StepScope scope(step, begin, end);
    return std::pair{model.forward(groups, ids.narrow(1, begin, end - begin), &cache), end - begin};
  });
}

torch::Tensor generate(ScriptFlexModel& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options) {
  return detail::generate_whole_sequences(
      model, prompt, options, [&](const torch::Tensor& ids) { return first_tensor(model.forward(groups, {ids})); });
}

}  // namespace flexmodel
