// mpirun -np N test_failure TP PP DP [MODE]: a failure on some ranks must end
// every rank, with its message, instead of leaving the others waiting forever.
// Each rank that sees a flexmodel error prints "rank R ended: <message>" and
// exits 3; a rank the library ends is ended by the world's abort.
//   (no mode)        an editing function throws on rank 0
//   undeclared       a hook on a tensor that differs across tensor-parallel
//                    ranks, from a module that declares no sharding
//   registration     (pp) a hook on a module whose hooks cannot fire, on the
//                    one stage that holds it: every rank gets the reason
//   parameter_shape  (pp) get_module_parameter with a wrong expected_shape for
//                    a parameter of the last stage: every rank gets the error
//   sink             (dp) rank 0's sink fails on a gradient capture, in backward
//   leak             (dp) an error raised on every rank in a backward is caught,
//                    then a forward fails on rank 1 only: it must end the world,
//                    not pass for an error every rank raised
//   killed           (dp) rank 1 is killed by a signal in the middle of a forward
//   other_hooks      rank 0 hooks layers.0.mlp, rank 1 layers.1.mlp (alike in shape)
//   other_batch      (dp) rank 1 runs a batch of another size
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "flexmodel/flexmodel.h"
#include "flexmodel/parallel.h"

namespace {

using flexmodel::FlexModel;
using flexmodel::FlexModelOptions;
using flexmodel::HookFunction;
using flexmodel::HookType;
using flexmodel::dist::world_rank;

// Returns this rank's shard of 3x and declares nothing about it.
struct UndeclaredShardImpl : torch::nn::Module, flexmodel::dist::TensorParallelModule {
  explicit UndeclaredShardImpl(std::shared_ptr<flexmodel::dist::Mesh> mesh) : mesh(std::move(mesh)) {}
  torch::Tensor forward(const torch::Tensor& x) { return (x * 3).chunk(mesh->shape().tp, 1)[mesh->tp_rank()]; }
  std::shared_ptr<flexmodel::dist::Mesh> mesh;
};
FLEX_MODULE(UndeclaredShard);

// Stage s of a two-stage model holds "layers.s"; stage 1's is a plain
// torch::nn::Linear, which no hook can fire on.
struct TwoStagesImpl : torch::nn::Module, flexmodel::dist::PipelineStageModule {
  struct LayersImpl : torch::nn::Module {
    explicit LayersImpl(std::int64_t stage) {
      if (stage == 0) {
        register_module("0", flexmodel::nn::Linear(4, 4));
      } else {
        register_module("1", torch::nn::Linear(4, 4));
      }
    }
  };
  explicit TwoStagesImpl(std::int64_t stage) { register_module("layers", std::make_shared<LayersImpl>(stage)); }
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
FLEX_MODULE(TwoStages);

// Linear, then a module that fails or kills its rank when armed.
struct TripwireImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) {
    if (armed && world_rank() == 1) {
      if (kill) std::raise(SIGKILL);
      throw std::runtime_error("rank 1 tripped");
    }
    return x;
  }
  bool armed = false;
  bool kill = false;
};
FLEX_MODULE(Tripwire);

struct ArmedImpl : torch::nn::Module {
  ArmedImpl() {
    fc = register_module("fc", flexmodel::nn::Linear(4, 4));
    wire = register_module("wire", Tripwire());
  }
  torch::Tensor forward(const torch::Tensor& x) { return wire(fc(x)); }
  flexmodel::nn::Linear fc{nullptr};
  Tripwire wire{nullptr};
};
FLEX_MODULE(Armed);

// Fails on the first gradient it is given.
struct FailingSink : flexmodel::Sink {
  void write(const std::string&, HookType type, std::int64_t, const torch::Tensor&) override {
    if (type != HookType::forward) throw flexmodel::IOError("disk full (test sink)");
  }
};

int run(const flexmodel::dist::MeshShape& shape, const std::string& mode) {
  const auto mesh = flexmodel::dist::Mesh::create(shape);
  if (mode == "undeclared") {
    torch::NoGradGuard no_grad;
    UndeclaredShard module(mesh);
    FlexModel fm(module, FlexModelOptions().mesh(mesh));
    fm.register_forward_hook(HookFunction("(root)"));
    fm.forward(torch::arange(24, torch::kFloat).view({2, 12}));
  } else if (mode == "registration") {
    TwoStages model(mesh->pp_rank());
    FlexModel fm(model, FlexModelOptions().mesh(mesh));
    fm.register_forward_hook(HookFunction("layers.1"));
  } else if (mode == "parameter_shape") {
    torch::manual_seed(0);
    flexmodel::models::GPT full(flexmodel::models::GPTOptions().vocab_size(64).d_model(32).n_heads(4).n_layers(4));
    flexmodel::parallel::ParallelGPT sharded(*full, mesh);
    FlexModel fm(sharded, FlexModelOptions().mesh(mesh));
    fm.get_module_parameter("layers.3.mlp.fc_in.weight", {1, 2});
  } else if (mode == "sink" || mode == "leak" || mode == "killed") {
    torch::manual_seed(0);
    Armed model;
    FlexModel fm(model, FlexModelOptions().mesh(mesh));
    const auto x = torch::randn({4, 4});
    if (mode == "sink") {
      if (mesh->rank() == 0) fm.add_sink(std::make_shared<FailingSink>());
      fm.register_full_backward_pre_hook(HookFunction("fc"));
      fm.forward(x).sum().backward();
    } else if (mode == "leak") {
      auto group = fm.create_hook_group("throws", "fc", {}, [](const torch::Tensor& g) -> torch::Tensor {
        if (world_rank() == 0) throw std::runtime_error("probe diverged");
        return g;
      }, 0, HookType::full_backward_pre);
      try {
        fm.forward(flexmodel::Groups{"throws"}, x).sum().backward();
      } catch (const flexmodel::HookError& error) {
        std::printf("rank %d caught in backward: %s\n", world_rank(), error.what());
      }
      model->wire->armed = true;
      try {
        fm.forward(flexmodel::Groups{"throws"}.complement(), x);
      } catch (const std::exception& error) {
        // A program that takes this for an error every rank raised goes on.
        std::printf("rank %d caught in forward: %s\n", world_rank(), error.what());
      }
      model->wire->armed = false;
      fm.forward(flexmodel::Groups{"throws"}.complement(), x);
    } else {
      model->wire->armed = true;
      model->wire->kill = true;
      fm.register_forward_hook(HookFunction("fc"));
      fm.forward(x);
    }
  } else if (mode == "other_hooks" || mode == "other_batch") {
    // What a wrapper choosing arguments by rank does: it must never pass.
    torch::NoGradGuard no_grad;
    torch::manual_seed(0);
    flexmodel::models::GPT full(flexmodel::models::GPTOptions().vocab_size(64).d_model(32).n_heads(4).n_layers(4));
    flexmodel::parallel::ParallelGPT sharded(*full, mesh);
    FlexModel fm(sharded, FlexModelOptions().mesh(mesh));
    const bool other = mode == "other_hooks" && world_rank() == 1;
    fm.register_forward_hook(HookFunction(other ? "layers.1.mlp" : "layers.0.mlp"));
    const std::int64_t rows = mode == "other_batch" && world_rank() == 1 ? 6 : 4;
    fm.forward(torch::randint(0, 64, {rows, 8}));
  } else {
    torch::NoGradGuard no_grad;
    torch::manual_seed(0);
    flexmodel::models::GPT full(flexmodel::models::GPTOptions().vocab_size(64).d_model(32).n_heads(4).n_layers(4));
    flexmodel::parallel::ParallelGPT sharded(*full, mesh);
    FlexModel fm(sharded, FlexModelOptions().mesh(mesh));
    fm.register_forward_hook(HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) -> torch::Tensor {
      if (world_rank() == 0) throw std::runtime_error("probe diverged");
      return x;
    }));
    fm.forward(torch::randint(0, 64, {4, 8}));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) return 2;
  const flexmodel::dist::MeshShape shape{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3])};
  torch::set_num_threads(1);
  try {
    run(shape, argc == 5 ? argv[4] : "");
  } catch (const flexmodel::Error& error) {
    std::printf("rank %d ended: %s\n", world_rank(), error.what());
    std::fflush(stdout);
    return 3;
  }
  std::printf("rank %d: no error\n", world_rank());
  return 0;
}
