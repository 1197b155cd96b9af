// The copy engine's shared vocabulary: completion handles, transfer requests, the backend
// interface. One interface serves every medium (CPU memcpy, CUDA, io_uring, UCX); the engine
// knows no backend's internals, and a backend knows nothing of Python.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "memory/block_space.h"

namespace kvtier {

// One contiguous copy inside a block: bytes [src_offset, src_offset+len) of the source block's
// segment src_segment go to [dst_offset, ...) of the target block's segment dst_segment.
struct CopyPiece {
  uint32_t src_segment;
  uint32_t dst_segment;
  uint64_t src_offset;
  uint64_t dst_offset;
  uint64_t len;
};

// The pieces that move one block between two segment lists; the same for every block pair of
// the two spaces, so it is computed once per (source, target) layout pair (plan once, run many).
std::vector<CopyPiece> PlanBlockCopy(const std::vector<Segment>& src, const std::vector<Segment>& dst);

// Completion handle shared by the submitter and the backend. Complete() is called exactly once.
class TransferState {
 public:
  TransferState(uint64_t num_blocks, uint64_t bytes);

  bool done() const noexcept { return done_.load(std::memory_order_acquire); }
  // Waits up to timeout_s (< 0: forever). Returns false on timeout.
  bool Wait(double timeout_s) const;
  // The final status; OK while pending (check done() first).
  Status status() const;
  void Complete(Status status);
  // Runs fn after completion (immediately if already complete). fn must not block.
  void OnComplete(std::function<void()> fn);

  uint64_t num_blocks() const noexcept { return num_blocks_; }
  uint64_t bytes() const noexcept { return bytes_; }
  double latency_s() const;  // submit -> complete, 0 while pending

  // Per-block outcome for transfers that can succeed partially (tier reads: a block that is
  // absent or fails its checksum is a miss, not an error). Empty when every block shares the
  // handle's status. Set before Complete(); read only after done().
  void SetBlockOk(std::vector<uint8_t> ok) { block_ok_ = std::move(ok); }
  const std::vector<uint8_t>& block_ok() const noexcept { return block_ok_; }

 private:
  const uint64_t num_blocks_;
  const uint64_t bytes_;
  const std::chrono::steady_clock::time_point submitted_;
  std::chrono::steady_clock::time_point completed_;
  std::atomic<bool> done_{false};
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  Status status_;                              // guarded by mu_
  std::vector<uint8_t> block_ok_;               // written once before completion
  std::vector<std::function<void()>> on_done_;  // guarded by mu_
};

// A validated, acquired batch handed to a backend. The backend copies, then calls
// Finish(status) exactly once; Finish releases the spaces before completing the handle
// (Note [Transfer lifetime] in memory/block_space.h).
struct TransferRequest {
  BlockSpace* src = nullptr;
  BlockSpace* dst = nullptr;
  std::vector<int32_t> src_ids;
  std::vector<int32_t> dst_ids;
  std::shared_ptr<const std::vector<CopyPiece>> plan;
  std::shared_ptr<TransferState> state;
  std::function<void(TransferRequest&, Status)> finish;  // set by the engine

  void Finish(Status status) { finish(*this, std::move(status)); }
};

class TransferBackend {
 public:
  virtual ~TransferBackend() = default;
  virtual std::string_view name() const = 0;
  virtual bool Supports(const Device& src, const Device& dst) const = 0;
  // Takes ownership of the request and always completes it through request->Finish(), with an
  // error status when it cannot run it. May finish inline (small batches) or asynchronously.
  virtual void Submit(std::unique_ptr<TransferRequest> request) = 0;
  // Waits for everything submitted to finish; no Submit after this.
  virtual void Drain() = 0;
};

}  // namespace kvtier
