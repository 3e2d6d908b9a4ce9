/* Linked into the writer tests' executable, whose pwrite and write take the
 * place of the C library's for every library in the process (HDF5's file
 * driver among them): flexmodel_kill_at_write(N) makes the process raise
 * SIGKILL just before its Nth write to a regular file from then on. The kill
 * test arms it in a forked child writer: sweeping N ends the writer at every
 * point of its flushes, where killing at random times rarely lands. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

static long writes_left = -1;

void flexmodel_kill_at_write(long writes) { __atomic_store_n(&writes_left, writes, __ATOMIC_SEQ_CST); }

static void count_write(int fd) {
  struct stat status;
  if (__atomic_load_n(&writes_left, __ATOMIC_SEQ_CST) <= 0 || fstat(fd, &status) != 0 || !S_ISREG(status.st_mode))
    return;
  if (__atomic_sub_fetch(&writes_left, 1, __ATOMIC_SEQ_CST) == 0) raise(SIGKILL);
}

ssize_t pwrite(int fd, const void* data, size_t bytes, off_t offset) {
  static ssize_t (*real)(int, const void*, size_t, off_t);
  if (real == NULL) real = (ssize_t(*)(int, const void*, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
  count_write(fd);
  return real(fd, data, bytes, offset);
}

ssize_t pwrite64(int fd, const void* data, size_t bytes, off_t offset) {
  static ssize_t (*real)(int, const void*, size_t, off_t);
  if (real == NULL) real = (ssize_t(*)(int, const void*, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
  count_write(fd);
  return real(fd, data, bytes, offset);
}

ssize_t write(int fd, const void* data, size_t bytes) {
  static ssize_t (*real)(int, const void*, size_t);
  if (real == NULL) real = (ssize_t(*)(int, const void*, size_t))dlsym(RTLD_NEXT, "write");
  count_write(fd);
  return real(fd, data, bytes);
}
