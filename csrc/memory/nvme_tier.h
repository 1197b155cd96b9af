// NvmeTier: the NVMe tier. Blocks live in fixed-size slots of one preallocated file under a
// directory, addressed by BlockKey; I/O goes through io_uring with O_DIRECT, the staging DRAM
// pool's arena registered once as fixed buffers and the file registered as a fixed file.
//
// Note [On-disk format] (docs/nvme.md has the long form):
//   <dir>/kvtier.super  4 KiB superblock: magic, version, block_bytes, payload_bytes, num_slots,
//                       checksum. Written once at creation, checked at every open.
//   <dir>/kvtier.slots  a header table (num_slots x 4 KiB: magic, key, generation, payload_bytes,
//                       payload XXH3-64, header XXH3-64), then num_slots payloads of
//                       block_bytes rounded up to 4 KiB. Payloads of consecutive slots are
//                       adjacent, so a batch of blocks in consecutive slots from consecutive
//                       pool blocks goes out as one large request (Note [Request merging]).
// Note [Write ordering]: a block's header is submitted only after its payload request(s) completed,
// and the batch is acknowledged only after an fdatasync that follows all of its headers
// (durable=true). So an acknowledged block is on disk whole; a crash can leave an
// old header in front of a partly overwritten payload, which fails its checksum on the way back
// and is a miss. Nothing torn or stale is ever returned: every read verifies the checksum.
// Note [Request merging]: on virtio and NVMe alike the cost per request dominates below a few
// MiB, and the block layer does not merge for us when the scheduler is "none". Payload I/O is
// therefore built from runs of blocks adjacent both in the file (consecutive slots) and in the
// staging arena (consecutive pool blocks: the pool's block stride equals the payload size), up
// to max_io_bytes per request; a block larger than that is split. Headers of consecutive slots
// are written by one request too.
// Note [Header groups]: a write batch's blocks are split into groups of consecutive positions (at
// most 64 blocks and 64 MiB of payload). A group's headers go out (merged per run of consecutive
// slots, ahead of queued payloads) as soon as every payload of the group completed, so headers
// overlap the rest of the batch's payloads and only the last group's headers, then the
// fdatasync, follow the last payload. Waiting for the whole batch first left 10.7 MiB of headers
// (2730 blocks of 192 KiB) plus the fdatasync after the last payload: 8-12 ms of a ~110 ms batch.
// Note [Checksums beside the payload]: a write batch's payload requests all go to the ring (up to
// the queue depth) as soon as its slots are claimed; the blocks' XXH3-64 checksums are computed
// meanwhile on the verify pool and the caller's thread, a few MiB per task in submission order
// (the caller's thread returns once every task is claimed). A header needs its
// block's checksum, and goes out only after its payload completed anyway, so a header group
// waits for two events per block (payload written, checksum computed) and the ring never waits
// for a hash. Both the hash and the disk read the same staging block, which the tier holds
// (read-acquired) from Write until the handle completes: nothing in kvtier changes it in
// between. Were it changed anyway (a caller writing through a raw pointer), the bytes hashed and
// the bytes written differ, in whichever order the two happened, and the first read fails the
// checksum: a miss, never wrong bytes (InjectStagingChange tests both orders). Before, the
// caller's thread hashed each request just before queueing it: the ring got its first requests
// after the first 8 MiB were hashed and was fed at the hashing rate, which on a machine with
// slow memory (memcpy ~10 GB/s) is close enough to the disk's to starve it.
// Note [Tapering reads]: this machine's virtio disk serves requests in rounds: everything queued
// when a round starts completes together, in a burst, about 100-125 ms later (kernel block
// trace: 64-68 requests of 4 MiB, 250-262 MiB, per round). The checksums of the last round can
// only be verified after it arrived, so a 512 MiB read of 2 MiB blocks, which reached the disk
// in two rounds of ~256 MiB, kept the caller waiting 20-48 ms after its last byte arrived (two
// verify threads on a loaded 2-core VM), 8-16% of the read; NIXL, which verifies nothing, had
// no such tail. So a read's payload requests are admitted to the ring only while the bytes in
// flight stay within half of the read bytes not yet completed (at least kMinReadWindow): rounds
// halve towards the end of a batch (256, 128, 64, ... MiB), each round's verification overlaps
// the next round's transfer, and only the last, small round is verified after the last byte.
// A disk that is not round-based loses nothing while the window holds many requests; the last
// kMinReadWindow bytes still go out together. taper_reads=false turns it off.
// Note [Recovery]: Open reads every slot header; a header with a bad checksum or magic marks a
// free slot; when two slots claim one key the higher generation wins. Payloads are verified
// lazily, on read.
#pragma once

#include <liburing.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "index/checksum.h"
#include "memory/block_allocator.h"
#include "memory/block_space.h"
#include "transfer/transfer.h"

namespace kvtier {

struct NvmeTierOptions {
  std::string directory;
  uint64_t block_bytes = 0;
  uint32_t num_slots = 0;
  uint32_t queue_depth = 64;                 // io_uring operations in flight, at most
  uint64_t max_io_bytes = uint64_t{4} << 20;  // largest single read/write request (merged or split)
  bool durable = true;                       // fdatasync before acknowledging a write batch
  bool allow_buffered_io = false;            // opt-in for file systems that refuse O_DIRECT
  uint32_t verify_threads = 0;               // threads verifying read checksums (0: one per core, at most 8)
  bool taper_reads = true;                   // Note [Tapering reads]
};

struct NvmeTierStats {
  uint64_t num_slots = 0;
  uint64_t used_slots = 0;
  uint64_t blocks_written = 0;
  uint64_t blocks_deduplicated = 0;  // write of a key already stored: skipped
  uint64_t write_errors = 0;
  uint64_t read_hits = 0;
  uint64_t read_misses = 0;     // absent keys
  uint64_t corrupt_blocks = 0;  // failed the checksum on the way back (counted as misses too)
  uint64_t read_errors = 0;     // I/O errors on read (counted as misses too)
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
  uint64_t recovered_blocks = 0;  // found by the last Open
  uint64_t evicted_blocks = 0;
  uint64_t fsyncs = 0;
  uint64_t read_ops = 0;   // payload read requests put on the ring, after merging (Note [Request merging])
  uint64_t write_ops = 0;  // payload write requests, likewise (headers and fdatasyncs not counted)
};

// Seconds to XXH3-64 (Checksum64, the tier's payload checksum) `size_bytes` at `data`, split
// evenly over `threads` threads in pieces of `piece_bytes` (a block: the unit the tier hashes).
// `kvtier bench nvme` records this beside memcpy's speed (the machine section), so a reader sees
// whether hashing or the disk bound a case.
double TimedParallelChecksum(const void* data, size_t size_bytes, size_t piece_bytes, int threads);

class NvmeTier {
 public:
  // Creates the tier in options.directory, or reopens (and recovers) the one there. Blocks move
  // between the tier and `staging`, whose arena is registered with io_uring; the pool must
  // outlive the tier.
  static Result<std::unique_ptr<NvmeTier>> Open(const NvmeTierOptions& options, HostPool& staging);
  ~NvmeTier();  // drains, then closes
  NvmeTier(const NvmeTier&) = delete;
  NvmeTier& operator=(const NvmeTier&) = delete;

  // DRAM -> NVMe: keys[i] gets the bytes of staging block pool_ids[i]. Keys already stored are
  // skipped. A batch that does not fit in the free slots completes with kOutOfCapacity and
  // writes nothing; an I/O error fails the handle (block_ok says which blocks made it).
  Result<std::shared_ptr<TransferState>> Write(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids);
  // NVMe -> DRAM: block_ok()[i] is 1 when keys[i] was found and passed its checksum.
  Result<std::shared_ptr<TransferState>> Read(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids);

  void Contains(std::span<const BlockKey> keys, uint8_t* out) const;
  uint64_t Evict(std::span<const BlockKey> keys);
  std::vector<BlockKey> Keys() const;
  NvmeTierStats stats() const;
  void Drain();
  // Test switch: every every_nth payload/header operation completes with -EIO (0: off).
  void InjectIoErrors(uint64_t every_nth) noexcept { inject_every_.store(every_nth); }
  // Test switch: in every write batch, the staging block at every every_nth-th position
  // (positions every_nth-1, 2*every_nth-1, ...) gets its first byte flipped between its checksum
  // and its payload write: hashed first, then changed, then written (after_write=false), or
  // written first, then changed, then hashed (true). Either way the header's checksum no longer
  // matches the payload on disk, and a read must report the block as corrupt. 0: off.
  void InjectStagingChange(uint64_t every_nth, bool after_write) noexcept {
    inject_after_write_.store(after_write);
    inject_staging_every_.store(every_nth);
  }

  uint64_t block_bytes() const noexcept { return options_.block_bytes; }
  uint64_t payload_bytes() const noexcept { return payload_bytes_; }
  uint64_t header_offset(uint32_t slot) const noexcept { return uint64_t(slot) * 4096; }
  uint64_t payload_offset(uint32_t slot) const noexcept { return header_table_bytes_ + uint64_t(slot) * payload_bytes_; }
  uint32_t num_slots() const noexcept { return options_.num_slots; }
  uint32_t queue_depth() const noexcept { return options_.queue_depth; }
  uint32_t verify_threads() const noexcept { return static_cast<uint32_t>(verify_pool_ ? verify_pool_->size() : 0); }
  const std::string& io_mode() const noexcept { return io_mode_; }
  const std::string& path() const noexcept { return slots_path_; }

 private:
  struct Request;
  struct IoOp {
    enum class Kind : uint8_t { kPayloadWrite, kHeaderWrite, kPayloadRead, kFsync };
    Kind kind;
    uint32_t first;  // the request positions [first, first + count) this op covers
    uint32_t count;
    Request* req;
    std::byte* buf;
    uint32_t len;
    uint64_t offset;  // in the slots file
  };
  struct IndexEntry {
    uint32_t slot;
    uint64_t checksum;
    uint64_t generation;
    bool valid;  // false while its write is in flight
  };

  NvmeTier(const NvmeTierOptions& options, HostPool& staging);
  Status CheckBatch(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids) const;
  std::unique_ptr<Request> NewRequest(bool is_write, std::span<const BlockKey> keys,
                                      std::span<const int32_t> pool_ids, std::shared_ptr<TransferState> state) const;
  Status Init();
  Status Recover();
  void CompletionLoop();
  void Enqueue(IoOp* op);
  void Pump();  // moves backlog into the ring; takes sq_mu_
  void OnOpDone(IoOp* op, int res);
  void BlockDone(Request& req, uint32_t block, bool ok);
  void VerifyBlocks(Request& req, std::span<const uint32_t> blocks);
  void HashBlocks(Request& req, std::span<const uint32_t> blocks);
  void HashAfterWrite(Request& req, uint32_t block);
  bool InjectSelects(uint32_t position) const noexcept {
    const uint64_t every = inject_staging_every_.load();
    return every > 0 && (uint64_t{position} + 1) % every == 0;
  }
  void BuildPayloadOps(Request& req, IoOp::Kind kind);
  void AssignHeaderGroups(Request& req) const;
  void StartHeaders(Request& req, uint32_t group);
  void GroupDone(Request& req);
  void RequestIoDone(Request& req);
  void Finalize(Request& req);
  int BufferIndex(const std::byte* p) const;

  NvmeTierOptions options_;
  HostPool& staging_;
  uint64_t payload_bytes_ = 0;  // block_bytes rounded up to 4 KiB
  uint64_t header_table_bytes_ = 0;
  std::string super_path_, slots_path_, io_mode_;
  int super_fd_ = -1;
  int fd_ = -1;
  bool direct_ = true;

  io_uring ring_{};
  bool ring_ready_ = false;
  bool fixed_buffers_ = false;
  uint64_t iov_span_bytes_ = 0;  // arena bytes per registered buffer

  std::mutex sq_mu_;
  std::deque<IoOp*> backlog_;             // guarded by sq_mu_
  uint32_t inflight_ops_ = 0;             // guarded by sq_mu_
  uint64_t read_bytes_inflight_ = 0;      // guarded by sq_mu_: payload reads in the ring
  uint64_t read_bytes_outstanding_ = 0;   // guarded by sq_mu_: payload reads queued or in the ring
  bool stopping_ = false;                 // guarded by sq_mu_
  std::thread completion_thread_;
  std::unique_ptr<ThreadPool> verify_pool_;  // Note [Verifying reads in parallel]

  mutable std::mutex index_mu_;
  std::unordered_map<BlockKey, IndexEntry, BlockKeyHash> index_;  // guarded by index_mu_
  BlockAllocator slots_;
  uint64_t next_generation_ = 1;  // guarded by index_mu_

  std::atomic<uint64_t> active_requests_{0};
  std::atomic<uint64_t> op_counter_{0}, inject_every_{0}, inject_staging_every_{0};
  std::atomic<bool> inject_after_write_{false};
  std::atomic<uint64_t> blocks_written_{0}, dedup_{0}, write_errors_{0}, read_hits_{0}, read_misses_{0},
      corrupt_{0}, read_errors_{0}, bytes_written_{0}, bytes_read_{0}, recovered_{0}, evicted_{0}, fsyncs_{0},
      read_ops_{0}, write_ops_{0};
};

}  // namespace kvtier
