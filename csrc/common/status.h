// kvtier core status type. The core never throws across its API and never sees Python:
// every fallible call returns a Status (or Result<T>), marked [[nodiscard]]. The binding
// layer maps each StatusCode to exactly one Python exception class (see
// python/kvtier/errors.py); no integer codes or status strings reach users.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace kvtier {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // bad shape, size, id, option
  kDType = 2,            // wrong element type
  kDevice = 3,           // wrong or unusable device
  kOutOfCapacity = 4,    // a pool or queue is full
  kBlockState = 5,       // double free, free of a pinned block, use of a free block
  kUnavailable = 6,      // backend not compiled in or not usable on this machine
  kTransfer = 7,         // a transfer failed (I/O error, copy error)
  kTimeout = 8,
  kBusy = 9,             // resource has pending work (e.g. unregister with transfers in flight)
  kClosed = 10,          // use after close
  kCorrupt = 11,         // checksum mismatch
  kInternal = 12,
};

std::string_view StatusCodeName(StatusCode code) noexcept;

class [[nodiscard]] Status {
 public:
  Status() noexcept = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() noexcept { return Status(); }

  bool ok() const noexcept { return code_ == StatusCode::kOk; }
  StatusCode code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status DTypeError(std::string m) { return {StatusCode::kDType, std::move(m)}; }
inline Status DeviceError(std::string m) { return {StatusCode::kDevice, std::move(m)}; }
inline Status OutOfCapacity(std::string m) { return {StatusCode::kOutOfCapacity, std::move(m)}; }
inline Status BlockStateError(std::string m) { return {StatusCode::kBlockState, std::move(m)}; }
inline Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status TransferError(std::string m) { return {StatusCode::kTransfer, std::move(m)}; }
inline Status TimeoutError(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
inline Status BusyError(std::string m) { return {StatusCode::kBusy, std::move(m)}; }
inline Status ClosedError(std::string m) { return {StatusCode::kClosed, std::move(m)}; }
inline Status InternalError(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

// Result<T>: a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const noexcept { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &std::get<T>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace kvtier

#define KVTIER_RETURN_IF_ERROR(expr)          \
  do {                                        \
    ::kvtier::Status _kv_st = (expr);         \
    if (!_kv_st.ok()) return _kv_st;          \
  } while (0)
