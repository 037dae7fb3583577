// Shared helpers for the deepssim_fast._native extension: CPU feature dispatch, a tiny
// thread-parallel loop, and the registration hook each capability file uses.
//
// Conventions
// - Translation units are compiled for the portable x86-64 baseline. Hot loops that want AVX2/FMA
//   are written once as an inline template and instantiated twice: plainly and inside a function
//   marked DSF_TARGET_AVX2; `simd_level()` picks one at run time.
// - Parallel loops use std::thread (no OpenMP runtime to clash with torch's or numpy's).
// - Callers release the GIL (py::gil_scoped_release) around every loop that does real work.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace dsf {

#if defined(__x86_64__) || defined(_M_X64)
#define DSF_X86 1
#define DSF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DSF_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512dq,avx512vl,avx512bw")))
#else
#define DSF_X86 0
#define DSF_TARGET_AVX2
#define DSF_TARGET_AVX512
#endif

// AVX512 implies AVX2: code paths without an AVX-512 variant run their AVX2 one (test `level >= AVX2`).
enum class Simd : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// What the CPU supports.
Simd detected_simd();
// What the kernels use now: the detected level unless lowered by set_simd()/DEEPSSIM_FAST_SIMD.
Simd active_simd();
const char* simd_name(Simd s);

// Number of worker threads: set_num_threads' n if > 0, else DEEPSSIM_FAST_NUM_THREADS if a positive integer
// (a value that is not a thread count is reported on stderr once), else std::thread::hardware_concurrency().
int num_threads();

// IEEE subnormals in every native computation, whatever the calling thread's floating-point mode: with
// flush-to-zero / denormals-are-zero set (torch.set_flush_denormal(True), some libraries), a score of 1e-40
// became 0 and changed its class at a threshold of 0. Clears MXCSR's FTZ and DAZ bits for its scope and
// restores the caller's mode after; parallel_for sets it in each of its threads, and the entry points around
// their work on the calling thread.
// ieee_floats_enter() clears the two bits on this thread and returns the mode to give back to
// ieee_floats_exit() (-1 where there is no such mode); IeeeFloats does both around a scope.
inline int64_t ieee_floats_enter() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  const unsigned int saved = __builtin_ia32_stmxcsr();
  __builtin_ia32_ldmxcsr(saved & ~0x8040u);  // FTZ (bit 15) and DAZ (bit 6)
  return static_cast<int64_t>(saved);
#else
  return -1;
#endif
}

inline void ieee_floats_exit(int64_t saved) {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  if (saved >= 0) __builtin_ia32_ldmxcsr(static_cast<unsigned int>(saved));
#else
  (void)saved;
#endif
}

struct IeeeFloats {
  const int64_t saved = ieee_floats_enter();
  IeeeFloats() = default;
  ~IeeeFloats() { ieee_floats_exit(saved); }
  IeeeFloats(const IeeeFloats&) = delete;
  IeeeFloats& operator=(const IeeeFloats&) = delete;
};

// How parallel_for runs when it has one thread: chunk by chunk (`Chunks`, the default: a pending signal is
// seen between chunks), or as one call fn(0, n) (`Whole`: for loops whose result depends on how [0, n) is
// split, e.g. one partial sum per chunk, so that one thread always gives the same value).
enum class Serial { Chunks, Whole };

// Run fn(begin, end) over [0, n) split into chunks of `grain`, claimed dynamically by up to
// num_threads() threads (the calling thread included). Exceptions are rethrown in the caller.
// Interruptible: between chunks (and at interruption_point()) the calling thread checks for Python signals (at most every ~100 ms; it
// takes the GIL for it, so callers must have released it, as they do around every loop). A handler that
// raises (Ctrl-C: KeyboardInterrupt) stops the loop: the other threads finish their current chunk, and the
// exception propagates as py::error_already_set, so Ctrl-C stops a long native call within a chunk's time.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn,
                  int max_threads = 0, Serial serial = Serial::Chunks);

// For the body of a parallel_for whose chunks can run long: a point where the loop may stop early. On the
// calling thread it polls for signals as between chunks (throwing what a handler raises); on the other
// threads it throws once the loop has failed, so they stop without finishing their chunk. Cheap (a clock
// read at most). The chunk's partial work is abandoned, as the whole call fails.
void interruption_point();

// Each capability file registers its bindings with a static Registrar; module.cpp calls them all.
using RegisterFn = void (*)(py::module_&);
std::vector<std::pair<std::string, RegisterFn>>& registry();
struct Registrar {
  Registrar(const char* name, RegisterFn fn) { registry().emplace_back(name, fn); }
};

}  // namespace dsf
