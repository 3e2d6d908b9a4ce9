// FlexModel over TorchScript: the model a C++ user loads from a .pt file,
// hooked without changing it. Hook points are the names of named_modules()
// and the values their forwards compute (`layers.0.attn::softmax.0`).
//
//   flexmodel::FlexModel fm(flexmodel::load_torchscript("gpt.pt"));
//   fm.register_forward_hook(flexmodel::HookFunction("layers.0.mlp"));
//   torch::IValue logits = fm.forward({tokens});
//
// The loaded module is never mutated: the library runs its own copy of the
// forward graph, with every call to a hooked module inlined into it (so
// instances that share a class are told apart) and one hook operator at each
// such call. Switching groups reuses that graph; registering or removing hooks
// rebuilds it at the next forward. restore() drops it.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/script.h>

#include "flexmodel/flex_model.h"

namespace flexmodel {

namespace detail {
class ScriptAdapter;
}

// Loads a TorchScript file (torch.jit.save output); IOError naming the file when
// it is missing or not TorchScript.
torch::jit::Module load_torchscript(const std::string& path);

// The first tensor of a forward's output, depth first: the output itself, a
// tuple's or list's first tensor, a dict's first value (Hugging Face's
// `logits`, a named tuple's first field); a ShapeError saying what the output
// is when it holds none.
//   torch::Tensor logits = flexmodel::first_tensor(fm.forward({tokens}));
torch::Tensor first_tensor(const torch::IValue& output);

// A value hook point of a module's own forward, reached as `<module>::<op>`
// or `<module>::<name>` (the README's "Value hook points" says how names form).
struct ValueInfo {
  std::string op;            // "softmax.0"; empty when only its name reaches it
  std::string name;          // the Python variable's ("probs"); empty when it has none
  bool name_is_last = true;  // false: a later value has the same name, and the name reaches that one
  std::string kind;          // the operator, "aten::softmax"
  bool aliases_input = false;  // a view or an in-place op's result: an edit is written into its memory
};

template <>
class FlexModel<torch::jit::Module> : public FlexModelBase {
 public:
  explicit FlexModel(torch::jit::Module module, FlexModelOptions options = {});
  explicit FlexModel(const std::string& path, FlexModelOptions options = {});

  // Runs the model's forward with the hooks of group "all".
  torch::IValue forward(std::vector<torch::IValue> inputs);
  // Runs the model's forward with the hooks of the chosen groups.
  torch::IValue forward(const Groups& groups, std::vector<torch::IValue> inputs);
  // The forward only as far as the hooks of `groups` need it; see
  // FlexModel::run_to_last_hook. Returns whether it stopped early.
  bool run_to_last_hook(const Groups& groups, std::vector<torch::IValue> inputs);

  const torch::jit::Module& module() const { return module_; }

  // The value hook points of module `module_name` ("(root)" for the root) in
  // graph order; a ConfigError when its hooks could never fire.
  std::vector<ValueInfo> value_points(const std::string& module_name) const;

  // Whether the forward calls `module_name` as child.forward(...): flexmodel's
  // hooks fire there, PyTorch's own hooks would not.
  bool called_as_forward(const std::string& module_name) const;

  // While on, forwards note where each hooked point's tensors sit in its input
  // or output tree, as Python would index them ("['logits']", "[1]", ".probs",
  // "" for a lone tensor): leaf_names(module, forward) names the leaves of its
  // output in the last forward, forward_pre those of its inputs.
  void record_leaf_names(bool on) { record_leaf_names_ = on; }
  std::vector<std::string> leaf_names(const std::string& module_name, HookType type) const;

 private:
  FlexModel(torch::jit::Module module, std::shared_ptr<detail::ScriptAdapter> adapter, FlexModelOptions options);
  // The instrumented graph, or the module's own forward when nothing is hooked.
  torch::IValue run_graph(std::vector<torch::IValue> inputs);

  torch::jit::Module module_;
  std::shared_ptr<detail::ScriptAdapter> script_;
  bool record_leaf_names_ = false;
  std::map<std::pair<const void*, bool>, std::vector<std::string>> leaf_names_;
};

FlexModel(torch::jit::Module) -> FlexModel<torch::jit::Module>;
FlexModel(torch::jit::Module, FlexModelOptions) -> FlexModel<torch::jit::Module>;
FlexModel(const std::string&) -> FlexModel<torch::jit::Module>;
FlexModel(const std::string&, FlexModelOptions) -> FlexModel<torch::jit::Module>;
FlexModel(const char*) -> FlexModel<torch::jit::Module>;

using ScriptFlexModel = FlexModel<torch::jit::Module>;

}  // namespace flexmodel
