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
  // The group's own selection: under pp it is collective and every stage registers the union.
  std::vector<HookHandle> added = model_.create_hook_group(group_, pattern, hook, type);
  handles_.insert(handles_.end(), added.begin(), added.end());
  return added;
}

}  // namespace flexmodel
