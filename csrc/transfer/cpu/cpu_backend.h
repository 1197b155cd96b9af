// CPU copy backend: gathers/scatters blocks between host memory spaces (registered KV tensors
// on the CPU, DRAM pools) with a pool of worker threads. No Python, no GIL.
#pragma once

#include <atomic>
#include <memory>

#include "common/thread_pool.h"
#include "transfer/transfer.h"

namespace kvtier {

struct CpuBackendOptions {
  int threads = 0;                                         // 0: two per core (see DefaultThreads)
  uint64_t nontemporal_threshold_bytes = uint64_t{8} << 20;  // batches at least this big stream
  uint64_t inline_threshold_bytes = uint64_t{64} << 10;    // smaller batches copy on the caller
  uint64_t min_chunk_bytes = uint64_t{512} << 10;          // do not split work finer than this
};

class CpuCopyBackend final : public TransferBackend {
 public:
  explicit CpuCopyBackend(const CpuBackendOptions& options);
  ~CpuCopyBackend() override;

  std::string_view name() const override { return "cpu"; }
  bool Supports(const Device& src, const Device& dst) const override { return src.is_cpu() && dst.is_cpu(); }
  void Submit(std::unique_ptr<TransferRequest> request) override;
  void Drain() override;
  int threads() const noexcept { return pool_.size(); }

 private:
  struct Job;
  static void CopyUnits(const TransferRequest& req, uint64_t unit_begin, uint64_t unit_end, bool nontemporal);

  CpuBackendOptions options_;
  ThreadPool pool_;
  std::atomic<uint64_t> inflight_{0};
};

}  // namespace kvtier
