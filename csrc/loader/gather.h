// gather.h: copy rows of a row-major array, picked by an index list, into one contiguous buffer.
// This is the CPU-bound part of assembling a shuffled batch; the prefetcher runs it on its threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace tp::loader {

// A source that lives in a memory-mapped file. A file that shrinks under its mapping turns reads of
// the lost pages into SIGBUS, which no exception can catch, so the gather checks the file's size
// before each chunk of rows it reads (one fstat per chunk: a thread's share of a batch, at least
// ~32 KiB or the whole batch): a file truncated while the loader runs fails the next batch with an
// error. Only a truncation landing during the copy of one chunk still faults.
struct FileCheck {
  FileCheck(int fd, int64_t end) : fd(fd), end(end) {}
  ~FileCheck();
  FileCheck(const FileCheck&) = delete;
  FileCheck& operator=(const FileCheck&) = delete;
  const int fd;       // owned
  const int64_t end;  // file position just past the source's last byte
};

// A check on a duplicate of `fd` (the caller keeps its own), or null where files are not checked
// (fd < 0, or a platform without fstat). Throws std::runtime_error if the duplicate fails.
std::shared_ptr<const FileCheck> make_file_check(int fd, int64_t end);

// Throws std::runtime_error naming `source` when its file is now shorter than `check.end`.
void check_file(const FileCheck& check, const std::string& source);

// dst[i] = base[idx[i]] for i < rows, each row `row_bytes` long. Throws std::out_of_range naming
// the first index outside [0, num_rows). Reads and writes only plain memory (no Python, no GIL).
void gather_rows(const uint8_t* base, int64_t row_bytes, int64_t num_rows, const int64_t* idx, int64_t rows,
                 uint8_t* dst);

}  // namespace tp::loader
