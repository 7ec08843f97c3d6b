// The CUDA emulator's runtime (emulator.h): fibers, blocks, barriers, warp exchange, shared
// memory, launch checks and the runtime API subset the kernels and glue call.
//
// A block's CUDA threads are fibers (ucontext) on the launching host thread: a fiber runs until
// it waits at a barrier or warp operation, or exits; then the next ready one runs. Cheap
// (no OS scheduling), deterministic, and deadlocks are plain to see (no fiber ready). Under
// ThreadSanitizer each CUDA thread is a TSan fiber, switches order nothing, and exactly what CUDA
// orders is ordered: __syncthreads and __syncwarp; in the strict warp mode (default under TSan,
// HMMN_EMU_STRICT_WARP=0|1) shuffles and ballots do not, so a race between lanes through memory
// that only a shuffle separates is reported.
#include "emulator/emulator.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace hmmn_emu {
namespace {

constexpr size_t kStaticSmemLimit = 48 << 10;   // static shared memory, and dynamic without opt-in
constexpr int kMaxThreads = 1024;
constexpr uint32_t kPoison = 0xFFF0DEADu;        // NaN as float and (twice) as double; odd as int

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoll(v, nullptr, 10) : fallback;
}

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

// ThreadSanitizer: each CUDA thread is a TSan fiber; switches between them carry no ordering,
// barriers and __syncwarp order memory through release/acquire on a per-block/warp address,
// and the emulator's own bookkeeping is invisible (Internal).
#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber();
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
struct Internal {
  Internal() { AnnotateIgnoreReadsBegin(__FILE__, __LINE__), AnnotateIgnoreWritesBegin(__FILE__, __LINE__); }
  ~Internal() { AnnotateIgnoreWritesEnd(__FILE__, __LINE__), AnnotateIgnoreReadsEnd(__FILE__, __LINE__); }
};
void tsan_acquire(void* a) { __tsan_acquire(a); }
void tsan_release(void* a) { __tsan_release(a); }
#else
struct Internal {
  ~Internal() {}  // (non-trivial: no unused-variable warnings)
};
void tsan_acquire(void*) {}
void tsan_release(void*) {}
#endif

struct Buffer {  // poisoned, exactly sized (ASan sees overflows), aligned
  void* p = nullptr;
  size_t align = 16;
  Buffer(size_t bytes, size_t a) : align(std::max<size_t>(a, 16)) {
    const Internal quiet;  // the poison is not an access of the kernel's
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

struct Abort {};  // unwinds a fiber of a failed block

}  // namespace

// ---------------------------------------------------------------------------------------------
// A block in flight: one fiber (ucontext) per CUDA thread on the launching host thread. A fiber
// runs until it waits (barrier, warp operation) or exits; the next ready fiber runs then.
struct Fiber {
  ucontext_t ctx;
  Thread t;
  bool ready = true, done = false;
  bool left_internal = false;  // it switched away for good inside an Internal scope (TSan state)
  void* tsan = nullptr;
};

struct Block {
  struct Warp {
    int lanes = 0, exited = 0, arrived = 0;
    const char* op = nullptr;
    const char* file = nullptr;
    int line = 0;
    uint64_t vals[32], result[32];
    int waiters[32];
    char sync;  // TSan ordering address of __syncwarp (and of shuffles outside strict mode)
  };
  const KernelInfo* kernel;
  dim3 grid, dim, idx;
  int nthreads = 0, exited = 0, cur = 0;
  Fiber* fibers;
  ucontext_t main;
  void* main_tsan = nullptr;
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::vector<int> bar_waiters;
  char bar_sync, start_sync, end_sync;  // TSan ordering addresses
  std::vector<Warp> warps;
  std::map<const void*, std::unique_ptr<Buffer>> smem;
  std::unique_ptr<Buffer> dyn;
  bool failed = false;
  std::string error;

  std::string where(const Thread& t) const {
    std::ostringstream os;
    os << kernel->name << " block (" << idx.x << "," << idx.y << "," << idx.z << ") thread (" << t.thread_idx.x << ","
       << t.thread_idx.y << "," << t.thread_idx.z << ")";
    return os.str();
  }

  // Records the first error; every waiting fiber is resumed and unwinds (Abort).
  void fail(const std::string& msg) {
    if (!failed) {
      failed = true;
      error = msg;
    }
    for (int i = 0; i < nthreads; ++i)
      if (!fibers[i].done) fibers[i].ready = true;
  }

  // Leaves fiber `cur` (waiting or exited) for the next ready one, or the launcher when all
  // are done. Every live fiber waiting and none ready: a deadlock.
  void switch_next() {
    Fiber& me = fibers[cur];
    int next = -1;
    for (int k = 1; k <= nthreads && next < 0; ++k) {
      const int i = (cur + k) % nthreads;
      if (fibers[i].ready && !fibers[i].done) next = i;
    }
    if (next < 0 && exited < nthreads) {
      fail(where(me.t) + ": deadlock: every thread of the block waits and none can proceed");
      return switch_next();
    }
    if (next == cur) return;
    ucontext_t* from = &me.ctx;
    if (next < 0) {
#if defined(__SANITIZE_THREAD__)
      __tsan_switch_to_fiber(main_tsan, 0);
#endif
      swapcontext(from, &main);
      return;  // not reached: a done fiber is never resumed
    }
    cur = next;
    tls_set(&fibers[next].t);
    ucontext_t* to = &fibers[next].ctx;
#if defined(__SANITIZE_THREAD__)
    __tsan_switch_to_fiber(fibers[next].tsan, 1 /* no sync: only barriers order memory */);
#endif
    swapcontext(from, to);  // (nothing between the TSan switch and this one is instrumented)
  }

  // The calling fiber waits until a completer marks it ready.
  void wait() {
    fibers[cur].ready = false;
    switch_next();
    if (failed) throw Abort{};
  }

  static void tls_set(Thread* t);
};

namespace {

thread_local Thread* tls = nullptr;
thread_local bool probing = false;
thread_local size_t probe_bytes = 0;
thread_local std::vector<std::unique_ptr<Buffer>>* probe_buffers = nullptr;

std::mutex launch_mu;  // one launch at a time

// Stacks and TSan fibers, reused by every block.
struct FiberPool {
  static constexpr size_t kStack = 256 << 10;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Fiber> fibers;
  Fiber* get(int n) {
    if (int(fibers.size()) < n) fibers.resize(size_t(n));
    while (int(stacks.size()) < n) stacks.emplace_back(new char[kStack]);
    return fibers.data();
  }
  void create_tsan(int n) {
#if defined(__SANITIZE_THREAD__)
    for (int i = 0; i < n; ++i)
      if (!fibers[size_t(i)].tsan) fibers[size_t(i)].tsan = __tsan_create_fiber(0);
#else
    (void)n;
#endif
  }
};
FiberPool& fiber_pool() {
  static FiberPool* p = new FiberPool;
  return *p;
}

// Aborts the process when one block runs longer than HMMN_EMU_WATCHDOG_S (a thread that loops
// without reaching a barrier cannot be interrupted): a hang never passes silently.
std::atomic<int64_t> block_deadline{0};
void arm_watchdog(int64_t seconds) {
  static std::once_flag once;
  std::call_once(once, [] {
    std::thread([] {
      for (;;) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
        const int64_t d = block_deadline.load();
        const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
            std::chrono::steady_clock::now().time_since_epoch()).count();
        if (d != 0 && now > d) {
          std::fprintf(stderr, "hmmn_emu: watchdog: a block ran past HMMN_EMU_WATCHDOG_S (a hang); aborting\n");
          std::abort();
        }
      }
    }).detach();
  });
  const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
  block_deadline.store(seconds > 0 ? now + seconds : 0);
}

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

Block* running = nullptr;  // the block of the fiber entry below
void (*running_body)(const void*) = nullptr;
const void* running_ctx = nullptr;

void fiber_entry() {
  Block* bp;
  Fiber* fp;
  void (*body)(const void*);
  const void* ctx;
  {
    const Internal quiet;
    bp = running, body = running_body, ctx = running_ctx, fp = &bp->fibers[bp->cur];
  }
  Block& b = *bp;
  Fiber& f = *fp;
#if defined(__SANITIZE_THREAD__)
  if (f.left_internal) {  // this TSan fiber ended its last block inside an Internal scope: close it
    f.left_internal = false;
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
  tsan_acquire(&b.start_sync);  // the launcher's setup happens before every thread
  try {
    body(ctx);
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    const Internal quiet;
    b.fail(b.where(f.t) + ": exception: " + e.what());
  }
  tsan_release(&b.end_sync);
  const Internal quiet;
  f.done = true;
  ++b.exited;
  Block::Warp& w = b.warps[f.t.linear / 32];
  ++w.exited;
  if (!b.failed && b.bar_arrived > 0)
    b.fail(b.where(f.t) + ": divergent __syncthreads: the thread exited while " + std::to_string(b.bar_arrived) +
           " thread(s) wait at " + b.bar_file + ":" + std::to_string(b.bar_line));
  else if (!b.failed && w.arrived > 0)
    b.fail(b.where(f.t) + ": the lane exited while other lanes of its warp wait at " + w.op + " at " + w.file + ":" +
           std::to_string(w.line) + " (missing lane)");
  f.left_internal = true;
  b.switch_next();
}

}  // namespace

void Block::tls_set(Thread* t) { tls = t; }

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
  const Internal quiet;
  Block& b = *current().block;
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
  tsan_release(&b.bar_sync);
  {
    const Internal quiet;
    if (b.exited > 0)
      b.fail(b.where(t) + ": divergent __syncthreads at " + file + ":" + std::to_string(line) + ": " +
             std::to_string(b.exited) + " thread(s) of the block already exited");
    else if (b.bar_arrived > 0 && (b.bar_line != line || std::strcmp(b.bar_file, file) != 0))
      b.fail(b.where(t) + ": divergent __syncthreads: reached at " + file + ":" + std::to_string(line) +
             " while other threads wait at " + b.bar_file + ":" + std::to_string(b.bar_line));
    if (b.failed) throw Abort{};
    b.bar_file = file;
    b.bar_line = line;
    if (++b.bar_arrived == b.nthreads) {
      for (int i : b.bar_waiters) b.fibers[i].ready = true;
      b.bar_waiters.clear();
      b.bar_arrived = 0;
    } else {
      b.bar_waiters.push_back(b.cur);
      b.wait();
    }
  }
  tsan_acquire(&b.bar_sync);
}

namespace {

// Rendezvous of the 32 lanes of t's warp at one warp operation: every lane deposits `mine`; all
// get the 32 values. `ordered`: the operation orders memory (for ThreadSanitizer).
void warp_rendezvous(Thread& t, unsigned mask, const char* op, const char* file, int line, uint64_t mine,
                     uint64_t (*all)[32], bool ordered) {
  Block& b = *t.block;
  Block::Warp& w = b.warps[t.linear / 32];
  const int lane = t.linear % 32;
  if (ordered) tsan_release(&w.sync);
  {
    const Internal quiet;
    const std::string at = std::string(op) + " at " + file + ":" + std::to_string(line);
    if (mask != 0xffffffffu) {
      char m[16];
      std::snprintf(m, sizeof m, "%08x", mask);
      b.fail(b.where(t) + ": " + at + " with mask 0x" + m + ": the emulator (and these kernels) only use full-warp "
             "operations");
    } else if (w.lanes < 32 || w.exited > 0) {
      b.fail(b.where(t) + ": " + at + " with a full mask but only " + std::to_string(w.lanes - w.exited) +
             " of 32 lanes present (missing lanes)");
    } else if (w.arrived > 0 && (w.line != line || std::strcmp(w.file, file) != 0 || std::strcmp(w.op, op) != 0)) {
      b.fail(b.where(t) + ": divergent warp: " + at + " while other lanes wait at " + w.op + " at " + w.file + ":" +
             std::to_string(w.line));
    }
    if (b.failed) throw Abort{};
    w.vals[lane] = mine;
    w.op = op;
    w.file = file;
    w.line = line;
    if (++w.arrived == 32) {
      std::memcpy(w.result, w.vals, sizeof w.vals);  // read by the lanes before any arrives again
      for (int i = 0; i < 31; ++i) b.fibers[w.waiters[i]].ready = true;
      w.arrived = 0;
    } else {
      w.waiters[w.arrived - 1] = b.cur;
      b.wait();
    }
    if (all) std::memcpy(*all, w.result, sizeof w.result);
  }
  if (ordered) tsan_acquire(&w.sync);
}

}  // namespace

void syncwarp(unsigned mask, const char* file, int line) {
  warp_rendezvous(current(), mask, "__syncwarp", file, line, 0, nullptr, true);  // orders memory, like CUDA's
}

void warp_exchange(unsigned mask, uint64_t mine, uint64_t (&all)[32], const char* op, const char* file, int line) {
  warp_rendezvous(current(), mask, op, file, line, mine, &all, strict_warp() == 0);
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
  const Internal quiet;  // the launcher's bookkeeping (the fibers have their own TSan state)
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
  const int64_t watchdog = env_int("HMMN_EMU_WATCHDOG_S", 120);
  const int n = int(nthreads);
  Fiber* fibers = fiber_pool().get(n);
  for (const dim3& bi : order) {
    Block b;
    b.kernel = k;
    b.grid = grid;
    b.dim = block;
    b.idx = bi;
    b.nthreads = n;
    b.fibers = fibers;
    b.warps.resize(size_t((n + 31) / 32));
    for (int w = 0; w < int(b.warps.size()); ++w) b.warps[size_t(w)].lanes = std::min(32, n - 32 * w);
    b.dyn = std::make_unique<Buffer>(smem, 16);
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers[i];
      f.ready = true;
      f.done = false;
      f.t.linear = i;
      f.t.thread_idx = uint3{unsigned(i) % block.x, unsigned(i) / block.x % block.y, unsigned(i) / (block.x * block.y)};
      f.t.block_idx = uint3{bi.x, bi.y, bi.z};
      f.t.block_dim = block;
      f.t.grid_dim = grid;
      f.t.block = &b;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = fiber_pool().stacks[size_t(i)].get();
      f.ctx.uc_stack.ss_size = FiberPool::kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    fiber_pool().create_tsan(n);
    running = &b;
    running_body = body;
    running_ctx = ctx;
    arm_watchdog(watchdog);
    tsan_release(&b.start_sync);
    b.cur = 0;
    tls = &fibers[0].t;
    ucontext_t* first = &fibers[0].ctx;
#if defined(__SANITIZE_THREAD__)
    b.main_tsan = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(fibers[0].tsan, 0);
#endif
    swapcontext(&b.main, first);
    tls = nullptr;
    tsan_acquire(&b.end_sync);
    arm_watchdog(0);
    running = nullptr;
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
