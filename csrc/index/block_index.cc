#include "index/block_index.h"

#include <string>

namespace kvtier {

Status BlockIndex::CheckTier(uint8_t tier) const {
  if (tier >= kMaxTiers) return InvalidArgument("tier " + std::to_string(tier) + " is out of range");
  return Status::Ok();
}

size_t BlockIndex::MatchPrefix(std::span<const BlockKey> keys, uint8_t* tiers, int32_t* blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (; n < keys.size(); ++n) {
    auto it = map_.find(keys[n]);
    if (it == map_.end()) break;
    tiers[n] = it->second.tier;
    blocks[n] = it->second.block;
  }
  for (size_t i = n; i-- > 0;) {  // Note [Tail-first eviction]: the head ends most recent
    Entry& e = map_.find(keys[i])->second;
    lru_[e.tier].splice(lru_[e.tier].begin(), lru_[e.tier], e.lru);
  }
  return n;
}

void BlockIndex::Contains(std::span<const BlockKey> keys, uint8_t* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) out[i] = map_.count(keys[i]) ? 1 : 0;
}

Status BlockIndex::Insert(std::span<const BlockKey> keys, uint8_t tier, std::span<const int32_t> blocks) {
  KVTIER_RETURN_IF_ERROR(CheckTier(tier));
  if (keys.size() != blocks.size()) return InvalidArgument("keys and blocks differ in length");
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    if (map_.count(keys[i])) return InvalidArgument("key " + std::to_string(i) + " of the batch is already cached");
    for (size_t j = 0; j < i; ++j) {
      if (keys[j] == keys[i]) return InvalidArgument("key " + std::to_string(i) + " appears twice in the batch");
    }
  }
  for (size_t i = keys.size(); i-- > 0;) {  // Note [Tail-first eviction]
    lru_[tier].push_front(keys[i]);
    map_.emplace(keys[i], Entry{tier, blocks[i], 0, lru_[tier].begin()});
  }
  return Status::Ok();
}

Status BlockIndex::Relocate(std::span<const BlockKey> keys, uint8_t tier, std::span<const int32_t> blocks) {
  KVTIER_RETURN_IF_ERROR(CheckTier(tier));
  if (keys.size() != blocks.size()) return InvalidArgument("keys and blocks differ in length");
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!map_.count(keys[i])) return InvalidArgument("key " + std::to_string(i) + " of the batch is not cached");
  }
  for (size_t i = keys.size(); i-- > 0;) {  // Note [Tail-first eviction]
    Entry& e = map_.find(keys[i])->second;
    lru_[e.tier].erase(e.lru);
    lru_[tier].push_front(keys[i]);
    e.tier = tier;
    e.block = blocks[i];
    e.lru = lru_[tier].begin();
  }
  return Status::Ok();
}

size_t BlockIndex::Remove(std::span<const BlockKey> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const BlockKey& k : keys) {
    auto it = map_.find(k);
    if (it == map_.end() || it->second.pins > 0) continue;
    lru_[it->second.tier].erase(it->second.lru);
    map_.erase(it);
    ++n;
  }
  return n;
}

Status BlockIndex::Pin(std::span<const BlockKey> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!map_.count(keys[i])) return InvalidArgument("key " + std::to_string(i) + " of the batch is not cached");
  }
  for (const BlockKey& k : keys) ++map_.find(k)->second.pins;
  return Status::Ok();
}

void BlockIndex::Unpin(std::span<const BlockKey> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const BlockKey& k : keys) {
    auto it = map_.find(k);
    if (it != map_.end() && it->second.pins > 0) --it->second.pins;
  }
}

size_t BlockIndex::Victims(uint8_t tier, size_t n, BlockKey* keys, int32_t* blocks, uint32_t shared_refs) const {
  if (tier >= kMaxTiers) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  auto shared = [&](const BlockKey& k) {
    if (shared_refs == 0) return false;
    auto r = refs_.find(k);
    return r != refs_.end() && r->second >= shared_refs;
  };
  size_t found = 0;
  // Pass 0 takes unshared keys, pass 1 (only with shared_refs) the shared ones, each oldest first.
  for (int pass = 0; pass < (shared_refs ? 2 : 1) && found < n; ++pass) {
    for (auto it = lru_[tier].rbegin(); it != lru_[tier].rend() && found < n; ++it) {
      const Entry& e = map_.find(*it)->second;
      if (e.pins > 0 || shared(*it) != (pass == 1)) continue;
      keys[found] = *it;
      blocks[found] = e.block;
      ++found;
    }
  }
  return found;
}

void BlockIndex::Locate(std::span<const BlockKey> keys, uint8_t* tiers, int32_t* blocks, uint32_t* pins) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = map_.find(keys[i]);
    tiers[i] = it == map_.end() ? kAbsent : it->second.tier;
    blocks[i] = it == map_.end() ? -1 : it->second.block;
    pins[i] = it == map_.end() ? 0 : it->second.pins;
  }
}

void BlockIndex::Ref(std::span<const BlockKey> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const BlockKey& k : keys) ++refs_[k];
}

Status BlockIndex::Unref(std::span<const BlockKey> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  std::unordered_map<BlockKey, uint32_t, BlockKeyHash> need;  // a key may appear more than once
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = refs_.find(keys[i]);
    if (it == refs_.end() || ++need[keys[i]] > it->second) {
      return InvalidArgument("key " + std::to_string(i) + " of the batch has no trace reference to drop");
    }
  }
  for (const BlockKey& k : keys) {
    auto it = refs_.find(k);
    if (--it->second == 0) refs_.erase(it);
  }
  return Status::Ok();
}

void BlockIndex::Refs(std::span<const BlockKey> keys, uint32_t* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = refs_.find(keys[i]);
    out[i] = it == refs_.end() ? 0 : it->second;
  }
}

size_t BlockIndex::Count(uint8_t tier) const {
  std::lock_guard<std::mutex> lock(mu_);
  return tier < kMaxTiers ? lru_[tier].size() : 0;
}

}  // namespace kvtier
