// GPUDirect Storage (cuFile): the GPU <-> NVMe direct path. A probe that says whether cuFile can
// be used here (and why not), and GdsFile, a file opened with O_DIRECT and registered with cuFile
// that reads and writes batches of (device pointer, file offset, length).
//
// Two implementations exist and CMake compiles exactly one: gds.cc when the build found cufile.h
// and libcufile (KVTIER_GDS=ON/AUTO, which also needs the CUDA backend), gds_stub.cc otherwise.
// Callers never #ifdef. Python-free.
//
// Out of scope here: the NVMe tier's use of this path (slots written straight from HBM, block
// checksums computed on the GPU so the header can be written without a host copy of the
// payload). NvmeTier (memory/nvme_tier.h) still stages through a DRAM HostPool with io_uring.
//
// Note [Loading cuFile]: kvtier never links libcufile. gds.cc includes cufile.h only for its
// types and resolves the dozen entry points it uses with dlopen/dlsym at run time, so _core
// imports on machines without libcufile.so (and without a GPU). The library is looked for in
// this order: $KVTIER_CUFILE_LIBRARY (a path), "libcufile.so.0" and "libcufile.so" through the
// dynamic loader (LD_LIBRARY_PATH, ldconfig: a system GDS install), the nvidia-cufile wheel next
// to the kvtier package (site-packages/nvidia/cu13/lib, nvidia/cufile/lib), and finally the
// directory where the build found it (KVTIER_BUILD_CUFILE_LIBRARY).
//
// Note [Why the probe never hangs]: cuFileDriverOpen can block forever (seen on machines without
// the nvidia-fs module or without a CUDA driver: it spins after "running in compatible mode"),
// and a hung call cannot be cancelled inside a process. So the probe never calls it in-process.
// It spawns (posix_spawn: a fresh exec'd process, so it is safe from a multi-threaded parent and
// the child gets its own CUDA context; a plain fork() child of a process that already
// initialised CUDA cannot use CUDA) the small helper kvtier_gds_probe, installed next to _core,
// which dlopens the same libcufile, calls cuFileDriverOpen and cuFileDriverGetProperties, prints
// one result line and _exit()s. The parent reads the child's output with poll() against a
// deadline (5 s; $KVTIER_GDS_PROBE_TIMEOUT_S), SIGKILLs the child's process group when the
// deadline passes, and never blocks in waitpid: a child stuck in a kernel call that SIGKILL
// cannot interrupt yet is reaped by a detached thread. The child's cuFile log goes to a
// temporary file ($CUFILE_LOGFILE_PATH, unless the user set it) whose last lines are quoted in
// the reason. Only after the child opened the driver does GdsFile open it in this process, and
// even that call runs on a detached thread with the same deadline: on a timeout GDS is off for
// the rest of the process (TimeoutError), never a hang.
//
// Note [GdsFile I/O]: one file descriptor opened with O_DIRECT (no silent buffered fallback: a
// file system that refuses O_DIRECT is an InvalidArgument error naming the path) and registered
// with cuFileHandleRegister. Device buffers may be registered with cuFileBufRegister
// (RegisterBuffer); an I/O whose range lies inside a registered buffer is issued as (buffer
// base, offset), which is what cuFile requires for registered memory, any other device pointer
// goes through cuFile's internal bounce buffers. Read and Write take a list of GdsIo and return
// when every I/O has completed. With the batch API (cuFileBatchIOSetUp/Submit/GetStatus) the
// list goes out in batches of up to the driver's max_batch_io_size; if batch set-up fails (old
// libcufile, compatibility mode without batch support; also when a submit is refused as
// unsupported, from then on) the file uses cuFileRead/cuFileWrite on
// up to io_threads worker threads of our own (each sets its device once), resubmitting short
// transfers for the remainder; io_mode() says which, and why. A batch that does not complete
// within timeout_s is cancelled and returns TimeoutError. Errors carry cuFile's own error string.
// Offsets and lengths should be 4 KiB aligned for the direct path; cuFile handles others through
// bounce buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/status.h"

namespace kvtier::gds {

struct GdsProbe {
  bool compiled = false;     // the build has GDS (cufile.h and libcufile found at configure time)
  bool usable = false;       // compiled, libcufile loads, a GPU answers, cuFileDriverOpen succeeded
  std::string detail;        // cuFile version, library, nvidia-fs or compatibility mode, batch I/O
  std::string reason;        // why not usable, when it is not
  std::string library;       // the libcufile that was loaded ("" when none)
  int cufile_version = 0;    // cuFileGetVersion, e.g. 1200 for 1.20 (0 when unknown)
  bool compat_mode = false;  // usable, but without nvidia-fs/P2P: POSIX I/O through host bounce buffers
  bool batch_io = false;     // the driver reports the batch API
  int max_batch_io = 0;      // the driver's max_batch_io_size (I/Os per batch)
  double elapsed_s = 0.0;    // how long the probe took
};

struct ProbeOptions {
  double timeout_s = 5.0;     // deadline for the child's cuFileDriverOpen
  bool require_gpu = true;    // false: run the driver open even when CUDA sees no GPU (tests)
  bool test_hang = false;     // the child sleeps instead of opening the driver (tests of the deadline)
};

// Cached after the first call; never throws, never hangs (Note [Why the probe never hangs]).
// The deadline is $KVTIER_GDS_PROBE_TIMEOUT_S seconds when set, else 5.
const GdsProbe& Probe();
// Uncached, with explicit options (tests, `kvtier info` does not need it).
GdsProbe RunProbe(const ProbeOptions& options);

// One I/O: length_bytes between device memory at device_ptr and the file at file_offset_bytes.
struct GdsIo {
  void* device_ptr = nullptr;
  uint64_t file_offset_bytes = 0;
  uint64_t length_bytes = 0;
};

struct GdsFileOptions {
  bool create = false;        // create the file if missing (mode 0644)
  uint64_t size_bytes = 0;    // with create: preallocate (posix_fallocate) to at least this size
  bool read_only = false;
  bool use_batch_api = true;  // false: always cuFileRead/cuFileWrite on worker threads
  uint32_t io_threads = 4;    // worker threads of the cuFileRead/cuFileWrite path
  double timeout_s = 60.0;    // a batch not complete by then is cancelled (TimeoutError)
};

class GdsFile {
 public:
  // Unavailable (with the probe's reason) when GDS is not usable here.
  static Result<std::unique_ptr<GdsFile>> Open(const std::string& path, const GdsFileOptions& options);
  ~GdsFile();  // Close()
  GdsFile(const GdsFile&) = delete;
  GdsFile& operator=(const GdsFile&) = delete;

  // cuFileBufRegister of [device_ptr, device_ptr + length_bytes). Registered buffers must not
  // overlap; they stay registered until DeregisterBuffer or Close.
  Status RegisterBuffer(void* device_ptr, uint64_t length_bytes);
  Status DeregisterBuffer(void* device_ptr);

  // Blocking: return when every I/O has completed (or failed; the first error is returned, after
  // all I/Os of the call have finished, so no buffer is still in use when this returns).
  Status Read(std::span<const GdsIo> ios);
  Status Write(std::span<const GdsIo> ios);
  Status Sync();  // fdatasync

  // Deregisters buffers and the handle, closes the file. I/O after Close is a ClosedError.
  // Must not race with Read/Write.
  void Close();

  const std::string& path() const noexcept { return path_; }
  std::string io_mode() const;  // "batch (...)" or "threads (...; why not batch)"; may switch to threads once
  uint64_t size_bytes() const;  // current file size (fstat)

 private:
  struct Impl;
  GdsFile(std::string path, std::unique_ptr<Impl> impl);
  Status Run(bool write, std::span<const GdsIo> ios);

  std::string path_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::gds
