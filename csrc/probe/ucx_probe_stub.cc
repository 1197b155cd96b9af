#include "probe/probes.h"
#include "build_config.h"

namespace kvtier::probe {

Feature Ucx() {
  Feature f;
  f.reason = std::string("kvtier was built without UCX: ") + KVTIER_BUILD_UCX_WHY;
  return f;
}

}  // namespace kvtier::probe
