// Hooks for one block: registered through the scope and removed when it ends,
// by an exception too (PyTorch's RemovableHandle, TransformerLens's hooks()).
// They join group "all" and a group of the scope's own, so a forward runs
// them alone, with the model's other hooks, or not at all:
//
//   for (const auto& layer : layers) {
//     flexmodel::ScopedHooks scope(fm);
//     scope.add(flexmodel::HookFunction(layer, {}, zero_ablate));
//     losses.push_back(loss(fm.forward(scope.only(), tokens)));  // this edit alone
//   }  // the model's own hooks and groups are as they were
#pragma once

#include <string>
#include <vector>

#include "flexmodel/flex_model.h"

namespace flexmodel {

class ScopedHooks {
 public:
  explicit ScopedHooks(FlexModelBase& model);
  // Removes the hooks and the scope's group; what fails (a model restored
  // meanwhile) is logged, never thrown.
  ~ScopedHooks();
  ScopedHooks(const ScopedHooks&) = delete;
  ScopedHooks& operator=(const ScopedHooks&) = delete;

  HookHandle add(HookFunction hook, HookType type = HookType::forward);
  // `hook` on every hook point `pattern` selects for `type`, in model order;
  // a ConfigError when it selects none. Under pp it is collective, as
  // create_hook_group: every stage registers the hooks of them all.
  std::vector<HookHandle> add(const Pattern& pattern, const HookFunction& hook, HookType type = HookType::forward);

  const std::vector<HookHandle>& handles() const { return handles_; }
  // The scope's hooks and no other.
  Groups only() const { return Groups{group_}; }
  const std::string& group() const { return group_; }

 private:
  FlexModelBase& model_;
  std::string group_;
  std::vector<HookHandle> handles_;
};

}  // namespace flexmodel
