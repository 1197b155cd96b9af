// The CUDA side of kvtier: a probe that is safe on machines without a GPU or driver, a host
// pinner for DRAM arenas, and a copy backend for cuda <-> cpu and cuda <-> cuda block transfers
// (streams, events, a gather/scatter kernel, cudaMemcpyAsync for long contiguous runs).
//
// Two implementations exist and CMake compiles exactly one: cuda_backend.cu when the build has
// CUDA (KVTIER_CUDA=ON/AUTO with nvcc), cuda_stub.cc otherwise. Callers never #ifdef.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transfer/transfer.h"

namespace kvtier::cuda {

struct CudaProbe {
  bool compiled = false;   // the build has the CUDA backend
  bool usable = false;     // compiled and at least one device answers
  int device_count = 0;
  int runtime_version = 0; // e.g. 13000
  int driver_version = 0;  // 0 when no driver is loaded
  std::vector<std::string> devices;  // "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"
  std::string reason;      // why not usable, when it is not
};

// Never throws, never hangs, never needs a GPU. Cached after the first call.
const CudaProbe& Probe();

// Installs the cudaHostRegister-based HostPinner when Probe().usable. Idempotent.
void InstallHostPinner();

// The copy backend, or nullptr with *why set when CUDA is not usable.
std::unique_ptr<TransferBackend> MakeBackend(std::string* why);

}  // namespace kvtier::cuda
