// gather.cpp: the row gather behind every batch (see gather.h). Rows of a memory map are scattered
// over the file, so the loop is bound by memory (or page-cache) latency: it prefetches rows a few
// iterations ahead and copies small fixed-size rows (labels, ids) without a memcpy call.
#include "loader/gather.h"

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#ifndef _WIN32
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace tp::loader {
namespace {

// Rows this many iterations ahead are prefetched: enough to cover a cache miss at ~1 KB per row.
constexpr int64_t kPrefetchDistance = 8;

void check_index(int64_t j, int64_t num_rows) {
  if (j < 0 || j >= num_rows)
    throw std::out_of_range("row index " + std::to_string(j) + " is out of range for a source of " +
                            std::to_string(num_rows) + " rows");
}

// Fixed row size known at compile time: the copy becomes a few register moves.
template <int64_t B>
void gather_fixed(const uint8_t* base, int64_t num_rows, const int64_t* idx, int64_t rows, uint8_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t j = idx[i];
    check_index(j, num_rows);
    std::memcpy(dst + i * B, base + j * B, B);
  }
}

void gather_any(const uint8_t* base, int64_t row_bytes, int64_t num_rows, const int64_t* idx, int64_t rows,
                uint8_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    // Touch the row needed kPrefetchDistance iterations from now (only if valid: it is an address).
    if (i + kPrefetchDistance < rows) {
      const int64_t ahead = idx[i + kPrefetchDistance];
      if (ahead >= 0 && ahead < num_rows) {
        const uint8_t* p = base + ahead * row_bytes;
        __builtin_prefetch(p);
        if (row_bytes > 64) __builtin_prefetch(p + 64);
      }
    }
    const int64_t j = idx[i];
    check_index(j, num_rows);
    std::memcpy(dst + i * row_bytes, base + j * row_bytes, static_cast<size_t>(row_bytes));
  }
}

}  // namespace

FileCheck::~FileCheck() {
#ifndef _WIN32
  ::close(fd);
#endif
}

std::shared_ptr<const FileCheck> make_file_check(int fd, int64_t end) {
#ifdef _WIN32
  (void)fd;
  (void)end;
  return nullptr;  // a mapped file cannot be truncated on Windows
#else
  if (fd < 0) return nullptr;
  const int own = ::dup(fd);
  if (own < 0)
    throw std::runtime_error(std::string("could not duplicate a source file descriptor: ") + std::strerror(errno));
  return std::make_shared<const FileCheck>(own, end);
#endif
}

void check_file(const FileCheck& check, const std::string& source) {
#ifndef _WIN32
  struct stat st {};
  if (::fstat(check.fd, &st) != 0)
    throw std::runtime_error("source " + source + ": cannot stat its file: " + std::strerror(errno));
  if (static_cast<int64_t>(st.st_size) < check.end)
    throw std::runtime_error("source " + source + ": its file is now " + std::to_string(st.st_size) +
                             " bytes but the rows end at byte " + std::to_string(check.end) +
                             " (was it truncated while the loader ran?)");
#else
  (void)check;
  (void)source;
#endif
}

void gather_rows(const uint8_t* base, int64_t row_bytes, int64_t num_rows, const int64_t* idx, int64_t rows,
                 uint8_t* dst) {
  switch (row_bytes) {
    case 0:  // rows of a zero-size trailing shape: only the indices need checking
      for (int64_t i = 0; i < rows; ++i) check_index(idx[i], num_rows);
      return;
    case 1: return gather_fixed<1>(base, num_rows, idx, rows, dst);
    case 2: return gather_fixed<2>(base, num_rows, idx, rows, dst);
    case 4: return gather_fixed<4>(base, num_rows, idx, rows, dst);
    case 8: return gather_fixed<8>(base, num_rows, idx, rows, dst);
    case 16: return gather_fixed<16>(base, num_rows, idx, rows, dst);
    default: return gather_any(base, row_bytes, num_rows, idx, rows, dst);
  }
}

}  // namespace tp::loader
