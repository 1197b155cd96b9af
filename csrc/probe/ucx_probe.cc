#include <ucp/api/ucp.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "probe/probes.h"
#include "build_config.h"

namespace kvtier::probe {

Feature Ucx() {
  Feature f;
  f.compiled = true;
  f.detail = std::string("UCX ") + ucp_get_version_string();
  ucp_config_t* config = nullptr;
  if (ucp_config_read(nullptr, nullptr, &config) != UCS_OK) {
    f.reason = "ucp_config_read failed";
    return f;
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_RMA;
  ucp_context_h context = nullptr;
  ucs_status_t st = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (st != UCS_OK) {
    f.reason = std::string("ucp_init failed: ") + ucs_status_string(st);
    return f;
  }
  // UCX has no structured query for the resources a context chose; its info dump lists them as
  // "#      resource N  :  md M  dev D  flags -- tl/device".
  char* text = nullptr;
  size_t len = 0;
  if (FILE* mem = open_memstream(&text, &len)) {
    ucp_context_print_info(context, mem);
    std::fclose(mem);
    std::istringstream lines(std::string(text, len));
    std::free(text);
    for (std::string line; std::getline(lines, line);) {
      if (line.find("resource") == std::string::npos) continue;
      auto pos = line.find("-- ");
      if (pos != std::string::npos) f.items.push_back(line.substr(pos + 3));
    }
  }
  ucp_cleanup(context);
  f.usable = !f.items.empty();
  if (!f.usable) f.reason = "UCX found no transport resources";
  return f;
}

}  // namespace kvtier::probe
