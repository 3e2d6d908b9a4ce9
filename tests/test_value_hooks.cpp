// Value hook points (`<module>::<value>`) of the scripted and the traced GPT
// fixture, against PyTorch's own captures of the same forward, the softmax
// recomputed by hand from the captured q and k, and the same edit made at a
// module hook point.
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>

#include "flexmodel/flexmodel.h"
#include "flexmodel/npy.h"
#include "flexmodel/models/gpt.h"
#include "fixture_reference.h"
#include "test_files.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;
using testing::kFixtures;
using testing::Reference;

constexpr std::int64_t kHeads = 4, kHeadDim = 8;

class ValueHooksTest : public ::testing::TestWithParam<std::string> {
 protected:
  std::string path() const { return kFixtures + "/" + GetParam(); }
  torch::NoGradGuard no_grad;
};

TEST_P(ValueHooksTest, TheAttentionPatternEqualsPyTorchsAndTheSoftmaxOfTheCapturedQueriesAndKeys) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  for (const auto* name : {"layers.0.attn::softmax.0", "layers.0.attn::q", "layers.0.attn::k",
                           "layers.1.attn::probs"}) {
    fm.register_forward_hook(HookFunction(name));
  }
  fm.forward({reference.tokens});
  // The attention module returns its probabilities too: PyTorch's hook saw them as leaf 1.
  const torch::Tensor& pattern = fm.outputs().at("layers.0.attn::softmax.0")[0];
  EXPECT_TRUE(torch::allclose(pattern, reference.tensors.at("forward|layers.0.attn|1"), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(fm.outputs().at("layers.1.attn::probs")[0], reference.tensors.at("forward|layers.1.attn|1"),
                              0, 1e-6));
  // Instances of one class are told apart.
  EXPECT_FALSE(torch::allclose(fm.outputs().at("layers.1.attn::probs")[0], pattern));
  const torch::Tensor& q = fm.outputs().at("layers.0.attn::q")[0];
  const torch::Tensor& k = fm.outputs().at("layers.0.attn::k")[0];
  ASSERT_EQ(q.sizes(), (c10::IntArrayRef{2, kHeads, 12, kHeadDim}));
  const auto time = q.size(2);
  const torch::Tensor future = torch::ones({time, time}, torch::kBool).triu(1);
  const torch::Tensor by_hand =
      torch::softmax((q.matmul(k.transpose(-2, -1)) / std::sqrt(static_cast<double>(kHeadDim))).masked_fill(future, -INFINITY), -1);
  EXPECT_TRUE(torch::allclose(pattern, by_hand, 1e-6, 1e-6));
}

TEST_P(ValueHooksTest, OneHeadOfAPatternIsASliceOfTheValue) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  fm.register_forward_hook(HookFunction("layers.0.attn::softmax.0").slice(Slice().heads_along(1, Index::at(2))));
  fm.forward({reference.tokens});
  EXPECT_TRUE(torch::allclose(fm.outputs().at("layers.0.attn::softmax.0")[0],
                              reference.tensors.at("forward|layers.0.attn|1").narrow(1, 2, 1), 0, 1e-6));
}

TEST_P(ValueHooksTest, ZeroingAHeadsPatternEqualsZeroingThatHeadsSliceOfTheProjectionInput) {
  const auto& reference = Reference::get();
  ScriptFlexModel fm(path());
  // A pattern in the value part, over every layer's attention.
  const auto pattern_hooks = fm.create_hook_group(
      "pattern", "layers.*.attn::softmax.*", {}, [](torch::Tensor x) {
        x.select(1, 2).zero_();
        return x;
      });
  EXPECT_EQ(pattern_hooks.size(), 3u);
  fm.create_hook_group("slice", "layers.*.attn.proj", {},
                       [](torch::Tensor x) {
                         x.narrow(-1, 2 * kHeadDim, kHeadDim).zero_();
                         return x;
                       },
                       0, HookType::forward_pre);
  const torch::Tensor by_value = fm.forward(Groups{"pattern"}, {reference.tokens}).toTensor();
  const torch::Tensor by_slice = fm.forward(Groups{"slice"}, {reference.tokens}).toTensor();
  const torch::Tensor plain = fm.forward(Groups::none(), {reference.tokens}).toTensor();
  EXPECT_TRUE(torch::allclose(by_value, by_slice, 1e-6, 1e-6)) << "max |Δ| " << (by_value - by_slice).abs().max();
  EXPECT_FALSE(torch::allclose(by_value, plain, 1e-3, 1e-3));
}

TEST_P(ValueHooksTest, ZeroingAHeadsPatternGivesTheLogitsOfPyTorchsModelWithThatHeadZeroed) {
  const auto& reference = Reference::get();
  testing::TempDir dir;
  ASSERT_EQ(testing::run_python(std::string(FLEXMODEL_TEST_SCRIPTS) + "/value_hooks/zeroed_head_logits.py " +
                                kFixtures + " 2 " + dir / "expected.npy"),
            0);
  const torch::Tensor expected = read_npy(dir / "expected.npy");
  ScriptFlexModel fm(path());
  // A new tensor, not an in-place edit: every later use reads it.
  fm.create_hook_group("zero", "layers.*.attn::softmax.0", {}, [](const torch::Tensor& pattern) {
    torch::Tensor zeroed = pattern.clone();
    zeroed.select(1, 2).zero_();
    return zeroed;
  });
  const torch::Tensor logits = fm.forward(Groups{"zero"}, {reference.tokens}).toTensor();
  EXPECT_TRUE(torch::allclose(logits, expected, 1e-5, 1e-5)) << "max |Δ| " << (logits - expected).abs().max();
  EXPECT_FALSE(torch::allclose(fm.forward(Groups::none(), {reference.tokens}).toTensor(), expected, 1e-3, 1e-3));
}

TEST_P(ValueHooksTest, ANameAndItsOpAreOneHookPointAndBadNamesSayWhy) {
  ScriptFlexModel fm(path());
  // `::*` is one name component: every named value, each once.
  const auto named = fm.select_hook_points("layers.0.attn::*").names;
  EXPECT_NE(std::find(named.begin(), named.end(), "layers.0.attn::probs"), named.end());
  // `**` spans the dots of op names: the pattern meets softmax.0 and probs, one value, selected once.
  const auto both = fm.select_hook_points("layers.0.attn::**").names;
  EXPECT_EQ(std::count_if(both.begin(), both.end(),
                          [](const std::string& name) { return name == "layers.0.attn::softmax.0" || name == "layers.0.attn::probs"; }),
            1);
  EXPECT_EQ(fm.select_hook_points("**::softmax.0").names.size(), 3u);
  const auto values = fm.value_points("layers.0.attn");
  const auto softmax = std::find_if(values.begin(), values.end(), [](const ValueInfo& v) { return v.op == "softmax.0"; });
  ASSERT_NE(softmax, values.end());
  EXPECT_EQ(softmax->name, "probs");
  EXPECT_EQ(softmax->kind, "aten::softmax");
  EXPECT_NE(error_of([&] { fm.register_forward_hook(HookFunction("layers.0.attn::softmax.1")); })
                .find("computes no value 'softmax.1'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { fm.register_forward_pre_hook(HookFunction("layers.0.attn::probs")); })
                .find("is a value hook point, which has no inputs"),
            std::string::npos);
  EXPECT_NE(error_of([&] { fm.create_hook_group("none", "layers.*.attn::nothing.*"); })
                .find("matches no value hook point"),
            std::string::npos);
  EXPECT_TRUE(fm.hooks().empty());
  fm.register_forward_hook(HookFunction("layers.0.attn::softmax.0", {}, [](const torch::Tensor& x) { return x.sum(-1); }));
  EXPECT_NE(error_of([&] { fm.forward({Reference::get().tokens}); })
                .find("editing function of hook on 'layers.0.attn::softmax.0' (forward) changed the shape"),
            std::string::npos);
}

// The root's own values, and edits of an in-place op's result, which later
// code reads through the tensor the op changed.
TEST(RootValueHooks, AnEditOfAnInPlaceResultReachesTheTensorItChanged) {
  torch::jit::Module module("Doubling");
  module.define(R"JIT(
def forward(self, x):
    y = x * 2
    y.add_(1)
    return y * 3
)JIT");
  ScriptFlexModel fm(module);
  const auto values = fm.value_points("(root)");
  ASSERT_EQ(values.size(), 3u);
  EXPECT_EQ(values[1].op, "add_.0");
  EXPECT_TRUE(values[1].aliases_input);
  const torch::Tensor x = torch::ones({2});
  fm.create_hook_group("zero", "(root)::add_.0", {}, [](const torch::Tensor& y) { return torch::zeros_like(y); });
  EXPECT_TRUE(torch::equal(fm.forward(Groups{"zero"}, {x}).toTensor(), torch::zeros({2})));
  // An edit of y replaces it for the later add_ and product: (5 + 1) · 3.
  fm.create_hook_group("five", "(root)::y", {}, [](const torch::Tensor& y) { return torch::full_like(y, 5); });
  EXPECT_TRUE(torch::equal(fm.forward(Groups{"five"}, {x}).toTensor(), torch::full({2}, 18.0)));
  EXPECT_TRUE(torch::equal(fm.forward(Groups::none(), {x}).toTensor(), torch::full({2}, 9.0)));
}

// models::GPT names its attention's tensors with flexmodel::nn::HookPoint
// children: on the fixture's weights, they are the export's values.
TEST(NativeValueHooks, TheGPTsPointsAreTheExportsValuesAndEditAlike) {
  const auto& reference = Reference::get();
  ScriptFlexModel exported(kFixtures + "/gpt_scripted.pt");
  FlexModel native(models::gpt_from_torchscript(exported.module(), "the fixture"));
  torch::NoGradGuard no_grad;
  for (FlexModelBase* model : std::initializer_list<FlexModelBase*>{&exported, &native}) {
    model->create_hook_group("read", "layers.1.attn::q");
    model->create_hook_group("read", "layers.1.attn::v");
  }
  native.create_hook_group("read", "layers.1.attn::pattern");
  exported.create_hook_group("read", "layers.1.attn::probs");
  exported.forward(Groups{"read"}, {reference.tokens});
  native.forward(Groups{"read"}, reference.tokens);
  for (const auto* name : {"layers.1.attn::q", "layers.1.attn::v"}) {
    EXPECT_TRUE(torch::allclose(native.outputs().at(name)[0], exported.outputs().at(name)[0], 1e-5, 1e-6)) << name;
  }
  EXPECT_TRUE(torch::allclose(native.outputs().at("layers.1.attn::pattern")[0],
                              reference.tensors.at("forward|layers.1.attn|1"), 1e-5, 1e-6));
  EXPECT_EQ(native.select_hook_points("layers.0.attn::*").names,
            (std::vector<std::string>{"layers.0.attn::q", "layers.0.attn::k", "layers.0.attn::v",
                                      "layers.0.attn::pattern", "layers.0.attn::z"}));
  // Module wildcards select what they select in the export; the HookPoint is still a module by its name.
  EXPECT_EQ(native.select_hook_points("layers.0.attn.*").names,
            (std::vector<std::string>{"layers.0.attn.qkv", "layers.0.attn.proj"}));
  EXPECT_EQ(native.select_hook_points("layers.0.attn.hook_q").names, std::vector<std::string>{"layers.0.attn.hook_q"});
  auto zero_head = [](torch::Tensor x) {
    x.select(1, 1).zero_();
    return x;
  };
  native.create_hook_group("zero", "layers.0.attn::z", {}, zero_head);
  exported.create_hook_group("zero", "layers.0.attn::matmul.1", {}, zero_head);
  const torch::Tensor ours = native.forward(Groups{"zero"}, reference.tokens);
  const torch::Tensor theirs = exported.forward(Groups{"zero"}, {reference.tokens}).toTensor();
  EXPECT_TRUE(torch::allclose(ours, theirs, 1e-5, 1e-5)) << "max |Δ| " << (ours - theirs).abs().max();
  EXPECT_FALSE(torch::allclose(ours, native.forward(Groups::none(), reference.tokens), 1e-3, 1e-3));
  EXPECT_NE(error_of([&] { native.register_forward_hook(HookFunction("layers.0.attn::scores")); })
                .find("has no flexmodel::nn::HookPoint 'hook_scores'"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Exports, ValueHooksTest, ::testing::Values("gpt_scripted.pt", "gpt_traced.pt"),
                         [](const auto& info) { return info.param.substr(4, info.param.size() - 7); });

}  // namespace
}  // namespace flexmodel
