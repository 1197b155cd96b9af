// Compiled instead of ucx.cc when kvtier is built without UCX.
#include "bindings/common.h"

namespace kvtier::bind {

BlockSpace* AsRemoteSpace(nb::handle) { return nullptr; }
void BindUcx(nb::module_& m) {
  m.attr("HAVE_UCX") = false;
  m.attr("UCX_BUILD_VERSION") = "";
}

}  // namespace kvtier::bind
