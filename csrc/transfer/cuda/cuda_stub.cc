// Compiled instead of cuda_backend.cu when the build has no CUDA (see cuda_backend.h).
#include "transfer/cuda/cuda_backend.h"

namespace kvtier::cuda {

const CudaProbe& Probe() {
  static const CudaProbe probe = [] {
    CudaProbe p;
    p.reason = "kvtier was built without CUDA (KVTIER_CUDA=OFF, or no nvcc at build time)";
    return p;
  }();
  return probe;
}

void InstallHostPinner() {}

std::unique_ptr<TransferBackend> MakeBackend(std::string* why) {
  if (why != nullptr) *why = Probe().reason;
  return nullptr;
}

}  // namespace kvtier::cuda
