// The safetensors reader and writer against an independent reference:
// tests/safetensors/check_python.py puts files together from the format's
// description (struct and json, values from PyTorch and NumPy) and parses by
// hand what save_safetensors writes. Malformed headers are built here byte by
// byte: each is one IOError line naming the file and what is wrong.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "flexmodel/error.h"
#include "flexmodel/io/safetensors.h"
#include "test_files.h"

namespace flexmodel::io {
namespace {

namespace fs = std::filesystem;
using flexmodel::testing::run_python;
using flexmodel::testing::TempDir;

std::string script() { return std::string(FLEXMODEL_TEST_SCRIPTS) + "/safetensors/check_python.py"; }

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Python's files and what it says they hold.
struct Reference {
  Reference() {
    EXPECT_EQ(run_python(script() + " write " + dir.path().string()), 0);
    files = read_json(dir / "expected.json")["files"];
  }
  TempDir dir;
  nlohmann::json files;
};

// Python's float: a number, or "nan", "inf", "-inf"; zeros compared with their sign.
void expect_float(double got, const nlohmann::json& want, const std::string& where) {
  if (want.is_string()) {
    const std::string special = want.get<std::string>();
    if (special == "nan") {
      EXPECT_TRUE(std::isnan(got)) << where << ": " << got;
    } else {
      EXPECT_EQ(got, special == "inf" ? INFINITY : -INFINITY) << where;
    }
    return;
  }
  EXPECT_EQ(got, want.get<double>()) << where;
  EXPECT_EQ(std::signbit(got), std::signbit(want.get<double>())) << where;
}

// Every element of `tensor` equals Python's flat list of values.
void expect_values(const torch::Tensor& tensor, const nlohmann::json& values, const std::string& what) {
  const torch::Tensor flat = tensor.reshape({-1}).contiguous();
  ASSERT_EQ(static_cast<std::size_t>(flat.numel()), values.size()) << what;
  if (flat.is_complex()) {
    const torch::Tensor parts = torch::view_as_real(flat).to(torch::kFloat64).contiguous();
    const double* p = parts.data_ptr<double>();
    for (std::size_t i = 0; i < values.size(); ++i) {
      expect_float(p[2 * i], values[i][0], what + " real " + std::to_string(i));
      expect_float(p[2 * i + 1], values[i][1], what + " imaginary " + std::to_string(i));
    }
  } else if (flat.is_floating_point()) {
    const torch::Tensor doubles = flat.to(torch::kFloat64).contiguous();
    for (std::size_t i = 0; i < values.size(); ++i) {
      expect_float(doubles.data_ptr<double>()[i], values[i], what + " element " + std::to_string(i));
    }
  } else {
    const torch::Tensor longs = flat.to(torch::kInt64).contiguous();
    for (std::size_t i = 0; i < values.size(); ++i) {
      EXPECT_EQ(longs.data_ptr<std::int64_t>()[i], values[i].get<std::int64_t>()) << what << " element " << i;
    }
  }
}

// The message of the IOError `action` throws, checked to be one line naming `path`.
template <class Action>
std::string io_error(const std::string& path, Action action) {
  try {
    action();
  } catch (const IOError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    return message;
  }
  return "(no IOError)";
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor x = a.contiguous(), y = b.contiguous();
  return x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() &&
         (x.nbytes() == 0 || std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0);
}

TEST(Safetensors, EveryDtypeReadsAsPythonWroteIt) {
  Reference reference;
  ASSERT_EQ(reference.files.size(), 5u);
  for (const auto& [file_name, expected] : reference.files.items()) {
    const std::string path = reference.dir / file_name;
    SafetensorsFile file(path);
    EXPECT_EQ(file.path(), path);
    EXPECT_EQ(file.metadata(), (expected["metadata"].get<std::map<std::string, std::string>>())) << file_name;
    // entries() in the order of the data, whatever the header's order.
    std::vector<std::string> order;
    for (const auto& entry : file.entries()) order.push_back(entry.name);
    EXPECT_EQ(order, expected["order"].get<std::vector<std::string>>()) << file_name;

    std::uint64_t decoded = 0;
    for (const auto& [name, tensor] : expected["tensors"].items()) {
      const std::string what = file_name + ": " + name;
      const SafetensorsEntry* entry = file.find(name);
      ASSERT_NE(entry, nullptr) << what;
      EXPECT_EQ(entry, &file.entry(name));
      EXPECT_EQ(entry->dtype, tensor["dtype"].get<std::string>()) << what;
      EXPECT_EQ(c10::toString(entry->scalar_type), tensor["scalar_type"].get<std::string>()) << what;
      EXPECT_EQ(entry->shape, tensor["shape"].get<std::vector<std::int64_t>>()) << what;
      EXPECT_EQ(entry->begin, tensor["begin"].get<std::uint64_t>()) << what;
      EXPECT_EQ(entry->end, tensor["end"].get<std::uint64_t>()) << what;
      if (tensor.contains("exceeds_int64")) {
        EXPECT_NE(io_error(path, [&] { file.read(name); }).find("holds 9223372036854775808 at element 2, more than"),
                  std::string::npos);
        continue;
      }
      if (tensor.contains("undecoded")) {
        EXPECT_NE(io_error(path, [&] { file.read(name); }).find("is F6_E2M3, which this library does not decode"),
                  std::string::npos);
        continue;
      }
      const torch::Tensor read = file.read(name);
      EXPECT_EQ(read.scalar_type(), entry->scalar_type) << what;
      EXPECT_EQ(read.sizes().vec(), entry->shape) << what;
      expect_values(read, tensor["values"], what);
      decoded += entry->end - entry->begin;
    }
    EXPECT_EQ(file.bytes_read(), decoded) << file_name;
  }
}

TEST(Safetensors, APartialReadReadsOnlyItsSlice) {
  Reference reference;
  SafetensorsFile file(reference.dir / "every_dtype.safetensors");
  struct Slice {
    std::string name;
    std::int64_t dim, start, length;
    std::uint64_t bytes;  // of the file that the slice covers, counted by hand
  };
  const std::vector<Slice> slices = {
      {"floats", 1, 1, 2, 2 * 2 * 4},  // [2, 3]: two rows of two 4-byte elements
      {"floats", -2, 1, 1, 3 * 4},     // the second row
      {"doubles", 0, 3, 1, 8},         // the NaN
      {"complexes", 0, 0, 1, 2 * 8},   // [2, 2] C64
      {"brains", 1, 5, 2, 2 * 2 * 2},  // [2, 7] BF16, infinity and NaN among them
      {"ushorts", 0, 3, 2, 2 * 2},     // U16 widened: the stored bytes count
      {"ulongs", 0, 1, 2, 2 * 8},     {"mask", 1, 2, 1, 2},        {"e4m3", 0, 15, 1, 16},  // the NaN row of [16, 16]
      {"e8m0", 1, 60, 4, 4 * 4},      {"nibbles", 1, 1, 2, 4 * 2},  // elements 4r+1, 4r+2: bits [16r+4, 16r+12), bytes
                                                                    // 2r, 2r+1
      {"nibbles", 1, 1, 1, 4 * 1},                                  // the high nibble of byte 2r alone
      {"nibbles", 0, 1, 2, 4},                                      // two whole rows of 2 bytes
      {"floats", 0, 2, 0, 0},                                       // nothing
      {"no_rows", 1, 1, 2, 0},
  };
  for (const Slice& slice : slices) {
    const std::string what = slice.name + " dim " + std::to_string(slice.dim) + " [" + std::to_string(slice.start) +
                             " + " + std::to_string(slice.length) + ")";
    const std::uint64_t before = file.bytes_read();
    const torch::Tensor part = file.read(slice.name, slice.dim, slice.start, slice.length);
    EXPECT_EQ(file.bytes_read() - before, slice.bytes) << what;
    // Compared bit for bit with the whole tensor, itself checked against Python above.
    EXPECT_TRUE(same_bytes(part, file.read(slice.name).narrow(slice.dim, slice.start, slice.length))) << what;
    // Decoded in place, into a parameter's memory, the same bytes.
    torch::Tensor into = torch::full(part.sizes(), 7, part.options());
    file.read_into(slice.name, slice.dim, slice.start, slice.length, into);
    EXPECT_TRUE(same_bytes(into, part)) << what;
  }
  const auto config_error = [&](auto action) {
    try {
      action();
    } catch (const ConfigError& error) {
      return std::string(error.what());
    }
    return std::string("(no ConfigError)");
  };
  EXPECT_NE(config_error([&] { file.read("floats", 2, 0, 1); }).find("has 2 dims; dim 2 is not one of them"),
            std::string::npos);
  EXPECT_NE(config_error([&] { file.read("floats", 1, 2, 2); }).find("has size 3 along dim 1; start 2 and length 2"),
            std::string::npos);
  EXPECT_NE(config_error([&] { file.read("floats", 1, -1, 1); }).find("do not lie within it"), std::string::npos);
  EXPECT_NE(config_error([&] { file.read("scalar", 0, 0, 1); }).find("is 0-dimensional"), std::string::npos);
  const torch::Tensor wrong = torch::empty({2, 2}, torch::kDouble);
  const auto wrong_dtype = config_error([&] { file.read_into("floats", 1, 1, 2, wrong); });
  EXPECT_NE(wrong_dtype.find("tensor \"floats\" reads as a contiguous CPU Float [2, 2], not into a Double [2, 2]"),
            std::string::npos) << wrong_dtype;
  const torch::Tensor strided = torch::empty({2, 4}).narrow(1, 0, 2);
  const auto not_contiguous = config_error([&] { file.read_into("floats", 1, 1, 2, strided); });
  EXPECT_NE(not_contiguous.find("that is not contiguous"), std::string::npos) << not_contiguous;
  const std::string path = file.path();
  EXPECT_NE(io_error(path, [&] { file.read("absent", 0, 0, 1); }).find("holds no tensor \"absent\""),
            std::string::npos);
}

// The start of the mapping of `path` that holds `address`, minus its offset in the file; 0 if none.
std::uintptr_t mapped_file_start(const std::string& path, const void* address) {
  std::ifstream maps("/proc/self/maps");
  const std::string wanted = fs::canonical(path).string();
  for (std::string line; std::getline(maps, line);) {
    std::istringstream fields(line);
    std::string range, permissions, offset, device, inode, file;
    fields >> range >> permissions >> offset >> device >> inode >> file;
    const std::uintptr_t begin = std::stoull(range.substr(0, range.find('-')), nullptr, 16);
    const std::uintptr_t end = std::stoull(range.substr(range.find('-') + 1), nullptr, 16);
    const auto at = reinterpret_cast<std::uintptr_t>(address);
    if (file == wanted && begin <= at && at < end) return begin - std::stoull(offset, nullptr, 16);
  }
  return 0;
}

// Pages of this process in memory now (not the peak).
std::int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

// A load holds each weight once: the file's pages a read went through leave
// the process's resident set, as 64 MiB read into waiting memory shows.
TEST(Safetensors, AReadLeavesNoFilePagesResident) {
  TempDir temp;
  const std::string path = (temp.path() / "large.safetensors").string();
  const std::int64_t rows = 1 << 14, columns = 1 << 10;  // 64 MiB of float32
  save_safetensors(path, {{"w", torch::arange(rows * columns, torch::kFloat).view({rows, columns})}});
  const SafetensorsFile file(path);
  torch::Tensor into = torch::zeros({rows, columns});  // touched: resident before the read
  const std::int64_t before = resident_bytes();
  file.read_into("w", 0, 0, rows, into);
  EXPECT_LT(resident_bytes() - before, 8 << 20) << "the 64 MiB of file pages stayed resident";
  EXPECT_EQ(into[rows - 1][columns - 1].item<float>(), static_cast<float>(rows * columns - 1));
  const std::int64_t again = resident_bytes();
  const torch::Tensor copy = file.read("w");
  // read() adds its own tensor, and nothing of the file.
  EXPECT_LT(resident_bytes() - again, (64 << 20) + (8 << 20));
  EXPECT_TRUE(torch::equal(copy, into));
}

TEST(Safetensors, AViewIsTheMappedBytesThemselves) {
  Reference reference;
  const std::string path = reference.dir / "every_dtype.safetensors";
  torch::Tensor kept;
  {
    SafetensorsFile file(path);
    for (const std::string name : {"doubles", "floats", "longs", "complexes", "brains", "mask", "chars"}) {
      const torch::Tensor view = file.view(name);
      // The tensor's memory is the file's page cache: at the entry's offset in a mapping of the file.
      EXPECT_EQ(mapped_file_start(path, view.data_ptr()) + file.entry(name).begin,
                reinterpret_cast<std::uintptr_t>(view.data_ptr()))
          << name;
      EXPECT_EQ(view.data_ptr(), file.view(name).data_ptr()) << name;
      EXPECT_TRUE(same_bytes(view, file.read(name))) << name;
    }
    const std::uint64_t before = file.bytes_read();
    kept = file.view("floats");
    EXPECT_EQ(file.bytes_read(), before) << "a view copies nothing";
    EXPECT_NE(io_error(path, [&] { file.view("ushorts"); })
                  .find("is U16, which LibTorch does not hold as stored; use "
                        "read(), which converts it to Int"),
              std::string::npos);
    EXPECT_NE(io_error(path, [&] { file.view("e4m3"); }).find("use read()"), std::string::npos);
  }
  // The view outlives the file object: it holds the mapping.
  expect_values(kept, reference.files["every_dtype.safetensors"]["tensors"]["floats"]["values"], "kept view");

  const std::string misaligned = reference.dir / "misaligned.safetensors";
  SafetensorsFile file(misaligned);
  EXPECT_NE(io_error(misaligned, [&] { file.view("body"); })
                .find("not a multiple of its 4-byte elements; use read(), which copies it"),
            std::string::npos);
  EXPECT_TRUE(same_bytes(file.view("head"), file.read("head")));
  expect_values(file.read("body"), reference.files["misaligned.safetensors"]["tensors"]["body"]["values"], "body");
}

// What a test wrote, for check_python.py read: names, dtypes, shapes and values.
nlohmann::json values_json(const torch::Tensor& tensor) {
  nlohmann::json values = nlohmann::json::array();
  const auto number = [](double x) -> nlohmann::json {
    if (std::isnan(x)) return "nan";
    if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
    return x;
  };
  const torch::Tensor flat = tensor.resolve_conj().reshape({-1}).contiguous();
  if (flat.is_complex()) {
    const torch::Tensor parts = torch::view_as_real(flat).to(torch::kFloat64).contiguous();
    for (std::int64_t i = 0; i < flat.numel(); ++i) {
      values.push_back({number(parts.data_ptr<double>()[2 * i]), number(parts.data_ptr<double>()[2 * i + 1])});
    }
  } else if (flat.is_floating_point()) {
    const torch::Tensor doubles = flat.to(torch::kFloat64).contiguous();
    for (std::int64_t i = 0; i < flat.numel(); ++i) values.push_back(number(doubles.data_ptr<double>()[i]));
  } else {
    const torch::Tensor longs = flat.to(torch::kInt64).contiguous();
    for (std::int64_t i = 0; i < flat.numel(); ++i) values.push_back(longs.data_ptr<std::int64_t>()[i]);
  }
  return values;
}

TEST(Safetensors, WhatItWritesPythonReadsByHand) {
  TempDir dir;
  torch::manual_seed(0);
  const float inf = INFINITY, nan = NAN;
  const std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      // Not contiguous: written as its values in C order.
      {"model.wte.weight", torch::randn({4, 3}).t()},
      {"brain", torch::tensor({1.0f, -2.5f, 3e38f, inf, -0.0f, nan}).to(torch::kBFloat16).reshape({2, 3})},
      {"half", torch::tensor({0.5f, 65504.0f, -inf, nan, 5.960464477539063e-08f}).to(torch::kHalf)},
      {"long", torch::tensor({std::numeric_limits<std::int64_t>::min(), std::int64_t{-1},
                              std::numeric_limits<std::int64_t>::max()})},
      {"mask", torch::tensor({true, false, false, true}).reshape({2, 2})},
      {"byte", torch::arange(250, 256, torch::kInt64).to(torch::kUInt8)},
      {"char", torch::tensor({-128, 127}).to(torch::kInt8)},
      {"short", torch::tensor({-32768, 32767}).to(torch::kInt16)},
      {"int", torch::tensor({std::numeric_limits<int>::min(), 5})},
      {"double", torch::randn({2, 2}, torch::kFloat64)},
      {"complex", torch::randn({3}, torch::kComplexFloat)},
      {"conjugated", torch::randn({2}, torch::kComplexFloat).conj()},
      {"scalar", torch::tensor(3.25f)},
      {"nothing", torch::empty({0, 5})},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"grüße", "✓ \"quoted\"\n"}};
  const std::string path = dir / "written.safetensors";
  save_safetensors(path, tensors, metadata);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  nlohmann::json expected = {{"metadata", metadata}, {"tensors", nlohmann::json::array()}};
  SafetensorsFile file(path);
  for (const auto& [name, tensor] : tensors) {
    const SafetensorsEntry& entry = file.entry(name);
    expected["tensors"].push_back(
        {{"name", name}, {"dtype", entry.dtype}, {"shape", tensor.sizes().vec()}, {"values", values_json(tensor)}});
    // And back: the same bits.
    EXPECT_TRUE(same_bytes(file.read(name), tensor.resolve_conj())) << name;
  }
  EXPECT_EQ(file.entry("brain").dtype, "BF16");
  EXPECT_EQ(file.entry("half").dtype, "F16");
  EXPECT_EQ(file.entry("mask").dtype, "BOOL");
  EXPECT_EQ(file.entry("long").dtype, "I64");
  EXPECT_EQ(file.entry("complex").dtype, "C64");
  EXPECT_EQ(file.metadata(), metadata);
  const std::string expected_path = dir / "written.json";
  std::ofstream(expected_path) << expected.dump();
  EXPECT_EQ(run_python(script() + " read " + path + " " + expected_path), 0);

  // No metadata: no "__metadata__" key; no tensors: a header of "{}" padded to 8.
  save_safetensors(dir / "bare.safetensors", {{"x", torch::ones({3})}});
  const nlohmann::json x = {
      {"name", "x"}, {"dtype", "F32"}, {"shape", nlohmann::json::array({3})}, {"values", {1.0, 1.0, 1.0}}};
  std::ofstream(dir / "bare.json") << nlohmann::json{{"tensors", nlohmann::json::array({x})}};
  EXPECT_EQ(run_python(script() + " read " + (dir / "bare.safetensors") + " " + (dir / "bare.json")), 0);
  save_safetensors(dir / "empty.safetensors", {});
  EXPECT_EQ(read_bytes(dir / "empty.safetensors"), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
}

// A file of a header length, the header's text and the data.
std::string safetensors_bytes(const std::string& header, const std::string& data = "",
                              std::uint64_t claimed_length = ~std::uint64_t{0}) {
  const std::uint64_t length = claimed_length == ~std::uint64_t{0} ? header.size() : claimed_length;
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return bytes + header + data;
}

// `header` padded with spaces to a multiple of 8 bytes, as writers pad it, so that the data is aligned.
std::string padded(std::string header) { return header.append((8 - header.size() % 8) % 8, ' '); }

std::string f32(const std::string& shape, const std::string& offsets) {
  return R"({"dtype":"F32","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

TEST(Safetensors, EveryMalformedFileIsOneLineNamingTheFileAndTheProblem) {
  TempDir dir;
  struct Case {
    std::string name, bytes, message;
  };
  const std::string four(4, '\0'), eight(8, '\0');
  const std::vector<Case> cases = {
      {"short", "abc", "': 3 bytes, shorter than the 8-byte header length"},
      {"beyond_file", safetensors_bytes("{}", "", 1000), "claims a header of 1000 bytes, but 2 follow its length"},
      {"absurd_length", safetensors_bytes("{}", "", 1ull << 63), "claims a header of 9223372036854775808 bytes"},
      {"not_json", safetensors_bytes(R"({"a": )"), "its header is not valid JSON: [json.exception.parse_error"},
      {"not_utf8", safetensors_bytes("{\"\xff\":1}"), "its header is not valid JSON"},
      {"not_object", safetensors_bytes("[1, 2]"), "its header is [1,2], not a JSON object of tensors"},
      {"entry_not_object", safetensors_bytes(R"({"a":5})"), "tensor \"a\" is described by 5, not an object"},
      {"no_dtype", safetensors_bytes(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", four),
       "tensor \"a\" has no \"dtype\""},
      {"dtype_number", safetensors_bytes(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", four),
       "tensor \"a\" has dtype 7; a dtype is a string"},
      {"unknown_dtype", safetensors_bytes(R"({"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}})", four),
       "has dtype \"F12\", which the format does not define; it defines BOOL, U8, I8, I16, U16, I32, U32, I64, U64, "
       "F16, BF16, F32, F64, C64, F8_E4M3, F8_E5M2, F8_E8M0, F4, F6_E2M3, F6_E3M2"},
      {"no_shape", safetensors_bytes(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", four),
       "tensor \"a\" has no \"shape\""},
      {"shape_number", safetensors_bytes(R"({"a":)" + f32("4", "[0,4]") + "}", four),
       "has shape 4; a shape is a list of non-negative integers"},
      {"negative_dim", safetensors_bytes(R"({"a":)" + f32("[-1]", "[0,4]") + "}", four), "has shape [-1]; a shape"},
      {"fractional_dim", safetensors_bytes(R"({"a":)" + f32("[1.0]", "[0,4]") + "}", four), "has shape [1.0]; a shape"},
      {"dim_over_int64", safetensors_bytes(R"({"a":)" + f32("[9223372036854775808]", "[0,4]") + "}", four),
       "has shape [9223372036854775808]; a shape"},
      {"no_offsets", safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1]}})", four),
       "tensor \"a\" has no \"data_offsets\""},
      {"three_offsets", safetensors_bytes(R"({"a":)" + f32("[1]", "[0,4,4]") + "}", four),
       "has data_offsets [0,4,4]; they are two non-negative integers [begin, end]"},
      {"negative_offset", safetensors_bytes(R"({"a":)" + f32("[1]", "[-4,0]") + "}", four),
       "has data_offsets [-4,0]; they are two"},
      {"string_offset", safetensors_bytes(R"({"a":)" + f32("[1]", R"([0,"4"])") + "}", four),
       "has data_offsets [0,\"4\"]; they are two"},
      {"reversed_offsets", safetensors_bytes(R"({"a":)" + f32("[0]", "[4,0]") + "}", four),
       "has data_offsets [4,0], which end before they begin"},
      {"beyond_data", safetensors_bytes(R"({"a":)" + f32("[25]", "[0,100]") + "}", four),
       "has data_offsets [0,100], beyond the 4 bytes of data the file holds"},
      {"wrong_size", safetensors_bytes(R"({"a":)" + f32("[2,3]", "[0,20]") + "}", std::string(20, '\0')),
       "tensor \"a\" of dtype F32 and shape [2,3] is 24 bytes, but its data_offsets [0,20] span 20"},
      {"too_many_elements",
       safetensors_bytes(R"({"a":)" + f32("[4294967296,4294967296,4294967296]", "[0,4]") + "}", four),
       "has shape [4294967296,4294967296,4294967296], more elements than a tensor can hold"},
      {"strides_overflow", safetensors_bytes(R"({"a":)" + f32("[0,4294967296,4294967296]", "[0,0]") + "}"),
       "more elements than a tensor can hold"},
      {"bytes_overflow",
       safetensors_bytes(R"({"a":{"dtype":"F64","shape":[2147483648,2147483648],"data_offsets":[0,8]}})", eight),
       "shape [2147483648,2147483648] has 4611686018427387904 elements, more bytes than any file holds"},
      {"half_a_byte",
       safetensors_bytes(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", std::string(2, '\0')),
       "tensor \"a\" has 3 elements of F4, 12 bits: not a whole number of bytes"},
      {"overlap",
       safetensors_bytes(R"({"a":)" + f32("[2]", "[0,8]") + R"(,"b":)" + f32("[2]", "[4,12]") + "}",
                         std::string(12, '\0')),
       "tensor \"b\" (data_offsets [4, 12]) overlaps tensor \"a\" ([0, 8])"},
      {"same_bytes", safetensors_bytes(R"({"a":)" + f32("[1]", "[0,4]") + R"(,"b":)" + f32("[1]", "[0,4]") + "}", four),
       "tensor \"b\" (data_offsets [0, 4]) overlaps tensor \"a\" ([0, 4])"},
      {"empty_inside_another",
       safetensors_bytes(R"({"a":)" + f32("[2]", "[0,8]") + R"(,"z":)" + f32("[0]", "[4,4]") + "}", eight),
       "tensor \"z\" (data_offsets [4, 4]) overlaps tensor \"a\""},
      {"gap",
       safetensors_bytes(R"({"a":)" + f32("[1]", "[0,4]") + R"(,"b":)" + f32("[1]", "[8,12]") + "}",
                         std::string(12, '\0')),
       "no tensor holds bytes [4, 8) of its data; the format leaves no gaps"},
      {"gap_first", safetensors_bytes(R"({"a":)" + f32("[1]", "[4,8]") + "}", eight), "no tensor holds bytes [0, 4)"},
      {"trailing_data", safetensors_bytes(R"({"a":)" + f32("[1]", "[0,4]") + "}", eight),
       "no tensor holds bytes [4, 8) of its data"},
      {"data_without_tensors", safetensors_bytes("{}", four), "no tensor holds bytes [0, 4)"},
      {"metadata_number", safetensors_bytes(R"({"__metadata__":{"a":1}})"),
       "its __metadata__ is {\"a\":1}, not an object of strings"},
      {"metadata_list", safetensors_bytes(R"({"__metadata__":["a"]})"), "its __metadata__ is [\"a\"], not an object"},
      {"repeated_tensor",
       safetensors_bytes(R"({"a":)" + f32("[1]", "[0,4]") + R"(,"a":)" + f32("[1]", "[0,4]") + "}", four),
       "its header has the key \"a\" twice in one object"},
      {"repeated_field",
       safetensors_bytes(R"({"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", four),
       "its header has the key \"dtype\" twice"},
      {"newline_in_name", safetensors_bytes(R"({"a\nb":5})"), "tensor \"a\\nb\" is described by 5"},
  };
  for (const Case& c : cases) {
    const std::string path = dir / (c.name + ".safetensors");
    write_bytes(path, c.bytes);
    const std::string message = io_error(path, [&] { SafetensorsFile file(path); });
    EXPECT_NE(message.find(c.message), std::string::npos) << c.name << ": " << message;
  }

  // 100,000,008 bytes, sparse: a header the file holds but the format refuses.
  const std::string large = dir / "large_header.safetensors";
  write_bytes(large, safetensors_bytes("{", "", 100'000'001));
  fs::resize_file(large, 8 + 100'000'001);
  EXPECT_NE(io_error(large, [&] { SafetensorsFile file(large); })
                .find("has a header of 100000001 bytes, more than the 100000000 the format allows"),
            std::string::npos);

  const std::string missing = dir / "missing.safetensors";
  EXPECT_NE(io_error(missing, [&] { SafetensorsFile file(missing); }).find("cannot open '" + missing + "': No such"),
            std::string::npos);
  EXPECT_NE(
      io_error(dir.path().string(), [&] { SafetensorsFile file(dir.path().string()); }).find("not a regular file"),
      std::string::npos);

  // Caught when the bytes are read: a bool that is neither 0 nor 1.
  const std::string bools = dir / "bools.safetensors";
  write_bytes(
      bools, safetensors_bytes(R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", std::string("\1\2\0", 3)));
  SafetensorsFile file(bools);
  for (const auto& action :
       {std::function<void()>([&] { file.read("m"); }), std::function<void()>([&] { file.view("m"); })}) {
    EXPECT_NE(io_error(bools, action).find("tensor \"m\" holds the byte 2 at element 1; a BOOL is 0 or 1"),
              std::string::npos);
  }
  EXPECT_EQ(file.read("m", 0, 2, 1).item<bool>(), false);
}

TEST(Safetensors, EdgesOfTheFormatAreRead) {
  TempDir dir;
  const std::string empty = dir / "empty.safetensors";
  write_bytes(empty, safetensors_bytes("{}"));
  EXPECT_TRUE(SafetensorsFile(empty).entries().empty());
  // null metadata (the reference reader's "none"), spaces around the object.
  const std::string null_metadata = dir / "null_metadata.safetensors";
  write_bytes(null_metadata, safetensors_bytes(R"(  {"__metadata__":null}    )"));
  EXPECT_TRUE(SafetensorsFile(null_metadata).metadata().empty());

  // Empty tensors at the same offsets as their neighbours' ends and beginnings.
  const std::string zero_sizes = dir / "zero_sizes.safetensors";
  float values[2] = {1.5f, -3.0f};
  write_bytes(zero_sizes,
              safetensors_bytes(padded(R"({"z3":)" + f32("[0,7]", "[8,8]") + R"(,"b":)" + f32("[]", "[4,8]") +
                                       R"(,"z2":)" + f32("[3,0]", "[4,4]") + R"(,"a":)" + f32("[1]", "[0,4]") +
                                       R"(,"z1":)" + f32("[0]", "[0,0]") + "}"),
                                std::string(reinterpret_cast<const char*>(values), 8)));
  SafetensorsFile file(zero_sizes);
  std::vector<std::string> order;
  for (const auto& entry : file.entries()) order.push_back(entry.name);
  EXPECT_EQ(order, (std::vector<std::string>{"z1", "a", "z2", "b", "z3"}));
  EXPECT_EQ(file.read("a").item<float>(), 1.5f);
  EXPECT_EQ(file.read("b").dim(), 0);
  EXPECT_EQ(file.read("b").item<float>(), -3.0f);
  EXPECT_EQ(file.view("b").item<float>(), -3.0f);
  EXPECT_EQ(file.read("z2").sizes().vec(), (std::vector<std::int64_t>{3, 0}));
  EXPECT_EQ(file.view("z3").sizes().vec(), (std::vector<std::int64_t>{0, 7}));
  EXPECT_EQ(file.read("z3", 1, 2, 5).sizes().vec(), (std::vector<std::int64_t>{0, 5}));
  EXPECT_EQ(file.find("absent"), nullptr);
  EXPECT_NE(io_error(zero_sizes, [&] { file.entry("absent"); }).find("holds no tensor \"absent\""), std::string::npos);
}

// A checkpoint directory of shards and their index.
void write_index(const TempDir& dir, const nlohmann::json& weight_map) {
  std::ofstream(dir / "model.safetensors.index.json")
      << nlohmann::json{{"metadata", {{"total_size", 1234}}}, {"weight_map", weight_map}}.dump(2);
}

TEST(Safetensors, ACheckpointReadsEveryShardItsIndexLists) {
  TempDir dir;
  EXPECT_FALSE(SafetensorsCheckpoint::is_checkpoint_directory(dir.path().string()));
  const torch::Tensor a = torch::randn({4, 6}), b = torch::arange(10), c = torch::randn({3}).to(torch::kBFloat16);
  save_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", a}, {"b", b}});
  save_safetensors(dir / "model-00002-of-00002.safetensors", {{"c", c}});
  write_index(dir, {{"a", "model-00001-of-00002.safetensors"},
                    {"b", "model-00001-of-00002.safetensors"},
                    {"c", "model-00002-of-00002.safetensors"}});
  EXPECT_TRUE(SafetensorsCheckpoint::is_checkpoint_directory(dir.path().string()));

  SafetensorsCheckpoint checkpoint(dir.path().string());
  EXPECT_EQ(checkpoint.directory(), dir.path().string());
  EXPECT_EQ(checkpoint.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(checkpoint.bytes_stored(), a.nbytes() + b.nbytes() + c.nbytes());
  EXPECT_EQ(checkpoint.file_of("c").path(), dir / "model-00002-of-00002.safetensors");
  EXPECT_EQ(checkpoint.find("b")->dtype, "I64");
  EXPECT_EQ(checkpoint.find("absent"), nullptr);
  // Half of a's columns, as a tensor-parallel rank would load them.
  EXPECT_TRUE(torch::equal(checkpoint.read("a", 1, 3, 3), a.narrow(1, 3, 3)));
  EXPECT_EQ(checkpoint.bytes_read(), a.nbytes() / 2);
  EXPECT_TRUE(torch::equal(checkpoint.read("b"), b));
  EXPECT_TRUE(torch::equal(checkpoint.read("c"), c));
  EXPECT_EQ(checkpoint.bytes_read(), a.nbytes() / 2 + b.nbytes() + c.nbytes());
  EXPECT_NE(io_error(dir.path().string(), [&] { checkpoint.file_of("absent"); })
                .find("': no safetensors file there holds tensor \"absent\""),
            std::string::npos);

  // model.safetensors, where there is one, is the checkpoint (as transformers has it).
  save_safetensors(dir / "model.safetensors", {{"only", a}});
  EXPECT_EQ(SafetensorsCheckpoint(dir.path().string()).names(), std::vector<std::string>{"only"});
}

TEST(Safetensors, ACheckpointWhoseIndexAndShardsDisagreeIsRefused) {
  const torch::Tensor x = torch::ones({2});
  struct Case {
    std::string name;
    nlohmann::json weight_map;
    std::string file, message;  // the file the message names
  };
  const std::vector<Case> cases = {
      {"lacks",
       {{"a", "one.safetensors"}, {"b", "one.safetensors"}, {"x", "one.safetensors"}},
       "one.safetensors",
       "' lacks tensor \"x\", which '"},
      {"two_shards",
       {{"a", "one.safetensors"}, {"b", "one.safetensors"}, {"c", "two.safetensors"}},
       "two.safetensors",
       "' holds tensor \"a\", which '"},
      {"unlisted", {{"a", "one.safetensors"}}, "one.safetensors", "' holds tensor \"b\", which '"},
      {"missing_shard",
       {{"a", "one.safetensors"}, {"b", "one.safetensors"}, {"c", "three.safetensors"}},
       "three.safetensors",
       "' is missing: '"},
      {"not_a_file_name",
       {{"a", "../one.safetensors"}},
       "model.safetensors.index.json",
       "maps tensor \"a\" to \"../one.safetensors\", not the name of a file beside it"},
      {"not_a_string", {{"a", 1}}, "model.safetensors.index.json", "maps tensor \"a\" to 1"},
  };
  for (const Case& c : cases) {
    TempDir dir;
    save_safetensors(dir / "one.safetensors", {{"a", x}, {"b", x}});
    save_safetensors(dir / "two.safetensors", {{"a", x}, {"c", x}});
    write_index(dir, c.weight_map);
    const std::string message = io_error(dir / c.file, [&] { SafetensorsCheckpoint checkpoint(dir.path().string()); });
    EXPECT_NE(message.find(c.message), std::string::npos) << c.name << ": " << message;
  }
  TempDir dir;
  std::ofstream(dir / "model.safetensors.index.json") << R"({"metadata": {}})";
  EXPECT_NE(
      io_error(dir / "model.safetensors.index.json", [&] { SafetensorsCheckpoint checkpoint(dir.path().string()); })
          .find("has no \"weight_map\" object"),
      std::string::npos);
  TempDir none;
  EXPECT_NE(io_error(none.path().string(), [&] { SafetensorsCheckpoint checkpoint(none.path().string()); })
                .find("holds neither model.safetensors nor model.safetensors.index.json"),
            std::string::npos);
}

TEST(Safetensors, AWriteThatFailsLeavesNoFileBehind) {
  TempDir dir;
  const std::string path = dir / "out.safetensors";
  const auto config_error = [&](const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
    try {
      save_safetensors(path, tensors);
    } catch (const ConfigError& error) {
      EXPECT_FALSE(fs::exists(path));
      EXPECT_FALSE(fs::exists(path + ".tmp"));
      return std::string(error.what());
    }
    return std::string("(no ConfigError)");
  };
  const torch::Tensor x = torch::ones({2});
  EXPECT_NE(config_error({{"a", x}, {"u", torch::Tensor()}}).find("tensor \"u\" is undefined"), std::string::npos);
  EXPECT_NE(config_error({{"a", x}, {"a", x}}).find("two tensors are named \"a\""), std::string::npos);
  EXPECT_NE(config_error({{"", x}}).find("a tensor may not be named \"\""), std::string::npos);
  EXPECT_NE(config_error({{"__metadata__", x}}).find("may not be named \"__metadata__\""), std::string::npos);
  EXPECT_NE(config_error({{"d", torch::ones({2}, torch::kComplexDouble)}})
                .find("is ComplexDouble, which the format does not hold"),
            std::string::npos);
  EXPECT_NE(config_error({{"s", x.to_sparse()}}).find("write its to_dense()"), std::string::npos);
  EXPECT_NE(config_error({{"\xff", x}}).find("is not UTF-8"), std::string::npos);

  // A disk that fills up halfway: the file there before is left as it was.
  save_safetensors(path, {{"old", x}});
  const std::string before = read_bytes(path);
  rlimit saved{};
  getrlimit(RLIMIT_FSIZE, &saved);
  const auto saved_handler = signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 64 * 1024;
  setrlimit(RLIMIT_FSIZE, &small);
  const std::string message = io_error(path, [&] { save_safetensors(path, {{"big", torch::zeros({1 << 18})}}); });
  setrlimit(RLIMIT_FSIZE, &saved);
  signal(SIGXFSZ, saved_handler);
  EXPECT_NE(message.find("cannot write '" + path + "': File too large"), std::string::npos) << message;
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  const std::string nowhere = (dir.path() / "no_such_dir" / "out.safetensors").string();
  EXPECT_NE(io_error(nowhere,
                     [&] {
                       save_safetensors(nowhere, {{"a", x}});
                     })
                .find("No such file or directory"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir / "no_such_dir"));
}

}  // namespace
}  // namespace flexmodel::io
