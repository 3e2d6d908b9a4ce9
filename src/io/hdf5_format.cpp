// The HDF5 sink's file-format level; io/hdf5_format.h says how a killed process keeps its committed steps.
#include "io/hdf5_format.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include <hdf5.h>

#include "flexmodel/error.h"
#include "flexmodel/logging.h"
#include "io/hdf5_handles.h"

namespace flexmodel::io::detail {

// ---- the end of the file in the superblock ------------------------------

std::uint32_t lookup3_checksum(const unsigned char* key, std::size_t length) {
  auto rotate = [](std::uint32_t x, int k) { return (x << k) | (x >> (32 - k)); };
  std::uint32_t a, b, c;
  a = b = c = 0xdeadbeefu + static_cast<std::uint32_t>(length);
  auto word = [&](std::size_t i, std::size_t available) {
    std::uint32_t value = 0;
    for (std::size_t byte = 0; byte < 4 && byte < available; ++byte) value |= std::uint32_t{key[i + byte]} << (8 * byte);
    return value;
  };
  while (length > 12) {
    a += word(0, 4), b += word(4, 4), c += word(8, 4);
    a -= c, a ^= rotate(c, 4), c += b;
    b -= a, b ^= rotate(a, 6), a += c;
    c -= b, c ^= rotate(b, 8), b += a;
    a -= c, a ^= rotate(c, 16), c += b;
    b -= a, b ^= rotate(a, 19), a += c;
    c -= b, c ^= rotate(b, 4), b += a;
    key += 12, length -= 12;
  }
  if (length == 0) return c;
  a += word(0, length), b += length > 4 ? word(4, length - 4) : 0, c += length > 8 ? word(8, length - 8) : 0;
  c ^= b, c -= rotate(b, 14);
  a ^= c, a -= rotate(c, 11);
  b ^= a, b -= rotate(a, 25);
  c ^= b, c -= rotate(b, 16);
  a ^= c, a -= rotate(c, 4);
  b ^= a, b -= rotate(a, 14);
  c ^= b, c -= rotate(b, 24);
  return c;
}

void sync_path(const std::string& path) {
  for (const std::string& target : {path, std::filesystem::path(path).parent_path().string()}) {
    const int fd = ::open(target.empty() ? "." : target.c_str(), O_RDONLY | O_CLOEXEC);
    FLEXMODEL_CHECK(fd >= 0, IOError, "could not open '", target, "' to sync it: ", std::strerror(errno));
    const int status = ::fsync(fd);
    const int error = errno;
    ::close(fd);
    FLEXMODEL_CHECK(status == 0, IOError, "could not fsync '", target, "': ", std::strerror(error));
  }
}

void index_chunks_by_extensible_arrays(hid_t file) {
  FLEXMODEL_H5(H5Fset_libver_bounds(file, H5F_LIBVER_V110, H5F_LIBVER_V110), "could not choose HDF5 1.10's chunk index");
}

void trim_to_recorded_end(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  FLEXMODEL_CHECK(fd >= 0, IOError, "could not open '", path, "' to trim it: ", std::strerror(errno));
  Superblock superblock;
  struct stat status {};
  int result = 0;
  if (superblock.read(fd) && ::fstat(fd, &status) == 0 && static_cast<std::uint64_t>(status.st_size) > superblock.end()) {
    result = ::ftruncate(fd, static_cast<off_t>(superblock.end()));
  }
  const int error = errno;
  ::close(fd);
  FLEXMODEL_CHECK(result == 0, IOError, "could not trim '", path, "' to its end: ", std::strerror(error));
}

void skip_exit_handlers_from_now() {
  static std::once_flag once;
  std::call_once(once, [] {
    ::on_exit(
        [](int status, void*) {
          logger()->flush();
          std::fflush(nullptr);
          ::_exit(status);
        },
        nullptr);
  });
}

std::uint64_t file_size_limit() {
  rlimit limit{};
  return ::getrlimit(RLIMIT_FSIZE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY ? 0 : limit.rlim_cur;
}

namespace {

// The rest of `from` from offset `at` on, through a buffer.
bool copy_through_buffer(int from, int to, off_t at) {
  std::vector<char> buffer(std::size_t{1} << 20);
  for (;;) {
    const ssize_t got = ::pread(from, buffer.data(), buffer.size(), at);
    if (got == 0) return true;
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return false;
    for (ssize_t put = 0; put < got;) {
      const ssize_t wrote = ::pwrite(to, buffer.data() + put, static_cast<std::size_t>(got - put), at + put);
      if (wrote < 0 && errno == EINTR) continue;
      if (wrote <= 0) {
        if (wrote == 0) errno = EIO;
        return false;
      }
      put += wrote;
    }
    at += got;
  }
}

}  // namespace

bool copy_file_contents(int from, int to) {
  struct stat source {}, target {};
  if (::fstat(from, &source) != 0 || ::fstat(to, &target) != 0) return false;
  if (source.st_dev == target.st_dev && source.st_ino == target.st_ino) {
    errno = EINVAL;  // truncating the copy would empty the file copied
    return false;
  }
  if (::ftruncate(to, 0) != 0) return false;
  if (::ioctl(to, FICLONE, from) == 0) return true;
  loff_t in = 0, out = 0;
  while (in < source.st_size) {
    const ssize_t copied = ::copy_file_range(from, &in, to, &out, static_cast<std::size_t>(source.st_size - in), 0);
    if (copied > 0 || (copied < 0 && errno == EINTR)) continue;
    // Some file systems copy nothing, or not across these two files: the buffer does.
    if (copied == 0 || errno == ENOSYS || errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP) {
      return copy_through_buffer(from, to, in);
    }
    return false;
  }
  return true;
}

void move_file(const std::string& from, const std::string& to, bool replace) {
  int status = replace ? std::rename(from.c_str(), to.c_str())
                       : ::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE);
  if (status != 0 && !replace && errno == EINVAL) {  // a file system without RENAME_NOREPLACE
    status = ::link(from.c_str(), to.c_str());
    if (status == 0) ::unlink(from.c_str());
  }
  FLEXMODEL_CHECK(status == 0, IOError, "could not rename '", from, "' to '", to, "': ", std::strerror(errno),
                  errno == EEXIST ? " (another program created it meanwhile)" : "");
}

}  // namespace flexmodel::io::detail
