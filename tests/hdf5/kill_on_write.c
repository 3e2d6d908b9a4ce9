/* Linked into the writer tests' executable, whose pwrite and write take the
 * place of the C library's for every library in the process (HDF5's file
 * driver among them): flexmodel_kill_at_write(N) makes the process raise
 * SIGKILL just before its Nth write to a regular file from then on. The kill
 * test arms it in a forked child writer: sweeping N ends the writer at every
 * point of its flushes, where killing at random times rarely lands. Under a
 * sanitizer (which runs no kill test) the calls stay the sanitizer's own. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

static long writes_left = -1;

void flexmodel_kill_at_write(long writes) { __atomic_store_n(&writes_left, writes, __ATOMIC_SEQ_CST); }

#ifndef FLEXMODEL_SANITIZED

static ssize_t (*real_pwrite)(int, const void*, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void*, size_t, off_t);
static ssize_t (*real_write)(int, const void*, size_t);

/* Before main, so that no two threads race to resolve them (a library's
 * constructor writing earlier resolves them first, still on one thread). */
__attribute__((constructor)) static void find_the_real_calls(void) {
  real_pwrite = (ssize_t(*)(int, const void*, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
  real_pwrite64 = (ssize_t(*)(int, const void*, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
  real_write = (ssize_t(*)(int, const void*, size_t))dlsym(RTLD_NEXT, "write");
}

static void count_write(int fd) {
  struct stat status;
  if (real_write == NULL) find_the_real_calls();
  if (__atomic_load_n(&writes_left, __ATOMIC_SEQ_CST) <= 0 || fstat(fd, &status) != 0 || !S_ISREG(status.st_mode))
    return;
  if (__atomic_sub_fetch(&writes_left, 1, __ATOMIC_SEQ_CST) == 0) raise(SIGKILL);
}

ssize_t pwrite(int fd, const void* data, size_t bytes, off_t offset) {
  count_write(fd);
  return real_pwrite(fd, data, bytes, offset);
}

ssize_t pwrite64(int fd, const void* data, size_t bytes, off_t offset) {
  count_write(fd);
  return real_pwrite64(fd, data, bytes, offset);
}

ssize_t write(int fd, const void* data, size_t bytes) {
  count_write(fd);
  return real_write(fd, data, bytes);
}

#endif
