// HostArena: one page-aligned backing allocation for a DRAM tier (never one per block).
//
// Note [Arena pages]: we first try explicit huge pages (MAP_HUGETLB, 2 MiB); most hosts have
// none reserved, so we fall back to an anonymous mapping with MADV_HUGEPAGE (transparent huge
// pages, honoured when THP is in "madvise" or "always" mode). The arena is pre-faulted at
// creation (MADV_POPULATE_WRITE, else touching every page) so the first transfer into it does
// not pay page faults. When a CUDA GPU is usable, the CUDA backend installs a HostPinner and
// the arena is page-locked and mapped for the device (cudaHostRegister), so HBM <-> DRAM copies
// run at PCIe speed without a bounce buffer.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "common/status.h"

namespace kvtier {

// Installed by a backend that can page-lock host memory (the CUDA backend). Methods must be
// thread-safe. Pin returns false and sets *why when pinning is not possible.
class HostPinner {
 public:
  virtual ~HostPinner() = default;
  virtual bool Pin(void* ptr, size_t size_bytes, std::string* why) = 0;
  virtual void Unpin(void* ptr) = 0;
};

void SetHostPinner(HostPinner* pinner) noexcept;

// Asks the kernel to back [ptr, ptr + size_bytes) with transparent huge pages: MADV_HUGEPAGE for
// future faults, then MADV_COLLAPSE (Linux 6.1+) to rebuild the already-populated part now,
// keeping its contents. Only whole 2 MiB pages inside the range are touched. Returns "collapsed",
// "advised" (hint only) or "unsupported". Used on registered CPU KV memory: a gather of many short
// runs from random blocks pays one TLB miss per run on 4 KiB pages.
const char* AdviseHugePages(void* ptr, size_t size_bytes) noexcept;
HostPinner* GetHostPinner() noexcept;

struct HostArenaOptions {
  bool populate = true;    // pre-fault every page at creation
  bool try_hugetlb = true; // try MAP_HUGETLB before THP
  bool pin = true;         // page-lock through the installed HostPinner, when there is one
};

class HostArena {
 public:
  static Result<std::unique_ptr<HostArena>> Create(size_t size_bytes, const HostArenaOptions& options);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  std::byte* data() const noexcept { return data_; }
  size_t size_bytes() const noexcept { return size_bytes_; }
  size_t mapped_bytes() const noexcept { return mapped_bytes_; }
  // "hugetlb" (explicit 2 MiB pages), "thp" (madvise'd transparent huge pages) or "4k".
  const std::string& page_mode() const noexcept { return page_mode_; }
  bool pinned() const noexcept { return pinned_; }
  const std::string& pin_reason() const noexcept { return pin_reason_; }

 private:
  HostArena() = default;
  std::byte* data_ = nullptr;
  size_t size_bytes_ = 0;
  size_t mapped_bytes_ = 0;
  std::string page_mode_;
  bool pinned_ = false;
  std::string pin_reason_;
};

}  // namespace kvtier
