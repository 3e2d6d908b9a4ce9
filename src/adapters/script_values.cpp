#include "adapters/script_values.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <unordered_map>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/inliner.h>

namespace flexmodel::detail {
namespace {

namespace jit = torch::jit;

using Names = std::unordered_map<const jit::Value*, std::string>;

// The Python name of a value: its debug name without TorchScript's ".N" suffix.
std::string python_name(const jit::Value* value) {
  if (!value->hasDebugName()) return {};
  std::string name = value->debugName();
  const auto dot = name.rfind('.');
  if (dot != std::string::npos && dot + 1 < name.size() &&
      std::all_of(name.begin() + static_cast<std::ptrdiff_t>(dot) + 1, name.end(),
                  [](unsigned char c) { return std::isdigit(c) != 0; })) {
    name.resize(dot);
  }
  return name;
}

void name_values(jit::Block* block, Names& names) {
  for (jit::Node* node : block->nodes()) {
    for (jit::Block* inner : node->blocks()) name_values(inner, names);
    for (const jit::Value* output : node->outputs()) {
      std::string name = python_name(output);
      if (!name.empty()) names.emplace(output, std::move(name));
    }
  }
}

// A call to inline: a plain function's, or one of the module's own methods (self._attn(...)).
jit::Node* first_inlined_call(jit::Block* block, const jit::Value* self) {
  for (jit::Node* node : block->nodes()) {
    if (node->kind() == jit::prim::CallFunction) return node;
    if (node->kind() == jit::prim::CallMethod && node->input(0) == self) return node;
    for (jit::Block* inner : node->blocks()) {
      if (jit::Node* found = first_inlined_call(inner, self)) return found;
    }
  }
  return nullptr;
}

// Inlines every plain function call and call of the module's own methods; the
// value a call returned keeps the call's name, the callee's own values get none.
void inline_calls(jit::Graph& graph, Names& names) {
  const jit::Value* self = graph.inputs().empty() ? nullptr : graph.inputs()[0];
  while (jit::Node* call = first_inlined_call(graph.block(), self)) {
    std::vector<std::string> returned;
    for (const jit::Value* output : call->outputs()) {
      auto found = names.find(output);
      returned.push_back(found == names.end() ? std::string() : found->second);
      if (found != names.end()) names.erase(found);
    }
    jit::GraphFunction* callee = nullptr;
    if (call->kind() == jit::prim::CallFunction) {
      callee = &jit::toGraphFunction(*call->input(0)->type()->expect<c10::FunctionType>()->function());
      // The function constant goes; the arguments stay, as the JIT's own inliner does it.
      call->removeInput(0);
    } else {
      callee = &jit::toGraphFunction(self->type()->expect<c10::ClassType>()->getMethod(call->s(jit::attr::name)));
    }
    const auto outputs = jit::inlineCallTo(call, callee, callee->graph().get());
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      if (!returned[i].empty()) names[outputs[i]] = returned[i];
    }
  }
}

bool is_tensor(const jit::Value* value) { return value->type()->cast<c10::TensorType>() != nullptr; }

// Whether `node`'s output shares memory with an input (a view, an in-place
// op's result): an edit of it must be written into that memory.
bool output_aliases_input(const jit::Node* node) {
  const c10::FunctionSchema* schema = node->maybeSchema();
  return schema != nullptr && !schema->returns().empty() && schema->returns()[0].alias_info() != nullptr;
}

// `named` gets every named output in graph order, point or not (-1), for the
// rule that a shared name reaches the last value that took it.
void collect(jit::Block* block, const Names& names, std::map<std::string, int>& counts, OwnGraph& own,
             std::vector<std::pair<std::string, std::ptrdiff_t>>& named) {
  for (jit::Node* node : block->nodes()) {
    for (jit::Block* inner : node->blocks()) collect(inner, names, counts, own, named);
    const auto kind = node->kind();
    // Constants, attribute reads (parameters) and child calls are not the
    // module's own ops; an Uninitialized placeholder (of a branch that
    // raises) holds no tensor.
    const bool own_op = kind != jit::prim::Constant && kind != jit::prim::GetAttr && kind != jit::prim::CallMethod &&
                        kind != jit::prim::Uninitialized;
    std::vector<std::size_t> tensors;
    for (std::size_t i = 0; i < node->outputs().size(); ++i) {
      if (is_tensor(node->output(i))) tensors.push_back(i);
    }
    const int occurrence = own_op && !tensors.empty() ? counts[kind.toUnqualString()]++ : 0;
    for (std::size_t i = 0; i < node->outputs().size(); ++i) {
      const jit::Value* output = node->output(i);
      auto found = names.find(output);
      const std::string name = found == names.end() ? std::string() : found->second;
      const bool point = own_op && is_tensor(output);
      if (!name.empty()) named.emplace_back(name, point ? static_cast<std::ptrdiff_t>(own.listed.size()) : -1);
      if (!point) continue;
      ValueInfo value;
      // One tensor output: <op>.<k>; several: <op>.<k>.<i>, i its index among the node's outputs.
      value.op = std::string(kind.toUnqualString()) + "." + std::to_string(occurrence) +
                 (node->outputs().size() == 1 ? std::string() : "." + std::to_string(i));
      value.name = name;
      value.kind = kind.toQualString();
      value.aliases_input = output_aliases_input(node);
      own.values.push_back(node->output(i));
      own.listed.push_back(std::move(value));
    }
  }
}

}  // namespace

OwnGraph own_graph(jit::Graph& forward) {
  OwnGraph own;
  own.graph = forward.copy();
  Names names;
  name_values(own.graph->block(), names);
  inline_calls(*own.graph, names);
  std::map<std::string, int> counts;
  std::vector<std::pair<std::string, std::ptrdiff_t>> named;
  collect(own.graph->block(), names, counts, own, named);
  // A name reaches the last value that took it, and none when that one is no
  // point of this module (a child's output).
  std::map<std::string, std::ptrdiff_t> last;
  for (const auto& [name, index] : named) last[name] = index;
  for (std::size_t i = 0; i < own.listed.size(); ++i) {
    own.listed[i].name_is_last = own.listed[i].name.empty() || last[own.listed[i].name] == static_cast<std::ptrdiff_t>(i);
  }
  return own;
}

std::ptrdiff_t OwnGraph::find(const std::string& text) const {
  for (std::size_t i = 0; i < listed.size(); ++i) {
    if (listed[i].op == text || (listed[i].name == text && listed[i].name_is_last)) {
      return static_cast<std::ptrdiff_t>(i);
    }
  }
  return -1;
}

std::vector<std::string> OwnGraph::names() const {
  std::vector<std::string> out;
  for (const auto& value : listed) {
    if (!value.op.empty()) out.push_back(value.op);
    if (!value.name.empty() && value.name_is_last) out.push_back(value.name);
  }
  return out;
}

bool split_value_name(const std::string& name, std::string& module, std::string& value) {
  const auto at = name.find(kValueSeparator);
  if (at == std::string::npos) return false;
  module = name.substr(0, at);
  value = name.substr(at + kValueSeparator.size());
  return true;
}

}  // namespace flexmodel::detail
