// prefetcher.cpp: worker threads, the ordered hand-off and the buffer pool (see prefetcher.h).
// One mutex guards all shared state; workers hold it only to claim work and to publish results,
// never while copying, and nothing here touches Python, so the GIL is never needed.
#include "loader/prefetcher.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>
#include <stdexcept>

#include "loader/gather.h"

namespace tp::loader {

namespace {
constexpr size_t kAlign = 64;  // cache line: every source's part of a slot starts aligned

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

struct Slot {
  uint8_t* memory = nullptr;       // owned allocation (null for external or trimmed slots)
  std::vector<uint8_t*> parts;     // per source; empty while the slot has no memory
  enum State { Free, Busy } state = Free;  // Busy: being filled, ready, or held by the consumer
  int views = 0;                   // exported views not yet released
};

struct Epoch {
  std::shared_ptr<const std::vector<int64_t>> order;
  int64_t first_batch;  // batch index (within the epoch) of the epoch's first pushed batch
  int64_t first_seq;    // its sequence number
  int64_t count;        // batches pushed
};

struct Done {
  int slot;
  int64_t rows;
  std::string error;
};

// A batch being gathered, split into chunks of rows that any worker may take.
struct InFlight {
  int slot = -1;
  int64_t rows = 0;
  const int64_t* idx = nullptr;
  std::shared_ptr<const std::vector<int64_t>> order;  // keeps idx alive
  std::vector<uint8_t*> dst;  // per source; copied from the slot under the lock
  int64_t chunks = 0, claimed = 0, finished = 0;
  std::string error;  // the first chunk's failure
};

struct PoolState {
  PrefetcherConfig cfg;
  std::vector<size_t> offsets;  // per source, within an owned slot
  size_t slot_bytes = 0;
  bool owned = true;
  int keep = 0;  // owned pool: buffers kept allocated; a released one beyond that is freed

  mutable std::mutex mu;
  std::condition_variable work_cv;   // workers: work, a free slot, or stop
  std::condition_variable ready_cv;  // consumer: the next batch is done
  bool stop = false;
  std::vector<Slot> slots;
  std::deque<Epoch> epochs;
  int64_t pushed = 0;   // batches in all pushed epochs
  int64_t claimed = 0;  // next sequence number a worker will start
  // Refill hysteresis: once `prefetch` batches are in flight, no new batch starts until the
  // consumer has taken them down to half of that, so each wake-up of a sleeping worker (a
  // scheduling delay on a busy machine) is paid once per prefetch/2 batches, not once per batch.
  bool refill = true;
  int64_t low_water = 0;
  int64_t chunk_rows = 1;  // rows per unit of work
  std::map<int64_t, InFlight> active;  // started batches with chunks not all finished
  int64_t taken = 0;    // next sequence number the consumer takes
  std::map<int64_t, Done> done;
  std::string error;    // set once a failed batch was taken: the prefetcher is broken

  ~PoolState() {
    for (Slot& s : slots) std::free(s.memory);
  }

  int free_slot_locked() const {
    for (size_t i = 0; i < slots.size(); ++i)
      if (slots[i].state == Slot::Free && !slots[i].parts.empty()) return static_cast<int>(i);
    return -1;
  }

  bool can_start_locked() const {
    if (!refill || claimed >= pushed || claimed - taken >= cfg.prefetch || !error.empty()) return false;
    return owned || free_slot_locked() >= 0;
  }

  // The earliest started batch with a chunk left, or -1.
  int64_t unclaimed_locked() const {
    for (const auto& [seq, b] : active)
      if (b.claimed < b.chunks) return seq;
    return -1;
  }

  bool has_work_locked() const { return unclaimed_locked() >= 0 || can_start_locked(); }

  // A free slot with memory, allocating one in an owned pool. Throws std::bad_alloc.
  int acquire_slot_locked() {
    int i = free_slot_locked();
    if (i < 0) {
      for (size_t k = 0; k < slots.size() && i < 0; ++k)
        if (slots[k].parts.empty()) i = static_cast<int>(k);
      if (i < 0) {
        slots.emplace_back();
        i = static_cast<int>(slots.size()) - 1;
      }
      Slot& s = slots[i];
      s.memory = static_cast<uint8_t*>(std::aligned_alloc(kAlign, std::max(slot_bytes, kAlign)));
      if (s.memory == nullptr) throw std::bad_alloc();
      for (size_t off : offsets) s.parts.push_back(s.memory + off);
    }
    slots[i].state = Slot::Busy;
    return i;
  }

  void release_view(int slot) {
    {
      std::lock_guard<std::mutex> lk(mu);
      Slot& s = slots[slot];
      if (--s.views > 0) return;
      s.state = Slot::Free;
      if (owned) {
        int allocated = 0;
        for (const Slot& o : slots)
          if (!o.parts.empty()) ++allocated;
        if (allocated > keep) {  // the user had held many batches: give the memory back
          std::free(s.memory);
          s.memory = nullptr;
          s.parts.clear();
        }
      }
    }
    work_cv.notify_all();
  }
};

namespace {

// What a DLPack view owns: the pool state (kept alive) and its own shape.
struct ViewCtx {
  std::shared_ptr<PoolState> st;
  int slot;
  std::vector<int64_t> shape;
};

void view_deleter(DLManagedTensor* t) {
  auto* ctx = static_cast<ViewCtx*>(t->manager_ctx);
  ctx->st->release_view(ctx->slot);
  delete ctx;
  delete t;
}

}  // namespace

Prefetcher::Prefetcher(PrefetcherConfig cfg) : st_(std::make_shared<PoolState>()) {
  if (cfg.sources.empty()) throw std::invalid_argument("the prefetcher needs at least one source");
  if (cfg.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  if (cfg.prefetch < 1) throw std::invalid_argument("prefetch must be >= 1");
  if (cfg.num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (cfg.num_rows < 0) throw std::invalid_argument("num_rows must be >= 0");
  for (const Source& s : cfg.sources) {
    if (s.row_bytes < 0) throw std::invalid_argument("row_bytes must be >= 0");
    int64_t elems = 1;
    for (int64_t d : s.trailing) {
      if (d < 0) throw std::invalid_argument("trailing dimensions must be >= 0");
      elems *= d;
    }
    if (s.dtype.bits % 8 != 0 || s.dtype.lanes != 1 || elems * (s.dtype.bits / 8) != s.row_bytes)
      throw std::invalid_argument("a source's dtype and trailing shape do not add up to its row_bytes");
    if (s.base == nullptr && s.row_bytes > 0 && cfg.num_rows > 0)
      throw std::invalid_argument("a source has a null address");
  }
  PoolState& st = *st_;
  st.owned = cfg.external.empty();
  size_t off = 0;
  for (const Source& s : cfg.sources) {
    st.offsets.push_back(off);
    off += round_up(static_cast<size_t>(s.row_bytes) * static_cast<size_t>(cfg.batch_size));
  }
  st.slot_bytes = off;
  // The consumer holds the batch it works on and, while asking for the next, the previous one.
  st.keep = cfg.prefetch + 2;
  st.low_water = cfg.prefetch / 2;
  // Each batch is split over the threads, in chunks of at least ~32 KiB so that claiming a
  // chunk (one lock) stays negligible next to copying it.
  int64_t bytes_per_row = 0;
  for (const Source& s : cfg.sources) bytes_per_row += s.row_bytes;
  const int64_t min_rows = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, bytes_per_row));
  const int64_t per_thread = (cfg.batch_size + cfg.num_threads - 1) / cfg.num_threads;
  st.chunk_rows = std::max(min_rows, per_thread);
  if (!st.owned) {
    for (const auto& bufs : cfg.external) {
      if (bufs.size() != cfg.sources.size())
        throw std::invalid_argument("every external slot needs one buffer per source");
      Slot s;
      s.parts = bufs;
      st.slots.push_back(std::move(s));
    }
  }
  st.cfg = std::move(cfg);
  const int n = st.cfg.num_threads;
  threads_.reserve(n);
  try {
    for (int i = 0; i < n; ++i) threads_.emplace_back(&Prefetcher::worker, this);
  } catch (...) {
    close();
    throw;
  }
}

Prefetcher::~Prefetcher() { close(); }

void Prefetcher::close() {
  {
    std::lock_guard<std::mutex> lk(st_->mu);
    st_->stop = true;
  }
  st_->work_cv.notify_all();
  st_->ready_cv.notify_all();
  for (std::thread& t : threads_)
    if (t.joinable()) t.join();
}

bool Prefetcher::closed() const {
  std::lock_guard<std::mutex> lk(st_->mu);
  return st_->stop;
}

int Prefetcher::num_slots() const {
  std::lock_guard<std::mutex> lk(st_->mu);
  int n = 0;
  for (const Slot& s : st_->slots)
    if (st_->owned ? !s.parts.empty() : s.state == Slot::Busy) ++n;
  return n;
}

int Prefetcher::num_sources() const { return static_cast<int>(st_->cfg.sources.size()); }

int64_t Prefetcher::pushed() const {
  std::lock_guard<std::mutex> lk(st_->mu);
  return st_->pushed;
}

int64_t Prefetcher::push_epoch(std::vector<int64_t> order, bool drop_last, int64_t first_batch) {
  PoolState& st = *st_;
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t bs = st.cfg.batch_size;
  const int64_t batches = drop_last ? n / bs : (n + bs - 1) / bs;
  if (first_batch < 0 || first_batch > batches)
    throw std::invalid_argument("first_batch " + std::to_string(first_batch) + " is outside [0, " +
                                std::to_string(batches) + "]");
  auto shared = std::make_shared<const std::vector<int64_t>>(std::move(order));
  {
    std::lock_guard<std::mutex> lk(st.mu);
    if (st.stop) throw std::runtime_error("the prefetcher is closed");
    st.epochs.push_back(Epoch{shared, first_batch, st.pushed, batches - first_batch});
    st.pushed += batches - first_batch;
  }
  st.work_cv.notify_all();
  return batches - first_batch;
}

bool Prefetcher::next(double timeout_s, TakenBatch* out) {
  PoolState& st = *st_;
  std::unique_lock<std::mutex> lk(st.mu);
  if (!st.error.empty()) throw std::runtime_error(st.error);
  if (st.stop) throw std::runtime_error("the prefetcher is closed");
  // Clamped to a day: an infinite timeout would overflow the clock arithmetic.
  const double wait_s = std::min(std::max(0.0, timeout_s), 86400.0);
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(wait_s));
  const bool ready = st.ready_cv.wait_until(lk, deadline, [&] { return st.stop || st.done.count(st.taken) > 0; });
  if (st.stop) throw std::runtime_error("the prefetcher is closed");
  if (!ready) return false;
  auto it = st.done.find(st.taken);
  Done d = std::move(it->second);
  st.done.erase(it);
  if (!d.error.empty()) {
    st.error = "gathering batch " + std::to_string(st.taken) + " failed: " + d.error;
    if (d.slot >= 0) st.slots[d.slot].state = Slot::Free;
    const std::string message = st.error;
    lk.unlock();
    st.work_cv.notify_all();
    throw std::runtime_error(message);
  }
  out->seq = st.taken++;
  out->rows = d.rows;
  out->slot = d.slot;
  if (st.claimed - st.taken <= st.low_water) st.refill = true;
  st.slots[d.slot].views = static_cast<int>(st.cfg.sources.size());
  // Epochs whose batches have all been taken are no longer needed by any worker.
  while (!st.epochs.empty() && st.epochs.front().first_seq + st.epochs.front().count <= st.taken)
    st.epochs.pop_front();
  const bool wake = st.refill;
  lk.unlock();
  if (wake) st.work_cv.notify_all();  // below low water: workers may start batches again
  return true;
}

DLManagedTensor* Prefetcher::export_view(const TakenBatch& b, int source) {
  PoolState& st = *st_;
  if (source < 0 || source >= static_cast<int>(st.cfg.sources.size()))
    throw std::out_of_range("source index out of range");
  uint8_t* data;
  {
    std::lock_guard<std::mutex> lk(st.mu);
    data = st.slots.at(b.slot).parts[source];
  }
  const Source& src = st.cfg.sources[source];
  auto* ctx = new ViewCtx{st_, b.slot, {b.rows}};
  ctx->shape.insert(ctx->shape.end(), src.trailing.begin(), src.trailing.end());
  auto* t = new DLManagedTensor{};
  t->dl_tensor.data = data;
  t->dl_tensor.device = DLDevice{kDLCPU, 0};
  t->dl_tensor.ndim = static_cast<int32_t>(ctx->shape.size());
  t->dl_tensor.dtype = src.dtype;
  t->dl_tensor.shape = ctx->shape.data();
  t->dl_tensor.strides = nullptr;
  t->dl_tensor.byte_offset = 0;
  t->manager_ctx = ctx;
  t->deleter = view_deleter;
  return t;
}

void Prefetcher::worker() {
  PoolState& st = *st_;
  for (;;) {
    int64_t seq = -1, begin = 0, end = 0;
    const int64_t* idx = nullptr;
    std::vector<uint8_t*> dst;
    std::string error;
    {
      std::unique_lock<std::mutex> lk(st.mu);
      st.work_cv.wait(lk, [&] { return st.stop || st.has_work_locked(); });
      if (st.stop) return;
      seq = st.unclaimed_locked();
      if (seq < 0) {  // start the next batch: locate its rows, take a buffer
        seq = st.claimed++;
        if (st.claimed - st.taken >= st.cfg.prefetch) st.refill = false;  // full: sleep until low water
        InFlight fresh;
        for (const Epoch& e : st.epochs) {
          if (seq < e.first_seq + e.count) {
            const int64_t start = (e.first_batch + (seq - e.first_seq)) * st.cfg.batch_size;
            fresh.rows = std::min<int64_t>(st.cfg.batch_size, static_cast<int64_t>(e.order->size()) - start);
            fresh.idx = e.order->data() + start;
            fresh.order = e.order;
            break;
          }
        }
        fresh.chunks = std::max<int64_t>(1, (fresh.rows + st.chunk_rows - 1) / st.chunk_rows);
        try {
          fresh.slot = st.acquire_slot_locked();
        } catch (const std::bad_alloc&) {  // nothing to gather: the batch fails as a whole
          st.done[seq] = Done{-1, fresh.rows,
                              "out of memory allocating a batch buffer of " + std::to_string(st.slot_bytes) + " bytes"};
          lk.unlock();
          st.ready_cv.notify_all();
          continue;
        }
        fresh.dst = st.slots[fresh.slot].parts;
        st.active.emplace(seq, std::move(fresh));
        if (st.active.at(seq).chunks > 1) st.work_cv.notify_all();  // its other chunks are up for grabs
      }
      InFlight* b = &st.active.at(seq);
      const int64_t c = b->claimed++;
      begin = c * st.chunk_rows;
      end = std::min(b->rows, begin + st.chunk_rows);
      idx = b->idx;
      dst = b->dst;
    }
    try {
      for (size_t s = 0; s < st.cfg.sources.size(); ++s) {
        const Source& src = st.cfg.sources[s];
        gather_rows(src.base, src.row_bytes, st.cfg.num_rows, idx + begin, end - begin,
                    dst[s] + begin * src.row_bytes);
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
    bool complete = false;
    {
      std::lock_guard<std::mutex> lk(st.mu);
      InFlight& b = st.active.at(seq);
      if (!error.empty() && b.error.empty()) b.error = std::move(error);
      if (++b.finished == b.chunks) {
        st.done[seq] = Done{b.slot, b.rows, std::move(b.error)};
        st.active.erase(seq);
        complete = true;
      }
    }
    if (complete) st.ready_cv.notify_all();
  }
}

}  // namespace tp::loader
