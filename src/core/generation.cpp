#include "flexmodel/generation.h"

#include <functional>
#include <limits>
#include <utility>

#include <ATen/CPUGeneratorImpl.h>

#include "flexmodel/dist.h"
#include "core/state.h"

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

// `logits_after(ids, step)`: [B, vocab] logits of the position after `ids`,
// from a forward that covers [begin, end) of them (it tells StepScope).
using Step = std::function<torch::Tensor(const torch::Tensor& ids, std::int64_t step)>;

torch::Tensor run_loop(const FlexModelBase& model, const torch::Tensor& prompt, const GenerationOptions& options,
                       const Step& logits_after) {
  FLEXMODEL_CHECK(model.mesh() == nullptr || !model.mesh()->distributed(), ConfigError,
                  "generate runs in one process");
  FLEXMODEL_CHECK(prompt.dim() == 2 && prompt.scalar_type() == torch::kLong && prompt.size(1) > 0, ShapeError,
                  "generate: the prompt must be int64 ids [batch, positions], not ", prompt.scalar_type(), " ",
                  prompt.sizes());
  FLEXMODEL_CHECK(options.max_new_tokens() >= 0 && options.temperature() > 0 && options.top_k() >= 0, ConfigError,
                  "generate: max_new_tokens and top_k must not be negative, temperature must be positive");
  torch::NoGradGuard no_grad;
  Sampler sampler(options);
  torch::Tensor ids = prompt;
  for (std::int64_t step = 0; step < options.max_new_tokens(); ++step) {
    if (options.before_step()) options.before_step()(step, ids);
    ids = torch::cat({ids, sampler.next(logits_after(ids, step))}, 1);
  }
  return ids;
}

}  // namespace

torch::Tensor generate(FlexModel<models::GPTImpl>& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options) {
  models::KVCache cache;
  return run_loop(model, prompt, options, [&](const torch::Tensor& ids, std::int64_t step) {
    // The cache holds every position but the newest token's.
    const std::int64_t begin = cache.length(), end = ids.size(1);
    StepScope scope(step, begin, end);
    return model.forward(groups, ids.narrow(1, begin, end - begin), &cache).select(1, -1);
  });
}

torch::Tensor generate(ScriptFlexModel& model, const Groups& groups, const torch::Tensor& prompt,
                       const GenerationOptions& options) {
  return run_loop(model, prompt, options, [&](const torch::Tensor& ids, std::int64_t step) {
    StepScope scope(step, 0, ids.size(1));
    const torch::Tensor logits = first_tensor(model.forward(groups, {ids}));
    FLEXMODEL_CHECK(logits.dim() == 3 && logits.size(1) == ids.size(1), ShapeError,
                    "generate: the model's first output tensor is ", logits.sizes(), ", not [batch, ", ids.size(1),
                    ", vocab] logits of the ", ids.size(1), " positions given");
    return logits.select(1, -1);
  });
}

}  // namespace flexmodel
