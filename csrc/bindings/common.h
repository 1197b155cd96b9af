// Shared by the binding translation units: status -> Python exception, id and key arrays.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <span>
#include <string>

#include "common/status.h"
#include "index/checksum.h"
#include "memory/block_space.h"

namespace kvtier::bind {

namespace nb = nanobind;

using IdArray = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
// Block keys as a [n, 2] uint64 array: column 0 the high half, column 1 the low half.
using KeyArray = nb::ndarray<const uint64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

struct StatusException {
  StatusCode code;
  std::string message;
};

inline void ThrowIfError(const Status& st) {
  if (!st.ok()) throw StatusException{st.code(), st.message()};
}

template <typename T>
T Unwrap(Result<T>&& r) {
  if (!r.ok()) ThrowIfError(r.status());
  return std::move(r).value();
}

inline std::span<const int32_t> Ids(const IdArray& a) { return {a.data(), a.shape(0)}; }

inline std::span<const BlockKey> Keys(const KeyArray& a) {
  static_assert(sizeof(BlockKey) == 2 * sizeof(uint64_t));
  if (a.shape(1) != 2) ThrowIfError(InvalidArgument("block keys must be an [n, 2] uint64 array"));
  return {reinterpret_cast<const BlockKey*>(a.data()), a.shape(0)};
}

// Optional parts register their classes through these (a stub does nothing when not built).
void BindNvme(nb::module_& m);
void BindGds(nb::module_& m);  // probe_gds, HAVE_GDS, GdsFile; adds gds keys to build_info
void BindIndex(nb::module_& m);
void BindUcx(nb::module_& m);  // UcxAgent, RemotePool, HAVE_UCX (a stub when built without UCX)

// A HostPool, a KV registration or (with UCX) a remote pool, as the engine sees it; raises
// InvalidArgumentError naming `role` otherwise.
BlockSpace& AsSpace(nb::handle h, const char* role);
// The remote pool behind h, or nullptr (always nullptr without UCX).
BlockSpace* AsRemoteSpace(nb::handle h);

}  // namespace kvtier::bind
