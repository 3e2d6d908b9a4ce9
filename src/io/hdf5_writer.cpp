// The HDF5 sink. One background thread makes every HDF5 call after the file
// is opened; gzip chunks are shuffled and deflated by a small pool and written
// whole with H5Dwrite_chunk, so the file reads as if HDF5 had compressed it.
//
// How a killed process keeps its committed steps ("the top" below): see io/hdf5_format.h.
#include "flexmodel/io/hdf5_writer.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <hdf5.h>

#include <torch/types.h>
#include <torch/utils.h>

#include "flexmodel/error.h"
#include "flexmodel/logging.h"
#include "flexmodel/output_map.h"
#include "flexmodel/version.h"
#include "io/hdf5_chunks.h"
#include "io/hdf5_compression.h"
#include "io/hdf5_format.h"
#include "io/hdf5_handles.h"

namespace flexmodel::io {

namespace {

using ::flexmodel::detail::concat;
using namespace ::flexmodel::io::detail;

constexpr std::int64_t kLayoutVersion = 1;
constexpr hsize_t kRowsPerStepChunk = 1024;
// Space a flush may allocate beyond the end it starts from (see flush_file).
constexpr std::uint64_t kFlushReserveBytes = std::uint64_t{1} << 20;

std::string iso8601_utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

std::string own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!raw.empty() && raw.back() == '\0') raw.pop_back();
  std::replace(raw.begin(), raw.end(), '\0', ' ');
  return raw;
}

// Whether `file` never hands freed space out again (free-space strategy NONE),
// which crash safety needs: space the last commit points at stays as it is.
bool reuses_no_space(hid_t file) {
  Handle creation(FLEXMODEL_H5(H5Fget_create_plist(file), "could not read a file's creation properties"), H5Pclose);
  H5F_fspace_strategy_t strategy{};
  hbool_t persist = false;
  hsize_t threshold = 0;
  FLEXMODEL_H5(H5Pget_file_space_strategy(creation.get(), &strategy, &persist, &threshold),
               "could not read a file's free-space strategy");
  return strategy == H5F_FSPACE_STRATEGY_NONE;
}

}  // namespace

// ---- the writer ----------------------------------------------------------

class HDF5Writer::Impl {
 public:
  Impl(const std::string& path, HDF5WriterOptions options);

  void write(const std::string& module_name, HookType type, std::int64_t step, const torch::Tensor& snapshot);
  void end_step(std::int64_t step);
  void abort_step(std::int64_t step) noexcept;
  void flush();
  void close();
  std::int64_t committed_steps() const { return committed_steps_.load(std::memory_order_acquire); }
  std::size_t queued_bytes() const {
    std::lock_guard lock(mutex_);
    return queued_bytes_;
  }
  const std::string& path() const { return path_; }

 private:
  using Key = std::pair<std::string, HookType>;

  // What write() checks a snapshot against, on the caller's side.
  struct Layout {
    Storage storage;
    std::vector<std::int64_t> trailing;
  };

  enum class WriteMode : std::uint8_t {
    raw_chunks,      // H5Dwrite_chunk of the bytes as they are
    deflate_chunks,  // shuffled and deflated by the pool, then H5Dwrite_chunk
    hdf5_filters,    // H5Dwrite: HDF5 runs the filters in this thread
  };

  struct Dataset {
    std::string path;
    Handle data, rows_per_step, type;
    Storage storage;
    std::vector<hsize_t> chunk;  // chunk[0] rows, then the trailing dims' chunk sizes
    std::vector<hsize_t> trailing;
    std::size_t element = 0;
    WriteMode mode = WriteMode::raw_chunks;
    int level = 0;
    std::uint32_t unfiltered = 0;  // the filter mask that skips every filter
    hsize_t rows = 0;       // in the dataset, the current step's included
    hsize_t step_rows = 0;  // added since the last commit
    // Rows [tail_start, rows) of the last, incomplete chunk row, zero padded to chunk[0] rows.
    torch::Tensor tail;
    hsize_t tail_start = 0;
    bool tail_dirty = false;
  };

  struct Item {
    enum class Kind : std::uint8_t { data, end_step, flush, close, abandon };
    Kind kind = Kind::data;
    std::uint64_t sequence = 0;
    std::int64_t step = 0;
    Key key;
    torch::Tensor tensor;
    // Gives the snapshot's bytes back to the budget once nothing refers to it.
    std::shared_ptr<void> budget;
    std::exception_ptr error;  // abandon: why
  };

  struct InFlight {
    Dataset* dataset;
    std::vector<hsize_t> offset;
    std::int64_t step;
    std::future<std::vector<unsigned char>> bytes;
    torch::Tensor input;  // what the pool reads, held until its bytes are written
    std::shared_ptr<void> budget;
  };

  // Caller side.
  void check_usable(const char* call);
  std::uint64_t enqueue(Item item, std::unique_lock<std::mutex>& lock);
  void enqueue_staged();
  bool refuse_unless_continues_file();
  void check_layout(const Key& key, const Layout& layout);
  void release_budget(std::size_t bytes);

  // Opening.
  void lock_partial();
  void create_file();
  void continue_copy();
  void drop_partial() noexcept;
  // Opens `file` to append to it: `path_` itself, or a copy this writer holds the lock of.
  void open_file(const std::string& file, bool locked);
  // hdf5_locks: HDF5's own file lock; off where this writer holds its own.
  Handle file_access(bool hdf5_locks = true) const;
  void load_dataset(const std::string& path);
  WriteMode mode_for(hid_t creation, const Dataset& dataset, int& level) const;
  std::string where(const std::string& object) const { return concat("'", object, "' in '", path_, "'"); }

  // Writer thread.
  void run();
  void process(Item& item);
  void fail(std::exception_ptr error);
  void abandon();
  Dataset& dataset_for(const Key& key, const torch::Tensor& rows);
  void append(Item& item);
  void emit(Dataset& dataset, hsize_t row, torch::Tensor slab, const std::shared_ptr<void>& budget,
            bool partial = false);
  void write_chunk(Dataset& dataset, const std::vector<hsize_t>& offset, const void* bytes, std::size_t size,
                   std::int64_t step, std::uint32_t filter_mask = 0);
  void write_rows(Dataset& dataset, hsize_t row, const torch::Tensor& slab);
  void write_in_flight(std::size_t keep);
  void set_extent(Dataset& dataset);
  void commit(bool new_step, bool last = false);
  void flush_file(const char* what);
  void check_size_limit(std::uint64_t more);
  // Space a flush may allocate past the end it starts from: the chunks of rows_per_step and more.
  std::uint64_t flush_reserve() const {
    return kFlushReserveBytes + datasets_.size() * kRowsPerStepChunk * sizeof(std::int64_t);
  }
  std::string dataset_list() const;
  void finish();

  const std::string path_;
  const HDF5WriterOptions options_;
  const Compression compression_;

  // Shared with the writer thread under mutex_.
  mutable std::mutex mutex_;
  std::condition_variable queued_, space_, done_;
  std::deque<Item> queue_;
  // The writes of the step not yet ended: queued only by end_step (or close),
  // so a step that is aborted never reaches the file.
  std::vector<Item> staged_;
  std::map<Key, Layout> staged_layouts_;  // of datasets the staged writes begin
  std::size_t staged_bytes_ = 0;
  // Appending: the datasets of the file, until the first step has matched them.
  std::set<Key> file_keys_;
  std::size_t queued_bytes_ = 0;  // queued or staged, not yet written
  std::uint64_t next_sequence_ = 0, done_sequence_ = 0;
  std::exception_ptr error_;
  bool error_reported_ = false;
  bool closing_ = false;
  std::map<Key, Layout> layouts_;
  std::atomic<std::int64_t> committed_steps_{0};
  std::mutex close_mutex_;

  // The writer thread's (and the constructor's, before it starts).
  Handle file_, activations_, rows_per_step_;
  std::string file_path_;  // where the file is now: `<path>.partial` until published
  bool published_ = false;
  int file_descriptor_ = -1;
  int partial_lock_ = -1;  // holds the flock on `<path>.partial` while this writer owns it
  const std::uint64_t size_limit_ = file_size_limit();
  Superblock original_superblock_{};  // of a file appended to, as it was before opening
  bool restore_superblock_ = false;    // until the first flush
  std::map<Key, std::unique_ptr<Dataset>> datasets_;
  std::int64_t steps_ = 0;
  std::int64_t step_ = 0;  // the caller's step of the snapshot being written
  bool step_has_writes_ = false;
  bool failed_ = false;
  std::deque<InFlight> in_flight_;
  std::unique_ptr<CompressionPool> pool_;
  std::thread thread_;
};

HDF5Writer::Impl::Impl(const std::string& path, HDF5WriterOptions options)
    : path_(path), options_(std::move(options)), compression_([&] {
        QuietErrors quiet;
        return parse_compression(options_.compression());
      }()) {
  FLEXMODEL_CHECK(int{options_.overwrite()} + int{options_.append()} + int{!options_.continues().empty()} <= 1,
                  ConfigError, "HDF5Writer for '", path_, "': overwrite, append and continues exclude each other");
  FLEXMODEL_CHECK(options_.memory_budget() > 0, ConfigError, "HDF5Writer: memory_budget must be positive");
  if (options_.crash_safe()) {
    unsigned major = 0, minor = 0, release = 0;
    H5get_libversion(&major, &minor, &release);
    FLEXMODEL_CHECK(major == 1 && minor == 10, ConfigError, "HDF5Writer for '", path_,
                    "': keeping files readable after a crash relies on HDF5 1.10's flush order, and this is HDF5 ",
                    major, ".", minor, ".", release, "; pass crash_safe(false) (flex-dump --no-crash-safety) to write "
                    "files that are whole once closed, but may be unreadable after a crash");
  }
  FLEXMODEL_CHECK(options_.min_chunk_bytes() > 0 && options_.min_chunk_bytes() <= options_.max_chunk_bytes() &&
                      options_.max_chunk_bytes() < (std::size_t{1} << 32),
                  ConfigError, "HDF5Writer: chunk bytes need 0 < min_chunk_bytes (", options_.min_chunk_bytes(),
                  ") <= max_chunk_bytes (", options_.max_chunk_bytes(), ") < 4 GiB");
  FLEXMODEL_CHECK(options_.compression_threads() >= 0, ConfigError, "HDF5Writer: compression_threads is ",
                  options_.compression_threads(), ", expected 0 or more");
  FLEXMODEL_CHECK(options_.tp() >= 1 && options_.pp() >= 1 && options_.dp() >= 1, ConfigError,
                  "HDF5Writer: tp, pp and dp are at least 1");

  QuietErrors quiet;
  const bool exists = std::filesystem::exists(path_);
  FLEXMODEL_CHECK(!exists || options_.overwrite() || options_.append() || !options_.continues().empty(), IOError, "'",
                  path_, "' exists: set overwrite(true) to replace it or append(true) to continue it");
  // Replacing or continuing a device, a directory, a socket or a pipe (or a
  // link to one) would destroy or corrupt something that is not a file.
  FLEXMODEL_CHECK(!exists || std::filesystem::is_regular_file(path_), IOError, "'", path_,
                  "' exists and is not a regular file; flexmodel replaces or continues only regular files");
  if (!options_.continues().empty()) {
    continue_copy();
  } else if (exists && options_.append()) {
    open_file(path_, /*locked=*/false);
  } else {
    create_file();
  }
  committed_steps_.store(steps_, std::memory_order_release);
  const bool deflating = compression_.kind == Compression::Kind::gzip ||
                         std::any_of(datasets_.begin(), datasets_.end(), [](const auto& entry) {
                           return entry.second->mode == WriteMode::deflate_chunks;
                         });
  if (deflating && options_.compression_threads() > 0) {
    pool_ = std::make_unique<CompressionPool>(options_.compression_threads());
  }
  logger()->info("HDF5Writer: writing '{}' (compression {}, {} steps already)", path_, compression_.text, steps_);
  thread_ = std::thread([this] { run(); });
}

Handle HDF5Writer::Impl::file_access(bool hdf5_locks) const {
  Handle access(FLEXMODEL_H5(H5Pcreate(H5P_FILE_ACCESS), "could not create a property list"), H5Pclose);
  // The descriptor the superblock is patched through is sec2's, whatever HDF5_DRIVER says.
  FLEXMODEL_H5(H5Pset_fapl_sec2(access.get()), "could not choose HDF5's sec2 driver");
  if (!hdf5_locks) {
    FLEXMODEL_H5(H5Pset_file_locking(access.get(), false, true), "could not turn HDF5's file locks off");
  }
  // Metadata reaches the file only when a step commits (see the top of this file).
  H5AC_cache_config_t cache{};
  cache.version = H5AC__CURR_CACHE_CONFIG_VERSION;
  FLEXMODEL_H5(H5Pget_mdc_config(access.get(), &cache), "could not read the metadata cache settings");
  cache.evictions_enabled = false;
  cache.incr_mode = H5C_incr__off;
  cache.flash_incr_mode = H5C_flash_incr__off;
  cache.decr_mode = H5C_decr__off;
  FLEXMODEL_H5(H5Pset_mdc_config(access.get(), &cache), "could not set the metadata cache settings");
  return access;
}

// Another writer's `<path>.partial` is its own: it holds a lock on it, and
// this writer fails before touching it (HDF5 would truncate the file before
// finding HDF5's lock). A leftover of a killed run holds no lock and is replaced.
void HDF5Writer::Impl::lock_partial() {
  file_path_ = path_ + ".partial";
  partial_lock_ = ::open(file_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  FLEXMODEL_CHECK(partial_lock_ >= 0, IOError, "could not create '", file_path_, "' (for '", path_,
                  "'): ", std::strerror(errno));
  if (::flock(partial_lock_, LOCK_EX | LOCK_NB) != 0) {
    ::close(std::exchange(partial_lock_, -1));
    FLEXMODEL_FAIL(IOError, "'", path_, "' is being written by another writer, which holds '", file_path_,
                   "'; wait for it to finish or write another path");
  }
}

void HDF5Writer::Impl::create_file() {
  lock_partial();
  try {
    Handle creation(FLEXMODEL_H5(H5Pcreate(H5P_FILE_CREATE), "could not create a property list"), H5Pclose);
    FLEXMODEL_H5(H5Pset_file_space_strategy(creation.get(), H5F_FSPACE_STRATEGY_NONE, 0, 1),
                 "could not set the file space strategy");
    Handle access = file_access(/*hdf5_locks=*/false);
    file_ = Handle(FLEXMODEL_H5(H5Fcreate(file_path_.c_str(), H5F_ACC_TRUNC, creation.get(), access.get()),
                                "could not create '", file_path_, "' (for '", path_, "')"),
                   H5Fclose);
    const hid_t root = file_.get();
    const std::string at = where("/");
    write_attribute(root, "layout_version", kLayoutVersion, at);
    write_attribute(root, "flexmodel_version", std::string(kVersion), at);
    write_attribute(root, "model", options_.model(), at);
    write_attribute(root, "tp", options_.tp(), at);
    write_attribute(root, "pp", options_.pp(), at);
    write_attribute(root, "dp", options_.dp(), at);
    write_attribute(root, "command_line",
                    options_.command_line().empty() ? own_command_line() : options_.command_line(), at);
    write_attribute(root, "created", iso8601_utc_now(), at);
    write_attribute(root, "steps", std::int64_t{0}, at);
    activations_ = open_or_create_group(root, "activations", where("/activations"));
    rows_per_step_ = open_or_create_group(root, "rows_per_step", where("/rows_per_step"));
    index_chunks_by_extensible_arrays(root);
    void* handle = nullptr;
    FLEXMODEL_H5(H5Fget_vfd_handle(root, H5P_DEFAULT, &handle), "could not get the descriptor of '", file_path_, "'");
    file_descriptor_ = *static_cast<int*>(handle);
  } catch (...) {
    drop_partial();
    throw;
  }
}

// The copy is `<path>.partial`, created and published as create_file's file is.
void HDF5Writer::Impl::continue_copy() {
  const std::string& source = options_.continues();
  FLEXMODEL_CHECK(std::filesystem::is_regular_file(source), IOError, "cannot continue '", source,
                  "': it is not a regular file");
  lock_partial();
  try {
    const Descriptor from(::open(source.c_str(), O_RDONLY | O_CLOEXEC));
    FLEXMODEL_CHECK(from.fd >= 0, IOError, "could not open '", source, "' to continue it: ", std::strerror(errno));
    struct stat status {};
    FLEXMODEL_CHECK(::fstat(from.fd, &status) == 0, IOError, "could not read the size of '", source,
                    "': ", std::strerror(errno));
    const auto size = static_cast<std::uint64_t>(status.st_size);
    FLEXMODEL_CHECK(size_limit_ == 0 || size + 2 * flush_reserve() <= size_limit_, IOError, "could not copy '",
                    source, "' to '", file_path_, "': File too large (", size, " bytes, about this process's "
                    "file-size limit, ulimit -f, of ", size_limit_, " bytes)");
    FLEXMODEL_CHECK(copy_file_contents(from.fd, partial_lock_), IOError, "could not copy '", source, "' to '",
                    file_path_, "' to continue it: ", std::strerror(errno));
    open_file(file_path_, /*locked=*/true);
  } catch (...) {
    drop_partial();
    throw;
  }
}

// A file that failed half-way is no file; its lock goes with it.
void HDF5Writer::Impl::drop_partial() noexcept {
  activations_.reset();
  rows_per_step_.reset();
  datasets_.clear();
  file_.reset();
  H5Eclear2(H5E_DEFAULT);
  std::error_code ignored;
  std::filesystem::remove(file_path_, ignored);
  ::close(std::exchange(partial_lock_, -1));
}

void HDF5Writer::Impl::open_file(const std::string& file, bool locked) {
  file_path_ = file;
  published_ = file == path_;
  const std::string& name = published_ ? path_ : options_.continues();  // what messages call the file
  bool known = false;
  {
    // HDF5 marks the superblock while the file is open: put back if nothing is committed.
    const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    known = fd >= 0 && original_superblock_.read(fd);
    if (fd >= 0) ::close(fd);
    restore_superblock_ = known && published_;
  }
  Handle access = file_access(/*hdf5_locks=*/!locked);
  file_ = Handle(FLEXMODEL_H5(H5Fopen(file.c_str(), H5F_ACC_RDWR, access.get()), "could not open '", file,
                              "' to append to it"),
                 H5Fclose);
  const hid_t root = file_.get();
  const std::string at = where("/");
  const auto version = read_int_attribute(root, "layout_version", at);
  FLEXMODEL_CHECK(version.has_value(), IOError, "cannot append to '", name,
                  "': it has no root attribute layout_version, so flexmodel did not write it");
  FLEXMODEL_CHECK(*version == kLayoutVersion, IOError, "cannot append to '", name, "': its layout_version is ",
                  *version, ", this flexmodel writes ", kLayoutVersion);
  FLEXMODEL_CHECK(!options_.crash_safe() || (known && reuses_no_space(root)), IOError,
                  "cannot append to '", name, "' crash-safely: its superblock or free-space strategy is not the one "
                  "this writer creates (was it rewritten, by h5repack say?); pass crash_safe(false) (flex-dump "
                  "--no-crash-safety) to append without that guarantee, or write another file");
  steps_ = read_int_attribute(root, "steps", at).value_or(0);
  const auto model = read_string_attribute(root, "model", at).value_or("");
  const auto tp = read_int_attribute(root, "tp", at).value_or(1), pp = read_int_attribute(root, "pp", at).value_or(1),
             dp = read_int_attribute(root, "dp", at).value_or(1);
  // Rows of another model under these names would pass for this one's.
  FLEXMODEL_CHECK(model == options_.model(), IOError, "cannot append to '", name, "': it holds activations of model '",
                  model, "', this run's model is '", options_.model(), "'; write another file");
  if (tp != options_.tp() || pp != options_.pp() || dp != options_.dp()) {
    logger()->warn("HDF5Writer: appending to '{}', written for model '{}' (tp {}, pp {}, dp {}), from model '{}' "
                   "(tp {}, pp {}, dp {}); its root attributes stay",
                   name, model, tp, pp, dp, options_.model(), options_.tp(), options_.pp(), options_.dp());
  }
  activations_ = open_or_create_group(root, "activations", where("/activations"));
  rows_per_step_ = open_or_create_group(root, "rows_per_step", where("/rows_per_step"));
  index_chunks_by_extensible_arrays(root);
  for (const auto& module : link_names(activations_.get(), where("/activations"))) {
    Handle group(FLEXMODEL_H5(H5Gopen2(activations_.get(), module.c_str(), H5P_DEFAULT), "could not open ",
                              where("/activations/" + module)),
                 H5Gclose);
    for (const auto& hook : link_names(group.get(), where("/activations/" + module))) {
      load_dataset(concat("/activations/", module, "/", hook));
    }
  }
  if (FLEXMODEL_H5(H5Lexists(root, "tokens", H5P_DEFAULT), "could not look for ", where("/tokens")) > 0) {
    load_dataset("/tokens");
  }
  void* handle = nullptr;
  FLEXMODEL_H5(H5Fget_vfd_handle(root, H5P_DEFAULT, &handle), "could not get the descriptor of '", file, "'");
  file_descriptor_ = *static_cast<int*>(handle);
}

HDF5Writer::Impl::WriteMode HDF5Writer::Impl::mode_for(hid_t creation, const Dataset& dataset, int& level) const {
  const int count = FLEXMODEL_H5(H5Pget_nfilters(creation), "could not read the filters of ", where(dataset.path));
  std::vector<H5Z_filter_t> filters;
  for (int i = 0; i < count; ++i) {
    unsigned flags = 0, config = 0;
    std::size_t values = 1;
    unsigned value[1] = {0};
    char name[64];
    const H5Z_filter_t filter = FLEXMODEL_H5(
        H5Pget_filter2(creation, static_cast<unsigned>(i), &flags, &values, value, sizeof name, name, &config),
        "could not read the filters of ", where(dataset.path));
    FLEXMODEL_CHECK(H5Zfilter_avail(filter) > 0, IOError, "cannot append to ", where(dataset.path),
                    ": HDF5 cannot load its filter ", filter, " (", name,
                    "): install Debian's hdf5-filter-plugin or set HDF5_PLUGIN_PATH");
    if (filter == H5Z_FILTER_DEFLATE) level = static_cast<int>(value[0]);
    filters.push_back(filter);
  }
  if (filters.empty()) return WriteMode::raw_chunks;
  if (options_.compression_threads() > 0 &&
      filters == std::vector<H5Z_filter_t>{H5Z_FILTER_SHUFFLE, H5Z_FILTER_DEFLATE}) {
    return WriteMode::deflate_chunks;
  }
  return WriteMode::hdf5_filters;
}

void HDF5Writer::Impl::load_dataset(const std::string& path) {
  auto dataset = std::make_unique<Dataset>();
  dataset->path = path;
  const std::string at = where(path);
  dataset->data = Handle(FLEXMODEL_H5(H5Dopen2(file_.get(), path.c_str(), H5P_DEFAULT), "could not open ", at),
                         H5Dclose);
  const hid_t data = dataset->data.get();
  const auto module_name = read_string_attribute(data, "module_name", at);
  const auto hook_type = hook_type_from_name(read_string_attribute(data, "hook_type", at).value_or(""));
  const auto dtype = dtype_from_name(read_string_attribute(data, "torch_dtype", at).value_or(""));
  const auto rows_path = read_string_attribute(data, "rows_per_step", at);
  FLEXMODEL_CHECK(module_name && hook_type && dtype && rows_path, IOError, "cannot append to '", path_, "': ", at,
                  " lacks one of the attributes module_name, hook_type, torch_dtype, rows_per_step");
  dataset->storage = {*dtype, read_int_attribute(data, "bfloat16_bits", at).value_or(0) == 1};
  dataset->type = Handle(FLEXMODEL_H5(H5Dget_type(data), "could not read the type of ", at), H5Tclose);
  Handle expected = file_type(dataset->storage);
  FLEXMODEL_CHECK(FLEXMODEL_H5(H5Tequal(dataset->type.get(), expected.get()), "could not compare types") > 0, IOError,
                  "cannot append to ", at, ": its HDF5 type is not the one flexmodel writes for torch_dtype ",
                  dtype_name(*dtype));
  dataset->element = H5Tget_size(dataset->type.get());

  Handle space(FLEXMODEL_H5(H5Dget_space(data), "could not read the shape of ", at), H5Sclose);
  const int rank = FLEXMODEL_H5(H5Sget_simple_extent_ndims(space.get()), "could not read the shape of ", at);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  FLEXMODEL_H5(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr), "could not read the shape of ", at);
  dataset->trailing.assign(dims.begin() + 1, dims.end());
  Handle creation(FLEXMODEL_H5(H5Dget_create_plist(data), "could not read the layout of ", at), H5Pclose);
  dataset->chunk.resize(dims.size());
  FLEXMODEL_H5(H5Pget_chunk(creation.get(), rank, dataset->chunk.data()), "could not read the chunks of ", at);
  dataset->mode = mode_for(creation.get(), *dataset, dataset->level);
  dataset->unfiltered = (std::uint32_t{1} << H5Pget_nfilters(creation.get())) - 1;

  // Rows of committed steps only: a step cut off by a crash is dropped.
  dataset->rows_per_step = Handle(FLEXMODEL_H5(H5Dopen2(file_.get(), rows_path->c_str(), H5P_DEFAULT),
                                               "could not open ", where(*rows_path)),
                                  H5Dclose);
  Handle rows_space(FLEXMODEL_H5(H5Dget_space(dataset->rows_per_step.get()), "could not read the shape of ",
                                 where(*rows_path)),
                    H5Sclose);
  hsize_t recorded = 0;
  FLEXMODEL_H5(H5Sget_simple_extent_dims(rows_space.get(), &recorded, nullptr), "could not read the shape of ",
               where(*rows_path));
  FLEXMODEL_CHECK(recorded >= static_cast<hsize_t>(steps_), IOError, "cannot append to '", path_, "': ",
                  where(*rows_path), " has ", recorded, " steps, the file ", steps_);
  std::vector<std::int64_t> rows(recorded);
  if (recorded > 0) {
    FLEXMODEL_H5(H5Dread(dataset->rows_per_step.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, rows.data()),
                 "could not read ", where(*rows_path));
  }
  for (std::int64_t step = 0; step < steps_; ++step) dataset->rows += static_cast<hsize_t>(rows[step]);
  FLEXMODEL_CHECK(dataset->rows <= dims[0], IOError, "cannot append to ", at, ": it has ", dims[0],
                  " rows, its rows_per_step say ", dataset->rows);
  if (recorded > static_cast<hsize_t>(steps_) || dims[0] > dataset->rows) {
    logger()->warn("HDF5Writer: dropping {} rows of {} that a step cut off before its commit left", dims[0] - dataset->rows,
                   at);
    const hsize_t steps = static_cast<hsize_t>(steps_);
    FLEXMODEL_H5(H5Dset_extent(dataset->rows_per_step.get(), &steps), "could not shrink ", where(*rows_path));
    set_extent(*dataset);
  }

  const Storage storage = dataset->storage;
  if (const hsize_t have = dataset->rows % dataset->chunk[0]; have > 0) {
    std::vector<std::int64_t> slab{static_cast<std::int64_t>(dataset->chunk[0])};
    slab.insert(slab.end(), dataset->trailing.begin(), dataset->trailing.end());
    dataset->tail = torch::zeros(slab, torch::TensorOptions().dtype(storage.written()));
    dataset->tail_start = dataset->rows - have;
    std::vector<hsize_t> start(dims.size(), 0), count = dims;
    start[0] = dataset->tail_start;
    count[0] = have;
    Handle file_space(FLEXMODEL_H5(H5Dget_space(data), "could not read ", at), H5Sclose);
    FLEXMODEL_H5(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr),
                 "could not select the last rows of ", at);
    Handle memory(FLEXMODEL_H5(H5Screate_simple(rank, count.data(), nullptr), "could not create a dataspace"),
                  H5Sclose);
    FLEXMODEL_H5(H5Dread(data, dataset->type.get(), memory.get(), file_space.get(), H5P_DEFAULT,
                         dataset->tail.data_ptr()),
                 "could not read the last rows of ", at);
  }
  const Key key(*module_name, *hook_type);
  file_keys_.insert(key);
  layouts_[key] = Layout{storage, std::vector<std::int64_t>(dataset->trailing.begin(), dataset->trailing.end())};
  datasets_[key] = std::move(dataset);
}

// ---- caller side ---------------------------------------------------------

void HDF5Writer::Impl::check_usable(const char* call) {
  if (error_) {
    error_reported_ = true;
    std::rethrow_exception(error_);
  }
  FLEXMODEL_CHECK(!closing_, ConfigError, "HDF5Writer for '", path_, "': ", call, "() after close()");
}

std::uint64_t HDF5Writer::Impl::enqueue(Item item, std::unique_lock<std::mutex>& lock) {
  item.sequence = ++next_sequence_;
  const std::uint64_t sequence = item.sequence;
  queue_.push_back(std::move(item));
  lock.unlock();
  queued_.notify_one();
  return sequence;
}

// Under mutex_.
void HDF5Writer::Impl::enqueue_staged() {
  for (auto& item : staged_) {
    item.sequence = ++next_sequence_;
    queue_.push_back(std::move(item));
  }
  staged_.clear();
  staged_bytes_ = 0;
  layouts_.merge(staged_layouts_);
}

// Under mutex_. Appending, the first step must write exactly the datasets of
// the file: rows of other hook points would sit in the file's steps as if one
// run had written them. Else the writer fails, leaving the file as it was.
bool HDF5Writer::Impl::refuse_unless_continues_file() {
  if (file_keys_.empty() || staged_.empty()) return false;
  const std::set<Key> file_keys = std::exchange(file_keys_, {});
  // Token ids are no hook point: a file without them may gain them, and one with them
  // continues without (their rows read 0 in those steps).
  std::set<Key> keys;
  for (const auto& item : staged_) {
    if (item.key.first != kTokensName) keys.insert(item.key);
  }
  std::set<Key> points;
  for (const auto& key : file_keys) {
    if (key.first != kTokensName) points.insert(key);
  }
  if (keys == points) return false;
  std::vector<Key> missing, extra;
  std::set_difference(points.begin(), points.end(), keys.begin(), keys.end(), std::back_inserter(missing));
  std::set_difference(keys.begin(), keys.end(), points.begin(), points.end(), std::back_inserter(extra));
  const auto name = [](const std::vector<Key>& some) {
    return some.empty() ? std::string("none")
                        : concat("'", hdf5_dataset_path(some[0].first, some[0].second), "'",
                                 some.size() > 1 ? concat(" and ", some.size() - 1, " more") : std::string());
  };
  Item item;
  item.kind = Item::Kind::abandon;
  try {
    FLEXMODEL_FAIL(IOError, "cannot append to '", path_, "': its steps hold ", points.size(),
                   " datasets and this run's first step writes ", keys.size(), " (the file's that it lacks: ",
                   name(missing), "; its own that the file lacks: ", name(extra),
                   "); append with the hook points that wrote the file, or write another file");
  } catch (...) {
    item.error = std::current_exception();
    if (!error_) error_ = item.error;
  }
  item.sequence = ++next_sequence_;
  queue_.push_back(std::move(item));
  queued_.notify_one();
  return true;
}

void HDF5Writer::Impl::check_layout(const Key& key, const Layout& layout) {
  auto found = layouts_.find(key);
  if (found == layouts_.end()) {
    found = staged_layouts_.find(key);
    if (found == staged_layouts_.end()) {
      staged_layouts_.emplace(key, layout);
      return;
    }
  }
  const Layout& known = found->second;
  const std::string dataset = hdf5_dataset_path(key.first, key.second);
  FLEXMODEL_CHECK(known.storage.dtype == layout.storage.dtype, ShapeError, "HDF5Writer: '", dataset, "' in '", path_,
                  "' holds ", dtype_name(known.storage.dtype), ", the snapshot is ", dtype_name(layout.storage.dtype));
  FLEXMODEL_CHECK(known.storage.bfloat16_bits == layout.storage.bfloat16_bits, ShapeError, "HDF5Writer: '", dataset,
                  "' in '", path_, "' stores bfloat16 ", known.storage.bfloat16_bits ? "as raw bits" : "as float32",
                  ": open it with keep_bfloat16_bits(", known.storage.bfloat16_bits ? "true" : "false", ")");
  FLEXMODEL_CHECK(known.trailing == layout.trailing, ShapeError, "HDF5Writer: '", dataset, "' in '", path_,
                  "' has rows of shape ", c10::IntArrayRef(known.trailing), ", the snapshot's rows are ",
                  c10::IntArrayRef(layout.trailing), " (only dim 0 may change between writes)");
}

void HDF5Writer::Impl::release_budget(std::size_t bytes) {
  {
    std::lock_guard lock(mutex_);
    queued_bytes_ -= bytes;
  }
  space_.notify_all();
}

void HDF5Writer::Impl::write(const std::string& module_name, HookType type, std::int64_t step,
                             const torch::Tensor& snapshot) {
  const std::string dataset = hdf5_dataset_path(module_name, type);
  FLEXMODEL_CHECK(snapshot.defined(), ShapeError, "HDF5Writer: the snapshot for '", dataset, "' is undefined");
  FLEXMODEL_CHECK(snapshot.device().is_cpu() && snapshot.layout() == torch::kStrided, ShapeError,
                  "HDF5Writer takes dense CPU snapshots; the one for '", dataset, "' is on ", snapshot.device(),
                  " with layout ", snapshot.layout());
  FLEXMODEL_CHECK(storable(snapshot.scalar_type()), ShapeError, "HDF5Writer cannot store ",
                  dtype_name(snapshot.scalar_type()), " (for '", dataset,
                  "'): it stores bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32 and float64");
  FLEXMODEL_CHECK(module_name.find('/') == std::string::npos, ConfigError, "HDF5Writer: module name '", module_name,
                  "' contains '/', which HDF5 reads as a path");
  Layout layout{{snapshot.scalar_type(), snapshot.scalar_type() == torch::kBFloat16 && options_.keep_bfloat16_bits()},
                {}};
  if (snapshot.dim() > 1) layout.trailing.assign(snapshot.sizes().begin() + 1, snapshot.sizes().end());
  for (std::int64_t size : layout.trailing) {
    FLEXMODEL_CHECK(size > 0, ShapeError, "HDF5Writer: the snapshot for '", dataset, "' has shape ", snapshot.sizes(),
                    "; only dim 0 may be empty");
  }
  const std::size_t bytes = snapshot.nbytes();
  // Allocated before the lock, which giving bytes back takes: a bad_alloc
  // under it would wait on itself. Armed with the bytes once they are counted.
  struct Budget {
    Impl* writer;
    std::size_t bytes;
    ~Budget() {
      if (bytes > 0) writer->release_budget(bytes);
    }
  };
  auto budget = std::make_shared<Budget>(Budget{this, 0});
  Item item;
  item.kind = Item::Kind::data;
  item.step = step;
  item.key = Key(module_name, type);
  item.tensor = snapshot;

  std::unique_lock lock(mutex_);
  check_usable("write");
  check_layout(item.key, layout);
  // Waits for the writer's backlog, never for the step being staged.
  space_.wait(lock, [&] {
    return error_ != nullptr || queued_bytes_ == staged_bytes_ || queued_bytes_ + bytes <= options_.memory_budget();
  });
  check_usable("write");
  if (staged_.size() == staged_.capacity()) staged_.reserve(std::max<std::size_t>(16, 2 * staged_.capacity()));
  queued_bytes_ += bytes;
  staged_bytes_ += bytes;
  budget->bytes = bytes;
  item.budget = std::move(budget);
  staged_.push_back(std::move(item));
}

void HDF5Writer::Impl::end_step(std::int64_t step) {
  std::vector<Item> refused;  // dropped after the lock: their budget takes it
  std::unique_lock lock(mutex_);
  check_usable("end_step");
  if (refuse_unless_continues_file()) {
    refused.swap(staged_);
    check_usable("end_step");
  }
  enqueue_staged();
  Item item;
  item.kind = Item::Kind::end_step;
  item.step = step;
  enqueue(std::move(item), lock);
}

void HDF5Writer::Impl::abort_step(std::int64_t step) noexcept {
  std::vector<Item> dropped;
  {
    std::lock_guard lock(mutex_);
    dropped.swap(staged_);
    staged_layouts_.clear();
    staged_bytes_ = 0;
  }
  // Dropping them outside the lock gives their bytes back to the budget.
  logger()->debug("HDF5Writer: dropped the {} writes of aborted step {} of '{}'", dropped.size(), step, path_);
}

void HDF5Writer::Impl::flush() {
  std::unique_lock lock(mutex_);
  check_usable("flush");
  Item item;
  item.kind = Item::Kind::flush;
  const std::uint64_t sequence = enqueue(std::move(item), lock);
  lock.lock();
  done_.wait(lock, [&] { return error_ != nullptr || done_sequence_ >= sequence; });
  check_usable("flush");
}

void HDF5Writer::Impl::close() {
  std::lock_guard closing(close_mutex_);
  if (thread_.joinable()) {
    std::vector<Item> refused;  // dropped after the lock: their budget takes it
    std::unique_lock lock(mutex_);
    closing_ = true;
    if (refuse_unless_continues_file()) refused.swap(staged_);
    enqueue_staged();
    Item item;
    item.kind = Item::Kind::close;
    enqueue(std::move(item), lock);
    thread_.join();
    pool_.reset();
  }
  if (partial_lock_ >= 0) ::close(std::exchange(partial_lock_, -1));
  std::lock_guard lock(mutex_);
  if (error_ && !error_reported_) {
    error_reported_ = true;
    std::rethrow_exception(error_);
  }
}

// ---- writer thread -------------------------------------------------------

void HDF5Writer::Impl::run() {
  pthread_setname_np(pthread_self(), "flexmodel-hdf5");
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // this thread's errors are collected into exceptions
  torch::NoGradGuard no_grad;
  for (;;) {
    Item item;
    {
      std::unique_lock lock(mutex_);
      if (queue_.empty() && !in_flight_.empty()) {
        // Nothing new: write what the pool has compressed, giving budget back.
        lock.unlock();
        try {
          write_in_flight(in_flight_.size() - 1);
        } catch (...) {
          fail(std::current_exception());
        }
        continue;
      }
      queued_.wait(lock, [&] { return !queue_.empty(); });
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    if (!failed_) {
      try {
        process(item);
      } catch (...) {
        fail(std::current_exception());
      }
    }
    const Item::Kind kind = item.kind;
    const std::uint64_t sequence = item.sequence;
    item = Item();  // drops the snapshot and, unless a chunk still needs it, its budget
    {
      std::lock_guard lock(mutex_);
      done_sequence_ = sequence;
    }
    done_.notify_all();
    if (kind == Item::Kind::close) return;
  }
}

void HDF5Writer::Impl::process(Item& item) {
  switch (item.kind) {
    case Item::Kind::data:
      append(item);
      break;
    case Item::Kind::end_step:
      commit(true);
      break;
    case Item::Kind::flush:
      write_in_flight(0);
      break;
    case Item::Kind::close:
      finish();
      break;
    case Item::Kind::abandon:
      std::rethrow_exception(item.error);
  }
}

void HDF5Writer::Impl::fail(std::exception_ptr error) {
  {
    std::lock_guard lock(mutex_);
    if (!error_) error_ = error;
  }
  failed_ = true;
  space_.notify_all();
  done_.notify_all();
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    logger()->debug("HDF5Writer: stopped writing '{}': {}", path_, e.what());
  }
  abandon();
}

void HDF5Writer::Impl::abandon() {
  for (auto& chunk : in_flight_) {
    if (chunk.bytes.valid()) chunk.bytes.wait();
  }
  in_flight_.clear();
  if (file_) {
    // Whatever closing would write belongs to the failed step, and HDF5 1.10
    // leaves a file it failed to close half torn down (to crash at exit). So
    // its descriptor is swapped for an anonymous in-memory file: closing
    // succeeds, and the file on disk keeps its last commit. (That file is
    // held to a file-size limit too, see check_size_limit.)
    const int scratch = ::memfd_create("flexmodel-hdf5-abandoned", MFD_CLOEXEC);
    if (scratch >= 0) {
      ::dup2(scratch, file_descriptor_);
      ::close(scratch);
    }
    datasets_.clear();
    activations_.reset();
    rows_per_step_.reset();
    if (H5Fclose(file_.release()) < 0) {
      logger()->warn("HDF5Writer: could not close '{}' after an error: {}; the process will end without HDF5's "
                     "exit handler, which would crash on it",
                     path_, take_error_stack());
      skip_exit_handlers_from_now();
    }
    if (restore_superblock_) {
      // Appended to and nothing committed: the file goes back to its bytes before opening.
      const int fd = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd < 0 || ::pwrite(fd, original_superblock_.bytes, Superblock::kBytes, 0) !=
                         static_cast<ssize_t>(Superblock::kBytes)) {
        logger()->warn("HDF5Writer: could not restore the superblock of '{}': {}", path_, std::strerror(errno));
      }
      if (fd >= 0) ::close(fd);
    }
  }
  if (!published_) {
    std::error_code ignored;
    std::filesystem::remove(file_path_, ignored);
  }
}

HDF5Writer::Impl::Dataset& HDF5Writer::Impl::dataset_for(const Key& key, const torch::Tensor& rows) {
  if (auto found = datasets_.find(key); found != datasets_.end()) return *found->second;
  auto dataset = std::make_unique<Dataset>();
  const std::string group_name = key.first.empty() ? kRootGroupName : key.first;
  const std::string hook = std::string(to_string(key.second));
  dataset->path = hdf5_dataset_path(key.first, key.second);
  const std::string at = where(dataset->path);
  dataset->storage = {rows.scalar_type(), rows.scalar_type() == torch::kBFloat16 && options_.keep_bfloat16_bits()};
  dataset->type = file_type(dataset->storage);
  dataset->element = H5Tget_size(dataset->type.get());
  dataset->trailing.assign(rows.sizes().begin() + 1, rows.sizes().end());
  dataset->chunk = chunk_shape(static_cast<hsize_t>(rows.size(0)), dataset->trailing, dataset->element,
                               options_.min_chunk_bytes(), options_.max_chunk_bytes(),
                               compression_.kind != Compression::Kind::none);

  std::vector<hsize_t> dims{0}, max_dims{H5S_UNLIMITED};
  dims.insert(dims.end(), dataset->trailing.begin(), dataset->trailing.end());
  max_dims.insert(max_dims.end(), dataset->trailing.begin(), dataset->trailing.end());
  const int rank = static_cast<int>(dims.size());
  Handle space(FLEXMODEL_H5(H5Screate_simple(rank, dims.data(), max_dims.data()), "could not create a dataspace"),
               H5Sclose);
  Handle creation(FLEXMODEL_H5(H5Pcreate(H5P_DATASET_CREATE), "could not create a property list"), H5Pclose);
  FLEXMODEL_H5(H5Pset_chunk(creation.get(), rank, dataset->chunk.data()), "could not set the chunks of ", at);
  FLEXMODEL_H5(H5Pset_obj_track_times(creation.get(), false), "could not create ", at);
  switch (compression_.kind) {
    case Compression::Kind::none:
      dataset->mode = WriteMode::raw_chunks;
      break;
    case Compression::Kind::gzip:
      dataset->unfiltered = 0b11;
      FLEXMODEL_H5(H5Pset_shuffle(creation.get()), "could not set the filters of ", at);
      FLEXMODEL_H5(H5Pset_deflate(creation.get(), static_cast<unsigned>(compression_.level)),
                   "could not set the filters of ", at);
      dataset->mode = pool_ != nullptr ? WriteMode::deflate_chunks : WriteMode::hdf5_filters;
      dataset->level = compression_.level;
      break;
    case Compression::Kind::plugin:
      // Optional: a chunk the filter cannot shrink (blosc refuses to) is stored as it is.
      FLEXMODEL_H5(H5Pset_filter(creation.get(), compression_.filter, H5Z_FLAG_OPTIONAL, compression_.settings.size(),
                                 compression_.settings.data()),
                   "could not set the filters of ", at);
      dataset->mode = WriteMode::hdf5_filters;
      dataset->unfiltered = 0b1;
      break;
  }
  // Token ids sit at the root, their rows per step too: /rows_per_step holds hook points only.
  const bool tokens = key.first == kTokensName;
  Handle group = tokens ? Handle()
                        : open_or_create_group(activations_.get(), group_name, where("/activations/" + group_name));
  dataset->data = Handle(FLEXMODEL_H5(H5Dcreate2(tokens ? file_.get() : group.get(), tokens ? "tokens" : hook.c_str(),
                                                 dataset->type.get(), space.get(), H5P_DEFAULT, creation.get(),
                                                 H5P_DEFAULT),
                                      "could not create ", at),
                         H5Dclose);
  const hid_t data = dataset->data.get();
  const std::string rows_path =
      tokens ? std::string("/tokens_rows_per_step") : concat("/rows_per_step/", group_name, "/", hook);
  write_attribute(data, "module_name", key.first, at);
  write_attribute(data, "hook_type", hook, at);
  write_attribute(data, "torch_dtype", dtype_name(rows.scalar_type()), at);
  write_attribute(data, "rows_per_step", rows_path, at);
  if (dataset->storage.bfloat16_bits) write_attribute(data, "bfloat16_bits", std::int64_t{1}, at);

  // One int64 per step; the steps before this dataset existed read as 0 (the fill value).
  const hsize_t steps = static_cast<hsize_t>(steps_), unlimited = H5S_UNLIMITED;
  Handle rows_space(FLEXMODEL_H5(H5Screate_simple(1, &steps, &unlimited), "could not create a dataspace"), H5Sclose);
  Handle rows_creation(FLEXMODEL_H5(H5Pcreate(H5P_DATASET_CREATE), "could not create a property list"), H5Pclose);
  FLEXMODEL_H5(H5Pset_chunk(rows_creation.get(), 1, &kRowsPerStepChunk), "could not set the chunks of ",
               where(rows_path));
  FLEXMODEL_H5(H5Pset_obj_track_times(rows_creation.get(), false), "could not create ", where(rows_path));
  Handle rows_group = tokens ? Handle()
                            : open_or_create_group(rows_per_step_.get(), group_name, where("/rows_per_step/" + group_name));
  dataset->rows_per_step = Handle(FLEXMODEL_H5(H5Dcreate2(tokens ? file_.get() : rows_group.get(),
                                                          tokens ? "tokens_rows_per_step" : hook.c_str(), H5T_STD_I64LE,
                                                          rows_space.get(), H5P_DEFAULT, rows_creation.get(),
                                                          H5P_DEFAULT),
                                               "could not create ", where(rows_path)),
                                  H5Dclose);
  return *datasets_.emplace(key, std::move(dataset)).first->second;
}

void HDF5Writer::Impl::set_extent(Dataset& dataset) {
  std::vector<hsize_t> dims{dataset.rows};
  dims.insert(dims.end(), dataset.trailing.begin(), dataset.trailing.end());
  FLEXMODEL_H5(H5Dset_extent(dataset.data.get(), dims.data()), "could not resize ", where(dataset.path), " to ",
               dataset.rows, " rows");
}

void HDF5Writer::Impl::append(Item& item) {
  step_ = item.step;
  step_has_writes_ = true;
  torch::Tensor rows = item.tensor.dim() == 0 ? item.tensor.reshape({1}) : item.tensor;
  Dataset& dataset = dataset_for(item.key, rows);
  rows = rows.to(dataset.storage.written()).contiguous();
  const hsize_t count = static_cast<hsize_t>(rows.size(0));
  if (count == 0) return;
  const hsize_t first = dataset.rows, chunk_rows = dataset.chunk[0];
  dataset.rows += count;
  dataset.step_rows += count;
  set_extent(dataset);

  hsize_t taken = 0;
  if (dataset.tail.defined()) {
    const hsize_t have = first - dataset.tail_start;
    taken = std::min(count, chunk_rows - have);
    dataset.tail.narrow(0, static_cast<std::int64_t>(have), static_cast<std::int64_t>(taken))
        .copy_(rows.narrow(0, 0, static_cast<std::int64_t>(taken)));
    dataset.tail_dirty = true;
    if (have + taken == chunk_rows) {
      emit(dataset, dataset.tail_start, std::move(dataset.tail), nullptr);
      dataset.tail = torch::Tensor();
      dataset.tail_dirty = false;
    }
  }
  // Whole chunks go straight from the snapshot's memory.
  for (; count - taken >= chunk_rows; taken += chunk_rows) {
    emit(dataset, first + taken,
         rows.narrow(0, static_cast<std::int64_t>(taken), static_cast<std::int64_t>(chunk_rows)), item.budget);
  }
  if (taken < count) {
    std::vector<std::int64_t> slab{static_cast<std::int64_t>(chunk_rows)};
    slab.insert(slab.end(), dataset.trailing.begin(), dataset.trailing.end());
    dataset.tail = torch::zeros(slab, rows.options());
    dataset.tail.narrow(0, 0, static_cast<std::int64_t>(count - taken))
        .copy_(rows.narrow(0, static_cast<std::int64_t>(taken), static_cast<std::int64_t>(count - taken)));
    dataset.tail_start = first + taken;
    dataset.tail_dirty = true;
  }
}

// Writes the chunks of one row of chunks (`slab`: chunk[0] rows, whole trailing dims).
// A partial row of chunks (a step's last rows, to be completed by later steps)
// goes to disk unfiltered, whole chunks as they are: rewriting it in place
// then never moves committed rows elsewhere in the file (see the top).
void HDF5Writer::Impl::emit(Dataset& dataset, hsize_t row, torch::Tensor slab, const std::shared_ptr<void>& budget,
                            bool partial) {
  const bool unfiltered = partial || dataset.mode == WriteMode::raw_chunks;
  if (!unfiltered && dataset.mode == WriteMode::hdf5_filters) {
    write_rows(dataset, row, slab);
    return;
  }
  const std::size_t rank = dataset.chunk.size();
  std::vector<hsize_t> offset(rank, 0), grid(rank, 1);
  offset[0] = row;
  for (std::size_t d = 1; d < rank; ++d) grid[d] = (dataset.trailing[d - 1] + dataset.chunk[d] - 1) / dataset.chunk[d];
  std::vector<hsize_t> index(rank, 0);
  for (;;) {
    torch::Tensor chunk = slab;
    if (std::any_of(grid.begin() + 1, grid.end(), [](hsize_t n) { return n > 1; })) {
      // A row larger than max_chunk_bytes: cut out this chunk, zero padded at the edges.
      std::vector<std::int64_t> shape(dataset.chunk.begin(), dataset.chunk.end());
      chunk = torch::zeros(shape, slab.options());
      torch::Tensor source = slab, target = chunk;
      for (std::size_t d = 1; d < rank; ++d) {
        const auto start = static_cast<std::int64_t>(index[d] * dataset.chunk[d]);
        const auto length = std::min<std::int64_t>(static_cast<std::int64_t>(dataset.chunk[d]),
                                                   static_cast<std::int64_t>(dataset.trailing[d - 1]) - start);
        source = source.narrow(static_cast<std::int64_t>(d), start, length);
        target = target.narrow(static_cast<std::int64_t>(d), 0, length);
        offset[d] = static_cast<hsize_t>(start);
      }
      target.copy_(source);
    }
    if (unfiltered) {
      write_chunk(dataset, offset, chunk.data_ptr(), chunk.nbytes(), step_, dataset.unfiltered);
    } else {
      // The job gets bare bytes: a tensor released on a pool thread could free a
      // view's base there, out of this thread's sight (and ThreadSanitizer's).
      // Held in in_flight_ before the job starts to read it.
      const auto* input = static_cast<const unsigned char*>(chunk.data_ptr());
      const std::size_t size = chunk.nbytes(), element = dataset.element;
      const int level = dataset.level;
      InFlight& queued = in_flight_.emplace_back(InFlight{&dataset, offset, step_, {}, std::move(chunk), budget});
      try {
        queued.bytes =
            pool_->submit([input, size, element, level] { return shuffle_deflate(input, size, element, level); });
      } catch (...) {
        in_flight_.pop_back();
        throw;
      }
      write_in_flight(4 * pool_->size());
    }
    std::size_t d = rank - 1;
    while (d > 0 && ++index[d] == grid[d]) index[d--] = 0;
    if (d == 0) break;
  }
}

void HDF5Writer::Impl::write_chunk(Dataset& dataset, const std::vector<hsize_t>& offset, const void* bytes,
                                   std::size_t size, std::int64_t step, std::uint32_t filter_mask) {
  check_size_limit(size);
  FLEXMODEL_H5(H5Dwrite_chunk(dataset.data.get(), H5P_DEFAULT, filter_mask, offset.data(), size, bytes),
               "could not write the chunk at row ", offset[0], " of ", where(dataset.path), " (step ", step, ")");
}

void HDF5Writer::Impl::write_rows(Dataset& dataset, hsize_t row, const torch::Tensor& slab) {
  std::vector<hsize_t> slab_dims{dataset.chunk[0]};
  slab_dims.insert(slab_dims.end(), dataset.trailing.begin(), dataset.trailing.end());
  std::vector<hsize_t> start(slab_dims.size(), 0), count = slab_dims;
  count[0] = std::min(dataset.chunk[0], dataset.rows - row);
  const std::string context = concat(" rows from ", row, " of ", where(dataset.path), " (step ", step_, ")");
  check_size_limit(slab.nbytes());
  Handle memory(FLEXMODEL_H5(H5Screate_simple(static_cast<int>(slab_dims.size()), slab_dims.data(), nullptr),
                             "could not create a dataspace"),
                H5Sclose);
  FLEXMODEL_H5(H5Sselect_hyperslab(memory.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr),
               "could not select the", context);
  Handle file_space(FLEXMODEL_H5(H5Dget_space(dataset.data.get()), "could not select the", context), H5Sclose);
  start[0] = row;
  FLEXMODEL_H5(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr),
               "could not select the", context);
  FLEXMODEL_H5(H5Dwrite(dataset.data.get(), dataset.type.get(), memory.get(), file_space.get(), H5P_DEFAULT,
                        slab.data_ptr()),
               "could not write the", context);
}

// Writes compressed chunks in order until at most `keep` wait, then those already done.
void HDF5Writer::Impl::write_in_flight(std::size_t keep) {
  while (!in_flight_.empty() &&
         (in_flight_.size() > keep ||
          in_flight_.front().bytes.wait_for(std::chrono::seconds(0)) == std::future_status::ready)) {
    InFlight& chunk = in_flight_.front();
    const std::vector<unsigned char> bytes = chunk.bytes.get();
    write_chunk(*chunk.dataset, chunk.offset, bytes.data(), bytes.size(), chunk.step);
    in_flight_.pop_front();
  }
}

// A file-size limit (ulimit -f) fails the writer like a full disk, before
// HDF5 writes past it: a file cut there could not even be closed (the
// scratch file of abandon() is held to the limit too), so the end stays a
// flush reserve (and the flush's own) below it.
void HDF5Writer::Impl::check_size_limit(std::uint64_t more) {
  if (size_limit_ == 0) return;
  haddr_t end = 0;
  FLEXMODEL_H5(H5Fget_eoa(file_.get(), &end), "could not read the end of '", path_, "'");
  FLEXMODEL_CHECK(end + more + 2 * flush_reserve() <= size_limit_, IOError, "could not write to '", path_,
                  "': File too large (it would pass this process's file-size limit, ulimit -f, of ", size_limit_,
                  " bytes)");
}

void HDF5Writer::Impl::flush_file(const char* what) {
  check_size_limit(0);
  restore_superblock_ = false;  // from here on the file's metadata may point past its old end
  if (!options_.crash_safe()) {
    FLEXMODEL_H5(H5Fflush(file_.get(), H5F_SCOPE_LOCAL), "could not flush ", what, " of step ", steps_, " to '", path_,
                 "' (datasets ", dataset_list(), ")");
    return;
  }
  // The superblock on disk first records an end past everything the flush
  // may write (see the top), and the file reaches that end: HDF5 refuses a
  // file shorter than its superblock says. The flush may still allocate the
  // chunks of rows_per_step, hence the reserve.
  haddr_t end = 0;
  FLEXMODEL_H5(H5Fget_eoa(file_.get(), &end), "could not read the end of '", path_, "'");
  const std::uint64_t reserved = end + flush_reserve();
  struct stat status {};
  FLEXMODEL_CHECK(::fstat(file_descriptor_, &status) == 0, IOError, "could not stat '", path_,
                  "': ", std::strerror(errno));
  if (static_cast<std::uint64_t>(status.st_size) < reserved) {
    FLEXMODEL_CHECK(::ftruncate(file_descriptor_, static_cast<off_t>(reserved)) == 0, IOError, "could not extend '",
                    path_, "' to ", reserved, " bytes: ", std::strerror(errno));
  }
  Superblock superblock;
  FLEXMODEL_CHECK(superblock.read(file_descriptor_), IOError, "the superblock of '", path_,
                  "' is no longer the version 2 one this writer keeps crash-safe");
  if (superblock.end() < reserved) {
    FLEXMODEL_CHECK(superblock.write_end(file_descriptor_, reserved), IOError, "could not write the superblock of '",
                    path_, "': ", std::strerror(errno));
  }
  FLEXMODEL_H5(H5Fflush(file_.get(), H5F_SCOPE_LOCAL), "could not flush ", what, " of step ", steps_, " to '", path_,
               "' (datasets ", dataset_list(), ")");
}

std::string HDF5Writer::Impl::dataset_list() const {
  std::string names;
  std::size_t listed = 0;
  for (const auto& [key, dataset] : datasets_) {
    if (listed++ == 3) return concat(names, " and ", datasets_.size() - 3, " more");
    names += concat(names.empty() ? "" : ", ", "'", dataset->path, "'");
  }
  return names;
}

void HDF5Writer::Impl::commit(bool new_step, bool last) {
  for (auto& [key, dataset] : datasets_) {
    // HDF5 cannot read-modify-write an unfiltered chunk through its filters,
    // so only the pool's last chunks get compressed on closing.
    const bool compress = last && dataset->mode == WriteMode::deflate_chunks;
    if (dataset->tail_dirty || (compress && dataset->tail.defined())) {
      emit(*dataset, dataset->tail_start, dataset->tail, nullptr, !compress);
      dataset->tail_dirty = false;
    }
  }
  // Also makes the tails safe to append to: no chunk in flight reads them.
  write_in_flight(0);
  if (new_step) {
    const hsize_t steps = static_cast<hsize_t>(steps_) + 1, start = steps - 1, one = 1;
    Handle memory(FLEXMODEL_H5(H5Screate_simple(1, &one, nullptr), "could not create a dataspace"), H5Sclose);
    for (auto& [key, dataset] : datasets_) {
      const hid_t rows = dataset->rows_per_step.get();
      FLEXMODEL_H5(H5Dset_extent(rows, &steps), "could not extend the rows_per_step of ", where(dataset->path));
      Handle space(FLEXMODEL_H5(H5Dget_space(rows), "could not select a step"), H5Sclose);
      FLEXMODEL_H5(H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, &start, nullptr, &one, nullptr),
                   "could not select a step");
      const auto value = static_cast<std::int64_t>(dataset->step_rows);
      FLEXMODEL_H5(H5Dwrite(rows, H5T_NATIVE_INT64, memory.get(), space.get(), H5P_DEFAULT, &value),
                   "could not write the rows_per_step of ", where(dataset->path));
    }
    flush_file("the data");
    write_attribute(file_.get(), "steps", steps_ + 1, where("/"));
    flush_file("the step count");
    ++steps_;
    for (auto& [key, dataset] : datasets_) dataset->step_rows = 0;
    step_has_writes_ = false;
  } else {
    flush_file("the file");
  }
  if (!published_) {
    move_file(file_path_, path_, options_.overwrite() || !options_.continues().empty());
    file_path_ = path_;
    published_ = true;
  }
  if (options_.fsync_each_step()) {
    FLEXMODEL_CHECK(::fsync(file_descriptor_) == 0, IOError, "could not fsync '", path_, "': ", std::strerror(errno));
  }
  // Blocks the commit refers to are now never at the end of the file (see the top).
  if (options_.crash_safe()) FLEXMODEL_H5(H5Fincrement_filesize(file_.get(), 1), "could not extend '", path_, "'");
  committed_steps_.store(steps_, std::memory_order_release);
  logger()->debug("HDF5Writer: committed step {} of '{}'", steps_, path_);
}

void HDF5Writer::Impl::finish() {
  if (step_has_writes_) {
    logger()->info("HDF5Writer: close() commits the writes after the last end_step as step {} of '{}'", steps_,
                   path_);
    commit(true, true);
  } else {
    commit(false, true);  // the last partial chunks, filtered now
  }
  datasets_.clear();
  activations_.reset();
  rows_per_step_.reset();
  FLEXMODEL_H5(H5Fclose(file_.release()), "could not close '", path_, "'");
  if (options_.crash_safe()) trim_to_recorded_end(path_);
  sync_path(path_);
  logger()->info("HDF5Writer: closed '{}' with {} steps", path_, steps_);
}

// ---- public --------------------------------------------------------------

HDF5Writer::HDF5Writer(const std::string& path, HDF5WriterOptions options)
    : impl_(std::make_unique<Impl>(path, std::move(options))) {}

HDF5Writer::~HDF5Writer() {
  try {
    impl_->close();
  } catch (const std::exception& e) {
    logger()->error("HDF5Writer: closing '{}' failed: {}", impl_->path(), e.what());
  }
}

void HDF5Writer::write(const std::string& module_name, HookType type, std::int64_t step,
                       const torch::Tensor& snapshot) {
  impl_->write(module_name, type, step, snapshot);
}
void HDF5Writer::write_tokens(std::int64_t step, const torch::Tensor& ids) {
  FLEXMODEL_CHECK(ids.defined() && ids.scalar_type() == torch::kInt64 && ids.dim() == 2, ShapeError,
                  "HDF5Writer::write_tokens takes int64 ids [rows, positions]");
  impl_->write(kTokensName, HookType::forward, step, ids);
}
void HDF5Writer::end_step(std::int64_t step) { impl_->end_step(step); }
void HDF5Writer::abort_step(std::int64_t step) noexcept { impl_->abort_step(step); }
void HDF5Writer::flush() { impl_->flush(); }
void HDF5Writer::close() { impl_->close(); }
std::int64_t HDF5Writer::committed_steps() const { return impl_->committed_steps(); }
std::size_t HDF5Writer::queued_bytes() const { return impl_->queued_bytes(); }
const std::string& HDF5Writer::path() const { return impl_->path(); }

}  // namespace flexmodel::io
