// Hugging Face checkpoints without Python: a directory of config.json and
// model.safetensors (or shards listed by model.safetensors.index.json)
// becomes a hookable native model of its family, each rank of a mesh
// building and reading only its share (fairseq2's model hub: families,
// architectures, create and load).
//
//   auto model = flexmodel::hub::load_model("./Llama-dir");
//   flexmodel::FlexModel fm(model);   // hook "model.layers.3.mlp", …
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "flexmodel/dist.h"
#include "flexmodel/models/causal_lm.h"
#include "flexmodel/models/gpt2.h"
#include "flexmodel/models/llama.h"

namespace flexmodel::hub {

// A family's configuration: GPT-2's, or LLaMA's (which Mistral and Qwen2 share).
using ModelConfig = std::variant<models::GPT2Config, models::LlamaConfig>;

// The families load_model knows, by Hugging Face's model_type: gpt2, llama, mistral, qwen2.
std::vector<std::string> families();
// A family's preset architectures ("gpt2", "gpt2-medium", …, "llama-3-8b"), each a config.
std::vector<std::string> architectures(const std::string& family);
// The config of a preset architecture; a ConfigError lists the presets for a name that is none.
ModelConfig architecture_config(const std::string& architecture);

// config.json as Hugging Face writes it: keys left out take Hugging Face's
// defaults; an unknown model_type, or a key whose value this library would
// not honour (rope_scaling, say), is a ConfigError naming the file, the key
// and what is supported.
ModelConfig read_config(const std::string& directory);
std::string family_of(const ModelConfig& config);

// Every reason `config` cannot run on `shape`, each with its fix; empty when it can.
std::vector<std::string> validate_for_mesh(const ModelConfig& config, const dist::MeshShape& shape);

struct LoadOptions {
  // The mesh to shard over; null: the whole model in this process.
  TORCH_ARG(std::shared_ptr<dist::Mesh>, mesh) = nullptr;
  // The parameters' dtype; unset: the dtype the files store.
  TORCH_ARG(std::optional<torch::Dtype>, dtype) = std::nullopt;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

// A new model of `config` for this rank of options.mesh(), in train mode,
// initialised as Hugging Face initialises one: weights normal(0,
// initializer_range) (GPT-2's c_proj divided by √(2 · n_layer)), zero biases,
// unit norms; ranks that share a weight hold the same values, and a tied head
// its embedding's on every stage.
std::shared_ptr<models::CausalLMImpl> create_new_model(const ModelConfig& config, const LoadOptions& options = {});

// The modules of `config` for this rank of options.mesh(), their weights
// uninitialised memory (untouched, so it costs no RAM until written): what
// listing a model's modules and shapes needs, without a checkpoint's bytes.
std::shared_ptr<models::CausalLMImpl> build_model(const ModelConfig& config, const LoadOptions& options = {});

// The dtype a checkpoint directory stores its floating-point weights in, from
// the files' headers alone.
torch::Dtype stored_dtype(const std::string& directory);

// What a load read: a rank of a TP×PP mesh reads about 1/(tp·pp) of the bytes stored.
struct LoadReport {
  std::uint64_t bytes_read = 0;    // tensor data this rank copied out of the files
  std::uint64_t bytes_stored = 0;  // the checkpoint's weights the model takes (no buffers it recomputes)
  torch::Dtype stored_dtype = torch::kFloat32;  // of its floating-point tensors
};

// The model of a checkpoint directory, in eval mode, for this rank of
// options.mesh(): it builds only its pipeline stage and reads only its
// shards' bytes. The mesh must pass validate_for_mesh. A missing, misshapen
// or unexpected tensor is a ConfigError naming it and the file (the
// directory, for a tensor no file holds), raised on every rank alike; other
// files in the directory (tokenizer, generation_config.json) are ignored.
std::shared_ptr<models::CausalLMImpl> load_model(const std::string& directory, const LoadOptions& options = {},
                                                 LoadReport* report = nullptr);

}  // namespace flexmodel::hub
