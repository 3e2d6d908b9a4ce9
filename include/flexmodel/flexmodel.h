// Every header of the library (target flexmodel::flexmodel). The ready-made
// editing functions of flexmodel::hooks are <flexmodel/hooks/editing.h>.
#pragma once

#include "flexmodel/cache.h"
#include "flexmodel/dist.h"
#include "flexmodel/error.h"
#include "flexmodel/flex_model.h"
#include "flexmodel/hook_function.h"
#include "flexmodel/hooked.h"
#include "flexmodel/io/hdf5_writer.h"
#include "flexmodel/logging.h"
#include "flexmodel/models/gpt.h"
#include "flexmodel/nn.h"
#include "flexmodel/npy.h"
#include "flexmodel/output_map.h"
#include "flexmodel/parallel.h"
#include "flexmodel/pattern.h"
#include "flexmodel/scoped_hooks.h"
#include "flexmodel/sink.h"
#include "flexmodel/slice.h"
#include "flexmodel/torchscript.h"
#include "flexmodel/version.h"
