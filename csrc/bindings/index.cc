// Bindings for block keys (index layer).
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>

#include "bindings/common.h"
#include "index/block_hash.h"
#include "index/block_index.h"

namespace kvtier::bind {

using TokenArray = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> NewArray(size_t n, T** data) {
  *data = new T[n == 0 ? 1 : n];
  nb::capsule owner(*data, [](void* q) noexcept { delete[] static_cast<T*>(q); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(*data, {n}, owner);
}

void BindIndex(nb::module_& m) {
  using namespace nb::literals;
  m.def("salt_key", [](const std::string& salt) {
    BlockKey k = SaltKey(salt);
    return std::make_pair(k.hi, k.lo);
  }, "salt"_a);
  m.def(
      "hash_blocks",
      [](TokenArray tokens, uint32_t block_tokens, uint64_t salt_hi, uint64_t salt_lo) {
        const size_t n = block_tokens == 0 ? 0 : tokens.shape(0) / block_tokens;
        auto* out = new uint64_t[n == 0 ? 2 : 2 * n];
        nb::capsule owner(out, [](void* q) noexcept { delete[] static_cast<uint64_t*>(q); });
        Status st;
        {
          nb::gil_scoped_release nogil;
          st = HashBlocks({tokens.data(), tokens.shape(0)}, block_tokens, BlockKey{salt_hi, salt_lo},
                          reinterpret_cast<BlockKey*>(out));
        }
        ThrowIfError(st);
        return nb::ndarray<nb::numpy, uint64_t, nb::ndim<2>>(out, {n, 2}, owner);
      },
      "tokens"_a, "block_tokens"_a, "salt_hi"_a, "salt_lo"_a);

  nb::class_<BlockIndex>(m, "BlockIndex")
      .def(nb::init<>())
      .def("match_prefix",
           [](BlockIndex& ix, KeyArray keys) {
             auto k = Keys(keys);
             uint8_t* tiers;
             int32_t* blocks;
             auto t = NewArray<uint8_t>(k.size(), &tiers);
             auto b = NewArray<int32_t>(k.size(), &blocks);
             size_t n = ix.MatchPrefix(k, tiers, blocks);
             return nb::make_tuple(n, t, b);
           })
      .def("contains",
           [](const BlockIndex& ix, KeyArray keys) {
             auto k = Keys(keys);
             uint8_t* out;
             auto a = NewArray<uint8_t>(k.size(), &out);
             ix.Contains(k, out);
             return a;
           })
      .def("insert", [](BlockIndex& ix, KeyArray keys, uint8_t tier, IdArray blocks) {
        ThrowIfError(ix.Insert(Keys(keys), tier, Ids(blocks)));
      })
      .def("relocate", [](BlockIndex& ix, KeyArray keys, uint8_t tier, IdArray blocks) {
        ThrowIfError(ix.Relocate(Keys(keys), tier, Ids(blocks)));
      })
      .def("remove", [](BlockIndex& ix, KeyArray keys) { return ix.Remove(Keys(keys)); })
      .def("pin", [](BlockIndex& ix, KeyArray keys) { ThrowIfError(ix.Pin(Keys(keys))); })
      .def("unpin", [](BlockIndex& ix, KeyArray keys) { ix.Unpin(Keys(keys)); })
      .def("victims",
           [](const BlockIndex& ix, uint8_t tier, size_t n, uint32_t shared_refs) {
             uint64_t* keys = new uint64_t[n == 0 ? 2 : 2 * n];
             nb::capsule owner(keys, [](void* q) noexcept { delete[] static_cast<uint64_t*>(q); });
             int32_t* blocks;
             auto b = NewArray<int32_t>(n, &blocks);
             size_t found = ix.Victims(tier, n, reinterpret_cast<BlockKey*>(keys), blocks, shared_refs);
             auto k = nb::ndarray<nb::numpy, uint64_t, nb::ndim<2>>(keys, {found, 2}, owner);
             return nb::make_tuple(k, b, found);
           },
           "tier"_a, "n"_a, "shared_refs"_a = 0)
      .def("count", &BlockIndex::Count)
      .def("locate",
           [](const BlockIndex& ix, KeyArray keys) {
             auto k = Keys(keys);
             uint8_t* tiers;
             int32_t* blocks;
             auto t = NewArray<uint8_t>(k.size(), &tiers);
             uint32_t* pins;
             auto b = NewArray<int32_t>(k.size(), &blocks);
             auto p = NewArray<uint32_t>(k.size(), &pins);
             ix.Locate(k, tiers, blocks, pins);
             return nb::make_tuple(t, b, p);
           })
      .def("ref", [](BlockIndex& ix, KeyArray keys) { ix.Ref(Keys(keys)); })
      .def("unref", [](BlockIndex& ix, KeyArray keys) { ThrowIfError(ix.Unref(Keys(keys))); })
      .def("refs", [](const BlockIndex& ix, KeyArray keys) {
        auto k = Keys(keys);
        uint32_t* out;
        auto a = NewArray<uint32_t>(k.size(), &out);
        ix.Refs(k, out);
        return a;
      });
}

}  // namespace kvtier::bind
