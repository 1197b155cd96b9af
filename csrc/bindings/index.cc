// Bindings for block keys (index layer).
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>

#include "bindings/common.h"
#include "index/block_hash.h"

namespace kvtier::bind {

using TokenArray = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

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
}

}  // namespace kvtier::bind
