// The CUDA side of kvtier (see cuda_backend.h; cuda_stub.cc is the twin built without CUDA): a
// probe that is safe without a driver or GPU, the cudaHostRegister HostPinner, and the "cuda" copy
// backend for cuda <-> cpu and cuda <-> cuda (same device) block transfers. CUDA runtime API only;
// linked against static cudart, so this file loads on machines with no CUDA installed at all.
//
// Note [CUDA copy path]: a request is (block pair x plan piece) units, addressed exactly as in
// CpuCopyBackend::CopyUnits. The units are flattened into runs (src, dst, len), merging a unit
// into the previous run when both sides continue it (contiguous blocks of a pool or of a
// registration become one run). Host<->device runs of at least kMemcpyMinBytes (256 KiB) go out
// as cudaMemcpyAsync(cudaMemcpyDefault): the DMA engines move long runs at full PCIe speed. All
// other runs (shorter ones, and device-to-device runs of any length) go out together, split into
// kKernelChunkBytes pieces, as ONE launch of GatherScatterKernel, whose descriptor array
// is written into a pinned staging buffer and copied to a device buffer with cudaMemcpyAsync on
// the same stream; the kernel gives each descriptor a warp (Note [Copy kernel shape]; grid-stride
// over descriptors) and copies 16 bytes per thread per step when src and dst share their
// alignment modulo 16 (8, 4, else bytes otherwise), with byte heads and tails. Staging and device
// descriptor buffers belong to a Slot, reused across requests and grown geometrically, never
// allocated per piece; a Slot stays with its request until the request's event has completed.
//
// Note [CUDA lanes]: all CUDA work for device d runs on one thread of our own (the Lane), which
// calls cudaSetDevice(d) once. Submit only validates and queues, so a caller's thread never has
// its current device changed and never gets a CUDA context it did not ask for (a runtime call on
// a fresh thread would create one on device 0). Each lane has three non-blocking streams, one
// per direction (cpu->cuda, cuda->cpu, cuda->cuda): loads and stores overlap on the two copy
// engines and kernels, and batches of the same direction run in submission order.
//
// Note [CUDA completion]: after a request's work the lane records a cudaEvent and enqueues a
// cudaLaunchHostFunc that only rings the lane's doorbell (a host function must not call CUDA).
// The lane thread then asks cudaEventQuery which batches are done and calls Finish for them,
// so the status comes from CUDA: an asynchronous error (e.g. an illegal address in the kernel)
// surfaces as a TransferError naming cudaEventQuery. While batches are in flight the lane also
// polls every kPollFallback, so a host function that never runs (a broken context) cannot leave
// a request pending. Every request ends in exactly one Finish: inline in Submit when it is
// refused before reaching the lane, otherwise on the lane thread. If issuing fails after some
// work was already queued, the request still waits for its event (or, failing that, a stream
// synchronize) before it finishes with the error: Finish releases the blocks, so nothing may
// still be copying them.
//
// Note [Host memory the GPU can address]: the kernel dereferences host addresses, so the cpu
// side of a transfer must be page-locked and mapped (cudaHostRegister with
// cudaHostRegisterMapped, cudaHostAlloc, torch pin_memory) or the device must access pageable
// memory coherently (cudaDevAttrPageableMemoryAccess: HMM/ATS systems such as Grace Hopper).
// We do NOT stage through a pinned bounce buffer: a hidden extra copy would halve bandwidth and
// hide a configuration mistake. Instead the first transfer that touches a space checks every
// segment's first and last byte with cudaPointerGetAttributes and refuses the request with a
// TransferError that says the host memory is not page-locked. The check also translates host
// addresses to device addresses (cudaPointerAttributes::devicePointer; the same address on
// every UVA platform but not guaranteed) and rejects cuda-side memory that lives on another
// device. Successful checks are cached per (space uid, lane); a space whose memory is
// unregistered behind our back afterwards is the caller's bug.
#include "transfer/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "memory/host_arena.h"

#ifndef KVTIER_BUILD_CUDA_ARCHS
#define KVTIER_BUILD_CUDA_ARCHS "unknown"
#endif

namespace kvtier::cuda {
namespace {

constexpr uint64_t kMemcpyMinBytes = uint64_t{256} << 10;  // host<->device runs this long use cudaMemcpyAsync
constexpr uint64_t kKernelChunkBytes = uint64_t{64} << 10;  // the kernel's runs are split into pieces this long
constexpr int kKernelThreads = 256;                        // threads per CUDA block
constexpr uint64_t kMaxGridBlocks = 32768;                 // grid-stride over descriptors past this
constexpr size_t kInitialDescCapacity = 1024;              // descriptors per slot at first use
constexpr size_t kMaxIdleSlots = 8;                        // idle slots kept per lane
constexpr size_t kMaxCachedViews = 256;                    // address checks cached per lane
constexpr auto kPollFallback = std::chrono::milliseconds(2);

// ---------------------------------------------------------------- small helpers

std::string ErrorText(cudaError_t e) {
  return std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
}

std::string CallFailed(const char* call, cudaError_t e) { return std::string(call) + " failed: " + ErrorText(e); }

// Resets this thread's last-error slot after a failed call, so a later launch check on the same
// thread does not report our (non-sticky) error as its own.
void ClearLastError() { (void)cudaGetLastError(); }

std::string VersionString(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

std::string FormatGiB(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f GiB", static_cast<double>(bytes) / double(uint64_t{1} << 30));
  return buf;
}

std::string FormatAddress(uint64_t address) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(address));
  return buf;
}

// `*to = from` without an expression statement of the [[nodiscard]] Status type (nvcc warns).
void Replace(Status* to, Status from) noexcept { std::swap(*to, from); }

void FinishNoThrow(TransferRequest& req, Status status) noexcept {
  try {
    req.Finish(std::move(status));
  } catch (...) {
    // Finish is the engine's; it does not throw. Nothing sensible is left to do if it did.
  }
}

// "cuda copy cpu -> cuda:0 (12 blocks, 3145728 bytes): "
std::string Describe(const TransferRequest& req) {
  return "cuda copy " + req.src->device().ToString() + " -> " + req.dst->device().ToString() + " (" +
         std::to_string(req.src_ids.size()) + " blocks, " + std::to_string(req.state->bytes()) + " bytes): ";
}

// ---------------------------------------------------------------- the gather/scatter kernel

struct CopyDesc {
  uint64_t src;
  uint64_t dst;
  uint64_t len_bytes;
};
static_assert(sizeof(CopyDesc) == 24);

// Copies len bytes with V-wide accesses when src and dst are congruent modulo sizeof(V): byte
// head up to the first V-aligned address, V body (kLoadsInFlight loads in flight per thread), byte
// tail. `tid` and `step` are this thread's lane and the number of lanes sharing the copy (a warp).
constexpr int kLoadsInFlight = 8;  // V-wide loads per thread before its stores (Note [Copy kernel shape])

template <typename V>
__device__ __forceinline__ void CopyCoAligned(const unsigned char* src, unsigned char* dst, uint64_t len_bytes,
                                              uint64_t tid, uint64_t step) {
  constexpr uint64_t kWidth = sizeof(V);
  uint64_t head = (kWidth - (reinterpret_cast<uintptr_t>(src) & (kWidth - 1))) & (kWidth - 1);
  if (head > len_bytes) head = len_bytes;
  for (uint64_t b = tid; b < head; b += step) dst[b] = src[b];
  const uint64_t vectors = (len_bytes - head) / kWidth;
  const V* vs = reinterpret_cast<const V*>(src + head);
  V* vd = reinterpret_cast<V*>(dst + head);
  uint64_t v = tid;
  for (; v + (kLoadsInFlight - 1) * step < vectors; v += kLoadsInFlight * step) {
    V r[kLoadsInFlight];
#pragma unroll
    for (int k = 0; k < kLoadsInFlight; ++k) r[k] = vs[v + k * step];
#pragma unroll
    for (int k = 0; k < kLoadsInFlight; ++k) vd[v + k * step] = r[k];
  }
  for (; v < vectors; v += step) vd[v] = vs[v];
  for (uint64_t b = head + vectors * kWidth + tid; b < len_bytes; b += step) dst[b] = src[b];
}

__device__ __forceinline__ void CopyDescriptor(const CopyDesc& d, uint64_t tid, uint64_t step) {
  const auto* src = reinterpret_cast<const unsigned char*>(d.src);
  auto* dst = reinterpret_cast<unsigned char*>(d.dst);
  const uint64_t skew = d.src ^ d.dst;
  if ((skew & 15) == 0) {
    CopyCoAligned<uint4>(src, dst, d.len_bytes, tid, step);
  } else if ((skew & 7) == 0) {
    CopyCoAligned<uint2>(src, dst, d.len_bytes, tid, step);
  } else if ((skew & 3) == 0) {
    CopyCoAligned<unsigned int>(src, dst, d.len_bytes, tid, step);
  } else {
    CopyCoAligned<unsigned char>(src, dst, d.len_bytes, tid, step);
  }
}

// Note [Copy kernel shape]: the kernel gives each descriptor one warp (8 per CUDA block,
// grid-stride past kMaxGridBlocks), with 8 16-byte loads in flight per lane: 4 KiB in flight per
// warp, so a run of a few KiB (a small model's per-layer block) still fills the warp's loads.
// Measured on an H200 against the older shape (one 256-thread CUDA block per descriptor, 4 loads
// in flight) in the same runs: level within the run-to-run spread for HBM <-> pinned DRAM, and
// 0.49 -> 0.53-0.62x of cudaMemcpy for 64 KiB runs HBM -> HBM; short-run HBM -> HBM copies stay
// at 0.1-0.2x with either shape, so their bound is not the kernel (docs/benchmarks.md).
__global__ void __launch_bounds__(kKernelThreads)
    GatherScatterKernel(const CopyDesc* __restrict__ descs, uint64_t count) {
  const uint64_t lane = threadIdx.x & 31u;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t warps = (static_cast<uint64_t>(gridDim.x) * blockDim.x) >> 5;
  for (uint64_t i = warp; i < count; i += warps) CopyDescriptor(descs[i], lane, 32);
}

// ---------------------------------------------------------------- probe

CudaProbe RunProbe() {
  CudaProbe p;
  p.compiled = true;
  try {
    if (cudaRuntimeGetVersion(&p.runtime_version) != cudaSuccess) {
      ClearLastError();
      p.runtime_version = CUDART_VERSION;
    }
    if (cudaDriverGetVersion(&p.driver_version) != cudaSuccess) {  // 0 and success when no driver
      ClearLastError();
      p.driver_version = 0;
    }
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      ClearLastError();
      p.reason = CallFailed("cudaGetDeviceCount", e);
      if (p.driver_version == 0) {
        p.reason += "; no NVIDIA driver is loaded (libcuda.so.1 is missing or cannot be loaded)";
      } else if (e == cudaErrorInsufficientDriver || p.driver_version < p.runtime_version) {
        p.reason += "; the NVIDIA driver supports CUDA " + VersionString(p.driver_version) +
                    " but kvtier was built against CUDA runtime " + VersionString(p.runtime_version) +
                    " (upgrade the driver)";
      } else if (e == cudaErrorNoDevice) {
        p.reason += "; no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)";
      }
      return p;
    }
    if (count <= 0) {
      p.reason = "no CUDA device is visible (cudaGetDeviceCount returned 0; check nvidia-smi and CUDA_VISIBLE_DEVICES)";
      return p;
    }
    p.device_count = count;
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop{};
      const cudaError_t pe = cudaGetDeviceProperties(&prop, i);
      if (pe != cudaSuccess) {
        ClearLastError();
        p.devices.push_back("cuda:" + std::to_string(i) + " (" + CallFailed("cudaGetDeviceProperties", pe) + ")");
        continue;
      }
      std::string d = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) +
                      ", " + FormatGiB(prop.totalGlobalMem);
      if (!prop.unifiedAddressing) d += ", no unified addressing: unusable by kvtier";
      p.devices.push_back(d + ")");
    }
    p.usable = true;
  } catch (const std::exception& ex) {
    p.usable = false;
    p.reason = std::string("the CUDA probe failed: ") + ex.what();
  }
  return p;
}

// ---------------------------------------------------------------- host pinner

class CudaHostPinner final : public HostPinner {
 public:
  bool Pin(void* ptr, size_t size_bytes, std::string* why) override {
    const cudaError_t e = cudaHostRegister(ptr, size_bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (e == cudaSuccess) return true;
    ClearLastError();
    if (why != nullptr) {
      try {
        *why = "cudaHostRegister of " + std::to_string(size_bytes) + " bytes failed: " + ErrorText(e) +
               "; host memory is not page-locked, CUDA transfers from it will be refused";
      } catch (...) {
      }
    }
    return false;
  }

  void Unpin(void* ptr) override {
    if (cudaHostUnregister(ptr) != cudaSuccess) ClearLastError();
  }
};

// ---------------------------------------------------------------- lanes

// A descriptor buffer pair and the event that says when they (and the request) are free again.
struct Slot {
  cudaEvent_t done = nullptr;
  CopyDesc* host_descs = nullptr;  // pinned staging, written by the lane thread
  CopyDesc* dev_descs = nullptr;   // what the kernel reads
  size_t capacity = 0;             // in descriptors

  Slot() = default;
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  ~Slot() {
    if (host_descs != nullptr) (void)cudaFreeHost(host_descs);
    if (dev_descs != nullptr) (void)cudaFree(dev_descs);
    if (done != nullptr) (void)cudaEventDestroy(done);
    ClearLastError();
  }

  // Only called while the slot is idle (no work in flight reads its buffers).
  Status Reserve(size_t descs) {
    if (descs <= capacity) return Status::Ok();
    const size_t want = std::max({descs, capacity * 2, kInitialDescCapacity});
    CopyDesc* h = nullptr;
    CopyDesc* d = nullptr;
    cudaError_t e = cudaMallocHost(reinterpret_cast<void**>(&h), want * sizeof(CopyDesc));
    if (e != cudaSuccess) {
      ClearLastError();
      return TransferError(CallFailed("cudaMallocHost", e) + " for " + std::to_string(want * sizeof(CopyDesc)) +
                           " bytes of descriptor staging");
    }
    e = cudaMalloc(reinterpret_cast<void**>(&d), want * sizeof(CopyDesc));
    if (e != cudaSuccess) {
      ClearLastError();
      (void)cudaFreeHost(h);
      return TransferError(CallFailed("cudaMalloc", e) + " for " + std::to_string(want * sizeof(CopyDesc)) +
                           " bytes of device descriptors");
    }
    if (host_descs != nullptr) (void)cudaFreeHost(host_descs);
    if (dev_descs != nullptr) (void)cudaFree(dev_descs);
    ClearLastError();
    host_descs = h;
    dev_descs = d;
    capacity = want;
    return Status::Ok();
  }
};

struct Batch {
  std::unique_ptr<TransferRequest> req;
  std::unique_ptr<Slot> slot;
  Status issue_error;  // set when issuing failed after part of the work was already queued
};

// Per segment of a space: device address minus host address (0 on UVA platforms).
struct SpaceView {
  std::vector<int64_t> delta_bytes;
};

// One contiguous copy, host view (for cudaMemcpyAsync) and device view (for the kernel).
struct CopyRun {
  uint64_t hsrc, hdst, dsrc, ddst, len_bytes;
};

// What the host function touches. Outlives the lane thread; leaked if the streams could not be
// synchronized at shutdown (a host function might still run).
struct LaneSignal {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t doorbell = 0;                               // guarded by mu
  std::deque<std::unique_ptr<TransferRequest>> queue;  // guarded by mu
  bool stopping = false;                               // guarded by mu
};

void CUDART_CB RingDoorbell(void* user) {
  auto* signal = static_cast<LaneSignal*>(user);
  {
    std::lock_guard<std::mutex> lock(signal->mu);
    ++signal->doorbell;
  }
  signal->cv.notify_one();
}

enum Direction : int { kToDevice = 0, kToHost = 1, kDeviceToDevice = 2, kNumDirections = 3 };

// See Note [CUDA lanes]. Everything but the constructor, Post and the destructor runs on thread_.
class Lane {
 public:
  Lane(int device, std::atomic<uint64_t>* inflight)
      : device_(device), inflight_(inflight), signal_(std::make_unique<LaneSignal>()) {
    thread_ = std::thread([this] { Run(); });
  }

  ~Lane() {
    {
      std::lock_guard<std::mutex> lock(signal_->mu);
      signal_->stopping = true;
    }
    signal_->cv.notify_all();
    if (thread_.joinable()) thread_.join();
    if (!signal_safe_to_free_) (void)signal_.release();
  }

  // Strong guarantee: on throw, req is left untouched.
  void Post(std::unique_ptr<TransferRequest>& req) {
    {
      std::lock_guard<std::mutex> lock(signal_->mu);
      signal_->queue.push_back(std::move(req));
    }
    signal_->cv.notify_one();
  }

 private:
  void Run() {
    std::deque<std::unique_ptr<TransferRequest>> incoming;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(signal_->mu);
        auto ready = [&] {
          return !signal_->queue.empty() || signal_->doorbell != seen || (signal_->stopping && batches_.empty());
        };
        if (batches_.empty()) {
          signal_->cv.wait(lock, ready);
        } else {
          signal_->cv.wait_for(lock, kPollFallback, ready);
        }
        if (signal_->stopping && signal_->queue.empty() && batches_.empty()) break;
        seen = signal_->doorbell;
        incoming.swap(signal_->queue);
      }
      while (!incoming.empty()) {
        std::unique_ptr<TransferRequest> req = std::move(incoming.front());
        incoming.pop_front();
        try {
          Issue(req);
        } catch (...) {
          // Only an error message's allocation can get here. Let queued work end before Finish
          // releases the blocks (Note [CUDA completion]).
          if (req) {
            for (cudaStream_t s : streams_) {
              if (s != nullptr && cudaStreamSynchronize(s) != cudaSuccess) ClearLastError();
            }
            Done(req, InternalError("cuda copy: out of memory while reporting a copy error"));
          }
        }
      }
      Reap();
    }
    Shutdown();
  }

  // Takes req by reference so that a status built from *req is evaluated before req is emptied.
  void Done(std::unique_ptr<TransferRequest>& req, Status status) {
    FinishNoThrow(*req, std::move(status));
    req.reset();
    inflight_->fetch_sub(1);
    inflight_->notify_all();
  }

  Status Init() {
    cudaError_t e = cudaSetDevice(device_);
    if (e != cudaSuccess) {
      ClearLastError();
      return TransferError(CallFailed("cudaSetDevice", e) + " for cuda:" + std::to_string(device_));
    }
    int uva = 0;
    e = cudaDeviceGetAttribute(&uva, cudaDevAttrUnifiedAddressing, device_);
    if (e != cudaSuccess) {
      ClearLastError();
      return TransferError(CallFailed("cudaDeviceGetAttribute(cudaDevAttrUnifiedAddressing)", e));
    }
    if (uva == 0) {
      return DeviceError("cuda:" + std::to_string(device_) +
                         " has no unified virtual addressing, which kvtier's CUDA backend needs");
    }
    int pageable = 0;
    if (cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, device_) != cudaSuccess) {
      ClearLastError();
      pageable = 0;
    }
    pageable_access_ = pageable != 0;
    cudaFuncAttributes attributes{};
    e = cudaFuncGetAttributes(&attributes, GatherScatterKernel);
    if (e != cudaSuccess) {
      ClearLastError();
      cudaDeviceProp prop{};
      std::string arch = "unknown";
      if (cudaGetDeviceProperties(&prop, device_) == cudaSuccess) {
        arch = "sm_" + std::to_string(prop.major) + std::to_string(prop.minor);
      } else {
        ClearLastError();
      }
      return TransferError(CallFailed("cudaFuncGetAttributes", e) + ": kvtier's copy kernel cannot run on cuda:" +
                           std::to_string(device_) + " (" + arch + "; built for CUDA architectures " +
                           KVTIER_BUILD_CUDA_ARCHS + ")");
    }
    for (int i = 0; i < kNumDirections; ++i) {
      if (streams_[i] != nullptr) continue;
      e = cudaStreamCreateWithFlags(&streams_[i], cudaStreamNonBlocking);
      if (e != cudaSuccess) {
        ClearLastError();
        streams_[i] = nullptr;
        return TransferError(CallFailed("cudaStreamCreateWithFlags", e) + " on cuda:" + std::to_string(device_));
      }
    }
    ready_ = true;
    return Status::Ok();
  }

  void Shutdown() {
    if (!ready_ && streams_[0] == nullptr) return;  // this thread never touched CUDA
    bool synced = true;
    for (cudaStream_t& s : streams_) {
      if (s == nullptr) continue;
      if (cudaStreamSynchronize(s) != cudaSuccess) {
        ClearLastError();
        synced = false;
      }
    }
    idle_.clear();
    for (cudaStream_t& s : streams_) {
      if (s == nullptr) continue;
      (void)cudaStreamDestroy(s);
      s = nullptr;
    }
    ClearLastError();
    signal_safe_to_free_ = synced;  // published to ~Lane by the join
  }

  Result<std::unique_ptr<Slot>> AcquireSlot() {
    if (!idle_.empty()) {
      std::unique_ptr<Slot> slot = std::move(idle_.back());
      idle_.pop_back();
      return Result<std::unique_ptr<Slot>>(std::move(slot));
    }
    auto slot = std::make_unique<Slot>();
    const cudaError_t e = cudaEventCreateWithFlags(&slot->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
      ClearLastError();
      slot->done = nullptr;
      return TransferError(CallFailed("cudaEventCreateWithFlags", e));
    }
    return Result<std::unique_ptr<Slot>>(std::move(slot));
  }

  void ReleaseSlot(std::unique_ptr<Slot> slot) {
    if (idle_.size() < kMaxIdleSlots) idle_.push_back(std::move(slot));
  }

  // The device delta of the byte at `address`, or why the device cannot address it.
  Result<int64_t> DeviceDelta(uint64_t address, bool cpu_space, const std::string& what) {
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(address));
    if (e != cudaSuccess) {
      ClearLastError();
      return TransferError(what + ": " + CallFailed("cudaPointerGetAttributes", e));
    }
    const std::string dev = "cuda:" + std::to_string(device_);
    switch (a.type) {
      case cudaMemoryTypeHost:
        if (a.devicePointer == nullptr) {
          return TransferError(what + " is page-locked but not mapped for " + dev +
                               " (register it with cudaHostRegisterMapped)");
        }
        return static_cast<int64_t>(reinterpret_cast<uint64_t>(a.devicePointer) - address);
      case cudaMemoryTypeDevice:
        if (cpu_space) {
          return TransferError(what + " is GPU memory of cuda:" + std::to_string(a.device) +
                               ", but the space says it is on cpu");
        }
        if (a.device != device_) {
          return TransferError(what + " lives on cuda:" + std::to_string(a.device) + ", not " + dev);
        }
        return int64_t{0};
      case cudaMemoryTypeManaged:
        return int64_t{0};
      case cudaMemoryTypeUnregistered:
      default:
        if (pageable_access_) return int64_t{0};  // HMM/ATS: the GPU reads pageable memory
        if (cpu_space) {
          return TransferError(what + " is not page-locked host memory, so " + dev +
                               " cannot address it; kvtier does not stage through a bounce buffer. Pin it "
                               "(host pools are pinned when the CUDA host pinner is installed before they are "
                               "created; torch: tensor.pin_memory(); or cudaHostRegister)");
        }
        return TransferError(what + " is not CUDA memory");
    }
  }

  // Checks (once per space) that this device can address every segment of `space`.
  Result<std::shared_ptr<const SpaceView>> View(const BlockSpace& space, const char* side) {
    auto it = views_.find(space.uid());
    if (it != views_.end()) return it->second;
    auto view = std::make_shared<SpaceView>();
    const auto& segments = space.segments();
    view->delta_bytes.assign(segments.size(), 0);
    const bool cpu_space = space.device().is_cpu();
    const uint64_t blocks = space.num_blocks();
    for (size_t s = 0; s < segments.size(); ++s) {
      const Segment& seg = segments[s];
      if (seg.run_bytes == 0 || blocks == 0) continue;
      const uint64_t first = reinterpret_cast<uint64_t>(seg.base);
      const uint64_t last = first + static_cast<uint64_t>(int64_t(blocks - 1) * seg.block_stride_bytes);
      const uint64_t lo = std::min(first, last);
      const uint64_t hi = std::max(first, last) + seg.run_bytes - 1;
      const std::string what = std::string("the ") + side + " " + space.kind() + "'s memory (segment " +
                               std::to_string(s) + ", " + FormatAddress(lo) + ".." + FormatAddress(hi) + ")";
      Result<int64_t> dlo = DeviceDelta(lo, cpu_space, what);
      if (!dlo.ok()) return dlo.status();
      Result<int64_t> dhi = DeviceDelta(hi, cpu_space, what);
      if (!dhi.ok()) return dhi.status();
      if (dlo.value() != dhi.value()) {
        return TransferError(what + " spans allocations that " + "cuda:" + std::to_string(device_) +
                             " maps at different offsets");
      }
      view->delta_bytes[s] = dlo.value();
    }
    if (views_.size() >= kMaxCachedViews) views_.clear();
    views_.emplace(space.uid(), view);
    return std::shared_ptr<const SpaceView>(view);
  }

  // Flattens the request into runs_ (Note [CUDA copy path]); merges continuing units.
  void BuildRuns(const TransferRequest& req, const SpaceView& sv, const SpaceView& dv) {
    runs_.clear();
    const auto& plan = *req.plan;
    const auto& ss = req.src->segments();
    const auto& ds = req.dst->segments();
    for (size_t pair = 0; pair < req.src_ids.size(); ++pair) {
      for (const CopyPiece& p : plan) {
        const Segment& s = ss[p.src_segment];
        const Segment& d = ds[p.dst_segment];
        const uint64_t hsrc = reinterpret_cast<uint64_t>(s.base + int64_t(req.src_ids[pair]) * s.block_stride_bytes +
                                                         p.src_offset);
        const uint64_t hdst = reinterpret_cast<uint64_t>(d.base + int64_t(req.dst_ids[pair]) * d.block_stride_bytes +
                                                         p.dst_offset);
        const uint64_t dsrc = hsrc + static_cast<uint64_t>(sv.delta_bytes[p.src_segment]);
        const uint64_t ddst = hdst + static_cast<uint64_t>(dv.delta_bytes[p.dst_segment]);
        if (!runs_.empty()) {
          CopyRun& b = runs_.back();
          if (b.hsrc + b.len_bytes == hsrc && b.hdst + b.len_bytes == hdst && b.dsrc + b.len_bytes == dsrc &&
              b.ddst + b.len_bytes == ddst) {
            b.len_bytes += p.len;
            continue;
          }
        }
        runs_.push_back(CopyRun{hsrc, hdst, dsrc, ddst, p.len});
      }
    }
  }

  void Issue(std::unique_ptr<TransferRequest>& req) {
    std::unique_ptr<Slot> slot;
    std::unique_ptr<Batch> batch;
    uint64_t small = 0;  // kernel descriptors
    const bool src_cuda = req->src->device().is_cuda();
    const bool dst_cuda = req->dst->device().is_cuda();
    const Direction dir = (src_cuda && dst_cuda) ? kDeviceToDevice : (src_cuda ? kToHost : kToDevice);
    // Device-to-device runs of any length go to the kernel: one cudaMemcpyAsync per 2 MiB block
    // (blocks_first layouts) moved HBM -> HBM at 0.18x of one contiguous copy on an H200, launch
    // bound. Host<->device runs of kMemcpyMinBytes or more go to the DMA engines.
    auto by_kernel = [dir](const CopyRun& r) { return dir == kDeviceToDevice || r.len_bytes < kMemcpyMinBytes; };
    // Everything that may throw or fail without side effects happens before the first enqueue.
    try {
      if (!ready_) {
        if (Status st = Init(); !st.ok()) {
          Done(req, Status(st.code(), Describe(*req) + st.message()));
          return;
        }
      }
      Result<std::shared_ptr<const SpaceView>> sv = View(*req->src, "source");
      if (!sv.ok()) return Done(req, Status(sv.status().code(), Describe(*req) + sv.status().message()));
      Result<std::shared_ptr<const SpaceView>> dv = View(*req->dst, "target");
      if (!dv.ok()) return Done(req, Status(dv.status().code(), Describe(*req) + dv.status().message()));
      BuildRuns(*req, *sv.value(), *dv.value());
      for (const CopyRun& r : runs_) {
        if (by_kernel(r)) small += (r.len_bytes + kKernelChunkBytes - 1) / kKernelChunkBytes;
      }
      Result<std::unique_ptr<Slot>> acquired = AcquireSlot();
      if (!acquired.ok()) return Done(req, TransferError(Describe(*req) + acquired.status().message()));
      slot = std::move(acquired.value());
      if (Status st = slot->Reserve(small); !st.ok()) {
        ReleaseSlot(std::move(slot));
        return Done(req, TransferError(Describe(*req) + st.message()));
      }
      uint64_t k = 0;
      for (const CopyRun& r : runs_) {
        if (!by_kernel(r)) continue;
        for (uint64_t off = 0; off < r.len_bytes; off += kKernelChunkBytes) {
          slot->host_descs[k++] = CopyDesc{r.dsrc + off, r.ddst + off, std::min(kKernelChunkBytes, r.len_bytes - off)};
        }
      }
      batch = std::make_unique<Batch>();
      if (batches_.size() == batches_.capacity()) batches_.reserve(std::max<size_t>(16, batches_.capacity() * 2));
    } catch (const std::exception& ex) {
      if (slot) ReleaseSlot(std::move(slot));
      if (!req) return;  // already finished
      return Done(req, InternalError(Describe(*req) + "cannot prepare the copy: " + ex.what()));
    }

    // From here on only error messages allocate (Run catches that); once `queued` is true the
    // request must wait for the stream before it finishes.
    cudaStream_t stream = streams_[dir];
    bool queued = false;
    Status error;
    if (small > 0) {
      cudaError_t e = cudaMemcpyAsync(slot->dev_descs, slot->host_descs, small * sizeof(CopyDesc),
                                      cudaMemcpyHostToDevice, stream);
      if (e != cudaSuccess) {
        ClearLastError();
        Replace(&error, TransferError(Describe(*req) + CallFailed("cudaMemcpyAsync (descriptors)", e)));
      } else {
        queued = true;
        ClearLastError();
        constexpr uint64_t kWarpsPerBlock = kKernelThreads / 32;
        const auto grid = static_cast<unsigned>(
            std::min<uint64_t>((small + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGridBlocks));
        GatherScatterKernel<<<grid, kKernelThreads, 0, stream>>>(slot->dev_descs, small);
        e = cudaGetLastError();
        if (e != cudaSuccess) {
          Replace(&error, TransferError(Describe(*req) + CallFailed("launching the gather/scatter kernel", e)));
        }
      }
    }
    if (error.ok()) {
      for (const CopyRun& r : runs_) {
        if (by_kernel(r)) continue;
        const cudaError_t e = cudaMemcpyAsync(reinterpret_cast<void*>(r.hdst), reinterpret_cast<const void*>(r.hsrc),
                                              r.len_bytes, cudaMemcpyDefault, stream);
        if (e != cudaSuccess) {
          ClearLastError();
          Replace(&error, TransferError(Describe(*req) + CallFailed("cudaMemcpyAsync", e) + " for " +
                                std::to_string(r.len_bytes) + " bytes " + FormatAddress(r.hsrc) + " -> " +
                                FormatAddress(r.hdst)));
          break;
        }
        queued = true;
      }
    }
    if (!queued) {
      ReleaseSlot(std::move(slot));
      return Done(req, error.ok() ? TransferError(Describe(*req) + "nothing to copy was queued") : error);
    }
    const cudaError_t e = cudaEventRecord(slot->done, stream);
    if (e != cudaSuccess) {
      ClearLastError();
      if (error.ok()) Replace(&error, TransferError(Describe(*req) + CallFailed("cudaEventRecord", e)));
      // Work already queued must end before Finish releases the blocks.
      const cudaError_t se = cudaStreamSynchronize(stream);
      if (se == cudaSuccess) {
        ReleaseSlot(std::move(slot));
      } else {
        ClearLastError();
        slot.reset();
      }
      return Done(req, error);
    }
    if (cudaLaunchHostFunc(stream, RingDoorbell, signal_.get()) != cudaSuccess) {
      ClearLastError();  // not fatal: the poll in Run finds the event
    }
    batch->req = std::move(req);
    batch->slot = std::move(slot);
    Replace(&batch->issue_error, std::move(error));
    batches_.push_back(std::move(batch));  // capacity reserved above
  }

  // Finishes every batch whose event has completed (or failed).
  void Reap() {
    for (size_t i = 0; i < batches_.size();) {
      const cudaError_t q = cudaEventQuery(batches_[i]->slot->done);
      if (q == cudaErrorNotReady) {
        ++i;
        continue;
      }
      std::unique_ptr<Batch> b = std::move(batches_[i]);
      batches_[i] = std::move(batches_.back());
      batches_.pop_back();
      Status status = std::move(b->issue_error);
      if (q != cudaSuccess) {
        ClearLastError();
        if (status.ok()) {
          Replace(&status, TransferError(Describe(*b->req) + "the copy failed on the GPU: " +
                                         CallFailed("cudaEventQuery", q)));
        }
        b->slot.reset();
      } else {
        ReleaseSlot(std::move(b->slot));
      }
      Done(b->req, std::move(status));
    }
  }

  const int device_;
  std::atomic<uint64_t>* const inflight_;
  std::unique_ptr<LaneSignal> signal_;
  bool signal_safe_to_free_ = true;
  std::thread thread_;
  // Lane thread only:
  bool ready_ = false;
  bool pageable_access_ = false;
  cudaStream_t streams_[kNumDirections] = {nullptr, nullptr, nullptr};
  std::vector<std::unique_ptr<Slot>> idle_;
  std::vector<std::unique_ptr<Batch>> batches_;
  std::unordered_map<uint64_t, std::shared_ptr<const SpaceView>> views_;
  std::vector<CopyRun> runs_;
};

// ---------------------------------------------------------------- the backend

class CudaCopyBackend final : public TransferBackend {
 public:
  explicit CudaCopyBackend(int device_count) : lanes_(static_cast<size_t>(std::max(device_count, 0))) {}

  ~CudaCopyBackend() override {
    Drain();
    std::lock_guard<std::mutex> lock(lanes_mu_);
    for (auto& lane : lanes_) lane.reset();
  }

  std::string_view name() const override { return "cuda"; }

  bool Supports(const Device& src, const Device& dst) const override {
    if (src.is_cuda() && dst.is_cuda()) return src.index == dst.index;
    return (src.is_cuda() && dst.is_cpu()) || (src.is_cpu() && dst.is_cuda());
  }

  void Submit(std::unique_ptr<TransferRequest> request) override {
    bool counted = false;
    try {
      const Device& src = request->src->device();
      const Device& dst = request->dst->device();
      if (!Supports(src, dst)) {
        FinishNoThrow(*request, DeviceError("the CUDA backend does not copy " + src.ToString() + " -> " +
                                            dst.ToString() + " (cuda <-> cpu and within one GPU only)"));
        return;
      }
      const int index = src.is_cuda() ? src.index : dst.index;
      if (index < 0 || static_cast<size_t>(index) >= lanes_.size()) {
        FinishNoThrow(*request, DeviceError("cuda:" + std::to_string(index) + " does not exist (this process sees " +
                                            std::to_string(lanes_.size()) + " CUDA device(s))"));
        return;
      }
      if (request->src_ids.empty() || request->plan->empty()) {
        FinishNoThrow(*request, Status::Ok());
        return;
      }
      Lane* lane = GetLane(index);
      inflight_.fetch_add(1);
      counted = true;
      lane->Post(request);
    } catch (const std::exception& ex) {
      if (request) {
        FinishNoThrow(*request, InternalError(std::string("cannot queue a CUDA copy: ") + ex.what()));
        if (counted) {
          inflight_.fetch_sub(1);
          inflight_.notify_all();
        }
      }
    }
  }

  void Drain() override {
    for (uint64_t n = inflight_.load(); n != 0; n = inflight_.load()) inflight_.wait(n);
  }

 private:
  Lane* GetLane(int index) {
    std::lock_guard<std::mutex> lock(lanes_mu_);
    auto& lane = lanes_[static_cast<size_t>(index)];
    if (!lane) lane = std::make_unique<Lane>(index, &inflight_);
    return lane.get();
  }

  std::atomic<uint64_t> inflight_{0};
  std::mutex lanes_mu_;
  std::vector<std::unique_ptr<Lane>> lanes_;  // guarded by lanes_mu_; created on first use
};

}  // namespace

const CudaProbe& Probe() {
  static const CudaProbe probe = RunProbe();
  return probe;
}

void InstallHostPinner() {
  if (!Probe().usable) return;
  // Never destroyed: arenas may unpin during static destruction.
  static CudaHostPinner* const pinner = new CudaHostPinner();
  SetHostPinner(pinner);
}

std::unique_ptr<TransferBackend> MakeBackend(std::string* why) {
  const CudaProbe& probe = Probe();
  if (!probe.usable) {
    if (why != nullptr) *why = probe.reason;
    return nullptr;
  }
  try {
    return std::make_unique<CudaCopyBackend>(probe.device_count);
  } catch (const std::exception& ex) {
    if (why != nullptr) *why = std::string("cannot start the CUDA copy backend: ") + ex.what();
    return nullptr;
  }
}

}  // namespace kvtier::cuda
