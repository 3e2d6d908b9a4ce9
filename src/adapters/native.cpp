// The adapter of native torch::nn::Module trees: names from named_modules(),
// hook points at the modules' own addresses, sharding from the
// dist::TensorParallelModule layers.
#include <algorithm>

#include "flexmodel/dist.h"
#include "flexmodel/flex_model.h"
#include "flexmodel/hooked.h"
#include "flexmodel/nn.h"
#include "flexmodel/pattern.h"
#include "adapters/model_adapter.h"

namespace flexmodel {
namespace detail {
namespace {

class NativeAdapter final : public ModelAdapter {
 public:
  explicit NativeAdapter(std::shared_ptr<torch::nn::Module> root) : root_(std::move(root)) {
    FLEXMODEL_CHECK(root_ != nullptr, ConfigError, "FlexModel needs a model; got an empty module holder");
  }

  std::vector<std::string> module_names() const override {
    refresh();
    return modules_.keys();
  }

  HookPoint hook_point(const std::string& name) const override {
    const std::string point = point_module(name);
    if (!point.empty()) return hook_point(point);
    auto module = find(name);
    FLEXMODEL_CHECK(module != nullptr, ConfigError, "no module named '", name, "' in the model; close names: ",
                    close_names(name, module_names()));
    std::string reason = unhookable_reason(name);
    FLEXMODEL_CHECK(reason.empty(), ConfigError, "module '", name, "' (", module->name(), ") ", reason);
    return HookPoint{module.get(), module.get()};
  }

  std::string unhookable_reason(const std::string& name) const override {
    auto module = find(name);
    if (module == nullptr || module == root_ || is_hookable(module.get())) return {};
    return "is not called through a hookable holder, so a hook on it could never fire; declare it as "
           "flexmodel::Hooked<torch::nn::X> (or flexmodel::nn::X), use FLEX_MODULE(Name) instead of "
           "TORCH_MODULE(Name), or hold it in flexmodel::nn::Sequential / flexmodel::nn::ModuleList";
  }

  // `M::v` for each flexmodel::nn::HookPoint registered as child `hook_v` of M.
  std::vector<std::string> value_point_names() const override {
    refresh();
    std::vector<std::string> names;
    for (const auto& item : modules_) {
      if (dynamic_cast<const nn::HookPointImpl*>(item.value().get()) == nullptr) continue;
      const std::string& path = item.key();
      const auto dot = path.rfind('.');
      const std::string leaf = dot == std::string::npos ? path : path.substr(dot + 1);
      if (leaf.rfind(kHookPrefix, 0) != 0) continue;
      const std::string owner = dot == std::string::npos ? std::string(kRootName) : path.substr(0, dot);
      names.push_back(concat(owner, kValueSeparator, leaf.substr(kHookPrefix.size())));
    }
    return names;
  }

  bool is_value_point_module(const std::string& name) const override {
    const auto dot = name.rfind('.');
    return dynamic_cast<const nn::HookPointImpl*>(find(name).get()) != nullptr &&
           name.compare(dot == std::string::npos ? 0 : dot + 1, kHookPrefix.size(), kHookPrefix) == 0;
  }

  NamedTensors named_parameters() const override { return to_vector(root_->named_parameters(true)); }
  NamedTensors named_buffers() const override { return to_vector(root_->named_buffers(true)); }
  const void* root_key() const override { return root_.get(); }
  std::string description() const override { return concat("model ", root_->name()); }

  dist::Sharding parameter_sharding(const std::string& name) const override {
    const auto dot = name.rfind('.');
    auto module = find(dot == std::string::npos ? std::string() : name.substr(0, dot));
    const auto* parallel = dynamic_cast<const dist::TensorParallelModule*>(module.get());
    return parallel != nullptr ? parallel->parameter_sharding(name.substr(dot == std::string::npos ? 0 : dot + 1))
                               : dist::Sharding::replicated();
  }

  std::string name_of(const void* key) const override {
    refresh();
    for (const auto& item : modules_) {
      if (item.value().get() == key) return item.key().empty() ? std::string(kRootName) : item.key();
    }
    return {};
  }

  bool has_tensor_parallel_layers() const override {
    refresh();
    return std::any_of(modules_.begin(), modules_.end(), [](const auto& item) {
      return dynamic_cast<const dist::TensorParallelModule*>(item.value().get()) != nullptr;
    });
  }

  bool is_pipeline_stage() const override {
    return dynamic_cast<const dist::PipelineStageModule*>(root_.get()) != nullptr;
  }

 private:
  // The tree is cached; a name it lacks refreshes it once, for trees changed after wrapping.
  static constexpr std::string_view kHookPrefix = "hook_";

  // The HookPoint module a value hook point `M::v` names (`M.hook_v`), or
  // empty when `name` is a module's; a ConfigError when M has no such point.
  std::string point_module(const std::string& name) const {
    const auto at = name.find(kValueSeparator);
    if (at == std::string::npos) return {};
    const std::string owner = name.substr(0, at), value = name.substr(at + kValueSeparator.size());
    const std::string path = concat(owner == kRootName ? "" : owner + ".", kHookPrefix, value);
    FLEXMODEL_CHECK(dynamic_cast<const nn::HookPointImpl*>(find(path).get()) != nullptr, ConfigError, "'", name,
                    "': module '", owner, "' has no flexmodel::nn::HookPoint '", kHookPrefix, value,
                    "'; a native model's value hook points are the HookPoints it registers; close names: ",
                    close_names(name, value_point_names()));
    return path;
  }

  std::shared_ptr<torch::nn::Module> find(const std::string& name) const {
    const auto* found = modules_.find(name);
    if (found == nullptr) {
      refresh();
      found = modules_.find(name);
    }
    return found != nullptr ? *found : nullptr;
  }

  void refresh() const { modules_ = root_->named_modules("", true); }

  static NamedTensors to_vector(const torch::OrderedDict<std::string, torch::Tensor>& dict) {
    NamedTensors out;
    for (const auto& item : dict) out.emplace_back(item.key(), item.value());
    return out;
  }

  std::shared_ptr<torch::nn::Module> root_;
  mutable torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>> modules_;
};

}  // namespace

std::shared_ptr<ModelAdapter> make_native_adapter(std::shared_ptr<torch::nn::Module> root) {
  return std::make_shared<NativeAdapter>(std::move(root));
}

}  // namespace detail
}  // namespace flexmodel
