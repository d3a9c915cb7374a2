// Torch binding of csrc/naf_elementwise.cu (C API: csrc/naf_elementwise.h).
#include <tuple>

#include "binding/util.h"
#include "binding/ops.h"
#include "naf_elementwise.h"

namespace restorenet::binding {
namespace {

// A [C] parameter in the kernels' accumulation type, contiguous.
Tensor per_channel(const Tensor& p, const Tensor& x, const char* name) {
  return acc_parameter(p, x, name, {x.size(1)});
}

// Per-pixel statistics [N, H, W] in the accumulation type, contiguous.
Tensor per_pixel(const Tensor& s, const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(s.is_cuda() && s.device() == x.device(), name, " must be on ", x.device(), ", got ", s.device());
  TORCH_CHECK_TYPE(s.scalar_type() == acc_scalar_type(x), name, " must have dtype ", acc_scalar_type(x), ", got ",
                   s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == x.size(2) && s.size(2) == x.size(3),
                    name, " must have shape [", x.size(0), ", ", x.size(2), ", ", x.size(3), "], got ", s.sizes());
  return s.contiguous();
}

restorenet::NafShape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

std::tuple<Tensor, Tensor, Tensor> layer_norm2d_forward(const Tensor& x_in, const Tensor& weight_in,
                                                        const Tensor& bias_in, double eps) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(x.size(1) >= 1, "x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  const Tensor weight = per_channel(weight_in, x, "weight");
  const Tensor bias = per_channel(bias_in, x, "bias");
  Tensor y = new_output(x.sizes(), x);
  const auto stats = x.options().dtype(acc_scalar_type(x));
  Tensor mean = at::empty({x.size(0), x.size(2), x.size(3)}, stats);
  Tensor rstd = at::empty({x.size(0), x.size(2), x.size(3)}, stats);
  check_cuda(restorenet::layer_norm2d_forward(dtype_of(x), shape_of(x), x.data_ptr(), strides_of(x),
                                              weight.data_ptr(), bias.data_ptr(), eps, y.data_ptr(), strides_of(y),
                                              mean.data_ptr(), rstd.data_ptr(), current_stream()),
             "layer_norm2d_forward");
  return {y, mean, rstd};
}

// (dx, dweight, dbias); the parameter gradients in the compute type.
std::tuple<Tensor, Tensor, Tensor> layer_norm2d_backward(const Tensor& dy_in, const Tensor& x_in,
                                                         const Tensor& weight_in, const Tensor& mean_in,
                                                         const Tensor& rstd_in) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor dy = activation_of_shape(dy_in, x, x.sizes(), "grad_y");
  const Tensor weight = per_channel(weight_in, x, "weight");
  const Tensor mean = per_pixel(mean_in, x, "mean");
  const Tensor rstd = per_pixel(rstd_in, x, "rstd");
  Tensor dx = new_output(x.sizes(), x);
  Tensor dweight = at::empty({x.size(1)}, weight.options());
  Tensor dbias = at::empty({x.size(1)}, weight.options());
  const auto dtype = dtype_of(x);
  const size_t bytes = restorenet::layer_norm2d_backward_workspace_size(dtype, x.size(1));
  Tensor workspace = new_workspace(bytes, x);
  check_cuda(restorenet::layer_norm2d_backward(dtype, shape_of(x), dy.data_ptr(), strides_of(dy), x.data_ptr(),
                                               strides_of(x), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                               dx.data_ptr(), strides_of(dx), dweight.data_ptr(), dbias.data_ptr(),
                                               workspace.data_ptr(), bytes, current_stream()),
             "layer_norm2d_backward");
  return {dx, dweight, dbias};
}

void check_gate_channels(const Tensor& x) {
  TORCH_CHECK_VALUE(x.size(1) >= 2 && x.size(1) % 2 == 0,
                    "x must have an even number of channels >= 2, got shape ", x.sizes());
}

Tensor simple_gate_forward(const Tensor& x_in) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_gate_channels(x);
  Tensor y = new_output({x.size(0), x.size(1) / 2, x.size(2), x.size(3)}, x);
  check_cuda(restorenet::simple_gate_forward(dtype_of(x), shape_of(x), x.data_ptr(), strides_of(x), y.data_ptr(),
                                             strides_of(y), current_stream()),
             "simple_gate_forward");
  return y;
}

Tensor simple_gate_backward(const Tensor& dy_in, const Tensor& x_in) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_gate_channels(x);
  const std::vector<int64_t> half{x.size(0), x.size(1) / 2, x.size(2), x.size(3)};
  const Tensor dy = activation_of_shape(dy_in, x, half, "grad_y");
  Tensor dx = new_output(x.sizes(), x);
  check_cuda(restorenet::simple_gate_backward(dtype_of(x), shape_of(x), dy.data_ptr(), strides_of(dy),
                                              x.data_ptr(), strides_of(x), dx.data_ptr(), strides_of(dx),
                                              current_stream()),
             "simple_gate_backward");
  return dx;
}

}  // namespace

void bind_naf_elementwise(pybind11::module_& m) {
  m.def("layer_norm2d_forward", &layer_norm2d_forward,
        "(y, mean, rstd): LayerNorm over the channels of each pixel with a per-channel affine; mean/rstd [N, H, W] "
        "in float32 (float64 for float64 x)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"));
  m.def("layer_norm2d_backward", &layer_norm2d_backward,
        "(grad_x, grad_weight, grad_bias) of layer_norm2d_forward; parameter gradients in float32 (float64 for "
        "float64 x)",
        pybind11::arg("grad_y"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("mean"),
        pybind11::arg("rstd"));
  m.def("simple_gate_forward", &simple_gate_forward, "x[:, :C/2] * x[:, C/2:]", pybind11::arg("x"));
  m.def("simple_gate_backward", &simple_gate_backward, "cat(grad_y * x[:, C/2:], grad_y * x[:, :C/2])",
        pybind11::arg("grad_y"), pybind11::arg("x"));
}

}  // namespace restorenet::binding
