// Activation steering that lasts: `compute` takes the difference of two
// prompts' mean residual streams after layer 1 as a steering vector and saves
// it; `apply`, in another run, loads it, hooks it into layer 1 and shows what
// it does to the logits.
//   steering MODEL.pt TOKENS.npy compute|apply DIRECTION.pt
#include <iostream>
#include <string>

#include <flexmodel/flexmodel.h>
#include <flexmodel/hooks/editing.h>

int main(int argc, char** argv) {
  const std::string mode = argc == 5 ? argv[3] : "";
  if (mode != "compute" && mode != "apply") {
    std::cerr << "usage: steering MODEL.pt TOKENS.npy compute|apply DIRECTION.pt\n";
    return 2;
  }
  flexmodel::ScriptFlexModel fm(argv[1]);
  const torch::Tensor tokens = flexmodel::read_npy(argv[2]);
  const std::vector<torch::IValue> toward{tokens.narrow(0, 0, 1)}, away{tokens.narrow(0, 1, 1)};
  torch::NoGradGuard no_grad;
  if (mode == "compute") {
    auto [unused_a, first] = flexmodel::run_with_cache(fm, "layers.1", toward);
    auto [unused_b, second] = flexmodel::run_with_cache(fm, "layers.1", away);
    const torch::Tensor difference = first.at("layers.1").mean(std::vector<std::int64_t>{0, 1}) - second.at("layers.1").mean(std::vector<std::int64_t>{0, 1});
    auto steer = std::make_shared<flexmodel::SteeringVectorImpl>(difference.size(0), /*coefficient=*/1.0);
    steer->direction.copy_(difference);
    flexmodel::save_intervention(*steer, argv[4]);
    std::cout << "saved a steering vector of norm " << difference.norm().item<double>() << " to " << argv[4] << "\n";
    return 0;
  }
  auto steer = flexmodel::load_intervention(argv[4]);
  fm.register_trainable_module("steer", steer);
  fm.create_hook_group("steer", "layers.1", {}, flexmodel::hooks::intervene("steer"));
  const torch::Tensor plain = flexmodel::first_tensor(fm.forward(flexmodel::Groups::none(), away));
  const torch::Tensor steered = flexmodel::first_tensor(fm.forward(flexmodel::Groups{"steer"}, away));
  const torch::Tensor reference = flexmodel::first_tensor(fm.forward(flexmodel::Groups::none(), toward));
  // Steering toward the first prompt moves the second's mean logits (over positions) toward the first's.
  auto distance = [&](const torch::Tensor& logits) { return (logits.mean(1) - reference.mean(1)).norm().item<double>(); };
  const double before = distance(plain), after = distance(steered);
  std::cout << "loaded a " << steer->kind() << " (coefficient " << steer->config().at("coefficient") << ")\n"
            << "distance of the second prompt's mean logits from the first's: " << before << " unsteered, " << after
            << " steered\n"
            << "top token at the last position: " << plain.select(1, -1).argmax(-1).item<std::int64_t>()
            << " unsteered, " << steered.select(1, -1).argmax(-1).item<std::int64_t>() << " steered\n";
  return after < before ? 0 : 1;
}
