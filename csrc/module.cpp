// The one pybind11 module of deepssim_fast: deepssim_fast._native.
// Capability files (ssim.cpp, topk.cpp, ...) add their functions through dsf::Registrar.
#include "common.h"

#include <cctype>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <mutex>
#include <system_error>
#if defined(__linux__)
#include <sched.h>
#endif

namespace dsf {

namespace {
std::atomic<int> g_simd_cap{-1};  // user cap on the SIMD level; -1 = none
std::atomic<int> g_threads{0};    // 0 = from environment / hardware

// A SIMD level by name ("scalar", "avx2", "avx512"), or -1 for any other name.
int parse_simd(const std::string& s) {
  if (s == "scalar") return static_cast<int>(Simd::Scalar);
  if (s == "avx2") return static_cast<int>(Simd::AVX2);
  if (s == "avx512") return static_cast<int>(Simd::AVX512);
  return -1;
}

// An unknown value is ignored with a warning (once per process): this runs inside native loops, without the
// GIL, so it cannot raise.
int parse_simd_env() {
  const char* e = std::getenv("DEEPSSIM_FAST_SIMD");
  if (!e || !*e) return -1;
  // (as the other variables: case and surrounding blanks do not matter; "auto" is the detected level, as
  // set_simd_level("auto") is)
  std::string s(e);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t b = 0;
  while (b < s.size() && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  s = s.substr(b);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s.empty() || s == "auto") return -1;
  const int v = parse_simd(s);
  static std::atomic<bool> warned{false};
  if (v < 0 && !warned.exchange(true))
    std::fprintf(stderr,
                 "deepssim_fast: DEEPSSIM_FAST_SIMD='%s' is not one of auto, scalar, avx2, avx512; using the "
                 "detected level\n",
                 e);
  return v;
}

// DEEPSSIM_FAST_NUM_THREADS: a positive integer, or 0 / unset / empty for all cores. Any other value (not a
// number, negative, out of range) is ignored with a warning (once per process), like DEEPSSIM_FAST_SIMD:
// this runs inside native loops, without the GIL, so it cannot raise.
int parse_threads_env() {
  const char* e = std::getenv("DEEPSSIM_FAST_NUM_THREADS");
  if (!e || !*e) return 0;
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  while (end != e && std::isspace(static_cast<unsigned char>(*end))) ++end;
  const bool ok = end != e && !*end && errno == 0 && v >= 0 && v <= std::numeric_limits<int>::max();
  static std::atomic<bool> warned{false};
  if (!ok && !warned.exchange(true))
    std::fprintf(stderr,
                 "deepssim_fast: DEEPSSIM_FAST_NUM_THREADS='%s' is not a thread count (a positive integer, or 0 "
                 "for all cores); using all cores\n",
                 e);
  return ok ? static_cast<int>(v) : 0;
}
}  // namespace

Simd detected_simd() {
#if DSF_X86
  static const Simd s = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Simd::Scalar;
    // AVX-512 F/DQ/VL/BW, and VBMI2 as a proxy for cores that run 512-bit vectors without a clock
    // penalty (Intel Ice Lake and later, AMD Zen 4 and later): Skylake-X and Cascade Lake, which slow
    // down under 512-bit code, stay on the AVX2 kernels.
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vbmi2");
    return avx512 ? Simd::AVX512 : Simd::AVX2;
  }();
  return s;
#else
  return Simd::Scalar;
#endif
}

Simd active_simd() {
  int cap = g_simd_cap.load();
  if (cap < 0) cap = parse_simd_env();
  const int det = static_cast<int>(detected_simd());
  return static_cast<Simd>(cap < 0 ? det : std::min(cap, det));
}

const char* simd_name(Simd s) {
  return s == Simd::AVX512 ? "avx512" : s == Simd::AVX2 ? "avx2" : "scalar";
}

// The CPUs this process may run on (its affinity mask: taskset, Slurm --cpus-per-task, docker --cpuset-cpus),
// else the online ones: hardware_concurrency() alone started one thread per online CPU on a job pinned to a few.
int usable_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

int num_threads() {
  int t = g_threads.load();
  if (t > 0) return t;
  if (const int v = parse_threads_env(); v > 0) return v;
  return usable_cpus();
}

namespace {
// True in the threads parallel_for starts: they never take the GIL (only the calling thread polls signals).
thread_local bool t_pool_thread = false;
// The stop flag of the parallel_for whose chunk this thread runs (nullptr outside one); set once a thread
// of that loop has failed.
thread_local const std::atomic<bool>* t_cancel = nullptr;
// Thrown by interruption_point() on a thread whose loop has already failed (never leaves parallel_for).
struct Cancelled {};
// When the calling thread last looked for pending signals (kept across calls: a loop of short
// parallel_for calls polls at the same rate as one long one).
thread_local std::chrono::steady_clock::time_point t_last_poll{};
constexpr std::chrono::milliseconds kPollEvery{100};

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// Between chunks, on the thread that called parallel_for (GIL released): run the Python signal handlers of
// signals that arrived meanwhile (Ctrl-C's default handler raises KeyboardInterrupt), throwing what they
// raise. Handlers only run on the main thread; elsewhere PyErr_CheckSignals returns 0 at once.
void poll_signals() {
  if (t_pool_thread) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - t_last_poll < kPollEvery) return;
  t_last_poll = now;
  // (taking the GIL while the interpreter shuts down would end this thread inside the loop)
  if (!Py_IsInitialized() || interpreter_finalizing()) return;
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}
}  // namespace

void interruption_point() {
  if (t_cancel && t_cancel->load(std::memory_order_relaxed)) throw Cancelled{};
  poll_signals();
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn,
                  int max_threads, Serial serial) {
  if (n <= 0) return;
  const IeeeFloats ieee;  // (this thread; each pool thread sets its own below)
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  int nt = num_threads();
  if (max_threads > 0) nt = std::min(nt, max_threads);
  nt = static_cast<int>(std::min<int64_t>(nt, chunks));
  if (nt <= 1) {
    if (serial == Serial::Whole) {
      poll_signals();
      fn(0, n);
      return;
    }
    for (int64_t b = 0; b < n; b += grain) {
      poll_signals();
      fn(b, std::min(n, b + grain));
    }
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> cancel{false};
  std::exception_ptr err;
  std::mutex err_mu;
  auto worker = [&](bool caller) {
    const std::atomic<bool>* const outer = t_cancel;  // (a parallel_for inside a chunk of another)
    t_cancel = &cancel;
    try {
      for (;;) {
        if (caller) poll_signals();
        const int64_t c = next.fetch_add(1);
        if (c >= chunks) break;
        const int64_t b = c * grain;
        fn(b, std::min(n, b + grain));
      }
    } catch (const Cancelled&) {
      // (another thread failed first: its exception is the loop's)
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (!err) err = std::current_exception();
      next.store(chunks);
      cancel.store(true);
    }
    t_cancel = outer;
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int i = 0; i < nt - 1; ++i) {
    // A thread that cannot be started (EAGAIN: a process or memory limit) is not an error: the chunks are
    // claimed dynamically, so the threads running (at least this one) take them all. Letting the
    // std::system_error escape destroyed `pool` with running threads in it: std::terminate.
    try {
      pool.emplace_back([&worker] {
        t_pool_thread = true;
        const IeeeFloats ieee;
        worker(false);
      });
    } catch (const std::system_error&) {
      break;
    }
  }
  worker(true);
  for (auto& th : pool) th.join();
  if (err) std::rethrow_exception(err);
}

std::vector<std::pair<std::string, RegisterFn>>& registry() {
  static std::vector<std::pair<std::string, RegisterFn>> r;
  return r;
}

}  // namespace dsf

// The build stamp: setup.py passes -DDSF_SOURCE_HASH=<sha256 hex of csrc/*.cpp and csrc/*.h> (a bare token,
// made a string here); a build without it says "unknown".
#define DSF_STRINGIFY_(x) #x
#define DSF_STRINGIFY(x) DSF_STRINGIFY_(x)
#ifdef DSF_SOURCE_HASH
#define DSF_SOURCE_HASH_STR DSF_STRINGIFY(DSF_SOURCE_HASH)
#else
#define DSF_SOURCE_HASH_STR "unknown"
#endif

PYBIND11_MODULE(_native, m) {
  m.doc() = "deepssim_fast native core: CPU SSIM, chunked cosine top-k with fused histogram.";
  m.attr("source_hash") = std::string(DSF_SOURCE_HASH_STR);
  m.def("simd_level", []() { return std::string(dsf::simd_name(dsf::active_simd())); },
        "SIMD level the kernels use now: 'avx512', 'avx2' or 'scalar' (avx512: kernels that have an AVX-512\n"
        "variant use it, the others their AVX2 one).");
  m.def("detected_simd_level", []() { return std::string(dsf::simd_name(dsf::detected_simd())); },
        "Best SIMD level this CPU supports.");
  m.def(
      "set_simd_level",
      [](const std::string& level) {
        const int cap = level == "auto" ? -1 : dsf::parse_simd(level);
        if (cap < 0 && level != "auto")
          throw py::value_error("set_simd_level: expected 'auto', 'scalar', 'avx2' or 'avx512', got '" + level +
                                "'");
        dsf::g_simd_cap.store(cap);
      },
      py::arg("level"),
      "Cap the SIMD level ('scalar' forces the portable path; 'auto' restores detection). "
      "A level above what the CPU supports is lowered to it.");
  m.def(
      "simd_cap",
      []() {
        const int cap = dsf::g_simd_cap.load();
        return std::string(cap < 0 ? "auto" : dsf::simd_name(static_cast<dsf::Simd>(cap)));
      },
      "The cap set_simd_level set ('auto': none; DEEPSSIM_FAST_SIMD or the detected level decides), to pass on\n"
      "to another process or restore later.");
  m.def("ieee_floats_enter", &dsf::ieee_floats_enter,
        "Clear flush-to-zero and denormals-are-zero (MXCSR) on the calling thread; returns the mode to give back\n"
        "to ieee_floats_exit (-1 where there is no such mode). For the Python-side parts of a call (numpy and\n"
        "torch on the calling thread), as the native loops do for theirs (IeeeFloats).");
  m.def("ieee_floats_exit", &dsf::ieee_floats_exit, py::arg("saved"),
        "Give back the floating-point mode ieee_floats_enter returned.");
  m.def("num_threads", &dsf::num_threads, "Worker threads used by native loops.");
  m.def("threads_from_env", &dsf::parse_threads_env,
        "DEEPSSIM_FAST_NUM_THREADS as the native loops read it (0: unset, empty or not a thread count).");
  m.def("num_threads_override", []() { return dsf::g_threads.load(); },
        "The count set_num_threads set (0: none, the environment or the usable cores decide), to restore later.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 0) throw py::value_error("set_num_threads: n must be >= 0 (0 = automatic)");
        dsf::g_threads.store(n);
      },
      py::arg("n"), "Set the worker thread count (0 = DEEPSSIM_FAST_NUM_THREADS or all cores).");
  py::list caps;
  for (auto& [name, fn] : dsf::registry()) {
    fn(m);
    caps.append(name);
  }
  m.attr("capabilities") = caps;
}
