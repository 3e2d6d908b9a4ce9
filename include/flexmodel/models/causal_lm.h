// The common face of the Hugging Face families (models/gpt2.h, models/llama.h):
// a decoder language model, possibly one pipeline stage of it, that maps token
// ids to logits, and says how it may be split over a mesh.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "flexmodel/dist.h"
#include "flexmodel/parallel.h"

namespace flexmodel::models {

// What a family's model supports on a mesh, and where its hooks can go
// (NeMo AutoModel's `supports.*`).
struct Capabilities {
  std::string family;        // "gpt2", "llama", "mistral", "qwen2"
  std::string architecture;  // Hugging Face's class: "GPT2LMHeadModel"
  bool tensor_parallel = true;
  bool pipeline_parallel = true;
  // "<module pattern>: <how it is split>", one line a kind of layer.
  std::vector<std::string> tensor_parallel_plan;
  // What a pipeline stage holds, in order: the embeddings, its layers, the head.
  std::string pipeline_plan;
  // Every module of the whole model (all stages) whose hooks fire, in Hugging
  // Face's order: all but the layers' container, which is never called.
  std::vector<std::string> hook_points;
};

// A causal LM of a Hugging Face family, built for one rank of a mesh (or for
// one process without one): under TP×PP it holds only its stage's modules,
// with flexmodel::parallel layers, named as the whole model's are.
class CausalLMImpl : public torch::nn::Module, public dist::PipelineStageModule {
 public:
  using torch::nn::Module::Module;

  // tokens: int64 [B, T] → logits [B, T, vocab] in the model's dtype; under
  // pipeline parallelism on the first stage only (undefined elsewhere).
  virtual torch::Tensor forward(const torch::Tensor& tokens) = 0;

  virtual Capabilities capabilities() const = 0;
  virtual std::int64_t vocab_size() const = 0;
  // For a parameter tied to another (GPT-2's lm_head.weight to its token
  // embedding), the other's name; else empty.
  virtual std::string tied_to(const std::string& parameter) const = 0;
  // The same model built for one process, its large weights left
  // uninitialised (untouched memory): the names of every stage's modules.
  virtual std::shared_ptr<CausalLMImpl> whole_model() const = 0;

  // The hook points of the whole model (every stage's): see Capabilities.
  std::vector<std::string> hook_points() const;
  // Parameter names of the whole model as a checkpoint stores them: tied
  // weights once.
  std::vector<std::string> checkpoint_names() const;
  // The mesh the model was built for (null: one process).
  const std::shared_ptr<dist::Mesh>& mesh() const { return mesh_; }

 protected:
  // The logits of checked `tokens`: `whole` in one stage; on a pipeline this
  // stage's part of `steps`, passing activations `width` wide.
  torch::Tensor forward_stages(const torch::Tensor& tokens, std::int64_t width,
                               const std::function<torch::Tensor()>& whole, const parallel::StageSteps& steps);

  std::shared_ptr<dist::Mesh> mesh_;
};

}  // namespace flexmodel::models
