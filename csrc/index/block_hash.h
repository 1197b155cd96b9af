// Chained block keys over token ids.
//
// Note [Block keys]: a sequence of token ids is cut into blocks of block_tokens. Block i's key is
//   key_i = XXH3-128( key_{i-1} (16 bytes, hi then lo, little-endian) || block i's token ids as
//           little-endian uint32 )
// with key_{-1} = the salt key, itself XXH3-128 of a salt string that names the model, the KV
// layout, the dtype and any adapter. So a key names a block *and everything before it*: equal
// keys mean equal prefixes (up to hash collisions, 2^-128), on any machine and in any process
// (explicit little-endian encoding, no per-process seed). Only full blocks get keys: a partial
// last block is never cached, and its tokens are recomputed (they are at most block_tokens - 1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "common/status.h"
#include "index/checksum.h"

namespace kvtier {

BlockKey SaltKey(std::string_view salt) noexcept;

// Writes one key per full block of tokens to out (which holds tokens.size() / block_tokens).
// Token ids must be in [0, 2^32).
Status HashBlocks(std::span<const int64_t> tokens, uint32_t block_tokens, BlockKey salt, BlockKey* out);

}  // namespace kvtier
