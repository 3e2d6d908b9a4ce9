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

jit::Node* first_function_call(jit::Block* block) {
  for (jit::Node* node : block->nodes()) {
    if (node->kind() == jit::prim::CallFunction) return node;
    for (jit::Block* inner : node->blocks()) {
      if (jit::Node* found = first_function_call(inner)) return found;
    }
  }
  return nullptr;
}

// Inlines every prim::CallFunction; the value a call returned keeps the
// call's name, the function's own values get none.
void inline_function_calls(jit::Graph& graph, Names& names) {
  while (jit::Node* call = first_function_call(graph.block())) {
    auto function = call->input(0)->type()->expect<c10::FunctionType>()->function();
    std::vector<std::string> returned;
    for (const jit::Value* output : call->outputs()) {
      auto found = names.find(output);
      returned.push_back(found == names.end() ? std::string() : found->second);
      if (found != names.end()) names.erase(found);
    }
    auto& callee = jit::toGraphFunction(*function);
    // The function constant goes; the arguments stay, as the JIT's own inliner does it.
    call->removeInput(0);
    const auto outputs = jit::inlineCallTo(call, &callee, callee.graph().get());
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      if (!returned[i].empty()) names[outputs[i]] = returned[i];
    }
  }
}

bool is_tensor(const jit::Value* value) { return value->type()->cast<c10::TensorType>() != nullptr; }

void collect(jit::Block* block, const Names& names, std::map<std::string, int>& counts, OwnGraph& own) {
  for (jit::Node* node : block->nodes()) {
    for (jit::Block* inner : node->blocks()) collect(inner, names, counts, own);
    const auto kind = node->kind();
    // Constants, attribute reads (parameters) and child calls are not the module's own ops.
    if (kind == jit::prim::Constant || kind == jit::prim::GetAttr || kind == jit::prim::CallMethod) continue;
    const bool op = !kind.is_prim() && node->outputs().size() == 1 && is_tensor(node->output());
    for (jit::Value* output : node->outputs()) {
      if (!is_tensor(output)) continue;
      ValueInfo value;
      if (op) {
        const std::string base = kind.toUnqualString();
        value.op = base + "." + std::to_string(counts[base]++);
      }
      auto named = names.find(output);
      if (named != names.end()) value.name = named->second;
      if (value.op.empty() && value.name.empty()) continue;
      value.kind = kind.toQualString();
      own.values.push_back(output);
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
  inline_function_calls(*own.graph, names);
  std::map<std::string, int> counts;
  collect(own.graph->block(), names, counts, own);
  std::map<std::string, std::size_t> last;
  for (std::size_t i = 0; i < own.listed.size(); ++i) {
    if (!own.listed[i].name.empty()) last[own.listed[i].name] = i;
  }
  for (std::size_t i = 0; i < own.listed.size(); ++i) {
    own.listed[i].name_is_last = own.listed[i].name.empty() || last[own.listed[i].name] == i;
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
