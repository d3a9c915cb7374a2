// Torch binding of csrc/hyper_conv2d.cu (C API: csrc/hyper_conv2d.h).
#include <vector>

#include "binding/util.h"
#include "binding/ops.h"
#include "hyper_conv2d.h"

namespace restorenet::binding {
namespace {

// Checked, contiguous arguments of one call.
struct Args {
  Tensor x, level, weight, weight_base;
  OptionalTensor bias, bias_base;
  restorenet::HyperConv2dShape shape;
};

Args check_args(const Tensor& x_in, const Tensor& level, const Tensor& weight, const Tensor& weight_base,
                const OptionalTensor& bias, const OptionalTensor& bias_base, int64_t stride, int64_t padding) {
  Args a;
  a.x = primary_activation(x_in, "x");
  a.weight = parameter(weight, a.x, "weight", 4);
  a.weight_base = parameter(weight_base, a.x, "weight_base", 4);
  TORCH_CHECK_VALUE(a.weight_base.sizes() == a.weight.sizes(), "weight_base must have the shape of weight ",
                    a.weight.sizes(), ", got ", a.weight_base.sizes());
  TORCH_CHECK_VALUE(a.weight.size(1) == a.x.size(1), "weight must have Cin = ", a.x.size(1),
                    " input channels, got shape ", a.weight.sizes());
  const int64_t c_out = a.weight.size(0);
  if (bias.has_value()) a.bias = parameter(*bias, a.x, "bias", 1);
  if (bias_base.has_value()) a.bias_base = parameter(*bias_base, a.x, "bias_base", 1);
  TORCH_CHECK_VALUE(!a.bias.has_value() || a.bias->size(0) == c_out, "bias must have shape [", c_out, "]");
  TORCH_CHECK_VALUE(!a.bias_base.has_value() || a.bias_base->size(0) == c_out, "bias_base must have shape [",
                    c_out, "]");

  const auto level_dtype = acc_scalar_type(a.x);
  TORCH_CHECK_VALUE(level.is_cuda() && level.device() == a.x.device(), "level must be on ", a.x.device(),
                    ", got ", level.device());
  TORCH_CHECK_TYPE(level.scalar_type() == level_dtype, "level must have dtype ", level_dtype, ", got ",
                   level.scalar_type());
  TORCH_CHECK_VALUE(level.dim() == 1 && level.size(0) == a.x.size(0), "level must have shape [", a.x.size(0),
                    "], got ", level.sizes());
  a.level = level.contiguous();  // a broadcast scalar level arrives as an expanded view

  fill_conv_shape(a.shape, a.x, a.weight, c_out, stride, padding);
  return a;
}

Tensor hyper_conv2d_forward(const Tensor& x, const Tensor& level, const Tensor& weight, const Tensor& weight_base,
                            const OptionalTensor& bias, const OptionalTensor& bias_base, int64_t stride,
                            int64_t padding) {
  check_is_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Args a = check_args(x, level, weight, weight_base, bias, bias_base, stride, padding);
  const auto& s = a.shape;
  Tensor y = new_output({s.n, s.c_out, s.h_out, s.w_out}, a.x);
  if (y.numel() == 0) return y;
  check_cuda(restorenet::hyper_conv2d_forward(dtype_of(a.x), s, a.x.data_ptr(), strides_of(a.x), a.level.data_ptr(),
                                              a.weight.data_ptr(), a.weight_base.data_ptr(), data_or_null(a.bias),
                                              data_or_null(a.bias_base), y.data_ptr(), strides_of(y),
                                              current_stream()),
             "hyper_conv2d_forward");
  return y;
}

// Gradients for (x, level, weight, weight_base, bias, bias_base); None where
// needs[i] is false or the input is None.
std::vector<OptionalTensor> hyper_conv2d_backward(const Tensor& grad_out_in, const Tensor& x, const Tensor& level,
                                                  const Tensor& weight, const Tensor& weight_base,
                                                  const OptionalTensor& bias, const OptionalTensor& bias_base,
                                                  int64_t stride, int64_t padding, std::vector<bool> needs) {
  check_needs(needs, 6);
  check_is_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Args a = check_args(x, level, weight, weight_base, bias, bias_base, stride, padding);
  const auto& s = a.shape;
  const Tensor grad_out = conv_grad_out(grad_out_in, a.x, s);
  const auto dtype = dtype_of(a.x);
  const cudaStream_t stream = current_stream();

  std::vector<OptionalTensor> grads(6);
  if (needs[0]) {
    Tensor dx = new_output(a.x.sizes(), a.x);
    if (dx.numel() > 0) {
      check_cuda(restorenet::hyper_conv2d_backward_input(dtype, s, grad_out.data_ptr(), strides_of(grad_out),
                                                         a.level.data_ptr(), a.weight.data_ptr(),
                                                         a.weight_base.data_ptr(), dx.data_ptr(), strides_of(dx),
                                                         stream),
                 "hyper_conv2d_backward_input");
    }
    grads[0] = dx;
  }

  restorenet::HyperConv2dParamGrads out{};
  if (needs[1]) grads[1] = at::empty({s.n}, a.level.options());
  if (needs[2]) grads[2] = at::empty(a.weight.sizes(), a.weight.options());
  if (needs[3]) grads[3] = at::empty(a.weight.sizes(), a.weight.options());
  if (needs[4] && a.bias.has_value()) grads[4] = at::empty({s.c_out}, a.x.options());
  if (needs[5] && a.bias_base.has_value()) grads[5] = at::empty({s.c_out}, a.x.options());
  out.level = data_or_null(grads[1]);
  out.weight = data_or_null(grads[2]);
  out.weight_base = data_or_null(grads[3]);
  out.bias = data_or_null(grads[4]);
  out.bias_base = data_or_null(grads[5]);
  if (out.level || out.weight || out.weight_base || out.bias || out.bias_base) {
    size_t bytes = 0;
    check_cuda(restorenet::hyper_conv2d_backward_params_workspace_size(dtype, s, out, data_or_null(a.bias), &bytes),
               "hyper_conv2d_backward_params_workspace_size");
    Tensor workspace = new_workspace(bytes, a.x);
    check_cuda(restorenet::hyper_conv2d_backward_params(dtype, s, grad_out.data_ptr(), strides_of(grad_out),
                                                        a.x.data_ptr(), strides_of(a.x), a.level.data_ptr(),
                                                        a.weight.data_ptr(), data_or_null(a.bias), out,
                                                        workspace.data_ptr(), bytes, stream),
               "hyper_conv2d_backward_params");
  }
  return grads;
}

}  // namespace

void bind_hyper_conv2d(pybind11::module_& m) {
  m.def("hyper_conv2d_forward", &hyper_conv2d_forward,
        "y[n] = conv2d(x[n], level[n] * weight + weight_base, level[n] * bias + bias_base, stride, padding)",
        pybind11::arg("x"), pybind11::arg("level"), pybind11::arg("weight"), pybind11::arg("weight_base"),
        pybind11::arg("bias"), pybind11::arg("bias_base"), pybind11::arg("stride"), pybind11::arg("padding"));
  m.def("hyper_conv2d_backward", &hyper_conv2d_backward,
        "Gradients [x, level, weight, weight_base, bias, bias_base] of hyper_conv2d_forward; None where not "
        "needed or where the input is None",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("level"), pybind11::arg("weight"),
        pybind11::arg("weight_base"), pybind11::arg("bias"), pybind11::arg("bias_base"), pybind11::arg("stride"),
        pybind11::arg("padding"), pybind11::arg("needs"));
}

}  // namespace restorenet::binding
