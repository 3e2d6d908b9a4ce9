#include "flexmodel/scoped_hooks.h"

#include <atomic>
#include <exception>

#include "flexmodel/logging.h"

namespace flexmodel {

ScopedHooks::ScopedHooks(FlexModelBase& model) : model_(model) {
  static std::atomic<std::uint64_t> scopes{0};
  group_ = detail::concat("scope ", scopes.fetch_add(1));
}

ScopedHooks::~ScopedHooks() {
  try {
    for (const auto& handle : handles_) model_.remove_hook(handle);
  } catch (const std::exception& error) {
    logger()->warn("ScopedHooks: could not remove the hooks of '{}': {}", group_, error.what());
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
  const auto names = model_.select_hook_points(pattern, type).names;
  FLEXMODEL_CHECK(!names.empty(), ConfigError, "ScopedHooks: ", pattern.describe(), " selects no hook point for ",
                  to_string(type), " hooks");
  std::vector<HookHandle> added;
  for (const auto& name : names) added.push_back(add(hook.with_module_name(name), type));
  return added;
}

}  // namespace flexmodel
