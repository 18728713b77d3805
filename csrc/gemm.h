// The matrix products of every path. On the CPU, float32/float64 products go to the BLAS library
// chosen for their dtype and class among those loaded at run time (gemm.cpp; OpenBLAS, MKL or BLIS,
// found, measured and chosen by hessext/_blas.py); everything else (no library chosen, CUDA tensors,
// other dtypes, empty shapes) is ATen's at::mm / at::addmm, so the results are the same products
// either way.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace hessext {

// A strided matrix in memory that the caller owns: element (r, c) at p[r * rs + c * cs]. The CPU
// recurrences pass their operands so (a transpose or a column block is a new Mat, not an ATen view:
// each view is a dispatched op and a TensorImpl, about 0.2 us, and one HVP of three layers made
// some 140 of them).
template <typename T>
struct Mat {
  T* p;
  int64_t rows, cols, rs, cs;
  Mat t() const { return {p, cols, rows, cs, rs}; }
  operator Mat<const T>() const { return {p, rows, cols, rs, cs}; }  // NOLINT(google-explicit-constructor)
};
// A row-major [rows, cols] block with row stride ld (default: cols).
template <typename T>
Mat<T> rows_of(T* p, int64_t rows, int64_t cols, int64_t ld = -1) {
  return {p, rows, cols, ld < 0 ? cols : ld, 1};
}

// C = alpha A B + beta C (beta 0: C's contents are ignored) for CPU float/double Mats, C row-major
// (unit column stride): the loaded BLAS where both operands are in a layout it reads, else ATen.
template <typename T>
void gemm(const Mat<const T>& A, const Mat<const T>& B, const Mat<T>& C, T alpha, T beta);

// A [m, k] times B [k, n] into a new [m, n] tensor.
at::Tensor mm(const at::Tensor& A, const at::Tensor& B);
// C = alpha (bias + A B) into a given [m, n] tensor; bias broadcasts to [m, n] (a bias row [n], or a full
// [m, n] tensor).
void addmm_into(const at::Tensor& C, const at::Tensor& bias, const at::Tensor& A, const at::Tensor& B,
                double alpha = 1.0);
// C += A B in place; C may be a view.
void addmm_(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B);
// C = alpha A B into a given [m, n] tensor (a Workspace's, say); C may be a view.
void mm_into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double alpha = 1.0);

// Products whose middle dimension (of m, k, n) is at most this are narrow (class 0), the others wide
// (class 1): the shapes where libraries' small-matrix paths and their packed kernels differ most.
constexpr int64_t kNarrowWidth = 128;
int product_class(int64_t m, int64_t k, int64_t n);

// Load a BLAS from a shared library path: a 64-bit-integer CBLAS (OpenBLAS with the scipy-openblas64
// or ILP64 names, MKL's `_64` names) or BLIS's typed API. Returns (its index, "") or (-1, why not).
// A library stays loaded; loading the same path again returns its index.
std::pair<int64_t, std::string> blas_load(const std::string& path);
// The loaded libraries' names ("OpenBLAS <version>, <core> kernels", "MKL <version>", "BLIS <version>,
// <arch> kernels"), by index.
std::vector<std::string> blas_names();
// Which library serves float64 (is_double) or float32 products of a class: a loaded library's index, or
// -1 for ATen (the default). Returns the old choice.
int64_t blas_choose(bool is_double, int product_class, int64_t index);
// Whether products go to OpenBLAS's small-matrix path in row pieces (gemm.cpp, on by default; off:
// each product whole, for the measurement that made the choice); returns the old setting.
bool set_row_pieces(bool on);
// Whether products are cut so now (a chosen library has the small-matrix path and the setting is on).
bool row_pieces_on();

}  // namespace hessext
