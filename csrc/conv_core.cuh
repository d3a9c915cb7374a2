// The implicit-GEMM convolution engine shared by hyper_conv2d and slim_conv2d.
//
// Both ops are a strided, padded 2-D convolution in which every sample n sees
// its own view of the weights. They differ only in a small *op policy*:
//
//   hyper_conv2d  K_n = c_n * W + B, formed tile by tile as it is loaded; every
//                 sample uses all channels; parameter partials scaled by c_n
//                 and plain, plus the level gradient <G_n, W>.
//   slim_conv2d   K_n = W[:out_width[n], :in_width[n]] read in place; the
//                 per-sample channel bounds cut the GEMM rows and the reduction,
//                 so a narrow sample costs less; plain parameter partials.
//
// All three passes are implicit GEMMs on one tiling scheme: a block of 256
// threads owns a 64 x 64 output tile, streams the reduction through a
// multi-stage shared-memory pipeline (cp.async copies in commit groups, one
// barrier per stage; TileFormat and conv_gemm_kernel say how), and each
// thread accumulates a 4 x 4 micro-tile (rows ty + 16 i, columns tx + 16 j)
// in fp32 (fp64 for double).
//
//   pass            GEMM rows   GEMM columns      reduction
//   forward         c_out       output pixels     (c_in, tap)   per sample
//   backward-input  c_in        input pixels      (c_out, tap)  per sample
//   backward-params c_out       (c_in, tap) [+1]  pixels        over samples
//
// Per-sample bounds. A policy reports, for sample n, how many GEMM rows and
// how many reduction channels are active (a prefix of each). Then:
//   * a block whose whole row tile is inactive runs no GEMM (it writes zeros);
//   * the reduction runs over the active channels only: its (channel, tap)
//     order is laid out for the sample's channel count, so the active pairs are
//     the prefix [0, channels * taps) in either layout and the loop stops there;
//   * inside a tile, 16-row slices wholly past the bound skip their products
//     (whole warps on tensor cores, whole micro-rows on SIMT).
// Rows past the bound are written as zeros; nothing past a bound is read.
//
// Policy interface (see HyperPolicy / SlimPolicy for the two instances):
//   using scalar_t, acc_t;  struct Params;  struct Sample;
//   Sample sample(const Params&, const Geometry&, int64_t n)         per-sample state
//   Bounds conv_bounds(const Sample&, const Geometry&, bool bwd_in)  active rows / reduction channels
//   Bounds param_bounds(const Sample&, const Geometry&)              active c_out rows / c_in channels
//   struct WeightRaw;                                                the global reads behind one weight element
//   WeightRaw load_weight(const Params&, int64_t wi)                 those reads at W index wi
//   acc_t form_weight(const Sample&, const WeightRaw&)               the weight operand from them
//   acc_t bias(const Params&, const Sample&, int row)                forward bias of output channel row
//   struct ParamEpilogue { ctor; fold(...); store(...); }            parameter-gradient partials
//
// Parameter gradients are reduced deterministically: every block writes its
// own partial sums to a workspace, and small kernels add them up in a fixed
// order (no atomics).
//
// float16/bfloat16 on sm_80+ do the tile products on tensor cores (WMMA
// 16x16x16, fp32 accumulation): the operand tiles are then kept in the 16-bit
// type, so a generated kernel is rounded to it once, as plain PyTorch does
// when it forms c * W + B in the weights' dtype. RESTORENET_CUDA_TENSOR_CORES=0
// selects the fp32 SIMT path instead (same loads, same results up to rounding).
//
// Index widths: memory offsets are int64; spatial coordinates, channel and
// reduction indices are int (check_conv_shape rejects sizes past 2^31).
#pragma once

#include <climits>
#include <cstdlib>
#include <type_traits>

#include "common.cuh"

#if defined(RN_CUDA_EMULATION)
#include <atomic>
#else
#include <mma.h>
#endif
// WMMA with bf16 needs sm_80; older targets compile a trap (the host never
// launches the tensor-core kernels on them).
#if defined(RN_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define RN_WMMA_AVAILABLE 1
#else
#define RN_WMMA_AVAILABLE 0
#endif

namespace restorenet {
namespace conv_core {

constexpr int kThreads = 256;  // a 16 x 16 grid of threads: tx = tid % 16, ty = tid / 16
constexpr int kSide = 16;
constexpr int kMicro = 4;                  // outputs per thread along each tile side
constexpr int kTileM = kSide * kMicro;     // GEMM rows per block
constexpr int kTileN = kSide * kMicro;     // GEMM columns per block
constexpr int kStepK = 16;                 // reduction depth of one GEMM step (one WMMA k; the work counter's unit)
constexpr int kLdC = kTileN + 4;           // leading dimension of the fp32 result tile (tensor cores)
constexpr int64_t kChunk = 256;            // pixels per work item of the backward-params pass
constexpr size_t kMaxSplitBytes = size_t(256) << 20;  // workspace cap for split partial sums
static_assert(kTileM == kTileN, "one run mapping serves both operand tiles");
static_assert(kChunk % 32 == 0, "a work item is a whole number of pipeline stages");

// The shared-memory pipeline of one kernel instantiation.
//
// Operand tiles hold kStageK reduction elements x 64 GEMM rows or columns per
// stage; kStages stages rotate through shared memory. Tiles are acc_t on the
// SIMT path and the 16-bit input type on the tensor-core path. Where the tile
// keeps the input type (kCopy), global elements reach shared memory by
// cp.async: 16 bytes (kVec elements) at a time where a run is contiguous and
// aligned in both memories, element by element (4 or 8 bytes) otherwise, and
// zero-filled by cp.async's src-size-0 form where the element is padding or
// past a bound. 16-bit elements that cannot form a 16-byte run, and every
// element of a converted (fp32 SIMT) tile, are loaded by ordinary loads and
// stored: cp.async has no 2-byte form and cannot convert.
//
// Depth and stage count keep the static shared memory under 48 KiB: 16-bit
// tensor cores 3 x 32 deep (30 KiB), fp32 3 x 16 (26 KiB), fp64 2 x 16 (34 KiB).
//
// Layouts: an operand slot is stored [k][index] (index fastest, leading
// dimension kLdIdx) or, on tensor cores only, [index][k] (k fastest, kLdK),
// whichever makes the source's unit-stride direction contiguous in shared
// memory too. Padding: tensor cores +8 elements (leading dimension a multiple
// of 16 bytes, fragment pointers 32-byte aligned); SIMT rows on 16-byte
// boundaries for copied types, +1 against bank conflicts for converted ones.
template <typename scalar_t, bool kTensorCores>
struct TileFormat {
  using acc_t = typename AccType<scalar_t>::type;
  using elem_t = std::conditional_t<kTensorCores, scalar_t, acc_t>;
  static constexpr bool kCopy = std::is_same_v<elem_t, scalar_t>;
  static constexpr int kVec = kCopy ? 16 / int(sizeof(elem_t)) : 1;
  static constexpr int kStageK = sizeof(elem_t) == 2 ? 32 : 16;
  static constexpr int kStages = sizeof(elem_t) == 8 ? 2 : 3;
  static constexpr int kLoads = kStageK * kTileM / kThreads;  // elements of one operand per thread and stage
  static constexpr int kRuns = kLoads / kVec;                 // runs of kVec elements per thread and stage
  static constexpr int kLdIdx = kTileM + (kTensorCores ? 8 : (kCopy ? kVec : 1));
  static constexpr int kLdK = kStageK + 8;
  static constexpr int kSlot = kTensorCores && kTileM * kLdK > kStageK * kLdIdx ? kTileM * kLdK : kStageK * kLdIdx;
  static constexpr size_t kStageBytes = size_t(2) * kStages * kSlot * sizeof(elem_t);
  static constexpr size_t kCTileBytes = kTensorCores ? size_t(kTileM) * kLdC * sizeof(float) : 0;
  static constexpr size_t kSmemBytes = kStageBytes > kCTileBytes ? kStageBytes : kCTileBytes;
  static_assert(kStageK % kStepK == 0 && kLoads % kVec == 0 && kChunk % kStageK == 0, "whole steps and runs");
  static_assert(kSmemBytes + 2048 <= 48 * 1024, "static shared memory per block");
};

// Where element (k, index) of an operand stage slot lives.
struct OperandLayout {
  bool k_fastest;
  int ld;
  __device__ __forceinline__ int at(int k, int index) const { return k_fastest ? index * ld + k : k * ld + index; }
};

template <typename Tile>
__device__ __forceinline__ OperandLayout layout_of(bool k_fastest) {
  return k_fastest ? OperandLayout{true, Tile::kLdK} : OperandLayout{false, Tile::kLdIdx};
}

template <typename T> struct IsHalfWidth { static constexpr bool value = false; };
template <> struct IsHalfWidth<__half> { static constexpr bool value = true; };
template <> struct IsHalfWidth<__nv_bfloat16> { static constexpr bool value = true; };

// The block's 64 x 64 fp32 accumulator on tensor cores. The 8 warps tile it
// with 16 x 16 fragments: warp w owns rows 16 (w % 4) .. +16 and columns
// 32 (w / 4) .. +32 (two fragments). All calls are warp-collective.
template <typename T>
struct TensorCoreTile {
#if RN_WMMA_AVAILABLE
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ __forceinline__ int row0() const { return 16 * ((threadIdx.x / 32) % 4); }
  __device__ __forceinline__ int col0() const { return 32 * ((threadIdx.x / 32) / 4); }

  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }
  // acc += A * B over the kStepK-deep step at reduction offset k0 of a stage.
  // A[row][k] is the A slot's element (k, row), B[k][col] the B slot's
  // (k, col); a k-fastest slot is a row-major A / column-major B for WMMA.
  // A warp whose 16 rows all lie at or past `active_rows` skips (its rows of
  // A are zero): warp-uniform, so the collective calls stay whole-warp.
  __device__ __forceinline__ void step(const T* a_tile, OperandLayout la, const T* b_tile, OperandLayout lb, int k0,
                                       int active_rows) {
    namespace wmma = nvcuda::wmma;
    if (row0() >= active_rows) return;
    if (la.k_fastest) {
      if (lb.k_fastest) step_as<wmma::row_major, wmma::col_major>(a_tile, la, b_tile, lb, k0);
      else step_as<wmma::row_major, wmma::row_major>(a_tile, la, b_tile, lb, k0);
    } else {
      if (lb.k_fastest) step_as<wmma::col_major, wmma::col_major>(a_tile, la, b_tile, lb, k0);
      else step_as<wmma::col_major, wmma::row_major>(a_tile, la, b_tile, lb, k0);
    }
  }
  template <typename LA, typename LB>
  __device__ __forceinline__ void step_as(const T* a_tile, OperandLayout la, const T* b_tile, OperandLayout lb, int k0) {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
    wmma::load_matrix_sync(a, a_tile + la.at(k0, row0()), la.ld);
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(b, b_tile + lb.at(k0, col0() + 16 * f), lb.ld);
      wmma::mma_sync(acc[f], a, b, acc[f]);
    }
  }
  // c_tile[row][col] = acc, row-major with leading dimension ldc.
  __device__ __forceinline__ void store(float* c_tile, int ldc) const {
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      nvcuda::wmma::store_matrix_sync(c_tile + row0() * ldc + col0() + 16 * f, acc[f], ldc,
                                      nvcuda::wmma::mem_row_major);
    }
  }
#else
  __device__ void zero() { __trap(); }
  __device__ void step(const T*, OperandLayout, const T*, OperandLayout, int, int) { __trap(); }
  __device__ void store(float*, int) const { __trap(); }
#endif
};

#if defined(RN_CUDA_EMULATION)
// Emulation builds count the GEMM work done, in units of one 16-row slice of a
// block tile times one kStepK step, so tests can check that the work follows
// the active channels (tests/csrc/test_slim_conv2d_emulated.py).
inline std::atomic<long long> emu_gemm_work{0};
#endif

// Test hook: emulation tests build the core with RN_CONV_CORE_TEST_WAIT_SLACK=1
// to let one more cp.async group be in flight than the pipeline allows, and
// check that the emulation then gives wrong results
// (tests/csrc/test_slim_conv2d_emulated.py). Always 0 in real builds.
#ifndef RN_CONV_CORE_TEST_WAIT_SLACK
#define RN_CONV_CORE_TEST_WAIT_SLACK 0
#endif

// ------------------------------------------------ per-thread micro-tile helpers
// A thread's kMicro x kMicro accumulator holds rows ty + kSide i, columns
// tx + kSide j of the block's tile (the SIMT mapping both paths end in).
template <typename acc_t>
__device__ __forceinline__ void zero_micro(acc_t (&m)[kMicro][kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) m[i][j] = acc_t(0);
}

// The SIMT step over the first kRows micro-rows only (the others are past the
// sample's row bound and stay zero): straight-line code per row count. The
// tiles are [k][index] with leading dimension kLd, already offset to the step.
template <int kRows, int kLd, typename elem_t, typename acc_t>
__device__ __forceinline__ void simt_step(const elem_t* a_tile, const elem_t* b_tile, acc_t (&acc)[kMicro][kMicro],
                                          int tx, int ty) {
#pragma unroll
  for (int k = 0; k < kStepK; ++k) {
    acc_t av[kRows], bv[kMicro];
#pragma unroll
    for (int i = 0; i < kRows; ++i) av[i] = a_tile[k * kLd + ty + kSide * i];
#pragma unroll
    for (int j = 0; j < kMicro; ++j) bv[j] = b_tile[k * kLd + tx + kSide * j];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// The GEMM steps of one pipeline stage, C[row][col] += sum_k A[k][row] B[k][col]
// over the stage's first `depth` reduction elements (block-uniform; a step
// wholly past them is skipped, so the work follows the reduction at kStepK
// granularity): on tensor cores into `tc`, otherwise as outer products into
// the thread's micro-tile `acc`. Only the first `active_rows` rows of the
// tile (block-uniform, >= 1) need products; 16-row slices wholly past them
// are skipped.
template <bool kTensorCores, typename Tile, typename scalar_t, typename elem_t, typename acc_t>
__device__ __forceinline__ void gemm_stage(TensorCoreTile<scalar_t>& tc, const elem_t* a_tile, OperandLayout la,
                                           const elem_t* b_tile, OperandLayout lb, acc_t (&acc)[kMicro][kMicro],
                                           int tx, int ty, int active_rows, int depth) {
  const int slices = int(min64(active_rows, kTileM) + kSide - 1) / kSide;
#pragma unroll
  for (int k0 = 0; k0 < Tile::kStageK; k0 += kStepK) {
    if (k0 >= depth) break;
#if defined(RN_CUDA_EMULATION)
    if (threadIdx.x == 0) emu_gemm_work += slices;
#endif
    if constexpr (kTensorCores) {
      tc.step(a_tile, la, b_tile, lb, k0, active_rows);
    } else {  // SIMT slots are [k][index]
      const elem_t* a = a_tile + k0 * Tile::kLdIdx;
      const elem_t* b = b_tile + k0 * Tile::kLdIdx;
      switch (slices) {
        case 1: simt_step<1, Tile::kLdIdx>(a, b, acc, tx, ty); break;
        case 2: simt_step<2, Tile::kLdIdx>(a, b, acc, tx, ty); break;
        case 3: simt_step<3, Tile::kLdIdx>(a, b, acc, tx, ty); break;
        default: simt_step<4, Tile::kLdIdx>(a, b, acc, tx, ty); break;
      }
    }
  }
}

// After the last gemm_stage (and a barrier: c_tile aliases the stage slots):
// on tensor cores, moves the fragments to the SIMT thread mapping in `acc`
// through the shared fp32 tile c_tile (kTileM rows, leading dimension kLdC);
// a no-op on the SIMT path. Block-collective.
template <bool kTensorCores, typename scalar_t, typename acc_t>
__device__ __forceinline__ void gemm_result(const TensorCoreTile<scalar_t>& tc, float* c_tile,
                                            acc_t (&acc)[kMicro][kMicro], int tx, int ty) {
  if constexpr (kTensorCores) {
    tc.store(c_tile, kLdC);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = c_tile[(ty + kSide * i) * kLdC + tx + kSide * j];
    __syncthreads();  // the caller's next sample / item rewrites c_tile's memory
  }
}

// ------------------------------------------------ staging operand tiles
// What an operand's element offset function returns for an element that is
// not read from memory.
constexpr int64_t kZero = -1;  // padding, off the stride grid, past a bound or the end
constexpr int64_t kOne = -2;   // the ones column of the backward-params pass

// Start (k, index) of run q (0 <= q < kThreads * kRuns) of kVec elements: the
// runs go along k (along_k) or along the index, consecutive q on consecutive
// runs, so consecutive threads read consecutive memory when `along_k` is the
// source's unit-stride direction (coalescing).
template <typename Tile>
__device__ __forceinline__ void run_start(int q, bool along_k, int& k, int& index) {
  if (along_k) {
    constexpr int per_index = Tile::kStageK / Tile::kVec;
    k = (q % per_index) * Tile::kVec;
    index = q / per_index;
  } else {
    constexpr int per_k = kTileM / Tile::kVec;
    index = (q % per_k) * Tile::kVec;
    k = q / per_k;
  }
}

template <typename T>
__device__ __forceinline__ const T* align_down(const T* p, int bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(p) / bytes * bytes);
}

// One element into shared memory: by a cp.async of its 4 or 8 bytes
// (zero-filled where it is not read) when the tile keeps the input type,
// else by a load, conversion and store.
template <typename Tile, typename scalar_t>
__device__ __forceinline__ void stage_element(typename Tile::elem_t* dst, const scalar_t* src, int64_t off) {
  using acc_t = typename Tile::acc_t;
  if constexpr (Tile::kCopy && sizeof(scalar_t) >= 4) {
    if (off != kOne) {
      // Zero-fill reads nothing; its source is any aligned address in the tensor's allocation.
      cp_async<int(sizeof(scalar_t))>(dst, off >= 0 ? src + off : align_down(src, sizeof(scalar_t)), off < 0);
      return;
    }
  }
  store_as(dst, off >= 0 ? to_acc(src[off]) : acc_t(off == kOne ? 1 : 0));
}

// Issues this thread's share of one operand's stage: kLoads elements, as
// kRuns runs of kVec elements along the source's unit-stride direction
// (`src_along_k`). `offset(k, index)` is an element's offset in `src` or
// kZero / kOne. A run that is contiguous in the source and in the slot
// (same fastest direction) and 16-byte aligned is one 16-byte cp.async, a
// run of zeros one zero-filling cp.async; any other run goes element by element.
template <typename Tile, typename scalar_t, typename Offset>
__device__ __forceinline__ void stage_operand(typename Tile::elem_t* slot, OperandLayout layout, const scalar_t* src,
                                              bool src_along_k, int tid, const Offset& offset) {
  constexpr int V = Tile::kVec;
#pragma unroll
  for (int q = 0; q < Tile::kRuns; ++q) {
    int k, index;
    run_start<Tile>(tid + q * kThreads, src_along_k, k, index);
    const int dk = src_along_k ? 1 : 0, di = 1 - dk;
    int64_t off[V];
#pragma unroll
    for (int v = 0; v < V; ++v) off[v] = offset(k + v * dk, index + v * di);
    if constexpr (V > 1) {
      if (src_along_k == layout.k_fastest) {
        bool zeros = true, contiguous = off[0] >= 0;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          zeros = zeros && off[v] == kZero;
          contiguous = contiguous && off[v] == off[0] + v;
        }
        contiguous = contiguous && reinterpret_cast<uintptr_t>(src + off[0]) % 16 == 0;
        if (zeros || contiguous) {
          cp_async<16>(slot + layout.at(k, index), zeros ? align_down(src, 16) : src + off[0], zeros);
          continue;
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) stage_element<Tile>(slot + layout.at(k + v * dk, index + v * di), src, off[v]);
  }
}

// Convolution sizes as the kernels index them (full channel counts).
struct Geometry {
  int c_in, c_out, kh, kw, h, w, h_out, w_out, stride, padding;
};

// A sample's active extent in one pass: GEMM rows [0, rows) and reduction
// channels [0, channels). Policies without bounds report the full sizes.
struct Bounds {
  int rows, channels;
};

// A reduction index r runs over (channel, tap) pairs, tap = ky * kw + kx. The
// order is free as long as both GEMM operands use the same one; it is picked
// so that consecutive r are adjacent in memory for the gathered activation:
// channel-major (r = c * taps + tap) for NCHW, channel-minor
// (r = tap * channels + c) for channels_last. With `channels` set to a
// sample's active channel count, the active pairs are exactly [0, size()).
struct ReductionOrder {
  int channels, taps;
  bool channel_minor;

  __host__ __device__ __forceinline__ int size() const { return channels * taps; }
  __host__ __device__ __forceinline__ void decode(int r, int& c, int& tap) const {
    if (channel_minor) {
      tap = r / channels;
      c = r - tap * channels;
    } else {
      c = r / taps;
      tap = r - c * taps;
    }
  }
  // Whether some r in [begin, end) (all < size()) has channel < k.
  __host__ __device__ __forceinline__ bool any_channel_below(int begin, int end, int k) const {
    if (k <= 0 || begin >= end) return false;
    if (!channel_minor) return begin < k * taps;  // channels ascend with r
    if (end - begin >= channels) return true;     // a whole tap's channels
    const int c_first = begin % channels;
    return c_first < k || c_first + (end - begin) > channels;  // ... or the range wraps to channel 0
  }
};

// NHWC in memory: the channel is the unit-stride dimension. (With one channel
// either answer is right; only coalescing depends on it.)
inline bool is_channels_last(const Strides4& s) { return s.c == 1 && s.w != 1; }

__host__ __device__ __forceinline__ int64_t offset4(const Strides4& s, int64_t n, int c, int h, int w) {
  return n * s.n + int64_t(c) * s.c + int64_t(h) * s.h + int64_t(w) * s.w;
}

// Index of W[co][ci][ky][kx] (contiguous weights), tap = ky * kw + kx.
__host__ __device__ __forceinline__ int64_t weight_index(const Geometry& g, int co, int ci, int tap) {
  return (int64_t(co) * g.c_in + ci) * (g.kh * g.kw) + tap;
}

// =========================================================== forward / backward-input
template <typename Policy>
struct ConvGemmArgs {
  using scalar_t = typename Policy::scalar_t;
  const scalar_t* src;  // gathered operand: x (forward) or grad_out (backward-input)
  Strides4 src_st;
  scalar_t* dst;        // y (forward) or grad_x (backward-input)
  Strides4 dst_st;
  typename Policy::Params op;
  Geometry g;
  int64_t batch;
  bool src_channels_last;  // picks the reduction order (coalescing of the gather)
};

// One launch computes, for every sample n (blockIdx.z, strided by gridDim.z),
// with K_n the policy's weight view, over the sample's active rows and
// reduction channels (Policy::conv_bounds):
//   forward:         y[n, co, p]  = sum_r K_n[co, r] * x_col[r, p] + bias_n[co]
//                    with x_col[(ci, ky, kx), (oh, ow)] = x[n, ci, oh*s - pad + ky, ow*s - pad + kx]
//   backward-input:  dx[n, ci, p] = sum_r K_n[r, ci] * dy_col[r, p]
//                    with dy_col[(co, ky, kx), (ih, iw)] = dy[n, co, oh, ow] where
//                    oh * s = ih + pad - ky (and likewise ow), else 0 — the transposed
//                    convolution, stride handled by divisibility.
// Rows past the sample's bound are written as zeros.
// blockIdx.x: pixel tile (columns), blockIdx.y: channel tile (rows).
//
// The mainloop is a kStages-deep pipeline with one barrier per stage. At
// iteration s, after waiting for its own copies of stage s and the barrier
// (everyone's copies of stage s have landed; everyone is done with stage
// s - 1's slots), each thread
//   1. issues stage s + kStages - 1 into the slots stage s - 1 used: the
//      activation by cp.async (one commit group per stage, empty past the
//      end), the kernel tile's global reads into registers;
//   2. decodes the reduction indices of stage s + kStages (threads < kStageK);
//   3. runs the GEMM steps of stage s;
//   4. forms the kernel tile from its registers and stores it to the slot.
// The kernel tile is not copied: the policy forms it (hyper: c_n * W + B, two
// loads and an FMA per element; slim: a gather over the sample's active
// channels), so its loads are register-staged instead -- issued before the
// GEMM of stage s, consumed after it, so their latency hides behind the
// tensor-core work just as the copies' does -- and stored into the slot at
// least one barrier before stage s + kStages - 1 is consumed.
template <typename Policy, bool kBackwardInput, bool kTensorCores>
__global__ void __launch_bounds__(kThreads) conv_gemm_kernel(ConvGemmArgs<Policy> a) {
  using scalar_t = typename Policy::scalar_t;
  using acc_t = typename AccType<scalar_t>::type;
  using Tile = TileFormat<scalar_t, kTensorCores>;
  using elem_t = typename Tile::elem_t;
  using WeightRaw = typename Policy::WeightRaw;
  constexpr int kStageK = Tile::kStageK, kStages = Tile::kStages;
  // kStages slots of the kernel tile (A), then kStages of the activation (B);
  // the tensor-core result tile reuses the memory after the mainloop.
  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  // The stages' reduction indices, decoded once per block: channel (-1 past
  // the end), tap, ky, kx; one slot per stage in flight.
  __shared__ int r_chan[kStages][kStageK], r_tap[kStages][kStageK], r_ky[kStages][kStageK], r_kx[kStages][kStageK];
  // The tile's output pixels (y = -1 past the end).
  __shared__ int col_y[kTileN], col_x[kTileN];

  const Geometry& g = a.g;
  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int dst_h = kBackwardInput ? g.h : g.h_out;  // spatial size of the output of this pass
  const int dst_w = kBackwardInput ? g.w : g.w_out;
  const int64_t pixels = int64_t(dst_h) * dst_w;
  const int taps = g.kh * g.kw;
  const int row0 = blockIdx.y * kTileM;
  const int64_t pix0 = int64_t(blockIdx.x) * kTileN;
  elem_t* const slots = reinterpret_cast<elem_t*>(smem);
  auto k_slot = [&](int stage) { return slots + (stage % kStages) * Tile::kSlot; };
  auto src_slot = [&](int stage) { return slots + (kStages + stage % kStages) * Tile::kSlot; };
  // Tensor cores: the kernel tile k-fastest (its loads run along r), the
  // activation with its source's unit-stride direction fastest (r for
  // channels_last, pixels for NCHW). SIMT: both [k][index].
  const OperandLayout k_layout = layout_of<Tile>(kTensorCores);
  const OperandLayout src_layout = layout_of<Tile>(kTensorCores && a.src_channels_last);
  if (tid < kTileN) {  // read after the first barrier of a sample's mainloop
    const int64_t p = pix0 + tid;
    col_y[tid] = p < pixels ? int(p / dst_w) : -1;
    col_x[tid] = p < pixels ? int(p - (p / dst_w) * dst_w) : 0;
  }

  TensorCoreTile<scalar_t> tc;
  for (int64_t n = blockIdx.z; n < a.batch; n += gridDim.z) {
    const typename Policy::Sample sample = Policy::sample(a.op, g, n);
    const Bounds bounds = Policy::conv_bounds(sample, g, kBackwardInput);
    // The sample's reduction: its active channels only, laid out so they are a prefix.
    const ReductionOrder order{bounds.channels, taps, a.src_channels_last};
    // Block-uniform: a tile wholly past the row bound runs no GEMM.
    const int active_rows = bounds.rows - row0;
    const int reduction = active_rows > 0 ? order.size() : 0;
    const int steps = int(ceil_div(reduction, kStageK));

    auto decode = [&](int stage) {  // threads tid < kStageK
      const int r = stage * kStageK + tid, slot = stage % kStages;
      int c = -1, tap = 0;
      if (r < reduction) order.decode(r, c, tap);
      r_chan[slot][tid] = c;
      r_tap[slot][tid] = tap;
      r_ky[slot][tid] = tap / g.kw;
      r_kx[slot][tid] = tap - (tap / g.kw) * g.kw;
    };
    // Gathered activation, zero in the padding (and, backward, off the stride grid).
    auto src_offset = [&](int slot, int k, int col) -> int64_t {
      const int c = r_chan[slot][k], py = col_y[col];
      if (c < 0 || py < 0) return kZero;
      const int px = col_x[col], ky = r_ky[slot][k], kx = r_kx[slot][k];
      if (!kBackwardInput) {
        const int iy = py * g.stride - g.padding + ky;
        const int ix = px * g.stride - g.padding + kx;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) return offset4(a.src_st, n, c, iy, ix);
      } else {
        // Input pixel (py, px) received tap (ky, kx) from output pixel (oy, ox)
        // iff oy * stride - pad + ky == py, i.e. oy * stride == py + pad - ky.
        const int oy_s = py + g.padding - ky, ox_s = px + g.padding - kx;  // oy * stride, ox * stride
        if (oy_s >= 0 && ox_s >= 0) {
          const int oy = oy_s / g.stride, ox = ox_s / g.stride;
          if (oy * g.stride == oy_s && ox * g.stride == ox_s && oy < g.h_out && ox < g.w_out)
            return offset4(a.src_st, n, c, oy, ox);
        }
      }
      return kZero;
    };
    // The kernel tile's reads for one stage, into registers: element
    // e = tid + s * kThreads is (k = e % kStageK, row = e / kStageK), so
    // consecutive threads read consecutive r.
    WeightRaw w_raw[Tile::kLoads];
    bool w_live[Tile::kLoads];
    auto load_weights = [&](int stage) {
      const int slot = stage % kStages;
#pragma unroll
      for (int s = 0; s < Tile::kLoads; ++s) {
        const int e = tid + s * kThreads, k = e % kStageK, row = row0 + e / kStageK;
        const int c = r_chan[slot][k];
        w_live[s] = c >= 0 && row < bounds.rows;
        w_raw[s] = WeightRaw{};
        if (w_live[s]) {
          const int64_t wi = kBackwardInput ? weight_index(g, c, row, r_tap[slot][k]) : weight_index(g, row, c, r_tap[slot][k]);
          w_raw[s] = Policy::load_weight(a.op, wi);
        }
      }
    };
    auto store_weights = [&](int stage) {
      elem_t* slot = k_slot(stage);
#pragma unroll
      for (int s = 0; s < Tile::kLoads; ++s) {
        const int e = tid + s * kThreads;
        store_as(slot + k_layout.at(e % kStageK, e / kStageK),
                 w_live[s] ? Policy::form_weight(sample, w_raw[s]) : acc_t(0));
      }
    };
    // Starts stage `stage` (block-uniform): the activation's copies (one
    // group, empty past the last stage) and the kernel tile's reads.
    auto issue = [&](int stage) {
      if (stage < steps) {
        const int slot = stage % kStages;
        stage_operand<Tile>(src_slot(stage), src_layout, a.src, a.src_channels_last, tid,
                            [&](int k, int col) { return src_offset(slot, k, col); });
        load_weights(stage);
      }
      cp_async_commit();
    };

    acc_t acc[kMicro][kMicro];
    zero_micro(acc);
    if (steps > 0) {
      if constexpr (kTensorCores) tc.zero();
      // Prologue: indices of the first kStages stages, then kStages - 1 stages in flight.
      if (tid < kStageK) {
        for (int t = 0; t < kStages; ++t) decode(t);
      }
      __syncthreads();
      for (int t = 0; t < kStages - 1; ++t) {
        issue(t);
        if (t < steps) store_weights(t);
      }
      for (int s = 0; s < steps; ++s) {
        cp_async_wait<kStages - 2 + RN_CONV_CORE_TEST_WAIT_SLACK>();  // this thread's copies of stage s
        __syncthreads();
        const int next = s + kStages - 1;
        issue(next);
        if (tid < kStageK) decode(s + kStages);  // into stage s's index slot, read last by issue(s)
        gemm_stage<kTensorCores, Tile>(tc, k_slot(s), k_layout, src_slot(s), src_layout, acc, tx, ty, active_rows,
                                       reduction - s * kStageK);
        if (next < steps) store_weights(next);
      }
      cp_async_wait<0>();  // only empty groups are left
      __syncthreads();     // every GEMM step is done before the slots are reused
      gemm_result<kTensorCores>(tc, reinterpret_cast<float*>(smem), acc, tx, ty);
    }

    // Epilogue: add the policy's bias (forward) and store in the output's
    // layout; rows past the sample's bound are exact zeros.
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int row = row0 + ty + kSide * i;
      if (row >= (kBackwardInput ? g.c_in : g.c_out)) continue;
      const bool active = row < bounds.rows;
      acc_t b = acc_t(0);
      if (!kBackwardInput && active) b = Policy::bias(a.op, sample, row);
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t p = pix0 + tx + kSide * j;
        if (p >= pixels) continue;
        const int py = int(p / dst_w), px = int(p - int64_t(p / dst_w) * dst_w);
        store_as(a.dst + offset4(a.dst_st, n, row, py, px), active ? acc[i][j] + b : acc_t(0));
      }
    }
  }
}

// ================================================================= backward-params
// Work items: (sample n, chunk of kChunk output pixels), item = n * chunks + chunk.
// Block (blockIdx.x = column tile, blockIdx.y = c_out tile, blockIdx.z = split)
// takes items split, split + splits, ... and for each computes the partial
// per-sample gradient over the chunk,
//   G[co, col] = sum_{p in chunk} dy[n, co, p] * x_col[col, p],
// where the columns are the (ci, tap) pairs (order `order`, over all c_in
// channels: the output tile is shared by every sample) plus, with
// `bias_column`, one column of ones (x_col[R, p] = 1), which makes
// G[co, R] = sum_p dy[n, co, p] = the bias gradient. dy is read only for the
// sample's active rows co < rows and x only for its active channels
// ci < channels (Policy::param_bounds), so G is zero outside them; an item
// whose whole tile is inactive loads nothing and runs no GEMM. The policy's
// ParamEpilogue folds each item's G into the block's partial sums.
template <typename Policy>
struct ParamGradArgs {
  using scalar_t = typename Policy::scalar_t;
  const scalar_t* dy;
  Strides4 dy_st;
  bool dy_channels_last;
  const scalar_t* x;
  Strides4 x_st;
  typename Policy::Params op;
  Geometry g;
  ReductionOrder order;    // over (c_in, tap); channel-minor when x is channels_last
  int cols;                // order.size() + (bias_column ? 1 : 0)
  bool bias_column;
  int64_t chunks;          // chunks per sample
  int64_t items;           // batch * chunks
};

// The mainloop over a chunk's pixels is conv_gemm_kernel's pipeline with both
// operands copied (dy and x are plain gathers; the ones column is stored).
template <typename Policy, bool kTensorCores>
__global__ void __launch_bounds__(kThreads) param_grad_kernel(ParamGradArgs<Policy> a) {
  using scalar_t = typename Policy::scalar_t;
  using acc_t = typename AccType<scalar_t>::type;
  using Tile = TileFormat<scalar_t, kTensorCores>;
  using elem_t = typename Tile::elem_t;
  constexpr int kStageK = Tile::kStageK, kStages = Tile::kStages;
  // kStages slots of dy ([pixel][co]), then kStages of x ([pixel][column]);
  // the tensor-core result tile reuses the memory after the mainloop.
  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  // The stages' pixels decoded once per block (y = -1 past the chunk), one slot per stage in flight.
  __shared__ int pix_y[kStages][kStageK], pix_x[kStages][kStageK];
  // The tile's x columns: channel, ky, kx and kind (0: past the end, zero; 1: an input tap; 2: the ones column).
  __shared__ int col_ci[kTileN], col_ky[kTileN], col_kx[kTileN], col_kind[kTileN];
  __shared__ acc_t partial[kThreads];  // for block-collective epilogue sums

  const Geometry& g = a.g;
  const int tid = threadIdx.x;
  const int tx = tid % kSide, ty = tid / kSide;
  const int64_t pixels = int64_t(g.h_out) * g.w_out;
  const int reduction = a.order.size();
  const int co0 = blockIdx.y * kTileM;
  const int col0 = blockIdx.x * kTileN;
  const int64_t tiles = int64_t(gridDim.x) * gridDim.y;
  const int64_t tile = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const int col_end = int(min64(int64_t(col0) + kTileN, reduction));  // (ci, tap) columns of this tile
  const bool has_bias_column = a.bias_column && col0 <= reduction && reduction < col0 + kTileN;
  elem_t* const slots = reinterpret_cast<elem_t*>(smem);
  auto dy_slot = [&](int stage) { return slots + (stage % kStages) * Tile::kSlot; };
  auto x_slot = [&](int stage) { return slots + (kStages + stage % kStages) * Tile::kSlot; };
  // The unit-stride direction of each source: NCHW dy runs along the pixels
  // (k), channels_last dy along co; channel-minor x columns run along the
  // columns, channel-major (NCHW) x along the pixels. Tensor cores store each
  // tile with that direction fastest; SIMT tiles are [k][index].
  const bool dy_along_k = !a.dy_channels_last, x_along_k = !a.order.channel_minor;
  const OperandLayout dy_layout = layout_of<Tile>(kTensorCores && dy_along_k);
  const OperandLayout x_layout = layout_of<Tile>(kTensorCores && x_along_k);
  if (tid < kTileN) {  // read after the first barrier of an item's mainloop
    const int col = col0 + tid;
    int ci = 0, tap = 0, kind = 0;
    if (col < reduction) {
      a.order.decode(col, ci, tap);
      kind = 1;
    } else if (col == reduction && a.bias_column) {
      kind = 2;
    }
    col_ci[tid] = ci;
    col_ky[tid] = tap / g.kw;
    col_kx[tid] = tap - (tap / g.kw) * g.kw;
    col_kind[tid] = kind;
  }

  typename Policy::ParamEpilogue epilogue(a.op, g, a.order, a.bias_column, co0, col0, tx, ty);

  TensorCoreTile<scalar_t> tc;
  for (int64_t item = blockIdx.z; item < a.items; item += gridDim.z) {
    const int64_t n = item / a.chunks;
    const int64_t p_begin = (item - n * a.chunks) * kChunk;
    const int p_count = int(min64(pixels, p_begin + kChunk) - p_begin);
    const typename Policy::Sample sample = Policy::sample(a.op, g, n);
    const Bounds bounds = Policy::param_bounds(sample, g);
    // Block-uniform: does this tile hold any (co, col) the sample uses?
    const int active_rows = bounds.rows - co0;
    const bool live = active_rows > 0 && (has_bias_column || a.order.any_channel_below(col0, col_end, bounds.channels));
    const int steps = live ? int(ceil_div(p_count, kStageK)) : 0;

    auto decode = [&](int stage) {  // threads tid < kStageK
      const int i = stage * kStageK + tid, slot = stage % kStages;
      const int64_t p = p_begin + i;
      const int py = i < p_count ? int(p / g.w_out) : -1;
      pix_y[slot][tid] = py;
      pix_x[slot][tid] = i < p_count ? int(p - int64_t(py) * g.w_out) : 0;
    };
    auto dy_offset = [&](int slot, int k, int index) -> int64_t {
      const int py = pix_y[slot][k], co = co0 + index;
      return py >= 0 && co < bounds.rows ? offset4(a.dy_st, n, co, py, pix_x[slot][k]) : kZero;
    };
    auto x_offset = [&](int slot, int k, int index) -> int64_t {
      const int py = pix_y[slot][k], kind = col_kind[index];
      if (py < 0 || kind == 0) return kZero;
      if (kind == 2) return kOne;
      if (col_ci[index] >= bounds.channels) return kZero;
      const int iy = py * g.stride - g.padding + col_ky[index];
      const int ix = pix_x[slot][k] * g.stride - g.padding + col_kx[index];
      return iy >= 0 && iy < g.h && ix >= 0 && ix < g.w ? offset4(a.x_st, n, col_ci[index], iy, ix) : kZero;
    };
    auto issue = [&](int stage) {  // block-uniform; one commit group per stage, empty past the last
      if (stage < steps) {
        const int slot = stage % kStages;
        stage_operand<Tile>(dy_slot(stage), dy_layout, a.dy, dy_along_k, tid,
                            [&](int k, int index) { return dy_offset(slot, k, index); });
        stage_operand<Tile>(x_slot(stage), x_layout, a.x, x_along_k, tid,
                            [&](int k, int index) { return x_offset(slot, k, index); });
      }
      cp_async_commit();
    };

    acc_t grad[kMicro][kMicro];
    zero_micro(grad);
    if (steps > 0) {
      if constexpr (kTensorCores) tc.zero();
      if (tid < kStageK) {
        for (int t = 0; t < kStages; ++t) decode(t);
      }
      __syncthreads();
      for (int t = 0; t < kStages - 1; ++t) issue(t);
      for (int s = 0; s < steps; ++s) {
        cp_async_wait<kStages - 2 + RN_CONV_CORE_TEST_WAIT_SLACK>();
        __syncthreads();
        issue(s + kStages - 1);
        if (tid < kStageK) decode(s + kStages);
        gemm_stage<kTensorCores, Tile>(tc, dy_slot(s), dy_layout, x_slot(s), x_layout, grad, tx, ty, active_rows,
                                       p_count - s * kStageK);
      }
      cp_async_wait<0>();
      __syncthreads();
      gemm_result<kTensorCores>(tc, reinterpret_cast<float*>(smem), grad, tx, ty);
    }
    // Block-uniform call (the epilogue may reduce over the block).
    epilogue.fold(a.op, sample, grad, item, tiles, tile, partial, tid);
  }

  // This split's partial sums (zeros for a split without items).
  const int64_t split = blockIdx.z;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int co = co0 + ty + kSide * i;
    if (co >= g.c_out) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int col = col0 + tx + kSide * j;
      if (col >= a.cols) continue;
      epilogue.store(a.op, (split * g.c_out + co) * a.cols + col, i, j);
    }
  }
}

// Sums the splits' partials in split order and scatters the columns to the
// gradients: (ci, tap) columns to d_weight / d_weight_base [co][ci][ky][kx],
// the ones column to d_bias / d_bias_base [co]. One thread per (co, column).
// "scaled" and "plain" are the epilogue's two partial sums; either may be absent.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) reduce_param_grads_kernel(
    const typename AccType<scalar_t>::type* ws_scaled, const typename AccType<scalar_t>::type* ws_plain,
    int64_t splits, Geometry g, ReductionOrder order, int cols, scalar_t* d_weight, scalar_t* d_weight_base,
    scalar_t* d_bias, scalar_t* d_bias_base) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t total = int64_t(g.c_out) * cols;
  const int reduction = order.size();
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int co = int(e / cols), col = int(e - int64_t(co) * cols);
    acc_t scaled = acc_t(0), plain = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) {
      if (ws_scaled != nullptr) scaled += ws_scaled[s * total + e];
      if (ws_plain != nullptr) plain += ws_plain[s * total + e];
    }
    if (col < reduction) {
      int ci, tap;
      order.decode(col, ci, tap);
      const int64_t wi = weight_index(g, co, ci, tap);
      if (d_weight != nullptr) store_as(d_weight + wi, scaled);
      if (d_weight_base != nullptr) store_as(d_weight_base + wi, plain);
    } else {  // the ones column
      if (d_bias != nullptr) store_as(d_bias + co, scaled);
      if (d_bias_base != nullptr) store_as(d_bias_base + co, plain);
    }
  }
}

// d_out[n] = sum of ws[n * per_sample .. (n + 1) * per_sample), one block
// per sample, fixed-shape tree sum.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reduce_per_sample_kernel(const acc_t* ws, int64_t per_sample,
                                                                     int64_t batch, acc_t* d_out) {
  __shared__ acc_t partial[kThreads];
  const int tid = threadIdx.x;
  for (int64_t n = blockIdx.x; n < batch; n += gridDim.x) {
    acc_t s = acc_t(0);
    for (int64_t i = tid; i < per_sample; i += kThreads) s += ws[n * per_sample + i];
    block_tree_sum<kThreads>(partial, tid, s);
    if (tid == 0) d_out[n] = partial[0];
    __syncthreads();
  }
}

// ================================================================== host side
// A convolution's sizes as an op's C API states them (HyperConv2dShape,
// SlimConv2dShape: same fields): n, c_in, h, w, c_out, kh, kw, h_out, w_out,
// stride, padding.
template <typename Shape>
cudaError_t check_conv_shape(const Shape& s) {
  if (s.n < 0 || s.c_in < 0 || s.c_out < 0 || s.h < 1 || s.w < 1 || s.kh < 1 || s.kw < 1 ||
      s.stride < 1 || s.padding < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t lim = INT_MAX;
  // Every int the kernels use must fit, the reduction with its extra bias column.
  if (s.c_in > lim || s.c_out > lim || s.h > lim || s.w > lim || s.kh > lim || s.kw > lim || s.stride > lim ||
      s.padding > lim / 4 || s.h + 2 * s.padding > lim || s.w + 2 * s.padding > lim ||
      s.kh * s.kw > lim || s.h * s.w > lim || s.kh * s.kw * (s.c_in + 1) > lim ||
      s.kh * s.kw * (s.c_out + 1) > lim) {
    return cudaErrorInvalidValue;
  }
  if (s.h + 2 * s.padding < s.kh || s.w + 2 * s.padding < s.kw) return cudaErrorInvalidValue;
  if (s.h_out != (s.h + 2 * s.padding - s.kh) / s.stride + 1 || s.w_out != (s.w + 2 * s.padding - s.kw) / s.stride + 1) {
    return cudaErrorInvalidValue;
  }
  if (s.h_out * s.w_out > lim) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename Shape>
Geometry geometry_of(const Shape& s) {
  return Geometry{int(s.c_in), int(s.c_out), int(s.kh), int(s.kw), int(s.h), int(s.w),
                  int(s.h_out), int(s.w_out), int(s.stride), int(s.padding)};
}

inline unsigned grid_samples(int64_t batch) { return unsigned(min64(batch, 65535)); }

// Tensor cores for 16-bit types on sm_80+, unless RESTORENET_CUDA_TENSOR_CORES=0.
inline bool use_tensor_cores() {
  const char* setting = std::getenv("RESTORENET_CUDA_TENSOR_CORES");
  if (setting != nullptr && setting[0] == '0') return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

// Launches kernel<true> (tensor cores) or kernel<false> for scalar_t.
template <typename scalar_t, typename Launch>
cudaError_t with_tensor_core_choice(Launch&& launch_with) {
  if constexpr (IsHalfWidth<scalar_t>::value) {
    if (use_tensor_cores()) return launch_with(std::true_type{});
  }
  return launch_with(std::false_type{});
}

// The forward (kBackwardInput = false) or input-gradient pass of an op: `a`
// has everything but its geometry-derived fields, which this fills in.
template <typename Policy, bool kBackwardInput, typename Shape>
cudaError_t launch_conv_gemm(const Shape& shape, ConvGemmArgs<Policy> a, cudaStream_t stream) {
  a.g = geometry_of(shape);
  a.batch = shape.n;
  a.src_channels_last = is_channels_last(a.src_st);
  const int64_t rows = kBackwardInput ? shape.c_in : shape.c_out;
  const int64_t pixels = kBackwardInput ? shape.h * shape.w : shape.h_out * shape.w_out;
  if (shape.n == 0 || rows == 0) return cudaSuccess;  // empty output
  if (ceil_div(rows, kTileM) > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(ceil_div(pixels, kTileN)), unsigned(ceil_div(rows, kTileM)), grid_samples(shape.n));
  return with_tensor_core_choice<typename Policy::scalar_t>([&](auto tensor_cores) {
    return launch(conv_gemm_kernel<Policy, kBackwardInput, decltype(tensor_cores)::value>, grid, dim3(kThreads),
                  stream, a);
  });
}

// How the backward-params pass splits its work, and where its partials live
// in the workspace.
struct ParamPlan {
  bool scaled, plain, per_item;  // which partial sums are needed (per_item: one value per item and tile)
  bool bias_column;
  int reduction, cols;
  int64_t tiles_m, tiles_n, chunks, items, splits;
  size_t off_scaled, off_plain, off_per_item, bytes;
};

template <typename Shape>
cudaError_t plan_param_grads(DType dtype, const Shape& s, bool scaled, bool plain, bool per_item, bool bias_column,
                             ParamPlan* plan) {
  cudaError_t err = check_conv_shape(s);
  if (err != cudaSuccess) return err;
  ParamPlan p{};
  const size_t acc_size = acc_bytes(dtype);
  p.scaled = scaled;
  p.plain = plain;
  p.per_item = per_item;
  p.bias_column = bias_column;
  p.reduction = int(s.c_in * s.kh * s.kw);
  p.cols = p.reduction + (p.bias_column ? 1 : 0);
  p.tiles_m = ceil_div(s.c_out, kTileM);
  p.tiles_n = ceil_div(p.cols, kTileN);
  if (p.tiles_m > 65535) return cudaErrorInvalidValue;
  p.chunks = ceil_div(s.h_out * s.w_out, kChunk);
  p.items = s.n * p.chunks;
  // Enough blocks to fill the device a few times over, but no more splits than
  // items, than the grid allows, or than the workspace cap.
  int sms = 1;
  if (p.scaled || p.plain || p.per_item) {
    err = current_sm_count(&sms);
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = p.tiles_m * p.tiles_n;
  int64_t splits = tiles > 0 ? ceil_div(int64_t(4) * sms, tiles) : 1;
  splits = min64(splits, max64(p.items, 1));
  splits = min64(splits, 65535);
  const size_t split_bytes = size_t(s.c_out) * p.cols * acc_size * ((p.scaled ? 1 : 0) + (p.plain ? 1 : 0));
  if (split_bytes > 0) splits = min64(splits, max64(1, int64_t(kMaxSplitBytes / split_bytes)));
  p.splits = max64(splits, 1);
  const size_t region = size_t(p.splits) * s.c_out * p.cols * acc_size;
  size_t at = 0;
  p.off_scaled = at;
  if (p.scaled) at += align256(region);
  p.off_plain = at;
  if (p.plain) at += align256(region);
  p.off_per_item = at;
  if (p.per_item) at += align256(size_t(p.items) * tiles * acc_size);
  p.bytes = at;
  *plan = p;
  return cudaSuccess;
}

// Runs param_grad_kernel over the plan's grid (nothing when the output is
// empty). `a` has everything but its plan- and geometry-derived fields.
template <typename Policy, typename Shape>
cudaError_t launch_param_grad_kernel(const ParamPlan& p, const Shape& shape, ParamGradArgs<Policy> a,
                                     cudaStream_t stream) {
  a.dy_channels_last = is_channels_last(a.dy_st);
  a.g = geometry_of(shape);
  a.order = ReductionOrder{a.g.c_in, a.g.kh * a.g.kw, is_channels_last(a.x_st)};
  a.cols = p.cols;
  a.bias_column = p.bias_column;
  a.chunks = p.chunks;
  a.items = p.items;
  if (p.tiles_m * p.tiles_n == 0) return cudaSuccess;
  const dim3 grid(unsigned(p.tiles_n), unsigned(p.tiles_m), unsigned(p.splits));
  return with_tensor_core_choice<typename Policy::scalar_t>([&](auto tensor_cores) {
    return launch(param_grad_kernel<Policy, decltype(tensor_cores)::value>, grid, dim3(kThreads), stream, a);
  });
}

// Adds up the splits' partial sums into the weight and bias gradients
// (reduce_param_grads_kernel); a nullptr workspace region or gradient is skipped.
template <typename scalar_t, typename Shape>
cudaError_t launch_reduce_param_grads(const ParamPlan& p, const Shape& shape, bool channels_last_x,
                                      const typename AccType<scalar_t>::type* ws_scaled,
                                      const typename AccType<scalar_t>::type* ws_plain, void* d_weight,
                                      void* d_weight_base, void* d_bias, void* d_bias_base, cudaStream_t stream) {
  const int64_t total = int64_t(shape.c_out) * p.cols;
  if ((ws_scaled == nullptr && ws_plain == nullptr) || total == 0) return cudaSuccess;
  const Geometry g = geometry_of(shape);
  const ReductionOrder order{g.c_in, g.kh * g.kw, channels_last_x};
  const dim3 grid(unsigned(min64(ceil_div(total, kThreads), 4096)));
  return launch(reduce_param_grads_kernel<scalar_t>, grid, dim3(kThreads), stream, ws_scaled, ws_plain, p.splits, g,
                order, p.cols, static_cast<scalar_t*>(d_weight), static_cast<scalar_t*>(d_weight_base),
                static_cast<scalar_t*>(d_bias), static_cast<scalar_t*>(d_bias_base));
}

}  // namespace conv_core
}  // namespace restorenet
