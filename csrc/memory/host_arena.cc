#include "memory/host_arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

namespace kvtier {
namespace {
std::atomic<HostPinner*> g_pinner{nullptr};
constexpr size_t kHugePage = size_t{2} << 20;

size_t RoundUp(size_t n, size_t align) { return (n + align - 1) / align * align; }
}  // namespace

void SetHostPinner(HostPinner* pinner) noexcept { g_pinner.store(pinner); }
HostPinner* GetHostPinner() noexcept { return g_pinner.load(); }

const char* AdviseHugePages(void* ptr, size_t size_bytes) noexcept {
  const uintptr_t begin = RoundUp(reinterpret_cast<uintptr_t>(ptr), kHugePage);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + size_bytes) / kHugePage * kHugePage;
  if (end <= begin) return "unsupported";
  void* p = reinterpret_cast<void*>(begin);
  const size_t n = end - begin;
  if (madvise(p, n, MADV_HUGEPAGE) != 0) return "unsupported";
  return madvise(p, n, MADV_COLLAPSE) == 0 ? "collapsed" : "advised";
}

Result<std::unique_ptr<HostArena>> HostArena::Create(size_t size_bytes, const HostArenaOptions& options) {
  if (size_bytes == 0) return InvalidArgument("host arena size must be > 0 bytes");
  std::unique_ptr<HostArena> arena(new HostArena());
  void* p = MAP_FAILED;
  size_t mapped = RoundUp(size_bytes, kHugePage);
  if (options.try_hugetlb) {
    p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (p != MAP_FAILED) arena->page_mode_ = "hugetlb";
  }
  if (p == MAP_FAILED) {
    p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return OutOfCapacity("cannot map " + std::to_string(size_bytes) +
                           " bytes of host memory: " + std::strerror(errno));
    }
    arena->page_mode_ = (madvise(p, mapped, MADV_HUGEPAGE) == 0) ? "thp" : "4k";
  }
  arena->data_ = static_cast<std::byte*>(p);
  arena->size_bytes_ = size_bytes;
  arena->mapped_bytes_ = mapped;
  if (options.populate && madvise(p, mapped, MADV_POPULATE_WRITE) != 0) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    volatile std::byte* bytes = arena->data_;
    for (size_t off = 0; off < mapped; off += page) bytes[off] = std::byte{0};
  }
  if (!options.pin) {
    arena->pin_reason_ = "pinning disabled by option";
  } else if (HostPinner* pinner = GetHostPinner()) {
    arena->pinned_ = pinner->Pin(p, mapped, &arena->pin_reason_);
  } else {
    arena->pin_reason_ = "no GPU runtime: host memory is not page-locked";
  }
  return arena;
}

HostArena::~HostArena() {
  if (data_ == nullptr) return;
  if (pinned_) {
    if (HostPinner* pinner = GetHostPinner()) pinner->Unpin(data_);
  }
  munmap(data_, mapped_bytes_);
}

}  // namespace kvtier
