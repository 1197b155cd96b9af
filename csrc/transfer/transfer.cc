#include "transfer/transfer.h"

#include <algorithm>

namespace kvtier {

std::vector<CopyPiece> PlanBlockCopy(const std::vector<Segment>& src, const std::vector<Segment>& dst) {
  std::vector<CopyPiece> pieces;
  size_t si = 0, di = 0;
  uint64_t so = 0, d_off = 0;
  while (si < src.size() && di < dst.size()) {
    const uint64_t len = std::min(src[si].run_bytes - so, dst[di].run_bytes - d_off);
    if (len > 0) {
      pieces.push_back(CopyPiece{static_cast<uint32_t>(si), static_cast<uint32_t>(di), so, d_off, len});
    }
    so += len;
    d_off += len;
    if (so == src[si].run_bytes) { ++si; so = 0; }
    if (d_off == dst[di].run_bytes) { ++di; d_off = 0; }
  }
  return pieces;
}

TransferState::TransferState(uint64_t num_blocks, uint64_t bytes)
    : num_blocks_(num_blocks), bytes_(bytes), submitted_(std::chrono::steady_clock::now()) {}

// Note [Wait timeouts]: a timeout is a double of seconds from Python, where float('inf') and
// 1e300 mean "as long as it takes". Converting such a value to a steady_clock duration overflows
// (the deadline lands in the past and wait_for returns at once with a timeout), so anything past
// kForeverS waits without a deadline. NaN is refused by the binding before it gets here; should
// one arrive anyway it waits forever too (every comparison with NaN is false), never returning
// a spurious timeout.
bool TransferState::Wait(double timeout_s) const {
  constexpr double kForeverS = 1e9;  // about 31 years: past any steady_clock overflow risk
  if (done()) return true;
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_s < 0 || !(timeout_s <= kForeverS)) {
    cv_.wait(lock, [&] { return done(); });
    return true;
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  return cv_.wait_until(lock, deadline, [&] { return done(); });
}

Status TransferState::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

void TransferState::Complete(Status status) {
  std::vector<std::function<void()>> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (done()) return;
    status_ = std::move(status);
    completed_ = std::chrono::steady_clock::now();
    done_.store(true, std::memory_order_release);
    callbacks.swap(on_done_);
  }
  cv_.notify_all();
  for (auto& fn : callbacks) fn();
}

void TransferState::OnComplete(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done()) {
      on_done_.push_back(std::move(fn));
      return;
    }
  }
  fn();
}

double TransferState::latency_s() const {
  if (!done()) return 0.0;
  std::lock_guard<std::mutex> lock(mu_);
  return std::chrono::duration<double>(completed_ - submitted_).count();
}

}  // namespace kvtier
