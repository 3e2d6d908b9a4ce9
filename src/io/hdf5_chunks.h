// The chunk-shape rule of the HDF5 sink's activation datasets: how many rows, and how
// much of each row, one chunk holds; plain arithmetic, to be read and tested on its own.
#pragma once

#include <cstddef>
#include <vector>

#include <hdf5.h>

namespace flexmodel::io::detail {

// ---- chunk shape ---------------------------------------------------------

// One step's rows per chunk, split into even pieces above max_bytes; a row
// larger than max_bytes is first cut along its outer dims. Unfiltered chunks
// are also merged across steps below min_bytes: a step's last, partial chunk
// is rewritten in place until full. A filtered chunk is never merged, since a
// rewritten one takes new space and the old is never reused (see the top of hdf5_format.h):
// it holds a divisor of the step's rows, so a steady run writes each once.
std::vector<hsize_t> chunk_shape(hsize_t step_rows, const std::vector<hsize_t>& trailing, std::size_t element,
                                 std::size_t min_bytes, std::size_t max_bytes, bool filtered);

}  // namespace flexmodel::io::detail
