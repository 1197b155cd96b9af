// The UCX data plane: one UCP context and worker per process (an Agent), its progress thread,
// registration of block spaces, peers (endpoints) and their registered pools, and a copy-engine
// backend that moves block lists between a local registered space and a peer's registered pool
// with one-sided put/get (no staging copies).
//
// Note [UCX threading]: the worker is created UCS_THREAD_MODE_SINGLE and touched only by the
// agent's progress thread. Every other thread hands it work through a command queue (Post/Call)
// and wakes it through an eventfd that sits in one epoll set with the worker's own event fd
// (ucp_worker_get_efd). In "event" progress mode the thread progresses until ucp_worker_arm says
// the worker is quiet, then sleeps in epoll_wait; in "poll" mode it spins on ucp_worker_progress
// (measured: 3x slower on a 2-core machine, kept for comparison). UCP callbacks therefore run on
// the progress thread, and so do the completions of the engine's handles.
//
// Note [UCX wire formats]: worker addresses and pool descriptors leave the process as bytes
// (any metadata store can carry them). Each is wrapped in an envelope: a magic, a format
// version, the agent's random 64-bit token, the payload and an XXH3-64 checksum of everything
// before it. UCX parses addresses and rkeys without checking them, so a truncated or foreign
// buffer would crash inside UCX; the envelope refuses it first (kInvalidArgument). The token
// ties a pool descriptor to the agent that exported it: importing it through an endpoint to a
// different agent is refused.
//
// Note [UCX failures]: endpoints use peer error handling (UCP_ERR_HANDLING_MODE_PEER) unless
// turned off. When UCX reports a peer failed (its error callback), the peer is marked dead, its
// endpoint is force-closed, which completes every outstanding request on it with an error, and
// every later transfer to it is refused (kTransfer, "peer ... is unreachable"). As a last resort
// each batch has a deadline (AgentOptions::transfer_timeout_s): a batch not complete by then
// fails with kTimeout and its peer is force-closed the same way, so no handle waits forever
// even where UCX itself misses a dead peer (Debian's 1.13 over shared memory). A put completes
// only after ucp_ep_flush_nbx: UCX may call a put complete once the source buffer is reusable,
// before the data is visible at the target.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "memory/block_space.h"
#include "transfer/transfer.h"

namespace kvtier::ucx {

struct AgentOptions {
  std::string tls;          // UCX_TLS for this context ("" = UCX's own selection / the environment)
  std::string net_devices;  // UCX_NET_DEVICES ("" = UCX's default)
  std::string rndv_thresh = "inf";  // UCX_RNDV_THRESH ("" = leave); "inf" as NIXL sets it
  bool error_handling = true;       // UCP_ERR_HANDLING_MODE_PEER on endpoints
  bool busy_poll = false;           // progress mode: false = event-driven (epoll), true = spin
  // Consecutive blocks go out together in operations of up to this many bytes; larger pieces
  // are split. Note [Merged operations].
  uint64_t max_op_bytes = uint64_t{1} << 20;
  double transfer_timeout_s = 30.0; // a batch's deadline (<= 0: none); see Note [UCX failures]
};

struct AgentInfo {
  std::string version;     // the UCX library actually loaded (ucp_get_version_string)
  std::string progress;    // "event" or "poll"
  std::string error_mode;  // "peer" or "none"
  std::string tls, net_devices, rndv_thresh;  // as configured ("" = default)
  std::vector<std::string> transports;        // the context's resources, "tl/device"
};

struct AgentStats {
  uint64_t batches_ok = 0;      // counter
  uint64_t batches_failed = 0;  // counter
  uint64_t ops_posted = 0;      // counter: ucp put/get calls
  uint64_t bytes_ok = 0;        // counter
  uint64_t peers_failed = 0;    // counter: endpoints UCX (or a deadline) declared dead
  uint64_t inflight = 0;        // gauge: batches
};

class Agent;
struct PeerState;
struct Registration;

// Another agent's registered block space, as this process sees it: a BlockSpace on device
// remote:<peer id> whose segments hold the peer's virtual addresses. Acquire checks the peer is
// alive and the ids in range (nothing is reference-counted across processes).
class RemotePool final : public BlockSpace {
 public:
  ~RemotePool() override;
  std::string kind() const override { return "remote pool"; }
  bool is_closed() const noexcept override;
  Status Acquire(std::span<const int32_t> ids, bool write) override;
  void Release(std::span<const int32_t> ids) override;
  uint32_t peer_id() const noexcept;
  Status PeerStatus() const;

 private:
  friend class Agent;
  RemotePool() = default;
  std::shared_ptr<Agent> agent_;
  std::shared_ptr<PeerState> peer_;
  std::vector<void*> rkeys_;  // ucp_rkey_h per segment; owned by the peer (destroyed with its endpoint)
  std::atomic<uint64_t> inflight_{0};
};

class Agent : public std::enable_shared_from_this<Agent> {
 public:
  // One agent per process: a second Create while one is alive is refused (kBusy).
  static Result<std::shared_ptr<Agent>> Create(const AgentOptions& options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  const AgentInfo& info() const noexcept { return info_; }
  AgentStats stats() const;
  // Note [Merged operations]: the largest UCX operation; applies to batches started after the
  // call. kInvalidArgument under 4096.
  Status SetMaxOpBytes(uint64_t bytes);
  uint64_t max_op_bytes() const noexcept { return max_op_bytes_.load(std::memory_order_relaxed); }
  uint64_t token() const noexcept { return token_; }
  // This worker's address in its envelope (Note [UCX wire formats]).
  const std::string& address() const noexcept { return address_; }

  // Registers every segment of a CPU block space with UCX (ucp_mem_map) and returns the pool
  // descriptor (its envelope) that peers import. Refuses a space already registered.
  Result<std::string> Register(BlockSpace& space);
  // Refuses (kBusy) while a transfer uses the space; kInvalidArgument if it was not registered.
  Status Unregister(const BlockSpace& space);
  bool IsRegistered(const BlockSpace& space) const;

  // Creates an endpoint to the agent whose address this is; returns the peer id.
  Result<uint32_t> Connect(const std::string& address);
  // Closes the endpoint (flushing unless the peer failed); its remote pools refuse transfers.
  Status Disconnect(uint32_t peer_id);
  // Status of a peer: OK while usable, else why not.
  Status PeerStatus(uint32_t peer_id) const;
  Result<std::unique_ptr<RemotePool>> ImportPool(uint32_t peer_id, const std::string& descriptor);

  // Test switch (Note: faults come from switches the tests control): declares a peer failed as
  // if UCX had reported it, forcing its endpoint closed.
  Status FailPeer(uint32_t peer_id);

  // The copy-engine backend that runs transfers between registered spaces and remote pools.
  std::unique_ptr<TransferBackend> MakeBackend();
  // Stops accepting work, fails what is queued, waits for in-flight batches (bounded by their
  // deadlines), closes endpoints and unmaps memory. Idempotent; the destructor calls it.
  void Close();
  bool closed() const noexcept { return closed_.load(); }
  // Waits until no batch is in flight.
  void Drain();

  // Internal: called by the backend (from any thread).
  void SubmitBatch(std::unique_ptr<TransferRequest> request);
  // Internal: UCX callbacks (progress thread).
  void OnEndpointFailed(void* ep, int status);
  static void OnOpDone(void* request, int status, void* user_data);

 private:
  struct Batch;
  friend class RemotePool;
  Agent() = default;
  Status Init(const AgentOptions& options);
  void Post(std::function<void()> fn);
  template <typename T>
  T Call(std::function<T()> fn);
  void ProgressLoop();
  void RunCommands();
  void StartBatch(Batch* batch);
  void FinishBatch(Batch* batch);
  void CheckDeadlines();
  void OnPeerFailed(PeerState& peer, Status why);
  void ClosePeerEndpoint(PeerState& peer, bool force);

  AgentOptions options_;
  std::atomic<uint64_t> max_op_bytes_{0};
  AgentInfo info_;
  uint64_t token_ = 0;
  std::string address_;
  void* context_ = nullptr;  // ucp_context_h
  void* worker_ = nullptr;   // ucp_worker_h
  int worker_fd_ = -1, wake_fd_ = -1, epoll_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};

  mutable std::mutex mu_;  // guards commands_, inflight_, and the maps below
  std::condition_variable idle_cv_;
  std::deque<std::function<void()>> commands_;
  uint64_t inflight_ = 0;
  std::map<uint64_t, std::shared_ptr<Registration>> registrations_;  // by BlockSpace uid
  std::map<uint32_t, std::shared_ptr<PeerState>> peers_;
  uint32_t next_peer_id_ = 1;

  // Progress-thread only.
  std::vector<std::unique_ptr<Batch>> active_;

  std::atomic<uint64_t> batches_ok_{0}, batches_failed_{0}, ops_posted_{0}, bytes_ok_{0}, peers_failed_{0};
};

// The version of the UCX library loaded in this process (ucp_get_version_string).
std::string LoadedVersion();

}  // namespace kvtier::ucx
