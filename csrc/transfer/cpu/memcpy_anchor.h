// The anchor the copy benchmark compares against: plain memcpy of one contiguous buffer into
// another, split evenly over `threads` threads (glibc picks its own best strategy, including
// non-temporal stores for large sizes). Returns seconds for the whole copy.
#pragma once

#include <cstddef>

namespace kvtier {

double TimedParallelMemcpy(void* dst, const void* src, size_t size_bytes, int threads);

}  // namespace kvtier
