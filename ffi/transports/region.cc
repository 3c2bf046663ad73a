#include "transports/region.h"

#include <cstring>

namespace m2n {

Status CheckChannelName(const std::string& transport, const std::string& name) {
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos) {
    return Error(Code::kInvalidArgument,
                 transport + " channel name must be 1-200 characters without '/', got '" + name + "'");
  }
  return Status::Ok();
}

Status DirectReceiver::InitRegion(void* memory, uint64_t bytes, FutexScope scope) {
  if (Status s = Mailbox::Init(memory, bytes, geometry(), spec_.index); !s.ok()) return s;
  return Mailbox::Attach(memory, bytes, &mailbox_, scope);
}

Status DirectSender::Adopt(uint32_t r, const std::string& who) {
  const Mailbox& box = boxes_[r];
  if (spec_.index >= box.geometry().num_senders) {
    return Error(Code::kInvalidArgument, "sender index " + std::to_string(spec_.index) + " out of range: " + who +
                                             " was set up for " + std::to_string(box.geometry().num_senders) +
                                             " senders");
  }
  if (box.geometry().capacity < spec_.capacity) spec_.capacity = box.geometry().capacity;
  return Status::Ok();
}

Status DirectSender::Write(uint32_t receiver, const MessageHeader& header, const void* data,
                           Clock::time_point deadline) {
  const Mailbox& box = boxes_[receiver];
  if (header.nbytes > box.geometry().capacity) {
    return Error(Code::kInvalidArgument, "message exceeds the receiver's slot capacity");
  }
  if (Status s = box.WaitWritable(header.sender, header.seq, deadline, receiver_check(receiver)); !s.ok()) {
    return s;
  }
  std::memcpy(box.payload(header.sender, header.seq), data, header.nbytes);
  std::memcpy(box.header(header.sender, header.seq), &header, sizeof(header));
  box.Publish(header.sender, header.seq);
  return Status::Ok();
}

}  // namespace m2n
