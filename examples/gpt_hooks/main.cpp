// Wraps the bundled GPT, captures every attention and MLP output, then runs
// the same tokens with an ablation and a steering edit and reports what changed.
#include <cstdlib>
#include <iomanip>
#include <iostream>

#include <flexmodel/flexmodel.h>
#include <flexmodel/hooks/editing.h>
#include <flexmodel/models/gpt.h>

int main() {
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  namespace fm_models = flexmodel::models;
  fm_models::GPT model(fm_models::GPTOptions().n_layers(4).d_model(128).n_heads(4).d_mlp(512));
  model->eval();
  auto tokens = torch::randint(0, model->options().vocab_size(), {2, 16});

  flexmodel::FlexModel fm(model);
  // Retrieval: every attention output (leaf 0 of its (output, probabilities) tuple) and MLP output.
  auto attention = fm.create_hook_group("read", "layers.*.attn", {std::nullopt, std::nullopt, 128});
  auto mlps = fm.create_hook_group("read", "layers.*.mlp");
  // Edits: zero-ablate layer 1's MLP; steer layer 2's residual stream.
  fm.create_hook_group("ablate", "layers.1.mlp", {}, flexmodel::hooks::zero_ablation());
  auto direction = torch::randn({128});
  fm.create_hook_group("steer", "layers.2", {}, flexmodel::hooks::add_vector(direction, 4.0));

  auto clean = fm.forward(flexmodel::Groups{"read"}, tokens);
  const bool captured_all = fm.outputs().size() == attention.size() + mlps.size();
  std::cout << "captured " << fm.outputs().size() << " activations in one forward:\n";
  for (const auto& [name, type] : fm.outputs().keys()) {
    const auto& x = fm.outputs().at(name, type)[0];
    std::cout << "  " << std::left << std::setw(16) << name << " " << x.sizes() << "  mean " << std::fixed
              << std::setprecision(4) << x.mean().item<float>() << "  std " << x.std().item<float>() << "\n";
  }

  auto report = [&](const char* label, const torch::Tensor& edited) {
    auto shift = (edited - clean).abs().max().item<float>();
    auto agree = (edited.argmax(-1) == clean.argmax(-1)).to(torch::kFloat).mean().item<float>();
    std::cout << label << ": max |Δlogit| " << shift << ", top-1 agreement with the clean run " << agree * 100
              << " %\n";
    return shift;
  };
  auto ablated = fm.forward(flexmodel::Groups{"ablate"}, tokens);
  auto steered = fm.forward(flexmodel::Groups{"steer"}, tokens);
  const bool ablation_changed = report("zero-ablate layers.1.mlp", ablated) > 0;
  const bool steering_changed = report("steer layers.2 (+4·v)    ", steered) > 0;

  fm.restore();
  const bool restored = torch::equal(fm.forward(tokens), clean);
  std::cout << "after restore() the model's logits equal the clean run: " << (restored ? "yes" : "NO") << "\n";
  return captured_all && ablation_changed && steering_changed && restored ? EXIT_SUCCESS : EXIT_FAILURE;
}
