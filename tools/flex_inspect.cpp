// flex-inspect MODEL.pt [--input INPUT.npy ...] [--json]
// Prints a TorchScript model's module tree (types, parameter shapes) and, given
// inputs, the shapes and dtypes every hook point sees in one forward, so that
// a user finds the names to hook.
#include <algorithm>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <flexmodel/flexmodel.h>
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

json inspect(const std::string& model_path, const std::vector<std::string>& input_paths) {
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
  if (input_paths.empty()) return report;

  std::vector<torch::IValue> inputs;
  for (const auto& path : input_paths) inputs.emplace_back(flexmodel::read_npy(path));
  for (const auto& name : selection.names) {
    for (auto type : {flexmodel::HookType::forward, flexmodel::HookType::forward_pre}) {
      fm.register_hook_function(flexmodel::HookFunction(name).unpack_idx(flexmodel::HookFunction::kAllLeaves), type);
    }
  }
  fm.record_leaf_names(true);
  torch::NoGradGuard no_grad;
  fm.forward(std::move(inputs));
  for (auto& module : report["modules"]) {
    const std::string name = module["name"];
    for (auto [type, key] : {std::pair{flexmodel::HookType::forward, "outputs"},
                             std::pair{flexmodel::HookType::forward_pre, "inputs"}}) {
      if (!fm.outputs().contains(name, type)) continue;
      const auto leaves = fm.leaf_names(name, type);
      const auto& tensors = fm.outputs().at(name, type);
      module[key] = json::array();
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        module[key].push_back(tensor_facts(tensors[i], i < leaves.size() ? leaves[i] : std::string()));
      }
    }
  }
  return report;
}

void print_text(const json& report) {
  std::cout << report["model"].get<std::string>() << " (" << report["type"].get<std::string>()
            << "); parallelism: data yes, tensor no, pipeline no\n";
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
  // Columns as wide as their widest cell, so long names never run together.
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
  if (!notes.empty()) std::cout << "\nnot hook points, and calls PyTorch's hooks miss:\n";
  for (const auto& note : notes) std::cout << "  " << note << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Prints a TorchScript model's hook points: module tree, types, parameter shapes and, given inputs, "
               "what each module receives and returns in one forward.",
               "flex-inspect"};
  std::string model_path;
  std::vector<std::string> input_paths;
  bool as_json = false;
  app.add_option("model", model_path, "TorchScript file (torch.jit.save output)")->required();
  app.add_option("--input", input_paths, ".npy file for each forward argument, in order");
  app.add_flag("--json", as_json, "print JSON instead of a table");
  CLI11_PARSE(app, argc, argv);
  try {
    json report = inspect(model_path, input_paths);
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
