// PyTorch's captures of the Hugging Face-layout fixtures
// (tests/fixtures/make_hf_checkpoints.py): hf/<name>/ is the checkpoint, and
// beside it <name>.reference.safetensors (tokens, logits, output:<module>,
// input:<module>), <name>.edited.safetensors and <name>.modules.json.
#pragma once

#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "flexmodel/io/safetensors.h"

namespace flexmodel::testing {

inline const std::string kHfFixtures = std::string(FLEXMODEL_FIXTURE_DIR) + "/hf";

struct HfReference {
  std::string directory;
  std::map<std::string, torch::Tensor> tensors, edited;
  nlohmann::json modules;

  explicit HfReference(const std::string& name) : directory(kHfFixtures + "/" + name) {
    auto read_all = [](const std::string& path) {
      std::map<std::string, torch::Tensor> all;
      const io::SafetensorsFile file(path);
      for (const auto& entry : file.entries()) all[entry.name] = file.read(entry.name);
      return all;
    };
    tensors = read_all(directory + ".reference.safetensors");
    edited = read_all(directory + ".edited.safetensors");
    std::ifstream in(directory + ".modules.json");
    modules = nlohmann::json::parse(in);
  }

  const torch::Tensor& tokens() const { return tensors.at("tokens"); }
  bool bf16() const { return tensors.at("logits").scalar_type() == torch::kBFloat16; }

  // Decoder layers, from the config.json the fixture wrote.
  std::int64_t layers() const {
    const auto& config = modules.at("config");
    return config.contains("n_layer") ? config.at("n_layer").get<std::int64_t>()
                                      : config.at("num_hidden_layers").get<std::int64_t>();
  }

  // Module names in named_modules() order, the root ("") first.
  std::vector<std::string> module_names() const {
    std::vector<std::string> names;
    for (const auto& item : modules.at("named_modules")) names.push_back(item.at(0).get<std::string>());
    return names;
  }

  // Equal to PyTorch's up to float32 rounding (1e-5 relative and absolute),
  // or bf16 rounding: a mesh sums matmuls in another order, and in bf16 each
  // order rounds differently, by a few ulps of the tensor's largest value
  // (one bf16 ulp is 2^-8 relative); no element may be further than 4 of them.
  ::testing::AssertionResult close(const torch::Tensor& ours, const torch::Tensor& theirs) const {
    if (ours.sizes() != theirs.sizes()) {
      return ::testing::AssertionFailure() << "shape " << ours.sizes() << " vs PyTorch's " << theirs.sizes();
    }
    if (ours.scalar_type() != theirs.scalar_type()) {
      return ::testing::AssertionFailure() << "dtype " << ours.scalar_type() << " vs PyTorch's " << theirs.scalar_type();
    }
    const auto a = ours.to(torch::kDouble), b = theirs.to(torch::kDouble);
    const double largest = (a - b).abs().max().item<double>();
    const bool equal = bf16() ? largest <= 4.0 / 256 * b.abs().max().item<double>() : torch::allclose(a, b, 1e-5, 1e-5);
    if (equal) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "max |Δ| " << largest << " (largest |value| "
                                         << b.abs().max().item<double>() << ")";
  }
};

}  // namespace flexmodel::testing
