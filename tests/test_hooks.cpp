#include <gtest/gtest.h>

#include <spdlog/sinks/ostream_sink.h>

#include "flexmodel/cache.h"
#include "flexmodel/hooks/editing.h"
#include "flexmodel/scoped_hooks.h"
#include "flexmodel/sink.h"
#include "flexmodel/models/gpt.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::compute_by_hand;
using testing::error_of;
using testing::Net;

class HookTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    net = Net();
    x = torch::randn({5, 4});
  }
  Net net{nullptr};
  torch::Tensor x;
};

TEST_F(HookTest, CapturesEqualSubmoduleOutputsComputedByHand) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1"));
  fm.register_forward_hook(HookFunction("act"));
  fm.register_forward_hook(HookFunction("fc2"));
  fm.register_forward_hook(HookFunction(""));  // the root
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto ref = compute_by_hand(*net, x);
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc1")[0], ref.fc1));
  EXPECT_TRUE(torch::equal(fm.outputs().at("act")[0], ref.act));
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc2")[0], ref.fc2));
  EXPECT_TRUE(torch::equal(fm.outputs().at("")[0], ref.out));
  EXPECT_TRUE(torch::equal(out, ref.out));
  // One snapshot per forward.
  fm.forward(x * 2);
  ASSERT_EQ(fm.outputs().at("fc1").size(), 2u);
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc1")[1], compute_by_hand(*net, x * 2).fc1));
}

TEST_F(HookTest, TheOutputMapGivesEachForwardsCapturesApart) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1"));
  fm.register_full_backward_pre_hook(HookFunction("fc2"));
  const auto first = x.clone().requires_grad_(), second = (x * 2).requires_grad_();
  fm.forward(first);
  fm.forward(second).sum().backward();
  const auto forward1 = fm.outputs().in_forward("fc1", 1);
  ASSERT_EQ(forward1.size(), 1u);
  EXPECT_TRUE(torch::equal(forward1[0], compute_by_hand(*net, x * 2).fc1));
  // The gradient of forward 1's backward belongs to forward 1.
  EXPECT_EQ(fm.outputs().in_forward("fc2", 1, HookType::full_backward_pre).size(), 1u);
  EXPECT_NE(error_of([&] { fm.outputs().in_forward("fc2", 0, HookType::full_backward_pre); })
                .find("forward 0 captured nothing for module 'fc2' (full_backward_pre); forwards that did: 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { fm.outputs().in_forward("fc1", 2); }).find("forwards that did: 0, 1"), std::string::npos);
  fm.outputs().clear();
  EXPECT_FALSE(fm.outputs().contains("fc1"));
}

TEST_F(HookTest, CaptureIsASnapshotNotAnAlias) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1"));
  fm.register_forward_hook(HookFunction(""));
  // act's input is fc1's output tensor itself: edit it in place after the capture.
  fm.register_forward_pre_hook(HookFunction("act", {}, [](const torch::Tensor& t) { t.mul_(3); }));
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto ref = compute_by_hand(*net, x);
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc1")[0], ref.fc1));
  auto captured_out = fm.outputs().at("")[0].clone();
  out.zero_();
  EXPECT_TRUE(torch::equal(fm.outputs().at("")[0], captured_out));
}

TEST_F(HookTest, ForwardEditMatchesTheSameEditByHand) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1", {5, 8}, [](const torch::Tensor& t) { return t * 0.5 - 0.25; }));
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto ref = compute_by_hand(*net, x, [](torch::Tensor t) { return t * 0.5 - 0.25; });
  EXPECT_TRUE(torch::equal(out, ref.out));
  // The capture is the activation before the edit.
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc1")[0], compute_by_hand(*net, x).fc1));
}

TEST_F(HookTest, PreHookEditsInputs) {
  FlexModel fm(net);
  fm.register_forward_pre_hook(HookFunction("fc2", {std::nullopt, 8}, [](const torch::Tensor& t) { return t + 1; }));
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto ref = compute_by_hand(*net, x, nullptr, [](torch::Tensor t) { return t + 1; });
  EXPECT_TRUE(torch::equal(out, ref.out));
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc2", HookType::forward_pre)[0], compute_by_hand(*net, x).fc2_input));
}

TEST_F(HookTest, UnpackIdxSelectsLeavesOfNestedOutputs) {
  FlexModel fm(net);
  for (std::size_t i = 0; i < 3; ++i) fm.register_forward_hook(HookFunction("split").unpack_idx(i));
  // Zero leaf 2 (x - 1): fc2's input becomes 2·act.
  fm.register_forward_hook(HookFunction("split").unpack_idx(2).capture(false).editing_function(hooks::zero_ablation()));
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto ref = compute_by_hand(*net, x);
  const auto& captured = fm.outputs().at("split");
  ASSERT_EQ(captured.size(), 3u);
  EXPECT_TRUE(torch::equal(captured[0], ref.split_doubled));
  EXPECT_TRUE(torch::equal(captured[1], ref.split_plus));
  EXPECT_TRUE(torch::equal(captured[2], ref.split_minus));
  auto edited = compute_by_hand(*net, x, nullptr, [&](torch::Tensor) { return ref.split_doubled; });
  EXPECT_TRUE(torch::equal(out, edited.out));
}

TEST_F(HookTest, AllLeavesAppliesTheHookToEveryTensor) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("split").unpack_idx(HookFunction::kAllLeaves));
  fm.register_forward_hook(
      HookFunction("split", {}, hooks::scale(-1.0)).unpack_idx(HookFunction::kAllLeaves).capture(false));
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto ref = compute_by_hand(*net, x);
  const auto& captured = fm.outputs().at("split");
  ASSERT_EQ(captured.size(), 3u);
  EXPECT_TRUE(torch::equal(captured[1], ref.split_plus));
  auto negated = -ref.split_doubled + (-ref.split_plus) * (-ref.split_minus);
  EXPECT_TRUE(torch::equal(out, compute_by_hand(*net, x, nullptr, [&](torch::Tensor) { return negated; }).out));
}

TEST_F(HookTest, BackwardHooksSeeAndEditTheGradientsAutogradComputes) {
  auto weights = torch::randn({5, 3});
  // Reference gradients, by autograd on the hand-written graph.
  auto ref = compute_by_hand(*net, x);
  auto loss = (ref.out * weights).sum();
  auto grads = torch::autograd::grad({loss}, {ref.fc2, ref.fc2_input, ref.fc1}, {}, /*retain_graph=*/true);
  auto fc1_weight_grad = torch::autograd::grad({loss}, {net->fc1->weight})[0];

  FlexModel fm(net);
  fm.register_full_backward_pre_hook(HookFunction("fc2"));  // gradient of fc2's output
  fm.register_full_backward_hook(HookFunction("fc2"));      // gradient of fc2's input
  // Doubles the gradient flowing back into fc1's output.
  fm.register_full_backward_pre_hook(HookFunction("fc1", {}, [](const torch::Tensor& g) { return g * 2; }));
  net->zero_grad();
  (fm.forward(x) * weights).sum().backward();
  EXPECT_TRUE(torch::allclose(fm.outputs().at("fc2", HookType::full_backward_pre)[0], grads[0], 0, 0));
  EXPECT_TRUE(torch::allclose(fm.outputs().at("fc2", HookType::full_backward)[0], grads[1], 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(fm.outputs().at("fc1", HookType::full_backward_pre)[0], grads[2], 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(net->fc1->weight.grad(), fc1_weight_grad * 2, 1e-5, 1e-6));
}

TEST_F(HookTest, ParameterGradientHooksSeeAndEditTheGradient) {
  auto reference = torch::autograd::grad({compute_by_hand(*net, x).out.sum()}, {net->fc2->weight})[0];
  FlexModel fm(net);
  fm.register_hook(HookFunction("fc2.weight"));
  fm.register_hook(HookFunction("fc1.bias", {8}, hooks::zero_ablation()));
  net->zero_grad();
  fm.forward(x).sum().backward();
  EXPECT_TRUE(torch::allclose(fm.outputs().at("fc2.weight", HookType::tensor)[0], reference, 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(net->fc2->weight.grad(), reference, 1e-6, 1e-7));
  EXPECT_TRUE(torch::equal(net->fc1->bias.grad(), torch::zeros({8})));
  EXPECT_GT(net->fc1->weight.grad().abs().sum().item<float>(), 0.0f);
}

// Records what a FlexModel hands its sinks, in order.
struct RecordingSink : Sink {
  struct Event {
    std::string module_name;
    HookType type;
    std::int64_t step;
    torch::Tensor snapshot;  // undefined for end_step
  };
  void write(const std::string& module_name, HookType type, std::int64_t step, const torch::Tensor& snapshot) override {
    events.push_back({module_name, type, step, snapshot});
  }
  void end_step(std::int64_t step) override { events.push_back({"", HookType::forward, step, {}}); }
  std::vector<Event> events;
};

TEST_F(HookTest, GradientCapturesReachTheSinksInTheStepOfTheirForward) {
  FlexModel fm(net, FlexModelOptions().outputs(false));
  auto sink = std::make_shared<RecordingSink>();
  fm.add_sink(sink);
  fm.register_forward_hook(HookFunction("fc2"));
  fm.register_full_backward_pre_hook(HookFunction("fc2"));
  fm.register_hook(HookFunction("fc1.weight"));
  std::vector<torch::Tensor> fc2_grads, fc1_weight_grads;
  for (int step = 0; step < 2; ++step) {
    auto batch = x * (step + 1);
    // Reference gradients, by autograd on the hand-written graph.
    auto ref = compute_by_hand(*net, batch);
    auto grads = torch::autograd::grad({ref.out.pow(2).sum()}, {ref.fc2, net->fc1->weight});
    fc2_grads.push_back(grads[0]);
    fc1_weight_grads.push_back(grads[1]);
    net->zero_grad();
    fm.forward(batch).pow(2).sum().backward();
  }
  fm.close_sinks();
  // outputs(false): the sinks are the only destination, gradients included.
  EXPECT_TRUE(fm.outputs().empty());
  std::vector<std::string> order;
  for (const auto& event : sink->events) {
    order.push_back(event.snapshot.defined() ? event.module_name + "/" + std::string(to_string(event.type)) + "@" +
                                                   std::to_string(event.step)
                                             : "end " + std::to_string(event.step));
  }
  const std::vector<std::string> expected{
      "fc2/forward@0", "fc2/full_backward_pre@0", "fc1.weight/tensor@0", "end 0",
      "fc2/forward@1", "fc2/full_backward_pre@1", "fc1.weight/tensor@1", "end 1"};
  ASSERT_EQ(order, expected);
  for (int step = 0; step < 2; ++step) {
    EXPECT_TRUE(torch::allclose(sink->events[4 * step + 1].snapshot, fc2_grads[step], 1e-6, 1e-6));
    EXPECT_TRUE(torch::allclose(sink->events[4 * step + 2].snapshot, fc1_weight_grads[step], 1e-5, 1e-6));
  }
}

TEST_F(HookTest, EndBackwardEndsTheStepAndALaterGradientIsAnError) {
  FlexModel fm(net);
  auto sink = std::make_shared<RecordingSink>();
  fm.add_sink(sink);
  fm.register_full_backward_pre_hook(HookFunction("fc2"));
  auto first = fm.forward(x).sum();
  // A backward twice through one graph captures twice, in the same step.
  first.backward({}, /*retain_graph=*/true);
  first.backward({}, /*retain_graph=*/true);
  fm.end_backward();
  ASSERT_EQ(sink->events.size(), 3u);
  EXPECT_EQ(sink->events[1].step, 0);
  EXPECT_FALSE(sink->events[2].snapshot.defined());  // end_step(0)
  EXPECT_EQ(fm.outputs().at("fc2", HookType::full_backward_pre).size(), 2u);
  // After its step ended, forward 0's graph has no step left in the sinks.
  auto second = fm.forward(x * 2).sum();
  const std::string message = error_of([&] { first.backward(); });
  EXPECT_NE(message.find("hook on 'fc2' (full_backward_pre) captured a gradient of forward 0"), std::string::npos)
      << message;
  EXPECT_NE(message.find("call backward before the next forward"), std::string::npos) << message;
  second.backward();
  fm.close_sinks();
  EXPECT_EQ(sink->events.back().step, 1);
}

TEST_F(HookTest, WithoutSinksALateBackwardStillReachesTheOutputMap) {
  FlexModel fm(net);
  fm.register_full_backward_pre_hook(HookFunction("fc2"));
  auto first = fm.forward(x).sum();
  auto second = fm.forward(x * 2).sum();
  second.backward();
  first.backward();
  // The gradient of a sum through `side` (linear), the same for both forwards.
  const auto expected = torch::ones({5, 3}).mm(net->side->weight);
  const auto& captured = fm.outputs().at("fc2", HookType::full_backward_pre);
  ASSERT_EQ(captured.size(), 2u);
  EXPECT_TRUE(torch::allclose(captured[0], expected, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(captured[1], expected, 1e-6, 1e-6));
}

TEST_F(HookTest, TrainableProbeLearnsThroughAnEditingFunction) {
  FlexModel fm(net);
  fm.wrapped_module_requires_grad(false);
  torch::nn::Linear probe(8, 1);
  fm.register_trainable_module("probe", probe);
  fm.register_forward_hook(HookFunction("act", {}, hooks::linear_probe("probe", "probe_out")).capture(false));
  auto frozen = net->fc1->weight.clone();
  // Target: a fixed linear read-out of the activation, which the probe can learn.
  auto readout = torch::randn({8, 1});
  torch::optim::SGD optimiser(probe->parameters(), torch::optim::SGDOptions(0.05));
  std::vector<float> losses;
  for (int step = 0; step < 200; ++step) {
    auto batch = torch::randn({16, 4});
    fm.forward(batch);
    auto target = torch::matmul(compute_by_hand(*net, batch).act, readout).detach();
    auto loss = torch::mse_loss(fm.save_ctx().get<torch::Tensor>("probe_out"), target);
    optimiser.zero_grad();
    loss.backward();
    optimiser.step();
    losses.push_back(loss.item<float>());
  }
  EXPECT_LT(losses.back(), losses.front() / 10);
  EXPECT_TRUE(torch::equal(net->fc1->weight, frozen));
  EXPECT_FALSE(net->fc1->weight.grad().defined());
  ASSERT_EQ(fm.trainable_modules().count("probe"), 1u);
}

TEST_F(HookTest, RestoreAndDestructionGiveBackTheUnwrappedModelBitwise) {
  torch::NoGradGuard no_grad;
  auto before = net->forward(x);
  {
    FlexModel fm(net);
    fm.register_forward_hook(HookFunction("fc1", {}, hooks::scale(3.0)));
    EXPECT_FALSE(torch::equal(fm.forward(x), before));
  }
  EXPECT_TRUE(torch::equal(net->forward(x), before));
  FlexModel fm(net);
  fm.create_hook_group("edits", "fc*", {}, hooks::zero_ablation());
  fm.forward(Groups{"edits"}, x);
  fm.restore();
  EXPECT_TRUE(fm.hooks().empty());
  EXPECT_TRUE(torch::equal(fm.forward(x), before));
  EXPECT_TRUE(torch::equal(net->forward(x), before));
}

TEST_F(HookTest, GetModuleParameterReturnsACopy) {
  FlexModel fm(net);
  auto weight = fm.get_module_parameter("fc1.weight", {8, 4});
  EXPECT_TRUE(torch::equal(weight, net->fc1->weight));
  weight.zero_();
  EXPECT_FALSE(torch::equal(weight, net->fc1->weight));
  EXPECT_THROW(fm.get_module_parameter("fc1.weight", {4, 8}), ShapeError);
  EXPECT_THROW(fm.get_module_parameter("fc1.wieght"), ConfigError);
}

TEST_F(HookTest, UnknownModuleErrorSuggestsCloseNames) {
  FlexModel fm(net);
  auto message = error_of([&] { fm.register_forward_hook(HookFunction("fc_1")); });
  EXPECT_NE(message.find("no module named 'fc_1'"), std::string::npos) << message;
  EXPECT_NE(message.find("'fc1'"), std::string::npos) << message;
  message = error_of([&] { fm.register_hook(HookFunction("fc1.weights")); });
  EXPECT_NE(message.find("'fc1.weight'"), std::string::npos) << message;
}

TEST_F(HookTest, HookOnAModuleThatCannotFireIsAnError) {
  FlexModel fm(net);
  auto message = error_of([&] { fm.register_forward_hook(HookFunction("side")); });
  EXPECT_NE(message.find("'side'"), std::string::npos) << message;
  EXPECT_NE(message.find("flexmodel::Hooked"), std::string::npos) << message;
  EXPECT_TRUE(fm.hooks().empty());
}

TEST_F(HookTest, EditsThatChangeShapeDtypeOrDeviceNameTheHook) {
  torch::NoGradGuard no_grad;
  const std::vector<std::pair<EditingFunction, std::string>> bad_edits = {
      {[](const torch::Tensor& t, HookContext&) { return t.narrow(1, 0, 2); }, "changed the shape"},
      {[](const torch::Tensor& t, HookContext&) { return t.to(torch::kDouble); }, "changed the dtype"},
      {[](const torch::Tensor& t, HookContext&) { return t.to(torch::kMeta); }, "moved the tensor"},
      {[](const torch::Tensor&, HookContext&) { return torch::Tensor(); }, "undefined"},
  };
  auto before = net->forward(x);
  for (const auto& [edit, expected] : bad_edits) {
    FlexModel fm(net);
    fm.register_forward_hook(HookFunction("fc1", {}, edit));
    auto message = error_of([&] { fm.forward(x); });
    EXPECT_NE(message.find("hook on 'fc1' (forward)"), std::string::npos) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << message;
  }
  EXPECT_TRUE(torch::equal(net->forward(x), before));
}

TEST_F(HookTest, ExpectedShapeMismatchNamesTheHook) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc2", {5, 4}));
  auto message = error_of([&] { fm.forward(x); });
  EXPECT_NE(message.find("hook on 'fc2' (forward) expected shape [5, 4], got [5, 3]"), std::string::npos) << message;
}

TEST_F(HookTest, AThrowingEditingFunctionLeavesTheModelUsable) {
  torch::NoGradGuard no_grad;
  auto before = net->forward(x);
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1"));  // captures before the throw
  fm.register_forward_hook(HookFunction("act", {}, hooks::scale(2.0)));
  auto thrower = fm.register_forward_hook(
      HookFunction("fc2", {}, [](const torch::Tensor&) -> torch::Tensor { throw std::runtime_error("boom"); }));
  auto message = error_of([&] { fm.forward(x); });
  EXPECT_NE(message.find("editing function of hook on 'fc2' (forward) threw: boom"), std::string::npos) << message;
  EXPECT_FALSE(fm.outputs().contains("fc1"));  // the failed forward left no captures
  EXPECT_EQ(fm.forwards_run(), 0);
  EXPECT_TRUE(torch::equal(net->forward(x), before));  // nothing stays applied outside forward
  fm.remove_hook(thrower);
  // The remaining edit doubles act's output; relu(2t) = 2·relu(t) exactly.
  EXPECT_TRUE(torch::equal(fm.forward(x), compute_by_hand(*net, x, [](torch::Tensor t) { return t * 2; }).out));
  EXPECT_EQ(fm.outputs().at("fc1").size(), 1u);
}

TEST_F(HookTest, HookOnAModuleCalledAroundTheLibraryIsReported) {
  std::ostringstream log;
  auto previous = logger();
  set_logger(std::make_shared<spdlog::logger>("flexmodel-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  {
    FlexModel fm(net);
    fm.register_forward_hook(HookFunction("bypassed"));
    fm.register_forward_hook(HookFunction("fc1"));
    fm.forward(x);
    fm.forward(x);
  }
  set_logger(previous);
  const std::string text = log.str();
  EXPECT_EQ(text.find("'fc1'"), std::string::npos) << "a hook that fired was reported: " << text;
  EXPECT_NE(text.find("hook on 'bypassed' (forward) did not fire"), std::string::npos) << text;
  EXPECT_EQ(text.find("did not fire", text.find("did not fire") + 1), std::string::npos) << "warned twice: " << text;
}

TEST_F(HookTest, AHandleFromAnotherFlexModelIsRefused) {
  FlexModel first(net);
  FlexModel second(Net{});
  const HookHandle mine = first.register_forward_hook(HookFunction("fc1"));
  const HookHandle theirs = second.register_forward_hook(HookFunction("fc1"));
  EXPECT_EQ(mine.id, theirs.id);  // ids count per model; the handles still differ
  EXPECT_FALSE(mine == theirs);
  auto message = error_of([&] { first.remove_hook(theirs); });
  EXPECT_NE(message.find("belongs to another FlexModel"), std::string::npos) << message;
  EXPECT_EQ(first.hooks().size(), 1u);
  EXPECT_NE(error_of([&] { first.update_hook_groups(theirs, "g"); }).find("belongs to another FlexModel"),
            std::string::npos);
  first.remove_hook(mine);
  message = error_of([&] { first.remove_hook(mine); });
  EXPECT_NE(message.find("it was removed"), std::string::npos) << message;
}

TEST_F(HookTest, ALibraryErrorInsideAHookNamesTheHook) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("act", {}, [](const torch::Tensor& x, HookContext& ctx) {
    return x * ctx.save_ctx.get<torch::Tensor>("k");
  }));
  try {
    fm.forward(x);
    ADD_FAILURE() << "no error";
  } catch (const ConfigError& error) {  // the type stays
    const std::string message = error.what();
    EXPECT_NE(message.find("in the editing function of hook on 'act' (forward): save_ctx has no value 'k'"),
              std::string::npos)
        << message;
  }
}

TEST_F(HookTest, AnInputTheModelRejectsIsOneLineNamingTheModule) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("act"));
  const std::string message = error_of([&] { fm.forward(torch::ones({5, 4}, torch::kInt)); });
  EXPECT_NE(message.find("the forward of model"), std::string::npos) << message;
  EXPECT_NE(message.find("rejected its input in module 'fc1' (torch::nn::LinearImpl): mat1 and mat2 must have the "
                         "same dtype"),
            std::string::npos)
      << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
}

TEST(Sequential, ChildrenOfTheHookableSequentialAreHookable) {
  torch::manual_seed(1);
  flexmodel::nn::Sequential seq(torch::nn::Linear(3, 5), torch::nn::ReLU(), torch::nn::Linear(5, 2));
  auto x = torch::randn({4, 3});
  FlexModel fm(seq);
  fm.register_forward_hook(HookFunction("1"));
  fm.register_forward_pre_hook(HookFunction("2", {}, [](const torch::Tensor& t) { return -t; }));
  torch::NoGradGuard no_grad;
  auto out = fm.forward(x);
  auto first = seq->ptr<torch::nn::LinearImpl>(0);
  auto last = seq->ptr<torch::nn::LinearImpl>(2);
  auto hidden = torch::relu(torch::linear(x, first->weight, first->bias));
  EXPECT_TRUE(torch::equal(fm.outputs().at("1")[0], hidden));
  EXPECT_TRUE(torch::equal(out, torch::linear(-hidden, last->weight, last->bias)));
}

TEST(Sequential, ChildrenOfThePlainSequentialAreRefused) {
  torch::nn::Sequential seq(torch::nn::Linear(3, 5), torch::nn::ReLU());
  FlexModel fm(seq.ptr());
  EXPECT_THROW(fm.register_forward_hook(HookFunction("1")), ConfigError);
  fm.register_forward_hook(HookFunction(""));  // the root is always hookable
}

TEST(SaveContext, NumbersConvertAndOtherMismatchesSayWhatTheyHold) {
  SaveContext ctx;
  ctx.set("pos", 3);
  EXPECT_EQ(ctx.get<int>("pos"), 3);
  EXPECT_EQ(ctx.get<std::int64_t>("pos"), 3);  // an int asked for as int64_t
  ctx.get<std::int64_t>("pos") += 1;            // kept as int64_t from then on
  EXPECT_EQ(ctx.get<double>("pos"), 4.0);
  ctx.set("scale", 0.5f);
  EXPECT_EQ(ctx.get<double>("scale"), 0.5);
  EXPECT_THROW(ctx.get<int>("scale"), ConfigError) << "0.5 read as an int";
  ctx.set("negative", -1);
  EXPECT_THROW(ctx.get<unsigned>("negative"), ConfigError) << "-1 read as an unsigned";
  ctx.set("huge", 1e30);
  EXPECT_THROW(ctx.get<std::int64_t>("huge"), ConfigError);
  EXPECT_EQ(ctx.get<double>("huge"), 1e30) << "a refused conversion changed the value";
  ctx.set("name", std::string("mlp"));
  auto message = error_of([&] { ctx.get<int>("name"); });
  EXPECT_NE(message.find("save_ctx['name'] holds std::"), std::string::npos) << message;
  EXPECT_NE(message.find("asked for int"), std::string::npos) << message;
  ctx.set("flag", 1);
  EXPECT_THROW(ctx.get<bool>("flag"), ConfigError) << "a number is not a bool";
  EXPECT_THROW(ctx.get<int>("missing"), ConfigError);
}

// A scope's hooks run alone under scope.only(), with the model's under
// Groups{}, and are gone when the block ends, an exception's end included.
TEST_F(HookTest, ScopedHooksLastTheirBlockEvenWhenTheForwardThrows) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc2"));
  torch::NoGradGuard no_grad;
  const auto twice = [](const torch::Tensor& t) { return t * 2; };
  {
    ScopedHooks scope(fm);
    scope.add(HookFunction("fc1", {}, twice));
    EXPECT_TRUE(torch::equal(fm.forward(scope.only(), x), compute_by_hand(*net, x, twice).out));
    EXPECT_FALSE(fm.outputs().contains("fc2")) << "the model's own hook ran under scope.only()";
    fm.forward(x);  // both
    EXPECT_TRUE(torch::equal(fm.outputs().at("fc2")[0], compute_by_hand(*net, x, twice).fc2));
    EXPECT_EQ(scope.add("fc*", HookFunction("").capture(false), HookType::forward_pre).size(), 2u);
    EXPECT_EQ(fm.hooks().size(), 4u);
  }
  EXPECT_EQ(fm.hooks().size(), 1u);
  EXPECT_EQ(fm.hook_groups(), std::set<std::string>{kAllGroup});
  try {
    ScopedHooks scope(fm);
    scope.add(HookFunction("act", {}, [](const torch::Tensor&) -> torch::Tensor { throw std::runtime_error("boom"); }));
    fm.forward(scope.only(), x);
    ADD_FAILURE() << "the editing function did not throw";
  } catch (const HookError& error) {
    EXPECT_NE(std::string(error.what()).find("boom"), std::string::npos) << error.what();
  }
  EXPECT_EQ(fm.hooks().size(), 1u);
  {
    // A hook the program removed itself: the scope still removes the others.
    ScopedHooks scope(fm);
    const HookHandle first = scope.add(HookFunction("fc1"));
    scope.add(HookFunction("act"));
    fm.remove_hook(first);
  }
  EXPECT_EQ(fm.hooks().size(), 1u);
  fm.outputs().clear();
  EXPECT_TRUE(torch::equal(fm.forward(x), compute_by_hand(*net, x).out));
  EXPECT_TRUE(torch::equal(fm.outputs().at("fc2")[0], compute_by_hand(*net, x).fc2));
  EXPECT_THROW(ScopedHooks(fm).add("nothing*", HookFunction("")), ConfigError);
  // A model restored under a scope: the scope's end finds nothing to remove.
  {
    ScopedHooks scope(fm);
    scope.add(HookFunction("fc1"));
    fm.restore();
  }
  EXPECT_TRUE(fm.hooks().empty());
}

TEST_F(HookTest, GroupsNoneRunsTheModelAsUnwrapped) {
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1", {}, [](const torch::Tensor& t) { return t * 0; }));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(fm.forward(Groups::none(), x), compute_by_hand(*net, x).out));
  EXPECT_TRUE(fm.outputs().empty());
  EXPECT_FALSE(torch::equal(fm.forward(x), compute_by_hand(*net, x).out));
}

TEST_F(HookTest, RunWithCacheHoldsThatRunsTensorsInForwardOrder) {
  FlexModel fm(net);
  torch::NoGradGuard no_grad;
  const auto ref = compute_by_hand(*net, x);
  auto [out, cache] = run_with_cache(fm, "**", x);
  EXPECT_TRUE(torch::equal(out, ref.out));
  const std::vector<ActivationCache::Key> order{{"fc1", HookType::forward}, {"act", HookType::forward},
                                                {"split", HookType::forward}, {"fc2", HookType::forward},
                                                {"", HookType::forward}};
  EXPECT_EQ(cache.keys(), order);
  EXPECT_TRUE(torch::equal(cache.at("fc1"), ref.fc1));
  EXPECT_TRUE(torch::equal(cache.at("act"), ref.act));
  EXPECT_TRUE(torch::equal(cache.at("split"), ref.split_doubled));  // unpack_idx 0
  EXPECT_TRUE(torch::equal(cache.at(""), ref.out));
  EXPECT_TRUE(fm.outputs().empty() && fm.hooks().empty());
  // Copies: editing what the model returned leaves the cache alone.
  out.zero_();
  EXPECT_TRUE(torch::equal(cache.at(""), ref.out));
  auto message = error_of([&] { cache.stack("fc*"); });
  EXPECT_NE(message.find("'fc1' has shape [5, 8] but 'fc2' [5, 3]"), std::string::npos) << message;
  EXPECT_TRUE(torch::equal(cache.stack("fc1"), ref.fc1.unsqueeze(0)));
  message = error_of([&] { cache.at("side"); });
  EXPECT_NE(message.find("the cache has nothing of 'side' (forward); it holds 'fc1' (forward)"), std::string::npos)
      << message;
  // forward_pre: the inputs.
  auto [unused, inputs] = run_with_cache(fm, "fc2", CacheOptions().hook_type(HookType::forward_pre), x);
  EXPECT_TRUE(torch::equal(inputs.at("fc2", HookType::forward_pre), ref.fc2_input));
  // Gradient hooks would fire after the run, once the cache's hooks are gone.
  EXPECT_THROW(run_with_cache(fm, "fc2", CacheOptions().hook_type(HookType::full_backward), x), ConfigError);
  EXPECT_TRUE(fm.hooks().empty());
  // A cast leaves integer tensors alone.
  ActivationCache cast(CacheOptions().dtype(torch::kBFloat16));
  cast.add("ids", HookType::forward, torch::tensor({257, 1025}));
  cast.add("h", HookType::forward, ref.fc1);
  EXPECT_TRUE(torch::equal(cast.at("ids"), torch::tensor({257, 1025})));
  EXPECT_EQ(cast.at("h").scalar_type(), torch::kBFloat16);
}


TEST(OutputMap, MissingKeyListsWhatWasCaptured) {
  torch::manual_seed(0);
  Net net;
  FlexModel fm(net);
  fm.register_forward_hook(HookFunction("fc1"));
  fm.forward(torch::randn({2, 4}));
  auto message = error_of([&] { fm.outputs().at("fc2"); });
  EXPECT_NE(message.find("captured: 'fc1' (forward)"), std::string::npos) << message;
}

TEST(ReadyMadeHooks, PatchingALayerFromACleanRunReproducesTheCleanLogits) {
  torch::manual_seed(0);
  models::GPT gpt(models::GPTOptions().n_layers(2));
  auto clean = torch::randint(0, 256, {2, 10});
  auto corrupted = torch::randint(0, 256, {2, 10});
  torch::NoGradGuard no_grad;
  auto clean_logits = gpt->forward(clean);
  FlexModel fm(gpt);
  // The logits depend on the residual stream only through the last layer's output.
  auto save = fm.register_forward_hook(HookFunction("layers.1", {}, hooks::save_to("clean")).capture(false));
  fm.create_hook_group("patch", "layers.1", {}, hooks::patch("clean"));
  fm.update_hook_groups(save, "save");
  fm.forward(Groups{"save"}, clean);
  auto patched = fm.forward(Groups{"patch"}, corrupted);
  EXPECT_TRUE(torch::equal(patched, clean_logits));
  EXPECT_FALSE(torch::equal(fm.forward(Groups{"save"}, corrupted), clean_logits));
}

TEST(ReadyMadeHooks, SaveToInAGroupKeepsOneEntryPerModule) {
  torch::manual_seed(0);
  models::GPT gpt(models::GPTOptions().n_layers(2));
  auto clean = torch::randint(0, 256, {2, 10});
  torch::NoGradGuard no_grad;
  FlexModel fm(gpt);
  auto [clean_logits, cache] = run_with_cache(fm, "layers.*", clean);
  fm.create_hook_group("save", "layers.*", {}, hooks::save_to("clean.{module}"));
  fm.forward(Groups{"save"}, clean);
  for (const char* name : {"layers.0", "layers.1"}) {
    EXPECT_TRUE(torch::equal(fm.save_ctx().get<torch::Tensor>(std::string("clean.") + name), cache.at(name))) << name;
  }
  fm.create_hook_group("patch", "layers.*", {}, hooks::patch("clean.{module}"));
  EXPECT_TRUE(torch::equal(fm.forward(Groups{"patch"}, torch::randint(0, 256, {2, 10})), clean_logits));
  // One key for the whole group would keep only the last module's tensor.
  fm.create_hook_group("clash", "layers.*", {}, hooks::save_to("clean"));
  EXPECT_NE(error_of([&] { fm.forward(Groups{"clash"}, clean); })
                .find("save_to('clean') on 'layers.1' would overwrite what 'layers.0' saved in this forward; put "
                      "{module} in the key"),
            std::string::npos);
}

TEST(ReadyMadeHooks, SteeringAndMeanAblationMatchTheirDefinitions) {
  torch::manual_seed(0);
  testing::Net net;
  auto x = torch::randn({5, 4});
  auto direction = torch::randn({8});
  torch::NoGradGuard no_grad;
  FlexModel fm(net);
  fm.create_hook_group("steer", "fc1", {}, hooks::add_vector(direction, 0.5));
  fm.create_hook_group("mean", "fc1", {}, hooks::mean_ablation());
  EXPECT_TRUE(torch::equal(fm.forward(Groups{"steer"}, x),
                           compute_by_hand(*net, x, [&](torch::Tensor t) { return t + 0.5 * direction; }).out));
  EXPECT_TRUE(torch::allclose(fm.forward(Groups{"mean"}, x),
                              compute_by_hand(*net, x, [](torch::Tensor t) {
                                return t.mean(0, true).expand_as(t);
                              }).out));
}

}  // namespace
}  // namespace flexmodel
