// Bindings for the NVMe tier (compiled when kvtier is built with io_uring).
#include <nanobind/stl/string.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/unique_ptr.h>

#include "bindings/common.h"
#include "memory/nvme_tier.h"

namespace kvtier::bind {
namespace {

// Write and Read share one shape: convert, release the GIL (checksums, submission), unwrap.
template <Result<std::shared_ptr<TransferState>> (NvmeTier::*Op)(std::span<const BlockKey>, std::span<const int32_t>)>
std::shared_ptr<TransferState> Submit(NvmeTier& t, KeyArray keys, IdArray ids) {
  auto k = Keys(keys);
  auto i = Ids(ids);
  Result<std::shared_ptr<TransferState>> r = [&] {
    nb::gil_scoped_release nogil;
    return (t.*Op)(k, i);
  }();
  return Unwrap(std::move(r));
}

}  // namespace

void BindNvme(nb::module_& m) {
  using namespace nb::literals;
  m.attr("HAVE_NVME") = true;
  m.def(
      "timed_checksum",
      [](nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> data, uint64_t piece_bytes,
         int threads) {
        if (piece_bytes == 0) ThrowIfError(InvalidArgument("timed_checksum: piece_bytes must be > 0"));
        nb::gil_scoped_release nogil;
        return TimedParallelChecksum(data.data(), data.shape(0), piece_bytes, threads);
      },
      "data"_a, "piece_bytes"_a, "threads"_a = 1,
      "Seconds to XXH3-64 `data` in pieces of `piece_bytes` over `threads` threads (the NVMe tier's checksum).");
  nb::class_<NvmeTier>(m, "NvmeTier")
      .def_static(
          "open",
          [](const std::string& directory, HostPool& staging, uint32_t num_slots, uint32_t queue_depth,
             uint64_t max_io_bytes, bool durable, bool allow_buffered_io, uint32_t verify_threads,
             bool taper_reads) {
            NvmeTierOptions o;
            o.directory = directory;
            o.block_bytes = staging.block_bytes();
            o.num_slots = num_slots;
            o.queue_depth = queue_depth;
            o.max_io_bytes = max_io_bytes;
            o.durable = durable;
            o.allow_buffered_io = allow_buffered_io;
            o.verify_threads = verify_threads;
            o.taper_reads = taper_reads;
            Result<std::unique_ptr<NvmeTier>> r = [&] {
              nb::gil_scoped_release nogil;
              return NvmeTier::Open(o, staging);
            }();
            return Unwrap(std::move(r));
          },
          "directory"_a, "staging"_a, "num_slots"_a, "queue_depth"_a = 64, "max_io_bytes"_a = uint64_t{4} << 20,
          "durable"_a = true, "allow_buffered_io"_a = false, "verify_threads"_a = 0, "taper_reads"_a = true,
          nb::keep_alive<0, 2>())
      .def("write", &Submit<&NvmeTier::Write>, "keys"_a, "pool_ids"_a)
      .def("read", &Submit<&NvmeTier::Read>, "keys"_a, "pool_ids"_a)
      .def("contains",
           [](const NvmeTier& t, KeyArray keys) {
             auto k = Keys(keys);
             auto* out = new uint8_t[k.empty() ? 1 : k.size()];
             nb::capsule owner(out, [](void* q) noexcept { delete[] static_cast<uint8_t*>(q); });
             t.Contains(k, out);
             return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(out, {k.size()}, owner);
           })
      .def("evict", [](NvmeTier& t, KeyArray keys) { return t.Evict(Keys(keys)); })
      .def("keys",
           [](const NvmeTier& t) {
             std::vector<BlockKey> keys = t.Keys();
             auto* out = new uint64_t[keys.empty() ? 2 : keys.size() * 2];
             nb::capsule owner(out, [](void* q) noexcept { delete[] static_cast<uint64_t*>(q); });
             for (size_t i = 0; i < keys.size(); ++i) {
               out[2 * i] = keys[i].hi;
               out[2 * i + 1] = keys[i].lo;
             }
             return nb::ndarray<nb::numpy, uint64_t, nb::ndim<2>>(out, {keys.size(), 2}, owner);
           })
      .def("drain",
           [](NvmeTier& t) {
             nb::gil_scoped_release nogil;
             t.Drain();
           })
      .def("inject_io_errors", &NvmeTier::InjectIoErrors, "every_nth"_a)
      .def("inject_staging_change", &NvmeTier::InjectStagingChange, "every_nth"_a, "after_write"_a = false)
      .def_prop_ro("block_bytes", &NvmeTier::block_bytes)
      .def_prop_ro("payload_bytes", &NvmeTier::payload_bytes)
      .def("header_offset", &NvmeTier::header_offset, "slot"_a, "File offset of a slot's header.")
      .def("payload_offset", &NvmeTier::payload_offset, "slot"_a, "File offset of a slot's payload.")
      .def_prop_ro("num_slots", &NvmeTier::num_slots)
      .def_prop_ro("queue_depth", &NvmeTier::queue_depth)
      .def_prop_ro("verify_threads", &NvmeTier::verify_threads)
      .def_prop_ro("io_mode", &NvmeTier::io_mode)
      .def_prop_ro("path", &NvmeTier::path)
      .def("stats", [](const NvmeTier& t) {
        NvmeTierStats s = t.stats();
        nb::dict d;
        d["num_slots"] = s.num_slots;
        d["used_slots"] = s.used_slots;
        d["blocks_written"] = s.blocks_written;
        d["blocks_deduplicated"] = s.blocks_deduplicated;
        d["write_errors"] = s.write_errors;
        d["read_hits"] = s.read_hits;
        d["read_misses"] = s.read_misses;
        d["corrupt_blocks"] = s.corrupt_blocks;
        d["read_errors"] = s.read_errors;
        d["bytes_written"] = s.bytes_written;
        d["bytes_read"] = s.bytes_read;
        d["recovered_blocks"] = s.recovered_blocks;
        d["evicted_blocks"] = s.evicted_blocks;
        d["fsyncs"] = s.fsyncs;
        d["read_ops"] = s.read_ops;
        d["write_ops"] = s.write_ops;
        return d;
      });
}

}  // namespace kvtier::bind
