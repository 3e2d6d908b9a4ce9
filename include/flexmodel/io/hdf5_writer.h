// HDF5Writer: a sink that appends every snapshot to an HDF5 file, one dataset
// per hook point, on a background thread with a bounded memory budget.
//
//   flexmodel::io::HDF5Writer h5("acts.h5", flexmodel::io::HDF5WriterOptions().model("gpt2").compression("gzip:4"));
//   h5.write("layers.0.mlp", flexmodel::HookType::forward, 0, snapshot);  // queued, not copied
//   h5.end_step(0);                                                      // step 0 becomes durable
//   h5.close();                                                          // or an error from the background
//
// Layout:
//   /activations/<module_name>/<hook_type>   rows of every step concatenated along dim 0
//                                            ("(root)" for the root module "", a 0-dim tensor is one row)
//   /rows_per_step/<module_name>/<hook_type> int64 [steps]: rows each step added (0 where none);
//                                            the dataset's attribute rows_per_step holds this path
//   /tokens                                  write_tokens' ids, rows of every step concatenated;
//                                            its rows per step in /tokens_rows_per_step
//   root attribute `steps`                   the number of committed steps; what a reader trusts
//
// Durability: once a step is committed (counted by committed_steps(); flush()
// waits for it), a process killed at any later point leaves a file that h5py
// opens and that holds it, but for a narrow window that HDF5 1.10 leaves open
// (src/io/hdf5_format.h says which). The file is created as `<path>.partial`
// and renamed to `<path>` when its first step (or close()) commits.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include <torch/arg.h>
#include <torch/types.h>

#include "flexmodel/hook_function.h"
#include "flexmodel/sink.h"

namespace flexmodel::io {

struct HDF5WriterOptions {
  // Root attributes that describe the run.
  TORCH_ARG(std::string, model) = "";
  TORCH_ARG(std::int64_t, tp) = 1;
  TORCH_ARG(std::int64_t, pp) = 1;
  TORCH_ARG(std::int64_t, dp) = 1;
  // Empty: this process's own command line.
  TORCH_ARG(std::string, command_line) = "";

  // An existing file is replaced (overwrite, once the new file's first step
  // commits) or continued (append; a missing file is created). With neither,
  // an existing path is an IOError.
  TORCH_ARG(bool, overwrite) = false;
  TORCH_ARG(bool, append) = false;
  // Set: the file starts as a copy of this one (a reflink where the filesystem
  // has them) and continues it, checked as append checks; it replaces `path`
  // once its first step commits. The file copied is never written, so a run
  // that fails leaves it byte for byte (in-place append cannot: HDF5 rewrites
  // a file's metadata where it lies). Excludes overwrite and append.
  TORCH_ARG(std::string, continues) = "";

  // "none"; "gzip" or "gzip:N" (N 0-9, default 4; with shuffle; h5py reads it
  // with no plugin); "lz4", "zstd[:N]", "blosc[:N]" need HDF5's filter plugins
  // (Debian: hdf5-filter-plugin) to write and to read.
  TORCH_ARG(std::string, compression) = "none";
  // Threads that shuffle and deflate gzip chunks; 0: HDF5 compresses them in
  // the writer thread (as h5py does).
  TORCH_ARG(int, compression_threads) = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  // bfloat16 is stored as float32 (exact) unless this keeps its raw bits as
  // uint16, marked by the dataset attribute bfloat16_bits = 1.
  TORCH_ARG(bool, keep_bfloat16_bits) = false;

  // write() blocks while the snapshots queued and not yet written exceed this
  // (a step alone may exceed it: write() waits only for earlier steps).
  TORCH_ARG(std::size_t, memory_budget) = std::size_t{1} << 30;

  // A chunk holds one step's rows, split along dim 0 above max_chunk_bytes
  // (a row larger than that along the next dims). Uncompressed chunks are also
  // merged across steps below min_chunk_bytes; compressed ones never are, so
  // that each is written once and the file's size is what its chunks store.
  TORCH_ARG(std::size_t, min_chunk_bytes) = std::size_t{64} << 10;
  TORCH_ARG(std::size_t, max_chunk_bytes) = std::size_t{4} << 20;

  // fsync after every committed step (survives power loss, not only a killed
  // process); close() always fsyncs.
  TORCH_ARG(bool, fsync_each_step) = false;

  // A killed process leaves a file that opens with every step committed so
  // far. This needs HDF5 1.10 (another release is a ConfigError) and, to
  // append, a file whose superblock this writer made; false writes with plain
  // flushes, and a file is then whole only once closed.
  TORCH_ARG(bool, crash_safe) = true;
};

// The module name under which write_tokens' ids travel (its attribute module_name); not a module's.
inline constexpr const char* kTokensName = "(tokens)";

// "/activations/<module_name or (root)>/<hook_type>", and "/tokens" for kTokensName.
std::string hdf5_dataset_path(const std::string& module_name, HookType type);

// Every call may come from any thread; the file is written by one background
// thread. An error met there (disk full, an HDF5 failure) is thrown as IOError,
// naming the file, the dataset and HDF5's error stack, by the next write(),
// end_step() or flush(), and by close() if none of those has thrown it yet.
class HDF5Writer final : public Sink {
 public:
  // Creates (or, with append, opens and checks) the file; IOError when the path
  // exists and neither overwrite nor append is set, or when HDF5 fails, in
  // which case no file is left behind.
  explicit HDF5Writer(const std::string& path, HDF5WriterOptions options = {});
  // Closes; an error is logged, never thrown.
  ~HDF5Writer() override;

  HDF5Writer(const HDF5Writer&) = delete;
  HDF5Writer& operator=(const HDF5Writer&) = delete;

  // Queues `snapshot` (kept by reference: nobody may write to it afterwards).
  // ShapeError when its dtype or trailing shape differs from the dataset's, or
  // its dtype or device cannot be stored.
  void write(const std::string& module_name, HookType type, std::int64_t step,
             const torch::Tensor& snapshot) override;
  // The token ids (int64 [rows, T]) the step's activations come from, as
  // /tokens: a write like the others, joining step `step`.
  void write_tokens(std::int64_t step, const torch::Tensor& ids);
  // Every write since the previous end_step forms the next step of the file;
  // they are queued for the writer thread only now, all together.
  void end_step(std::int64_t step) override;
  // Forgets every write since the previous end_step: none reaches the file.
  void abort_step(std::int64_t step) noexcept override;
  // Blocks until every step ended so far is committed (the writes of a step
  // not yet ended wait for its end_step).
  void flush();
  // Commits writes made after the last end_step as one more step, closes and fsyncs.
  void close() override;

  // Steps in the file that a killed process would keep, earlier runs' included.
  std::int64_t committed_steps() const;
  // Bytes of snapshots queued and not yet written.
  std::size_t queued_bytes() const;
  const std::string& path() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace flexmodel::io
