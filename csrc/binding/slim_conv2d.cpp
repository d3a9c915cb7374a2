// Torch binding of csrc/slim_conv2d.cu (C API: csrc/slim_conv2d.h).
//
// The widths are passed to the kernels as device pointers and never read on
// the host (no synchronisation); the kernels clamp them to the channel counts.
#include <vector>

#include "binding/util.h"
#include "binding/ops.h"
#include "slim_conv2d.h"

namespace restorenet::binding {
namespace {

// Checked arguments of one call (activations in place, parameters contiguous).
struct Args {
  Tensor x, weight, in_width, out_width;
  OptionalTensor bias;
  restorenet::SlimConv2dShape shape;
};

Tensor width_arg(const Tensor& width, const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(width.is_cuda() && width.device() == x.device(), name, " must be on ", x.device(), ", got ",
                    width.device());
  TORCH_CHECK_TYPE(width.scalar_type() == at::kInt, name, " must have dtype torch.int32, got ", width.scalar_type());
  TORCH_CHECK_VALUE(width.dim() == 1 && width.size(0) == x.size(0), name, " must have shape [", x.size(0),
                    "] (one width per sample), got ", width.sizes());
  return width.contiguous();  // an expanded scalar width arrives with stride 0
}

Args check_args(const Tensor& x_in, const Tensor& weight, const OptionalTensor& bias, const Tensor& in_width,
                const Tensor& out_width, int64_t stride, int64_t padding) {
  Args a;
  a.x = primary_activation(x_in, "x");
  a.weight = parameter(weight, a.x, "weight", 4);
  TORCH_CHECK_VALUE(a.weight.size(1) == a.x.size(1), "weight must have Cin_max = ", a.x.size(1),
                    " input channels, got shape ", a.weight.sizes());
  const int64_t c_out = a.weight.size(0);
  if (bias.has_value()) a.bias = parameter(*bias, a.x, "bias", 1);
  TORCH_CHECK_VALUE(!a.bias.has_value() || a.bias->size(0) == c_out, "bias must have shape [", c_out, "]");
  a.in_width = width_arg(in_width, a.x, "in_width");
  a.out_width = width_arg(out_width, a.x, "out_width");

  fill_conv_shape(a.shape, a.x, a.weight, c_out, stride, padding);
  return a;
}

const int32_t* widths(const Tensor& t) { return t.data_ptr<int32_t>(); }

Tensor slim_conv2d_forward(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, const Tensor& in_width,
                           const Tensor& out_width, int64_t stride, int64_t padding) {
  check_is_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Args a = check_args(x, weight, bias, in_width, out_width, stride, padding);
  const auto& s = a.shape;
  Tensor y = new_output({s.n, s.c_out, s.h_out, s.w_out}, a.x);
  if (y.numel() == 0) return y;
  check_cuda(restorenet::slim_conv2d_forward(dtype_of(a.x), s, a.x.data_ptr(), strides_of(a.x), a.weight.data_ptr(),
                                             data_or_null(a.bias), widths(a.in_width), widths(a.out_width),
                                             y.data_ptr(), strides_of(y), current_stream()),
             "slim_conv2d_forward");
  return y;
}

// Gradients for (x, weight, bias); None where needs[i] is false or bias is None.
std::vector<OptionalTensor> slim_conv2d_backward(const Tensor& grad_out_in, const Tensor& x, const Tensor& weight,
                                                 const OptionalTensor& bias, const Tensor& in_width,
                                                 const Tensor& out_width, int64_t stride, int64_t padding,
                                                 std::vector<bool> needs) {
  check_needs(needs, 3);
  check_is_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Args a = check_args(x, weight, bias, in_width, out_width, stride, padding);
  const auto& s = a.shape;
  const Tensor grad_out = conv_grad_out(grad_out_in, a.x, s);
  const auto dtype = dtype_of(a.x);
  const cudaStream_t stream = current_stream();

  std::vector<OptionalTensor> grads(3);
  if (needs[0]) {
    Tensor dx = new_output(a.x.sizes(), a.x);
    if (dx.numel() > 0) {
      check_cuda(restorenet::slim_conv2d_backward_input(dtype, s, grad_out.data_ptr(), strides_of(grad_out),
                                                        a.weight.data_ptr(), widths(a.in_width),
                                                        widths(a.out_width), dx.data_ptr(), strides_of(dx), stream),
                 "slim_conv2d_backward_input");
    }
    grads[0] = dx;
  }

  if (needs[1]) grads[1] = at::empty(a.weight.sizes(), a.weight.options());
  if (needs[2] && a.bias.has_value()) grads[2] = at::empty({s.c_out}, a.x.options());
  restorenet::SlimConv2dParamGrads out{};
  out.weight = data_or_null(grads[1]);
  out.bias = data_or_null(grads[2]);
  if (out.weight != nullptr || out.bias != nullptr) {
    size_t bytes = 0;
    check_cuda(restorenet::slim_conv2d_backward_params_workspace_size(dtype, s, out, &bytes),
               "slim_conv2d_backward_params_workspace_size");
    Tensor workspace = new_workspace(bytes, a.x);
    check_cuda(restorenet::slim_conv2d_backward_params(dtype, s, grad_out.data_ptr(), strides_of(grad_out),
                                                       a.x.data_ptr(), strides_of(a.x), widths(a.in_width),
                                                       widths(a.out_width), out, workspace.data_ptr(), bytes, stream),
               "slim_conv2d_backward_params");
  }
  return grads;
}

}  // namespace

void bind_slim_conv2d(pybind11::module_& m) {
  m.def("slim_conv2d_forward", &slim_conv2d_forward,
        "y[n, :out_width[n]] = conv2d(x[n, :in_width[n]], weight[:out_width[n], :in_width[n]], bias[:out_width[n]], "
        "stride, padding), zero past out_width[n]; widths int32 [N] on x's device",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("in_width"),
        pybind11::arg("out_width"), pybind11::arg("stride"), pybind11::arg("padding"));
  m.def("slim_conv2d_backward", &slim_conv2d_backward,
        "Gradients [x, weight, bias] of slim_conv2d_forward; None where not needed or where bias is None",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("in_width"), pybind11::arg("out_width"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("needs"));
}

}  // namespace restorenet::binding
