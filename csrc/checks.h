// Argument checks that name the offending argument. A user error is a TORCH_CHECK_* (ValueError or
// TypeError in Python), never an assert or a crash.
#pragma once
#include <ATen/ATen.h>

#define CHECK_FLOATING(x)                                                                              \
  TORCH_CHECK_TYPE(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", \
                   (x).scalar_type())
#define CHECK_SAME_DTYPE(x, ref)                                                                          \
  TORCH_CHECK_TYPE((x).scalar_type() == (ref).scalar_type(), #x " must have dtype ", (ref).scalar_type(), \
                   " (like " #ref "), got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, ref)                                                             \
  TORCH_CHECK_VALUE((x).device() == (ref).device(), #x " must be on device ", (ref).device(), \
                    " (like " #ref "), got ", (x).device())
#define CHECK_DIM(x, d) \
  TORCH_CHECK_VALUE((x).dim() == (d), #x " must have ", (d), " dimensions, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                                \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}),                                         \
                    #x " must have shape [" #__VA_ARGS__ "] = ", at::IntArrayRef({__VA_ARGS__}), ", got ", \
                    (x).sizes())
