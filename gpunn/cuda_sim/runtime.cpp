// runtime.cpp: the CUDA simulator's scheduler, built once into a shared library that every
// simulated kernel module links against.
//
// A launch runs its blocks one after another on the calling OS thread; the threads of a block
// are fibers on small stacks of their own (a hand-written switch on x86-64, ucontext
// elsewhere). A fiber runs until it waits at a barrier or a warp collective, or exits; the
// scheduler then resumes the next ready fiber, in thread order, reversed, or a seeded random
// order (block order likewise). A barrier releases when every thread of the block waits at the
// same __syncthreads; a collective completes when every lane of its mask has reached it.
// What can never complete (a thread exited or waits elsewhere) is reported with the kernel's
// name, the block and the threads, and the launch fails; so does a fault inside a fiber (a
// guard page of a sanitizer copy, a fiber's stack guard, any invalid address).
#include "sim.cuh"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace gpunn_sim {
const uint3* thread_idx = nullptr;
uint3 block_idx = {0, 0, 0};
dim3 block_dim = {1, 1, 1}, grid_dim = {1, 1, 1};
}  // namespace gpunn_sim

extern "C" {
// One launch, as the Python launcher describes it.
struct gpunn_sim_spec {
  const char* name;          // the kernel's name expression (for messages)
  void (*kernel)(void**);    // calls the kernel with args (pointers to the argument values)
  void** args;
  unsigned grid[3], block[3];
  char* shared_lo;           // the module's __shared__ section, filled with 0xFF per block
  char* shared_hi;
  int thread_order, block_order;  // 0 in order, 1 reversed, 2 random
  unsigned long long seed;
  const unsigned long long* guards;  // n_guards triples (lo, hi, argument index): guard pages
  int n_guards;
};
}

namespace {

using namespace gpunn_sim;

enum State { READY, BARRIER, WARP, DONE };
const char* const COLLECTIVE_NAMES[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                        "__shfl_xor_sync", "__ballot_sync", "__any_sync",
                                        "__all_sync", "__syncwarp"};

constexpr size_t STACK_BYTES = 256 * 1024;

struct Fiber {
  uint3 idx;
  int tid, lane, warp;
  State state;
#if defined(__x86_64__)
  void* sp;
#else
  ucontext_t context;
#endif
  char* stack;  // lowest usable byte (a guard page lies below)
  const char* file;
  int line;
  Collective kind;
  unsigned mask;
  unsigned long long value, result;
  int b, width;
};

// Per warp: lanes that exist (a last, partial warp has fewer), exited, and waiting at a
// collective; what a collective's arrival checks in O(1).
struct Warp {
  unsigned existing, exited, waiting;
};

struct Run {
  const gpunn_sim_spec* spec = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<char*> stacks;  // one per thread slot, kept for the process's life
  int threads = 0, live = 0, at_barrier = 0;
  bool failed = false, in_fiber = false;
  std::string error;
  Fiber* running = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  size_t page = 4096;
};

Run R;
std::mutex launch_mutex;
unsigned long long launch_count = 0;

// --- context switch ---------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void gpunn_sim_switch(void** save_sp, void* to_sp);
__asm__(R"(
.text
.globl gpunn_sim_switch
.hidden gpunn_sim_switch
.type gpunn_sim_switch,@function
gpunn_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size gpunn_sim_switch, .-gpunn_sim_switch
)");
#endif

void fiber_main();

void prepare(Fiber& f) {
#if defined(__x86_64__)
  // 16-byte aligned, each thread's top at another offset in the page: the stacks' hot lines
  // would otherwise all fall in the same cache sets
  auto* sp = reinterpret_cast<unsigned long long*>(f.stack + STACK_BYTES - f.tid % 64 * 80);
  *--sp = 0;                                                  // fiber_main's return address
  *--sp = reinterpret_cast<unsigned long long>(&fiber_main);  // where the first switch returns
  for (int i = 0; i < 6; ++i) *--sp = 0;                      // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = STACK_BYTES;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main, 0);
#endif
}

// Scheduler -> fiber, until the fiber waits or exits.
void resume(Fiber& f) {
  R.running = &f;
  thread_idx = &f.idx;
  R.in_fiber = true;
#if defined(__x86_64__)
  gpunn_sim_switch(&R.scheduler_sp, f.sp);
#else
  swapcontext(&R.scheduler, &f.context);
#endif
  R.in_fiber = false;
}

// Fiber -> scheduler.
void suspend(Fiber& f) {
#if defined(__x86_64__)
  gpunn_sim_switch(&f.sp, R.scheduler_sp);
#else
  swapcontext(&f.context, &R.scheduler);
#endif
}

// --- messages ---------------------------------------------------------------------------------

std::string format(const char* fmt, ...) {
  char buffer[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buffer, sizeof buffer, fmt, ap);
  va_end(ap);
  return buffer;
}

// "0-31, 40, 64-95"
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? format("%d", ids[i]) : format("%d-%d", ids[i], ids[j]);
    i = j + 1;
  }
  return out;
}

std::string where() {
  return format("kernel %s, block (%u, %u, %u) of grid (%u, %u, %u), %d threads per block",
                R.spec->name, block_idx.x, block_idx.y, block_idx.z, grid_dim.x, grid_dim.y,
                grid_dim.z, R.threads);
}

std::string site(const Fiber& f) {
  if (f.state == DONE) return "exited";
  if (f.state == READY) return "running";
  if (f.state == BARRIER) return format("wait at __syncthreads (%s:%d)", f.file, f.line);
  return format("wait at %s (%s:%d, mask 0x%08x)", COLLECTIVE_NAMES[f.kind], f.file, f.line,
                f.mask);
}

// Threads grouped by what they do: "threads 0-31 wait at ...; threads 32-255 exited".
std::string states(const std::vector<int>& tids) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (int t : tids) {
    const std::string s = site(R.fibers[t]);
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == s; });
    if (it == groups.end()) groups.push_back({s, {t}});
    else it->second.push_back(t);
  }
  std::string out;
  for (auto& g : groups) {
    if (!out.empty()) out += "; ";
    out += format("thread%s %s %s", g.second.size() > 1 ? "s" : "", ranges(g.second).c_str(),
                  g.first.c_str());
  }
  return out;
}

std::vector<int> all_threads() {
  std::vector<int> t(R.threads);
  std::iota(t.begin(), t.end(), 0);
  return t;
}

// Fail the launch from inside a fiber: never returns.
[[noreturn]] void fail(const std::string& what) {
  R.failed = true;
  R.error = what + " (" + where() + ")";
  Fiber& f = *R.running;
  suspend(f);
  __builtin_trap();  // a failed launch never resumes its fibers
}

// --- barriers ---------------------------------------------------------------------------------

// Release the barrier when every thread waits at it; report one that never can.
void check_barrier() {
  if (R.at_barrier == 0 || R.at_barrier != R.live) return;
  const Fiber* first = nullptr;
  bool same = true;
  for (const Fiber& f : R.fibers) {
    if (f.state != BARRIER) continue;
    if (!first) first = &f;
    else if (f.line != first->line || (f.file != first->file && std::strcmp(f.file, first->file)))
      same = false;
  }
  if (!same || R.live != R.threads)
    fail(format("divergent barrier: __syncthreads can never release: %s",
                states(all_threads()).c_str()));
  for (Fiber& f : R.fibers)
    if (f.state == BARRIER) f.state = READY;
  R.at_barrier = 0;
}

// --- warp collectives -------------------------------------------------------------------------

std::vector<int> lanes_of(unsigned mask) {
  std::vector<int> lanes;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) lanes.push_back(l);
  return lanes;
}

// The lane whose value `lane` receives (PTX shfl.sync), or -1 for its own value.
int source_lane(const Fiber& f) {
  const int segmask = (32 - f.width) & 31, clamp = f.kind == SHFL_UP ? 0 : 31;
  const int lane = f.lane, b = f.b & 31;
  const int max_lane = (lane & segmask) | (clamp & ~segmask), min_lane = lane & segmask;
  int j = lane;
  bool valid = false;
  switch (f.kind) {
    case SHFL_UP: j = lane - b; valid = j >= max_lane; break;
    case SHFL_DOWN: j = lane + b; valid = j <= max_lane; break;
    case SHFL_XOR: j = lane ^ b; valid = j <= max_lane; break;
    case SHFL_IDX: j = min_lane | (b & ~segmask & 31); valid = j <= max_lane; break;
    default: break;
  }
  return valid ? j : -1;
}

void complete(int warp, unsigned mask) {
  int lanes[32], count = 0;
  for (unsigned m = mask; m; m &= m - 1) lanes[count++] = __builtin_ctz(m);
  Fiber* fs[32];
  for (int i = 0; i < count; ++i) fs[lanes[i]] = &R.fibers[warp * 32 + lanes[i]];
  const Fiber& a = *fs[lanes[0]];
  for (int i = 0; i < count; ++i) {
    const int l = lanes[i];
    const Fiber& f = *fs[l];
    if (f.kind != a.kind || f.mask != a.mask || f.line != a.line ||
        (f.file != a.file && std::strcmp(f.file, a.file))) {
      std::vector<int> tids;
      for (int m = 0; m < count; ++m) tids.push_back(warp * 32 + lanes[m]);
      fail(format("divergent warp collective in warp %d: %s", warp, states(tids).c_str()));
    }
  }
  unsigned long long vote = 0;
  int any = 0, all = 1;
  for (int i = 0; i < count; ++i) {
    const int l = lanes[i];
    vote |= (fs[l]->value != 0 ? 1ull : 0ull) << l;
    any |= fs[l]->value != 0;
    all &= fs[l]->value != 0;
  }
  for (int i = 0; i < count; ++i) {
    const int l = lanes[i];
    Fiber& f = *fs[l];
    switch (f.kind) {
      case BALLOT: f.result = vote; break;
      case ANY: f.result = any; break;
      case ALL: f.result = all; break;
      case SYNCWARP: f.result = 0; break;
      default: {
        const int j = source_lane(f);
        if (j >= 0 && !(mask >> j & 1u))
          fail(format("%s in warp %d: lane %d reads lane %d, which its mask 0x%08x does not "
                      "name (%s:%d)", COLLECTIVE_NAMES[f.kind], warp, l, j, mask, f.file, f.line));
        f.result = j < 0 ? f.value : fs[j]->value;
      }
    }
  }
  for (int i = 0; i < count; ++i) fs[lanes[i]]->state = READY;
  R.warps[warp].waiting &= ~mask;
}

// Lanes of `mask` that exited or do not exist: the collective can never complete.
void check_mask(const Fiber& caller, unsigned mask) {
  const Warp& w = R.warps[caller.warp];
  if (mask & ~w.existing)
    fail(format("%s (%s:%d) in warp %d: mask 0x%08x names lanes %s, past the block's last "
                "thread", COLLECTIVE_NAMES[caller.kind], caller.file, caller.line, caller.warp,
                mask, ranges(lanes_of(mask & ~w.existing)).c_str()));
  if (mask & w.exited)
    fail(format("%s (%s:%d) in warp %d can never complete: its mask 0x%08x names exited "
                "lanes %s", COLLECTIVE_NAMES[caller.kind], caller.file, caller.line,
                caller.warp, mask, ranges(lanes_of(mask & w.exited)).c_str()));
}

void try_complete(const Fiber& f) {
  const Warp& w = R.warps[f.warp];
  if ((w.waiting & f.mask) != f.mask) return;
  complete(f.warp, f.mask);
}

// --- thread exit ------------------------------------------------------------------------------

[[noreturn]] void exit_fiber(Fiber& f) {
  f.state = DONE;
  R.live -= 1;
  if (R.at_barrier > 0)
    fail(format("divergent barrier: a thread exited while others wait at __syncthreads: %s",
                states(all_threads()).c_str()));
  Warp& w = R.warps[f.warp];
  w.exited |= 1u << f.lane;
  for (unsigned m = w.waiting; m; m &= m - 1) {
    const Fiber& g = R.fibers[f.warp * 32 + __builtin_ctz(m)];
    if (g.mask >> f.lane & 1u) check_mask(g, g.mask);
  }
  suspend(f);
  __builtin_trap();  // an exited fiber is never resumed
}

void fiber_main() {
  Fiber& f = *R.running;
  R.spec->kernel(R.spec->args);
  exit_fiber(*R.running);
  (void)f;
}

// --- faults -----------------------------------------------------------------------------------

struct sigaction saved_segv, saved_bus;
stack_t saved_altstack;
std::vector<char> altstack(64 * 1024);

std::string describe_fault(const char* address) {
  const auto a = reinterpret_cast<unsigned long long>(address);
  const gpunn_sim_spec& s = *R.spec;
  for (int i = 0; i < s.n_guards; ++i) {
    const unsigned long long lo = s.guards[3 * i], hi = s.guards[3 * i + 1];
    if (a >= lo && a < hi)
      return format("out-of-bounds access at %p: a guard page of argument %llu", address,
                    s.guards[3 * i + 2]);
  }
  for (int t = 0; t < R.threads; ++t) {
    const char* lo = R.fibers[t].stack - R.page;
    if (address >= lo && address < R.fibers[t].stack)
      return format("stack overflow of thread %d (the simulator's fibers have %zu KiB stacks)",
                    t, STACK_BYTES / 1024);
  }
  return format("invalid memory access at %p", address);
}

void on_fault(int sig, siginfo_t* info, void* context) {
  if (!R.in_fiber || R.running == nullptr) {  // not a kernel's: let the previous handler see it
    sigaction(SIGSEGV, &saved_segv, nullptr);
    sigaction(SIGBUS, &saved_bus, nullptr);
    (void)context;
    return;
  }
  R.failed = true;
  R.error = format("%s in thread %d", describe_fault(static_cast<char*>(info->si_addr)).c_str(),
                   R.running->tid) +
            (sig == SIGBUS ? " (SIGBUS)" : "") + " (" + where() + ")";
  suspend(*R.running);  // back to the scheduler (SA_NODEFER: the signal stays unblocked)
}

void install_fault_handler() {
  stack_t ss = {};
  ss.ss_sp = altstack.data();
  ss.ss_size = altstack.size();
  sigaltstack(&ss, &saved_altstack);
  struct sigaction sa = {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &saved_segv);
  sigaction(SIGBUS, &sa, &saved_bus);
}

void remove_fault_handler() {
  sigaction(SIGSEGV, &saved_segv, nullptr);
  sigaction(SIGBUS, &saved_bus, nullptr);
  sigaltstack(&saved_altstack, nullptr);
}

// --- blocks -----------------------------------------------------------------------------------

void order(std::vector<int>& ids, int mode, std::mt19937_64& rng) {
  std::iota(ids.begin(), ids.end(), 0);
  if (mode == 1) std::reverse(ids.begin(), ids.end());
  if (mode == 2) std::shuffle(ids.begin(), ids.end(), rng);
}

bool ensure_stacks(int threads) {
  while (static_cast<int>(R.stacks.size()) < threads) {
    void* p = mmap(nullptr, R.page + STACK_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    mprotect(p, R.page, PROT_NONE);  // guard page below the stack
    R.stacks.push_back(static_cast<char*>(p) + R.page);
  }
  return true;
}

bool run_block(std::mt19937_64& rng) {
  const gpunn_sim_spec& s = *R.spec;
  if (s.shared_hi > s.shared_lo) std::memset(s.shared_lo, 0xFF, s.shared_hi - s.shared_lo);
  for (int t = 0; t < R.threads; ++t) {
    Fiber& f = R.fibers[t];
    f = Fiber{};
    f.tid = t;
    f.idx = {t % s.block[0], (t / s.block[0]) % s.block[1], t / (s.block[0] * s.block[1])};
    f.lane = t % 32;
    f.warp = t / 32;
    f.state = READY;
    f.stack = R.stacks[t];
    prepare(f);
  }
  for (size_t w = 0; w < R.warps.size(); ++w) {
    const int lanes = std::min(32, R.threads - static_cast<int>(w) * 32);
    R.warps[w] = Warp{lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u, 0u, 0u};
  }
  R.live = R.threads;
  R.at_barrier = 0;
  std::vector<int> ids(R.threads);
  while (R.live > 0) {
    order(ids, s.thread_order, rng);
    bool progress = false;
    for (int t : ids) {
      if (R.fibers[t].state != READY) continue;
      resume(R.fibers[t]);
      progress = true;
      if (R.failed) return false;
    }
    if (!progress) {
      R.failed = true;
      R.error = "deadlock: " + states(all_threads()) + " (" + where() + ")";
      return false;
    }
  }
  return true;
}

bool launch(const gpunn_sim_spec& s) {
  const unsigned long long threads =
      static_cast<unsigned long long>(s.block[0]) * s.block[1] * s.block[2];
  if (threads == 0 || threads > 1024 || s.block[2] > 64 || s.grid[0] == 0 || s.grid[1] == 0 ||
      s.grid[2] == 0 || s.grid[0] > 2147483647u || s.grid[1] > 65535 || s.grid[2] > 65535) {
    R.error = format("kernel %s: invalid launch configuration: grid (%u, %u, %u), block (%u, %u, "
                     "%u) (CUDA allows at most 1024 threads per block, grid y and z up to 65535)",
                     s.name, s.grid[0], s.grid[1], s.grid[2], s.block[0], s.block[1], s.block[2]);
    return false;
  }
  R.threads = static_cast<int>(threads);
  if (!ensure_stacks(R.threads)) {
    R.error = format("kernel %s: no memory for %d fiber stacks", s.name, R.threads);
    return false;
  }
  R.fibers.resize(R.threads);
  R.warps.resize((R.threads + 31) / 32);
  block_dim = {s.block[0], s.block[1], s.block[2]};
  grid_dim = {s.grid[0], s.grid[1], s.grid[2]};
  std::mt19937_64 rng(s.seed * 0x9E3779B97F4A7C15ull + launch_count++);
  const unsigned long long blocks = static_cast<unsigned long long>(s.grid[0]) * s.grid[1] * s.grid[2];
  std::vector<int> ids(blocks);
  order(ids, s.block_order, rng);
  install_fault_handler();
  bool ok = true;
  for (int b : ids) {
    block_idx = {b % s.grid[0], (b / s.grid[0]) % s.grid[1], b / (s.grid[0] * s.grid[1])};
    if (!(ok = run_block(rng))) break;
  }
  remove_fault_handler();
  R.running = nullptr;
  thread_idx = nullptr;
  return ok;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int gpunn_sim_abi() { return 1; }

// 0 when the launch ran; else 1, and gpunn_sim_error() says why.
__attribute__((visibility("default"))) int gpunn_sim_launch(const gpunn_sim_spec* spec) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  R.page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  R.spec = spec;
  R.failed = false;
  R.error.clear();
  const bool ok = launch(*spec);
  R.spec = nullptr;
  return ok ? 0 : 1;
}

__attribute__((visibility("default"))) const char* gpunn_sim_error() { return R.error.c_str(); }

}  // extern "C"

// --- what the kernels call ----------------------------------------------------------------------

namespace gpunn_sim {

void barrier(const char* file, int line) {
  Fiber& f = *R.running;
  f.state = BARRIER;
  f.file = file;
  f.line = line;
  R.at_barrier += 1;
  check_barrier();
  if (f.state != READY) suspend(f);
}

unsigned long long collective(Collective kind, unsigned mask, unsigned long long value, int b,
                              int width, const char* file, int line) {
  Fiber& f = *R.running;
  f.kind = kind;
  f.mask = mask;
  f.value = value;
  f.b = b;
  f.width = width;
  f.file = file;
  f.line = line;
  if (!(mask >> f.lane & 1u))
    fail(format("%s (%s:%d): thread %d calls it with mask 0x%08x, which does not name its own "
                "lane %d", COLLECTIVE_NAMES[kind], file, line, f.tid, mask, f.lane));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(format("%s (%s:%d): width %d is not a power of two up to 32", COLLECTIVE_NAMES[kind],
                file, line, width));
  f.state = WARP;
  R.warps[f.warp].waiting |= 1u << f.lane;
  check_mask(f, mask);
  try_complete(f);
  if (f.state != READY) suspend(f);
  return f.result;
}

}  // namespace gpunn_sim
