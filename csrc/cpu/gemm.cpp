// hx::mm / addmm / addmm_ (gemm.h): CPU float32/float64 products through a run-time loaded OpenBLAS,
// every other product through ATen. The BLAS sees each operand as row-major or transposed row-major
// (a view of the right strides is passed as is, anything else is made contiguous first) and
// writes C in row-major order, so C = alpha A B + beta C is one ?gemm call.
#include "gemm.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "workspace.h"

namespace hx {
namespace {

enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

template <typename T>
using Gemm = void (*)(int, int, int, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*,
                      int64_t);

struct Blas {
  void* handle = nullptr;
  Gemm<double> dgemm = nullptr;
  Gemm<float> sgemm = nullptr;
  bool small_kernels = false;  // see kSmallProduct
  std::string name = "ATen";
};

Blas& blas() {
  static Blas b;
  return b;
}

std::mutex& blas_mutex() {
  static std::mutex m;
  return m;
}

// Whether products may be cut into row pieces (set_row_pieces): a setting of its own, kept whichever
// library blas_load loads.
std::atomic<bool>& row_pieces_setting() {
  static std::atomic<bool> on{true};
  return on;
}

// The first of the scipy-openblas64 / openblas64_ names for a routine that the library exports.
void* symbol(void* handle, const char* base) {
  for (const char* prefix : {"scipy_", ""}) {
    const std::string name = std::string(prefix) + base + "64_";
    if (void* f = dlsym(handle, name.c_str())) return f;
  }
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

// Whether this product goes to the loaded BLAS.
bool use_blas(const at::Tensor& A, const at::Tensor& B) {
  const Blas& b = blas();
  if (!b.handle || !A.device().is_cpu() || A.dim() != 2 || B.dim() != 2 || A.scalar_type() != B.scalar_type() ||
      !B.device().is_cpu())
    return false;
  if (A.scalar_type() == at::kDouble ? !b.dgemm : (A.scalar_type() != at::kFloat || !b.sgemm)) return false;
  return A.size(0) > 0 && A.size(1) > 0 && B.size(1) > 0;
}

// Products of at least this many multiply-adds are split over torch's threads.
constexpr int64_t kParallelWork = 1 << 16;

template <typename T>
Gemm<T> blas_gemm() {
  if constexpr (std::is_same_v<T, double>)
    return blas().dgemm;
  else
    return blas().sgemm;
}

// OpenBLAS's SkylakeX kernels (shared by its Cooperlake and SapphireRapids targets) serve a product of
// m n k <= 10^6 multiply-adds with B read as stored (not transposed) on their small-matrix path,
// which skips the packing of A and B. On this project's AVX-512 CPU that path runs 1.2-2x faster
// (measured single-threaded, float64, GFLOP/s: [244,64,64] 129 against [245,64,64] 83 on the packed
// path; [400,50,50] 120 against 72; [2000,50,10] 77 against 37; float32 [244,64,64] 254 against 209),
// and a transposed B gains nothing (83, 72, 37 at the same sizes). So a larger product is cut into row
// pieces under the limit, each one ?gemm, as long as a piece keeps kMinPieceRows rows (n k <= 62500:
// the widths of an MLP up to 250), and a transposed B is first copied into row-major order where m is
// at least kMinCopyRows (the copy of n k elements costs about 16 rows' worth of the rate gained; measured
// [16,250,250]: 33 us as is, 38 with the copy; [32,64,64] 5.0 and 4.4; [128,64,64] 14.0 and 10.5).
constexpr int64_t kSmallProduct = 1000000;
constexpr int64_t kMinPieceRows = 16;
constexpr int64_t kMinCopyRows = 32;

// Whether an [m, k] x [k, n] product (or its row pieces) can take the small-matrix path.
bool small_path(int64_t n, int64_t k) { return row_pieces_on() && n * k * kMinPieceRows <= kSmallProduct; }

// How many row pieces the loaded BLAS should see for an [m, k] x [k, n] product (1: the product whole).
int64_t piece_count(int64_t m, int64_t n, int64_t k) {
  if (m * n * k <= kSmallProduct || !small_path(n, k)) return 1;
  return (m * n * k + kSmallProduct - 1) / kSmallProduct;
}

// C [m, n] = alpha A B + beta C as row pieces (piece_count), every operand at its BLAS layout.
template <typename T>
void gemm_rows(int ta, int tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const Gemm<T> f = blas_gemm<T>();
  const int64_t pieces = piece_count(m, n, k);
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t lo = m * p / pieces, hi = m * (p + 1) / pieces;
    f(kRowMajor, ta, tb, hi - lo, n, k, alpha, a + (ta == kNoTrans ? lo * lda : lo), lda, b, ldb, beta, c + lo * ldc,
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

// OpenBLAS runs single-threaded, in the calling thread: its own worker threads would spin beside
// torch's OpenMP workers on the same cores (measured 10-50x slower on 2 cores). Instead the longer of
// C's two sides is cut into one block per torch thread (at::parallel_for), each block one ?gemm;
// inside a parallel region (a kernel already split over threads) the product is one ?gemm.
template <typename T>
void gemm_blas(const Mat<const T>& A, const Mat<const T>& B, const Mat<T>& C, T alpha, T beta) {
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
  if (tb == kTrans && (rows ? m / parts : m) >= kMinCopyRows && small_path(rows ? n : n / parts, k))
    bp = transposed_copy(bp, ldb, k, n), tb = kNoTrans, ldb = std::max<int64_t>(n, 1);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t len = rows ? m : n, lo = len * p / parts, hi = len * (p + 1) / parts;
      if (hi == lo) continue;
      if (rows)  // rows lo..hi of A and C
        gemm_rows<T>(ta, tb, hi - lo, n, k, alpha, a + (ta == kNoTrans ? lo * lda : lo), lda, bp, ldb, beta,
                     c + lo * ldc, ldc);
      else  // columns lo..hi of B and C
        gemm_rows<T>(ta, tb, m, hi - lo, k, alpha, a, lda, bp + (tb == kNoTrans ? lo : lo * ldb), ldb, beta, c + lo,
                     ldc);
    }
  });
}

// C (row-major, unit column stride) = alpha A B + beta C; an operand BLAS cannot read in place is
// made contiguous first.
void blas_into(const at::Tensor& A_, const at::Tensor& B_, const at::Tensor& C, double beta, double alpha = 1.0) {
  const at::Tensor A = layout(A_).first ? A_ : A_.contiguous(), B = layout(B_).first ? B_ : B_.contiguous();
  if (A.scalar_type() == at::kDouble)
    gemm_blas<double>(mat<double>(A), mat<double>(B), mat<double>(C), alpha, beta);
  else
    gemm_blas<float>(mat<float>(A), mat<float>(B), mat<float>(C), static_cast<float>(alpha), static_cast<float>(beta));
}

bool row_major(const at::Tensor& C) {
  return (C.size(1) == 1 || C.stride(1) == 1) && (C.size(0) == 1 || C.stride(0) >= std::max<int64_t>(C.size(1), 1));
}

}  // namespace

at::Tensor mm(const at::Tensor& A, const at::Tensor& B) {
  if (!use_blas(A, B)) return at::mm(A, B);
  TORCH_CHECK(A.size(1) == B.size(0), "hx::mm: shapes ", A.sizes(), " and ", B.sizes(), " do not chain");
  at::Tensor C = empty_output({A.size(0), B.size(1)}, A.options());
  blas_into(A, B, C, 0.0);
  return C;
}

namespace {
// C = alpha A B + beta C, C given (beta 0: C's contents are ignored).
void into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double beta, double alpha) {
  if (!use_blas(A, B) || C.scalar_type() != A.scalar_type() || !C.device().is_cpu() || C.dim() != 2 || !row_major(C)) {
    C.addmm_(A, B, beta, alpha);
    return;
  }
  TORCH_CHECK(A.size(1) == B.size(0) && C.size(0) == A.size(0) && C.size(1) == B.size(1), "hx: product shapes ",
              C.sizes(), ", ", A.sizes(), " and ", B.sizes(), " do not match");
  blas_into(A, B, C, beta, alpha);
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
              "hx::gemm: shapes [", C.rows, ", ", C.cols, "], [", A.rows, ", ", A.cols, "] and [", B.rows, ", ", B.cols,
              "] do not match, or C is not row-major");
  if (C.rows == 0 || C.cols == 0) return;
  if (blas_gemm<T>() && A.cols > 0 && layout(A).first && layout(B).first && layout(C).first == kNoTrans) {
    gemm_blas<T>(A, B, C, alpha, beta);
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

std::string blas_load(const std::string& path) {
  std::lock_guard<std::mutex> guard(blas_mutex());
  Blas& b = blas();
  b = Blas{};
  if (path.empty()) return "";
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) return std::string("dlopen failed: ") + dlerror();
  Blas loaded;
  loaded.handle = handle;
  loaded.dgemm = reinterpret_cast<Gemm<double>>(symbol(handle, "cblas_dgemm"));
  loaded.sgemm = reinterpret_cast<Gemm<float>>(symbol(handle, "cblas_sgemm"));
  auto set_threads = reinterpret_cast<void (*)(int)>(symbol(handle, "openblas_set_num_threads"));
  auto config = reinterpret_cast<const char* (*)()>(symbol(handle, "openblas_get_config"));
  auto core = reinterpret_cast<const char* (*)()>(symbol(handle, "openblas_get_corename"));
  if (!loaded.dgemm || !loaded.sgemm || !set_threads || !config || !core) {
    dlclose(handle);
    return "no 64-bit-integer OpenBLAS cblas_dgemm/cblas_sgemm/openblas_set_num_threads in " + path;
  }
  set_threads(1);  // see gemm(): the threads are torch's
  const std::string core_name = core();
  for (const char* target : {"SkylakeX", "Cooperlake", "SapphireRapids"})
    loaded.small_kernels = loaded.small_kernels || core_name == target;
  loaded.name = "OpenBLAS, " + core_name + " kernels (" + config() + ")";
  b = loaded;
  return "";
}

std::string blas_name() { return blas().name; }

bool row_pieces_on() { return blas().small_kernels && row_pieces_setting(); }

bool set_row_pieces(bool on) { return row_pieces_setting().exchange(on); }

}  // namespace hx
