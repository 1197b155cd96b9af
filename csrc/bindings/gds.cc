// Bindings for GPUDirect Storage (compiled when kvtier is built with GDS; gds_stub.cc otherwise):
// probe_gds(), HAVE_GDS, the GdsFile class, and the gds keys of build_info().
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>

#include <map>
#include <vector>

#include "bindings/common.h"
#include "bindings/gds_probe_dict.h"
#include "transfer/gds/gds.h"

namespace kvtier::bind {
namespace {

using namespace nb::literals;


// I/O lists as an [n, 3] uint64 array: device pointer, file offset in bytes, length in bytes.
using IoArray = nb::ndarray<const uint64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using CudaArray = nb::ndarray<nb::device::cuda, nb::c_contig>;

std::vector<gds::GdsIo> Ios(const IoArray& a) {
  if (a.shape(1) != 3) {
    ThrowIfError(InvalidArgument("GdsFile I/O lists are [n, 3] uint64 arrays: device pointer, file offset, length"));
  }
  std::vector<gds::GdsIo> ios(a.shape(0));
  const uint64_t* p = a.data();
  for (size_t i = 0; i < ios.size(); ++i) {
    ios[i].device_ptr = reinterpret_cast<void*>(static_cast<uintptr_t>(p[3 * i]));
    ios[i].file_offset_bytes = p[3 * i + 1];
    ios[i].length_bytes = p[3 * i + 2];
  }
  return ios;
}

// A GdsFile plus the tensors whose memory is registered with cuFile (kept alive until deregistered).
struct PyGdsFile {
  std::unique_ptr<gds::GdsFile> file;
  std::map<uintptr_t, CudaArray> buffers;
  // Close (cuFileBufDeregister) before the tensors may be freed: members die in reverse order.
  ~PyGdsFile() {
    if (file) file->Close();
  }
};

// Read and Write share one shape: convert, release the GIL for the I/O, raise on failure.
template <Status (gds::GdsFile::*Op)(std::span<const gds::GdsIo>)>
void RunIos(PyGdsFile& f, IoArray ios) {
  auto v = Ios(ios);
  Status st;
  {
    nb::gil_scoped_release nogil;
    st = (f.file.get()->*Op)(v);
  }
  ThrowIfError(st);
}

}  // namespace

void BindGds(nb::module_& m) {
  m.attr("HAVE_GDS") = true;
  m.def("probe_gds", [] {
    const gds::GdsProbe* p = nullptr;
    {
      nb::gil_scoped_release nogil;  // the first call spawns the probe child (bounded by its deadline)
      p = &gds::Probe();
    }
    return GdsProbeDict(*p);
  }, "GPUDirect Storage: compiled, usable here, detail, reason (cached; never hangs).");
  m.def(
      "_probe_gds_uncached",
      [](double timeout_s, bool require_gpu, bool test_hang) {
        gds::ProbeOptions o;
        o.timeout_s = timeout_s;
        o.require_gpu = require_gpu;
        o.test_hang = test_hang;
        gds::GdsProbe p;
        {
          nb::gil_scoped_release nogil;
          p = gds::RunProbe(o);
        }
        return GdsProbeDict(p);
      },
      "timeout_s"_a = 5.0, "require_gpu"_a = true, "test_hang"_a = false,
      "Run the GDS probe again with explicit options (tests of the deadline).");

  nb::class_<PyGdsFile>(m, "GdsFile")
      .def_static(
          "open",
          [](const std::string& path, bool create, uint64_t size_bytes, bool read_only, bool use_batch_api,
             uint32_t io_threads, double timeout_s) {
            gds::GdsFileOptions o;
            o.create = create;
            o.size_bytes = size_bytes;
            o.read_only = read_only;
            o.use_batch_api = use_batch_api;
            o.io_threads = io_threads;
            o.timeout_s = timeout_s;
            Result<std::unique_ptr<gds::GdsFile>> r = [&] {
              nb::gil_scoped_release nogil;
              return gds::GdsFile::Open(path, o);
            }();
            auto f = std::make_unique<PyGdsFile>();
            f->file = Unwrap(std::move(r));
            return f;
          },
          "path"_a, "create"_a = false, "size_bytes"_a = 0, "read_only"_a = false, "use_batch_api"_a = true,
          "io_threads"_a = 4, "timeout_s"_a = 60.0)
      .def(
          "register_buffer",
          [](PyGdsFile& f, CudaArray a) {
            const auto base = reinterpret_cast<uintptr_t>(a.data());
            ThrowIfError(f.file->RegisterBuffer(a.data(), a.nbytes()));
            f.buffers.insert_or_assign(base, a);
          },
          "tensor"_a, "cuFileBufRegister a contiguous CUDA tensor's memory (kept alive until deregistered).")
      .def(
          "deregister_buffer",
          [](PyGdsFile& f, CudaArray a) {
            ThrowIfError(f.file->DeregisterBuffer(a.data()));
            f.buffers.erase(reinterpret_cast<uintptr_t>(a.data()));
          },
          "tensor"_a)
      .def("read", &RunIos<&gds::GdsFile::Read>, "ios"_a,
           "Read [n, 3] uint64 (device pointer, file offset, length) I/Os; returns when all completed.")
      .def("write", &RunIos<&gds::GdsFile::Write>, "ios"_a,
           "Write [n, 3] uint64 (device pointer, file offset, length) I/Os; returns when all completed.")
      .def("sync",
           [](PyGdsFile& f) {
             Status st;
             {
               nb::gil_scoped_release nogil;
               st = f.file->Sync();
             }
             ThrowIfError(st);
           })
      .def("close",
           [](PyGdsFile& f) {
             {
               nb::gil_scoped_release nogil;
               f.file->Close();
             }
             f.buffers.clear();
           })
      .def_prop_ro("path", [](const PyGdsFile& f) { return f.file->path(); })
      .def_prop_ro("io_mode", [](const PyGdsFile& f) { return f.file->io_mode(); })
      .def_prop_ro("size_bytes", [](const PyGdsFile& f) { return f.file->size_bytes(); });
}

}  // namespace kvtier::bind
