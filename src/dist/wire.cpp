#include "dist/wire.h"

#include "dist/routing.h"

namespace flexmodel::detail {
namespace {

constexpr std::int64_t kFixedHeader = 5;  // name length, type, step, dtype, dims

void send_long(dist::Communicator& group, std::int64_t value, int destination) {
  group.send(torch::tensor(value), destination);
}

std::int64_t receive_long(dist::Communicator& group, int source) {
  torch::Tensor value = torch::empty({}, torch::kLong);
  group.recv(value, source);
  return value.item<std::int64_t>();
}

}  // namespace

void send_captures(dist::Communicator& group, const std::vector<WireCapture>& captures, int destination) {
  send_long(group, static_cast<std::int64_t>(captures.size()), destination);
  for (const auto& capture : captures) {
    const torch::Tensor tensor = capture.tensor.contiguous();
    std::vector<std::int64_t> header{static_cast<std::int64_t>(capture.name.size()),
                                     static_cast<std::int64_t>(capture.type), capture.step,
                                     static_cast<std::int64_t>(tensor.scalar_type()), tensor.dim()};
    for (auto size : tensor.sizes()) header.push_back(size);
    send_long(group, static_cast<std::int64_t>(header.size()), destination);
    group.send(torch::tensor(header), destination);
    std::string name = capture.name;
    group.send(torch::from_blob(name.data(), {static_cast<std::int64_t>(name.size())}, torch::kUInt8), destination);
    group.send(tensor, destination);
  }
}

std::vector<WireCapture> receive_captures(dist::Communicator& group, int source) {
  std::vector<WireCapture> captures(static_cast<std::size_t>(receive_long(group, source)));
  for (auto& capture : captures) {
    torch::Tensor header = torch::empty({receive_long(group, source)}, torch::kLong);
    group.recv(header, source);
    const auto* fields = header.data_ptr<std::int64_t>();
    capture.name.assign(static_cast<std::size_t>(fields[0]), '\0');
    torch::Tensor name_bytes = torch::from_blob(capture.name.data(), {fields[0]}, torch::kUInt8);
    group.recv(name_bytes, source);
    capture.type = static_cast<HookType>(fields[1]);
    capture.step = fields[2];
    capture.tensor = torch::empty(c10::IntArrayRef(fields + kFixedHeader, static_cast<std::size_t>(fields[4])),
                                  torch::TensorOptions().dtype(static_cast<c10::ScalarType>(fields[3])));
    group.recv(capture.tensor, source);
  }
  return captures;
}

std::vector<WireCapture> collect_at_rank0(const dist::Mesh& mesh, std::vector<WireCapture> captures) {
  const dist::MessageLabel label("the captures of a pipeline stage");
  if (mesh.pp_rank() > 0) {
    send_captures(mesh.world(), captures, 0);
    return {};
  }
  for (std::int64_t stage = 1; stage < mesh.shape().pp; ++stage) {
    // A stage's leader is its first rank: tp 0, dp 0.
    const int source = static_cast<int>(stage * mesh.shape().tp * mesh.shape().dp);
    for (auto& capture : receive_captures(mesh.world(), source)) captures.push_back(std::move(capture));
  }
  return captures;
}

void share_from_rank0(const dist::Mesh& mesh, std::vector<WireCapture>& captures) {
  const dist::MessageLabel label("what rank 0 shares with every rank");
  dist::Communicator& world = mesh.world();
  if (world.rank() != 0) {
    captures = receive_captures(world, 0);
    return;
  }
  for (int rank = 1; rank < world.size(); ++rank) send_captures(world, captures, rank);
}

std::vector<WireCapture> captures_decided_on_rank0(const dist::Mesh* mesh,
                                                   const std::function<std::vector<WireCapture>()>& decide) {
  if (mesh == nullptr || !mesh->distributed()) return decide();
  std::vector<WireCapture> decided;
  std::exception_ptr failure;
  if (mesh->rank() == 0) {
    try {
      decided = decide();
      for (auto& capture : decided) capture.tensor = capture.tensor.detach().cpu();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  agree_on_failure(mesh->world(), failure);
  share_from_rank0(*mesh, decided);
  return decided;
}

std::vector<torch::Tensor> decided_on_rank0(const dist::Mesh* mesh,
                                            const std::function<std::vector<torch::Tensor>()>& decide) {
  auto decided = captures_decided_on_rank0(mesh, [&] {
    std::vector<WireCapture> captures;
    for (auto& tensor : decide()) captures.push_back(WireCapture{"", HookType::forward, 0, std::move(tensor)});
    return captures;
  });
  std::vector<torch::Tensor> tensors;
  for (auto& capture : decided) tensors.push_back(std::move(capture.tensor));
  return tensors;
}

}  // namespace flexmodel::detail
