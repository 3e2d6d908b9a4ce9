// A small GPT-style decoder built from hookable layers: the bundled default
// model of the examples, tests and benchmarks. Module names follow the
// common decoder layout: embed_tokens, embed_positions, layers.N.{ln_1, attn
// {qkv, proj}, ln_2, mlp{fc_in, act, fc_out}}, norm, lm_head. The attention
// returns a tuple (output, attention probabilities).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/module.h>

#include "flexmodel/hooked.h"
#include "flexmodel/nn.h"

namespace torch::jit {
struct Module;
}

namespace flexmodel::models {

struct GPTOptions {
  // GPT-2 small's shape: 12 layers, d 768, 12 heads, MLP 3072, vocabulary 50257.
  static GPTOptions gpt2_small() {
    return GPTOptions().vocab_size(50257).max_positions(1024).d_model(768).n_heads(12).n_layers(12).d_mlp(3072);
  }

  TORCH_ARG(std::int64_t, vocab_size) = 256;
  TORCH_ARG(std::int64_t, max_positions) = 128;
  TORCH_ARG(std::int64_t, d_model) = 64;
  TORCH_ARG(std::int64_t, n_heads) = 4;
  TORCH_ARG(std::int64_t, n_layers) = 2;
  TORCH_ARG(std::int64_t, d_mlp) = 256;
};

// One layer's keys and values of the positions run so far, [B, heads, T, d_head] each.
struct LayerKV {
  torch::Tensor keys, values;
};

// The keys and values of every layer: a forward given one attends to the
// positions it holds and appends its own, so generation runs only the new
// tokens. Empty until the first forward.
struct KVCache {
  std::vector<LayerKV> layers;
  // Positions held (0 when empty).
  std::int64_t length() const { return layers.empty() || !layers[0].keys.defined() ? 0 : layers[0].keys.size(2); }
};

// Causal self-attention over a fused projection [B, T, 3·W] holding q | k | v of
// `heads` heads: (mixed values [B, T, W], attention probabilities [B, heads, T, T]).
// With `past`, the queries are the T positions after the past's and attend to
// the past's keys and values too (probabilities [B, heads, T, T_past + T]),
// which `past` then holds.
// Points the tensors pass through, when given: q, k, v [B, heads, T, d_head],
// the pattern [B, heads, T, T'] and z, each head's mix of values [B, heads, T, d_head].
// An attention registers each as its child `hook_<name>`.
struct AttentionPoints {
  flexmodel::nn::HookPoint q{nullptr}, k{nullptr}, v{nullptr}, pattern{nullptr}, z{nullptr};
  std::vector<std::pair<std::string, flexmodel::nn::HookPoint*>> named() {
    return {{"hook_q", &q}, {"hook_k", &k}, {"hook_v", &v}, {"hook_pattern", &pattern}, {"hook_z", &z}};
  }
};
std::tuple<torch::Tensor, torch::Tensor> causal_attention(const torch::Tensor& qkv, std::int64_t heads,
                                                          LayerKV* past = nullptr,
                                                          const AttentionPoints* points = nullptr);

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const GPTOptions& options);
  // Returns (output [B,T,d], attention probabilities [B,heads,T,T]).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, LayerKV* past = nullptr);

  flexmodel::nn::Linear qkv{nullptr};
  flexmodel::nn::Linear proj{nullptr};
  // hook_q, hook_k, hook_v, hook_pattern, hook_z: the value hook points attn::q … attn::z.
  AttentionPoints points;

 private:
  std::int64_t n_heads_;
};
FLEX_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const GPTOptions& options);
  torch::Tensor forward(const torch::Tensor& x);

  flexmodel::nn::Linear fc_in{nullptr};
  flexmodel::nn::GELU act{nullptr};
  flexmodel::nn::Linear fc_out{nullptr};
};
FLEX_MODULE(MLP);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const GPTOptions& options);
  torch::Tensor forward(const torch::Tensor& x, LayerKV* past = nullptr);

  flexmodel::nn::LayerNorm ln_1{nullptr};
  Attention attn{nullptr};
  flexmodel::nn::LayerNorm ln_2{nullptr};
  MLP mlp{nullptr};
};
FLEX_MODULE(Block);

class GPTImpl : public torch::nn::Module {
 public:
  explicit GPTImpl(const GPTOptions& options = {});
  // tokens: int64 [B,T] → logits [B,T,vocab]. With a cache, the tokens are
  // the positions after those it holds, which it then holds too.
  torch::Tensor forward(const torch::Tensor& tokens, KVCache* cache = nullptr);

  const GPTOptions& options() const { return options_; }

  flexmodel::nn::Embedding embed_tokens{nullptr};
  flexmodel::nn::Embedding embed_positions{nullptr};
  flexmodel::nn::ModuleList layers{nullptr};
  flexmodel::nn::LayerNorm norm{nullptr};
  flexmodel::nn::Linear lm_head{nullptr};

 private:
  GPTOptions options_;
};
FLEX_MODULE(GPT);

// A GPT with the weights of a TorchScript export of the same layout (the names
// above; tests/fixtures/make_fixtures.py writes one), e.g. to shard it with
// parallel::ParallelGPT. Sizes come from the weights, the head count from the
// attention modules' `n_heads` attribute unless given. A missing, extra or
// misshapen weight is a ConfigError naming it and `source`.
GPT gpt_from_torchscript(const torch::jit::Module& module, const std::string& source,
                         std::optional<std::int64_t> n_heads = std::nullopt);

}  // namespace flexmodel::models
