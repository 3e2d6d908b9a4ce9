// TorchScript files with what real exports contain (tests/fixtures/make_fixtures.py,
// real/): tied weights, dict and named-tuple outputs, default arguments,
// batch-free tensors, children called as child.forward(x), modules used only
// through their weights. Each against PyTorch's own hooks on the eager model.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "flexmodel/flexmodel.h"
#include "flexmodel/npy.h"
#include "flexmodel/torchscript.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;

const std::string kReal = std::string(FLEXMODEL_FIXTURE_DIR) + "/real/";

std::map<std::string, torch::Tensor> load_reference(const std::string& file) {
  std::map<std::string, torch::Tensor> tensors;
  auto store = torch::jit::load(kReal + file);
  for (const auto& entry : store.attr("tensors").toGenericDict()) {
    tensors[entry.key().toStringRef()] = entry.value().toTensor();
  }
  return tensors;
}

nlohmann::json facts_of(const std::string& name) {
  std::ifstream file(kReal + name + ".json");
  return nlohmann::json::parse(file);
}

std::vector<torch::IValue> inputs_of(const nlohmann::json& files) {
  std::vector<torch::IValue> inputs;
  for (const auto& file : files) inputs.emplace_back(read_npy(kReal + file.get<std::string>()));
  return inputs;
}

// The leaves PyTorch's hook of `kind` saw at `module`, in order.
std::vector<torch::Tensor> reference_leaves(const std::map<std::string, torch::Tensor>& reference,
                                            const std::string& kind, const std::string& module) {
  std::vector<torch::Tensor> leaves;
  for (std::size_t i = 0;; ++i) {
    auto found = reference.find(kind == "output" ? "output|" + std::to_string(i)
                                                 : kind + "|" + module + "|" + std::to_string(i));
    if (found == reference.end()) return leaves;
    leaves.push_back(found->second);
  }
}

bool traced(const std::string& name) { return name.find("traced") != std::string::npos; }

// Every capture of a hook on every hook point that "**" selects equals what
// PyTorch's hooks saw, leaf by leaf, wherever PyTorch's hooks fired. A traced
// file keeps only the leaves the trace used, so it may have fewer.
void expect_equal_to_pytorch(const std::string& name, const std::vector<torch::IValue>& inputs,
                             const std::map<std::string, torch::Tensor>& reference) {
  const auto facts = facts_of(name);
  ScriptFlexModel fm(kReal + name + ".pt");
  for (auto type : {HookType::forward, HookType::forward_pre}) {
    for (const auto& point : fm.select_hook_points("**", type).names) {
      fm.register_hook_function(HookFunction(point).unpack_idx(HookFunction::kAllLeaves), type);
    }
  }
  torch::NoGradGuard no_grad;
  torch::IValue output = fm.forward(inputs);
  std::vector<torch::Tensor> output_leaves;
  if (output.isTensor()) output_leaves.push_back(output.toTensor());
  if (output.isGenericDict()) {
    for (const auto& entry : output.toGenericDict()) output_leaves.push_back(entry.value().toTensor());
  }
  if (output.isTuple()) {
    for (const auto& element : output.toTupleRef().elements()) output_leaves.push_back(element.toTensor());
  }
  const auto expected_output = reference_leaves(reference, "output", "");
  ASSERT_EQ(output_leaves.size(), expected_output.size()) << name;
  for (std::size_t i = 0; i < output_leaves.size(); ++i) {
    EXPECT_TRUE(torch::allclose(output_leaves[i], expected_output[i], 0, 1e-6)) << name << " output " << i;
  }
  std::size_t compared = 0;
  for (auto [type, kind, list] : {std::tuple{HookType::forward, "forward", "fired_forward"},
                                  std::tuple{HookType::forward_pre, "forward_pre", "fired_pre"}}) {
    for (const auto& module_json : facts[list]) {
      const std::string module = module_json.get<std::string>();
      const auto theirs = reference_leaves(reference, kind, module);
      if (theirs.empty()) continue;
      ASSERT_TRUE(fm.outputs().contains(module, type)) << name << ": no " << kind << " capture at '" << module << "'";
      const auto& ours = fm.outputs().at(module, type);
      // What a file's module takes and returns differs from the eager call in
      // two documented ways: an argument passed by keyword is an input (PyTorch
      // gives forward-pre hooks only positional ones), and a trace keeps only
      // the outputs it used and merges identical arguments (MultiheadAttention's
      // (x, x, x) becomes (x)). Leaf 0, the one most hooks use, always agrees.
      std::size_t comparable = std::min(ours.size(), theirs.size());
      if (type == HookType::forward && !traced(name)) {
        EXPECT_EQ(ours.size(), theirs.size()) << name << " " << kind << " '" << module << "'";
      } else if (type == HookType::forward) {
        EXPECT_LE(ours.size(), theirs.size()) << name << " " << kind << " '" << module << "'";
      } else if (!traced(name)) {
        EXPECT_GE(ours.size(), theirs.size()) << name << " " << kind << " '" << module << "'";
      } else if (ours.size() != theirs.size()) {
        comparable = 1;
      }
      for (std::size_t i = 0; i < comparable; ++i) {
        ASSERT_EQ(ours[i].sizes(), theirs[i].sizes()) << name << " " << kind << " '" << module << "' leaf " << i;
        EXPECT_TRUE(torch::allclose(ours[i].to(torch::kDouble), theirs[i].to(torch::kDouble), 0, 1e-6))
            << name << " " << kind << " '" << module << "' leaf " << i;
        ++compared;
      }
    }
  }
  EXPECT_GT(compared, 5u) << name;
}

class RealExportTest : public ::testing::TestWithParam<std::string> {};

TEST_P(RealExportTest, EveryHookPointEqualsPyTorchsOwnHooks) {
  const std::string name = GetParam();
  const auto facts = facts_of(name);
  expect_equal_to_pytorch(name, inputs_of(facts["inputs"]), load_reference(name + ".reference.pt"));
  if (facts.contains("variants")) {
    for (const auto& [variant, files] : facts["variants"].items()) {
      expect_equal_to_pytorch(name, inputs_of(files["inputs"]), load_reference(files["reference"].get<std::string>()));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RealExportTest,
                         ::testing::Values("tied_traced", "dict_traced", "dict_scripted", "defaults_scripted",
                                           "nobatch_traced", "nobatch_scripted", "dotforward_traced",
                                           "dotforward_scripted", "encoder_scripted", "encoder_traced",
                                           "encoder_causal_scripted", "encoder_causal_traced"),
                         [](const auto& info) { return info.param; });

TEST(RealExports, ATiedWeightIsNotAnInputOfTheModuleThatSharesIt) {
  const auto reference = load_reference("tied_traced.reference.pt");
  ScriptFlexModel fm(kReal + "tied_traced.pt");
  fm.register_forward_pre_hook(HookFunction("lm_head").unpack_idx(HookFunction::kAllLeaves));
  // unpack_idx 0 is the hidden state, and there is no leaf 1.
  fm.register_forward_pre_hook(HookFunction("lm_head", {}, [](const torch::Tensor& x) { return x * 0; }));
  torch::NoGradGuard no_grad;
  const auto logits = fm.forward(inputs_of(facts_of("tied_traced")["inputs"])).toTensor();
  ASSERT_EQ(fm.outputs().at("lm_head", HookType::forward_pre).size(), 2u);
  EXPECT_TRUE(torch::equal(fm.outputs().at("lm_head", HookType::forward_pre)[0],
                           reference.at("forward_pre|lm_head|0")));
  EXPECT_EQ(logits.abs().max().item<float>(), 0.0f) << "the edit reached the hidden state";
  fm.register_forward_pre_hook(HookFunction("lm_head").unpack_idx(1));
  EXPECT_NE(error_of([&] { fm.forward(inputs_of(facts_of("tied_traced")["inputs"])); })
                .find("has unpack_idx 1 but the module's input has 1 tensor(s)"),
            std::string::npos);
}

TEST(RealExports, AnEditOfADictValueIsPutBackUnderItsKey) {
  for (const std::string name : {"dict_scripted", "dict_traced"}) {
    ScriptFlexModel fm(kReal + name + ".pt");
    const auto inputs = inputs_of(facts_of(name)["inputs"]);
    torch::NoGradGuard no_grad;
    const auto plain = fm.forward(inputs).toGenericDict();
    // The root's dict: leaf 1 is the second value in the dict's order.
    fm.register_forward_hook(HookFunction("(root)", {}, [](const torch::Tensor& x) { return x + 1; }, 1));
    const auto edited = fm.forward(inputs).toGenericDict();
    std::vector<std::string> keys, edited_keys;
    for (const auto& entry : plain) keys.push_back(entry.key().toStringRef());
    for (const auto& entry : edited) edited_keys.push_back(entry.key().toStringRef());
    ASSERT_EQ(keys, edited_keys) << name;
    EXPECT_TRUE(torch::equal(edited.at(keys[0]).toTensor(), plain.at(keys[0]).toTensor())) << name;
    EXPECT_TRUE(torch::equal(edited.at(keys[1]).toTensor(), plain.at(keys[1]).toTensor() + 1)) << name;
    EXPECT_TRUE(torch::equal(fm.outputs().at("(root)")[0], plain.at(keys[1]).toTensor())) << name;
  }
}

TEST(RealExports, FirstTensorIsADictsFirstValueOrATuplesFirstTensor) {
  for (const std::string name : {"dict_scripted", "dict_traced"}) {
    ScriptFlexModel fm(kReal + name + ".pt");
    torch::NoGradGuard no_grad;
    const auto output = fm.forward(inputs_of(facts_of(name)["inputs"]));
    EXPECT_TRUE(first_tensor(output).is_same(output.toGenericDict().begin()->value().toTensor())) << name;
  }
  const auto t = torch::ones({2});
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  dict.insert("logits", t);
  dict.insert("other", torch::zeros({1}));
  const auto nested = c10::ivalue::Tuple::create({c10::IValue(c10::List<torch::Tensor>()), dict, torch::zeros({3})});
  EXPECT_TRUE(first_tensor(nested).is_same(t));
  EXPECT_NE(error_of([] { first_tensor(c10::IValue(3)); }).find("first_tensor: the output (Int) holds no tensor"),
            std::string::npos);
}

TEST(RealExports, DefaultArgumentsAreFilledOnceHooked) {
  const auto reference = load_reference("defaults_scripted.reference.pt");
  const auto x = read_npy(kReal + "defaults_scripted.input0.npy");
  const auto mask = read_npy(kReal + "defaults_scripted.mask.npy");
  ScriptFlexModel fm(kReal + "defaults_scripted.pt");
  const std::string unhooked_error = [&] {
    try {
      torch::jit::Module copy = fm.module();
      copy.forward({x, mask, 3, 4});
    } catch (const c10::Error& error) {
      return std::string(error.what_without_backtrace());
    }
    return std::string("(no error)");
  }();
  fm.create_hook_group("every", "**");
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(fm.forward({x}).toTensor(), reference.at("output|0"), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(fm.forward({x, mask}).toTensor(), reference.at("output_with_mask|0"), 0, 1e-6));
  EXPECT_TRUE(
      torch::allclose(fm.forward({x, torch::IValue(), 5}).toTensor(), reference.at("output_scale5|0"), 0, 1e-6));
  // A wrong input: the message Module::forward gives.
  const std::string message = error_of([&] { fm.forward({x, mask, 3, 4}); });
  EXPECT_NE(message.find(unhooked_error.substr(0, unhooked_error.find('\n'))), std::string::npos)
      << message << "\nvs " << unhooked_error;
  EXPECT_NE(message.find("forward(x: Tensor, mask: Optional[Tensor] = None, scale: int = 3)"), std::string::npos)
      << message;
}

TEST(RealExports, AWildcardSkipsWhatCannotFireAndANameDoesNot) {
  ScriptFlexModel fm(kReal + "encoder_causal_scripted.pt");
  const auto selection = fm.select_hook_points("**");
  EXPECT_EQ(selection.names.front(), "");
  auto skipped = [&](const std::string& name) {
    return std::any_of(selection.skipped.begin(), selection.skipped.end(),
                       [&](const auto& entry) { return entry.first == name; });
  };
  EXPECT_TRUE(skipped("encoder.layers"));
  EXPECT_TRUE(skipped("encoder.layers.0.self_attn.out_proj"));
  EXPECT_FALSE(skipped("encoder.layers.0.self_attn"));
  EXPECT_NO_THROW(fm.create_hook_group("all_points", "**"));
  EXPECT_NO_THROW(fm.create_hook_group("layers", "encoder.layers.**"));
  auto message = error_of([&] { fm.create_hook_group("container", "encoder.layers"); });
  EXPECT_NE(message.find("is a container with no forward method"), std::string::npos) << message;
  message = error_of([&] { fm.register_forward_hook(HookFunction("encoder.layers.1.self_attn.out_proj")); });
  EXPECT_NE(message.find("is never called by the model's forward"), std::string::npos) << message;
  EXPECT_NE(message.find("'encoder.layers.1.self_attn' uses only its parameters"), std::string::npos) << message;
  EXPECT_EQ(fm.create_hook_group("root", "(root)").size(), 1u);
}

TEST(RealExports, AChildCalledAsForwardIsReportedTruthfully) {
  ScriptFlexModel traced(kReal + "dotforward_traced.pt");
  auto message = error_of([&] { traced.register_forward_hook(HookFunction("layers.0.attention")); });
  EXPECT_NE(message.find("called as .forward(...)"), std::string::npos) << message;
  EXPECT_EQ(message.find("container"), std::string::npos) << message;
  // A scripted file keeps the call, which flexmodel hooks (PyTorch's own hooks do not fire there).
  ScriptFlexModel scripted(kReal + "dotforward_scripted.pt");
  EXPECT_NO_THROW(scripted.register_forward_hook(HookFunction("layers.0.attention")));
  EXPECT_TRUE(scripted.called_as_forward("layers.0.attention"));
  EXPECT_FALSE(scripted.called_as_forward("layers.0.attention.wq"));
}

TEST(RealExports, AnInputTheModelRejectsKeepsTheInterpretersReason) {
  ScriptFlexModel fm(kReal + "tied_traced.pt");
  const auto tokens = read_npy(kReal + "tied_traced.input0.npy");
  for (bool hooked : {false, true}) {
    if (hooked) fm.create_hook_group("every", "**");
    const auto message = error_of([&] { fm.forward({tokens.to(torch::kFloat)}); });
    EXPECT_NE(message.find("rejected its input: Expected tensor for argument #1 'indices'"), std::string::npos)
        << message;
    EXPECT_NE(message.find("it takes forward(tokens: Tensor), was given (float32 [2,"), std::string::npos)
        << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace flexmodel
