// fuzz_inputs CORPUS_DIR ITERATIONS SEED: mutation fuzzing of the parsers
// that take outside input, ITERATIONS inputs for each.
//   file readers: the seeds are the corpus's files (in any folder of it), each
//     given to the reader of its extension. Every mutant is read or refused
//     with one IOError line naming the file; anything else (another exception,
//     a crash, an allocation larger than the file, a reader disagreeing with
//     itself) is a finding, saved next to the temporary file and printed.
//     .npy: bit flips, byte edits, cuts, inserted digits, signs and huge
//       numbers.
//     .safetensors: the same, and edits of the header's JSON (its numbers
//       replaced by edge values, dtypes swapped, a tensor's data_offsets
//       moved so that it overlaps or leaves a gap, __metadata__ replaced,
//       brackets and quotes inserted or dropped) with the length prefix mostly
//       fixed up so that the JSON is parsed. Every tensor of a file read is read whole, its second half
//       along dim 0 read alone (the same bytes) and viewed where it can be (the
//       same bytes again); bytes_read() counts the file's data exactly.
//   patterns: random globs over random dotted names agree with a plain
//     recursive matcher (the reference), and a glob of many `**` over a long
//     name is answered at once.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "flexmodel/error.h"
#include "flexmodel/io/safetensors.h"
#include "flexmodel/npy.h"
#include "flexmodel/pattern.h"

namespace {

namespace fs = std::filesystem;

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string mutate(std::string bytes, std::mt19937_64& random) {
  static const std::vector<std::string> kInsertions{"-", "9", "99999999999999999999", "(", ")", ",", "'", "\n",
                                                    "1e12", "\xff\xff\xff\x7f", "<f8", "True"};
  const int edits = 1 + static_cast<int>(random() % 4);
  for (int e = 0; e < edits; ++e) {
    const std::size_t at = bytes.empty() ? 0 : random() % bytes.size();
    switch (random() % 5) {
      case 0:
        if (!bytes.empty()) bytes[at] = static_cast<char>(bytes[at] ^ (1 << (random() % 8)));
        break;
      case 1:
        if (!bytes.empty()) bytes[at] = static_cast<char>(random());
        break;
      case 2: bytes.resize(at); break;
      case 3: bytes.insert(at, kInsertions[random() % kInsertions.size()]); break;
      default:
        if (!bytes.empty()) bytes.erase(at, 1 + random() % 4);
    }
  }
  return bytes;
}

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// Where the value after the first `key` from `at` on begins (wrapping round to
// the header's start), or npos.
std::size_t value_after(const std::string& header, const std::string& key, std::size_t at) {
  std::size_t begin = header.find(key, at);
  if (begin == std::string::npos) begin = header.find(key);
  return begin == std::string::npos ? begin : begin + key.size();
}

// A safetensors file's header edited as JSON text: each edit replaces a
// number, replaces a dtype, moves a tensor's data_offsets (its size kept, so
// that it overlaps or leaves gaps), replaces the __metadata__, or inserts or
// drops a character of its syntax.
std::string mutate_safetensors(std::string bytes, std::mt19937_64& random) {
  std::uint64_t length = 0;
  if (bytes.size() >= 8) std::memcpy(&length, bytes.data(), 8);
  if (bytes.size() < 8 || length > bytes.size() - 8 || random() % 4 == 0) return mutate(std::move(bytes), random);
  static const std::vector<std::string> kNumbers{
      "0", "1", "2", "3", "7", "8", "-1", "-8", "4294967296", "9223372036854775807", "9223372036854775808",
      "18446744073709551615", "18446744073709551616", "1e3", "1.5", "99999999999999999999999"};
  static const std::vector<std::string> kDtypes{"BOOL", "U8",  "I8",  "I16", "U16", "I32", "U32",     "I64",
                                                "U64",  "F16", "BF16", "F32", "F64", "C64", "F4",      "F8_E4M3",
                                                "F8_E5M2", "F8_E8M0", "F6_E2M3", "F12", "", "f32"};
  static const std::vector<std::string> kSyntax{"[", "]", "{", "}", ",", ":", "\"", "null", "[]", "{}", " ",
                                                "\"__metadata__\"", "\\u0000", "\"w\":"};
  static const std::vector<std::string> kMetadata{"null", "{}", "{\"a\":1}", "[\"a\"]", "\"a\"",
                                                  "{\"a\":\"b\",\"a\":\"c\"}"};
  std::string header = bytes.substr(8, length);
  const std::string data = bytes.substr(8 + length);
  const int edits = 1 + static_cast<int>(random() % 3);
  for (int e = 0; e < edits && !header.empty(); ++e) {
    const std::size_t at = random() % header.size();
    switch (random() % 6) {
      case 0: {  // the first number from `at` on (wrapping round), sign included
        std::size_t begin = header.find_first_of("0123456789", at);
        if (begin == std::string::npos) begin = header.find_first_of("0123456789");
        if (begin == std::string::npos) break;
        const std::size_t end = std::min(header.find_first_not_of("0123456789", begin), header.size());
        if (begin > 0 && header[begin - 1] == '-') --begin;
        header.replace(begin, end - begin, kNumbers[random() % kNumbers.size()]);
        break;
      }
      case 1: {  // the first dtype from `at` on
        const std::size_t begin = value_after(header, "\"dtype\":\"", at);
        if (begin == std::string::npos) break;
        const std::size_t end = header.find('"', begin);
        if (end != std::string::npos) header.replace(begin, end - begin, kDtypes[random() % kDtypes.size()]);
        break;
      }
      case 2: {  // the first data_offsets from `at` on, both moved by the same few bytes
        const std::size_t begin = value_after(header, "\"data_offsets\":[", at);
        if (begin == std::string::npos) break;
        const std::size_t end = header.find(']', begin);
        unsigned long long first = 0, last = 0;
        if (end == std::string::npos ||
            std::sscanf(header.substr(begin, end - begin).c_str(), "%llu,%llu", &first, &last) != 2) {
          break;
        }
        const long long shift = static_cast<long long>(random() % 17) - 8;
        // Below 0 written as a negative number; above UINT64_MAX wrapped round.
        const auto moved = [shift](unsigned long long offset) {
          return shift < 0 && offset < static_cast<unsigned long long>(-shift)
                     ? "-" + std::to_string(static_cast<unsigned long long>(-shift) - offset)
                     : std::to_string(offset + static_cast<unsigned long long>(shift));
        };
        header.replace(begin, end - begin, moved(first) + "," + moved(last));
        break;
      }
      case 3: {  // the __metadata__ object, replaced whole
        const std::string key = "\"__metadata__\":";
        const std::size_t begin = header.find(key);
        const std::size_t end = begin == std::string::npos ? begin : header.find('}', begin);
        if (end != std::string::npos) {
          header.replace(begin + key.size(), end + 1 - begin - key.size(), kMetadata[random() % kMetadata.size()]);
        }
        break;
      }
      case 4:
        header.insert(at, kSyntax[random() % kSyntax.size()]);
        break;
      default:
        header.erase(at, 1);
    }
  }
  // A stale length now and then: the header then ends elsewhere.
  if (random() % 8 != 0) length = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &length, 8);
  out += header + data;
  return random() % 4 == 0 ? mutate(std::move(out), random) : out;
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor x = a.contiguous(), y = b.contiguous();
  return x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() &&
         (x.nbytes() == 0 || std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0);
}

std::string read_npy(const std::string& path) {
  flexmodel::read_npy(path);
  return "";
}

// Reads every tensor; a finding where the reader disagrees with itself.
std::string read_safetensors(const std::string& path) {
  const flexmodel::io::SafetensorsFile file(path);
  std::uint64_t stored = 0;
  std::vector<torch::Tensor> whole;
  for (const auto& entry : file.entries()) {
    whole.push_back(file.read(entry.name));
    stored += entry.end - entry.begin;
  }
  if (file.bytes_read() != stored) {
    return "bytes_read() is " + std::to_string(file.bytes_read()) + " after reading " + std::to_string(stored);
  }
  for (std::size_t i = 0; i < whole.size(); ++i) {
    const auto& entry = file.entries()[i];
    if (!entry.shape.empty()) {
      const std::int64_t half = entry.shape[0] / 2;
      if (!same_bytes(file.read(entry.name, 0, half, entry.shape[0] - half),
                      whole[i].narrow(0, half, entry.shape[0] - half))) {
        return "tensor '" + entry.name + "' read in part differs from its whole";
      }
    }
    torch::Tensor view;
    try {
      view = file.view(entry.name);
    } catch (const flexmodel::IOError&) {
      continue;  // converted or misaligned: read() alone serves it
    }
    if (!same_bytes(view, whole[i])) return "tensor '" + entry.name + "' viewed differs from its read";
  }
  return "";
}

// Mutants of every seed of one reader, in turn.
int fuzz_reader(const std::string& extension, const std::vector<std::string>& seeds,
                const std::function<std::string(const std::string&)>& read,
                const std::function<std::string(std::string, std::mt19937_64&)>& mutator, long iterations,
                std::mt19937_64& random) {
  const fs::path file = fs::temp_directory_path() / ("flexmodel_fuzz_" + std::to_string(::getpid()) + extension);
  const long baseline = peak_rss_kib();
  long accepted = 0, refused = 0;
  for (long i = 0; i < iterations; ++i) {
    const std::string input = mutator(seeds[static_cast<std::size_t>(i) % seeds.size()], random);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << input;
    std::string finding;
    try {
      finding = read(file.string());
      ++accepted;
    } catch (const flexmodel::IOError& error) {
      const std::string message = error.what();
      if (message.find(file.string()) == std::string::npos || message.find('\n') != std::string::npos) {
        finding = "an IOError that is not one line naming the file: " + message;
      }
      ++refused;
    } catch (const std::exception& error) {
      finding = std::string("an exception other than IOError: ") + error.what();
    }
    // Anything allocated from a size the file does not hold shows in the peak.
    if (finding.empty() && peak_rss_kib() - baseline > 256 * 1024) finding = "peak RSS grew by more than 256 MiB";
    if (!finding.empty()) {
      const fs::path kept = file.string() + ".finding";
      std::ofstream(kept, std::ios::binary) << input;
      std::fprintf(stderr, "fuzz_inputs: %s input %ld (kept in %s): %s\n", extension.c_str(), i, kept.c_str(),
                   finding.c_str());
      return 1;
    }
  }
  fs::remove(file);
  std::printf("fuzz_inputs: %ld %s mutants: %ld read, %ld refused with one line naming the file\n", iterations,
              extension.c_str(), accepted, refused);
  return 0;
}

int fuzz_files(const fs::path& corpus, long iterations, std::mt19937_64& random) {
  struct Reader {
    std::function<std::string(const std::string&)> read;
    std::function<std::string(std::string, std::mt19937_64&)> mutate;
  };
  const std::map<std::string, Reader> readers = {{".npy", {read_npy, mutate}},
                                                 {".safetensors", {read_safetensors, mutate_safetensors}}};
  // Sorted, so that a seed and ITERATIONS give the same mutants on every machine.
  std::vector<fs::path> paths;
  for (const auto& entry : fs::recursive_directory_iterator(corpus)) {
    if (entry.is_regular_file()) paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  std::map<std::string, std::vector<std::string>> seeds;
  for (const fs::path& path : paths) seeds[path.extension().string()].push_back(read_bytes(path));
  for (const auto& [extension, reader] : readers) {
    if (seeds[extension].empty()) {
      std::fprintf(stderr, "fuzz_inputs: no %s seeds in %s\n", extension.c_str(), corpus.c_str());
      return 1;
    }
    if (fuzz_reader(extension, seeds[extension], reader.read, reader.mutate, iterations, random) != 0) return 1;
  }
  return 0;
}

// The reference: where each `**` ends, tried one by one.
bool reference_match(const std::vector<std::string>& pattern, std::size_t p, const std::vector<std::string>& name,
                     std::size_t n) {
  auto component = [](const std::string& glob, const std::string& text) {
    // A plain recursive fnmatch of `*` and `?`.
    auto match = [](auto& self, const char* g, const char* t) -> bool {
      if (*g == '\0') return *t == '\0';
      if (*g == '*') return self(self, g + 1, t) || (*t != '\0' && self(self, g, t + 1));
      return *t != '\0' && (*g == '?' || *g == *t) && self(self, g + 1, t + 1);
    };
    return match(match, glob.c_str(), text.c_str());
  };
  if (p == pattern.size()) return n == name.size();
  if (pattern[p] == "**") {
    for (std::size_t end = n; end <= name.size(); ++end) {
      if (reference_match(pattern, p + 1, name, end)) return true;
    }
    return false;
  }
  return n < name.size() && component(pattern[p], name[n]) && reference_match(pattern, p + 1, name, n + 1);
}

std::string join(const std::vector<std::string>& parts) {
  std::string text;
  for (std::size_t i = 0; i < parts.size(); ++i) text += (i ? "." : "") + parts[i];
  return text;
}

int fuzz_patterns(long iterations, std::mt19937_64& random) {
  static const std::vector<std::string> kPatternParts{"a", "b", "ab", "*", "a*", "*b", "?", "a?b", "**", "*a*"};
  static const std::vector<std::string> kNameParts{"a", "b", "ab", "ba", "aab", "abb", "0"};
  for (long i = 0; i < iterations; ++i) {
    std::vector<std::string> pattern(1 + random() % 5), name(random() % 6);
    for (auto& part : pattern) part = kPatternParts[random() % kPatternParts.size()];
    for (auto& part : name) part = kNameParts[random() % kNameParts.size()];
    const std::string pattern_text = join(pattern), name_text = join(name);
    const bool ours = flexmodel::Pattern(pattern_text).matches(name_text);
    // split_dots gives "" one component-free name; join of no parts is "".
    const bool expected = reference_match(pattern, 0, name, 0);
    if (ours != expected) {
      std::fprintf(stderr, "fuzz_inputs: glob '%s' on '%s': %d, the reference says %d\n", pattern_text.c_str(),
                   name_text.c_str(), ours, expected);
      return 1;
    }
  }
  // 40 `**` before a component no name has, over 60 components: the reference
  // would try more ways than it could finish; the answer must come at once.
  std::string many = "**";
  for (int i = 1; i < 40; ++i) many += ".**";
  std::string long_name = "a";
  for (int i = 1; i < 60; ++i) long_name += ".a";
  const auto start = std::chrono::steady_clock::now();
  const bool matched = flexmodel::Pattern(many + ".z").matches(long_name);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (matched || !flexmodel::Pattern(many).matches(long_name)) {
    std::fprintf(stderr, "fuzz_inputs: a glob of 40 '**' answered wrongly\n");
    return 1;
  }
  std::printf("fuzz_inputs: %ld globs agree with the reference; 40 '**' over 60 components in %.2g s\n", iterations,
              seconds);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR ITERATIONS SEED\n", argv[0]);
    return 2;
  }
  const long iterations = std::atol(argv[2]);
  std::mt19937_64 random(std::strtoull(argv[3], nullptr, 10));
  if (fuzz_files(argv[1], iterations, random) != 0) return 1;
  return fuzz_patterns(iterations, random);
}
