// BlockSpace: what the copy engine sees of any memory that holds KV blocks.
//
// A block's bytes are the concatenation of its segments: for segment s, the run of
// segments[s].run_bytes bytes at segments[s].base + block_id * segments[s].block_stride_bytes.
// A DRAM pool has one segment (its blocks are contiguous); an engine's registered paged KV cache
// has one or more segments per layer (e.g. K and V in separate halves of a tensor). The tier
// block format is therefore "the registration's segments, in order"; the layout fingerprint goes
// into the block-hash salt so differently laid out blocks are never confused.
//
// Note [Transfer lifetime]: the engine calls Acquire before a transfer touches a space and
// Release once it no longer will (before the transfer's handle completes). Pools take a
// reference on every block in the batch (copy-then-release: a block being read or written can't
// be freed and reused under the copy); registrations count transfers in flight so Close() can
// refuse while any is pending. The Python layer keeps the owning objects alive until then.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "memory/block_allocator.h"
#include "memory/device.h"
#include "memory/host_arena.h"

namespace kvtier {

struct Segment {
  std::byte* base = nullptr;
  int64_t block_stride_bytes = 0;
  uint64_t run_bytes = 0;
};

class BlockSpace {
 public:
  virtual ~BlockSpace() = default;

  // Unique for the life of the process (never reused, unlike addresses): keys layout plans.
  uint64_t uid() const noexcept { return uid_; }
  const Device& device() const noexcept { return device_; }
  uint64_t num_blocks() const noexcept { return num_blocks_; }
  uint64_t block_bytes() const noexcept { return block_bytes_; }
  const std::vector<Segment>& segments() const noexcept { return segments_; }
  // A short human name used in error messages ("host pool", "kv registration").
  virtual std::string kind() const = 0;
  virtual bool is_closed() const noexcept { return false; }

  // See Note [Transfer lifetime]. `write` is true when the transfer writes into these blocks.
  virtual Status Acquire(std::span<const int32_t> ids, bool write) = 0;
  virtual void Release(std::span<const int32_t> ids) = 0;

 protected:
  Device device_;
  uint64_t num_blocks_ = 0;
  uint64_t block_bytes_ = 0;
  std::vector<Segment> segments_;

 private:
  static inline std::atomic<uint64_t> next_uid_{1};
  const uint64_t uid_ = next_uid_.fetch_add(1);
};

// A DRAM tier: one HostArena carved into num_blocks blocks of block_bytes each. Blocks start
// every block_stride_bytes = block_bytes rounded up to kBlockAlignment, so that every block can
// be the buffer of an O_DIRECT read or write of its whole (aligned) length.
class HostPool final : public BlockSpace {
 public:
  static Result<std::unique_ptr<HostPool>> Create(uint64_t block_bytes, uint32_t num_blocks,
                                                  const HostArenaOptions& options);

  std::string kind() const override { return "host pool"; }
  Status Acquire(std::span<const int32_t> ids, bool write) override;
  void Release(std::span<const int32_t> ids) override;

  static constexpr uint64_t kBlockAlignment = 4096;

  BlockAllocator& allocator() noexcept { return allocator_; }
  const HostArena& arena() const noexcept { return *arena_; }
  uint64_t block_stride_bytes() const noexcept { return block_stride_bytes_; }
  std::byte* block_ptr(int32_t id) const noexcept { return arena_->data() + uint64_t(id) * block_stride_bytes_; }

 private:
  HostPool(std::unique_ptr<HostArena> arena, uint64_t block_bytes, uint32_t num_blocks);
  std::unique_ptr<HostArena> arena_;
  uint64_t block_stride_bytes_;
  BlockAllocator allocator_;
};

// A strided tensor as the core sees it (no torch, no Python): filled from DLPack by the binding.
struct TensorDesc {
  void* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements
  uint32_t itemsize = 0;
  Device device;
};

// The contiguous runs of bytes that make up block 0 of `tensor` when dimension block_dim indexes
// blocks; appended to *out with block_stride_bytes set from block_dim's stride.
Status DecomposeBlockRuns(const TensorDesc& tensor, int block_dim, std::vector<Segment>* out,
                          size_t max_runs = 65536);

// An inference engine's own paged KV memory, registered with a layout: a list of tensors, each
// with the dimension that indexes blocks. Holds raw pointers only; the binding keeps the tensors.
class KvRegion final : public BlockSpace {
 public:
  static Result<std::unique_ptr<KvRegion>> Create(const std::vector<TensorDesc>& tensors,
                                                  const std::vector<int>& block_dims,
                                                  uint64_t expected_block_bytes, bool huge_pages = false);
  // What AdviseHugePages did for the CPU tensors ("collapsed", "advised", "unsupported"), or
  // "off" / "not cpu".
  const std::string& huge_pages() const noexcept { return huge_pages_; }

  std::string kind() const override { return "kv registration"; }
  bool is_closed() const noexcept override { return closed_.load(); }
  Status Acquire(std::span<const int32_t> ids, bool write) override;
  void Release(std::span<const int32_t> ids) override;

  // Refuses (kBusy) while transfers are in flight; afterwards every transfer is refused.
  Status Close();
  uint64_t inflight() const noexcept { return inflight_.load(); }

 private:
  KvRegion() = default;
  std::atomic<uint64_t> inflight_{0};
  std::atomic<bool> closed_{false};
  std::string huge_pages_ = "off";
};

}  // namespace kvtier
