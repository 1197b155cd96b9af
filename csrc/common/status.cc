#include "common/status.h"

namespace kvtier {

std::string_view StatusCodeName(StatusCode code) noexcept {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kDType: return "DTYPE";
    case StatusCode::kDevice: return "DEVICE";
    case StatusCode::kOutOfCapacity: return "OUT_OF_CAPACITY";
    case StatusCode::kBlockState: return "BLOCK_STATE";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kTransfer: return "TRANSFER";
    case StatusCode::kTimeout: return "TIMEOUT";
    case StatusCode::kBusy: return "BUSY";
    case StatusCode::kClosed: return "CLOSED";
    case StatusCode::kCorrupt: return "CORRUPT";
    case StatusCode::kInternal: return "INTERNAL";
  }
  return "UNKNOWN";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(StatusCodeName(code_));
  s += ": ";
  s += message_;
  return s;
}

}  // namespace kvtier
