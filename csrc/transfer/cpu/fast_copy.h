// Bulk copy for DRAM -> DRAM runs. glibc's memcpy switches to non-temporal stores only for a
// single very large call; a gather of many 4-64 KiB runs never reaches that threshold, so its
// stores read each target line first (RFO) and pollute the cache. When a whole batch is larger
// than the last-level cache we stream the target with non-temporal stores instead (AVX-512 or
// AVX2, picked at run time), which is what lets a gather match one big memcpy.
#pragma once

#include <cstddef>

namespace kvtier {

// Copies n bytes; with nontemporal, uses streaming stores when the CPU has them. After a
// sequence of nontemporal copies, call StoreFence() before publishing completion.
void CopyBytes(void* dst, const void* src, size_t n, bool nontemporal) noexcept;
void StoreFence() noexcept;
// "avx512", "avx2" or "memcpy": the streaming-store flavour this CPU uses.
const char* NontemporalCopyKind() noexcept;

}  // namespace kvtier
