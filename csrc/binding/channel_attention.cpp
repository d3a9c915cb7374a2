// Torch binding of csrc/channel_attention.cu (C API: csrc/channel_attention.h).
// The [N, C] algebra between the passes (the 1x1 conv on the pooled vector and
// its gradient) stays in Python: restorenet/ops/channel_attention.py.
#include <tuple>

#include "binding/util.h"
#include "binding/ops.h"
#include "channel_attention.h"

namespace restorenet::binding {
namespace {

at::ScalarType acc_type_of(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A per-sample [N, C] or per-channel [C] vector in the accumulation dtype, contiguous.
Tensor acc_vector(const Tensor& t, const Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(acc_type_of(x)).contiguous();
}

restorenet::ChannelAttentionShape ca_shape(const Tensor& x, bool gated) {
  TORCH_CHECK_VALUE(!gated || (x.size(1) >= 2 && x.size(1) % 2 == 0),
                    "x must have an even number of channels >= 2 when gated, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, "x must have C, H, W >= 1, got shape ",
                    x.sizes());
  return {x.size(0), gated ? x.size(1) / 2 : x.size(1), x.size(2), x.size(3), gated};
}

Tensor channel_attention_reduce(const Tensor& x_in, const OptionalTensor& grad_u, bool gated) {
  check_is_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = activation(x_in, x_in, "x");
  dtype_of(x);
  const auto s = ca_shape(x, gated);
  Tensor du;
  if (grad_u.has_value()) {
    du = activation(*grad_u, x, "grad_u");
    TORCH_CHECK_VALUE(du.sizes() == at::IntArrayRef({s.n, s.c, s.h, s.w}), "grad_u must have shape [", s.n, ", ", s.c,
                      ", ", s.h, ", ", s.w, "], got ", du.sizes());
  }
  Tensor sums = at::empty({s.n, s.c}, x.options().dtype(acc_type_of(x)));
  size_t bytes = 0;
  check_cuda(restorenet::channel_attention_reduce_workspace_size(dtype_of(x), s, &bytes),
             "channel_attention_reduce_workspace_size");
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  check_cuda(restorenet::channel_attention_reduce(dtype_of(x), s, x.data_ptr(), strides_of(x),
                                                  du.defined() ? du.data_ptr() : nullptr,
                                                  du.defined() ? strides_of(du) : restorenet::Strides4{0, 0, 0, 0},
                                                  sums.data_ptr(), workspace.data_ptr(), bytes, current_stream()),
             "channel_attention_reduce");
  return sums;
}

Tensor channel_attention_apply(const Tensor& x_in, const Tensor& scale_in, bool gated) {
  check_is_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = activation(x_in, x_in, "x");
  dtype_of(x);
  const auto s = ca_shape(x, gated);
  const Tensor scale = acc_vector(scale_in, x, "scale", {s.n, s.c});
  Tensor u = at::empty({s.n, s.c, s.h, s.w}, x.options().memory_format(layout_of(x_in)));
  check_cuda(restorenet::channel_attention_apply(dtype_of(x), s, x.data_ptr(), strides_of(x), scale.data_ptr(),
                                                 u.data_ptr(), strides_of(u), current_stream()),
             "channel_attention_apply");
  return u;
}

Tensor channel_attention_backward_input(const Tensor& grad_u_in, const Tensor& x_in, const Tensor& scale_in,
                                        const Tensor& q_in, bool gated) {
  check_is_cuda(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = activation(x_in, x_in, "x");
  dtype_of(x);
  const auto s = ca_shape(x, gated);
  const Tensor du = activation(grad_u_in, x, "grad_u");
  TORCH_CHECK_VALUE(du.sizes() == at::IntArrayRef({s.n, s.c, s.h, s.w}), "grad_u must have shape [", s.n, ", ", s.c,
                    ", ", s.h, ", ", s.w, "], got ", du.sizes());
  const Tensor scale = acc_vector(scale_in, x, "scale", {s.n, s.c});
  const Tensor q = acc_vector(q_in, x, "q", {s.n, s.c});
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(layout_of(x_in)));
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
  TORCH_CHECK_VALUE(inp_in.is_cuda(), "inp must be a CUDA tensor, got one on ", inp_in.device());
  const c10::cuda::CUDAGuard guard(inp_in.device());
  const Tensor inp = activation(inp_in, inp_in, "inp");
  dtype_of(inp);
  const Tensor z = activation(z_in, inp, "z");
  const auto s = sr_shape(inp, z);
  const Tensor beta = acc_vector(beta_in.reshape({-1}), inp, "beta", {s.c});
  Tensor y = at::empty(inp.sizes(), inp.options().memory_format(layout_of(inp_in)));
  check_cuda(restorenet::scaled_residual_forward(dtype_of(inp), s, inp.data_ptr(), strides_of(inp), beta.data_ptr(),
                                                 z.data_ptr(), strides_of(z), y.data_ptr(), strides_of(y),
                                                 current_stream()),
             "scaled_residual_forward");
  return y;
}

// (grad_z, grad_beta); None where not wanted. grad_beta is in the accumulation dtype.
std::tuple<OptionalTensor, OptionalTensor> scaled_residual_backward(const Tensor& grad_y_in, const Tensor& beta_in,
                                                                    const Tensor& z_in, bool need_z, bool need_beta) {
  TORCH_CHECK_VALUE(z_in.is_cuda(), "z must be a CUDA tensor, got one on ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Tensor z = activation(z_in, z_in, "z");
  dtype_of(z);
  const Tensor g = activation(grad_y_in, z, "grad_y");
  const auto s = sr_shape(g, z);
  const Tensor beta = acc_vector(beta_in.reshape({-1}), z, "beta", {s.c});
  OptionalTensor dz, dbeta;
  if (need_z) dz = at::empty(z.sizes(), z.options().memory_format(layout_of(z_in)));
  if (need_beta) dbeta = at::empty({s.c}, z.options().dtype(acc_type_of(z)));
  if (!need_z && !need_beta) return {dz, dbeta};
  size_t bytes = 0;
  check_cuda(restorenet::scaled_residual_backward_workspace_size(dtype_of(z), s, &bytes),
             "scaled_residual_backward_workspace_size");
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, z.options().dtype(at::kByte));
  check_cuda(restorenet::scaled_residual_backward(
                 dtype_of(z), s, g.data_ptr(), strides_of(g), beta.data_ptr(), z.data_ptr(), strides_of(z),
                 dz.has_value() ? dz->data_ptr() : nullptr,
                 dz.has_value() ? strides_of(*dz) : restorenet::Strides4{0, 0, 0, 0},
                 dbeta.has_value() ? dbeta->data_ptr() : nullptr, workspace.data_ptr(), bytes, current_stream()),
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
