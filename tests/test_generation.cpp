// Generation with hooks against step-by-step forwards of the whole sequence
// with the same hooks, for the native GPT (key/value cache) and TorchScript.
#include <gtest/gtest.h>

#include "flexmodel/hooks/editing.h"
#include "test_models.h"

namespace flexmodel {
namespace {

// Greedy generation by hand: a forward of the whole sequence per token.
template <class Forward>
torch::Tensor step_by_step(const torch::Tensor& prompt, std::int64_t tokens, Forward&& logits_of) {
  torch::NoGradGuard no_grad;
  torch::Tensor ids = prompt;
  for (std::int64_t i = 0; i < tokens; ++i) {
    ids = torch::cat({ids, logits_of(ids).select(1, -1).argmax(-1, true)}, 1);
  }
  return ids;
}

class GenerationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    gpt = models::GPT(models::GPTOptions());
    prompt = torch::randint(0, 256, {2, 5});
    direction = torch::randn({64}) * 4;
  }
  models::GPT gpt{nullptr};
  torch::Tensor prompt, direction;
};

TEST_F(GenerationTest, TheKeyValueCacheGivesTheWholeSequencesLogits) {
  torch::NoGradGuard no_grad;
  const auto ids = torch::randint(0, 256, {2, 9});
  const auto whole = gpt->forward(ids);
  models::KVCache cache;
  std::vector<torch::Tensor> pieces{gpt->forward(ids.narrow(1, 0, 4), &cache)};
  // Several positions after a filled cache, then one at a time.
  pieces.push_back(gpt->forward(ids.narrow(1, 4, 3), &cache));
  for (std::int64_t t = 7; t < 9; ++t) pieces.push_back(gpt->forward(ids.narrow(1, t, 1), &cache));
  EXPECT_EQ(cache.length(), 9);
  EXPECT_TRUE(torch::allclose(torch::cat(pieces, 1), whole, 1e-5, 1e-5));
}

TEST_F(GenerationTest, GreedyGenerationWithAnEditEqualsStepByStepForwardsWithIt) {
  FlexModel fm(gpt);
  fm.create_hook_group("steer", "layers.0", {}, hooks::add_vector(direction));
  const auto generated = generate(fm, Groups{"steer"}, prompt, GenerationOptions().max_new_tokens(8));
  ASSERT_EQ(generated.sizes(), (c10::IntArrayRef{2, 13}));
  EXPECT_TRUE(torch::equal(generated.narrow(1, 0, 5), prompt));
  EXPECT_TRUE(torch::equal(generated, step_by_step(prompt, 8, [&](const torch::Tensor& ids) {
                             return fm.forward(Groups{"steer"}, ids);
                           })));
  // The edit matters: without it the tokens differ.
  EXPECT_FALSE(torch::equal(generated, generate(fm, Groups::none(), prompt, GenerationOptions().max_new_tokens(8))));
}

TEST_F(GenerationTest, HooksFireEveryStepAndKnowTheStepAndItsPositions) {
  FlexModel fm(gpt);
  std::vector<std::vector<std::int64_t>> seen;
  fm.register_forward_hook(HookFunction("layers.1", {}, [&](const torch::Tensor& x, HookContext& ctx) {
    seen.push_back({ctx.generation_step, ctx.position_begin, ctx.position_end, x.size(1)});
  }));
  generate(fm, Groups{}, prompt, GenerationOptions().max_new_tokens(3));
  EXPECT_EQ(seen, (std::vector<std::vector<std::int64_t>>{{0, 0, 5, 5}, {1, 5, 6, 1}, {2, 6, 7, 1}}));
  // One capture per step: the prompt's positions, then the new token's.
  const auto& captures = fm.outputs().at("layers.1");
  ASSERT_EQ(captures.size(), 3u);
  EXPECT_EQ(captures[1].sizes(), (c10::IntArrayRef{2, 1, 64}));
  seen.clear();
  fm.forward(prompt);
  EXPECT_EQ(seen, (std::vector<std::vector<std::int64_t>>{{-1, 0, 0, 5}}));
}

TEST_F(GenerationTest, SamplingIsReproducibleFromItsSeed) {
  FlexModel fm(gpt);
  auto sampled = [&](std::uint64_t seed, std::int64_t top_k = 0) {
    return generate(fm, Groups::none(), prompt,
                    GenerationOptions().max_new_tokens(12).greedy(false).temperature(2.0).top_k(top_k).seed(seed));
  };
  EXPECT_TRUE(torch::equal(sampled(7), sampled(7)));
  EXPECT_FALSE(torch::equal(sampled(7), sampled(8)));
  // Sampling among the single top token is greedy decoding.
  EXPECT_TRUE(torch::equal(sampled(7, 1), generate(fm, Groups::none(), prompt, GenerationOptions().max_new_tokens(12))));
}

TEST(Generation, ATorchScriptModelGeneratesAsItsStepByStepForwardsDo) {
  ScriptFlexModel fm(std::string(FLEXMODEL_FIXTURE_DIR) + "/gpt_scripted.pt");
  const auto prompt = read_npy(std::string(FLEXMODEL_FIXTURE_DIR) + "/tokens.npy").narrow(1, 0, 6);
  fm.create_hook_group("ablate", "layers.1.mlp", {}, hooks::zero_ablation());
  std::vector<std::int64_t> positions_end;
  fm.register_forward_hook(HookFunction("layers.0", {}, [&](const torch::Tensor&, HookContext& ctx) {
    positions_end.push_back(ctx.position_end);
  }));
  fm.update_hook_groups(fm.hooks().back(), "ablate");
  const auto generated = generate(fm, Groups{"ablate"}, prompt, GenerationOptions().max_new_tokens(5));
  EXPECT_EQ(positions_end, (std::vector<std::int64_t>{6, 7, 8, 9, 10}));
  EXPECT_TRUE(torch::equal(generated, step_by_step(prompt, 5, [&](const torch::Tensor& ids) {
                             return first_tensor(fm.forward(Groups{"ablate"}, {ids}));
                           })));
  EXPECT_FALSE(torch::equal(generated, generate(fm, Groups::none(), prompt, GenerationOptions().max_new_tokens(5))));
}

TEST_F(GenerationTest, APromptThatIsNotIdsIsRefused) {
  FlexModel fm(gpt);
  EXPECT_NE(testing::error_of([&] { generate(fm, Groups{}, torch::zeros({2, 3})); })
                .find("generate: the prompt must be int64 ids [batch, positions], not Float [2, 3]"),
            std::string::npos);
}

}  // namespace
}  // namespace flexmodel
