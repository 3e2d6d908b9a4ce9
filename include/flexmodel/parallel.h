// Megatron-style tensor-parallel layers and a pipeline-parallel GPT, for
// building TP×PP×DP models in C++. Every layer is hookable. Each layer takes
// this rank's shard of full weights with load_full(), so a sharded model and
// the same weights run in one process compute the same function.
//
// The collectives inside the layers run in forward only: these layers serve
// inference and hooking, not training across ranks. Without a mesh (null) a
// layer is the whole layer in one process, so one model class serves both.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <tuple>
#include <vector>

#include <torch/nn/module.h>

#include "flexmodel/dist.h"
#include "flexmodel/hooked.h"
#include "flexmodel/models/gpt.h"
#include "flexmodel/nn.h"

namespace flexmodel::parallel {

// How a linear layer stores its weight: torch's [out, in] (y = x Wᵀ + b), or
// [in, out] (y = x W + b), as GPT-2's Conv1D does.
enum class WeightLayout { out_in, in_out };

// y = x Wᵀ + b with W split by rows (output features) over the TP group; the
// output stays split along its last dimension unless gather_output. With
// `blocks` > 1 the output features are that many stacked blocks (q, k, v),
// each split over the group. A gathered output whose features do not divide
// by tp (a vocabulary of 50257) is padded to the next multiple: the last
// ranks hold zero rows past out_features, and the gathered output is cut back.
class ColumnParallelLinearImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  ColumnParallelLinearImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t in_features, std::int64_t out_features,
                           bool bias = true, bool gather_output = false, std::int64_t blocks = 1,
                           WeightLayout layout = WeightLayout::out_in);
  torch::Tensor forward(const torch::Tensor& x);
  // Takes this rank's rows of full [out, in] weight and [out] bias, block by block.
  void load_full(const torch::Tensor& weight, const torch::Tensor& bias = {});

  // Output split along its last dimension (in blocks) unless gathered;
  // weight split along its output dimension, bias along dim 0.
  dist::Sharding output_sharding(std::size_t leaf) const override;
  dist::Sharding parameter_sharding(const std::string& name) const override;

  torch::Tensor weight, bias;

 private:
  std::shared_ptr<dist::Mesh> mesh_;
  std::int64_t out_features_;
  bool gather_output_;
  std::int64_t blocks_;
  WeightLayout layout_;
};
FLEX_MODULE(ColumnParallelLinear);

// y = x Wᵀ + b with W split by columns (input features) over the TP group; the
// input arrives split along its last dimension, the output is summed.
class RowParallelLinearImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  RowParallelLinearImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t in_features, std::int64_t out_features,
                        bool bias = true, WeightLayout layout = WeightLayout::out_in);
  torch::Tensor forward(const torch::Tensor& x);
  void load_full(const torch::Tensor& weight, const torch::Tensor& bias = {});

  // Input split along its last dimension; weight along its input dimension;
  // the output and the bias are whole on every rank.
  dist::Sharding input_sharding(std::size_t leaf) const override;
  dist::Sharding parameter_sharding(const std::string& name) const override;

  torch::Tensor weight, bias;

 private:
  std::shared_ptr<dist::Mesh> mesh_;
  WeightLayout layout_;
};
FLEX_MODULE(RowParallelLinear);

// An embedding whose vocabulary rows are split over the TP group (padded
// with zero rows, as ColumnParallelLinear's, when they do not divide by tp).
class VocabParallelEmbeddingImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  VocabParallelEmbeddingImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t vocab_size, std::int64_t dim);
  torch::Tensor forward(const torch::Tensor& tokens);
  void load_full(const torch::Tensor& weight);

  // Weight split along dim 0 (vocabulary rows); input and output whole.
  dist::Sharding parameter_sharding(const std::string& name) const override;

  torch::Tensor weight;

 private:
  std::shared_ptr<dist::Mesh> mesh_;
  std::int64_t first_row_;
};
FLEX_MODULE(VocabParallelEmbedding);

// An elementwise activation between a column- and a row-parallel layer: its
// input and output are split along the last dimension, as it declares.
// `function` is one of Hugging Face's activation names: gelu, gelu_new and
// gelu_pytorch_tanh (tanh-approximated), relu, silu (alias swish).
class ShardedActivationImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  explicit ShardedActivationImpl(std::string function);
  torch::Tensor forward(const torch::Tensor& x);
  dist::Sharding input_sharding(std::size_t) const override { return dist::Sharding::split(-1); }
  dist::Sharding output_sharding(std::size_t) const override { return dist::Sharding::split(-1); }

  // The activation names ShardedActivation accepts, and them listed for error messages.
  static bool is_supported(const std::string& function);
  static const char* supported();

 private:
  std::string function_;
};
FLEX_MODULE(ShardedActivation);

// A dropout over this rank's heads' attention probabilities [B, heads/tp, T, T'].
class HeadsDropoutImpl : public torch::nn::DropoutImpl, public dist::TensorParallelModule {
 public:
  using torch::nn::DropoutImpl::DropoutImpl;
  dist::Sharding input_sharding(std::size_t) const override { return dist::Sharding::split(1); }
  dist::Sharding output_sharding(std::size_t) const override { return dist::Sharding::split(1); }
};
FLEX_MODULE(HeadsDropout);

// Rows of `full` features that rank `rank` of `ranks` holds when they are
// split as evenly as padding to a multiple of `ranks` allows: (first, count,
// padded shard size). count < shard size on the ranks that hold padding.
struct ShardRows {
  std::int64_t first, count, size;
};
ShardRows shard_rows(std::int64_t full, std::int64_t ranks, std::int64_t rank);

// The layers [first, first + count) of pipeline stage `stage` of `stages`:
// contiguous, and as even as the count allows (22 layers on 4 stages: 5, 6, 5, 6).
struct StageLayers {
  std::int64_t first, count;
};
StageLayers stage_layers(std::int64_t layers, std::int64_t stages, std::int64_t stage);

// One pipeline stage's part of a decoder's forward over tokens [b, T]: the
// first stage embeds, every stage runs its layers and hands the hidden states
// [b, T, width] on, the last computes the logits [b, T, vocab], which go back
// to the first stage (an undefined tensor elsewhere). Without a mesh, or with
// one stage, it is head(layers(embed())). `hidden` gives the dtype and device
// of what travels.
struct StageSteps {
  std::function<torch::Tensor()> embed;
  std::function<torch::Tensor(torch::Tensor)> layers;
  std::function<torch::Tensor(torch::Tensor)> head;
};
torch::Tensor run_pipeline_stage(const dist::Mesh* mesh, const torch::Tensor& tokens, std::int64_t width,
                                 std::int64_t vocab, const torch::TensorOptions& hidden, const StageSteps& steps);

// A HookPoint on this rank's heads, [B, heads/tp, …]: hooks see every rank's, in the model's head order.
class HeadsHookPointImpl : public flexmodel::nn::HookPointImpl, public dist::TensorParallelModule {
 public:
  dist::Sharding input_sharding(std::size_t leaf) const override;
  dist::Sharding output_sharding(std::size_t leaf) const override;
};

class ParallelAttentionImpl : public torch::nn::Module, public dist::TensorParallelModule {
 public:
  ParallelAttentionImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options);
  // (output [B,T,d], this rank's heads' attention probabilities [B,heads/tp,T,T]).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x);
  // The probabilities (leaf 1) split by heads, along dim 1.
  dist::Sharding output_sharding(std::size_t leaf) const override;

  ColumnParallelLinear qkv{nullptr};
  RowParallelLinear proj{nullptr};
  // attn::q, ::k, ::v, ::pattern, ::z as models::Attention has them, gathered by heads.
  models::AttentionPoints points;

 private:
  std::int64_t local_heads_;
};
FLEX_MODULE(ParallelAttention);

class ParallelMLPImpl : public torch::nn::Module {
 public:
  ParallelMLPImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options);
  torch::Tensor forward(const torch::Tensor& x);

  ColumnParallelLinear fc_in{nullptr};
  ShardedActivation act{nullptr};
  RowParallelLinear fc_out{nullptr};
};
FLEX_MODULE(ParallelMLP);

class ParallelBlockImpl : public torch::nn::Module {
 public:
  ParallelBlockImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options);
  torch::Tensor forward(const torch::Tensor& x);

  flexmodel::nn::LayerNorm ln_1{nullptr};
  ParallelAttention attn{nullptr};
  flexmodel::nn::LayerNorm ln_2{nullptr};
  ParallelMLP mlp{nullptr};
};
FLEX_MODULE(ParallelBlock);

// This rank's part of models::GPT under a mesh: its pipeline stage's layers
// (contiguous, n_layers / pp each; the first stage also embeds, the last also
// normalises and projects), tensor-parallel inside. Module names are the full
// model's ("layers.5.mlp" on whichever stage holds layer 5).
class ParallelGPTImpl : public torch::nn::Module, public dist::PipelineStageModule {
 public:
  // Copies this rank's shard of every weight of `full`.
  ParallelGPTImpl(const models::GPTImpl& full, std::shared_ptr<dist::Mesh> mesh);
  // tokens: this data-parallel rank's rows [b, T] on every stage. Returns the
  // logits [b, T, vocab] on the first stage and an undefined tensor elsewhere;
  // the stages hand activations on with send/recv.
  torch::Tensor forward(const torch::Tensor& tokens);

  VocabParallelEmbedding embed_tokens{nullptr};
  flexmodel::nn::Embedding embed_positions{nullptr};
  std::vector<ParallelBlock> blocks;
  flexmodel::nn::LayerNorm norm{nullptr};
  ColumnParallelLinear lm_head{nullptr};

 private:
  bool first_stage() const { return mesh_->pp_rank() == 0; }
  bool last_stage() const { return mesh_->pp_rank() == mesh_->shape().pp - 1; }

  std::shared_ptr<dist::Mesh> mesh_;
  models::GPTOptions options_;
};
FLEX_MODULE(ParallelGPT);

}  // namespace flexmodel::parallel
