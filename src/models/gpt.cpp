#include "flexmodel/models/gpt.h"

#include <cmath>
#include <limits>
#include <map>

#include <torch/nn/functional.h>
#include <torch/script.h>

#include "flexmodel/error.h"

namespace flexmodel::models {

AttentionImpl::AttentionImpl(const GPTOptions& options) : n_heads_(options.n_heads()) {
  FLEXMODEL_CHECK(options.d_model() % options.n_heads() == 0, ConfigError, "GPT: d_model ", options.d_model(),
                  " must be a multiple of n_heads ", options.n_heads());
  qkv = register_module("qkv", flexmodel::nn::Linear(options.d_model(), 3 * options.d_model()));
  proj = register_module("proj", flexmodel::nn::Linear(options.d_model(), options.d_model()));
  for (auto [name, point] : points.named()) *point = register_module(name, flexmodel::nn::HookPoint());
}

std::tuple<torch::Tensor, torch::Tensor> causal_attention(const torch::Tensor& qkv, std::int64_t heads,
                                                          LayerKV* past, const AttentionPoints* points) {
  const auto batch = qkv.size(0), time = qkv.size(1), width = qkv.size(2) / 3;
  const auto head_dim = width / heads;
  auto through = [points](flexmodel::nn::HookPoint AttentionPoints::*point, const torch::Tensor& x) {
    if (points == nullptr) return x;
    flexmodel::nn::HookPoint hook = points->*point;  // a holder: shares the module
    return hook(x);
  };
  auto split = qkv.view({batch, time, 3, heads, head_dim}).permute({2, 0, 3, 1, 4});
  auto q = through(&AttentionPoints::q, split[0]), k = through(&AttentionPoints::k, split[1]),
       v = through(&AttentionPoints::v, split[2]);
  const std::int64_t before = past != nullptr && past->keys.defined() ? past->keys.size(2) : 0;
  if (past != nullptr) {
    if (before > 0) {
      k = torch::cat({past->keys, k}, 2);
      v = torch::cat({past->values, v}, 2);
    }
    past->keys = k;
    past->values = v;
  }
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(head_dim));
  // Query i sits at position before + i: the keys after it are its future.
  auto future =
      torch::ones({time, before + time}, torch::TensorOptions().dtype(torch::kBool).device(qkv.device())).triu(before + 1);
  auto probs = through(&AttentionPoints::pattern,
                       torch::softmax(scores.masked_fill(future, -std::numeric_limits<float>::infinity()), -1));
  const auto z = through(&AttentionPoints::z, torch::matmul(probs, v));
  return {z.transpose(1, 2).reshape({batch, time, width}), probs};
}

std::tuple<torch::Tensor, torch::Tensor> AttentionImpl::forward(const torch::Tensor& x, LayerKV* past) {
  auto [mixed, probs] = causal_attention(qkv(x), n_heads_, past, &points);
  return {proj(mixed), probs};
}

MLPImpl::MLPImpl(const GPTOptions& options) {
  fc_in = register_module("fc_in", flexmodel::nn::Linear(options.d_model(), options.d_mlp()));
  act = register_module("act", flexmodel::nn::GELU());
  fc_out = register_module("fc_out", flexmodel::nn::Linear(options.d_mlp(), options.d_model()));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) { return fc_out(act(fc_in(x))); }

BlockImpl::BlockImpl(const GPTOptions& options) {
  ln_1 = register_module("ln_1", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({options.d_model()})));
  attn = register_module("attn", Attention(options));
  ln_2 = register_module("ln_2", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({options.d_model()})));
  mlp = register_module("mlp", MLP(options));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, LayerKV* past) {
  auto h = x + std::get<0>(attn(ln_1(x), past));
  return h + mlp(ln_2(h));
}

GPTImpl::GPTImpl(const GPTOptions& options) : options_(options) {
  embed_tokens = register_module("embed_tokens", flexmodel::nn::Embedding(options.vocab_size(), options.d_model()));
  embed_positions =
      register_module("embed_positions", flexmodel::nn::Embedding(options.max_positions(), options.d_model()));
  layers = register_module("layers", flexmodel::nn::ModuleList());
  for (std::int64_t i = 0; i < options.n_layers(); ++i) layers->push_back(Block(options));
  norm = register_module("norm", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({options.d_model()})));
  lm_head = register_module("lm_head",
                            flexmodel::nn::Linear(torch::nn::LinearOptions(options.d_model(), options.vocab_size()).bias(false)));
}

torch::Tensor GPTImpl::forward(const torch::Tensor& tokens, KVCache* cache) {
  FLEXMODEL_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong, ShapeError,
                  "GPT expects int64 tokens of shape [batch, time], got ", tokens.scalar_type(), " ",
                  tokens.sizes());
  const std::int64_t past = cache != nullptr ? cache->length() : 0;
  FLEXMODEL_CHECK(past + tokens.size(1) <= options_.max_positions(), ShapeError, "GPT: sequence length ",
                  past + tokens.size(1), " exceeds max_positions ", options_.max_positions());
  if (cache != nullptr) {
    FLEXMODEL_CHECK(past == 0 || cache->layers[0].keys.size(0) == tokens.size(0), ShapeError, "GPT: the cache holds ",
                    cache->layers[0].keys.size(0), " rows, the tokens have ", tokens.size(0));
    cache->layers.resize(layers->size());
  }
  auto positions =
      torch::arange(past, past + tokens.size(1), torch::TensorOptions().dtype(torch::kLong).device(tokens.device()));
  auto h = embed_tokens(tokens) + embed_positions(positions);
  for (std::size_t i = 0; i < layers->size(); ++i) {
    h = layers->call<BlockImpl>(i, h, cache != nullptr ? &cache->layers[i] : nullptr);
  }
  return lm_head(norm(h));
}

GPT gpt_from_torchscript(const torch::jit::Module& module, const std::string& source,
                         std::optional<std::int64_t> n_heads) {
  std::map<std::string, torch::Tensor> weights;
  for (const auto& parameter : module.named_parameters()) weights[parameter.name] = parameter.value;
  auto weight = [&](const std::string& name, std::int64_t dim) {
    auto found = weights.find(name);
    FLEXMODEL_CHECK(found != weights.end() && found->second.dim() == 2, ConfigError, source,
                    " does not have the GPT layout: no 2-d weight '", name, "'");
    return found->second.size(dim);
  };
  std::int64_t layers = 0;
  while (weights.count("layers." + std::to_string(layers) + ".mlp.fc_in.weight") != 0) ++layers;
  FLEXMODEL_CHECK(layers > 0, ConfigError, source, " does not have the GPT layout: no 'layers.0.mlp.fc_in.weight'");
  if (!n_heads) {
    for (const auto& child : module.named_modules()) {
      if (child.name == "layers.0.attn" && child.value.hasattr("n_heads")) n_heads = child.value.attr("n_heads").toInt();
    }
  }
  FLEXMODEL_CHECK(n_heads.has_value(), ConfigError, source,
                  ": the attention modules keep no 'n_heads' attribute (a traced export); give the head count");
  auto options = GPTOptions()
                     .vocab_size(weight("embed_tokens.weight", 0))
                     .max_positions(weight("embed_positions.weight", 0))
                     .d_model(weight("embed_tokens.weight", 1))
                     .n_heads(*n_heads)
                     .n_layers(layers)
                     .d_mlp(weight("layers.0.mlp.fc_in.weight", 0));
  GPT model(options);
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor& parameter = item.value();
    auto found = weights.find(name);
    FLEXMODEL_CHECK(found != weights.end(), ConfigError, source, " does not have the GPT layout: no weight '", name,
                    "'");
    FLEXMODEL_CHECK(found->second.sizes() == parameter.sizes(), ConfigError, source, ": weight '", name, "' has shape ",
                    found->second.sizes(), ", the GPT layout needs ", parameter.sizes());
    parameter.copy_(found->second);
    weights.erase(found);
  }
  FLEXMODEL_CHECK(weights.empty(), ConfigError, source, " has weights the GPT layout lacks, e.g. '",
                  weights.begin()->first, "'");
  model->eval();
  return model;
}

}  // namespace flexmodel::models
