// flex-inspect MODEL [--input INPUT.npy ...] [--values] [--tp N --pp N] [--json]
// Prints a model's module tree (types, parameter shapes) and, given inputs,
// the shapes and dtypes every hook point sees in one forward, so that a user
// finds the names to hook. MODEL is a TorchScript file or a Hugging Face
// checkpoint directory (config.json and safetensors), whose capabilities
// (tensor- and pipeline-parallel plans) it prints too, and with --tp/--pp
// what stops the model from running on that mesh. --values lists each
// TorchScript module's value hook points (`<module>::<value>`: op, name, and
// given inputs shape and dtype).
#include <algorithm>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <flexmodel/flexmodel.h>
#include <flexmodel/hub.h>
#include <flexmodel/npy.h>
#include <flexmodel/torchscript.h>

namespace {

using nlohmann::json;

json tensor_facts(const torch::Tensor& tensor, const std::string& leaf) {
  return json{{"leaf", leaf}, {"shape", tensor.sizes().vec()}, {"dtype", flexmodel::dtype_name(tensor.scalar_type())}};
}

std::string facts_text(const json& leaves) {
  std::string text;
  for (const auto& leaf : leaves) {
    std::ostringstream one;
    one << (text.empty() ? "" : ", ") << leaf["leaf"].get<std::string>() << (leaf["leaf"].get<std::string>().empty() ? "" : " ")
        << leaf["dtype"].get<std::string>() << " [";
    const auto& shape = leaf["shape"];
    for (std::size_t i = 0; i < shape.size(); ++i) one << (i ? ", " : "") << shape[i].get<std::int64_t>();
    one << "]";
    text += one.str();
  }
  return text.empty() ? "-" : text;
}

// Each value hook point of each module whose hooks can fire, in graph order.
void add_values(flexmodel::ScriptFlexModel& fm, json& report) {
  for (auto& module : report["modules"]) {
    if (!module["hookable"].get<bool>()) continue;
    const std::string name = module["name"].get<std::string>().empty() ? std::string(flexmodel::kRootName)
                                                                       : module["name"].get<std::string>();
    module["values"] = json::array();
    for (const auto& value : fm.value_points(name)) {
      json entry{{"op", value.op}, {"name", value.name}, {"kind", value.kind}};
      // A name a later value took reaches that one: this value is reached by its op only.
      if (!value.name.empty() && !value.name_is_last) entry["name_reaches_a_later_value"] = true;
      entry["point"] = name + std::string(flexmodel::kValueSeparator) +
                       (value.op.empty() ? value.name : value.op);
      module["values"].push_back(std::move(entry));
    }
  }
}

// Runs `forward` with hooks on every hook point and records, per module, the
// tensors it received and returned. A TorchScript model names each leaf of a
// structured input or output; a native model's leaves are unnamed.
template <class Model>
void add_hook_facts(Model& fm, const std::vector<std::string>& hook_points, json& report,
                    const std::function<void()>& forward) {
  for (const auto& name : hook_points) {
    for (auto type : {flexmodel::HookType::forward, flexmodel::HookType::forward_pre}) {
      fm.register_hook_function(flexmodel::HookFunction(name).unpack_idx(flexmodel::HookFunction::kAllLeaves), type);
    }
  }
  constexpr bool names_leaves = requires { fm.record_leaf_names(true); };
  if constexpr (names_leaves) fm.record_leaf_names(true);
  {
    torch::NoGradGuard no_grad;
    forward();
  }
  for (auto& module : report["modules"]) {
    const std::string name = module["name"];
    for (auto [type, key] : {std::pair{flexmodel::HookType::forward, "outputs"},
                             std::pair{flexmodel::HookType::forward_pre, "inputs"}}) {
      if (!fm.outputs().contains(name, type)) continue;
      std::vector<std::string> leaves;
      if constexpr (names_leaves) leaves = fm.leaf_names(name, type);
      const auto& tensors = fm.outputs().at(name, type);
      module[key] = json::array();
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        module[key].push_back(tensor_facts(tensors[i], i < leaves.size() ? leaves[i] : std::string()));
      }
    }
  }
}

// A Hugging Face checkpoint directory: its family's model in one process, its
// capabilities, and what a --tp/--pp mesh would violate.
json inspect_checkpoint(const std::string& directory, const std::vector<std::string>& input_paths,
                        const flexmodel::dist::MeshShape& mesh) {
  // The module tree needs no weights: they are read only to run --input.
  const auto config = flexmodel::hub::read_config(directory);
  const auto model = input_paths.empty() ? flexmodel::hub::build_model(config) : flexmodel::hub::load_model(directory);
  const auto capabilities = model->capabilities();
  json report{{"model", directory},
              {"type", capabilities.architecture},
              {"family", capabilities.family},
              {"dtype", flexmodel::dtype_name(flexmodel::hub::stored_dtype(directory))},
              {"supports", {{"data_parallel", true}, {"tensor_parallel", capabilities.tensor_parallel},
                            {"pipeline_parallel", capabilities.pipeline_parallel}}},
              {"tensor_parallel_plan", capabilities.tensor_parallel_plan},
              {"pipeline_plan", capabilities.pipeline_plan},
              {"modules", json::array()}};
  if (mesh.tp != 1 || mesh.pp != 1) {
    report["mesh"] = {{"tp", mesh.tp}, {"pp", mesh.pp},
                      {"violations", flexmodel::hub::validate_for_mesh(config, mesh)}};
  }
  for (const auto& named : model->named_modules()) {
    json module{{"name", named.key()}, {"type", named.value()->name()}, {"parameters", json::object()}, {"hookable", true}};
    for (const auto& parameter : named.value()->named_parameters(/*recurse=*/false)) {
      module["parameters"][parameter.key()] = parameter.value().sizes().vec();
    }
    report["modules"].push_back(std::move(module));
  }
  if (input_paths.empty()) return report;
  FLEXMODEL_CHECK(input_paths.size() == 1, flexmodel::ConfigError, "a causal LM takes one input, token ids [batch, "
                  "positions]; got ", input_paths.size(), " --input files");
  const torch::Tensor tokens = flexmodel::read_npy(input_paths.front()).to(torch::kLong);
  flexmodel::FlexModel fm(model);
  add_hook_facts(fm, capabilities.hook_points, report, [&] { fm.forward(tokens); });
  return report;
}

json inspect(const std::string& model_path, const std::vector<std::string>& input_paths, bool values) {
  flexmodel::ScriptFlexModel fm(model_path);
  const torch::jit::Module& model = fm.module();
  // What a mesh may ask of it: a TorchScript model splits over data-parallel
  // ranks; tensor and pipeline parallelism need flexmodel::parallel models.
  json report{{"model", model_path},
              {"type", model.type()->name()->qualifiedName()},
              {"supports", {{"data_parallel", true}, {"tensor_parallel", false}, {"pipeline_parallel", false}}},
              {"modules", json::array()}};
  const auto selection = fm.select_hook_points("**");
  const std::set<std::string> hook_points(selection.names.begin(), selection.names.end());
  std::map<std::string, std::string> why_not(selection.skipped.begin(), selection.skipped.end());
  for (const auto& named : model.named_modules()) {
    json module{{"name", named.name},
                {"type", named.value.type()->name()->name()},
                {"parameters", json::object()},
                {"hookable", hook_points.count(named.name) != 0}};
    if (why_not.count(named.name) != 0) module["why_not_hookable"] = why_not[named.name];
    // flexmodel's hooks fire on a call written child.forward(x); PyTorch's own do not.
    if (fm.called_as_forward(named.name)) module["pytorch_hooks_fire"] = false;
    for (const auto& parameter : named.value.named_parameters(/*recurse=*/false)) {
      module["parameters"][parameter.name] = parameter.value.sizes().vec();
    }
    report["modules"].push_back(std::move(module));
  }
  if (values) add_values(fm, report);
  if (input_paths.empty()) return report;

  std::vector<torch::IValue> inputs;
  for (const auto& path : input_paths) inputs.emplace_back(flexmodel::read_npy(path));
  for (const auto& module : report["modules"]) {
    for (const auto& value : module.value("values", json::array())) {
      fm.register_forward_hook(flexmodel::HookFunction(value["point"].get<std::string>()));
    }
  }
  add_hook_facts(fm, selection.names, report, [&] { fm.forward(std::move(inputs)); });
  for (auto& module : report["modules"]) {
    if (!module.contains("values")) continue;
    for (auto& value : module["values"]) {
      // A value on a branch that did not run has no shape.
      const std::string point = value["point"];
      if (!fm.outputs().contains(point)) continue;
      const torch::Tensor& tensor = fm.outputs().at(point).front();
      value["shape"] = tensor.sizes().vec();
      value["dtype"] = flexmodel::dtype_name(tensor.scalar_type());
    }
  }
  return report;
}

// Columns as wide as their widest cell, so long names never run together.
void print_rows(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> widths(rows.front().size(), 0);
  for (const auto& row : rows) {
    for (std::size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(widths[c] - row[c].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::cout << line << "\n";
  }
}

// One table per module: every value hook point, with its op, name and what it held.
void print_values(const json& report) {
  for (const auto& module : report["modules"]) {
    if (!module.contains("values") || module["values"].empty()) continue;
    const std::string name = module["name"].get<std::string>().empty() ? "(root)" : module["name"].get<std::string>();
    std::cout << "\nvalues of " << name << ":\n";
    std::vector<std::vector<std::string>> rows{{"OP", "NAME", "OPERATOR", "TENSOR"}};
    for (const auto& value : module["values"]) {
      std::string named = value["name"].get<std::string>();
      if (value.value("name_reaches_a_later_value", false)) named += " (the name reaches a later value)";
      std::string tensor = "-";
      if (value.contains("shape")) tensor = facts_text(json::array({json{{"leaf", ""}, {"shape", value["shape"]},
                                                                         {"dtype", value["dtype"]}}}));
      rows.push_back({value["op"].get<std::string>().empty() ? "-" : value["op"].get<std::string>(),
                      named.empty() ? "-" : named, value["kind"].get<std::string>(), tensor});
    }
    print_rows(rows);
  }
}

void print_text(const json& report) {
  const auto& supports = report["supports"];
  auto yes = [&](const char* kind) { return supports[kind].get<bool>() ? "yes" : "no"; };
  std::cout << report["model"].get<std::string>() << " (" << report["type"].get<std::string>()
            << "); parallelism: data " << yes("data_parallel") << ", tensor " << yes("tensor_parallel") << ", pipeline "
            << yes("pipeline_parallel") << "\n";
  if (report.contains("tensor_parallel_plan")) {
    std::cout << "family " << report["family"].get<std::string>() << ", stored as " << report["dtype"].get<std::string>()
              << "\ntensor-parallel plan:\n";
    for (const auto& line : report["tensor_parallel_plan"]) std::cout << "  " << line.get<std::string>() << "\n";
    std::cout << "pipeline plan: " << report["pipeline_plan"].get<std::string>() << "\n";
  }
  if (report.contains("mesh")) {
    const auto& mesh = report["mesh"];
    std::cout << "on tp " << mesh["tp"] << " × pp " << mesh["pp"] << ": "
              << (mesh["violations"].empty() ? "runs" : "cannot run") << "\n";
    for (const auto& line : mesh["violations"]) std::cout << "  " << line.get<std::string>() << "\n";
  }
  const bool ran = std::any_of(report["modules"].begin(), report["modules"].end(),
                               [](const json& module) { return module.contains("outputs"); });
  std::vector<std::vector<std::string>> rows{{"MODULE", "TYPE", "PARAMETERS"}};
  if (ran) rows.front().insert(rows.front().end(), {"INPUTS", "OUTPUTS"});
  std::vector<std::string> notes;
  for (const auto& module : report["modules"]) {
    std::string parameters;
    for (const auto& [name, shape] : module["parameters"].items()) {
      std::ostringstream one;
      one << (parameters.empty() ? "" : " ") << name << "[";
      for (std::size_t i = 0; i < shape.size(); ++i) one << (i ? "," : "") << shape[i].get<std::int64_t>();
      one << "]";
      parameters += one.str();
    }
    const std::string name = module["name"].get<std::string>().empty() ? "(root)" : module["name"].get<std::string>();
    std::vector<std::string> row{name, module["type"].get<std::string>(), parameters.empty() ? "-" : parameters};
    if (ran && !module["hookable"].get<bool>()) {
      row.insert(row.end(), {"(not a hook point)", ""});
    } else if (ran) {
      row.push_back(facts_text(module.value("inputs", json::array())));
      row.push_back(facts_text(module.value("outputs", json::array())));
    }
    rows.push_back(std::move(row));
    if (module.contains("why_not_hookable")) notes.push_back(name + ": " + module["why_not_hookable"].get<std::string>());
    if (module.contains("pytorch_hooks_fire")) {
      notes.push_back(name + ": called as .forward(...): flexmodel's hooks fire here, PyTorch's own hooks would not");
    }
  }
  print_rows(rows);
  if (!notes.empty()) std::cout << "\nnot hook points, and calls PyTorch's hooks miss:\n";
  for (const auto& note : notes) std::cout << "  " << note << "\n";
  print_values(report);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Prints a TorchScript model's or a Hugging Face checkpoint's hook points: module tree, types, parameter shapes and, given inputs, "
               "what each module receives and returns in one forward.",
               "flex-inspect"};
  std::string model_path;
  std::vector<std::string> input_paths;
  bool as_json = false;
  bool values = false;
  app.add_option("model", model_path,
                 "TorchScript file (torch.jit.save output), or a Hugging Face checkpoint directory (config.json and "
                 "model.safetensors or its shards)")
      ->required();
  flexmodel::dist::MeshShape mesh;
  app.add_option("--tp", mesh.tp, "with a checkpoint directory: check that the model splits over this many "
                                  "tensor-parallel ranks, listing what does not");
  app.add_option("--pp", mesh.pp, "with a checkpoint directory: the same for pipeline stages");
  app.add_option("--input", input_paths, ".npy file for each forward argument, in order");
  app.add_flag("--values", values,
               "list each module's value hook points (<module>::<op>.<k> or <module>::<name>), with shapes when "
               "given inputs");
  app.add_flag("--json", as_json, "print JSON instead of a table");
  CLI11_PARSE(app, argc, argv);
  try {
    // A directory is a checkpoint: one without config.json is an error saying so.
    const bool checkpoint = std::filesystem::is_directory(model_path);
    FLEXMODEL_CHECK(checkpoint || (mesh.tp == 1 && mesh.pp == 1), flexmodel::ConfigError,
                    "--tp and --pp check a Hugging Face checkpoint directory; '", model_path, "' is not one");
    FLEXMODEL_CHECK(!checkpoint || !values, flexmodel::ConfigError,
                    "--values lists a TorchScript graph's values; a checkpoint's model has module hook points only");
    json report = checkpoint ? inspect_checkpoint(model_path, input_paths, mesh) : inspect(model_path, input_paths, values);
    if (as_json) {
      std::cout << report.dump(2) << "\n";
    } else {
      print_text(report);
    }
  } catch (const std::exception& error) {
    std::string message = error.what();
    std::cerr << "flex-inspect: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  }
  return 0;
}
