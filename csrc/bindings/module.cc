// kvtier._core: the nanobind module. Thin by design: it converts arguments (DLPack tensors to
// TensorDesc, int32 arrays to spans), releases the GIL around anything that can take time, and
// translates Status codes into kvtier's Python exceptions (one table, installed by
// python/kvtier/errors.py). It holds Python references only to keep registered tensors alive.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/unique_ptr.h>

#include <cmath>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <thread>

#include "bindings/common.h"
#include "common/status.h"
#include "index/checksum.h"
#include "memory/block_space.h"
#include "probe/probes.h"
#include "transfer/copy_engine.h"
#include "transfer/cpu/memcpy_anchor.h"
#include "transfer/cuda/cuda_backend.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier::bind {
namespace {

using ByteArray = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// ---------------------------------------------------------------- errors

nb::object& ErrorTypes() {
  static nb::object* types = new nb::object(nb::dict());  // leaked on purpose: lives to exit
  return *types;
}

// ---------------------------------------------------------------- registrations

// A KvRegion plus the tensors it points into; the tensors stay alive as long as this object.
struct KvRegistration {
  std::unique_ptr<KvRegion> region;
  std::vector<nb::ndarray<>> tensors;
};

Device DeviceOf(const nb::ndarray<>& a) {
  if (a.device_type() == nb::device::cpu::value) return Device{DeviceType::kCpu, 0};
  if (a.device_type() == nb::device::cuda::value) return Device{DeviceType::kCuda, a.device_id()};
  ThrowIfError(DeviceError("tensor is on an unsupported device (DLPack device type " +
                           std::to_string(a.device_type()) + "); kvtier takes cpu and cuda tensors"));
  return {};
}

std::unique_ptr<KvRegistration> RegisterKv(std::vector<nb::ndarray<>> tensors, std::vector<int> block_dims,
                                           uint64_t expected_block_bytes, bool huge_pages) {
  std::vector<TensorDesc> descs;
  descs.reserve(tensors.size());
  for (const auto& t : tensors) {
    TensorDesc d;
    d.data = t.data();
    d.itemsize = static_cast<uint32_t>(t.itemsize());
    d.device = DeviceOf(t);
    for (size_t i = 0; i < t.ndim(); ++i) {
      d.shape.push_back(t.shape(i));
      d.strides.push_back(t.stride(i));
    }
    descs.push_back(std::move(d));
  }
  auto reg = std::make_unique<KvRegistration>();
  Result<std::unique_ptr<KvRegion>> r = [&] {
    nb::gil_scoped_release nogil;
    return KvRegion::Create(descs, block_dims, expected_block_bytes, huge_pages);
  }();
  reg->region = Unwrap(std::move(r));
  reg->tensors = std::move(tensors);
  return reg;
}

nb::dict ToDict(const probe::Feature& f) {
  nb::dict d;
  d["compiled"] = f.compiled;
  d["usable"] = f.usable;
  d["detail"] = f.detail;
  d["reason"] = f.reason;
  d["items"] = f.items;
  return d;
}

}  // namespace

BlockSpace& AsSpace(nb::handle h, const char* role) {
  HostPool* pool = nullptr;
  if (nb::try_cast<HostPool*>(h, pool) && pool != nullptr) return *pool;
  KvRegistration* reg = nullptr;
  if (nb::try_cast<KvRegistration*>(h, reg) && reg != nullptr) return *reg->region;
  if (BlockSpace* remote = AsRemoteSpace(h)) return *remote;
  ThrowIfError(InvalidArgument(std::string("the transfer ") + role +
                               " must be a HostPool or a KV registration (kvtier.register_kv), got " +
                               nb::type_name(h.type()).c_str()));
  __builtin_unreachable();
}

}  // namespace kvtier::bind

NB_MODULE(_core, m) {
  using namespace kvtier;
  using namespace kvtier::bind;
  m.doc() = "kvtier native core (internal; use the kvtier package)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusException& e) {
      nb::object types = ErrorTypes();
      nb::object key = nb::int_(static_cast<int>(e.code));
      PyObject* cls = types.is_valid() ? PyDict_GetItem(types.ptr(), key.ptr()) : nullptr;
      PyErr_SetString(cls != nullptr ? cls : PyExc_RuntimeError, e.message.c_str());
    }
  });

  m.def("_set_error_types", [](nb::dict types) { ErrorTypes() = types; },
        "Install the StatusCode -> exception class table (called once by kvtier.errors).");
  m.attr("STATUS_CODES") = [] {
    nb::dict d;
    for (int c = 1; c <= static_cast<int>(StatusCode::kInternal); ++c) {
      d[nb::str(std::string(StatusCodeName(static_cast<StatusCode>(c))).c_str())] = c;
    }
    return d;
  }();

  // ------------------------------------------------------------ HostPool
  nb::class_<HostPool>(m, "HostPool")
      .def_static(
          "create",
          [](uint64_t block_bytes, uint32_t num_blocks, bool populate, bool pin, bool try_hugetlb) {
            HostArenaOptions o;
            o.populate = populate;
            o.pin = pin;
            o.try_hugetlb = try_hugetlb;
            Result<std::unique_ptr<HostPool>> r = [&] {
              nb::gil_scoped_release nogil;
              return HostPool::Create(block_bytes, num_blocks, o);
            }();
            return Unwrap(std::move(r));
          },
          "block_bytes"_a, "num_blocks"_a, "populate"_a = true, "pin"_a = true, "try_hugetlb"_a = true)
      .def_prop_ro("block_bytes", &HostPool::block_bytes)
      .def_prop_ro("block_stride_bytes", &HostPool::block_stride_bytes)
      .def_prop_ro("num_blocks", &HostPool::num_blocks)
      .def_prop_ro("page_mode", [](const HostPool& p) { return p.arena().page_mode(); })
      .def_prop_ro("pinned", [](const HostPool& p) { return p.arena().pinned(); })
      .def_prop_ro("pin_reason", [](const HostPool& p) { return p.arena().pin_reason(); })
      .def_prop_ro("free_blocks", [](HostPool& p) { return p.allocator().free_blocks(); })
      .def("allocate",
           [](HostPool& p, size_t n) {
             // Refuse impossible sizes before sizing the id buffer (Allocate checks capacity first).
             if (n > p.num_blocks()) ThrowIfError(p.allocator().Allocate(n, nullptr));
             auto* ids = new int32_t[n == 0 ? 1 : n];
             nb::capsule owner(ids, [](void* q) noexcept { delete[] static_cast<int32_t*>(q); });
             ThrowIfError(p.allocator().Allocate(n, ids));
             return nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>(ids, {n}, owner);
           },
           "n"_a)
      .def("unref", [](HostPool& p, IdArray ids) { ThrowIfError(p.allocator().Unref(Ids(ids))); }, "ids"_a)
      .def("ref", [](HostPool& p, IdArray ids) { ThrowIfError(p.allocator().Ref(Ids(ids))); }, "ids"_a)
      .def("pin", [](HostPool& p, IdArray ids) { ThrowIfError(p.allocator().Pin(Ids(ids))); }, "ids"_a)
      .def("unpin", [](HostPool& p, IdArray ids) { ThrowIfError(p.allocator().Unpin(Ids(ids))); }, "ids"_a)
      .def("check_allocated", [](HostPool& p, IdArray ids) { ThrowIfError(p.allocator().CheckAllocated(Ids(ids))); },
           "ids"_a)
      .def(
          "checksums",
          [](HostPool& p, IdArray ids) {
            const size_t n = ids.shape(0);
            for (size_t i = 0; i < n; ++i) {
              if (ids.data()[i] < 0 || uint64_t(ids.data()[i]) >= p.num_blocks())
                ThrowIfError(InvalidArgument("checksums: block id " + std::to_string(ids.data()[i]) +
                                             " out of range [0, " + std::to_string(p.num_blocks()) + ")"));
            }
            auto* out = new uint64_t[n == 0 ? 1 : n];
            nb::capsule owner(out, [](void* q) noexcept { delete[] static_cast<uint64_t*>(q); });
            {
              nb::gil_scoped_release nogil;
              for (size_t i = 0; i < n; ++i) out[i] = Checksum64(p.block_ptr(ids.data()[i]), p.block_bytes());
            }
            return nb::ndarray<nb::numpy, uint64_t, nb::ndim<1>>(out, {n}, owner);
          },
          "ids"_a, "XXH3-64 of each block's bytes (the checksum the NVMe tier and the cluster directory carry).")
      .def("refcount", [](HostPool& p, int32_t id) { return p.allocator().refcount(id); }, "id"_a)
      .def("pins", [](HostPool& p, int32_t id) { return p.allocator().pins(id); }, "id"_a)
      .def("stats",
           [](HostPool& p) {
             AllocatorStats s = p.allocator().stats();
             nb::dict d;
             d["num_blocks"] = s.num_blocks;
             d["used_blocks"] = s.used_blocks;
             d["pinned_blocks"] = s.pinned_blocks;
             d["peak_used_blocks"] = s.peak_used_blocks;
             d["allocated_total"] = s.allocated_total;
             d["freed_total"] = s.freed_total;
             d["failed_allocs"] = s.failed_allocs;
             return d;
           })
      .def(
          "buffer",
          [](nb::handle self) {
            HostPool& p = nb::cast<HostPool&>(self);
            size_t shape[2] = {p.num_blocks(), p.block_bytes()};
            int64_t strides[2] = {static_cast<int64_t>(p.block_stride_bytes()), 1};
            return nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>(p.block_ptr(0), 2, shape, self, strides);
          },
          "A [num_blocks, block_bytes] uint8 view of the whole arena (keeps the pool alive).");

  // ------------------------------------------------------------ registrations
  nb::class_<KvRegistration>(m, "KvRegion")
      .def_prop_ro("num_blocks", [](const KvRegistration& r) { return r.region->num_blocks(); })
      .def_prop_ro("block_bytes", [](const KvRegistration& r) { return r.region->block_bytes(); })
      .def_prop_ro("num_segments", [](const KvRegistration& r) { return r.region->segments().size(); })
      .def_prop_ro("device", [](const KvRegistration& r) { return r.region->device().ToString(); })
      .def_prop_ro("inflight", [](const KvRegistration& r) { return r.region->inflight(); })
      .def_prop_ro("closed", [](const KvRegistration& r) { return r.region->is_closed(); })
      .def_prop_ro("huge_pages", [](const KvRegistration& r) { return r.region->huge_pages(); })
      .def("close", [](KvRegistration& r) {
        ThrowIfError(r.region->Close());
        r.tensors.clear();
      });
  m.def("register_kv", &RegisterKv, "tensors"_a, "block_dims"_a, "expected_block_bytes"_a, "huge_pages"_a = false);

  // ------------------------------------------------------------ transfers
  nb::class_<TransferState>(m, "Transfer")
      .def("done", &TransferState::done)
      .def(
          "wait",
          [](const TransferState& s, double timeout_s) {
            if (std::isnan(timeout_s)) ThrowIfError(InvalidArgument("timeout must be a number of seconds, got nan"));
            nb::gil_scoped_release nogil;
            return s.Wait(timeout_s);
          },
          "timeout_s"_a = -1.0, "Wait up to timeout_s seconds (< 0: forever); True when complete.")
      .def("raise_if_failed", [](const TransferState& s) {
        if (s.done()) ThrowIfError(s.status());
      })
      .def_prop_ro("num_blocks", &TransferState::num_blocks)
      .def_prop_ro("bytes", &TransferState::bytes)
      .def_prop_ro("latency_s", &TransferState::latency_s)
      .def_prop_ro("block_ok", [](const TransferState& s) -> nb::object {
        if (!s.done() || s.block_ok().empty()) return nb::none();
        const auto& ok = s.block_ok();
        auto* copy = new uint8_t[ok.size()];
        std::copy(ok.begin(), ok.end(), copy);
        nb::capsule owner(copy, [](void* q) noexcept { delete[] static_cast<uint8_t*>(q); });
        return nb::cast(nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(copy, {ok.size()}, owner));
      }, "Per-block outcome (1 = ok) for transfers that can succeed partially; None otherwise.");

  nb::class_<CopyEngine>(m, "CopyEngine")
      .def("__init__",
           [](CopyEngine* self, int threads, uint64_t nt) {
             EngineOptions o;
             o.cpu.threads = threads;
             o.cpu.nontemporal_threshold_bytes = nt;
             new (self) CopyEngine(o);
             std::string why;
             if (auto cuda = cuda::MakeBackend(&why)) self->AddBackend(std::move(cuda));
           },
           "threads"_a = 0, "nontemporal_threshold_bytes"_a = uint64_t{8} << 20)
      .def(
          "submit",
          [](CopyEngine& e, nb::handle src, IdArray src_ids, nb::handle dst, IdArray dst_ids) {
            BlockSpace& s = AsSpace(src, "source");
            BlockSpace& d = AsSpace(dst, "target");
            Result<std::shared_ptr<TransferState>> r = [&] {
              nb::gil_scoped_release nogil;
              return e.Submit(s, Ids(src_ids), d, Ids(dst_ids));
            }();
            return Unwrap(std::move(r));
          },
          "src"_a, "src_ids"_a, "dst"_a, "dst_ids"_a)
      .def_prop_ro("completion_fd", &CopyEngine::completion_fd)
      .def_prop_ro("backends", &CopyEngine::backend_names)
      .def_prop_ro("cpu_threads", &CopyEngine::cpu_threads)
      .def("inject_faults", &CopyEngine::InjectFaults, "every_nth"_a)
      .def("drain",
           [](CopyEngine& e) {
             nb::gil_scoped_release nogil;
             e.Drain();
           })
      .def("stats", [](const CopyEngine& e) {
        EngineStats s = e.stats();
        nb::dict d;
        d["submitted"] = s.submitted;
        d["completed_ok"] = s.completed_ok;
        d["completed_error"] = s.completed_error;
        d["blocks"] = s.blocks;
        d["bytes"] = s.bytes;
        d["inflight"] = s.inflight;
        return d;
      });

  // ------------------------------------------------------------ probes and bench helpers
  m.def("build_info", [] {
    probe::BuildInfo b = probe::Build();
    nb::dict d;
    d["compiler"] = b.compiler;
    d["build_type"] = b.build_type;
    d["cuda"] = b.cuda == "ON";
    d["cuda_why"] = b.cuda_why;
    d["cuda_architectures"] = b.cuda_archs;
    d["io_uring"] = b.uring == "ON";
    d["io_uring_why"] = b.uring_why;
    d["ucx"] = b.ucx == "ON";
    d["ucx_why"] = b.ucx_why;
    d["gds"] = b.gds == "ON";
    d["gds_why"] = b.gds_why;
    d["nontemporal_copy"] = b.nontemporal_copy;
    d["hardware_threads"] = std::thread::hardware_concurrency();
    return d;
  });
  m.def("probe_uring", [] { return ToDict(probe::Uring()); });
  m.def("probe_ucx", [] { return ToDict(probe::Ucx()); });
  m.def("probe_cuda", [] {
    const cuda::CudaProbe& p = cuda::Probe();
    nb::dict d;
    d["compiled"] = p.compiled;
    d["usable"] = p.usable;
    d["device_count"] = p.device_count;
    d["runtime_version"] = p.runtime_version;
    d["driver_version"] = p.driver_version;
    d["devices"] = p.devices;
    d["reason"] = p.reason;
    return d;
  });
  m.def(
      "timed_memcpy",
      [](ByteArray dst, ByteArray src, int threads) {
        if (dst.shape(0) != src.shape(0)) ThrowIfError(InvalidArgument("timed_memcpy: buffers differ in size"));
        nb::gil_scoped_release nogil;
        return TimedParallelMemcpy(dst.data(), src.data(), src.shape(0), threads);
      },
      "dst"_a, "src"_a, "threads"_a = 1, "Seconds for a plain memcpy of src into dst over `threads` threads.");
  m.def(
      "timed_stream_copy",
      [](ByteArray dst, ByteArray src, int threads) {
        if (dst.shape(0) != src.shape(0)) ThrowIfError(InvalidArgument("timed_stream_copy: buffers differ in size"));
        nb::gil_scoped_release nogil;
        return TimedParallelStreamCopy(dst.data(), src.data(), src.shape(0), threads);
      },
      "dst"_a, "src"_a, "threads"_a = 1,
      "Seconds for a copy of src into dst with streaming (non-temporal) stores over `threads` threads.");

  BindNvme(m);
  BindGds(m);
  BindIndex(m);
  BindUcx(m);
  cuda::InstallHostPinner();
}
