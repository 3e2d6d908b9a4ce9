// Hookable forms of the common built-in layers and containers. Each is the
// torch type with a hookable call operator, so swapping the type is the only
// change a model needs.
#pragma once

#include <cstddef>
#include <memory>
#include <utility>

#include <torch/nn.h>

#include "flexmodel/hooked.h"

namespace flexmodel::nn {

using Linear = Hooked<torch::nn::Linear>;
using Bilinear = Hooked<torch::nn::Bilinear>;
using Embedding = Hooked<torch::nn::Embedding>;
using LayerNorm = Hooked<torch::nn::LayerNorm>;
using GroupNorm = Hooked<torch::nn::GroupNorm>;
using BatchNorm1d = Hooked<torch::nn::BatchNorm1d>;
using BatchNorm2d = Hooked<torch::nn::BatchNorm2d>;
using Dropout = Hooked<torch::nn::Dropout>;
using Conv1d = Hooked<torch::nn::Conv1d>;
using Conv2d = Hooked<torch::nn::Conv2d>;
using ReLU = Hooked<torch::nn::ReLU>;
using GELU = Hooked<torch::nn::GELU>;
using SiLU = Hooked<torch::nn::SiLU>;
using Tanh = Hooked<torch::nn::Tanh>;
using Softmax = Hooked<torch::nn::Softmax>;
using Identity = Hooked<torch::nn::Identity>;
using MultiheadAttention = Hooked<torch::nn::MultiheadAttention>;
using LSTM = Hooked<torch::nn::LSTM>;
using GRU = Hooked<torch::nn::GRU>;

// A named point inside a forward (TransformerLens's HookPoint): the identity,
// hookable. A child registered as `hook_<value>` of module M is also the value
// hook point `M::<value>`, the name a TorchScript export gives the tensor M
// computes there (`layers.0.attn::q`), so native and exported models can
// offer the same points.
class HookPointImpl : public torch::nn::Module {
 public:
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
FLEX_MODULE(HookPoint);

// A Sequential whose children are hookable. Children map a tensor to a tensor.
class SequentialImpl : public torch::nn::SequentialImpl {
 public:
  template <class... Modules>
  explicit SequentialImpl(Modules&&... modules)
      : torch::nn::SequentialImpl(std::forward<Modules>(modules)...) {
    mark_children();
  }

  template <class ModuleType>
  void push_back(ModuleType&& module) {
    torch::nn::SequentialImpl::push_back(std::forward<ModuleType>(module));
    detail::mark_hookable(ptr(size() - 1));
  }

  torch::Tensor forward(torch::Tensor input);

 private:
  void mark_children();
};
class Sequential : public Hooked<torch::nn::ModuleHolder<SequentialImpl>> {
 public:
  using Hooked<torch::nn::ModuleHolder<SequentialImpl>>::Hooked;
};

// A ModuleList whose children are hookable when called through
// flexmodel::call(list->ptr<Impl>(i), args...) or list->call<Impl>(i, args...).
class ModuleListImpl : public torch::nn::ModuleListImpl {
 public:
  template <class... Modules>
  explicit ModuleListImpl(Modules&&... modules)
      : torch::nn::ModuleListImpl(std::forward<Modules>(modules)...) {
    mark_children();
  }

  template <class ModuleType>
  void push_back(ModuleType&& module) {
    torch::nn::ModuleListImpl::push_back(std::forward<ModuleType>(module));
    detail::mark_hookable(ptr(size() - 1));
  }

  template <class Impl, class... Args>
  auto call(std::size_t index, Args&&... args)
      -> decltype(flexmodel::call(std::declval<Impl&>(), std::forward<Args>(args)...)) {
    return flexmodel::call(*ptr<Impl>(index), std::forward<Args>(args)...);
  }

 private:
  void mark_children();
};
class ModuleList : public Hooked<torch::nn::ModuleHolder<ModuleListImpl>> {
 public:
  using Hooked<torch::nn::ModuleHolder<ModuleListImpl>>::Hooked;
};

}  // namespace flexmodel::nn
