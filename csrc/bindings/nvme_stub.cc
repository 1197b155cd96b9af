// Compiled instead of nvme.cc when kvtier is built without io_uring.
#include "bindings/common.h"

namespace kvtier::bind {

void BindNvme(nb::module_& m) { m.attr("HAVE_NVME") = false; }

}  // namespace kvtier::bind
