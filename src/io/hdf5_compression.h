// How the HDF5 sink compresses: the parsed compression option, and HDF5's shuffle +
// deflate done by hand on a small thread pool, so gzip chunks leave the writer thread.
#pragma once

#include <pthread.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <hdf5.h>

namespace flexmodel::io::detail {

// ---- compression ---------------------------------------------------------

struct Compression {
  enum class Kind : std::uint8_t { none, gzip, plugin };
  Kind kind = Kind::none;
  int level = 0;                   // gzip
  H5Z_filter_t filter = 0;         // plugin
  std::vector<unsigned> settings;  // plugin cd_values
  std::string text;
};

int compression_level(const std::string& text, std::size_t colon, int fallback, int low, int high);

Compression parse_compression(const std::string& text);

// HDF5's shuffle filter, by hand: byte j of every element goes to block j.
void shuffle(const unsigned char* input, std::size_t bytes, std::size_t element, unsigned char* output);

// HDF5's shuffle + deflate pipeline for one chunk, with a deflate stream kept per thread.
std::vector<unsigned char> shuffle_deflate(const unsigned char* input, std::size_t bytes, std::size_t element,
                                           int level);

// Compresses chunks on a few threads, first in first out.
class CompressionPool {
 public:
  using Job = std::packaged_task<std::vector<unsigned char>()>;

  explicit CompressionPool(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~CompressionPool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    ready_.notify_all();
    for (auto& thread : threads_) thread.join();
  }
  CompressionPool(const CompressionPool&) = delete;
  CompressionPool& operator=(const CompressionPool&) = delete;

  std::future<std::vector<unsigned char>> submit(std::function<std::vector<unsigned char>()> work) {
    Job job(std::move(work));
    auto result = job.get_future();
    {
      std::lock_guard lock(mutex_);
      jobs_.push_back(std::move(job));
    }
    ready_.notify_one();
    return result;
  }

  std::size_t size() const { return threads_.size(); }

 private:
  void run() {
    pthread_setname_np(pthread_self(), "flexmodel-gzip");
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mutex_);
        ready_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace flexmodel::io::detail
