// Compiled instead of gds.cc when the build has no GPUDirect Storage (see gds.h): the probe says
// why, and GdsFile::Open is Unavailable.
#include "transfer/gds/gds.h"

#include "build_config.h"

namespace kvtier::gds {

namespace {
std::string Why() {
  return std::string("kvtier was built without GPUDirect Storage: ") + KVTIER_BUILD_GDS_WHY;
}
}  // namespace

struct GdsFile::Impl {};

GdsProbe RunProbe(const ProbeOptions&) {
  GdsProbe p;
  p.reason = Why();
  return p;
}

const GdsProbe& Probe() {
  static const GdsProbe probe = RunProbe(ProbeOptions{});
  return probe;
}

Result<std::unique_ptr<GdsFile>> GdsFile::Open(const std::string&, const GdsFileOptions&) { return Unavailable(Why()); }
GdsFile::GdsFile(std::string path, std::unique_ptr<Impl> impl) : path_(std::move(path)), impl_(std::move(impl)) {}
GdsFile::~GdsFile() = default;
Status GdsFile::RegisterBuffer(void*, uint64_t) { return Unavailable(Why()); }
Status GdsFile::DeregisterBuffer(void*) { return Unavailable(Why()); }
Status GdsFile::Read(std::span<const GdsIo>) { return Unavailable(Why()); }
Status GdsFile::Write(std::span<const GdsIo>) { return Unavailable(Why()); }
Status GdsFile::Sync() { return Unavailable(Why()); }
Status GdsFile::Run(bool, std::span<const GdsIo>) { return Unavailable(Why()); }
void GdsFile::Close() {}
uint64_t GdsFile::size_bytes() const { return 0; }
std::string GdsFile::io_mode() const { return ""; }

}  // namespace kvtier::gds
