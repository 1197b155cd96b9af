// Compiled instead of gds.cc when kvtier is built without GPUDirect Storage: probe_gds() says
// why (compiled=False with the build's reason), HAVE_GDS is False, there is no GdsFile class.
#include <nanobind/stl/string.h>

#include "bindings/common.h"
#include "bindings/gds_probe_dict.h"
#include "transfer/gds/gds.h"

namespace kvtier::bind {

void BindGds(nb::module_& m) {
  using namespace nb::literals;
  m.attr("HAVE_GDS") = false;
  m.def("probe_gds", [] { return GdsProbeDict(gds::Probe()); });
  m.def(
      "_probe_gds_uncached", [](double, bool, bool) { return GdsProbeDict(gds::Probe()); }, "timeout_s"_a = 5.0,
      "require_gpu"_a = true, "test_hang"_a = false);
}

}  // namespace kvtier::bind
