#include "probe/probes.h"
#include "build_config.h"

namespace kvtier::probe {

Feature Uring() {
  Feature f;
  f.reason = std::string("kvtier was built without io_uring: ") + KVTIER_BUILD_URING_WHY;
  return f;
}

}  // namespace kvtier::probe
