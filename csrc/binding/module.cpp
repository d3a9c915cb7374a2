// restorenet._C: the torch binding of the torch-free CUDA kernels in csrc/*.cu.
//
// Compiled by the host compiler (no CUDA code in this folder): each op's file
// checks arguments, allocates outputs and workspaces with torch's caching
// allocator, and calls the kernels' C API on the current stream. Argument
// errors raise ValueError/TypeError, CUDA errors RuntimeError.
#include "binding/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "restorenet CUDA kernels (csrc/)";
  restorenet::binding::bind_hyper_conv2d(m);
  restorenet::binding::bind_slim_conv2d(m);
  restorenet::binding::bind_tiles(m);
  restorenet::binding::bind_reversible(m);
  restorenet::binding::bind_naf_elementwise(m);
  restorenet::binding::bind_channel_attention(m);
}
