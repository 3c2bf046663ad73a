// Device-independent parts of the verbs transport, built with or without libibverbs and unit-tested here.
#include <cstring>

#include "transports/verbs.h"

namespace m2n::verbs {
namespace {
constexpr uint32_t kConnMagic = 0x434E324D;  // "M2NC"
}

std::string Serialize(const ConnInfo& info) {
  std::string blob(kConnInfoBytes, '\0');
  char* p = blob.data();
  auto put = [&p](const void* v, size_t n) {
    std::memcpy(p, v, n);
    p += n;
  };
  put(&kConnMagic, 4);
  put(&info.qp_num, 4);
  put(&info.psn, 4);
  put(&info.lid, 2);
  put(&info.port, 1);
  put(&info.gid_index, 1);
  put(info.gid, 16);
  put(&info.addr, 8);
  put(&info.rkey, 4);
  put(&info.mtu, 4);
  return blob;
}

Status Parse(const std::string& blob, ConnInfo* info) {
  if (blob.size() != kConnInfoBytes) {
    return Error(Code::kInvalidArgument, "verbs connection info must be " + std::to_string(kConnInfoBytes) +
                                             " bytes, got " + std::to_string(blob.size()));
  }
  const char* p = blob.data();
  auto get = [&p](void* v, size_t n) {
    std::memcpy(v, p, n);
    p += n;
  };
  uint32_t magic;
  get(&magic, 4);
  if (magic != kConnMagic) return Error(Code::kInvalidArgument, "verbs connection info has a bad magic");
  ConnInfo out;
  get(&out.qp_num, 4);
  get(&out.psn, 4);
  get(&out.lid, 2);
  get(&out.port, 1);
  get(&out.gid_index, 1);
  get(out.gid, 16);
  get(&out.addr, 8);
  get(&out.rkey, 4);
  get(&out.mtu, 4);
  if (out.qp_num == 0 || out.qp_num > 0xFFFFFF) {
    return Error(Code::kInvalidArgument, "verbs connection info: queue-pair number must be in [1, 2^24)");
  }
  if (out.psn > 0xFFFFFF) return Error(Code::kInvalidArgument, "verbs connection info: psn must be < 2^24");
  if (out.mtu < 1 || out.mtu > 5) return Error(Code::kInvalidArgument, "verbs connection info: mtu enum not in 1..5");
  *info = out;
  return Status::Ok();
}

uint32_t EncodeImm(uint32_t sender, uint64_t seq) {
  return ((sender & 0xFFu) << 24) | static_cast<uint32_t>(seq & 0xFFFFFFu);
}

void DecodeImm(uint32_t imm, uint32_t* sender, uint32_t* seq_low24) {
  *sender = imm >> 24;
  *seq_low24 = imm & 0xFFFFFFu;
}

}  // namespace m2n::verbs
