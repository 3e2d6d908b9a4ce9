// flex-dump --model M.pt --input tokens.npy --hooks "layers.*.mlp,embed_tokens"
//           [--pre-hooks PATTERNS] --out acts.h5 [--batch-size N]
//           [--compression gzip:4] [--overwrite | --append] [--dp N]
// Runs a TorchScript model over the rows of an .npy input, batch by batch, and
// streams the chosen hook points' activations to an HDF5 file. Under
// `mpirun -np N ... --dp N` each rank runs its share of every batch and rank 0
// writes the gathered activations.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <tuple>
#include <sstream>

#include <CLI/CLI.hpp>

#include <flexmodel/dist.h>
#include <flexmodel/flexmodel.h>
#include <flexmodel/io/hdf5_writer.h>
#include <flexmodel/npy.h>
#include <flexmodel/torchscript.h>

namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::string> split_patterns(const std::string& text) {
  std::vector<std::string> patterns;
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, ',');) {
    if (!item.empty()) patterns.push_back(item);
  }
  return patterns;
}

std::string command_line(int argc, char** argv) {
  std::string line;
  for (int i = 0; i < argc; ++i) line += (i ? " " : "") + std::string(argv[i]);
  return line;
}

// A bar with rate and ETA on a terminal; a plain line every few seconds otherwise.
class Progress {
 public:
  explicit Progress(std::int64_t total) : total_(total), terminal_(isatty(STDERR_FILENO) != 0) {}

  void update(std::int64_t done) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
    if (terminal_) {
      const int width = 30, filled = static_cast<int>(width * done / std::max<std::int64_t>(total_, 1));
      std::fprintf(stderr, "\r[%s%s] %lld/%lld rows  %.1f rows/s  ETA %.0f s ", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), static_cast<long long>(done),
                   static_cast<long long>(total_), rate, eta);
      if (done == total_) std::fprintf(stderr, "\n");
    } else if (done == total_ || elapsed - last_line_ >= 5.0) {
      last_line_ = elapsed;
      std::fprintf(stderr, "flex-dump: %lld/%lld rows, %.1f rows/s, ETA %.0f s\n", static_cast<long long>(done),
                   static_cast<long long>(total_), rate, eta);
    }
  }

 private:
  std::int64_t total_;
  bool terminal_;
  Clock::time_point start_ = Clock::now();
  double last_line_ = 0.0;
};

// Counts what the file receives, for the closing summary.
class Summary final : public flexmodel::Sink {
 public:
  void write(const std::string& module_name, flexmodel::HookType type, std::int64_t,
             const torch::Tensor& snapshot) override {
    auto& [rows, trailing, dtype] = datasets_[flexmodel::io::hdf5_dataset_path(module_name, type)];
    rows += snapshot.dim() == 0 ? 1 : snapshot.size(0);
    trailing = snapshot.dim() == 0 ? std::vector<std::int64_t>{} : snapshot.sizes().slice(1).vec();
    dtype = flexmodel::dtype_name(snapshot.scalar_type());
  }

  void print() const {
    for (const auto& [path, facts] : datasets_) {
      const auto& [rows, trailing, dtype] = facts;
      std::printf("  %-40s %s [%lld", path.c_str(), dtype.c_str(), static_cast<long long>(rows));
      for (auto size : trailing) std::printf(", %lld", static_cast<long long>(size));
      std::printf("]\n");
    }
  }

 private:
  std::map<std::string, std::tuple<std::int64_t, std::vector<std::int64_t>, std::string>> datasets_;
};

int run(int argc, char** argv) {
  CLI::App app{"Runs a TorchScript model over an .npy input and streams hooked activations to HDF5.", "flex-dump"};
  std::string model_path, input_path, hooks, pre_hooks, out_path, compression = "none";
  std::int64_t batch_size = 8, dp = 1;
  bool overwrite = false, append = false;
  app.add_option("--model", model_path, "TorchScript file")->required();
  app.add_option("--input", input_path, ".npy input; its first dimension holds the rows")->required();
  app.add_option("--hooks", hooks, "comma-separated module patterns for forward hooks (outputs)");
  app.add_option("--pre-hooks", pre_hooks, "comma-separated module patterns for forward-pre hooks (inputs)");
  app.add_option("--out", out_path, "HDF5 file to write")->required();
  app.add_option("--batch-size", batch_size, "global rows per forward (default 8; the last batch may be smaller)");
  app.add_option("--compression", compression, "none, gzip[:N], or a filter plugin's lz4 / zstd[:N] / blosc[:N]");
  auto* overwrite_flag = app.add_flag("--overwrite", overwrite, "replace an existing file");
  app.add_flag("--append", append, "continue an existing file with the same layout")->excludes(overwrite_flag);
  app.add_option("--dp", dp, "data-parallel ranks (mpirun -np N ... --dp N)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  FLEXMODEL_CHECK(!hooks.empty() || !pre_hooks.empty(), flexmodel::ConfigError,
                  "nothing to dump: give --hooks and/or --pre-hooks");
  FLEXMODEL_CHECK(batch_size > 0 && batch_size % dp == 0, flexmodel::ConfigError, "--batch-size ", batch_size,
                  " must be a positive multiple of --dp ", dp);

  torch::NoGradGuard no_grad;
  const bool root = flexmodel::dist::world_rank() == 0;
  flexmodel::ScriptFlexModel fm(model_path, flexmodel::FlexModelOptions().dp(dp).outputs(false));
  for (const auto& pattern : split_patterns(hooks)) fm.create_hook_group("dump", pattern);
  for (const auto& pattern : split_patterns(pre_hooks)) {
    fm.create_hook_group("dump", pattern, {}, {}, 0, flexmodel::HookType::forward_pre);
  }
  const torch::Tensor input = flexmodel::read_npy(input_path);
  FLEXMODEL_CHECK(input.dim() >= 1 && input.size(0) > 0, flexmodel::ShapeError, "'", input_path,
                  "' holds no rows (shape ", input.sizes(), ")");
  const std::int64_t rows = input.size(0);
  FLEXMODEL_CHECK(rows % batch_size % dp == 0, flexmodel::ConfigError, "the last batch has ", rows % batch_size,
                  " rows, not a multiple of --dp ", dp, "; choose --batch-size so that it is");
  // One small forward first: a model that rejects the input fails before any file exists.
  fm.forward(flexmodel::Groups{"dump"}, {input.narrow(0, 0, dp)});

  std::shared_ptr<flexmodel::io::HDF5Writer> writer;
  if (root) {
    writer = std::make_shared<flexmodel::io::HDF5Writer>(
        out_path, flexmodel::io::HDF5WriterOptions()
                      .model(model_path)
                      .dp(dp)
                      .command_line(command_line(argc, argv))
                      .compression(compression)
                      .overwrite(overwrite)
                      .append(append));
    fm.add_sink(writer);
  }
  auto summary = std::make_shared<Summary>();
  fm.add_sink(summary);
  Progress progress(rows);
  const auto start = Clock::now();
  for (std::int64_t first = 0; first < rows; first += batch_size) {
    fm.forward(flexmodel::Groups{"dump"}, {input.narrow(0, first, std::min(batch_size, rows - first))});
    if (root) progress.update(std::min(first + batch_size, rows));
  }
  fm.close_sinks();
  if (root) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const auto bytes = std::filesystem::file_size(out_path);
    std::printf("flex-dump: wrote %s: %lld rows in %lld forwards, %.1f MB in %.2f s (%.1f MB/s)\n", out_path.c_str(),
                static_cast<long long>(rows), static_cast<long long>((rows + batch_size - 1) / batch_size),
                static_cast<double>(bytes) / 1e6, seconds, static_cast<double>(bytes) / 1e6 / seconds);
    summary->print();
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::string message = error.what();
    std::cerr << "flex-dump: " << message.substr(0, message.find('\n')) << "\n";
    return 1;
  }
}
