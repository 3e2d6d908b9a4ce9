#include "flexmodel/hub.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "flexmodel/detail/hash.h"
#include "flexmodel/error.h"
#include "flexmodel/io/safetensors.h"
#include "flexmodel/logging.h"

namespace flexmodel::hub {
namespace {

using nlohmann::json;
using models::GPT2Config;
using models::LlamaConfig;

// config.json's keys, read with Hugging Face's defaults for those left out (or null).
class ConfigKeys {
 public:
  ConfigKeys(const json& config, std::string file) : config_(config), file_(std::move(file)) {}

  template <class T>
  T get(const std::string& key, T fallback) const {
    const auto found = config_.find(key);
    if (found == config_.end() || found->is_null()) return fallback;
    const bool fits = std::is_same_v<T, bool>          ? found->is_boolean()
                      : std::is_same_v<T, std::string> ? found->is_string()
                      : std::is_integral_v<T>          ? found->is_number_integer()
                                                       : found->is_number();
    FLEXMODEL_CHECK(fits, ConfigError, file_, ": key '", key, "' holds ", found->dump(), ", not ", kind<T>());
    return found->get<T>();
  }

  // A key whose value other than `honoured` would change the model in a way this library does not implement.
  template <class T>
  void refuse_unless(const std::string& key, T honoured, const std::string& why) const {
    FLEXMODEL_CHECK(get<T>(key, honoured) == honoured, ConfigError, file_, ": '", key, "' = ",
                    config_.at(key).dump(), " is not supported (", why, ")");
  }

  // A key written as null: for some keys Hugging Face's None means other than its default.
  bool is_null(const std::string& key) const {
    const auto found = config_.find(key);
    return found != config_.end() && found->is_null();
  }

  // The key's value, or null when it is left out.
  const json* find(const std::string& key) const {
    const auto found = config_.find(key);
    return found == config_.end() ? nullptr : &*found;
  }

  const std::string& file() const { return file_; }

 private:
  template <class T>
  static const char* kind() {
    if constexpr (std::is_same_v<T, bool>) return "true or false";
    if constexpr (std::is_same_v<T, std::string>) return "a string";
    if constexpr (std::is_integral_v<T>) return "an integer";
    return "a number";
  }

  const json& config_;
  std::string file_;
};

void check_activation(const ConfigKeys& keys, const std::string& key, const std::string& function) {
  FLEXMODEL_CHECK(parallel::ShardedActivationImpl::is_supported(function), ConfigError, keys.file(), ": '", key,
                  "' = ", json(function).dump(), " is not supported; supported: ",
                  parallel::ShardedActivationImpl::supported());
}

GPT2Config gpt2_config(const ConfigKeys& keys) {
  const GPT2Config defaults;
  auto config = GPT2Config()
                    .vocab_size(keys.get("vocab_size", defaults.vocab_size()))
                    .n_positions(keys.get("n_positions", defaults.n_positions()))
                    .n_embd(keys.get("n_embd", defaults.n_embd()))
                    .n_layer(keys.get("n_layer", defaults.n_layer()))
                    .n_head(keys.get("n_head", defaults.n_head()))
                    .n_inner(keys.get<std::int64_t>("n_inner", 0))
                    .activation_function(keys.get("activation_function", defaults.activation_function()))
                    .layer_norm_epsilon(keys.get("layer_norm_epsilon", defaults.layer_norm_epsilon()))
                    .tie_word_embeddings(keys.get("tie_word_embeddings", defaults.tie_word_embeddings()))
                    .embd_pdrop(keys.get("embd_pdrop", defaults.embd_pdrop()))
                    .attn_pdrop(keys.get("attn_pdrop", defaults.attn_pdrop()))
                    .resid_pdrop(keys.get("resid_pdrop", defaults.resid_pdrop()))
                    .initializer_range(keys.get("initializer_range", defaults.initializer_range()));
  check_activation(keys, "activation_function", config.activation_function());
  keys.refuse_unless("reorder_and_upcast_attn", false, "attention scores upcast to float32 per head");
  keys.refuse_unless("scale_attn_weights", true, "unscaled attention scores");
  keys.refuse_unless("scale_attn_by_inverse_layer_idx", false, "scores scaled by the layer index");
  keys.refuse_unless("add_cross_attention", false, "cross-attention needs an encoder");
  return config;
}

// rope_theta, or (as newer configs write it) rope_parameters' rope_theta; a
// rope_type other than plain rotary embeddings is refused.
double rope_theta(const ConfigKeys& keys) {
  const json* parameters = keys.find("rope_parameters");
  if (parameters == nullptr || parameters->is_null()) return keys.get("rope_theta", 10000.0);
  FLEXMODEL_CHECK(parameters->is_object(), ConfigError, keys.file(), ": 'rope_parameters' holds ", parameters->dump(),
                  ", not an object");
  const ConfigKeys rope(*parameters, keys.file() + "'s rope_parameters");
  rope.refuse_unless<std::string>("rope_type", "default", "only plain rotary embeddings with rope_theta");
  return rope.get("rope_theta", keys.get("rope_theta", 10000.0));
}

// LLaMA's keys; Mistral and Qwen2 differ only in defaults and in a few keys.
LlamaConfig llama_config(const ConfigKeys& keys, const std::string& model_type) {
  const bool mistral = model_type == "mistral", qwen2 = model_type == "qwen2";
  auto config = LlamaConfig()
                    .model_type(model_type)
                    .vocab_size(keys.get<std::int64_t>("vocab_size", qwen2 ? 151936 : 32000))
                    .hidden_size(keys.get<std::int64_t>("hidden_size", 4096))
                    .intermediate_size(keys.get<std::int64_t>("intermediate_size", mistral ? 14336 : qwen2 ? 22016 : 11008))
                    .num_hidden_layers(keys.get<std::int64_t>("num_hidden_layers", 32))
                    .num_attention_heads(keys.get<std::int64_t>("num_attention_heads", 32))
                    // null: one per attention head, as left out in LLaMA's config.
                    .num_key_value_heads(keys.is_null("num_key_value_heads")
                                             ? 0
                                             : keys.get<std::int64_t>("num_key_value_heads", mistral ? 8 : qwen2 ? 32 : 0))
                    .head_dim(keys.get<std::int64_t>("head_dim", 0))
                    .max_position_embeddings(keys.get<std::int64_t>(
                        "max_position_embeddings", mistral ? 131072 : qwen2 ? 32768 : 2048))
                    .hidden_act(keys.get<std::string>("hidden_act", "silu"))
                    .rms_norm_eps(keys.get("rms_norm_eps", 1e-6))
                    .rope_theta(rope_theta(keys))
                    .tie_word_embeddings(keys.get("tie_word_embeddings", false))
                    .attention_bias(keys.get("attention_bias", false))
                    .qkv_bias(qwen2)
                    .mlp_bias(keys.get("mlp_bias", false))
                    .initializer_range(keys.get("initializer_range", 0.02));
  check_activation(keys, "hidden_act", config.hidden_act());
  // Mistral's window: 4096 when left out, none when null (Mistral-7B v0.2 on).
  if (mistral && !keys.is_null("sliding_window")) config.sliding_window(keys.get<std::int64_t>("sliding_window", 4096));
  if (qwen2) keys.refuse_unless("use_sliding_window", false, "Qwen2's per-layer sliding windows");
  keys.refuse_unless<std::int64_t>("pretraining_tp", 1, "linear layers computed in pretraining_tp slices");
  keys.refuse_unless("attention_dropout", 0.0, "dropout of the attention probabilities");
  if (const json* types = keys.find("layer_types"); types != nullptr && types->is_array()) {
    for (const auto& type : *types) {
      FLEXMODEL_CHECK(type == "full_attention", ConfigError, keys.file(), ": 'layer_types' holds ", type.dump(),
                      ", which is not supported (only full_attention layers)");
    }
  }
  return config;
}

void check_positive(const ConfigKeys& keys, const std::vector<std::pair<const char*, std::int64_t>>& sizes) {
  for (const auto& [key, value] : sizes) {
    FLEXMODEL_CHECK(value > 0, ConfigError, keys.file(), ": '", key, "' = ", value, " must be positive");
  }
}

std::shared_ptr<models::CausalLMImpl> build(const ModelConfig& config, const std::shared_ptr<dist::Mesh>& mesh) {
  if (const auto* gpt2 = std::get_if<GPT2Config>(&config)) return std::make_shared<models::GPT2LMHeadModelImpl>(*gpt2, mesh);
  return std::make_shared<models::LlamaForCausalLMImpl>(std::get<LlamaConfig>(config), mesh);
}

std::string joined(const std::vector<std::string>& parts, const char* separator) {
  std::string out;
  for (const auto& part : parts) out += (out.empty() ? "" : separator) + part;
  return out;
}

// Hugging Face's presets, by the names their model cards use.
const std::map<std::string, std::pair<std::string, ModelConfig>>& presets() {
  static const std::map<std::string, std::pair<std::string, ModelConfig>> table = [] {
    std::map<std::string, std::pair<std::string, ModelConfig>> all;
    all["gpt2"] = {"gpt2", GPT2Config()};
    all["gpt2-medium"] = {"gpt2", GPT2Config().n_embd(1024).n_layer(24).n_head(16)};
    all["gpt2-large"] = {"gpt2", GPT2Config().n_embd(1280).n_layer(36).n_head(20)};
    all["gpt2-xl"] = {"gpt2", GPT2Config().n_embd(1600).n_layer(48).n_head(25)};
    all["llama-2-7b"] = {"llama", LlamaConfig().max_position_embeddings(4096).rms_norm_eps(1e-5)};
    all["llama-2-13b"] = {"llama", LlamaConfig().hidden_size(5120).intermediate_size(13824).num_hidden_layers(40)
                                       .num_attention_heads(40).max_position_embeddings(4096).rms_norm_eps(1e-5)};
    all["llama-3-8b"] = {"llama", LlamaConfig().vocab_size(128256).intermediate_size(14336).num_key_value_heads(8)
                                      .max_position_embeddings(8192).rms_norm_eps(1e-5).rope_theta(500000.0)};
    all["tinyllama-1.1b"] = {"llama", LlamaConfig().hidden_size(2048).intermediate_size(5632).num_hidden_layers(22)
                                          .num_key_value_heads(4).rms_norm_eps(1e-5)};
    all["mistral-7b"] = {"mistral", LlamaConfig().model_type("mistral").intermediate_size(14336).num_key_value_heads(8)
                                        .max_position_embeddings(32768).rms_norm_eps(1e-5).sliding_window(4096)};
    all["qwen2-0.5b"] = {"qwen2", LlamaConfig().model_type("qwen2").vocab_size(151936).hidden_size(896)
                                      .intermediate_size(4864).num_hidden_layers(24).num_attention_heads(14)
                                      .num_key_value_heads(2).max_position_embeddings(32768).rope_theta(1000000.0)
                                      .tie_word_embeddings(true).qkv_bias(true)};
    all["qwen2-7b"] = {"qwen2", LlamaConfig().model_type("qwen2").vocab_size(152064).hidden_size(3584)
                                    .intermediate_size(18944).num_hidden_layers(28).num_attention_heads(28)
                                    .num_key_value_heads(4).max_position_embeddings(32768).rope_theta(1000000.0)
                                    .qkv_bias(true)};
    return all;
  }();
  return table;
}

// The checkpoint's name for a model parameter: the name itself, or without
// the base model's prefix, as files saved from GPT2Model (the hub's gpt2) have
// it. A name the checkpoint lacks is spelled as its other names are, so that
// the error naming it names what the file would hold.
std::string stored_name(const io::SafetensorsCheckpoint& checkpoint, const std::string& name) {
  if (checkpoint.find(name) != nullptr) return name;
  for (const char* prefix : {"transformer.", "model."}) {
    const std::string base(prefix);
    if (name.rfind(base, 0) != 0) continue;
    const std::string bare = name.substr(base.size());
    if (checkpoint.find(bare) != nullptr) return bare;
    const auto& names = checkpoint.names();
    const bool prefixed = std::any_of(names.begin(), names.end(), [&](const std::string& n) { return n.rfind(base, 0) == 0; });
    if (!prefixed) return bare;
  }
  return name;
}

// Buffers old exports stored beside the weights, which the model recomputes.
bool recomputed_buffer(const std::string& name) {
  auto ends_with = [&](const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends_with(".attn.bias") || ends_with(".attn.masked_bias") || ends_with("rotary_emb.inv_freq");
}

// Reads this rank's share of `key` into `parameter`, as its module declares it split.
void load_share(const io::SafetensorsCheckpoint& checkpoint, const std::string& key, torch::Tensor& parameter, const dist::Sharding& sharding,
                const dist::Mesh* mesh) {
  // load_model checked that every tensor is there, of the whole model's shape.
  const auto* entry = checkpoint.find(key);
  const auto& file = checkpoint.file_of(key).path();
  const std::vector<std::int64_t> stored = entry->shape;
  const auto fail = [&](const std::string& why) {
    FLEXMODEL_FAIL(ConfigError, "'", file, "': tensor '", key, "' has shape ", c10::IntArrayRef(stored), ", ", why);
  };
  if (static_cast<std::int64_t>(stored.size()) != parameter.dim()) fail(detail::concat("the model needs ", parameter.dim(), " dimensions"));
  const std::int64_t tp = mesh != nullptr ? mesh->shape().tp : 1, rank = mesh != nullptr ? mesh->tp_rank() : 0;
  const std::int64_t dim = sharding.is_split() ? (*sharding.dim + parameter.dim()) % parameter.dim() : -1;
  for (std::int64_t d = 0; d < parameter.dim(); ++d) {
    if (d != dim && stored[d] != parameter.size(d)) fail(detail::concat("the model needs ", parameter.sizes()));
  }
  // Rows [first, first + count) of dim `along` into `into`: decoded in place
  // where the parameter's memory takes them as stored, else copied (a dtype
  // cast, a column block).
  const auto read = [&](const torch::Tensor& into, std::int64_t along, std::int64_t first, std::int64_t count) {
    if (into.is_contiguous() && into.scalar_type() == entry->scalar_type && into.device().is_cpu()) {
      checkpoint.read_into(key, along, first, count, into);
    } else {
      into.copy_(checkpoint.read(key, along, first, count));
    }
  };
  if (dim < 0) {
    if (parameter.dim() == 0) {
      parameter.copy_(checkpoint.read(key));
    } else {
      read(parameter, 0, 0, stored[0]);
    }
    return;
  }
  const std::int64_t blocks = sharding.blocks, full = stored[dim];
  if (blocks == 1) {
    const auto rows = parallel::shard_rows(full, tp, rank);
    if (rows.size != parameter.size(dim)) fail(detail::concat("the model needs ", parameter.sizes(), " on each of tp ", tp));
    if (rows.count < rows.size) parameter.narrow(dim, rows.count, rows.size - rows.count).zero_();
    if (rows.count > 0) read(parameter.narrow(dim, 0, rows.count), dim, rows.first, rows.count);
    return;
  }
  if (full % (blocks * tp) != 0 || full / tp != parameter.size(dim)) {
    fail(detail::concat("which does not split into ", blocks, " blocks of ", parameter.size(dim), " rows on each of tp ",
                        tp));
  }
  const std::int64_t block = full / blocks, piece = block / tp;
  for (std::int64_t b = 0; b < blocks; ++b) read(parameter.narrow(dim, b * piece, piece), dim, b * block + rank * piece, piece);
}

// Every parameter with the module that declares how it is split.
template <class Visit>
void for_each_parameter(torch::nn::Module& model, Visit&& visit) {
  for (const auto& module : model.named_modules()) {
    const auto* parallel = dynamic_cast<const dist::TensorParallelModule*>(module.value().get());
    for (auto& parameter : module.value()->named_parameters(/*recurse=*/false)) {
      const std::string name = module.key().empty() ? parameter.key() : module.key() + "." + parameter.key();
      visit(name, parameter.value(),
            parallel != nullptr ? parallel->parameter_sharding(parameter.key()) : dist::Sharding::replicated());
    }
  }
}

// Each tied parameter made the very tensor of the one it is tied to, where
// this rank holds both (after Module::to, which converts them one by one).
void tie(models::CausalLMImpl& model) {
  auto parameters = model.named_parameters();
  for (auto& item : parameters) {
    const std::string tied = model.tied_to(item.key());
    if (!tied.empty() && parameters.contains(tied)) item.value().set_(parameters[tied]);
  }
}

torch::Dtype dtype_stored(const io::SafetensorsCheckpoint& checkpoint) {
  for (const auto& name : checkpoint.names()) {
    const auto type = checkpoint.find(name)->scalar_type;
    if (c10::isFloatingType(type)) return type;
  }
  return torch::kFloat32;
}

}  // namespace

std::vector<std::string> families() { return {"gpt2", "llama", "mistral", "qwen2"}; }

std::vector<std::string> architectures(const std::string& family) {
  std::vector<std::string> names;
  for (const auto& [name, preset] : presets()) {
    if (preset.first == family) names.push_back(name);
  }
  FLEXMODEL_CHECK(!names.empty(), ConfigError, "no model family '", family, "'; families: ", joined(families(), ", "));
  return names;
}

ModelConfig architecture_config(const std::string& architecture) {
  const auto found = presets().find(architecture);
  if (found == presets().end()) {
    std::vector<std::string> names;
    for (const auto& item : presets()) names.push_back(item.first);
    FLEXMODEL_FAIL(ConfigError, "no architecture '", architecture, "'; architectures: ", joined(names, ", "));
  }
  return found->second.second;
}

std::string family_of(const ModelConfig& config) {
  if (std::holds_alternative<GPT2Config>(config)) return "gpt2";
  return std::get<LlamaConfig>(config).model_type();
}

ModelConfig read_config(const std::string& directory) {
  const std::string file = (std::filesystem::path(directory) / "config.json").string();
  std::ifstream in(file);
  FLEXMODEL_CHECK(in.good(), IOError, "'", directory, "' has no readable config.json: a Hugging Face checkpoint "
                  "directory holds config.json and model.safetensors");
  json config;
  try {
    config = json::parse(in);
  } catch (const json::exception& error) {
    FLEXMODEL_FAIL(ConfigError, "'", file, "' is not valid JSON: ", error.what());
  }
  FLEXMODEL_CHECK(config.is_object(), ConfigError, "'", file, "' is not a JSON object");
  const ConfigKeys keys(config, "'" + file + "'");
  const auto model_type = keys.get<std::string>("model_type", "");
  FLEXMODEL_CHECK(!model_type.empty(), ConfigError, keys.file(), " has no 'model_type'; supported: ",
                  joined(families(), ", "));
  ModelConfig result;
  if (model_type == "gpt2") {
    const auto gpt2 = gpt2_config(keys);
    check_positive(keys, {{"vocab_size", gpt2.vocab_size()}, {"n_positions", gpt2.n_positions()},
                          {"n_embd", gpt2.n_embd()}, {"n_layer", gpt2.n_layer()}, {"n_head", gpt2.n_head()}});
    result = gpt2;
  } else if (model_type == "llama" || model_type == "mistral" || model_type == "qwen2") {
    const auto llama = llama_config(keys, model_type);
    check_positive(keys, {{"vocab_size", llama.vocab_size()}, {"hidden_size", llama.hidden_size()},
                          {"intermediate_size", llama.intermediate_size()},
                          {"num_hidden_layers", llama.num_hidden_layers()},
                          {"num_attention_heads", llama.num_attention_heads()}});
    FLEXMODEL_CHECK(!config.contains("rope_scaling") || config["rope_scaling"].is_null(), ConfigError, keys.file(),
                    ": 'rope_scaling' = ", config.contains("rope_scaling") ? config["rope_scaling"].dump() : "",
                    " is not supported (only plain rotary embeddings with rope_theta)");
    result = llama;
  } else {
    FLEXMODEL_FAIL(ConfigError, keys.file(), ": model_type '", model_type, "' is not supported; supported: ",
                   joined(families(), ", "));
  }
  for (const auto& message : validate_for_mesh(result, {})) FLEXMODEL_FAIL(ConfigError, keys.file(), ": ", message);
  return result;
}

std::vector<std::string> validate_for_mesh(const ModelConfig& config, const dist::MeshShape& shape) {
  std::vector<std::string> violations;
  for (const auto& [size, what] : {std::pair{shape.tp, "tp"}, std::pair{shape.pp, "pp"}, std::pair{shape.dp, "dp"}}) {
    if (size < 1) violations.push_back(detail::concat(what, " ", size, " is not a rank count; choose at least 1"));
  }
  // Sizes a config built in code may leave at zero, which nothing below may divide by.
  const auto positive = [&](std::int64_t size, const char* what) {
    if (size < 1) violations.push_back(detail::concat(what, " ", size, " must be positive"));
    return size >= 1;
  };
  if (const auto* gpt2 = std::get_if<GPT2Config>(&config)) {
    if (!positive(gpt2->n_head(), "n_head") || !positive(gpt2->n_layer(), "n_layer")) return violations;
  } else {
    const auto& llama = std::get<LlamaConfig>(config);
    if (!positive(llama.num_attention_heads(), "num_attention_heads") ||
        !positive(llama.kv_heads(), "num_key_value_heads") || !positive(llama.num_hidden_layers(), "num_hidden_layers")) {
      return violations;
    }
  }
  if (!violations.empty()) return violations;
  auto divides = [&](std::int64_t count, const std::string& what) {
    if (count % shape.tp != 0) {
      violations.push_back(detail::concat("tp ", shape.tp, " does not divide ", what, " (", count,
                                          "); choose a tp that divides it"));
    }
  };
  std::int64_t layers = 0;
  if (const auto* gpt2 = std::get_if<GPT2Config>(&config)) {
    if (gpt2->n_embd() % gpt2->n_head() != 0) {
      violations.push_back(detail::concat("n_embd ", gpt2->n_embd(), " is not a multiple of n_head ", gpt2->n_head()));
    }
    divides(gpt2->n_head(), "n_head");
    divides(gpt2->inner(), "the MLP width (n_inner, or 4 · n_embd)");
    layers = gpt2->n_layer();
  } else {
    const auto& llama = std::get<LlamaConfig>(config);
    if (llama.num_attention_heads() % llama.kv_heads() != 0) {
      violations.push_back(detail::concat("num_attention_heads ", llama.num_attention_heads(),
                                          " is not a multiple of num_key_value_heads ", llama.kv_heads()));
    }
    if (llama.head_dim() == 0 && llama.hidden_size() % llama.num_attention_heads() != 0) {
      violations.push_back(detail::concat("hidden_size ", llama.hidden_size(), " is not a multiple of num_attention_heads ",
                                          llama.num_attention_heads(), "; give head_dim"));
    }
    if (llama.head_size() % 2 != 0) violations.push_back(detail::concat("head_dim ", llama.head_size(), " is odd: rotary embeddings turn pairs"));
    divides(llama.num_attention_heads(), "num_attention_heads");
    divides(llama.kv_heads(), "num_key_value_heads");
    divides(llama.intermediate_size(), "intermediate_size");
    layers = llama.num_hidden_layers();
  }
  if (shape.pp > layers) {
    violations.push_back(detail::concat("pp ", shape.pp, " exceeds the ", layers, " layers; choose pp of at most ", layers));
  }
  return violations;
}

std::shared_ptr<models::CausalLMImpl> create_new_model(const ModelConfig& config, const LoadOptions& options) {
  auto model = build_model(config, options);
  torch::NoGradGuard no_grad;
  const std::int64_t rank = options.mesh() ? options.mesh()->tp_rank() : 0;
  const auto* gpt2 = std::get_if<GPT2Config>(&config);
  const double range = gpt2 != nullptr ? gpt2->initializer_range() : std::get<LlamaConfig>(config).initializer_range();
  auto ends_with = [](const std::string& name, const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  // Seeded by name (and shard), so that ranks holding the same weight draw the
  // same values; a tied weight by its partner's, so that the stage holding only
  // the head (pipeline parallelism) draws the embedding's values.
  for_each_parameter(*model, [&](const std::string& name, torch::Tensor& parameter, const dist::Sharding& sharding) {
    const std::string tied = model->tied_to(name);
    const std::string seed = tied.empty() ? name : tied;
    if (ends_with(name, "bias")) {
      parameter.zero_();
    } else if (parameter.dim() == 1) {
      parameter.fill_(1.0);
    } else {
      // Hugging Face's GPT-2 scales its residual projections' std by 1/√(2 · n_layer).
      const bool residual = gpt2 != nullptr && ends_with(name, "c_proj.weight");
      const double std = residual ? range / std::sqrt(2.0 * static_cast<double>(gpt2->n_layer())) : range;
      auto generator = at::detail::createCPUGenerator(detail::fnv1a(detail::concat(seed, "/", sharding.is_split() ? rank : 0)));
      parameter.normal_(0.0, std, generator);
    }
  });
  model->to(options.device(), options.dtype().value_or(torch::kFloat32));
  tie(*model);
  return model;
}

std::shared_ptr<models::CausalLMImpl> build_model(const ModelConfig& config, const LoadOptions& options) {
  const auto violations = validate_for_mesh(config, options.mesh() ? options.mesh()->shape() : dist::MeshShape{});
  FLEXMODEL_CHECK(violations.empty(), ConfigError, family_of(config), " on this mesh: ", joined(violations, "; "));
  return build(config, options.mesh());
}

torch::Dtype stored_dtype(const std::string& directory) { return dtype_stored(io::SafetensorsCheckpoint(directory)); }

std::shared_ptr<models::CausalLMImpl> load_model(const std::string& directory, const LoadOptions& options,
                                                 LoadReport* report) {
  const ModelConfig config = read_config(directory);
  const auto violations = validate_for_mesh(config, options.mesh() ? options.mesh()->shape() : dist::MeshShape{});
  FLEXMODEL_CHECK(violations.empty(), ConfigError, "'", directory, "' on this mesh: ", joined(violations, "; "));
  const io::SafetensorsCheckpoint checkpoint(directory);
  auto model = build(config, options.mesh());
  const auto stored = dtype_stored(checkpoint);
  const auto dtype = options.dtype().value_or(stored);
  // Every parameter is overwritten from the files below: new memory of the
  // dtype, rather than a conversion of the float32 it was built in (a second
  // pass over the model's size). Buffers are converted as usual.
  for (auto& parameter : model->parameters()) parameter.set_data(torch::empty(parameter.sizes(), parameter.options().dtype(dtype)));
  model->to(dtype);

  // Every tensor of the files is a parameter of the model (on some stage), or a buffer it recomputes.
  std::map<std::string, std::vector<std::int64_t>> expected;  // stored name → the whole model's shape
  for (const auto& item : model->whole_model()->named_parameters()) {
    if (model->tied_to(item.key()).empty()) expected[stored_name(checkpoint, item.key())] = item.value().sizes().vec();
  }
  for (const auto& name : checkpoint.names()) {
    FLEXMODEL_CHECK(expected.count(name) != 0 || recomputed_buffer(name) || !model->tied_to(name).empty(),
                    ConfigError, "'", checkpoint.file_of(name).path(), "' holds '", name, "', which ", model->name(),
                    " of this config.json has no parameter for: the checkpoint is of another architecture or config");
  }
  // Every rank checks the whole model, so that a tensor missing or misshapen
  // in another stage's share stops all ranks alike, none left waiting.
  std::uint64_t taken = 0;
  for (const auto& [name, shape] : expected) {
    const auto* entry = checkpoint.find(name);
    FLEXMODEL_CHECK(entry != nullptr, ConfigError, "'", directory, "' has no tensor '", name, "' in any file, which ",
                    model->name(), " of this config.json needs");
    FLEXMODEL_CHECK(entry->shape == shape, ConfigError, "'", checkpoint.file_of(name).path(), "': tensor '", name,
                    "' has shape ", c10::IntArrayRef(entry->shape), ", the model needs ", c10::IntArrayRef(shape));
    taken += entry->end - entry->begin;
  }
  torch::NoGradGuard no_grad;
  std::map<std::string, torch::Tensor> loaded;
  for_each_parameter(*model, [&](const std::string& name, torch::Tensor& parameter, const dist::Sharding& sharding) {
    const std::string tied = model->tied_to(name);
    if (!tied.empty() && loaded.count(tied) != 0) return;  // tie() makes it its partner, as Hugging Face ties them
    load_share(checkpoint, stored_name(checkpoint, tied.empty() ? name : tied), parameter, sharding,
               options.mesh().get());
    loaded[name] = parameter;
  });
  model->to(options.device());
  tie(*model);
  model->eval();
  if (report != nullptr) *report = {checkpoint.bytes_read(), taken, stored};
  logger()->info("loaded {} from '{}' ({} of its {} bytes of weights read here)", model->name(), directory,
                 checkpoint.bytes_read(), taken);
  return model;
}

}  // namespace flexmodel::hub
