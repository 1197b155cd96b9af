#include "memory/block_space.h"

#include <algorithm>
#include <mutex>
#include <numeric>

namespace kvtier {

// ---------------------------------------------------------------- HostPool

HostPool::HostPool(std::unique_ptr<HostArena> arena, uint64_t block_bytes, uint32_t num_blocks)
    : arena_(std::move(arena)),
      block_stride_bytes_((block_bytes + kBlockAlignment - 1) / kBlockAlignment * kBlockAlignment),
      allocator_(num_blocks) {
  device_ = Device{DeviceType::kCpu, 0};
  num_blocks_ = num_blocks;
  block_bytes_ = block_bytes;
  segments_.push_back(Segment{arena_->data(), static_cast<int64_t>(block_stride_bytes_), block_bytes});
}

Result<std::unique_ptr<HostPool>> HostPool::Create(uint64_t block_bytes, uint32_t num_blocks,
                                                   const HostArenaOptions& options) {
  if (block_bytes == 0) return InvalidArgument("block_bytes must be > 0");
  if (num_blocks == 0) return InvalidArgument("a pool needs at least one block (num_blocks=0)");
  if (num_blocks > uint32_t{1} << 31) return InvalidArgument("num_blocks must be < 2^31");
  const uint64_t stride = (block_bytes + kBlockAlignment - 1) / kBlockAlignment * kBlockAlignment;
  const uint64_t total = stride * num_blocks;
  if (stride < block_bytes || total / num_blocks != stride) return InvalidArgument("pool size overflows 64 bits");
  auto arena = HostArena::Create(total, options);
  if (!arena.ok()) return arena.status();
  return std::unique_ptr<HostPool>(new HostPool(std::move(arena).value(), block_bytes, num_blocks));
}

Status HostPool::Acquire(std::span<const int32_t> ids, bool /*write*/) {
  // Lease validates range and allocation state for the whole batch before changing anything.
  return allocator_.Lease(ids);
}

void HostPool::Release(std::span<const int32_t> ids) {
  // Never fails: see Note [Block states] on leases.
  allocator_.Unlease(ids);
}

// ---------------------------------------------------------------- layout decomposition

Status DecomposeBlockRuns(const TensorDesc& t, int block_dim, std::vector<Segment>* out, size_t max_runs) {
  const int ndim = static_cast<int>(t.shape.size());
  if (t.strides.size() != t.shape.size()) return InvalidArgument("tensor strides and shape differ in length");
  if (block_dim < 0 || block_dim >= ndim) {
    return InvalidArgument("block dimension " + std::to_string(block_dim) + " is out of range for a " +
                           std::to_string(ndim) + "-d tensor");
  }
  if (t.itemsize == 0) return InvalidArgument("tensor itemsize is 0");
  for (int d = 0; d < ndim; ++d) {
    if (t.shape[d] <= 0) return InvalidArgument("tensor has an empty dimension " + std::to_string(d));
  }
  if (t.data == nullptr) return InvalidArgument("tensor has no data pointer");
  for (int d = 0; d < ndim; ++d) {
    if (t.shape[d] > 1 && t.strides[d] <= 0) {
      return InvalidArgument("tensor dimension " + std::to_string(d) +
                             " has stride <= 0 (expanded or flipped views cannot hold KV blocks)");
    }
  }
  // Dimensions of one block's slice, innermost first, size-1 dimensions dropped.
  struct Dim { int64_t size, stride; };
  std::vector<Dim> dims;
  for (int d = ndim - 1; d >= 0; --d) {
    if (d != block_dim && t.shape[d] > 1) dims.push_back({t.shape[d], t.strides[d]});
  }
  // Merge inner dims into one contiguous run while they are densely packed.
  int64_t run_elems = 1;
  size_t k = 0;
  while (k < dims.size() && dims[k].stride == run_elems) {
    run_elems *= dims[k].size;
    ++k;
  }
  std::vector<Dim> outer(dims.begin() + static_cast<long>(k), dims.end());
  size_t num_runs = 1;
  for (const Dim& d : outer) {
    num_runs *= static_cast<size_t>(d.size);
    if (num_runs > max_runs) {
      return InvalidArgument("tensor is too fragmented for block transfers: one block would be more than " +
                             std::to_string(max_runs) + " separate runs (make the per-block slice contiguous)");
    }
  }
  const int64_t block_stride_bytes = t.strides[block_dim] * static_cast<int64_t>(t.itemsize);
  std::vector<int64_t> idx(outer.size(), 0);
  for (size_t r = 0; r < num_runs; ++r) {
    int64_t off = 0;
    for (size_t i = 0; i < outer.size(); ++i) off += idx[i] * outer[i].stride;
    out->push_back(Segment{static_cast<std::byte*>(t.data) + off * static_cast<int64_t>(t.itemsize),
                           block_stride_bytes, static_cast<uint64_t>(run_elems) * t.itemsize});
    // Increment the multi-index, innermost outer dim fastest; we want the outermost dims to vary
    // slowest so runs come out in memory order for a row-major tensor.
    for (size_t i = 0; i < outer.size(); ++i) {
      if (++idx[i] < outer[i].size) break;
      idx[i] = 0;
    }
  }
  return Status::Ok();
}

// ---------------------------------------------------------------- KvRegion

Result<std::unique_ptr<KvRegion>> KvRegion::Create(const std::vector<TensorDesc>& tensors,
                                                   const std::vector<int>& block_dims,
                                                   uint64_t expected_block_bytes, bool huge_pages) {
  if (tensors.empty()) return InvalidArgument("register at least one tensor");
  if (tensors.size() != block_dims.size()) return InvalidArgument("one block dimension per tensor is required");
  std::unique_ptr<KvRegion> region(new KvRegion());
  region->device_ = tensors[0].device;
  int64_t num_blocks = -1;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorDesc& t = tensors[i];
    if (!(t.device == region->device_)) {
      return DeviceError("all registered tensors must be on one device: tensor 0 is on " +
                         region->device_.ToString() + ", tensor " + std::to_string(i) + " on " +
                         t.device.ToString());
    }
    KVTIER_RETURN_IF_ERROR(DecomposeBlockRuns(t, block_dims[i], &region->segments_));
    const int64_t nb = t.shape[static_cast<size_t>(block_dims[i])];
    if (num_blocks >= 0 && nb != num_blocks) {
      return InvalidArgument("registered tensors disagree on the number of blocks: tensor 0 has " +
                             std::to_string(num_blocks) + ", tensor " + std::to_string(i) + " has " +
                             std::to_string(nb));
    }
    num_blocks = nb;
  }
  uint64_t block_bytes = 0;
  for (const Segment& s : region->segments_) block_bytes += s.run_bytes;
  if (expected_block_bytes != 0 && block_bytes != expected_block_bytes) {
    return InvalidArgument("registered tensors hold " + std::to_string(block_bytes) +
                           " bytes per block but the layout says " + std::to_string(expected_block_bytes));
  }
  region->num_blocks_ = static_cast<uint64_t>(num_blocks);
  region->block_bytes_ = block_bytes;
  // Merge adjacent runs that are contiguous in memory with the same stride (e.g. K|V packed).
  std::vector<Segment> merged;
  for (const Segment& s : region->segments_) {
    if (!merged.empty() && merged.back().block_stride_bytes == s.block_stride_bytes &&
        merged.back().base + merged.back().run_bytes == s.base) {
      merged.back().run_bytes += s.run_bytes;
    } else {
      merged.push_back(s);
    }
  }
  region->segments_ = std::move(merged);
  if (!region->device_.is_cpu()) {
    region->huge_pages_ = "not cpu";
  } else if (huge_pages) {
    // The span each tensor covers, from its lowest to its highest byte.
    std::string worst = "collapsed";
    for (const TensorDesc& t : tensors) {
      int64_t extent = 1;
      for (size_t d = 0; d < t.shape.size(); ++d) extent += (t.shape[d] - 1) * t.strides[d];
      const std::string r = AdviseHugePages(t.data, static_cast<size_t>(extent) * t.itemsize);
      if (r != "collapsed") worst = r;
    }
    region->huge_pages_ = worst;
  }
  return region;
}

Status KvRegion::Acquire(std::span<const int32_t> ids, bool /*write*/) {
  if (closed_.load()) return ClosedError("the kv registration was closed");
  for (int32_t id : ids) {
    if (id < 0 || static_cast<uint64_t>(id) >= num_blocks_) {
      return InvalidArgument("block id " + std::to_string(id) + " is out of range for the kv registration [0, " +
                             std::to_string(num_blocks_) + ")");
    }
  }
  inflight_.fetch_add(1);
  if (closed_.load()) {  // closed between the check and the increment
    inflight_.fetch_sub(1);
    return ClosedError("the kv registration was closed");
  }
  return Status::Ok();
}

void KvRegion::Release(std::span<const int32_t> /*ids*/) { inflight_.fetch_sub(1); }

Status KvRegion::Close() {
  bool expected = false;
  if (!closed_.compare_exchange_strong(expected, true)) return Status::Ok();
  if (inflight_.load() != 0) {
    closed_.store(false);
    return BusyError(std::to_string(inflight_.load()) +
                     " transfer(s) still use this kv registration; wait for them before closing");
  }
  return Status::Ok();
}

}  // namespace kvtier
