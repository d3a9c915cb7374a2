// Torch binding of csrc/tiles.cu (C API: csrc/tiles.h): the cuda backend of
// restorenet.ops.tiles' tile_gather and tile_blend custom ops, same arguments.
// Nothing here reads device memory on the host: the one host-built table (the
// sources of a gather) goes up in an asynchronous copy from pinned memory.
#include <string>
#include <vector>

#include "binding/ops.h"
#include "binding/util.h"
#include "tiles.h"

namespace restorenet::binding {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A small int64 tensor of the ops' bookkeeping (boxes, slots, layout) on `device`:
// `dim`-d, contiguous (a no-op for the tensors restorenet.ops.tiles passes).
Tensor index_table(const Tensor& t, const at::Device& device, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must have dtype int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-d, got ", t.dim(), "-d");
  return t.contiguous();
}

// int64 [images, 4] on `device`: restorenet::TileSource (address, stride_c,
// stride_h, stride_w) of every sample of `feats`, in order. Written into
// pinned host memory, so the copy is asynchronous (the caching host allocator
// keeps the block until the copy has run).
Tensor source_table(const std::vector<Tensor>& feats, const at::Device& device) {
  int64_t images = 0;
  for (const Tensor& f : feats) images += f.size(0);
  Tensor table = at::empty({images, 4}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* row = table.data_ptr<int64_t>();
  for (const Tensor& f : feats) {
    const auto base = reinterpret_cast<intptr_t>(f.data_ptr());
    for (int64_t s = 0; s < f.size(0); ++s, row += 4) {
      row[0] = static_cast<int64_t>(base + s * f.stride(0) * static_cast<int64_t>(f.element_size()));
      row[1] = f.stride(1);
      row[2] = f.stride(2);
      row[3] = f.stride(3);
    }
  }
  return table.to(device, /*non_blocking=*/true);
}

// out[p] = image_b[:, y:y + tile_h, x:x + tile_w], (b, y, x) = boxes[p]; image_b the
// b-th sample of feats in order. Any strides (no copies); boxes are not checked.
Tensor tile_gather_forward(const std::vector<Tensor>& feats, const Tensor& boxes_in, int64_t tile_h,
                           int64_t tile_w) {
  TORCH_CHECK_VALUE(!feats.empty(), "feats must hold at least one tensor");
  const Tensor& first = feats[0];
  TORCH_CHECK_VALUE(first.is_cuda(), "feats[0] must be a CUDA tensor, got one on ", first.device());
  TORCH_CHECK_TYPE(is_float_type(first.scalar_type()), "feats[0] must be float16, bfloat16, float32 or float64, got ",
                   first.scalar_type());
  for (size_t i = 0; i < feats.size(); ++i) {
    const std::string name = "feats[" + std::to_string(i) + "]";
    const Tensor& f = feats[i];
    TORCH_CHECK_VALUE(f.device() == first.device(), name, " must be on ", first.device(), ", got ", f.device());
    TORCH_CHECK_TYPE(f.scalar_type() == first.scalar_type(), name, " must have dtype ", first.scalar_type(),
                     ", got ", f.scalar_type());
    TORCH_CHECK_VALUE(f.dim() == 4, name, " must be 4-d [N, C, H, W], got ", f.dim(), "-d");
    TORCH_CHECK_VALUE(f.size(1) == first.size(1), name, " must have ", first.size(1), " channels, got ", f.size(1));
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const Tensor boxes = index_table(boxes_in, first.device(), "boxes", 2);
  TORCH_CHECK_VALUE(boxes.size(1) == 3, "boxes must have shape [S, 3] (image, y, x), got ", boxes.sizes());
  TORCH_CHECK_VALUE(tile_h >= 1 && tile_w >= 1, "tile_h and tile_w must be >= 1, got ", tile_h, ", ", tile_w);

  const restorenet::TileGatherShape shape{boxes.size(0), first.size(1), tile_h, tile_w};
  Tensor out = at::empty({shape.num_boxes, shape.channels, tile_h, tile_w}, first.options());
  if (out.numel() == 0) return out;
  const Tensor table = source_table(feats, first.device());
  check_cuda(restorenet::tile_gather_forward(dtype_of(first), shape,
                                             static_cast<const restorenet::TileSource*>(table.data_ptr()),
                                             boxes.data_ptr<int64_t>(), out.data_ptr(), current_stream()),
             "tile_gather_forward");
  return out;
}

// Flat [C * num_pixels]: the images one after another, each [C, H, W]; pixel =
// sum_t w_t tile_t / sum_t w_t over the tiles covering it (see csrc/tiles.h).
Tensor tile_blend_forward(const Tensor& tiles, const Tensor& slots_in, const Tensor& layout_in,
                          const Tensor& row_weight_in, const Tensor& col_weight_in, int64_t num_pixels,
                          int64_t cover_h, int64_t cover_w) {
  TORCH_CHECK_VALUE(tiles.is_cuda(), "tiles must be a CUDA tensor, got one on ", tiles.device());
  TORCH_CHECK_TYPE(is_float_type(tiles.scalar_type()), "tiles must be float16, bfloat16, float32 or float64, got ",
                   tiles.scalar_type());
  TORCH_CHECK_VALUE(tiles.dim() == 4, "tiles must be 4-d [T, C, tile_h, tile_w], got ", tiles.dim(), "-d");
  const c10::cuda::CUDAGuard guard(tiles.device());
  const int64_t n = tiles.size(0);
  const Tensor slots = index_table(slots_in, tiles.device(), "slots", 1);
  TORCH_CHECK_VALUE(slots.size(0) == n, "slots must have shape [", n, "], got ", slots.sizes());
  const Tensor layout = index_table(layout_in, tiles.device(), "layout", 2);
  TORCH_CHECK_VALUE(layout.size(0) == n && layout.size(1) == restorenet::kTileLayoutColumns, "layout must have shape [",
                    n, ", ", int(restorenet::kTileLayoutColumns), "], got ", layout.sizes());

  const auto weight_dtype = acc_scalar_type(tiles);
  const Tensor* weights[2] = {&row_weight_in, &col_weight_in};
  const char* names[2] = {"row_weight", "col_weight"};
  Tensor contiguous[2];
  for (int i = 0; i < 2; ++i) {
    const Tensor& w = *weights[i];
    TORCH_CHECK_VALUE(w.is_cuda() && w.device() == tiles.device(), names[i], " must be on ", tiles.device(),
                      ", got ", w.device());
    TORCH_CHECK_TYPE(w.scalar_type() == weight_dtype, names[i], " must have dtype ", weight_dtype, ", got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == tiles.size(2 + i), names[i], " must have shape [*, ",
                      tiles.size(2 + i), "], got ", w.sizes());
    contiguous[i] = w.contiguous();
  }
  TORCH_CHECK_VALUE(num_pixels >= 0, "num_pixels must be >= 0, got ", num_pixels);
  TORCH_CHECK_VALUE(cover_h >= 1 && cover_w >= 1, "cover_h and cover_w must be >= 1, got ", cover_h, ", ", cover_w);

  const restorenet::TileBlendShape shape{n, tiles.size(1), tiles.size(2), tiles.size(3), num_pixels, cover_h, cover_w};
  Tensor out = at::empty({shape.channels * num_pixels}, tiles.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0 || n == 0) return out;
  check_cuda(restorenet::tile_blend_forward(dtype_of(tiles), shape, tiles.data_ptr(), strides_of(tiles),
                                            slots.data_ptr<int64_t>(), layout.data_ptr<int64_t>(),
                                            contiguous[0].data_ptr(), contiguous[1].data_ptr(), out.data_ptr(),
                                            current_stream()),
             "tile_blend_forward");
  return out;
}

}  // namespace

void bind_tiles(pybind11::module_& m) {
  m.def("tile_gather_forward", &tile_gather_forward,
        "out[p] = image_b[:, y:y + tile_h, x:x + tile_w] with (b, y, x) = boxes[p] (restorenet.ops.tiles)",
        pybind11::arg("feats"), pybind11::arg("boxes"), pybind11::arg("tile_h"), pybind11::arg("tile_w"));
  m.def("tile_blend_forward", &tile_blend_forward,
        "The tiles written back into their images with the plan's ramp weights, normalised; flat "
        "[C * num_pixels] (restorenet.ops.tiles)",
        pybind11::arg("tiles"), pybind11::arg("slots"), pybind11::arg("layout"), pybind11::arg("row_weight"),
        pybind11::arg("col_weight"), pybind11::arg("num_pixels"), pybind11::arg("cover_h"), pybind11::arg("cover_w"));
}

}  // namespace restorenet::binding
