// Run-time probes for the optional native parts, for `kvtier info` and for tests that skip.
// Each answers "compiled in?" (decided at configure time) and "usable here?" with a reason.
#pragma once

#include <string>
#include <vector>

namespace kvtier::probe {

struct Feature {
  bool compiled = false;
  bool usable = false;
  std::string detail;  // version, transports, ...
  std::string reason;  // why not compiled or not usable
  std::vector<std::string> items;  // e.g. UCX transports "tcp/lo"
};

Feature Uring();  // io_uring: a ring can be created and fixed buffers registered
Feature Ucx();    // UCX: ucp context created; items = transport/device resources

struct BuildInfo {
  std::string compiler;
  std::string build_type;
  std::string cuda;  // "ON"/"OFF"
  std::string cuda_why;
  std::string cuda_archs;
  std::string uring;
  std::string uring_why;
  std::string ucx;
  std::string ucx_why;
  std::string gds;
  std::string gds_why;
  std::string nontemporal_copy;  // avx512 / avx2 / memcpy
};
BuildInfo Build();

}  // namespace kvtier::probe
