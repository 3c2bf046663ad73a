// RDMA verbs transport (libibverbs): RDMA WRITE WITH IMM of header + valid payload straight into the receiver's
// registered slot; the immediate names (sender, sequence number), the receiver's completion-queue poller checks
// the header and raises the slot's flag, so consumers see the same Mailbox as with shm and tcp. GPU buffers are
// registered through dmabuf (ibv_reg_dmabuf_mr), so a send from device memory goes to the NIC without staging.
//
// UNVERIFIED ON HARDWARE: compiled in CI; no machine here has an RDMA device. Connection set-up (queue-pair
// numbers, GIDs, remote addresses and keys) is exchanged out of band as ConnInfo blobs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/m2n.h"
#include "transports/transport.h"

namespace m2n::verbs {

bool Compiled();  // built against libibverbs
Status ListDevices(std::vector<std::string>* names);  // kUnavailable "no RDMA device" when there is none

// What one side of a reliable-connected queue pair tells the other.
struct ConnInfo {
  uint32_t qp_num = 0;
  uint32_t psn = 0;
  uint16_t lid = 0;
  uint8_t port = 1;
  uint8_t gid_index = 0;
  uint8_t gid[16] = {};
  uint64_t addr = 0;  // receiver: its region's base; sender: its credit words
  uint32_t rkey = 0;
  uint32_t mtu = 0;   // enum ibv_mtu value
};
inline constexpr size_t kConnInfoBytes = 48;
std::string Serialize(const ConnInfo& info);               // kConnInfoBytes, versioned
Status Parse(const std::string& blob, ConnInfo* info);      // rejects wrong size / magic / fields

// The 32-bit immediate: 8 bits of sender, 24 low bits of the sequence number.
uint32_t EncodeImm(uint32_t sender, uint64_t seq);
void DecodeImm(uint32_t imm, uint32_t* sender, uint32_t* seq_low24);

// Endpoints whose queue pairs are connected by exchanging ConnInfo out of band, one per peer:
//   a = OpenReceiver(...); b = OpenSender(...);
//   a.Connect(s, b.LocalInfo(r)); b.Connect(r, a.LocalInfo(s));   // for every (sender s, receiver r)
struct VerbsSpec {
  std::string device;      // "" = the first device
  uint8_t port = 1;
  uint8_t gid_index = 0;   // RoCE: the GID to address peers by
  uint32_t index = 0;
  uint32_t num_peers = 1;
  uint32_t depth = 4;
  uint64_t capacity = 1 << 20;  // depth and capacity must match on both sides: they fix the slot offsets
  double timeout_s = 10.0;
};

class Connectable {
 public:
  virtual ~Connectable() = default;
  virtual Status LocalInfo(uint32_t peer, ConnInfo* info) = 0;
  virtual Status Connect(uint32_t peer, const ConnInfo& remote) = 0;
};

Status OpenVerbsReceiver(const VerbsSpec& spec, std::unique_ptr<RecvEndpoint>* out, Connectable** connect);
Status OpenVerbsSender(const VerbsSpec& spec, std::unique_ptr<SendEndpoint>* out, Connectable** connect);

}  // namespace m2n::verbs
