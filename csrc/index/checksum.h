// Block keys and payload checksums.
//
// BlockKey is a 128-bit content key (the chained hash of a block's tokens and salt, computed by
// the index layer); tiers store and find blocks by it. Checksum64 is XXH3-64 over a payload: it
// travels with every block written to NVMe or a peer and is checked on the way back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace kvtier {

struct BlockKey {
  uint64_t hi = 0;
  uint64_t lo = 0;
  bool operator==(const BlockKey&) const = default;
};

struct BlockKeyHash {
  size_t operator()(const BlockKey& k) const noexcept { return static_cast<size_t>(k.lo ^ (k.hi * 0x9E3779B97F4A7C15ull)); }
};

uint64_t Checksum64(const void* data, size_t size_bytes) noexcept;

}  // namespace kvtier
