// buffer_pool.cpp: see buffer_pool.h. Owned slots are one aligned allocation each, split into the
// sources' parts; external slots only record the caller's buffers.
#include "loader/buffer_pool.h"

#include <algorithm>
#include <cstdlib>
#include <new>
#include <stdexcept>

namespace tp::loader {

namespace {
constexpr size_t kAlign = 64;  // cache line: every source's part of a slot starts aligned

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
}  // namespace

BufferPool::BufferPool(const std::vector<size_t>& part_bytes, const std::vector<std::vector<uint8_t*>>& external,
                       int keep)
    : owned_(external.empty()), keep_(keep) {
  size_t off = 0;
  for (size_t bytes : part_bytes) {
    offsets_.push_back(off);
    off += round_up(bytes);
  }
  slot_bytes_ = off;
  for (const auto& bufs : external) {
    if (bufs.size() != part_bytes.size()) throw std::invalid_argument("every external slot needs one buffer per source");
    Slot s;
    s.parts = bufs;
    slots_.push_back(std::move(s));
  }
}

BufferPool::~BufferPool() {
  for (Slot& s : slots_) std::free(s.memory);
}

int BufferPool::free_slot() const {
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].state == Slot::Free && !slots_[i].parts.empty()) return static_cast<int>(i);
  return -1;
}

int BufferPool::acquire() {
  int i = free_slot();
  if (i < 0) {
    for (size_t k = 0; k < slots_.size() && i < 0; ++k)
      if (slots_[k].parts.empty()) i = static_cast<int>(k);
    if (i < 0) {
      slots_.emplace_back();
      i = static_cast<int>(slots_.size()) - 1;
    }
    Slot& s = slots_[i];
    s.memory = static_cast<uint8_t*>(std::aligned_alloc(kAlign, std::max(slot_bytes_, kAlign)));
    if (s.memory == nullptr) throw std::bad_alloc();
    for (size_t off : offsets_) s.parts.push_back(s.memory + off);
  }
  slots_[i].state = Slot::Busy;
  return i;
}

bool BufferPool::release_view(int slot) {
  Slot& s = slots_[slot];
  if (--s.views > 0) return false;
  s.state = Slot::Free;
  if (owned_) {
    int allocated = 0;
    for (const Slot& o : slots_)
      if (!o.parts.empty()) ++allocated;
    if (allocated > keep_) {  // the user had held many batches: give the memory back
      std::free(s.memory);
      s.memory = nullptr;
      s.parts.clear();
    }
  }
  return true;
}

int BufferPool::count() const {
  int n = 0;
  for (const Slot& s : slots_)
    if (owned_ ? !s.parts.empty() : s.state == Slot::Busy) ++n;
  return n;
}

}  // namespace tp::loader
