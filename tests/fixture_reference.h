// PyTorch's own captures on the exported fixtures (tests/fixtures/make_fixtures.py
// writes reference.pt): the reference the TorchScript tests compare against.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/script.h>

#include "flexmodel/hook_function.h"

namespace flexmodel::testing {

inline const std::string kFixtures = FLEXMODEL_FIXTURE_DIR;

struct Reference {
  std::map<std::string, torch::Tensor> tensors;
  torch::Tensor tokens;

  static const Reference& get() {
    static const Reference reference = [] {
      Reference loaded;
      auto store = torch::jit::load(kFixtures + "/reference.pt");
      for (const auto& entry : store.attr("tensors").toGenericDict()) {
        loaded.tensors[entry.key().toStringRef()] = entry.value().toTensor();
      }
      loaded.tokens = loaded.tensors.at("tokens");
      return loaded;
    }();
    return reference;
  }

  // (hook type, module, leaf) for every capture PyTorch's hooks made.
  struct Capture {
    HookType type;
    std::string module;
    std::size_t leaf;
    std::string key;
  };
  std::vector<Capture> captures() const {
    std::vector<Capture> out;
    for (const auto& [key, tensor] : tensors) {
      auto first = key.find('|'), second = key.rfind('|');
      if (first == std::string::npos || first == second) continue;
      auto kind = key.substr(0, first);
      out.push_back({kind == "forward" ? HookType::forward : HookType::forward_pre,
                     key.substr(first + 1, second - first - 1), std::stoul(key.substr(second + 1)), key});
    }
    return out;
  }
};

}  // namespace flexmodel::testing
