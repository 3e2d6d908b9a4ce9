// Hugging Face checkpoints loaded onto the mesh test_parallel runs under:
// each rank builds its stage and reads its share of the files, and rank 0's
// logits and hook captures equal PyTorch's reference of the whole model.
#include <set>

#include <gtest/gtest.h>

#include "flexmodel/dist.h"
#include "flexmodel/flexmodel.h"
#include "flexmodel/hub.h"
#include "flexmodel/io/safetensors.h"
#include "../hf_reference.h"
#include "mesh_shape.h"

namespace flexmodel {
namespace {

using testing::g_shape;
using testing::HfReference;

class HfOnMeshTest : public ::testing::TestWithParam<std::string> {
 protected:
  torch::NoGradGuard no_grad;
  HfReference reference{GetParam()};
  std::shared_ptr<dist::Mesh> mesh = dist::Mesh::create(g_shape);
};

TEST_P(HfOnMeshTest, EveryHookPointAndTheLogitsOnRank0EqualPyTorchs) {
  const auto model = hub::load_model(reference.directory, hub::LoadOptions().mesh(mesh));
  FlexModel fm(model, FlexModelOptions().mesh(mesh).tp(g_shape.tp).pp(g_shape.pp).dp(g_shape.dp));
  // The root and the base model run whole only in one stage.
  std::vector<std::string> points;
  for (const auto& name : reference.module_names()) {
    if (name.empty() || name == "transformer" || name == "model") continue;
    if (reference.tensors.count("output:" + name) != 0) points.push_back(name);
  }
  for (const auto& name : points) fm.register_forward_hook(HookFunction(name));
  // A row-parallel projection's input is split over tp.
  const std::string projection =
      GetParam().rfind("gpt2", 0) == 0 ? "transformer.h.1.attn.c_proj" : "model.layers.1.self_attn.o_proj";
  fm.register_forward_pre_hook(HookFunction(projection));
  const auto logits = fm.forward(reference.tokens());
  if (dist::world_rank() != 0) return;
  EXPECT_TRUE(reference.close(logits, reference.tensors.at("logits")));
  for (const auto& name : points) {
    ASSERT_TRUE(fm.outputs().contains(name)) << name << " did not reach rank 0";
    EXPECT_TRUE(reference.close(fm.outputs().at(name)[0], reference.tensors.at("output:" + name))) << name;
  }
  EXPECT_TRUE(reference.close(fm.outputs().at(projection, HookType::forward_pre)[0],
                              reference.tensors.at("input:" + projection)));
}

// A rank holds only its stage's layers, each split weight as its 1/tp share
// of the stored tensor (rows rounded up, as a vocabulary of 50257 over tp),
// and reads no byte it does not keep; together the ranks read every byte.
TEST_P(HfOnMeshTest, EachRankReadsAndHoldsOnlyItsShareOfTheCheckpoint) {
  hub::LoadReport report;
  const auto model = hub::load_model(reference.directory, hub::LoadOptions().mesh(mesh), &report);
  const io::SafetensorsCheckpoint checkpoint(reference.directory);
  // The file's entry for a parameter, named with or without the base model's prefix.
  auto stored = [&](const std::string& name) {
    const auto* entry = checkpoint.find(name);
    if (entry == nullptr) entry = checkpoint.find(name.substr(name.find('.') + 1));
    EXPECT_NE(entry, nullptr) << name;
    return entry->shape;
  };
  std::set<const void*> storages;
  std::set<std::string> layers;
  std::int64_t held = 0;
  for (const auto& module : model->named_modules()) {
    const auto* parallel = dynamic_cast<const dist::TensorParallelModule*>(module.value().get());
    for (const auto& parameter : module.value()->named_parameters(/*recurse=*/false)) {
      const std::string name = module.key().empty() ? parameter.key() : module.key() + "." + parameter.key();
      const torch::Tensor& tensor = parameter.value();
      if (storages.insert(tensor.data_ptr()).second) held += tensor.numel() * tensor.element_size();
      const std::string tied = model->tied_to(name);
      std::vector<std::int64_t> expected = stored(tied.empty() ? name : tied);
      const auto sharding = parallel != nullptr ? parallel->parameter_sharding(parameter.key()) : dist::Sharding::replicated();
      if (sharding.is_split()) {
        auto& rows = expected[(*sharding.dim + tensor.dim()) % tensor.dim()];
        rows = (rows + g_shape.tp - 1) / g_shape.tp;
      }
      EXPECT_EQ(tensor.sizes(), c10::IntArrayRef(expected)) << name << " on tp rank " << mesh->tp_rank();
      const auto layer = name.find(GetParam().rfind("gpt2", 0) == 0 ? ".h." : ".layers.");
      if (layer != std::string::npos) layers.insert(name.substr(0, name.find('.', name.find('.', layer + 1) + 1)));
    }
  }
  EXPECT_LE(static_cast<std::int64_t>(report.bytes_read), held);
  EXPECT_LE(static_cast<std::int64_t>(layers.size()), (reference.layers() + g_shape.pp - 1) / g_shape.pp);
  // Together a data-parallel replica's ranks read every byte.
  const auto everyone = mesh->world().all_gather_ints(static_cast<std::int64_t>(report.bytes_read));
  std::int64_t total = 0;
  for (auto bytes : everyone) total += bytes;
  EXPECT_GE(total, static_cast<std::int64_t>(report.bytes_stored) * g_shape.dp);
}

// A new tied model holds the same head on the last stage as the embedding on
// the first: each tp rank's shard of lm_head equals that rank's shard of
// embed_tokens, wherever the two live.
TEST(HfNewModelOnMesh, ATiedHeadIsItsEmbeddingOnEveryStage) {
  torch::NoGradGuard no_grad;
  const auto mesh = dist::Mesh::create(g_shape);
  const auto config = models::LlamaConfig().vocab_size(50).hidden_size(16).intermediate_size(32).num_hidden_layers(2)
                          .num_attention_heads(4).num_key_value_heads(2).tie_word_embeddings(true);
  const auto model = hub::create_new_model(config, hub::LoadOptions().mesh(mesh));
  const auto parameters = model->named_parameters();
  // A weight's fingerprint, or -1 where this rank does not hold it.
  auto fingerprint = [&](const std::string& name) -> std::int64_t {
    if (!parameters.contains(name)) return -1;
    return static_cast<std::int64_t>((parameters[name].abs().sum().item<double>()) * 1e6);
  };
  const auto tp_ranks = mesh->world().all_gather_ints(mesh->tp_rank());
  const auto embeddings = mesh->world().all_gather_ints(fingerprint("model.embed_tokens.weight"));
  const auto heads = mesh->world().all_gather_ints(fingerprint("lm_head.weight"));
  std::size_t compared = 0;
  for (std::size_t a = 0; a < heads.size(); ++a) {
    for (std::size_t b = 0; b < embeddings.size(); ++b) {
      if (heads[a] < 0 || embeddings[b] < 0 || tp_ranks[a] != tp_ranks[b]) continue;
      EXPECT_EQ(heads[a], embeddings[b]) << "rank " << a << "'s lm_head against rank " << b << "'s embed_tokens";
      ++compared;
    }
  }
  EXPECT_GT(compared, 0u);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfOnMeshTest,
                         ::testing::Values("gpt2", "gpt2_sharded", "llama", "llama_bf16", "mistral", "qwen2"));

}  // namespace
}  // namespace flexmodel
