// The CUDA emulator's runtime (emulator.h): thread pool, blocks, barriers, warp exchange,
// shared memory, launch checks and the runtime API subset the kernels and glue call.
//
// Threads of a block are host threads of a persistent pool; everything they share (barrier,
// warp exchanges, shared-memory table) sits behind one mutex per block, so ThreadSanitizer sees
// exactly the ordering CUDA gives: __syncthreads and __syncwarp order memory, and in the strict
// warp mode (default under TSan; HMMN_EMU_STRICT_WARP=0|1) shuffles and ballots do not, so a
// race between lanes through memory that only a shuffle separates is reported.
#include "emulator/emulator.h"

#include <dlfcn.h>
#include <cxxabi.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif

namespace hmmn_emu {
namespace {

constexpr size_t kStaticSmemLimit = 48 << 10;   // static shared memory, and dynamic without opt-in
constexpr int kMaxThreads = 1024;
constexpr uint32_t kPoison = 0xFFF0DEADu;        // NaN as float and (twice) as double; odd as int

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoll(v, nullptr, 10) : fallback;
}

struct Abort {};  // unwinds a thread of a failed block
struct ProbeDone {};

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  std::ostringstream os;
  os << "kernel@" << kernel;
  return os.str();
}

struct Buffer {  // poisoned, exactly sized (ASan sees overflows), aligned
  void* p = nullptr;
  size_t align = 16;
  Buffer(size_t bytes, size_t a) : align(std::max<size_t>(a, 16)) {
    p = ::operator new(std::max<size_t>(bytes, 1), std::align_val_t(align));
    auto* w = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) w[i] = static_cast<unsigned char>(kPoison >> (8 * (i % 4)));
  }
  ~Buffer() { ::operator delete(p, std::align_val_t(align)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

struct KernelInfo {
  std::string name;
  Probe probe = nullptr;
  bool probed = false;
  size_t static_smem = 0;
  int max_dynamic_smem = int(kStaticSmemLimit);  // cudaFuncAttributeMaxDynamicSharedMemorySize
};

std::mutex registry_mu;
std::map<const void*, KernelInfo> registry;

thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_detail;
thread_local bool launch_failed = false;  // later launches are skipped until cudaGetLastError

cudaError_t record(cudaError_t e, const std::string& detail) {
  last_error = e;
  last_detail = detail;
  return e;
}

void fail_launch(cudaError_t e, const std::string& detail) {
  record(e, detail);
  launch_failed = true;
}

int strict_warp() {
#if defined(__SANITIZE_THREAD__)
  static const int strict = int(env_int("HMMN_EMU_STRICT_WARP", 1));
#else
  static const int strict = 0;  // only ThreadSanitizer can tell the difference
#endif
  return strict;
}

// Runs `fn` with ThreadSanitizer blind to its synchronisation and memory accesses (strict warp
// mode): a warp exchange still waits for every lane but orders nothing.
template <typename F> void unordered(bool on, F&& fn) {
#if defined(__SANITIZE_THREAD__)
  if (on) {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  struct End {
    bool on;
    ~End() {
      if (on) {
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
        AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
      }
    }
  } end{on};
  fn();
#else
  (void)on;
  fn();
#endif
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// A block in flight.
struct Block {
  struct Warp {
    int lanes = 0, exited = 0, arrived = 0;
    uint64_t gen = 0;
    const char* op = nullptr;
    const char* file = nullptr;
    int line = 0;
    unsigned mask = 0;
    std::atomic<uint64_t> vals[2][32];
    std::condition_variable cv;
  };
  std::mutex mu;
  std::condition_variable cv;  // the block barrier
  const KernelInfo* kernel;
  dim3 grid, dim, idx;
  int nthreads = 0, exited = 0, blocked = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::vector<std::unique_ptr<Warp>> warps;
  std::map<const void*, std::unique_ptr<Buffer>> smem;
  std::unique_ptr<Buffer> dyn;
  bool failed = false;
  std::string error;
  std::chrono::seconds watchdog;

  std::string where(const Thread& t) const {
    std::ostringstream os;
    os << kernel->name << " block (" << idx.x << "," << idx.y << "," << idx.z << ") thread (" << t.thread_idx.x << ","
       << t.thread_idx.y << "," << t.thread_idx.z << ")";
    return os.str();
  }

  // Records the first error and wakes every waiting thread, which then unwinds (Abort).
  void fail(const std::string& msg) {
    if (!failed) {
      failed = true;
      error = msg;
    }
    cv.notify_all();
    for (auto& w : warps) w->cv.notify_all();
  }

  // All live threads wait and nothing can complete: a deadlock (e.g. lanes of one warp at a
  // shuffle while another lane is at __syncthreads).
  void check_deadlock(const Thread& t, const char* what) {
    if (nthreads > exited && blocked == nthreads - exited && !failed)
      fail(where(t) + ": deadlock: every thread of the block waits and none can proceed (last: " + what + ")");
  }

  template <typename Pred> void wait(std::unique_lock<std::mutex>& lk, std::condition_variable& c, const Thread& t,
                                     const char* what, Pred done) {
    ++blocked;
    check_deadlock(t, what);
    const auto deadline = std::chrono::steady_clock::now() + watchdog;
    while (!done() && !failed) {
      if (c.wait_until(lk, deadline) == std::cv_status::timeout && !done() && !failed)
        fail(where(t) + ": watchdog: " + what + " not completed within " + std::to_string(watchdog.count()) +
             " s (a hang)");
    }
    if (failed) throw Abort{};  // (the thread completing an operation un-counts its waiters)
  }
};

namespace {

thread_local Thread* tls = nullptr;
thread_local bool probing = false;
thread_local size_t probe_bytes = 0;
thread_local std::vector<std::unique_ptr<Buffer>>* probe_buffers = nullptr;

// Persistent workers: worker i runs thread i of each block.
class Pool {
 public:
  void run(int n, const std::function<void(int)>& job, std::chrono::seconds watchdog) {
    std::unique_lock<std::mutex> lk(mu_);
    while (int(threads_.size()) < n) {
      std::thread(&Pool::worker, this, int(threads_.size())).detach();
      threads_.push_back(0);
    }
    job_ = &job;
    n_ = n;
    done_ = 0;
    ++gen_;
    start_.notify_all();
    // Barriers and warp operations have their own watchdog; this one catches a thread that
    // loops without reaching either. Its block cannot be abandoned safely: abort with a message.
    if (!done_cv_.wait_for(lk, watchdog, [&] { return done_ == n_; })) {
      std::fprintf(stderr, "hmmn_emu: watchdog: a block did not finish within %lld s (a thread loops without "
                   "reaching a barrier); aborting\n", (long long)watchdog.count());
      std::abort();
    }
    job_ = nullptr;
  }

 private:
  void worker(int i) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      start_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (i >= n_) continue;
      const auto* job = job_;
      lk.unlock();
      (*job)(i);
      lk.lock();
      if (++done_ == n_) done_cv_.notify_one();
    }
  }
  std::mutex mu_;
  std::condition_variable start_, done_cv_;
  std::vector<char> threads_;
  const std::function<void(int)>* job_ = nullptr;
  int n_ = 0, done_ = 0;
  uint64_t gen_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: workers sleep until the process exits
  return *p;
}

std::mutex launch_mu;  // one launch at a time

KernelInfo& info_locked(const void* kernel) {
  KernelInfo& k = registry[kernel];
  if (k.name.empty()) k.name = kernel_name(kernel);
  if (!k.probed && k.probe) {
    // Static shared memory: run the kernel's declarations on zero arguments until its first
    // builtin (every kernel declares its shared memory before it reads threadIdx/blockIdx).
    std::vector<std::unique_ptr<Buffer>> scratch;
    probing = true;
    probe_bytes = 0;
    probe_buffers = &scratch;
    try {
      k.probe(kernel);
    } catch (const ProbeDone&) {
    }
    probing = false;
    probe_buffers = nullptr;
    k.static_smem = probe_bytes;
    k.probed = true;
  }
  return k;
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

}  // namespace

Thread& current() {
  if (probing) throw ProbeDone{};
  if (tls == nullptr) {
    std::fprintf(stderr, "hmmn_emu: a CUDA builtin (threadIdx, __syncthreads...) was used outside a kernel\n");
    std::abort();
  }
  return *tls;
}

void* shared(const void* site, size_t bytes, size_t align) {
  if (probing) {
    probe_bytes = (probe_bytes + align - 1) / align * align + bytes;
    probe_buffers->push_back(std::make_unique<Buffer>(bytes, align));
    return probe_buffers->back()->p;
  }
  Block& b = *current().block;
  std::lock_guard<std::mutex> lk(b.mu);
  auto& slot = b.smem[site];
  if (!slot) slot = std::make_unique<Buffer>(bytes, align);
  return slot->p;
}

unsigned char* dynamic_shared() {
  if (probing) {  // a valid (poisoned) address: code after the declarations may be evaluated first
    probe_buffers->push_back(std::make_unique<Buffer>(4096, 16));
    return static_cast<unsigned char*>(probe_buffers->back()->p);
  }
  return static_cast<unsigned char*>(current().block->dyn->p);
}

void syncthreads(const char* file, int line) {
  Thread& t = current();
  Block& b = *t.block;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.failed) throw Abort{};
  if (b.exited > 0)
    b.fail(b.where(t) + ": divergent __syncthreads at " + file + ":" + std::to_string(line) + ": " +
           std::to_string(b.exited) + " thread(s) of the block already exited");
  else if (b.bar_arrived > 0 && (b.bar_line != line || std::strcmp(b.bar_file, file) != 0))
    b.fail(b.where(t) + ": divergent __syncthreads: reached at " + file + ":" + std::to_string(line) +
           " while other threads wait at " + b.bar_file + ":" + std::to_string(b.bar_line));
  if (b.failed) throw Abort{};
  b.bar_file = file;
  b.bar_line = line;
  const uint64_t gen = b.bar_gen;
  if (++b.bar_arrived == b.nthreads) {
    b.blocked -= b.nthreads - 1;
    b.bar_arrived = 0;
    ++b.bar_gen;
    b.cv.notify_all();
    return;
  }
  b.wait(lk, b.cv, t, "__syncthreads", [&] { return b.bar_gen != gen; });
}

namespace {

// Rendezvous of the 32 lanes of t's warp at one warp operation; `exchange` runs under the lock
// once all lanes have deposited their values.
void warp_rendezvous(Thread& t, unsigned mask, const char* op, const char* file, int line, uint64_t mine,
                     uint64_t (*all)[32]) {
  Block& b = *t.block;
  Block::Warp& w = *b.warps[t.linear / 32];
  const int lane = t.linear % 32;
  std::unique_lock<std::mutex> lk(b.mu);
  if (b.failed) throw Abort{};
  const std::string at = std::string(op) + " at " + file + ":" + std::to_string(line);
  if (mask != 0xffffffffu)
    b.fail(b.where(t) + ": " + at + " with mask 0x" + [&] {
      char s[16];
      std::snprintf(s, sizeof s, "%08x", mask);
      return std::string(s);
    }() + ": the emulator (and these kernels) only use full-warp operations");
  else if (w.lanes < 32 || w.exited > 0)
    b.fail(b.where(t) + ": " + at + " with a full mask but only " + std::to_string(w.lanes - w.exited) +
           " of 32 lanes present (missing lanes)");
  else if (w.arrived > 0 && (w.line != line || std::strcmp(w.file, file) != 0 || std::strcmp(w.op, op) != 0))
    b.fail(b.where(t) + ": divergent warp: " + at + " while other lanes wait at " + w.op + " at " + w.file + ":" +
           std::to_string(w.line));
  if (b.failed) throw Abort{};
  const uint64_t gen = w.gen;
  const int buf = int(gen & 1);  // double-buffered: the next exchange cannot overwrite this one's values
  w.vals[buf][lane].store(mine, std::memory_order_relaxed);
  w.op = op;
  w.file = file;
  w.line = line;
  if (++w.arrived == 32) {
    b.blocked -= 31;
    w.arrived = 0;
    ++w.gen;
    w.cv.notify_all();
  } else {
    b.wait(lk, w.cv, t, op, [&] { return w.gen != gen; });
  }
  if (all)
    for (int l = 0; l < 32; ++l) (*all)[l] = w.vals[buf][l].load(std::memory_order_relaxed);
}

}  // namespace

void syncwarp(unsigned mask, const char* file, int line) {
  Thread& t = current();
  warp_rendezvous(t, mask, "__syncwarp", file, line, 0, nullptr);  // orders memory, like CUDA's
}

void warp_exchange(unsigned mask, uint64_t mine, uint64_t (&all)[32], const char* op, const char* file, int line) {
  Thread& t = current();
  unordered(strict_warp() != 0, [&] { warp_rendezvous(t, mask, op, file, line, mine, &all); });
}

void note_kernel(const void* kernel, Probe probe) {
  std::lock_guard<std::mutex> lk(registry_mu);
  KernelInfo& k = registry[kernel];
  if (!k.probe) k.probe = probe;
}

int64_t cap_dynamic_smem_budget(int64_t budget) {
  const int64_t cap = env_int("HMMN_EMU_SMEM_BUDGET", -1);
  return cap >= 0 && cap < budget ? cap : budget;
}

const char* error_detail() { return last_detail.c_str(); }

void launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(const void*), const void* ctx) {
  std::lock_guard<std::mutex> launch_lock(launch_mu);
  KernelInfo* k;
  {
    std::lock_guard<std::mutex> lk(registry_mu);
    k = &info_locked(kernel);
  }
  if (launch_failed) return;  // a failed launch is sticky until cudaGetLastError
  const std::string what = k->name + " <<<" + dims(grid) + ", " + dims(block) + ", " + std::to_string(smem) + ">>>";
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    fail_launch(cudaErrorInvalidConfiguration, what + ": grid out of range (x in [1, 2^31-1], y, z in [1, 65535])");
    return;
  }
  if (nthreads == 0 || nthreads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64) {
    fail_launch(cudaErrorInvalidConfiguration, what + ": block out of range (at most 1024 threads; z <= 64)");
    return;
  }
  const int64_t optin = env_int("HMMN_EMU_SMEM_OPTIN", 232448);
  if (k->static_smem > kStaticSmemLimit || smem > size_t(k->max_dynamic_smem) ||
      int64_t(k->static_smem + smem) > optin) {
    fail_launch(cudaErrorInvalidValue,
           what + ": shared memory: " + std::to_string(k->static_smem) + " B static + " + std::to_string(smem) +
               " B dynamic; limits: 48 KiB static, " + std::to_string(k->max_dynamic_smem) +
               " B dynamic (above 48 KiB only after cudaFuncSetAttribute(MaxDynamicSharedMemorySize)), " +
               std::to_string(optin) + " B in all");
    return;
  }

  if (const char* log = std::getenv("HMMN_EMU_LAUNCH_LOG")) {  // tests read which plan branches ran
    if (FILE* f = std::fopen(log, "a")) {
      std::fprintf(f, "%s\n", what.c_str());
      std::fclose(f);
    }
  }
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(dim3(x, y, z));
  if (const int64_t seed = env_int("HMMN_EMU_SHUFFLE_BLOCKS", 0)) {  // blocks run in no fixed order
    std::mt19937_64 rng{uint64_t(seed)};
    std::shuffle(order.begin(), order.end(), rng);
  }
  const auto watchdog = std::chrono::seconds(env_int("HMMN_EMU_WATCHDOG_S", 120));
  const int n = int(nthreads);
  for (const dim3& bi : order) {
    Block b;
    b.kernel = k;
    b.grid = grid;
    b.dim = block;
    b.idx = bi;
    b.nthreads = n;
    b.watchdog = watchdog;
    for (int w = 0; w < (n + 31) / 32; ++w) {
      b.warps.push_back(std::make_unique<Block::Warp>());
      b.warps.back()->lanes = std::min(32, n - 32 * w);
    }
    b.dyn = std::make_unique<Buffer>(smem, 16);
    std::function<void(int)> job = [&](int i) {
      Thread t;
      t.linear = i;
      t.thread_idx = uint3{unsigned(i) % block.x, unsigned(i) / block.x % block.y, unsigned(i) / (block.x * block.y)};
      t.block_idx = uint3{bi.x, bi.y, bi.z};
      t.block_dim = block;
      t.grid_dim = grid;
      t.block = &b;
      tls = &t;
      try {
        body(ctx);
      } catch (const Abort&) {
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(b.mu);
        b.fail(b.where(t) + ": exception: " + e.what());
      }
      tls = nullptr;
      std::lock_guard<std::mutex> lk(b.mu);
      ++b.exited;
      ++b.warps[i / 32]->exited;
      if (b.failed) return;
      if (b.bar_arrived > 0)
        b.fail(b.where(t) + ": divergent __syncthreads: the thread exited while " + std::to_string(b.bar_arrived) +
               " thread(s) wait at " + b.bar_file + ":" + std::to_string(b.bar_line));
      else if (b.warps[i / 32]->arrived > 0)
        b.fail(b.where(t) + ": the lane exited while other lanes of its warp wait at " + b.warps[i / 32]->op + " at " +
               b.warps[i / 32]->file + ":" + std::to_string(b.warps[i / 32]->line) + " (missing lane)");
      else
        b.check_deadlock(t, "exit");
    };
    pool().run(n, job, 2 * watchdog);
    if (b.failed) {
      fail_launch(cudaErrorLaunchFailure, what + ": " + b.error);
      return;
    }
  }
}

}  // namespace hmmn_emu

// ---------------------------------------------------------------------------------------------
// Runtime API (renamed by emulator.h).

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = hmmn_emu::last_error;
  hmmn_emu::last_error = cudaSuccess;
  hmmn_emu::launch_failed = false;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return hmmn_emu::last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    default: return "emulator error";
  }
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* kernel) {
  std::lock_guard<std::mutex> lk(hmmn_emu::registry_mu);
  if (!hmmn_emu::registry.count(kernel)) return hmmn_emu::record(cudaErrorInvalidDeviceFunction, "unknown kernel");
  const auto& k = hmmn_emu::info_locked(kernel);
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = k.static_smem;
  attr->maxThreadsPerBlock = hmmn_emu::kMaxThreads;
  attr->maxDynamicSharedSizeBytes = k.max_dynamic_smem;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  std::lock_guard<std::mutex> lk(hmmn_emu::registry_mu);
  if (!hmmn_emu::registry.count(kernel)) return hmmn_emu::record(cudaErrorInvalidDeviceFunction, "unknown kernel");
  auto& k = hmmn_emu::info_locked(kernel);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // carve-out hints: no effect here
  const int64_t optin = hmmn_emu::env_int("HMMN_EMU_SMEM_OPTIN", 232448);
  if (value < 0 || int64_t(value) + int64_t(k.static_smem) > optin)
    return hmmn_emu::record(cudaErrorInvalidValue, k.name + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " +
                                                       std::to_string(value) + "): with " + std::to_string(k.static_smem) +
                                                       " B static shared memory the device allows at most " +
                                                       std::to_string(optin - int64_t(k.static_smem)));
  k.max_dynamic_smem = value;
  return cudaSuccess;
}

// An emulated sm_90 device; HMMN_EMU_NUM_SMS and HMMN_EMU_SMEM_OPTIN reshape it so that small
// test sizes take the launch plans' branches that real sizes take.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;  // one emulated device; the glue passes the CPU tensors' index (-1)
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = int(hmmn_emu::env_int("HMMN_EMU_NUM_SMS", 132)); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(hmmn_emu::env_int("HMMN_EMU_SMEM_OPTIN", 232448));
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = hmmn_emu::kMaxThreads; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return hmmn_emu::record(cudaErrorInvalidValue, "attribute not emulated");
  }
}
