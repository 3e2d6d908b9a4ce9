// The experiments (run_with_cache, scoped hooks on a pattern, activation and
// attribution patching, generation) under the mesh test_parallel runs on,
// against the same calls on the unsharded model in one process.
#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "flexmodel/dist.h"
#include "flexmodel/flexmodel.h"
#include "flexmodel/hooks/editing.h"
#include "flexmodel/parallel.h"
#include "mesh_shape.h"

namespace flexmodel {
namespace {

using testing::g_shape;

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

bool root() { return dist::world_rank() == 0; }

class ExperimentsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    full = models::GPT(
        models::GPTOptions().vocab_size(64).max_positions(16).d_model(32).n_heads(4).n_layers(4).d_mlp(64));
    full->eval();
    tokens = torch::randint(0, 64, {4, 8}, torch::TensorOptions().dtype(torch::kLong));
    corrupt = tokens.clone();
    corrupt.select(1, 2).fill_(5);
    mesh = dist::Mesh::create(g_shape);
    sharded = parallel::ParallelGPT(*full, mesh);
    sharded->eval();
    fm = std::make_unique<FlexModel<parallel::ParallelGPTImpl>>(
        sharded, FlexModelOptions().tp(g_shape.tp).pp(g_shape.pp).dp(g_shape.dp));
  }

  torch::NoGradGuard no_grad;
  models::GPT full{nullptr};
  torch::Tensor tokens, corrupt;
  std::shared_ptr<dist::Mesh> mesh;
  parallel::ParallelGPT sharded{nullptr};
  std::unique_ptr<FlexModel<parallel::ParallelGPTImpl>> fm;
  Metric metric = logit_difference(3, 5);
};

TEST_F(ExperimentsTest, RunWithCacheFillsRank0WithTheOneProcessActivationsInForwardOrder) {
  FlexModel reference(full);
  const auto expected = run_with_cache(reference, "layers.*", tokens);
  const auto expected_mlp = run_with_cache(reference, "layers.*.mlp", tokens).second;
  const auto ours = run_with_cache(*fm, "layers.*", tokens);
  const auto last = run_with_cache(*fm, "layers.*.mlp", CacheOptions().slice(Slice().positions(Index::last())), tokens);
  // Only the run's own hooks ran, and they are gone; nothing reached the output map.
  EXPECT_TRUE(fm->hooks().empty());
  EXPECT_TRUE(fm->outputs().empty());
  // Captures go to the output map again afterwards.
  fm->register_forward_hook(HookFunction("layers.3"));
  fm->forward(tokens);
  if (root()) EXPECT_TRUE(fm->outputs().contains("layers.3"));
  const ActivationCache& cache = ours.second;
  if (!root()) {
    EXPECT_EQ(cache.size(), 0u);
    EXPECT_NE(error_of([&] { cache.at("layers.0"); }).find("fills the cache on rank 0"), std::string::npos);
    EXPECT_NE(error_of([&] { cache.save("never.h5"); }).find("read or save it there"), std::string::npos);
    return;
  }
  EXPECT_TRUE(torch::allclose(ours.first, expected.first, 1e-5, 1e-5));
  ASSERT_EQ(cache.keys(), expected.second.keys());
  for (const auto& [name, type] : cache.keys()) {
    EXPECT_TRUE(torch::allclose(cache.at(name, type), expected.second.at(name, type), 1e-5, 1e-5)) << name;
  }
  ASSERT_EQ(last.second.size(), 4u);
  for (const auto& [name, type] : expected_mlp.keys()) {
    const torch::Tensor& whole = expected_mlp.at(name, type);
    EXPECT_TRUE(torch::allclose(last.second.at(name, type), whole.narrow(1, whole.size(1) - 1, 1), 1e-5, 1e-5)) << name;
  }
}

TEST_F(ExperimentsTest, ScopedHooksOnAPatternEditEveryStageAndAreGoneAfterwards) {
  FlexModel reference(full);
  torch::Tensor expected, edited;
  {
    ScopedHooks scope(reference);
    scope.add(Pattern("layers.*.mlp"), HookFunction("", {}, hooks::scale(0.5)));
    expected = reference.forward(scope.only(), tokens);
  }
  {
    ScopedHooks scope(*fm);
    EXPECT_EQ(scope.add(Pattern("layers.*.mlp"), HookFunction("", {}, hooks::scale(0.5))).size(), 4u);
    edited = fm->forward(scope.only(), tokens);
  }
  EXPECT_TRUE(fm->hooks().empty());
  const torch::Tensor plain = fm->forward(tokens);
  if (!root()) return;
  EXPECT_TRUE(torch::allclose(edited, expected, 1e-5, 1e-5)) << "max |Δ| " << (edited - expected).abs().max();
  EXPECT_FALSE(torch::allclose(plain, expected, 1e-3, 1e-3));
}

TEST_F(ExperimentsTest, ActivationPatchingGivesEveryRankTheOneProcessTable) {
  FlexModel reference(full);
  const auto heads = PatchingOptions().hook_type(HookType::forward_pre).heads(4);
  const auto expected = activation_patching(reference, "layers.*", tokens, corrupt, metric);
  const auto expected_heads = activation_patching(reference, "layers.1.attn.proj", tokens, corrupt, metric, heads);
  const auto expected_default = activation_patching(reference, "layers.3", tokens, corrupt);
  const auto table = activation_patching(*fm, "layers.*", tokens, corrupt, metric);
  // The projection's input is split over tp: each head is patched where the one process has it.
  const auto by_head = activation_patching(*fm, "layers.1.attn.proj", tokens, corrupt, metric, heads);
  const auto by_default = activation_patching(*fm, "layers.3", tokens, corrupt);
  // A patch of the changed position moves the metric, so the table measures something.
  ASSERT_GT((expected.effect - expected.corrupt_metric).abs().max().item<double>(), 1e-3);
  for (const auto* pair : {&table, &by_head, &by_default}) {
    const PatchingResult& ours = *pair;
    const PatchingResult& theirs = pair == &table ? expected : pair == &by_head ? expected_heads : expected_default;
    EXPECT_EQ(ours.points, theirs.points);
    ASSERT_EQ(ours.effect.sizes(), theirs.effect.sizes());
    EXPECT_TRUE(torch::allclose(ours.effect, theirs.effect, 1e-5, 1e-5))
        << ours.points.front() << " max |Δ| " << (ours.effect - theirs.effect).abs().max();
    EXPECT_NEAR(ours.clean_metric, theirs.clean_metric, 1e-5);
    EXPECT_NEAR(ours.corrupt_metric, theirs.corrupt_metric, 1e-5);
  }
  EXPECT_TRUE(fm->hooks().empty());
  EXPECT_TRUE(fm->outputs().empty());
  // A metric that fails runs on rank 0 alone; every rank raises its error and goes on.
  const Metric two_values = [](const torch::Tensor& logits) { return logits.sum(-1).flatten().narrow(0, 0, 2); };
  EXPECT_NE(error_of([&] { activation_patching(*fm, "layers.3", tokens, corrupt, two_values); })
                .find("it must return one value"),
            std::string::npos);
  EXPECT_TRUE(fm->hooks().empty());
  const torch::Tensor logits = fm->forward(tokens);
  if (root()) EXPECT_TRUE(torch::allclose(logits, full->forward(tokens), 1e-5, 1e-5));
}

// Attribution needs a backward through the model, which flexmodel::parallel's
// layers do not carry between ranks: refused on every rank, before any forward
// where tp or pp split the model, and after the corrupt forward otherwise; the
// next forward runs. (The TorchScript test below runs it under dp.)
TEST_F(ExperimentsTest, AttributionPatchingOfTheParallelLayersIsRefusedOnEveryRank) {
  // Frozen weights stay frozen when the run fails.
  for (auto& parameter : sharded->parameters()) parameter.requires_grad_(false);
  const std::int64_t before = fm->forwards_run();
  const std::string error = error_of([&] { attribution_patching(*fm, "layers.*", tokens, corrupt, metric); });
  if (g_shape.tp != 1 || g_shape.pp != 1) {
    EXPECT_NE(error.find("run it under dp alone, or use activation_patching"), std::string::npos) << error;
    EXPECT_EQ(fm->forwards_run(), before);
  } else {
    EXPECT_NE(error.find("the corrupt forward's logits carry no gradient"), std::string::npos) << error;
  }
  EXPECT_TRUE(fm->hooks().empty());
  for (const auto& parameter : sharded->parameters()) {
    EXPECT_FALSE(parameter.requires_grad());
    EXPECT_FALSE(parameter.grad().defined());
  }
  const torch::Tensor logits = fm->forward(tokens);
  if (root()) EXPECT_TRUE(torch::allclose(logits, full->forward(tokens), 1e-5, 1e-5));
}

TEST_F(ExperimentsTest, GenerationGivesEveryRankTheOneProcessTokensAndStepCaptures) {
  // The one process runs models::GPT with its key/value cache; the mesh, the whole sequence each step.
  FlexModel reference(full);
  for (FlexModelBase* model : std::initializer_list<FlexModelBase*>{&reference, fm.get()}) {
    model->create_hook_group("steer", "layers.2", {}, hooks::scale(0.5));
    model->create_hook_group("steer", "layers.3");
  }
  const torch::Tensor prompt = tokens.narrow(1, 0, 4);
  for (const bool greedy : {true, false}) {
    const auto options = GenerationOptions().max_new_tokens(4).greedy(greedy).temperature(0.8).top_k(10).seed(7);
    reference.outputs().clear();
    fm->outputs().clear();
    const torch::Tensor expected = generate(reference, Groups{"steer"}, prompt, options);
    const torch::Tensor ids = generate(*fm, Groups{"steer"}, prompt, options);
    EXPECT_TRUE(torch::equal(ids, expected)) << (greedy ? "greedy" : "sampled") << "\n" << ids << "\n" << expected;
    if (!root()) continue;
    const auto& ours = fm->outputs().at("layers.3");
    const auto& theirs = reference.outputs().at("layers.3");
    ASSERT_EQ(ours.size(), 4u);
    ASSERT_EQ(theirs.size(), 4u);
    for (std::size_t step = 0; step < 4; ++step) {
      // The newest position of each step, after the edited layer.
      EXPECT_EQ(ours[step].size(1), 4 + static_cast<std::int64_t>(step));
      EXPECT_TRUE(torch::allclose(ours[step].select(1, -1), theirs[step].select(1, -1), 1e-5, 1e-5)) << step;
    }
  }
}

// ParallelAttention offers models::Attention's value hook points on its own
// heads: hooks see and edit every rank's, in the model's head order.
TEST_F(ExperimentsTest, ValueHookPointsOfTheParallelAttentionAreTheOneProcessHeadsInOrder) {
  FlexModel reference(full);
  for (FlexModelBase* model : std::initializer_list<FlexModelBase*>{&reference, fm.get()}) {
    model->create_hook_group("read", "layers.*.attn::pattern");
    model->create_hook_group("read", "layers.2.attn::z");
    model->create_hook_group("zero", "layers.1.attn::z", {}, [](torch::Tensor z) {
      z.select(1, 3).zero_();
      return z;
    });
  }
  const torch::Tensor expected = reference.forward(Groups{"zero"}, tokens);
  const torch::Tensor edited = fm->forward(Groups{"zero"}, tokens);
  reference.forward(Groups{"read"}, tokens);
  fm->forward(Groups{"read"}, tokens);
  if (!root()) return;
  EXPECT_TRUE(torch::allclose(edited, expected, 1e-5, 1e-5)) << "max |Δ| " << (edited - expected).abs().max();
  EXPECT_FALSE(torch::allclose(edited, full->forward(tokens), 1e-3, 1e-3));
  for (const auto* name : {"layers.0.attn::pattern", "layers.3.attn::pattern", "layers.2.attn::z"}) {
    const torch::Tensor& ours = fm->outputs().at(name)[0];
    ASSERT_EQ(ours.sizes(), reference.outputs().at(name)[0].sizes()) << name;
    EXPECT_TRUE(torch::allclose(ours, reference.outputs().at(name)[0], 1e-5, 1e-5)) << name;
  }
}

// The TorchScript path under dp: the cache, attribution patching and generation.
TEST(TorchScriptExperiments, CacheAttributionAndGenerationUnderDataParallelismEqualOneProcess) {
  if (g_shape.tp != 1 || g_shape.pp != 1) {
    GTEST_SKIP() << "a TorchScript model has no tensor-parallel layers or stages; this mesh is for ParallelGPT";
  }
  const std::string path = std::string(FLEXMODEL_FIXTURE_DIR) + "/gpt_scripted.pt";
  torch::manual_seed(5);
  const torch::Tensor tokens = torch::randint(0, 256, {4, 12});
  torch::Tensor changed = tokens.clone();
  changed.select(1, 6).fill_(9);
  const std::vector<torch::IValue> clean{tokens}, corrupt{changed};
  ScriptFlexModel single(path);
  ScriptFlexModel sharded(path, FlexModelOptions().dp(g_shape.dp));
  const Metric metric = logit_difference(1, 2);

  torch::NoGradGuard no_grad;
  const auto expected_cache = run_with_cache(single, "layers.*.mlp", clean).second;
  const auto cache = run_with_cache(sharded, "layers.*.mlp", clean).second;
  const auto expected = attribution_patching(single, "layers.*", clean, corrupt, metric);
  // Frozen weights stay frozen, and no gradient is left on them.
  sharded.wrapped_module_requires_grad(false);
  const auto table = attribution_patching(sharded, "layers.*", clean, corrupt, metric);
  for (const auto& [name, parameter] : sharded.named_parameters()) {
    EXPECT_FALSE(parameter.requires_grad()) << name;
    EXPECT_FALSE(parameter.grad().defined()) << name;
  }
  const auto options = GenerationOptions().max_new_tokens(3).greedy(false).seed(3);
  const torch::Tensor expected_ids = generate(single, Groups::none(), tokens.narrow(1, 0, 5), options);
  const torch::Tensor ids = generate(sharded, Groups::none(), tokens.narrow(1, 0, 5), options);

  EXPECT_TRUE(torch::equal(ids, expected_ids)) << ids << "\n" << expected_ids;
  ASSERT_EQ(table.effect.sizes(), expected.effect.sizes());
  EXPECT_TRUE(torch::allclose(table.effect, expected.effect, 1e-5, 1e-5))
      << "max |Δ| " << (table.effect - expected.effect).abs().max();
  EXPECT_GT((expected.effect - expected.corrupt_metric).abs().max().item<double>(), 1e-3);
  if (!root()) return;
  ASSERT_EQ(cache.keys(), expected_cache.keys());
  for (const auto& [name, type] : cache.keys()) {
    EXPECT_TRUE(torch::allclose(cache.at(name, type), expected_cache.at(name, type), 1e-5, 1e-6)) << name;
  }
}

}  // namespace
}  // namespace flexmodel
