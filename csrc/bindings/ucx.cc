// Bindings for the UCX data plane (compiled when kvtier is built with UCX): the per-process
// agent, remote pools, and the engine hook that adds the UCX backend to a CopyEngine.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/unique_ptr.h>

#include <ucp/api/ucp_version.h>

#include "bindings/common.h"
#include "transfer/copy_engine.h"
#include "transfer/ucx/ucx_agent.h"

namespace kvtier::bind {

namespace {
std::string FromBytes(const nb::bytes& b) { return std::string(b.c_str(), b.size()); }
nb::bytes ToBytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }
}  // namespace

BlockSpace* AsRemoteSpace(nb::handle h) {
  ucx::RemotePool* pool = nullptr;
  if (nb::try_cast<ucx::RemotePool*>(h, pool) && pool != nullptr) return pool;
  return nullptr;
}

void BindUcx(nb::module_& m) {
  using namespace nb::literals;
  using ucx::Agent;
  m.attr("HAVE_UCX") = true;
  m.attr("UCX_BUILD_VERSION") = std::to_string(UCP_API_MAJOR) + "." + std::to_string(UCP_API_MINOR);

  nb::class_<ucx::RemotePool>(m, "RemotePool")
      .def_prop_ro("num_blocks", &ucx::RemotePool::num_blocks)
      .def_prop_ro("block_bytes", &ucx::RemotePool::block_bytes)
      .def_prop_ro("peer_id", &ucx::RemotePool::peer_id)
      .def_prop_ro("device", [](const ucx::RemotePool& p) { return p.device().ToString(); })
      .def("check_peer", [](const ucx::RemotePool& p) { ThrowIfError(p.PeerStatus()); });

  nb::class_<Agent>(m, "UcxAgent")
      .def_static(
          "create",
          [](const std::string& tls, const std::string& net_devices, const std::string& rndv_thresh,
             bool error_handling, bool busy_poll, double transfer_timeout_s, uint64_t max_op_bytes) {
            ucx::AgentOptions o;
            o.tls = tls;
            o.net_devices = net_devices;
            o.rndv_thresh = rndv_thresh;
            o.error_handling = error_handling;
            o.busy_poll = busy_poll;
            o.transfer_timeout_s = transfer_timeout_s;
            o.max_op_bytes = max_op_bytes;
            Result<std::shared_ptr<Agent>> r = [&] {
              nb::gil_scoped_release nogil;
              return Agent::Create(o);
            }();
            return Unwrap(std::move(r));
          },
          "tls"_a = "", "net_devices"_a = "", "rndv_thresh"_a = "inf", "error_handling"_a = true,
          "busy_poll"_a = false, "transfer_timeout_s"_a = 30.0, "max_op_bytes"_a = uint64_t{1} << 20)
      .def_prop_ro("address", [](const Agent& a) { return ToBytes(a.address()); })
      .def_prop_ro("token", &Agent::token)
      .def_prop_ro("max_op_bytes", &Agent::max_op_bytes)
      .def("set_max_op_bytes", [](Agent& a, uint64_t bytes) { ThrowIfError(a.SetMaxOpBytes(bytes)); })
      .def_prop_ro("closed", &Agent::closed)
      .def("info",
           [](const Agent& a) {
             const ucx::AgentInfo& i = a.info();
             nb::dict d;
             d["version"] = i.version;
             d["progress"] = i.progress;
             d["max_op_bytes"] = a.max_op_bytes();
             d["error_mode"] = i.error_mode;
             d["tls"] = i.tls;
             d["net_devices"] = i.net_devices;
             d["rndv_thresh"] = i.rndv_thresh;
             d["transports"] = i.transports;
             return d;
           })
      .def("stats",
           [](const Agent& a) {
             ucx::AgentStats s = a.stats();
             nb::dict d;
             d["batches_ok"] = s.batches_ok;
             d["batches_failed"] = s.batches_failed;
             d["ops_posted"] = s.ops_posted;
             d["bytes_ok"] = s.bytes_ok;
             d["peers_failed"] = s.peers_failed;
             d["inflight"] = s.inflight;
             return d;
           })
      .def("register",
           [](Agent& a, nb::handle space) {
             BlockSpace& s = AsSpace(space, "registered space");
             Result<std::string> r = [&] {
               nb::gil_scoped_release nogil;
               return a.Register(s);
             }();
             return ToBytes(Unwrap(std::move(r)));
           })
      .def("unregister",
           [](Agent& a, nb::handle space) {
             BlockSpace& s = AsSpace(space, "registered space");
             nb::gil_scoped_release nogil;
             ThrowIfError(a.Unregister(s));
           })
      .def("is_registered", [](const Agent& a, nb::handle space) { return a.IsRegistered(AsSpace(space, "space")); })
      .def("connect",
           [](Agent& a, nb::bytes address) {
             std::string s = FromBytes(address);
             Result<uint32_t> r = [&] {
               nb::gil_scoped_release nogil;
               return a.Connect(s);
             }();
             return Unwrap(std::move(r));
           })
      .def("disconnect",
           [](Agent& a, uint32_t peer) {
             nb::gil_scoped_release nogil;
             ThrowIfError(a.Disconnect(peer));
           })
      .def("check_peer", [](const Agent& a, uint32_t peer) { ThrowIfError(a.PeerStatus(peer)); })
      .def("fail_peer",
           [](Agent& a, uint32_t peer) {
             nb::gil_scoped_release nogil;
             ThrowIfError(a.FailPeer(peer));
           })
      .def("import_pool",
           [](Agent& a, uint32_t peer, nb::bytes descriptor) {
             std::string s = FromBytes(descriptor);
             Result<std::unique_ptr<ucx::RemotePool>> r = [&] {
               nb::gil_scoped_release nogil;
               return a.ImportPool(peer, s);
             }();
             return Unwrap(std::move(r));
           })
      .def("attach", [](Agent& a, CopyEngine& engine) { engine.AddBackend(a.MakeBackend()); },
           "Adds this agent's backend to a copy engine (remote <-> cpu transfers).")
      .def("drain",
           [](Agent& a) {
             nb::gil_scoped_release nogil;
             a.Drain();
           })
      .def("close", [](Agent& a) {
        nb::gil_scoped_release nogil;
        a.Close();
      });
  m.def("ucx_loaded_version", &ucx::LoadedVersion);
}

}  // namespace kvtier::bind
