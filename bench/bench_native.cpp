// Costs of hooking native modules, as paired timings (bench_common.h):
// baseline = the unwrapped model, variant = the same with hooks.
// bench/run.sh runs it with repetitions and prints the medians.
#include <filesystem>
#include <map>

#include "bench_common.h"

#include <flexmodel/flexmodel.h>
#include <flexmodel/io/hdf5_writer.h>
#include <flexmodel/models/gpt.h>

namespace {

using flexmodel::bench::hook_attention_and_mlp;
using flexmodel::bench::measure_pairs;

// A forward that does almost nothing, so the holder's own cost shows.
struct PassImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(Pass);
struct HookablePassImpl : PassImpl {};
FLEX_MODULE(HookablePass);

// An unhooked call through the hookable holder against the plain holder; ns per call.
void holder_call(benchmark::State& state) {
  constexpr int kCalls = 10000;
  Pass plain;
  HookablePass hookable;
  auto x = torch::ones({1});
  measure_pairs(
      state, [&] { for (int i = 0; i < kCalls; ++i) benchmark::DoNotOptimize(plain(x)); },
      [&] { for (int i = 0; i < kCalls; ++i) benchmark::DoNotOptimize(hookable(x)); }, [] {})
      .report(state, 1e9 / kCalls, "ns");
}
BENCHMARK(holder_call)->Unit(benchmark::kMicrosecond);

// 1000 × Linear(8, 8) at batch 1: unwrapped against a retrieval hook on every
// layer (snapshot into the output map included); µs per forward.
void linear_chain(benchmark::State& state) {
  constexpr int kLayers = 1000;
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  flexmodel::nn::Sequential chain;
  for (int i = 0; i < kLayers; ++i) chain->push_back(torch::nn::Linear(8, 8));
  auto x = torch::randn({1, 8});
  flexmodel::FlexModel fm(chain);
  fm.create_hook_group("every", "*");
  measure_pairs(
      state, [&] { benchmark::DoNotOptimize(chain->forward(x)); }, [&] { benchmark::DoNotOptimize(fm.forward(x)); },
      [&] { fm.outputs().clear(); })
      .report(state, 1e6, "us");
  state.counters["added_us_per_hooked_call"] = state.counters["added_us"] / kLayers;
}
BENCHMARK(linear_chain)->Unit(benchmark::kMillisecond)->MinTime(1.0);

flexmodel::models::GPT& model_of(const flexmodel::models::GPTOptions& options) {
  static std::map<std::int64_t, flexmodel::models::GPT> models;
  auto& model = models.try_emplace(options.d_model(), nullptr).first->second;
  if (model.is_empty()) {
    torch::manual_seed(0);
    model = flexmodel::models::GPT(options);
    model->eval();
  }
  return model;
}

// A forward of a 12-layer GPT, unwrapped against 24 retrieval hooks (every
// attention and MLP output); ms per forward. Args: batch, sequence, hooks
// (24, or 0 for a control run whose difference is the measurement's noise).
void gpt_forward(benchmark::State& state, const flexmodel::models::GPTOptions& options) {
  torch::NoGradGuard no_grad;
  auto& model = model_of(options);
  flexmodel::FlexModel fm(model);
  if (state.range(2) > 0) hook_attention_and_mlp(fm);
  state.counters["hooks"] = static_cast<double>(fm.hooks().size());
  torch::manual_seed(1);
  auto tokens = torch::randint(0, options.vocab_size(), {state.range(0), state.range(1)});
  measure_pairs(state, [&] { benchmark::DoNotOptimize(model->forward(tokens)); },
                 [&] { benchmark::DoNotOptimize(fm.forward(tokens)); }, [&] { fm.outputs().clear(); })
      .report(state, 1e3, "ms");
}

// GPT-2 small's shape.
void gpt2_small_forward(benchmark::State& state) { gpt_forward(state, flexmodel::models::GPTOptions::gpt2_small()); }
BENCHMARK(gpt2_small_forward)
    ->ArgNames({"batch", "seq", "hooks"})
    ->Args({1, 1, 0})
    ->Args({1, 1, 24})
    ->Args({4, 128, 24})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(5.0);

// GPT-2 small at batch 4 × 128 with 24 retrieval hooks: captures into the
// output map against captures streamed to an HDF5 file (written in the
// background; outputs(false)); ms per forward, so added_pct is what dumping adds.
void gpt2_small_dump_forward(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto& model = model_of(flexmodel::models::GPTOptions::gpt2_small());
  flexmodel::FlexModel in_memory(model);
  flexmodel::FlexModel dumping(model, flexmodel::FlexModelOptions().outputs(false));
  const auto path = std::filesystem::temp_directory_path() / "flexmodel_bench_dump.h5";
  auto writer = std::make_shared<flexmodel::io::HDF5Writer>(path.string(),
                                                             flexmodel::io::HDF5WriterOptions().overwrite(true));
  dumping.add_sink(writer);
  hook_attention_and_mlp(in_memory);
  hook_attention_and_mlp(dumping);
  torch::manual_seed(1);
  auto tokens = torch::randint(0, 50257, {4, 128});
  measure_pairs(
      state, [&] { benchmark::DoNotOptimize(in_memory.forward(tokens)); },
      [&] { benchmark::DoNotOptimize(dumping.forward(tokens)); }, [&] { in_memory.outputs().clear(); })
      .report(state, 1e3, "ms");
  dumping.close_sinks();
  state.counters["file_MB"] = static_cast<double>(std::filesystem::file_size(path)) / 1e6;
  std::filesystem::remove(path);
}
BENCHMARK(gpt2_small_dump_forward)->Unit(benchmark::kMillisecond)->MinTime(10.0);

// The same 12-layer structure at width 64: the compute nearly vanishes, so the
// difference is the hooking machinery itself, measured without the big model's noise.
void gpt_narrow_forward(benchmark::State& state) {
  gpt_forward(state, flexmodel::models::GPTOptions().n_layers(12));
}
BENCHMARK(gpt_narrow_forward)->ArgNames({"batch", "seq", "hooks"})->Args({1, 1, 24})->Unit(benchmark::kMillisecond)->MinTime(1.0);

}  // namespace

BENCHMARK_MAIN();
