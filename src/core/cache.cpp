#include "flexmodel/cache.h"

#include "flexmodel/dist.h"

namespace flexmodel {

void detail::check_cacheable(const CacheOptions& options) {
  FLEXMODEL_CHECK(options.hook_type() == HookType::forward || options.hook_type() == HookType::forward_pre,
                  ConfigError, "run_with_cache caches forward or forward_pre hooks, not ", to_string(options.hook_type()),
                  ": gradients come after the run; register that hook and read outputs() after backward()");
}

std::unique_ptr<FlexModelBase::DivertedCaptures> detail::add_cache_hooks(FlexModelBase& model, ScopedHooks& scope,
                                                                         const Pattern& pattern,
                                                                         ActivationCache& cache) {
  const CacheOptions& options = cache.options();
  if (!model.distributed()) {
    scope.add(pattern,
              HookFunction("").capture(false).slice(options.slice()).editing_function(
                  [&cache](const torch::Tensor& x, HookContext& ctx) { cache.add(ctx.module_name, ctx.hook_type, x); }),
              options.hook_type());
    return nullptr;
  }
  // An editing function would run on each stage's leader, not on rank 0,
  // and send its tensor back through the mesh: the capture path brings every
  // stage's tensors, whole, to rank 0, where they are this forward's only.
  scope.add(pattern, HookFunction("").slice(options.slice()), options.hook_type());
  cache.filled_on_another_rank_ = model.mesh()->rank() != 0;
  return std::make_unique<FlexModelBase::DivertedCaptures>(
      model, [&cache](const std::string& name, HookType type, const torch::Tensor& snapshot) {
        cache.add(name, type, snapshot);
      });
}

void ActivationCache::add(const std::string& module_name, HookType type, const torch::Tensor& tensor) {
  const torch::Tensor source = tensor.detach();
  const bool cast = options_.dtype().has_value() && source.is_floating_point();
  auto target = source.options().dtype(cast ? *options_.dtype() : source.scalar_type());
  if (!options_.keep_device()) target = target.device(torch::kCPU);
  Key key(module_name, type);
  auto [entry, fresh] = tensors_.try_emplace(key);
  if (fresh) order_.push_back(key);
  entry->second.push_back(source.to(target, /*non_blocking=*/false, /*copy=*/true));
}

const std::vector<torch::Tensor>& ActivationCache::find(const std::string& module_name, HookType type) const {
  const auto found = tensors_.find(Key(module_name, type));
  if (found != tensors_.end()) return found->second;
  check_filled_here(detail::concat("the cache has nothing of '", module_name, "'"));
  std::string held;
  for (const auto& [name, kind] : order_) held += detail::concat(held.empty() ? "" : ", ", "'", name, "' (", to_string(kind), ")");
  FLEXMODEL_FAIL(ConfigError, "the cache has nothing of '", module_name, "' (", to_string(type), "); it holds ",
                 held.empty() ? std::string("nothing") : held);
}

void ActivationCache::check_filled_here(const std::string& what) const {
  FLEXMODEL_CHECK(!filled_on_another_rank_, ConfigError, what,
                  ": under a mesh run_with_cache fills the cache on rank 0; read or save it there");
}

const torch::Tensor& ActivationCache::at(const std::string& module_name, HookType type) const {
  const auto& tensors = find(module_name, type);
  FLEXMODEL_CHECK(tensors.size() == 1, ConfigError, "'", module_name, "' (", to_string(type), ") ran ",
                  tensors.size(), " times in the cached run; calls(name) has each call's tensor");
  return tensors.front();
}

const std::vector<torch::Tensor>& ActivationCache::calls(const std::string& module_name, HookType type) const {
  return find(module_name, type);
}

bool ActivationCache::contains(const std::string& module_name, HookType type) const {
  return tensors_.count(Key(module_name, type)) != 0;
}

torch::Tensor ActivationCache::stack(const Pattern& pattern, HookType type) const {
  check_filled_here(detail::concat("cache.stack(", pattern.describe(), ")"));
  std::vector<torch::Tensor> picked;
  std::string first;
  for (const auto& [name, kind] : order_) {
    if (kind != type || !pattern.matches(name)) continue;
    const torch::Tensor& tensor = at(name, kind);
    if (picked.empty()) first = name;
    FLEXMODEL_CHECK(picked.empty() || tensor.sizes() == picked.front().sizes(), ShapeError, "cache.stack(",
                    pattern.describe(), "): '", first, "' has shape ", picked.front().sizes(), " but '", name, "' ",
                    tensor.sizes(), "; stack hook points of one shape");
    picked.push_back(tensor);
  }
  FLEXMODEL_CHECK(!picked.empty(), ConfigError, "cache.stack: ", pattern.describe(), " matches no ",
                  to_string(type), " hook point of the cache");
  return torch::stack(picked);
}

void ActivationCache::save(const std::string& path, io::HDF5WriterOptions options) const {
  check_filled_here(detail::concat("cache.save('", path, "')"));
  io::HDF5Writer writer(path, std::move(options));
  for (const auto& key : order_) {
    for (const auto& tensor : tensors_.at(key)) writer.write(key.first, key.second, 0, tensor.cpu());
  }
  writer.end_step(0);
  writer.close();
}

}  // namespace flexmodel
