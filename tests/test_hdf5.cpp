// HDF5Writer: files written here are read back by h5py (Debian's
// /usr/bin/python3) through the scripts in tests/hdf5/, value for value.
// `test_hdf5 --child-writer FILE COMPRESSION` is the process the kill test kills.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <torch/torch.h>

#include <torch/autograd.h>

#include "flexmodel/cache.h"
#include "flexmodel/flex_model.h"
#include "flexmodel/nn.h"
#include "flexmodel/error.h"
#include "flexmodel/io/hdf5_writer.h"
#include "flexmodel/logging.h"
#include "flexmodel/output_map.h"
#include "flexmodel/version.h"
#include "test_files.h"

// tests/hdf5/kill_on_write.c
extern "C" void flexmodel_kill_at_write(long writes);

namespace flexmodel::io {
namespace {

namespace fs = std::filesystem;
using flexmodel::testing::run_python;
using flexmodel::testing::TempDir;

std::string script(const char* name) { return std::string(FLEXMODEL_HDF5_SCRIPTS) + "/" + name; }

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string json_list(const std::vector<std::int64_t>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

struct Root {
  std::string model = "tiny-gpt";
  std::string command_line = "train --layers 2 --name 'a b'";
  std::int64_t tp = 2, pp = 3, dp = 4;
};

HDF5WriterOptions options_of(const Root& root) {
  return HDF5WriterOptions().model(root.model).command_line(root.command_line).tp(root.tp).pp(root.pp).dp(root.dp);
}

// Writes through a writer and remembers what went in, for check_file.py.
class Recorder {
 public:
  Recorder(HDF5Writer& writer, std::string compression = "none", bool bfloat16_bits = false)
      : writer_(writer), compression_(std::move(compression)), bits_(bfloat16_bits) {}

  void write(const std::string& module, HookType type, const torch::Tensor& snapshot) {
    writer_.write(module, type, steps_, snapshot);
    const std::string path = hdf5_dataset_path(module, type);
    auto [found, inserted] = series_.try_emplace(path);
    Series& series = found->second;
    if (inserted) {
      series.module = module;
      series.type = type;
      series.dtype = snapshot.scalar_type();
      series.rows_per_step.assign(static_cast<std::size_t>(steps_), 0);
      if (snapshot.dim() > 1) series.trailing.assign(snapshot.sizes().begin() + 1, snapshot.sizes().end());
    }
    torch::Tensor rows = snapshot.dim() == 0 ? snapshot.reshape({1}) : snapshot;
    series.pieces.push_back(rows.contiguous());
    series.current += rows.size(0);
  }

  void end_step() {
    writer_.end_step(steps_);
    step_ended();
  }

  // A step that close() committed.
  void step_ended() {
    ++steps_;
    for (auto& [path, series] : series_) {
      series.rows_per_step.push_back(series.current);
      series.current = 0;
    }
  }

  void expect_chunks(const std::string& module, HookType type, std::vector<std::int64_t> chunks) {
    series_.at(hdf5_dataset_path(module, type)).chunks = std::move(chunks);
  }

  std::int64_t steps() const { return steps_; }

  // Writes the manifest and the raw bytes next to it; returns the manifest's path.
  std::string save(const TempDir& dir, const std::string& file, const Root& root, const std::string& name) const {
    std::ostringstream json;
    json << "{\"file\": " << json_string(file) << ", \"root\": {\"version\": " << json_string(kVersion)
         << ", \"model\": " << json_string(root.model) << ", \"command_line\": " << json_string(root.command_line)
         << ", \"tp\": " << root.tp << ", \"pp\": " << root.pp << ", \"dp\": " << root.dp << ", \"steps\": " << steps_
         << "}, \"datasets\": [";
    int index = 0;
    for (const auto& [path, series] : series_) {
      torch::Tensor all = torch::cat(series.pieces);
      const std::string raw = dir / (name + "_" + std::to_string(index) + ".bin");
      std::ofstream(raw, std::ios::binary).write(static_cast<const char*>(all.data_ptr()), all.nbytes());
      std::vector<std::int64_t> shape(all.sizes().begin(), all.sizes().end());
      json << (index++ ? ", " : "") << "{\"path\": " << json_string(path)
           << ", \"module_name\": " << json_string(series.module)
           << ", \"hook_type\": " << json_string(std::string(to_string(series.type)))
           << ", \"torch_dtype\": " << json_string(dtype_name(series.dtype))
           << ", \"bits\": " << (bits_ && series.dtype == torch::kBFloat16 ? "true" : "false")
           << ", \"raw\": " << json_string(raw) << ", \"shape\": " << json_list(shape)
           << ", \"rows_per_step\": " << json_list(series.rows_per_step)
           << ", \"chunks\": " << (series.chunks.empty() ? "null" : json_list(series.chunks))
           << ", \"compression\": " << json_string(compression_) << "}";
    }
    json << "]}";
    const std::string manifest = dir / (name + ".json");
    std::ofstream(manifest) << json.str();
    return manifest;
  }

 private:
  struct Series {
    std::string module;
    HookType type = HookType::forward;
    c10::ScalarType dtype = torch::kFloat32;
    std::vector<torch::Tensor> pieces;
    std::vector<std::int64_t> rows_per_step, trailing, chunks;
    std::int64_t current = 0;
  };

  HDF5Writer& writer_;
  std::string compression_;
  bool bits_;
  std::map<std::string, Series> series_;
  std::int64_t steps_ = 0;
};

// Random values of `dtype`, the first few replaced by the edge cases.
torch::Tensor sample(c10::ScalarType dtype, std::vector<std::int64_t> shape) {
  torch::Tensor values;
  if (dtype == torch::kBool) {
    values = torch::randint(0, 2, shape).to(torch::kBool);
  } else if (dtype == torch::kUInt8) {
    values = torch::randint(0, 256, shape).to(dtype);
  } else if (c10::isIntegralType(dtype, false)) {
    values = torch::randint(-1000, 1000, shape, torch::kInt64).to(dtype);
    auto flat = values.view({-1});
    if (flat.numel() >= 2) {
      switch (dtype) {
        case torch::kInt8: flat[0] = -128; flat[1] = 127; break;
        case torch::kInt16: flat[0] = -32768; flat[1] = 32767; break;
        case torch::kInt32: flat[0] = std::numeric_limits<std::int32_t>::min(); flat[1] = std::numeric_limits<std::int32_t>::max(); break;
        default: flat[0] = std::numeric_limits<std::int64_t>::min(); flat[1] = std::numeric_limits<std::int64_t>::max(); break;
      }
    }
  } else {
    values = (torch::randn(shape, torch::kFloat64) * 100).to(dtype);
    auto flat = values.view({-1});
    const double specials[] = {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                               std::numeric_limits<double>::quiet_NaN(), -0.0, 1e-40, 65504.0};
    for (std::int64_t i = 0; i < std::min<std::int64_t>(flat.numel(), 6); ++i) flat[i] = specials[i];
  }
  return values;
}

const std::vector<c10::ScalarType> kEveryDtype = {torch::kBool,    torch::kUInt8,   torch::kInt8,    torch::kInt16,
                                                  torch::kInt32,   torch::kInt64,   torch::kFloat16, torch::kBFloat16,
                                                  torch::kFloat32, torch::kFloat64};

void write_every_dtype(Recorder& recorder) {
  torch::manual_seed(0);
  const std::int64_t rows[] = {2, 3, 1};
  const HookType types[] = {HookType::forward, HookType::forward_pre, HookType::full_backward,
                            HookType::full_backward_pre, HookType::tensor};
  for (std::int64_t step = 0; step < 3; ++step) {
    for (std::size_t k = 0; k < kEveryDtype.size(); ++k) {
      recorder.write("layers." + std::to_string(k) + ".mlp", types[k % 5], sample(kEveryDtype[k], {rows[step], 3, 5}));
    }
    recorder.write("", HookType::forward, sample(torch::kFloat32, {rows[step], 7}));     // the root module
    recorder.write("head", HookType::forward, sample(torch::kBFloat16, {}));              // 0-dim: one row
    recorder.write("embed", HookType::forward, sample(torch::kInt64, {rows[step] + 4}));  // 1-D
    if (step == 1) recorder.write("late", HookType::forward, sample(torch::kFloat16, {2, 4}));  // one step only
    recorder.write("twice", HookType::forward, sample(torch::kFloat32, {1, 2}));  // two calls in one step
    recorder.write("twice", HookType::forward, sample(torch::kFloat32, {2, 2}));
    recorder.end_step();
  }
}

TEST(HDF5Writer, EveryDtypeReadsBackExactlyInH5py) {
  TempDir dir;
  const Root root;
  for (bool bits : {false, true}) {
    const std::string file = dir / (bits ? "bits.h5" : "float.h5");
    HDF5Writer writer(file, options_of(root).keep_bfloat16_bits(bits));
    Recorder recorder(writer, "none", bits);
    write_every_dtype(recorder);
    writer.close();
    EXPECT_EQ(writer.committed_steps(), 3);
    EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, bits ? "bits" : "float")), 0);
  }
}

TEST(HDF5Writer, ChunksHoldOneStepWithinTheByteBounds) {
  TempDir dir;
  const Root root;
  for (const char* compression : {"none", "gzip:4"}) {
    const bool filtered = std::string(compression) != "none";
    const std::string file = dir / (filtered ? "gzip.h5" : "raw.h5");
    HDF5Writer writer(file, options_of(root).compression(compression));
    Recorder recorder(writer, compression);
    torch::manual_seed(1);
    for (int step = 0; step < 3; ++step) {
      recorder.write("one_step", HookType::forward, torch::randn({4, 128, 768}));  // 1.5 MiB: one step a chunk
      recorder.write("split", HookType::forward, torch::randn({12, 128, 768}));    // 4.5 MiB: two chunks a step
      recorder.write("uneven", HookType::forward, torch::randn({15, 128, 768}));   // 5.6 MiB: 15 rows in 2 or 3
      recorder.write("merged", HookType::forward, torch::randn({3, 64}));          // 768 B: 86 steps a chunk
      recorder.write("wide_row", HookType::forward, torch::randn({1, 1100, 1024}));  // a row over 4 MiB
      recorder.end_step();
    }
    recorder.expect_chunks("one_step", HookType::forward, {4, 128, 768});
    recorder.expect_chunks("split", HookType::forward, {6, 128, 768});
    // Compressed chunks hold a divisor of the step's rows and never span steps.
    recorder.expect_chunks("uneven", HookType::forward, {filtered ? 5 : 8, 128, 768});
    recorder.expect_chunks("merged", HookType::forward, {filtered ? 3 : 258, 64});
    recorder.expect_chunks("wide_row", HookType::forward, {1, 1024, 1024});
    writer.close();
    EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, file.substr(file.size() - 6))),
              0);
  }
}

// Every chunk written once: the file is the size of what its chunks store
// (plus metadata), and so smaller than the uncompressed file.
TEST(HDF5Writer, ACompressedFileIsTheSizeOfItsChunks) {
  TempDir dir;
  std::string files;
  for (const char* compression : {"none", "gzip:4", "gzip:1", "lz4", "blosc:5"}) {
    HDF5WriterOptions options = HDF5WriterOptions().compression(compression);
    if (std::string(compression) == "gzip:1") options.compression_threads(0);  // HDF5's own filter
    const std::string file = dir / (std::string(compression) + ".h5");
    std::unique_ptr<HDF5Writer> writer;
    try {
      writer = std::make_unique<HDF5Writer>(file, options);
    } catch (const ConfigError& e) {
      std::cout << "not checked: " << e.what() << "\n";  // a plugin that is not installed
      continue;
    }
    torch::manual_seed(3);
    for (int step = 0; step < 300; ++step) {
      // Small steps (where chunks used to span steps), and one of another size now and then.
      writer->write("small", HookType::forward, step, torch::randint(0, 4, {2, 256}).to(torch::kFloat32));
      writer->write("large", HookType::forward, step, torch::randint(0, 4, {2, 64, 256}).to(torch::kFloat32));
      writer->write("ragged", HookType::forward, step, torch::randint(0, 4, {1 + step % 7 / 6, 512}));
      writer->end_step(step);
    }
    writer->close();
    files += " " + file;
  }
  EXPECT_EQ(run_python(script("check_size.py") + files), 0);
}

class GzipTest : public ::testing::TestWithParam<int> {};

TEST_P(GzipTest, ReadsBackInH5pyWithNoPlugin) {
  TempDir dir;
  const Root root;
  const std::string file = dir / "gzip.h5";
  HDF5Writer writer(file, options_of(root).compression("gzip:4").compression_threads(GetParam()));
  Recorder recorder(writer, "gzip:4");
  torch::manual_seed(2);
  for (std::int64_t step = 0; step < 5; ++step) {
    recorder.write("layers.0.mlp", HookType::forward, torch::randn({4, 128, 96}));
    recorder.write("layers.0.attn", HookType::forward, torch::randn({1 + step % 2, 64}));  // tails rewritten
    recorder.write("ids", HookType::forward_pre, torch::randint(-300, 300, {2, 33}, torch::kInt16));
    recorder.write("mask", HookType::forward_pre, torch::randint(0, 2, {5}).to(torch::kBool));
    recorder.write("half", HookType::full_backward, torch::randn({3, 10}).to(torch::kFloat16));
    recorder.write("brain", HookType::tensor, torch::randn({2, 8}).to(torch::kBFloat16));
    recorder.write("zeros", HookType::forward, torch::zeros({64, 256}));
    recorder.write("filled", HookType::forward, torch::randn({48, 256}));  // compressed: never merged
    recorder.end_step();
  }
  writer.close();
  EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, "gzip")), 0);
}

INSTANTIATE_TEST_SUITE_P(Threads, GzipTest, ::testing::Values(0, 1, 3),
                         [](const auto& info) { return info.param == 0 ? std::string("InHDF5") : "Pool" + std::to_string(info.param); });

TEST(HDF5Writer, AnExistingFileIsReplacedOrContinuedOnlyWhenAsked) {
  TempDir dir;
  const Root root;
  const std::string file = dir / "acts.h5";
  torch::manual_seed(3);
  const torch::Tensor first = torch::randn({2, 6}), second = torch::randn({3, 6}), third = torch::randn({1, 6});
  {
    HDF5Writer writer(file, options_of(root));
    writer.write("a", HookType::forward, 0, first);
    writer.end_step(0);
    writer.write("a", HookType::forward, 1, torch::randn({4, 6}));
    writer.end_step(1);
  }
  try {
    HDF5Writer writer(file, options_of(root));
    FAIL() << "an existing file was opened without overwrite or append";
  } catch (const IOError& e) {
    EXPECT_NE(std::string(e.what()).find("'" + file + "' exists"), std::string::npos) << e.what();
  }
  EXPECT_THROW(HDF5Writer(file, options_of(root).overwrite(true).append(true)), ConfigError);

  // overwrite: the old file stays until the new one's first step commits.
  {
    HDF5Writer writer(file, options_of(root).overwrite(true));
    Recorder recorder(writer);
    EXPECT_TRUE(fs::exists(file));
    EXPECT_TRUE(fs::exists(file + ".partial"));
    recorder.write("a", HookType::forward, first);
    recorder.end_step();
    writer.flush();
    EXPECT_FALSE(fs::exists(file + ".partial"));
    writer.close();
    EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, "overwritten")), 0);
  }
  // append: steps continue (the first with the file's datasets); a dataset
  // new to the file has zero rows in the earlier steps.
  {
    HDF5Writer writer(file, options_of(root).append(true));
    EXPECT_EQ(writer.committed_steps(), 1);
    writer.write("a", HookType::forward, 0, second);
    writer.end_step(0);
    writer.write("a", HookType::forward, 1, third);
    writer.write("b", HookType::forward_pre, 1, third.to(torch::kBFloat16));
    writer.end_step(1);
    EXPECT_THROW(writer.write("a", HookType::forward, 2, torch::randn({1, 7})), ShapeError);
    writer.close();
    EXPECT_EQ(writer.committed_steps(), 3);
  }
  {
    // The same content written in one go, for the manifest.
    TempDir scratch;
    HDF5Writer unused(scratch / "unused.h5", options_of(root));
    Recorder recorder(unused);
    recorder.write("a", HookType::forward, first);
    recorder.end_step();
    recorder.write("a", HookType::forward, second);
    recorder.end_step();
    recorder.write("a", HookType::forward, third);
    recorder.write("b", HookType::forward_pre, third.to(torch::kBFloat16));
    recorder.end_step();
    EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, "appended")), 0);
  }
  // A layout mismatch names the dataset and the file.
  HDF5Writer writer(file, options_of(root).append(true).keep_bfloat16_bits(true));
  const std::string a = "'/activations/a/forward' in '" + file + "'";
  try {
    writer.write("a", HookType::forward, 0, torch::randn({1, 6}, torch::kFloat64));
    FAIL() << "float64 rows went into a float32 dataset";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find(a + " holds float32, the snapshot is float64"), std::string::npos) << e.what();
  }
  try {
    writer.write("a", HookType::forward, 0, torch::randn({1, 5}));
    FAIL() << "rows of 5 went into a dataset of rows of 6";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find(a + " has rows of shape [6], the snapshot's rows are [5]"), std::string::npos)
        << e.what();
  }
  try {
    writer.write("b", HookType::forward_pre, 0, torch::randn({1, 6}).to(torch::kBFloat16));
    FAIL() << "bfloat16 bits went into a dataset of bfloat16 as float32";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("'/activations/b/forward_pre' in '" + file + "' stores bfloat16 as float32"),
              std::string::npos)
        << e.what();
  }
}

TEST(HDF5Writer, AppendsOnlyToItsOwnFilesAndCreatesMissingOnes) {
  TempDir dir;
  const std::string foreign = dir / "foreign.h5";
  ASSERT_EQ(run_python("-c \"import h5py; h5py.File('" + foreign + "', 'w').create_dataset('x', data=[1])\""), 0);
  try {
    HDF5Writer writer(foreign, HDF5WriterOptions().append(true));
    FAIL() << "appended to a file flexmodel did not write";
  } catch (const IOError& e) {
    EXPECT_NE(std::string(e.what()).find("flexmodel did not write it"), std::string::npos) << e.what();
  }
  HDF5Writer writer(dir / "new.h5", HDF5WriterOptions().append(true));
  writer.close();
  EXPECT_TRUE(fs::exists(dir / "new.h5"));
}

// Appending rows of another model is refused before the file changes.
std::string file_bytes(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Opening `file` to append with `options` fails with an IOError saying `message`.
void expect_append_refused(const std::string& file, HDF5WriterOptions options, const std::string& message) {
  try {
    HDF5Writer writer(file, options.append(true));
    ADD_FAILURE() << "appended to '" << file << "'";
  } catch (const IOError& error) {
    EXPECT_NE(std::string(error.what()).find(message), std::string::npos) << error.what();
  }
}

TEST(HDF5Writer, AppendsOnlyRowsOfTheFilesOwnModel) {
  TempDir dir;
  const std::string file = dir / "gpt2.h5";
  {
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt"));
    writer.write("layers.0", HookType::forward, 0, torch::ones({2, 3}));
    writer.close();
  }
  const std::string before = file_bytes(file);
  expect_append_refused(file, HDF5WriterOptions().model("llama.pt"),
                        "holds activations of model 'gpt2.pt', this run's model is 'llama.pt'");
  EXPECT_TRUE(file_bytes(file) == before) << "the file changed";
}

// Append continues the file's own hook points: its first step writes exactly
// the file's datasets, or the writer fails and the file stays byte for byte.
// continues(file): the writer appends to its own copy; the file copied never
// changes, whether the run commits steps and then fails or is refused at once.
TEST(HDF5Writer, ContinuesACopyAndNeverWritesTheFileItCopies) {
  TempDir dir;
  const std::string file = dir / "acts.h5", copy = dir / "more.h5";
  {
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt"));
    writer.write("layers.0", HookType::forward, 0, torch::full({2, 3}, 1.0));
    writer.end_step(0);
  }
  const std::string before = file_bytes(file);
  {
    // Two steps commit, then a step of another layout fails the writer.
    HDF5Writer writer(copy, HDF5WriterOptions().model("gpt2.pt").continues(file));
    EXPECT_THROW(HDF5Writer(copy, HDF5WriterOptions().model("gpt2.pt").continues(file)), IOError)
        << "a second writer continued into the same copy";
    for (std::int64_t step = 1; step < 3; ++step) {
      writer.write("layers.0", HookType::forward, step, torch::full({1, 3}, static_cast<double>(step + 1)));
      writer.end_step(step);
    }
    writer.flush();
    EXPECT_EQ(writer.committed_steps(), 3);
    EXPECT_TRUE(file_bytes(file) == before) << "committing to the copy changed the file";
    EXPECT_THROW(writer.write("layers.0", HookType::forward, 3, torch::ones({1, 4})), Error);
  }
  EXPECT_TRUE(file_bytes(file) == before) << "a failed continuation changed the file";
  EXPECT_EQ(run_python("-c \"import h5py, sys; a = h5py.File('" + copy + "', 'r'); b = h5py.File('" + file +
                       "', 'r'); d = a['activations/layers.0/forward'][()]; sys.exit(0 if int(a.attrs['steps']) == 3 "
                       "and d.shape == (4, 3) and list(d[:, 0]) == [1, 1, 2, 3] and int(b.attrs['steps']) == 1 "
                       "and b['activations/layers.0/forward'].shape == (2, 3) else 1)\""),
            0);
  {
    // Refused before a step commits: no copy is left, the file stays.
    fs::remove(copy);
    EXPECT_THROW(HDF5Writer(copy, HDF5WriterOptions().model("llama.pt").continues(file)), IOError);
    HDF5Writer writer(copy, HDF5WriterOptions().model("gpt2.pt").continues(file));
    writer.write("embed", HookType::forward, 1, torch::ones({1, 3}));
    EXPECT_THROW(writer.end_step(1), IOError);
  }
  EXPECT_FALSE(fs::exists(copy) || fs::exists(copy + ".partial"));
  EXPECT_TRUE(file_bytes(file) == before);
  EXPECT_THROW(HDF5Writer(copy, HDF5WriterOptions().continues(file).append(true)), ConfigError);
}

TEST(HDF5Writer, AppendsOnlyStepsOfTheFilesHookPoints) {
  TempDir dir;
  const std::string file = dir / "acts.h5";
  {
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt"));
    writer.write("layers.0", HookType::forward, 0, torch::ones({2, 3}));
    writer.write("layers.1", HookType::forward, 0, torch::ones({2, 3}));
    writer.end_step(0);
    writer.close();
  }
  const std::string before = file_bytes(file);
  const std::vector<std::pair<std::vector<std::string>, std::string>> refused{
      {{"embed"}, "(the file's that it lacks: '/activations/layers.0/forward' and 1 more; its own that the file "
                  "lacks: '/activations/embed/forward')"},
      {{"layers.0"}, "the file's that it lacks: '/activations/layers.1/forward'; its own that the file lacks: none"},
      {{"layers.0", "layers.1", "lm_head"}, "its own that the file lacks: '/activations/lm_head/forward'"}};
  for (const auto& [modules, message] : refused) {
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt").append(true));
    for (const auto& module : modules) writer.write(module, HookType::forward, 1, torch::ones({2, 3}));
    try {
      writer.end_step(1);
      ADD_FAILURE() << "appended a step of other hook points";
    } catch (const IOError& error) {
      EXPECT_NE(std::string(error.what()).find(message), std::string::npos) << error.what();
    }
    EXPECT_THROW(writer.write("layers.0", HookType::forward, 2, torch::ones({2, 3})), IOError);
    EXPECT_NO_THROW(writer.close());  // reported already
    EXPECT_TRUE(file_bytes(file) == before) << "the file changed";
  }
  {
    // Closing without end_step checks the same.
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt").append(true));
    writer.write("embed", HookType::forward, 1, torch::ones({2, 3}));
    EXPECT_THROW(writer.close(), IOError);
    EXPECT_TRUE(file_bytes(file) == before) << "the file changed";
  }
  HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt").append(true));
  writer.write("layers.1", HookType::forward, 1, torch::ones({1, 3}));
  writer.write("layers.0", HookType::forward, 1, torch::ones({1, 3}));
  writer.end_step(1);
  writer.write("layers.0", HookType::forward, 2, torch::ones({1, 3}));  // later steps are the program's
  writer.end_step(2);
  writer.close();
  EXPECT_EQ(writer.committed_steps(), 3);
}

TEST(HDF5Writer, TokenIdsMayBeginInAnAppendAndNeedNotContinue) {
  TempDir dir;
  const std::string file = dir / "acts.h5";
  {
    // A file without /tokens, as flex-dump wrote them before it kept them.
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt"));
    writer.write("layers.0", HookType::forward, 0, torch::ones({2, 3}));
    writer.end_step(0);
    writer.close();
  }
  {
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt").append(true));
    writer.write_tokens(1, torch::arange(8).reshape({2, 4}));
    writer.write("layers.0", HookType::forward, 1, torch::ones({2, 3}));
    writer.end_step(1);
    writer.close();
  }
  {
    // An append that writes no ids continues the hook points alone.
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt").append(true));
    writer.write("layers.0", HookType::forward, 2, torch::ones({2, 3}));
    writer.end_step(2);
    writer.close();
  }
  // The ids of step 1 alone; the steps without ids read 0 rows.
  EXPECT_EQ(run_python("-c \"import h5py, numpy as np, sys; f = h5py.File('" + file +
                       "', 'r'); sys.exit(0 if (f['tokens'][()] == np.arange(8).reshape(2, 4)).all() and "
                       "list(f['tokens_rows_per_step'][()]) == [0, 2, 0] and "
                       "f['activations/layers.0/forward'].shape == (6, 3) else 1)\""),
            0);
}

// A file rewritten by other software (here h5py, with the oldest superblock
// version, as h5repack may) cannot be kept crash-safe: append refuses it,
// unless crash_safe(false) says to append without that guarantee.
TEST(HDF5Writer, AppendsCrashSafelyOnlyToASuperblockItCanKeep) {
  TempDir dir;
  const std::string file = dir / "acts.h5", copy = dir / "copy.h5";
  {
    HDF5Writer writer(file, HDF5WriterOptions().model("gpt2.pt"));
    writer.write("a", HookType::forward, 0, torch::ones({2, 3}));
    writer.end_step(0);
    writer.close();
  }
  ASSERT_EQ(run_python("-c \"import h5py\n"
                       "with h5py.File('" + file + "', 'r') as f, h5py.File('" + copy + "', 'w', libver='earliest') as g:\n"
                       "    [f.copy(name, g) for name in f]\n"
                       "    g.attrs.update(f.attrs)\""),
            0);
  expect_append_refused(copy, HDF5WriterOptions().model("gpt2.pt"),
                        "crash-safely: its superblock or free-space strategy is not the one");
  HDF5Writer writer(copy, HDF5WriterOptions().model("gpt2.pt").append(true).crash_safe(false));
  writer.write("a", HookType::forward, 1, torch::full({1, 3}, 2.0));
  writer.end_step(1);
  writer.close();
  EXPECT_EQ(run_python("-c \"import h5py, sys; f = h5py.File('" + copy +
                       "', 'r'); x = f['activations/a/forward'][:]; "
                       "sys.exit(0 if f.attrs['steps'] == 2 and x.shape == (3, 3) and x[2, 0] == 2 else 1)\""),
            0);
}

// --overwrite and --append touch regular files only: a pipe, a directory or
// a link to a device stays what it was.
TEST(HDF5Writer, ReplacesOrContinuesOnlyRegularFiles) {
  TempDir dir;
  const std::string pipe = dir / "pipe", folder = dir / "folder", link = dir / "link";
  ASSERT_EQ(::mkfifo(pipe.c_str(), 0644), 0);
  fs::create_directory(folder);
  fs::create_symlink("/dev/null", link);
  for (const auto& path : {pipe, folder, link}) {
    for (const auto& options : {HDF5WriterOptions().overwrite(true), HDF5WriterOptions().append(true)}) {
      try {
        HDF5Writer writer(path, options);
        writer.close();
        ADD_FAILURE() << path << ": no error";
      } catch (const IOError& error) {
        EXPECT_NE(std::string(error.what()).find("is not a regular file"), std::string::npos) << error.what();
      }
    }
  }
  EXPECT_TRUE(fs::is_fifo(pipe));
  EXPECT_TRUE(fs::is_directory(folder));
  EXPECT_TRUE(fs::is_symlink(link) && fs::is_character_file(link));
  EXPECT_FALSE(fs::exists(pipe + ".partial") || fs::exists(folder + ".partial") || fs::exists(link + ".partial"));
}

// Two writers on one path: the second fails at once and leaves the first's
// file in progress alone, which then completes intact.
TEST(HDF5Writer, ASecondWriterOnOnePathFailsAndTouchesNothing) {
  TempDir dir;
  const Root root;
  const std::string file = dir / "shared.h5";
  HDF5Writer first(file, options_of(root));
  Recorder recorder(first);
  recorder.write("layers.0", HookType::forward, torch::arange(12, torch::kFloat).view({3, 4}));
  for (const auto& options : {HDF5WriterOptions(), HDF5WriterOptions().overwrite(true)}) {
    try {
      HDF5Writer second(file, options);
      ADD_FAILURE() << "no error";
    } catch (const IOError& error) {
      EXPECT_NE(std::string(error.what()).find("is being written by another writer"), std::string::npos)
          << error.what();
    }
  }
  EXPECT_TRUE(fs::exists(file + ".partial"));
  recorder.end_step();
  recorder.write("layers.0", HookType::forward, torch::ones({1, 4}));
  recorder.end_step();
  first.close();
  EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, "shared")), 0);
}

TEST(HDF5Writer, FailedCreationLeavesNoFile) {
  TempDir dir;
  const std::string file = dir / "missing_folder/acts.h5";
  try {
    HDF5Writer writer(file);
    FAIL() << "created a file in a missing folder";
  } catch (const IOError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(HDF5Writer, EmptyFileAppearsOnCloseWithItsRootAttributes) {
  TempDir dir;
  const Root root;
  const std::string file = dir / "empty.h5";
  HDF5Writer writer(file, options_of(root));
  EXPECT_FALSE(fs::exists(file));
  writer.close();
  Recorder recorder(writer);
  EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, "empty")), 0);
}

TEST(HDF5Writer, CloseCommitsWritesAfterTheLastEndStep) {
  TempDir dir;
  const Root root;
  const std::string file = dir / "open_step.h5";
  HDF5Writer writer(file, options_of(root));
  Recorder recorder(writer);
  recorder.write("x", HookType::forward, torch::arange(6, torch::kFloat32).reshape({2, 3}));
  recorder.end_step();
  recorder.write("x", HookType::forward, torch::arange(3, torch::kFloat32).reshape({1, 3}));
  writer.close();
  EXPECT_EQ(writer.committed_steps(), 2);
  recorder.step_ended();
  EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, "open_step")), 0);
}

// A FlexModel's gradient captures (full_backward, full_backward_pre, a
// parameter's) land in the step of the forward whose graph they come from,
// each dataset with its own rows_per_step, bit for bit what autograd gives.
// A small net whose FlexModel writes to `file`, and a reference writer for
// what the file must hold (the values from autograd without flexmodel).
class NetWritingAFile : public ::testing::Test {
 protected:
  static flexmodel::nn::Sequential seeded_net() {
    torch::manual_seed(0);
    return flexmodel::nn::Sequential(flexmodel::nn::Linear(4, 6), flexmodel::nn::Tanh(), flexmodel::nn::Linear(6, 3));
  }

  TempDir dir;
  const Root root;
  flexmodel::nn::Sequential net = seeded_net();
  const std::shared_ptr<torch::nn::LinearImpl> first = net->ptr<torch::nn::LinearImpl>(0);
  const std::shared_ptr<torch::nn::LinearImpl> last = net->ptr<torch::nn::LinearImpl>(2);
  const std::string file = dir / "acts.h5";
  std::shared_ptr<HDF5Writer> writer = std::make_shared<HDF5Writer>(file, options_of(root));
  HDF5Writer reference_writer{dir / "reference.h5", options_of(root)};
  Recorder expected{reference_writer};
};

TEST_F(NetWritingAFile, GradientCapturesLandInTheStepOfTheirForward) {
  FlexModel fm(net, FlexModelOptions().outputs(false));
  fm.add_sink(writer);
  fm.register_forward_hook(HookFunction("0"));
  fm.register_full_backward_pre_hook(HookFunction("2"));  // the gradient of its output
  fm.register_full_backward_hook(HookFunction("2"));      // the gradient of its input
  fm.register_hook(HookFunction("0.weight"));
  for (std::int64_t step = 0; step < 3; ++step) {
    const auto x = torch::randn({step + 2, 4});
    const auto hidden = torch::linear(x, first->weight, first->bias);
    const auto activation = torch::tanh(hidden);
    const auto y = torch::linear(activation, last->weight, last->bias);
    const auto grads = torch::autograd::grad({y.pow(2).sum()}, {y, activation, first->weight});
    expected.write("0", HookType::forward, hidden.detach());
    expected.write("2", HookType::full_backward_pre, grads[0]);
    expected.write("2", HookType::full_backward, grads[1]);
    expected.write("0.weight", HookType::tensor, grads[2]);
    expected.end_step();
    net->zero_grad();
    fm.forward(x).pow(2).sum().backward();
  }
  fm.close_sinks();
  reference_writer.close();
  EXPECT_TRUE(fm.outputs().empty());
  EXPECT_EQ(run_python(script("check_file.py") + " " + expected.save(dir, file, root, "gradients")), 0);
}

// Fails once (a failed forward's step number is the next forward's): the
// write of one module's snapshot in one forward, or that forward's end_step
// when `module` is empty.
class FailingSink final : public Sink {
 public:
  FailingSink(std::string module, std::int64_t step) : module_(std::move(module)), step_(step) {}
  void write(const std::string& module_name, HookType, std::int64_t step, const torch::Tensor&) override {
    if (module_name == module_ && step == step_) fail("no room for '" + module_name + "'");
  }
  void end_step(std::int64_t step) override {
    if (module_.empty() && step == step_) fail("cannot end step " + std::to_string(step));
  }

 private:
  void fail(const std::string& why) {
    if (std::exchange(failed_, true)) return;
    throw IOError("FailingSink: " + why);
  }
  std::string module_;
  std::int64_t step_;
  bool failed_ = false;
};

// Keeps every snapshot it is given.
class KeepingSink final : public Sink {
 public:
  void write(const std::string& module_name, HookType, std::int64_t, const torch::Tensor& snapshot) override {
    kept[module_name].push_back(snapshot);
  }
  std::map<std::string, std::vector<torch::Tensor>> kept;
};

class SinkFailure : public NetWritingAFile, public ::testing::WithParamInterface<bool> {};

// A second sink failing on forward 1's third snapshot (the writer has had the
// first two), or a first sink failing to end forward 1's step.
TEST_P(SinkFailure, LeavesNothingOfItsForwardInTheFile) {
  FlexModel fm(net);
  if (GetParam()) {
    fm.add_sink(writer);
    fm.add_sink(std::make_shared<FailingSink>("2", 1));
  } else {
    fm.add_sink(std::make_shared<FailingSink>("", 1));
    fm.add_sink(writer);
  }
  for (const char* module : {"0", "1", "2"}) fm.register_forward_hook(HookFunction(module));
  for (std::int64_t step = 0; step < 3; ++step) {
    const auto x = torch::randn({2, 4});
    if (step == 1) {
      EXPECT_THROW(fm.forward(x), IOError);
      continue;
    }
    fm.forward(x);
    const auto hidden = torch::linear(x, first->weight, first->bias);
    expected.write("0", HookType::forward, hidden);
    expected.write("1", HookType::forward, torch::tanh(hidden));
    expected.write("2", HookType::forward, torch::linear(torch::tanh(hidden), last->weight, last->bias));
    expected.end_step();
  }
  fm.close_sinks();
  reference_writer.close();
  EXPECT_EQ(fm.outputs().at("0").size(), 2u);
  EXPECT_EQ(run_python(script("check_file.py") + " " + expected.save(dir, file, root, "all_or_nothing")), 0);
}

INSTANTIATE_TEST_SUITE_P(InWriteOrEndStep, SinkFailure, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "InWrite" : "InEndStep"; });

TEST(HDF5Writer, SinksOwnTheirSnapshotsWhenTheOutputMapKeepsThemToo) {
  torch::manual_seed(0);
  flexmodel::nn::Sequential net(flexmodel::nn::Linear(4, 6), flexmodel::nn::Tanh());
  FlexModel fm(net);
  auto sink = std::make_shared<KeepingSink>();
  fm.add_sink(sink);
  fm.register_forward_hook(HookFunction("0"));
  fm.register_hook(HookFunction("0.weight"));
  const auto x = torch::randn({3, 4});
  fm.forward(x).sum().backward();
  fm.end_backward();
  const auto& first = net->ptr<torch::nn::LinearImpl>(0);
  const torch::Tensor hidden = torch::linear(x, first->weight, first->bias).detach();
  const torch::Tensor weight_grad = first->weight.grad().clone();
  // A program editing the output map in place (the sink may still be writing).
  fm.outputs().at("0")[0].zero_();
  fm.outputs().at("0.weight", HookType::tensor)[0].zero_();
  ASSERT_EQ(sink->kept["0"].size(), 1u);
  ASSERT_EQ(sink->kept["0.weight"].size(), 1u);
  EXPECT_TRUE(torch::equal(sink->kept["0"][0], hidden));
  EXPECT_TRUE(torch::equal(sink->kept["0.weight"][0], weight_grad));
}

TEST(HDF5Writer, RejectsWhatItCannotStore) {
  TempDir dir;
  HDF5Writer writer(dir / "acts.h5");
  EXPECT_THROW(writer.write("x", HookType::forward, 0, torch::zeros({2}, torch::kComplexFloat)), ShapeError);
  EXPECT_THROW(writer.write("x", HookType::forward, 0, torch::zeros({2, 0})), ShapeError);
  EXPECT_THROW(writer.write("a/b", HookType::forward, 0, torch::zeros({2})), ConfigError);
  writer.write("x", HookType::forward, 0, torch::zeros({2, 3}));
  EXPECT_THROW(writer.write("x", HookType::forward, 0, torch::zeros({2, 4})), ShapeError);
  EXPECT_THROW(writer.write("x", HookType::forward, 0, torch::zeros({2, 3}, torch::kInt32)), ShapeError);
  writer.close();
  EXPECT_THROW(writer.write("x", HookType::forward, 1, torch::zeros({2, 3})), ConfigError);
  EXPECT_THROW(writer.end_step(1), ConfigError);

  EXPECT_THROW(HDF5Writer(dir / "b.h5", HDF5WriterOptions().compression("brotli")), ConfigError);
  EXPECT_THROW(HDF5Writer(dir / "b.h5", HDF5WriterOptions().compression("gzip:12")), ConfigError);
  EXPECT_THROW(HDF5Writer(dir / "b.h5", HDF5WriterOptions().min_chunk_bytes(1 << 20).max_chunk_bytes(1 << 10)),
               ConfigError);
}

// lz4 and blosc need HDF5's filter plugins: without them, an error that says
// what to install; with them (HDF5_PLUGIN_PATH), files h5py reads back.
TEST(HDF5Writer, PluginCompressionNeedsItsPlugin) {
  TempDir dir;
  const Root root;
  int written = 0;
  for (const auto& [compression, package] : {std::pair{"lz4", "hdf5-filter-plugin"},
                                             std::pair{"blosc:5", "hdf5-filter-plugin-blosc-serial"},
                                             std::pair{"zstd:5", "Debian ships none"}}) {
    const std::string file = dir / (std::string(compression).substr(0, 3) + ".h5");
    std::unique_ptr<HDF5Writer> writer;
    try {
      writer = std::make_unique<HDF5Writer>(file, options_of(root).compression(compression));
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(package), std::string::npos) << e.what();
      continue;
    }
    Recorder recorder(*writer, compression);
    for (int step = 0; step < 3; ++step) {
      recorder.write("x", HookType::forward, torch::randn({1 + step, 300}));
      recorder.end_step();
    }
    writer->close();
    EXPECT_EQ(run_python(script("check_file.py") + " " + recorder.save(dir, file, root, compression)), 0);
    ++written;
  }
  if (written == 0) GTEST_SKIP() << "no HDF5 filter plugin here: only the errors were checked";
}

TEST(HDF5Writer, WriteBlocksOnlyWhileQueuedBytesExceedTheBudget) {
  TempDir dir;
  const std::size_t budget = std::size_t{1} << 20;
  HDF5Writer writer(dir / "acts.h5", HDF5WriterOptions().memory_budget(budget).compression("gzip:6"));
  const torch::Tensor quarter = torch::randn({64, 1024});  // 256 KiB
  for (int step = 0; step < 20; ++step) {
    for (const char* module : {"m0", "m1", "m2", "m3"}) {
      writer.write(module, HookType::forward, step, quarter);
      EXPECT_LE(writer.queued_bytes(), budget);
    }
    writer.end_step(step);
  }
  writer.write("big", HookType::forward, 20, torch::randn({3, 1 << 18}));  // 3 MiB passes alone
  writer.end_step(20);
  writer.close();
  EXPECT_EQ(writer.queued_bytes(), 0u);
  EXPECT_EQ(writer.committed_steps(), 21);
}

// From now on the open descriptors of `file` write to /dev/full, so every
// write fails as on a full disk (ENOSPC), without root.
void fill_disk_under(const std::string& file) {
  for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
    std::error_code error;
    if (fs::read_symlink(entry.path(), error) != file || error) continue;
    const int full = ::open("/dev/full", O_RDWR | O_CLOEXEC);
    ::dup2(full, std::stoi(entry.path().filename().string()));
    ::close(full);
  }
}

TEST(HDF5Writer, ABackgroundErrorSurfacesAtTheNextCall) {
  TempDir dir;
  const std::string file = dir / "full.h5";
  const torch::Tensor rows = torch::randn({512, 1024});
  std::ostringstream log;
  const auto previous_logger = logger();
  set_logger(std::make_shared<spdlog::logger>("hdf5_test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  {
    HDF5Writer writer(file);
    writer.write("big", HookType::forward, 0, rows);
    writer.end_step(0);
    writer.flush();
    fill_disk_under(file);
    writer.write("big", HookType::forward, 1, rows);
    writer.end_step(1);  // queued: the error comes later
    try {
      writer.flush();
      FAIL() << "a write to a full disk went unreported";
    } catch (const IOError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find("'/activations/big/forward' in '" + file + "'"), std::string::npos) << message;
      EXPECT_NE(message.find("No space left on device"), std::string::npos) << message;
    }
    EXPECT_THROW(writer.write("big", HookType::forward, 2, rows), IOError);
    EXPECT_THROW(writer.end_step(2), IOError);
    EXPECT_NO_THROW(writer.close());  // reported already
    EXPECT_EQ(run_python("-c \"import h5py, sys; f = h5py.File('" + file +
                         "', 'r'); sys.exit(0 if f.attrs['steps'] == 1 and f['activations/big/forward'].shape[0] >= 512 "
                         "else 1)\""),
              0);

    HDF5Writer unreported(dir / "unreported.h5");
    fill_disk_under(dir / "unreported.h5.partial");
    unreported.write("big", HookType::forward, 0, rows);
    EXPECT_THROW(unreported.close(), IOError);
    EXPECT_FALSE(fs::exists(dir / "unreported.h5"));  // no step was ever committed
    EXPECT_FALSE(fs::exists(dir / "unreported.h5.partial"));

    auto forgotten = std::make_unique<HDF5Writer>(dir / "forgotten.h5");
    fill_disk_under(dir / "forgotten.h5.partial");
    forgotten->write("big", HookType::forward, 0, rows);
    forgotten.reset();  // the destructor logs what nobody was told
  }
  set_logger(previous_logger);
  EXPECT_NE(log.str().find("closing '" + (dir / "forgotten.h5") + "' failed"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("No space left on device"), std::string::npos) << log.str();
}

TEST(HDF5Writer, DiskFullIsAClearErrorAndKeepsTheCommittedSteps) {
  TempDir dir;
  const fs::path mount_point = dir.path() / "small_disk";
  fs::create_directory(mount_point);
  if (::mount("tmpfs", mount_point.c_str(), "tmpfs", 0, "size=2m") != 0) {
    GTEST_SKIP() << "mounting a 2 MiB tmpfs needs root (CAP_SYS_ADMIN): " << std::strerror(errno);
  }
  struct Unmount {
    const fs::path& path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mount_point};

  const std::string file = (mount_point / "acts.h5").string();
  HDF5Writer writer(file);
  const torch::Tensor small = torch::arange(16 * 256, torch::kFloat32).reshape({16, 256});
  writer.write("layers.0.mlp", HookType::forward, 0, small);
  writer.end_step(0);
  writer.flush();
  std::string message;
  try {
    for (std::int64_t step = 1; step < 100; ++step) {
      writer.write("layers.0.mlp", HookType::forward, step, small.repeat({16, 1}));  // 256 KiB a step
      writer.end_step(step);
    }
    writer.flush();
  } catch (const IOError& e) {
    message = e.what();
  }
  ASSERT_FALSE(message.empty()) << "100 steps of 256 KiB fitted on a 2 MiB disk";
  EXPECT_NE(message.find("'" + file + "'"), std::string::npos) << message;
  EXPECT_NE(message.find("/activations/layers.0.mlp/forward"), std::string::npos) << message;
  EXPECT_NE(message.find("No space left on device"), std::string::npos) << message;
  EXPECT_NO_THROW(writer.close());
  const std::int64_t committed = writer.committed_steps();
  EXPECT_GE(committed, 1);
  // Every committed step reads back; a step the error cut off may leave rows past them.
  EXPECT_EQ(run_python("-c \"import h5py, numpy as np, sys; f = h5py.File('" + file +
                       "', 'r'); n = int(f.attrs['steps']); r = list(f['rows_per_step/layers.0.mlp/forward'][:n]); "
                       "d = f['activations/layers.0.mlp/forward']; base = np.arange(4096, dtype='f4').reshape(16, 256); "
                       "sys.exit(0 if n >= " + std::to_string(committed) + " and r == [16] + [256] * (n - 1) and "
                       "d.shape[0] >= sum(r) and all((d[i:i + 16] == base).all() for i in range(0, sum(r), 16)) "
                       "else 1)\""),
            0);
}

// cache.save writes flex-dump's layout: one step, each call of a hook point a block of rows.
TEST(ActivationCache, SavesOneStepInTheFileLayout) {
  TempDir dir;
  const std::string file = dir / "cache.h5";
  ActivationCache cache;
  cache.add("layers.0.mlp", HookType::forward, torch::arange(6, torch::kFloat).view({2, 3}));
  cache.add("", HookType::forward_pre, torch::arange(4, torch::kLong).view({1, 4}));
  cache.add("layers.0.mlp", HookType::forward, torch::full({1, 3}, 7.0));  // a second call
  cache.save(file);
  EXPECT_EQ(run_python("-c \"import h5py, sys; f = h5py.File('" + file + "', 'r'); "
                       "m = f['activations/layers.0.mlp/forward']; r = f['activations/(root)/forward_pre']; "
                       "sys.exit(0 if int(f.attrs['steps']) == 1 and m[()].tolist() == [[0, 1, 2], [3, 4, 5], [7, 7, 7]] and "
                       "r[()].tolist() == [[0, 1, 2, 3]] and r.dtype == 'int64' and "
                       "list(f['rows_per_step/layers.0.mlp/forward']) == [3] else 1)\""),
            0);
  EXPECT_THROW(cache.save(file), IOError) << "an existing file was replaced without overwrite";
}

// ---- the kill test ------------------------------------------------------

// Keep in step with tests/hdf5/check_killed.py.
torch::Tensor child_values(int k, std::int64_t step) {
  struct Spec {
    c10::ScalarType dtype;
    std::int64_t rows;
    std::vector<std::int64_t> trailing;
  };
  const Spec specs[] = {{torch::kFloat32, 64, {256}},
                        {torch::kFloat32, 1 + step % 3, {16}},
                        {torch::kFloat16, 2, {8}},
                        {torch::kBool, 3, {}}};
  const Spec& spec = specs[k];
  std::vector<std::int64_t> row_shape{spec.rows}, column_shape{1};
  std::int64_t columns = 1;
  for (std::int64_t size : spec.trailing) {
    row_shape.push_back(1);
    column_shape.push_back(size);
    columns *= size;
  }
  const torch::Tensor i = torch::arange(spec.rows).reshape(row_shape);
  if (spec.dtype == torch::kBool) return ((step + i + k) % 2 == 0);
  const torch::Tensor j = spec.trailing.empty() ? torch::zeros({1}, torch::kLong) : torch::arange(columns).reshape(column_shape);
  return ((step * 7919 + k * 104729 + i * 131 + j) % 2039).to(spec.dtype);
}

void write_child_step(HDF5Writer& writer, std::int64_t step) {
  writer.write("layers.0.mlp", HookType::forward, step, child_values(0, step));
  writer.write("layers.0.attn", HookType::forward_pre, step, child_values(1, step));
  writer.write("", HookType::forward, step, child_values(2, step));
  writer.write("lm_head.weight", HookType::tensor, step, child_values(3, step));
  writer.end_step(step);
}

// Writes steps until killed; prints the committed step count as it grows.
[[noreturn]] void child_writer(const std::string& file, const std::string& compression) {
  HDF5Writer writer(file, HDF5WriterOptions().compression(compression).compression_threads(2));
  ::dprintf(1, "ready\n");
  std::int64_t reported = -1;
  for (std::int64_t step = 0;; ++step) {
    write_child_step(writer, step);
    if (step % 4 == 3) writer.flush();
    if (const std::int64_t committed = writer.committed_steps(); committed != reported) {
      ::dprintf(1, "%lld\n", static_cast<long long>(committed));
      reported = committed;
    }
  }
}

// A child writer (child_writer above) that ran until it was killed.
struct KilledWriter {
  std::int64_t reported_steps = 0;  // the committed steps it printed before it died
};

// Forks a child writer of `file` (a fork, not a new program: loading LibTorch
// would take most of a sweep's time) and SIGKILLs it after `delay_ms`, or
// lets its `kill_at_write`th write to a file end it (kill_on_write.c).
KilledWriter run_child_writer(const std::string& file, const std::string& compression, int delay_ms,
                              long kill_at_write = -1) {
  int pipe_ends[2];
  EXPECT_EQ(::pipe(pipe_ends), 0);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(pipe_ends[0]);
    ::dup2(pipe_ends[1], 1);
    // The parent's intra-op threads do not exist in a fork.
    at::set_num_threads(1);
    flexmodel_kill_at_write(kill_at_write);
    try {
      child_writer(file, compression);
    } catch (const std::exception& e) {
      ::dprintf(2, "child writer: %s\n", e.what());
    }
    ::_exit(1);
  }
  ::close(pipe_ends[1]);
  if (child < 0) {
    ADD_FAILURE() << "could not fork a child writer: " << std::strerror(errno);
    ::close(pipe_ends[0]);
    return {};
  }

  std::string output;
  char buffer[4096];
  if (delay_ms >= 0) {
    while (output.find("ready\n") == std::string::npos) {
      const ssize_t got = ::read(pipe_ends[0], buffer, sizeof buffer);
      if (got <= 0) break;
      output.append(buffer, static_cast<std::size_t>(got));
    }
    EXPECT_NE(output.find("ready\n"), std::string::npos) << "the child died before it was ready";
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(child, SIGKILL);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the child ended on its own: " << status;
  for (ssize_t got; (got = ::read(pipe_ends[0], buffer, sizeof buffer)) > 0;) output.append(buffer, got);
  ::close(pipe_ends[0]);
  KilledWriter killed;
  const auto ready = output.find("ready\n");
  std::istringstream lines(ready == std::string::npos ? "" : output.substr(ready + 6));
  for (std::string line; std::getline(lines, line);) killed.reported_steps = std::max<std::int64_t>(killed.reported_steps, std::stoll(line));
  return killed;
}

TEST(HDF5Writer, SurvivesSigkillAtRandomPoints) {
  TempDir dir;
  std::mt19937 random(20240611);
  int appended = 0;
  for (int run = 0; run < 20; ++run) {
    const std::string file = dir / ("killed_" + std::to_string(run) + ".h5");
    const char* compression = run % 2 == 0 ? "none" : "gzip:1";
    const int delay_ms = std::uniform_int_distribution<int>(0, 400)(random);
    const std::int64_t known = run_child_writer(file, compression, delay_ms).reported_steps;
    SCOPED_TRACE("run " + std::to_string(run) + " (" + compression + "), killed after " + std::to_string(delay_ms) +
                 " ms, " + std::to_string(known) + " steps reported committed");
    ASSERT_EQ(run_python(script("check_killed.py") + " " + file + " " + std::to_string(known)), 0);

    // Every third file is continued: the cut-off step is dropped, the rows line up again.
    if (run % 3 == 0 && fs::exists(file)) {
      HDF5Writer writer(file, HDF5WriterOptions().compression(compression).append(true));
      const std::int64_t steps = writer.committed_steps();
      write_child_step(writer, steps);
      write_child_step(writer, steps + 1);
      writer.close();
      EXPECT_EQ(run_python(script("check_killed.py") + " " + file + " " + std::to_string(steps + 2) + " --exact"), 0);
      ++appended;
    }
    std::cout << "run " << run << " (" << compression << "): killed after " << delay_ms << " ms with " << known
              << " steps reported committed\n";
  }
  EXPECT_GE(appended, 2);
}

// The kill lands just before the writer's Nth write to a file: every N of
// the first commits (the file's publication, compressed chunks replacing
// partial ones), then every 6th N over a stretch of some 60 steps — windows
// are wider than 6 writes; a v1 B-tree chunk index split in that stretch and
// left unreadable files for 8 consecutive N.
TEST(HDF5Writer, SurvivesSigkillBeforeAnyWriteOfItsFlushes) {
  TempDir dir;
  const fs::path listing = dir / "killed_files.txt";
  std::ofstream lines(listing);
  int files = 0;
  for (const auto& [compression, first, last, stride] :
       {std::tuple{"gzip:1", 1, 100, 1}, std::tuple{"none", 2400, 3660, 6}}) {
    for (int write = first; write <= last; write += stride) {
      const std::string file = dir / ("killed_" + std::to_string(files++) + ".h5");
      const auto killed = run_child_writer(file, compression, -1, write);
      lines << file << " " << killed.reported_steps << "\n";
    }
  }
  lines.close();
  EXPECT_EQ(run_python(script("check_killed.py") + " --list " + listing.string()), 0);
}

}  // namespace
}  // namespace flexmodel::io

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
