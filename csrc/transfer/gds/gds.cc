// GPUDirect Storage through cuFile (see gds.h for the Notes; gds_stub.cc is the twin built without
// GDS). cufile.h is included by its full path (KVTIER_CUFILE_H, set by CMake) so that the
// include directory of the nvidia-cufile wheel, which other nvidia-* wheels share and fill with
// their own CUDA headers, never shadows the toolkit's. libcufile itself is dlopen'ed.
#include "transfer/gds/gds.h"

#include KVTIER_CUFILE_H
#include <cuda_runtime_api.h>

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "build_config.h"
#include "common/thread_pool.h"
#include "transfer/cuda/cuda_backend.h"

extern char** environ;

namespace kvtier::gds {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string Errno(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

std::string CufileError(CUfileError_t e) {
  std::string s = cufileop_status_error(e.err);
  s += " (cuFile error " + std::to_string(static_cast<int>(e.err)) + ")";
  if (e.err == CU_FILE_CUDA_DRIVER_ERROR) s += ", CUDA driver error " + std::to_string(static_cast<int>(e.cu_err));
  return s;
}

// What cuFileRead/cuFileWrite return on failure: -1 with errno set, -(CUfileOpError), or -errno.
std::string IoError(ssize_t r, int saved_errno) {
  if (r == -1) return Errno(saved_errno);
  const int code = static_cast<int>(-r);
  if (IS_CUFILE_ERR(code)) return std::string(CUFILE_ERRSTR(code)) + " (cuFile error " + std::to_string(code) + ")";
  return Errno(code);
}

std::string VersionString(int v) {  // cuFileGetVersion: 1200 -> "1.20"
  if (v <= 0) return "?";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%d.%02d", v / 1000, (v % 1000) / 10);
  return buf;
}

// ---------------------------------------------------------------- loading libcufile (Note [Loading cuFile])

struct Api {
  void* handle = nullptr;
  std::string path;  // the file the loader actually mapped
  decltype(&::cuFileDriverOpen) driver_open = nullptr;
  decltype(&::cuFileHandleRegister) handle_register = nullptr;
  decltype(&::cuFileHandleDeregister) handle_deregister = nullptr;
  decltype(&::cuFileBufRegister) buf_register = nullptr;
  decltype(&::cuFileBufDeregister) buf_deregister = nullptr;
  decltype(&::cuFileRead) read = nullptr;
  decltype(&::cuFileWrite) write = nullptr;
  // The batch API: optional (absent from old libcufile builds).
  decltype(&::cuFileBatchIOSetUp) batch_setup = nullptr;
  decltype(&::cuFileBatchIOSubmit) batch_submit = nullptr;
  decltype(&::cuFileBatchIOGetStatus) batch_get_status = nullptr;
  decltype(&::cuFileBatchIOCancel) batch_cancel = nullptr;
  decltype(&::cuFileBatchIODestroy) batch_destroy = nullptr;
  bool has_batch() const {
    return batch_setup && batch_submit && batch_get_status && batch_cancel && batch_destroy;
  }
};

struct Loaded {
  std::unique_ptr<Api> api;  // null when no candidate loaded
  std::string error;         // every candidate tried, and why it failed
};

void Anchor() {}  // dladdr of this names the module kvtier_core is linked into (_core.*.so)

std::string ModuleDir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&Anchor), &info) == 0 || info.dli_fname == nullptr) return "";
  std::string p = info.dli_fname;
  auto slash = p.rfind('/');
  return slash == std::string::npos ? std::string(".") : p.substr(0, slash);
}

template <typename F>
bool Sym(void* h, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(h, name));
  return *out != nullptr;
}

Loaded LoadCufileOnce() {
  Loaded out;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KVTIER_CUFILE_LIBRARY"); env != nullptr && *env != '\0') candidates.push_back(env);
  candidates.push_back("libcufile.so.0");  // through the loader: a system GDS install, LD_LIBRARY_PATH
  candidates.push_back("libcufile.so");
  if (std::string dir = ModuleDir(); !dir.empty()) {  // the nvidia-cufile wheel next to the kvtier package
    auto slash = dir.rfind('/');                        // .../site-packages/kvtier -> .../site-packages
    std::string site = slash == std::string::npos || slash == 0 ? dir + "/.." : dir.substr(0, slash);
    candidates.push_back(site + "/nvidia/cu13/lib/libcufile.so.0");
    candidates.push_back(site + "/nvidia/cufile/lib/libcufile.so.0");
  }
  if (std::strlen(KVTIER_BUILD_CUFILE_LIBRARY) > 0) candidates.push_back(KVTIER_BUILD_CUFILE_LIBRARY);

  std::vector<std::string> tried;
  for (const std::string& name : candidates) {
    if (name.find('/') != std::string::npos && access(name.c_str(), F_OK) != 0) {
      tried.push_back(name + ": no such file");
      continue;
    }
    void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* e = dlerror();
      std::string msg = e != nullptr ? e : "dlopen failed";
      tried.push_back(msg.rfind(name + ":", 0) == 0 ? msg : name + ": " + msg);  // dlerror often names it already
      continue;
    }
    auto api = std::make_unique<Api>();
    api->handle = h;
    std::string missing;
    auto need = [&](const char* sym, auto* fp) {
      if (!Sym(h, sym, fp)) missing += std::string(missing.empty() ? "" : ", ") + sym;
    };
    need("cuFileDriverOpen", &api->driver_open);
    need("cuFileHandleRegister", &api->handle_register);
    need("cuFileHandleDeregister", &api->handle_deregister);
    need("cuFileBufRegister", &api->buf_register);
    need("cuFileBufDeregister", &api->buf_deregister);
    need("cuFileRead", &api->read);
    need("cuFileWrite", &api->write);
    if (!missing.empty()) {
      tried.push_back(name + ": lacks " + missing + " (too old a cuFile?)");
      dlclose(h);
      continue;
    }
    Sym(h, "cuFileBatchIOSetUp", &api->batch_setup);
    Sym(h, "cuFileBatchIOSubmit", &api->batch_submit);
    Sym(h, "cuFileBatchIOGetStatus", &api->batch_get_status);
    Sym(h, "cuFileBatchIOCancel", &api->batch_cancel);
    Sym(h, "cuFileBatchIODestroy", &api->batch_destroy);
    Dl_info info{};
    api->path = (dladdr(reinterpret_cast<void*>(api->driver_open), &info) != 0 && info.dli_fname != nullptr)
                    ? info.dli_fname
                    : name;
    if (char* real = realpath(api->path.c_str(), nullptr)) {
      api->path = real;
      std::free(real);
    }
    out.api = std::move(api);
    return out;
  }
  std::string e = "libcufile could not be loaded (pip install nvidia-cufile, install the GDS packages of the CUDA "
                  "toolkit, or point KVTIER_CUFILE_LIBRARY at libcufile.so.0); tried: ";
  for (size_t i = 0; i < tried.size(); ++i) e += (i ? "; " : "") + tried[i];
  out.error = e;
  return out;
}

const Loaded& LoadCufile() {
  static const Loaded loaded = LoadCufileOnce();  // never dlclosed: lives to exit
  return loaded;
}

double ProbeTimeoutSeconds() {
  if (const char* env = std::getenv("KVTIER_GDS_PROBE_TIMEOUT_S"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    double v = std::strtod(env, &end);
    if (end != env && v > 0) return std::min(v, 600.0);
  }
  return 5.0;
}

// ---------------------------------------------------------------- the probe child (Note [Why the probe never hangs])

struct ChildRun {
  bool spawned = false;
  std::string spawn_error;
  std::string output;      // the child's stdout and stderr
  bool timed_out = false;  // the deadline passed; the child was killed
  bool reaped = false;
  int wait_status = 0;
  pid_t pid = -1;
  std::string log_tail;    // last lines of the child's cuFile log
};

std::string HelperPath() {
  if (const char* env = std::getenv("KVTIER_GDS_PROBE_HELPER"); env != nullptr && *env != '\0') return env;
  return ModuleDir() + "/kvtier_gds_probe";
}

// Note [No iostreams in the probe]: the probe's text is split and parsed with plain string and
// strtoul calls, never std::istringstream. On the first GPU machine this ran on, a build whose
// libstdc++ was linked into _core statically crashed (SIGSEGV) in istream::operator>>(int&) on the
// probe's first number: the numeric facets of that copy's locale were never set up. The probe runs
// at import-adjacent time (kvtier info, the test suite's collection), so it must not depend on it.
std::vector<std::string> SplitLines(const std::string& text) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

// The whitespace-separated words of one line.
std::vector<std::string> Words(const std::string& line) {
  std::vector<std::string> words;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && (line[i] == ' ' || line[i] == '\t' || line[i] == '\r')) ++i;
    size_t j = i;
    while (j < line.size() && line[j] != ' ' && line[j] != '\t' && line[j] != '\r') ++j;
    if (j > i) words.push_back(line.substr(i, j - i));
    i = j;
  }
  return words;
}

// Word i of a probe line as a number; 0 when missing or not a number (the probe's own output).
long long Num(const std::vector<std::string>& words, size_t i) {
  if (i >= words.size()) return 0;
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(words[i].c_str(), &end, 10);
  return (errno != 0 || end == words[i].c_str()) ? 0 : v;
}

// The last few meaningful lines of a cuFile log, without their timestamp/pid prefix.
std::string LogTail(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return "";
  std::string text;
  if (std::fseek(f, 0, SEEK_END) == 0) {
    long size = std::ftell(f);
    long start = size > 16384 ? size - 16384 : 0;
    std::fseek(f, start, SEEK_SET);
    text.resize(static_cast<size_t>(size - start));
    text.resize(std::fread(text.data(), 1, text.size(), f));
  }
  std::fclose(f);
  std::vector<std::string> lines;
  for (std::string line : SplitLines(text)) {
    if (auto p = line.find("] "); p != std::string::npos && line.find("[pid=") != std::string::npos) line = line.substr(p + 2);
    // collapse runs of blanks
    std::string compact;
    for (char c : line) {
      if (c == '\r' || c == '\t') c = ' ';
      if (c == ' ' && (compact.empty() || compact.back() == ' ')) continue;
      compact += c;
    }
    while (!compact.empty() && compact.back() == ' ') compact.pop_back();
    // liburcu-bp is an optional dependency cuFile always mentions: noise in a reason.
    if (compact.empty() || compact.find("liburcu") != std::string::npos) continue;
    if (!lines.empty() && lines.back() == compact) continue;
    lines.push_back(compact);
  }
  const size_t keep = 5;
  std::string out;
  for (size_t i = lines.size() > keep ? lines.size() - keep : 0; i < lines.size(); ++i) {
    out += (out.empty() ? "" : " | ") + lines[i];
  }
  return out;
}

ChildRun RunProbeChild(const std::string& library, const ProbeOptions& options) {
  ChildRun run;
  const std::string helper = HelperPath();
  if (access(helper.c_str(), X_OK) != 0) {
    const int e = errno;
    run.spawn_error = "the probe helper " + helper + " is missing or not executable (" + Errno(e) +
                      "; a broken install? set KVTIER_GDS_PROBE_HELPER to its path)";
    return run;
  }
  // The child's cuFile log goes to a temporary file (quoted in the reason, then removed) unless
  // the user chose where cuFile logs; cuFile otherwise writes cufile.log into the current directory.
  std::string log_path;
  if (std::getenv("CUFILE_LOGFILE_PATH") == nullptr) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/kvtier-gds-probe-XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    int fd = mkstemp(buf.data());
    if (fd >= 0) {
      close(fd);
      log_path = buf.data();
    }
  }
  std::vector<std::string> env_strings;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) env_strings.emplace_back(*e);
  if (!log_path.empty()) env_strings.push_back("CUFILE_LOGFILE_PATH=" + log_path);
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = {helper, library};
  if (options.test_hang) args.emplace_back("--hang");
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    run.spawn_error = "pipe2 failed: " + Errno(errno);
    if (!log_path.empty()) unlink(log_path.c_str());
    return run;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t defaults;  // signals the parent (Python) may ignore or handle: default in the child
  sigemptyset(&defaults);
  for (int s : {SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGCHLD, SIGALRM, SIGUSR1, SIGUSR2}) sigaddset(&defaults, s);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setpgroup(&attr, 0);  // its own process group: killed as a group
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP);

  const auto t0 = Clock::now();
  const auto deadline = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options.timeout_s));
  pid_t pid = -1;
  int rc = posix_spawn(&pid, helper.c_str(), &fa, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    run.spawn_error = "posix_spawn of " + helper + " failed: " + Errno(rc);
    if (!log_path.empty()) unlink(log_path.c_str());
    return run;
  }
  run.spawned = true;
  run.pid = pid;

  // Read until EOF or the deadline; never block past it.
  bool eof = false;
  while (!eof) {
    auto left_ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left_ms <= 0) break;
    pollfd pfd{fds[0], POLLIN, 0};
    int n = poll(&pfd, 1, static_cast<int>(std::min<long long>(left_ms, 1000)));
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    char buf[4096];
    ssize_t k = read(fds[0], buf, sizeof buf);
    if (k > 0) {
      if (run.output.size() < (64u << 10)) run.output.append(buf, static_cast<size_t>(k));
    } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
      eof = true;
    }
  }
  close(fds[0]);
  // The child closed its output (or the deadline passed): wait for its exit, also against the deadline.
  for (;;) {
    pid_t w = waitpid(pid, &run.wait_status, WNOHANG);
    if (w == pid) {
      run.reaped = true;
      break;
    }
    if (w < 0 && errno != EINTR) {  // ECHILD: someone else reaped it (SIGCHLD ignored)
      run.reaped = true;
      run.wait_status = 0;
      break;
    }
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (!run.reaped) {
    run.timed_out = true;
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    for (int i = 0; i < 100 && !run.reaped; ++i) {  // up to ~200 ms
      pid_t w = waitpid(pid, &run.wait_status, WNOHANG);
      if (w == pid || (w < 0 && errno == ECHILD)) run.reaped = true;
      else std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (!run.reaped) {
      // Stuck in a kernel call that SIGKILL cannot interrupt yet: reap it whenever it dies.
      std::thread([pid] {
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
      }).detach();
    }
  }
  if (!log_path.empty()) {
    run.log_tail = LogTail(log_path);
    unlink(log_path.c_str());
  }
  return run;
}

const char* const kFsNames[] = {"lustre", "wekafs", "nfs", "gpfs", "nvme", "nvmeof", "scsi", "scaleflux-csd",
                                "nvmesh", "beegfs", "yrcloudfile", "nvme-p2p", "scatefs", "virtiofs", "panfs"};

void Interpret(const ChildRun& run, const ProbeOptions& options, GdsProbe& p) {
  std::string stage = "start";
  bool opened = false, open_seen = false;
  std::string helper_error;
  CUfileError_t open_err{};
  std::vector<std::string> other;
  for (const std::string& line : SplitLines(run.output)) {
    const std::vector<std::string> w = Words(line);
    const std::string key = w.empty() ? "" : w[0];
    if (key == "stage") {
      if (w.size() > 1) stage = w[1];
    } else if (key == "version") {
      if (Num(w, 2) == 0) p.cufile_version = static_cast<int>(Num(w, 1));
    } else if (key == "open") {
      open_err.err = static_cast<CUfileOpError>(Num(w, 1));
      open_err.cu_err = static_cast<CUresult>(Num(w, 2));
      open_seen = true;
      opened = open_err.err == CU_FILE_SUCCESS;
    } else if (key == "props") {
      if (Num(w, 1) != 0) continue;
      const auto major = static_cast<unsigned>(Num(w, 2)), minor = static_cast<unsigned>(Num(w, 3));
      const auto dstatus = static_cast<unsigned>(Num(w, 4));
      const auto fflags = static_cast<unsigned>(Num(w, 6)), max_batch = static_cast<unsigned>(Num(w, 7));
      p.batch_io = (fflags & (1u << CU_FILE_BATCH_IO_SUPPORTED)) != 0;
      p.max_batch_io = static_cast<int>(max_batch);
      // CU_FILE_P2P_SUPPORTED is bit 4 of the feature flags; CUDA 13.0's cufile.h predates the name.
      constexpr unsigned kP2pSupportedBit = 4;
      const bool p2pdma = (fflags & (1u << kP2pSupportedBit)) != 0;
      p.compat_mode = major == 0 && !p2pdma;
      std::string fs;
      for (unsigned b = 0; b < sizeof kFsNames / sizeof kFsNames[0]; ++b) {
        if (dstatus & (1u << b)) fs += (fs.empty() ? "" : ", ") + std::string(kFsNames[b]);
      }
      std::string mode = major != 0 ? "nvidia-fs " + std::to_string(major) + "." + std::to_string(minor) +
                                           ": GPUDirect P2P DMA"
                         : p2pdma ? "PCI P2PDMA: GPUDirect without nvidia-fs"
                                  : "compatibility mode (no nvidia-fs, no P2PDMA: POSIX I/O through host bounce "
                                    "buffers, not a direct path)";
      p.detail += "; " + mode;
      if (!fs.empty()) p.detail += "; direct on: " + fs;
      p.detail += p.batch_io ? "; batch I/O up to " + std::to_string(max_batch) : "; no batch I/O";
    } else if (key == "error") {
      helper_error = line.size() > 6 ? line.substr(6) : line;
    } else if (key != "done" && !line.empty()) {
      if (other.size() < 3) other.push_back(line);
    }
  }
  p.detail = "cuFile " + VersionString(p.cufile_version) + " (" + p.library + ")" + p.detail;
  const std::string log = run.log_tail.empty() ? "" : "; cuFile log: " + run.log_tail;
  std::string said;
  for (const auto& o : other) said += (said.empty() ? "; it printed: " : " | ") + o;

  if (run.timed_out) {
    if (stage == "open") {
      p.reason = "cuFileDriverOpen did not return within " + Fixed(options.timeout_s, 1) +
                 " s (the probe child was killed; this hang is known on machines without the nvidia-fs module or "
                 "without a working CUDA driver; raise KVTIER_GDS_PROBE_TIMEOUT_S if the driver is just slow)" + log;
    } else {
      p.reason = "the cuFile probe child did not finish within " + Fixed(options.timeout_s, 1) + " s (stuck at stage '" +
                 stage + "'; it was killed)" + log + said;
    }
    return;
  }
  if (!helper_error.empty()) {
    p.reason = "the cuFile probe child failed: " + helper_error;
    return;
  }
  if (open_seen && !opened) {
    p.reason = "cuFileDriverOpen failed: " + CufileError(open_err) + log;
    return;
  }
  if (WIFSIGNALED(run.wait_status)) {
    int sig = WTERMSIG(run.wait_status);
    p.reason = "the cuFile probe child died of signal " + std::to_string(sig) + " (" + strsignal(sig) +
               ") at stage '" + stage + "'" + log + said;
    return;
  }
  if (!opened) {
    p.reason = "the cuFile probe child exited (status " + std::to_string(WEXITSTATUS(run.wait_status)) +
               ") without opening the driver, at stage '" + stage + "'" + log + said;
    return;
  }
  p.usable = true;
}

// ---------------------------------------------------------------- the driver, in this process

// cuFileDriverOpen in this process, once, on a detached thread with a deadline: a hang here turns
// GDS off for the process instead of hanging the caller (Note [Why the probe never hangs]).
Status EnsureDriverOpen(const Api& api, double timeout_s) {
  struct Attempt {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    CUfileError_t err{};
  };
  static std::mutex mu;
  static bool open = false;
  static Status failure;  // sticky
  std::lock_guard<std::mutex> lock(mu);
  if (open) return Status::Ok();
  if (!failure.ok()) return failure;
  auto attempt = std::make_shared<Attempt>();
  auto fn = api.driver_open;
  std::thread([attempt, fn] {
    CUfileError_t e = fn();
    std::lock_guard<std::mutex> l(attempt->mu);
    attempt->err = e;
    attempt->done = true;
    attempt->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> l(attempt->mu);
  if (!attempt->cv.wait_for(l, std::chrono::duration<double>(timeout_s), [&] { return attempt->done; })) {
    failure = TimeoutError("cuFileDriverOpen did not return within " + Fixed(timeout_s, 1) +
                           " s in this process (the probe's child process opened it); GPUDirect Storage is off for "
                           "the rest of this process");
    return failure;
  }
  if (attempt->err.err != CU_FILE_SUCCESS) {
    failure = Unavailable("cuFileDriverOpen failed in this process: " + CufileError(attempt->err));
    return failure;
  }
  open = true;  // never closed: cuFileDriverClose at exit can block on in-flight work
  return Status::Ok();
}

const char* BatchStatusName(CUfileStatus_t s) {
  switch (s) {
    case CUFILE_WAITING: return "waiting";
    case CUFILE_PENDING: return "pending";
    case CUFILE_INVALID: return "invalid (ill-formed or could not be enqueued)";
    case CUFILE_CANCELED: return "canceled";
    case CUFILE_COMPLETE: return "complete";
    case CUFILE_TIMEOUT: return "timed out";
    case CUFILE_FAILED: return "failed";
  }
  return "unknown status";
}

struct Buffer {
  uint64_t length_bytes = 0;
  int device = 0;
};

// An I/O as issued to cuFile: a registered buffer's base plus an offset, or the pointer itself.
struct Issued {
  void* base = nullptr;
  uint64_t base_offset_bytes = 0;
  uint64_t file_offset_bytes = 0;
  uint64_t length_bytes = 0;
  int device = 0;
  size_t index = 0;  // in the caller's list
};

Status DeviceOf(const void* ptr, int* device, const char* what) {
  cudaPointerAttributes a{};
  cudaError_t e = cudaPointerGetAttributes(&a, ptr);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return DeviceError(std::string(what) + ": cudaPointerGetAttributes failed: " + cudaGetErrorString(e));
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {
    return DeviceError(std::string(what) + " is not CUDA device memory (GdsFile moves data between the GPU and the "
                                           "file; host memory goes through NvmeTier)");
  }
  *device = a.device;
  return Status::Ok();
}

std::string Hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

}  // namespace

// ---------------------------------------------------------------- the probe

GdsProbe RunProbe(const ProbeOptions& options) {
  const auto t0 = Clock::now();
  GdsProbe p;
  p.compiled = true;
  auto done = [&]() -> GdsProbe {
    p.elapsed_s = SecondsSince(t0);
    return p;
  };
  if (!(options.timeout_s > 0)) {
    p.reason = "the probe timeout must be > 0 s";
    return done();
  }
  const Loaded& loaded = LoadCufile();
  if (!loaded.api) {
    p.reason = loaded.error;
    return done();
  }
  p.library = loaded.api->path;
  p.detail = "cuFile (" + p.library + ")";
  if (options.require_gpu) {
    const cuda::CudaProbe& c = cuda::Probe();
    if (!c.usable) {
      p.reason = "no usable CUDA GPU: " + c.reason;
      return done();
    }
  }
  ChildRun run = RunProbeChild(p.library, options);
  if (!run.spawned) {
    p.reason = run.spawn_error;
    return done();
  }
  p.detail.clear();
  Interpret(run, options, p);
  return done();
}

const GdsProbe& Probe() {
  static const GdsProbe probe = [] {
    ProbeOptions o;
    o.timeout_s = ProbeTimeoutSeconds();
    return RunProbe(o);
  }();
  return probe;
}

// ---------------------------------------------------------------- GdsFile

struct GdsFile::Impl {
  const Api* api = nullptr;
  GdsFileOptions options;
  int fd = -1;
  CUfileHandle_t handle = nullptr;
  bool closed = false;

  std::mutex buffers_mu;
  std::map<uintptr_t, Buffer> buffers;  // registered with cuFileBufRegister: base -> length, device

  std::mutex batch_mu;                  // one batch in flight per file; guards batch, pool, io_mode
  CUfileBatchHandle_t batch = nullptr;  // null: the worker-thread path
  unsigned batch_capacity = 0;
  std::string io_mode;

  std::unique_ptr<ThreadPool> pool;  // the cuFileRead/cuFileWrite path (created once, never replaced)

  Status Resolve(std::span<const GdsIo> ios, bool write, const std::string& path, std::vector<Issued>* out);
  // With batch_mu held. *unsupported_from < v.size() when cuFile refused a submit as unsupported:
  // I/Os from there on were not issued, and the file has switched to the worker-thread path.
  Status RunBatch(bool write, const std::vector<Issued>& v, const std::string& path, size_t* unsupported_from);
  void SwitchToThreads(const std::string& why);  // with batch_mu held
  Status RunThreads(bool write, const std::vector<Issued>& v, const std::string& path);
};

GdsFile::GdsFile(std::string path, std::unique_ptr<Impl> impl) : path_(std::move(path)), impl_(std::move(impl)) {}

GdsFile::~GdsFile() { Close(); }

Result<std::unique_ptr<GdsFile>> GdsFile::Open(const std::string& path, const GdsFileOptions& options) {
  if (options.io_threads == 0) return InvalidArgument("GdsFile: io_threads must be >= 1");
  if (!(options.timeout_s > 0)) return InvalidArgument("GdsFile: timeout_s must be > 0");
  if (options.read_only && (options.create || options.size_bytes > 0)) {
    return InvalidArgument("GdsFile: read_only cannot be combined with create or size_bytes");
  }
  const GdsProbe& probe = Probe();
  if (!probe.usable) return Unavailable("GPUDirect Storage is not usable here: " + probe.reason);
  const Api& api = *LoadCufile().api;
  KVTIER_RETURN_IF_ERROR(EnsureDriverOpen(api, ProbeTimeoutSeconds()));

  int flags = O_DIRECT | O_CLOEXEC | (options.read_only ? O_RDONLY : O_RDWR) | (options.create ? O_CREAT : 0);
  int fd = open(path.c_str(), flags, 0644);
  if (fd < 0) {
    int e = errno;
    if (e == EINVAL) {
      return InvalidArgument(path + ": the file system refuses O_DIRECT, which GPUDirect Storage needs");
    }
    if (e == ENOENT && !options.create) return InvalidArgument(path + ": no such file (pass create=True)");
    return InvalidArgument("cannot open " + path + ": " + Errno(e));
  }
  auto fail = [&](Status st) -> Result<std::unique_ptr<GdsFile>> {
    close(fd);
    return st;
  };
  if (options.size_bytes > 0) {
    struct stat st{};
    if (fstat(fd, &st) != 0) return fail(TransferError("fstat of " + path + " failed: " + Errno(errno)));
    if (static_cast<uint64_t>(st.st_size) < options.size_bytes) {
      int rc = posix_fallocate(fd, 0, static_cast<off_t>(options.size_bytes));
      if (rc == EOPNOTSUPP || rc == EINVAL) {
        if (ftruncate(fd, static_cast<off_t>(options.size_bytes)) != 0) rc = errno;
        else rc = 0;
      }
      if (rc == ENOSPC) return fail(OutOfCapacity("no space for " + std::to_string(options.size_bytes) + " bytes in " + path));
      if (rc != 0) return fail(TransferError("cannot size " + path + ": " + Errno(rc)));
    }
  }
  CUfileDescr_t descr;
  std::memset(&descr, 0, sizeof descr);
  descr.type = CU_FILE_HANDLE_TYPE_OPAQUE_FD;
  descr.handle.fd = fd;
  descr.fs_ops = nullptr;
  CUfileHandle_t handle = nullptr;
  CUfileError_t e = api.handle_register(&handle, &descr);
  if (e.err != CU_FILE_SUCCESS) {
    std::string hint;
    if (Probe().compat_mode) {
      hint = " (cuFile is in compatibility mode here and still refused the file; its log, cufile.log in the "
             "working directory or CUFILE_LOGFILE_PATH, says why: on a virtual disk without udev properties it "
             "cannot read the volume's attributes, even with CUFILE_FORCE_COMPAT_MODE=true)";
    }
    return fail(Unavailable("cuFileHandleRegister(" + path + ") failed: " + CufileError(e) + hint));
  }
  auto impl = std::make_unique<Impl>();
  impl->api = &api;
  impl->options = options;
  impl->fd = fd;
  impl->handle = handle;
  std::string no_batch;
  if (!options.use_batch_api) {
    no_batch = "batch API not requested";
  } else if (!api.has_batch()) {
    no_batch = "this libcufile has no batch API";
  } else {
    unsigned cap = probe.max_batch_io > 0 ? static_cast<unsigned>(probe.max_batch_io) : 128u;
    cap = std::min(cap, 1024u);
    CUfileBatchHandle_t batch = nullptr;
    CUfileError_t be = api.batch_setup(&batch, cap);
    if (be.err == CU_FILE_SUCCESS) {
      impl->batch = batch;
      impl->batch_capacity = cap;
      impl->io_mode = "batch (cuFileBatchIO, up to " + std::to_string(cap) + " I/Os per batch)";
    } else {
      no_batch = "cuFileBatchIOSetUp failed: " + CufileError(be);
    }
  }
  if (impl->batch == nullptr) impl->SwitchToThreads(no_batch);
  std::unique_ptr<GdsFile> f(new GdsFile(path, std::move(impl)));
  return f;
}

void GdsFile::Close() {
  if (!impl_ || impl_->closed) return;
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lb(m.batch_mu);
    if (m.batch != nullptr) m.api->batch_destroy(m.batch);
    m.batch = nullptr;
  }
  m.pool.reset();
  {
    std::lock_guard<std::mutex> l(m.buffers_mu);
    for (const auto& [base, buf] : m.buffers) m.api->buf_deregister(reinterpret_cast<void*>(base));
    m.buffers.clear();
  }
  if (m.handle != nullptr) m.api->handle_deregister(m.handle);
  m.handle = nullptr;
  if (m.fd >= 0) close(m.fd);
  m.fd = -1;
  m.closed = true;
}

std::string GdsFile::io_mode() const {
  std::lock_guard<std::mutex> l(impl_->batch_mu);
  return impl_->io_mode;
}

void GdsFile::Impl::SwitchToThreads(const std::string& why) {
  if (batch != nullptr) api->batch_destroy(batch);
  batch = nullptr;
  if (!pool) pool = std::make_unique<ThreadPool>(static_cast<int>(options.io_threads));
  io_mode = "threads (" + std::to_string(options.io_threads) + " threads of cuFileRead/cuFileWrite; " + why + ")";
}

uint64_t GdsFile::size_bytes() const {
  struct stat st{};
  if (!impl_ || impl_->fd < 0 || fstat(impl_->fd, &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_size);
}

Status GdsFile::RegisterBuffer(void* device_ptr, uint64_t length_bytes) {
  if (impl_->closed) return ClosedError("GdsFile " + path_ + " is closed");
  if (device_ptr == nullptr || length_bytes == 0) return InvalidArgument("GdsFile.register_buffer: empty buffer");
  int device = 0;
  KVTIER_RETURN_IF_ERROR(DeviceOf(device_ptr, &device, "the buffer to register"));
  const auto base = reinterpret_cast<uintptr_t>(device_ptr);
  std::lock_guard<std::mutex> l(impl_->buffers_mu);
  auto next = impl_->buffers.lower_bound(base);
  if (next != impl_->buffers.end() && next->first < base + length_bytes) {
    return InvalidArgument("GdsFile.register_buffer: " + Hex(device_ptr) + " overlaps a registered buffer");
  }
  if (next != impl_->buffers.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.length_bytes > base) {
      return InvalidArgument("GdsFile.register_buffer: " + Hex(device_ptr) + " overlaps a registered buffer");
    }
  }
  CUfileError_t e = impl_->api->buf_register(device_ptr, length_bytes, 0);
  if (e.err != CU_FILE_SUCCESS) {
    return DeviceError("cuFileBufRegister(" + Hex(device_ptr) + ", " + std::to_string(length_bytes) +
                       " bytes) failed: " + CufileError(e));
  }
  impl_->buffers[base] = Buffer{length_bytes, device};
  return Status::Ok();
}

Status GdsFile::DeregisterBuffer(void* device_ptr) {
  if (impl_->closed) return ClosedError("GdsFile " + path_ + " is closed");
  std::lock_guard<std::mutex> l(impl_->buffers_mu);
  auto it = impl_->buffers.find(reinterpret_cast<uintptr_t>(device_ptr));
  if (it == impl_->buffers.end()) {
    return InvalidArgument("GdsFile.deregister_buffer: " + Hex(device_ptr) + " is not a registered buffer's base");
  }
  CUfileError_t e = impl_->api->buf_deregister(device_ptr);
  impl_->buffers.erase(it);
  if (e.err != CU_FILE_SUCCESS) return DeviceError("cuFileBufDeregister(" + Hex(device_ptr) + ") failed: " + CufileError(e));
  return Status::Ok();
}

Status GdsFile::Sync() {
  if (impl_->closed) return ClosedError("GdsFile " + path_ + " is closed");
  if (fdatasync(impl_->fd) != 0) return TransferError("fdatasync of " + path_ + " failed: " + Errno(errno));
  return Status::Ok();
}

Status GdsFile::Read(std::span<const GdsIo> ios) { return Run(false, ios); }
Status GdsFile::Write(std::span<const GdsIo> ios) { return Run(true, ios); }

Status GdsFile::Impl::Resolve(std::span<const GdsIo> ios, bool write, const std::string& path,
                              std::vector<Issued>* out) {
  out->reserve(ios.size());
  std::lock_guard<std::mutex> l(buffers_mu);
  for (size_t i = 0; i < ios.size(); ++i) {
    const GdsIo& io = ios[i];
    const std::string what = std::string(write ? "write" : "read") + " " + std::to_string(i) + " of " + path;
    if (io.length_bytes == 0) continue;
    if (io.device_ptr == nullptr) return InvalidArgument(what + ": null device pointer");
    constexpr uint64_t kMaxOff = static_cast<uint64_t>(INT64_MAX);
    if (io.file_offset_bytes > kMaxOff || io.length_bytes > kMaxOff - io.file_offset_bytes) {
      return InvalidArgument(what + ": file offset + length overflows");
    }
    Issued is;
    is.index = i;
    is.file_offset_bytes = io.file_offset_bytes;
    is.length_bytes = io.length_bytes;
    const auto p = reinterpret_cast<uintptr_t>(io.device_ptr);
    auto it = buffers.upper_bound(p);
    bool registered = false;
    if (it != buffers.begin()) {
      auto b = std::prev(it);
      if (p < b->first + b->second.length_bytes) {
        if (io.length_bytes > b->first + b->second.length_bytes - p) {
          return InvalidArgument(what + ": " + std::to_string(io.length_bytes) + " bytes at " + Hex(io.device_ptr) +
                                 " run past the end of the registered buffer at " +
                                 Hex(reinterpret_cast<void*>(b->first)));
        }
        is.base = reinterpret_cast<void*>(b->first);  // registered memory: cuFile wants (base, offset)
        is.base_offset_bytes = p - b->first;
        is.device = b->second.device;
        registered = true;
      }
    }
    if (!registered) {
      KVTIER_RETURN_IF_ERROR(DeviceOf(io.device_ptr, &is.device, what.c_str()));
      is.base = io.device_ptr;
      is.base_offset_bytes = 0;
    }
    out->push_back(is);
  }
  return Status::Ok();
}

Status GdsFile::Run(bool write, std::span<const GdsIo> ios) {
  if (impl_->closed) return ClosedError("GdsFile " + path_ + " is closed");
  if (write && impl_->options.read_only) return InvalidArgument("GdsFile " + path_ + " was opened read_only");
  std::vector<Issued> v;
  KVTIER_RETURN_IF_ERROR(impl_->Resolve(ios, write, path_, &v));
  if (v.empty()) return Status::Ok();
  {
    std::lock_guard<std::mutex> l(impl_->batch_mu);
    if (impl_->batch != nullptr) {
      size_t unsupported_from = v.size();
      Status st = impl_->RunBatch(write, v, path_, &unsupported_from);
      if (unsupported_from >= v.size()) return st;
      v.erase(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(unsupported_from));  // the rest: threads
    }
  }
  return impl_->RunThreads(write, v, path_);
}

namespace {
std::string Describe(bool write, const Issued& io, const std::string& path) {
  return std::string(write ? "write of " : "read of ") + std::to_string(io.length_bytes) + " bytes at file offset " +
         std::to_string(io.file_offset_bytes) + " of " + path + " (I/O " + std::to_string(io.index) + ")";
}
}  // namespace

// Called with batch_mu held.
Status GdsFile::Impl::RunBatch(bool write, const std::vector<Issued>& v, const std::string& path,
                               size_t* unsupported_from) {
  Status first;
  std::vector<CUfileIOParams_t> params;
  std::vector<CUfileIOEvents_t> events;
  for (size_t start = 0; start < v.size(); start += batch_capacity) {
    const unsigned n = static_cast<unsigned>(std::min<size_t>(batch_capacity, v.size() - start));
    params.assign(n, CUfileIOParams_t{});
    events.assign(n, CUfileIOEvents_t{});
    for (unsigned i = 0; i < n; ++i) {
      const Issued& io = v[start + i];
      CUfileIOParams_t& p = params[i];
      std::memset(&p, 0, sizeof p);
      p.mode = CUFILE_BATCH;
      p.u.batch.devPtr_base = io.base;
      p.u.batch.file_offset = static_cast<off_t>(io.file_offset_bytes);
      p.u.batch.devPtr_offset = static_cast<off_t>(io.base_offset_bytes);
      p.u.batch.size = io.length_bytes;
      p.fh = handle;
      p.opcode = write ? CUFILE_WRITE : CUFILE_READ;
      p.cookie = reinterpret_cast<void*>(static_cast<uintptr_t>(start + i));
    }
    CUfileError_t e = api->batch_submit(batch, n, params.data(), 0);
    if (e.err == CU_FILE_BATCH_NOCOMPAT_ERROR || e.err == CU_FILE_IO_NOT_SUPPORTED ||
        e.err == CU_FILE_PLATFORM_NOT_SUPPORTED || e.err == CU_FILE_ASYNC_NOT_SUPPORTED) {
      SwitchToThreads("cuFileBatchIOSubmit refused: " + CufileError(e));
      *unsupported_from = start;
      return Status::Ok();
    }
    if (e.err != CU_FILE_SUCCESS) {
      return TransferError("cuFileBatchIOSubmit of " + std::to_string(n) + (write ? " writes to " : " reads from ") +
                           path + " failed: " + CufileError(e));
    }
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(options.timeout_s));
    unsigned got = 0;
    while (got < n) {
      const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
      if (left <= 0) {
        api->batch_cancel(batch);
        // The handle may be in any state now: start a fresh one for the next call, or fall back.
        api->batch_destroy(batch);
        batch = nullptr;
        CUfileBatchHandle_t fresh = nullptr;
        if (CUfileError_t se = api->batch_setup(&fresh, batch_capacity); se.err == CU_FILE_SUCCESS) {
          batch = fresh;
        } else {
          SwitchToThreads("cuFileBatchIOSetUp failed after a cancelled batch: " + CufileError(se));
        }
        return TimeoutError("a batch of " + std::to_string(n) + (write ? " writes to " : " reads from ") + path +
                            " did not complete within " + Fixed(options.timeout_s, 1) + " s (" +
                            std::to_string(got) + " done); it was cancelled");
      }
      const double slice = std::min(left, 1.0);
      timespec ts{};
      ts.tv_sec = static_cast<time_t>(slice);
      ts.tv_nsec = static_cast<long>((slice - static_cast<double>(ts.tv_sec)) * 1e9);
      unsigned nr = n - got;
      e = api->batch_get_status(batch, nr, &nr, events.data() + got, &ts);
      if (e.err != CU_FILE_SUCCESS) {
        api->batch_cancel(batch);
        return TransferError("cuFileBatchIOGetStatus on " + path + " failed: " + CufileError(e));
      }
      got += std::min(nr, n - got);
    }
    for (unsigned i = 0; i < n && first.ok(); ++i) {
      const CUfileIOEvents_t& ev = events[i];
      const auto idx = static_cast<size_t>(reinterpret_cast<uintptr_t>(ev.cookie));
      const Issued& io = v[idx < v.size() ? idx : start + i];
      const auto ret = static_cast<ssize_t>(ev.ret);
      if (ev.status != CUFILE_COMPLETE) {
        std::string why = BatchStatusName(ev.status);
        if (ret < 0) why += ": " + IoError(ret, static_cast<int>(-ret));
        first = TransferError(Describe(write, io, path) + " " + why);
      } else if (ret < 0) {
        first = TransferError(Describe(write, io, path) + " failed: " + IoError(ret, static_cast<int>(-ret)));
      } else if (static_cast<uint64_t>(ret) != io.length_bytes) {
        first = TransferError(Describe(write, io, path) + " was short: " + std::to_string(ret) + " bytes" +
                              (write ? "" : " (past the end of the file?)"));
      }
    }
    if (!first.ok()) return first;
  }
  return first;
}

Status GdsFile::Impl::RunThreads(bool write, const std::vector<Issued>& v, const std::string& path) {
  struct Shared {
    std::atomic<size_t> next{0};
    std::atomic<bool> stop{false};
    std::mutex mu;
    std::condition_variable cv;
    int running = 0;
    Status first;
  } s;
  auto fail = [&s](Status st) {
    std::lock_guard<std::mutex> l(s.mu);
    if (s.first.ok()) s.first = std::move(st);
    s.stop = true;
  };
  const int workers = static_cast<int>(std::min<size_t>(std::max(1u, options.io_threads), v.size()));
  s.running = workers;
  for (int w = 0; w < workers; ++w) {
    pool->Post([&, write] {
      thread_local int current_device = -1;  // pool threads are ours: their device is ours to set
      for (;;) {
        if (s.stop) break;
        const size_t i = s.next.fetch_add(1);
        if (i >= v.size()) break;
        const Issued& io = v[i];
        if (io.device != current_device) {
          cudaError_t ce = cudaSetDevice(io.device);
          if (ce != cudaSuccess) {
            fail(DeviceError("cudaSetDevice(" + std::to_string(io.device) + ") failed: " + cudaGetErrorString(ce)));
            break;
          }
          current_device = io.device;
        }
        uint64_t done = 0;
        while (done < io.length_bytes) {
          const size_t len = io.length_bytes - done;
          const auto foff = static_cast<off_t>(io.file_offset_bytes + done);
          const auto boff = static_cast<off_t>(io.base_offset_bytes + done);
          errno = 0;
          ssize_t r = write ? api->write(handle, io.base, len, foff, boff) : api->read(handle, io.base, len, foff, boff);
          const int saved = errno;
          if (r < 0) {
            fail(TransferError(Describe(write, io, path) + " failed after " + std::to_string(done) + " bytes: " +
                               IoError(r, saved)));
            break;
          }
          if (r == 0) {
            fail(TransferError(Describe(write, io, path) + " was short: " + std::to_string(done) + " bytes" +
                               (write ? "" : " (past the end of the file?)")));
            break;
          }
          done += static_cast<uint64_t>(r);  // short transfer: resubmit the remainder
        }
      }
      std::lock_guard<std::mutex> l(s.mu);
      if (--s.running == 0) s.cv.notify_all();
    });
  }
  std::unique_lock<std::mutex> l(s.mu);
  s.cv.wait(l, [&] { return s.running == 0; });
  return s.first;
}

}  // namespace kvtier::gds
