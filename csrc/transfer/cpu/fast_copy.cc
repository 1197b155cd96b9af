#include "transfer/cpu/fast_copy.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define KVTIER_X86 1
#endif

#include <cstdint>
#include <cstring>

namespace kvtier {
namespace {

constexpr size_t kMinStreamBytes = 1024;

#if KVTIER_X86

__attribute__((target("avx512f"))) void StreamCopyAvx512(char* dst, const char* src, size_t n) noexcept {
  // Align the target to 64 bytes with a plain copy, stream the body, copy the tail.
  const size_t head = (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {
    __m512i a = _mm512_loadu_si512(src + i);
    __m512i b = _mm512_loadu_si512(src + i + 64);
    __m512i c = _mm512_loadu_si512(src + i + 128);
    __m512i d = _mm512_loadu_si512(src + i + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 192), d);
  }
  for (; i + 64 <= n; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  }
  std::memcpy(dst + i, src + i, n - i);
}

__attribute__((target("avx2"))) void StreamCopyAvx2(char* dst, const char* src, size_t n) noexcept {
  const size_t head = (32 - (reinterpret_cast<uintptr_t>(dst) & 31)) & 31;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
  std::memcpy(dst + i, src + i, n - i);
}

#endif  // KVTIER_X86

enum class Flavour { kMemcpy, kAvx2, kAvx512 };

Flavour DetectFlavour() noexcept {
#if KVTIER_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Flavour::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Flavour::kAvx2;
#endif
  return Flavour::kMemcpy;
}

const Flavour kFlavour = DetectFlavour();

}  // namespace

void CopyBytes(void* dst, const void* src, size_t n, bool nontemporal) noexcept {
  if (!nontemporal || n < kMinStreamBytes) {
    std::memcpy(dst, src, n);
    return;
  }
  switch (kFlavour) {
#if KVTIER_X86
    case Flavour::kAvx512:
      StreamCopyAvx512(static_cast<char*>(dst), static_cast<const char*>(src), n);
      return;
    case Flavour::kAvx2:
      StreamCopyAvx2(static_cast<char*>(dst), static_cast<const char*>(src), n);
      return;
#endif
    default:
      std::memcpy(dst, src, n);
      return;
  }
}

void StoreFence() noexcept {
#if KVTIER_X86
  _mm_sfence();
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

const char* NontemporalCopyKind() noexcept {
  switch (kFlavour) {
    case Flavour::kAvx512: return "avx512";
    case Flavour::kAvx2: return "avx2";
    case Flavour::kMemcpy: return "memcpy";
  }
  return "memcpy";
}

}  // namespace kvtier
