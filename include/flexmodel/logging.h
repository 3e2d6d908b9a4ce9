// The library's one named logger. The level comes from FLEXMODEL_LOG_LEVEL
// (trace, debug, info, warn, error, critical, off; default warn). spdlog's
// default logger, pattern and level are never touched.
#pragma once

#include <memory>

#include <spdlog/spdlog.h>

namespace flexmodel {

// Returns the "flexmodel" logger, creating it on first use.
std::shared_ptr<spdlog::logger> logger();

// Replaces the logger the library writes to (for applications with their own sinks).
void set_logger(std::shared_ptr<spdlog::logger> replacement);

}  // namespace flexmodel
