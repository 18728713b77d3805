// The matrix products of every path. On the CPU, float32/float64 products go to an OpenBLAS loaded at
// run time (gemm.cpp: numpy's own scipy-openblas64, found by hessext/_blas.py), which on this
// project's machines runs 1.1-1.7x faster than ATen's MKL for the shapes of an MLP; everything else
// (no BLAS loaded, CUDA tensors, other dtypes, empty shapes)
// is ATen's at::mm / at::addmm, so the results are the same products either way.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace hx {

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

// Load an OpenBLAS (64-bit integers, scipy-openblas symbol names) from a shared library path; an
// empty path unloads it. Returns "" on success, else why not (the products then stay ATen's).
std::string blas_load(const std::string& path);
// What the CPU products run on: "OpenBLAS <its config>" or "ATen".
std::string blas_name();
// Whether products go to OpenBLAS's small-matrix path in row pieces (gemm.cpp, on by default; off:
// each product whole, for the measurement that made the choice); returns the old setting.
bool set_row_pieces(bool on);
// Whether products are cut so now (the loaded BLAS has the small-matrix path and the setting is on).
bool row_pieces_on();

}  // namespace hx
