#include "transfer/cpu/memcpy_anchor.h"

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "transfer/cpu/fast_copy.h"

namespace kvtier {
namespace {

template <typename CopyFn>
double TimedSplitCopy(void* dst, const void* src, size_t n, int threads, CopyFn copy) {
  if (threads < 1) threads = 1;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const auto start = std::chrono::steady_clock::now();
  if (threads == 1) {
    copy(d, s, n);
  } else {
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      const size_t begin = n * static_cast<size_t>(t) / static_cast<size_t>(threads);
      const size_t end = n * static_cast<size_t>(t + 1) / static_cast<size_t>(threads);
      workers.emplace_back([=] { copy(d + begin, s + begin, end - begin); });
    }
    for (auto& w : workers) w.join();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

double TimedParallelMemcpy(void* dst, const void* src, size_t n, int threads) {
  return TimedSplitCopy(dst, src, n, threads, [](char* d, const char* s, size_t len) { std::memcpy(d, s, len); });
}

double TimedParallelStreamCopy(void* dst, const void* src, size_t n, int threads) {
  return TimedSplitCopy(dst, src, n, threads, [](char* d, const char* s, size_t len) {
    CopyBytes(d, s, len, /*nontemporal=*/true);
    StoreFence();  // the streamed bytes are visible before the thread reports done
  });
}

}  // namespace kvtier
