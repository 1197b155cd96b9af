// CopyEngine: validates and acquires a batch of block transfers, routes it to the backend for
// its (source device, target device) pair, and hands back a completion handle.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "transfer/cpu/cpu_backend.h"
#include "transfer/transfer.h"

namespace kvtier {

struct EngineOptions {
  CpuBackendOptions cpu;
};

struct EngineStats {
  uint64_t submitted = 0;        // counter: batches accepted
  uint64_t completed_ok = 0;     // counter
  uint64_t completed_error = 0;  // counter
  uint64_t blocks = 0;           // counter: blocks moved successfully
  uint64_t bytes = 0;            // counter: bytes moved successfully
  uint64_t inflight = 0;         // gauge
};

class CopyEngine {
 public:
  explicit CopyEngine(const EngineOptions& options);
  ~CopyEngine();  // drains every backend
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  Result<std::shared_ptr<TransferState>> Submit(BlockSpace& src, std::span<const int32_t> src_ids,
                                                BlockSpace& dst, std::span<const int32_t> dst_ids);

  // An eventfd that becomes readable after any transfer completes (asyncio integration).
  int completion_fd() const noexcept { return event_fd_; }
  void AddBackend(std::unique_ptr<TransferBackend> backend);
  std::vector<std::string> backend_names() const;
  int cpu_threads() const noexcept { return cpu_threads_; }
  EngineStats stats() const;
  void Drain();

  // Test switch (Note: faults come from switches the tests control): when every_nth > 0, every
  // every_nth-th accepted batch completes with a kTransfer error instead of copying.
  void InjectFaults(uint64_t every_nth) noexcept { fault_every_.store(every_nth); }

 private:
  std::shared_ptr<const std::vector<CopyPiece>> PlanFor(const BlockSpace& src, const BlockSpace& dst);
  void Finish(TransferRequest& req, Status status);

  std::vector<std::unique_ptr<TransferBackend>> backends_;
  int cpu_threads_ = 0;
  int event_fd_ = -1;
  std::mutex plan_mu_;
  std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<const std::vector<CopyPiece>>>
      plans_;  // guarded by plan_mu_
  std::atomic<uint64_t> fault_every_{0};
  std::atomic<uint64_t> submitted_{0}, ok_{0}, failed_{0}, blocks_{0}, bytes_{0}, inflight_{0};
};

}  // namespace kvtier
