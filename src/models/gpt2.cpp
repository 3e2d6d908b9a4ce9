#include "flexmodel/models/gpt2.h"

#include <cmath>

#include "flexmodel/error.h"
#include "models/decoder.h"

namespace flexmodel::models {

using parallel::WeightLayout;

GPT2AttentionImpl::GPT2AttentionImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("GPT2Attention") {
  const auto d = config.n_embd();
  FLEXMODEL_CHECK(d % config.n_head() == 0, ConfigError, "GPT-2: n_embd ", d, " is not a multiple of n_head ",
                  config.n_head());
  local_heads_ = detail::per_rank(config.n_head(), detail::placement(mesh.get()).tp, "GPT-2's n_head");
  c_attn = register_module("c_attn", parallel::ColumnParallelLinear(mesh, d, 3 * d, true, false, 3, WeightLayout::in_out));
  c_proj = register_module("c_proj", parallel::RowParallelLinear(mesh, d, d, true, WeightLayout::in_out));
  attn_dropout = register_module("attn_dropout", parallel::HeadsDropout(config.attn_pdrop()));
  resid_dropout = register_module("resid_dropout", flexmodel::nn::Dropout(config.resid_pdrop()));
}

std::tuple<torch::Tensor, torch::Tensor> GPT2AttentionImpl::forward(const torch::Tensor& x) {
  // c_attn holds q | k | v of this rank's heads.
  const auto qkv = c_attn(x);
  const auto batch = qkv.size(0), time = qkv.size(1), head_dim = qkv.size(2) / 3 / local_heads_;
  const auto split = qkv.view({batch, time, 3, local_heads_, head_dim}).permute({2, 0, 3, 1, 4});
  // Scores divided by √head_dim held in their dtype, as Hugging Face's GPT-2 does.
  const auto scores = torch::matmul(split[0], split[1].transpose(-1, -2));
  const auto root = torch::full({}, std::sqrt(static_cast<double>(head_dim)), scores.options());
  auto probs = attn_dropout(detail::causal_probabilities(scores / root, /*float32_softmax=*/false));
  return {resid_dropout(c_proj(detail::merge_heads(torch::matmul(probs, split[2])))), probs};
}

dist::Sharding GPT2AttentionImpl::output_sharding(std::size_t leaf) const {
  return leaf == 1 ? dist::Sharding::split(1) : dist::Sharding::replicated();
}

GPT2MLPImpl::GPT2MLPImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("GPT2MLP") {
  const auto d = config.n_embd(), inner = config.inner();
  detail::per_rank(inner, detail::placement(mesh.get()).tp, "GPT-2's MLP width (n_inner)");
  c_fc = register_module("c_fc", parallel::ColumnParallelLinear(mesh, d, inner, true, false, 1, WeightLayout::in_out));
  c_proj = register_module("c_proj", parallel::RowParallelLinear(mesh, inner, d, true, WeightLayout::in_out));
  act = register_module("act", parallel::ShardedActivation(config.activation_function()));
  dropout = register_module("dropout", flexmodel::nn::Dropout(config.resid_pdrop()));
}

torch::Tensor GPT2MLPImpl::forward(const torch::Tensor& x) { return dropout(c_proj(act(c_fc(x)))); }

GPT2BlockImpl::GPT2BlockImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("GPT2Block") {
  auto norm = [&] {
    return flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd()}).eps(config.layer_norm_epsilon()));
  };
  ln_1 = register_module("ln_1", norm());
  attn = register_module("attn", GPT2Attention(config, mesh));
  ln_2 = register_module("ln_2", norm());
  mlp = register_module("mlp", GPT2MLP(config, mesh));
}

torch::Tensor GPT2BlockImpl::forward(const torch::Tensor& x) {
  auto hidden = x + std::get<0>(attn(ln_1(x)));
  return hidden + mlp(ln_2(hidden));
}

GPT2ModelImpl::GPT2ModelImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("GPT2Model") {
  const auto where = detail::placement(mesh.get());
  if (where.first()) {
    wte = register_module("wte", parallel::VocabParallelEmbedding(mesh, config.vocab_size(), config.n_embd()));
    wpe = register_module("wpe", flexmodel::nn::Embedding(config.n_positions(), config.n_embd()));
    drop = register_module("drop", flexmodel::nn::Dropout(config.embd_pdrop()));
  }
  h = detail::stage_layers<GPT2Block>(*this, "h", config.n_layer(), where, [&] { return GPT2Block(config, mesh); });
  if (where.last()) {
    ln_f = register_module(
        "ln_f", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd()}).eps(config.layer_norm_epsilon())));
  }
}

torch::Tensor GPT2ModelImpl::embed(const torch::Tensor& tokens) {
  FLEXMODEL_CHECK(tokens.size(1) <= wpe->weight.size(0), ShapeError, "GPT-2: ", tokens.size(1),
                  " positions exceed n_positions ", wpe->weight.size(0));
  // Position ids [1, T], as Hugging Face's: no batch dimension of their own.
  const auto positions = torch::arange(tokens.size(1), tokens.options().dtype(torch::kLong)).unsqueeze(0);
  return drop(wte(tokens) + wpe(positions));
}

torch::Tensor GPT2ModelImpl::run_blocks(torch::Tensor hidden) {
  for (auto& block : h) hidden = block(hidden);
  return hidden;
}

torch::Tensor GPT2ModelImpl::forward(const torch::Tensor& tokens) { return ln_f(run_blocks(embed(tokens))); }

GPT2LMHeadModelImpl::GPT2LMHeadModelImpl(const GPT2Config& config, std::shared_ptr<dist::Mesh> mesh)
    : CausalLMImpl("GPT2LMHeadModel"), config_(config) {
  mesh_ = std::move(mesh);
  transformer = register_module("transformer", GPT2Model(config, mesh_));
  if (detail::placement(mesh_.get()).last()) {
    lm_head = register_module("lm_head", parallel::ColumnParallelLinear(mesh_, config.n_embd(), config.vocab_size(),
                                                                         /*bias=*/false, /*gather_output=*/true));
  }
}

torch::Tensor GPT2LMHeadModelImpl::forward(const torch::Tensor& tokens) {
  parallel::StageSteps steps;
  steps.embed = [&] { return transformer->embed(tokens); };
  steps.layers = [&](const torch::Tensor& hidden) { return transformer->run_blocks(hidden); };
  steps.head = [&](const torch::Tensor& hidden) { return lm_head(transformer->ln_f(hidden)); };
  return forward_stages(tokens, config_.n_embd(), [&] { return lm_head(transformer(tokens)); }, steps);
}

Capabilities GPT2LMHeadModelImpl::capabilities() const {
  Capabilities capabilities;
  capabilities.family = "gpt2";
  capabilities.architecture = "GPT2LMHeadModel";
  capabilities.tensor_parallel_plan = {
      "transformer.wte: vocabulary rows split (padded to a multiple of tp)",
      "transformer.h.*.attn.c_attn: column parallel, q | k | v split by heads",
      "transformer.h.*.attn.c_proj: row parallel",
      "transformer.h.*.mlp.c_fc: column parallel",
      "transformer.h.*.mlp.c_proj: row parallel",
      "lm_head: column parallel, output gathered",
      "layer norms, wpe: replicated"};
  capabilities.pipeline_plan = "first stage: transformer.wte, wpe, drop; contiguous transformer.h blocks; last stage: "
                               "transformer.ln_f, lm_head";
  capabilities.hook_points = hook_points();
  return capabilities;
}

std::shared_ptr<CausalLMImpl> GPT2LMHeadModelImpl::whole_model() const {
  return std::make_shared<GPT2LMHeadModelImpl>(config_);
}

std::string GPT2LMHeadModelImpl::tied_to(const std::string& parameter) const {
  return config_.tie_word_embeddings() && parameter == "lm_head.weight" ? "transformer.wte.weight" : "";
}

}  // namespace flexmodel::models
