// HDF5 errors, handles, types and attributes of the HDF5 sink, and the path of a hook point's dataset.
#include "io/hdf5_handles.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <hdf5.h>

#include <torch/types.h>

#include "flexmodel/error.h"
#include "flexmodel/hook_function.h"
#include "flexmodel/io/hdf5_writer.h"
#include "flexmodel/output_map.h"

namespace flexmodel::io {

using ::flexmodel::detail::concat;

namespace detail {

// ---- HDF5 errors ---------------------------------------------------------

herr_t append_error(unsigned n, const H5E_error2_t* error, void* text_ptr) {
  auto& text = *static_cast<std::string*>(text_ptr);
  char minor[256] = "";
  H5Eget_msg(error->min_num, nullptr, minor, sizeof minor);
  std::string description = error->desc != nullptr ? error->desc : "";
  std::replace(description.begin(), description.end(), '\n', ' ');  // sec2's messages embed ctime()
  text += concat(n == 0 ? "" : "; ", error->func_name, "(): ", description);
  if (minor[0] != '\0') text += concat(" (", minor, ")");
  return 0;
}

std::string take_error_stack() {
  std::string text;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, append_error, &text);
  H5Eclear2(H5E_DEFAULT);
  return text.empty() ? "HDF5 left no error stack" : text;
}

[[noreturn]] void fail_hdf5(const char* source, int line, const std::string& what) {
  ::flexmodel::detail::throw_error<IOError>(source, line, concat(what, "; HDF5 error stack: ", take_error_stack()));
}

// ---- types and attributes ------------------------------------------------

bool storable(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kBool:
    case torch::kUInt8:
    case torch::kInt8:
    case torch::kInt16:
    case torch::kInt32:
    case torch::kInt64:
    case torch::kFloat16:
    case torch::kBFloat16:
    case torch::kFloat32:
    case torch::kFloat64:
      return true;
    default:
      return false;
  }
}

std::optional<c10::ScalarType> dtype_from_name(const std::string& name) {
  for (auto dtype : {torch::kBool, torch::kUInt8, torch::kInt8, torch::kInt16, torch::kInt32, torch::kInt64,
                     torch::kFloat16, torch::kBFloat16, torch::kFloat32, torch::kFloat64}) {
    if (dtype_name(dtype) == name) return dtype;
  }
  return std::nullopt;
}

std::optional<HookType> hook_type_from_name(const std::string& name) {
  for (auto type : {HookType::forward, HookType::forward_pre, HookType::full_backward, HookType::full_backward_pre,
                    HookType::tensor}) {
    if (to_string(type) == name) return type;
  }
  return std::nullopt;
}

Handle copy_type(hid_t type) { return Handle(FLEXMODEL_H5(H5Tcopy(type), "could not copy an HDF5 type"), H5Tclose); }

Handle file_type(const Storage& storage) {
  switch (storage.dtype) {
    case torch::kBool: {
      Handle type(FLEXMODEL_H5(H5Tenum_create(H5T_NATIVE_INT8), "could not create the bool type"), H5Tclose);
      const std::int8_t no = 0, yes = 1;
      FLEXMODEL_H5(H5Tenum_insert(type.get(), "FALSE", &no), "could not create the bool type");
      FLEXMODEL_H5(H5Tenum_insert(type.get(), "TRUE", &yes), "could not create the bool type");
      return type;
    }
    case torch::kUInt8: return copy_type(H5T_STD_U8LE);
    case torch::kInt8: return copy_type(H5T_STD_I8LE);
    case torch::kInt16: return copy_type(H5T_STD_I16LE);
    case torch::kInt32: return copy_type(H5T_STD_I32LE);
    case torch::kInt64: return copy_type(H5T_STD_I64LE);
    case torch::kFloat16: {
      Handle type = copy_type(H5T_IEEE_F32LE);
      FLEXMODEL_H5(H5Tset_fields(type.get(), 15, 10, 5, 0, 10), "could not create the float16 type");
      FLEXMODEL_H5(H5Tset_size(type.get(), 2), "could not create the float16 type");
      FLEXMODEL_H5(H5Tset_ebias(type.get(), 15), "could not create the float16 type");
      return type;
    }
    case torch::kBFloat16: return copy_type(storage.bfloat16_bits ? H5T_STD_U16LE : H5T_IEEE_F32LE);
    case torch::kFloat32: return copy_type(H5T_IEEE_F32LE);
    case torch::kFloat64: return copy_type(H5T_IEEE_F64LE);
    default: FLEXMODEL_FAIL(ShapeError, "HDF5Writer cannot store ", dtype_name(storage.dtype));
  }
}

Handle utf8_string_type() {
  Handle type = copy_type(H5T_C_S1);
  FLEXMODEL_H5(H5Tset_size(type.get(), H5T_VARIABLE), "could not create a string type");
  FLEXMODEL_H5(H5Tset_cset(type.get(), H5T_CSET_UTF8), "could not create a string type");
  return type;
}

void write_attribute(hid_t object, const char* name, const std::string& value, const std::string& where) {
  Handle type = utf8_string_type();
  Handle space(FLEXMODEL_H5(H5Screate(H5S_SCALAR), "could not create a dataspace"), H5Sclose);
  Handle attribute(FLEXMODEL_H5(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                                "could not create attribute '", name, "' of ", where),
                   H5Aclose);
  const char* text = value.c_str();
  FLEXMODEL_H5(H5Awrite(attribute.get(), type.get(), &text), "could not write attribute '", name, "' of ", where);
}

void write_attribute(hid_t object, const char* name, std::int64_t value, const std::string& where) {
  Handle attribute;
  if (FLEXMODEL_H5(H5Aexists(object, name), "could not look for attribute '", name, "' of ", where) > 0) {
    attribute = Handle(FLEXMODEL_H5(H5Aopen(object, name, H5P_DEFAULT), "could not open attribute '", name, "' of ",
                                    where),
                       H5Aclose);
  } else {
    Handle space(FLEXMODEL_H5(H5Screate(H5S_SCALAR), "could not create a dataspace"), H5Sclose);
    attribute = Handle(FLEXMODEL_H5(H5Acreate2(object, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                                    "could not create attribute '", name, "' of ", where),
                       H5Aclose);
  }
  FLEXMODEL_H5(H5Awrite(attribute.get(), H5T_NATIVE_INT64, &value), "could not write attribute '", name, "' of ",
               where);
}

std::optional<std::string> read_string_attribute(hid_t object, const char* name, const std::string& where) {
  if (FLEXMODEL_H5(H5Aexists(object, name), "could not look for attribute '", name, "' of ", where) <= 0) {
    return std::nullopt;
  }
  Handle attribute(FLEXMODEL_H5(H5Aopen(object, name, H5P_DEFAULT), "could not open attribute '", name, "' of ", where),
                   H5Aclose);
  Handle stored(FLEXMODEL_H5(H5Aget_type(attribute.get()), "could not read attribute '", name, "' of ", where),
                H5Tclose);
  if (H5Tget_class(stored.get()) != H5T_STRING) return std::nullopt;
  if (H5Tis_variable_str(stored.get()) > 0) {
    Handle type = utf8_string_type();
    char* text = nullptr;
    FLEXMODEL_H5(H5Aread(attribute.get(), type.get(), &text), "could not read attribute '", name, "' of ", where);
    std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  std::string value(H5Tget_size(stored.get()), '\0');
  FLEXMODEL_H5(H5Aread(attribute.get(), stored.get(), value.data()), "could not read attribute '", name, "' of ",
               where);
  return value.substr(0, value.find('\0'));
}

std::optional<std::int64_t> read_int_attribute(hid_t object, const char* name, const std::string& where) {
  if (FLEXMODEL_H5(H5Aexists(object, name), "could not look for attribute '", name, "' of ", where) <= 0) {
    return std::nullopt;
  }
  Handle attribute(FLEXMODEL_H5(H5Aopen(object, name, H5P_DEFAULT), "could not open attribute '", name, "' of ", where),
                   H5Aclose);
  std::int64_t value = 0;
  FLEXMODEL_H5(H5Aread(attribute.get(), H5T_NATIVE_INT64, &value), "could not read attribute '", name, "' of ", where);
  return value;
}

Handle open_or_create_group(hid_t parent, const std::string& name, const std::string& where) {
  if (FLEXMODEL_H5(H5Lexists(parent, name.c_str(), H5P_DEFAULT), "could not look for group ", where) > 0) {
    return Handle(FLEXMODEL_H5(H5Gopen2(parent, name.c_str(), H5P_DEFAULT), "could not open group ", where), H5Gclose);
  }
  return Handle(FLEXMODEL_H5(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                             "could not create group ", where),
                H5Gclose);
}

herr_t append_link_name(hid_t, const char* name, const H5L_info_t*, void* names) {
  static_cast<std::vector<std::string>*>(names)->emplace_back(name);
  return 0;
}

std::vector<std::string> link_names(hid_t group, const std::string& where) {
  std::vector<std::string> names;
  FLEXMODEL_H5(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, nullptr, append_link_name, &names),
               "could not list the members of ", where);
  return names;
}

}  // namespace detail

std::string hdf5_dataset_path(const std::string& module_name, HookType type) {
  if (module_name == kTokensName) return "/tokens";
  return concat("/activations/", module_name.empty() ? detail::kRootGroupName : module_name, "/", to_string(type));
}

}  // namespace flexmodel::io
