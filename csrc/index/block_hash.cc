#include "index/block_hash.h"

#include <cstring>
#include <string>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kvtier {
namespace {

void PutLe64(uint64_t v, unsigned char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

BlockKey FromXxh(XXH128_hash_t h) { return BlockKey{h.high64, h.low64}; }

}  // namespace

BlockKey SaltKey(std::string_view salt) noexcept { return FromXxh(XXH3_128bits(salt.data(), salt.size())); }

Status HashBlocks(std::span<const int64_t> tokens, uint32_t block_tokens, BlockKey salt, BlockKey* out) {
  if (block_tokens == 0) return InvalidArgument("block_tokens must be > 0");
  const size_t blocks = tokens.size() / block_tokens;
  std::vector<unsigned char> buf(16 + 4 * size_t{block_tokens});
  BlockKey parent = salt;
  for (size_t b = 0; b < blocks; ++b) {
    PutLe64(parent.hi, buf.data());
    PutLe64(parent.lo, buf.data() + 8);
    unsigned char* p = buf.data() + 16;
    for (uint32_t t = 0; t < block_tokens; ++t) {
      const int64_t id = tokens[b * block_tokens + t];
      if (id < 0 || id > int64_t{0xFFFFFFFF}) {
        return InvalidArgument("token id " + std::to_string(id) + " at position " +
                               std::to_string(b * block_tokens + t) + " is not in [0, 2^32)");
      }
      const auto u = static_cast<uint32_t>(id);
      p[4 * t + 0] = static_cast<unsigned char>(u);
      p[4 * t + 1] = static_cast<unsigned char>(u >> 8);
      p[4 * t + 2] = static_cast<unsigned char>(u >> 16);
      p[4 * t + 3] = static_cast<unsigned char>(u >> 24);
    }
    parent = FromXxh(XXH3_128bits(buf.data(), buf.size()));
    out[b] = parent;
  }
  return Status::Ok();
}

}  // namespace kvtier
