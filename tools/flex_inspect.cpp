// flex-inspect MODEL.pt [--input INPUT.npy ...] [--json]
// Prints a TorchScript model's module tree (types, parameter shapes) and, given
// inputs, the shapes and dtypes every hook point sees in one forward, so that
// a user finds the names to hook.
#include <iomanip>
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <flexmodel/flexmodel.h>
#include <flexmodel/npy.h>
#include <flexmodel/torchscript.h>

namespace {

using nlohmann::json;

json tensor_facts(const torch::Tensor& tensor) {
  return json{{"shape", tensor.sizes().vec()}, {"dtype", flexmodel::dtype_name(tensor.scalar_type())}};
}

std::string facts_text(const json& leaves) {
  std::string text;
  for (const auto& leaf : leaves) {
    std::ostringstream one;
    one << (text.empty() ? "" : ", ") << leaf["dtype"].get<std::string>() << " [";
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
  std::vector<std::string> hook_points;
  for (const auto& named : model.named_modules()) {
    json module{{"name", named.name}, {"type", named.value.type()->name()->name()}, {"parameters", json::object()},
                {"hookable", static_cast<bool>(named.value.find_method("forward"))}};
    for (const auto& parameter : named.value.named_parameters(/*recurse=*/false)) {
      module["parameters"][parameter.name] = parameter.value.sizes().vec();
    }
    if (module["hookable"].get<bool>()) hook_points.push_back(named.name);
    report["modules"].push_back(std::move(module));
  }
  if (input_paths.empty()) return report;

  std::vector<torch::IValue> inputs;
  for (const auto& path : input_paths) inputs.emplace_back(flexmodel::read_npy(path));
  for (const auto& name : hook_points) {
    for (auto type : {flexmodel::HookType::forward, flexmodel::HookType::forward_pre}) {
      fm.register_hook_function(flexmodel::HookFunction(name).unpack_idx(flexmodel::HookFunction::kAllLeaves), type);
    }
  }
  torch::NoGradGuard no_grad;
  fm.forward(std::move(inputs));
  for (auto& module : report["modules"]) {
    const std::string name = module["name"];
    for (auto [type, key] : {std::pair{flexmodel::HookType::forward, "outputs"},
                             std::pair{flexmodel::HookType::forward_pre, "inputs"}}) {
      if (!fm.outputs().contains(name, type)) continue;
      module[key] = json::array();
      for (const auto& tensor : fm.outputs().at(name, type)) module[key].push_back(tensor_facts(tensor));
    }
  }
  return report;
}

void print_text(const json& report) {
  std::cout << report["model"].get<std::string>() << " (" << report["type"].get<std::string>()
            << "); parallelism: data yes, tensor no, pipeline no\n";
  const bool ran = std::any_of(report["modules"].begin(), report["modules"].end(),
                               [](const json& module) { return module.contains("outputs"); });
  std::cout << std::left << std::setw(28) << "MODULE" << std::setw(16) << "TYPE" << std::setw(30) << "PARAMETERS";
  if (ran) std::cout << std::setw(36) << "INPUTS" << "OUTPUTS";
  std::cout << "\n";
  for (const auto& module : report["modules"]) {
    std::string parameters;
    for (const auto& [name, shape] : module["parameters"].items()) {
      std::ostringstream one;
      one << (parameters.empty() ? "" : " ") << name << "[";
      for (std::size_t i = 0; i < shape.size(); ++i) one << (i ? "," : "") << shape[i].get<std::int64_t>();
      one << "]";
      parameters += one.str();
    }
    const std::string name = module["name"].get<std::string>();
    std::cout << std::setw(28) << (name.empty() ? "(root)" : name) << std::setw(16)
              << module["type"].get<std::string>() << std::setw(30) << (parameters.empty() ? "-" : parameters);
    if (ran) {
      if (!module["hookable"].get<bool>()) {
        std::cout << "(no forward: not a hook point)";
      } else {
        std::cout << std::setw(36) << facts_text(module.value("inputs", json::array()))
                  << facts_text(module.value("outputs", json::array()));
      }
    }
    std::cout << "\n";
  }
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
