// The HDF5 sink's compression option and its shuffle + deflate of gzip chunks.
#include "io/hdf5_compression.h"

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include <hdf5.h>
#include <zlib.h>

#include "flexmodel/error.h"

namespace flexmodel::io::detail {

using ::flexmodel::detail::concat;

int compression_level(const std::string& text, std::size_t colon, int fallback, int low, int high) {
  if (colon == std::string::npos) return fallback;
  const std::string digits = text.substr(colon + 1);
  int level = -1;
  if (!digits.empty() && digits.size() <= 2 && digits.find_first_not_of("0123456789") == std::string::npos) {
    level = std::stoi(digits);
  }
  FLEXMODEL_CHECK(level >= low && level <= high, ConfigError, "compression '", text, "': the level after ':' is ", low,
                  " to ", high);
  return level;
}

Compression parse_compression(const std::string& text) {
  const std::size_t colon = text.find(':');
  const std::string name = text.substr(0, colon);
  Compression compression;
  compression.text = text;
  if (name == "none" && colon == std::string::npos) return compression;
  if (name == "gzip") {
    compression.kind = Compression::Kind::gzip;
    compression.level = compression_level(text, colon, 4, 0, 9);
    return compression;
  }
  compression.kind = Compression::Kind::plugin;
  const char* package = nullptr;  // Debian's package with HDF5's filter plugin
  if (name == "lz4" && colon == std::string::npos) {
    compression.filter = 32004;
    compression.settings = {0};  // the filter's default block size
    package = "hdf5-filter-plugin";
  } else if (name == "zstd") {
    compression.filter = 32015;
    compression.settings = {static_cast<unsigned>(compression_level(text, colon, 3, 1, 22))};
  } else if (name == "blosc") {
    // Blosc's first four values are filled in by the filter; then level, byte shuffle, lz4.
    compression.filter = 32001;
    compression.settings = {0, 0, 0, 0, static_cast<unsigned>(compression_level(text, colon, 5, 0, 9)), 1, 1};
    package = "hdf5-filter-plugin-blosc-serial";
  } else {
    FLEXMODEL_FAIL(ConfigError, "unknown compression '", text,
                   "': use none, gzip[:0-9], lz4, zstd[:1-22] or blosc[:0-9]");
  }
  FLEXMODEL_CHECK(H5Zfilter_avail(compression.filter) > 0, ConfigError, "compression '", text,
                  "' needs HDF5's filter plugin ", compression.filter, " (", name, "), which HDF5 cannot load: ",
                  package != nullptr ? concat("install Debian's ", package, " (apt-get install ", package, ")")
                                     : std::string("Debian ships none; build one"),
                  " or point HDF5_PLUGIN_PATH at the plugin. Readers need it too; gzip needs no plugin");
  H5Eclear2(H5E_DEFAULT);
  return compression;
}

void shuffle(const unsigned char* input, std::size_t bytes, std::size_t element, unsigned char* output) {
  const std::size_t count = bytes / element;
  for (std::size_t j = 0; j < element; ++j) {
    unsigned char* block = output + j * count;
    const unsigned char* source = input + j;
    for (std::size_t i = 0; i < count; ++i) block[i] = source[i * element];
  }
  std::memcpy(output + count * element, input + count * element, bytes - count * element);
}

std::vector<unsigned char> shuffle_deflate(const unsigned char* input, std::size_t bytes, std::size_t element,
                                           int level) {
  struct Deflater {
    z_stream stream{};
    int level = -1;
    std::vector<unsigned char> shuffled;
    ~Deflater() {
      if (level >= 0) deflateEnd(&stream);
    }
  };
  thread_local Deflater deflater;
  if (deflater.level != level) {
    if (deflater.level >= 0) deflateEnd(&deflater.stream);
    deflater.level = -1;
    deflater.stream = z_stream{};
    FLEXMODEL_CHECK(deflateInit(&deflater.stream, level) == Z_OK, IOError, "zlib could not start deflate level ",
                    level);
    deflater.level = level;
  } else {
    deflateReset(&deflater.stream);
  }
  if (element > 1 && bytes >= 2 * element) {
    deflater.shuffled.resize(bytes);
    shuffle(input, bytes, element, deflater.shuffled.data());
    input = deflater.shuffled.data();
  }
  std::vector<unsigned char> output(deflateBound(&deflater.stream, bytes));
  deflater.stream.next_in = const_cast<Bytef*>(input);
  deflater.stream.avail_in = static_cast<uInt>(bytes);
  deflater.stream.next_out = output.data();
  deflater.stream.avail_out = static_cast<uInt>(output.size());
  const int status = deflate(&deflater.stream, Z_FINISH);
  FLEXMODEL_CHECK(status == Z_STREAM_END, IOError, "zlib deflate failed (", status, "): ",
                  deflater.stream.msg != nullptr ? deflater.stream.msg : "no message");
  output.resize(deflater.stream.total_out);
  return output;
}

}  // namespace flexmodel::io::detail
