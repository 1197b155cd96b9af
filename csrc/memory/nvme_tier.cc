#include "memory/nvme_tier.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <unordered_set>

namespace kvtier {
namespace {

constexpr uint64_t kAlign = 4096;
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint64_t kMaxRegisteredSpan = uint64_t{1} << 30;  // io_uring: at most 1 GiB per buffer
constexpr char kSuperMagic[8] = {'K', 'V', 'T', 'S', 'U', 'P', 'R', '1'};
constexpr char kSlotMagic[8] = {'K', 'V', 'T', 'S', 'L', 'O', 'T', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint32_t kNoGroup = ~uint32_t{0};
constexpr uint64_t kGroupHeaders = 64;                     // blocks per header group, at most
constexpr uint64_t kGroupPayloadBytes = uint64_t{64} << 20;  // payload bytes per header group, at most
constexpr uint64_t kMinReadWindow = uint64_t{16} << 20;      // Note [Tapering reads]

uint64_t RoundUp(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

struct SuperBlock {
  char magic[8];
  uint32_t version;
  uint32_t reserved;
  uint64_t block_bytes;
  uint64_t payload_bytes;
  uint64_t num_slots;
  uint64_t checksum;  // XXH3-64 of the fields above
};

struct SlotHeader {
  char magic[8];
  uint32_t version;
  uint32_t reserved;
  uint64_t key_hi;
  uint64_t key_lo;
  uint64_t generation;
  uint64_t payload_bytes;
  uint64_t payload_checksum;
  uint64_t header_checksum;  // XXH3-64 of the fields above
};
static_assert(sizeof(SlotHeader) == 64);

std::string Errno(int err) { return std::strerror(err); }

}  // namespace

double TimedParallelChecksum(const void* data, size_t size_bytes, size_t piece_bytes, int threads) {
  const size_t pieces = piece_bytes == 0 ? 1 : (size_bytes + piece_bytes - 1) / piece_bytes;
  const size_t workers = std::min<size_t>(static_cast<size_t>(std::max(threads, 1)), std::max<size_t>(pieces, 1));
  const auto* base = static_cast<const std::byte*>(data);
  std::atomic<uint64_t> sink{0};  // keeps the hashes alive
  auto work = [&](size_t w) {
    uint64_t acc = 0;
    for (size_t p = w; p < pieces; p += workers) {
      const size_t off = p * piece_bytes;
      acc ^= Checksum64(base + off, std::min(piece_bytes, size_bytes - off));
    }
    sink.fetch_xor(acc);
  };
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (size_t w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct NvmeTier::Request {
  bool is_write = false;
  std::vector<BlockKey> keys;
  std::vector<int32_t> pool_ids;
  std::vector<uint32_t> slots;
  std::vector<uint64_t> checksums;
  std::vector<uint64_t> generations;
  std::vector<uint32_t> chunks_left;
  std::vector<uint8_t> ok;
  std::vector<uint8_t> active;  // block has I/O in this request (not skipped / missed)
  std::vector<IoOp> ops;        // stable storage: reserved up front, never reallocated
  // Reads: the request positions in ascending slot order (Note [Reads in file order]). A payload
  // read op covers order[first, first + count); empty (writes) means the identity.
  std::vector<uint32_t> order;
  uint32_t position(uint32_t i) const { return order.empty() ? i : order[i]; }
  std::atomic<uint32_t> blocks_left{0};  // reads: blocks not yet verified
  bool hash_on_completion = false;  // test switch: InjectStagingChange(.., after_write=true)
  // Writes: header groups (Note [Header groups]). The positions are fixed before I/O starts.
  std::vector<uint32_t> group_of;       // request position -> its group (kNoGroup: not written)
  std::vector<uint32_t> group_begin;    // group g covers positions [group_begin[g], group_end[g])
  std::vector<uint32_t> group_end;
  // Per group: events still due before its headers go out (each written block's payload
  // completing and its checksum being computed, Note [Checksums beside the payload]), then its
  // header ops still in flight. Touched by the completion thread and the verify pool.
  std::unique_ptr<std::atomic<uint32_t>[]> group_pending;
  std::atomic<uint32_t> groups_left{0};  // groups whose headers are not yet on disk
  std::mutex ops_mu;  // writes: appends to ops (header ops, the fdatasync) once I/O started
  std::byte* headers = nullptr; // 4 KiB per request position, for header writes
  ~Request() { free(headers); }
  std::mutex err_mu;
  std::string first_error;  // guarded by err_mu
  std::shared_ptr<TransferState> state;
};

NvmeTier::NvmeTier(const NvmeTierOptions& options, HostPool& staging)
    : options_(options), staging_(staging), slots_(options.num_slots) {}

Result<std::unique_ptr<NvmeTier>> NvmeTier::Open(const NvmeTierOptions& options, HostPool& staging) {
  if (options.directory.empty()) return InvalidArgument("the NVMe tier needs a directory");
  if (options.block_bytes == 0) return InvalidArgument("block_bytes must be > 0");
  if (options.num_slots == 0) return InvalidArgument("the NVMe tier needs at least one slot (capacity below one block?)");
  if (options.queue_depth == 0 || options.queue_depth > 4096) {
    return InvalidArgument("queue_depth must be in [1, 4096], got " + std::to_string(options.queue_depth));
  }
  if (options.max_io_bytes < kAlign || options.max_io_bytes % kAlign != 0 || options.max_io_bytes > (uint64_t{1} << 30)) {
    return InvalidArgument("max_io_bytes must be a multiple of 4096 in [4096, 1 GiB]");
  }
  if (staging.block_bytes() != options.block_bytes) {
    return InvalidArgument("the staging pool has " + std::to_string(staging.block_bytes()) +
                           "-byte blocks but the NVMe tier stores " + std::to_string(options.block_bytes));
  }
  std::unique_ptr<NvmeTier> tier(new NvmeTier(options, staging));
  KVTIER_RETURN_IF_ERROR(tier->Init());
  return tier;
}

Status NvmeTier::Init() {
  namespace fs = std::filesystem;
  payload_bytes_ = RoundUp(options_.block_bytes, kAlign);
  header_table_bytes_ = kHeaderBytes * options_.num_slots;
  std::error_code ec;
  fs::create_directories(options_.directory, ec);
  if (ec) return InvalidArgument("cannot create the NVMe tier directory " + options_.directory + ": " + ec.message());
  super_path_ = (fs::path(options_.directory) / "kvtier.super").string();
  slots_path_ = (fs::path(options_.directory) / "kvtier.slots").string();

  // ---- superblock: create or check; an exclusive lock keeps a second process out.
  super_fd_ = open(super_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (super_fd_ < 0) return InvalidArgument("cannot open " + super_path_ + ": " + Errno(errno));
  if (flock(super_fd_, LOCK_EX | LOCK_NB) != 0) {
    return BusyError("the NVMe tier at " + options_.directory + " is open in another process or object");
  }
  SuperBlock want{};
  std::memcpy(want.magic, kSuperMagic, 8);
  want.version = kFormatVersion;
  want.block_bytes = options_.block_bytes;
  want.payload_bytes = payload_bytes_;
  want.num_slots = options_.num_slots;
  want.checksum = Checksum64(&want, offsetof(SuperBlock, checksum));
  SuperBlock have{};
  const ssize_t got = pread(super_fd_, &have, sizeof(have), 0);
  const bool fresh = (got == 0);
  if (!fresh) {
    if (got != static_cast<ssize_t>(sizeof(have)) || std::memcmp(have.magic, kSuperMagic, 8) != 0 ||
        have.checksum != Checksum64(&have, offsetof(SuperBlock, checksum))) {
      return InvalidArgument(super_path_ + " is not a valid kvtier NVMe superblock (corrupt, or another file)");
    }
    if (have.version != kFormatVersion) {
      return InvalidArgument(super_path_ + " has format version " + std::to_string(have.version) +
                             "; this kvtier reads version " + std::to_string(kFormatVersion));
    }
    if (have.block_bytes != want.block_bytes || have.num_slots != want.num_slots) {
      return InvalidArgument("the NVMe tier at " + options_.directory + " holds " + std::to_string(have.num_slots) +
                             " slots of " + std::to_string(have.block_bytes) + "-byte blocks; reopen it with the same "
                             "block size and capacity, or use another directory (asked for " +
                             std::to_string(want.num_slots) + " x " + std::to_string(want.block_bytes) + ")");
    }
  }

  // ---- slots file: O_DIRECT unless the caller opted in to buffered I/O.
  int flags = O_RDWR | O_CREAT | O_CLOEXEC;
  fd_ = open(slots_path_.c_str(), flags | O_DIRECT, 0644);
  if (fd_ < 0 && errno == EINVAL) {
    if (!options_.allow_buffered_io) {
      return InvalidArgument("the file system holding " + slots_path_ +
                             " refuses O_DIRECT (tmpfs or an overlay file system?); put the tier on a real disk, "
                             "or pass allow_buffered_io=True to use the page cache instead (slower, not direct)");
    }
    direct_ = false;
    fd_ = open(slots_path_.c_str(), flags, 0644);
  }
  if (fd_ < 0) return InvalidArgument("cannot open " + slots_path_ + ": " + Errno(errno));
  const uint64_t file_bytes = header_table_bytes_ + payload_bytes_ * options_.num_slots;
  struct stat st{};
  fstat(fd_, &st);
  if (static_cast<uint64_t>(st.st_size) < file_bytes) {
    if (int rc = posix_fallocate(fd_, 0, static_cast<off_t>(file_bytes)); rc != 0) {
      return OutOfCapacity("cannot preallocate " + std::to_string(file_bytes) + " bytes for " + slots_path_ + ": " +
                           Errno(rc));
    }
  }
  if (fresh) {
    if (pwrite(super_fd_, &want, sizeof(want), 0) != static_cast<ssize_t>(sizeof(want)) || fdatasync(super_fd_) != 0) {
      return TransferError("cannot write the superblock " + super_path_ + ": " + Errno(errno));
    }
    int dfd = open(options_.directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      fsync(dfd);
      close(dfd);
    }
  }

  // ---- io_uring: one ring; the file and the staging arena registered once.
  uint32_t entries = 1;
  while (entries < options_.queue_depth + 1) entries <<= 1;
  if (int rc = io_uring_queue_init(entries, &ring_, 0); rc < 0) {
    return Unavailable("io_uring_queue_init failed: " + Errno(-rc));
  }
  ring_ready_ = true;
  if (int rc = io_uring_register_files(&ring_, &fd_, 1); rc < 0) {
    return Unavailable("io_uring_register_files failed: " + Errno(-rc));
  }
  const uint64_t stride = staging_.block_stride_bytes();
  iov_span_bytes_ = std::max<uint64_t>(stride, kMaxRegisteredSpan / stride * stride);
  const uint64_t arena_bytes = stride * staging_.num_blocks();
  std::vector<iovec> iovs;
  for (uint64_t off = 0; off < arena_bytes; off += iov_span_bytes_) {
    iovs.push_back(iovec{staging_.block_ptr(0) + off, static_cast<size_t>(std::min(iov_span_bytes_, arena_bytes - off))});
  }
  std::string fixed_note;
  if (int rc = io_uring_register_buffers(&ring_, iovs.data(), static_cast<unsigned>(iovs.size())); rc == 0) {
    fixed_buffers_ = true;
  } else {
    fixed_note = std::string(", fixed buffers refused (") + Errno(-rc) + ")";
  }
  io_mode_ = std::string(direct_ ? "O_DIRECT" : "buffered (allow_buffered_io)") + ", io_uring QD " +
             std::to_string(options_.queue_depth) + (fixed_buffers_ ? ", fixed buffers + fixed file" : fixed_note);

  KVTIER_RETURN_IF_ERROR(Recover());
  uint32_t verifiers = options_.verify_threads;
  if (verifiers == 0) verifiers = std::clamp<uint32_t>(std::thread::hardware_concurrency(), 1, 8);
  verify_pool_ = std::make_unique<ThreadPool>(static_cast<int>(verifiers));
  completion_thread_ = std::thread([this] { CompletionLoop(); });
  return Status::Ok();
}

Status NvmeTier::Recover() {
  // Read the header table in large chunks; a valid header puts its key in the index (the highest
  // generation wins when two slots claim one key). See Note [Recovery].
  constexpr uint64_t kChunk = uint64_t{1} << 20;
  void* buf = nullptr;
  if (posix_memalign(&buf, kAlign, kChunk) != 0) return OutOfCapacity("cannot allocate a header buffer");
  std::unique_ptr<void, decltype(&free)> guard(buf, &free);
  std::vector<std::pair<BlockKey, IndexEntry>> found;
  for (uint64_t off = 0; off < header_table_bytes_; off += kChunk) {
    const uint64_t len = std::min(kChunk, header_table_bytes_ - off);
    uint64_t got = 0;
    while (got < len) {
      const ssize_t n = pread(fd_, static_cast<std::byte*>(buf) + got, len - got, static_cast<off_t>(off + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return TransferError("reading the header table of " + slots_path_ + ": " + Errno(errno));
      if (n == 0) break;
      got += static_cast<uint64_t>(n);
    }
    for (uint64_t h_off = 0; h_off + kHeaderBytes <= got; h_off += kHeaderBytes) {
      const auto* h = reinterpret_cast<const SlotHeader*>(static_cast<const std::byte*>(buf) + h_off);
      if (std::memcmp(h->magic, kSlotMagic, 8) != 0 || h->version != kFormatVersion ||
          h->header_checksum != Checksum64(h, offsetof(SlotHeader, header_checksum)) ||
          h->payload_bytes != options_.block_bytes) {
        continue;
      }
      const auto slot = static_cast<uint32_t>((off + h_off) / kHeaderBytes);
      found.push_back({BlockKey{h->key_hi, h->key_lo}, IndexEntry{slot, h->payload_checksum, h->generation, true}});
    }
  }
  std::lock_guard<std::mutex> lock(index_mu_);
  for (auto& [key, entry] : found) {
    next_generation_ = std::max(next_generation_, entry.generation + 1);
    auto it = index_.find(key);
    if (it == index_.end()) {
      index_.emplace(key, entry);
    } else if (entry.generation > it->second.generation) {
      it->second = entry;
    }
  }
  // Claim exactly the slots the index points at; every other slot is free.
  std::vector<int32_t> claimed;
  for (auto& [key, entry] : index_) claimed.push_back(static_cast<int32_t>(entry.slot));
  std::sort(claimed.begin(), claimed.end());
  std::vector<int32_t> all(options_.num_slots);
  KVTIER_RETURN_IF_ERROR(slots_.Allocate(all.size(), all.data()));
  std::vector<int32_t> unclaimed;
  for (int32_t id : all) {
    if (!std::binary_search(claimed.begin(), claimed.end(), id)) unclaimed.push_back(id);
  }
  KVTIER_RETURN_IF_ERROR(slots_.Unref(unclaimed));
  recovered_.store(index_.size());
  return Status::Ok();
}

NvmeTier::~NvmeTier() {
  if (completion_thread_.joinable()) {
    Drain();
    {
      std::lock_guard<std::mutex> lock(sq_mu_);
      stopping_ = true;
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe != nullptr) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data(sqe, nullptr);
        io_uring_submit(&ring_);
      }
    }
    completion_thread_.join();
  }
  verify_pool_.reset();  // idle after Drain: every read's verification finished before its Finalize
  if (ring_ready_) io_uring_queue_exit(&ring_);
  if (fd_ >= 0) close(fd_);
  if (super_fd_ >= 0) close(super_fd_);  // releases the flock
}

void NvmeTier::Drain() {
  for (uint64_t n = active_requests_.load(); n != 0; n = active_requests_.load()) active_requests_.wait(n);
}

int NvmeTier::BufferIndex(const std::byte* p) const {
  const std::byte* base = staging_.block_ptr(0);
  const uint64_t arena = staging_.block_stride_bytes() * staging_.num_blocks();
  if (p < base || p >= base + arena) return -1;  // not in the registered arena (header buffers)
  return static_cast<int>(static_cast<uint64_t>(p - base) / iov_span_bytes_);
}

// ---------------------------------------------------------------- submission

void NvmeTier::Enqueue(IoOp* op) {
  std::lock_guard<std::mutex> lock(sq_mu_);
  if (op->kind == IoOp::Kind::kPayloadRead) read_bytes_outstanding_ += op->len;  // a short read's rest
  backlog_.push_back(op);
}

void NvmeTier::Pump() {
  std::lock_guard<std::mutex> lock(sq_mu_);
  unsigned prepared = 0;
  while (inflight_ops_ < options_.queue_depth && !backlog_.empty()) {
    IoOp* op = backlog_.front();
    // Note [Tapering reads]: in flight, at most three quarters of what is left to read. Checked
    // before an SQE is taken: a taken SQE is submitted whether or not it was prepared.
    const bool read = op->kind == IoOp::Kind::kPayloadRead;
    if (read && options_.taper_reads && read_bytes_inflight_ > 0 &&
        read_bytes_inflight_ + op->len > std::max(kMinReadWindow, read_bytes_outstanding_ / 4 * 3)) {
      break;
    }
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) break;
    if (read) read_bytes_inflight_ += op->len;
    backlog_.pop_front();
    const int index = fixed_buffers_ && op->buf != nullptr ? BufferIndex(op->buf) : -1;
    switch (op->kind) {
      case IoOp::Kind::kPayloadWrite:
      case IoOp::Kind::kHeaderWrite:
        if (index >= 0) {
          io_uring_prep_write_fixed(sqe, 0, op->buf, op->len, op->offset, index);
        } else {
          io_uring_prep_write(sqe, 0, op->buf, op->len, op->offset);
        }
        break;
      case IoOp::Kind::kPayloadRead:
        if (index >= 0) {
          io_uring_prep_read_fixed(sqe, 0, op->buf, op->len, op->offset, index);
        } else {
          io_uring_prep_read(sqe, 0, op->buf, op->len, op->offset);
        }
        break;
      case IoOp::Kind::kFsync:
        io_uring_prep_fsync(sqe, 0, IORING_FSYNC_DATASYNC);
        break;
    }
    sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data(sqe, op);
    ++inflight_ops_;
    ++prepared;
  }
  if (prepared > 0) io_uring_submit(&ring_);
}

// ---------------------------------------------------------------- completion

void NvmeTier::CompletionLoop() {
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(&ring_, &cqe);
    if (rc == -EINTR) continue;
    if (rc < 0) continue;  // transient; the ring stays usable
    unsigned head;
    unsigned seen = 0;
    std::vector<std::pair<IoOp*, int>> done;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      done.emplace_back(static_cast<IoOp*>(io_uring_cqe_get_data(cqe)), cqe->res);
      ++seen;
    }
    io_uring_cq_advance(&ring_, seen);
    bool stop = false;
    {
      std::lock_guard<std::mutex> lock(sq_mu_);
      for (auto& [op, res] : done) {
        if (op == nullptr) continue;  // the shutdown NOP
        --inflight_ops_;
        if (op->kind == IoOp::Kind::kPayloadRead) {
          read_bytes_inflight_ -= op->len;
          read_bytes_outstanding_ -= op->len;
        }
      }
      stop = stopping_ && inflight_ops_ == 0 && backlog_.empty();
    }
    Pump();  // refill the ring first: verifying checksums below takes a while
    for (auto& [op, res] : done) {
      if (op != nullptr) OnOpDone(op, res);
    }
    Pump();
    if (stop) return;
  }
}

void NvmeTier::OnOpDone(IoOp* op, int res) {
  Request& req = *op->req;
  if (op->kind != IoOp::Kind::kFsync && res >= 0) {
    const uint64_t every = inject_every_.load();
    if (every > 0 && (op_counter_.fetch_add(1) + 1) % every == 0) res = -EIO;
  }
  if (res >= 0 && op->kind != IoOp::Kind::kFsync && static_cast<uint32_t>(res) < op->len) {
    if (res == 0) {
      res = -EIO;  // unexpected end of file
    } else {
      // Short transfer: issue the rest (keeps 4 KiB alignment for O_DIRECT in practice).
      op->buf += res;
      op->offset += static_cast<uint64_t>(res);
      op->len -= static_cast<uint32_t>(res);
      Enqueue(op);
      return;
    }
  }
  if (res < 0) {
    std::lock_guard<std::mutex> lock(req.err_mu);
    if (req.first_error.empty()) {
      const char* what = op->kind == IoOp::Kind::kFsync ? "fdatasync" : req.is_write ? "write" : "read";
      req.first_error = std::string(what) + " of " + slots_path_ + " at offset " + std::to_string(op->offset) +
                        " failed: " + Errno(-res);
    }
  }
  switch (op->kind) {
    case IoOp::Kind::kFsync:
      if (res < 0) std::fill(req.ok.begin(), req.ok.end(), 0);
      fsyncs_.fetch_add(1);
      Finalize(req);
      return;
    case IoOp::Kind::kHeaderWrite:
      if (res < 0) std::fill_n(req.ok.begin() + op->first, op->count, 0);  // writes: identity order
      if (--req.group_pending[req.group_of[op->first]] == 0) GroupDone(req);
      return;
    case IoOp::Kind::kPayloadWrite:
    case IoOp::Kind::kPayloadRead: {
      // The last BlockDone may grow req.ops (headers) or delete req (Finalize): copy first.
      const uint32_t first = op->first, end = op->first + op->count;
      std::vector<uint32_t> whole;  // reads: blocks whose every chunk has now arrived
      for (uint32_t i = first; i < end; ++i) {
        const uint32_t b = req.position(i);
        if (res < 0) req.ok[b] = 0;
        // chunks_left is only touched by this thread.
        if (--req.chunks_left[b] != 0) continue;
        if (req.is_write) {
          if (req.hash_on_completion) HashAfterWrite(req, b);  // test switch only
          BlockDone(req, b, req.ok[b] != 0);
        } else {
          whole.push_back(b);
        }
      }
      // Note [Verifying reads in parallel]: the disk hands back completions in bursts (on this
      // machine's virtio disk, half of a 512 MiB read within a few ms), and checksumming a burst
      // on this thread alone left the caller waiting a median 6.5-8.1 ms (3-4% of the read)
      // after the last byte had arrived (3.1-5.8 ms with two verify threads). The verify pool
      // spreads each burst over the cores; the blocks of one op are verified together, in one
      // task.
      if (!whole.empty()) {
        verify_pool_->Post([this, r = &req, blocks = std::move(whole)] { VerifyBlocks(*r, blocks); });
      }
      return;
    }
  }
}

void NvmeTier::VerifyBlocks(Request& req, std::span<const uint32_t> blocks) {
  // Runs on the verify pool. Each block is reported once (its last chunk arrived); the last
  // report finalizes the request, so nothing of req is touched after the last BlockDone.
  for (const uint32_t b : blocks) {
    bool good = req.ok[b] != 0;
    if (!good) {
      read_errors_.fetch_add(1);
    } else if (Checksum64(staging_.block_ptr(req.pool_ids[b]), options_.block_bytes) != req.checksums[b]) {
      good = false;
      corrupt_.fetch_add(1);
      // Drop the damaged copy so it is never found again (unless it was rewritten meanwhile).
      std::lock_guard<std::mutex> lock(index_mu_);
      auto it = index_.find(req.keys[b]);
      if (it != index_.end() && it->second.slot == req.slots[b] && it->second.generation == req.generations[b]) {
        index_.erase(it);
        const int32_t slot = static_cast<int32_t>(req.slots[b]);
        (void)slots_.Unref(std::span<const int32_t>(&slot, 1));
      }
    }
    BlockDone(req, b, good);
  }
}

void NvmeTier::BlockDone(Request& req, uint32_t block, bool ok) {
  req.ok[block] = ok ? 1 : 0;
  if (req.is_write) {
    // Note [Header groups]: every payload of this block's group is done.
    const uint32_t g = req.group_of[block];
    if (--req.group_pending[g] == 0) StartHeaders(req, g);
    return;
  }
  if (req.blocks_left.fetch_sub(1) == 1) RequestIoDone(req);
}

void NvmeTier::GroupDone(Request& req) {
  if (--req.groups_left == 0) RequestIoDone(req);  // every header of the batch is written
}

void NvmeTier::HashBlocks(Request& req, std::span<const uint32_t> blocks) {
  // Runs on the verify pool or the writer's thread (Note [Checksums beside the payload]). A
  // block's checksum event is one of the two its header group waits for; once the last one of
  // this task is counted, req may be finished by another thread, so nothing of req is touched
  // after it (`blocks` is the task list's, which outlives req).
  for (const uint32_t b : blocks) {
    req.checksums[b] = Checksum64(staging_.block_ptr(req.pool_ids[b]), options_.block_bytes);
    const uint32_t g = req.group_of[b];
    if (--req.group_pending[g] == 0) StartHeaders(req, g);
  }
}

void NvmeTier::HashAfterWrite(Request& req, uint32_t b) {
  // Test switch (InjectStagingChange, after_write): the staging block changes after its payload
  // reached the disk and before it is hashed. Runs on the completion thread.
  if (InjectSelects(b)) *staging_.block_ptr(req.pool_ids[b]) ^= std::byte{0xFF};
  req.checksums[b] = Checksum64(staging_.block_ptr(req.pool_ids[b]), options_.block_bytes);
  --req.group_pending[req.group_of[b]];  // never the last event: the payload's follows
}

void NvmeTier::StartHeaders(Request& req, uint32_t group) {
  // One header per block of the group whose payload made it, merged into one request per run
  // of consecutive slots (their headers are adjacent in the table and in req.headers). req.ops
  // has room for them (reserved by Write): no reallocation while other ops of req are queued.
  std::vector<IoOp*> ops;
  for (uint32_t b = req.group_begin[group]; b < req.group_end[group]; ++b) {
    if (!req.active[b] || !req.ok[b]) continue;
    auto* h = reinterpret_cast<SlotHeader*>(req.headers + uint64_t(b) * kHeaderBytes);
    std::memset(h, 0, kHeaderBytes);
    std::memcpy(h->magic, kSlotMagic, 8);
    h->version = kFormatVersion;
    h->key_hi = req.keys[b].hi;
    h->key_lo = req.keys[b].lo;
    h->generation = req.generations[b];
    h->payload_bytes = options_.block_bytes;
    h->payload_checksum = req.checksums[b];
    h->header_checksum = Checksum64(h, offsetof(SlotHeader, header_checksum));
    IoOp* last = ops.empty() ? nullptr : ops.back();
    if (last != nullptr && last->first + last->count == b && req.slots[b] == req.slots[b - 1] + 1 &&
        last->len + kHeaderBytes <= options_.max_io_bytes) {
      ++last->count;
      last->len += static_cast<uint32_t>(kHeaderBytes);
      continue;
    }
    // Groups may start on different threads (the completion thread, a verify thread): appends
    // to req.ops are serialized; the room was reserved by Write, so queued ops never move.
    std::lock_guard<std::mutex> lock(req.ops_mu);
    req.ops.push_back(IoOp{IoOp::Kind::kHeaderWrite, b, 1, &req, req.headers + uint64_t(b) * kHeaderBytes,
                           static_cast<uint32_t>(kHeaderBytes), header_offset(req.slots[b])});
    ops.push_back(&req.ops.back());
  }
  if (ops.empty()) {
    GroupDone(req);
    return;
  }
  req.group_pending[group].store(static_cast<uint32_t>(ops.size()));
  {
    // Ahead of queued payloads: headers are small, and the batch's tail waits on the last ones.
    std::lock_guard<std::mutex> lock(sq_mu_);
    backlog_.insert(backlog_.begin(), ops.begin(), ops.end());
  }
  Pump();  // req may be finished (and freed) from here on: not touched again
}

void NvmeTier::AssignHeaderGroups(Request& req) const {
  // Note [Header groups]: consecutive written positions, at most kGroupHeaders blocks (1 MiB of
  // headers, one request when their slots are consecutive) and kGroupPayloadBytes of payload.
  const uint32_t n = static_cast<uint32_t>(req.keys.size());
  const uint64_t per_group = std::max<uint64_t>(1, std::min<uint64_t>(kGroupHeaders, kGroupPayloadBytes / payload_bytes_));
  req.group_of.assign(n, kNoGroup);
  std::vector<uint32_t> blocks_in;
  uint64_t in_group = per_group;  // full: the first written block opens group 0
  for (uint32_t b = 0; b < n; ++b) {
    if (!req.active[b]) continue;
    if (in_group == per_group) {
      req.group_begin.push_back(b);
      req.group_end.push_back(b);
      blocks_in.push_back(0);
      in_group = 0;
    }
    const uint32_t g = static_cast<uint32_t>(req.group_begin.size() - 1);
    req.group_of[b] = g;
    req.group_end[g] = b + 1;
    ++blocks_in[g];
    ++in_group;
  }
  // Two events per block: its payload written, its checksum computed.
  req.group_pending = std::make_unique<std::atomic<uint32_t>[]>(blocks_in.size());
  for (size_t g = 0; g < blocks_in.size(); ++g) req.group_pending[g].store(2 * blocks_in[g]);
  req.groups_left.store(static_cast<uint32_t>(req.group_begin.size()));
}

void NvmeTier::RequestIoDone(Request& req) {
  const bool any_written = req.is_write && std::any_of(req.ok.begin(), req.ok.end(), [](uint8_t v) { return v; });
  if (any_written && options_.durable) {
    IoOp* op;
    {
      std::lock_guard<std::mutex> lock(req.ops_mu);
      req.ops.push_back(IoOp{IoOp::Kind::kFsync, 0, 0, &req, nullptr, 0, 0});
      op = &req.ops.back();
    }
    Enqueue(op);  // Finalize runs on its completion
    Pump();       // this may run on a verify thread (a group with no header to write)
    return;
  }
  Finalize(req);
}

void NvmeTier::BuildPayloadOps(Request& req, IoOp::Kind kind) {
  // Note [Request merging]: runs of positions (in req.order, for reads) whose slots and pool
  // blocks are both consecutive become one request of up to max_io_bytes; a larger block is split.
  const uint32_t n = static_cast<uint32_t>(req.order.empty() ? req.keys.size() : req.order.size());
  const uint64_t max_io = options_.max_io_bytes;
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t b = req.position(i);
    if (!req.active[b]) continue;
    std::byte* ptr = staging_.block_ptr(req.pool_ids[b]);
    const uint64_t off = payload_offset(req.slots[b]);
    if (payload_bytes_ > max_io) {
      req.chunks_left[b] = static_cast<uint32_t>((payload_bytes_ + max_io - 1) / max_io);
      for (uint64_t c = 0; c < payload_bytes_; c += max_io) {
        req.ops.push_back(IoOp{kind, i, 1, &req, ptr + c, static_cast<uint32_t>(std::min(max_io, payload_bytes_ - c)),
                               off + c});
      }
      continue;
    }
    req.chunks_left[b] = 1;
    if (!req.ops.empty()) {
      IoOp& last = req.ops.back();
      const uint32_t prev_i = last.first + last.count - 1;
      const uint32_t prev = req.position(prev_i);
      if (last.kind == kind && prev_i + 1 == i && last.len + payload_bytes_ <= max_io &&
          req.slots[b] == req.slots[prev] + 1 && ptr == last.buf + last.len &&
          BufferIndex(ptr) == BufferIndex(last.buf)) {
        ++last.count;
        last.len += static_cast<uint32_t>(payload_bytes_);
        continue;
      }
    }
    req.ops.push_back(IoOp{kind, i, 1, &req, ptr, static_cast<uint32_t>(payload_bytes_), off});
  }
}

void NvmeTier::Finalize(Request& req) {
  uint64_t ok_blocks = 0, bad_blocks = 0;
  {
    std::lock_guard<std::mutex> lock(index_mu_);
    for (size_t b = 0; b < req.keys.size(); ++b) {
      if (!req.active[b]) continue;
      const int32_t slot = static_cast<int32_t>(req.slots[b]);
      if (req.is_write) {
        auto it = index_.find(req.keys[b]);
        if (req.ok[b]) {
          if (it != index_.end() && it->second.slot == req.slots[b]) {
            it->second.checksum = req.checksums[b];
            it->second.valid = true;
          }
          ++ok_blocks;
        } else {
          if (it != index_.end() && it->second.slot == req.slots[b]) index_.erase(it);
          (void)slots_.Unref(std::span<const int32_t>(&slot, 1));
          ++bad_blocks;
        }
      } else {
        (void)slots_.Unref(std::span<const int32_t>(&slot, 1));  // the read's lease on the slot
        req.ok[b] ? ++ok_blocks : ++bad_blocks;
      }
    }
  }
  const uint64_t payload = options_.block_bytes;
  if (req.is_write) {
    blocks_written_.fetch_add(ok_blocks);
    bytes_written_.fetch_add(ok_blocks * payload);
    write_errors_.fetch_add(bad_blocks);
  } else {
    read_hits_.fetch_add(ok_blocks);
    bytes_read_.fetch_add(ok_blocks * payload);
  }
  staging_.Release(req.pool_ids);
  std::shared_ptr<TransferState> state = std::move(req.state);
  state->SetBlockOk(req.ok);
  Status status;
  if (req.is_write && bad_blocks > 0) {
    std::lock_guard<std::mutex> lock(req.err_mu);
    status = TransferError(std::to_string(bad_blocks) + " of " + std::to_string(req.keys.size()) +
                           " blocks were not written: " + req.first_error);
  }
  delete &req;  // the request owns its ops; nothing references it after this point
  state->Complete(std::move(status));
  active_requests_.fetch_sub(1);
  active_requests_.notify_all();
}

// ---------------------------------------------------------------- API

Status NvmeTier::CheckBatch(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids) const {
  if (keys.size() != pool_ids.size()) {
    return InvalidArgument("keys and pool ids differ in length (" + std::to_string(keys.size()) + " vs " +
                           std::to_string(pool_ids.size()) + ")");
  }
  return Status::Ok();
}

std::unique_ptr<NvmeTier::Request> NvmeTier::NewRequest(bool is_write, std::span<const BlockKey> keys,
                                                        std::span<const int32_t> pool_ids,
                                                        std::shared_ptr<TransferState> state) const {
  const size_t n = keys.size();
  auto req = std::make_unique<Request>();
  req->is_write = is_write;
  req->keys.assign(keys.begin(), keys.end());
  req->pool_ids.assign(pool_ids.begin(), pool_ids.end());
  req->slots.assign(n, 0);
  req->checksums.assign(n, 0);
  req->generations.assign(n, 0);
  req->chunks_left.assign(n, 0);
  req->ok.assign(n, is_write ? 1 : 0);  // writes: ok until an I/O fails; reads: ok once verified
  req->active.assign(n, 0);
  req->state = std::move(state);
  return req;
}

Result<std::shared_ptr<TransferState>> NvmeTier::Write(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids) {
  KVTIER_RETURN_IF_ERROR(CheckBatch(keys, pool_ids));
  auto state = std::make_shared<TransferState>(keys.size(), keys.size() * options_.block_bytes);
  if (keys.empty()) {
    state->Complete(Status::Ok());
    return state;
  }
  KVTIER_RETURN_IF_ERROR(staging_.Acquire(pool_ids, /*write=*/false));
  auto req = NewRequest(/*is_write=*/true, keys, pool_ids, state);
  const size_t n = keys.size();
  // Claim slots for keys not stored yet (all or nothing), under the index lock.
  std::vector<uint32_t> fresh;
  fresh.reserve(n);
  {
    // A key repeated within the batch is written once (its first position). A hash set, not a
    // scan of `fresh`: the scan was quadratic (2.5 ms before the first request at 2730 blocks).
    std::unordered_set<BlockKey, BlockKeyHash> in_batch;
    in_batch.reserve(n);
    std::lock_guard<std::mutex> lock(index_mu_);
    for (size_t b = 0; b < n; ++b) {
      if (index_.find(req->keys[b]) == index_.end() && in_batch.insert(req->keys[b]).second) {
        fresh.push_back(static_cast<uint32_t>(b));
      }
    }
    std::vector<int32_t> ids(fresh.size());
    if (Status st = slots_.Allocate(fresh.size(), ids.data()); !st.ok()) {
      staging_.Release(pool_ids);
      state->SetBlockOk(std::vector<uint8_t>(n, 0));
      state->Complete(OutOfCapacity("the NVMe tier is full: " + std::to_string(fresh.size()) + " new blocks, " +
                                    std::to_string(slots_.free_blocks()) + " of " + std::to_string(options_.num_slots) +
                                    " slots free; evict blocks or grow the tier"));
      return state;
    }
    // Ascending slots for ascending positions: consecutive free slots then merge into one
    // request (Note [Request merging]) whatever order eviction returned them in.
    std::sort(ids.begin(), ids.end());
    for (size_t i = 0; i < fresh.size(); ++i) {
      const uint32_t b = fresh[i];
      req->slots[b] = static_cast<uint32_t>(ids[i]);
      req->generations[b] = next_generation_++;
      req->active[b] = 1;
      index_.emplace(req->keys[b], IndexEntry{req->slots[b], 0, req->generations[b], false});
    }
  }
  dedup_.fetch_add(n - fresh.size());
  if (fresh.empty()) {
    staging_.Release(pool_ids);
    state->SetBlockOk(std::vector<uint8_t>(n, 1));
    state->Complete(Status::Ok());
    return state;
  }
  // Checksums (the caller's thread, GIL released by the binding), then the op list.
  void* headers = nullptr;
  if (posix_memalign(&headers, kAlign, kHeaderBytes * n) != 0) {
    Request* r = req.release();
    std::fill(r->ok.begin(), r->ok.end(), 0);
    r->first_error = "cannot allocate header buffers";
    active_requests_.fetch_add(1);
    Finalize(*r);  // frees the claimed slots and completes the handle with the error
    return state;
  }
  req->headers = static_cast<std::byte*>(headers);
  for (size_t b = 0; b < n; ++b) {
    if (!req->active[b]) req->ok[b] = 1;  // already stored
  }
  // Room for every op the request will ever have (payload chunks, at most one header op per
  // block, the fdatasync): ops are referenced by the ring, so req.ops must never reallocate.
  req->ops.reserve(fresh.size() * ((payload_bytes_ + options_.max_io_bytes - 1) / options_.max_io_bytes) +
                   fresh.size() + 1);
  BuildPayloadOps(*req, IoOp::Kind::kPayloadWrite);
  write_ops_.fetch_add(req->ops.size());
  AssignHeaderGroups(*req);
  active_requests_.fetch_add(1);
  Request* raw = req.release();
  // Note [Checksums beside the payload]: every payload op goes to the ring now, and the blocks'
  // checksums are computed on the verify pool and the caller's thread while the disk writes
  // them. A block's checksum is needed only by its header, which waits for both (Note [Header
  // groups]).
  // Once the last hash task is posted the request may finish (and be freed) on another thread,
  // so everything the caller's thread needs from *raw is taken before.
  const uint64_t inject_every = inject_staging_every_.load();
  const bool after_write = inject_after_write_.load();
  raw->hash_on_completion = inject_every > 0 && after_write;
  std::vector<std::vector<uint32_t>> tasks;
  if (inject_every > 0 && !after_write) {
    // Test switch (InjectStagingChange): hash first, then change the staging block, then write.
    for (const uint32_t b : fresh) {
      raw->checksums[b] = Checksum64(staging_.block_ptr(raw->pool_ids[b]), options_.block_bytes);
      --raw->group_pending[raw->group_of[b]];  // nothing is submitted yet: never the last event
      if (InjectSelects(b)) *staging_.block_ptr(raw->pool_ids[b]) ^= std::byte{0xFF};
    }
  } else if (!raw->hash_on_completion) {
    // In submission order, a few MiB per task, so the first groups' checksums come first and
    // the pool's threads share the batch.
    constexpr uint64_t kHashTaskBytes = uint64_t{8} << 20;
    uint64_t bytes = kHashTaskBytes;
    for (const uint32_t b : fresh) {
      if (bytes >= kHashTaskBytes) {
        tasks.emplace_back();
        bytes = 0;
      }
      tasks.back().push_back(b);
      bytes += payload_bytes_;
    }
  }
  {
    std::lock_guard<std::mutex> lock(sq_mu_);
    for (IoOp& op : raw->ops) backlog_.push_back(&op);
  }
  Pump();
  if (tasks.empty()) return state;
  // The caller's thread hashes too, beside the pool's: each thread claims the next task in
  // order. On a loaded machine the pool's threads may wait for a core while the caller's thread
  // has one; a block trace showed a batch's last headers trickling out 200 ms after its payloads
  // when only the pool hashed. Once a thread finds no task left it touches nothing of *raw (the
  // request may be finished by then); the shared list outlives it.
  struct HashWork {
    std::vector<std::vector<uint32_t>> tasks;
    std::atomic<size_t> next{0};
  };
  auto work = std::make_shared<HashWork>();
  work->tasks = std::move(tasks);
  auto run = [this, raw, work] {
    for (size_t i = work->next.fetch_add(1); i < work->tasks.size(); i = work->next.fetch_add(1)) {
      HashBlocks(*raw, work->tasks[i]);
    }
  };
  const size_t helpers = std::min<size_t>(verify_pool_->size(), work->tasks.size() - 1);
  for (size_t i = 0; i < helpers; ++i) verify_pool_->Post(run);
  run();
  return state;
}

Result<std::shared_ptr<TransferState>> NvmeTier::Read(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids) {
  KVTIER_RETURN_IF_ERROR(CheckBatch(keys, pool_ids));
  auto state = std::make_shared<TransferState>(keys.size(), keys.size() * options_.block_bytes);
  if (keys.empty()) {
    state->Complete(Status::Ok());
    return state;
  }
  if (auto d = FindRepeatedId(pool_ids)) {
    return InvalidArgument("target block " + std::to_string(*d) + " appears more than once in one batch");
  }
  KVTIER_RETURN_IF_ERROR(staging_.Acquire(pool_ids, /*write=*/true));
  auto req = NewRequest(/*is_write=*/false, keys, pool_ids, state);
  const size_t n = keys.size();
  uint32_t hits = 0;
  {
    std::lock_guard<std::mutex> lock(index_mu_);
    for (size_t b = 0; b < n; ++b) {
      auto it = index_.find(req->keys[b]);
      if (it == index_.end() || !it->second.valid) continue;
      const int32_t slot = static_cast<int32_t>(it->second.slot);
      (void)slots_.Ref(std::span<const int32_t>(&slot, 1));  // lease: eviction waits for this read
      req->slots[b] = it->second.slot;
      req->checksums[b] = it->second.checksum;
      req->generations[b] = it->second.generation;
      req->active[b] = 1;
      req->ok[b] = 1;
      ++hits;
    }
  }
  read_misses_.fetch_add(n - hits);
  if (hits == 0) {
    staging_.Release(pool_ids);
    state->SetBlockOk(std::vector<uint8_t>(n, 0));
    state->Complete(Status::Ok());
    return state;
  }
  req->ops.reserve(hits * ((payload_bytes_ + options_.max_io_bytes - 1) / options_.max_io_bytes));
  // Note [Reads in file order]: a batch's reads are built and go to the ring in ascending file
  // offset, whatever order the caller listed the blocks in, and runs adjacent on disk and in the
  // pool become one op (Note [Request merging]). A batch read in random order thus reaches the
  // disk as the fewest, largest requests its slots allow: a random-order read of every block of a
  // file becomes a sequential one. NIXL and fio issue in the caller's order.
  // Sorting the ops alone (before 2026-12-06) was not enough: a 192 KiB random read still went to
  // the ring as one op per block, so the queue depth (256 ops) held 48 MiB; the block layer merged
  // them into ~4 MiB requests but only ~12 were ever in flight, against ~64 for the same bytes read
  // in order (a virtio disk, `kvtier bench nvme`: 0.88x NIXL, `slower`).
  req->order.reserve(hits);
  for (uint32_t b = 0; b < n; ++b) {
    if (req->active[b]) req->order.push_back(b);
  }
  std::stable_sort(req->order.begin(), req->order.end(),
                   [&r = *req](uint32_t a, uint32_t b) { return r.slots[a] < r.slots[b]; });
  BuildPayloadOps(*req, IoOp::Kind::kPayloadRead);
  read_ops_.fetch_add(req->ops.size());
  req->blocks_left.store(hits);
  active_requests_.fetch_add(1);
  Request* raw = req.release();  // owned by its ops from here on; Finalize frees it
  {
    // No op reaches the ring before sq_mu_ is released, so raw lives through this loop.
    std::lock_guard<std::mutex> lock(sq_mu_);
    for (IoOp& op : raw->ops) {  // already in file order
      read_bytes_outstanding_ += op.len;
      backlog_.push_back(&op);
    }
  }
  Pump();
  return state;
}

void NvmeTier::Contains(std::span<const BlockKey> keys, uint8_t* out) const {
  std::lock_guard<std::mutex> lock(index_mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = index_.find(keys[i]);
    out[i] = (it != index_.end() && it->second.valid) ? 1 : 0;
  }
}

uint64_t NvmeTier::Evict(std::span<const BlockKey> keys) {
  std::vector<int32_t> freed;
  std::lock_guard<std::mutex> lock(index_mu_);
  for (const BlockKey& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end() || !it->second.valid) continue;  // absent, or its write is in flight
    freed.push_back(static_cast<int32_t>(it->second.slot));
    index_.erase(it);
  }
  (void)slots_.Unref(freed);  // each slot is freed once in-flight reads of it finish
  evicted_.fetch_add(freed.size());
  return freed.size();
}

std::vector<BlockKey> NvmeTier::Keys() const {
  std::lock_guard<std::mutex> lock(index_mu_);
  std::vector<BlockKey> keys;
  keys.reserve(index_.size());
  for (const auto& [k, e] : index_) {
    if (e.valid) keys.push_back(k);
  }
  return keys;
}

NvmeTierStats NvmeTier::stats() const {
  NvmeTierStats s;
  s.num_slots = options_.num_slots;
  s.used_slots = options_.num_slots - slots_.free_blocks();
  s.blocks_written = blocks_written_.load();
  s.blocks_deduplicated = dedup_.load();
  s.write_errors = write_errors_.load();
  s.read_hits = read_hits_.load();
  s.read_misses = read_misses_.load() + corrupt_.load() + read_errors_.load();
  s.corrupt_blocks = corrupt_.load();
  s.read_errors = read_errors_.load();
  s.bytes_written = bytes_written_.load();
  s.bytes_read = bytes_read_.load();
  s.recovered_blocks = recovered_.load();
  s.evicted_blocks = evicted_.load();
  s.fsyncs = fsyncs_.load();
  s.read_ops = read_ops_.load();
  s.write_ops = write_ops_.load();
  return s;
}

}  // namespace kvtier
