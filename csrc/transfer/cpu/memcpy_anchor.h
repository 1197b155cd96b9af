// The anchors the copy benchmark compares against: one contiguous buffer copied into another,
// the same bytes kvtier's gather moves, the fastest ways this machine knows (Note [Copy anchor]
// in python/kvtier/benchmarks/copy.py). Each returns seconds for the whole copy.
#pragma once

#include <cstddef>

namespace kvtier {

// Plain memcpy, split evenly over `threads` threads (glibc picks its own strategy, which may or
// may not use non-temporal stores at this size).
double TimedParallelMemcpy(void* dst, const void* src, size_t size_bytes, int threads);

// The same split, each thread copying its share with streaming (non-temporal) stores, the copy
// kvtier's own engine uses for large batches (CopyBytes(..., nontemporal=true)), then fencing.
// Falls back to memcpy where the CPU has no streaming stores (NontemporalCopyKind() == "memcpy").
double TimedParallelStreamCopy(void* dst, const void* src, size_t size_bytes, int threads);

}  // namespace kvtier
