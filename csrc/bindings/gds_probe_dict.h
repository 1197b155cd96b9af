// The GDS probe as a Python dict, shared by gds.cc and gds_stub.cc.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "transfer/gds/gds.h"

namespace kvtier::bind {

inline nanobind::dict GdsProbeDict(const gds::GdsProbe& p) {
  nanobind::dict d;
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

}  // namespace kvtier::bind
