// BlockIndex: where each cached block lives (tier, block id), with one LRU order per tier and
// per-key pins. Every call takes a batch; the Python policy layer never loops over blocks.
//
// Note [Exclusive tiers]: a key lives in exactly one tier at a time. Promotion and demotion move
// it (Relocate) after the copy to the new tier has completed, so the index never points at a
// block whose bytes are not there yet (copy-then-release). A pinned key (a running step is
// loading or using it) is never offered as an eviction victim.
// Note [Trace references]: a live trace owns the keys of its blocks (kvtier.trace). Refs count the
// traces that own a key, independently of where (or whether) the key is cached, so a key that is
// dropped and cached again keeps its owners. Victims may offer keys owned by several traces (a
// shared prefix) only after every other key of the tier: shared prefixes stay hot.
// Note [Tail-first eviction]: keys of one batch are a sequence's consecutive blocks, and a prefix
// without its head is useless. Insert and MatchPrefix therefore make the *first* key of a batch
// the most recently used, so LRU eviction takes a prefix's tail before its head.
#pragma once

#include <cstdint>
#include <list>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "index/checksum.h"

namespace kvtier {

class BlockIndex {
 public:
  static constexpr int kMaxTiers = 8;

  // Number of leading keys present; tiers/blocks[i] filled for those. Marks them used (MRU).
  size_t MatchPrefix(std::span<const BlockKey> keys, uint8_t* tiers, int32_t* blocks);
  // Present or not, per key (no LRU update).
  void Contains(std::span<const BlockKey> keys, uint8_t* out) const;
  Status Insert(std::span<const BlockKey> keys, uint8_t tier, std::span<const int32_t> blocks);
  Status Relocate(std::span<const BlockKey> keys, uint8_t tier, std::span<const int32_t> blocks);
  // Removes keys that are present and unpinned; returns how many (blocks of removed keys out).
  size_t Remove(std::span<const BlockKey> keys);
  Status Pin(std::span<const BlockKey> keys);
  void Unpin(std::span<const BlockKey> keys);
  // Up to n least recently used unpinned keys of `tier`, oldest first. With shared_refs > 0, keys
  // owned by at least shared_refs traces come after all others (Note [Trace references]).
  size_t Victims(uint8_t tier, size_t n, BlockKey* keys, int32_t* blocks, uint32_t shared_refs = 0) const;
  size_t Count(uint8_t tier) const;
  // Where each key is and how many pins it has, without touching the LRU order: tier kAbsent
  // (block -1, pins 0) when not cached.
  static constexpr uint8_t kAbsent = 255;
  void Locate(std::span<const BlockKey> keys, uint8_t* tiers, int32_t* blocks, uint32_t* pins) const;

  // Trace ownership (Note [Trace references]). Unref of a key with no owner is an error and
  // changes nothing (the batch is checked first).
  void Ref(std::span<const BlockKey> keys);
  Status Unref(std::span<const BlockKey> keys);
  void Refs(std::span<const BlockKey> keys, uint32_t* out) const;

 private:
  struct Entry {
    uint8_t tier;
    int32_t block;
    uint32_t pins;
    std::list<BlockKey>::iterator lru;  // position in lru_[tier]; front = most recent
  };
  Status CheckTier(uint8_t tier) const;

  mutable std::mutex mu_;
  std::unordered_map<BlockKey, Entry, BlockKeyHash> map_;  // guarded by mu_
  std::list<BlockKey> lru_[kMaxTiers];                     // guarded by mu_
  std::unordered_map<BlockKey, uint32_t, BlockKeyHash> refs_;  // guarded by mu_; only keys with refs > 0
};

}  // namespace kvtier
