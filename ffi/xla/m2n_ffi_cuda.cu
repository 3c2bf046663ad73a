// XLA FFI handlers for the CUDA platform: m2n_send / m2n_recv, stream-ordered with no host synchronisation in
// the handler. The shm and tcp transports move host memory, so each call stages through pinned host memory:
//   send: D2H copy of count, tag and the whole packet buffer into pinned staging -> host function on the stream
//         sends rows[:count] (only the valid rows go on the wire; the D2H copy moves the full capacity because
//         count lives on the device and reading it first would be a host sync) -> `sent` = count (D2D).
//   recv: D2H copy of the expected tag -> host function on the stream receives into pinned staging -> H2D copies
//         of rows and count.
// Host functions run in stream order, so one staging buffer per (endpoint, peer, direction) is reused safely by
// the programs of one stream; do not drive the same endpoint from two streams. A host function cannot return an
// error to XLA: a failure inside one is kept and returned by the next m2n call of this process (and logged).
// The verbs transport (dmabuf-registered device memory) needs no staging; it is not wired in here yet.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace m2n {
namespace {

struct Pinned {
  void* data = nullptr;
  size_t bytes = 0;
};

std::mutex pool_mu;
std::map<std::tuple<int64_t, int32_t, int>, Pinned>& Pool() {
  static auto* pool = new std::map<std::tuple<int64_t, int32_t, int>, Pinned>();
  return *pool;
}

std::mutex error_mu;
std::string& DeferredError() {
  static auto* error = new std::string();
  return *error;
}

void Defer(const std::string& message) {
  std::fprintf(stderr, "msjax m2n (cuda): %s\n", message.c_str());
  std::lock_guard<std::mutex> lock(error_mu);
  if (DeferredError().empty()) DeferredError() = message;
}

ffi::Error TakeDeferred() {
  std::lock_guard<std::mutex> lock(error_mu);
  if (DeferredError().empty()) return ffi::Error::Success();
  std::string message = "an earlier stream-ordered M2N operation failed: " + DeferredError();
  DeferredError().clear();
  return ffi::Error(ffi::ErrorCode::kAborted, message);
}

// Pinned staging for (handle, peer, direction): a 64-byte head (count at 0, tag (layer, micro-batch) at 16),
// then `bytes` of rows.
ffi::ErrorOr<Pinned> Staging(int64_t handle, int32_t peer, int direction, size_t bytes) {
  std::lock_guard<std::mutex> lock(pool_mu);
  Pinned& p = Pool()[{handle, peer, direction}];
  if (p.bytes < bytes + 64) {
    if (p.data != nullptr) cudaFreeHost(p.data);
    p = Pinned{};
    if (cudaHostAlloc(&p.data, bytes + 64, cudaHostAllocPortable) != cudaSuccess) {
      return ffi::Unexpected(ffi::Error::Internal("m2n: cudaHostAlloc of " + std::to_string(bytes) + " bytes failed"));
    }
    p.bytes = bytes + 64;
  }
  return p;
}

constexpr size_t kTagOffset = 16;

struct Job {
  int64_t handle;
  int32_t peer;
  float timeout_s;
  size_t row_bytes, capacity_bytes;
  Pinned staging;
};

const int32_t* StagedTag(const Job* job) {
  return reinterpret_cast<const int32_t*>(static_cast<uint8_t*>(job->staging.data) + kTagOffset);
}

void SendOnHost(void* arg) {
  Job* job = static_cast<Job*>(arg);
  int32_t count = *static_cast<int32_t*>(job->staging.data);
  const int32_t* tag = StagedTag(job);
  auto entry = Find(job->handle);
  if (entry == nullptr || entry->sender == nullptr) {
    Defer("m2n_send: sender handle closed before the stream reached the send");
  } else if (count < 0 || static_cast<size_t>(count) * job->row_bytes > job->capacity_bytes) {
    Defer("m2n_send: count " + std::to_string(count) + " out of range");
  } else if (tag[0] < 0 || tag[1] < 0) {
    Defer("m2n_send: layer and micro-batch must be >= 0");
  } else {
    std::lock_guard<std::mutex> lock(entry->mu);
    Status s = entry->sender->Send(job->peer, tag[0], tag[1],
                                   static_cast<uint8_t*>(job->staging.data) + 64, count * job->row_bytes,
                                   job->timeout_s);
    if (!s.ok()) Defer(s.message);
  }
  delete job;
}

void RecvOnHost(void* arg) {
  Job* job = static_cast<Job*>(arg);
  auto* rows = static_cast<uint8_t*>(job->staging.data) + 64;
  int32_t* count = static_cast<int32_t*>(job->staging.data);
  const int32_t* tag = StagedTag(job);
  *count = 0;
  auto entry = Find(job->handle);
  if (entry == nullptr || entry->receiver == nullptr) {
    Defer("m2n_recv: receiver handle closed before the stream reached the receive");
    std::memset(rows, 0, job->capacity_bytes);
  } else {
    std::lock_guard<std::mutex> lock(entry->mu);
    uint64_t nbytes = 0;
    Status s = tag[0] < 0 || tag[1] < 0
                   ? Error(Code::kInvalidArgument, "m2n_recv: layer and micro-batch must be >= 0")
                   : entry->receiver->Recv(job->peer, tag[0], tag[1], rows, job->capacity_bytes, &nbytes,
                                           job->timeout_s);
    if (!s.ok() || nbytes % job->row_bytes != 0) {
      Defer(s.ok() ? "m2n_recv: message is not a whole number of rows" : s.message);
      nbytes = 0;
    }
    std::memset(rows + nbytes, 0, job->capacity_bytes - nbytes);
    *count = static_cast<int32_t>(nbytes / job->row_bytes);
  }
  delete job;
}

ffi::Error Cuda(cudaError_t rc, const char* what) {
  if (rc == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("m2n: ") + what + ": " + cudaGetErrorString(rc));
}

ffi::Error SendCuda(cudaStream_t stream, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::S32> tag,
                    ffi::Buffer<ffi::S32> /*after: ordering only*/, ffi::Result<ffi::Buffer<ffi::S32>> sent,
                    int64_t handle, int32_t receiver, float timeout_s) {
  if (auto e = TakeDeferred(); e.failure()) return e;
  auto dims = rows.dimensions();
  if (dims.size() == 0 || dims[0] == 0) return ffi::Error::InvalidArgument("m2n_send: rows need a capacity dim");
  auto staging = Staging(handle, receiver, 0, rows.size_bytes());
  if (staging.has_error()) return staging.error();
  Pinned p = staging.value();
  if (tag.element_count() != 2) return ffi::Error::InvalidArgument("m2n_send: tag must hold (layer, micro_batch)");
  if (auto e = Cuda(cudaMemcpyAsync(p.data, count.typed_data(), 4, cudaMemcpyDeviceToHost, stream), "count D2H");
      e.failure())
    return e;
  if (auto e = Cuda(cudaMemcpyAsync(static_cast<uint8_t*>(p.data) + kTagOffset, tag.typed_data(), 8,
                                    cudaMemcpyDeviceToHost, stream),
                    "tag D2H");
      e.failure())
    return e;
  if (auto e = Cuda(cudaMemcpyAsync(static_cast<uint8_t*>(p.data) + 64, rows.untyped_data(), rows.size_bytes(),
                                    cudaMemcpyDeviceToHost, stream),
                    "rows D2H");
      e.failure())
    return e;
  auto* job = new Job{handle, receiver, timeout_s, rows.size_bytes() / dims[0], rows.size_bytes(), p};
  if (auto e = Cuda(cudaLaunchHostFunc(stream, SendOnHost, job), "cudaLaunchHostFunc"); e.failure()) {
    delete job;
    return e;
  }
  return Cuda(cudaMemcpyAsync(sent->typed_data(), count.typed_data(), 4, cudaMemcpyDeviceToDevice, stream),
              "sent D2D");
}

ffi::Error RecvCuda(cudaStream_t stream, ffi::Buffer<ffi::S32> tag, ffi::Buffer<ffi::S32> after,
                    ffi::Result<ffi::AnyBuffer> rows, ffi::Result<ffi::Buffer<ffi::S32>> count, int64_t handle,
                    int32_t sender, float timeout_s) {
  if (auto e = TakeDeferred(); e.failure()) return e;
  auto dims = rows->dimensions();
  if (dims.size() == 0 || dims[0] == 0) return ffi::Error::InvalidArgument("m2n_recv: rows need a capacity dim");
  auto staging = Staging(handle, sender, 1, rows->size_bytes());
  if (staging.has_error()) return staging.error();
  Pinned p = staging.value();
  if (tag.element_count() != 2) return ffi::Error::InvalidArgument("m2n_recv: tag must hold (layer, micro_batch)");
  if (auto e = Cuda(cudaMemcpyAsync(static_cast<uint8_t*>(p.data) + kTagOffset, tag.typed_data(), 8,
                                    cudaMemcpyDeviceToHost, stream),
                    "tag D2H");
      e.failure())
    return e;
  auto* job = new Job{handle, sender, timeout_s, rows->size_bytes() / dims[0], rows->size_bytes(), p};
  if (auto e = Cuda(cudaLaunchHostFunc(stream, RecvOnHost, job), "cudaLaunchHostFunc"); e.failure()) {
    delete job;
    return e;
  }
  if (auto e = Cuda(cudaMemcpyAsync(rows->untyped_data(), static_cast<uint8_t*>(p.data) + 64, rows->size_bytes(),
                                    cudaMemcpyHostToDevice, stream),
                    "rows H2D");
      e.failure())
    return e;
  return Cuda(cudaMemcpyAsync(count->typed_data(), p.data, 4, cudaMemcpyHostToDevice, stream), "count H2D");
}

}  // namespace
}  // namespace m2n

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2nSendCuda, m2n::SendCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's compute stream
                                  .Arg<xla::ffi::AnyBuffer>()                     // rows [capacity, ...] (device)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // count [] (device)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // tag [2] (layer, mb)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // after []: orders this send
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()         // sent [] = count
                                  .Attr<int64_t>("handle")                        // sender endpoint
                                  .Attr<int32_t>("receiver")                      // receiver index
                                  .Attr<float>("timeout_s"));                     // seconds before an error

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2nRecvCuda, m2n::RecvCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()  // XLA's compute stream
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // tag [2] expected (layer, mb)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()         // after []: orders this receive
                                  .Ret<xla::ffi::AnyBuffer>()                     // rows [capacity, ...] (device)
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()         // count [] (device)
                                  .Attr<int64_t>("handle")                        // receiver endpoint
                                  .Attr<int32_t>("sender")                        // sender index
                                  .Attr<float>("timeout_s"));                     // seconds before an error
