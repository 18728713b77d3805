// The matrix products of every path. On the CPU, float32/float64 products go to an OpenBLAS loaded at
// run time (gemm.cpp: numpy's own scipy-openblas64, found by hessext/_blas.py), which on this
// project's machines runs 1.1-1.7x faster than ATen's MKL for the shapes of an MLP; everything else
// (no BLAS loaded, CUDA tensors, other dtypes, empty shapes)
// is ATen's at::mm / at::addmm, so the results are the same products either way.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace hx {

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
// C[k] = A[k] B[k] + beta C[k] for the K matrices of C [K, m, n] (any strides, a view say), A [K, m, k]
// and B [K, k, n] (an expanded operand's K copies are one matrix): on the CPU one product per k on the
// views as they are, so a strided C or operand (a column block of a wider matrix) needs no copy.
void bmm_into(const at::Tensor& C, const at::Tensor& A, const at::Tensor& B, double beta);

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
