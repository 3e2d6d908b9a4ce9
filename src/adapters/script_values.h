// Value hook points of TorchScript modules: the tensors a module's own forward
// computes, named `<module>::<value>`.
//
// A module's own ops are those of its forward after plain function calls
// (F.softmax, F.multi_head_attention_forward) and calls of its own methods
// (self._attn(...)) are inlined, without the calls into child modules. Each
// node with a tensor output is `<op>.<k>`: the op's name without its
// namespace (aten::softmax → softmax, prim::ListUnpack → ListUnpack) and its
// occurrence among that module's nodes of that name, from 0, in graph order,
// branches and loop bodies included (a block's nodes come before the node
// that holds it); a node with several outputs gives each tensor output
// `<op>.<k>.<i>`. A value the Python source named is also `<name>`, without
// TorchScript's numeric suffix (attn_weights.1 → attn_weights); a name given
// to several values names the last of them in graph order (what the variable
// holds once the forward has run), and none when that last one is a child
// module's output; the earlier ones are reachable by op only.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/jit/ir/ir.h>

#include "flexmodel/pattern.h"
#include "flexmodel/torchscript.h"

namespace flexmodel::detail {

// A module type's forward with plain function calls inlined, and its values
// in graph order (`values[i]` is the graph value of `listed[i]`).
struct OwnGraph {
  std::shared_ptr<torch::jit::Graph> graph;
  std::vector<torch::jit::Value*> values;
  std::vector<ValueInfo> listed;

  // The index of the value `text` names (an op or a name), or -1.
  std::ptrdiff_t find(const std::string& text) const;
  // Every name a value is reachable by, op names first, for "close names" and patterns.
  std::vector<std::string> names() const;
};

// A fresh copy for `forward` (each caller may insert nodes into its own).
OwnGraph own_graph(torch::jit::Graph& forward);

// "layers.0.attn::softmax.0" → {"layers.0.attn", "softmax.0"}; false when `name` has no "::".
bool split_value_name(const std::string& name, std::string& module, std::string& value);

}  // namespace flexmodel::detail
