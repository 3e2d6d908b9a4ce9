// The mesh test_parallel runs under (its arguments TP PP DP), read by each of its files.
#pragma once

#include "flexmodel/dist.h"

namespace flexmodel::testing {
extern dist::MeshShape g_shape;
}  // namespace flexmodel::testing
