// Induction heads, found and ablated: a 2-layer attention-only transformer
// trained on random tokens whose first part repeats (Olsson et al., 2022),
// every head's attention pattern read through value hook points, the top
// induction head ablated, and the same scores from the model exported to
// TorchScript, read at the softmax inside its attention.
//   induction_heads OUT_DIR [STEPS]
// Writes OUT_DIR/patterns.h5 (every head's pattern on the evaluation batch),
// OUT_DIR/scores.json, OUT_DIR/attn_only.pt (the export) and
// OUT_DIR/induction_heads.png (drawn with Debian's python3-matplotlib, which
// it needs); exits 1 when the study does not find what it expects.
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include <flexmodel/flexmodel.h>

namespace {

constexpr std::int64_t kVocab = 64, kHalf = 16, kTime = 2 * kHalf + 1, kLayers = 2, kHeads = 2, kWidth = 32;

// Token 0 opens every row; the rest are random, with a segment of random
// length (4 to kHalf) repeated right after itself, so that no fixed offset
// finds the earlier copy: only the tokens do. `fixed` repeats kHalf tokens.
torch::Tensor repeated_tokens(std::int64_t rows, bool fixed) {
  torch::Tensor tokens = torch::randint(1, kVocab, {rows, kTime});
  tokens.select(1, 0).fill_(0);
  const torch::Tensor length = fixed ? torch::full({rows, 1}, kHalf) : torch::randint(4, kHalf + 1, {rows, 1});
  const torch::Tensor position = torch::arange(kTime).unsqueeze(0);
  const torch::Tensor in_copy = (position >= 1 + length) & (position < 1 + 2 * length);
  return tokens.gather(1, torch::where(in_copy, position - length, position.expand({rows, kTime})));
}

class AttnOnlyImpl : public torch::nn::Module {
 public:
  AttnOnlyImpl() {
    const auto options = flexmodel::models::GPTOptions().d_model(kWidth).n_heads(kHeads);
    embed_tokens = register_module("embed_tokens", flexmodel::nn::Embedding(kVocab, kWidth));
    embed_positions = register_module("embed_positions", flexmodel::nn::Embedding(kTime, kWidth));
    layers = register_module("layers", flexmodel::nn::ModuleList());
    for (std::int64_t i = 0; i < kLayers; ++i) {
      attention.emplace_back(options);
      layers->push_back(attention.back());
    }
    unembed = register_module("unembed", flexmodel::nn::Linear(kWidth, kVocab));
  }

  torch::Tensor forward(const torch::Tensor& tokens) {
    torch::Tensor h = embed_tokens(tokens) + embed_positions(torch::arange(tokens.size(1)));
    for (auto& layer : attention) h = h + std::get<0>(layer(h));
    return unembed(h);
  }

  flexmodel::nn::Embedding embed_tokens{nullptr}, embed_positions{nullptr};
  flexmodel::nn::ModuleList layers{nullptr};  // layers.N: attention N, whose pattern is layers.N::pattern
  std::vector<flexmodel::models::Attention> attention;
  flexmodel::nn::Linear unembed{nullptr};
};
FLEX_MODULE(AttnOnly);

// Cross-entropy of the predictions of the repeat's tokens after its first
// (which nothing predicts): positions kHalf + 1 … 2·kHalf − 1.
torch::Tensor repeat_loss(const torch::Tensor& logits, const torch::Tensor& tokens) {
  return torch::nn::functional::cross_entropy(logits.narrow(1, kHalf + 1, kHalf - 1).reshape({-1, kVocab}),
                                              tokens.narrow(1, kHalf + 2, kHalf - 1).reshape(-1));
}

// Per head of a pattern [B, heads, T, T] of the fixed-length evaluation
// batch: the mean attention from each repeat token to the token after its
// previous occurrence (induction; Olsson et al.'s prefix matching is this
// measure), and to the token just before it (previous token).
struct Scores {
  torch::Tensor induction, previous;  // [layers, heads]
};

Scores scores_of(const std::vector<torch::Tensor>& patterns) {
  Scores scores{torch::zeros({kLayers, kHeads}, torch::kFloat64), torch::zeros({kLayers, kHeads}, torch::kFloat64)};
  const torch::Tensor queries = torch::arange(kHalf + 1, 2 * kHalf + 1), after_previous = queries - kHalf + 1;
  const torch::Tensor all = torch::arange(1, kTime), before = all - 1;
  for (std::int64_t layer = 0; layer < kLayers; ++layer) {
    const torch::Tensor p = patterns[layer].to(torch::kFloat64);
    scores.induction[layer] = p.index({torch::indexing::Slice(), torch::indexing::Slice(), queries, after_previous}).mean(0).mean(-1);
    scores.previous[layer] = p.index({torch::indexing::Slice(), torch::indexing::Slice(), all, before}).mean(0).mean(-1);
  }
  return scores;
}

std::string format_table(const Scores& scores) {
  std::ostringstream out;
  out << "layer  head  induction  previous-token\n" << std::fixed << std::setprecision(3);
  for (std::int64_t layer = 0; layer < kLayers; ++layer) {
    for (std::int64_t head = 0; head < kHeads; ++head) {
      out << std::setw(5) << layer + 1 << std::setw(6) << head << std::setw(11)
          << scores.induction[layer][head].item<double>() << std::setw(16) << scores.previous[layer][head].item<double>()
          << "\n";
    }
  }
  return out.str();
}

int run_python(const std::string& script, const std::string& arguments) {
  const std::string command = std::string(FLEXMODEL_SYSTEM_PYTHON) + " " + FLEXMODEL_EXAMPLE_DIR + "/" + script + " " +
                              arguments;
  return std::system(command.c_str());
}

int study(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: induction_heads OUT_DIR [STEPS]\n";
    return 2;
  }
  const std::filesystem::path out = argv[1];
  const int steps = argc == 3 ? std::atoi(argv[2]) : 1500;
  std::filesystem::create_directories(out);
  torch::manual_seed(0);

  // Training: every position predicts the next token.
  AttnOnly model;
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  for (int step = 0; step <= steps; ++step) {
    const torch::Tensor tokens = repeated_tokens(64, /*fixed=*/false);
    const torch::Tensor logits = model(tokens);
    const torch::Tensor loss = torch::nn::functional::cross_entropy(
        logits.narrow(1, 0, kTime - 1).reshape({-1, kVocab}), tokens.narrow(1, 1, kTime - 1).reshape(-1));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    if (step % 500 == 0) std::cout << "step " << step << ": loss " << loss.item<double>() << "\n";
  }

  // Every head's pattern through the attention's value hook points, on a batch the model never saw.
  torch::NoGradGuard no_grad;
  model->eval();
  flexmodel::FlexModel fm(model);
  const torch::Tensor tokens = repeated_tokens(256, /*fixed=*/true);
  auto [logits, cache] = flexmodel::run_with_cache(fm, "layers.*::pattern", tokens);
  // A study's files are its own: a second run replaces them.
  cache.save((out / "patterns.h5").string(), flexmodel::io::HDF5WriterOptions().overwrite(true));
  const Scores native = scores_of({cache.at("layers.0::pattern"), cache.at("layers.1::pattern")});
  std::cout << "\n" << format_table(native);

  // Ablating the top induction head: its mix of values (layers.N::z) set to zero.
  const auto top = native.induction.flatten().argmax().item<std::int64_t>();
  const std::int64_t top_layer = top / kHeads, top_head = top % kHeads;
  const double before = repeat_loss(logits, tokens).item<double>();
  double after = 0;
  {
    flexmodel::ScopedHooks scope(fm);
    scope.add(flexmodel::HookFunction("layers." + std::to_string(top_layer) + "::z", {},
                                      [top_head](torch::Tensor z) {
                                        z.select(1, top_head).zero_();
                                        return z;
                                      }));
    after = repeat_loss(fm.forward(scope.only(), tokens), tokens).item<double>();
  }
  std::cout << "\ntop induction head: layer " << top_layer + 1 << " head " << top_head << "; loss on the repeat "
            << before << " -> " << after << " ablated (x" << after / before << ")\n";

  // The same scores from the TorchScript export, at the softmax inside its attention.
  const std::string weights = (out / "attn_only_weights.pt").string(), exported = (out / "attn_only.pt").string();
  torch::save(model, weights);
  if (run_python("export.py", weights + " " + exported + " " + std::to_string(kHeads)) != 0) {
    std::cerr << "induction_heads: the export failed\n";
    return 1;
  }
  flexmodel::ScriptFlexModel script(exported);
  const auto script_cache = flexmodel::run_with_cache(script, "layers.*::softmax.0", std::vector<torch::IValue>{tokens}).second;
  const Scores exported_scores =
      scores_of({script_cache.at("layers.0::softmax.0"), script_cache.at("layers.1::softmax.0")});
  const double difference = std::max((exported_scores.induction - native.induction).abs().max().item<double>(),
                                     (exported_scores.previous - native.previous).abs().max().item<double>());
  std::cout << "the export's scores (layers.*::softmax.0) differ by at most " << difference << "\n";

  nlohmann::json report{{"induction", std::vector<std::vector<double>>()}, {"previous_token", std::vector<std::vector<double>>()},
                        {"top", {{"layer", top_layer + 1}, {"head", top_head}}}, {"loss_before", before},
                        {"loss_ablated", after}, {"half", kHalf}};
  for (std::int64_t layer = 0; layer < kLayers; ++layer) {
    std::vector<double> induction, previous;
    for (std::int64_t head = 0; head < kHeads; ++head) {
      induction.push_back(native.induction[layer][head].item<double>());
      previous.push_back(native.previous[layer][head].item<double>());
    }
    report["induction"].push_back(induction);
    report["previous_token"].push_back(previous);
  }
  std::ofstream(out / "scores.json") << report.dump(2) << "\n";
  const std::string picture = (out / "induction_heads.png").string();
  if (run_python("plot.py", out.string() + " " + picture) != 0) {
    std::cerr << "induction_heads: the picture failed (Debian's python3-matplotlib draws it)\n";
    return 1;
  }
  std::cout << "picture: " << picture << "\n";

  // What the study expects, with margins.
  const double best_first_layer = native.induction[0].max().item<double>();
  const bool found = top_layer == 1 && native.induction[1][top_head].item<double>() > best_first_layer + 0.3 &&
                     after > 2 * before && difference < 1e-4;
  if (!found) {
    std::cerr << "induction_heads: expected a layer-2 head scoring 0.3 above every layer-1 head, whose ablation "
                 "doubles the loss on the repeat, and the export's scores within 1e-4\n";
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return study(argc, argv);
  } catch (const std::exception& error) {
    const std::string message = error.what();
    std::cerr << "induction_heads: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  }
}
