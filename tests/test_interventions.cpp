// Interventions saved and loaded back, read by Python's torch, used by hooks.
#include <gtest/gtest.h>

#include <fstream>

#include <torch/serialize.h>

#include "flexmodel/hooks/editing.h"
#include "test_files.h"
#include "test_models.h"

namespace flexmodel {
namespace {

using testing::error_of;
using testing::TempDir;

std::shared_ptr<SteeringVectorImpl> steering(std::int64_t d, double coefficient) {
  auto made = std::make_shared<SteeringVectorImpl>(d, coefficient);
  torch::NoGradGuard no_grad;
  made->direction.copy_(torch::randn({d}));
  return made;
}

std::shared_ptr<LowRankInterventionImpl> low_rank(std::int64_t d, std::int64_t rank) {
  auto made = std::make_shared<LowRankInterventionImpl>(d, rank);
  torch::NoGradGuard no_grad;
  made->up.copy_(torch::randn({rank, d}));
  return made;
}

TEST(Interventions, LoadedBackTheyAreTheSameKindConfigurationAndEdit) {
  torch::manual_seed(0);
  TempDir dir;
  const auto x = torch::randn({2, 3, 16});
  for (const std::shared_ptr<InterventionImpl>& saved :
       {std::shared_ptr<InterventionImpl>(steering(16, 2.5)), std::shared_ptr<InterventionImpl>(low_rank(16, 3))}) {
    save_intervention(*saved, dir / "saved.pt");
    const auto loaded = load_intervention(dir / "saved.pt");
    EXPECT_EQ(loaded->kind(), saved->kind());
    EXPECT_EQ(loaded->config(), saved->config());
    EXPECT_TRUE(torch::equal(loaded->forward(x), saved->forward(x))) << saved->kind();
    EXPECT_FALSE(torch::equal(loaded->forward(x), x)) << saved->kind();
  }
}

TEST(Interventions, PythonsTorchReadsTheFiles) {
  torch::manual_seed(1);
  TempDir dir;
  const auto steer = steering(8, -1.5);
  const auto edit = low_rank(8, 2);
  save_intervention(*steer, dir / "steering.pt");
  save_intervention(*edit, dir / "low_rank.pt");
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({4, 8});
  torch::serialize::OutputArchive samples;
  samples.write("x", x);
  samples.write("steered", steer->forward(x));
  samples.write("low_ranked", edit->forward(x));
  samples.save_to(dir / "samples.pt");
  EXPECT_EQ(testing::run_python(std::string(FLEXMODEL_TEST_SCRIPTS) + "/interventions/check_python.py " +
                                (dir / "steering.pt") + " " + (dir / "low_rank.pt") + " " + (dir / "samples.pt")),
            0);
}

TEST(Interventions, AHookRunsTheInterventionAndTrainsIt) {
  torch::manual_seed(2);
  models::GPT gpt{models::GPTOptions()};
  const auto tokens = torch::randint(0, 256, {2, 6});
  const auto steer = steering(64, 3.0);
  FlexModel fm(gpt);
  fm.register_trainable_module("steer", steer);
  fm.create_hook_group("steer", "layers.1", {}, hooks::intervene("steer"));
  fm.create_hook_group("by_hand", "layers.1", {}, hooks::add_vector(steer->direction.detach().clone(), 3.0));
  fm.wrapped_module_requires_grad(false);
  EXPECT_TRUE(torch::allclose(fm.forward(Groups{"steer"}, tokens), fm.forward(Groups{"by_hand"}, tokens), 0, 1e-6));
  // Raise token 5's logit at the last position: only the steering vector learns.
  torch::optim::SGD optimizer(steer->parameters(), 1.0);
  auto logit = [&] { return fm.forward(Groups{"steer"}, tokens).select(1, -1).select(1, 5).mean(); };
  const double before = logit().item<double>();
  for (int step = 0; step < 10; ++step) {
    optimizer.zero_grad();
    (-logit()).backward();
    optimizer.step();
  }
  EXPECT_GT(logit().item<double>(), before + 1.0);
}

TEST(Interventions, FilesThatAreNoInterventionSayWhy) {
  TempDir dir;
  EXPECT_NE(error_of([&] { load_intervention(dir / "missing.pt"); }).find("missing.pt' is not a file"),
            std::string::npos);
  std::ofstream(dir / "text.pt") << "not an archive";
  EXPECT_NE(error_of([&] { load_intervention(dir / "text.pt"); }).find("text.pt' is not a TorchScript archive"),
            std::string::npos);
  torch::nn::Linear linear(3, 4);
  torch::save(linear, dir / "linear.pt");
  EXPECT_NE(error_of([&] { load_intervention(dir / "linear.pt"); }).find("holds no intervention"), std::string::npos);
  auto written = [&](const std::string& kind, const std::string& config, const torch::Tensor& direction) {
    torch::serialize::OutputArchive archive;
    archive.write("direction", direction);
    archive.write("flexmodel_kind", c10::IValue(kind));
    archive.write("flexmodel_config", c10::IValue(config));
    archive.save_to(dir / "crafted.pt");
    return dir / "crafted.pt";
  };
  EXPECT_NE(error_of([&] { load_intervention(written("mystery", "{}", torch::zeros({4}))); })
                .find("kind 'mystery', which this library does not build; it builds low_rank, steering_vector"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_intervention(written("steering_vector", R"({"d_model": 8, "coefficient": 1})", torch::zeros({4})));
            }).find("its 'direction' has shape [4], its configuration"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_intervention(written("steering_vector", R"({"d_model": 8})", torch::zeros({8}))); })
                .find("its configuration lacks 'coefficient'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_intervention(written("steering_vector", "[1,", torch::zeros({8}))); })
                .find("is not a JSON object of numbers"),
            std::string::npos);
}

}  // namespace
}  // namespace flexmodel
