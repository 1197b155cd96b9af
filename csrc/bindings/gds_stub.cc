// Compiled instead of gds.cc when kvtier is built without GPUDirect Storage: probe_gds() says
// why (compiled=False with the build's reason), HAVE_GDS is False, there is no GdsFile class.
#include <nanobind/stl/string.h>

#include "bindings/common.h"
#include "build_config.h"
#include "transfer/gds/gds.h"

namespace kvtier::bind {
namespace {

nb::dict ProbeDict(const gds::GdsProbe& p) {
  nb::dict d;
  d["compiled"] = p.compiled;
  d["usable"] = p.usable;
  d["detail"] = p.detail;
  d["reason"] = p.reason;
  d["library"] = p.library;
  d["cufile_version"] = p.cufile_version;
  d["compat_mode"] = p.compat_mode;
  d["batch_io"] = p.batch_io;
  d["max_batch_io"] = p.max_batch_io;
  d["elapsed_s"] = p.elapsed_s;
  return d;
}

}  // namespace

void BindGds(nb::module_& m) {
  using namespace nb::literals;
  m.attr("HAVE_GDS") = false;
  m.def("probe_gds", [] { return ProbeDict(gds::Probe()); });
  m.def(
      "_probe_gds_uncached", [](double, bool, bool) { return ProbeDict(gds::Probe()); }, "timeout_s"_a = 5.0,
      "require_gpu"_a = true, "test_hang"_a = false);
  // build_info() is defined in module.cc; its gds keys are added here (see bindings/gds.cc).
  nb::object base = m.attr("build_info");
  nb::delattr(m, "build_info");
  m.def("build_info", [base]() {
    nb::dict d = nb::borrow<nb::dict>(base());
    d["gds"] = std::string(KVTIER_BUILD_GDS) == "ON";
    d["gds_why"] = std::string(KVTIER_BUILD_GDS_WHY);
    return d;
  });
}

}  // namespace kvtier::bind
