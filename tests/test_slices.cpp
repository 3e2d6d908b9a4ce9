// Slices of a hook's tensor against the same indexing of the whole tensor,
// done by hand with LibTorch's own indexing.
#include <gtest/gtest.h>

#include "test_models.h"

namespace flexmodel {
namespace {

using torch::indexing::None;
namespace ti = torch::indexing;
using testing::error_of;

class SliceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    gpt = models::GPT(models::GPTOptions());
    tokens = torch::randint(0, 256, {3, 6}, torch::kInt64);
  }

  // The GPT's logits with `edit` applied to the whole tensor at one hook point.
  torch::Tensor edited_by_hand(const std::string& name, HookType type,
                               const std::function<torch::Tensor(torch::Tensor)>& edit) {
    FlexModel fm(gpt);
    fm.register_hook_function(HookFunction(name, {}, [&](const torch::Tensor& x) { return edit(x.clone()); }), type);
    return fm.forward(tokens);
  }

  models::GPT gpt{nullptr};
  torch::Tensor tokens;
};

TEST_F(SliceTest, ACaptureKeepsTheSliceOfTheWholeActivation) {
  FlexModel fm(gpt);
  fm.register_forward_hook(HookFunction("layers.0.mlp"));
  fm.register_forward_hook(HookFunction("layers.0.mlp").slice(Slice().positions(Index::last())));
  fm.register_forward_hook(HookFunction("layers.1.mlp"));
  fm.register_forward_hook(HookFunction("layers.1.mlp").slice(Slice().positions(Index::range(1, 4)).rows(Index::at(2))));
  fm.register_forward_pre_hook(HookFunction("layers.0.attn.proj"));
  fm.register_forward_pre_hook(HookFunction("layers.0.attn.proj").slice(Slice().heads(Index::list({3, 1}), 4)));
  fm.register_forward_hook(HookFunction("layers.1.attn").unpack_idx(1));
  fm.register_forward_hook(HookFunction("layers.1.attn").unpack_idx(1).slice(Slice().heads_along(1, Index::range(-2))));
  torch::NoGradGuard no_grad;
  fm.forward(tokens);

  auto captures = [&](const std::string& name, HookType type = HookType::forward) {
    const auto& series = fm.outputs().at(name, type);
    EXPECT_EQ(series.size(), 2u) << name;
    return std::pair{series[0], series[1]};
  };
  auto [mlp0, last] = captures("layers.0.mlp");
  EXPECT_EQ(last.sizes(), (c10::IntArrayRef{3, 1, 64}));
  EXPECT_TRUE(torch::equal(last, mlp0.index({ti::Slice(), ti::Slice(-1, None)})));
  auto [mlp1, window] = captures("layers.1.mlp");
  EXPECT_TRUE(torch::equal(window, mlp1.index({ti::Slice(2, 3), ti::Slice(1, 4)})));
  auto [mixed, heads] = captures("layers.0.attn.proj", HookType::forward_pre);
  EXPECT_EQ(heads.sizes(), (c10::IntArrayRef{3, 6, 2, 16}));
  const auto per_head = mixed.view({3, 6, 4, 16});
  EXPECT_TRUE(torch::equal(heads.select(2, 0), per_head.select(2, 3)));
  EXPECT_TRUE(torch::equal(heads.select(2, 1), per_head.select(2, 1)));
  auto [pattern, last_two] = captures("layers.1.attn");
  EXPECT_TRUE(torch::equal(last_two, pattern.index({ti::Slice(), ti::Slice(2, 4)})));
}

TEST_F(SliceTest, AnEditReplacesItsSliceAndLeavesTheRestOfTheTensor) {
  // Zero the last position's MLP output: the same as zeroing it in the whole tensor.
  {
    FlexModel fm(gpt);
    fm.register_forward_hook(HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) { return torch::zeros_like(x); })
                                 .slice(Slice().positions(Index::last())));
    const auto by_hand = edited_by_hand("layers.0.mlp", HookType::forward, [](torch::Tensor x) {
      x.select(1, -1).zero_();
      return x;
    });
    EXPECT_TRUE(torch::equal(fm.forward(tokens), by_hand));
  }
  // Ablate head 1 where the heads are mixed back (the projection's input), and scale rows 0 and 2 at positions 1 and 4.
  {
    FlexModel fm(gpt);
    fm.register_forward_pre_hook(HookFunction("layers.1.attn.proj", {}, [](const torch::Tensor& x) { return x * 0; })
                                     .slice(Slice().heads(Index::at(1), 4)));
    fm.register_forward_hook(HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) { return x * 3; })
                                 .slice(Slice().rows(Index::list({2, 0})).positions(Index::list({4, 1}))));
    FlexModel reference(gpt);
    reference.register_forward_pre_hook(HookFunction("layers.1.attn.proj", {}, [](const torch::Tensor& x) {
      auto y = x.clone();
      y.view({3, 6, 4, 16}).select(2, 1).zero_();
      return y;
    }));
    reference.register_forward_hook(HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) {
      auto y = x.clone();
      for (std::int64_t row : {0, 2}) {
        for (std::int64_t position : {1, 4}) y[row][position].mul_(3);
      }
      return y;
    }));
    EXPECT_TRUE(torch::allclose(fm.forward(tokens), reference.forward(tokens), 0, 1e-6));
  }
}

TEST_F(SliceTest, AnInPlaceEditOfAListSliceReachesTheTensor) {
  // A list of indices is a copy of the tensor's rows: editing it in place must still edit the model's.
  FlexModel fm(gpt);
  fm.register_forward_hook(HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) { x.mul_(0); })
                               .slice(Slice().positions(Index::list({1, 3}))));
  const auto by_hand = edited_by_hand("layers.0.mlp", HookType::forward, [](torch::Tensor x) {
    x.select(1, 1).zero_();
    x.select(1, 3).zero_();
    return x;
  });
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(fm.forward(tokens), by_hand));
  EXPECT_NE(error_of([&] {
              FlexModel twice(gpt);
              twice.register_forward_hook(HookFunction("layers.0.mlp").slice(Slice().positions(Index::list({1, -5}))));
              twice.forward(tokens);
            }).find("name position 1 of dim 1 twice"),
            std::string::npos);
}

TEST_F(SliceTest, AutogradSeesASlicedEditAsTheSameEditOfTheWholeTensor) {
  auto gradient = [&](const std::function<void(FlexModel<models::GPTImpl>&)>& hook) {
    gpt->zero_grad();
    FlexModel fm(gpt);
    hook(fm);
    fm.forward(tokens).pow(2).sum().backward();
    return gpt->embed_tokens->weight.grad().clone();
  };
  const auto sliced = gradient([](auto& fm) {
    fm.register_forward_hook(HookFunction("layers.0", {}, [](const torch::Tensor& x) { return x * x; })
                                 .slice(Slice().positions(Index::range(2, 5))));
  });
  const auto whole = gradient([](auto& fm) {
    fm.register_forward_hook(HookFunction("layers.0", {}, [](const torch::Tensor& x) {
      auto parts = x.split({2, 3, 1}, 1);
      return torch::cat({parts[0], parts[1] * parts[1], parts[2]}, 1);
    }));
  });
  const auto none = gradient([](auto&) {});
  EXPECT_TRUE(torch::allclose(sliced, whole, 1e-5, 1e-6));
  EXPECT_FALSE(torch::allclose(sliced, none, 1e-5, 1e-6));
}

TEST_F(SliceTest, ExpectedShapeDescribesTheSlice) {
  FlexModel fm(gpt);
  fm.register_forward_hook(HookFunction("layers.0.mlp", {3, 1, 64}).slice(Slice().positions(Index::last())));
  EXPECT_NO_THROW(fm.forward(tokens));
  fm.register_forward_hook(HookFunction("layers.1.mlp", {3, 6, 64}).slice(Slice().positions(Index::last())));
  EXPECT_NE(error_of([&] { fm.forward(tokens); }).find("expected shape [3, 6, 64], got [3, 1, 64]"),
            std::string::npos);
}

TEST_F(SliceTest, ASliceTheTensorDoesNotHaveNamesTheHook) {
  auto fails_with = [&](const HookFunction& hook, HookType type = HookType::forward) {
    FlexModel fm(gpt);
    fm.register_hook_function(hook, type);
    std::string message;
    try {
      fm.forward(tokens);
    } catch (const ShapeError& error) {
      message = error.what();
    }
    // The model stays usable after the failed forward.
    fm.restore();
    EXPECT_EQ(fm.forward(tokens).sizes(), (c10::IntArrayRef{3, 6, 256}));
    return message;
  };
  EXPECT_NE(fails_with(HookFunction("layers.0.mlp").slice(Slice().positions(Index::range(4, 9))))
                .find("hook on 'layers.0.mlp' (forward), slicing a tensor of shape [3, 6, 64]: positions 4:9 is not a "
                      "non-empty range inside dim 1 of size 6"),
            std::string::npos);
  EXPECT_NE(fails_with(HookFunction("layers.0.mlp").slice(Slice().positions(Index::list({0, -7}))))
                .find("positions [0, -7]: index -7 is outside dim 1 of size 6"),
            std::string::npos);
  EXPECT_NE(fails_with(HookFunction("lm_head").slice(Slice().heads(Index::at(0), 5)))
                .find("hook on 'lm_head' (forward), slicing a tensor of shape [3, 6, 256]: slice heads of 5: the last "
                      "dim of [3, 6, 256] is not a multiple of 5"),
            std::string::npos);
  EXPECT_NE(fails_with(HookFunction("layers.0.mlp").slice(Slice().positions(Index::last(), 3)))
                .find("has no dim 3"),
            std::string::npos);
}

TEST(Index, ParsesFlexDumpsSyntaxAndRefusesTheRest) {
  const auto x = torch::arange(10);
  auto picked = [&](const char* text) { return Index::parse(text).take(x, 0, "positions"); };
  EXPECT_TRUE(torch::equal(picked("last"), torch::tensor({9})));
  EXPECT_TRUE(torch::equal(picked("all"), x));
  EXPECT_TRUE(torch::equal(picked("2:5"), torch::tensor({2, 3, 4})));
  EXPECT_TRUE(torch::equal(picked(":2"), torch::tensor({0, 1})));
  EXPECT_TRUE(torch::equal(picked("-2:"), torch::tensor({8, 9})));
  EXPECT_TRUE(torch::equal(picked("7,1,-1"), torch::tensor({7, 1, 9})));
  EXPECT_TRUE(torch::equal(picked("4"), torch::tensor({4})));
  EXPECT_EQ(Index::parse("3:").describe(), "3:");
  EXPECT_EQ(Index::parse("1,2").describe(), "[1, 2]");
  for (const char* bad : {"", "a", "1:b", "1,,2", "1.5", "last,1"}) {
    EXPECT_THROW(Index::parse(bad), ConfigError) << bad;
  }
  EXPECT_NE(error_of([] { Index::parse("1,2,1"); }).find("repeats index 1"), std::string::npos);
  EXPECT_NE(error_of([] { Slice().positions(Index::at(0)).heads_along(1, Index::at(0)).take(torch::zeros({2, 3, 4})); })
                .find("positions and heads both select along dim 1"),
            std::string::npos);
}

TEST_F(SliceTest, TheCacheHoldsOnlyItsSlice) {
  FlexModel fm(gpt);
  auto [logits, whole] = run_with_cache(fm, "layers.*.mlp", tokens);
  auto [same_logits, last] = run_with_cache(
      fm, "layers.*.mlp", CacheOptions().slice(Slice().positions(Index::last())), tokens);
  EXPECT_TRUE(torch::equal(logits, same_logits));
  for (const char* name : {"layers.0.mlp", "layers.1.mlp"}) {
    EXPECT_TRUE(torch::equal(last.at(name), whole.at(name).narrow(1, 5, 1))) << name;
  }
}

}  // namespace
}  // namespace flexmodel
