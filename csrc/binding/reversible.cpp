// Torch binding of csrc/reversible.cu (C API: csrc/reversible.h).
#include <tuple>

#include "binding/util.h"
#include "binding/ops.h"
#include "reversible.h"

namespace restorenet::binding {
namespace {

// A per-channel alpha (float32 or float64) in the kernels' accumulation type, contiguous.
Tensor per_channel(const Tensor& alpha, const Tensor& x) {
  TORCH_CHECK_VALUE(alpha.is_cuda() && alpha.device() == x.device(), "alpha must be on ", x.device(), ", got ",
                    alpha.device());
  TORCH_CHECK_TYPE(alpha.scalar_type() == at::kFloat || alpha.scalar_type() == at::kDouble,
                   "alpha must be float32 or float64, got ", alpha.scalar_type());
  TORCH_CHECK_VALUE(alpha.dim() == 1 && alpha.size(0) == x.size(1), "alpha must have shape [", x.size(1),
                    "], got ", alpha.sizes());
  return alpha.to(acc_scalar_type(x)).contiguous();
}

Tensor like(const Tensor& t, const Tensor& x, const char* name) { return activation_of_shape(t, x, x.sizes(), name); }

restorenet::RevCouplingShape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

Tensor rev_coupling_forward(const Tensor& c_in, const Tensor& f_in, const Tensor& alpha_in) {
  const Tensor c = primary_activation(c_in, "c");
  const c10::cuda::CUDAGuard guard(c.device());
  const Tensor f = like(f_in, c, "f");
  const Tensor alpha = per_channel(alpha_in, c);
  Tensor out = new_output(c.sizes(), c);
  check_cuda(restorenet::rev_coupling_forward(dtype_of(c), shape_of(c), c.data_ptr(), strides_of(c), f.data_ptr(),
                                              strides_of(f), alpha.data_ptr(), out.data_ptr(), strides_of(out),
                                              current_stream()),
             "rev_coupling_forward");
  return out;
}

// (c or undefined, grad_c, grad_alpha) of the fused kernel; f undefined = x is c.
std::tuple<Tensor, Tensor, Tensor> invert(const Tensor& x, const Tensor* f, const Tensor& alpha_in,
                                          const Tensor& g_in) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor g = like(g_in, x, "grad_c_new");
  const Tensor alpha = per_channel(alpha_in, x);
  Tensor c_out = f != nullptr ? new_output(x.sizes(), x) : Tensor();
  Tensor grad_c = new_output(x.sizes(), x);
  Tensor grad_alpha = at::empty({x.size(1)}, alpha.options());
  const auto dtype = dtype_of(x);
  const size_t bytes = restorenet::rev_coupling_invert_workspace_size(dtype, x.size(1));
  Tensor workspace = new_workspace(bytes, x);
  const Strides4 none{0, 0, 0, 0};
  check_cuda(restorenet::rev_coupling_invert(dtype, shape_of(x), x.data_ptr(), strides_of(x),
                                             f != nullptr ? f->data_ptr() : nullptr,
                                             f != nullptr ? strides_of(*f) : none, alpha.data_ptr(), g.data_ptr(),
                                             strides_of(g), f != nullptr ? c_out.data_ptr() : nullptr,
                                             f != nullptr ? strides_of(c_out) : none, grad_c.data_ptr(),
                                             strides_of(grad_c), grad_alpha.data_ptr(), workspace.data_ptr(), bytes,
                                             current_stream()),
             "rev_coupling_invert");
  return {c_out, grad_c, grad_alpha};
}

std::tuple<Tensor, Tensor> rev_coupling_backward(const Tensor& g, const Tensor& c_in, const Tensor& alpha) {
  const Tensor c = primary_activation(c_in, "c");
  auto [unused, grad_c, grad_alpha] = invert(c, nullptr, alpha, g);
  return {grad_c, grad_alpha};
}

std::tuple<Tensor, Tensor, Tensor> rev_coupling_invert(const Tensor& c_new_in, const Tensor& f_in,
                                                       const Tensor& alpha, const Tensor& g) {
  const Tensor c_new = primary_activation(c_new_in, "c_new");
  const Tensor f = like(f_in, c_new, "f");
  return invert(c_new, &f, alpha, g);
}

}  // namespace

void bind_reversible(pybind11::module_& m) {
  m.def("rev_coupling_forward", &rev_coupling_forward, "c' = alpha[None, :, None, None] * c + f",
        pybind11::arg("c"), pybind11::arg("f"), pybind11::arg("alpha"));
  m.def("rev_coupling_backward", &rev_coupling_backward,
        "(grad_c, grad_alpha) = (alpha * grad_c_new, sum_{n,h,w} grad_c_new * c); grad_alpha in float32 "
        "(float64 for float64 c)",
        pybind11::arg("grad_c_new"), pybind11::arg("c"), pybind11::arg("alpha"));
  m.def("rev_coupling_invert", &rev_coupling_invert,
        "(c, grad_c, grad_alpha) = ((c_new - f) / alpha, alpha * grad_c_new, sum_{n,h,w} grad_c_new * c) in one "
        "pass; grad_alpha in float32 (float64 for float64 c_new)",
        pybind11::arg("c_new"), pybind11::arg("f"), pybind11::arg("alpha"), pybind11::arg("grad_c_new"));
}

}  // namespace restorenet::binding
