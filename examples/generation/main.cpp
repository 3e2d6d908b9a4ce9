// Generation with hooks on a TorchScript model: greedy continuations of a
// prompt with and without an ablation of layer 1's MLP, and the last
// position's layer-0 output captured at every step.
//   generation MODEL.pt TOKENS.npy
#include <iostream>

#include <flexmodel/flexmodel.h>
#include <flexmodel/hooks/editing.h>

namespace {

void print_ids(const char* title, const torch::Tensor& ids) {
  std::cout << title;
  for (std::int64_t i = 0; i < ids.size(1); ++i) std::cout << " " << ids[0][i].item<std::int64_t>();
  std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: generation MODEL.pt TOKENS.npy\n";
    return 2;
  }
  flexmodel::ScriptFlexModel fm(argv[1]);
  const torch::Tensor prompt = flexmodel::read_npy(argv[2]).narrow(0, 0, 1).narrow(1, 0, 6);
  fm.create_hook_group("ablate", "layers.1.mlp", {}, flexmodel::hooks::zero_ablation());
  // Each step's newest position: the model runs the whole sequence, the hook keeps its last position.
  fm.create_hook_group("read", "layers.0",
                       flexmodel::HookFunction("").slice(flexmodel::Slice().positions(flexmodel::Index::last())));
  const auto options = flexmodel::GenerationOptions().max_new_tokens(8);
  const torch::Tensor plain = flexmodel::generate(fm, flexmodel::Groups{"read"}, prompt, options);
  const torch::Tensor ablated = flexmodel::generate(fm, flexmodel::Groups{"ablate"}, prompt, options);
  const torch::Tensor sampled =
      flexmodel::generate(fm, flexmodel::Groups::none(), prompt, flexmodel::GenerationOptions(options).greedy(false).seed(3));
  print_ids("prompt          ", prompt);
  print_ids("greedy          ", plain);
  print_ids("layer 1 MLP off ", ablated);
  print_ids("sampled, seed 3 ", sampled);
  const auto& steps = fm.outputs().at("layers.0");
  std::cout << "captured layers.0 at " << steps.size() << " steps, each " << steps.front().sizes() << "\n";
  return steps.size() == 8 ? 0 : 1;
}
