// Torch binding of csrc/channel_attention.cu (C API: csrc/channel_attention.h).
// The [N, C] algebra between the passes (the 1x1 conv on the pooled vector and
// its gradient) stays in Python: restorenet/ops/channel_attention.py.
#include <tuple>

#include "binding/util.h"
#include "binding/ops.h"
#include "channel_attention.h"

namespace restorenet::binding {
namespace {

restorenet::ChannelAttentionShape ca_shape(const Tensor& x, bool gated) {
  TORCH_CHECK_VALUE(!gated || (x.size(1) >= 2 && x.size(1) % 2 == 0),
                    "x must have an even number of channels >= 2 when gated, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, "x must have C, H, W >= 1, got shape ",
                    x.sizes());
  return {x.size(0), gated ? x.size(1) / 2 : x.size(1), x.size(2), x.size(3), gated};
}

// The gradient of u = t * scale: an activation like x of t's shape [N, C, H, W].
Tensor grad_u_of(const Tensor& grad_u, const Tensor& x, const restorenet::ChannelAttentionShape& s) {
  const Tensor du = activation(grad_u, x, "grad_u");
  TORCH_CHECK_VALUE(du.sizes() == at::IntArrayRef({s.n, s.c, s.h, s.w}), "grad_u must have shape [", s.n, ", ", s.c,
                    ", ", s.h, ", ", s.w, "], got ", du.sizes());
  return du;
}

Tensor channel_attention_reduce(const Tensor& x_in, const OptionalTensor& grad_u, bool gated) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto s = ca_shape(x, gated);
  OptionalTensor du;
  if (grad_u.has_value()) du = grad_u_of(*grad_u, x, s);
  Tensor sums = at::empty({s.n, s.c}, x.options().dtype(acc_scalar_type(x)));
  size_t bytes = 0;
  check_cuda(restorenet::channel_attention_reduce_workspace_size(dtype_of(x), s, &bytes),
             "channel_attention_reduce_workspace_size");
  Tensor workspace = new_workspace(bytes, x);
  check_cuda(restorenet::channel_attention_reduce(dtype_of(x), s, x.data_ptr(), strides_of(x), data_or_null(du),
                                                  strides_or_zero(du), sums.data_ptr(), workspace.data_ptr(), bytes,
                                                  current_stream()),
             "channel_attention_reduce");
  return sums;
}

Tensor channel_attention_apply(const Tensor& x_in, const Tensor& scale_in, bool gated) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto s = ca_shape(x, gated);
  const Tensor scale = acc_parameter(scale_in, x, "scale", {s.n, s.c});
  Tensor u = new_output({s.n, s.c, s.h, s.w}, x);
  check_cuda(restorenet::channel_attention_apply(dtype_of(x), s, x.data_ptr(), strides_of(x), scale.data_ptr(),
                                                 u.data_ptr(), strides_of(u), current_stream()),
             "channel_attention_apply");
  return u;
}

Tensor channel_attention_backward_input(const Tensor& grad_u_in, const Tensor& x_in, const Tensor& scale_in,
                                        const Tensor& q_in, bool gated) {
  const Tensor x = primary_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto s = ca_shape(x, gated);
  const Tensor du = grad_u_of(grad_u_in, x, s);
  const Tensor scale = acc_parameter(scale_in, x, "scale", {s.n, s.c});
  const Tensor q = acc_parameter(q_in, x, "q", {s.n, s.c});
  Tensor dx = new_output(x.sizes(), x);
  check_cuda(restorenet::channel_attention_backward_input(dtype_of(x), s, du.data_ptr(), strides_of(du),
                                                          x.data_ptr(), strides_of(x), scale.data_ptr(),
                                                          q.data_ptr(), dx.data_ptr(), strides_of(dx),
                                                          current_stream()),
             "channel_attention_backward_input");
  return dx;
}

restorenet::ScaledResidualShape sr_shape(const Tensor& inp, const Tensor& z) {
  TORCH_CHECK_VALUE(z.sizes() == inp.sizes(), "z must have the shape of inp ", inp.sizes(), ", got ", z.sizes());
  TORCH_CHECK_VALUE(inp.size(1) >= 1 && inp.size(2) >= 1 && inp.size(3) >= 1, "inp must have C, H, W >= 1, got ",
                    inp.sizes());
  return {inp.size(0), inp.size(1), inp.size(2), inp.size(3)};
}

Tensor scaled_residual_forward(const Tensor& inp_in, const Tensor& beta_in, const Tensor& z_in) {
  const Tensor inp = primary_activation(inp_in, "inp");
  const c10::cuda::CUDAGuard guard(inp.device());
  const Tensor z = activation(z_in, inp, "z");
  const auto s = sr_shape(inp, z);
  const Tensor beta = acc_parameter(beta_in.reshape({-1}), inp, "beta", {s.c});
  Tensor y = new_output(inp.sizes(), inp);
  check_cuda(restorenet::scaled_residual_forward(dtype_of(inp), s, inp.data_ptr(), strides_of(inp), beta.data_ptr(),
                                                 z.data_ptr(), strides_of(z), y.data_ptr(), strides_of(y),
                                                 current_stream()),
             "scaled_residual_forward");
  return y;
}

// (grad_z, grad_beta); None where not wanted. grad_beta is in the accumulation dtype.
std::tuple<OptionalTensor, OptionalTensor> scaled_residual_backward(const Tensor& grad_y_in, const Tensor& beta_in,
                                                                    const Tensor& z_in, bool need_z, bool need_beta) {
  const Tensor z = primary_activation(z_in, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor g = activation(grad_y_in, z, "grad_y");
  const auto s = sr_shape(g, z);
  const Tensor beta = acc_parameter(beta_in.reshape({-1}), z, "beta", {s.c});
  OptionalTensor dz, dbeta;
  if (need_z) dz = new_output(z.sizes(), z);
  if (need_beta) dbeta = at::empty({s.c}, z.options().dtype(acc_scalar_type(z)));
  if (!need_z && !need_beta) return {dz, dbeta};
  size_t bytes = 0;
  check_cuda(restorenet::scaled_residual_backward_workspace_size(dtype_of(z), s, &bytes),
             "scaled_residual_backward_workspace_size");
  Tensor workspace = new_workspace(bytes, z);
  check_cuda(restorenet::scaled_residual_backward(
                 dtype_of(z), s, g.data_ptr(), strides_of(g), beta.data_ptr(), z.data_ptr(), strides_of(z),
                 data_or_null(dz), strides_or_zero(dz), data_or_null(dbeta), workspace.data_ptr(), bytes,
                 current_stream()),
             "scaled_residual_backward");
  return {dz, dbeta};
}

}  // namespace

void bind_channel_attention(pybind11::module_& m) {
  m.def("channel_attention_reduce", &channel_attention_reduce,
        "[N, C] sums over H, W of t = SG(x) (gated) or x, times grad_u when given; fp32 (fp64 for double)",
        pybind11::arg("x"), pybind11::arg("grad_u"), pybind11::arg("gated"));
  m.def("channel_attention_apply", &channel_attention_apply, "u = t * scale[n, c]", pybind11::arg("x"),
        pybind11::arg("scale"), pybind11::arg("gated"));
  m.def("channel_attention_backward_input", &channel_attention_backward_input,
        "grad_x of u = t * s for dt = grad_u * scale[n, c] + q[n, c], through SG when gated",
        pybind11::arg("grad_u"), pybind11::arg("x"), pybind11::arg("scale"), pybind11::arg("q"),
        pybind11::arg("gated"));
  m.def("scaled_residual_forward", &scaled_residual_forward, "y = inp + beta[c] * z", pybind11::arg("inp"),
        pybind11::arg("beta"), pybind11::arg("z"));
  m.def("scaled_residual_backward", &scaled_residual_backward,
        "(beta * grad_y, sum_{n,h,w} grad_y * z) in one pass; None where not needed", pybind11::arg("grad_y"),
        pybind11::arg("beta"), pybind11::arg("z"), pybind11::arg("need_z"), pybind11::arg("need_beta"));
}

}  // namespace restorenet::binding
