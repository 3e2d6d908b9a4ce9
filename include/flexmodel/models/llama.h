// LLaMA as Hugging Face's LlamaForCausalLM has it (RMSNorm, rotary
// embeddings with rope_theta, grouped-query attention, SwiGLU, an optionally
// tied head), with its module and parameter names (model.layers.3.mlp). The
// LLaMA-shaped families whose configs differ only in keys map onto it:
// Mistral (a sliding attention window) and Qwen2 (q, k, v biases). Built for
// one process or for one rank of a TP×PP mesh (see CausalLMImpl).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <torch/arg.h>

#include "flexmodel/models/causal_lm.h"
#include "flexmodel/nn.h"
#include "flexmodel/parallel.h"

namespace flexmodel::models {

// Hugging Face's LlamaConfig keys, with its defaults (LLaMA-7B), plus the
// keys of the families that share the layout.
struct LlamaConfig {
  // "llama", "mistral" or "qwen2": names the family and its architecture.
  TORCH_ARG(std::string, model_type) = "llama";
  TORCH_ARG(std::int64_t, vocab_size) = 32000;
  TORCH_ARG(std::int64_t, hidden_size) = 4096;
  TORCH_ARG(std::int64_t, intermediate_size) = 11008;
  TORCH_ARG(std::int64_t, num_hidden_layers) = 32;
  TORCH_ARG(std::int64_t, num_attention_heads) = 32;
  // 0 (Hugging Face's null): as many as num_attention_heads.
  TORCH_ARG(std::int64_t, num_key_value_heads) = 0;
  // 0 (null): hidden_size / num_attention_heads.
  TORCH_ARG(std::int64_t, head_dim) = 0;
  TORCH_ARG(std::int64_t, max_position_embeddings) = 2048;
  TORCH_ARG(std::string, hidden_act) = "silu";
  TORCH_ARG(double, rms_norm_eps) = 1e-6;
  TORCH_ARG(double, rope_theta) = 10000.0;
  TORCH_ARG(bool, tie_word_embeddings) = false;
  // Biases of q_proj, k_proj, v_proj and o_proj (LLaMA's attention_bias).
  TORCH_ARG(bool, attention_bias) = false;
  // Biases of q_proj, k_proj and v_proj only (Qwen2's).
  TORCH_ARG(bool, qkv_bias) = false;
  TORCH_ARG(bool, mlp_bias) = false;
  // The std of create_new_model's weights.
  TORCH_ARG(double, initializer_range) = 0.02;
  // Keys a query sees, itself included (Mistral's sliding_window); 0: all before it.
  TORCH_ARG(std::int64_t, sliding_window) = 0;

 public:
  // TORCH_ARG leaves the struct private.
  std::int64_t kv_heads() const { return num_key_value_heads_ > 0 ? num_key_value_heads_ : num_attention_heads_; }
  std::int64_t head_size() const { return head_dim_ > 0 ? head_dim_ : hidden_size_ / num_attention_heads_; }
  // Hugging Face's class for model_type: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.
  std::string architecture() const;
};

class LlamaRMSNormImpl : public torch::nn::Module {
 public:
  LlamaRMSNormImpl(std::int64_t size, double eps);
  // Normalised in float32, scaled in the input's dtype, as Hugging Face's.
  torch::Tensor forward(const torch::Tensor& x);

  torch::Tensor weight;

 private:
  double eps_;
};
FLEX_MODULE(LlamaRMSNorm);

// (cos, sin) [1, T, head_dim] of position ids [1, T], in x's dtype.
class LlamaRotaryEmbeddingImpl : public torch::nn::Module {
 public:
  LlamaRotaryEmbeddingImpl(std::int64_t head_dim, double theta);
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& position_ids);
  // inv_freq stays float32 in a model cast to bf16 or fp16, as Hugging Face
  // keeps it: rounded to bf16, the angles of later positions drift (sin by
  // 2e-3 at position 7), and every layer's attention with them.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  torch::Tensor inv_freq;
};
FLEX_MODULE(LlamaRotaryEmbedding);

class LlamaAttentionImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  LlamaAttentionImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh);
  // (output [B, T, d], attention probabilities [B, heads, T, T]).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& cos,
                                                   const torch::Tensor& sin);
  // The probabilities (leaf 1) are split by heads under tp.
  dist::Sharding output_sharding(std::size_t leaf) const override;

  parallel::ColumnParallelLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr};
  parallel::RowParallelLinear o_proj{nullptr};

 private:
  std::int64_t heads_, kv_heads_, head_dim_, window_;
};
FLEX_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  LlamaMLPImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh);
  // down_proj(act_fn(gate_proj(x)) · up_proj(x)).
  torch::Tensor forward(const torch::Tensor& x);

  parallel::ColumnParallelLinear gate_proj{nullptr}, up_proj{nullptr};
  parallel::RowParallelLinear down_proj{nullptr};
  parallel::ShardedActivation act_fn{nullptr};
};
FLEX_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  LlamaRMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
FLEX_MODULE(LlamaDecoderLayer);

// LlamaModel: this stage's part of it. embed_tokens and rotary_emb live on
// the first pipeline stage (the others compute the same rotary tables
// privately), norm on the last; layers holds this stage's layers under their
// whole-model numbers.
class LlamaModelImpl : public torch::nn::Module {
 public:
  LlamaModelImpl(const LlamaConfig& config, const std::shared_ptr<dist::Mesh>& mesh);
  // tokens [B, T] → the last hidden states [B, T, d] (one stage only).
  torch::Tensor forward(const torch::Tensor& tokens);
  // The pieces of forward that pipeline stages run apart.
  torch::Tensor run_layers(torch::Tensor hidden);

  parallel::VocabParallelEmbedding embed_tokens{nullptr};
  std::vector<LlamaDecoderLayer> layers;
  LlamaRMSNorm norm{nullptr};
  LlamaRotaryEmbedding rotary_emb{nullptr};

 private:
  LlamaRotaryEmbedding stage_rotary_{nullptr};  // this stage's tables where rotary_emb lives elsewhere
};
FLEX_MODULE(LlamaModel);

class LlamaForCausalLMImpl : public CausalLMImpl {
 public:
  // Parameters are uninitialised: load them (hub::load_model) or initialise
  // them (hub::create_new_model).
  explicit LlamaForCausalLMImpl(const LlamaConfig& config, std::shared_ptr<dist::Mesh> mesh = nullptr);
  torch::Tensor forward(const torch::Tensor& tokens) override;

  Capabilities capabilities() const override;
  std::int64_t vocab_size() const override { return config_.vocab_size(); }
  std::string tied_to(const std::string& parameter) const override;
  std::shared_ptr<CausalLMImpl> whole_model() const override;
  const LlamaConfig& config() const { return config_; }

  LlamaModel model{nullptr};
  parallel::ColumnParallelLinear lm_head{nullptr};

 private:
  LlamaConfig config_;
};

}  // namespace flexmodel::models
