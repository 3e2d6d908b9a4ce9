// The .npy reader against hostile files: every malformed header is one
// IOError naming the file, and nothing is allocated from sizes the file does
// not hold.
#include <gtest/gtest.h>

#include <sys/resource.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "flexmodel/error.h"
#include "flexmodel/npy.h"

namespace flexmodel {
namespace {

namespace fs = std::filesystem;

// A .npy file: magic, version, little-endian header length (2 bytes for 1.0,
// 4 otherwise), the header as given, then `data`.
std::string write_npy(const std::string& name, const std::string& header, const std::string& data = "",
                      int major = 1, int minor = 0, std::int64_t claimed_length = -1) {
  const std::string path = (fs::temp_directory_path() / ("flexmodel_npy_" + name + ".npy")).string();
  std::ofstream out(path, std::ios::binary);
  out << "\x93NUMPY" << static_cast<char>(major) << static_cast<char>(minor);
  const auto length = static_cast<std::uint64_t>(claimed_length >= 0 ? claimed_length : header.size());
  for (int byte = 0; byte < (major == 1 ? 2 : 4); ++byte) out << static_cast<char>((length >> (8 * byte)) & 0xff);
  out << header << data;
  return path;
}

std::string npy_error(const std::string& path) {
  try {
    read_npy(path);
  } catch (const IOError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    return message;
  }
  return "(no error)";
}

std::string dict(const std::string& descr, const std::string& shape) {
  return "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + shape + "), }\n";
}

TEST(Npy, ReadsWhatItsHeaderDescribes) {
  const float values[6] = {1, 2, 3, 4, 5, 6};
  const auto path = write_npy("good", dict("<f4", "2, 3"), std::string(reinterpret_cast<const char*>(values), 24));
  EXPECT_TRUE(torch::equal(read_npy(path), torch::arange(1, 7, torch::kFloat).view({2, 3})));
  const auto scalar = write_npy("scalar", dict("<i8", ""), std::string("\x07\0\0\0\0\0\0\0", 8), 2);
  EXPECT_EQ(read_npy(scalar).item<std::int64_t>(), 7);
  EXPECT_EQ(read_npy(write_npy("empty", dict("<f4", "0, 5"))).sizes(), (std::vector<std::int64_t>{0, 5}));
}

TEST(Npy, AHeaderLongerThanTheFileIsRefusedBeforeAllocating) {
  rusage before{};
  getrusage(RUSAGE_SELF, &before);
  // 23 bytes claiming a 4 GiB header.
  const auto path = write_npy("huge_header", "{'descr'", "", 2, 0, 0xffffffffll);
  EXPECT_EQ(fs::file_size(path), 20u);
  EXPECT_NE(npy_error(path).find("claims a .npy header of 4294967295 bytes, but the file has 8"), std::string::npos);
  rusage after{};
  getrusage(RUSAGE_SELF, &after);
  EXPECT_LT(after.ru_maxrss - before.ru_maxrss, 64 * 1024) << "KiB of peak RSS grew";
}

TEST(Npy, EveryMalformedHeaderIsOneLineNamingTheFile) {
  EXPECT_NE(npy_error(write_npy("version", dict("<f4", "1,"), "xxxx", 9, 0)).find("is .npy version 9.0"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("negative", dict("<f4", "-2, 12"), std::string(96, 'x'))).find("non-negative"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("digits", dict("<f4", "99999999999999999999999"))).find("23 digits"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("too_many", dict("<f8", "1000000000000,"), std::string(16, 'x')))
                .find("more than the 16 bytes of data the file holds"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("short", dict("<f4", "2, 3"), std::string(20, 'x'))).find("more than the 20 bytes"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("long", dict("<f4", "1,"), std::string(8, 'x'))).find("holds 8 bytes"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("no_newline", "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", "xxxx"))
                .find("malformed .npy header"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("dtype", dict(">f4", "1,"), "xxxx")).find("holds dtype '>f4'"), std::string::npos);
  // What the file holds is shown escaped, so the message stays one line.
  EXPECT_NE(npy_error(write_npy("dtype_newline", dict("|u1\n\x01", "1,"), "x")).find("holds dtype '|u1\\n\\x01'"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("shape_newline", dict("<f4", "1,\n-2"), "xxxx")).find("has shape (1,\\n-2)"),
            std::string::npos);
  EXPECT_NE(npy_error(write_npy("fortran", "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }\n", "xxxx"))
                .find("Fortran-ordered"),
            std::string::npos);
  EXPECT_NE(npy_error((fs::temp_directory_path() / "flexmodel_npy_missing.npy").string()).find("cannot open"),
            std::string::npos);
  EXPECT_NE(npy_error(fs::temp_directory_path().string()).find("not a regular file"), std::string::npos);
}

}  // namespace
}  // namespace flexmodel
