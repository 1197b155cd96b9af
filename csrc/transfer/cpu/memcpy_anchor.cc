#include "transfer/cpu/memcpy_anchor.h"

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

namespace kvtier {

double TimedParallelMemcpy(void* dst, const void* src, size_t n, int threads) {
  if (threads < 1) threads = 1;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const auto start = std::chrono::steady_clock::now();
  if (threads == 1) {
    std::memcpy(d, s, n);
  } else {
    std::vector<std::thread> workers;
    workers.reserve(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      const size_t begin = n * static_cast<size_t>(t) / static_cast<size_t>(threads);
      const size_t end = n * static_cast<size_t>(t + 1) / static_cast<size_t>(threads);
      workers.emplace_back([=] { std::memcpy(d + begin, s + begin, end - begin); });
    }
    for (auto& w : workers) w.join();
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace kvtier
