// buffer_pool.h: the prefetcher's batch buffers. A slot holds one batch, one part per source, each
// part starting on a cache line. The pool either owns its memory (a slot is allocated on demand
// while the user holds batches, and freed again once released beyond `keep` allocated slots) or
// uses fixed external buffers (pinned host memory allocated by the caller). A slot handed to the
// consumer goes back to the pool only when every view exported from it has been released, so a
// batch the user still holds is never overwritten.
//
// Not thread-safe by itself: the prefetcher's one mutex guards every call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tp::loader {

class BufferPool {
 public:
  // part_bytes: per source, the bytes of its part of one batch. external: empty for an owned pool,
  // else per slot one buffer of at least part_bytes[s] bytes per source s (std::invalid_argument
  // otherwise). keep: how many slots an owned pool keeps allocated when they are released.
  BufferPool(const std::vector<size_t>& part_bytes, const std::vector<std::vector<uint8_t*>>& external,
             int keep);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  size_t slot_bytes() const { return slot_bytes_; }
  // Whether acquire() can give a slot now: always in an owned pool, else when one is free.
  bool can_acquire() const { return owned_ || free_slot() >= 0; }
  // A free slot, marked busy; an owned pool allocates one when none is free. Throws std::bad_alloc.
  int acquire();
  // Per source, where a slot's parts are (throws std::out_of_range for an unknown slot).
  const std::vector<uint8_t*>& parts(int slot) const { return slots_.at(slot).parts; }
  // Hands a busy slot to the consumer as `views` exported views.
  void set_views(int slot, int views) { slots_[slot].views = views; }
  // One view of a slot released. True when it was the last: the slot is free again (and its
  // memory freed, in an owned pool holding more than `keep` allocated slots).
  bool release_view(int slot);
  // Frees a busy slot that was never handed to the consumer (its batch failed).
  void release(int slot) { slots_[slot].state = Slot::Free; }
  // Slots currently allocated (owned pool) or in use (external pool).
  int count() const;

 private:
  struct Slot {
    uint8_t* memory = nullptr;               // owned allocation (null for external or trimmed slots)
    std::vector<uint8_t*> parts;             // per source; empty while the slot has no memory
    enum State { Free, Busy } state = Free;  // Busy: being filled, ready, or held by the consumer
    int views = 0;                           // exported views not yet released
  };

  int free_slot() const;  // a free slot with memory, or -1

  std::vector<size_t> offsets_;  // per source, within an owned slot
  size_t slot_bytes_ = 0;
  bool owned_;
  int keep_;
  std::vector<Slot> slots_;
};

}  // namespace tp::loader
