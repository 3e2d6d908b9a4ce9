// Everything a user of flexmodel includes.
#pragma once

#include "flexmodel/error.h"
#include "flexmodel/flex_model.h"
#include "flexmodel/hook_function.h"
#include "flexmodel/hooked.h"
#include "flexmodel/logging.h"
#include "flexmodel/nn.h"
#include "flexmodel/output_map.h"
#include "flexmodel/pattern.h"
#include "flexmodel/version.h"
