// mpirun -np N test_failure TP PP DP: an editing function throws on rank 0;
// every rank must end, with that message, instead of waiting forever.
// mpirun -np N test_failure TP 1 1 undeclared: a hook on a tensor that differs
// across tensor-parallel ranks, from a module that declares no sharding: every
// rank ends with an error naming the hook instead of capturing rank 0's shard.
#include <cstdio>
#include <cstdlib>

#include "flexmodel/flexmodel.h"
#include "flexmodel/parallel.h"

// Returns this rank's shard of 3x and declares nothing about it.
struct UndeclaredShardImpl : torch::nn::Module, flexmodel::dist::TensorParallelModule {
  explicit UndeclaredShardImpl(std::shared_ptr<flexmodel::dist::Mesh> mesh) : mesh(std::move(mesh)) {}
  torch::Tensor forward(const torch::Tensor& x) { return (x * 3).chunk(mesh->shape().tp, 1)[mesh->tp_rank()]; }
  std::shared_ptr<flexmodel::dist::Mesh> mesh;
};
FLEX_MODULE(UndeclaredShard);

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) return 2;
  const flexmodel::dist::MeshShape shape{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3])};
  torch::set_num_threads(1);
  torch::NoGradGuard no_grad;
  if (argc == 5) {
    UndeclaredShard module(flexmodel::dist::Mesh::create(shape));
    flexmodel::FlexModel fm(module, flexmodel::FlexModelOptions().tp(shape.tp));
    fm.register_forward_hook(flexmodel::HookFunction("(root)"));
    fm.forward(torch::arange(24, torch::kFloat).view({2, 12}));
    std::printf("rank %d: no error\n", flexmodel::dist::world_rank());
    return 0;
  }
  torch::manual_seed(0);
  flexmodel::models::GPT full(flexmodel::models::GPTOptions().vocab_size(64).d_model(32).n_heads(4).n_layers(4));
  flexmodel::parallel::ParallelGPT sharded(*full, flexmodel::dist::Mesh::create(shape));
  flexmodel::FlexModel fm(sharded, flexmodel::FlexModelOptions().tp(shape.tp).pp(shape.pp).dp(shape.dp));
  fm.register_forward_hook(flexmodel::HookFunction("layers.0.mlp", {}, [](const torch::Tensor& x) -> torch::Tensor {
    if (flexmodel::dist::world_rank() == 0) throw std::runtime_error("probe diverged");
    return x;
  }));
  try {
    fm.forward(torch::randint(0, 64, {4, 8}));
  } catch (const flexmodel::HookError& error) {
    std::printf("rank %d ended: %s\n", flexmodel::dist::world_rank(), error.what());
    std::fflush(stdout);
    return 3;
  }
  std::printf("rank %d: no error\n", flexmodel::dist::world_rank());
  return 0;
}
