// fuzz_inputs CORPUS_DIR ITERATIONS SEED: mutation fuzzing of the parsers
// that take outside input, for a bounded number of inputs.
//   .npy reader: every mutant of the corpus (bit flips, byte edits, cuts,
//     inserted digits, signs and huge numbers) is read or refused with one
//     IOError line naming the file; anything else (another exception, a
//     crash, an allocation larger than the file) is a finding, saved next to
//     the temporary file and printed.
//   patterns: random globs over random dotted names agree with a plain
//     recursive matcher (the reference), and a glob of many `**` over a long
//     name is answered at once.
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "flexmodel/error.h"
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

int fuzz_npy(const fs::path& corpus, long iterations, std::mt19937_64& random) {
  std::vector<std::string> seeds;
  for (const auto& entry : fs::directory_iterator(corpus / "npy")) seeds.push_back(read_bytes(entry.path()));
  if (seeds.empty()) {
    std::fprintf(stderr, "fuzz_inputs: no seeds in %s\n", (corpus / "npy").c_str());
    return 1;
  }
  const fs::path file = fs::temp_directory_path() / ("flexmodel_fuzz_" + std::to_string(::getpid()) + ".npy");
  const long baseline = peak_rss_kib();
  long accepted = 0, refused = 0;
  for (long i = 0; i < iterations; ++i) {
    const std::string input = mutate(seeds[static_cast<std::size_t>(i) % seeds.size()], random);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << input;
    std::string finding;
    try {
      flexmodel::read_npy(file.string());
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
      std::fprintf(stderr, "fuzz_inputs: .npy input %ld (kept in %s): %s\n", i, kept.c_str(), finding.c_str());
      return 1;
    }
  }
  fs::remove(file);
  std::printf("fuzz_inputs: %ld .npy mutants: %ld read, %ld refused with one line naming the file\n", iterations,
              accepted, refused);
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
  if (fuzz_npy(argv[1], iterations, random) != 0) return 1;
  return fuzz_patterns(iterations, random);
}
