// HDF5's C API made safe for the sink: failed calls thrown as IOError with HDF5's
// error stack (FLEXMODEL_H5), identifiers closed by RAII, and the file's types,
// attributes and groups, shared by the writer and the file-format level.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <hdf5.h>

#include <torch/types.h>

#include "flexmodel/error.h"
#include "flexmodel/hook_function.h"

namespace flexmodel::io::detail {

constexpr const char* kRootGroupName = "(root)";

// ---- HDF5 errors ---------------------------------------------------------

herr_t append_error(unsigned n, const H5E_error2_t* error, void* text_ptr);

// Empties this thread's HDF5 error stack into one line, innermost cause last.
std::string take_error_stack();

[[noreturn]] void fail_hdf5(const char* source, int line, const std::string& what);

// FLEXMODEL_H5(call, message parts...): the call's result, or IOError with the
// message and HDF5's error stack when it is negative.
#define FLEXMODEL_H5(call, ...)                                                          \
  ([&] {                                                                                 \
    auto result_ = (call);                                                               \
    if (result_ < 0) [[unlikely]] {                                                      \
      ::flexmodel::io::detail::fail_hdf5(__FILE__, __LINE__,                             \
                                         ::flexmodel::detail::concat(__VA_ARGS__));      \
    }                                                                                    \
    return result_;                                                                      \
  }())

// HDF5 prints its error stack to stderr unless told otherwise; this thread's
// setting is restored on leaving, since it may belong to the application.
class QuietErrors {
 public:
  QuietErrors() {
    H5Eget_auto2(H5E_DEFAULT, &function_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietErrors() { H5Eset_auto2(H5E_DEFAULT, function_, data_); }
  QuietErrors(const QuietErrors&) = delete;
  QuietErrors& operator=(const QuietErrors&) = delete;

 private:
  H5E_auto2_t function_ = nullptr;
  void* data_ = nullptr;
};

// An HDF5 identifier closed on destruction (a failed close there has nobody to tell).
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)), closer_(other.closer_) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
      closer_ = other.closer_;
    }
    return *this;
  }
  ~Handle() { reset(); }

  hid_t get() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }
  hid_t release() { return std::exchange(id_, H5I_INVALID_HID); }
  void reset() {
    if (id_ >= 0 && closer_(std::exchange(id_, H5I_INVALID_HID)) < 0) H5Eclear2(H5E_DEFAULT);
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// ---- types and attributes ------------------------------------------------

bool storable(c10::ScalarType dtype);

std::optional<c10::ScalarType> dtype_from_name(const std::string& name);

std::optional<HookType> hook_type_from_name(const std::string& name);

// What a dataset holds and how: bfloat16 goes to disk as float32 unless its bits are kept.
struct Storage {
  c10::ScalarType dtype;
  bool bfloat16_bits = false;

  c10::ScalarType written() const {
    return dtype == torch::kBFloat16 && !bfloat16_bits ? torch::kFloat32 : dtype;
  }
};

Handle copy_type(hid_t type);

// Little-endian file types, as h5py writes them: float16 is IEEE half built
// from float32 (HDF5 1.10 has no predefined one), bool the enum {FALSE, TRUE}
// of int8; numpy reads both back as float16 and bool.
Handle file_type(const Storage& storage);

Handle utf8_string_type();

// Variable-length UTF-8 strings: h5py reads them as str.
void write_attribute(hid_t object, const char* name, const std::string& value, const std::string& where);

// Scalar int64, created or overwritten in place.
void write_attribute(hid_t object, const char* name, std::int64_t value, const std::string& where);

std::optional<std::string> read_string_attribute(hid_t object, const char* name, const std::string& where);

std::optional<std::int64_t> read_int_attribute(hid_t object, const char* name, const std::string& where);

Handle open_or_create_group(hid_t parent, const std::string& name, const std::string& where);

herr_t append_link_name(hid_t, const char* name, const H5L_info_t*, void* names);

std::vector<std::string> link_names(hid_t group, const std::string& where);

}  // namespace flexmodel::io::detail
