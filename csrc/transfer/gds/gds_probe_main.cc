// kvtier_gds_probe: the child process of kvtier::gds::Probe (Note [Why the probe never hangs] in
// gds.h). Installed next to _core; run only by the probe, never by users.
//
//   kvtier_gds_probe <path of libcufile> [--hang]
//
// dlopens libcufile, calls cuFileDriverOpen and cuFileDriverGetProperties, and prints one line
// per step (flushed at once, so the parent knows the stage even if a call never returns):
//   stage <dlopen|open|properties>
//   version <cuFileGetVersion> <error>
//   open <CUfileOpError> <CUresult>
//   props <error> <nvfs major> <nvfs minor> <dstatusflags> <dcontrolflags> <fflags> <max_batch_io_size>
//   error <text>           (the library or a symbol could not be loaded)
//   done
// then _exit()s: no cuFileDriverClose, no static destructors, nothing that could block on the way
// out. --hang stops before cuFileDriverOpen forever (tests of the parent's deadline).
#include KVTIER_CUFILE_H

#include <dlfcn.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace {

void Say(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vprintf(fmt, ap);
  va_end(ap);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    Say("error usage: kvtier_gds_probe LIBCUFILE [--hang]\n");
    _exit(2);
  }
  const bool hang = argc > 2 && std::strcmp(argv[2], "--hang") == 0;
  Say("stage dlopen\n");
  void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* e = dlerror();
    Say("error dlopen %s: %s\n", argv[1], e != nullptr ? e : "failed");
    _exit(2);
  }
  auto get_version = reinterpret_cast<decltype(&cuFileGetVersion)>(dlsym(h, "cuFileGetVersion"));
  auto driver_open = reinterpret_cast<decltype(&cuFileDriverOpen)>(dlsym(h, "cuFileDriverOpen"));
  auto get_props = reinterpret_cast<decltype(&cuFileDriverGetProperties)>(dlsym(h, "cuFileDriverGetProperties"));
  if (driver_open == nullptr || get_props == nullptr) {
    Say("error %s lacks cuFileDriverOpen or cuFileDriverGetProperties\n", argv[1]);
    _exit(2);
  }
  if (get_version != nullptr) {
    int v = 0;
    CUfileError_t e = get_version(&v);
    Say("version %d %d\n", v, static_cast<int>(e.err));
  }
  Say("stage open\n");
  if (hang) {
    for (;;) pause();
  }
  CUfileError_t e = driver_open();
  Say("open %d %d\n", static_cast<int>(e.err), static_cast<int>(e.cu_err));
  if (e.err == CU_FILE_SUCCESS) {
    Say("stage properties\n");
    CUfileDrvProps_t p;
    std::memset(&p, 0, sizeof p);
    CUfileError_t pe = get_props(&p);
    Say("props %d %u %u %u %u %u %u\n", static_cast<int>(pe.err), p.nvfs.major_version, p.nvfs.minor_version,
        p.nvfs.dstatusflags, p.nvfs.dcontrolflags, p.fflags, p.max_batch_io_size);
  }
  Say("done\n");
  _exit(0);
}
