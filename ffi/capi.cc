#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>
#include <utility>

#include "m2n_c.h"
#include "registry.h"
#include "transports/verbs.h"

namespace m2n {
namespace {

std::mutex table_mu;
std::map<int64_t, std::shared_ptr<Entry>>& Table() {
  static auto* table = new std::map<int64_t, std::shared_ptr<Entry>>();  // never destroyed: safe at exit
  return *table;
}
int64_t next_handle = 1;

int Report(const Status& status, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0) {
    size_t n = std::min(err_len - 1, status.message.size());
    std::memcpy(err, status.message.data(), n);
    err[n] = '\0';
  }
  return static_cast<int>(status.code);
}

std::vector<std::string> Split(const char* text) {
  std::vector<std::string> parts;
  std::stringstream stream(text == nullptr ? "" : text);
  std::string part;
  while (std::getline(stream, part, ',')) parts.push_back(part);
  return parts;
}

Status BadHandle(int64_t handle, const char* want) {
  return Error(Code::kInvalidArgument, "no open M2N " + std::string(want) + " with handle " + std::to_string(handle));
}

}  // namespace

int64_t Register(std::unique_ptr<SendEndpoint> sender, std::unique_ptr<RecvEndpoint> receiver,
                 verbs::Connectable* connectable) {
  auto entry = std::make_shared<Entry>();
  entry->connectable = connectable;
  entry->sender = std::move(sender);
  entry->receiver = std::move(receiver);
  std::lock_guard<std::mutex> lock(table_mu);
  int64_t handle = next_handle++;
  Table()[handle] = std::move(entry);
  return handle;
}

std::shared_ptr<Entry> Find(int64_t handle) {
  std::lock_guard<std::mutex> lock(table_mu);
  auto it = Table().find(handle);
  return it == Table().end() ? nullptr : it->second;
}

bool Unregister(int64_t handle) {
  std::shared_ptr<Entry> entry;
  {
    std::lock_guard<std::mutex> lock(table_mu);
    auto it = Table().find(handle);
    if (it == Table().end()) return false;
    entry = std::move(it->second);
    Table().erase(it);
  }
  std::lock_guard<std::mutex> lock(entry->mu);  // wait for an operation in flight
  entry->sender.reset();
  entry->receiver.reset();
  return true;
}

}  // namespace m2n

using namespace m2n;

extern "C" {

int m2n_open_sender(const char* transport, const char* addresses, uint32_t index, uint32_t num_receivers,
                    uint64_t capacity, double timeout_s, int64_t* handle, char* err, size_t err_len) {
  EndpointSpec spec;
  spec.transport = transport == nullptr ? "" : transport;
  spec.index = index;
  spec.num_peers = num_receivers;
  spec.capacity = capacity;
  spec.timeout_s = timeout_s;
  spec.addresses = Split(addresses);
  std::unique_ptr<SendEndpoint> endpoint;
  Status status = OpenSender(spec, &endpoint);
  if (status.ok()) *handle = Register(std::move(endpoint), nullptr);
  return Report(status, err, err_len);
}

int m2n_open_receiver(const char* transport, const char* address, uint32_t index, uint32_t num_senders,
                      uint32_t depth, uint64_t capacity, double timeout_s, int64_t* handle, char* err,
                      size_t err_len) {
  EndpointSpec spec;
  spec.transport = transport == nullptr ? "" : transport;
  spec.index = index;
  spec.num_peers = num_senders;
  spec.depth = depth;
  spec.capacity = capacity;
  spec.timeout_s = timeout_s;
  spec.addresses = {address == nullptr ? "" : address};
  std::unique_ptr<RecvEndpoint> endpoint;
  Status status = OpenReceiver(spec, &endpoint);
  if (status.ok()) *handle = Register(nullptr, std::move(endpoint));
  return Report(status, err, err_len);
}

int m2n_close(int64_t handle) { return Unregister(handle) ? 0 : static_cast<int>(Code::kInvalidArgument); }

int m2n_address(int64_t handle, char* out, size_t out_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->receiver == nullptr) return Report(BadHandle(handle, "receiver"), out, out_len);
  return Report(Status{Code::kOk, entry->receiver->address()}, out, out_len);
}

int m2n_send(int64_t handle, uint32_t receiver, uint32_t layer, uint32_t micro_batch, const void* data,
             uint64_t nbytes, double timeout_s, char* err, size_t err_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->sender == nullptr) return Report(BadHandle(handle, "sender"), err, err_len);
  std::lock_guard<std::mutex> lock(entry->mu);
  if (entry->sender == nullptr) return Report(BadHandle(handle, "sender"), err, err_len);
  return Report(entry->sender->Send(receiver, layer, micro_batch, data, nbytes, timeout_s), err, err_len);
}

int m2n_recv(int64_t handle, uint32_t sender, uint32_t layer, uint32_t micro_batch, void* out,
             uint64_t out_capacity, uint64_t* nbytes, double timeout_s, char* err, size_t err_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->receiver == nullptr) return Report(BadHandle(handle, "receiver"), err, err_len);
  std::lock_guard<std::mutex> lock(entry->mu);
  if (entry->receiver == nullptr) return Report(BadHandle(handle, "receiver"), err, err_len);
  return Report(entry->receiver->Recv(sender, layer, micro_batch, out, out_capacity, nbytes, timeout_s), err,
                err_len);
}

int m2n_recv_all(int64_t handle, const uint32_t* senders, uint32_t count, uint32_t layer, uint32_t micro_batch,
                 void* const* outs, const uint64_t* capacities, uint64_t* nbytes, double timeout_s, char* err,
                 size_t err_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->receiver == nullptr) return Report(BadHandle(handle, "receiver"), err, err_len);
  std::lock_guard<std::mutex> lock(entry->mu);
  if (entry->receiver == nullptr) return Report(BadHandle(handle, "receiver"), err, err_len);
  return Report(entry->receiver->RecvAll(senders, count, layer, micro_batch, outs, capacities, nbytes, timeout_s),
                err, err_len);
}

int m2n_set_tolerant(int64_t handle, int on) {
  auto entry = Find(handle);
  if (entry == nullptr) return static_cast<int>(Code::kInvalidArgument);
  std::lock_guard<std::mutex> lock(entry->mu);
  if (entry->sender != nullptr) entry->sender->SetTolerant(on != 0);
  if (entry->receiver != nullptr) entry->receiver->SetTolerant(on != 0);
  return 0;
}

int m2n_adopt(int64_t handle, int64_t from) {
  auto to = Find(handle), other = Find(from);
  if (to == nullptr || other == nullptr || to == other) return static_cast<int>(Code::kInvalidArgument);
  std::scoped_lock lock(to->mu, other->mu);
  if ((to->sender == nullptr) != (other->sender == nullptr)) return static_cast<int>(Code::kInvalidArgument);
  bool tolerant = to->sender != nullptr ? to->sender->tolerant() : to->receiver->tolerant();
  std::swap(to->sender, other->sender);
  std::swap(to->receiver, other->receiver);
  std::swap(to->connectable, other->connectable);
  if (to->sender != nullptr) to->sender->SetTolerant(tolerant);  // the handle keeps its settings
  if (to->receiver != nullptr) to->receiver->SetTolerant(tolerant);
  return 0;
}

int m2n_mark_lost(int64_t handle, uint32_t peer) {
  auto entry = Find(handle);
  if (entry == nullptr) return static_cast<int>(Code::kInvalidArgument);
  std::lock_guard<std::mutex> lock(entry->mu);
  if (entry->sender != nullptr) entry->sender->MarkLost(peer);
  if (entry->receiver != nullptr) entry->receiver->MarkLost(peer);
  return 0;
}

int m2n_lost(int64_t handle, uint8_t* out, uint32_t n) {
  auto entry = Find(handle);
  if (entry == nullptr) return static_cast<int>(Code::kInvalidArgument);
  std::lock_guard<std::mutex> lock(entry->mu);
  const std::vector<uint8_t>* lost = entry->sender != nullptr     ? &entry->sender->lost()
                                     : entry->receiver != nullptr ? &entry->receiver->lost()
                                                                  : nullptr;
  if (lost == nullptr || lost->size() != n) return static_cast<int>(Code::kInvalidArgument);
  std::memcpy(out, lost->data(), n);
  return 0;
}

int m2n_validate_header(const void* bytes, size_t n, uint32_t sender, uint32_t num_senders, uint64_t seq,
                        uint32_t layer, uint32_t micro_batch, uint64_t capacity, char* err, size_t err_len) {
  if (n < sizeof(MessageHeader)) {
    return Report(Error(Code::kDataLoss, "malformed M2N message rejected: " + std::to_string(n) +
                                             " bytes is shorter than the 32-byte header"),
                  err, err_len);
  }
  MessageHeader header;
  std::memcpy(&header, bytes, sizeof(header));
  Expectation expect{sender, num_senders, seq, layer, micro_batch, capacity};
  return Report(ValidateHeader(header, expect), err, err_len);
}

int m2n_debug_inject(int64_t handle, uint32_t sender, uint64_t seq, const void* bytes, size_t n, char* err,
                     size_t err_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->receiver == nullptr) return Report(BadHandle(handle, "receiver"), err, err_len);
  const Mailbox& box = entry->receiver->mailbox();
  if (sender >= box.geometry().num_senders) {
    return Report(Error(Code::kInvalidArgument, "sender out of range"), err, err_len);
  }
  uint64_t room = sizeof(MessageHeader) + box.geometry().capacity;
  MessageHeader header{};
  std::memcpy(&header, bytes, std::min<size_t>(n, sizeof(header)));
  std::memcpy(box.header(sender, seq), &header, sizeof(header));
  if (n > sizeof(header)) {
    std::memcpy(box.payload(sender, seq), static_cast<const uint8_t*>(bytes) + sizeof(header),
                std::min<uint64_t>(n, room) - sizeof(header));
  }
  box.Publish(sender, seq);
  return 0;
}

uint32_t m2n_header_bytes(void) { return sizeof(MessageHeader); }
uint32_t m2n_message_magic(void) { return kMessageMagic; }

long m2n_set_thread_poll_us(long us) { return SetThreadPollMicros(us); }

int m2n_has_verbs(void) { return verbs::Compiled() ? 1 : 0; }

int m2n_verbs_devices(char* out, size_t out_len) {
  std::vector<std::string> names;
  Status status = verbs::ListDevices(&names);
  if (!status.ok()) return Report(status, out, out_len);
  std::string joined;
  for (const auto& name : names) joined += (joined.empty() ? "" : ",") + name;
  return Report(Status{Code::kOk, joined}, out, out_len);
}

int m2n_verbs_open(int is_sender, const char* device, uint32_t index, uint32_t num_peers, uint32_t depth,
                   uint64_t capacity, double timeout_s, int64_t* handle, char* err, size_t err_len) {
  verbs::VerbsSpec spec;
  spec.device = device == nullptr ? "" : device;
  spec.index = index;
  spec.num_peers = num_peers;
  spec.depth = depth;
  spec.capacity = capacity;
  spec.timeout_s = timeout_s;
  verbs::Connectable* connectable = nullptr;
  Status status;
  if (is_sender) {
    std::unique_ptr<SendEndpoint> endpoint;
    status = verbs::OpenVerbsSender(spec, &endpoint, &connectable);
    if (status.ok()) *handle = Register(std::move(endpoint), nullptr, connectable);
  } else {
    std::unique_ptr<RecvEndpoint> endpoint;
    status = verbs::OpenVerbsReceiver(spec, &endpoint, &connectable);
    if (status.ok()) *handle = Register(nullptr, std::move(endpoint), connectable);
  }
  return Report(status, err, err_len);
}

int m2n_verbs_local_info(int64_t handle, uint32_t peer, char* out, size_t out_len, char* err, size_t err_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->connectable == nullptr) {
    return Report(BadHandle(handle, "verbs endpoint"), err, err_len);
  }
  verbs::ConnInfo info;
  Status status = entry->connectable->LocalInfo(peer, &info);
  if (!status.ok()) return Report(status, err, err_len);
  std::string blob = verbs::Serialize(info);
  if (out_len < blob.size()) return Report(Error(Code::kInvalidArgument, "output too small"), err, err_len);
  std::memcpy(out, blob.data(), blob.size());
  return 0;
}

int m2n_verbs_connect(int64_t handle, uint32_t peer, const char* blob, size_t n, char* err, size_t err_len) {
  auto entry = Find(handle);
  if (entry == nullptr || entry->connectable == nullptr) {
    return Report(BadHandle(handle, "verbs endpoint"), err, err_len);
  }
  verbs::ConnInfo info;
  Status status = verbs::Parse(std::string(blob, n), &info);
  if (status.ok()) status = entry->connectable->Connect(peer, info);
  return Report(status, err, err_len);
}

uint32_t m2n_verbs_encode_imm(uint32_t sender, uint64_t seq) { return verbs::EncodeImm(sender, seq); }

int m2n_verbs_conninfo_roundtrip(const char* blob, size_t n, char* out, size_t out_len) {
  verbs::ConnInfo info;
  Status status = verbs::Parse(std::string(blob, n), &info);
  if (!status.ok()) return Report(status, out, out_len);
  std::string again = verbs::Serialize(info);
  if (out_len < again.size()) return Report(Error(Code::kInvalidArgument, "output too small"), out, out_len);
  std::memcpy(out, again.data(), again.size());
  return 0;
}

}  // extern "C"
