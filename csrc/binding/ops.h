// One registration function per op; module.cpp calls them all. Each lives in
// csrc/binding/<op>.cpp next to its checks, beside the op's torch-free
// kernels in csrc/<op>.cu.
#pragma once

#include <torch/extension.h>

namespace restorenet::binding {

void bind_hyper_conv2d(pybind11::module_& m);
void bind_slim_conv2d(pybind11::module_& m);
void bind_tiles(pybind11::module_& m);
void bind_reversible(pybind11::module_& m);
void bind_naf_elementwise(pybind11::module_& m);
void bind_channel_attention(pybind11::module_& m);

}  // namespace restorenet::binding
