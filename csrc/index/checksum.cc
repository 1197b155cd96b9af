#include "index/checksum.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kvtier {

uint64_t Checksum64(const void* data, size_t size_bytes) noexcept { return XXH3_64bits(data, size_bytes); }

}  // namespace kvtier
