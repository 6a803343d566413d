// prefetcher.cpp: worker threads and the ordered hand-off of batches (see prefetcher.h); the
// buffers they fill are the BufferPool's (buffer_pool.h). One mutex guards all shared state, the
// pool included; workers hold it only to claim work and to publish results, never while copying,
// and nothing here touches Python, so the GIL is never needed.
#include "loader/prefetcher.h"

#include <algorithm>
#include <chrono>
#include <new>
#include <stdexcept>

namespace tp::loader {

struct Epoch {
  std::shared_ptr<const std::vector<int64_t>> order;
  int64_t first_batch;  // batch index (within the epoch) of the epoch's first pushed batch
  int64_t first_seq;    // its sequence number
  int64_t count;        // batches pushed
};

struct Done { int slot; int64_t rows; std::string error; };  // a gathered (or failed) batch

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

namespace {

using Clock = std::chrono::steady_clock;

Clock::duration seconds(double s) { return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s)); }

// Checks a configuration before anything starts; throws std::invalid_argument naming the problem.
PrefetcherConfig validated(PrefetcherConfig cfg) {
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
  return cfg;
}

// Per source, the bytes of its part of one batch: a batch never holds more rows than the sources
// have, however large batch_size is.
std::vector<size_t> part_bytes(const PrefetcherConfig& cfg) {
  const int64_t rows = std::min(cfg.batch_size, cfg.num_rows);
  std::vector<size_t> bytes;
  for (const Source& s : cfg.sources) bytes.push_back(static_cast<size_t>(s.row_bytes) * static_cast<size_t>(rows));
  return bytes;
}

// Rows per unit of work: each batch is split over the threads, in chunks of at least ~32 KiB so
// that claiming a chunk (one lock) stays negligible next to copying it.
int64_t chunk_rows_for(const PrefetcherConfig& cfg) {
  int64_t bytes_per_row = 0;
  for (const Source& s : cfg.sources) bytes_per_row += s.row_bytes;
  const int64_t min_rows = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, bytes_per_row));
  const int64_t per_thread = (cfg.batch_size + cfg.num_threads - 1) / cfg.num_threads;
  return std::max(min_rows, per_thread);
}

}  // namespace

struct PrefetchState {
  // The consumer holds the batch it works on and, while asking for the next, the previous one:
  // an owned pool keeps prefetch + 2 buffers allocated.
  explicit PrefetchState(PrefetcherConfig c)
      : cfg(std::move(c)),
        pool(part_bytes(cfg), cfg.external, cfg.prefetch + 2),
        low_water(cfg.prefetch / 2),
        chunk_rows(chunk_rows_for(cfg)) {}

  const PrefetcherConfig cfg;
  BufferPool pool;

  mutable std::mutex mu;
  std::condition_variable work_cv;   // workers: work, a free slot, or stop
  std::condition_variable ready_cv;  // consumer: the next batch is done
  bool stop = false;
  std::deque<Epoch> epochs;
  int64_t pushed = 0;   // batches in all pushed epochs
  int64_t claimed = 0;  // next sequence number a worker will start
  // Refill hysteresis: once `prefetch` batches are in flight, no new batch starts until the
  // consumer has taken them down to half of that (a sleeping worker's wake-up, a scheduling delay
  // on a busy machine, is paid once per prefetch/2 batches). Meanwhile the worker sleeps paced by
  // the consumer's rate: it wakes by itself when the consumer should be there, so a take needs no
  // wake-up call (a system call plus, on a virtual machine, an interrupt to the idle core: tens
  // of microseconds on the consumer's core). Only workers sleeping without a deadline (nothing to
  // pace by, or paced wake-ups that found no work) are woken by a call.
  bool refill = true;
  const int64_t low_water;
  int unpaced_sleepers = 0;
  Clock::time_point last_take{};
  double take_interval_s = 0;  // moving average of the time between takes; 0: unknown
  const int64_t chunk_rows;  // rows per unit of work
  std::map<int64_t, InFlight> active;  // started batches with chunks not all finished
  int64_t taken = 0;    // next sequence number the consumer takes
  std::map<int64_t, Done> done;
  std::string error;    // set once a failed batch was taken: the prefetcher is broken

  bool can_start_locked() const {
    if (!refill || claimed >= pushed || claimed - taken >= cfg.prefetch || !error.empty()) return false;
    return pool.can_acquire();
  }

  // The earliest started batch with a chunk left, or -1.
  int64_t unclaimed_locked() const {
    for (const auto& [seq, b] : active)
      if (b.claimed < b.chunks) return seq;
    return -1;
  }

  bool has_work_locked() const { return unclaimed_locked() >= 0 || can_start_locked(); }

  // When a worker waiting for the low-water mark should look again: a little after the consumer is
  // expected to reach it. max() when there is nothing to pace by.
  Clock::time_point pace_deadline_locked() const {
    const int64_t takes = claimed - taken - low_water;  // takes left before refill
    if (refill || take_interval_s <= 0 || takes <= 0 || claimed >= pushed || !error.empty())
      return Clock::time_point::max();
    return last_take + seconds(take_interval_s * (static_cast<double>(takes) + 0.25));
  }

  // Whether a change the consumer made (a take, a released buffer) must wake a sleeping worker:
  // only when there is work, and only workers with no deadline of their own.
  bool must_wake_locked() const { return unpaced_sleepers > 0 && has_work_locked(); }

  // A view's deleter: the last view of a slot frees it, which may let a worker start a batch.
  void release_view(int slot) {
    bool wake;
    {
      std::lock_guard<std::mutex> lk(mu);
      if (!pool.release_view(slot)) return;
      wake = must_wake_locked();
    }
    if (wake) work_cv.notify_all();
  }
};

namespace {

// What a DLPack view owns: the prefetcher state (kept alive, with its pool) and its own shape.
struct ViewCtx {
  std::shared_ptr<PrefetchState> st;
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

Prefetcher::Prefetcher(PrefetcherConfig cfg)
    : st_(std::make_shared<PrefetchState>(validated(std::move(cfg)))) {
  const int n = st_->cfg.num_threads;
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
  return st_->pool.count();
}

size_t Prefetcher::slot_bytes() const {
  std::lock_guard<std::mutex> lk(st_->mu);
  return st_->pool.slot_bytes();
}

int Prefetcher::num_sources() const { return static_cast<int>(st_->cfg.sources.size()); }

int64_t Prefetcher::pushed() const {
  std::lock_guard<std::mutex> lk(st_->mu);
  return st_->pushed;
}

int64_t Prefetcher::push_epoch(std::vector<int64_t> order, bool drop_last, int64_t first_batch) {
  PrefetchState& st = *st_;
  const int64_t n = static_cast<int64_t>(order.size());
  // Buffers hold min(batch_size, num_rows) rows: an epoch visits each row at most once.
  if (n > st.cfg.num_rows)
    throw std::invalid_argument("an epoch's order lists " + std::to_string(n) + " rows but the sources have " +
                                std::to_string(st.cfg.num_rows));
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
  PrefetchState& st = *st_;
  std::unique_lock<std::mutex> lk(st.mu);
  if (!st.error.empty()) throw std::runtime_error(st.error);
  if (st.stop) throw std::runtime_error("the prefetcher is closed");
  // Clamped to a day: an infinite timeout would overflow the clock arithmetic.
  const double wait_s = std::min(std::max(0.0, timeout_s), 86400.0);
  const auto deadline = Clock::now() + seconds(wait_s);
  if (st.done.count(st.taken) == 0 && st.has_work_locked()) {  // about to wait: wake paced sleepers
    lk.unlock();
    st.work_cv.notify_all();
    lk.lock();
  }
  const bool ready = st.ready_cv.wait_until(lk, deadline, [&] { return st.stop || st.done.count(st.taken) > 0; });
  if (st.stop) throw std::runtime_error("the prefetcher is closed");
  if (!ready) return false;
  auto it = st.done.find(st.taken);
  Done d = std::move(it->second);
  st.done.erase(it);
  if (!d.error.empty()) {
    st.error = "gathering batch " + std::to_string(st.taken) + " failed: " + d.error;
    if (d.slot >= 0) st.pool.release(d.slot);
    const std::string message = st.error;
    lk.unlock();
    st.work_cv.notify_all();
    throw std::runtime_error(message);
  }
  out->seq = st.taken++;
  out->rows = d.rows;
  out->slot = d.slot;
  const auto now = Clock::now();
  const double since = std::chrono::duration<double>(now - st.last_take).count();
  if (st.last_take != Clock::time_point{})
    st.take_interval_s = st.take_interval_s > 0 ? 0.75 * st.take_interval_s + 0.25 * since : since;
  st.last_take = now;
  if (st.claimed - st.taken <= st.low_water) st.refill = true;
  st.pool.set_views(d.slot, static_cast<int>(st.cfg.sources.size()));
  // Epochs whose batches have all been taken are no longer needed by any worker.
  while (!st.epochs.empty() && st.epochs.front().first_seq + st.epochs.front().count <= st.taken)
    st.epochs.pop_front();
  const bool wake = st.must_wake_locked();  // below low water, with batches left to start
  lk.unlock();
  if (wake) st.work_cv.notify_all();
  return true;
}

DLManagedTensor* Prefetcher::export_view(const TakenBatch& b, int source) {
  PrefetchState& st = *st_;
  if (source < 0 || source >= static_cast<int>(st.cfg.sources.size()))
    throw std::out_of_range("source index out of range");
  uint8_t* data;
  {
    std::lock_guard<std::mutex> lk(st.mu);
    data = st.pool.parts(b.slot)[source];
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
  name_this_thread("tp-gather");
  PrefetchState& st = *st_;
  for (;;) {
    int64_t seq = -1, begin = 0, end = 0;
    const int64_t* idx = nullptr;
    std::vector<uint8_t*> dst;
    std::string error;
    {
      std::unique_lock<std::mutex> lk(st.mu);
      for (int paced = 0; !st.stop && !st.has_work_locked();) {
        const auto due = st.pace_deadline_locked();
        if (due == Clock::time_point::max() || paced++ == 2) {
          ++st.unpaced_sleepers;
          st.work_cv.wait(lk);
          --st.unpaced_sleepers;
        } else {
          st.work_cv.wait_until(lk, due);
        }
      }
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
          fresh.slot = st.pool.acquire();
        } catch (const std::bad_alloc&) {  // nothing to gather: the batch fails as a whole
          st.done[seq] = Done{-1, fresh.rows,
                              "out of memory allocating a batch buffer of " + std::to_string(st.pool.slot_bytes()) + " bytes"};
          lk.unlock();
          st.ready_cv.notify_all();
          continue;
        }
        fresh.dst = st.pool.parts(fresh.slot);
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
        if (src.file) check_file(*src.file, src.name);
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
