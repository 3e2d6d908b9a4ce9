// Activation patching against each patch run by hand (whole-tensor edits, no
// slices), and attribution patching against gradient × difference computed
// with LibTorch's autograd directly.
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>

#include "flexmodel/patching.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;

class PatchingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    gpt = models::GPT(models::GPTOptions());
    clean = torch::randint(0, 256, {2, 5});
    corrupt = clean.clone();
    corrupt.select(1, 1).fill_(7);  // the corrupt prompt differs at position 1
  }

  // The clean run's activation at `name`, captured by an editing function of our own.
  torch::Tensor clean_activation(const std::string& name, HookType type = HookType::forward) {
    torch::Tensor kept;
    FlexModel fm(gpt);
    fm.register_hook_function(HookFunction(name, {}, [&](const torch::Tensor& x) { kept = x.detach().clone(); }), type);
    torch::NoGradGuard no_grad;
    fm.forward(clean);
    return kept;
  }

  // The corrupt run's metric with `edit` applied to the whole tensor at `name`.
  double patched_by_hand(const std::string& name, HookType type,
                         const std::function<torch::Tensor(torch::Tensor)>& edit) {
    FlexModel fm(gpt);
    fm.register_hook_function(HookFunction(name, {}, [&](const torch::Tensor& x) { return edit(x.clone()); }), type);
    torch::NoGradGuard no_grad;
    return metric(fm.forward(corrupt)).item<double>();
  }

  models::GPT gpt{nullptr};
  torch::Tensor clean, corrupt;
  Metric metric = logit_difference(3, 7);
};

TEST_F(PatchingTest, TheSweepEqualsEachPositionPatchedByHand) {
  FlexModel fm(gpt);
  const auto table = activation_patching(fm, "layers.*", clean, corrupt, metric);
  ASSERT_EQ(table.points, (std::vector<std::string>{"layers.0", "layers.1"}));
  ASSERT_EQ(table.effect.sizes(), (c10::IntArrayRef{2, 5}));
  torch::NoGradGuard no_grad;
  EXPECT_NEAR(table.clean_metric, metric(gpt->forward(clean)).item<double>(), 1e-6);
  EXPECT_NEAR(table.corrupt_metric, metric(gpt->forward(corrupt)).item<double>(), 1e-6);
  for (std::size_t p = 0; p < table.points.size(); ++p) {
    const auto source = clean_activation(table.points[p]);
    for (std::int64_t t = 0; t < 5; ++t) {
      const double by_hand = patched_by_hand(table.points[p], HookType::forward, [&](torch::Tensor x) {
        x.select(1, t).copy_(source.select(1, t));
        return x;
      });
      EXPECT_NEAR(table.effect[p][t].item<double>(), by_hand, 1e-5) << table.points[p] << " position " << t;
    }
  }
  // The last layer's last position is all the last logits read: patching it restores the clean metric.
  EXPECT_NEAR(table.normalized()[1][4].item<double>(), 1.0, 1e-5);
  // Positions before the corrupted one carry nothing of it (causal attention).
  EXPECT_NEAR(table.normalized()[0][0].item<double>(), 0.0, 1e-6);
}

TEST_F(PatchingTest, HeadsOfTheProjectionsInputArePatchedOneByOne) {
  FlexModel fm(gpt);
  const auto table = activation_patching(fm, "layers.*.attn.proj", clean, corrupt, metric,
                                         PatchingOptions().hook_type(HookType::forward_pre).heads(4));
  ASSERT_EQ(table.effect.sizes(), (c10::IntArrayRef{2, 4}));
  for (std::size_t p = 0; p < 2; ++p) {
    const auto source = clean_activation(table.points[p], HookType::forward_pre).view({2, 5, 4, 16});
    for (std::int64_t h = 0; h < 4; ++h) {
      const double by_hand = patched_by_hand(table.points[p], HookType::forward_pre, [&](torch::Tensor x) {
        x.view({2, 5, 4, 16}).select(2, h).copy_(source.select(2, h));
        return x;
      });
      EXPECT_NEAR(table.effect[p][h].item<double>(), by_hand, 1e-5) << table.points[p] << " head " << h;
    }
  }
}

TEST_F(PatchingTest, AttributionIsTheCorruptMetricPlusGradientTimesDifference) {
  FlexModel fm(gpt);
  const auto table = attribution_patching(fm, "layers.*", clean, corrupt, metric);
  // By hand: the corrupt run's activations, the metric's gradient with respect to them.
  std::vector<torch::Tensor> kept;
  FlexModel reference(gpt);
  reference.create_hook_group("keep", "layers.*", {}, [&](const torch::Tensor& x) { kept.push_back(x); });
  const torch::Tensor value = metric(reference.forward(Groups{"keep"}, corrupt));
  const auto gradients = torch::autograd::grad({value}, kept);
  for (std::size_t p = 0; p < 2; ++p) {
    const torch::Tensor difference = clean_activation(table.points[p]) - kept[p].detach();
    for (std::int64_t t = 0; t < 5; ++t) {
      const double expected = value.item<double>() + (gradients[p] * difference).select(1, t).sum().item<double>();
      EXPECT_NEAR(table.effect[p][t].item<double>(), expected, 1e-5) << table.points[p] << " position " << t;
    }
  }
  EXPECT_NEAR(table.corrupt_metric, value.item<double>(), 1e-6);
  // The model's own gradients are left alone.
  for (const auto& parameter : gpt->parameters()) EXPECT_FALSE(parameter.grad().defined());
}

TEST_F(PatchingTest, AttributionOfAFrozenModelIsTheSameAndLeavesItFrozen) {
  FlexModel fm(gpt);
  const auto expected = attribution_patching(fm, "layers.*", clean, corrupt, metric);
  fm.wrapped_module_requires_grad(false);
  const auto frozen = attribution_patching(fm, "layers.*", clean, corrupt, metric);
  EXPECT_TRUE(torch::allclose(frozen.effect, expected.effect, 1e-9, 1e-9));
  for (const auto& parameter : gpt->parameters()) {
    EXPECT_FALSE(parameter.requires_grad());
    EXPECT_FALSE(parameter.grad().defined());
  }
}

TEST_F(PatchingTest, AttributionRefusesAPointThatDiffersButGetsNoGradient) {
  // The token ids going into the embedding differ between the runs and have no gradient.
  FlexModel fm(gpt);
  EXPECT_NE(error_of([&] {
              attribution_patching(fm, "embed_tokens", clean, corrupt, metric,
                                   PatchingOptions().hook_type(HookType::forward_pre));
            }).find("no gradient reached 'embed_tokens' in the corrupt run's backward"),
            std::string::npos);
  EXPECT_TRUE(fm.hooks().empty());
}

TEST(Patching, OnTheBundledModelAttributionTracksTheExactSweep) {
  ScriptFlexModel fm(std::string(FLEXMODEL_FIXTURE_DIR) + "/gpt_scripted.pt");
  const auto tokens = read_npy(std::string(FLEXMODEL_FIXTURE_DIR) + "/tokens.npy");
  const std::vector<torch::IValue> clean{tokens.narrow(0, 0, 1)};
  torch::Tensor corrupted = tokens.narrow(0, 0, 1).clone();
  corrupted[0][3] = (corrupted[0][3] + 1) % 256;
  const std::vector<torch::IValue> corrupt{corrupted};
  // The log-probability of the clean run's answer at the last position.
  const std::int64_t answer = first_tensor(fm.forward(Groups::none(), clean)).select(1, -1).argmax(-1).item<std::int64_t>();
  const Metric log_prob = [answer](const torch::Tensor& logits) {
    return torch::log_softmax(logits.select(1, -1), -1).select(1, answer).mean();
  };
  const auto exact = activation_patching(fm, "layers.*", clean, corrupt, log_prob);
  const auto estimate = attribution_patching(fm, "layers.*", clean, corrupt, log_prob);
  ASSERT_EQ(exact.points, estimate.points);
  ASSERT_EQ(exact.effect.sizes(), (c10::IntArrayRef{3, 12}));
  EXPECT_NEAR(exact.clean_metric, estimate.clean_metric, 1e-5);
  EXPECT_NEAR(exact.corrupt_metric, estimate.corrupt_metric, 1e-5);
  const torch::Tensor a = exact.effect.flatten() - exact.effect.mean(), b = estimate.effect.flatten() - estimate.effect.mean();
  const double correlation = ((a * b).sum() / (a.norm() * b.norm())).item<double>();
  std::cout << "attribution vs exact patching on the bundled model (3 layers x 12 positions): correlation "
            << correlation << "\n";
  EXPECT_GT(correlation, 0.85);
  // Positions before the change carry nothing of it, exactly and estimated.
  for (std::int64_t t = 0; t < 3; ++t) {
    EXPECT_NEAR(exact.effect[0][t].item<double>(), exact.corrupt_metric, 1e-6);
    EXPECT_NEAR(estimate.effect[0][t].item<double>(), estimate.corrupt_metric, 1e-6);
  }
}

TEST_F(PatchingTest, PromptsOfOtherLengthsAreRefused) {
  FlexModel fm(gpt);
  const auto longer = torch::randint(0, 256, {2, 6});
  EXPECT_NE(error_of([&] { activation_patching(fm, "layers.0", clean, longer, metric); })
                .find("'layers.0' has a tensor of shape [2, 6, 64] in the corrupt run but [2, 5, 64] in the clean one; "
                      "give prompts of one length"),
            std::string::npos);
  EXPECT_NE(error_of([&] { attribution_patching(fm, "layers.0", clean, longer, metric); }).find("give prompts of one length"),
            std::string::npos);
  // The sweep's hooks are gone again.
  EXPECT_TRUE(fm.hooks().empty());
}

}  // namespace
}  // namespace flexmodel
