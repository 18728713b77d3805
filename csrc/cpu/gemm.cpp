// hessext::mm / addmm / addmm_ (gemm.h): CPU float32/float64 products through BLAS libraries loaded at run
// time, every other product through ATen. Each loaded library is called through one of two
// interfaces: CBLAS with 64-bit integers (OpenBLAS's scipy-openblas64 names, MKL's `_64` names) or
// BLIS's typed API (general strides). The BLAS sees each operand as row-major or transposed row-major
// (a view of the right strides is passed as is, anything else is made contiguous first) and writes C
// in row-major order, so C = alpha A B + beta C is one ?gemm call. Which library serves a product is
// chosen per dtype and product class (narrow or wide, product_class) by hessext/_blas.py from
// measured rates.
#include "gemm.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "workspace.h"

namespace hessext {
namespace {

enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

template <typename T>
using Cblas = void (*)(int, int, int, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*,
                       int64_t);
// bli_?gemm(transa, transb, m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc), no transposes
template <typename T>
using Typed = void (*)(int, int, int64_t, int64_t, int64_t, const T*, const T*, int64_t, int64_t, const T*, int64_t,
                       int64_t, const T*, T*, int64_t, int64_t);

struct Library {
  std::string path, name;
  Cblas<double> dgemm = nullptr;
  Cblas<float> sgemm = nullptr;
  Typed<double> bli_dgemm = nullptr;
  Typed<float> bli_sgemm = nullptr;
  bool small_kernels = false;  // see kSmallProduct

  // C [m, n] (row-major, ldc) = alpha op(A) op(B) + beta C, each operand row-major (kNoTrans) or
  // transposed row-major (kTrans) with its leading dimension, as CBLAS takes them.
  template <typename T>
  void gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
            T beta, T* c, int64_t ldc) const {
    Cblas<T> cblas;
    Typed<T> typed;
    if constexpr (std::is_same_v<T, double>)
      cblas = dgemm, typed = bli_dgemm;
    else
      cblas = sgemm, typed = bli_sgemm;
    if (cblas) return cblas(kRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    typed(0, 0, m, n, k, &alpha, a, ta == kNoTrans ? lda : 1, ta == kNoTrans ? 1 : lda, b, tb == kNoTrans ? ldb : 1,
          tb == kNoTrans ? 1 : ldb, &beta, c, ldc, 1);
  }
};

// Every library loaded so far (a library stays loaded: products may be running in it), and which one
// serves each (dtype, product class): an index into the list, -1 for ATen.
constexpr size_t kMaxLibraries = 8;
struct Libraries {
  std::vector<Library> list;
  std::array<std::atomic<int>, 4> chosen;  // [float64 narrow, float64 wide, float32 narrow, float32 wide]
  Libraries() {
    list.reserve(kMaxLibraries);  // never reallocated: readers hold no lock
    for (auto& c : chosen) c = -1;
  }
};

Libraries& libraries() {
  static Libraries l;
  return l;
}

std::mutex& load_mutex() {
  static std::mutex m;
  return m;
}

int slot(bool is_double, int product_class) { return (is_double ? 0 : 2) + product_class; }

// The library chosen for T and this product's class, or nullptr for ATen.
template <typename T>
const Library* chosen(int64_t m, int64_t n, int64_t k) {
  const int i = libraries().chosen[slot(std::is_same_v<T, double>, product_class(m, k, n))];
  return i < 0 ? nullptr : &libraries().list[i];
}

// Whether products may be cut into row pieces (set_row_pieces): a setting of its own, kept whichever
// library serves.
std::atomic<bool>& row_pieces_setting() {
  static std::atomic<bool> on{true};
  return on;
}

// The first of a CBLAS routine's 64-bit-integer names (scipy-openblas64's, OpenBLAS's ILP64 build's,
// MKL's ILP64 ones) that the library exports.
void* symbol(void* handle, const std::string& base) {
  for (const std::string& name : {"scipy_" + base + "64_", base + "64_", base + "_64"})
    if (void* f = dlsym(handle, name.c_str())) return f;
  return nullptr;
}

// How BLAS reads an [r, c] matrix of strides (s0, s1) in place: (transpose flag, leading dimension,
// at least 1), or {0, 0} when it cannot.
std::pair<int, int64_t> layout(int64_t r, int64_t c, int64_t s0, int64_t s1) {
  if ((c == 1 || s1 == 1) && (r == 1 || s0 >= std::max<int64_t>(c, 1)))
    return {kNoTrans, std::max<int64_t>(r == 1 ? c : s0, 1)};
  if ((r == 1 || s0 == 1) && (c == 1 || s1 >= std::max<int64_t>(r, 1)))
    return {kTrans, std::max<int64_t>(c == 1 ? r : s1, 1)};
  return {0, 0};
}
template <typename T>
std::pair<int, int64_t> layout(const Mat<T>& A) {
  return layout(A.rows, A.cols, A.rs, A.cs);
}
std::pair<int, int64_t> layout(const at::Tensor& A) { return layout(A.size(0), A.size(1), A.stride(0), A.stride(1)); }

template <typename T>
Mat<T> mat(const at::Tensor& X) {
  return {X.data_ptr<T>(), X.size(0), X.size(1), X.stride(0), X.stride(1)};
}

// The library that serves an [m, k] x [k, n] product of A and B's dtype, or nullptr for ATen (other
// devices and dtypes, empty products, ATen chosen for this class).
const Library* library_for(const at::Tensor& A, const at::Tensor& B) {
  if (!A.device().is_cpu() || A.dim() != 2 || B.dim() != 2 || A.scalar_type() != B.scalar_type() ||
      !B.device().is_cpu() || A.size(0) == 0 || A.size(1) == 0 || B.size(1) == 0)
    return nullptr;
  if (A.scalar_type() == at::kDouble) return chosen<double>(A.size(0), B.size(1), A.size(1));
  if (A.scalar_type() == at::kFloat) return chosen<float>(A.size(0), B.size(1), A.size(1));
  return nullptr;
}

// Products of at least this many multiply-adds are split over torch's threads.
constexpr int64_t kParallelWork = 1 << 16;

// OpenBLAS's SkylakeX kernels (shared by its Cooperlake and SapphireRapids targets) serve a product of
// m n k <= 10^6 multiply-adds with B read as stored (not transposed) on their small-matrix path,
// which skips the packing of A and B and runs 1.2-2x faster than the packed path for the MLP shapes,
// while a transposed B gains nothing. So a larger product is cut into row
// pieces under the limit, each one ?gemm, as long as a piece keeps kMinPieceRows rows (n k <= 62500:
// the widths of an MLP up to 250), and a transposed B is first copied into row-major order where m is
// at least kMinCopyRows (the copy of n k elements costs about 16 rows' worth of the rate gained).
constexpr int64_t kSmallProduct = 1000000;
constexpr int64_t kMinPieceRows = 16;
constexpr int64_t kMinCopyRows = 32;

// Whether an [m, k] x [k, n] product (or its row pieces) can take lib's small-matrix path.
bool small_path(const Library& lib, int64_t n, int64_t k) {
  return lib.small_kernels && row_pieces_setting() && n * k * kMinPieceRows <= kSmallProduct;
}

// How many row pieces lib should see for an [m, k] x [k, n] product (1: the product whole).
int64_t piece_count(const Library& lib, int64_t m, int64_t n, int64_t k) {
  if (m * n * k <= kSmallProduct || !small_path(lib, n, k)) return 1;
  return (m * n * k + kSmallProduct - 1) / kSmallProduct;
}

// C [m, n] = alpha A B + beta C as row pieces (piece_count), every operand at its BLAS layout.
template <typename T>
void gemm_rows(const Library& lib, int ta, int tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const int64_t pieces = piece_count(lib, m, n, k);
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t lo = m * p / pieces, hi = m * (p + 1) / pieces;
    lib.gemm<T>(ta, tb, hi - lo, n, k, alpha, a + (ta == kNoTrans ? lo * lda : lo), lda, b, ldb, beta, c + lo * ldc,
                ldc);
  }
}

// B [k, n] stored transposed (ld ldb) -> row-major into this thread's buffer (kept across calls: a
// fresh one of this size would be mapped and faulted in on every call); returns its data.
template <typename T>
const T* transposed_copy(const T* b, int64_t ldb, int64_t k, int64_t n) {
  constexpr int64_t tile = 16;  // tile by tile, so that neither side strides through the cache
  thread_local std::vector<T> buf;
  if (buf.size() < static_cast<size_t>(k * n)) buf.resize(static_cast<size_t>(k * n));
  for (int64_t j0 = 0; j0 < n; j0 += tile)
    for (int64_t i0 = 0; i0 < k; i0 += tile)
      for (int64_t i = i0; i < std::min(k, i0 + tile); ++i)
        for (int64_t j = j0; j < std::min(n, j0 + tile); ++j) buf[i * n + j] = b[j * ldb + i];
  return buf.data();
}

// The library runs single-threaded, in the calling thread: its own worker threads would spin beside
// torch's OpenMP workers on the same cores (measured 10-50x slower on 2 cores). Instead the longer of
// C's two sides is cut into one block per torch thread (at::parallel_for), each block one ?gemm;
// inside a parallel region (a kernel already split over threads) the product is one ?gemm.
template <typename T>
void gemm_blas(const Library& lib, const Mat<const T>& A, const Mat<const T>& B, const Mat<T>& C, T alpha, T beta) {
  const auto [ta, lda] = layout(A);
  auto [tb, ldb] = layout(B);
  const int64_t m = A.rows, k = A.cols, n = B.cols, ldc = C.rows == 1 ? std::max<int64_t>(C.cols, 1) : C.rs;
  const T* a = A.p;
  const T* bp = B.p;
  T* c = C.p;
  const int64_t parts = m * n * k >= kParallelWork && !at::in_parallel_region()
                            ? std::min<int64_t>(at::get_num_threads(), std::max(m, n))
                            : 1;
  const bool rows = m >= n;
  if (tb == kTrans && (rows ? m / parts : m) >= kMinCopyRows && small_path(lib, rows ? n : n / parts, k))
    bp = transposed_copy(bp, ldb, k, n), tb = kNoTrans, ldb = std::max<int64_t>(n, 1);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t len = rows ? m : n, lo = len * p / parts, hi = len * (p + 1) / parts;
      if (hi == lo) continue;
      if (rows)  // rows lo..hi of A and C
        gemm_rows<T>(lib, ta, tb, hi - lo, n, k, alpha, a + (ta == kNoTrans ? lo * lda : lo), lda, bp, ldb, beta,
                     c + lo * ldc, ldc);
      else  // columns lo..hi of B and C
        gemm_rows<T>(lib, ta, tb, m, hi - lo, k, alpha, a, lda, bp + (tb == kNoTrans ? lo : lo * ldb), ldb, beta,
                     c + lo, ldc);
    }
  });
}

// C (row-major, unit column stride) = alpha A B + beta C; an operand BLAS cannot read in place is
// made contiguous first.
void blas_into(const Library& lib, const at::Tensor& A_, const at::Tensor& B_, const at::Tensor& C, double beta,
               double alpha = 1.0) {
  const at::Tensor A = layout(A_).first ? A_ : A_.contiguous(), B = layout(B_).first ? B_ : B_.contiguous();
  if (A.scalar_type() == at::kDouble)
    gemm_blas<double>(lib, mat<double>(A), mat<double>(B), mat<double>(C), alpha, beta);
  else
    gemm_blas<float>(lib, mat<float>(A), mat<float>(B), mat<float>(C), static_cast<float>(alpha),
                     static_cast<float>(beta));
}

bool row_major(const at::Tensor& C) {
  return (C.size(1) == 1 || C.stride(1) == 1) && (C.size(0) == 1 || C.stride(0) >= std::max<int64_t>(C.size(1), 1));
}

// A loaded library's routines and name, or why it cannot serve.
std::string open_library(const std::string& path, Library& lib) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) return std::string("dlopen failed: ") + dlerror();
  lib.path = path;
  lib.dgemm = reinterpret_cast<Cblas<double>>(symbol(handle, "cblas_dgemm"));
  lib.sgemm = reinterpret_cast<Cblas<float>>(symbol(handle, "cblas_sgemm"));
  const auto fn = [&](const char* name) { return dlsym(handle, name); };
  if (lib.dgemm && lib.sgemm) {
    if (auto set_threads = reinterpret_cast<void (*)(int)>(symbol(handle, "openblas_set_num_threads"))) {
      auto config = reinterpret_cast<const char* (*)()>(symbol(handle, "openblas_get_config"));
      auto core = reinterpret_cast<const char* (*)()>(symbol(handle, "openblas_get_corename"));
      if (!config || !core) return "no openblas_get_config/openblas_get_corename in " + path;
      set_threads(1);  // see gemm_blas(): the threads are torch's
      const std::string core_name = core();
      for (const char* target : {"SkylakeX", "Cooperlake", "SapphireRapids"})
        lib.small_kernels = lib.small_kernels || core_name == target;
      const std::string text(config());  // "OpenBLAS 0.3.34.481.3  USE64BITINT DYNAMIC_ARCH ..."
      lib.name = text.substr(0, text.find(' ', text.find(' ') + 1)) + ", " + core_name + " kernels";
      return "";
    }
    auto layer = reinterpret_cast<int (*)(int)>(fn("MKL_Set_Threading_Layer"));
    auto version = reinterpret_cast<void (*)(char*, int)>(fn("MKL_Get_Version_String"));
    if (!layer || !version) return "a CBLAS that is neither OpenBLAS nor MKL in " + path;
    layer(1);  // MKL_THREADING_SEQUENTIAL: see gemm_blas()
    char buf[256] = {0};
    version(buf, sizeof(buf) - 1);
    const std::string text(buf);  // "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build ..."
    const size_t at = text.find("Version ");
    lib.name = at == std::string::npos ? text : "MKL " + text.substr(at + 8, text.find('-', at) - at - 8);
    return "";
  }
  lib.dgemm = nullptr, lib.sgemm = nullptr;
  lib.bli_dgemm = reinterpret_cast<Typed<double>>(fn("bli_dgemm"));
  lib.bli_sgemm = reinterpret_cast<Typed<float>>(fn("bli_sgemm"));
  auto init = reinterpret_cast<void (*)()>(fn("bli_init"));
  auto set_threads = reinterpret_cast<void (*)(int64_t)>(fn("bli_thread_set_num_threads"));
  auto version = reinterpret_cast<const char* (*)()>(fn("bli_info_get_version_str"));
  auto arch_id = reinterpret_cast<int (*)()>(fn("bli_arch_query_id"));
  auto arch = reinterpret_cast<const char* (*)(int)>(fn("bli_arch_string"));
  if (!lib.bli_dgemm || !lib.bli_sgemm || !init || !set_threads || !version || !arch_id || !arch)
    return "neither a 64-bit-integer CBLAS (cblas_dgemm64_, cblas_dgemm_64) nor BLIS (bli_dgemm) in " + path;
  init();
  set_threads(1);
  lib.name = std::string("BLIS ") + version() + ", " + arch(arch_id()) + " kernels";
  return "";
}

}  // namespace

int product_class(int64_t m, int64_t k, int64_t n) {
  const int64_t middle = std::max(std::min(m, k), std::min(std::max(m, k), n));
  return middle > kNarrowWidth ? 1 : 0;
}

at::Tensor mm(const at::Tensor& A, const at::Tensor& B) {
  const Library* lib = library_for(A, B);
  if (!lib) return at::mm(A, B);
  TORCH_CHECK(A.size(1) == B.size(0), "hessext::mm: shapes ", A.sizes(), " and ", B.sizes(), " do not chain");
  at::Tensor C = empty_output({A.size(0), B.size(1)}, A.options());
  blas_into(*lib, A, B, C, 0.0);
  return C;
}

namespace {
// C = alpha A B + beta C, C given (beta 0: C's contents are ignored).
void into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double beta, double alpha) {
  const Library* lib = library_for(A, B);
  if (!lib || C.scalar_type() != A.scalar_type() || !C.device().is_cpu() || C.dim() != 2 || !row_major(C)) {
    C.addmm_(A, B, beta, alpha);
    return;
  }
  TORCH_CHECK(A.size(1) == B.size(0) && C.size(0) == A.size(0) && C.size(1) == B.size(1), "hessext: product shapes ",
              C.sizes(), ", ", A.sizes(), " and ", B.sizes(), " do not match");
  blas_into(*lib, A, B, C, beta, alpha);
}
}  // namespace

void addmm_into(const at::Tensor& C, const at::Tensor& bias, const at::Tensor& A, const at::Tensor& B, double alpha) {
  const int64_t m = C.size(0), n = C.size(1);
  if (C.device().is_cpu() && row_major(C) && bias.device().is_cpu() && bias.scalar_type() == C.scalar_type() &&
      bias.numel() == n && bias.is_contiguous()) {  // a bias row: copied into each row of C, no dispatch
    const auto row_bytes = static_cast<size_t>(n) * C.element_size();
    const char* src = static_cast<const char*>(bias.data_ptr());
    char* dst = static_cast<char*>(C.data_ptr());
    for (int64_t r = 0; r < m; ++r) std::memcpy(dst + r * C.stride(0) * C.element_size(), src, row_bytes);
  } else {
    C.copy_(bias.expand({m, n}));
  }
  into(C, A, B, alpha, alpha);
}

void addmm_(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B) { into(C, A, B, 1.0, 1.0); }

void mm_into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double alpha) { into(C, A, B, 0.0, alpha); }

template <typename T>
void gemm(const Mat<const T>& A, const Mat<const T>& B, const Mat<T>& C, T alpha, T beta) {
  TORCH_CHECK(A.cols == B.rows && C.rows == A.rows && C.cols == B.cols && (C.cols == 1 || C.cs == 1),
              "hessext::gemm: shapes [", C.rows, ", ", C.cols, "], [", A.rows, ", ", A.cols, "] and [", B.rows, ", ",
              B.cols, "] do not match, or C is not row-major");
  if (C.rows == 0 || C.cols == 0) return;
  const Library* lib = chosen<T>(A.rows, B.cols, A.cols);
  if (lib && A.cols > 0 && layout(A).first && layout(B).first && layout(C).first == kNoTrans) {
    gemm_blas<T>(*lib, A, B, C, alpha, beta);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto wrap = [&](const auto& X) {
    return at::from_blob(const_cast<T*>(X.p), {X.rows, X.cols}, {X.rs, X.cs}, options);
  };
  wrap(C).addmm_(wrap(A), wrap(B), beta, alpha);
}
template void gemm<float>(const Mat<const float>&, const Mat<const float>&, const Mat<float>&, float, float);
template void gemm<double>(const Mat<const double>&, const Mat<const double>&, const Mat<double>&, double, double);

std::pair<int64_t, std::string> blas_load(const std::string& path) {
  std::lock_guard<std::mutex> guard(load_mutex());
  Libraries& libs = libraries();
  for (size_t i = 0; i < libs.list.size(); ++i)
    if (libs.list[i].path == path) return {static_cast<int64_t>(i), ""};
  if (libs.list.size() == kMaxLibraries) return {-1, "already " + std::to_string(kMaxLibraries) + " libraries loaded"};
  Library lib;
  std::string why = open_library(path, lib);
  if (!why.empty()) return {-1, why};
  libs.list.push_back(lib);
  return {static_cast<int64_t>(libs.list.size()) - 1, ""};
}

std::vector<std::string> blas_names() {
  std::lock_guard<std::mutex> guard(load_mutex());
  std::vector<std::string> names;
  for (const Library& lib : libraries().list) names.push_back(lib.name);
  return names;
}

int64_t blas_choose(bool is_double, int product_class, int64_t index) {
  std::lock_guard<std::mutex> guard(load_mutex());
  TORCH_CHECK_VALUE(product_class == 0 || product_class == 1, "product_class must be 0 (narrow) or 1 (wide), got ",
                    product_class);
  TORCH_CHECK_VALUE(index >= -1 && index < static_cast<int64_t>(libraries().list.size()),
                    "index must be -1 (ATen) or a loaded library's (0..", libraries().list.size(), "), got ", index);
  return libraries().chosen[slot(is_double, product_class)].exchange(static_cast<int>(index));
}

bool row_pieces_on() {
  if (!row_pieces_setting()) return false;
  for (const auto& i : libraries().chosen)
    if (i >= 0 && libraries().list[i].small_kernels) return true;
  return false;
}

bool set_row_pieces(bool on) { return row_pieces_setting().exchange(on); }

}  // namespace hessext
