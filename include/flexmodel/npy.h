// NumPy .npy files: the inputs of the tools (token ids, features).
#pragma once

#include <string>

#include <torch/types.h>

namespace flexmodel {

// Reads a C-ordered little-endian .npy array of bool, int8/16/32/64, uint8,
// float16/32/64. IOError naming the file and what was found otherwise.
torch::Tensor read_npy(const std::string& path);

}  // namespace flexmodel
