/* Preloaded (LD_PRELOAD) into the kill test's writer process: raises SIGKILL
 * just before the process's Nth write to a regular file, N taken from
 * FLEXMODEL_KILL_AT_WRITE. Sweeping N ends the writer at every point of its
 * flushes, where killing at random times rarely lands. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static long writes_left = -1;

__attribute__((constructor)) static void read_kill_point(void) {
  const char* at = getenv("FLEXMODEL_KILL_AT_WRITE");
  writes_left = at != NULL ? atol(at) : -1;
}

static void count_write(int fd) {
  struct stat status;
  if (writes_left <= 0 || fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) return;
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
