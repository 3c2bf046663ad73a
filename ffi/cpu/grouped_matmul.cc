// XLA FFI handler for the CPU platform: the grouped matmul of an expert FFN, reading only the experts that have
// rows, each expert's weights once per block of rows, in place.
//
//   out[i] = x[i] @ w[layer, g(i)]      rows sorted by group, group g holding group_sizes[g] rows in order;
//                                       rows past sum(group_sizes) are padding and come out zero
//
// Why not XLA: its CPU `ragged_dot` copies w transposed on every call, the dense form (pallas_kernels/
// grouped_gemm.py) reads and multiplies every expert for every row (at decode, 64 experts read for the 8 a
// token is routed to), and slicing one layer out of stacked weights is a copy of that layer. Here w stays where
// it is (all layers stacked, the layer an operand), and an expert's weights stream once per block of up to
// kRowBlock rows: at decode, where a group holds a row or two, a step reads the routed experts and nothing else.
//
// Work items are (group, row block, column block) and run on XLA's intra-op thread pool with the calling
// thread taking items too, so the call finishes even when the pool has no thread free.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace m2n {
namespace {

constexpr int64_t kRowBlock = 8;    // rows that share one pass over an expert's weights
constexpr int64_t kColBlock = 512;  // output columns per item: [kRowBlock, kColBlock] float accumulators = 16 KiB

inline float BF16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t FloatToBF16(float f) {  // round to nearest even, as XLA converts
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Element conversions: float is stored as itself, bfloat16 as its uint16_t bits.
inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) { return BF16ToFloat(v); }
template <typename O>
inline O FromFloat(float v);
template <>
inline float FromFloat<float>(float v) { return v; }
template <>
inline uint16_t FromFloat<uint16_t>(float v) { return FloatToBF16(v); }

// acc[r, 0:nc] += sum_k x[r, k] * w[k, 0:nc] for r < nr: w is [K, ld] row-major; each row of w is read once and
// used for every row of x. The inner loop over columns vectorises (contiguous, no aliasing).
template <typename W, int kRows>
void Block(const float* __restrict x, int64_t K, const W* __restrict w, int64_t ld, int64_t nc,
           float* __restrict acc) {
  for (int64_t k = 0; k < K; ++k) {
    const W* __restrict wk = w + k * ld;
    float a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = x[r * K + k];
    for (int r = 0; r < kRows; ++r) {
      float* __restrict out = acc + r * kColBlock;
      const float ar = a[r];
      for (int64_t j = 0; j < nc; ++j) out[j] += ar * ToFloat(wk[j]);
    }
  }
}

template <typename W>
void BlockAnyRows(const float* x, int64_t nr, int64_t K, const W* w, int64_t ld, int64_t nc, float* acc) {
  switch (nr) {
    case 1: return Block<W, 1>(x, K, w, ld, nc, acc);
    case 2: return Block<W, 2>(x, K, w, ld, nc, acc);
    case 3: return Block<W, 3>(x, K, w, ld, nc, acc);
    case 4: return Block<W, 4>(x, K, w, ld, nc, acc);
    case 5: return Block<W, 5>(x, K, w, ld, nc, acc);
    case 6: return Block<W, 6>(x, K, w, ld, nc, acc);
    case 7: return Block<W, 7>(x, K, w, ld, nc, acc);
    default: return Block<W, 8>(x, K, w, ld, nc, acc);
  }
}

struct Item {
  int64_t group, row0, rows, col0, cols;
};

// What the tasks share; held by shared_ptr so a task the pool starts late (after the caller has returned, every
// item done) only reads the counters and leaves.
struct Work {
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;
};

// One item: rows [row0, row0 + rows) of group `group`, columns [col0, col0 + cols).
template <typename T, typename O>
void RunItem(const Item& it, const T* x, const T* w_layer, int64_t K, int64_t N, O* out) {
  alignas(64) float acc[kRowBlock * kColBlock];
  std::vector<float> xs(static_cast<size_t>(it.rows * K));  // the rows as float, [rows, K]
  const T* xr = x + it.row0 * K;
  for (int64_t i = 0; i < it.rows * K; ++i) xs[i] = ToFloat(xr[i]);
  std::fill(acc, acc + it.rows * kColBlock, 0.0f);
  BlockAnyRows<T>(xs.data(), it.rows, K, w_layer + it.group * K * N + it.col0, N, it.cols, acc);
  for (int64_t r = 0; r < it.rows; ++r) {
    O* dst = out + (it.row0 + r) * N + it.col0;
    for (int64_t j = 0; j < it.cols; ++j) dst[j] = FromFloat<O>(acc[r * kColBlock + j]);
  }
}

template <typename T, typename O>
void Drain(Work& work, const T* x, const T* w_layer, int64_t K, int64_t N, O* out) {
  const int64_t total = static_cast<int64_t>(work.items.size());
  for (int64_t i = work.next.fetch_add(1); i < total; i = work.next.fetch_add(1)) {
    RunItem<T, O>(work.items[i], x, w_layer, K, N, out);
    if (work.done.fetch_add(1) + 1 == total) {
      std::lock_guard<std::mutex> lock(work.mu);
      work.all_done.notify_all();
    }
  }
}

template <typename T, typename O>
ffi::Error Run(ffi::ThreadPool& pool, const T* x, const T* w, int64_t layer, const int32_t* sizes, int64_t rows,
               int64_t K, int64_t N, int64_t groups, O* out) {
  auto work = std::make_shared<Work>();
  int64_t row = 0;
  for (int64_t g = 0; g < groups; ++g) {
    int64_t size = sizes[g];
    if (size < 0 || row + size > rows) {
      return ffi::Error::InvalidArgument("grouped_matmul_cpu: group_sizes must be >= 0 and sum to at most the " +
                                         std::to_string(rows) + " rows, group " + std::to_string(g) + " has " +
                                         std::to_string(size) + " at row " + std::to_string(row));
    }
    for (int64_t r0 = row; r0 < row + size; r0 += kRowBlock) {
      for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
        work->items.push_back({g, r0, std::min(kRowBlock, row + size - r0), c0, std::min(kColBlock, N - c0)});
      }
    }
    row += size;
  }
  std::memset(out + row * N, 0, static_cast<size_t>((rows - row) * N) * sizeof(O));  // padding rows
  const T* w_layer = w + layer * groups * K * N;
  const int64_t total = static_cast<int64_t>(work->items.size());
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work, x, w_layer, K, N, out] { Drain<T, O>(*work, x, w_layer, K, N, out); });
  }
  Drain<T, O>(*work, x, w_layer, K, N, out);
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done.load() == total; });
  return ffi::Error::Success();
}

ffi::Error GroupedMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> layer,
                             ffi::Buffer<ffi::S32> group_sizes, ffi::Result<ffi::AnyBuffer> out) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("grouped_matmul_cpu: x must be [rows, k] and w [layers, groups, k, n]");
  }
  const int64_t rows = xd[0], K = xd[1], layers = wd[0], groups = wd[1], N = wd[3];
  if (wd[2] != K || group_sizes.element_count() != static_cast<size_t>(groups) ||
      out->dimensions().size() != 2 || out->dimensions()[0] != rows || out->dimensions()[1] != N) {
    return ffi::Error::InvalidArgument("grouped_matmul_cpu: shapes disagree (x [rows, k], w [layers, groups, k, "
                                       "n], group_sizes [groups], out [rows, n])");
  }
  const auto dtype = x.element_type(), out_dtype = out->element_type();
  if (w.element_type() != dtype || (out_dtype != dtype && out_dtype != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("grouped_matmul_cpu: x and w must have one dtype, out that one or float32");
  }
  int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) {
    return ffi::Error::InvalidArgument("grouped_matmul_cpu: layer " + std::to_string(l) + " not in [0, " +
                                       std::to_string(layers) + ")");
  }
  const int32_t* sizes = group_sizes.typed_data();
  void* o = out->untyped_data();
  if (dtype == ffi::DataType::F32) {
    return Run<float, float>(pool, static_cast<const float*>(x.untyped_data()),
                             static_cast<const float*>(w.untyped_data()), l, sizes, rows, K, N, groups,
                             static_cast<float*>(o));
  }
  if (dtype == ffi::DataType::BF16) {
    auto* xb = static_cast<const uint16_t*>(x.untyped_data());
    auto* wb = static_cast<const uint16_t*>(w.untyped_data());
    if (out_dtype == ffi::DataType::F32) {
      return Run<uint16_t, float>(pool, xb, wb, l, sizes, rows, K, N, groups, static_cast<float*>(o));
    }
    return Run<uint16_t, uint16_t>(pool, xb, wb, l, sizes, rows, K, N, groups, static_cast<uint16_t*>(o));
  }
  return ffi::Error::InvalidArgument("grouped_matmul_cpu: float32 or bfloat16 only");
}

}  // namespace
}  // namespace m2n

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedMatmulCpu, m2n::GroupedMatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()              // x [rows, k], sorted by group
                                  .Arg<xla::ffi::AnyBuffer>()              // w [layers, groups, k, n]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // layer [] which of w's layers
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // group_sizes [groups]
                                  .Ret<xla::ffi::AnyBuffer>());            // out [rows, n]
