// BlockAllocator: ids, refcounts and pins for a fixed number of equal-size blocks. It owns no
// memory; every tier (DRAM arena, NVMe slots, remote slots) puts one in front of its storage.
//
// Note [Block states]: a block is FREE (refcount 0, on the free list) or ALLOCATED
// (refcount >= 1). Allocate hands out blocks with refcount 1; Ref adds a holder; Unref (== free)
// removes one, and the block returns to the free list when the last holder leaves. A pinned
// block (pin count > 0) must not lose its last holder: Unref that would free a pinned block is
// rejected, so pinning is a promise that the block's bytes stay where they are. A *lease* is a
// holder taken by an in-flight transfer (Lease/Unlease): while a block is pinned, Unref may not
// leave it with only leases as holders, so a lease can always be returned (Unlease never fails)
// and never has to free a pinned block. Every batch call
// validates the whole batch before changing anything: a rejected batch changes no state.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "common/status.h"

namespace kvtier {

// An id that occurs more than once in ids (the smallest such), if any. O(n log n).
std::optional<int32_t> FindRepeatedId(std::span<const int32_t> ids);

struct AllocatorStats {
  uint64_t num_blocks = 0;
  uint64_t used_blocks = 0;    // gauge: allocated now
  uint64_t pinned_blocks = 0;  // gauge: pin count > 0 now
  uint64_t peak_used_blocks = 0;
  uint64_t allocated_total = 0;  // counter: blocks handed out since creation
  uint64_t freed_total = 0;      // counter: blocks returned since creation
  uint64_t failed_allocs = 0;    // counter: Allocate calls refused for capacity
};

class BlockAllocator {
 public:
  explicit BlockAllocator(uint32_t num_blocks);

  uint32_t num_blocks() const noexcept { return num_blocks_; }

  // All-or-nothing: writes n ids to out, each with refcount 1.
  Status Allocate(size_t n, int32_t* out);
  Status Ref(std::span<const int32_t> ids);
  Status Unref(std::span<const int32_t> ids);
  // A transfer's hold on allocated blocks; Unlease returns it and frees blocks left unheld.
  Status Lease(std::span<const int32_t> ids);
  void Unlease(std::span<const int32_t> ids);
  Status Pin(std::span<const int32_t> ids);
  Status Unpin(std::span<const int32_t> ids);
  // OK when every id is in range and allocated.
  Status CheckAllocated(std::span<const int32_t> ids) const;

  uint32_t refcount(int32_t id) const;
  uint32_t pins(int32_t id) const;
  size_t free_blocks() const;
  AllocatorStats stats() const;

 private:
  Status CheckRangeLocked(std::span<const int32_t> ids) const;
  Status CheckAllocatedLocked(std::span<const int32_t> ids) const;

  const uint32_t num_blocks_;
  mutable std::mutex mu_;
  std::vector<int32_t> free_list_;  // guarded by mu_; a stack, lowest ids on top at creation
  std::vector<uint32_t> refcount_;  // guarded by mu_
  std::vector<uint32_t> pins_;      // guarded by mu_
  std::vector<uint32_t> leases_;    // guarded by mu_; leases_[id] <= refcount_[id]
  AllocatorStats stats_;            // guarded by mu_
};

}  // namespace kvtier
