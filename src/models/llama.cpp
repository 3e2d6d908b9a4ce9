#include "flexmodel/models/llama.h"

#include <cmath>

#include "flexmodel/error.h"
#include "models/decoder.h"

namespace flexmodel::models {

std::string LlamaConfig::architecture() const {
  if (model_type_ == "mistral") return "MistralForCausalLM";
  if (model_type_ == "qwen2") return "Qwen2ForCausalLM";
  return "LlamaForCausalLM";
}

LlamaRMSNormImpl::LlamaRMSNormImpl(std::int64_t size, double eps) : torch::nn::Module("LlamaRMSNorm"), eps_(eps) {
  weight = register_parameter("weight", torch::ones({size}));
}

torch::Tensor LlamaRMSNormImpl::forward(const torch::Tensor& x) {
  const auto wide = x.to(torch::kFloat);
  return weight * (wide * torch::rsqrt(wide.pow(2).mean(-1, true) + eps_)).to(x.scalar_type());
}

LlamaRotaryEmbeddingImpl::LlamaRotaryEmbeddingImpl(std::int64_t head_dim, double theta)
    : torch::nn::Module("LlamaRotaryEmbedding") {
  // float32 exponents under a double base, as Hugging Face's arange(...).float() / head_dim.
  const auto exponents = torch::arange(0, head_dim, 2, torch::kLong).to(torch::kFloat) / static_cast<double>(head_dim);
  inv_freq = register_buffer("inv_freq", 1.0 / torch::pow(theta, exponents));
}

std::tuple<torch::Tensor, torch::Tensor> LlamaRotaryEmbeddingImpl::forward(const torch::Tensor& x,
                                                                         const torch::Tensor& position_ids) {
  const auto freqs = position_ids.unsqueeze(-1).to(torch::kFloat) * inv_freq.to(x.device());
  const auto angles = torch::cat({freqs, freqs}, -1);
  return {angles.cos().to(x.scalar_type()), angles.sin().to(x.scalar_type())};
}

void LlamaRotaryEmbeddingImpl::to(torch::Device device, torch::Dtype /*dtype*/, bool non_blocking) {
  to(device, non_blocking);
}

void LlamaRotaryEmbeddingImpl::to(torch::Dtype /*dtype*/, bool /*non_blocking*/) {}

void LlamaRotaryEmbeddingImpl::to(torch::Device device, bool non_blocking) { torch::nn::Module::to(device, non_blocking); }

namespace {

torch::Tensor rotate_half(const torch::Tensor& x) {
  const auto half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// x [B, H, T, hd] turned by cos, sin [1, T, hd].
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1);
}

// [B, T, H · hd] → [B, H, T, hd].
torch::Tensor split_heads(const torch::Tensor& x, std::int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);
}

// Each key-value head serves `group` query heads in a row, laid out as
// Hugging Face's repeat_kv lays them: a bf16 matmul rounds differently over a
// copy than over the transposed view, so one kv head per query head stays a view.
torch::Tensor repeat_kv(const torch::Tensor& x, std::int64_t group) {
  if (group == 1) return x;
  return x.unsqueeze(2).expand({x.size(0), x.size(1), group, x.size(2), x.size(3)})
      .reshape({x.size(0), x.size(1) * group, x.size(2), x.size(3)});
}

}  // namespace

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("LlamaAttention"), head_dim_(config.head_size()), window_(config.sliding_window()) {
  const auto tp = detail::placement(mesh.get()).tp;
  FLEXMODEL_CHECK(config.num_attention_heads() % config.kv_heads() == 0, ConfigError, "num_attention_heads ",
                  config.num_attention_heads(), " is not a multiple of num_key_value_heads ", config.kv_heads());
  heads_ = detail::per_rank(config.num_attention_heads(), tp, "num_attention_heads");
  kv_heads_ = detail::per_rank(config.kv_heads(), tp, "num_key_value_heads");
  const auto d = config.hidden_size();
  const bool qkv_bias = config.attention_bias() || config.qkv_bias();
  q_proj = register_module("q_proj", parallel::ColumnParallelLinear(mesh, d, config.num_attention_heads() * head_dim_, qkv_bias));
  k_proj = register_module("k_proj", parallel::ColumnParallelLinear(mesh, d, config.kv_heads() * head_dim_, qkv_bias));
  v_proj = register_module("v_proj", parallel::ColumnParallelLinear(mesh, d, config.kv_heads() * head_dim_, qkv_bias));
  o_proj = register_module("o_proj", parallel::RowParallelLinear(mesh, config.num_attention_heads() * head_dim_, d,
                                                                 config.attention_bias()));
}

std::tuple<torch::Tensor, torch::Tensor> LlamaAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                                                   const torch::Tensor& sin) {
  const auto q = apply_rotary(split_heads(q_proj(x), heads_), cos, sin);
  // A rank holds whole groups of query heads with their key-value head.
  const auto group = heads_ / kv_heads_;
  const auto k = repeat_kv(apply_rotary(split_heads(k_proj(x), kv_heads_), cos, sin), group);
  const auto v = repeat_kv(split_heads(v_proj(x), kv_heads_), group);
  const auto scores = torch::matmul(q, k.transpose(2, 3)) * (1.0 / std::sqrt(static_cast<double>(head_dim_)));
  auto probs = detail::causal_probabilities(scores, /*float32_softmax=*/true, window_);
  return {o_proj(detail::merge_heads(torch::matmul(probs, v))), probs};
}

dist::Sharding LlamaAttentionImpl::output_sharding(std::size_t leaf) const {
  return leaf == 1 ? dist::Sharding::split(1) : dist::Sharding::replicated();
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("LlamaMLP") {
  const auto d = config.hidden_size(), inner = config.intermediate_size();
  detail::per_rank(inner, detail::placement(mesh.get()).tp, "intermediate_size");
  gate_proj = register_module("gate_proj", parallel::ColumnParallelLinear(mesh, d, inner, config.mlp_bias()));
  up_proj = register_module("up_proj", parallel::ColumnParallelLinear(mesh, d, inner, config.mlp_bias()));
  down_proj = register_module("down_proj", parallel::RowParallelLinear(mesh, inner, d, config.mlp_bias()));
  act_fn = register_module("act_fn", parallel::ShardedActivation(config.hidden_act()));
}

torch::Tensor LlamaMLPImpl::forward(const torch::Tensor& x) { return down_proj(act_fn(gate_proj(x)) * up_proj(x)); }

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("LlamaDecoderLayer") {
  self_attn = register_module("self_attn", LlamaAttention(config, mesh));
  mlp = register_module("mlp", LlamaMLP(config, mesh));
  input_layernorm = register_module("input_layernorm", LlamaRMSNorm(config.hidden_size(), config.rms_norm_eps()));
  post_attention_layernorm =
      register_module("post_attention_layernorm", LlamaRMSNorm(config.hidden_size(), config.rms_norm_eps()));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin) {
  auto hidden = x + std::get<0>(self_attn(input_layernorm(x), cos, sin));
  return hidden + mlp(post_attention_layernorm(hidden));
}

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh)
    : torch::nn::Module("LlamaModel") {
  const auto where = detail::placement(mesh.get());
  if (where.first()) {
    embed_tokens =
        register_module("embed_tokens", parallel::VocabParallelEmbedding(mesh, config.vocab_size(), config.hidden_size()));
  }
  layers = detail::stage_layers<LlamaDecoderLayer>(*this, "layers", config.num_hidden_layers(), where,
                                                   [&] { return LlamaDecoderLayer(config, mesh); });
  if (where.last()) norm = register_module("norm", LlamaRMSNorm(config.hidden_size(), config.rms_norm_eps()));
  // One hook point model.rotary_emb in the whole model, as Hugging Face's.
  LlamaRotaryEmbedding rotary(config.head_size(), config.rope_theta());
  if (where.first()) {
    rotary_emb = register_module("rotary_emb", rotary);
  } else {
    stage_rotary_ = rotary;
  }
}

torch::Tensor LlamaModelImpl::run_layers(torch::Tensor hidden) {
  // Position ids [1, T], as Hugging Face's: no batch dimension of their own.
  const auto positions = torch::arange(hidden.size(1), hidden.options().dtype(torch::kLong)).unsqueeze(0);
  auto [cos, sin] = rotary_emb.is_empty() ? stage_rotary_(hidden, positions) : rotary_emb(hidden, positions);
  for (auto& layer : layers) hidden = layer(hidden, cos, sin);
  return hidden;
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& tokens) { return norm(run_layers(embed_tokens(tokens))); }

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& config, std::shared_ptr<dist::Mesh> mesh)
    : CausalLMImpl(config.architecture()), config_(config) {
  mesh_ = std::move(mesh);
  model = register_module("model", LlamaModel(config, mesh_));
  if (detail::placement(mesh_.get()).last()) {
    lm_head = register_module("lm_head", parallel::ColumnParallelLinear(mesh_, config.hidden_size(), config.vocab_size(),
                                                                         /*bias=*/false, /*gather_output=*/true));
  }
}

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& tokens) {
  parallel::StageSteps steps;
  steps.embed = [&] { return model->embed_tokens(tokens); };
  steps.layers = [&](const torch::Tensor& hidden) { return model->run_layers(hidden); };
  steps.head = [&](const torch::Tensor& hidden) { return lm_head(model->norm(hidden)); };
  return forward_stages(tokens, config_.hidden_size(), [&] { return lm_head(model(tokens)); }, steps);
}

Capabilities LlamaForCausalLMImpl::capabilities() const {
  Capabilities capabilities;
  capabilities.family = config_.model_type();
  capabilities.architecture = config_.architecture();
  capabilities.tensor_parallel_plan = {
      "model.embed_tokens: vocabulary rows split (padded to a multiple of tp)",
      "model.layers.*.self_attn.{q,k,v}_proj: column parallel, split by heads (tp divides num_key_value_heads)",
      "model.layers.*.self_attn.o_proj: row parallel",
      "model.layers.*.mlp.{gate,up}_proj: column parallel",
      "model.layers.*.mlp.down_proj: row parallel",
      "lm_head: column parallel, output gathered",
      "RMS norms, rotary tables: replicated"};
  capabilities.pipeline_plan = "first stage: model.embed_tokens, model.rotary_emb; contiguous model.layers; last "
                               "stage: model.norm, lm_head";
  capabilities.hook_points = hook_points();
  return capabilities;
}

std::string LlamaForCausalLMImpl::tied_to(const std::string& parameter) const {
  return config_.tie_word_embeddings() && parameter == "lm_head.weight" ? "model.embed_tokens.weight" : "";
}

std::shared_ptr<CausalLMImpl> LlamaForCausalLMImpl::whole_model() const {
  return std::make_shared<LlamaForCausalLMImpl>(config_);
}

}  // namespace flexmodel::models
