// The HDF5 sink's file-format level: the superblock whose recorded end keeps a
// killed writer's file readable, and the file and process calls around the file
// (sync, rename, size limit, exit handlers), apart from the writer that drives them.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include <hdf5.h>

namespace flexmodel::io::detail {

// How a killed process keeps its committed steps (HDF5 1.10 has no journal):
// - metadata reaches the file only at a commit: the metadata cache never
//   evicts, and the file has no free-space manager (strategy NONE), so space
//   that the last commit's metadata points at is never handed out again;
// - after each commit the end of the allocated space (EOA) moves on by a byte,
//   so that a block freed later is never "at the end" and reused by shrinking;
// - a commit flushes twice: everything of the step, then the root attribute
//   `steps`, the record a reader trusts, so a kill inside the first flush
//   leaves the previous record;
// - before a flush the file is extended past the EOA and the superblock on
//   disk is told so: HDF5 writes its own superblock (with the EOA) last in a
//   flush, so metadata written before it may point past the end the old one
//   records, which HDF5 refuses ("addr overflow"); with the end recorded
//   first, the superblock covers every address on disk at every moment;
// - chunks are indexed by extensible arrays, whose entries never move (a v1
//   B-tree split writes the parent before the new node);
// - a step's last, partial chunk is written unfiltered (filter mask: skip
//   all) and rewritten in place until full, so committed rows keep their place
//   (compressed datasets have chunks of whole steps, so only a step of another
//   size leaves a partial one, whose space is lost once it is compressed);
// - superblock version 2 (no SWMR, no version 3) records no "open for writing"
//   flag that would make h5py refuse the file after a crash.
// This leans on HDF5 1.10's flush order and the sec2 driver (set explicitly),
// so crash_safe() refuses any other HDF5 release, and a file to append to
// whose superblock is not one this writer can keep; crash_safe(false) writes
// with plain flushes instead, and a file is then whole only once closed.

// ---- the end of the file in the superblock ------------------------------

// Bob Jenkins' lookup3 hash (hashlittle, initial value 0): HDF5's metadata checksum.
std::uint32_t lookup3_checksum(const unsigned char* key, std::size_t length);

// A version 2 superblock (a version 3 one records an "open for writing"
// flag) at offset 0 with 8-byte addresses and base address 0 (what this
// writer creates): signature, version, sizes, flags, then base, extension,
// end-of-file and root addresses, then the checksum.
struct Superblock {
  static constexpr std::size_t kBytes = 48;
  static constexpr std::size_t kEndOffset = 28;
  static constexpr std::size_t kChecksumOffset = 44;
  unsigned char bytes[kBytes];

  // Reads it from `fd`; false when the file does not start with one whose checksum matches.
  bool read(int fd) {
    if (::pread(fd, bytes, kBytes, 0) != static_cast<ssize_t>(kBytes)) return false;
    return std::memcmp(bytes, "\x89HDF\r\n\x1a\n", 8) == 0 && bytes[8] == 2 && bytes[9] == 8 &&
           load(12, 8) == 0 && lookup3_checksum(bytes, kChecksumOffset) == load(kChecksumOffset, 4);
  }
  std::uint64_t end() const { return load(kEndOffset, 8); }
  bool write_end(int fd, std::uint64_t end) {
    store(kEndOffset, 8, end);
    store(kChecksumOffset, 4, lookup3_checksum(bytes, kChecksumOffset));
    return ::pwrite(fd, bytes, kBytes, 0) == static_cast<ssize_t>(kBytes);
  }

 private:
  std::uint64_t load(std::size_t at, std::size_t size) const {
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < size; ++i) value |= std::uint64_t{bytes[at + i]} << (8 * i);
    return value;
  }
  void store(std::size_t at, std::size_t size, std::uint64_t value) {
    for (std::size_t i = 0; i < size; ++i) bytes[at + i] = static_cast<unsigned char>(value >> (8 * i));
  }
};

// fsync of a file and of the folder that names it.
void sync_path(const std::string& path);

// Datasets created from here on index their chunks with an extensible array
// (HDF5 1.10's format), whose committed entries never move; the v1 B-tree
// moves half a node's entries into a new node when it splits, and a kill in
// that flush leaves a parent pointing at a node not yet written. The
// superblock keeps its version 2 (see the top).
void index_chunks_by_extensible_arrays(hid_t file);

// A closed file loses the reserve its last flush added past the end (see flush_file).
void trim_to_recorded_end(const std::string& path);

// HDF5 1.10's exit handler crashes on a file it failed to close (half torn
// down), which no call can release: the process then ends at exit() with its
// status, skipping the exit handlers registered before (HDF5's among them).
void skip_exit_handlers_from_now();

// This process's file-size limit (ulimit -f) in bytes; 0 when none.
std::uint64_t file_size_limit();

// Closes a file descriptor when it goes.
struct Descriptor {
  explicit Descriptor(int descriptor) : fd(descriptor) {}
  ~Descriptor() {
    if (fd >= 0) ::close(fd);
  }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  int fd;
};

// Makes the open file `to` a copy of the open file `from`: a reflink where the
// filesystem shares blocks (btrfs, XFS), else a copy in the kernel, else
// through a buffer. False, with errno, when it fails.
bool copy_file_contents(int from, int to);

// Moves `from` to `to`; an existing `to` is replaced only when `replace` is set.
void move_file(const std::string& from, const std::string& to, bool replace);

}  // namespace flexmodel::io::detail
