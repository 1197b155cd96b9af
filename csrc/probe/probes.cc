#include "probe/probes.h"
#include "build_config.h"

#include "transfer/cpu/fast_copy.h"

namespace kvtier::probe {

BuildInfo Build() {
  BuildInfo b;
#if defined(__clang__)
  b.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  b.compiler = "gcc " __VERSION__;
#endif
#ifdef NDEBUG
  b.build_type = "release";
#else
  b.build_type = "debug";
#endif
  b.cuda = KVTIER_BUILD_CUDA;
  b.cuda_why = KVTIER_BUILD_CUDA_WHY;
  b.cuda_archs = KVTIER_BUILD_CUDA_ARCHS;
  b.uring = KVTIER_BUILD_URING;
  b.uring_why = KVTIER_BUILD_URING_WHY;
  b.ucx = KVTIER_BUILD_UCX;
  b.ucx_why = KVTIER_BUILD_UCX_WHY;
  b.gds = KVTIER_BUILD_GDS;
  b.gds_why = KVTIER_BUILD_GDS_WHY;
  b.nontemporal_copy = NontemporalCopyKind();
  return b;
}

}  // namespace kvtier::probe
