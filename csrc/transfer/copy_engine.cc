#include "transfer/copy_engine.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>

namespace kvtier {

namespace {
constexpr size_t kMaxCachedPlans = 256;
}  // namespace

CopyEngine::CopyEngine(const EngineOptions& options) {
  auto cpu = std::make_unique<CpuCopyBackend>(options.cpu);
  cpu_threads_ = cpu->threads();
  backends_.push_back(std::move(cpu));
  event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

CopyEngine::~CopyEngine() {
  Drain();
  backends_.clear();
  if (event_fd_ >= 0) close(event_fd_);
}

void CopyEngine::AddBackend(std::unique_ptr<TransferBackend> backend) { backends_.push_back(std::move(backend)); }

std::vector<std::string> CopyEngine::backend_names() const {
  std::vector<std::string> names;
  for (const auto& b : backends_) names.emplace_back(b->name());
  return names;
}

void CopyEngine::Drain() {
  for (auto& b : backends_) b->Drain();
}

EngineStats CopyEngine::stats() const {
  EngineStats s;
  s.submitted = submitted_.load();
  s.completed_ok = ok_.load();
  s.completed_error = failed_.load();
  s.blocks = blocks_.load();
  s.bytes = bytes_.load();
  s.inflight = inflight_.load();
  return s;
}

std::shared_ptr<const std::vector<CopyPiece>> CopyEngine::PlanFor(const BlockSpace& src, const BlockSpace& dst) {
  std::lock_guard<std::mutex> lock(plan_mu_);
  auto key = std::make_pair(src.uid(), dst.uid());
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  if (plans_.size() >= kMaxCachedPlans) plans_.clear();
  auto plan = std::make_shared<const std::vector<CopyPiece>>(PlanBlockCopy(src.segments(), dst.segments()));
  plans_.emplace(key, plan);
  return plan;
}

void CopyEngine::Finish(TransferRequest& req, Status status) {
  // Note [Transfer lifetime]: release both spaces before the handle completes, so that once a
  // caller sees done() nothing in the engine touches the memory any more.
  req.src->Release(req.src_ids);
  req.dst->Release(req.dst_ids);
  if (status.ok()) {
    ok_.fetch_add(1);
    blocks_.fetch_add(req.src_ids.size());
    bytes_.fetch_add(req.state->bytes());
  } else {
    failed_.fetch_add(1);
  }
  inflight_.fetch_sub(1);
  std::shared_ptr<TransferState> state = std::move(req.state);
  state->Complete(std::move(status));
  if (event_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!write(event_fd_, &one, sizeof(one));
  }
}

Result<std::shared_ptr<TransferState>> CopyEngine::Submit(BlockSpace& src, std::span<const int32_t> src_ids,
                                                          BlockSpace& dst, std::span<const int32_t> dst_ids) {
  if (src_ids.size() != dst_ids.size()) {
    return InvalidArgument("source and target id lists differ in length (" + std::to_string(src_ids.size()) +
                           " vs " + std::to_string(dst_ids.size()) + ")");
  }
  if (src.block_bytes() != dst.block_bytes()) {
    return InvalidArgument("source blocks are " + std::to_string(src.block_bytes()) + " bytes but target blocks are " +
                           std::to_string(dst.block_bytes()) + " bytes (different KV layouts)");
  }
  if (src.is_closed()) return ClosedError("the source " + src.kind() + " was closed");
  if (dst.is_closed()) return ClosedError("the target " + dst.kind() + " was closed");
  if (auto dup = FindRepeatedId(dst_ids)) {
    return InvalidArgument("target block " + std::to_string(*dup) + " appears more than once in one batch");
  }
  if (&src == &dst && !dst_ids.empty()) {
    std::vector<int32_t> targets(dst_ids.begin(), dst_ids.end());
    std::sort(targets.begin(), targets.end());
    for (int32_t id : src_ids) {
      if (std::binary_search(targets.begin(), targets.end(), id)) {
        return InvalidArgument("block " + std::to_string(id) + " is both a source and a target in one batch");
      }
    }
  }
  TransferBackend* backend = nullptr;
  for (auto& b : backends_) {
    if (b->Supports(src.device(), dst.device())) {
      backend = b.get();
      break;
    }
  }
  if (backend == nullptr) {
    return Unavailable("no copy backend moves blocks " + src.device().ToString() + " -> " + dst.device().ToString() +
                       " in this process (available: " +
                       [&] {
                         std::string s;
                         for (auto& b : backends_) s += (s.empty() ? "" : ", ") + std::string(b->name());
                         return s;
                       }() +
                       "); see `kvtier info`");
  }
  KVTIER_RETURN_IF_ERROR(src.Acquire(src_ids, /*write=*/false));
  if (Status st = dst.Acquire(dst_ids, /*write=*/true); !st.ok()) {
    src.Release(src_ids);
    return st;
  }
  auto state = std::make_shared<TransferState>(src_ids.size(), src_ids.size() * src.block_bytes());
  auto req = std::make_unique<TransferRequest>();
  req->src = &src;
  req->dst = &dst;
  req->src_ids.assign(src_ids.begin(), src_ids.end());
  req->dst_ids.assign(dst_ids.begin(), dst_ids.end());
  req->plan = PlanFor(src, dst);
  req->state = state;
  req->finish = [this](TransferRequest& r, Status st) { Finish(r, std::move(st)); };
  const uint64_t n = submitted_.fetch_add(1) + 1;
  inflight_.fetch_add(1);
  const uint64_t every = fault_every_.load();
  if (every > 0 && n % every == 0) {
    req->Finish(TransferError("injected fault on batch " + std::to_string(n) + " (engine fault switch)"));
    return state;
  }
  if (src_ids.empty()) {
    req->Finish(Status::Ok());
    return state;
  }
  backend->Submit(std::move(req));
  return state;
}

}  // namespace kvtier
