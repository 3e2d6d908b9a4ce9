// run_to_last_hook: the forward stops once its last hook has fired, and what
// the hooks saw is what a whole forward's hooks see.
#include <gtest/gtest.h>

#include "flexmodel/torchscript.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;

// Adds one and counts its calls, so a test sees which modules ran.
struct CountingImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) {
    ++calls;
    return x + 1;
  }
  int calls = 0;
};
FLEX_MODULE(Counting);

// a runs twice, then b, then c; `unused` never runs.
struct ChainImpl : torch::nn::Module {
  ChainImpl() {
    a = register_module("a", Counting());
    b = register_module("b", Counting());
    c = register_module("c", Counting());
    unused = register_module("unused", Counting());
  }
  torch::Tensor forward(const torch::Tensor& x) { return c(b(a(a(x)))); }
  Counting a{nullptr}, b{nullptr}, c{nullptr}, unused{nullptr};
};
FLEX_MODULE(Chain);

class RecordingSink final : public Sink {
 public:
  void write(const std::string& name, HookType, std::int64_t step, const torch::Tensor& snapshot) override {
    written.emplace_back(name, step, snapshot.clone());
  }
  void end_step(std::int64_t step) override { ended.push_back(step); }
  void abort_step(std::int64_t) noexcept override {}
  void close() override {}
  std::vector<std::tuple<std::string, std::int64_t, torch::Tensor>> written;
  std::vector<std::int64_t> ended;
};

TEST(RunToLastHook, StopsAfterTheLastFiringItLearntFromAWholeForward) {
  Chain chain;
  FlexModel fm(chain);
  auto sink = std::make_shared<RecordingSink>();
  fm.add_sink(sink);
  fm.create_hook_group("early", "a");
  const auto x = torch::zeros({2, 3});
  auto calls = [&] { return std::vector<int>{chain->a->calls, chain->b->calls, chain->c->calls}; };

  // The first forward of the group runs whole to learn where its last hook fires: a's second call.
  EXPECT_FALSE(fm.run_to_last_hook(Groups{"early"}, x));
  EXPECT_EQ(calls(), (std::vector<int>{2, 1, 1}));
  EXPECT_TRUE(fm.run_to_last_hook(Groups{"early"}, x));
  EXPECT_EQ(calls(), (std::vector<int>{4, 1, 1}));
  // Both calls of a were captured in each forward, and the stopped forward's step reached the sink.
  const auto& a = fm.outputs().at("a");
  ASSERT_EQ(a.size(), 4u);
  EXPECT_TRUE(torch::equal(a[2], x + 1));
  EXPECT_TRUE(torch::equal(a[3], x + 2));
  EXPECT_EQ(sink->ended, (std::vector<std::int64_t>{0, 1}));
  ASSERT_EQ(sink->written.size(), 4u);
  EXPECT_EQ(std::get<1>(sink->written[3]), 1);

  // A pre-hook that edits b's input: b itself does not run.
  fm.create_hook_group("edit", "b", HookFunction("", {}, [](const torch::Tensor& t) { return t * 10; }),
                       HookType::forward_pre);
  fm.register_forward_hook(HookFunction("c"));
  EXPECT_FALSE(fm.run_to_last_hook(Groups{"early", "edit"}, x));
  EXPECT_TRUE(fm.run_to_last_hook(Groups{"early", "edit"}, x));
  EXPECT_EQ(calls(), (std::vector<int>{8, 2, 2}));
  // forward() is untouched: every module runs, and the output is there.
  EXPECT_TRUE(torch::equal(fm.forward(Groups{"early", "edit"}, x), (x + 2) * 10 + 2));
  EXPECT_EQ(calls(), (std::vector<int>{10, 3, 3}));
}

TEST(RunToLastHook, AHookThatHasNotFiredKeepsEveryForwardWhole) {
  Chain chain;
  FlexModel fm(chain);
  fm.create_hook_group("g", "a");
  // A hook that has never fired might fire after the point a forward would stop at.
  fm.create_hook_group("g", "unused");
  const auto x = torch::zeros({1});
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(fm.run_to_last_hook(Groups{"g"}, x));
  EXPECT_EQ(chain->c->calls, 3);
}

TEST(RunToLastHook, GradientHooksNeedTheWholeForward) {
  Chain chain;
  FlexModel fm(chain);
  fm.create_hook_group("grad", "b", {}, {}, 0, HookType::full_backward);
  EXPECT_NE(error_of([&] { fm.run_to_last_hook(Groups{"grad"}, torch::zeros({1}, torch::requires_grad())); })
                .find("run_to_last_hook: a hook of the groups run is a gradient hook"),
            std::string::npos);
  // The model is usable afterwards.
  EXPECT_TRUE(torch::equal(fm.forward(Groups::none(), torch::zeros({1})), torch::full({1}, 4.0)));
}

TEST(RunToLastHook, ATorchScriptForwardCapturesWhatTheWholeForwardCaptures) {
  const std::string fixtures = FLEXMODEL_FIXTURE_DIR;
  for (const char* file : {"/gpt_scripted.pt", "/gpt_traced.pt"}) {
    ScriptFlexModel fm(fixtures + file);
    fm.create_hook_group("early", "layers.0.mlp");
    fm.create_hook_group("early", "layers.1.attn");
    const auto tokens = torch::randint(0, 256, {2, 12});
    EXPECT_FALSE(fm.run_to_last_hook(Groups{"early"}, {tokens})) << file;
    EXPECT_TRUE(fm.run_to_last_hook(Groups{"early"}, {tokens})) << file;
    // A whole forward() teaches it too.
    fm.create_hook_group("other", "layers.2.mlp");
    fm.forward(Groups{"other"}, {tokens});
    EXPECT_TRUE(fm.run_to_last_hook(Groups{"other"}, {tokens})) << file;
    for (const char* name : {"layers.0.mlp", "layers.1.attn", "layers.2.mlp"}) {
      const auto& series = fm.outputs().at(name);
      ASSERT_EQ(series.size(), 2u) << file << " " << name;
      EXPECT_TRUE(torch::equal(series[1], series[0])) << file << " " << name;
    }
  }
}

}  // namespace
}  // namespace flexmodel
