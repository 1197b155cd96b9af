#include <liburing.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <cstring>

#include "probe/probes.h"
#include "build_config.h"

namespace kvtier::probe {

Feature Uring() {
  Feature f;
  f.compiled = true;
  io_uring ring;
  int rc = io_uring_queue_init(8, &ring, 0);
  if (rc < 0) {
    f.reason = std::string("io_uring_queue_init failed: ") + std::strerror(-rc) +
               " (kernel without io_uring, or blocked by seccomp / io_uring_disabled)";
    return f;
  }
  void* buf = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  iovec iov{buf, 4096};
  rc = io_uring_register_buffers(&ring, &iov, 1);
  if (rc < 0) {
    f.usable = true;
    f.detail = "ring ok; fixed buffers refused";
    f.reason = std::string("io_uring_register_buffers: ") + std::strerror(-rc) + " (RLIMIT_MEMLOCK?)";
  } else {
    io_uring_unregister_buffers(&ring);
    f.usable = true;
    f.detail = "ring and fixed buffers ok";
  }
  munmap(buf, 4096);
  io_uring_queue_exit(&ring);
  return f;
}

}  // namespace kvtier::probe
