#include "flexmodel/interventions.h"

#include <cmath>
#include <filesystem>
#include <functional>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/serialize.h>

#include "flexmodel/error.h"

namespace flexmodel {

SteeringVectorImpl::SteeringVectorImpl(std::int64_t d_model, double coefficient_) : coefficient(coefficient_) {
  direction = register_parameter("direction", torch::zeros({d_model}));
}

torch::Tensor SteeringVectorImpl::forward(const torch::Tensor& x) {
  return x + coefficient * direction.to(x.device(), x.scalar_type());
}

InterventionConfig SteeringVectorImpl::config() const {
  return {{"d_model", static_cast<double>(direction.size(0))}, {"coefficient", coefficient}};
}

LowRankInterventionImpl::LowRankInterventionImpl(std::int64_t d_model, std::int64_t rank) {
  down = register_parameter("down", torch::randn({d_model, rank}) / std::sqrt(static_cast<double>(d_model)));
  up = register_parameter("up", torch::zeros({rank, d_model}));
}

torch::Tensor LowRankInterventionImpl::forward(const torch::Tensor& x) {
  return x + torch::matmul(torch::matmul(x, down.to(x.scalar_type())), up.to(x.scalar_type()));
}

InterventionConfig LowRankInterventionImpl::config() const {
  return {{"d_model", static_cast<double>(down.size(0))}, {"rank", static_cast<double>(down.size(1))}};
}

namespace {

constexpr const char* kKind = "flexmodel_kind";
constexpr const char* kConfig = "flexmodel_config";

double number(const InterventionConfig& config, const std::string& key, const std::string& path) {
  const auto found = config.find(key);
  FLEXMODEL_CHECK(found != config.end(), IOError, "'", path, "': its configuration lacks '", key, "'");
  return found->second;
}

std::int64_t size(const InterventionConfig& config, const std::string& key, const std::string& path) {
  const double value = number(config, key, path);
  FLEXMODEL_CHECK(value >= 1 && value == std::floor(value), IOError, "'", path, "': its '", key, "' is ", value,
                  ", not a positive integer");
  return static_cast<std::int64_t>(value);
}

using Builder = std::function<std::shared_ptr<InterventionImpl>(const InterventionConfig&, const std::string& path)>;

const std::map<std::string, Builder>& builders() {
  static const std::map<std::string, Builder> kinds{
      {"steering_vector",
       [](const InterventionConfig& config, const std::string& path) {
         return std::make_shared<SteeringVectorImpl>(size(config, "d_model", path), number(config, "coefficient", path));
       }},
      {"low_rank",
       [](const InterventionConfig& config, const std::string& path) {
         return std::make_shared<LowRankInterventionImpl>(size(config, "d_model", path), size(config, "rank", path));
       }},
  };
  return kinds;
}

}  // namespace

void save_intervention(const InterventionImpl& intervention, const std::string& path) {
  nlohmann::json config = nlohmann::json::object();
  for (const auto& [key, value] : intervention.config()) config[key] = value;
  try {
    torch::serialize::OutputArchive archive;
    intervention.save(archive);
    archive.write(kKind, c10::IValue(intervention.kind()));
    archive.write(kConfig, c10::IValue(config.dump()));
    archive.save_to(path);
  } catch (const c10::Error& error) {
    FLEXMODEL_FAIL(IOError, "could not write the intervention '", path, "': ", error.what_without_backtrace());
  }
}

std::shared_ptr<InterventionImpl> load_intervention(const std::string& path) {
  std::error_code missing;
  FLEXMODEL_CHECK(std::filesystem::is_regular_file(path, missing), IOError, "'", path,
                  "' is not a file (an intervention written by save_intervention)");
  torch::serialize::InputArchive archive;
  c10::IValue kind, config_text;
  try {
    archive.load_from(path);
  } catch (const c10::Error& error) {
    FLEXMODEL_FAIL(IOError, "'", path, "' is not a TorchScript archive: ", error.what_without_backtrace());
  }
  FLEXMODEL_CHECK(archive.try_read(kKind, kind) && kind.isString() && archive.try_read(kConfig, config_text) &&
                      config_text.isString(),
                  IOError, "'", path, "' holds no intervention (no ", kKind, " and ", kConfig,
                  " strings; save_intervention writes them)");
  InterventionConfig config;
  try {
    const nlohmann::json parsed = nlohmann::json::parse(config_text.toStringRef());
    FLEXMODEL_CHECK(parsed.is_object(), IOError, "'", path, "': its ", kConfig, " is not a JSON object of numbers");
    for (const auto& [key, value] : parsed.items()) config[key] = value.get<double>();
  } catch (const nlohmann::json::exception& error) {
    FLEXMODEL_FAIL(IOError, "'", path, "': its ", kConfig, " is not a JSON object of numbers: ", error.what());
  }
  const auto builder = builders().find(kind.toStringRef());
  if (builder == builders().end()) {
    std::string known;
    for (const auto& [name, unused] : builders()) known += (known.empty() ? "" : ", ") + name;
    FLEXMODEL_FAIL(ConfigError, "'", path, "' holds an intervention of kind '", kind.toStringRef(),
                   "', which this library does not build; it builds ", known);
  }
  std::shared_ptr<InterventionImpl> intervention = builder->second(config, path);
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const auto& parameter : intervention->named_parameters()) shapes[parameter.key()] = parameter.value().sizes().vec();
  try {
    intervention->load(archive);
  } catch (const c10::Error& error) {
    FLEXMODEL_FAIL(IOError, "'", path, "': its parameters do not fit a ", kind.toStringRef(), " of ",
                   config_text.toStringRef(), ": ", error.what_without_backtrace());
  }
  // LibTorch's load takes a parameter of any shape in place of the one built.
  for (const auto& parameter : intervention->named_parameters()) {
    FLEXMODEL_CHECK(parameter.value().sizes().vec() == shapes.at(parameter.key()), IOError, "'", path, "': its '",
                    parameter.key(), "' has shape ", parameter.value().sizes(), ", its configuration ",
                    config_text.toStringRef(), " makes it ", c10::IntArrayRef(shapes.at(parameter.key())));
  }
  return intervention;
}

}  // namespace flexmodel
