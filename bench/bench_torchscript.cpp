// Costs of hooking TorchScript models, as paired timings (bench_common.h).
// The models come from tests/fixtures/make_fixtures.py --gpt2-small --chain,
// in the folder named by FLEXMODEL_BENCH_MODELS (bench/run.sh makes them).
#include <cstdlib>

#include <flexmodel/flexmodel.h>
#include <flexmodel/torchscript.h>

#include "bench_common.h"

namespace {

using flexmodel::bench::hook_attention_and_mlp;
using flexmodel::bench::measure_pairs;

std::string model_path(const std::string& file) {
  const char* folder = std::getenv("FLEXMODEL_BENCH_MODELS");
  if (folder == nullptr) throw std::runtime_error("set FLEXMODEL_BENCH_MODELS (bench/run.sh does)");
  return std::string(folder) + "/" + file;
}

torch::jit::Module& loaded(const std::string& file) {
  static std::map<std::string, torch::jit::Module> models;
  auto found = models.find(file);
  if (found == models.end()) found = models.emplace(file, flexmodel::load_torchscript(model_path(file))).first;
  return found->second;
}

// The executor profiles and optimises over the first runs; time after that.
template <class Run>
void warm_up(Run&& run) {
  for (int i = 0; i < 5; ++i) run();
}

// A 12-layer scripted GPT: module.forward against 24 retrieval hooks (every
// attention and MLP output); ms per forward. Args: batch, sequence, hooks (24,
// or 0 for a control run whose difference is the measurement's noise). Each
// repetition loads the model afresh: two executors of the same graph differ by
// up to ±0.3 % on this machine, by where their buffers land, and a model
// loaded once would carry one such draw through every repetition.
void script_gpt_forward(benchmark::State& state, const std::string& file) {
  torch::NoGradGuard no_grad;
  auto module = flexmodel::load_torchscript(model_path(file));
  flexmodel::ScriptFlexModel fm(module);
  if (state.range(2) > 0) hook_attention_and_mlp(fm);
  state.counters["hooks"] = static_cast<double>(fm.hooks().size());
  torch::manual_seed(1);
  const auto vocab = module.attr("embed_tokens").toModule().attr("weight").toTensor().size(0);
  std::vector<torch::IValue> tokens{torch::randint(0, vocab, {state.range(0), state.range(1)})};
  auto plain = [&] { benchmark::DoNotOptimize(module.forward(tokens)); };
  auto hooked = [&] { benchmark::DoNotOptimize(fm.forward(tokens)); };
  warm_up([&] { plain(), hooked(); });
  measure_pairs(state, plain, hooked, [&] { fm.outputs().clear(); })
      .report(state, 1e3, "ms");
}

// GPT-2 small's shape.
void script_gpt2_small_forward(benchmark::State& state) { script_gpt_forward(state, "gpt2_small_scripted.pt"); }
BENCHMARK(script_gpt2_small_forward)
    ->ArgNames({"batch", "seq", "hooks"})
    ->Args({1, 1, 0})
    ->Args({1, 1, 24})
    ->Args({4, 128, 24})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5.0);

// The same structure at width 64: the compute nearly vanishes, so the
// difference is the hooking machinery itself, without the big model's noise.
void script_gpt_narrow_forward(benchmark::State& state) { script_gpt_forward(state, "gpt_narrow_scripted.pt"); }
BENCHMARK(script_gpt_narrow_forward)
    ->ArgNames({"batch", "seq", "hooks"})
    ->Args({1, 1, 24})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

// 1000 × Linear(8, 8) scripted as an nn.Sequential, batch 1: module.forward
// against a retrieval hook on every layer; µs per forward and per hooked call.
void script_linear_chain(benchmark::State& state) {
  constexpr int kLayers = 1000;
  torch::NoGradGuard no_grad;
  auto& module = loaded("chain_scripted.pt");
  flexmodel::ScriptFlexModel fm(module);
  fm.create_hook_group("every", "*");
  std::vector<torch::IValue> x{torch::randn({1, 8})};
  auto plain = [&] { benchmark::DoNotOptimize(module.forward(x)); };
  auto hooked = [&] { benchmark::DoNotOptimize(fm.forward(x)); };
  warm_up([&] { plain(), hooked(); });
  measure_pairs(state, plain, hooked, [&] { fm.outputs().clear(); })
      .report(state, 1e6, "us");
  state.counters["added_us_per_hooked_call"] = state.counters["added_us"] / kLayers;
}
BENCHMARK(script_linear_chain)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// Forwards that alternate between two hook groups against forwards that repeat
// one group: the instrumented graph is built once, so both cost the same.
void script_alternating_groups(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto& module = loaded("chain_scripted.pt");
  flexmodel::ScriptFlexModel fm(module);
  auto every = fm.create_hook_group("every", "*");
  for (std::size_t i = 0; i < every.size(); ++i) fm.update_hook_groups(every[i], i % 2 == 0 ? "even" : "odd");
  std::vector<torch::IValue> x{torch::randn({1, 8})};
  bool odd = false;
  auto steady = [&] { benchmark::DoNotOptimize(fm.forward(flexmodel::Groups{"even"}, x)); };
  auto alternating = [&] {
    benchmark::DoNotOptimize(fm.forward(flexmodel::Groups{odd ? "odd" : "even"}, x));
    odd = !odd;
  };
  warm_up([&] { steady(), alternating(); });
  measure_pairs(state, steady, alternating, [&] { fm.outputs().clear(); })
      .report(state, 1e6, "us");
}
BENCHMARK(script_alternating_groups)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// The three experiment benchmarks share one input: GPT-2 small's shape, 1 × 128 tokens.
std::vector<torch::IValue> gpt2_small_tokens() {
  torch::manual_seed(1);
  return {torch::randint(0, 50257, {1, 128})};
}

// Capturing layer 2 of 12: forward() against run_to_last_hook(), which stops
// after the capture; ms per forward.
void script_stop_at_last_hook(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  flexmodel::ScriptFlexModel fm(loaded("gpt2_small_scripted.pt"));
  fm.create_hook_group("dump", "layers.2");
  const auto tokens = gpt2_small_tokens();
  const flexmodel::Groups dump{"dump"};
  auto whole = [&] { benchmark::DoNotOptimize(fm.forward(dump, tokens)); };
  auto stopped = [&] {
    if (!fm.run_to_last_hook(dump, tokens)) throw std::runtime_error("run_to_last_hook did not stop");
  };
  warm_up([&] { whole(), stopped(); });
  measure_pairs(state, whole, stopped, [&] { fm.outputs().clear(); }).report(state, 1e3, "ms");
}
BENCHMARK(script_stop_at_last_hook)->Unit(benchmark::kMillisecond)->MinTime(5.0);

// Every attention and MLP output whole against their last position only; ms
// per forward, and the bytes each keeps per forward.
void script_slice_capture(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  flexmodel::ScriptFlexModel fm(loaded("gpt2_small_scripted.pt"));
  fm.create_hook_group("whole", "layers.*.attn");
  fm.create_hook_group("whole", "layers.*.mlp");
  const auto last = flexmodel::HookFunction("").slice(flexmodel::Slice().positions(flexmodel::Index::last()));
  fm.create_hook_group("last", "layers.*.attn", last);
  fm.create_hook_group("last", "layers.*.mlp", last);
  const auto tokens = gpt2_small_tokens();
  auto bytes_of = [&](const flexmodel::Groups& groups) {
    fm.outputs().clear();
    fm.forward(groups, tokens);
    double bytes = 0;
    for (const auto& key : fm.outputs().keys()) bytes += static_cast<double>(fm.outputs().at(key.first, key.second)[0].nbytes());
    fm.outputs().clear();
    return bytes;
  };
  state.counters["baseline_bytes"] = bytes_of(flexmodel::Groups{"whole"});
  state.counters["variant_bytes"] = bytes_of(flexmodel::Groups{"last"});
  auto whole = [&] { benchmark::DoNotOptimize(fm.forward(flexmodel::Groups{"whole"}, tokens)); };
  auto sliced = [&] { benchmark::DoNotOptimize(fm.forward(flexmodel::Groups{"last"}, tokens)); };
  warm_up([&] { whole(), sliced(); });
  measure_pairs(state, whole, sliced, [&] { fm.outputs().clear(); }).report(state, 1e3, "ms");
}
BENCHMARK(script_slice_capture)->Unit(benchmark::kMillisecond)->MinTime(5.0);

// The 12 MLP outputs captured into the output map against run_with_cache; ms per forward.
void script_run_with_cache(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  flexmodel::ScriptFlexModel fm(loaded("gpt2_small_scripted.pt"));
  hook_attention_and_mlp(fm);
  const auto tokens = gpt2_small_tokens();
  auto output_map = [&] { benchmark::DoNotOptimize(fm.forward(flexmodel::Groups{"mlp"}, tokens)); };
  auto cached = [&] { benchmark::DoNotOptimize(flexmodel::run_with_cache(fm, "layers.*.mlp", tokens)); };
  warm_up([&] { output_map(), cached(); });
  measure_pairs(state, output_map, cached, [&] { fm.outputs().clear(); }).report(state, 1e3, "ms");
}
BENCHMARK(script_run_with_cache)->Unit(benchmark::kMillisecond)->MinTime(5.0);

// Value hook points against module hook points, 24 each: the pattern and
// each head's mix of values inside every attention (layers.*.attn::softmax.0,
// ::matmul.1) against every attention's and MLP's output; ms per forward.
// Args: batch, sequence (1 × 1: a decoding step's one new position).
void script_value_hooks(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  flexmodel::ScriptFlexModel modules(loaded("gpt2_small_scripted.pt"));
  hook_attention_and_mlp(modules);
  flexmodel::ScriptFlexModel values(loaded("gpt2_small_scripted.pt"));
  values.create_hook_group("values", "layers.*.attn::softmax.0");
  values.create_hook_group("values", "layers.*.attn::matmul.1");
  state.counters["hooks"] = static_cast<double>(values.hooks().size());
  torch::manual_seed(1);
  const std::vector<torch::IValue> tokens{torch::randint(0, 50257, {state.range(0), state.range(1)})};
  auto by_module = [&] { benchmark::DoNotOptimize(modules.forward(tokens)); };
  auto by_value = [&] { benchmark::DoNotOptimize(values.forward(tokens)); };
  warm_up([&] { by_module(), by_value(); });
  measure_pairs(state, by_module, by_value, [&] {
    modules.outputs().clear();
    values.outputs().clear();
  }).report(state, 1e3, "ms");
}
BENCHMARK(script_value_hooks)
    ->ArgNames({"batch", "seq"})
    ->Args({1, 1})
    ->Args({4, 128})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5.0);

}  // namespace

BENCHMARK_MAIN();
