// The safetensors reader and writer. Nothing in a file is trusted: the header
// length, every entry and the offsets are checked against the file before any
// tensor is allocated, and every malformed header is one IOError naming the
// file. Names and values taken from a file appear in messages JSON-quoted and
// cut short, so that a message stays one line.
#include "flexmodel/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <set>
#include <string_view>
#include <system_error>
#include <tuple>

#include <nlohmann/json.hpp>

#include "flexmodel/error.h"

namespace flexmodel::io {
namespace {

namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian and is copied as it is stored");

// The reference reader refuses larger headers; the writer keeps to it too.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

// How stored elements become the tensor read() returns.
enum class Decoding { native, boolean, u16, u32, u64, f8_e4m3, f8_e5m2, f8_e8m0, f4, refused };

struct Dtype {
  const char* name;
  int bits;
  c10::ScalarType scalar_type;
  Decoding decoding;
};

constexpr Dtype kDtypes[] = {
    {"BOOL", 8, torch::kBool, Decoding::boolean},       {"U8", 8, torch::kUInt8, Decoding::native},
    {"I8", 8, torch::kInt8, Decoding::native},          {"I16", 16, torch::kInt16, Decoding::native},
    {"U16", 16, torch::kInt32, Decoding::u16},          {"I32", 32, torch::kInt32, Decoding::native},
    {"U32", 32, torch::kInt64, Decoding::u32},          {"I64", 64, torch::kInt64, Decoding::native},
    {"U64", 64, torch::kInt64, Decoding::u64},          {"F16", 16, torch::kFloat16, Decoding::native},
    {"BF16", 16, torch::kBFloat16, Decoding::native},   {"F32", 32, torch::kFloat32, Decoding::native},
    {"F64", 64, torch::kFloat64, Decoding::native},     {"C64", 64, torch::kComplexFloat, Decoding::native},
    {"F8_E4M3", 8, torch::kFloat32, Decoding::f8_e4m3}, {"F8_E5M2", 8, torch::kFloat32, Decoding::f8_e5m2},
    {"F8_E8M0", 8, torch::kFloat32, Decoding::f8_e8m0}, {"F4", 4, torch::kFloat32, Decoding::f4},
    {"F6_E2M3", 6, torch::kFloat32, Decoding::refused}, {"F6_E3M2", 6, torch::kFloat32, Decoding::refused}};

const Dtype* find_dtype(const std::string& name) {
  for (const Dtype& dtype : kDtypes) {
    if (name == dtype.name) return &dtype;
  }
  return nullptr;
}

std::string dtype_names() {
  std::string names;
  for (const Dtype& dtype : kDtypes) names += (names.empty() ? "" : ", ") + std::string(dtype.name);
  return names;
}

std::string errno_text() { return std::error_code(errno, std::generic_category()).message(); }

// `value` as JSON, at most 120 characters.
std::string excerpt(const nlohmann::json& value) {
  const std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return text.size() <= 120 ? text : text.substr(0, 117) + "...";
}

std::string quoted(const std::string& text) { return excerpt(nlohmann::json(text)); }

// Parses `text`, refusing a key twice in one object, which nlohmann would
// otherwise settle silently by keeping the last.
nlohmann::json parse_json(std::string_view text, const std::string& path, const char* what) {
  std::vector<std::set<std::string>> keys;
  std::string repeated;
  const auto note_keys = [&](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::object_start) keys.emplace_back();
    if (event == nlohmann::json::parse_event_t::object_end) keys.pop_back();
    if (event == nlohmann::json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second &&
        repeated.empty()) {
      repeated = quoted(parsed.get<std::string>());
    }
    return true;
  };
  nlohmann::json parsed;
  try {
    parsed = nlohmann::json::parse(text.begin(), text.end(), note_keys);
  } catch (const nlohmann::json::exception& error) {
    FLEXMODEL_FAIL(IOError, "'", path, "': its ", what, " is not valid JSON: ", error.what());
  }
  FLEXMODEL_CHECK(repeated.empty(), IOError, "'", path, "': its ", what, " has the key ", repeated,
                  " twice in one object");
  return parsed;
}

bool is_size(const nlohmann::json& value) {
  return value.is_number_unsigned() &&
         value.get<std::uint64_t>() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
}

std::int64_t element_count(const std::vector<std::int64_t>& shape, std::size_t from = 0,
                           std::size_t to = std::numeric_limits<std::size_t>::max()) {
  std::int64_t count = 1;
  for (std::size_t d = from; d < std::min(to, shape.size()); ++d) count *= shape[d];
  return count;
}

// One tensor of the header, checked against the dtypes and the data's extent
// (offsets made absolute). What it shares with its neighbours is checked after.
SafetensorsEntry parse_entry(const std::string& name, const nlohmann::json& value, std::uint64_t data_start,
                             std::uint64_t data_size, const std::string& path) {
  const std::string tensor = "tensor " + quoted(name);
  FLEXMODEL_CHECK(value.is_object(), IOError, "'", path, "': ", tensor, " is described by ", excerpt(value),
                  ", not an object of dtype, shape and data_offsets");
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    FLEXMODEL_CHECK(value.contains(key), IOError, "'", path, "': ", tensor, " has no \"", key, "\"");
  }
  const nlohmann::json& dtype_value = value["dtype"];
  FLEXMODEL_CHECK(dtype_value.is_string(), IOError, "'", path, "': ", tensor, " has dtype ", excerpt(dtype_value),
                  "; a dtype is a string such as \"F32\"");
  const Dtype* dtype = find_dtype(dtype_value.get<std::string>());
  FLEXMODEL_CHECK(dtype != nullptr, IOError, "'", path, "': ", tensor, " has dtype ", excerpt(dtype_value),
                  ", which the format does not define; it defines ", dtype_names());

  const nlohmann::json& shape_value = value["shape"];
  FLEXMODEL_CHECK(shape_value.is_array() && std::all_of(shape_value.begin(), shape_value.end(), is_size), IOError, "'",
                  path, "': ", tensor, " has shape ", excerpt(shape_value),
                  "; a shape is a list of non-negative integers");
  const nlohmann::json& offsets = value["data_offsets"];
  FLEXMODEL_CHECK(
      offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() && offsets[1].is_number_unsigned(),
      IOError, "'", path, "': ", tensor, " has data_offsets ", excerpt(offsets),
      "; they are two non-negative integers [begin, end]");
  const auto begin = offsets[0].get<std::uint64_t>(), end = offsets[1].get<std::uint64_t>();
  FLEXMODEL_CHECK(begin <= end, IOError, "'", path, "': ", tensor, " has data_offsets ", excerpt(offsets),
                  ", which end before they begin");
  FLEXMODEL_CHECK(end <= data_size, IOError, "'", path, "': ", tensor, " has data_offsets ", excerpt(offsets),
                  ", beyond the ", data_size, " bytes of data the file holds");

  SafetensorsEntry entry{name, dtype->name, dtype->scalar_type, {}, data_start + begin, data_start + end};
  // The product of the sizes (as 1 where 0) bounds every stride of the tensor:
  // it must fit in int64 even when the tensor holds nothing.
  constexpr auto kLimit = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  std::uint64_t span = 1;
  bool empty = false;
  for (const auto& size_value : shape_value) {
    const auto size = size_value.get<std::uint64_t>();
    empty = empty || size == 0;
    const std::uint64_t factor = std::max<std::uint64_t>(size, 1);
    FLEXMODEL_CHECK(span <= kLimit / factor, IOError, "'", path, "': ", tensor, " has shape ", excerpt(shape_value),
                    ", more elements than a tensor can hold");
    span *= factor;
    entry.shape.push_back(static_cast<std::int64_t>(size));
  }
  const std::uint64_t elements = empty ? 0 : span;
  const std::uint64_t bytes = end - begin;
  const auto bits = static_cast<std::uint64_t>(dtype->bits);
  FLEXMODEL_CHECK(elements <= std::numeric_limits<std::uint64_t>::max() / bits, IOError, "'", path, "': ", tensor,
                  " of dtype ", dtype->name, " and shape ", excerpt(shape_value), " has ", elements,
                  " elements, more bytes than any file holds");
  FLEXMODEL_CHECK(elements * bits % 8 == 0, IOError, "'", path, "': ", tensor, " has ", elements, " elements of ",
                  dtype->name, ", ", elements * bits, " bits: not a whole number of bytes");
  FLEXMODEL_CHECK(elements * bits / 8 == bytes, IOError, "'", path, "': ", tensor, " of dtype ", dtype->name,
                  " and shape ", excerpt(shape_value), " is ", elements * bits / 8, " bytes, but its data_offsets ",
                  excerpt(offsets), " span ", bytes);
  return entry;
}

using Table = std::array<float, 256>;

template <class Decode>
Table tabulate(Decode decode) {
  Table table{};
  for (int bits = 0; bits < 256; ++bits) table[bits] = decode(bits);
  return table;
}

float with_sign(int sign, float magnitude) { return sign ? -magnitude : magnitude; }

// Every value of each 8-bit float, decoded once.
const Table& f8_table(Decoding decoding) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  // S.EEEE.MMM, bias 7, no infinity; S.1111.111 is NaN (the "fn" variant).
  static const Table e4m3 = tabulate([=](int b) {
    const int exponent = (b >> 3) & 15, mantissa = b & 7;
    if (exponent == 15 && mantissa == 7) return with_sign(b >> 7, kNaN);
    return with_sign(b >> 7,
                     exponent == 0 ? std::ldexp(float(mantissa), -9) : std::ldexp(float(8 + mantissa), exponent - 10));
  });
  // S.EEEEE.MM, bias 15, IEEE-like: exponent 31 is infinity or NaN.
  static const Table e5m2 = tabulate([=](int b) {
    const int exponent = (b >> 2) & 31, mantissa = b & 3;
    if (exponent == 31) return with_sign(b >> 7, mantissa == 0 ? std::numeric_limits<float>::infinity() : kNaN);
    return with_sign(b >> 7,
                     exponent == 0 ? std::ldexp(float(mantissa), -16) : std::ldexp(float(4 + mantissa), exponent - 17));
  });
  // A bare exponent, bias 127: 2^(b - 127), and 0xff is NaN (float32 holds 2^-127 as a subnormal).
  static const Table e8m0 = tabulate([=](int b) { return b == 255 ? kNaN : std::ldexp(1.0f, b - 127); });
  return decoding == Decoding::f8_e4m3 ? e4m3 : decoding == Decoding::f8_e5m2 ? e5m2 : e8m0;
}

// S.EE.M, bias 1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
float f4_value(int nibble) {
  const int exponent = (nibble >> 1) & 3, mantissa = nibble & 1;
  return with_sign(nibble >> 3, exponent == 0 ? 0.5f * mantissa : std::ldexp(float(2 + mantissa), exponent - 2));
}

// Bytes that elements [first, first + count) occupy, sub-byte elements included.
std::uint64_t stored_bytes(int bits, std::int64_t first, std::int64_t count) {
  const auto begin_bit = static_cast<std::uint64_t>(first) * bits;
  const auto end_bit = static_cast<std::uint64_t>(first + count) * bits;
  return (end_bit + 7) / 8 - begin_bit / 8;
}

void check_bools(const unsigned char* data, std::int64_t first, std::int64_t count, const std::string& path,
                 const std::string& name) {
  const unsigned char* bad = std::find_if(data + first, data + first + count, [](unsigned char b) { return b > 1; });
  FLEXMODEL_CHECK(bad == data + first + count, IOError, "'", path, "': tensor ", quoted(name), " holds the byte ",
                  static_cast<int>(*bad), " at element ", bad - data, "; a BOOL is 0 or 1");
}

template <class Stored, class Wide>
void widen(const unsigned char* in, std::int64_t count, unsigned char* out) {
  for (std::int64_t i = 0; i < count; ++i) {
    Stored value;
    std::memcpy(&value, in + i * sizeof(Stored), sizeof(Stored));
    const Wide wide = value;
    std::memcpy(out + i * sizeof(Wide), &wide, sizeof(Wide));
  }
}

// Elements [first, first + count) of the tensor stored at `data`, into `out`
// as read() returns them.
void decode(const Dtype& dtype, const unsigned char* data, std::int64_t first, std::int64_t count, unsigned char* out,
            const std::string& path, const std::string& name) {
  const unsigned char* in = data + first * dtype.bits / 8;
  switch (dtype.decoding) {
    case Decoding::boolean:
      check_bools(data, first, count, path, name);
      [[fallthrough]];
    case Decoding::native:
      std::memcpy(out, in, static_cast<std::size_t>(count) * (dtype.bits / 8));
      return;
    case Decoding::u16:
      return widen<std::uint16_t, std::int32_t>(in, count, out);
    case Decoding::u32:
      return widen<std::uint32_t, std::int64_t>(in, count, out);
    case Decoding::u64:
      for (std::int64_t i = 0; i < count; ++i) {
        std::uint64_t value;
        std::memcpy(&value, in + i * 8, 8);
        FLEXMODEL_CHECK(value <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), IOError, "'",
                        path, "': tensor ", quoted(name), " holds ", value, " at element ", first + i,
                        ", more than the int64 a U64 is read as can hold");
      }
      std::memcpy(out, in, static_cast<std::size_t>(count) * 8);
      return;
    case Decoding::f8_e4m3:
    case Decoding::f8_e5m2:
    case Decoding::f8_e8m0: {
      const Table& table = f8_table(dtype.decoding);
      auto* values = reinterpret_cast<float*>(out);
      for (std::int64_t i = 0; i < count; ++i) values[i] = table[in[i]];
      return;
    }
    case Decoding::f4: {
      auto* values = reinterpret_cast<float*>(out);
      for (std::int64_t i = 0; i < count; ++i) {
        const std::int64_t element = first + i;
        const unsigned char byte = data[element / 2];
        values[i] = f4_value(element % 2 == 0 ? byte & 15 : byte >> 4);
      }
      return;
    }
    case Decoding::refused:  // copy_out refuses these before decoding anything
      return;
  }
}

// A file descriptor, closed on every path out.
class Descriptor {
 public:
  explicit Descriptor(int fd) : fd_(fd) {}
  ~Descriptor() { close(); }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  int get() const { return fd_; }
  // Closes now; -1 with errno where closing failed (a write-back error shows here).
  int close() {
    const int result = fd_ >= 0 ? ::close(fd_) : 0;
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

// `path` + ".tmp" while it is written; removed unless commit() renamed it to `path`.
class PendingFile {
 public:
  explicit PendingFile(const std::string& path)
      : path_(path),
        temporary_(path + ".tmp"),
        fd_(::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666)) {
    FLEXMODEL_CHECK(fd_.get() >= 0, IOError, "cannot write '", path_, "': creating '", temporary_,
                    "' failed: ", errno_text());
  }
  ~PendingFile() {
    if (!committed_) {
      fd_.close();
      ::unlink(temporary_.c_str());
    }
  }
  PendingFile(const PendingFile&) = delete;
  PendingFile& operator=(const PendingFile&) = delete;

  void write(const void* data, std::size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    while (size > 0) {
      const ssize_t written = ::write(fd_.get(), bytes, std::min<std::size_t>(size, std::size_t{1} << 30));
      if (written < 0 && errno == EINTR) continue;
      FLEXMODEL_CHECK(written > 0, IOError, "cannot write '", path_,
                      "': ", written < 0 ? errno_text() : std::string("the file takes no more bytes"));
      bytes += written;
      size -= static_cast<std::size_t>(written);
    }
  }

  // Synced before the rename, so that `path` is never a file half written.
  void commit() {
    FLEXMODEL_CHECK(::fsync(fd_.get()) == 0 && fd_.close() == 0, IOError, "cannot write '", path_, "': ", errno_text());
    FLEXMODEL_CHECK(std::rename(temporary_.c_str(), path_.c_str()) == 0, IOError, "cannot write '", path_,
                    "': renaming '", temporary_, "' to it failed: ", errno_text());
    committed_ = true;
  }

 private:
  std::string path_, temporary_;
  Descriptor fd_;
  bool committed_ = false;
};

// The format's name for a LibTorch dtype; empty where it has none.
std::string format_dtype(c10::ScalarType type) {
  for (const Dtype& dtype : kDtypes) {
    if ((dtype.decoding == Decoding::native || dtype.decoding == Decoding::boolean) && dtype.scalar_type == type) {
      return dtype.name;
    }
  }
  // LibTorch 2.x's unsigned and float8 types, by name: 1.13 lacks the enumerators.
  static const std::map<std::string, std::string> kNewer = {{"UInt16", "U16"},          {"UInt32", "U32"},
                                                            {"UInt64", "U64"},          {"Float8_e4m3fn", "F8_E4M3"},
                                                            {"Float8_e5m2", "F8_E5M2"}, {"Float8_e8m0fnu", "F8_E8M0"}};
  const auto found = kNewer.find(c10::toString(type));
  return found == kNewer.end() ? std::string() : found->second;
}

}  // namespace

struct SafetensorsFile::Mapping {
  Mapping(const unsigned char* bytes, std::size_t size) : bytes(bytes), size(size) {}
  ~Mapping() { ::munmap(const_cast<unsigned char*>(bytes), size); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  const unsigned char* const bytes;
  const std::size_t size;
};

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  // O_NONBLOCK: a FIFO must not wait for a writer before it is refused below.
  Descriptor fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  FLEXMODEL_CHECK(fd.get() >= 0, IOError, "cannot open '", path, "': ", errno_text());
  struct stat status {};
  FLEXMODEL_CHECK(::fstat(fd.get(), &status) == 0, IOError, "cannot open '", path, "': ", errno_text());
  FLEXMODEL_CHECK(S_ISREG(status.st_mode), IOError, "cannot open '", path, "': not a regular file");
  const auto size = static_cast<std::uint64_t>(status.st_size);
  FLEXMODEL_CHECK(size >= 8, IOError, "'", path, "': ", size,
                  " bytes, shorter than the 8-byte header length a .safetensors file begins with");
  void* address = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  FLEXMODEL_CHECK(address != MAP_FAILED, IOError, "cannot map '", path, "': ", errno_text());
  mapping_ = std::make_shared<const Mapping>(static_cast<const unsigned char*>(address), size);
  const unsigned char* bytes = mapping_->bytes;

  std::uint64_t header_length = 0;
  std::memcpy(&header_length, bytes, 8);
  FLEXMODEL_CHECK(header_length <= size - 8, IOError, "'", path, "': claims a header of ", header_length,
                  " bytes, but ", size - 8, " follow its length");
  FLEXMODEL_CHECK(header_length <= kMaxHeaderBytes, IOError, "'", path, "': has a header of ", header_length,
                  " bytes, more than the ", kMaxHeaderBytes, " the format allows");
  const nlohmann::json header =
      parse_json(std::string_view(reinterpret_cast<const char*>(bytes) + 8, header_length), path, "header");
  FLEXMODEL_CHECK(header.is_object(), IOError, "'", path, "': its header is ", excerpt(header),
                  ", not a JSON object of tensors");

  const std::uint64_t data_start = 8 + header_length, data_size = size - data_start;
  for (const auto& [name, value] : header.items()) {
    if (name != "__metadata__") {
      entries_.push_back(parse_entry(name, value, data_start, data_size, path));
      continue;
    }
    // null is the reference's "no metadata" as well.
    const bool strings = value.is_null() ||
                         (value.is_object() && std::all_of(value.begin(), value.end(), [](const nlohmann::json& item) {
                            return item.is_string();
                          }));
    FLEXMODEL_CHECK(strings, IOError, "'", path, "': its __metadata__ is ", excerpt(value),
                    ", not an object of strings");
    if (value.is_object()) metadata_ = value.get<std::map<std::string, std::string>>();
  }

  std::sort(entries_.begin(), entries_.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // As the reference reader: the tensors cover the data exactly, in offset order.
  std::uint64_t covered = data_start;
  const SafetensorsEntry* last = nullptr;
  for (const SafetensorsEntry& entry : entries_) {
    FLEXMODEL_CHECK(entry.begin >= covered, IOError, "'", path, "': tensor ", quoted(entry.name), " (data_offsets [",
                    entry.begin - data_start, ", ", entry.end - data_start, "]) overlaps tensor ", quoted(last->name),
                    " ([", last->begin - data_start, ", ", last->end - data_start, "])");
    FLEXMODEL_CHECK(entry.begin == covered, IOError, "'", path, "': no tensor holds bytes [", covered - data_start,
                    ", ", entry.begin - data_start, ") of its data; the format leaves no gaps");
    if (entry.end > entry.begin) last = &entry;
    covered = entry.end;
  }
  FLEXMODEL_CHECK(covered == size, IOError, "'", path, "': no tensor holds bytes [", covered - data_start, ", ",
                  data_size, ") of its data; the format leaves no gaps");
  for (std::size_t i = 0; i < entries_.size(); ++i) by_name_.emplace(entries_[i].name, i);
}

SafetensorsFile::~SafetensorsFile() = default;

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  const auto found = by_name_.find(name);
  return found == by_name_.end() ? nullptr : &entries_[found->second];
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const SafetensorsEntry* found = find(name);
  FLEXMODEL_CHECK(found != nullptr, IOError, "'", path_, "' holds no tensor ", quoted(name));
  return *found;
}

torch::Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsEntry& found = entry(name);
  torch::Tensor tensor = torch::empty(found.shape, torch::TensorOptions().dtype(found.scalar_type));
  copy_out({&found, found.shape, 1, 0, 0, element_count(found.shape)}, tensor);
  return tensor;
}

SafetensorsFile::Part SafetensorsFile::part(const std::string& name, std::int64_t dim, std::int64_t start,
                                            std::int64_t length) const {
  const SafetensorsEntry& found = entry(name);
  const auto rank = static_cast<std::int64_t>(found.shape.size());
  FLEXMODEL_CHECK(rank > 0, ConfigError, "'", path_, "': tensor ", quoted(name),
                  " is 0-dimensional: it has no dim to read part of");
  FLEXMODEL_CHECK(dim >= -rank && dim < rank, ConfigError, "'", path_, "': tensor ", quoted(name), " has ", rank,
                  " dims; dim ", dim, " is not one of them");
  if (dim < 0) dim += rank;
  const std::int64_t size = found.shape[dim];
  FLEXMODEL_CHECK(start >= 0 && length >= 0 && start <= size && length <= size - start, ConfigError, "'", path_,
                  "': tensor ", quoted(name), " has size ", size, " along dim ", dim, "; start ", start, " and length ",
                  length, " do not lie within it");
  const auto d = static_cast<std::size_t>(dim);
  const std::int64_t inner = element_count(found.shape, d + 1);
  std::vector<std::int64_t> shape = found.shape;
  shape[d] = length;
  return {&found, std::move(shape), element_count(found.shape, 0, d), size * inner, start * inner, length * inner};
}

torch::Tensor SafetensorsFile::read(const std::string& name, std::int64_t dim, std::int64_t start,
                                    std::int64_t length) const {
  const Part slice = part(name, dim, start, length);
  torch::Tensor tensor = torch::empty(slice.shape, torch::TensorOptions().dtype(slice.entry->scalar_type));
  copy_out(slice, tensor);
  return tensor;
}

void SafetensorsFile::read_into(const std::string& name, std::int64_t dim, std::int64_t start, std::int64_t length,
                                const torch::Tensor& destination) const {
  const Part slice = part(name, dim, start, length);
  FLEXMODEL_CHECK(destination.is_contiguous() && destination.device().is_cpu() &&
                      destination.scalar_type() == slice.entry->scalar_type &&
                      destination.sizes() == c10::IntArrayRef(slice.shape),
                  ConfigError, "'", path_, "': tensor ", quoted(name), " reads as a contiguous CPU ",
                  slice.entry->scalar_type, " ", c10::IntArrayRef(slice.shape), ", not into a ",
                  destination.scalar_type(), " ", destination.sizes(),
                  destination.is_contiguous() ? "" : " that is not contiguous", " on ", destination.device());
  copy_out(slice, destination);
}

void SafetensorsFile::copy_out(const Part& slice, const torch::Tensor& tensor) const {
  const SafetensorsEntry& entry = *slice.entry;
  const Dtype& dtype = *find_dtype(entry.dtype);
  FLEXMODEL_CHECK(dtype.decoding != Decoding::refused, IOError, "'", path_, "': tensor ", quoted(entry.name), " is ",
                  dtype.name, ", which this library does not decode");
  // An empty tensor may have no memory at all to write to.
  if (tensor.numel() == 0) return;
  auto* out = static_cast<unsigned char*>(tensor.data_ptr());
  const auto out_bytes = slice.count * static_cast<std::int64_t>(tensor.element_size());
  const unsigned char* data = mapping_->bytes + entry.begin;
  std::uint64_t stored = 0;
  for (std::int64_t block = 0; block < slice.blocks; ++block) {
    decode(dtype, data, slice.first + block * slice.stride, slice.count, out + block * out_bytes, path_, entry.name);
    stored += stored_bytes(dtype.bits, slice.first + block * slice.stride, slice.count);
  }
  bytes_read_.fetch_add(stored, std::memory_order_relaxed);
  // The mapped pages just read leave this process's resident set (they stay in
  // the page cache): a load holds each weight once, not once more as file pages.
  const std::int64_t last = slice.first + (slice.blocks - 1) * slice.stride + slice.count;
  release_pages(entry.begin + static_cast<std::uint64_t>(slice.first) * dtype.bits / 8,
                entry.begin + stored_bytes(dtype.bits, 0, last));
}

void SafetensorsFile::release_pages(std::uint64_t begin, std::uint64_t end) const {
  static const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t first = begin / page * page, last = std::min<std::uint64_t>((end + page - 1) / page * page,
                                                                                  mapping_->size);
  // Advice only: pages a view() still shows fault back in from the file, unchanged.
  if (last > first) ::madvise(const_cast<unsigned char*>(mapping_->bytes) + first, last - first, MADV_DONTNEED);
}

torch::Tensor SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& found = entry(name);
  const Dtype& dtype = *find_dtype(found.dtype);
  FLEXMODEL_CHECK(dtype.decoding == Decoding::native || dtype.decoding == Decoding::boolean, IOError, "'", path_,
                  "': tensor ", quoted(name), " is ", found.dtype,
                  ", which LibTorch does not hold as stored; use read(), which converts it to ", found.scalar_type);
  const unsigned char* data = mapping_->bytes + found.begin;
  const int element_bytes = dtype.bits / 8;
  FLEXMODEL_CHECK(found.begin % element_bytes == 0, IOError, "'", path_, "': tensor ", quoted(name), " begins at byte ",
                  found.begin, " of the file, not a multiple of its ", element_bytes,
                  "-byte elements; use read(), which copies it");
  if (dtype.decoding == Decoding::boolean) check_bools(data, 0, element_count(found.shape), path_, name);
  // The mapping lives until the tensor's memory is released.
  return torch::from_blob(
      const_cast<unsigned char*>(data), found.shape, [keep = mapping_](void*) mutable { keep.reset(); },
      torch::TensorOptions().dtype(found.scalar_type));
}

bool SafetensorsCheckpoint::is_checkpoint_directory(const std::string& directory) {
  std::error_code ignored;
  return fs::is_regular_file(fs::path(directory) / kSingleFile, ignored) ||
         fs::is_regular_file(fs::path(directory) / kIndexFile, ignored);
}

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& directory) : directory_(directory) {
  std::error_code ignored;
  const fs::path single = fs::path(directory) / kSingleFile, index = fs::path(directory) / kIndexFile;
  if (fs::is_regular_file(single, ignored)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const SafetensorsEntry& entry : files_.back()->entries()) file_of_.emplace(entry.name, files_.back().get());
    return;
  }
  FLEXMODEL_CHECK(fs::is_regular_file(index, ignored), IOError, "'", directory, "' holds neither ", kSingleFile,
                  " nor ", kIndexFile);

  const std::string index_path = index.string();
  std::ifstream in(index_path, std::ios::binary);
  FLEXMODEL_CHECK(in.good(), IOError, "cannot open '", index_path, "'");
  const std::string text(std::istreambuf_iterator<char>(in), {});
  const nlohmann::json parsed = parse_json(text, index_path, "index");
  const auto weight_map = parsed.is_object() ? parsed.find("weight_map") : parsed.end();
  FLEXMODEL_CHECK(parsed.is_object() && weight_map != parsed.end() && weight_map->is_object(), IOError, "'", index_path,
                  "': has no \"weight_map\" object from tensor names to shard file names");

  std::map<std::string, std::string> shard_of;
  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& [name, shard] : weight_map->items()) {
    const std::string file_name = shard.is_string() ? shard.get<std::string>() : std::string();
    FLEXMODEL_CHECK(
        !file_name.empty() && file_name != "." && file_name != ".." && fs::path(file_name).filename() == file_name,
        IOError, "'", index_path, "': maps tensor ", quoted(name), " to ", excerpt(shard),
        ", not the name of a file beside it");
    shard_of[name] = file_name;
    if (shards.count(file_name) != 0) continue;
    const fs::path shard_path = fs::path(directory) / file_name;
    FLEXMODEL_CHECK(fs::is_regular_file(shard_path, ignored), IOError, "'", shard_path.string(), "' is missing: '",
                    index_path, "' maps tensor ", quoted(name), " to it");
    files_.push_back(std::make_unique<SafetensorsFile>(shard_path.string()));
    shards[file_name] = files_.back().get();
  }
  for (const auto& [shard, file] : shards) {
    for (const SafetensorsEntry& entry : file->entries()) {
      const auto mapped = shard_of.find(entry.name);
      FLEXMODEL_CHECK(mapped != shard_of.end(), IOError, "'", file->path(), "' holds tensor ", quoted(entry.name),
                      ", which '", index_path, "' does not list");
      FLEXMODEL_CHECK(mapped->second == shard, IOError, "'", file->path(), "' holds tensor ", quoted(entry.name),
                      ", which '", index_path, "' maps to ", quoted(mapped->second));
      file_of_.emplace(entry.name, file);
    }
  }
  for (const auto& [name, shard] : shard_of) {
    FLEXMODEL_CHECK(file_of_.count(name) != 0, IOError, "'", shards.at(shard)->path(), "' lacks tensor ", quoted(name),
                    ", which '", index_path, "' maps to it");
  }
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> names;
  names.reserve(file_of_.size());
  for (const auto& [name, file] : file_of_) names.push_back(name);
  return names;
}

const SafetensorsEntry* SafetensorsCheckpoint::find(const std::string& name) const {
  const auto found = file_of_.find(name);
  return found == file_of_.end() ? nullptr : found->second->find(name);
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  const auto found = file_of_.find(name);
  FLEXMODEL_CHECK(found != file_of_.end(), IOError, "'", directory_, "': no safetensors file there holds tensor ",
                  quoted(name));
  return *found->second;
}

torch::Tensor SafetensorsCheckpoint::read(const std::string& name) const { return file_of(name).read(name); }

torch::Tensor SafetensorsCheckpoint::read(const std::string& name, std::int64_t dim, std::int64_t start,
                                          std::int64_t length) const {
  return file_of(name).read(name, dim, start, length);
}

void SafetensorsCheckpoint::read_into(const std::string& name, std::int64_t dim, std::int64_t start,
                                      std::int64_t length, const torch::Tensor& destination) const {
  file_of(name).read_into(name, dim, start, length, destination);
}

std::uint64_t SafetensorsCheckpoint::bytes_read() const {
  std::uint64_t total = 0;
  for (const auto& file : files_) total += file->bytes_read();
  return total;
}

std::uint64_t SafetensorsCheckpoint::bytes_stored() const {
  std::uint64_t total = 0;
  for (const auto& file : files_) {
    for (const SafetensorsEntry& entry : file->entries()) total += entry.end - entry.begin;
  }
  return total;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Put together piece by piece, so that the header keeps the tensors' order.
  std::string text = "{";
  std::set<std::string> names;
  std::uint64_t offset = 0;
  try {
    if (!metadata.empty()) text += "\"__metadata__\":" + nlohmann::json(metadata).dump();
    for (const auto& [name, tensor] : tensors) {
      FLEXMODEL_CHECK(!name.empty() && name != "__metadata__", ConfigError, "'", path, "': a tensor may not be named ",
                      quoted(name), " (the header keeps \"__metadata__\" for itself)");
      FLEXMODEL_CHECK(names.insert(name).second, ConfigError, "'", path, "': two tensors are named ", quoted(name));
      FLEXMODEL_CHECK(tensor.defined(), ConfigError, "'", path, "': tensor ", quoted(name), " is undefined");
      FLEXMODEL_CHECK(tensor.layout() == torch::kStrided, ConfigError, "'", path, "': tensor ", quoted(name), " is ",
                      tensor.layout(), "; write its to_dense()");
      const std::string dtype = format_dtype(tensor.scalar_type());
      FLEXMODEL_CHECK(!dtype.empty(), ConfigError, "'", path, "': tensor ", quoted(name), " is ", tensor.scalar_type(),
                      ", which the format does not hold; convert it first");
      const std::uint64_t bytes = tensor.nbytes();
      const nlohmann::json info = {
          {"dtype", dtype}, {"shape", tensor.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
      text += (text.size() > 1 ? "," : "") + nlohmann::json(name).dump() + ":" + info.dump();
      offset += bytes;
    }
  } catch (const nlohmann::json::type_error& error) {
    FLEXMODEL_FAIL(ConfigError, "'", path, "': a tensor name or metadata string is not UTF-8 (", error.what(), ")");
  }
  text += "}";
  text.append((8 - text.size() % 8) % 8, ' ');
  FLEXMODEL_CHECK(text.size() <= kMaxHeaderBytes, ConfigError, "'", path, "': its header would be ", text.size(),
                  " bytes, more than the ", kMaxHeaderBytes, " readers take; write fewer tensors to each file");

  PendingFile file(path);
  const std::uint64_t header_length = text.size();
  file.write(&header_length, 8);
  file.write(text.data(), text.size());
  for (const auto& [name, tensor] : tensors) {
    const torch::Tensor stored = tensor.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
    if (stored.nbytes() != 0) file.write(stored.data_ptr(), stored.nbytes());
  }
  file.commit();
}

}  // namespace flexmodel::io
