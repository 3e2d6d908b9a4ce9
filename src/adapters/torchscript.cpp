// TorchScript models: a rewritten copy of the root forward graph in which every
// call to a hooked module is inlined down to that module's own call site, and
// one `flexmodel::hook` operator sits on the call's inputs and/or output; a
// module with hooked values (script_values.h) is inlined too, with an
// operator after each hooked value.
#include "flexmodel/torchscript.h"

#include <filesystem>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/runtime/custom_operator.h>

#include "flexmodel/logging.h"
#include "adapters/model_adapter.h"
#include "adapters/script_values.h"

namespace flexmodel {
namespace detail {
namespace {

namespace jit = torch::jit;

// ---- tensors inside IValues -------------------------------------------------

// The tensor tree of an IValue: tuples (named ones too) and lists in order,
// dicts by their values in insertion order (as Python's dicts keep them), so
// that leaf i is the i-th tensor PyTorch's hooks would see, depth first.
void collect_ivalue_tensors(const c10::IValue& value, std::vector<torch::Tensor>& tensors) {
  if (value.isTensor()) {
    tensors.push_back(value.toTensor());
  } else if (value.isTuple()) {
    for (const auto& element : value.toTupleRef().elements()) collect_ivalue_tensors(element, tensors);
  } else if (value.isList()) {
    for (const auto& element : value.toListRef()) collect_ivalue_tensors(element, tensors);
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) collect_ivalue_tensors(entry.value(), tensors);
  }
}

c10::IValue rebuild_ivalue(const c10::IValue& value, const std::vector<torch::Tensor>& tensors, std::size_t& next) {
  if (value.isTensor()) return tensors[next++];
  if (value.isTuple()) {
    std::vector<c10::IValue> elements;
    for (const auto& element : value.toTupleRef().elements()) elements.push_back(rebuild_ivalue(element, tensors, next));
    auto type = value.toTupleRef().type();
    return type->schema() ? c10::ivalue::Tuple::createNamed(std::move(elements), type)
                          : c10::ivalue::Tuple::create(std::move(elements));
  }
  if (value.isList()) {
    auto list = value.toList();
    c10::impl::GenericList rebuilt(list.elementType());
    for (const auto& element : value.toListRef()) rebuilt.push_back(rebuild_ivalue(element, tensors, next));
    return rebuilt;
  }
  if (value.isGenericDict()) {
    auto dict = value.toGenericDict();
    c10::impl::GenericDict rebuilt(dict.keyType(), dict.valueType());
    for (const auto& entry : dict) rebuilt.insert(entry.key(), rebuild_ivalue(entry.value(), tensors, next));
    return rebuilt;
  }
  return value;
}

// Runs `hooks` on the tensor leaves of `value` and puts edited leaves back.
template <class Hooks>
void apply_to_leaves(c10::IValue& value, Hooks&& hooks) {
  std::vector<torch::Tensor> tensors;
  collect_ivalue_tensors(value, tensors);
  const std::vector<torch::Tensor> original = tensors;
  TensorLeaves leaves;
  for (auto& tensor : tensors) leaves.push_back(&tensor);
  hooks(leaves);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].is_same(original[i])) {
      std::size_t next = 0;
      value = rebuild_ivalue(value, tensors, next);
      return;
    }
  }
}

// Where each tensor leaf of `value` sits, as Python would index it: "[0]",
// "['logits']", ".probs" (a named tuple's field), "" for a lone tensor.
void collect_leaf_names(const c10::IValue& value, const std::string& prefix, std::vector<std::string>& names) {
  if (value.isTensor()) {
    names.push_back(prefix);
  } else if (value.isTuple()) {
    const auto& elements = value.toTupleRef().elements();
    const auto& schema = value.toTupleRef().type()->schema();
    for (std::size_t i = 0; i < elements.size(); ++i) {
      collect_leaf_names(elements[i], schema ? prefix + "." + schema->arguments()[i].name() : concat(prefix, "[", i, "]"),
                         names);
    }
  } else if (value.isList()) {
    std::size_t i = 0;
    for (const auto& element : value.toListRef()) collect_leaf_names(element, concat(prefix, "[", i++, "]"), names);
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) {
      const auto& key = entry.key();
      collect_leaf_names(entry.value(),
                         key.isString() ? concat(prefix, "['", key.toStringRef(), "']") : concat(prefix, "[", key, "]"),
                         names);
    }
  }
}

// Set while a forward records where each hook point's leaves sit (flex-inspect).
// Initial-exec, as the hot path reads it on every hooked call (see g_current_forward).
__attribute__((tls_model("initial-exec"))) thread_local std::map<std::pair<const void*, bool>, std::vector<std::string>>*
    g_leaf_names = nullptr;

void note_leaf_names(const void* key, bool inputs, const c10::IValue& value) {
  if (g_leaf_names == nullptr) return;
  std::vector<std::string>& names = (*g_leaf_names)[{key, inputs}];
  names.clear();
  collect_leaf_names(value, "", names);
}

// ---- the hook operator ------------------------------------------------------

// A flexmodel error thrown inside the interpreter comes out re-wrapped; the
// original is kept here and rethrown by forward.
thread_local std::exception_ptr g_error_in_graph;

// The operator's constant: the hook point's key (a module object's address),
// with the lowest bit set for the call's inputs, the next for a value hook
// point and the third for a value whose edit is written into its memory
// (objects are aligned to 8 bytes, so the three bits are free).
constexpr std::intptr_t kInputsBit = 1, kValueBit = 2, kWritesBackBit = 4;
enum class Point { module, value, aliasing_value };
std::int64_t hook_point_id(const void* key, bool inputs, Point point) {
  return static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(key) | (inputs ? kInputsBit : 0) |
                                   (point != Point::module ? kValueBit : 0) |
                                   (point == Point::aliasing_value ? kWritesBackBit : 0));
}

void run_hook_operator(jit::Stack& stack) {
  const auto id = static_cast<std::intptr_t>(jit::pop(stack).toInt());
  const bool inputs = (id & kInputsBit) != 0, writes_back = (id & kWritesBackBit) != 0;
  const void* key = reinterpret_cast<const void*>(id & ~(kInputsBit | kValueBit | kWritesBackBit));
  // A value a branch left undefined (or None) was not computed: its hooks do not fire.
  if ((id & kValueBit) != 0 && !(stack.back().isTensor() && stack.back().toTensor().defined())) return;
  const ActiveSite* site = find_active_site(key);
  if (site == nullptr || !(inputs ? site_wants_inputs(*site) : site_wants_outputs(*site))) return;
  note_leaf_names(key, inputs, stack.back());
  try {
    auto run = [&](TensorLeaves& leaves) { inputs ? run_input_hooks(*site, leaves) : run_output_hooks(*site, leaves); };
    if (stack.back().isTensor()) {
      // The common case needs no unpacking: edit the tensor in its stack slot.
      const torch::Tensor original = writes_back ? stack.back().toTensor() : torch::Tensor();
      TensorLeaves leaves{&stack.back().toTensor()};
      run(leaves);
      if (writes_back && !stack.back().toTensor().is_same(original)) {
        // A view or an in-place op's result: later code reads its memory
        // (through the tensor it aliases), so the edit goes there.
        original.copy_(stack.back().toTensor());
        stack.back() = original;
      }
    } else {
      apply_to_leaves(stack.back(), run);
    }
  } catch (const Error&) {
    g_error_in_graph = std::current_exception();
    throw;
  }
}

const c10::Symbol kHookSymbol = c10::Symbol::fromQualString("flexmodel::hook");

// JIT-only, so the interpreter calls it directly; conservative aliasing keeps
// every pass from moving or removing it. Autograd records the edits it makes.
jit::RegisterOperators g_register_hook_operator({jit::Operator(
    "flexmodel::hook(Any value, int hook_point) -> Any",
    [](jit::Stack& stack) { run_hook_operator(stack); }, c10::AliasAnalysisKind::CONSERVATIVE)});

// ---- graph rewriting --------------------------------------------------------

using ModulePaths = std::unordered_map<const jit::Value*, std::string>;

void collect_module_paths(jit::Block* block, ModulePaths& paths) {
  for (jit::Node* node : block->nodes()) {
    if (node->kind() == jit::prim::GetAttr) {
      auto parent = paths.find(node->input(0));
      auto type = node->output()->type()->cast<c10::ClassType>();
      if (parent != paths.end() && type && type->is_module()) {
        const std::string& attribute = node->s(jit::attr::name);
        paths[node->output()] = parent->second.empty() ? attribute : parent->second + "." + attribute;
      }
    }
    for (jit::Block* inner : node->blocks()) collect_module_paths(inner, paths);
  }
}

ModulePaths module_paths(jit::Graph& graph) {
  ModulePaths paths{{graph.inputs()[0], ""}};
  collect_module_paths(graph.block(), paths);
  return paths;
}

bool is_strict_ancestor(const std::string& ancestor, const std::string& path) {
  if (ancestor.size() >= path.size()) return false;
  return ancestor.empty() || (path.compare(0, ancestor.size(), ancestor) == 0 && path[ancestor.size()] == '.');
}

template <class Visit>
void for_each_call(jit::Block* block, Visit&& visit) {
  for (jit::Node* node : block->nodes()) {
    if (node->kind() == jit::prim::CallMethod) visit(node);
    for (jit::Block* inner : node->blocks()) for_each_call(inner, visit);
  }
}

// A module whose calls must be inlined: those above it, and its own when its
// values are hooked.
struct InlineTarget {
  std::string path;
  bool itself = false;
};

// The first call whose receiver must be inlined for `targets`, with its
// receiver's path; nullptr when there is none.
std::pair<jit::Node*, std::string> call_towards(jit::Graph& graph, const std::vector<InlineTarget>& targets) {
  ModulePaths paths = module_paths(graph);
  std::pair<jit::Node*, std::string> found{nullptr, ""};
  for_each_call(graph.block(), [&](jit::Node* call) {
    if (found.first != nullptr) return;
    auto receiver = paths.find(call->input(0));
    if (receiver == paths.end()) return;
    for (const auto& target : targets) {
      if (is_strict_ancestor(receiver->second, target.path) || (target.itself && receiver->second == target.path)) {
        found = {call, receiver->second};
        return;
      }
    }
  });
  return found;
}

jit::Value* insert_hook(jit::Graph& graph, jit::Value* value, const void* key, bool inputs,
                        Point point = Point::module) {
  jit::Value* hook_point = graph.insertConstant(hook_point_id(key, inputs, point));
  jit::Node* hook = graph.insertNode(graph.create(kHookSymbol, {value, hook_point}, 1));
  hook->output()->setType(value->type());
  return hook->output();
}

// `kept[i]` says whether call argument i + 1 (after the receiver) is an input
// as PyTorch's hooks see it; the others are the callee's own tensors.
void instrument_call(jit::Graph& graph, jit::Node* call, const HookPointUse& use, const std::vector<bool>& kept) {
  if (use.inputs) {
    jit::WithInsertPoint before(call);
    std::vector<jit::Value*> arguments;
    std::vector<std::size_t> positions;
    for (std::size_t i = 1; i < call->inputs().size(); ++i) {
      if (!kept[i - 1]) continue;
      arguments.push_back(call->input(i));
      positions.push_back(i);
    }
    jit::Value* packed = graph.insertNode(graph.createTuple(arguments))->output();
    jit::Node* unpacked = graph.insertNode(graph.createTupleUnpack(insert_hook(graph, packed, use.key, true)));
    for (std::size_t i = 0; i < positions.size(); ++i) call->replaceInput(positions[i], unpacked->output(i));
  }
  if (use.outputs) {
    jit::WithInsertPoint after(call->next());
    jit::Value* output = call->output();
    jit::Value* hooked = insert_hook(graph, output, use.key, false);
    output->replaceAllUsesAfterNodeWith(hooked->node(), hooked);
  }
}

// An operator after each of `indices`' values in `own`, which later uses then read.
void hook_values(OwnGraph& own, const std::vector<std::pair<std::size_t, const void*>>& hooked) {
  for (const auto& [index, key] : hooked) {
    jit::Value* value = own.values[index];
    jit::WithInsertPoint after(value->node()->next());
    jit::Value* hooked_value =
        insert_hook(*own.graph, value, key, false, own.listed[index].aliases_input ? Point::aliasing_value : Point::value);
    value->replaceAllUsesAfterNodeWith(hooked_value->node(), hooked_value);
  }
}

std::string join_path(const std::string& parent, const std::string& child) {
  return parent.empty() ? child : child.empty() ? parent : parent + "." + child;
}

// What the model's forward does with each module, read once from the graphs
// of every method it calls: which modules it calls, which of those calls are
// written `child.forward(...)` (PyTorch's own hooks skip such calls), and who
// reads a module's tensors without calling it.
struct CallFacts {
  std::set<std::string> called;
  std::set<std::string> called_as_forward;
  std::map<std::string, std::string> tensors_read_by;
};

void collect_call_facts(const std::map<std::string, torch::jit::Module>& modules,
                        const std::string& path, const std::string& method, CallFacts& facts,
                        std::set<std::pair<std::string, std::string>>& visited) {
  if (!visited.emplace(path, method).second) return;
  auto found = modules.find(path);
  if (found == modules.end()) return;
  auto function = found->second.find_method(method);
  if (!function) return;
  std::shared_ptr<jit::Graph> graph = function->graph();
  const ModulePaths paths = module_paths(*graph);
  std::vector<jit::Block*> blocks{graph->block()};
  while (!blocks.empty()) {
    jit::Block* block = blocks.back();
    blocks.pop_back();
    for (jit::Node* node : block->nodes()) {
      for (jit::Block* inner : node->blocks()) blocks.push_back(inner);
      auto owner = node->inputs().empty() ? paths.end() : paths.find(node->input(0));
      if (owner == paths.end()) continue;
      const std::string target = join_path(path, owner->second);
      if (node->kind() == jit::prim::CallMethod) {
        const std::string name = node->s(jit::attr::name);
        if (name == "forward" && !owner->second.empty()) {
          facts.called.insert(target);
          // The Python source the file keeps for debugging says how the call was written.
          const auto original = node->sourceRange().findSourceRangeThatGenerated();
          if (original && original->source() != nullptr) {
            const std::string text = original->text().str();
            if (text.size() >= 8 && text.compare(text.size() - 8, 8, ".forward") == 0) {
              facts.called_as_forward.insert(target);
            }
          }
        }
        collect_call_facts(modules, target, name, facts, visited);
      } else if (node->kind() == jit::prim::GetAttr && !owner->second.empty() &&
                 !node->output()->type()->cast<c10::ClassType>()) {
        facts.tensors_read_by.emplace(target, path);
      }
    }
  }
}

}  // namespace

class ScriptAdapter final : public ModelAdapter {
 public:
  ScriptAdapter(torch::jit::Module module, std::string model_name)
      : module_(std::move(module)), model_name_(std::move(model_name)) {
    for (const auto& named : module_.named_modules()) modules_.emplace(named.name, named.value);
    std::set<std::pair<std::string, std::string>> visited;
    collect_call_facts(modules_, "", "forward", facts_, visited);
  }

  std::vector<std::string> module_names() const override {
    std::vector<std::string> names;
    for (const auto& named : module_.named_modules()) names.push_back(named.name);
    return names;
  }

  HookPoint hook_point(const std::string& name) const override {
    std::string owner, value;
    if (split_value_name(name, owner, value)) return value_hook_point(name, owner == kRootName ? "" : owner, value);
    auto found = modules_.find(name);
    FLEXMODEL_CHECK(found != modules_.end(), ConfigError, "no module named '", name, "' in ", model_name_,
                    "; close names: ", close_names(name, module_names()));
    std::string reason = unhookable_reason(name);
    FLEXMODEL_CHECK(reason.empty(), ConfigError, "module '", name, "' of ", model_name_, " ", reason);
    return HookPoint{found->second._ivalue().get(), nullptr};
  }

  std::string unhookable_reason(const std::string& name) const override {
    auto found = modules_.find(name);
    if (found == modules_.end() || name.empty()) return {};
    const torch::jit::Module& module = found->second;
    const std::string type = module.type()->name() ? module.type()->name()->name() : "module";
    auto reader = facts_.tensors_read_by.find(name);
    const std::string only_tensors =
        reader == facts_.tensors_read_by.end()
            ? std::string()
            : concat("; '", reader->second.empty() ? "(root)" : reader->second,
                     "' uses only its parameters or attributes, so hook that module instead");
    if (!module.find_method("forward")) {
      const bool container = module.type()->name() &&
                             module.type()->name()->qualifiedName().rfind("__torch__.torch.nn.modules.container.", 0) == 0;
      if (container) {
        return concat("(", type, ") is a container with no forward method; hook its children instead");
      }
      return concat("(", type, ") has no forward method in this file: the traced forward never called it as a "
                    "module (it is unused, only its parameters are used, or it was called as .forward(...), "
                    "which PyTorch's own hooks do not see either)", only_tensors);
    }
    if (facts_.called.count(name) == 0) {
      return concat("(", type, ") is never called by the model's forward, so its hooks could never fire",
                    reader == facts_.tensors_read_by.end()
                        ? std::string(" (it is unused, or called through an interface or a dynamic index that "
                                      "the library cannot follow)")
                        : only_tensors);
    }
    return {};
  }

  std::string unfired_advice(const std::string& name) const override {
    (void)name;
    return "the forward calls it only on a branch that did not run for this input";
  }

  // Every value hook point of every module whose hooks can fire, as
  // `<module>::<value>`, modules in named_modules() order, values in graph order.
  std::vector<std::string> value_point_names() const override {
    std::vector<std::string> names;
    for (const auto& named : module_.named_modules()) {
      if (!unhookable_reason(named.name).empty() || !named.value.find_method("forward")) continue;
      const std::string owner = named.name.empty() ? std::string(kRootName) : named.name;
      for (const auto& value : listed_values(named.name).names()) names.push_back(concat(owner, kValueSeparator, value));
    }
    return names;
  }

  // The values of module `owner`, whose hooks must be able to fire; errors begin with `what`.
  const OwnGraph& checked_values(const std::string& owner, const std::string& what) const {
    auto found = modules_.find(owner);
    FLEXMODEL_CHECK(found != modules_.end(), ConfigError, what, ": no module named '", owner, "' in ", model_name_,
                    "; close names: ", close_names(owner, module_names()));
    const std::string shown = owner.empty() ? std::string(kRootName) : owner;
    const std::string reason = unhookable_reason(owner);
    FLEXMODEL_CHECK(reason.empty(), ConfigError, what, ": module '", shown, "' of ", model_name_, " ", reason);
    FLEXMODEL_CHECK(found->second.find_method("forward"), ConfigError, what, ": module '", shown,
                    "' has no forward, so no values");
    return listed_values(owner);
  }

  // The values of module `name`'s own graph, in graph order.
  const OwnGraph& listed_values(const std::string& name) const {
    auto found = listed_.find(name);
    if (found == listed_.end()) {
      found = listed_.emplace(name, own_graph(*modules_.at(name).get_method("forward").graph())).first;
    }
    return found->second;
  }

  // Whether the forward calls `name` as child.forward(...), where PyTorch's
  // own hooks do not fire (flexmodel's do).
  bool called_as_forward(const std::string& name) const { return facts_.called_as_forward.count(name) != 0; }

  NamedTensors named_parameters() const override {
    NamedTensors out;
    for (const auto& named : module_.named_parameters(true)) out.emplace_back(named.name, named.value);
    return out;
  }

  NamedTensors named_buffers() const override {
    NamedTensors out;
    for (const auto& named : module_.named_buffers(true)) out.emplace_back(named.name, named.value);
    return out;
  }

  const void* root_key() const override { return module_._ivalue().get(); }
  std::string description() const override { return model_name_; }

  void hook_points_changed(const std::vector<HookPointUse>& uses) override {
    uses_.clear();
    for (const auto& use : uses) {
      if (use.key != root_key()) uses_.push_back(use);
    }
    function_.reset();
    stale_ = true;
  }

  // The instrumented forward, or nullptr when no submodule has hooks.
  torch::jit::GraphFunction* function() {
    if (stale_) compile();
    return function_.get();
  }

  const std::string& model_name() const { return model_name_; }

  // The forward's signature for messages: argument names, types and defaults.
  std::string signature() const {
    const auto& schema = module_.get_method("forward").function().getSchema();
    std::string text = "forward(";
    for (std::size_t i = 1; i < schema.arguments().size(); ++i) {
      const auto& argument = schema.arguments()[i];
      text += concat(i > 1 ? ", " : "", argument.name(), ": ", argument.type()->annotation_str());
      if (argument.default_value()) text += concat(" = ", *argument.default_value());
    }
    return text + ")";
  }

 private:
  // Whether `value`, an argument of a call, is one of the callee's own
  // parameters or buffers: the tracer passes a tied weight (an LM head that
  // shares the token embedding's) into the callee as an argument, but
  // PyTorch's hooks see only the caller's inputs.
  bool is_own_tensor(const jit::Value* value, const ModulePaths& paths, const torch::jit::Module& callee) const {
    const jit::Node* node = value->node();
    if (node->kind() != jit::prim::GetAttr) return false;
    auto owner = paths.find(node->input(0));
    if (owner == paths.end()) return false;
    const c10::IValue attribute = modules_.at(owner->second).attr(node->s(jit::attr::name));
    if (!attribute.isTensor()) return false;
    const torch::Tensor& tensor = attribute.toTensor();
    for (const auto& named : callee.named_parameters(true)) {
      if (named.value.is_same(tensor)) return true;
    }
    for (const auto& named : callee.named_buffers(true)) {
      if (named.value.is_same(tensor)) return true;
    }
    return false;
  }

  // A value hook point, one per value whatever name reaches it (its op or
  // its Python name), so both share one site.
  struct ValuePoint {
    std::string owner;
    std::size_t index = 0;
  };

  HookPoint value_hook_point(const std::string& name, const std::string& owner, const std::string& value) const {
    const OwnGraph& own = checked_values(owner, concat("'", name, "'"));
    const std::string shown = owner.empty() ? std::string(kRootName) : owner;
    const std::ptrdiff_t index = own.find(value);
    FLEXMODEL_CHECK(index >= 0, ConfigError, "'", name, "': module '", shown, "' of ", model_name_,
                    " computes no value '", value, "' (<op>.<k> counts from 0 among its own ops, a name is the "
                    "Python variable's; flex-inspect --values lists them); close names: ",
                    close_names(value, own.names()));
    auto& point = value_points_[{owner, static_cast<std::size_t>(index)}];
    if (!point) point = std::make_unique<ValuePoint>(ValuePoint{owner, static_cast<std::size_t>(index)});
    return HookPoint{point.get(), nullptr};
  }

  const ValuePoint* value_point_of(const void* key) const {
    for (const auto& [where, point] : value_points_) {
      if (point.get() == key) return point.get();
    }
    return nullptr;
  }

  // Module `path`'s forward with an operator after each hooked value.
  std::shared_ptr<jit::Graph> hooked_own_graph(const std::string& path,
                                               const std::vector<std::pair<std::size_t, const void*>>& hooked) const {
    OwnGraph own = own_graph(*modules_.at(path).get_method("forward").graph());
    hook_values(own, hooked);
    return own.graph;
  }

  std::vector<bool> real_inputs(jit::Node* call, const ModulePaths& paths, const std::string& callee) const {
    std::vector<bool> kept;
    for (std::size_t i = 1; i < call->inputs().size(); ++i) {
      kept.push_back(!is_own_tensor(call->input(i), paths, modules_.at(callee)));
    }
    return kept;
  }

  void compile() {
    stale_ = false;
    if (uses_.empty()) return;
    // Hooked values by module, and the modules whose calls must be inlined.
    std::map<std::string, std::vector<std::pair<std::size_t, const void*>>> hooked_values;
    std::vector<InlineTarget> targets;
    for (const auto& use : uses_) {
      if (const ValuePoint* point = value_point_of(use.key)) {
        hooked_values[point->owner].emplace_back(point->index, use.key);
        targets.push_back(InlineTarget{point->owner, true});
      } else {
        targets.push_back(InlineTarget{use.name, false});
      }
    }
    auto root_values = hooked_values.find("");
    auto graph = root_values != hooked_values.end() ? hooked_own_graph("", root_values->second)
                                                    : module_.get_method("forward").graph()->copy();
    // Put the hook operators on every call to a hooked module, then inline,
    // from the unoptimised callee graph, one call above a hooked module (so
    // each instance gets its own call sites even when classes are shared), and
    // repeat. A hooked call that is itself inlined keeps its operators around
    // the inlined body.
    std::unordered_set<const jit::Node*> instrumented;
    while (true) {
      ModulePaths paths = module_paths(*graph);
      std::vector<std::tuple<jit::Node*, const HookPointUse*, std::vector<bool>>> new_sites;
      for_each_call(graph->block(), [&](jit::Node* call) {
        auto receiver = paths.find(call->input(0));
        if (receiver == paths.end() || call->s(jit::attr::name) != "forward" || instrumented.count(call)) return;
        for (const auto& use : uses_) {
          if (use.name == receiver->second) new_sites.emplace_back(call, &use, real_inputs(call, paths, use.name));
        }
      });
      for (const auto& [call, use, kept] : new_sites) {
        instrument_call(*graph, call, *use, kept);
        instrumented.insert(call);
      }
      const auto [call, receiver] = call_towards(*graph, targets);
      if (call == nullptr) break;
      instrumented.erase(call);
      auto callee_type = call->input(0)->type()->expect<c10::ClassType>();
      auto& callee = torch::jit::toGraphFunction(callee_type->getMethod(call->s(jit::attr::name)));
      auto values = hooked_values.find(receiver);
      if (values != hooked_values.end() && call->s(jit::attr::name) == "forward") {
        // This instance's own graph with its hooked values, so that instances of one class are told apart.
        torch::jit::inlineCallTo(call, &callee, hooked_own_graph(receiver, values->second).get());
      } else {
        torch::jit::inlineCallTo(call, &callee, callee.graph().get());
      }
    }
    graph->lint();
    function_ = std::make_unique<torch::jit::GraphFunction>("flexmodel_forward", graph, nullptr);
    // The module's own schema: default arguments are filled in and inputs are
    // checked exactly as Module::forward does.
    function_->setSchema(module_.get_method("forward").function().getSchema());
    logger()->debug("instrumented {} call sites of {} hooked modules in {}", instrumented.size(), uses_.size(),
                    model_name_);
  }

  torch::jit::Module module_;
  std::string model_name_;
  std::map<std::string, torch::jit::Module> modules_;
  CallFacts facts_;
  std::vector<HookPointUse> uses_;
  mutable std::map<std::string, OwnGraph> listed_;
  mutable std::map<std::pair<std::string, std::size_t>, std::unique_ptr<ValuePoint>> value_points_;
  std::unique_ptr<torch::jit::GraphFunction> function_;
  bool stale_ = false;
};

}  // namespace detail

torch::Tensor first_tensor(const torch::IValue& output) {
  std::vector<torch::Tensor> tensors;
  detail::collect_ivalue_tensors(output, tensors);
  FLEXMODEL_CHECK(!tensors.empty(), ShapeError, "first_tensor: the output (", output.tagKind(), ") holds no tensor");
  return tensors.front();
}

torch::jit::Module load_torchscript(const std::string& path) {
  std::error_code error;
  FLEXMODEL_CHECK(std::filesystem::is_regular_file(path, error), IOError, "TorchScript file '", path,
                  "' does not exist or is not a regular file");
  try {
    return torch::jit::load(path);
  } catch (const c10::Error& cause) {
    std::string reason = cause.what_without_backtrace();
    FLEXMODEL_FAIL(IOError, "'", path, "' is not a TorchScript file (expected the output of torch.jit.save): ",
                   reason.substr(0, reason.find('\n')));
  }
}

namespace {
std::string describe_module(const torch::jit::Module& module) {
  auto name = module.type()->name();
  return detail::concat("TorchScript model ", name ? name->qualifiedName() : std::string("(unnamed)"));
}
}  // namespace

FlexModel<torch::jit::Module>::FlexModel(torch::jit::Module module, FlexModelOptions options)
    : FlexModel(module, std::make_shared<detail::ScriptAdapter>(module, describe_module(module)), options) {}

FlexModel<torch::jit::Module>::FlexModel(const std::string& path, FlexModelOptions options)
    : FlexModel(load_torchscript(path), options) {}

FlexModel<torch::jit::Module>::FlexModel(torch::jit::Module module, std::shared_ptr<detail::ScriptAdapter> adapter,
                                         FlexModelOptions options)
    : FlexModelBase(adapter, options), module_(std::move(module)), script_(std::move(adapter)) {}

std::vector<ValueInfo> FlexModel<torch::jit::Module>::value_points(const std::string& module_name) const {
  return script_->checked_values(module_name == kRootName ? std::string() : module_name, "value_points").listed;
}

bool FlexModel<torch::jit::Module>::called_as_forward(const std::string& module_name) const {
  return script_->called_as_forward(module_name);
}

std::vector<std::string> FlexModel<torch::jit::Module>::leaf_names(const std::string& module_name,
                                                                   HookType type) const {
  const std::string name = module_name == kRootName ? std::string() : module_name;
  auto found = leaf_names_.find({script_->hook_point(name).key, type == HookType::forward_pre});
  return found != leaf_names_.end() ? found->second : std::vector<std::string>{};
}

torch::IValue FlexModel<torch::jit::Module>::forward(std::vector<torch::IValue> inputs) {
  return forward(Groups{}, std::move(inputs));
}

torch::IValue FlexModel<torch::jit::Module>::forward(const Groups& groups, std::vector<torch::IValue> inputs) {
  c10::IValue packed = c10::ivalue::Tuple::create(std::move(inputs));
  std::vector<torch::Tensor> input_tensors;
  detail::collect_ivalue_tensors(packed, input_tensors);
  std::int64_t batch_rows = -1;
  for (const auto& tensor : input_tensors) {
    if (tensor.defined() && tensor.dim() > 0) {
      batch_rows = tensor.size(0);
      break;
    }
  }
  ForwardScope scope(*this, groups, batch_rows);
  // The root's hooks run here; its submodules' in the graph.
  std::map<std::pair<const void*, bool>, std::vector<std::string>>* recording =
      record_leaf_names_ ? &leaf_names_ : nullptr;
  const auto previous_recording = std::exchange(detail::g_leaf_names, recording);
  struct Restore {
    decltype(previous_recording) previous;
    ~Restore() { detail::g_leaf_names = previous; }
  } restore{previous_recording};
  auto run = [&](c10::IValue arguments) {
    const detail::ActiveSite* root = scope.root_site();
    if (root != nullptr && detail::site_wants_inputs(*root)) {
      detail::note_leaf_names(script_->root_key(), true, arguments);
      detail::apply_to_leaves(arguments, [&](detail::TensorLeaves& leaves) { detail::run_input_hooks(*root, leaves); });
    }
    torch::IValue output = run_graph(arguments.toTupleRef().elements().vec());
    if (root != nullptr && detail::site_wants_outputs(*root)) {
      detail::note_leaf_names(script_->root_key(), false, output);
      detail::apply_to_leaves(output, [&](detail::TensorLeaves& leaves) { detail::run_output_hooks(*root, leaves); });
    }
    return output;
  };
  try {
    if (scope.splits_batch()) {
      detail::apply_to_leaves(packed, [&](detail::TensorLeaves& leaves) { scope.take_batch_shard(leaves); });
      if (scope.needs_calibration()) {
        c10::IValue calibration = packed;
        detail::apply_to_leaves(calibration, [&](detail::TensorLeaves& leaves) { scope.begin_calibration(leaves); });
        torch::NoGradGuard no_grad;
        c10::IValue calibration_output = run(calibration);
        detail::apply_to_leaves(calibration_output,
                                [&](detail::TensorLeaves& leaves) { scope.end_calibration(leaves); });
      }
    }
    torch::IValue output = run(packed);
    if (scope.splits_batch()) {
      detail::apply_to_leaves(output, [&](detail::TensorLeaves& leaves) { scope.gather_batch(leaves); });
    }
    scope.commit();
    return output;
  } catch (const detail::ForwardStopped&) {
    scope.commit_stopped();
    throw;
  } catch (...) {
    scope.failed(std::current_exception());
    throw;
  }
}

bool FlexModel<torch::jit::Module>::run_to_last_hook(const Groups& groups, std::vector<torch::IValue> inputs) {
  return stopping_at_last_hook([&] { forward(groups, std::move(inputs)); });
}

torch::IValue FlexModel<torch::jit::Module>::run_graph(std::vector<torch::IValue> inputs) {
  detail::g_error_in_graph = nullptr;
  const std::vector<torch::IValue> inputs_copy = inputs;  // shares the tensors, for the message
  try {
    if (torch::jit::GraphFunction* function = script_->function()) {
      torch::jit::Stack stack;
      stack.reserve(inputs.size() + 1);
      stack.emplace_back(module_._ivalue());
      for (auto& input : inputs) stack.push_back(std::move(input));
      return (*function)(std::move(stack));
    }
    return module_.get_method("forward")(std::move(inputs));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& cause) {
    if (auto original = std::exchange(detail::g_error_in_graph, nullptr)) std::rethrow_exception(original);
    std::string given;
    for (const auto& input : inputs_copy) {
      given += detail::concat(given.empty() ? "" : ", ",
                              input.isTensor() ? detail::concat(dtype_name(input.toTensor().scalar_type()), " ",
                                                                input.toTensor().sizes())
                                               : input.tagKind());
    }
    FLEXMODEL_FAIL(ShapeError, "the forward of ", script_->model_name(), " rejected its input: ",
                   detail::error_reason(cause), "; it takes ", script_->signature(), ", was given (", given, ")");
  }
}

}  // namespace flexmodel
