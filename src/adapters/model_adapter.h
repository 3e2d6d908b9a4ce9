// What FlexModelBase needs to know of one kind of model: its hook points and
// parameters. One adapter per kind (native torch::nn::Module, TorchScript).
#pragma once

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "flexmodel/dist.h"

namespace flexmodel::detail {

struct HookPoint {
  const void* key = nullptr;            // identifies the site the model's calls look up
  torch::nn::Module* module = nullptr;  // the native module, for HookContext; null for TorchScript
};

// A hook point with hooks registered, and which side of the call they need.
struct HookPointUse {
  std::string name;
  const void* key = nullptr;
  bool inputs = false;
  bool outputs = false;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// The cause of a LibTorch error in one line: without the backtrace, and for an
// error raised inside the TorchScript interpreter, the interpreter's reason
// rather than its "The following operation failed" preamble.
std::string error_reason(const std::exception& error);

// Up to three of `names` closest to `wanted`, quoted, for "did you mean" messages.
std::string close_names(const std::string& wanted, const std::vector<std::string>& names);

class ModelAdapter {
 public:
  virtual ~ModelAdapter() = default;

  virtual std::vector<std::string> module_names() const = 0;
  // The hook point of `name`; throws ConfigError naming the module and the fix
  // when it does not exist or a hook on it could never fire.
  virtual HookPoint hook_point(const std::string& name) const = 0;
  // Empty when hooks on `name` can fire, else why not and the fix.
  virtual std::string unhookable_reason(const std::string& name) const = 0;
  // Why a hook on `name` that can fire did not in a forward, and the fix.
  virtual std::string unfired_advice(const std::string& name) const {
    (void)name;
    return "if the module runs, it is called around the library (impl->forward(...)); call it through its "
           "hookable holder or flexmodel::call";
  }
  // Every value hook point (`<module>::<value>`) the model offers; none by default.
  virtual std::vector<std::string> value_point_names() const { return {}; }
  // Whether module `name` is a value hook point's own module (a native
  // HookPoint), which wildcards over modules leave to `::` patterns.
  virtual bool is_value_point_module(const std::string& name) const {
    (void)name;
    return false;
  }
  virtual NamedTensors named_parameters() const = 0;
  virtual NamedTensors named_buffers() const = 0;
  virtual const void* root_key() const = 0;
  // "TorchScript model __torch__.GPT", "model GPTImpl": for messages.
  virtual std::string description() const = 0;
  // How the module that owns parameter `name` declares it split over
  // tensor-parallel ranks.
  virtual dist::Sharding parameter_sharding(const std::string& name) const {
    (void)name;
    return dist::Sharding::replicated();
  }
  // The name of the module whose hook point key is `key`, or empty.
  virtual std::string name_of(const void* key) const {
    (void)key;
    return {};
  }
  // What the mesh needs of the model: tensor-parallel layers, a pipeline stage.
  virtual bool has_tensor_parallel_layers() const { return false; }
  virtual bool is_pipeline_stage() const { return false; }
  bool has_module(const std::string& name) const {
    const auto names = module_names();
    return std::find(names.begin(), names.end(), name) != names.end();
  }
  // Called whenever the set of hook points with hooks changes.
  virtual void hook_points_changed(const std::vector<HookPointUse>& uses) { (void)uses; }
};

}  // namespace flexmodel::detail
