// The world, the mesh and the MPI communicator. MPI types stay in this file.
#include "flexmodel/dist.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string_view>
#include <utility>

#include <mpi.h>

#include "flexmodel/detail/hash.h"
#include "flexmodel/error.h"
#include "flexmodel/logging.h"

namespace flexmodel::dist {
namespace {

void check_mpi(int code, const char* operation) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  FLEXMODEL_FAIL(DistributedError, operation, " failed: ", std::string(text, static_cast<std::size_t>(length)));
}

struct World {
  int rank = 0;
  int size = 1;
  bool mpi = false;
};

const World& the_world() {
  static const World world = [] {
    World made;
    if (!launched_by_mpi()) return made;
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) {
      int provided = 0;
      check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
      // Finalised at exit so that programs need no MPI calls of their own.
      std::atexit([] {
        int finalised = 0;
        MPI_Finalized(&finalised);
        if (!finalised) MPI_Finalize();
      });
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &made.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &made.size);
    made.mpi = true;
    detail::set_message_rank(made.rank);
    return made;
  }();
  return world;
}

int to_count(std::int64_t bytes, const char* what) {
  FLEXMODEL_CHECK(bytes <= std::numeric_limits<int>::max(), DistributedError, what, " of ", bytes,
                  " bytes exceeds MPI's 2 GiB message limit; split the tensor");
  return static_cast<int>(bytes);
}

// Bytes of one slice along dim 0, from the shape alone (also for zero rows).
std::int64_t row_bytes_of(const torch::Tensor& front) {
  std::int64_t elements = 1;
  for (std::int64_t d = 1; d < front.dim(); ++d) elements *= front.size(d);
  return elements * static_cast<std::int64_t>(front.element_size());
}

// `tensor` with `dim` moved first, contiguous, and the bytes of one slice of it.
std::pair<torch::Tensor, std::int64_t> rows_first(const torch::Tensor& tensor, std::int64_t dim) {
  torch::Tensor front = tensor.movedim(dim, 0).contiguous();
  return {front, row_bytes_of(front)};
}

std::vector<std::int64_t> front_shape(const torch::Tensor& like, std::int64_t dim, std::int64_t rows) {
  auto shape = like.movedim(dim, 0).sizes().vec();
  shape[0] = rows;
  return shape;
}

thread_local std::string message_label;

std::string describe(const torch::Tensor& tensor) { return detail::concat(tensor.scalar_type(), tensor.sizes()); }

// What a rank's next message is, sent ahead of it: the call with its root,
// dtype and shape, then the MessageLabel, as text (cut to fit) and a hash of
// the whole text, which ranks compare.
struct Envelope {
  std::uint64_t hash = 0;
  std::int32_t world_rank = 0;
  char text[244] = {};
};
static_assert(sizeof(Envelope) == 256);

std::uint64_t hash_of(const std::string& call) {
  if (message_label.empty()) return detail::fnv1a(call);
  constexpr std::string_view kFor = " for ";
  const std::uint64_t head = detail::fnv1a(kFor.data(), kFor.size(), detail::fnv1a(call));
  return detail::fnv1a(message_label.data(), message_label.size(), head);
}

Envelope envelope_of(const std::string& call) {
  const std::string text = message_label.empty() ? call : call + " for " + message_label;
  Envelope envelope;
  envelope.hash = hash_of(call);
  envelope.world_rank = detail::message_rank();
  std::memcpy(envelope.text, text.data(), std::min(text.size(), sizeof envelope.text - 1));
  return envelope;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::string name) : comm_(comm), name_(std::move(name)) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (!finalised && comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  torch::Tensor gather(const torch::Tensor& shard, std::int64_t dim, int root) override {
    agree(detail::concat("gather of ", describe(shard), " along dim ", dim, " to rank ", root));
    auto [front, row_bytes] = rows_first(shard.cpu(), dim);
    const int count = to_count(front.size(0) * row_bytes * size_, "gather");
    torch::Tensor full;
    if (rank_ == root) full = result_buffer(front_shape(shard, dim, front.size(0) * size_), front.options());
    check_mpi(MPI_Gather(front.data_ptr(), count / size_, MPI_BYTE, rank_ == root ? full.data_ptr() : nullptr,
                         count / size_, MPI_BYTE, root, comm_),
              "MPI_Gather");
    return rank_ == root ? full.movedim(0, dim).contiguous().to(shard.device()) : torch::Tensor();
  }

  torch::Tensor scatter(const torch::Tensor& full, const torch::Tensor& like, std::int64_t dim, int root) override {
    agree(detail::concat("scatter of ", describe(like), " pieces along dim ", dim, " from rank ", root));
    torch::Tensor piece = torch::empty(like.movedim(dim, 0).sizes(), like.options().device(torch::kCPU));
    const int count = to_count(static_cast<std::int64_t>(piece.nbytes()) * size_, "scatter");
    torch::Tensor front;
    if (rank_ == root) front = full.cpu().movedim(dim, 0).contiguous();
    check_mpi(MPI_Scatter(rank_ == root ? front.data_ptr() : nullptr, count / size_, MPI_BYTE, piece.data_ptr(),
                          count / size_, MPI_BYTE, root, comm_),
              "MPI_Scatter");
    return piece.movedim(0, dim).contiguous().to(like.device());
  }

  torch::Tensor all_gather(const torch::Tensor& shard, std::int64_t dim) override {
    agree(detail::concat("all_gather of ", describe(shard), " along dim ", dim));
    auto [front, row_bytes] = rows_first(shard.cpu(), dim);
    const int count = to_count(front.size(0) * row_bytes * size_, "all_gather");
    torch::Tensor full = result_buffer(front_shape(shard, dim, front.size(0) * size_), front.options());
    check_mpi(MPI_Allgather(front.data_ptr(), count / size_, MPI_BYTE, full.data_ptr(), count / size_, MPI_BYTE, comm_),
              "MPI_Allgather");
    return full.movedim(0, dim).contiguous().to(shard.device());
  }

  torch::Tensor all_reduce_sum(const torch::Tensor& tensor) override {
    agree(detail::concat("all_reduce_sum of ", describe(tensor)));
    // MPI sums float32/float64/int64 natively; half types are summed in float32.
    const auto dtype = tensor.scalar_type();
    torch::Tensor work = tensor.cpu().contiguous();
    if (dtype == torch::kHalf || dtype == torch::kBFloat16) work = work.to(torch::kFloat);
    if (work.data_ptr() == tensor.data_ptr()) work = work.clone();
    MPI_Datatype type = work.scalar_type() == torch::kFloat    ? MPI_FLOAT
                        : work.scalar_type() == torch::kDouble ? MPI_DOUBLE
                        : work.scalar_type() == torch::kLong   ? MPI_INT64_T
                        : work.scalar_type() == torch::kInt    ? MPI_INT32_T
                                                               : MPI_DATATYPE_NULL;
    FLEXMODEL_CHECK(type != MPI_DATATYPE_NULL, DistributedError, "all_reduce_sum does not support ", dtype);
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, work.data_ptr(), to_count(work.numel(), "all_reduce"), type, MPI_SUM, comm_),
              "MPI_Allreduce");
    return work.to(tensor.device(), dtype);
  }

  void broadcast(torch::Tensor& tensor, int root) override {
    agree(detail::concat("broadcast of ", describe(tensor), " from rank ", root));
    torch::Tensor work = tensor.cpu().contiguous();
    check_mpi(MPI_Bcast(work.data_ptr(), to_count(static_cast<std::int64_t>(work.nbytes()), "broadcast"), MPI_BYTE,
                        root, comm_),
              "MPI_Bcast");
    if (!work.is_same(tensor)) tensor = work.to(tensor.device());
  }

  std::vector<std::int64_t> all_gather_ints(std::int64_t value) override {
    agree("all_gather_ints");
    std::vector<std::int64_t> values(static_cast<std::size_t>(size_));
    check_mpi(MPI_Allgather(&value, 1, MPI_INT64_T, values.data(), 1, MPI_INT64_T, comm_), "MPI_Allgather");
    return values;
  }

  std::string broadcast_string(const std::string& text, int root) override {
    agree(detail::concat("broadcast_string from rank ", root));
    std::int64_t length = static_cast<std::int64_t>(text.size());
    check_mpi(MPI_Bcast(&length, 1, MPI_INT64_T, root, comm_), "MPI_Bcast");
    std::string received = rank_ == root ? text : std::string(static_cast<std::size_t>(length), '\0');
    if (length > 0) {
      check_mpi(MPI_Bcast(received.data(), to_count(length, "broadcast_string"), MPI_CHAR, root, comm_), "MPI_Bcast");
    }
    return received;
  }

  void send(const torch::Tensor& tensor, int destination) override {
    const Envelope envelope = envelope_of(point_to_point(tensor, rank_, destination));
    check_mpi(MPI_Send(&envelope, sizeof envelope, MPI_BYTE, destination, 0, comm_), "MPI_Send");
    torch::Tensor work = tensor.cpu().contiguous();
    check_mpi(MPI_Send(work.data_ptr(), to_count(static_cast<std::int64_t>(work.nbytes()), "send"), MPI_BYTE,
                       destination, 0, comm_),
              "MPI_Send");
  }

  void recv(torch::Tensor& tensor, int source) override {
    const Envelope mine = envelope_of(point_to_point(tensor, source, rank_));
    Envelope sent;
    check_mpi(MPI_Recv(&sent, sizeof sent, MPI_BYTE, source, 0, comm_, MPI_STATUS_IGNORE), "MPI_Recv");
    if (sent.hash != mine.hash) disagree(sent, mine);
    torch::Tensor work = tensor.device().is_cpu() && tensor.is_contiguous() ? tensor : torch::empty_like(tensor.cpu());
    check_mpi(MPI_Recv(work.data_ptr(), to_count(static_cast<std::int64_t>(work.nbytes()), "recv"), MPI_BYTE, source,
                       0, comm_, MPI_STATUS_IGNORE),
              "MPI_Recv");
    if (!work.is_same(tensor)) tensor.copy_(work);
  }

  void barrier() override {
    agree("barrier");
    check_mpi(MPI_Barrier(comm_), "MPI_Barrier");
  }

 private:
  static std::string point_to_point(const torch::Tensor& tensor, int source, int destination) {
    return detail::concat("message of ", describe(tensor), " from rank ", source, " to rank ", destination);
  }

  // Every rank learns whether all hashes are equal (min = max, one 16-byte
  // reduction), so all of them see a disagreement at once, before a byte of
  // the message moves; only then are the envelopes gathered, to name them.
  void agree(const std::string& call) {
    const std::uint64_t hash = hash_of(call);
    std::uint64_t bounds[2] = {hash, ~hash};
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, bounds, 2, MPI_UINT64_T, MPI_MIN, comm_), "MPI_Allreduce");
    if (bounds[0] == ~bounds[1]) return;
    const Envelope mine = envelope_of(call);
    std::vector<Envelope> all(static_cast<std::size_t>(size_));
    check_mpi(MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE, comm_), "MPI_Allgather");
    for (const Envelope& other : all) {
      if (other.hash != all.front().hash) disagree(all.front(), other);
    }
  }

  // Bytes of one call read as another's would be wrong or overrun a buffer;
  // whatever each rank goes on to do, the program is off the rails.
  [[noreturn]] void disagree(const Envelope& one, const Envelope& other) const {
    const bool cut = std::strcmp(one.text, other.text) == 0;
    abort_world(detail::concat("flexmodel: ranks disagree on their next message in the ", name_, " group: rank ",
                               one.world_rank, " is at: ", one.text, "; rank ", other.world_rank, " is at: ",
                               other.text, cut ? " (they differ past what is shown)" : "",
                               "; every rank must register the same hooks and run the same shapes"));
  }

  // A gather's result, in a buffer of an earlier result that nothing holds any
  // more when there is one: a fresh buffer of many MiB costs its page faults
  // on every call, which a raw MPI call into a kept buffer does not pay.
  torch::Tensor result_buffer(const std::vector<std::int64_t>& shape, const torch::TensorOptions& options) {
    constexpr std::int64_t kSmallestKeptBytes = std::int64_t{1} << 18;
    constexpr std::size_t kKeptBuffers = 4;
    std::int64_t elements = 1;
    for (std::int64_t size : shape) elements *= size;
    const auto dtype = options.dtype();
    if (elements * static_cast<std::int64_t>(dtype.itemsize()) < kSmallestKeptBytes) return torch::empty(shape, options);
    for (const auto& buffer : kept_buffers_) {
      if (buffer.storage().use_count() == 1 && buffer.numel() == elements && buffer.dtype() == dtype) {
        return buffer.view(shape);
      }
    }
    torch::Tensor fresh = torch::empty(shape, options);
    if (kept_buffers_.size() == kKeptBuffers) kept_buffers_.erase(kept_buffers_.begin());
    kept_buffers_.push_back(fresh);
    return fresh;
  }

  MPI_Comm comm_;
  std::string name_;  // for messages: "tensor-parallel"
  std::vector<torch::Tensor> kept_buffers_;
  int rank_ = 0;
  int size_ = 1;
};

// The world of one process: every collective is the identity.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  torch::Tensor gather(const torch::Tensor& shard, std::int64_t, int) override { return shard; }
  torch::Tensor scatter(const torch::Tensor& full, const torch::Tensor&, std::int64_t, int) override { return full; }
  torch::Tensor all_gather(const torch::Tensor& shard, std::int64_t) override { return shard; }
  torch::Tensor all_reduce_sum(const torch::Tensor& tensor) override { return tensor; }
  void broadcast(torch::Tensor&, int) override {}
  std::vector<std::int64_t> all_gather_ints(std::int64_t value) override { return {value}; }
  std::string broadcast_string(const std::string& text, int) override { return text; }
  void send(const torch::Tensor&, int) override {
    FLEXMODEL_FAIL(DistributedError, "send in a world of one process has no destination");
  }
  void recv(torch::Tensor&, int) override {
    FLEXMODEL_FAIL(DistributedError, "recv in a world of one process has no source");
  }
  void barrier() override {}
};

std::shared_ptr<Communicator> split(MPI_Comm parent, int color, int key, const char* name) {
  MPI_Comm comm = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(parent, color, key, &comm), "MPI_Comm_split");
  return std::make_shared<MpiCommunicator>(comm, name);
}

}  // namespace

MessageLabel::MessageLabel(std::string what) : previous_(std::exchange(message_label, std::move(what))) {}
MessageLabel::~MessageLabel() { message_label = std::move(previous_); }

bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

int world_rank() { return the_world().rank; }
int world_size() { return the_world().size; }

std::shared_ptr<Mesh> Mesh::create(MeshShape shape) {
  FLEXMODEL_CHECK(shape.tp >= 1 && shape.pp >= 1 && shape.dp >= 1, ConfigError, "mesh sizes must be at least 1; got tp ",
                  shape.tp, ", pp ", shape.pp, ", dp ", shape.dp);
  const World& world = the_world();
  FLEXMODEL_CHECK(shape.size() == world.size, DistributedError, "the mesh tp ", shape.tp, " × pp ", shape.pp,
                  " × dp ", shape.dp, " = ", shape.size(), " ranks, but the world has ", world.size,
                  world.mpi ? " (mpirun -np)" : " (not launched by mpirun)",
                  "; launch with mpirun -np ", shape.size(), " or change the sizes");
  std::shared_ptr<Mesh> mesh(new Mesh());
  mesh->shape_ = shape;
  mesh->rank_ = world.rank;
  mesh->tp_rank_ = world.rank % shape.tp;
  mesh->dp_rank_ = (world.rank / shape.tp) % shape.dp;
  mesh->pp_rank_ = world.rank / (shape.tp * shape.dp);
  if (!world.mpi) {
    auto local = std::make_shared<LocalCommunicator>();
    mesh->world_ = mesh->tp_ = mesh->pp_ = mesh->dp_ = local;
    return mesh;
  }
  const auto tp = mesh->tp_rank_, pp = mesh->pp_rank_, dp = mesh->dp_rank_;
  // The mesh's own copy of the world, which returns errors to the library;
  // the program's MPI_COMM_WORLD keeps its error handler. Groups split from
  // the copy inherit that handler.
  MPI_Comm world_copy = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &world_copy);
  MPI_Comm_set_errhandler(world_copy, MPI_ERRORS_RETURN);
  mesh->world_ = std::make_shared<MpiCommunicator>(world_copy, "world");
  mesh->tp_ = split(world_copy, static_cast<int>(pp * shape.dp + dp), static_cast<int>(tp), "tensor-parallel");
  mesh->dp_ = split(world_copy, static_cast<int>(pp * shape.tp + tp), static_cast<int>(dp), "data-parallel");
  mesh->pp_ = split(world_copy, static_cast<int>(dp * shape.tp + tp), static_cast<int>(pp), "pipeline");
  return mesh;
}

void abort_world(const std::string& message) {
  logger()->critical("rank {}: {}; ending every rank", the_world().rank, message);
  logger()->flush();
  if (the_world().mpi) MPI_Abort(MPI_COMM_WORLD, 1);
  std::abort();  // MPI_Abort does not return; a world without MPI is one process
}

}  // namespace flexmodel::dist
