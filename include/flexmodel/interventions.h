// Interventions that last: trainable modules that edit an activation (a
// steering vector, a low-rank edit), saved with their configuration and loaded
// back, in a file Python's torch.jit.load reads.
//
//   auto steer = std::make_shared<flexmodel::SteeringVectorImpl>(64, /*coefficient=*/4.0);
//   fm.register_trainable_module("steer", steer);
//   fm.register_forward_hook(flexmodel::HookFunction("layers.1", {}, flexmodel::hooks::intervene("steer")));
//   ... train or set steer->direction ...
//   flexmodel::save_intervention(*steer, "steer.pt");
//   auto loaded = flexmodel::load_intervention("steer.pt");   // in another run
//
// The file is a TorchScript archive (what torch::save writes): its parameters
// under their names, `flexmodel_kind` (a string) and `flexmodel_config` (a
// JSON object of numbers). In Python:
//   m = torch.jit.load("steer.pt"); m.direction; json.loads(m.flexmodel_config)
#pragma once

#include <map>
#include <memory>
#include <string>

#include <torch/nn/module.h>
#include <torch/types.h>

namespace flexmodel {

// The numbers that rebuild an intervention (sizes, coefficients).
using InterventionConfig = std::map<std::string, double>;

class InterventionImpl : public torch::nn::Module {
 public:
  // The edited activation.
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  // The name saved in the file, which load_intervention builds from.
  virtual std::string kind() const = 0;
  virtual InterventionConfig config() const = 0;
};

// x + coefficient · direction, the direction over the last dim (activation steering).
class SteeringVectorImpl : public InterventionImpl {
 public:
  explicit SteeringVectorImpl(std::int64_t d_model, double coefficient = 1.0);
  torch::Tensor forward(const torch::Tensor& x) override;
  std::string kind() const override { return "steering_vector"; }
  InterventionConfig config() const override;

  torch::Tensor direction;
  double coefficient;
};

// x + (x · down) · up, of rank `rank` (up starts at zero: the identity until trained).
class LowRankInterventionImpl : public InterventionImpl {
 public:
  LowRankInterventionImpl(std::int64_t d_model, std::int64_t rank);
  torch::Tensor forward(const torch::Tensor& x) override;
  std::string kind() const override { return "low_rank"; }
  InterventionConfig config() const override;

  torch::Tensor down, up;
};

// Writes the intervention's parameters, kind and configuration; IOError naming the file when it cannot.
void save_intervention(const InterventionImpl& intervention, const std::string& path);
// The intervention a file holds, rebuilt from its configuration; IOError
// naming the file when it is unreadable or not an intervention, ConfigError
// for a kind this library does not know.
std::shared_ptr<InterventionImpl> load_intervention(const std::string& path);

}  // namespace flexmodel
