// Activation patching on a TorchScript model: which layer, at which position,
// carries the token that tells a clean prompt from a corrupt one. Prints the
// exact sweep, its attribution-patching estimate, and how well they agree.
//   activation_patching MODEL.pt TOKENS.npy
#include <cmath>
#include <iomanip>
#include <iostream>

#include <flexmodel/flexmodel.h>

namespace {

void print_table(const char* title, const flexmodel::PatchingResult& result) {
  const torch::Tensor normalized = result.normalized();
  std::cout << title << " (0: the corrupt run's metric, 1: the clean run's)\n" << std::fixed << std::setprecision(2);
  for (std::size_t p = 0; p < result.points.size(); ++p) {
    std::cout << "  " << std::setw(10) << std::left << result.points[p] << std::right;
    for (std::int64_t t = 0; t < normalized.size(1); ++t) {
      // Rounded first, so that a tiny negative prints as 0.00, not -0.00.
      std::cout << std::setw(7) << std::round(normalized[p][t].item<double>() * 100) / 100 + 0.0;
    }
    std::cout << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: activation_patching MODEL.pt TOKENS.npy\n";
    return 2;
  }
  flexmodel::ScriptFlexModel fm(argv[1]);
  const torch::Tensor tokens = flexmodel::read_npy(argv[2]).narrow(0, 0, 1);
  // The corrupt prompt differs from the clean one in one token, at position 3.
  torch::Tensor corrupted = tokens.clone();
  corrupted[0][3] = (corrupted[0][3] + 1) % 256;
  const std::vector<torch::IValue> clean{tokens}, corrupt{corrupted};

  // The metric: the log-probability of the clean run's answer at the last position.
  const std::int64_t answer =
      flexmodel::first_tensor(fm.forward(flexmodel::Groups::none(), clean)).select(1, -1).argmax(-1).item<std::int64_t>();
  const flexmodel::Metric metric = [answer](const torch::Tensor& logits) {
    return torch::log_softmax(logits.select(1, -1), -1).select(1, answer).mean();
  };
  const auto exact = flexmodel::activation_patching(fm, "layers.*", clean, corrupt, metric);
  const auto estimate = flexmodel::attribution_patching(fm, "layers.*", clean, corrupt, metric);
  std::cout << "answer token " << answer << ": log-probability " << std::setprecision(3) << exact.clean_metric
            << " clean, " << exact.corrupt_metric << " corrupt\n";
  print_table("activation patching, layer output x position", exact);
  print_table("attribution patching (one forward and backward per input)", estimate);
  const torch::Tensor a = exact.effect.flatten() - exact.effect.mean();
  const torch::Tensor b = estimate.effect.flatten() - estimate.effect.mean();
  std::cout << "correlation of the two tables: " << ((a * b).sum() / (a.norm() * b.norm())).item<double>() << "\n";
  return 0;
}
