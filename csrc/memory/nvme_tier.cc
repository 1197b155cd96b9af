#include "memory/nvme_tier.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

namespace kvtier {
namespace {

constexpr uint64_t kAlign = 4096;
constexpr uint64_t kHeaderBytes = 4096;
constexpr uint64_t kMaxRegisteredSpan = uint64_t{1} << 30;  // io_uring: at most 1 GiB per buffer
constexpr char kSuperMagic[8] = {'K', 'V', 'T', 'S', 'U', 'P', 'R', '1'};
constexpr char kSlotMagic[8] = {'K', 'V', 'T', 'S', 'L', 'O', 'T', '1'};
constexpr uint32_t kFormatVersion = 1;

uint64_t RoundUp(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

struct SuperBlock {
  char magic[8];
  uint32_t version;
  uint32_t reserved;
  uint64_t block_bytes;
  uint64_t slot_bytes;
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
  std::vector<IoOp> ops;        // stable storage: never resized after setup
  std::atomic<uint32_t> blocks_left{0};
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
  if (options.io_chunk_bytes < kAlign || options.io_chunk_bytes % kAlign != 0) {
    return InvalidArgument("io_chunk_bytes must be a positive multiple of 4096");
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
  slot_bytes_ = payload_bytes_ + kHeaderBytes;
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
  want.slot_bytes = slot_bytes_;
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
  const uint64_t file_bytes = slot_bytes_ * options_.num_slots;
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

  // ---- header buffers: queue_depth aligned 4 KiB pages.
  const size_t header_area_bytes = kHeaderBytes * options_.queue_depth;
  void* area = mmap(nullptr, header_area_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (area == MAP_FAILED) return OutOfCapacity("cannot map header buffers: " + Errno(errno));
  header_area_ = static_cast<std::byte*>(area);
  for (uint32_t i = 0; i < options_.queue_depth; ++i) free_headers_.push_back(header_area_ + i * kHeaderBytes);

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
  header_buf_index_ = static_cast<int>(iovs.size());
  iovs.push_back(iovec{header_area_, header_area_bytes});
  std::string fixed_note;
  if (int rc = io_uring_register_buffers(&ring_, iovs.data(), static_cast<unsigned>(iovs.size())); rc == 0) {
    fixed_buffers_ = true;
  } else {
    fixed_note = std::string(", fixed buffers refused (") + Errno(-rc) + ")";
  }
  io_mode_ = std::string(direct_ ? "O_DIRECT" : "buffered (allow_buffered_io)") + ", io_uring QD " +
             std::to_string(options_.queue_depth) + (fixed_buffers_ ? ", fixed buffers + fixed file" : fixed_note);

  KVTIER_RETURN_IF_ERROR(Recover());
  completion_thread_ = std::thread([this] { CompletionLoop(); });
  return Status::Ok();
}

Status NvmeTier::Recover() {
  // Read every slot header; a valid one puts its key in the index (highest generation wins).
  void* buf = nullptr;
  if (posix_memalign(&buf, kAlign, kHeaderBytes) != 0) return OutOfCapacity("cannot allocate a header buffer");
  std::unique_ptr<void, decltype(&free)> guard(buf, &free);
  std::vector<int32_t> used;
  std::vector<std::pair<BlockKey, IndexEntry>> found;
  for (uint32_t s = 0; s < options_.num_slots; ++s) {
    const off_t off = static_cast<off_t>(uint64_t(s) * slot_bytes_ + payload_bytes_);
    const ssize_t n = pread(fd_, buf, kHeaderBytes, off);
    if (n != static_cast<ssize_t>(kHeaderBytes)) {
      if (n < 0) return TransferError("reading slot header " + std::to_string(s) + " of " + slots_path_ + ": " + Errno(errno));
      continue;
    }
    const auto* h = static_cast<const SlotHeader*>(buf);
    if (std::memcmp(h->magic, kSlotMagic, 8) != 0 || h->version != kFormatVersion ||
        h->header_checksum != Checksum64(h, offsetof(SlotHeader, header_checksum)) ||
        h->payload_bytes != options_.block_bytes) {
      continue;
    }
    found.push_back({BlockKey{h->key_hi, h->key_lo}, IndexEntry{s, h->payload_checksum, h->generation, true}});
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
  // BlockAllocator hands out ids lowest first; allocate all, then give back the unclaimed ones.
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
  if (ring_ready_) io_uring_queue_exit(&ring_);
  if (header_area_ != nullptr) munmap(header_area_, kHeaderBytes * options_.queue_depth);
  if (fd_ >= 0) close(fd_);
  if (super_fd_ >= 0) close(super_fd_);  // releases the flock
}

void NvmeTier::Drain() {
  for (uint64_t n = active_requests_.load(); n != 0; n = active_requests_.load()) active_requests_.wait(n);
}

int NvmeTier::BufferIndex(const std::byte* p) const {
  if (p >= header_area_ && p < header_area_ + kHeaderBytes * options_.queue_depth) return header_buf_index_;
  return static_cast<int>(static_cast<uint64_t>(p - staging_.block_ptr(0)) / iov_span_bytes_);
}

// ---------------------------------------------------------------- submission

void NvmeTier::Enqueue(IoOp* op) {
  std::lock_guard<std::mutex> lock(sq_mu_);
  backlog_.push_back(op);
}

void NvmeTier::Pump() {
  std::lock_guard<std::mutex> lock(sq_mu_);
  unsigned prepared = 0;
  while (inflight_ops_ < options_.queue_depth && !backlog_.empty()) {
    IoOp* op = backlog_.front();
    if (op->kind == IoOp::Kind::kHeaderWrite && op->buf == nullptr) {
      if (free_headers_.empty()) break;  // cannot happen: headers == queue_depth >= inflight
      op->buf = free_headers_.back();
      free_headers_.pop_back();
      const Request& r = *op->req;
      std::memset(op->buf, 0, kHeaderBytes);
      auto* h = reinterpret_cast<SlotHeader*>(op->buf);
      std::memcpy(h->magic, kSlotMagic, 8);
      h->version = kFormatVersion;
      h->key_hi = r.keys[op->block].hi;
      h->key_lo = r.keys[op->block].lo;
      h->generation = r.generations[op->block];
      h->payload_bytes = options_.block_bytes;
      h->payload_checksum = r.checksums[op->block];
      h->header_checksum = Checksum64(h, offsetof(SlotHeader, header_checksum));
    }
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) break;
    backlog_.pop_front();
    switch (op->kind) {
      case IoOp::Kind::kPayloadWrite:
      case IoOp::Kind::kHeaderWrite:
        if (fixed_buffers_) {
          io_uring_prep_write_fixed(sqe, 0, op->buf, op->len, op->offset, BufferIndex(op->buf));
        } else {
          io_uring_prep_write(sqe, 0, op->buf, op->len, op->offset);
        }
        break;
      case IoOp::Kind::kPayloadRead:
        if (fixed_buffers_) {
          io_uring_prep_read_fixed(sqe, 0, op->buf, op->len, op->offset, BufferIndex(op->buf));
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
        if (op->kind == IoOp::Kind::kHeaderWrite && op->buf != nullptr) {
          // The buffer goes back after the completion is handled below; keep it until then.
        }
      }
      stop = stopping_ && inflight_ops_ == 0 && backlog_.empty();
    }
    for (auto& [op, res] : done) {
      if (op != nullptr) OnOpDone(op, res);
    }
    Pump();
    if (stop) return;
  }
}

void NvmeTier::OnOpDone(IoOp* op, int res) {
  Request& req = *op->req;
  const bool injectable = op->kind != IoOp::Kind::kFsync;
  if (injectable && res >= 0) {
    const uint64_t every = inject_every_.load();
    if (every > 0 && (op_counter_.fetch_add(1) + 1) % every == 0) res = -EIO;
  }
  if (op->kind == IoOp::Kind::kHeaderWrite) {
    std::lock_guard<std::mutex> lock(sq_mu_);
    free_headers_.push_back(op->buf);
    op->buf = nullptr;
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
      if (res < 0) {
        std::fill(req.ok.begin(), req.ok.end(), 0);
      }
      fsyncs_.fetch_add(1);
      Finalize(req);
      return;
    case IoOp::Kind::kHeaderWrite:
      BlockDone(req, op->block, res >= 0);
      return;
    case IoOp::Kind::kPayloadWrite:
    case IoOp::Kind::kPayloadRead: {
      if (res < 0) req.ok[op->block] = 0;
      // chunks_left is only touched by this thread.
      if (--req.chunks_left[op->block] != 0) return;
      const uint32_t b = op->block;
      if (req.is_write) {
        if (!req.ok[b]) {
          BlockDone(req, b, false);
          return;
        }
        IoOp* header = &req.ops[req.ops.size() - req.keys.size() - 1 + b];
        Enqueue(header);
        return;
      }
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
      return;
    }
  }
}

void NvmeTier::BlockDone(Request& req, uint32_t block, bool ok) {
  req.ok[block] = ok ? 1 : 0;
  if (req.blocks_left.fetch_sub(1) == 1) RequestIoDone(req);
}

void NvmeTier::RequestIoDone(Request& req) {
  const bool any_written = req.is_write && std::any_of(req.ok.begin(), req.ok.end(), [](uint8_t v) { return v; });
  if (any_written && options_.durable) {
    Enqueue(&req.ops.back());  // the fdatasync op; Finalize runs on its completion
    return;
  }
  Finalize(req);
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
          if (it != index_.end() && it->second.slot == req.slots[b]) it->second.valid = true;
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

Result<std::shared_ptr<TransferState>> NvmeTier::Write(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids) {
  if (keys.size() != pool_ids.size()) {
    return InvalidArgument("keys and pool ids differ in length (" + std::to_string(keys.size()) + " vs " +
                           std::to_string(pool_ids.size()) + ")");
  }
  auto state = std::make_shared<TransferState>(keys.size(), keys.size() * options_.block_bytes);
  if (keys.empty()) {
    state->Complete(Status::Ok());
    return state;
  }
  KVTIER_RETURN_IF_ERROR(staging_.Acquire(pool_ids, /*write=*/false));
  auto req = std::make_unique<Request>();
  const size_t n = keys.size();
  req->is_write = true;
  req->keys.assign(keys.begin(), keys.end());
  req->pool_ids.assign(pool_ids.begin(), pool_ids.end());
  req->slots.assign(n, 0);
  req->checksums.assign(n, 0);
  req->generations.assign(n, 0);
  req->chunks_left.assign(n, 0);
  req->ok.assign(n, 1);
  req->active.assign(n, 0);
  req->state = state;
  // Claim slots for keys not stored yet (all or nothing), under the index lock.
  std::vector<uint32_t> fresh;
  {
    std::lock_guard<std::mutex> lock(index_mu_);
    for (size_t b = 0; b < n; ++b) {
      bool dup_in_batch = false;
      for (uint32_t f : fresh) dup_in_batch |= (req->keys[f] == req->keys[b]);
      if (!dup_in_batch && index_.find(req->keys[b]) == index_.end()) fresh.push_back(static_cast<uint32_t>(b));
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
  const uint64_t chunk = options_.io_chunk_bytes;
  const uint64_t chunks_per_block = (payload_bytes_ + chunk - 1) / chunk;
  req->ops.reserve(fresh.size() * (chunks_per_block) + n + 1);
  for (uint32_t b : fresh) {
    req->checksums[b] = Checksum64(staging_.block_ptr(req->pool_ids[b]), options_.block_bytes);
    req->chunks_left[b] = static_cast<uint32_t>(chunks_per_block);
    for (uint64_t off = 0; off < payload_bytes_; off += chunk) {
      req->ops.push_back(IoOp{IoOp::Kind::kPayloadWrite, b, req.get(), staging_.block_ptr(req->pool_ids[b]) + off,
                              static_cast<uint32_t>(std::min(chunk, payload_bytes_ - off)),
                              uint64_t(req->slots[b]) * slot_bytes_ + off});
    }
  }
  {
    std::lock_guard<std::mutex> lock(index_mu_);
    for (uint32_t b : fresh) index_[req->keys[b]].checksum = req->checksums[b];
  }
  // Header ops: one per block position (only fresh ones are used), then the fdatasync op.
  for (uint32_t b = 0; b < n; ++b) {
    req->ops.push_back(IoOp{IoOp::Kind::kHeaderWrite, b, req.get(), nullptr, static_cast<uint32_t>(kHeaderBytes),
                            uint64_t(req->slots[b]) * slot_bytes_ + payload_bytes_});
  }
  req->ops.push_back(IoOp{IoOp::Kind::kFsync, 0, req.get(), nullptr, 0, 0});
  for (size_t b = 0; b < n; ++b) {
    if (!req->active[b]) req->ok[b] = 1;  // already stored
  }
  req->blocks_left.store(static_cast<uint32_t>(fresh.size()));
  active_requests_.fetch_add(1);
  Request* raw = req.release();
  {
    std::lock_guard<std::mutex> lock(sq_mu_);
    for (IoOp& op : raw->ops) {
      if (op.kind == IoOp::Kind::kPayloadWrite) backlog_.push_back(&op);
    }
  }
  Pump();
  return state;
}

Result<std::shared_ptr<TransferState>> NvmeTier::Read(std::span<const BlockKey> keys, std::span<const int32_t> pool_ids) {
  if (keys.size() != pool_ids.size()) {
    return InvalidArgument("keys and pool ids differ in length (" + std::to_string(keys.size()) + " vs " +
                           std::to_string(pool_ids.size()) + ")");
  }
  auto state = std::make_shared<TransferState>(keys.size(), keys.size() * options_.block_bytes);
  if (keys.empty()) {
    state->Complete(Status::Ok());
    return state;
  }
  if (pool_ids.size() > 1) {
    std::vector<int32_t> sorted(pool_ids.begin(), pool_ids.end());
    std::sort(sorted.begin(), sorted.end());
    if (auto d = std::adjacent_find(sorted.begin(), sorted.end()); d != sorted.end()) {
      return InvalidArgument("target block " + std::to_string(*d) + " appears more than once in one batch");
    }
  }
  KVTIER_RETURN_IF_ERROR(staging_.Acquire(pool_ids, /*write=*/true));
  const size_t n = keys.size();
  auto req = std::make_unique<Request>();
  req->is_write = false;
  req->keys.assign(keys.begin(), keys.end());
  req->pool_ids.assign(pool_ids.begin(), pool_ids.end());
  req->slots.assign(n, 0);
  req->checksums.assign(n, 0);
  req->generations.assign(n, 0);
  req->chunks_left.assign(n, 0);
  req->ok.assign(n, 0);
  req->active.assign(n, 0);
  req->state = state;
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
  const uint64_t chunk = options_.io_chunk_bytes;
  const uint64_t chunks_per_block = (payload_bytes_ + chunk - 1) / chunk;
  req->ops.reserve(hits * chunks_per_block);
  for (uint32_t b = 0; b < n; ++b) {
    if (!req->active[b]) continue;
    req->chunks_left[b] = static_cast<uint32_t>(chunks_per_block);
    for (uint64_t off = 0; off < payload_bytes_; off += chunk) {
      req->ops.push_back(IoOp{IoOp::Kind::kPayloadRead, b, req.get(), staging_.block_ptr(req->pool_ids[b]) + off,
                              static_cast<uint32_t>(std::min(chunk, payload_bytes_ - off)),
                              uint64_t(req->slots[b]) * slot_bytes_ + off});
    }
  }
  req->blocks_left.store(hits);
  active_requests_.fetch_add(1);
  Request* raw = req.release();
  {
    std::lock_guard<std::mutex> lock(sq_mu_);
    for (IoOp& op : raw->ops) backlog_.push_back(&op);
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
  uint64_t n = 0;
  std::lock_guard<std::mutex> lock(index_mu_);
  for (const BlockKey& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end() || !it->second.valid) continue;  // absent, or its write is in flight
    const int32_t slot = static_cast<int32_t>(it->second.slot);
    index_.erase(it);
    (void)slots_.Unref(std::span<const int32_t>(&slot, 1));  // freed once in-flight reads finish
    ++n;
  }
  evicted_.fetch_add(n);
  return n;
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
  return s;
}

}  // namespace kvtier
