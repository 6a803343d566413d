// gather.h: copy rows of a row-major array, picked by an index list, into one contiguous buffer.
// This is the CPU-bound part of assembling a shuffled batch; the prefetcher runs it on its threads.
#pragma once

#include <cstdint>

namespace tp::loader {

// dst[i] = base[idx[i]] for i < rows, each row `row_bytes` long. Throws std::out_of_range naming
// the first index outside [0, num_rows). Reads and writes only plain memory (no Python, no GIL).
void gather_rows(const uint8_t* base, int64_t row_bytes, int64_t num_rows, const int64_t* idx, int64_t rows,
                 uint8_t* dst);

}  // namespace tp::loader
