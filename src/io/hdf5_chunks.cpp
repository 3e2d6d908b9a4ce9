// The chunk-shape rule of the HDF5 sink's activation datasets (io/hdf5_chunks.h explains it).
#include "io/hdf5_chunks.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#include <hdf5.h>

namespace flexmodel::io::detail {

std::vector<hsize_t> chunk_shape(hsize_t step_rows, const std::vector<hsize_t>& trailing, std::size_t element,
                                 std::size_t min_bytes, std::size_t max_bytes, bool filtered) {
  std::vector<hsize_t> chunk{1};
  chunk.insert(chunk.end(), trailing.begin(), trailing.end());
  hsize_t row_bytes = element;
  for (hsize_t size : trailing) row_bytes *= size;
  for (std::size_t d = 1; d < chunk.size() && row_bytes > max_bytes; ++d) {
    const hsize_t inner = row_bytes / chunk[d];
    chunk[d] = std::max<hsize_t>(1, max_bytes / inner);
    row_bytes = inner * chunk[d];
  }
  const hsize_t rows = std::max<hsize_t>(1, step_rows);
  const hsize_t step_bytes = rows * row_bytes;
  if (step_bytes > max_bytes) {
    const hsize_t pieces = (step_bytes + max_bytes - 1) / max_bytes;
    chunk[0] = std::max<hsize_t>(1, std::min((rows + pieces - 1) / pieces, max_bytes / row_bytes));
    if (filtered) {
      while (rows % chunk[0] != 0) --chunk[0];
    }
  } else if (step_bytes < min_bytes && !filtered) {
    const hsize_t steps = std::min((min_bytes + step_bytes - 1) / step_bytes, max_bytes / step_bytes);
    chunk[0] = rows * std::max<hsize_t>(1, steps);
  } else {
    chunk[0] = rows;
  }
  return chunk;
}

}  // namespace flexmodel::io::detail
