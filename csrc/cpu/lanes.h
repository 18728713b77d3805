// Sample lanes: W samples side by side in one value, so that fused.h's per-sample recurrences
// (templates on the per-sample type S) run over W samples per instruction, the weights and vectors
// broadcast. Every operation is lane by lane, so each lane computes exactly what the one-sample code
// computes for its sample; only the final sum over samples adds in another order.
//
// The loops over lanes vectorise to the widest registers the function is compiled for. This file is
// built for baseline x86-64 (SSE2), so the kernels that use Lanes are compiled three times, for
// AVX-512, AVX2 with FMA and the baseline, and run_simd() picks the widest the CPU has at run time
// (GCC's __builtin_cpu_supports). W is one register of that instruction set (lanes_of): a Lanes value
// wider than the registers is split by the compiler through the stack, lane by lane (float64 in 8
// lanes under AVX2 ran the [1,16,1] HVP's recurrence 3x slower than in 4).
#pragma once
#include <cstdint>

namespace hessext {

template <typename T, int W>
struct Lanes {
  // A GCC vector of W values: the operators below are single vector operations, so that a Lanes
  // value lives in registers (a plain array of W values is split into W scalars when it is a local
  // accumulator). Aligned as T, so that any T-aligned buffer holds Lanes (unaligned vector
  // loads and stores cost the same as aligned ones on the CPUs with AVX).
  typedef T Vec __attribute__((vector_size(W * sizeof(T)), aligned(alignof(T))));
  Vec v;
  Lanes() = default;
  Lanes(T x) : v(Vec{} + x) {}  // NOLINT(google-explicit-constructor): a scalar is the same value in every lane
  Lanes& operator+=(const Lanes& o) {
    v += o.v;
    return *this;
  }
  T sum() const {
    T acc = v[0];
    for (int j = 1; j < W; ++j) acc += v[j];
    return acc;
  }
};

template <typename T, int W>
inline Lanes<T, W> operator+(Lanes<T, W> x, const Lanes<T, W>& y) {
  return x += y;
}
template <typename T, int W>
inline Lanes<T, W> operator-(const Lanes<T, W>& x, const Lanes<T, W>& y) {
  Lanes<T, W> r;
  r.v = x.v - y.v;
  return r;
}
template <typename T, int W>
inline Lanes<T, W> operator*(const Lanes<T, W>& x, const Lanes<T, W>& y) {
  Lanes<T, W> r;
  r.v = x.v * y.v;
  return r;
}
template <typename T, int W>
inline Lanes<T, W> operator*(T x, const Lanes<T, W>& y) {
  Lanes<T, W> r;
  r.v = x * y.v;
  return r;
}
template <typename T, int W>
inline Lanes<T, W> operator*(const Lanes<T, W>& x, T y) {
  return y * x;
}

// The instruction sets run_simd() chooses between.
enum class Simd { Baseline, AVX2, AVX512 };
constexpr const char* kSimdNames[] = {"baseline", "avx2", "avx512"};

// The lanes of T in one register of an instruction set.
template <typename T>
constexpr int lanes_of(Simd simd) {
  return (simd == Simd::AVX512 ? 64 : simd == Simd::AVX2 ? 32 : 16) / static_cast<int>(sizeof(T));
}

// The widest this CPU has.
inline Simd cpu_simd() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Simd best = __builtin_cpu_supports("avx512f")                                   ? Simd::AVX512
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Simd::AVX2
                                                                                               : Simd::Baseline;
  return best;
#else
  return Simd::Baseline;
#endif
}

// The one run_simd() runs: cpu_simd(), or a narrower one set for tests (hessext._C.simd).
inline Simd& simd_in_use() {
  static Simd chosen = cpu_simd();
  return chosen;
}

// run_simd(job): job() compiled for each instruction set with everything it calls inlined (flatten),
// the variant for this CPU run.
#if defined(__x86_64__) && defined(__GNUC__)
template <class Job>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"),
               flatten)) void run_avx512(const Job& job) {
  job();
}
template <class Job>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const Job& job) {
  job();
}
template <class Job>
__attribute__((flatten)) void run_baseline(const Job& job) {
  job();
}
template <class Job>
void run_simd(const Job& job) {
  switch (simd_in_use()) {
    case Simd::AVX512:
      return run_avx512(job);
    case Simd::AVX2:
      return run_avx2(job);
    default:
      return run_baseline(job);
  }
}
#else
template <class Job>
void run_simd(const Job& job) {
  job();
}
#endif

}  // namespace hessext
