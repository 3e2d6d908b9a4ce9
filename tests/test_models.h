// Small hookable models whose every activation is easy to compute by hand.
#pragma once

#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "flexmodel/flexmodel.h"

namespace flexmodel::testing {

// The message of the flexmodel::Error that `action` throws, or "(no error)".
inline std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  return "(no error)";
}

// Returns a tuple with a nested vector: (2x, [x + 1, x - 1]).
struct SplitImpl : torch::nn::Module {
  std::tuple<torch::Tensor, std::vector<torch::Tensor>> forward(const torch::Tensor& x) {
    return {x * 2, {x + 1, x - 1}};
  }
};
FLEX_MODULE(Split);

// fc1 → relu → split → fc2 → side. `side` is a plain torch holder (not hookable);
// `bypassed` is hookable but called around the library.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", flexmodel::nn::Linear(4, 8));
    act = register_module("act", flexmodel::nn::ReLU());
    split = register_module("split", Split());
    fc2 = register_module("fc2", flexmodel::nn::Linear(8, 3));
    side = register_module("side", torch::nn::Linear(3, 3));
    bypassed = register_module("bypassed", flexmodel::nn::Identity());
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto h = act(fc1(x));
    auto [doubled, pair] = split(h);
    auto y = fc2(doubled + pair[0] * pair[1]);
    return side(bypassed->forward(y));
  }

  flexmodel::nn::Linear fc1{nullptr};
  flexmodel::nn::ReLU act{nullptr};
  Split split{nullptr};
  flexmodel::nn::Linear fc2{nullptr};
  torch::nn::Linear side{nullptr};
  flexmodel::nn::Identity bypassed{nullptr};
};
FLEX_MODULE(Net);

// The same computation written out from the weights, with optional edits.
struct NetReference {
  torch::Tensor fc1, act, split_doubled, split_plus, split_minus, fc2_input, fc2, out;
};

inline NetReference compute_by_hand(NetImpl& net, const torch::Tensor& x,
                                    const std::function<torch::Tensor(torch::Tensor)>& edit_fc1 = nullptr,
                                    const std::function<torch::Tensor(torch::Tensor)>& edit_fc2_input = nullptr) {
  NetReference r;
  r.fc1 = torch::linear(x, net.fc1->weight, net.fc1->bias);
  if (edit_fc1) r.fc1 = edit_fc1(r.fc1);
  r.act = torch::relu(r.fc1);
  r.split_doubled = r.act * 2;
  r.split_plus = r.act + 1;
  r.split_minus = r.act - 1;
  r.fc2_input = r.split_doubled + r.split_plus * r.split_minus;
  if (edit_fc2_input) r.fc2_input = edit_fc2_input(r.fc2_input);
  r.fc2 = torch::linear(r.fc2_input, net.fc2->weight, net.fc2->bias);
  r.out = torch::linear(r.fc2, net.side->weight, net.side->bias);
  return r;
}

}  // namespace flexmodel::testing
