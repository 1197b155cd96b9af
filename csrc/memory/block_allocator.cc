#include "memory/block_allocator.h"

#include <algorithm>
#include <string>

namespace kvtier {
namespace {

// Sorted copy of ids with the run length of each distinct id, so that a batch naming one id
// several times is validated against its total effect.
std::vector<std::pair<int32_t, uint32_t>> CountIds(std::span<const int32_t> ids) {
  std::vector<int32_t> sorted(ids.begin(), ids.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::pair<int32_t, uint32_t>> counts;
  for (int32_t id : sorted) {
    if (!counts.empty() && counts.back().first == id) {
      ++counts.back().second;
    } else {
      counts.emplace_back(id, 1);
    }
  }
  return counts;
}

}  // namespace

std::optional<int32_t> FindRepeatedId(std::span<const int32_t> ids) {
  if (ids.size() < 2) return std::nullopt;
  std::vector<int32_t> sorted(ids.begin(), ids.end());
  std::sort(sorted.begin(), sorted.end());
  auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup == sorted.end()) return std::nullopt;
  return *dup;
}

BlockAllocator::BlockAllocator(uint32_t num_blocks)
    : num_blocks_(num_blocks), refcount_(num_blocks, 0), pins_(num_blocks, 0), leases_(num_blocks, 0) {
  free_list_.reserve(num_blocks);
  for (uint32_t i = num_blocks; i > 0; --i) free_list_.push_back(static_cast<int32_t>(i - 1));
  stats_.num_blocks = num_blocks;
}

Status BlockAllocator::CheckRangeLocked(std::span<const int32_t> ids) const {
  for (int32_t id : ids) {
    if (id < 0 || static_cast<uint32_t>(id) >= num_blocks_) {
      return InvalidArgument("block id " + std::to_string(id) + " is out of range [0, " +
                             std::to_string(num_blocks_) + ")");
    }
  }
  return Status::Ok();
}

Status BlockAllocator::CheckAllocatedLocked(std::span<const int32_t> ids) const {
  KVTIER_RETURN_IF_ERROR(CheckRangeLocked(ids));
  for (int32_t id : ids) {
    if (refcount_[id] == 0) {
      return BlockStateError("block " + std::to_string(id) + " is not allocated (freed twice, or never allocated)");
    }
  }
  return Status::Ok();
}

Status BlockAllocator::Allocate(size_t n, int32_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n > free_list_.size()) {
    ++stats_.failed_allocs;
    return OutOfCapacity("cannot allocate " + std::to_string(n) + " blocks: " +
                         std::to_string(free_list_.size()) + " of " + std::to_string(num_blocks_) +
                         " are free");
  }
  for (size_t i = 0; i < n; ++i) {
    int32_t id = free_list_.back();
    free_list_.pop_back();
    refcount_[id] = 1;
    out[i] = id;
  }
  stats_.used_blocks += n;
  stats_.allocated_total += n;
  stats_.peak_used_blocks = std::max(stats_.peak_used_blocks, stats_.used_blocks);
  return Status::Ok();
}

Status BlockAllocator::Ref(std::span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(ids));
  for (int32_t id : ids) ++refcount_[id];
  return Status::Ok();
}

Status BlockAllocator::Unref(std::span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTIER_RETURN_IF_ERROR(CheckRangeLocked(ids));
  auto counts = CountIds(ids);
  for (auto [id, count] : counts) {
    if (refcount_[id] < count) {
      return BlockStateError(refcount_[id] == 0
                                 ? "block " + std::to_string(id) + " is already free (double free)"
                                 : "block " + std::to_string(id) + " released " + std::to_string(count) +
                                       " times but has only " + std::to_string(refcount_[id]) + " holder(s)");
    }
    if (pins_[id] > 0 && refcount_[id] - count <= leases_[id]) {
      return BlockStateError("block " + std::to_string(id) + " is pinned; unpin it before freeing");
    }
  }
  // Highest id first, so the batch's lowest id ends on top of the free stack (reused first).
  for (auto it = counts.rbegin(); it != counts.rend(); ++it) {
    const auto [id, count] = *it;
    refcount_[id] -= count;
    if (refcount_[id] == 0) {
      free_list_.push_back(id);
      --stats_.used_blocks;
      ++stats_.freed_total;
    }
  }
  return Status::Ok();
}

Status BlockAllocator::Lease(std::span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(ids));
  for (int32_t id : ids) {
    ++refcount_[id];
    ++leases_[id];
  }
  return Status::Ok();
}

void BlockAllocator::Unlease(std::span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int32_t id : ids) {
    if (id < 0 || static_cast<uint32_t>(id) >= num_blocks_ || leases_[id] == 0) continue;  // not leased: ignore
    --leases_[id];
    if (--refcount_[id] == 0) {
      free_list_.push_back(id);
      --stats_.used_blocks;
      ++stats_.freed_total;
    }
  }
}

Status BlockAllocator::Pin(std::span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTIER_RETURN_IF_ERROR(CheckAllocatedLocked(ids));
  for (int32_t id : ids) {
    if (pins_[id]++ == 0) ++stats_.pinned_blocks;
  }
  return Status::Ok();
}

Status BlockAllocator::Unpin(std::span<const int32_t> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  KVTIER_RETURN_IF_ERROR(CheckRangeLocked(ids));
  for (auto [id, count] : CountIds(ids)) {
    if (pins_[id] < count) {
      return BlockStateError("block " + std::to_string(id) + " unpinned more times than it was pinned");
    }
  }
  for (int32_t id : ids) {
    if (--pins_[id] == 0) --stats_.pinned_blocks;
  }
  return Status::Ok();
}

Status BlockAllocator::CheckAllocated(std::span<const int32_t> ids) const {
  std::lock_guard<std::mutex> lock(mu_);
  return CheckAllocatedLocked(ids);
}

uint32_t BlockAllocator::refcount(int32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return (id >= 0 && static_cast<uint32_t>(id) < num_blocks_) ? refcount_[id] : 0;
}

uint32_t BlockAllocator::pins(int32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return (id >= 0 && static_cast<uint32_t>(id) < num_blocks_) ? pins_[id] : 0;
}

size_t BlockAllocator::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return free_list_.size();
}

AllocatorStats BlockAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace kvtier
