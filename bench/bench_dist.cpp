// Distributed costs, run under mpirun (bench/run_dist.sh runs every case):
//   bench_dist gather BYTES_PER_RANK   the MPI communicator's gather and all-gather
//                                      against raw MPI_Gather / MPI_Allgather of the
//                                      same bytes, with a correctness check
//   bench_dist forward TP PP DP        a hooked ParallelGPT forward under the mesh
// Rank 0 prints medians (and, for gather, the nccl-tests bus bandwidth
// S/t · (n−1)/n) as "key=value" lines.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <mpi.h>

#include "flexmodel/dist.h"
#include "flexmodel/flexmodel.h"
#include "flexmodel/parallel.h"

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

template <class Work>
double timed(Work&& work) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = Clock::now();
  work();
  MPI_Barrier(MPI_COMM_WORLD);
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int gather(std::int64_t bytes) {
  auto mesh = flexmodel::dist::Mesh::create({flexmodel::dist::world_size(), 1, 1});
  auto& world = mesh->world();
  const int n = world.size();
  const std::int64_t floats = bytes / 4;
  torch::Tensor mine = torch::full({floats}, static_cast<float>(world.rank()));
  // One kept output buffer per raw operation, as ours keeps one per result.
  torch::Tensor raw_gathered = torch::empty({floats * n}), raw_all_gathered = torch::empty({floats * n});
  constexpr int kWarmups = 3, kRuns = 41;
  std::vector<double> ours, raw, ours_all, raw_all;
  bool correct = true;
  for (int run = 0; run < kWarmups + kRuns; ++run) {
    torch::Tensor gathered;
    const double t_ours = timed([&] { gathered = world.gather(mine, 0, 0); });
    const double t_raw = timed([&] {
      MPI_Gather(mine.data_ptr(), static_cast<int>(bytes), MPI_BYTE, raw_gathered.data_ptr(),
                 static_cast<int>(bytes), MPI_BYTE, 0, MPI_COMM_WORLD);
    });
    torch::Tensor all;
    const double t_ours_all = timed([&] { all = world.all_gather(mine, 0); });
    const double t_raw_all = timed([&] {
      MPI_Allgather(mine.data_ptr(), static_cast<int>(bytes), MPI_BYTE, raw_all_gathered.data_ptr(),
                    static_cast<int>(bytes), MPI_BYTE, MPI_COMM_WORLD);
    });
    if (world.rank() == 0) correct = correct && torch::equal(gathered, raw_gathered);
    correct = correct && torch::equal(all, raw_all_gathered);
    if (run < kWarmups) continue;
    ours.push_back(t_ours), raw.push_back(t_raw), ours_all.push_back(t_ours_all), raw_all.push_back(t_raw_all);
  }
  if (world.rank() == 0) {
    const double total = static_cast<double>(bytes) * n, factor = (n - 1.0) / n;
    auto report = [&](const char* op, double t_ours, double t_raw) {
      std::printf("%s ranks=%d bytes_per_rank=%lld ours_GBps=%.3f raw_GBps=%.3f ours_busbw_GBps=%.3f ratio=%.3f\n",
                  op, n, static_cast<long long>(bytes), total / t_ours / 1e9, total / t_raw / 1e9,
                  total / t_ours / 1e9 * factor, t_raw / t_ours);
    };
    report("gather", median(ours), median(raw));
    report("all_gather", median(ours_all), median(raw_all));
    std::printf("correct=%s\n", correct ? "yes" : "NO");
  }
  return correct ? 0 : 1;
}

int forward(const flexmodel::dist::MeshShape& shape) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  flexmodel::models::GPT full(flexmodel::models::GPTOptions().vocab_size(512).max_positions(64).d_model(128).n_heads(
      4).n_layers(4).d_mlp(512));
  flexmodel::parallel::ParallelGPT sharded(*full, flexmodel::dist::Mesh::create(shape));
  flexmodel::FlexModel fm(sharded, flexmodel::FlexModelOptions().tp(shape.tp).pp(shape.pp).dp(shape.dp));
  fm.create_hook_group("mlp", "layers.*.mlp");
  fm.create_hook_group("attn", "layers.*.attn");
  auto tokens = torch::randint(0, 512, {8, 64});
  std::vector<double> seconds;
  for (int run = 0; run < 23; ++run) {
    const double t = timed([&] { fm.forward(tokens); });
    fm.outputs().clear();
    if (run >= 3) seconds.push_back(t);
  }
  if (flexmodel::dist::world_rank() == 0) {
    std::printf("forward tp=%lld pp=%lld dp=%lld hooks=8 median_ms=%.3f\n", static_cast<long long>(shape.tp),
                static_cast<long long>(shape.pp), static_cast<long long>(shape.dp), median(seconds) * 1e3);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "gather" && argc == 3) return gather(std::atoll(argv[2]));
  if (mode == "forward" && argc == 5) return forward({std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4])});
  std::fprintf(stderr, "usage: bench_dist gather BYTES | forward TP PP DP\n");
  return 2;
}
