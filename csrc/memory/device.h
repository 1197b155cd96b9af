#pragma once

#include <cstdint>
#include <string>

namespace kvtier {

enum class DeviceType : int { kCpu = 0, kCuda = 1 };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;

  bool is_cpu() const noexcept { return type == DeviceType::kCpu; }
  bool is_cuda() const noexcept { return type == DeviceType::kCuda; }
  bool operator==(const Device&) const = default;
  std::string ToString() const {
    return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
  }
};

}  // namespace kvtier
