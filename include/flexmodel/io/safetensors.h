// Safetensors files: the weights of Hugging Face checkpoints, read from a
// read-only memory mapping and written as the format's reference writer does.
//
//   flexmodel::io::SafetensorsFile file("model.safetensors");
//   torch::Tensor wte = file.read("wte.weight");                 // copied out, as entry().scalar_type
//   torch::Tensor half = file.read("wte.weight", 0, 0, 25128);   // only these rows' bytes are read
//   flexmodel::io::save_safetensors("out.safetensors", {{"wte.weight", wte}}, {{"format", "pt"}});
//
// The format: 8 bytes, a little-endian u64 N; N bytes of UTF-8 JSON, an object
// mapping every tensor's name to {"dtype", "shape", "data_offsets": [begin,
// end]} (offsets from the first byte after the header) and an optional
// "__metadata__" object of strings; then the tensors' bytes, little-endian, C
// order. As the reference reader does, the tensors must cover the data with no
// gap and no overlap, and the header may not exceed 100,000,000 bytes.
//
// Dtypes and what read() returns (SafetensorsEntry::scalar_type):
//   BOOL U8 I8 I16 I32 I64 F16 BF16 F32 F64 C64   the same type (C64: complex float)
//   U16 -> int32, U32 -> int64                     widened, exact
//   U64 -> int64                                   exact; a value above INT64_MAX is an IOError
//   F8_E4M3, F8_E5M2, F8_E8M0, F4 -> float32       decoded, exact (E4M3 is the "fn" variant: no
//                                                  infinity; F4 is E2M1, two per byte, the first
//                                                  in the low nibble)
//   F6_E2M3, F6_E3M2                               opened and listed, but read() refuses them
// The same on every LibTorch: 2.x's unsigned and float8 types are not used.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace flexmodel::io {

// One tensor of a file, as its header describes it.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;              // as the file spells it: "BF16", "F8_E4M3"
  c10::ScalarType scalar_type{};  // what read() returns
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // byte offsets in the file (not in its data), end excluded
  std::uint64_t end = 0;
};

// One .safetensors file, memory-mapped read-only: opening it reads the header
// alone, and a tensor's bytes are touched only when read. Opening validates the
// whole header; anything wrong in it is one IOError "'<path>': <what is wrong>"
// (a header length beyond the file, JSON that is not an object of well-formed
// entries or has a key twice, an unknown dtype, offsets outside the data,
// overlapping or leaving a gap, a shape whose size is not its byte count, a
// __metadata__ that is not an object of strings). Nothing is allocated from a
// size the file does not hold.
//
// read() and view() may be called from several threads at once. Not copyable
// or movable: hold it by value or through a pointer. The file must not be
// truncated while open (the mapping would fault on the missing pages).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Ordered by offset in the file (zero-size tensors sharing an offset by name).
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  // nullptr when the file holds no tensor of that name.
  const SafetensorsEntry* find(const std::string& name) const;
  // IOError naming the file and the tensor when it holds none of that name.
  const SafetensorsEntry& entry(const std::string& name) const;
  // The header's __metadata__; empty when it has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The whole tensor, copied (or decoded) out of the mapping into memory of its
  // own, of entry(name).scalar_type. IOError for a BOOL byte other than 0 or 1,
  // a U64 above INT64_MAX, and the F6 dtypes.
  torch::Tensor read(const std::string& name) const;
  // Only [start, start + length) along `dim` (negative counts from the last);
  // only the bytes of those elements are read from the mapping. ConfigError
  // for a 0-d tensor or a range outside the tensor.
  torch::Tensor read(const std::string& name, std::int64_t dim, std::int64_t start, std::int64_t length) const;
  // That part decoded straight into `destination`, a contiguous CPU tensor of
  // its shape and scalar_type (a model's parameter, say): no tensor in
  // between, so a load writes each byte once. ConfigError for another one.
  void read_into(const std::string& name, std::int64_t dim, std::int64_t start, std::int64_t length,
                 const torch::Tensor& destination) const;
  // The tensor over the mapped bytes, copying nothing; it keeps the mapping
  // alive after this object is gone. The memory is read-only: writing to the
  // tensor (in place ops, copy_ into it) ends the process with SIGSEGV, so
  // clone() it first. IOError, saying to use read(), for a dtype that read()
  // converts and for data not aligned to its element size.
  torch::Tensor view(const std::string& name) const;

  // Bytes of the file's data that read() has copied or decoded so far, as they
  // are stored (an F8 element counts 1): a sharded load shows it read only its
  // share. view() counts nothing.
  std::uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }

 private:
  struct Mapping;

  // Elements [first + k * stride, first + k * stride + count) for k in
  // [0, blocks) of a tensor: a part of it of `shape`.
  struct Part {
    const SafetensorsEntry* entry;
    std::vector<std::int64_t> shape;
    std::int64_t blocks, stride, first, count;
  };
  Part part(const std::string& name, std::int64_t dim, std::int64_t start, std::int64_t length) const;
  // Decodes `slice` into `tensor` (contiguous, of its shape and scalar_type).
  void copy_out(const Part& slice, const torch::Tensor& tensor) const;
  // Drops the mapped pages over file bytes [begin, end) from the resident set.
  void release_pages(std::uint64_t begin, std::uint64_t end) const;

  std::string path_;
  std::shared_ptr<const Mapping> mapping_;
  std::vector<SafetensorsEntry> entries_;
  std::unordered_map<std::string, std::size_t> by_name_;
  std::map<std::string, std::string> metadata_;
  mutable std::atomic<std::uint64_t> bytes_read_{0};
};

// A Hugging Face checkpoint's weights in `directory`: model.safetensors, or
// else the shards that model.safetensors.index.json lists ({"weight_map":
// {name: file name}, "metadata": {...}}), as transformers looks for them. Every
// shard is opened (and so validated) up front. The index and the shards must
// agree: a shard file missing, a name the index maps to a shard that lacks it,
// a tensor in a shard the index does not map it to (in two shards, or in none
// of the index's) are each an IOError naming the file.
class SafetensorsCheckpoint {
 public:
  // Whether `directory` holds model.safetensors or model.safetensors.index.json.
  static bool is_checkpoint_directory(const std::string& directory);

  explicit SafetensorsCheckpoint(const std::string& directory);

  const std::string& directory() const { return directory_; }
  // Every tensor's name, sorted.
  std::vector<std::string> names() const;
  // nullptr when no shard holds that name.
  const SafetensorsEntry* find(const std::string& name) const;
  // The shard that holds `name`; IOError naming the directory and the tensor if none does.
  const SafetensorsFile& file_of(const std::string& name) const;
  // SafetensorsFile::read of the shard that holds `name`.
  torch::Tensor read(const std::string& name) const;
  torch::Tensor read(const std::string& name, std::int64_t dim, std::int64_t start, std::int64_t length) const;
  void read_into(const std::string& name, std::int64_t dim, std::int64_t start, std::int64_t length,
                 const torch::Tensor& destination) const;
  // bytes_read() summed over the shards.
  std::uint64_t bytes_read() const;
  // Every tensor's stored size, summed: what a full load reads.
  std::uint64_t bytes_stored() const;

 private:
  std::string directory_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> file_of_;
};

// Writes `tensors` to `path` as the format's reference writer does: the header
// (with "__metadata__" first when `metadata` is not empty) padded with spaces
// to a multiple of 8 bytes, the tensors' data contiguous in the order given.
// Any strides and any device: each tensor is written as its contiguous CPU
// bytes, every dtype of the table above natively (bool, int8-64, uint8, f16,
// bf16, f32, f64, complex float; on LibTorch 2.x also its uint16/32/64 and
// float8 types). The file is written as `path` + ".tmp", synced and renamed,
// so a write that fails (a full disk) leaves `path` as it was and no .tmp
// behind; that failure is an IOError naming the path. An undefined or sparse
// tensor, a dtype the format lacks, an empty, repeated or "__metadata__" name,
// or a string that is not UTF-8 is a ConfigError, raised before anything is
// written.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace flexmodel::io
