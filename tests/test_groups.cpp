// Hook groups with flex_model's semantics, including the cases flex_model gets wrong.
#include <gtest/gtest.h>

#include "flexmodel/models/gpt.h"
#include "test_models.h"

namespace flexmodel {
namespace {

class GroupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    gpt = models::GPT(models::GPTOptions().n_layers(3));
    fm = std::make_unique<FlexModel<models::GPTImpl>>(gpt);
    tokens = torch::randint(0, 256, {2, 6});
  }

  // How many snapshots each (module, forward) key gained in one forward.
  std::map<std::string, std::size_t> fired_in(const Groups& groups) {
    std::map<std::string, std::size_t> before;
    for (const auto& key : fm->outputs().keys()) before[key.first] = fm->outputs().at(key.first).size();
    fm->forward(groups, tokens);
    std::map<std::string, std::size_t> fired;
    for (const auto& key : fm->outputs().keys()) {
      auto gained = fm->outputs().at(key.first).size() - before[key.first];
      if (gained != 0) fired[key.first] = gained;
    }
    return fired;
  }

  static std::set<std::string> names(const std::map<std::string, std::size_t>& fired) {
    std::set<std::string> out;
    for (const auto& [name, count] : fired) out.insert(name);
    return out;
  }

  torch::NoGradGuard no_grad;
  models::GPT gpt{nullptr};
  std::unique_ptr<FlexModel<models::GPTImpl>> fm;
  torch::Tensor tokens;
};

TEST_F(GroupTest, CreateHookGroupMakesOneHookPerMatchingModule) {
  auto created = fm->create_hook_group("mlps", "layers.*.mlp");
  ASSERT_EQ(created.size(), 3u);
  EXPECT_EQ(created[0].module_name, "layers.0.mlp");
  EXPECT_EQ(created[2].module_name, "layers.2.mlp");
  EXPECT_EQ(fm->get_group_hook_functions("mlps").size(), 3u);
  EXPECT_EQ(names(fired_in(Groups{"mlps"})), (std::set<std::string>{"layers.0.mlp", "layers.1.mlp", "layers.2.mlp"}));
}

TEST_F(GroupTest, PatternKinds) {
  EXPECT_EQ(fm->create_hook_group("deep", "**.fc_in").size(), 3u);
  EXPECT_EQ(fm->create_hook_group("one", "layers.1.*").size(), 4u);  // ln_1 attn ln_2 mlp
  EXPECT_EQ(fm->create_hook_group("sub", Pattern::substring("ln_")).size(), 6u);
  EXPECT_TRUE(Pattern("layers.*.attn").matches("layers.10.attn"));
  EXPECT_FALSE(Pattern("layers.*").matches("layers.1.attn"));
  EXPECT_TRUE(Pattern("**").matches("layers.1.attn"));
  EXPECT_TRUE(Pattern("layers.1?.attn").matches("layers.12.attn"));
  EXPECT_FALSE(Pattern::exact("layers.1").matches("layers.10"));
}

TEST_F(GroupTest, APatternThatMatchesNothingIsAnError) {
  EXPECT_THROW(fm->create_hook_group("none", "layer.*.mlp"), ConfigError);
  EXPECT_THROW(fm->update_hook_groups(Pattern("nothing"), "g"), ConfigError);
  EXPECT_TRUE(fm->hooks().empty());
}

TEST_F(GroupTest, UpdateByListSingleHookAndPattern) {
  auto norm = fm->register_forward_hook(HookFunction("norm"));
  auto heads = fm->create_hook_group("attn", "layers.*.attn", {}, {}, 0);
  fm->update_hook_groups(norm, "single");
  fm->update_hook_groups(heads, "listed");
  fm->update_hook_groups(Pattern("layers.0.*"), "by_pattern");
  EXPECT_EQ(fm->get_group_hook_functions("single"), std::vector<HookHandle>{norm});
  EXPECT_EQ(fm->get_group_hook_functions("listed"), heads);
  EXPECT_EQ(fm->get_group_hook_functions("by_pattern"), std::vector<HookHandle>{heads[0]});
  auto groups = fm->get_hook_function_groups();
  EXPECT_EQ(groups.at(norm), (std::set<std::string>{"all", "single"}));
  EXPECT_EQ(groups.at(heads[0]), (std::set<std::string>{"all", "attn", "listed", "by_pattern"}));
}

TEST_F(GroupTest, EveryHookIsInAllWhichCannotBeRemoved) {
  auto hook = fm->register_forward_hook(HookFunction("norm"));
  EXPECT_EQ(fm->get_hook_function_groups().at(hook), std::set<std::string>{"all"});
  EXPECT_THROW(fm->remove_hook_groups(hook, {"all"}), ConfigError);
  EXPECT_THROW(fm->create_hook_group("all", "norm"), ConfigError);
  EXPECT_EQ(names(fired_in(Groups{})), std::set<std::string>{"norm"});
}

TEST_F(GroupTest, UnionAndComplement) {
  fm->create_hook_group("a", "layers.0.mlp");
  fm->create_hook_group("b", "layers.1.mlp");
  fm->create_hook_group("c", "layers.2.mlp");
  EXPECT_EQ(names(fired_in(Groups{"a", "b"})), (std::set<std::string>{"layers.0.mlp", "layers.1.mlp"}));
  EXPECT_EQ(names(fired_in(Groups{"a"}.complement())), (std::set<std::string>{"layers.1.mlp", "layers.2.mlp"}));
  EXPECT_EQ(names(fired_in(Groups{"a", "c"}.complement())), std::set<std::string>{"layers.1.mlp"});
  EXPECT_TRUE(fired_in(Groups{"all"}.complement()).empty());
  EXPECT_THROW(fm->forward(Groups{"d"}, tokens), ConfigError);
}

TEST_F(GroupTest, AGroupDisabledInOneForwardRunsAgainInTheNext) {
  fm->create_hook_group("a", "layers.0.mlp");
  fm->create_hook_group("b", "norm");
  const auto hooks_before = fm->hooks();
  EXPECT_EQ(names(fired_in(Groups{"b"})), std::set<std::string>{"norm"});
  EXPECT_EQ(names(fired_in(Groups{"a"})), std::set<std::string>{"layers.0.mlp"});
  EXPECT_EQ(names(fired_in(Groups{"b"})), std::set<std::string>{"norm"});
  EXPECT_EQ(fm->hooks(), hooks_before);  // switching groups re-registers nothing
}

TEST(ParameterHookGroups, AParameterGradientHookRunsInTheBackwardOfAForwardThatChoseIt) {
  torch::manual_seed(0);
  models::GPT gpt(models::GPTOptions().n_layers(2));
  FlexModel<models::GPTImpl> fm(gpt);
  auto tokens = torch::randint(0, 256, {2, 6});
  fm.update_hook_groups(fm.register_hook(HookFunction("norm.weight")), "grads");
  fm.create_hook_group("acts", "norm");
  fm.forward(Groups{"acts"}, tokens).sum().backward();
  EXPECT_FALSE(fm.outputs().contains("norm.weight", HookType::tensor));
  fm.forward(Groups{"grads"}, tokens).sum().backward();
  EXPECT_EQ(fm.outputs().at("norm.weight", HookType::tensor).size(), 1u);
  // One registered after the forward, before its backward, runs in that backward.
  fm.forward(Groups{"acts"}, tokens).sum().backward();
  EXPECT_EQ(fm.outputs().at("norm.weight", HookType::tensor).size(), 1u);
  auto output = fm.forward(Groups{"acts"}, tokens);
  fm.register_hook(HookFunction("norm.bias"));
  output.sum().backward();
  EXPECT_EQ(fm.outputs().at("norm.bias", HookType::tensor).size(), 1u);
  EXPECT_EQ(fm.outputs().at("norm.weight", HookType::tensor).size(), 1u);
}

TEST_F(GroupTest, RemovingAGroupByAPatternThatAlsoMatchesNonMembers) {
  auto members = fm->create_hook_group("g", "layers.0.*");
  fm->create_hook_group("other", "layers.1.*");
  fm->remove_hook_groups(Pattern("layers.**"), {"g"});  // also matches layers.1.*, not in g
  EXPECT_TRUE(fm->get_group_hook_functions("g").empty());
  EXPECT_EQ(fm->get_group_hook_functions("other").size(), 4u);
  EXPECT_EQ(fm->get_hook_function_groups().at(members[0]), std::set<std::string>{"all"});
  EXPECT_TRUE(fired_in(Groups{"g"}).empty());
  EXPECT_THROW(fm->remove_hook_groups(Pattern("layers.**"), {"unknown"}), ConfigError);
}

TEST_F(GroupTest, RemoveBySingleHookAndList) {
  auto hooks = fm->create_hook_group("g", "layers.*.attn");
  fm->remove_hook_groups(hooks[0], {"g"});
  EXPECT_EQ(fm->get_group_hook_functions("g").size(), 2u);
  fm->remove_hook_groups(std::vector<HookHandle>{hooks[1], hooks[2]}, {"g"});
  EXPECT_TRUE(fm->get_group_hook_functions("g").empty());
  EXPECT_EQ(fm->hooks().size(), 3u);  // hooks stay; only membership went
}

TEST_F(GroupTest, RestoreAfterGroupedForwards) {
  auto plain = gpt->forward(tokens);
  fm->create_hook_group("zero", "layers.*.mlp", {}, [](const torch::Tensor& t) { return t * 0; });
  fm->create_hook_group("read", "layers.*.attn");
  fm->forward(Groups{"zero"}, tokens);
  fm->forward(Groups{"read"}, tokens);
  fm->forward(Groups{"zero"}.complement(), tokens);
  fm->restore();
  EXPECT_EQ(fm->hook_groups(), std::set<std::string>{"all"});
  EXPECT_TRUE(torch::equal(fm->forward(tokens), plain));
  EXPECT_TRUE(torch::equal(gpt->forward(tokens), plain));
}

TEST_F(GroupTest, ComplementOfAnEditGroupKeepsTheModelExact) {
  auto plain = gpt->forward(tokens);
  fm->create_hook_group("zero", "layers.*.mlp", {}, [](const torch::Tensor& t) { return t * 0; });
  EXPECT_FALSE(torch::equal(fm->forward(tokens), plain));
  EXPECT_TRUE(torch::equal(fm->forward(Groups{"zero"}.complement(), tokens), plain));
}

}  // namespace
}  // namespace flexmodel
