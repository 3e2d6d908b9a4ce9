#include "flexmodel/scoped_hooks.h"

#include <atomic>
#include <exception>

#include "flexmodel/dist.h"
#include "flexmodel/logging.h"

namespace flexmodel {

ScopedHooks::ScopedHooks(FlexModelBase& model) : model_(model) {
  static std::atomic<std::uint64_t> scopes{0};
  group_ = detail::concat("scope ", scopes.fetch_add(1));
}

ScopedHooks::~ScopedHooks() {
  // Each on its own: one the program removed already must not keep the rest.
  for (const auto& handle : handles_) {
    try {
      model_.remove_hook(handle);
    } catch (const std::exception& error) {
      logger()->debug("ScopedHooks: hook {} of '{}' was gone: {}", handle.id, group_, error.what());
    }
  }
  model_.delete_hook_group(group_);
}

HookHandle ScopedHooks::add(HookFunction hook, HookType type) {
  HookHandle handle = model_.register_hook_function(std::move(hook), type);
  handles_.push_back(handle);
  model_.update_hook_groups(handle, group_);
  return handle;
}

std::vector<HookHandle> ScopedHooks::add(const Pattern& pattern, const HookFunction& hook, HookType type) {
  // A stage selects among its own modules: the stages would register different hooks.
  FLEXMODEL_CHECK(model_.mesh() == nullptr || model_.mesh()->shape().pp == 1, ConfigError, "ScopedHooks: ",
                  pattern.describe(), " under pipeline parallelism: add each hook by name, or use create_hook_group");
  const auto names = model_.select_hook_points(pattern, type).names;
  FLEXMODEL_CHECK(!names.empty(), ConfigError, "ScopedHooks: ", pattern.describe(), " selects no hook point for ",
                  to_string(type), " hooks");
  std::vector<HookHandle> added;
  for (const auto& name : names) added.push_back(add(hook.with_module_name(name), type));
  return added;
}

}  // namespace flexmodel
