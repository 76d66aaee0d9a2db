// Runtime of the CUDA CPU execution layer (see cuda_emu.h for the device model): fibers, the
// block scheduler, barriers, warp collectives, poisoned shared memory and launch checks, plus
// the two control ops of the `lwkd_emu` library (schedule, statistics).
#include "cuda_emu.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define LWKD_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LWKD_EMU_ASAN 1
#endif
#endif
#ifdef LWKD_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace lwkd_emu {
namespace detail {

ThreadCtx* g_thread = nullptr;
GridCtx g_grid{};

namespace {

// =============================================================================================
// Context switching.  x86-64: a minimal switch that saves the callee-saved registers and the
// floating-point control words on the current stack (no signal-mask system call, unlike
// swapcontext); elsewhere ucontext.
// =============================================================================================
#if defined(__x86_64__)
extern "C" void lwkd_emu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void lwkd_emu_ctx_start();
asm(R"(
    .text
    .p2align 4
    .globl lwkd_emu_ctx_switch
    .hidden lwkd_emu_ctx_switch
    .type lwkd_emu_ctx_switch, @function
lwkd_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lwkd_emu_ctx_switch, .-lwkd_emu_ctx_switch

    .p2align 4
    .globl lwkd_emu_ctx_start
    .hidden lwkd_emu_ctx_start
    .type lwkd_emu_ctx_start, @function
lwkd_emu_ctx_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size lwkd_emu_ctx_start, .-lwkd_emu_ctx_start
)");
#endif

enum class State : int32_t { kRunnable, kBarrier, kWarp, kExited, kFaulted };

struct Fiber {
  ThreadCtx ctx;  // what threadIdx reads
  unsigned linear = 0;
  State state = State::kRunnable;
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + stack_size)
  size_t stack_size = 0;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  void* asan_fake = nullptr;
  // where the fiber waits (barrier or warp collective)
  const char* file = nullptr;
  int line = 0;
  // the pending warp collective
  WarpOp wop = WarpOp::kSyncwarp;
  unsigned wmask = 0;
  int warg = 0, wwidth = kWarpSize, wpred = 0;
  size_t wsize = 0;
  alignas(16) unsigned char wval[16];
  alignas(16) unsigned char wout[16];
  unsigned wret = 0;
};

enum class Policy : int32_t { kLowest, kHighest, kRandom };

struct SharedSlot {
  void* addr;
  size_t bytes;
  uint64_t generation;
};

struct KernelStats {
  uint64_t launches = 0, blocks = 0, threads = 0;
};

// Everything about the launch in progress (one at a time: g_mutex).
struct Machine {
  std::mutex mutex;
  // configuration
  Policy policy = Policy::kLowest;
  uint64_t seed = 0;
  std::string schedule = "default";
  bool configured = false;
  // fibers and their stacks (reused by every block and launch)
  std::vector<std::unique_ptr<Fiber>> pool;
  size_t stack_bytes = 0;
  // the block in progress
  const LaunchSpec* spec = nullptr;
  unsigned n = 0;  // threads in the block
  std::vector<uint64_t> runnable;  // bitset over the block's threads
  unsigned n_exited = 0, n_barrier = 0;
  uint64_t generation = 0;  // one per block: shared-memory poisoning
  std::vector<SharedSlot> shared;
  size_t static_shared = 0;
  std::vector<unsigned char> dyn_shared;
  uint64_t rng = 0;
  std::string error;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  const void* sched_stack_lo = nullptr;
  size_t sched_stack_size = 0;
  // statistics
  std::map<std::string, KernelStats> stats;
  uint64_t total_launches = 0, switches = 0;
};

Machine& M() {
  static Machine* m = new Machine();  // never destroyed: fibers may outlive static destruction order
  return *m;
}

// ---- configuration ----------------------------------------------------------------------------
bool parse_schedule(const std::string& s, Policy& policy, uint64_t& seed) {
  if (s.empty() || s == "default" || s == "lowest") {
    policy = Policy::kLowest;
    seed = 0;
    return true;
  }
  if (s == "reverse" || s == "highest") {
    policy = Policy::kHighest;
    seed = 0;
    return true;
  }
  if (s.rfind("random", 0) == 0) {
    policy = Policy::kRandom;
    seed = 1;
    if (s.size() > 6) {
      if (s[6] != ':' || s.size() == 7) return false;
      char* end = nullptr;
      seed = std::strtoull(s.c_str() + 7, &end, 10);
      if (end == nullptr || *end != '\0') return false;
    }
    return true;
  }
  return false;
}

void configure_from_env(Machine& m) {
  if (m.configured) return;
  m.configured = true;
  const char* env = std::getenv("LWKD_EMU_SCHEDULE");
  if (env == nullptr) return;
  Policy p;
  uint64_t seed;
  TORCH_CHECK(parse_schedule(env, p, seed), "lwkd_emu: LWKD_EMU_SCHEDULE='", env,
              "' is not a schedule (expected default, reverse, random or random:SEED)");
  m.policy = p;
  m.seed = seed;
  m.schedule = env;
}

uint64_t next_random(Machine& m) {  // xorshift64*
  m.rng ^= m.rng >> 12;
  m.rng ^= m.rng << 25;
  m.rng ^= m.rng >> 27;
  return m.rng * 2685821657736338717ull;
}

// ---- fibers -------------------------------------------------------------------------------------
size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

size_t default_stack_bytes() {
#ifdef LWKD_EMU_ASAN
  return size_t(1) << 20;  // ASan's redzones grow frames
#else
  return size_t(256) << 10;
#endif
}

void grow_pool(Machine& m, unsigned n) {
  if (m.stack_bytes == 0) m.stack_bytes = default_stack_bytes();
  while (m.pool.size() < n) {
    auto f = std::make_unique<Fiber>();
    const size_t guard = page_size();
    void* mem = mmap(nullptr, m.stack_bytes + guard, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "lwkd_emu: cannot map a fiber stack");
    // the lowest page faults on a stack overflow instead of corrupting the neighbour stack
    TORCH_CHECK(mprotect(mem, guard, PROT_NONE) == 0, "lwkd_emu: cannot protect a fiber stack guard page");
    f->stack_lo = static_cast<char*>(mem) + guard;
    f->stack_size = m.stack_bytes;
    m.pool.push_back(std::move(f));
  }
}

void fiber_main(Fiber* f);

#if !defined(__x86_64__)
void fiber_tramp(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

void init_fiber(Fiber* f) {
#ifdef LWKD_EMU_ASAN
  // the frames of the fiber that ran on this stack before never returned: clear their redzones
  // where the new fiber starts (deeper frames set their own shadow when they are entered)
  const size_t fresh = std::min<size_t>(f->stack_size, 64 << 10);
  ASAN_UNPOISON_MEMORY_REGION(f->stack_lo + f->stack_size - fresh, fresh);
#endif
#if defined(__x86_64__)
  // initial frame popped by lwkd_emu_ctx_switch: fpcw, mxcsr, r15, r14, r13 (entry), r12
  // (argument), rbx, rbp, return address (lwkd_emu_ctx_start); 16-byte aligned after the ret
  uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack_lo) + f->stack_size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  s[-1] = reinterpret_cast<uint64_t>(&lwkd_emu_ctx_start);
  s[-2] = 0;                                        // rbp
  s[-3] = 0;                                        // rbx
  s[-4] = reinterpret_cast<uint64_t>(f);            // r12
  s[-5] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
  s[-6] = 0;                                        // r14
  s[-7] = 0;                                        // r15
  s[-8] = mxcsr;                                    // 8(%rsp)
  s[-9] = fpcw;                                     // (%rsp)
  f->sp = &s[-9];
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&fiber_tramp), 2, unsigned(p >> 32), unsigned(p & 0xffffffffu));
#endif
  f->asan_fake = nullptr;
}

// scheduler -> fiber
void resume(Machine& m, Fiber* f) {
  m.current = f;
  g_thread = &f->ctx;
  ++m.switches;
#ifdef LWKD_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack_lo, f->stack_size);
#endif
#if defined(__x86_64__)
  lwkd_emu_ctx_switch(&m.sched_sp, f->sp);
#else
  swapcontext(&m.sched_uc, &f->uc);
#endif
#ifdef LWKD_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  m.current = nullptr;
}

// fiber -> scheduler; returns when the scheduler resumes this fiber (never when it exited or
// faulted)
void yield(Machine& m, Fiber* f) {
  const bool final = f->state == State::kExited || f->state == State::kFaulted;
#ifdef LWKD_EMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake, m.sched_stack_lo, m.sched_stack_size);
#endif
#if defined(__x86_64__)
  lwkd_emu_ctx_switch(&f->sp, m.sched_sp);
#else
  swapcontext(&f->uc, &m.sched_uc);
#endif
#ifdef LWKD_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, &m.sched_stack_lo, &m.sched_stack_size);
#endif
  (void)final;
}

// ---- runnable set -------------------------------------------------------------------------------
void set_runnable(Machine& m, unsigned i) { m.runnable[i >> 6] |= uint64_t(1) << (i & 63); }
void clear_runnable(Machine& m, unsigned i) { m.runnable[i >> 6] &= ~(uint64_t(1) << (i & 63)); }

int pick(Machine& m) {
  const size_t W = m.runnable.size();
  if (m.policy == Policy::kLowest) {
    for (size_t w = 0; w < W; ++w)
      if (m.runnable[w]) return int(w * 64 + __builtin_ctzll(m.runnable[w]));
    return -1;
  }
  if (m.policy == Policy::kHighest) {
    for (size_t w = W; w-- > 0;)
      if (m.runnable[w]) return int(w * 64 + 63 - __builtin_clzll(m.runnable[w]));
    return -1;
  }
  unsigned count = 0;
  for (size_t w = 0; w < W; ++w) count += __builtin_popcountll(m.runnable[w]);
  if (count == 0) return -1;
  unsigned k = unsigned(next_random(m) % count);
  for (size_t w = 0; w < W; ++w) {
    uint64_t bits = m.runnable[w];
    const unsigned c = __builtin_popcountll(bits);
    if (k >= c) {
      k -= c;
      continue;
    }
    while (k--) bits &= bits - 1;
    return int(w * 64 + __builtin_ctzll(bits));
  }
  return -1;
}

// ---- error reporting ------------------------------------------------------------------------------
std::string where(const Machine& m) {
  std::ostringstream os;
  os << "kernel " << m.spec->kernel << " (launched at " << m.spec->file << ":" << m.spec->line << "), block ("
     << g_grid.block_idx.x << ", " << g_grid.block_idx.y << ", " << g_grid.block_idx.z << ")";
  return os.str();
}

std::string thread_name(const Fiber* f) {
  std::ostringstream os;
  os << "thread (" << f->ctx.thread_idx.x << ", " << f->ctx.thread_idx.y << ", " << f->ctx.thread_idx.z << ")";
  return os.str();
}

std::string site(const char* file, int line) {
  std::ostringstream os;
  os << (file ? file : "?") << ":" << line;
  return os.str();
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

std::string describe_wait(const Fiber* f) {
  switch (f->state) {
    case State::kExited: return "has exited";
    case State::kFaulted: return "faulted";
    case State::kRunnable: return "is running elsewhere";
    case State::kBarrier: return "waits at __syncthreads (" + site(f->file, f->line) + ")";
    case State::kWarp: return std::string("waits at ") + op_name(f->wop) + " (" + site(f->file, f->line) + ")";
  }
  return "?";
}

// Records the first error of the launch (the fiber that reports it stops for good).
void record_error(Machine& m, const std::string& msg) {
  if (m.error.empty()) m.error = msg;
}

[[noreturn]] void fiber_fault(Machine& m, Fiber* f, const std::string& msg) {
  record_error(m, "lwkd_emu: " + where(m) + ", " + thread_name(f) + ": " + msg);
  f->state = State::kFaulted;
  yield(m, f);
  __builtin_unreachable();
}

Fiber* current_fiber(Machine& m, const char* api) {
  if (m.current == nullptr) {
    std::fprintf(stderr, "lwkd_emu: %s called outside a kernel\n", api);
    std::abort();
  }
  return m.current;
}

void fiber_main(Fiber* f) {
  Machine& m = M();
#ifdef LWKD_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &m.sched_stack_lo, &m.sched_stack_size);
#endif
  try {
    m.spec->invoke(m.spec->ctx);
  } catch (const std::exception& e) {
    fiber_fault(m, f, std::string("exception in device code: ") + e.what());
  } catch (...) {
    fiber_fault(m, f, "exception in device code");
  }
  f->state = State::kExited;
  ++m.n_exited;
  yield(m, f);
  __builtin_unreachable();
}

// ---- one block ------------------------------------------------------------------------------------
void deadlock(Machine& m) {
  // nothing can run but threads remain: name the first waiter and what it waits for
  std::ostringstream os;
  os << "lwkd_emu: " << where(m) << ": ";
  for (unsigned i = 0; i < m.n; ++i) {
    const Fiber* f = m.pool[i].get();
    if (f->state != State::kWarp) continue;
    const unsigned warp = i / kWarpSize;
    for (unsigned l = 0; l < unsigned(kWarpSize); ++l) {
      if (!(f->wmask >> l & 1u)) continue;
      const unsigned j = warp * kWarpSize + l;
      const Fiber* g = m.pool[j].get();
      if (g->state == State::kWarp) continue;
      os << thread_name(f) << " waits at " << op_name(f->wop) << " (" << site(f->file, f->line) << ") with mask 0x"
         << std::hex << f->wmask << std::dec << " for lane " << l << " (" << thread_name(g) << "), which "
         << describe_wait(g) << " (warp divergence)";
      record_error(m, os.str());
      return;
    }
  }
  unsigned first_exited = m.n;
  const Fiber* waiter = nullptr;
  for (unsigned i = 0; i < m.n; ++i) {
    const Fiber* f = m.pool[i].get();
    if (f->state == State::kExited && first_exited == m.n) first_exited = i;
    if (f->state == State::kBarrier && waiter == nullptr) waiter = f;
  }
  if (waiter != nullptr) {
    os << m.n_barrier << " of " << m.n << " threads wait at __syncthreads (" << site(waiter->file, waiter->line)
       << ") but " << m.n_exited << " exited before reaching it";
    if (first_exited < m.n) os << " (first: " << thread_name(m.pool[first_exited].get()) << ")";
    os << " (barrier divergence)";
  } else {
    os << "no thread can make progress";
  }
  record_error(m, os.str());
}

void run_block(Machine& m, unsigned bx, unsigned by, unsigned bz) {
  const dim3 bd = m.spec->block;
  g_grid.block_idx = uint3{bx, by, bz};
  ++m.generation;
  m.static_shared = 0;
  m.n_exited = m.n_barrier = 0;
  std::fill(m.runnable.begin(), m.runnable.end(), 0);
  for (unsigned i = 0; i < m.n; ++i) {
    Fiber* f = m.pool[i].get();
    f->linear = i;
    f->ctx.thread_idx = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    f->state = State::kRunnable;
    f->file = nullptr;
    f->line = 0;
    init_fiber(f);
    set_runnable(m, i);
  }
  if (!m.dyn_shared.empty()) std::memset(m.dyn_shared.data(), 0xff, m.dyn_shared.size());
  while (m.error.empty()) {
    const int i = pick(m);
    if (i < 0) {
      if (m.n_exited < m.n) deadlock(m);
      break;
    }
    clear_runnable(m, unsigned(i));
    resume(m, m.pool[i].get());
  }
  g_thread = nullptr;
}

std::string dims(const dim3& d) {
  std::ostringstream os;
  os << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return os.str();
}

// Launch checks of the driver (compute capability 9.0 limits).
void check_launch(const LaunchSpec& s) {
  const std::string at = std::string("lwkd_emu: launch of ") + s.kernel + " at " + s.file + ":" + std::to_string(s.line);
  TORCH_CHECK(!s.grid_truncated, at, ": a grid or block size does not fit the unsigned int of dim3 "
              "(it would be truncated on the GPU)");
  const dim3 g = s.grid, b = s.block;
  TORCH_CHECK(g.x > 0 && g.y > 0 && g.z > 0, at, ": empty grid ", dims(g), " (cudaErrorInvalidConfiguration)");
  TORCH_CHECK(g.x <= 0x7fffffffu && g.y <= 65535u && g.z <= 65535u, at, ": grid ", dims(g),
              " exceeds the limits (2^31 - 1, 65535, 65535) (cudaErrorInvalidConfiguration)");
  TORCH_CHECK(b.x > 0 && b.y > 0 && b.z > 0, at, ": empty block ", dims(b), " (cudaErrorInvalidConfiguration)");
  TORCH_CHECK(b.x <= 1024u && b.y <= 1024u && b.z <= 64u && uint64_t(b.x) * b.y * b.z <= 1024u, at, ": block ",
              dims(b), " exceeds the limits (1024, 1024, 64; 1024 threads) (cudaErrorInvalidConfiguration)");
  TORCH_CHECK(s.param_bytes <= 32764, at, ": ", s.param_bytes,
              " bytes of kernel parameters exceed the 32764-byte limit (cudaErrorInvalidValue)");
  TORCH_CHECK(s.shared_bytes <= 48 * 1024, at, ": ", s.shared_bytes,
              " bytes of dynamic shared memory exceed 48 KiB without cudaFuncSetAttribute");
}

std::string base_name(const char* kernel) {
  std::string k(kernel);
  const size_t lt = k.find('<');
  if (lt != std::string::npos) k.resize(lt);
  while (!k.empty() && k.back() == ' ') k.pop_back();
  return k;
}

}  // namespace

// =============================================================================================
// Launch
// =============================================================================================
void run_launch(const LaunchSpec& spec) {
  Machine& m = M();
  std::lock_guard<std::mutex> lock(m.mutex);
  configure_from_env(m);
  check_launch(spec);
  const dim3 g = spec.grid, b = spec.block;
  m.spec = &spec;
  m.n = b.x * b.y * b.z;
  m.runnable.assign((m.n + 63) / 64, 0);
  m.error.clear();
  m.shared.clear();
  m.dyn_shared.assign(spec.shared_bytes, 0xff);
  grow_pool(m, m.n);
  g_grid.block_dim = b;
  g_grid.grid_dim = g;
  ++m.total_launches;
  m.rng = (m.seed + 1) * 0x9E3779B97F4A7C15ull ^ (m.total_launches * 0xBF58476D1CE4E5B9ull);
  if (m.rng == 0) m.rng = 1;

  const uint64_t nblocks = uint64_t(g.x) * g.y * g.z;
  std::vector<uint64_t> order;
  if (m.policy != Policy::kLowest) {
    order.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = m.policy == Policy::kHighest ? nblocks - 1 - i : i;
    if (m.policy == Policy::kRandom)
      for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[next_random(m) % i]);
  }
  for (uint64_t i = 0; i < nblocks && m.error.empty(); ++i) {
    const uint64_t lin = order.empty() ? i : order[i];
    run_block(m, unsigned(lin % g.x), unsigned((lin / g.x) % g.y), unsigned(lin / (uint64_t(g.x) * g.y)));
  }
  KernelStats& st = m.stats[base_name(spec.kernel)];
  st.launches += 1;
  st.blocks += nblocks;
  st.threads += nblocks * m.n;
  m.spec = nullptr;
  if (!m.error.empty()) {
    std::string e;
    e.swap(m.error);
    TORCH_CHECK(false, e);
  }
}

// =============================================================================================
// Device-side API
// =============================================================================================
void syncthreads(const char* file, int line) {
  Machine& m = M();
  Fiber* f = current_fiber(m, "__syncthreads");
  f->state = State::kBarrier;
  f->file = file;
  f->line = line;
  ++m.n_barrier;
  if (m.n_barrier + m.n_exited == m.n) {
    if (m.n_exited > 0) {
      --m.n_barrier;
      for (unsigned i = 0; i < m.n; ++i)
        if (m.pool[i]->state == State::kExited)
          fiber_fault(m, f, "__syncthreads (" + site(file, line) + ") can never complete: " +
                                thread_name(m.pool[i].get()) + " and " + std::to_string(m.n_exited - 1) +
                                " other threads of the block exited (barrier divergence)");
    }
    for (unsigned i = 0; i < m.n; ++i) {
      const Fiber* g = m.pool[i].get();
      if (g->line != line || std::strcmp(g->file, file) != 0) {
        --m.n_barrier;
        fiber_fault(m, f, "threads wait at different __syncthreads: " + thread_name(g) + " at " +
                              site(g->file, g->line) + ", this one at " + site(file, line) + " (barrier divergence)");
      }
    }
    for (unsigned i = 0; i < m.n; ++i) {
      m.pool[i]->state = State::kRunnable;
      set_runnable(m, i);
    }
    m.n_barrier = 0;  // every thread, this one included, is resumed by the scheduler
  }
  yield(m, f);
  f->state = State::kRunnable;
}

namespace {

// All lanes of `mask` in warp `warp` have arrived at a collective: check that they agree and
// deliver every lane's result.
void complete_warp(Machine& m, Fiber* self, unsigned warp, unsigned mask) {
  Fiber* lanes[kWarpSize] = {};
  for (unsigned l = 0; l < unsigned(kWarpSize); ++l)
    if (mask >> l & 1u) lanes[l] = m.pool[warp * kWarpSize + l].get();
  for (unsigned l = 0; l < unsigned(kWarpSize); ++l) {
    const Fiber* g = lanes[l];
    if (g == nullptr) continue;
    if (g->wop != self->wop || g->wmask != self->wmask || g->wwidth != self->wwidth || g->wsize != self->wsize ||
        ((self->wop == WarpOp::kShflDown || self->wop == WarpOp::kShflUp) && g->warg != self->warg)) {
      std::ostringstream os;
      os << "the lanes of warp " << warp << " disagree: " << thread_name(g) << " is at " << op_name(g->wop) << " ("
         << site(g->file, g->line) << ", mask 0x" << std::hex << g->wmask << std::dec << ", arg " << g->warg
         << ", width " << g->wwidth << "), this thread at " << op_name(self->wop) << " (" << site(self->file, self->line)
         << ", mask 0x" << std::hex << self->wmask << std::dec << ", arg " << self->warg << ", width " << self->wwidth
         << ")";
      fiber_fault(m, self, os.str());
    }
  }
  const WarpOp op = self->wop;
  if (op == WarpOp::kBallot || op == WarpOp::kAny || op == WarpOp::kAll || op == WarpOp::kSyncwarp) {
    unsigned ballot = 0;
    for (unsigned l = 0; l < unsigned(kWarpSize); ++l)
      if (lanes[l] != nullptr && lanes[l]->wpred) ballot |= 1u << l;
    const unsigned r = op == WarpOp::kBallot ? ballot
                       : op == WarpOp::kAny  ? unsigned(ballot != 0)
                       : op == WarpOp::kAll  ? unsigned(ballot == mask)
                                             : 0u;
    for (unsigned l = 0; l < unsigned(kWarpSize); ++l)
      if (lanes[l] != nullptr) lanes[l]->wret = r;
  } else {
    const int w = self->wwidth;
    for (unsigned l = 0; l < unsigned(kWarpSize); ++l) {
      Fiber* g = lanes[l];
      if (g == nullptr) continue;
      const int lane = int(l), seg = lane / w * w;
      int src = lane;
      switch (op) {
        case WarpOp::kShflIdx: src = seg + (((g->warg % w) + w) % w); break;
        case WarpOp::kShflUp: src = (lane - seg) - g->warg >= 0 ? lane - g->warg : lane; break;
        case WarpOp::kShflDown: src = (lane - seg) + g->warg < w ? lane + g->warg : lane; break;
        case WarpOp::kShflXor: {
          const int x = lane ^ g->warg;
          src = (x >= 0 && x < kWarpSize && x < seg + w) ? x : lane;
          break;
        }
        default: break;
      }
      if (!(mask >> src & 1u)) {
        std::ostringstream os;
        os << op_name(op) << " (" << site(g->file, g->line) << "): lane " << lane << " reads lane " << src
           << ", which is not in the mask 0x" << std::hex << mask << std::dec << " (undefined on the GPU)";
        fiber_fault(m, self, os.str());
      }
      std::memcpy(g->wout, lanes[src]->wval, g->wsize);
    }
  }
  for (unsigned l = 0; l < unsigned(kWarpSize); ++l) {
    if (lanes[l] == nullptr) continue;
    lanes[l]->state = State::kRunnable;
    set_runnable(m, warp * kWarpSize + l);
  }
}

}  // namespace

unsigned warp_collective(WarpOp op, const char* file, int line, unsigned mask, const void* value, size_t size,
                         int arg, int width, int pred, void* out) {
  Machine& m = M();
  Fiber* f = current_fiber(m, op_name(op));
  f->file = file;
  f->line = line;
  const unsigned lane = f->linear % kWarpSize, warp = f->linear / kWarpSize;
  if (!(mask >> lane & 1u)) {
    std::ostringstream os;
    os << op_name(op) << " (" << site(file, line) << ") with mask 0x" << std::hex << mask << std::dec
       << " does not name the calling lane " << lane;
    fiber_fault(m, f, os.str());
  }
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fiber_fault(m, f, std::string(op_name(op)) + " (" + site(file, line) + "): width " + std::to_string(width) +
                          " is not a power of two <= 32");
  for (unsigned l = 0; l < unsigned(kWarpSize); ++l)
    if ((mask >> l & 1u) && warp * kWarpSize + l >= m.n)
      fiber_fault(m, f, std::string(op_name(op)) + " (" + site(file, line) + "): the mask names lane " +
                            std::to_string(l) + ", which does not exist in a block of " + std::to_string(m.n) +
                            " threads");
  f->state = State::kWarp;
  f->wop = op;
  f->wmask = mask;
  f->warg = arg;
  f->wwidth = width;
  f->wpred = pred;
  f->wsize = size;
  if (size) std::memcpy(f->wval, value, size);
  bool all = true;
  for (unsigned l = 0; l < unsigned(kWarpSize) && all; ++l)
    if ((mask >> l & 1u) && m.pool[warp * kWarpSize + l]->state != State::kWarp) all = false;
  if (all) complete_warp(m, f, warp, mask);
  yield(m, f);
  f->state = State::kRunnable;
  if (out != nullptr && size) std::memcpy(out, f->wout, size);
  return f->wret;
}

void fault(const char* file, int line, const char* what) {
  Machine& m = M();
  fiber_fault(m, current_fiber(m, "fault"), std::string(what) + " (" + site(file, line) + ")");
}

void shared_decl(void* addr, size_t bytes, const char* name, const char* file, int line) {
  Machine& m = M();
  Fiber* f = current_fiber(m, "__shared__");
  for (SharedSlot& s : m.shared) {
    if (s.addr != addr) continue;
    if (s.generation != m.generation) {
      std::memset(addr, 0xff, bytes);
      s.generation = m.generation;
      m.static_shared += bytes;
    }
    return;
  }
  m.shared.push_back(SharedSlot{addr, bytes, m.generation});
  std::memset(addr, 0xff, bytes);
  m.static_shared += bytes;
  if (m.static_shared > 48 * 1024)
    fiber_fault(m, f, std::string("__shared__ ") + name + " (" + site(file, line) + ") brings the block's static "
                          "shared memory to " + std::to_string(m.static_shared) + " bytes (limit 49152)");
}

void* dynamic_shared(size_t align) {
  Machine& m = M();
  Fiber* f = current_fiber(m, "extern __shared__");
  if (m.dyn_shared.empty()) return nullptr;
  if (reinterpret_cast<uintptr_t>(m.dyn_shared.data()) % align != 0)
    fiber_fault(m, f, "dynamic shared memory is not aligned for its type");
  return m.dyn_shared.data();
}

// =============================================================================================
// Control ops (torch.ops.lwkd_emu._emu_schedule / _emu_stats)
// =============================================================================================
namespace {

std::string emu_schedule(c10::string_view value) {
  Machine& m = M();
  std::lock_guard<std::mutex> lock(m.mutex);
  configure_from_env(m);
  const std::string v(value);
  if (!v.empty()) {
    Policy p;
    uint64_t seed;
    TORCH_CHECK(parse_schedule(v, p, seed), "lwkd_emu._emu_schedule: '", v,
                "' is not a schedule (expected default, reverse, random or random:SEED)");
    m.policy = p;
    m.seed = seed;
    m.schedule = v;
  }
  return m.schedule;
}

// One line per kernel: "name launches blocks threads"; then "switches N".
std::string emu_stats(bool reset) {
  Machine& m = M();
  std::lock_guard<std::mutex> lock(m.mutex);
  std::ostringstream os;
  for (const auto& kv : m.stats)
    os << kv.first << " " << kv.second.launches << " " << kv.second.blocks << " " << kv.second.threads << "\n";
  os << "switches " << m.switches << "\n";
  if (reset) {
    m.stats.clear();
    m.switches = 0;
  }
  return os.str();
}

}  // namespace
}  // namespace detail
}  // namespace lwkd_emu

TORCH_LIBRARY_FRAGMENT(lwkd_emu, m) {
  // "" queries; "default" | "reverse" | "random" | "random:SEED" selects the schedule
  m.def("_emu_schedule(str schedule) -> str");
  m.def("_emu_stats(bool reset=False) -> str");
}

TORCH_LIBRARY_IMPL(lwkd_emu, CompositeExplicitAutograd, m) {
  m.impl("_emu_schedule", &lwkd_emu::detail::emu_schedule);
  m.impl("_emu_stats", &lwkd_emu::detail::emu_stats);
}
