// TorchScript models against PyTorch's own hooks on the eager model that was
// exported (tests/fixtures/make_fixtures.py), for a scripted and a traced export.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "flexmodel/cache.h"
#include "flexmodel/flexmodel.h"
#include "flexmodel/hooks/editing.h"
#include "flexmodel/npy.h"
#include "flexmodel/torchscript.h"
#include "fixture_reference.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;
using testing::kFixtures;
using testing::Reference;

class TorchScriptTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string path() const { return kFixtures + "/" + GetParam(); }
};

// torch.jit.trace keeps only what the traced run used: the attention
// probabilities that the decoder layers return and the model drops are gone.
bool dropped_by_trace(const Reference::Capture& capture) {
  return capture.type == HookType::forward && capture.leaf > 0 &&
         (Pattern("layers.*.attn").matches(capture.module) || Pattern("layers.*").matches(capture.module));
}

TEST_P(TorchScriptTest, EveryCaptureEqualsPyTorchsOwnHooks) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  const bool traced = GetParam() == "gpt_traced.pt";
  auto captures = reference.captures();
  ASSERT_GT(captures.size(), 40u);
  if (traced) std::erase_if(captures, dropped_by_trace);
  for (const auto& capture : captures) {
    fm.register_hook_function(HookFunction(capture.module).unpack_idx(capture.leaf), capture.type);
  }
  torch::NoGradGuard no_grad;
  auto logits = fm.forward({reference.tokens}).toTensor();
  EXPECT_TRUE(torch::allclose(logits, reference.tensors.at("logits"), 0, 1e-6));
  // Several hooks on one point capture into one series, in registration order.
  std::map<std::pair<std::string, HookType>, std::size_t> seen;
  for (const auto& capture : captures) {
    const auto& series = fm.outputs().at(capture.module, capture.type);
    const torch::Tensor& ours = series.at(seen[{capture.module, capture.type}]++);
    const torch::Tensor& theirs = reference.tensors.at(capture.key);
    ASSERT_EQ(ours.sizes(), theirs.sizes()) << capture.key;
    EXPECT_TRUE(torch::allclose(ours.to(torch::kDouble), theirs.to(torch::kDouble), 0, 1e-6)) << capture.key;
  }
}

TEST(TorchScript, WhatATraceDroppedCannotBeHookedAndSaysSo) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(kFixtures + "/gpt_traced.pt");
  fm.register_forward_hook(HookFunction("layers.0.attn").unpack_idx(1));
  try {
    fm.forward({reference.tokens});
    ADD_FAILURE() << "a hook on a leaf the trace dropped fired";
  } catch (const ShapeError& error) {
    EXPECT_NE(std::string(error.what()).find("has unpack_idx 1 but the module's output has 1 tensor(s)"),
              std::string::npos)
        << error.what();
  }
}

TEST_P(TorchScriptTest, EditsChangeTheLogitsAsTheSameEditWithPyTorchHooks) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  fm.create_hook_group("zero_mlp", "layers.1.mlp", {}, hooks::zero_ablation());
  fm.create_hook_group("scale_residual", "layers.0", {}, hooks::scale(0.5), /*unpack_idx=*/0);
  torch::NoGradGuard no_grad;
  auto zeroed = fm.forward(Groups{"zero_mlp"}, {reference.tokens}).toTensor();
  auto scaled = fm.forward(Groups{"scale_residual"}, {reference.tokens}).toTensor();
  auto plain = fm.forward(Groups{"all"}.complement(), {reference.tokens}).toTensor();
  EXPECT_TRUE(torch::allclose(zeroed, reference.tensors.at("logits_zero_mlp"), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(scaled, reference.tensors.at("logits_scale_residual"), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(plain, reference.tensors.at("logits"), 0, 1e-6));
}

// A cache holds this run's tensors of the selected points, as PyTorch's hooks
// saw them, in forward order; the model's own hooks neither run nor grow.
TEST_P(TorchScriptTest, RunWithCacheHoldsWhatPyTorchsHooksSawForThatRunOnly) {
  const auto& reference = Reference::get();
  FlexModel fm(path());
  fm.register_forward_hook(HookFunction("layers.0.ln_1"));
  auto [logits, cache] = run_with_cache(fm, "layers.*.mlp", std::vector<torch::IValue>{reference.tokens});
  EXPECT_TRUE(torch::allclose(logits.toTensor(), reference.tensors.at("logits"), 0, 1e-6));
  std::vector<ActivationCache::Key> expected;
  for (const char* name : {"layers.0.mlp", "layers.1.mlp", "layers.2.mlp"}) {
    expected.emplace_back(name, HookType::forward);
    EXPECT_TRUE(torch::allclose(cache.at(name), reference.tensors.at(std::string("forward|") + name + "|0"), 0, 1e-6))
        << name;
  }
  EXPECT_EQ(cache.keys(), expected);
  EXPECT_TRUE(torch::equal(cache.stack("layers.*.mlp")[1], cache.at("layers.1.mlp")));
  EXPECT_TRUE(fm.outputs().empty()) << "the model's own hook ran, or the cache's captured";
  EXPECT_EQ(fm.hooks().size(), 1u);
  EXPECT_EQ(fm.hook_groups(), std::set<std::string>{kAllGroup});
  // Cast as captured: bf16 copies of the same tensors.
  auto [unused, small] = run_with_cache(fm, "layers.0.mlp", CacheOptions().dtype(torch::kBFloat16),
                                        std::vector<torch::IValue>{reference.tokens});
  EXPECT_EQ(small.at("layers.0.mlp").scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(small.at("layers.0.mlp"), cache.at("layers.0.mlp").to(torch::kBFloat16)));
}

TEST_P(TorchScriptTest, InstancesThatShareAClassAreToldApart) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  fm.register_forward_hook(HookFunction("layers.1.ln_1"));
  fm.register_forward_hook(HookFunction("layers.2.mlp", {}, hooks::zero_ablation()).capture(false));
  torch::NoGradGuard no_grad;
  fm.forward({reference.tokens});
  ASSERT_EQ(fm.outputs().keys().size(), 1u);
  EXPECT_TRUE(torch::allclose(fm.outputs().at("layers.1.ln_1")[0], reference.tensors.at("forward|layers.1.ln_1|0"), 0,
                              1e-6));
  EXPECT_FALSE(torch::allclose(fm.outputs().at("layers.1.ln_1")[0], reference.tensors.at("forward|layers.0.ln_1|0")));
}

TEST_P(TorchScriptTest, RestoreGivesBackTheOriginalGraphsAndTheModuleStillSaves) {
  const auto& reference = Reference::get();
  auto module = load_torchscript(path());
  torch::NoGradGuard no_grad;
  auto before = module.forward({reference.tokens}).toTensor();
  ScriptFlexModel fm(module);
  fm.create_hook_group("zero", "layers.*.attn", {}, hooks::zero_ablation());
  EXPECT_FALSE(torch::equal(fm.forward({reference.tokens}).toTensor(), before));
  fm.restore();
  EXPECT_TRUE(torch::equal(fm.forward({reference.tokens}).toTensor(), before));
  EXPECT_TRUE(torch::equal(module.forward({reference.tokens}).toTensor(), before));
  const auto saved = std::filesystem::temp_directory_path() / ("flexmodel_resaved_" + GetParam());
  module.save(saved.string());
  const std::string command = std::string(FLEXMODEL_SYSTEM_PYTHON) + " -c \"import torch, sys; m = torch.jit.load('" +
                              saved.string() + "'); t = torch.jit.load('" + kFixtures +
                              "/reference.pt').tensors; sys.exit(0 if torch.equal(m(t['tokens']), m(t['tokens'])) "
                              "and 'flexmodel' not in str(m.graph) and torch.allclose(m(t['tokens']), t['logits'], "
                              "rtol=0, atol=1e-6) else 1)\"";
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  std::filesystem::remove(saved);
}

TEST_P(TorchScriptTest, EditsAreTransparentToAutograd) {
  const auto& reference = Reference::get();
  auto module = load_torchscript(path());
  auto bias = [&] {
    return module.attr("layers").toModule().attr("0").toModule().attr("mlp").toModule().attr("fc_out").toModule().attr(
        "bias").toTensor();
  };
  for (const auto& parameter : module.parameters()) parameter.mutable_grad() = torch::Tensor();
  module.forward({reference.tokens}).toTensor().pow(2).sum().backward();
  auto plain_grad = bias().grad().clone();
  bias().mutable_grad() = torch::Tensor();

  ScriptFlexModel fm(module);
  // Same value, twice the gradient: everything inside layers.0.mlp gets exactly 2×.
  fm.register_forward_hook(
      HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) { return x * 2 - x.detach(); }).capture(false));
  // Backward hooks on layers.2.mlp: the gradients of its output and of its input
  // (ln_2's output, which only the MLP reads), checked against autograd.
  fm.register_full_backward_pre_hook(HookFunction("layers.2.mlp"));
  fm.register_full_backward_hook(HookFunction("layers.2.mlp"));
  fm.register_forward_hook(HookFunction("layers.2.mlp", {}, [](const torch::Tensor& x, HookContext& ctx) {
                             ctx.save_ctx.set("mlp2", x);
                           }).capture(false));
  fm.register_forward_pre_hook(HookFunction("layers.2.mlp", {}, [](const torch::Tensor& x, HookContext& ctx) {
                                 ctx.save_ctx.set("mlp2_input", x);
                               }).capture(false));
  auto logits = fm.forward({reference.tokens}).toTensor();
  auto loss = logits.pow(2).sum();
  auto expected = torch::autograd::grad(
      {loss}, {fm.save_ctx().get<torch::Tensor>("mlp2"), fm.save_ctx().get<torch::Tensor>("mlp2_input")}, {}, true);
  loss.backward();
  EXPECT_TRUE(torch::allclose(logits, reference.tensors.at("logits"), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(bias().grad(), plain_grad * 2, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(fm.outputs().at("layers.2.mlp", HookType::full_backward_pre)[0], expected[0], 1e-5,
                              1e-7));
  EXPECT_TRUE(torch::allclose(fm.outputs().at("layers.2.mlp", HookType::full_backward)[0], expected[1], 1e-5,
                              1e-7));
}

TEST_P(TorchScriptTest, GroupsWorkAsForNativeModels) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  EXPECT_EQ(fm.create_hook_group("mlps", "layers.*.mlp").size(), 3u);
  EXPECT_EQ(fm.create_hook_group("norm", "norm").size(), 1u);
  torch::NoGradGuard no_grad;
  for (int round = 0; round < 2; ++round) {
    fm.forward(Groups{"mlps"}, {reference.tokens});
    fm.forward(Groups{"mlps"}.complement(), {reference.tokens});
  }
  EXPECT_EQ(fm.outputs().at("layers.0.mlp").size(), 2u);
  EXPECT_EQ(fm.outputs().at("norm").size(), 2u);
  EXPECT_TRUE(torch::allclose(fm.outputs().at("norm")[1], reference.tensors.at("forward|norm|0"), 0, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Exports, TorchScriptTest, ::testing::Values("gpt_scripted.pt", "gpt_traced.pt"),
                         [](const auto& info) { return info.param.substr(4, info.param.size() - 7); });

TEST(TorchScript, TracedAndScriptedExportsGiveTheSameCaptures) {
  const auto& reference = Reference::get();
  ScriptFlexModel scripted(kFixtures + "/gpt_scripted.pt");
  ScriptFlexModel traced(kFixtures + "/gpt_traced.pt");
  for (auto* fm : {&scripted, &traced}) {
    fm->create_hook_group("every", "layers.*.*");
    fm->create_hook_group("every", "embed_*");
  }
  torch::NoGradGuard no_grad;
  scripted.forward({reference.tokens});
  traced.forward({reference.tokens});
  ASSERT_EQ(scripted.outputs().keys(), traced.outputs().keys());
  ASSERT_EQ(scripted.outputs().keys().size(), 14u);
  for (const auto& [name, type] : scripted.outputs().keys()) {
    EXPECT_TRUE(torch::allclose(scripted.outputs().at(name, type)[0], traced.outputs().at(name, type)[0], 0, 1e-6))
        << name;
  }
}

TEST(TorchScript, ErrorsNameTheFileOrModule) {
  auto message = error_of([] { load_torchscript("/nonexistent/model.pt"); });
  EXPECT_NE(message.find("'/nonexistent/model.pt' does not exist"), std::string::npos) << message;

  const auto garbage = std::filesystem::temp_directory_path() / "flexmodel_not_torchscript.pt";
  std::ofstream(garbage) << "not a model";
  message = error_of([&] { load_torchscript(garbage.string()); });
  EXPECT_NE(message.find("is not a TorchScript file"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "one line expected: " << message;
  std::filesystem::remove(garbage);

  ScriptFlexModel fm(kFixtures + "/gpt_scripted.pt");
  message = error_of([&] { fm.register_forward_hook(HookFunction("layers.1.mpl")); });
  EXPECT_NE(message.find("no module named 'layers.1.mpl'"), std::string::npos) << message;
  EXPECT_NE(message.find("'layers.1.mlp'"), std::string::npos) << message;
  message = error_of([&] { fm.register_forward_hook(HookFunction("layers")); });
  EXPECT_NE(message.find("is a container with no forward method"), std::string::npos) << message;

  message = error_of([&] { fm.forward({torch::rand({2, 12})}); });
  EXPECT_NE(message.find("rejected its input"), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "one line expected: " << message;
}

TEST(TorchScript, AThrowingEditingFunctionKeepsItsTypeAndTheModelUsable) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(kFixtures + "/gpt_scripted.pt");
  auto thrower = fm.register_forward_hook(
      HookFunction("layers.1.mlp", {}, [](const torch::Tensor&) -> torch::Tensor { throw std::runtime_error("boom"); }));
  torch::NoGradGuard no_grad;
  EXPECT_THROW(fm.forward({reference.tokens}), HookError);
  fm.remove_hook(thrower);
  EXPECT_TRUE(torch::allclose(fm.forward({reference.tokens}).toTensor(), reference.tensors.at("logits"), 0, 1e-6));
}

TEST(Npy, ReadsWhatNumpyWrote) {
  auto tokens = read_npy(kFixtures + "/tokens.npy");
  EXPECT_TRUE(torch::equal(tokens, Reference::get().tokens));
  EXPECT_THROW(read_npy(kFixtures + "/reference.pt"), IOError);
}

}  // namespace
}  // namespace flexmodel
