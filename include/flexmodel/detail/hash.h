// FNV-1a, the hash by which ranks compare what they are about to do (a job's
// parts, a collective's envelope) without sending it whole.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace flexmodel::detail {

inline constexpr std::uint64_t kFnvOffset = 1469598103934665603ull;

inline std::uint64_t fnv1a(const void* data, std::size_t size, std::uint64_t hash = kFnvOffset) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i) hash = (hash ^ bytes[i]) * 1099511628211ull;
  return hash;
}

inline std::uint64_t fnv1a(std::string_view text) { return fnv1a(text.data(), text.size()); }

}  // namespace flexmodel::detail
