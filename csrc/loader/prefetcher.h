// prefetcher.h: native threads that gather shuffled batches ahead of the consumer into a pool of
// reusable buffers (the tf.data `prefetch` pattern without Python in the loop).
//
// The consumer pushes epochs (an index order each) and takes batches strictly in order. Workers each
// gather whole batches, so the result never depends on the thread count or on timing. A taken batch
// is exported as zero-copy DLPack views, one per source; its buffer goes back to the pool only when
// every view has been released (for torch: when the last tensor sharing its storage is freed), so a
// batch the user still holds is never overwritten. The buffers are a BufferPool's (buffer_pool.h):
// owned memory grown on demand and trimmed back, or fixed external buffers (pinned host memory).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "loader/buffer_pool.h"
#include "loader/dlpack.h"
#include "loader/gather.h"

#ifdef __linux__
#include <pthread.h>
#endif

namespace tp::loader {

// Names the calling thread where the OS keeps names (Linux: top, gdb, /proc/<pid>/task/*/comm), so
// tools and tests can tell the gather threads apart; a no-op elsewhere.
inline void name_this_thread(const char* name) {
#ifdef __linux__
  pthread_setname_np(pthread_self(), name);
#else
  (void)name;
#endif
}

struct Source {
  const uint8_t* base;  // row-major, contiguous: row r starts at base + r * row_bytes
  int64_t row_bytes;
  DLDataType dtype;               // element type of the exported views
  std::vector<int64_t> trailing;  // shape of one row (product * element size == row_bytes)
  std::string name;               // for error messages
  std::shared_ptr<const FileCheck> file;  // set for a memory-mapped file: its size is checked per chunk
};

struct PrefetcherConfig {
  std::vector<Source> sources;  // all with num_rows rows
  int64_t num_rows = 0;
  int64_t batch_size = 1;       // rows per batch (the last one of an epoch may have fewer; a batch
                                // never has more than num_rows, and neither has a buffer)
  int prefetch = 2;             // batches gathered or being gathered, not yet taken by the consumer
  int num_threads = 1;
  // external[slot][source]: caller-owned buffers of min(batch_size, num_rows) * row_bytes bytes
  // each. Empty: the pool allocates (and frees) its own memory.
  std::vector<std::vector<uint8_t*>> external;
};

struct TakenBatch {
  int64_t seq;   // position in the sequence of all pushed batches, from 0
  int64_t rows;  // rows in this batch
  int slot;
};

struct PrefetchState;  // shared with the exported views, which may outlive the Prefetcher

class Prefetcher {
 public:
  explicit Prefetcher(PrefetcherConfig cfg);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Appends the batches of one epoch: `order` lists the rows to visit (at most num_rows of them),
  // split into batches of batch_size (the remainder is a last, short batch unless drop_last);
  // batches before first_batch are skipped. Returns how many batches were appended.
  int64_t push_epoch(std::vector<int64_t> order, bool drop_last, int64_t first_batch);

  // Waits up to timeout_s for the next batch in order (also while it is not pushed yet). False on
  // timeout. Throws std::runtime_error with the worker's message if gathering that batch failed,
  // and on every call after that.
  bool next(double timeout_s, TakenBatch* out);

  // A DLPack view ([rows, *trailing], the source's dtype) of one source's part of a taken batch. Every
  // taken batch must have exactly one view per source exported; each view's deleter releases it.
  DLManagedTensor* export_view(const TakenBatch& b, int source);

  void close();  // stops and joins the threads; idempotent; held views stay valid
  bool closed() const;
  int num_slots() const;  // buffers currently allocated (owned pool) or in use (external pool)
  size_t slot_bytes() const;  // bytes of one buffer (all sources' parts of one batch)
  int num_threads() const { return static_cast<int>(threads_.size()); }
  int num_sources() const;
  int64_t pushed() const;  // batches pushed so far

 private:
  void worker();

  std::shared_ptr<PrefetchState> st_;
  std::vector<std::thread> threads_;
};

}  // namespace tp::loader
