#pragma once

#include <cstdint>
#include <string>

namespace kvtier {

// kRemote: another process's registered memory, reached through UCX (index = the peer's id).
enum class DeviceType : int { kCpu = 0, kCuda = 1, kRemote = 2 };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;

  bool is_cpu() const noexcept { return type == DeviceType::kCpu; }
  bool is_cuda() const noexcept { return type == DeviceType::kCuda; }
  bool is_remote() const noexcept { return type == DeviceType::kRemote; }
  bool operator==(const Device&) const = default;
  std::string ToString() const {
    if (is_cpu()) return "cpu";
    return (is_cuda() ? "cuda:" : "remote:") + std::to_string(index);
  }
};

}  // namespace kvtier
