// Hugging Face checkpoints (bench/checkpoints.py writes them and runs this):
//   bench_checkpoint --load DIR   loads DIR once and prints one JSON line
//                                 (seconds, bytes read); the driver runs it in a
//                                 fresh process per load, for its peak RSS.
//   bench_checkpoint [Google Benchmark flags]
//                                 BM_ForwardNativeVsTorchScript: the GPT-2 small
//                                 checkpoint loaded natively (variant) against the
//                                 same weights' TorchScript export (baseline).
// FLEXMODEL_BENCH_CHECKPOINTS names the folder the driver wrote.
#include <sys/resource.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include <torch/torch.h>

#include "bench_common.h"
#include <flexmodel/hub.h>
#include <flexmodel/torchscript.h>

namespace {

std::string checkpoints() {
  const char* folder = std::getenv("FLEXMODEL_BENCH_CHECKPOINTS");
  if (folder == nullptr) {
    std::cerr << "bench_checkpoint: set FLEXMODEL_BENCH_CHECKPOINTS (bench/checkpoints.py does)\n";
    std::exit(2);
  }
  return folder;
}

// This process's peak resident set so far, in MB.
double peak_rss_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

int load_once(const std::string& directory) {
  flexmodel::hub::LoadReport report;
  const double before = peak_rss_mb();
  const double seconds = flexmodel::bench::seconds_of([&] { flexmodel::hub::load_model(directory, {}, &report); });
  std::cout << "{\"seconds\": " << seconds << ", \"rss_before_mb\": " << before << ", \"peak_rss_mb\": "
            << peak_rss_mb() << ", \"bytes_read\": " << report.bytes_read << "}\n";
  return 0;
}

// Batch 1 and 8 of 64 tokens: the size a dump or a patching sweep runs.
void BM_ForwardNativeVsTorchScript(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const auto native = flexmodel::hub::load_model(checkpoints() + "/gpt2_small");
  auto script = flexmodel::load_torchscript(checkpoints() + "/gpt2_small_traced.pt");
  const torch::Tensor tokens = torch::randint(0, 50257, {state.range(0), 64}, torch::kLong);
  // The two compute the same logits, or the timing compares different work.
  const auto expected = script.forward({tokens}).toTensor();
  if (!torch::allclose(native->forward(tokens), expected, 1e-4, 1e-4)) {
    state.SkipWithError("the native model's logits differ from the export's");
    return;
  }
  auto paired = flexmodel::bench::measure_pairs(
      state, [&] { benchmark::DoNotOptimize(script.forward({tokens})); },
      [&] { benchmark::DoNotOptimize(native->forward(tokens)); }, [] {});
  paired.report(state, 1e3, "ms");
}
BENCHMARK(BM_ForwardNativeVsTorchScript)->Arg(1)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--load") == 0) return load_once(argv[2]);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
