// Errors thrown by flexmodel. Every message says what was expected, what came,
// and how to fix it; the check macro appends the rank and source location.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace flexmodel {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;

  // Under a mesh: every rank of the failing pipeline stage raised this error
  // at the same point, so none waits in a collective, and with one stage the
  // program may catch it and run the next forward. Any other error that
  // leaves a forward or a backward under a mesh ends every rank.
  bool raised_on_every_rank() const noexcept { return every_rank_; }
  void mark_raised_on_every_rank() noexcept { every_rank_ = true; }

 private:
  bool every_rank_ = false;
};

// A request that cannot be honoured as configured (unknown module, group, option).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A tensor whose shape, dtype or device is not what a hook declared or needs.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// An editing function threw; the message names the hook and carries the cause.
class HookError : public Error {
 public:
  using Error::Error;
};

// A collective failed or the ranks disagree.
class DistributedError : public Error {
 public:
  using Error::Error;
};

// A file could not be read or written.
class IOError : public Error {
 public:
  using Error::Error;
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

// The rank printed in messages; 0 until a distributed world says otherwise.
int message_rank() noexcept;
void set_message_rank(int rank) noexcept;

template <class ErrorType>
[[noreturn]] void throw_error(const char* file, int line, const std::string& message) {
  throw ErrorType(concat("flexmodel: ", message, " [rank ", message_rank(), ", ", file, ":", line, "]"));
}

}  // namespace detail
}  // namespace flexmodel

// FLEXMODEL_CHECK(condition, ErrorType, message parts...): throws ErrorType when false.
#define FLEXMODEL_CHECK(condition, ErrorType, ...)                                           \
  do {                                                                                       \
    if (!(condition)) [[unlikely]] {                                                         \
      ::flexmodel::detail::throw_error<ErrorType>(__FILE__, __LINE__,                        \
                                                  ::flexmodel::detail::concat(__VA_ARGS__)); \
    }                                                                                        \
  } while (false)

#define FLEXMODEL_FAIL(ErrorType, ...) \
  ::flexmodel::detail::throw_error<ErrorType>(__FILE__, __LINE__, ::flexmodel::detail::concat(__VA_ARGS__))
