#include "flexmodel/parallel.h"

#include <cmath>

#include <torch/nn/functional.h>

#include "flexmodel/error.h"

namespace flexmodel::parallel {
namespace {

std::int64_t tp_size(const dist::Mesh* mesh) { return mesh != nullptr ? mesh->shape().tp : 1; }
std::int64_t tp_rank(const dist::Mesh* mesh) { return mesh != nullptr ? mesh->tp_rank() : 0; }

std::int64_t shard_of(std::int64_t full, const dist::Mesh* mesh, const char* what) {
  FLEXMODEL_CHECK(full % tp_size(mesh) == 0, ConfigError, what, " of ", full, " does not split over tp ",
                  tp_size(mesh), "; choose sizes divisible by tp");
  return full / tp_size(mesh);
}

// Dimension `dim` of a weight stored in `layout` that holds its output (or input) features.
std::int64_t output_dim(WeightLayout layout) { return layout == WeightLayout::out_in ? 0 : 1; }
std::int64_t input_dim(WeightLayout layout) { return 1 - output_dim(layout); }

torch::Tensor empty_weight(WeightLayout layout, std::int64_t out, std::int64_t in) {
  return layout == WeightLayout::out_in ? torch::empty({out, in}) : torch::empty({in, out});
}

torch::Tensor apply_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                           WeightLayout layout) {
  return torch::linear(x, layout == WeightLayout::out_in ? weight : weight.t(), bias);
}

}  // namespace

ShardRows shard_rows(std::int64_t full, std::int64_t ranks, std::int64_t rank) {
  const std::int64_t size = (full + ranks - 1) / ranks, first = std::min(full, size * rank);
  return {first, std::min(size, full - first), size};
}

StageLayers stage_layers(std::int64_t layers, std::int64_t stages, std::int64_t stage) {
  const std::int64_t first = stage * layers / stages;
  return {first, (stage + 1) * layers / stages - first};
}

ShardedActivationImpl::ShardedActivationImpl(std::string function) : function_(std::move(function)) {
  if (function_ == "swish") function_ = "silu";
  FLEXMODEL_CHECK(is_supported(function_), ConfigError, "activation '", function_, "' is not supported; supported: ",
                  supported());
}

bool ShardedActivationImpl::is_supported(const std::string& function) {
  for (const char* name : {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish"}) {
    if (function == name) return true;
  }
  return false;
}

const char* ShardedActivationImpl::supported() { return "gelu, gelu_new, gelu_pytorch_tanh, relu, silu, swish"; }

torch::Tensor ShardedActivationImpl::forward(const torch::Tensor& x) {
  if (function_ == "gelu") return torch::gelu(x);
  if (function_ == "relu") return torch::relu(x);
  if (function_ == "silu") return torch::silu(x);
  if (function_ == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  // gelu_new: Hugging Face's NewGELUActivation op by op, so that bf16 rounds
  // between the ops as it does there (torch's fused tanh GELU rounds once).
  return 0.5 * x * (1.0 + torch::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * torch::pow(x, 3.0))));
}

ColumnParallelLinearImpl::ColumnParallelLinearImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t in_features,
                                                   std::int64_t out_features, bool with_bias, bool gather_output,
                                                   std::int64_t blocks, WeightLayout layout)
    : mesh_(std::move(mesh)), out_features_(out_features), gather_output_(gather_output), blocks_(blocks),
      layout_(layout) {
  FLEXMODEL_CHECK(blocks >= 1 && out_features % blocks == 0, ConfigError, "ColumnParallelLinear: out_features ",
                  out_features, " is not ", blocks, " equal blocks");
  // Only a gathered output can be cut back to out_features: a split one has equal shards.
  std::int64_t rows = 0;
  if (gather_output && blocks == 1) {
    rows = shard_rows(out_features, tp_size(mesh_.get()), tp_rank(mesh_.get())).size;
  } else {
    shard_of(out_features / blocks, mesh_.get(), "ColumnParallelLinear: a block's out_features");
    rows = out_features / tp_size(mesh_.get());
  }
  weight = register_parameter("weight", empty_weight(layout_, rows, in_features));
  if (with_bias) bias = register_parameter("bias", torch::zeros({rows}));
}

torch::Tensor ColumnParallelLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor local = apply_linear(x, weight, bias, layout_);
  if (!gather_output_ || mesh_ == nullptr) return local;
  const torch::Tensor full = mesh_->tp_group().all_gather(local, -1 + local.dim());
  return full.size(-1) == out_features_ ? full : full.narrow(-1, 0, out_features_);
}

void ColumnParallelLinearImpl::load_full(const torch::Tensor& full_weight, const torch::Tensor& full_bias) {
  torch::NoGradGuard no_grad;
  const auto ranks = tp_size(mesh_.get()), rank = tp_rank(mesh_.get());
  auto pick = [&](const torch::Tensor& full, std::int64_t dim) {
    if (blocks_ == 1) {
      const auto rows = shard_rows(full.size(dim), ranks, rank);
      auto sizes = full.sizes().vec();
      sizes[static_cast<std::size_t>(dim)] = rows.size;
      torch::Tensor shard = torch::zeros(sizes, full.options());
      shard.narrow(dim, 0, rows.count).copy_(full.narrow(dim, rows.first, rows.count));
      return shard;
    }
    std::vector<torch::Tensor> parts;
    for (const auto& block : full.chunk(blocks_, dim)) parts.push_back(block.chunk(ranks, dim)[rank]);
    return torch::cat(parts, dim);
  };
  weight.copy_(pick(full_weight, output_dim(layout_)));
  if (bias.defined() && full_bias.defined()) bias.copy_(pick(full_bias, 0));
}

dist::Sharding ColumnParallelLinearImpl::output_sharding(std::size_t) const {
  return gather_output_ ? dist::Sharding::replicated() : dist::Sharding::split(-1, blocks_);
}

dist::Sharding ColumnParallelLinearImpl::parameter_sharding(const std::string& name) const {
  return dist::Sharding::split(name == "weight" ? output_dim(layout_) : 0, blocks_);
}

RowParallelLinearImpl::RowParallelLinearImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t in_features,
                                             std::int64_t out_features, bool with_bias, WeightLayout layout)
    : mesh_(std::move(mesh)), layout_(layout) {
  const auto columns = shard_of(in_features, mesh_.get(), "RowParallelLinear: in_features");
  weight = register_parameter("weight", empty_weight(layout_, out_features, columns));
  if (with_bias) bias = register_parameter("bias", torch::zeros({out_features}));
}

torch::Tensor RowParallelLinearImpl::forward(const torch::Tensor& x) {
  if (mesh_ == nullptr) return apply_linear(x, weight, bias, layout_);
  torch::Tensor summed = mesh_->tp_group().all_reduce_sum(apply_linear(x, weight, {}, layout_));
  return bias.defined() ? summed + bias : summed;
}

void RowParallelLinearImpl::load_full(const torch::Tensor& full_weight, const torch::Tensor& full_bias) {
  torch::NoGradGuard no_grad;
  weight.copy_(full_weight.chunk(tp_size(mesh_.get()), input_dim(layout_))[tp_rank(mesh_.get())]);
  if (bias.defined() && full_bias.defined()) bias.copy_(full_bias);
}

dist::Sharding RowParallelLinearImpl::input_sharding(std::size_t) const { return dist::Sharding::split(-1); }

dist::Sharding RowParallelLinearImpl::parameter_sharding(const std::string& name) const {
  return name == "weight" ? dist::Sharding::split(input_dim(layout_)) : dist::Sharding::replicated();
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t vocab_size,
                                                       std::int64_t dim)
    : mesh_(std::move(mesh)) {
  const auto rows = shard_rows(vocab_size, tp_size(mesh_.get()), tp_rank(mesh_.get()));
  first_row_ = rows.first;
  weight = register_parameter("weight", torch::empty({rows.size, dim}));
}

torch::Tensor VocabParallelEmbeddingImpl::forward(const torch::Tensor& tokens) {
  if (mesh_ == nullptr) return torch::embedding(weight, tokens);
  // Tokens outside this rank's rows look up row 0 and are zeroed; the sum over
  // the group leaves each token its one owner's row.
  const auto outside = (tokens < first_row_) | (tokens >= first_row_ + weight.size(0));
  torch::Tensor local = torch::embedding(weight, (tokens - first_row_).masked_fill(outside, 0));
  return mesh_->tp_group().all_reduce_sum(local.masked_fill(outside.unsqueeze(-1), 0.0));
}

void VocabParallelEmbeddingImpl::load_full(const torch::Tensor& full_weight) {
  torch::NoGradGuard no_grad;
  const auto rows = shard_rows(full_weight.size(0), tp_size(mesh_.get()), tp_rank(mesh_.get()));
  weight.zero_();
  weight.narrow(0, 0, rows.count).copy_(full_weight.narrow(0, rows.first, rows.count));
}

dist::Sharding VocabParallelEmbeddingImpl::parameter_sharding(const std::string&) const {
  return dist::Sharding::split(0);
}

ParallelAttentionImpl::ParallelAttentionImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options)
    : local_heads_(shard_of(options.n_heads(), mesh.get(), "ParallelAttention: n_heads")) {
  qkv = register_module("qkv", ColumnParallelLinear(mesh, options.d_model(), 3 * options.d_model(), /*bias=*/true,
                                                    /*gather_output=*/false, /*blocks=*/3));
  proj = register_module("proj", RowParallelLinear(mesh, options.d_model(), options.d_model()));
  for (auto [name, point] : points.named()) {
    *point = register_module(
        name, flexmodel::nn::HookPoint(std::shared_ptr<flexmodel::nn::HookPointImpl>(std::make_shared<HeadsHookPointImpl>())));
  }
}

dist::Sharding HeadsHookPointImpl::input_sharding(std::size_t) const { return dist::Sharding::split(1); }
dist::Sharding HeadsHookPointImpl::output_sharding(std::size_t) const { return dist::Sharding::split(1); }

dist::Sharding ParallelAttentionImpl::output_sharding(std::size_t leaf) const {
  return leaf == 1 ? dist::Sharding::split(1) : dist::Sharding::replicated();
}

std::tuple<torch::Tensor, torch::Tensor> ParallelAttentionImpl::forward(const torch::Tensor& x) {
  // qkv holds q | k | v of this rank's heads; proj sums the heads of every rank.
  auto [mixed, probs] = models::causal_attention(qkv(x), local_heads_, nullptr, &points);
  return {proj(mixed), probs};
}

ParallelMLPImpl::ParallelMLPImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options) {
  fc_in = register_module("fc_in", ColumnParallelLinear(mesh, options.d_model(), options.d_mlp()));
  act = register_module("act", ShardedActivation("gelu"));
  fc_out = register_module("fc_out", RowParallelLinear(mesh, options.d_mlp(), options.d_model()));
}

torch::Tensor ParallelMLPImpl::forward(const torch::Tensor& x) { return fc_out(act(fc_in(x))); }

ParallelBlockImpl::ParallelBlockImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options) {
  ln_1 = register_module("ln_1", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({options.d_model()})));
  attn = register_module("attn", ParallelAttention(mesh, options));
  ln_2 = register_module("ln_2", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({options.d_model()})));
  mlp = register_module("mlp", ParallelMLP(mesh, options));
}

torch::Tensor ParallelBlockImpl::forward(const torch::Tensor& x) {
  auto h = x + std::get<0>(attn(ln_1(x)));
  return h + mlp(ln_2(h));
}

namespace {

void copy_layer_norm(torch::nn::LayerNormImpl& into, const torch::nn::LayerNormImpl& from) {
  torch::NoGradGuard no_grad;
  into.weight.copy_(from.weight);
  into.bias.copy_(from.bias);
}

}  // namespace

ParallelGPTImpl::ParallelGPTImpl(const models::GPTImpl& full, std::shared_ptr<dist::Mesh> mesh)
    : mesh_(std::move(mesh)), options_(full.options()) {
  const std::int64_t stages = mesh_->shape().pp;
  FLEXMODEL_CHECK(options_.n_layers() % stages == 0, ConfigError, "ParallelGPT: ", options_.n_layers(),
                  " layers do not split into pp ", stages, " equal stages; choose pp dividing the layer count");
  torch::NoGradGuard no_grad;
  if (first_stage()) {
    embed_tokens = register_module("embed_tokens", VocabParallelEmbedding(mesh_, options_.vocab_size(), options_.d_model()));
    embed_tokens->load_full(full.embed_tokens->weight);
    embed_positions = register_module("embed_positions", flexmodel::nn::Embedding(options_.max_positions(), options_.d_model()));
    embed_positions->weight.copy_(full.embed_positions->weight);
  }
  // A plain container so that the blocks keep the full model's names.
  auto layers = register_module("layers", std::make_shared<torch::nn::Module>("ModuleList"));
  const std::int64_t per_stage = options_.n_layers() / stages;
  for (std::int64_t index = mesh_->pp_rank() * per_stage; index < (mesh_->pp_rank() + 1) * per_stage; ++index) {
    const auto& source = *full.layers->ptr<models::BlockImpl>(static_cast<std::size_t>(index));
    ParallelBlock block(mesh_, options_);
    copy_layer_norm(*block->ln_1, *source.ln_1);
    copy_layer_norm(*block->ln_2, *source.ln_2);
    block->attn->qkv->load_full(source.attn->qkv->weight, source.attn->qkv->bias);
    block->attn->proj->load_full(source.attn->proj->weight, source.attn->proj->bias);
    block->mlp->fc_in->load_full(source.mlp->fc_in->weight, source.mlp->fc_in->bias);
    block->mlp->fc_out->load_full(source.mlp->fc_out->weight, source.mlp->fc_out->bias);
    layers->register_module(std::to_string(index), block);
    blocks.push_back(block);
  }
  if (last_stage()) {
    norm = register_module("norm", flexmodel::nn::LayerNorm(torch::nn::LayerNormOptions({options_.d_model()})));
    copy_layer_norm(*norm, *full.norm);
    lm_head = register_module("lm_head", ColumnParallelLinear(mesh_, options_.d_model(), options_.vocab_size(),
                                                              /*bias=*/false, /*gather_output=*/true));
    lm_head->load_full(full.lm_head->weight);
  }
}

torch::Tensor run_pipeline_stage(const dist::Mesh* mesh, const torch::Tensor& tokens, std::int64_t width,
                                 std::int64_t vocab, const torch::TensorOptions& hidden, const StageSteps& steps) {
  const std::int64_t stages = mesh != nullptr ? mesh->shape().pp : 1, stage = mesh != nullptr ? mesh->pp_rank() : 0;
  if (stages == 1) return steps.head(steps.layers(steps.embed()));
  dist::Communicator& group = mesh->pp_group();
  const auto batch = tokens.size(0), time = tokens.size(1);
  torch::Tensor h;
  if (stage == 0) {
    h = steps.embed();
  } else {
    h = torch::empty({batch, time, width}, hidden);
    group.recv(h, static_cast<int>(stage - 1));
  }
  h = steps.layers(h);
  if (stage + 1 < stages) {
    group.send(h, static_cast<int>(stage + 1));
    if (stage != 0) return {};
    torch::Tensor logits = torch::empty({batch, time, vocab}, hidden);
    group.recv(logits, static_cast<int>(stages - 1));
    return logits;
  }
  group.send(steps.head(h), 0);
  return {};
}

torch::Tensor ParallelGPTImpl::forward(const torch::Tensor& tokens) {
  FLEXMODEL_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong, ShapeError,
                  "ParallelGPT expects int64 tokens of shape [batch, time], got ", tokens.scalar_type(), " ",
                  tokens.sizes());
  StageSteps steps;
  steps.embed = [&] {
    auto positions = torch::arange(tokens.size(1), torch::TensorOptions().dtype(torch::kLong).device(tokens.device()));
    return embed_tokens(tokens) + embed_positions(positions);
  };
  steps.layers = [&](torch::Tensor h) {
    for (auto& block : blocks) h = block(h);
    return h;
  };
  steps.head = [&](const torch::Tensor& h) { return lm_head(norm(h)); };
  return run_pipeline_stage(mesh_.get(), tokens, options_.d_model(), options_.vocab_size(),
                            torch::TensorOptions().dtype(torch::kFloat32).device(tokens.device()), steps);
}

}  // namespace flexmodel::parallel
