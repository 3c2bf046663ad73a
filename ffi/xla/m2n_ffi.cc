// XLA FFI handlers for the CPU platform: m2n_send / m2n_recv inside jitted programs.
//
// A packet is a fixed-capacity buffer [capacity, ...] whose first `count` rows are valid (msjax/comm/m2n.py);
// only those rows go on the wire. The endpoint is named by the `handle` attribute, opened from Python
// (msjax.comm.native) before the program runs.
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace m2n {
namespace {

ffi::Error ToFfi(const Status& status) {
  if (status.ok()) return ffi::Error::Success();
  switch (status.code) {
    case Code::kInvalidArgument:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, status.message);
    case Code::kDeadlineExceeded:
      return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, status.message);
    case Code::kUnavailable:
      return ffi::Error(ffi::ErrorCode::kUnavailable, status.message);
    case Code::kDataLoss:
      return ffi::Error(ffi::ErrorCode::kDataLoss, status.message);
    default:
      return ffi::Error(ffi::ErrorCode::kInternal, status.message);
  }
}

// Bytes of one row of a [capacity, ...] buffer.
ffi::ErrorOr<size_t> RowBytes(const ffi::AnyBuffer& buffer) {
  auto dims = buffer.dimensions();
  if (dims.size() == 0 || dims[0] == 0) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("m2n: rows must have a leading capacity dimension > 0"));
  }
  return buffer.size_bytes() / static_cast<size_t>(dims[0]);
}

// tag [2] int32 = (layer, micro-batch): an operand, so one compiled program serves every layer.
ffi::ErrorOr<std::pair<uint32_t, uint32_t>> Tag(const ffi::Buffer<ffi::S32>& tag, const char* op) {
  if (tag.element_count() != 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(op) + ": tag must hold (layer, micro_batch)"));
  }
  const int32_t* t = tag.typed_data();
  if (t[0] < 0 || t[1] < 0) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(op) + ": layer and micro-batch must be >= 0"));
  }
  return std::make_pair(static_cast<uint32_t>(t[0]), static_cast<uint32_t>(t[1]));
}

// `nbytes` received into `out` (`capacity` bytes) as whole rows: the padding after them zeroed (not stale), their
// count into `count`; kDataLoss when the bytes are not whole rows.
ffi::Error WholeRows(const std::string& op, uint32_t sender, uint8_t* out, uint64_t capacity, uint64_t nbytes,
                     size_t row_bytes, int32_t* count) {
  if (nbytes % row_bytes != 0) {
    return ffi::Error(ffi::ErrorCode::kDataLoss, op + ": " + std::to_string(nbytes) + " bytes from sender " +
                                                     std::to_string(sender) + " is not a whole number of " +
                                                     std::to_string(row_bytes) + "-byte rows");
  }
  std::memset(out + nbytes, 0, capacity - nbytes);
  *count = static_cast<int32_t>(nbytes / row_bytes);
  return ffi::Error::Success();
}

ffi::Error SendImpl(ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::S32> tag,
                    ffi::Buffer<ffi::S32> /*after: ordering only*/, ffi::Result<ffi::Buffer<ffi::S32>> sent, int64_t handle, int32_t receiver, float timeout_s) {
  auto row_bytes = RowBytes(rows);
  if (row_bytes.has_error()) return row_bytes.error();
  auto tags = Tag(tag, "m2n_send");
  if (tags.has_error()) return tags.error();
  int32_t n = count.typed_data()[0];
  int64_t capacity = rows.dimensions()[0];
  if (n < 0 || n > capacity) {
    return ffi::Error::InvalidArgument("m2n_send: count " + std::to_string(n) + " not in [0, " +
                                       std::to_string(capacity) + "]");
  }
  auto entry = Find(handle);
  if (entry == nullptr || entry->sender == nullptr) {
    return ffi::Error::InvalidArgument("m2n_send: no open sender with handle " + std::to_string(handle));
  }
  std::lock_guard<std::mutex> lock(entry->mu);
  Status status = entry->sender->Send(static_cast<uint32_t>(receiver), tags.value().first, tags.value().second,
                                      rows.untyped_data(), static_cast<uint64_t>(n) * row_bytes.value(), timeout_s);
  sent->typed_data()[0] = n;
  return ToFfi(status);
}

ffi::Error RecvImpl(ffi::Buffer<ffi::S32> tag, ffi::Buffer<ffi::S32> after, ffi::Result<ffi::AnyBuffer> rows,
                    ffi::Result<ffi::Buffer<ffi::S32>> count, int64_t handle, int32_t sender, float timeout_s) {
  auto row_bytes = RowBytes(*rows);
  if (row_bytes.has_error()) return row_bytes.error();
  auto tags = Tag(tag, "m2n_recv");
  if (tags.has_error()) return tags.error();
  auto entry = Find(handle);
  if (entry == nullptr || entry->receiver == nullptr) {
    return ffi::Error::InvalidArgument("m2n_recv: no open receiver with handle " + std::to_string(handle));
  }
  std::lock_guard<std::mutex> lock(entry->mu);
  uint64_t nbytes = 0;
  auto* out = static_cast<uint8_t*>(rows->untyped_data());
  Status status = entry->receiver->Recv(static_cast<uint32_t>(sender), tags.value().first, tags.value().second, out,
                                        rows->size_bytes(), &nbytes, timeout_s);
  if (!status.ok()) return ToFfi(status);
  return WholeRows("m2n_recv", static_cast<uint32_t>(sender), out, rows->size_bytes(), nbytes, row_bytes.value(),
                   count->typed_data());
}

// One packet from each of several senders (a round's share of this receiver), taken as they come: counts [k],
// then rows_j [capacity_j, ...] for senders[j].
ffi::Error RecvAllImpl(ffi::Buffer<ffi::S32> tag, ffi::Buffer<ffi::S32> after,
                       ffi::Result<ffi::Buffer<ffi::S32>> counts, ffi::RemainingRets rows,
                       int64_t handle, ffi::Span<const int32_t> senders, float timeout_s) {
  auto tags = Tag(tag, "m2n_recv_all");
  if (tags.has_error()) return tags.error();
  size_t k = senders.size();
  if (counts->element_count() != k || rows.size() != k) {
    return ffi::Error::InvalidArgument("m2n_recv_all: " + std::to_string(k) + " senders need " +
                                       std::to_string(k) + " counts and row buffers, got " +
                                       std::to_string(counts->element_count()) + " and " +
                                       std::to_string(rows.size()));
  }
  auto entry = Find(handle);
  if (entry == nullptr || entry->receiver == nullptr) {
    return ffi::Error::InvalidArgument("m2n_recv_all: no open receiver with handle " + std::to_string(handle));
  }
  std::vector<uint32_t> from(k);
  std::vector<void*> outs(k);
  std::vector<uint64_t> capacities(k), nbytes(k, 0), row_bytes(k);
  for (size_t j = 0; j < k; ++j) {
    if (senders[j] < 0) return ffi::Error::InvalidArgument("m2n_recv_all: sender indices must be >= 0");
    auto buffer = rows.get<ffi::AnyBuffer>(j);
    if (buffer.has_error()) return buffer.error();
    auto bytes = RowBytes(*buffer.value());
    if (bytes.has_error()) return bytes.error();
    from[j] = static_cast<uint32_t>(senders[j]);
    outs[j] = buffer.value()->untyped_data();
    capacities[j] = buffer.value()->size_bytes();
    row_bytes[j] = bytes.value();
  }
  {
    std::lock_guard<std::mutex> lock(entry->mu);
    Status status = entry->receiver->RecvAll(from.data(), static_cast<uint32_t>(k), tags.value().first,
                                             tags.value().second, outs.data(), capacities.data(), nbytes.data(),
                                             timeout_s);
    if (!status.ok()) return ToFfi(status);
  }
  for (size_t j = 0; j < k; ++j) {
    ffi::Error done = WholeRows("m2n_recv_all", from[j], static_cast<uint8_t*>(outs[j]), capacities[j], nbytes[j],
                                row_bytes[j], counts->typed_data() + j);
    if (done.failure()) return done;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace m2n

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2nSend, m2n::SendImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()                    // rows [capacity, ...]
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // count [] valid rows
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // tag [2] (layer, micro-batch)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // after []: orders this send
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()        // sent [] = count (an effect token)
                                  .Attr<int64_t>("handle")                       // sender endpoint
                                  .Attr<int32_t>("receiver")                     // receiver index in [0, N)
                                  .Attr<float>("timeout_s"));                    // seconds before a clear error

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2nRecv, m2n::RecvImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // tag [2] expected (layer, mb)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // after []: orders this receive
                                  .Ret<xla::ffi::AnyBuffer>()                    // rows [capacity, ...]
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()        // count [] valid rows received
                                  .Attr<int64_t>("handle")                       // receiver endpoint
                                  .Attr<int32_t>("sender")                       // sender index in [0, M)
                                  .Attr<float>("timeout_s"));                    // seconds before a clear error

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2nRecvAll, m2n::RecvAllImpl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // tag [2] expected (layer, mb)
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()        // after []: orders this receive
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()        // counts [k] valid rows each
                                  .RemainingRets()                               // rows_j [capacity_j, ...]
                                  .Attr<int64_t>("handle")                       // receiver endpoint
                                  .Attr<xla::ffi::Span<const int32_t>>("senders")  // sender indices, k of them
                                  .Attr<float>("timeout_s"));                    // seconds before a clear error
