// flex-dump --model M.pt|DIR --input tokens.npy --hooks "layers.*.mlp,embed_tokens"
//           [--pre-hooks PATTERNS] --out acts.h5 [--batch-size N]
//           [--compression gzip:4] [--overwrite | --append] [--dp N] [--tp N --pp N]
//           [--dtype auto|float32|bfloat16|float16]
//           [--positions last|A:B|i,j] [--heads A:B|i,j [--num-heads N]] [--unpack-idx N] [--full-forward]
// Runs a model over the rows of an .npy input, batch by batch, and streams the
// chosen hook points' activations to an HDF5 file. The model is a TorchScript
// file or a Hugging Face checkpoint directory (config.json and safetensors,
// flexmodel::hub). Under `mpirun -np N ... --dp N` each rank runs its share of
// every batch and rank 0 writes the gathered activations. With --tp/--pp a
// checkpoint is loaded sharded, each rank reading its share of the files, and
// a TorchScript model of the GPT layout is rebuilt from its weights as a
// ParallelGPT; their layers declare their sharding, so every activation is
// written whole.
// --positions and --heads keep a slice of every activation (flexmodel::Slice):
// a last-token dump of a 128-token batch is 128 times smaller. A forward
// stops once its last hook has fired, unless --full-forward.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>
#include <type_traits>

#include <CLI/CLI.hpp>

#include <flexmodel/detail/hash.h>
#include <flexmodel/dist.h>
#include <flexmodel/flexmodel.h>
#include <flexmodel/hub.h>
#include <flexmodel/io/hdf5_writer.h>
#include <flexmodel/logging.h>
#include <flexmodel/models/gpt.h>
#include <flexmodel/npy.h>
#include <flexmodel/parallel.h>
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
    bytes_ += snapshot.nbytes();
  }

  // Bytes of activations written, before any compression.
  std::int64_t bytes() const { return static_cast<std::int64_t>(bytes_); }

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
  std::size_t bytes_ = 0;
};

struct Settings {
  std::string model_path, input_path, hooks, pre_hooks, out_path, compression = "none", command_line;
  std::string positions = "all", heads = "all", dtype = "auto";
  std::int64_t batch_size = 8, tp = 1, pp = 1, dp = 1;
  std::size_t unpack_idx = 0;
  std::optional<std::int64_t> num_heads;
  flexmodel::Slice slice;  // from --positions and --heads
  std::int64_t generate = 0;
  bool overwrite = false, append = false, dry_run = false, crash_safe = true, full_forward = false;
};

// What the patterns ask for: each hook point once per hook type, however many
// patterns select it, with the patterns that did.
struct Request {
  struct Point {
    std::string name;
    flexmodel::HookType type;
    std::vector<std::string> patterns;
  };
  std::vector<Point> points;
  std::vector<std::pair<std::string, std::string>> skipped;  // (module, why), for --dry-run
};

Request select(const flexmodel::FlexModelBase& fm, const Settings& settings) {
  Request request;
  std::map<std::pair<std::string, flexmodel::HookType>, std::size_t> index;
  for (auto [patterns, type] : {std::pair{&settings.hooks, flexmodel::HookType::forward},
                                std::pair{&settings.pre_hooks, flexmodel::HookType::forward_pre}}) {
    for (const auto& pattern : split_patterns(*patterns)) {
      const auto selection = fm.select_hook_points(pattern, type);
      FLEXMODEL_CHECK(!selection.names.empty(), flexmodel::ConfigError, "--", type == flexmodel::HookType::forward ? "hooks" : "pre-hooks",
                      " pattern '", pattern, "' matches no module of '", settings.model_path, "' whose hooks can fire",
                      selection.skipped.empty() ? "" : " (see --dry-run for the modules it skipped)",
                      "; flex-inspect lists the modules");
      for (const auto& name : selection.names) {
        auto [slot, added] = index.emplace(std::pair{name, type}, request.points.size());
        if (added) request.points.push_back({name, type, {}});
        request.points[slot->second].patterns.push_back(pattern);
      }
      for (const auto& skipped : selection.skipped) request.skipped.push_back(skipped);
    }
  }
  return request;
}

// Every hook point's hook: --positions, --heads and --unpack-idx.
flexmodel::HookFunction dump_hook(const Settings& settings, std::string name = "") {
  return flexmodel::HookFunction(std::move(name)).slice(settings.slice).unpack_idx(settings.unpack_idx);
}

void register_request(flexmodel::FlexModelBase& fm, const Request& request, const Settings& settings) {
  for (const auto& point : request.points) {
    fm.update_hook_groups(fm.register_hook_function(dump_hook(settings, point.name), point.type), "dump");
  }
}

void print_dry_run(const Request& request, const flexmodel::Slice& slice) {
  for (const auto& point : request.points) {
    std::printf("hook   %-40s %-12s (%s)%s\n", point.name.empty() ? "(root)" : point.name.c_str(),
                std::string(flexmodel::to_string(point.type)).c_str(), point.patterns.front().c_str(),
                slice.empty() ? "" : (" " + slice.describe()).c_str());
  }
  for (const auto& [name, why] : request.skipped) {
    std::printf("skip   %-40s %s\n", name.empty() ? "(root)" : name.c_str(), why.c_str());
  }
}

void check_fired_here(const flexmodel::FlexModelBase& fm, const Request& request) {
  std::set<std::pair<std::string, flexmodel::HookType>> unfired;
  std::map<std::string, std::string> advice;
  for (const auto& [handle, why] : fm.unfired_hooks()) {
    unfired.emplace(handle.module_name, handle.type);
    advice[handle.module_name] = why;
  }
  std::map<std::string, std::size_t> fired_per_pattern;
  for (const auto& point : request.points) {
    const bool fired = unfired.count({point.name, point.type}) == 0;
    for (const auto& pattern : point.patterns) {
      fired_per_pattern[pattern] += fired ? 1 : 0;
      FLEXMODEL_CHECK(fired || flexmodel::Pattern(pattern).is_wildcard(), flexmodel::ConfigError, "the ",
                      flexmodel::to_string(point.type), " hook on '", point.name.empty() ? "(root)" : point.name,
                      "' did not fire in the first forward: ", advice[point.name]);
    }
  }
  for (const auto& [pattern, fired] : fired_per_pattern) {
    FLEXMODEL_CHECK(fired > 0, flexmodel::ConfigError, "none of the hook points pattern '", pattern,
                    "' selects fired in the first forward (flex-inspect --input shows what runs)");
  }
  for (const auto& point : request.points) {
    if (unfired.count({point.name, point.type}) != 0 && flexmodel::dist::world_rank() == 0) {
      std::fprintf(stderr, "flex-dump: note: the %s hook on '%s' did not fire (%s); it has no dataset\n",
                   std::string(flexmodel::to_string(point.type)).c_str(), point.name.c_str(),
                   advice[point.name].c_str());
    }
  }
}

// After the first forward: a hook point named exactly that did not fire, or a
// pattern none of whose hook points fired, is an error (no file is written
// yet); hook points a wildcard selected that did not fire are listed. With
// pipeline stages each knows only its own hooks, so the ranks agree on the
// outcome over `world` before any of them throws.
void check_fired(const flexmodel::FlexModelBase& fm, const Request& request,
                 flexmodel::dist::Communicator* world = nullptr) {
  std::string failure;
  try {
    check_fired_here(fm, request);
  } catch (const flexmodel::Error& error) {
    if (world == nullptr) throw;
    failure = error.what();
  }
  if (world == nullptr) return;
  const auto failed = world->all_gather_ints(failure.empty() ? 0 : 1);
  if (std::none_of(failed.begin(), failed.end(), [](std::int64_t flag) { return flag != 0; })) return;
  if (!failure.empty()) throw flexmodel::ConfigError(failure);
  throw flexmodel::ConfigError("a hook point of another pipeline stage did not fire in the first forward");
}


// A model split over pipeline stages registers collectively: each pattern's
// union over the stages, every hook point once however many patterns select it.
Request register_on_every_stage(flexmodel::FlexModelBase& fm, const Settings& settings) {
  Request request;
  std::map<std::pair<std::string, flexmodel::HookType>, std::size_t> index;
  for (auto [patterns, type] : {std::pair{&settings.hooks, flexmodel::HookType::forward},
                                std::pair{&settings.pre_hooks, flexmodel::HookType::forward_pre}}) {
    for (const auto& pattern : split_patterns(*patterns)) {
      for (const auto& handle : fm.create_hook_group("dump", pattern, dump_hook(settings), type)) {
        auto [slot, added] = index.emplace(std::pair{handle.module_name, type}, request.points.size());
        if (added) {
          request.points.push_back({handle.module_name, type, {}});
        } else {
          fm.remove_hook(handle);
        }
        request.points[slot->second].patterns.push_back(pattern);
      }
    }
  }
  return request;
}

using flexmodel::detail::fnv1a;

// A file's size and its first and last MiB: enough to tell two models apart cheaply.
std::uint64_t file_fingerprint(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  const auto size = static_cast<std::uint64_t>(std::filesystem::file_size(path));
  std::string head(static_cast<std::size_t>(std::min<std::uint64_t>(size, 1 << 20)), '\0');
  file.read(head.data(), static_cast<std::streamsize>(head.size()));
  std::string tail(head.size(), '\0');
  file.seekg(static_cast<std::streamoff>(size - tail.size()));
  file.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  return fnv1a(tail.data(), tail.size(), fnv1a(head.data(), head.size(), fnv1a(&size, sizeof size)));
}

// A TorchScript file's fingerprint, or a checkpoint directory's: its
// config.json, index and safetensors files by name (tokenizer files aside).
std::uint64_t model_fingerprint(const std::string& path) {
  if (!std::filesystem::is_directory(path)) return file_fingerprint(path);
  std::set<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(path)) {
    const std::string name = entry.path().filename().string();
    if (name == "config.json" || name.find(".safetensors") != std::string::npos) names.insert(name);
  }
  std::uint64_t hash = fnv1a("checkpoint directory");
  for (const auto& name : names) {
    const std::uint64_t file = file_fingerprint(path + "/" + name);
    hash = fnv1a(&file, sizeof file, fnv1a(name.data(), name.size(), hash));
  }
  return hash;
}

// Every rank must run the same job: a wrapper that hands ranks other
// arguments would write one rank's rows under another's names. The ranks
// compare fingerprints of each part of the job before the first forward, and
// every rank fails naming the first part that differs.
void check_ranks_agree(flexmodel::dist::Communicator& world, const Settings& settings, const torch::Tensor& input) {
  const torch::Tensor bytes = input.contiguous();
  const std::string shape = flexmodel::detail::concat(input.sizes(), " ", input.scalar_type());
  const std::vector<std::pair<const char*, std::uint64_t>> parts{
      {"the model (--model)", model_fingerprint(settings.model_path)},
      {"--dtype", fnv1a(settings.dtype)},
      {"--hooks", fnv1a(settings.hooks)},
      {"--pre-hooks", fnv1a(settings.pre_hooks)},
      {"--batch-size", static_cast<std::uint64_t>(settings.batch_size)},
      {"--positions/--heads/--unpack-idx", fnv1a(flexmodel::detail::concat(settings.slice.describe(), ",", settings.unpack_idx))},
      {"--tp/--pp/--dp", fnv1a(flexmodel::detail::concat(settings.tp, ",", settings.pp, ",", settings.dp))},
      {"the input's shape and dtype (--input)", fnv1a(shape)},
      {"the input's values (--input)", fnv1a(bytes.data_ptr(), bytes.nbytes())}};
  for (const auto& [what, hash] : parts) {
    const auto all = world.all_gather_ints(static_cast<std::int64_t>(hash));
    const auto other = std::find_if(all.begin(), all.end(), [&](std::int64_t h) { return h != all.front(); });
    FLEXMODEL_CHECK(other == all.end(), flexmodel::ConfigError, "the ranks disagree on ", what, ": rank ",
                    other - all.begin(), "'s differs from rank 0's; give every rank the same arguments and files");
  }
}

// The token embedding an integer input indexes: its module and rows.
struct TokenEmbedding {
  std::string name;
  std::int64_t rows = 0;  // 0: none known
};

// A TorchScript model's largest nn.Embedding (a position embedding is smaller,
// and is not indexed by the input).
TokenEmbedding token_embedding(const torch::jit::Module& module) {
  TokenEmbedding largest;
  for (const auto& item : module.named_modules()) {
    const auto name = item.value.type()->name();
    if (!name || name->qualifiedName() != "__torch__.torch.nn.modules.sparse.Embedding" ||
        !item.value.hasattr("weight")) {
      continue;
    }
    const std::int64_t size = item.value.attr("weight").toTensor().size(0);
    if (size > largest.rows) largest = {item.name, size};
  }
  return largest;
}

TokenEmbedding token_embedding(const flexmodel::hub::ModelConfig& config) {
  if (const auto* gpt2 = std::get_if<flexmodel::models::GPT2Config>(&config)) return {"transformer.wte", gpt2->vocab_size()};
  return {"model.embed_tokens", std::get<flexmodel::models::LlamaConfig>(config).vocab_size()};
}

// Token ids must index the model's embedding: every id of an integer input
// is checked before any file exists. The message names the first row that
// holds an id out of range.
void check_token_ids(const TokenEmbedding& embedding, const torch::Tensor& input, const std::string& path) {
  if (!c10::isIntegralType(input.scalar_type(), /*includeBool=*/false)) return;
  const auto& [largest, rows] = embedding;
  if (rows == 0) return;
  const torch::Tensor bad = (input < 0).logical_or(input >= rows).flatten(1).any(1);
  if (!bad.any().item<bool>()) return;
  const std::int64_t row = bad.nonzero()[0][0].item<std::int64_t>();
  const torch::Tensor ids = input[row].flatten();
  const torch::Tensor wrong = ids.masked_select((ids < 0).logical_or(ids >= rows));
  FLEXMODEL_FAIL(flexmodel::ShapeError, "'", path, "' row ", row, " holds token id ", wrong[0].item<std::int64_t>(),
                 ", outside the ", rows, " rows of the model's embedding '", largest, "'; nothing was written");
}

// The attention heads an export records: an n_heads or num_heads attribute of
// any module (the first found).
std::optional<std::int64_t> recorded_heads(const torch::jit::Module& module) {
  for (const auto& item : module.named_modules()) {
    for (const char* attribute : {"n_heads", "num_heads"}) {
      if (item.value.hasattr(attribute) && item.value.attr(attribute).isInt()) return item.value.attr(attribute).toInt();
    }
  }
  return std::nullopt;
}

// --positions along dim 1 and --heads of the last dim, for every hook point;
// `heads` is the model's head count where it is known.
flexmodel::Slice dump_slice(const Settings& settings, const std::optional<std::int64_t>& heads_known) {
  flexmodel::Slice slice;
  // Generating, a step's rows are its newest position's: the sequence grows by one each step.
  FLEXMODEL_CHECK(settings.generate == 0 || settings.positions == "all" || settings.positions == "last",
                  flexmodel::ConfigError, "--generate dumps each step's newest position; leave out --positions");
  slice.positions(flexmodel::Index::parse(settings.generate > 0 ? std::string("last") : settings.positions));
  const flexmodel::Index heads = flexmodel::Index::parse(settings.heads);
  if (!heads.every()) {
    const auto count = settings.num_heads ? settings.num_heads : heads_known;
    FLEXMODEL_CHECK(count.has_value(), flexmodel::ConfigError, "--heads: '", settings.model_path,
                    "' records no head count (an n_heads or num_heads attribute); give --num-heads");
    slice.heads(heads, *count);
  }
  return slice;
}

// An integer input is token ids: the file keeps them as /tokens, in the step
// of the forward that takes them (rank 0 writes; the batch is whole there).
void write_tokens(const flexmodel::FlexModelBase& fm, const torch::Tensor& batch, flexmodel::io::HDF5Writer* writer) {
  if (writer == nullptr || batch.dim() != 2 || !c10::isIntegralType(batch.scalar_type(), /*includeBool=*/false)) return;
  writer->write_tokens(fm.forwards_run(), batch.to(torch::kInt64));
}

// --generate N: greedy generation of N tokens, then one forward more on the
// whole sequence, so that the last token has its step too. Each step's
// forward writes its rows of activations (the newest position's, see
// dump_slice) and its tokens: the sequence it ran on, padded with -1 to the
// prompt's length + N.
template <class Model>
void generate_and_dump(Model& fm, const torch::Tensor& prompt, std::int64_t tokens, flexmodel::io::HDF5Writer* writer) {
  const std::int64_t width = prompt.size(1) + tokens;
  auto padded = [&](const torch::Tensor& ids) {
    return torch::constant_pad_nd(ids.to(torch::kInt64), {0, width - ids.size(1)}, -1);
  };
  auto before_step = [&](std::int64_t, const torch::Tensor& ids) {
    if (writer != nullptr) writer->write_tokens(fm.forwards_run(), padded(ids));
  };
  const flexmodel::Groups dump{"dump"};
  const torch::Tensor ids =
      flexmodel::generate(fm, dump, prompt, flexmodel::GenerationOptions().max_new_tokens(tokens).before_step(before_step));
  before_step(tokens, ids);
  if constexpr (std::is_same_v<Model, flexmodel::ScriptFlexModel>) {
    fm.forward(dump, {ids});
  } else {
    fm.forward(dump, ids);
  }
}

// SIGINT, SIGTERM and SIGHUP stop the dump between two forwards: the steps
// written so far are committed and the file closed, then flex-dump exits
// 128 + the signal. SIGXFSZ (a file-size limit) is ignored, so that the write
// fails like a full disk, with a message.
volatile std::sig_atomic_t g_stop_signal = 0;

void install_signal_handlers() {
  for (int signal : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction action {};
    action.sa_handler = [](int received) { g_stop_signal = received; };
    sigemptyset(&action.sa_mask);
    ::sigaction(signal, &action, nullptr);
  }
  std::signal(SIGXFSZ, SIG_IGN);
}

// The signal every rank stops for (0: none): under mpirun the ranks agree, so
// that none runs a forward the others have left.
int agreed_stop_signal(flexmodel::dist::Communicator* world) {
  if (world == nullptr) return g_stop_signal;
  const auto signals = world->all_gather_ints(g_stop_signal);
  return static_cast<int>(*std::max_element(signals.begin(), signals.end()));
}

// Runs `forward` over the input batch by batch, streaming the "dump" group's
// activations to the file on rank 0.
template <class Forward>
int dump(flexmodel::FlexModelBase& fm, Forward&& forward, const Settings& settings, const torch::Tensor& input,
         flexmodel::dist::Communicator* world) {
  const bool root = flexmodel::dist::world_rank() == 0;
  const std::int64_t rows = input.size(0), batch_size = settings.batch_size;
  std::shared_ptr<flexmodel::io::HDF5Writer> writer;
  // --overwrite replaces the old file only once the new one is complete: until
  // then the new one is `<out>.new` (a killed run leaves both). --append
  // continues a copy, `<out>.appending`, which replaces the file alike.
  std::error_code error;
  const bool exists = std::filesystem::exists(settings.out_path, error);
  const bool replacing = (settings.overwrite || settings.append) && exists;
  const std::string target = settings.out_path + (!replacing ? "" : settings.append ? ".appending" : ".new");
  if (root) {
    auto options = flexmodel::io::HDF5WriterOptions()
                       .model(settings.model_path)
                       .tp(settings.tp)
                       .pp(settings.pp)
                       .dp(settings.dp)
                       .command_line(settings.command_line)
                       .compression(settings.compression)
                       .crash_safe(settings.crash_safe);
    if (replacing && settings.append) {
      options.continues(settings.out_path);
    } else {
      options.overwrite(settings.overwrite).append(settings.append);
    }
    writer = std::make_shared<flexmodel::io::HDF5Writer>(target, options);
    fm.add_sink(writer);
  }
  auto summary = std::make_shared<Summary>();
  fm.add_sink(summary);
  Progress progress(rows);
  const auto start = Clock::now();
  int stopped = 0;
  try {
    std::int64_t done = 0;
    for (; done < rows && (stopped = agreed_stop_signal(world)) == 0; done += batch_size) {
      forward(input.narrow(0, done, std::min(batch_size, rows - done)), writer.get());
      if (root) progress.update(std::min(done + batch_size, rows));
    }
    fm.close_sinks();
    if (root && replacing) std::filesystem::rename(target, settings.out_path);
    if (stopped != 0) {
      if (root) {
        std::fprintf(stderr, "\nflex-dump: stopped by signal %d (%s) after %lld of %lld rows; %s keeps them\n",
                     stopped, strsignal(stopped), static_cast<long long>(std::min(done, rows)),
                     static_cast<long long>(rows), settings.out_path.c_str());
      }
      return 128 + stopped;
    }
  } catch (...) {
    // A dump that failed half-way is no dump: the file it created goes, an
    // old file it was to replace or continue stays as it was.
    if (writer != nullptr) {
      try {
        writer->close();
      } catch (const std::exception&) {
      }
      std::error_code ignored;
      std::filesystem::remove(target, ignored);
      std::filesystem::remove(target + ".partial", ignored);
    }
    throw;
  }
  if (root) {
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const double file_mb = static_cast<double>(std::filesystem::file_size(settings.out_path)) / 1e6;
    const double activation_mb = static_cast<double>(summary->bytes()) / 1e6;
    std::printf("flex-dump: wrote %s: %lld rows in %lld forwards, %.1f MB of activations in %.2f s (%.1f MB/s), "
                "file %.1f MB\n",
                settings.out_path.c_str(), static_cast<long long>(rows),
                static_cast<long long>((rows + batch_size - 1) / batch_size * (settings.generate + 1)), activation_mb,
                seconds,
                activation_mb / seconds, file_mb);
    summary->print();
  }
  return 0;
}

// A native model (a loaded checkpoint, or a ParallelGPT): hooks registered
// on every pipeline stage, each forward run to its end, as the stages wait
// for each other.
template <class Model>
int dump_native(flexmodel::FlexModel<Model>& fm, const Settings& settings, const torch::Tensor& input,
                flexmodel::dist::Mesh* mesh) {
  // The layers declare how their activations are split, so hooks gather them
  // without an expected shape.
  const Request request = register_on_every_stage(fm, settings);
  auto forward = [&](const torch::Tensor& batch, flexmodel::io::HDF5Writer* writer) {
    if (settings.generate > 0) {
      generate_and_dump(fm, batch.to(torch::kInt64), settings.generate, writer);
      return;
    }
    write_tokens(fm, batch, writer);
    fm.forward(flexmodel::Groups{"dump"}, batch);
  };
  forward(input.narrow(0, 0, settings.dp), nullptr);
  flexmodel::dist::Communicator* world = mesh != nullptr ? &mesh->world() : nullptr;
  check_fired(fm, request, world);
  return dump(fm, forward, settings, input, world);
}

// --dtype: auto (unset) keeps the dtype the model's files store.
std::optional<torch::Dtype> parse_dtype(const std::string& name) {
  if (name == "auto") return std::nullopt;
  if (name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  FLEXMODEL_FAIL(flexmodel::ConfigError, "--dtype ", name, ": choose auto, float32, bfloat16 or float16");
}

std::int64_t heads_of(const flexmodel::hub::ModelConfig& config) {
  if (const auto* gpt2 = std::get_if<flexmodel::models::GPT2Config>(&config)) return gpt2->n_head();
  return std::get<flexmodel::models::LlamaConfig>(config).num_attention_heads();
}

int run(int argc, char** argv) {
  CLI::App app{"Runs a TorchScript model or a Hugging Face checkpoint over an .npy input and streams hooked "
               "activations to HDF5.", "flex-dump"};
  Settings settings;
  app.add_option("--model", settings.model_path,
                 "TorchScript file, or Hugging Face checkpoint directory (config.json and safetensors)")->required();
  app.add_option("--input", settings.input_path, ".npy input; its first dimension holds the rows")->required();
  app.add_option("--hooks", settings.hooks, "comma-separated module patterns for forward hooks (outputs)");
  app.add_option("--pre-hooks", settings.pre_hooks, "comma-separated module patterns for forward-pre hooks (inputs)");
  app.add_option("--out", settings.out_path, "HDF5 file to write")->required();
  app.add_option("--batch-size", settings.batch_size,
                 "global rows per forward (default 8; the last batch may be smaller)");
  app.add_option("--compression", settings.compression,
                 "none, gzip[:N], or a filter plugin's lz4 / zstd[:N] / blosc[:N]");
  auto* overwrite_flag = app.add_flag("--overwrite", settings.overwrite, "replace an existing file");
  app.add_flag("--append", settings.append,
               "continue an existing file (same model, and a first step with the file's hook points, dtypes and "
               "row shapes) in a copy that replaces it at the end: a failed run leaves it as it was")
      ->excludes(overwrite_flag);
  app.add_flag("!--no-crash-safety", settings.crash_safe,
               "write with plain HDF5 flushes: for an HDF5 other than 1.10, or appending to a rewritten file; the "
               "file is then whole only once flex-dump ends");
  auto* dp_option = app.add_option("--dp", settings.dp,
                                   "data-parallel ranks (default: the ranks mpirun starts, divided by tp·pp)");
  app.add_option("--tp", settings.tp,
                 "tensor-parallel ranks; a checkpoint directory loads sharded, each rank reading its share; a "
                 "TorchScript model must have the GPT layout of flexmodel::models::GPT, which is rebuilt from its "
                 "weights as a flexmodel::parallel::ParallelGPT");
  app.add_option("--dtype", settings.dtype,
                 "the parameters' dtype: auto (default: as the files store them), float32, bfloat16 or float16");
  app.add_option("--pp", settings.pp, "pipeline stages (see --tp)");
  app.add_option("--positions", settings.positions,
                 "the positions (dim 1) to dump: all (default), last, A:B or i,j,k (negatives count from the end)");
  app.add_option("--heads", settings.heads,
                 "the heads to dump, of the last dim viewed as [heads, d_head]: all (default), A:B or i,j,k");
  app.add_option("--unpack-idx", settings.unpack_idx,
                 "which tensor of a tuple, list or dict output (or input) to dump, depth first (default 0: the "
                 "first; flex-inspect --input shows each hook point's tensors)");
  app.add_option("--num-heads", settings.num_heads,
                 "attention heads of the model, for --heads and for --tp/--pp, where the export does not record them "
                 "(an n_heads or num_heads attribute)");
  app.add_option("--generate", settings.generate,
                 "generate N tokens (greedy) after each row of an integer input, and dump each step's newest "
                 "position; /tokens holds each step's sequence, padded with -1");
  app.add_flag("--full-forward", settings.full_forward,
               "run every forward to the model's end; by default a forward stops once its last hook has fired "
               "(the first runs whole to learn where that is)");
  app.add_flag("--dry-run", settings.dry_run,
               "print the hook points the patterns select and the modules they skip, then exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  settings.command_line = command_line(argc, argv);
  FLEXMODEL_CHECK(!settings.hooks.empty() || !settings.pre_hooks.empty(), flexmodel::ConfigError,
                  "nothing to dump: give --hooks and/or --pre-hooks");
  FLEXMODEL_CHECK(settings.tp > 0 && settings.pp > 0 && settings.dp > 0, flexmodel::ConfigError,
                  "--tp, --pp and --dp must be positive");
  // Every rank of the world takes part: a world larger than the mesh would run
  // the whole job once per extra rank.
  const std::int64_t world = flexmodel::dist::world_size();
  if (dp_option->count() == 0) {
    FLEXMODEL_CHECK(world % (settings.tp * settings.pp) == 0, flexmodel::ConfigError, "mpirun started ", world,
                    " ranks, not a multiple of --tp ", settings.tp, " × --pp ", settings.pp,
                    "; start tp·pp·dp ranks");
    settings.dp = world / (settings.tp * settings.pp);
  }
  FLEXMODEL_CHECK(settings.tp * settings.pp * settings.dp == world, flexmodel::ConfigError, "--tp ", settings.tp,
                  " × --pp ", settings.pp, " × --dp ", settings.dp, " = ", settings.tp * settings.pp * settings.dp,
                  " ranks, but ", world, " were started; start mpirun -np ",
                  settings.tp * settings.pp * settings.dp);
  {
    // --overwrite and --append replace or continue regular files only.
    std::error_code error;
    const auto status = std::filesystem::status(settings.out_path, error);
    FLEXMODEL_CHECK(!std::filesystem::exists(status) || std::filesystem::is_regular_file(status),
                    flexmodel::ConfigError, "'", settings.out_path,
                    "' exists and is not a regular file; --out names a file to write");
  }
  if (!settings.dry_run && !settings.overwrite && !settings.append) {
    std::error_code error;
    FLEXMODEL_CHECK(!std::filesystem::exists(settings.out_path, error), flexmodel::ConfigError, "'",
                    settings.out_path, "' exists: pass --overwrite to replace it or --append to continue it");
  }
  if (settings.append) {
    // A killed --append leaves its steps there, in no other file: never overwrite them unasked.
    std::error_code error;
    const std::string copy = settings.out_path + ".appending";
    FLEXMODEL_CHECK(!std::filesystem::exists(copy, error), flexmodel::ConfigError, "'", copy,
                    "' exists: an --append of '", settings.out_path, "' runs, or one that ended early left its steps "
                    "there; move it over '", settings.out_path, "' to keep them, or delete it");
  }
  const std::int64_t dp = settings.dp;
  FLEXMODEL_CHECK(settings.batch_size > 0 && settings.batch_size % dp == 0, flexmodel::ConfigError, "--batch-size ",
                  settings.batch_size, " must be a positive multiple of --dp ", dp);

  torch::NoGradGuard no_grad;
  const auto options = flexmodel::FlexModelOptions().tp(settings.tp).pp(settings.pp).dp(dp).outputs(false);
  const std::optional<torch::Dtype> dtype = parse_dtype(settings.dtype);
  // A directory is a Hugging Face checkpoint: its config.json tells the
  // family, heads and vocabulary before any weight is read.
  const bool checkpoint = std::filesystem::is_directory(settings.model_path);
  std::optional<flexmodel::hub::ModelConfig> config;
  torch::jit::Module module;
  if (checkpoint) {
    config = flexmodel::hub::read_config(settings.model_path);
  } else {
    module = flexmodel::load_torchscript(settings.model_path);
    if (dtype) module.to(*dtype);
  }
  settings.slice = dump_slice(settings, config ? std::optional(heads_of(*config)) : recorded_heads(module));
  const torch::Tensor input = flexmodel::read_npy(settings.input_path);
  FLEXMODEL_CHECK(input.dim() >= 1 && input.size(0) > 0, flexmodel::ShapeError, "'", settings.input_path,
                  "' holds no rows (shape ", input.sizes(), ")");
  check_token_ids(config ? token_embedding(*config) : token_embedding(module), input, settings.input_path);
  FLEXMODEL_CHECK(settings.heads == "all" || (settings.tp == 1 && settings.pp == 1), flexmodel::ConfigError,
                  "--heads selects the heads to dump, which --tp/--pp do not; the head count they may need is "
                  "--num-heads");
  FLEXMODEL_CHECK(settings.generate >= 0, flexmodel::ConfigError, "--generate takes a number of tokens, not ",
                  settings.generate);
  FLEXMODEL_CHECK(settings.generate == 0 ||
                      (input.dim() == 2 && c10::isIntegralType(input.scalar_type(), /*includeBool=*/false)),
                  flexmodel::ConfigError, "--generate runs on token ids [rows, positions]; '", settings.input_path,
                  "' holds ", input.scalar_type(), " ", input.sizes());
  FLEXMODEL_CHECK(input.size(0) % settings.batch_size % dp == 0, flexmodel::ConfigError, "the last batch has ",
                  input.size(0) % settings.batch_size, " rows, not a multiple of --dp ", dp,
                  "; choose --batch-size so that it is");
  if (config) {
    const auto violations = flexmodel::hub::validate_for_mesh(*config, {settings.tp, settings.pp, dp});
    FLEXMODEL_CHECK(violations.empty(), flexmodel::ConfigError, "'", settings.model_path, "' on --tp ", settings.tp,
                    " --pp ", settings.pp, ": ", violations.front(),
                    violations.size() > 1 ? " (flex-inspect --tp/--pp lists every violation)" : "");
  }

  if (settings.dry_run) {
    // The file's module names are the sharded model's too.
    if (flexmodel::dist::world_rank() != 0) return 0;
    if (config) {
      // Module names need no weights.
      print_dry_run(select(flexmodel::FlexModel(flexmodel::hub::build_model(*config)), settings), settings.slice);
    } else {
      print_dry_run(select(flexmodel::ScriptFlexModel(module), settings), settings.slice);
    }
    return 0;
  }
  // One mesh, one set of communicators, for the layers and the hooks.
  const auto mesh = world > 1 ? flexmodel::dist::Mesh::create({settings.tp, settings.pp, dp}) : nullptr;
  if (mesh != nullptr) check_ranks_agree(mesh->world(), settings, input);
  const auto meshed = mesh != nullptr ? flexmodel::FlexModelOptions(options).mesh(mesh) : options;
  if (config) {
    // Each rank builds its stage and reads its share of the files.
    flexmodel::FlexModel fm(flexmodel::hub::load_model(settings.model_path,
                                                       flexmodel::hub::LoadOptions().mesh(mesh).dtype(dtype)),
                            meshed);
    return dump_native(fm, settings, input, mesh.get());
  }
  if (settings.tp == 1 && settings.pp == 1) {
    flexmodel::ScriptFlexModel fm(module, meshed);
    const Request request = select(fm, settings);
    register_request(fm, request, settings);
    // The writer is null in the check forward, before the file exists.
    auto forward = [&](const torch::Tensor& batch, flexmodel::io::HDF5Writer* writer) {
      if (settings.generate > 0) {
        generate_and_dump(fm, batch.to(torch::kInt64), settings.generate, writer);
        return;
      }
      write_tokens(fm, batch, writer);
      if (settings.full_forward) {
        fm.forward(flexmodel::Groups{"dump"}, {batch});
      } else {
        fm.run_to_last_hook(flexmodel::Groups{"dump"}, {batch});
      }
    };
    // One small forward first: a model that rejects the input, or a hook that
    // cannot fire, fails before any file exists.
    forward(input.narrow(0, 0, settings.dp), nullptr);
    check_fired(fm, request);
    return dump(fm, forward, settings, input, mesh != nullptr ? &mesh->world() : nullptr);
  }
  const auto full = flexmodel::models::gpt_from_torchscript(module, "'" + settings.model_path + "'", settings.num_heads);
  flexmodel::parallel::ParallelGPT sharded(*full, mesh);
  flexmodel::FlexModel fm(sharded, meshed);
  return dump_native(fm, settings, input, mesh.get());
}

}  // namespace

int main(int argc, char** argv) {
  // flex-dump reports what matters itself, each problem in one line; the
  // library's warnings (a hook that did not fire, say) would repeat it.
  if (std::getenv("FLEXMODEL_LOG_LEVEL") == nullptr) flexmodel::logger()->set_level(spdlog::level::err);
  install_signal_handlers();
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::string message = error.what();
    message = "flex-dump: " + message.substr(0, message.find('\n'));
    std::cerr << message << "\n";
    // Under mpirun the other ranks may wait for this one in a collective: an
    // error on any rank (the output file on rank 0, say) ends them all.
    if (flexmodel::dist::world_size() > 1) flexmodel::dist::abort_world(message);
    return 1;
  }
}
