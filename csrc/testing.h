// hessext._C's entry points for tests and benchmarks (testing.cpp).
#pragma once
#include <torch/extension.h>

namespace hessext {

void bind_testing(pybind11::module_& m);

}  // namespace hessext
