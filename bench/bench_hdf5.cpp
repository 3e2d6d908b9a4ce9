// HDF5Writer's speed on the workload: 20 steps of 24 hooks, each a
// [4,128,768] float32 snapshot (1.5 MiB, one chunk per step), fsync included;
// and what write() costs the caller while the disk keeps up.
// bench/hdf5_vs_h5py.py runs BM_Write beside h5py and dd on the same bytes.
//
//   FLEXMODEL_BENCH_DATA  raw float32 file of the 480 arrays (else seeded randn)
//   FLEXMODEL_BENCH_DIR   where the files go (else the temporary folder)
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "flexmodel/io/hdf5_writer.h"

namespace {

constexpr int kSteps = 20;
constexpr int kHooks = 24;

const std::vector<torch::Tensor>& arrays() {
  static const std::vector<torch::Tensor> views = [] {
    torch::Tensor all = torch::empty({kSteps * kHooks, 4, 128, 768});
    if (const char* path = std::getenv("FLEXMODEL_BENCH_DATA")) {
      std::ifstream in(path, std::ios::binary);
      in.read(static_cast<char*>(all.data_ptr()), static_cast<std::streamsize>(all.nbytes()));
      if (!in) throw std::runtime_error("bench_hdf5: could not read " + std::to_string(all.nbytes()) + " bytes from " + path);
    } else {
      torch::manual_seed(0);
      all.normal_();
    }
    std::vector<torch::Tensor> split;
    for (std::int64_t i = 0; i < all.size(0); ++i) split.push_back(all[i]);
    return split;
  }();
  return views;
}

std::string bench_file(const char* name) {
  const char* dir = std::getenv("FLEXMODEL_BENCH_DIR");
  return ((dir != nullptr ? std::filesystem::path(dir) : std::filesystem::temp_directory_path()) / name).string();
}

// "layers.0.attn", "layers.0.mlp", "layers.1.attn", ...
std::string hook_name(int hook) { return "layers." + std::to_string(hook / 2) + (hook % 2 == 0 ? ".attn" : ".mlp"); }

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void BM_Write(benchmark::State& state, const char* compression) {
  const auto& data = arrays();
  const std::string path = bench_file("flexmodel_bench.h5");
  for (auto _ : state) {
    std::filesystem::remove(path);
    const auto start = std::chrono::steady_clock::now();
    flexmodel::io::HDF5Writer writer(path, flexmodel::io::HDF5WriterOptions().compression(compression));
    for (int step = 0; step < kSteps; ++step) {
      for (int hook = 0; hook < kHooks; ++hook) {
        writer.write(hook_name(hook), flexmodel::HookType::forward, step, data[step * kHooks + hook]);
      }
      writer.end_step(step);
    }
    writer.close();  // fsyncs
    state.SetIterationTime(seconds_since(start));
  }
  std::filesystem::remove(path);
  const double bytes = static_cast<double>(data.size() * data[0].nbytes());
  state.counters["bytes"] = bytes;
  state.counters["GB_per_s"] = benchmark::Counter(bytes * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_Write, none, "none")->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK_CAPTURE(BM_Write, gzip4, "gzip:4")->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(1);

// One forward's dumping as the caller sees it: 24 write() calls and end_step.
// The writer is flushed between steps (untimed), so each step finds the disk caught up.
void BM_Enqueue(benchmark::State& state) {
  const auto& data = arrays();
  const std::string path = bench_file("flexmodel_enqueue.h5");
  std::filesystem::remove(path);
  {
    flexmodel::io::HDF5Writer writer(path);
    std::vector<std::string> names;
    for (int hook = 0; hook < kHooks; ++hook) names.push_back(hook_name(hook));
    std::int64_t step = 0;
    for (auto _ : state) {
      const auto start = std::chrono::steady_clock::now();
      for (int hook = 0; hook < kHooks; ++hook) {
        writer.write(names[hook], flexmodel::HookType::forward, step, data[(step % kSteps) * kHooks + hook]);
      }
      writer.end_step(step);
      state.SetIterationTime(seconds_since(start));
      writer.flush();
      ++step;
    }
    writer.close();
  }
  std::filesystem::remove(path);
  state.counters["us_per_write"] =
      benchmark::Counter(kHooks / 1e6, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_Enqueue)->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(40);

}  // namespace

BENCHMARK_MAIN();
