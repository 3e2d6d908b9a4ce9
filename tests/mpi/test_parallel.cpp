// Run under mpirun with the mesh sizes as arguments:
//   mpirun -np N test_parallel TP PP DP
// A GPT built from flexmodel::parallel layers under the mesh must give, on
// rank 0, the activations and logits of the same weights run in one process.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

#include <unistd.h>

#include <hdf5.h>
#include <mpi.h>

#include "flexmodel/dist.h"
#include "flexmodel/flexmodel.h"
#include "flexmodel/hooks/editing.h"
#include "flexmodel/io/hdf5_writer.h"
#include "flexmodel/npy.h"
#include "flexmodel/parallel.h"
#include "flexmodel/torchscript.h"
#include "mesh_shape.h"

namespace flexmodel {

dist::MeshShape testing::g_shape;

namespace {

using testing::g_shape;

// This rank's tensor-parallel index in a world that is one TP group.
std::int64_t mesh_rank_of_tp() { return dist::world_rank() % g_shape.tp; }

models::GPTOptions small_gpt() {
  return models::GPTOptions().vocab_size(64).max_positions(16).d_model(32).n_heads(4).n_layers(4).d_mlp(64);
}

// Hook points with full shapes: sharded dims given, the rest free.
const std::vector<std::pair<std::string, ExpectedShape>> kReadHooks = {
    {"embed_tokens", {}},
    {"layers.0.attn", {}},
    {"layers.1.mlp.fc_in", {std::nullopt, std::nullopt, 64}},
    {"layers.2", {}},
    {"layers.3.mlp", {}},
    {"lm_head", {}},
};

class ParallelGPTTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    full = models::GPT(small_gpt());
    full->eval();
    tokens = torch::randint(0, 64, {4, 8}, torch::TensorOptions().dtype(torch::kLong));
    mesh = dist::Mesh::create(g_shape);
    sharded = parallel::ParallelGPT(*full, mesh);
    sharded->eval();
    fm = std::make_unique<FlexModel<parallel::ParallelGPTImpl>>(
        sharded, FlexModelOptions().tp(g_shape.tp).pp(g_shape.pp).dp(g_shape.dp));
  }

  bool root() const { return dist::world_rank() == 0; }

  torch::NoGradGuard no_grad;
  models::GPT full{nullptr};
  torch::Tensor tokens;
  std::shared_ptr<dist::Mesh> mesh;
  parallel::ParallelGPT sharded{nullptr};
  std::unique_ptr<FlexModel<parallel::ParallelGPTImpl>> fm;
};

TEST_F(ParallelGPTTest, ActivationsOnRank0EqualTheUnshardedModel) {
  FlexModel reference(full);
  for (const auto& [name, shape] : kReadHooks) {
    reference.register_forward_hook(HookFunction(name));
    fm->register_forward_hook(HookFunction(name, shape));
  }
  // The row-parallel projection's input is split over TP along its last dimension.
  reference.register_forward_pre_hook(HookFunction("layers.2.attn.proj"));
  fm->register_forward_pre_hook(HookFunction("layers.2.attn.proj", {std::nullopt, std::nullopt, 32}));
  auto expected_logits = reference.forward(tokens);
  auto logits = fm->forward(tokens);
  if (!root()) return;
  EXPECT_TRUE(torch::allclose(logits, expected_logits, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(fm->outputs().at("layers.2.attn.proj", HookType::forward_pre)[0],
                              reference.outputs().at("layers.2.attn.proj", HookType::forward_pre)[0], 1e-5, 1e-5));
  for (const auto& [name, shape] : kReadHooks) {
    ASSERT_TRUE(fm->outputs().contains(name)) << name;
    const auto& ours = fm->outputs().at(name)[0];
    const auto& theirs = reference.outputs().at(name)[0];
    ASSERT_EQ(ours.sizes(), theirs.sizes()) << name;
    EXPECT_TRUE(torch::allclose(ours, theirs, 1e-5, 1e-5)) << name << " max |Δ| " << (ours - theirs).abs().max();
  }
}

TEST_F(ParallelGPTTest, EditsGiveTheSingleProcessLogits) {
  FlexModel reference(full);
  auto edit_everywhere = [&](FlexModelBase& model, bool sharded_shapes) {
    model.create_hook_group("edit", "layers.1.mlp", {}, hooks::zero_ablation());
    model.create_hook_group("edit", "layers.2.mlp.fc_in",
                            sharded_shapes ? ExpectedShape{std::nullopt, std::nullopt, 64} : ExpectedShape{},
                            hooks::scale(2.0));
    // Position-dependent along the sharded dimension, so a wrong layout would show.
    model.create_hook_group("edit", "layers.3.attn.proj",
                            sharded_shapes ? ExpectedShape{std::nullopt, std::nullopt, 32} : ExpectedShape{},
                            [](const torch::Tensor& x) { return x * torch::linspace(-1, 2, 32); }, 0,
                            HookType::forward_pre);
    model.create_hook_group("edit", "layers.0", {}, [](const torch::Tensor& x) { return x * 0.5; });
  };
  edit_everywhere(reference, false);
  edit_everywhere(*fm, true);
  auto expected = reference.forward(Groups{"edit"}, tokens);
  auto plain = reference.forward(Groups{"edit"}.complement(), tokens);
  auto logits = fm->forward(Groups{"edit"}, tokens);
  if (!root()) return;
  EXPECT_FALSE(torch::allclose(expected, plain, 1e-3, 1e-3));
  EXPECT_TRUE(torch::allclose(logits, expected, 1e-5, 1e-5)) << "max |Δ| " << (logits - expected).abs().max();
}

// An error every rank raises (an editing function that throws on rank 0, an
// expected_shape that does not fit) leaves every rank's forward; the program
// catches it and the next forward equals one process's.
TEST_F(ParallelGPTTest, AnErrorOnEveryRankIsCaughtAndTheNextForwardSucceeds) {
  if (g_shape.pp > 1) {
    GTEST_SKIP() << "with several pipeline stages an error ends every rank (the mpi_*_ends_every_rank tests)";
  }
  FlexModel reference(full);
  fm->create_hook_group("throws", "layers.1.mlp", {}, [](const torch::Tensor& x) -> torch::Tensor {
    if (dist::world_rank() == 0) throw std::runtime_error("probe diverged");
    return x;
  });
  fm->create_hook_group("misshapen", "layers.2.mlp", {1, 2, 3});
  for (FlexModelBase* model : {static_cast<FlexModelBase*>(fm.get()), static_cast<FlexModelBase*>(&reference)}) {
    model->create_hook_group("good", "layers.3.mlp", {}, hooks::scale(0.5));
  }
  EXPECT_THROW(fm->forward(Groups{"throws"}, tokens), HookError);
  EXPECT_THROW(fm->forward(Groups{"misshapen"}, tokens), ShapeError);
  const auto logits = fm->forward(Groups{"good"}, tokens);
  const auto expected = reference.forward(Groups{"good"}, tokens);
  if (!root()) return;
  EXPECT_TRUE(torch::allclose(logits, expected, 1e-5, 1e-5)) << "max |Δ| " << (logits - expected).abs().max();
  EXPECT_FALSE(fm->outputs().contains("layers.2.mlp"));
  EXPECT_EQ(fm->outputs().at("layers.3.mlp").size(), 1u);
}

TEST_F(ParallelGPTTest, GetModuleParameterGathersTheUnshardedWeight) {
  auto fc_in = fm->get_module_parameter("layers.1.mlp.fc_in.weight", {64, std::nullopt});
  auto proj_weight = fm->get_module_parameter("layers.3.attn.proj.weight", {32, 32});
  auto embedding = fm->get_module_parameter("embed_tokens.weight", {64, 32});
  if (!root()) return;
  EXPECT_TRUE(torch::equal(fc_in, full->layers->ptr<models::BlockImpl>(1)->mlp->fc_in->weight));
  EXPECT_TRUE(torch::equal(embedding, full->embed_tokens->weight));
  EXPECT_TRUE(torch::equal(proj_weight, full->layers->ptr<models::BlockImpl>(3)->attn->proj->weight));
}

// The layers declare their sharding: hooks without expected_shape see and edit
// full tensors, a fused qkv in the model's head order, as one process has them.
TEST_F(ParallelGPTTest, DeclaredShardingNeedsNoExpectedShape) {
  FlexModel reference(full);
  const std::vector<std::pair<std::string, HookType>> points = {
      {"layers.1.mlp.fc_in", HookType::forward},   {"layers.1.mlp.act", HookType::forward},
      {"layers.1.mlp.fc_out", HookType::forward_pre}, {"layers.0.attn.qkv", HookType::forward},
      {"layers.2.attn.proj", HookType::forward_pre}, {"lm_head", HookType::forward}};
  for (auto* model : std::initializer_list<FlexModelBase*>{&reference, fm.get()}) {
    for (const auto& [name, type] : points) model->register_hook_function(HookFunction(name), type);
    model->register_forward_hook(HookFunction("layers.3.attn").unpack_idx(1));  // probabilities, split by heads
    // Position-dependent edits along the split dimensions, so a wrong layout shows.
    model->create_hook_group("edit", "layers.2.mlp.fc_in", {},
                             [](const torch::Tensor& x) { return x * torch::linspace(-1, 2, 64); });
    model->create_hook_group("edit", "layers.1.attn.qkv", {},
                             [](const torch::Tensor& x) { return x * torch::linspace(0, 1, 96); });
  }
  const auto expected = reference.forward(tokens);
  const auto logits = fm->forward(tokens);
  const auto plain = reference.forward(Groups{"edit"}.complement(), tokens);
  auto qkv_weight = fm->get_module_parameter("layers.0.attn.qkv.weight");
  auto proj_weight = fm->get_module_parameter("layers.0.attn.proj.weight");
  if (!root()) return;
  EXPECT_FALSE(torch::allclose(expected, plain, 1e-3, 1e-3));
  EXPECT_TRUE(torch::allclose(logits, expected, 1e-5, 1e-5)) << "max |Δ| " << (logits - expected).abs().max();
  for (const auto& [name, type] : points) {
    const auto& ours = fm->outputs().at(name, type)[0];
    const auto& theirs = reference.outputs().at(name, type)[0];
    ASSERT_EQ(ours.sizes(), theirs.sizes()) << name;
    EXPECT_TRUE(torch::allclose(ours, theirs, 1e-5, 1e-5)) << name << " max |Δ| " << (ours - theirs).abs().max();
  }
  EXPECT_TRUE(torch::allclose(fm->outputs().at("layers.3.attn")[0], reference.outputs().at("layers.3.attn")[0], 1e-5,
                              1e-5));
  EXPECT_TRUE(torch::equal(qkv_weight, full->layers->ptr<models::BlockImpl>(0)->attn->qkv->weight));
  EXPECT_TRUE(torch::equal(proj_weight, full->layers->ptr<models::BlockImpl>(0)->attn->proj->weight));
}

TEST_F(ParallelGPTTest, AnExpectedShapeThatContradictsTheDeclarationIsAnErrorOnEveryRank) {
  if (g_shape.tp == 1 || g_shape.pp > 1) GTEST_SKIP() << "for tensor-parallel meshes of one stage";
  // fc_in's output is split along its last dimension; 32 is the local size, not the full one.
  auto wrong = fm->register_forward_hook(HookFunction("layers.1.mlp.fc_in", {std::nullopt, std::nullopt, 32}));
  try {
    fm->forward(tokens);
    ADD_FAILURE() << "no error";
  } catch (const ShapeError& error) {
    EXPECT_NE(std::string(error.what()).find("contradicts its module's declaration"), std::string::npos)
        << error.what();
  }
  fm->remove_hook(wrong);
  fm->register_forward_hook(HookFunction("layers.1.mlp.fc_in"));
  fm->forward(tokens);  // the ranks go on together
  if (root()) EXPECT_EQ(fm->outputs().at("layers.1.mlp.fc_in")[0].size(2), 64);
}

// A user's own tensor-parallel module declares its sharding through the same interface.
struct OwnShardImpl : torch::nn::Module, dist::TensorParallelModule {
  explicit OwnShardImpl(std::shared_ptr<dist::Mesh> mesh) : mesh_(std::move(mesh)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return (x * 3).chunk(mesh_->shape().tp, 1)[mesh_->tp_rank()].contiguous();
  }
  dist::Sharding output_sharding(std::size_t) const override { return dist::Sharding::split(1); }
  std::shared_ptr<dist::Mesh> mesh_;
};
FLEX_MODULE(OwnShard);

TEST(TensorParallel, AUsersOwnModuleDeclaresItsSharding) {
  if (g_shape.tp == 1 || g_shape.pp > 1 || g_shape.dp > 1) GTEST_SKIP() << "for tensor-parallel meshes";
  OwnShard module(dist::Mesh::create(g_shape));
  FlexModel fm(module, FlexModelOptions().tp(g_shape.tp));
  fm.register_forward_hook(HookFunction("", {}, [](const torch::Tensor& x) { return x + 1; }));
  torch::NoGradGuard no_grad;
  const auto x = torch::arange(24, torch::kFloat).view({2, 12});
  const auto local = fm.forward(x);
  EXPECT_TRUE(torch::equal(local, (x * 3 + 1).chunk(g_shape.tp, 1)[mesh_rank_of_tp()]));
  if (dist::world_rank() == 0) EXPECT_TRUE(torch::equal(fm.outputs().at("(root)")[0], x * 3));
}

TEST_F(ParallelGPTTest, ANameOnNoStageIsAnErrorOnEveryRank) {
  EXPECT_THROW(fm->register_forward_hook(HookFunction("layers.9.mlp")), ConfigError);
  EXPECT_THROW(fm->get_module_parameter("layers.9.mlp.fc_in.weight"), ConfigError);
}

TEST(TorchScript, DataParallelCapturesAndLogitsEqualOneProcess) {
  if (g_shape.tp != 1 || g_shape.pp != 1) {
    GTEST_SKIP() << "a TorchScript model has no tensor-parallel layers or stages; this mesh is for ParallelGPT";
  }
  const std::string path = std::string(FLEXMODEL_FIXTURE_DIR) + "/gpt_scripted.pt";
  torch::NoGradGuard no_grad;
  torch::manual_seed(5);
  auto tokens = torch::randint(0, 256, {4, 12});
  ScriptFlexModel single(path);
  ScriptFlexModel sharded(path, FlexModelOptions().dp(g_shape.dp));
  for (auto* fm : {&single, &sharded}) {
    fm->create_hook_group("read", "layers.*.mlp");
    fm->create_hook_group("edit", "layers.1.attn", {}, hooks::scale(0.25), 0);
  }
  auto expected = single.forward({tokens}).toTensor();
  auto logits = sharded.forward({tokens}).toTensor();
  if (dist::world_rank() != 0) return;
  EXPECT_TRUE(torch::allclose(logits, expected, 1e-5, 1e-6));
  for (const auto& name : {"layers.0.mlp", "layers.2.mlp"}) {
    EXPECT_TRUE(torch::allclose(sharded.outputs().at(name)[0], single.outputs().at(name)[0], 1e-5, 1e-6)) << name;
  }
}

// Tensors without a batch dimension (a position embedding of arange(T)[None],
// rotary cos/sin tables, a tied weight) are captured once, not once per rank,
// and an edit of one applies on every rank: also with one row per rank, and
// when the ranks' rows are identical, so that a [1, T, d] tensor is no clue.
TEST(TorchScript, TensorsWithoutRowsAreCapturedOnceAndEditedEverywhere) {
  if (g_shape.tp != 1 || g_shape.pp != 1 || g_shape.dp == 1) {
    GTEST_SKIP() << "for data-parallel meshes of a TorchScript model";
  }
  const std::string real = std::string(FLEXMODEL_FIXTURE_DIR) + "/real/";
  torch::NoGradGuard no_grad;
  const auto four_rows = read_npy(real + "nobatch_scripted.input0.npy");
  const auto repeated = read_npy(real + "nobatch_scripted.rows2.npy");
  for (const auto& path : {real + "nobatch_scripted.pt", real + "nobatch_traced.pt"}) {
    ScriptFlexModel single(path);
    ScriptFlexModel sharded(path, FlexModelOptions().dp(g_shape.dp));
    for (auto* fm : {&single, &sharded}) {
      fm->register_forward_hook(HookFunction("wpe"));
      fm->register_forward_hook(HookFunction("rotary").unpack_idx(HookFunction::kAllLeaves));
      fm->register_forward_pre_hook(HookFunction("wpe"));
      fm->register_forward_hook(HookFunction("layers.0.mlp"));
      fm->create_hook_group("edit", "wpe", {}, hooks::scale(0.5));
    }
    for (const auto& tokens : {four_rows, repeated, four_rows.narrow(0, 0, g_shape.dp)}) {
      if (tokens.size(0) % g_shape.dp != 0) continue;
      for (const Groups& groups : {Groups{"all"}, Groups{"edit"}.complement()}) {
        const auto expected = single.forward(groups, {tokens}).toTensor();
        const auto logits = sharded.forward(groups, {tokens}).toTensor();
        if (dist::world_rank() != 0) continue;
        EXPECT_TRUE(torch::allclose(logits, expected, 1e-5, 1e-5)) << path;
      }
    }
    if (dist::world_rank() != 0) continue;
    ASSERT_EQ(sharded.outputs().keys(), single.outputs().keys());
    for (const auto& [name, type] : single.outputs().keys()) {
      const auto& ours = sharded.outputs().at(name, type);
      const auto& theirs = single.outputs().at(name, type);
      ASSERT_EQ(ours.size(), theirs.size()) << name;
      for (std::size_t i = 0; i < ours.size(); ++i) {
        ASSERT_EQ(ours[i].sizes(), theirs[i].sizes()) << path << " " << name << " capture " << i;
        EXPECT_TRUE(torch::allclose(ours[i].to(torch::kDouble), theirs[i].to(torch::kDouble), 1e-5, 1e-5))
            << path << " " << name << " capture " << i;
      }
    }
  }
}

// Backward through a data-parallel forward: every rank gets the whole logits
// (its own rows in its graph), takes the same loss and calls backward; the
// gradient hooks on rank 0 and the parameter gradients summed over DP equal
// one process's. Gradients each dp rank holds a partial of (a parameter's, a
// position table's [T, d] without rows) reach their hook summed, and a
// non-linear edit of them (a clamp) leaves the dp sum equal to one process's
// clamped gradient.
TEST(DataParallel, BackwardHooksAndGradientsEqualOneProcess) {
  if (g_shape.tp != 1 || g_shape.pp != 1) {
    GTEST_SKIP() << "flexmodel::parallel layers run forward only; backward is tested on data-parallel meshes";
  }
  torch::manual_seed(0);
  models::GPT model(small_gpt());
  torch::manual_seed(6);
  const auto tokens = torch::randint(0, 64, {4, 8});
  const auto clamp = [](const torch::Tensor& g) { return g.clamp(-2e-4, 2e-4); };
  auto run = [&](FlexModelOptions options) {
    model->zero_grad();
    FlexModel fm(model, options);
    fm.register_full_backward_pre_hook(HookFunction("layers.1.mlp"));
    fm.register_full_backward_hook(HookFunction("layers.2.attn"));
    fm.register_full_backward_pre_hook(HookFunction("layers.3", {}, hooks::scale(0.5)));
    fm.register_hook(HookFunction("layers.0.mlp.fc_in.weight"));
    fm.register_hook(HookFunction("layers.1.mlp.fc_in.weight", {}, clamp));
    fm.register_full_backward_pre_hook(HookFunction("embed_positions", {}, clamp));
    auto logits = fm.forward(tokens);
    (logits.pow(2).mean()).backward();
    std::map<std::string, torch::Tensor> results{{"logits", logits.detach()}};
    if (dist::world_rank() == 0) {
      for (const auto& [name, type] : fm.outputs().keys()) {
        results["capture " + name + " " + std::string(to_string(type))] = fm.outputs().at(name, type)[0];
      }
    }
    for (const auto& item : model->named_parameters()) results["parameter " + item.key()] = item.value().grad().clone();
    return results;
  };
  const auto single = run(FlexModelOptions());
  auto sharded = run(FlexModelOptions().dp(g_shape.dp));
  auto mesh = dist::Mesh::create(g_shape);
  for (auto& [name, tensor] : sharded) {
    // Each rank's parameter gradients come from its rows only; DP sums them.
    if (name.rfind("parameter ", 0) == 0) tensor = mesh->dp_group().all_reduce_sum(tensor);
  }
  // The clamps change the gradients, so an edit of a partial would show.
  if (dist::world_rank() == 0) {
    for (const char* name : {"capture layers.1.mlp.fc_in.weight tensor", "capture embed_positions full_backward_pre"}) {
      ASSERT_TRUE(single.count(name)) << name;
      EXPECT_FALSE(torch::allclose(clamp(single.at(name)), single.at(name))) << name;
    }
  }
  ASSERT_EQ(sharded.size(), single.size());
  for (const auto& [name, expected] : single) {
    const torch::Tensor& ours = sharded.at(name);
    ASSERT_EQ(ours.sizes(), expected.sizes()) << name;
    EXPECT_TRUE(torch::allclose(ours, expected, 1e-5, 1e-7)) << name << " max |Δ| " << (ours - expected).abs().max();
  }
}

// layers.i (a hookable Linear 6→6, then tanh) for i in [first, first + count):
// the whole chain in one process, or pipeline stage i of `mesh`, where the
// program moves activations forward and gradients back.
struct ChainImpl : torch::nn::Module, dist::PipelineStageModule {
  struct LayersImpl : torch::nn::Module {
    LayersImpl(std::int64_t first, std::int64_t count) {
      for (std::int64_t i = first; i < first + count; ++i) {
        torch::manual_seed(100 + i);
        layers.push_back(register_module(std::to_string(i), flexmodel::nn::Linear(6, 6)));
      }
    }
    std::vector<flexmodel::nn::Linear> layers;
  };

  ChainImpl(std::int64_t first, std::int64_t count, std::shared_ptr<dist::Mesh> stages = nullptr)
      : mesh(std::move(stages)) {
    layers = register_module("layers", std::make_shared<LayersImpl>(first, count));
  }

  torch::Tensor forward(torch::Tensor x) {
    if (mesh != nullptr && mesh->pp_rank() > 0) {
      received = torch::empty_like(x);
      mesh->pp_group().recv(received, static_cast<int>(mesh->pp_rank() - 1));
      x = received.requires_grad_();
    }
    for (auto& layer : layers->layers) x = torch::tanh(layer(x));
    if (mesh != nullptr && mesh->pp_rank() + 1 < mesh->shape().pp) {
      mesh->pp_group().send(x.detach().contiguous(), static_cast<int>(mesh->pp_rank() + 1));
    }
    return x;
  }

  // The backward of one forward: the last stage starts from the loss, every
  // other one from the gradient the next stage sends.
  void backward(const torch::Tensor& output) {
    if (mesh == nullptr || mesh->pp_rank() + 1 == mesh->shape().pp) {
      output.pow(2).sum().backward();
    } else {
      torch::Tensor grad = torch::empty_like(output);
      mesh->pp_group().recv(grad, static_cast<int>(mesh->pp_rank() + 1));
      output.backward(grad);
    }
    if (mesh != nullptr && mesh->pp_rank() > 0) {
      mesh->pp_group().send(received.grad().contiguous(), static_cast<int>(mesh->pp_rank() - 1));
    }
  }

  std::shared_ptr<LayersImpl> layers;
  std::shared_ptr<dist::Mesh> mesh;
  torch::Tensor received;
};
FLEX_MODULE(Chain);

// A float32 or int64 dataset of an HDF5 file, read with HDF5's own API; undefined if missing.
torch::Tensor read_dataset(const std::string& file, const std::string& path, torch::Dtype dtype = torch::kFloat) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // a missing dataset is reported by the test
  const hid_t handle = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t dataset = H5Dopen2(handle, path.c_str(), H5P_DEFAULT);
  if (dataset < 0) {
    H5Fclose(handle);
    return {};
  }
  const hid_t space = H5Dget_space(dataset);
  std::vector<hsize_t> dims(static_cast<std::size_t>(H5Sget_simple_extent_ndims(space)));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  torch::Tensor values = torch::empty(std::vector<std::int64_t>(dims.begin(), dims.end()), dtype);
  H5Dread(dataset, dtype == torch::kFloat ? H5T_NATIVE_FLOAT : H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT,
          values.data_ptr());
  H5Sclose(space);
  H5Dclose(dataset);
  H5Fclose(handle);
  return values;
}

// Backward captures of every stage reach rank 0 and its HDF5 file at
// end_backward, in the step of their forward, equal to one process's.
TEST(Pipeline, BackwardCapturesReachRank0AndTheFileInTheStepOfTheirForward) {
  if (g_shape.pp == 1 || g_shape.tp != 1 || g_shape.dp != 1) {
    GTEST_SKIP() << "the hand-made pipeline runs on pipeline-only meshes (1, pp, 1)";
  }
  const std::int64_t stages = g_shape.pp;
  const std::vector<std::pair<std::string, HookType>> points{
      {"layers.0", HookType::full_backward_pre},
      {"layers." + std::to_string(stages - 1), HookType::full_backward_pre},
      {"layers." + std::to_string(stages - 1), HookType::full_backward},
      {"layers.0.weight", HookType::tensor},
      {"layers.1", HookType::forward}};
  auto register_points = [&](FlexModelBase& fm) {
    for (const auto& [name, type] : points) fm.register_hook_function(HookFunction(name), type);
  };
  torch::manual_seed(3);
  const std::vector<torch::Tensor> batches{torch::randn({3, 6}), torch::randn({5, 6})};

  Chain whole(0, stages);
  FlexModel single(whole);
  register_points(single);
  for (const auto& x : batches) whole->backward(single.forward(x));

  const auto mesh = dist::Mesh::create(g_shape);
  Chain stage(mesh->pp_rank(), 1, mesh);
  FlexModel fm(stage, FlexModelOptions().mesh(mesh));
  register_points(fm);
  const std::string file =
      (std::filesystem::temp_directory_path() / ("flexmodel_pipeline_backward_" + std::to_string(::getpid()) + ".h5"))
          .string();
  if (mesh->rank() == 0) {
    fm.add_sink(std::make_shared<io::HDF5Writer>(file, io::HDF5WriterOptions().overwrite(true).pp(stages)));
  }
  for (const auto& x : batches) {
    stage->backward(fm.forward(x));
    fm.end_backward();
  }
  if (mesh->rank() != 0) return;
  fm.close_sinks();
  for (const auto& [name, type] : points) {
    const auto& ours = fm.outputs().at(name, type);
    const auto& theirs = single.outputs().at(name, type);
    ASSERT_EQ(ours.size(), theirs.size()) << name << " " << to_string(type);
    for (std::size_t i = 0; i < ours.size(); ++i) {
      EXPECT_TRUE(torch::allclose(ours[i], theirs[i], 1e-6, 1e-7)) << name << " " << to_string(type) << " " << i;
    }
    const torch::Tensor stored = read_dataset(file, io::hdf5_dataset_path(name, type));
    ASSERT_TRUE(stored.defined()) << file << " lacks " << io::hdf5_dataset_path(name, type);
    EXPECT_TRUE(torch::allclose(stored, torch::cat(theirs), 1e-6, 1e-7)) << name << " " << to_string(type);
    const torch::Tensor rows = read_dataset(file, "/rows_per_step/" + name + "/" + std::string(to_string(type)),
                                            torch::kLong);
    ASSERT_TRUE(rows.defined());
    EXPECT_EQ(rows.size(0), 2) << name;
    EXPECT_EQ(rows[0].item<std::int64_t>(), theirs[0].size(0)) << name;
  }
  std::remove(file.c_str());
}

TEST(Communicators, Bfloat16AndFloat16TravelIntact) {
  auto mesh = dist::Mesh::create(g_shape);
  auto& world = mesh->world();
  for (auto dtype : {torch::kBFloat16, torch::kHalf}) {
    torch::manual_seed(3);
    auto whole = torch::randn({world.size() * 3, 5}).to(dtype);
    auto mine = whole.chunk(world.size(), 0)[world.rank()].contiguous();
    auto gathered = world.gather(mine, 0, 0);
    auto everywhere = world.all_gather(mine, 0);
    EXPECT_TRUE(torch::equal(everywhere, whole));
    if (world.rank() == 0) EXPECT_TRUE(torch::equal(gathered, whole));
    auto back = world.scatter(world.rank() == 0 ? whole : torch::Tensor(), mine, 0, 0);
    EXPECT_TRUE(torch::equal(back, mine));
  }
}

// Large results reuse the buffers of earlier ones, but only of results that
// nothing holds: a kept result keeps its values through later gathers.
TEST(Communicators, AKeptGatherResultIsNeverOverwritten) {
  auto mesh = dist::Mesh::create(g_shape);
  auto& world = mesh->world();
  auto whole = [&](float step) {  // 512 KiB per rank, above the size whose buffers are kept
    return torch::arange(world.size() * (1 << 17), torch::kFloat) + step;
  };
  auto mine = [&](float step) { return whole(step).chunk(world.size(), 0)[world.rank()].contiguous(); };
  const torch::Tensor kept = world.all_gather(mine(0), 0);
  const torch::Tensor kept_on_root = world.gather(mine(0.5), 0, 0);
  for (int step = 1; step <= 3; ++step) {
    EXPECT_TRUE(torch::equal(world.all_gather(mine(step), 0), whole(step)));
    auto gathered = world.gather(mine(step + 0.5f), 0, 0);
    if (world.rank() == 0) EXPECT_TRUE(torch::equal(gathered, whole(step + 0.5f)));
  }
  EXPECT_TRUE(torch::equal(kept, whole(0)));
  if (world.rank() == 0) EXPECT_TRUE(torch::equal(kept_on_root, whole(0.5)));
}

// One mesh serves the layers and several FlexModels; the program's
// MPI_COMM_WORLD keeps the error handler it had.
TEST(Mesh, OneMeshServesSeveralFlexModelsAndTheWorldKeepsItsErrorHandler) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  models::GPT full(small_gpt());
  full->eval();
  const auto mesh = dist::Mesh::create(g_shape);
  parallel::ParallelGPT first(*full, mesh), second(*full, mesh);
  FlexModel a(first, FlexModelOptions().mesh(mesh)), b(second, FlexModelOptions().mesh(mesh));
  EXPECT_EQ(a.mesh().get(), mesh.get());
  EXPECT_EQ(b.mesh().get(), mesh.get());
  EXPECT_EQ(a.options().tensor_parallel_size, g_shape.tp);
  for (auto* fm : {&a, &b}) fm->register_forward_hook(HookFunction("layers.1.mlp.fc_in"));
  const auto tokens = torch::randint(0, 64, {4, 8});
  const auto from_a = a.forward(tokens);
  const auto from_b = b.forward(tokens);
  if (dist::world_rank() == 0) {
    EXPECT_TRUE(torch::equal(from_a, from_b));
    EXPECT_TRUE(torch::equal(a.outputs().at("layers.1.mlp.fc_in")[0], b.outputs().at("layers.1.mlp.fc_in")[0]));
  }
  EXPECT_THROW(FlexModel(first, FlexModelOptions().mesh(mesh).tp(g_shape.tp + 1)), ConfigError);
  if (dist::launched_by_mpi()) {
    MPI_Errhandler handler;
    MPI_Comm_get_errhandler(MPI_COMM_WORLD, &handler);
    EXPECT_TRUE(handler == MPI_ERRORS_ARE_FATAL) << "flexmodel changed MPI_COMM_WORLD's error handler";
    MPI_Errhandler_free(&handler);
  }
}

TEST(Mesh, AWorldOfTheWrongSizeIsAnErrorBeforeAnyCollective) {
  dist::MeshShape wrong{g_shape.tp, g_shape.pp, g_shape.dp + 1};
  try {
    dist::Mesh::create(wrong);
    ADD_FAILURE() << "no error";
  } catch (const DistributedError& error) {
    EXPECT_NE(std::string(error.what()).find("but the world has"), std::string::npos) << error.what();
  }
}

TEST(Mesh, AMeshTheModelCannotUseListsEveryViolation) {
  if (g_shape.size() == 1) GTEST_SKIP() << "needs a mesh of more than one rank";
  torch::manual_seed(0);
  models::GPT plain(small_gpt());
  FlexModel fm(plain, FlexModelOptions().tp(g_shape.tp).pp(g_shape.pp).dp(g_shape.dp));
  try {
    fm.forward(torch::randint(0, 64, {g_shape.dp + 1, 4}));
    ADD_FAILURE() << "no error";
  } catch (const ConfigError& error) {
    const std::string message = error.what();
    if (g_shape.tp > 1) EXPECT_NE(message.find("no tensor-parallel layers"), std::string::npos) << message;
    if (g_shape.pp > 1) EXPECT_NE(message.find("not split into pipeline stages"), std::string::npos) << message;
    if (g_shape.dp > 1) EXPECT_NE(message.find("does not divide the batch"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace flexmodel

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 4) {
    std::fprintf(stderr, "usage: mpirun -np N %s TP PP DP\n", argv[0]);
    return 2;
  }
  flexmodel::testing::g_shape = {std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3])};
  torch::set_num_threads(1);
  // Only rank 0 reports; every rank runs every test, since tests hold collectives.
  if (flexmodel::dist::world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS();
  // Any rank's failure fails the run.
  auto mesh = flexmodel::dist::Mesh::create(flexmodel::testing::g_shape);
  auto results = mesh->world().all_gather_ints(failed);
  for (auto result : results) failed |= static_cast<int>(result);
  return failed;
}
