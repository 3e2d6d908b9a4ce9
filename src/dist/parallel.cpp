#include "flexmodel/parallel.h"

#include <torch/nn/functional.h>

#include "flexmodel/error.h"

namespace flexmodel::parallel {
namespace {

std::int64_t shard_of(std::int64_t full, const dist::Mesh& mesh, const char* what) {
  FLEXMODEL_CHECK(full % mesh.shape().tp == 0, ConfigError, what, " of ", full, " does not split over tp ",
                  mesh.shape().tp, "; choose sizes divisible by tp");
  return full / mesh.shape().tp;
}

}  // namespace

ColumnParallelLinearImpl::ColumnParallelLinearImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t in_features,
                                                   std::int64_t out_features, bool with_bias, bool gather_output,
                                                   std::int64_t blocks)
    : mesh_(std::move(mesh)), gather_output_(gather_output), blocks_(blocks) {
  FLEXMODEL_CHECK(blocks >= 1 && out_features % blocks == 0, ConfigError, "ColumnParallelLinear: out_features ",
                  out_features, " is not ", blocks, " equal blocks");
  shard_of(out_features / blocks, *mesh_, "ColumnParallelLinear: a block's out_features");
  const auto rows = shard_of(out_features, *mesh_, "ColumnParallelLinear: out_features");
  weight = register_parameter("weight", torch::empty({rows, in_features}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({rows}));
}

torch::Tensor ColumnParallelLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor local = torch::linear(x, weight, bias);
  return gather_output_ ? mesh_->tp_group().all_gather(local, -1 + local.dim()) : local;
}

void ColumnParallelLinearImpl::load_full(const torch::Tensor& full_weight, const torch::Tensor& full_bias) {
  torch::NoGradGuard no_grad;
  auto pick = [&](const torch::Tensor& full) {
    std::vector<torch::Tensor> parts;
    for (const auto& block : full.chunk(blocks_, 0)) parts.push_back(block.chunk(mesh_->shape().tp, 0)[mesh_->tp_rank()]);
    return torch::cat(parts, 0);
  };
  weight.copy_(pick(full_weight));
  if (bias.defined() && full_bias.defined()) bias.copy_(pick(full_bias));
}

dist::Sharding ColumnParallelLinearImpl::output_sharding(std::size_t) const {
  return gather_output_ ? dist::Sharding::replicated() : dist::Sharding::split(-1, blocks_);
}

dist::Sharding ColumnParallelLinearImpl::parameter_sharding(const std::string&) const {
  return dist::Sharding::split(0, blocks_);
}

RowParallelLinearImpl::RowParallelLinearImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t in_features,
                                             std::int64_t out_features, bool with_bias)
    : mesh_(std::move(mesh)) {
  const auto columns = shard_of(in_features, *mesh_, "RowParallelLinear: in_features");
  weight = register_parameter("weight", torch::empty({out_features, columns}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({out_features}));
}

torch::Tensor RowParallelLinearImpl::forward(const torch::Tensor& x) {
  torch::Tensor summed = mesh_->tp_group().all_reduce_sum(torch::linear(x, weight));
  return bias.defined() ? summed + bias : summed;
}

void RowParallelLinearImpl::load_full(const torch::Tensor& full_weight, const torch::Tensor& full_bias) {
  torch::NoGradGuard no_grad;
  weight.copy_(full_weight.chunk(mesh_->shape().tp, 1)[mesh_->tp_rank()]);
  if (bias.defined() && full_bias.defined()) bias.copy_(full_bias);
}

dist::Sharding RowParallelLinearImpl::input_sharding(std::size_t) const { return dist::Sharding::split(-1); }

dist::Sharding RowParallelLinearImpl::parameter_sharding(const std::string& name) const {
  return name == "weight" ? dist::Sharding::split(1) : dist::Sharding::replicated();
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(std::shared_ptr<dist::Mesh> mesh, std::int64_t vocab_size,
                                                       std::int64_t dim)
    : mesh_(std::move(mesh)) {
  const auto rows = shard_of(vocab_size, *mesh_, "VocabParallelEmbedding: vocab_size");
  first_row_ = rows * mesh_->tp_rank();
  weight = register_parameter("weight", torch::empty({rows, dim}));
}

torch::Tensor VocabParallelEmbeddingImpl::forward(const torch::Tensor& tokens) {
  // Tokens outside this rank's rows look up row 0 and are zeroed; the sum over
  // the group leaves each token its one owner's row.
  const auto outside = (tokens < first_row_) | (tokens >= first_row_ + weight.size(0));
  torch::Tensor local = torch::embedding(weight, (tokens - first_row_).masked_fill(outside, 0));
  return mesh_->tp_group().all_reduce_sum(local.masked_fill(outside.unsqueeze(-1), 0.0));
}

void VocabParallelEmbeddingImpl::load_full(const torch::Tensor& full_weight) {
  torch::NoGradGuard no_grad;
  weight.copy_(full_weight.chunk(mesh_->shape().tp, 0)[mesh_->tp_rank()]);
}

dist::Sharding VocabParallelEmbeddingImpl::parameter_sharding(const std::string&) const {
  return dist::Sharding::split(0);
}

dist::Sharding ShardedGELUImpl::input_sharding(std::size_t) const { return dist::Sharding::split(-1); }
dist::Sharding ShardedGELUImpl::output_sharding(std::size_t) const { return dist::Sharding::split(-1); }

ParallelAttentionImpl::ParallelAttentionImpl(std::shared_ptr<dist::Mesh> mesh, const models::GPTOptions& options)
    : local_heads_(shard_of(options.n_heads(), *mesh, "ParallelAttention: n_heads")) {
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
  act = register_module("act", ShardedGELU());
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

torch::Tensor ParallelGPTImpl::forward(const torch::Tensor& tokens) {
  FLEXMODEL_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong, ShapeError,
                  "ParallelGPT expects int64 tokens of shape [batch, time], got ", tokens.scalar_type(), " ",
                  tokens.sizes());
  dist::Communicator& stages = mesh_->pp_group();
  const auto batch = tokens.size(0), time = tokens.size(1);
  torch::Tensor h;
  if (first_stage()) {
    auto positions = torch::arange(time, torch::TensorOptions().dtype(torch::kLong).device(tokens.device()));
    h = embed_tokens(tokens) + embed_positions(positions);
  } else {
    h = torch::empty({batch, time, options_.d_model()});
    stages.recv(h, static_cast<int>(mesh_->pp_rank() - 1));
  }
  for (auto& block : blocks) h = block(h);
  if (!last_stage()) {
    stages.send(h, static_cast<int>(mesh_->pp_rank() + 1));
  }
  torch::Tensor logits;
  if (last_stage()) logits = lm_head(norm(h));
  if (mesh_->shape().pp > 1) {
    if (last_stage()) {
      stages.send(logits, 0);
      logits = torch::Tensor();
    } else if (first_stage()) {
      logits = torch::empty({batch, time, options_.vocab_size()});
      stages.recv(logits, static_cast<int>(mesh_->shape().pp - 1));
    }
  }
  return logits;
}

}  // namespace flexmodel::parallel
