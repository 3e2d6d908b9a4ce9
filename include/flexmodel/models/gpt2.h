// GPT-2 as Hugging Face's GPT2LMHeadModel has it: the same module and
// parameter names (transformer.h.3.attn.c_attn, lm_head), the same Conv1D
// weights stored [in, out], the head tied to the token embedding, so hook
// names and checkpoints are those users know from Python. Built for one
// process or for one rank of a TP×PP mesh (see CausalLMImpl).
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

// Hugging Face's GPT2Config keys, with its defaults (GPT-2 small).
struct GPT2Config {
  TORCH_ARG(std::int64_t, vocab_size) = 50257;
  TORCH_ARG(std::int64_t, n_positions) = 1024;
  TORCH_ARG(std::int64_t, n_embd) = 768;
  TORCH_ARG(std::int64_t, n_layer) = 12;
  TORCH_ARG(std::int64_t, n_head) = 12;
  // The MLP's width; 0 (Hugging Face's null) is 4 · n_embd.
  TORCH_ARG(std::int64_t, n_inner) = 0;
  TORCH_ARG(std::string, activation_function) = "gelu_new";
  TORCH_ARG(double, layer_norm_epsilon) = 1e-5;
  TORCH_ARG(bool, tie_word_embeddings) = true;
  // Dropout probabilities, in train mode only (load_model returns eval mode).
  TORCH_ARG(double, embd_pdrop) = 0.1;
  TORCH_ARG(double, attn_pdrop) = 0.1;
  TORCH_ARG(double, resid_pdrop) = 0.1;
  // The std of create_new_model's weights (c_proj's scaled by 1/√(2 · n_layer)).
  TORCH_ARG(double, initializer_range) = 0.02;

 public:
  // TORCH_ARG leaves the struct private.
  std::int64_t inner() const { return n_inner_ > 0 ? n_inner_ : 4 * n_embd_; }
};

class GPT2AttentionImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  GPT2AttentionImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh);
  // (output [B, T, d], attention probabilities [B, heads, T, T]).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x);
  // The probabilities (leaf 1) are split by heads under tp.
  dist::Sharding output_sharding(std::size_t leaf) const override;

  parallel::ColumnParallelLinear c_attn{nullptr};
  parallel::RowParallelLinear c_proj{nullptr};
  parallel::HeadsDropout attn_dropout{nullptr};
  flexmodel::nn::Dropout resid_dropout{nullptr};

 private:
  std::int64_t local_heads_;
};
FLEX_MODULE(GPT2Attention);

class GPT2MLPImpl : public torch::nn::Module {
 public:
  GPT2MLPImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh);
  torch::Tensor forward(const torch::Tensor& x);

  parallel::ColumnParallelLinear c_fc{nullptr};
  parallel::RowParallelLinear c_proj{nullptr};
  parallel::ShardedActivation act{nullptr};
  flexmodel::nn::Dropout dropout{nullptr};
};
FLEX_MODULE(GPT2MLP);

class GPT2BlockImpl : public torch::nn::Module {
 public:
  GPT2BlockImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh);
  torch::Tensor forward(const torch::Tensor& x);

  flexmodel::nn::LayerNorm ln_1{nullptr};
  GPT2Attention attn{nullptr};
  flexmodel::nn::LayerNorm ln_2{nullptr};
  GPT2MLP mlp{nullptr};
};
FLEX_MODULE(GPT2Block);

// GPT2Model: this stage's part of it. wte, wpe and drop live on the first
// pipeline stage, ln_f on the last; h holds this stage's blocks under their
// whole-model numbers.
class GPT2ModelImpl : public torch::nn::Module {
 public:
  GPT2ModelImpl(const GPT2Config& config, const std::shared_ptr<dist::Mesh>& mesh);
  // tokens [B, T] → the last hidden states [B, T, d] (one stage only).
  torch::Tensor forward(const torch::Tensor& tokens);
  // The pieces of forward that pipeline stages run apart.
  torch::Tensor embed(const torch::Tensor& tokens);
  torch::Tensor run_blocks(torch::Tensor hidden);

  parallel::VocabParallelEmbedding wte{nullptr};
  flexmodel::nn::Embedding wpe{nullptr};
  flexmodel::nn::Dropout drop{nullptr};
  std::vector<GPT2Block> h;
  flexmodel::nn::LayerNorm ln_f{nullptr};
};
FLEX_MODULE(GPT2Model);

class GPT2LMHeadModelImpl : public CausalLMImpl {
 public:
  // Parameters are uninitialised: load them (hub::load_model) or initialise
  // them (hub::create_new_model).
  explicit GPT2LMHeadModelImpl(const GPT2Config& config, std::shared_ptr<dist::Mesh> mesh = nullptr);
  torch::Tensor forward(const torch::Tensor& tokens) override;

  Capabilities capabilities() const override;
  std::int64_t vocab_size() const override { return config_.vocab_size(); }
  std::string tied_to(const std::string& parameter) const override;
  std::shared_ptr<CausalLMImpl> whole_model() const override;
  const GPT2Config& config() const { return config_; }

  GPT2Model transformer{nullptr};
  parallel::ColumnParallelLinear lm_head{nullptr};

 private:
  GPT2Config config_;
};

}  // namespace flexmodel::models
