#pragma once

#define FLEXMODEL_VERSION_MAJOR 0
#define FLEXMODEL_VERSION_MINOR 1
#define FLEXMODEL_VERSION_PATCH 0
#define FLEXMODEL_VERSION "0.1.0"

namespace flexmodel {
inline constexpr const char* kVersion = FLEXMODEL_VERSION;
}  // namespace flexmodel
