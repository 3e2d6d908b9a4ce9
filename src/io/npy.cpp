// The .npy reader. Nothing in a file is trusted: the header's length, the
// version, the shape and the data's size are all checked against the file
// before anything is allocated, and every malformed header is one IOError
// naming the file.
#include "flexmodel/npy.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <regex>
#include <vector>

#include "flexmodel/error.h"

namespace flexmodel {
namespace {

// Text from the file as a message shows it: control characters escaped
// (\n, \xNN), so that a message stays one line whatever the file holds.
std::string shown(const std::string& text) {
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '\n') {
      out += "\\n";
    } else if (byte < 0x20 || byte == 0x7f) {
      static const char kHex[] = "0123456789abcdef";
      out += {'\\', 'x', kHex[byte >> 4], kHex[byte & 15]};
    } else {
      out += c;
    }
  }
  return out;
}

c10::ScalarType npy_dtype(const std::string& descr, const std::string& path) {
  static const std::map<std::string, c10::ScalarType> kTypes = {
      {"|b1", torch::kBool},  {"|u1", torch::kUInt8},  {"|i1", torch::kInt8},    {"<i2", torch::kInt16},
      {"<i4", torch::kInt32}, {"<i8", torch::kInt64},  {"<f2", torch::kFloat16}, {"<f4", torch::kFloat32},
      {"<f8", torch::kFloat64}};
  auto found = kTypes.find(descr);
  FLEXMODEL_CHECK(found != kTypes.end(), IOError, "'", path, "' holds dtype '", shown(descr),
                  "'; expected little-endian bool, int8/16/32/64, uint8 or float16/32/64");
  return found->second;
}

// "(3, 4)", "(5,)" or "()": non-negative decimal sizes whose product, in
// bytes of `element_size`, fits in `limit`.
std::vector<std::int64_t> parse_shape(const std::string& tuple, std::size_t element_size, std::uintmax_t limit,
                                      const std::string& path) {
  static const std::regex kTuple(R"(^\s*(\d+\s*(,\s*\d+\s*)*,?)?\s*$)");
  FLEXMODEL_CHECK(std::regex_match(tuple, kTuple), IOError, "'", path, "' has shape (", shown(tuple),
                  ") in its .npy header; a shape is a tuple of non-negative integers");
  std::vector<std::int64_t> shape;
  std::uintmax_t bytes = element_size;
  static const std::regex kNumber(R"(\d+)");
  for (std::sregex_iterator it(tuple.begin(), tuple.end(), kNumber), end; it != end; ++it) {
    const std::string digits = it->str();
    FLEXMODEL_CHECK(digits.size() <= 18, IOError, "'", path, "' has a dimension of ", digits.size(),
                    " digits in its .npy header; no file holds that many elements");
    const auto size = static_cast<std::uintmax_t>(std::stoll(digits));
    shape.push_back(static_cast<std::int64_t>(size));
    // Saturates instead of overflowing: the check below then fails.
    bytes = size != 0 && bytes > limit / size ? limit + 1 : bytes * size;
  }
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) bytes = 0;
  FLEXMODEL_CHECK(bytes <= limit, IOError, "'", path, "' has shape (", shown(tuple), ") in its .npy header, more than the ",
                  limit, " bytes of data the file holds");
  return shape;
}

}  // namespace

torch::Tensor read_npy(const std::string& path) {
  std::error_code error;
  const std::uintmax_t file_size = std::filesystem::file_size(path, error);
  FLEXMODEL_CHECK(!error && std::filesystem::is_regular_file(path), IOError, "cannot open '", path,
                  "': not a regular file", error ? " (" + error.message() + ")" : std::string());
  std::ifstream file(path, std::ios::binary);
  FLEXMODEL_CHECK(file.good(), IOError, "cannot open '", path, "'");
  unsigned char preamble[12] = {};
  file.read(reinterpret_cast<char*>(preamble), 10);
  FLEXMODEL_CHECK(file.gcount() == 10 && std::memcmp(preamble, "\x93NUMPY", 6) == 0, IOError, "'", path,
                  "' is not a .npy file (no \\x93NUMPY magic)");
  const int major = preamble[6], minor = preamble[7];
  FLEXMODEL_CHECK((major == 1 || major == 2 || major == 3) && minor == 0, IOError, "'", path, "' is .npy version ",
                  major, ".", minor, "; this reader knows 1.0, 2.0 and 3.0");
  std::uintmax_t header_start = 10, header_length = preamble[8] | (preamble[9] << 8);
  if (major != 1) {
    file.read(reinterpret_cast<char*>(preamble + 10), 2);
    FLEXMODEL_CHECK(file.gcount() == 2, IOError, "'", path, "' ends inside its .npy preamble");
    header_start = 12;
    header_length |= (static_cast<std::uintmax_t>(preamble[10]) << 16) | (static_cast<std::uintmax_t>(preamble[11]) << 24);
  }
  FLEXMODEL_CHECK(header_length <= file_size - header_start, IOError, "'", path, "' claims a .npy header of ",
                  header_length, " bytes, but the file has ", file_size - header_start, " after its preamble");
  std::string header(static_cast<std::size_t>(header_length), '\0');
  file.read(header.data(), static_cast<std::streamsize>(header_length));
  FLEXMODEL_CHECK(file.good() && !header.empty() && header.front() == '{' && header.back() == '\n', IOError, "'",
                  path, "' has a malformed .npy header (a Python dict literal ending in a newline)");

  std::smatch match;
  FLEXMODEL_CHECK(std::regex_search(header, match, std::regex("'descr':\\s*'([^']+)'")), IOError, "'", path,
                  "' has no dtype in its .npy header");
  const c10::ScalarType dtype = npy_dtype(match[1], path);
  FLEXMODEL_CHECK(std::regex_search(header, match, std::regex("'fortran_order':\\s*(True|False)")), IOError, "'", path,
                  "' has no fortran_order in its .npy header");
  FLEXMODEL_CHECK(match[1] == "False", IOError, "'", path,
                  "' is Fortran-ordered; save it C-ordered (np.ascontiguousarray)");
  FLEXMODEL_CHECK(std::regex_search(header, match, std::regex("'shape':\\s*\\(([^)]*)\\)")), IOError, "'", path,
                  "' has no shape in its .npy header");
  const std::uintmax_t data_bytes = file_size - header_start - header_length;
  const auto shape = parse_shape(match[1], c10::elementSize(dtype), data_bytes, path);
  torch::Tensor tensor = torch::empty(shape, torch::TensorOptions().dtype(dtype));
  FLEXMODEL_CHECK(tensor.nbytes() == data_bytes, IOError, "'", path, "' holds ", data_bytes,
                  " bytes after its .npy header; its shape and dtype say ", tensor.nbytes());
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
  FLEXMODEL_CHECK(static_cast<std::size_t>(file.gcount()) == tensor.nbytes(), IOError, "'", path,
                  "' could not be read to its end");
  return tensor;
}

}  // namespace flexmodel
