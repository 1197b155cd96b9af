#include "transfer/ucx/ucx_agent.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <ucp/api/ucp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <set>
#include <sstream>

#include "index/checksum.h"

namespace kvtier::ucx {

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kAddressMagic = 0x4B565741;  // "KVWA"
constexpr uint32_t kPoolMagic = 0x4B565044;     // "KVPD"
constexpr uint16_t kFormatVersion = 1;
constexpr uint32_t kMaxSegments = 1 << 16;
constexpr uint32_t kMaxBlobBytes = 1 << 20;

std::mutex g_agent_mu;
std::weak_ptr<Agent> g_agent;  // guarded by g_agent_mu: one agent per process

std::string UcsError(const char* what, ucs_status_t st) {
  return std::string(what) + ": " + ucs_status_string(st) + " (UCX)";
}

// ---------------------------------------------------------------- envelopes (Note [UCX wire formats])

class Writer {
 public:
  template <typename T>
  void Put(T v) {
    buf_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void PutBlob(const void* data, size_t size) {
    Put<uint32_t>(static_cast<uint32_t>(size));
    buf_.append(static_cast<const char*>(data), size);
  }
  std::string Seal() {
    Put<uint64_t>(Checksum64(buf_.data(), buf_.size()));
    return std::move(buf_);
  }

 private:
  std::string buf_;
};

class Reader {
 public:
  Reader(const std::string& buf, const char* what) : buf_(buf), what_(what) {}
  // Checks length, checksum, magic and version; afterwards reads stop before the checksum.
  Status Open(uint32_t magic) {
    if (buf_.size() < 4 + 2 + 8 + 8) return Bad("is too short (" + std::to_string(buf_.size()) + " bytes)");
    end_ = buf_.size() - 8;
    uint64_t sum = 0;
    std::memcpy(&sum, buf_.data() + end_, 8);
    if (Checksum64(buf_.data(), end_) != sum) return Bad("fails its checksum (truncated, altered or not one)");
    uint32_t m = 0;
    uint16_t v = 0;
    if (!Get(&m) || m != magic) return Bad("has the wrong magic (not this kind of kvtier buffer)");
    if (!Get(&v) || v != kFormatVersion) {
      return Bad("has format version " + std::to_string(v) + "; this kvtier reads " + std::to_string(kFormatVersion));
    }
    return Status::Ok();
  }
  template <typename T>
  bool Get(T* out) {
    if (pos_ + sizeof(T) > end_) return false;
    std::memcpy(out, buf_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool GetBlob(std::string* out) {
    uint32_t n = 0;
    if (!Get(&n) || n > kMaxBlobBytes || pos_ + n > end_) return false;
    out->assign(buf_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool AtEnd() const { return pos_ == end_; }
  Status Bad(const std::string& why) const { return InvalidArgument(std::string("the ") + what_ + " " + why); }

 private:
  const std::string& buf_;
  const char* what_;
  size_t pos_ = 0;
  size_t end_ = 0;
};

std::vector<std::string> ContextTransports(ucp_context_h context) {
  // UCX has no structured query for the resources a context chose; its info dump lists them as
  // "#      resource N  :  md M  dev D  flags -- tl/device".
  std::vector<std::string> out;
  char* text = nullptr;
  size_t len = 0;
  FILE* mem = open_memstream(&text, &len);
  if (mem == nullptr) return out;
  ucp_context_print_info(context, mem);
  std::fclose(mem);
  std::istringstream lines(std::string(text, len));
  std::free(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("resource") == std::string::npos) continue;
    auto pos = line.find("-- ");
    if (pos != std::string::npos) out.push_back(line.substr(pos + 3));
  }
  return out;
}

}  // namespace

std::string LoadedVersion() { return ucp_get_version_string(); }

// ---------------------------------------------------------------- shared state

struct Registration {
  uint64_t uid = 0;
  std::string kind;
  std::vector<ucp_mem_h> memh;  // one per segment
  std::atomic<uint64_t> inflight{0};
};

struct PeerState {
  uint32_t id = 0;
  uint64_t token = 0;
  ucp_ep_h ep = nullptr;  // progress thread only; null once closed
  std::atomic<bool> usable{true};
  mutable std::mutex mu;
  Status failure;                // guarded by mu: why the peer is not usable
  std::set<ucp_rkey_h> rkeys;    // progress thread only: rkeys unpacked on ep and not destroyed
  uint64_t active_batches = 0;   // progress thread only

  Status status() const {
    if (usable.load()) return Status::Ok();
    std::lock_guard<std::mutex> lock(mu);
    return failure;
  }
  void MarkUnusable(Status why) {
    std::lock_guard<std::mutex> lock(mu);
    if (!usable.load()) return;
    failure = std::move(why);
    usable.store(false);
  }
};

struct Agent::Batch {
  std::unique_ptr<TransferRequest> req;
  std::shared_ptr<PeerState> peer;
  std::shared_ptr<Registration> reg;
  RemotePool* remote = nullptr;
  bool put = false;
  bool posting = false;
  bool timed_out = false;
  uint64_t pending = 0;
  Status status;
  Clock::time_point deadline = Clock::time_point::max();
  Agent* agent = nullptr;
};

// ---------------------------------------------------------------- RemotePool

RemotePool::~RemotePool() {
  if (!agent_ || agent_->closed() || rkeys_.empty()) return;
  // rkeys belong to the worker: destroy them on the progress thread, unless the endpoint's
  // teardown (or the agent's Close) got there first.
  std::shared_ptr<PeerState> peer = peer_;
  std::vector<void*> rkeys = std::move(rkeys_);
  agent_->Post([peer, rkeys] {
    for (void* r : rkeys) {
      auto h = static_cast<ucp_rkey_h>(r);
      if (peer->rkeys.erase(h) != 0) ucp_rkey_destroy(h);
    }
  });
}

bool RemotePool::is_closed() const noexcept { return agent_->closed(); }
uint32_t RemotePool::peer_id() const noexcept { return peer_->id; }
Status RemotePool::PeerStatus() const { return peer_->status(); }

Status RemotePool::Acquire(std::span<const int32_t> ids, bool /*write*/) {
  if (Status st = peer_->status(); !st.ok()) return st;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<uint64_t>(id) >= num_blocks_) {
      return InvalidArgument("remote block id " + std::to_string(id) + " is out of range for a remote pool of " +
                             std::to_string(num_blocks_) + " blocks (peer " + std::to_string(peer_->id) + ")");
    }
  }
  inflight_.fetch_add(1);
  return Status::Ok();
}

void RemotePool::Release(std::span<const int32_t> /*ids*/) { inflight_.fetch_sub(1); }

// ---------------------------------------------------------------- Agent: life cycle

Result<std::shared_ptr<Agent>> Agent::Create(const AgentOptions& options) {
  std::lock_guard<std::mutex> lock(g_agent_mu);
  if (auto existing = g_agent.lock(); existing && !existing->closed()) {
    return BusyError("a UCX agent already exists in this process (one UCP context and worker per process); "
                     "close it first or reuse it");
  }
  std::shared_ptr<Agent> agent(new Agent());
  KVTIER_RETURN_IF_ERROR(agent->Init(options));
  g_agent = agent;
  return agent;
}

Status Agent::Init(const AgentOptions& options) {
  options_ = options;
  info_.version = ucp_get_version_string();
  info_.progress = options.busy_poll ? "poll" : "event";
  if (Status st = SetMaxOpBytes(options.max_op_bytes); !st.ok()) return st;
  info_.error_mode = options.error_handling ? "peer" : "none";
  info_.tls = options.tls;
  info_.net_devices = options.net_devices;
  info_.rndv_thresh = options.rndv_thresh;
  std::random_device rd;
  token_ = (uint64_t(rd()) << 32) ^ rd() ^ (uint64_t(getpid()) << 17);
  if (token_ == 0) token_ = 1;

  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return Unavailable(UcsError("ucp_config_read failed", st));
  auto modify = [&](const char* key, const std::string& value) -> Status {
    if (value.empty()) return Status::Ok();
    ucs_status_t s = ucp_config_modify(config, key, value.c_str());
    if (s != UCS_OK) return InvalidArgument(UcsError((std::string("UCX refused ") + key + "=" + value).c_str(), s));
    return Status::Ok();
  };
  Status mst = modify("TLS", options.tls);
  if (mst.ok()) mst = modify("NET_DEVICES", options.net_devices);
  if (mst.ok()) mst = modify("RNDV_THRESH", options.rndv_thresh);
  if (!mst.ok()) {
    ucp_config_release(config);
    return mst;
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  ucp_context_h context = nullptr;
  st = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (st != UCS_OK) return Unavailable(UcsError("ucp_init failed", st));
  context_ = context;
  info_.transports = ContextTransports(context);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // Note [UCX threading]
  ucp_worker_h worker = nullptr;
  st = ucp_worker_create(context, &wp, &worker);
  if (st != UCS_OK) {
    ucp_cleanup(context);
    context_ = nullptr;
    return Unavailable(UcsError("ucp_worker_create failed", st));
  }
  worker_ = worker;
  st = ucp_worker_get_efd(worker, &worker_fd_);
  if (st != UCS_OK) {
    Close();
    return Unavailable(UcsError("ucp_worker_get_efd failed (event-driven progress needs it)", st));
  }
  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(worker, &addr, &addr_len);
  if (st != UCS_OK) {
    Close();
    return Unavailable(UcsError("ucp_worker_get_address failed", st));
  }
  Writer w;
  w.Put<uint32_t>(kAddressMagic);
  w.Put<uint16_t>(kFormatVersion);
  w.Put<uint64_t>(token_);
  w.Put<uint32_t>(static_cast<uint32_t>(getpid()));
  w.PutBlob(addr, addr_len);
  address_ = w.Seal();
  ucp_worker_release_address(worker, addr);

  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (wake_fd_ < 0 || epoll_fd_ < 0) {
    Close();
    return InternalError("eventfd/epoll_create1 failed: " + std::string(std::strerror(errno)));
  }
  for (int fd : {worker_fd_, wake_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      Close();
      return InternalError("epoll_ctl failed: " + std::string(std::strerror(errno)));
    }
  }
  thread_ = std::thread([this] { ProgressLoop(); });
  return Status::Ok();
}

Agent::~Agent() { Close(); }

void Agent::Close() {
  if (closed_.exchange(true)) return;
  if (thread_.joinable()) {
    Drain();  // bounded: every batch has a deadline (Note [UCX failures])
    Call<int>([this] {
      std::map<uint32_t, std::shared_ptr<PeerState>> peers;
      {
        std::lock_guard<std::mutex> lock(mu_);
        peers = peers_;
      }
      for (auto& [id, peer] : peers) {
        for (ucp_rkey_h r : peer->rkeys) ucp_rkey_destroy(r);
        peer->rkeys.clear();
        peer->MarkUnusable(ClosedError("the UCX agent was closed"));
        ClosePeerEndpoint(*peer, /*force=*/false);
      }
      std::map<uint64_t, std::shared_ptr<Registration>> regs;
      {
        std::lock_guard<std::mutex> lock(mu_);
        regs.swap(registrations_);
      }
      for (auto& [uid, reg] : regs) {
        for (ucp_mem_h m : reg->memh) ucp_mem_unmap(static_cast<ucp_context_h>(context_), m);
        reg->memh.clear();
      }
      return 0;
    });
    stop_.store(true);
    const uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
    thread_.join();
  }
  if (worker_ != nullptr) ucp_worker_destroy(static_cast<ucp_worker_h>(worker_));
  if (context_ != nullptr) ucp_cleanup(static_cast<ucp_context_h>(context_));
  worker_ = context_ = nullptr;
  if (wake_fd_ >= 0) close(wake_fd_);
  if (epoll_fd_ >= 0) close(epoll_fd_);
  wake_fd_ = epoll_fd_ = -1;
}

AgentStats Agent::stats() const {
  AgentStats s;
  s.batches_ok = batches_ok_.load();
  s.batches_failed = batches_failed_.load();
  s.ops_posted = ops_posted_.load();
  s.bytes_ok = bytes_ok_.load();
  s.peers_failed = peers_failed_.load();
  std::lock_guard<std::mutex> lock(mu_);
  s.inflight = inflight_;
  return s;
}

// ---------------------------------------------------------------- progress thread

void Agent::Post(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    commands_.push_back(std::move(fn));
  }
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
}

template <typename T>
T Agent::Call(std::function<T()> fn) {
  if (std::this_thread::get_id() == thread_.get_id()) return fn();
  std::promise<T> promise;
  std::future<T> future = promise.get_future();
  Post([&] { promise.set_value(fn()); });
  return future.get();
}

void Agent::RunCommands() {
  std::deque<std::function<void()>> commands;
  {
    std::lock_guard<std::mutex> lock(mu_);
    commands.swap(commands_);
  }
  for (auto& fn : commands) fn();
}

void Agent::ProgressLoop() {
  auto worker = static_cast<ucp_worker_h>(worker_);
  epoll_event events[2];
  while (!stop_.load()) {
    RunCommands();
    CheckDeadlines();
    while (ucp_worker_progress(worker) != 0) {
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!commands_.empty()) continue;
    }
    if (options_.busy_poll && !active_.empty()) continue;  // spin only while transfers are in flight
    if (ucp_worker_arm(worker) == UCS_ERR_BUSY) continue;  // events arrived meanwhile: progress again
    // Sleep until the worker or a command wakes us; wake at the nearest deadline at the latest.
    int timeout_ms = active_.empty() ? 200 : 50;
    for (const auto& b : active_) {
      if (b->deadline == Clock::time_point::max()) continue;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(b->deadline - Clock::now()).count() + 1;
      timeout_ms = std::max<int>(0, std::min<int>(timeout_ms, static_cast<int>(left)));
    }
    int n = epoll_wait(epoll_fd_, events, 2, timeout_ms);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == wake_fd_) {
        uint64_t v;
        (void)!read(wake_fd_, &v, sizeof(v));
      }
    }
  }
  RunCommands();
}

// ---------------------------------------------------------------- registration

Result<std::string> Agent::Register(BlockSpace& space) {
  if (closed()) return ClosedError("the UCX agent was closed");
  if (!space.device().is_cpu()) {
    return DeviceError("only CPU memory can be registered with this UCX agent (got a " + space.kind() + " on " +
                       space.device().ToString() + ")");
  }
  if (space.is_closed()) return ClosedError("the " + space.kind() + " was closed");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (registrations_.count(space.uid()) != 0) {
      return InvalidArgument("this " + space.kind() + " is already registered with the UCX agent");
    }
  }
  if (space.segments().size() > kMaxSegments) return InvalidArgument("too many segments to register");
  return Call<Result<std::string>>([&]() -> Result<std::string> {
    auto reg = std::make_shared<Registration>();
    reg->uid = space.uid();
    reg->kind = space.kind();
    Writer w;
    w.Put<uint32_t>(kPoolMagic);
    w.Put<uint16_t>(kFormatVersion);
    w.Put<uint64_t>(token_);
    w.Put<uint64_t>(space.uid());
    w.Put<uint64_t>(space.num_blocks());
    w.Put<uint64_t>(space.block_bytes());
    w.Put<uint32_t>(static_cast<uint32_t>(space.segments().size()));
    auto context = static_cast<ucp_context_h>(context_);
    auto unmap_all = [&] {
      for (ucp_mem_h m : reg->memh) ucp_mem_unmap(context, m);
    };
    for (const Segment& seg : space.segments()) {
      if (seg.block_stride_bytes < 0) return InvalidArgument("a segment with a negative block stride");
      const uint64_t length = uint64_t(seg.block_stride_bytes) * (space.num_blocks() - 1) + seg.run_bytes;
      ucp_mem_map_params_t mp{};
      mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
      mp.address = seg.base;
      mp.length = length;
      ucp_mem_h memh = nullptr;
      ucs_status_t st = ucp_mem_map(context, &mp, &memh);
      if (st != UCS_OK) {
        unmap_all();
        return Unavailable(UcsError("ucp_mem_map failed", st));
      }
      reg->memh.push_back(memh);
      void* rkey = nullptr;
      size_t rkey_len = 0;
      st = ucp_rkey_pack(context, memh, &rkey, &rkey_len);
      if (st != UCS_OK) {
        unmap_all();
        return Unavailable(UcsError("ucp_rkey_pack failed", st));
      }
      w.Put<uint64_t>(reinterpret_cast<uint64_t>(seg.base));
      w.Put<int64_t>(seg.block_stride_bytes);
      w.Put<uint64_t>(seg.run_bytes);
      w.PutBlob(rkey, rkey_len);
      ucp_rkey_buffer_release(rkey);
    }
    std::lock_guard<std::mutex> lock(mu_);
    registrations_[space.uid()] = std::move(reg);
    return w.Seal();
  });
}

Status Agent::Unregister(const BlockSpace& space) {
  std::shared_ptr<Registration> reg;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = registrations_.find(space.uid());
    if (it == registrations_.end()) {
      return InvalidArgument("this " + space.kind() + " is not registered with the UCX agent");
    }
    if (it->second->inflight.load() != 0) {
      return BusyError("the " + space.kind() + " has " + std::to_string(it->second->inflight.load()) +
                       " UCX transfers in flight; wait for them before unregistering");
    }
    reg = it->second;
    registrations_.erase(it);
  }
  if (closed()) return Status::Ok();
  return Call<Status>([&] {
    for (ucp_mem_h m : reg->memh) ucp_mem_unmap(static_cast<ucp_context_h>(context_), m);
    reg->memh.clear();
    return Status::Ok();
  });
}

bool Agent::IsRegistered(const BlockSpace& space) const {
  std::lock_guard<std::mutex> lock(mu_);
  return registrations_.count(space.uid()) != 0;
}

// ---------------------------------------------------------------- peers

namespace {
void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
void OnSendDone(void* request, ucs_status_t status, void* user_data) {
  Agent::OnOpDone(request, static_cast<int>(status), user_data);
}
}  // namespace

Result<uint32_t> Agent::Connect(const std::string& address) {
  if (closed()) return ClosedError("the UCX agent was closed");
  Reader r(address, "peer address");
  KVTIER_RETURN_IF_ERROR(r.Open(kAddressMagic));
  uint64_t token = 0;
  uint32_t pid = 0;
  std::string raw;
  if (!r.Get(&token) || !r.Get(&pid) || !r.GetBlob(&raw) || !r.AtEnd() || raw.empty()) {
    return r.Bad("is malformed");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, p] : peers_) {
      if (p->token == token && p->usable.load()) return id;  // one endpoint per peer
    }
  }
  auto peer = std::make_shared<PeerState>();
  peer->token = token;
  {
    std::lock_guard<std::mutex> lock(mu_);
    peer->id = next_peer_id_++;
  }
  struct ErrArg {
    Agent* agent;
    std::shared_ptr<PeerState> peer;
  };
  return Call<Result<uint32_t>>([&]() -> Result<uint32_t> {
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(raw.data());
    ep.err_mode = options_.error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    if (options_.error_handling) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = OnEndpointError;
      ep.err_handler.arg = this;
    }
    ucp_ep_h handle = nullptr;
    ucs_status_t st = ucp_ep_create(static_cast<ucp_worker_h>(worker_), &ep, &handle);
    if (st != UCS_OK) {
      return TransferError(UcsError(("cannot create an endpoint to the peer (pid " + std::to_string(pid) + ")").c_str(),
                                    st));
    }
    peer->ep = handle;
    std::lock_guard<std::mutex> lock(mu_);
    peers_[peer->id] = peer;
    return peer->id;
  });
}

namespace {
void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  // Runs on the progress thread, inside ucp_worker_progress: find the peer by its endpoint.
  auto* agent = static_cast<Agent*>(arg);
  agent->OnEndpointFailed(ep, status);
}
}  // namespace

void Agent::OnEndpointFailed(void* ep, int status) {
  std::shared_ptr<PeerState> peer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, p] : peers_) {
      if (p->ep == ep) peer = p;
    }
  }
  if (!peer) return;
  OnPeerFailed(*peer, TransferError(UcsError(("peer " + std::to_string(peer->id) + " is unreachable").c_str(),
                                             static_cast<ucs_status_t>(status))));
}

void Agent::OnPeerFailed(PeerState& peer, Status why) {
  // May run inside a UCX callback, where progressing the worker again is forbidden: the
  // endpoint is closed from the command queue, at the top of the progress loop.
  if (peer.usable.load()) peers_failed_.fetch_add(1);
  peer.MarkUnusable(std::move(why));
  std::shared_ptr<PeerState> keep;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(peer.id);
    if (it != peers_.end()) keep = it->second;
  }
  if (keep) Post([this, keep] { ClosePeerEndpoint(*keep, /*force=*/true); });
}

void Agent::ClosePeerEndpoint(PeerState& peer, bool force) {
  if (peer.ep == nullptr) return;
  ucp_ep_h ep = peer.ep;
  peer.ep = nullptr;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &p);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) return;
  // Progress the close here, bounded: a flushing close to a silent peer falls back to force.
  auto worker = static_cast<ucp_worker_h>(worker_);
  const auto give_up = Clock::now() + std::chrono::seconds(2);
  while (ucp_request_check_status(req) == UCS_INPROGRESS && Clock::now() < give_up) ucp_worker_progress(worker);
  if (ucp_request_check_status(req) == UCS_INPROGRESS) {
    ucp_request_cancel(worker, req);
    while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
  }
  ucp_request_free(req);
}

Status Agent::Disconnect(uint32_t peer_id) {
  std::shared_ptr<PeerState> peer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(peer_id);
    if (it == peers_.end()) return InvalidArgument("unknown peer id " + std::to_string(peer_id));
    peer = it->second;
  }
  if (closed()) return Status::Ok();
  return Call<Status>([&] {
    peer->MarkUnusable(ClosedError("peer " + std::to_string(peer_id) + " was disconnected"));
    if (peer->active_batches != 0) {
      // Their requests complete with errors once the endpoint is gone.
      ClosePeerEndpoint(*peer, /*force=*/true);
    } else {
      for (ucp_rkey_h r : peer->rkeys) ucp_rkey_destroy(r);
      peer->rkeys.clear();
      ClosePeerEndpoint(*peer, /*force=*/false);
    }
    return Status::Ok();
  });
}

Status Agent::PeerStatus(uint32_t peer_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) return InvalidArgument("unknown peer id " + std::to_string(peer_id));
  return it->second->status();
}

Status Agent::FailPeer(uint32_t peer_id) {
  std::shared_ptr<PeerState> peer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(peer_id);
    if (it == peers_.end()) return InvalidArgument("unknown peer id " + std::to_string(peer_id));
    peer = it->second;
  }
  if (closed()) return ClosedError("the UCX agent was closed");
  return Call<Status>([&] {
    OnPeerFailed(*peer, TransferError("peer " + std::to_string(peer_id) + " was declared failed (test switch)"));
    return Status::Ok();
  });
}

Result<std::unique_ptr<RemotePool>> Agent::ImportPool(uint32_t peer_id, const std::string& descriptor) {
  if (closed()) return ClosedError("the UCX agent was closed");
  std::shared_ptr<PeerState> peer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(peer_id);
    if (it == peers_.end()) return InvalidArgument("unknown peer id " + std::to_string(peer_id));
    peer = it->second;
  }
  KVTIER_RETURN_IF_ERROR(peer->status());
  Reader r(descriptor, "pool descriptor");
  KVTIER_RETURN_IF_ERROR(r.Open(kPoolMagic));
  uint64_t token = 0, uid = 0, num_blocks = 0, block_bytes = 0;
  uint32_t nseg = 0;
  if (!r.Get(&token) || !r.Get(&uid) || !r.Get(&num_blocks) || !r.Get(&block_bytes) || !r.Get(&nseg) ||
      nseg == 0 || nseg > kMaxSegments || num_blocks == 0 || num_blocks > (uint64_t{1} << 31)) {
    return r.Bad("is malformed");
  }
  if (token != peer->token) {
    return InvalidArgument("the pool descriptor was exported by a different UCX agent than peer " +
                           std::to_string(peer_id) + " (connect to the agent that registered the pool)");
  }
  struct Seg {
    uint64_t base;
    int64_t stride;
    uint64_t run;
    std::string rkey;
  };
  std::vector<Seg> segs(nseg);
  uint64_t total = 0;
  for (Seg& s : segs) {
    if (!r.Get(&s.base) || !r.Get(&s.stride) || !r.Get(&s.run) || !r.GetBlob(&s.rkey) || s.rkey.empty() ||
        s.stride < 0) {
      return r.Bad("is malformed");
    }
    total += s.run;
  }
  if (!r.AtEnd() || total != block_bytes) return r.Bad("is malformed (segments do not add up to a block)");
  auto pool = std::unique_ptr<RemotePool>(new RemotePool());
  pool->agent_ = shared_from_this();
  pool->peer_ = peer;
  pool->device_ = Device{DeviceType::kRemote, static_cast<int>(peer_id)};
  pool->num_blocks_ = num_blocks;
  pool->block_bytes_ = block_bytes;
  for (const Seg& s : segs) {
    pool->segments_.push_back(Segment{reinterpret_cast<std::byte*>(s.base), s.stride, s.run});
  }
  Status st = Call<Status>([&]() -> Status {
    if (peer->ep == nullptr) return peer->status().ok() ? ClosedError("the peer's endpoint is closed") : peer->status();
    for (const Seg& s : segs) {
      ucp_rkey_h rkey = nullptr;
      ucs_status_t us = ucp_ep_rkey_unpack(peer->ep, s.rkey.data(), &rkey);
      if (us != UCS_OK) {
        for (void* done : pool->rkeys_) {
          peer->rkeys.erase(static_cast<ucp_rkey_h>(done));
          ucp_rkey_destroy(static_cast<ucp_rkey_h>(done));
        }
        pool->rkeys_.clear();
        return InvalidArgument(UcsError("the pool descriptor's remote key does not unpack", us));
      }
      peer->rkeys.insert(rkey);
      pool->rkeys_.push_back(rkey);
    }
    return Status::Ok();
  });
  if (!st.ok()) return st;
  return pool;
}

// ---------------------------------------------------------------- batches

void Agent::SubmitBatch(std::unique_ptr<TransferRequest> req) {
  auto batch = std::make_unique<Batch>();
  batch->agent = this;
  const bool put = req->dst->device().is_remote();
  BlockSpace* local = put ? req->src : req->dst;
  auto* remote = dynamic_cast<RemotePool*>(put ? req->dst : req->src);
  if (remote == nullptr || local->device().is_remote()) {
    req->Finish(InvalidArgument("a UCX transfer moves blocks between a local registered space and a remote pool"));
    return;
  }
  if (remote->agent_.get() != this) {
    req->Finish(InvalidArgument("the remote pool was imported by another UCX agent"));
    return;
  }
  if (closed()) {
    req->Finish(ClosedError("the UCX agent was closed"));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = registrations_.find(local->uid());
    if (it == registrations_.end()) {
      req->Finish(InvalidArgument("the local " + local->kind() +
                                  " is not registered with the UCX agent (Peer.register it first)"));
      return;
    }
    batch->reg = it->second;
    batch->reg->inflight.fetch_add(1);
    ++inflight_;
  }
  batch->put = put;
  batch->remote = remote;
  batch->peer = remote->peer_;
  batch->req = std::move(req);
  if (options_.transfer_timeout_s > 0) {
    batch->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(options_.transfer_timeout_s));
  }
  Batch* raw = batch.release();
  Post([this, raw] { StartBatch(raw); });
}

void Agent::OnOpDone(void* request, int status, void* user_data) {
  auto* batch = static_cast<Batch*>(user_data);
  if (status != UCS_OK && batch->status.ok()) {
    batch->status = TransferError(UcsError(batch->put ? "UCX put failed" : "UCX get failed",
                                           static_cast<ucs_status_t>(status)));
  }
  ucp_request_free(request);
  if (--batch->pending == 0 && !batch->posting) batch->agent->FinishBatch(batch);
}

void Agent::StartBatch(Batch* raw) {
  active_.emplace_back(raw);
  Batch& b = *raw;
  b.peer->active_batches++;
  if (Status st = b.peer->status(); !st.ok()) {
    b.status = st;
    FinishBatch(raw);
    return;
  }
  if (b.peer->ep == nullptr) {
    b.status = ClosedError("the endpoint to peer " + std::to_string(b.peer->id) + " is closed");
    FinishBatch(raw);
    return;
  }
  TransferRequest& req = *b.req;
  BlockSpace& local = b.put ? *req.src : *req.dst;
  const std::vector<int32_t>& local_ids = b.put ? req.src_ids : req.dst_ids;
  const std::vector<int32_t>& remote_ids = b.put ? req.dst_ids : req.src_ids;
  const auto& lsegs = local.segments();
  const auto& rsegs = b.remote->segments();
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH;
  p.cb.send = OnSendDone;
  p.user_data = raw;
  b.posting = true;
  uint64_t posted = 0;
  ucp_ep_h ep = b.peer->ep;
  const uint64_t max_op = max_op_bytes();
  // Note [Merged operations]: pieces that continue the previous one in both the local and the
  // remote memory (consecutive blocks of both pools, as a prefix allocated together usually is)
  // go out together, in operations of up to max_op_bytes (a longer run, or a larger piece, is
  // split). Each UCX operation has a fixed cost (a request, and over TCP a message with its
  // header): 682 operations of 192 KiB over TCP ran at 0.74x of one 128 MiB message. But one
  // huge operation is slow too: UCX's TCP transport sends a put of any size as one zero-copy
  // operation, and 128 MiB lists went out at 2.0-2.2 GB/s in 64 MiB operations against
  // 3.3-4.0 GB/s in 0.5-1 MiB ones (same run, 2 MiB and 192 KiB blocks, 2026-12-06; why the
  // transport prefers them is not established). Shared memory ran alike at 1 MiB and 64 MiB,
  // and gets over TCP too. So 1 MiB by default. Like the NVMe tier's request merging.
  std::byte* run_laddr = nullptr;
  uint64_t run_raddr = 0, run_len = 0;
  ucp_mem_h run_memh = nullptr;
  ucp_rkey_h run_rkey = nullptr;
  auto post_one = [&](std::byte* laddr, uint64_t raddr, uint64_t len) {
    ucs_status_ptr_t sp = b.put ? ucp_put_nbx(ep, laddr, len, raddr, run_rkey, &p)
                                : ucp_get_nbx(ep, laddr, len, raddr, run_rkey, &p);
    ++posted;
    if (sp == nullptr) return;
    if (UCS_PTR_IS_ERR(sp)) {
      b.status = TransferError(UcsError(b.put ? "ucp_put_nbx failed" : "ucp_get_nbx failed", UCS_PTR_STATUS(sp)));
      return;
    }
    ++b.pending;
  };
  auto post_run = [&]() {
    if (run_len == 0) return;
    p.memh = run_memh;
    for (uint64_t off = 0; off < run_len && b.status.ok(); off += max_op) {
      post_one(run_laddr + off, run_raddr + off, std::min<uint64_t>(max_op, run_len - off));
    }
    run_len = 0;
  };
  for (size_t i = 0; i < local_ids.size() && b.status.ok(); ++i) {
    for (const CopyPiece& piece : *req.plan) {
      const uint32_t ls = b.put ? piece.src_segment : piece.dst_segment;
      const uint32_t rs = b.put ? piece.dst_segment : piece.src_segment;
      const uint64_t loff = b.put ? piece.src_offset : piece.dst_offset;
      const uint64_t roff = b.put ? piece.dst_offset : piece.src_offset;
      std::byte* laddr = lsegs[ls].base + int64_t(local_ids[i]) * lsegs[ls].block_stride_bytes + loff;
      const uint64_t raddr =
          reinterpret_cast<uint64_t>(rsegs[rs].base) + uint64_t(remote_ids[i]) * rsegs[rs].block_stride_bytes + roff;
      ucp_mem_h memh = b.reg->memh[ls];
      auto rkey = static_cast<ucp_rkey_h>(b.remote->rkeys_[rs]);
      if (run_len > 0 && memh == run_memh && rkey == run_rkey && laddr == run_laddr + run_len &&
          raddr == run_raddr + run_len && run_len + piece.len <= max_op) {
        run_len += piece.len;
        continue;
      }
      post_run();
      if (!b.status.ok()) break;
      run_laddr = laddr;
      run_raddr = raddr;
      run_len = piece.len;
      run_memh = memh;
      run_rkey = rkey;
    }
  }
  if (b.status.ok()) post_run();
  ops_posted_.fetch_add(posted);
  if (b.put && b.status.ok()) {
    // Note [UCX failures]: a put is delivered only once the endpoint is flushed.
    ucp_request_param_t fp{};
    fp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    fp.cb.send = p.cb.send;
    fp.user_data = raw;
    ucs_status_ptr_t sp = ucp_ep_flush_nbx(ep, &fp);
    if (UCS_PTR_IS_ERR(sp)) {
      b.status = TransferError(UcsError("ucp_ep_flush_nbx failed", UCS_PTR_STATUS(sp)));
    } else if (sp != nullptr) {
      ++b.pending;
    }
  }
  b.posting = false;
  if (b.pending == 0) FinishBatch(raw);
}

Status Agent::SetMaxOpBytes(uint64_t bytes) {
  if (bytes < 4096) return InvalidArgument("max_op_bytes must be at least 4096, got " + std::to_string(bytes));
  max_op_bytes_.store(bytes, std::memory_order_relaxed);
  return Status::Ok();
}

void Agent::CheckDeadlines() {
  if (active_.empty()) return;
  const auto now = Clock::now();
  std::vector<std::shared_ptr<PeerState>> expired;
  for (auto& b : active_) {
    if (!b->timed_out && now >= b->deadline) {
      b->timed_out = true;
      if (b->status.ok()) {
        b->status = TimeoutError("UCX " + std::string(b->put ? "put" : "get") + " to peer " +
                                 std::to_string(b->peer->id) + " not complete after " +
                                 std::to_string(options_.transfer_timeout_s) + " s; the peer is declared failed");
      }
      expired.push_back(b->peer);
    }
  }
  for (auto& peer : expired) {
    OnPeerFailed(*peer, TransferError("peer " + std::to_string(peer->id) + " did not complete a transfer within " +
                                      std::to_string(options_.transfer_timeout_s) + " s"));
  }
}

void Agent::FinishBatch(Batch* raw) {
  std::unique_ptr<Batch> owned;
  for (auto it = active_.begin(); it != active_.end(); ++it) {
    if (it->get() == raw) {
      owned = std::move(*it);
      active_.erase(it);
      break;
    }
  }
  Batch& b = *raw;
  b.peer->active_batches--;
  if (!b.status.ok() && b.status.code() != StatusCode::kTimeout) {
    // Name the peer's failure, which says more than the request's own status.
    if (Status ps = b.peer->status(); !ps.ok() && ps.message() != b.status.message()) {
      b.status = Status(b.status.code(), b.status.message() + "; " + ps.message());
    }
  }
  const bool ok = b.status.ok();
  const uint64_t bytes = b.req->state->bytes();
  b.reg->inflight.fetch_sub(1);
  b.req->Finish(std::move(b.status));
  (ok ? batches_ok_ : batches_failed_).fetch_add(1);
  if (ok) bytes_ok_.fetch_add(bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    --inflight_;
  }
  idle_cv_.notify_all();
  if (!owned) delete raw;  // never in active_ (cannot happen; keeps ownership total)
}

void Agent::Drain() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [&] { return inflight_ == 0; });
}

// ---------------------------------------------------------------- backend

namespace {
class UcxBackend final : public TransferBackend {
 public:
  explicit UcxBackend(std::shared_ptr<Agent> agent) : agent_(std::move(agent)) {}
  std::string_view name() const override { return "ucx"; }
  bool Supports(const Device& src, const Device& dst) const override {
    return (src.is_cpu() && dst.is_remote()) || (src.is_remote() && dst.is_cpu());
  }
  void Submit(std::unique_ptr<TransferRequest> request) override { agent_->SubmitBatch(std::move(request)); }
  void Drain() override { agent_->Drain(); }

 private:
  std::shared_ptr<Agent> agent_;
};
}  // namespace

std::unique_ptr<TransferBackend> Agent::MakeBackend() { return std::make_unique<UcxBackend>(shared_from_this()); }

}  // namespace kvtier::ucx
