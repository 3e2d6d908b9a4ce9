// The Hugging Face families loaded from checkpoint directories, against the
// PyTorch reference implementations of tests/fixtures/make_hf_checkpoints.py:
// module and parameter names, logits, every hook point's input and output,
// and an edit; then config.json's defaults and refusals, the hub, and
// malformed checkpoints.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <tuple>

#include "flexmodel/flexmodel.h"
#include "flexmodel/hub.h"
#include "flexmodel/io/safetensors.h"
#include "hf_reference.h"
#include "test_files.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;
using testing::HfReference;
using testing::kHfFixtures;
using testing::TempDir;

class HfCheckpointTest : public ::testing::TestWithParam<std::string> {
 protected:
  torch::NoGradGuard no_grad;
  HfReference reference{GetParam()};
};

TEST_P(HfCheckpointTest, NamedModulesEqualHuggingFaces) {
  const auto model = hub::load_model(reference.directory);
  std::vector<std::string> ours;
  for (const auto& item : model->named_modules()) ours.push_back(item.key());
  EXPECT_EQ(ours, reference.module_names());
  // Every module is a hook point but those whose PyTorch hooks never fire (the ModuleLists).
  std::set<std::string> never_fired;
  for (const auto& name : reference.modules.at("never_fired")) never_fired.insert(name.get<std::string>());
  EXPECT_FALSE(never_fired.empty());
  std::vector<std::string> fire;
  for (const auto& name : reference.module_names()) {
    if (never_fired.count(name) == 0) fire.push_back(name);
  }
  const auto points = model->capabilities().hook_points;
  EXPECT_EQ(points, fire);
  // A hook on each of them fires in one forward.
  FlexModel fm(model);
  for (const auto& name : points) fm.register_forward_hook(HookFunction(name));
  fm.forward(reference.tokens());
  for (const auto& name : points) EXPECT_TRUE(fm.outputs().contains(name)) << name << " did not fire";
}

TEST_P(HfCheckpointTest, ParametersHaveHuggingFacesNamesAndShapesAndTiedOnesShareATensor) {
  const auto model = hub::load_model(reference.directory);
  std::map<std::string, std::vector<std::int64_t>> ours, theirs;
  for (const auto& item : model->named_parameters()) {
    if (model->tied_to(item.key()).empty()) ours[item.key()] = item.value().sizes().vec();
  }
  for (const auto& item : reference.modules.at("named_parameters")) {
    theirs[item.at(0).get<std::string>()] = item.at(1).get<std::vector<std::int64_t>>();
  }
  EXPECT_EQ(ours, theirs);
  const auto parameters = model->named_parameters();
  for (const auto& pair : reference.modules.value("tied", nlohmann::json::array())) {
    const auto head = pair.at(0).get<std::string>(), embedding = pair.at(1).get<std::string>();
    EXPECT_EQ(model->tied_to(head), embedding);
    EXPECT_EQ(parameters[head].data_ptr(), parameters[embedding].data_ptr()) << head << " is not " << embedding;
  }
}

TEST_P(HfCheckpointTest, LogitsAndEveryHookPointEqualPyTorchs) {
  const auto model = hub::load_model(reference.directory);
  FlexModel fm(model);
  std::size_t inputs = 0, outputs = 0, leaves = 0;
  for (const auto& name : reference.module_names()) {
    if (reference.tensors.count("output:" + name) != 0) {
      fm.register_forward_hook(HookFunction(name).unpack_idx(HookFunction::kAllLeaves));
      ++outputs;
    }
    if (reference.tensors.count("input:" + name) != 0) {
      fm.register_forward_pre_hook(HookFunction(name));
      ++inputs;
    }
  }
  // Every module but the root has its output captured by the reference.
  EXPECT_GE(outputs + 1, reference.module_names().size());
  const auto logits = fm.forward(reference.tokens());
  EXPECT_TRUE(reference.close(logits, reference.tensors.at("logits")));
  for (const auto& name : reference.module_names()) {
    for (const auto& [prefix, type] : {std::pair{"output:", HookType::forward}, std::pair{"input:", HookType::forward_pre}}) {
      const auto expected = reference.tensors.find(prefix + name);
      if (expected == reference.tensors.end()) continue;
      ASSERT_TRUE(fm.outputs().contains(name, type)) << prefix << name << " did not fire";
      const auto& ours = fm.outputs().at(name, type);
      EXPECT_TRUE(reference.close(ours[0], expected->second)) << prefix << name;
      // In one process bf16 rounds as PyTorch's eager model does, op for op.
      if (reference.bf16()) EXPECT_TRUE(torch::equal(ours[0], expected->second)) << prefix << name << " in bf16";
      // Further leaves the reference kept (the rotary table's sin) as <key>#<leaf>.
      for (std::size_t leaf = 1; leaf < ours.size(); ++leaf) {
        const auto further = reference.tensors.find(prefix + name + "#" + std::to_string(leaf));
        if (further != reference.tensors.end()) {
          EXPECT_TRUE(reference.close(ours[leaf], further->second)) << further->first;
          ++leaves;
        }
      }
    }
  }
  EXPECT_GT(inputs, 0u);
  const bool llama_shaped = GetParam().rfind("gpt2", 0) != 0;
  EXPECT_EQ(leaves, llama_shaped ? 1u : 0u);
}

TEST_P(HfCheckpointTest, EditsGivePyTorchsEditedLogits) {
  const auto model = hub::load_model(reference.directory);
  FlexModel fm(model);
  const bool gpt2 = GetParam().rfind("gpt2", 0) == 0;
  fm.create_hook_group("mlp", gpt2 ? "transformer.h.0.mlp" : "model.layers.0.mlp", {},
                       [](const torch::Tensor& x) { return x * 0.5; });
  const auto config = hub::read_config(reference.directory);
  const std::int64_t head_dim = gpt2 ? std::get<models::GPT2Config>(config).n_embd() / std::get<models::GPT2Config>(config).n_head()
                                     : std::get<models::LlamaConfig>(config).head_size();
  fm.create_hook_group("q", gpt2 ? "transformer.h.1.attn.c_attn" : "model.layers.1.self_attn.q_proj", {},
                       [head_dim](torch::Tensor x) {
                         x.narrow(-1, 0, head_dim).zero_();
                         return x;
                       });
  const auto plain = fm.forward(Groups{"mlp"}.complement(), reference.tokens());
  EXPECT_TRUE(reference.close(fm.forward(Groups{"mlp"}, reference.tokens()), reference.edited.at("logits")));
  EXPECT_TRUE(reference.close(fm.forward(Groups{"q"}, reference.tokens()), reference.edited.at("logits_attn_q")));
  EXPECT_FALSE(torch::allclose(plain, reference.edited.at("logits")));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfCheckpointTest,
                         ::testing::Values("gpt2", "gpt2_sharded", "llama", "llama_bf16", "mistral", "qwen2"));

// A copy of a fixture checkpoint with its config.json's keys changed (null:
// removed) and the keys `nulls` written as null.
std::string config_variant(const TempDir& temp, const std::string& fixture, const nlohmann::json& changes,
                           const std::vector<std::string>& nulls = {}) {
  const auto directory = temp.path() / fixture;
  std::filesystem::remove_all(directory);
  std::filesystem::copy(kHfFixtures + "/" + fixture, directory, std::filesystem::copy_options::recursive);
  std::ifstream in(directory / "config.json");
  auto config = nlohmann::json::parse(in);
  for (const auto& [key, value] : changes.items()) {
    if (value.is_null()) {
      config.erase(key);
    } else {
      config[key] = value;
    }
  }
  for (const auto& key : nulls) config[key] = nullptr;
  std::ofstream(directory / "config.json") << config.dump(2);
  return directory.string();
}

TEST(HfConfig, KeysLeftOutTakeHuggingFacesDefaults) {
  // The fixtures' config.json leave these out, as Hugging Face writes them.
  const auto gpt2 = std::get<models::GPT2Config>(hub::read_config(kHfFixtures + "/gpt2"));
  EXPECT_TRUE(gpt2.tie_word_embeddings());
  EXPECT_EQ(gpt2.activation_function(), "gelu_new");
  EXPECT_EQ(gpt2.layer_norm_epsilon(), 1e-5);
  EXPECT_EQ(gpt2.inner(), 4 * gpt2.n_embd());
  const auto old_llama = std::get<models::LlamaConfig>(hub::read_config(kHfFixtures + "/llama_bf16"));
  EXPECT_EQ(old_llama.rope_theta(), 10000.0);
  EXPECT_EQ(old_llama.kv_heads(), old_llama.num_attention_heads());
  const auto llama = std::get<models::LlamaConfig>(hub::read_config(kHfFixtures + "/llama"));
  EXPECT_EQ(llama.rope_theta(), 500000.0);
  EXPECT_FALSE(llama.tie_word_embeddings());
  const auto qwen2 = std::get<models::LlamaConfig>(hub::read_config(kHfFixtures + "/qwen2"));
  EXPECT_TRUE(qwen2.qkv_bias());
  EXPECT_EQ(qwen2.architecture(), "Qwen2ForCausalLM");
  EXPECT_EQ(std::get<models::LlamaConfig>(hub::read_config(kHfFixtures + "/mistral")).sliding_window(), 4);
}

// A null is Hugging Face's None, which for some keys means other than the default.
TEST(HfConfig, NullAndNewerKeysMeanWhatTheyMeanInHuggingFaces) {
  TempDir temp;
  const auto mistral = std::get<models::LlamaConfig>(
      hub::read_config(config_variant(temp, "mistral", {}, {"sliding_window", "num_key_value_heads"})));
  EXPECT_EQ(mistral.sliding_window(), 0) << "null is no window, not Mistral's default 4096";
  EXPECT_EQ(mistral.kv_heads(), mistral.num_attention_heads());
  // Left out, Mistral's defaults.
  const auto defaults = std::get<models::LlamaConfig>(
      hub::read_config(config_variant(temp, "mistral", {{"sliding_window", nullptr}})));
  EXPECT_EQ(defaults.sliding_window(), 4096);
  // transformers 5 writes rope_theta inside rope_parameters.
  const auto rope = std::get<models::LlamaConfig>(hub::read_config(config_variant(
      temp, "llama", {{"rope_theta", nullptr}, {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 250000.0}}}})));
  EXPECT_EQ(rope.rope_theta(), 250000.0);
  const auto gpt2 = std::get<models::GPT2Config>(
      hub::read_config(config_variant(temp, "gpt2", {{"attn_pdrop", 0.0}, {"initializer_range", 0.5}})));
  EXPECT_EQ(gpt2.attn_pdrop(), 0.0);
  EXPECT_EQ(gpt2.resid_pdrop(), 0.1);
  EXPECT_EQ(gpt2.initializer_range(), 0.5);
}

TEST(HfConfig, WhatCannotBeHonouredIsAnErrorNamingTheFileAndTheKey) {
  TempDir temp;
  auto error = [&](const std::string& fixture, const nlohmann::json& changes) {
    return error_of([&] { hub::read_config(config_variant(temp, fixture, changes)); });
  };
  const auto unknown = error("gpt2", {{"model_type", "bert"}});
  EXPECT_NE(unknown.find("config.json': model_type 'bert' is not supported; supported: gpt2, llama, mistral, qwen2"),
            std::string::npos)
      << unknown;
  EXPECT_NE(error("gpt2", {{"model_type", nullptr}}).find("has no 'model_type'"), std::string::npos);
  EXPECT_NE(error("llama", {{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}}}).find("'rope_scaling'"),
            std::string::npos);
  EXPECT_NE(error("llama", {{"hidden_act", "mish"}}).find("'hidden_act' = \"mish\" is not supported"), std::string::npos);
  EXPECT_NE(error("llama", {{"num_hidden_layers", "four"}}).find("key 'num_hidden_layers' holds \"four\", not an integer"),
            std::string::npos);
  EXPECT_NE(error("gpt2", {{"scale_attn_by_inverse_layer_idx", true}}).find("'scale_attn_by_inverse_layer_idx'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { hub::read_config(temp.path().string()); }).find("has no readable config.json"),
            std::string::npos);
  // Keys that change what the model computes, which it does not implement.
  for (const auto& [fixture, changes, key] : std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
           {"llama", {{"rope_parameters", {{"rope_type", "llama3"}, {"factor", 8.0}}}}, "'rope_type'"},
           {"llama", {{"pretraining_tp", 2}}, "'pretraining_tp' = 2"},
           {"llama", {{"attention_dropout", 0.1}}, "'attention_dropout' = 0.1"},
           {"qwen2", {{"layer_types", {"full_attention", "sliding_attention"}}}, "'layer_types' holds \"sliding_attention\""},
           {"gpt2", {{"reorder_and_upcast_attn", true}}, "'reorder_and_upcast_attn' = true"}}) {
    const auto message = error(fixture, changes);
    EXPECT_NE(message.find(key), std::string::npos) << message;
    EXPECT_NE(message.find("config.json"), std::string::npos) << message;
  }
}

TEST(HfCheckpoint, AMissingUnexpectedOrMisshapenTensorIsAnErrorNamingItAndTheFile) {
  TempDir temp;
  const io::SafetensorsFile original(kHfFixtures + "/gpt2/model.safetensors");
  // The file's tensors with one change, as a fresh checkpoint directory.
  auto variant = [&](const std::string& name, auto&& change) {
    const auto directory = temp.path() / name;
    std::filesystem::create_directories(directory);
    std::filesystem::copy_file(kHfFixtures + "/gpt2/config.json", directory / "config.json");
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& entry : original.entries()) tensors.emplace_back(entry.name, original.read(entry.name));
    change(tensors);
    io::save_safetensors((directory / "model.safetensors").string(), tensors);
    return error_of([&] { hub::load_model(directory.string()); });
  };
  using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;
  const auto missing = variant("missing", [](Tensors& t) {
    std::erase_if(t, [](const auto& item) { return item.first == "h.1.mlp.c_fc.weight"; });
  });
  EXPECT_NE(missing.find("has no tensor 'h.1.mlp.c_fc.weight'"), std::string::npos) << missing;
  const auto extra = variant("extra", [](Tensors& t) { t.emplace_back("h.0.attn.q_norm.weight", torch::ones({8})); });
  EXPECT_NE(extra.find("holds 'h.0.attn.q_norm.weight', which GPT2LMHeadModel"), std::string::npos) << extra;
  const auto misshapen = variant("misshapen", [](Tensors& t) {
    for (auto& [name, tensor] : t) {
      if (name == "h.0.attn.c_proj.weight") tensor = tensor.t().contiguous().narrow(0, 0, 16);
    }
  });
  EXPECT_NE(misshapen.find("tensor 'h.0.attn.c_proj.weight' has shape [16, 32]"), std::string::npos) << misshapen;
}

TEST(Hub, FamiliesArchitecturesAndANewModel) {
  EXPECT_EQ(hub::families(), (std::vector<std::string>{"gpt2", "llama", "mistral", "qwen2"}));
  const auto gpt2 = hub::architectures("gpt2");
  EXPECT_EQ(gpt2, (std::vector<std::string>{"gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl"}));
  EXPECT_EQ(std::get<models::GPT2Config>(hub::architecture_config("gpt2-medium")).n_layer(), 24);
  EXPECT_EQ(std::get<models::LlamaConfig>(hub::architecture_config("llama-3-8b")).kv_heads(), 8);
  EXPECT_NE(error_of([] { hub::architecture_config("gpt5"); }).find("architectures: gpt2, gpt2-large"), std::string::npos);
  EXPECT_NE(error_of([] { hub::architectures("bert"); }).find("families: gpt2, llama"), std::string::npos);

  torch::NoGradGuard no_grad;
  const auto config = models::LlamaConfig().vocab_size(50).hidden_size(16).intermediate_size(32).num_hidden_layers(2)
                          .num_attention_heads(4).num_key_value_heads(2);
  const auto model = hub::create_new_model(config, hub::LoadOptions().dtype(torch::kBFloat16));
  const auto again = hub::create_new_model(config, hub::LoadOptions().dtype(torch::kBFloat16));
  const auto weight = model->named_parameters()["model.layers.1.self_attn.k_proj.weight"];
  EXPECT_EQ(weight.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(weight, again->named_parameters()["model.layers.1.self_attn.k_proj.weight"]));
  EXPECT_NEAR(weight.to(torch::kFloat).std().item<double>(), 0.02, 0.005);
  EXPECT_TRUE(torch::equal(model->named_parameters()["model.norm.weight"], torch::ones({16}, torch::kBFloat16)));
  const auto logits = model->forward(torch::randint(0, 50, {2, 5}, torch::kLong));
  EXPECT_EQ(logits.sizes(), (c10::IntArrayRef{2, 5, 50}));
  // Cast to bf16, a tied head is still its embedding's very tensor.
  auto tied_config = config;
  const auto tied = hub::create_new_model(tied_config.tie_word_embeddings(true), hub::LoadOptions().dtype(torch::kBFloat16));
  auto tied_parameters = tied->named_parameters();
  EXPECT_EQ(tied_parameters["lm_head.weight"].data_ptr(), tied_parameters["model.embed_tokens.weight"].data_ptr());
  EXPECT_EQ(tied_parameters["lm_head.weight"].scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
}

TEST(Hub, ValidateForMeshListsEveryViolationWithItsFix) {
  const auto config = models::LlamaConfig().hidden_size(768).num_attention_heads(12).num_key_value_heads(4).intermediate_size(1020)
                          .num_hidden_layers(2);
  const auto violations = hub::validate_for_mesh(config, {8, 4, 1});
  ASSERT_EQ(violations.size(), 4u);
  EXPECT_EQ(violations[0], "tp 8 does not divide num_attention_heads (12); choose a tp that divides it");
  EXPECT_NE(violations[1].find("num_key_value_heads (4)"), std::string::npos);
  EXPECT_NE(violations[2].find("intermediate_size (1020)"), std::string::npos);
  EXPECT_EQ(violations[3], "pp 4 exceeds the 2 layers; choose pp of at most 2");
  EXPECT_TRUE(hub::validate_for_mesh(config, {4, 2, 3}).empty());
  // Nothing divides by a zero count: each is a violation.
  EXPECT_EQ(hub::validate_for_mesh(config, {0, 1, 1}),
            (std::vector<std::string>{"tp 0 is not a rank count; choose at least 1"}));
  EXPECT_EQ(hub::validate_for_mesh(models::LlamaConfig().num_attention_heads(0), {2, 1, 1}),
            (std::vector<std::string>{"num_attention_heads 0 must be positive"}));
  // GPT-2's vocabulary of 50257 does not divide by tp, and need not.
  EXPECT_TRUE(hub::validate_for_mesh(hub::architecture_config("gpt2"), {4, 4, 1}).empty());
}

}  // namespace
}  // namespace flexmodel
