// What the transports whose senders write straight into a receiver's region have in common: shm (the region in a
// POSIX shared-memory segment, senders in other processes) and loopback (the region in private memory, senders in
// the same process). Only where the memory comes from and how a missing peer shows differ; setting the region up,
// a sender's checks when it attaches, and the write itself are this one code, and the receive path is
// RecvEndpoint's (Mailbox::Receive) for both.
#pragma once

#include <sys/mman.h>

#include <string>
#include <vector>

#include "transports/transport.h"

namespace m2n {

// A channel name as shm and loopback take it: 1-200 characters without '/' (shm puts it in a segment name).
Status CheckChannelName(const std::string& transport, const std::string& name);

// A mapping unmapped when it goes (a shared segment's, or anonymous private memory).
struct Mapping {
  void* memory = MAP_FAILED;
  uint64_t bytes = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;  // one owner: a copy would unmap twice
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { Unmap(); }
  void Unmap() {
    if (memory != MAP_FAILED) munmap(memory, bytes);
    memory = MAP_FAILED;
  }
};

// A receiver whose senders write into its region themselves.
class DirectReceiver : public RecvEndpoint {
 protected:
  explicit DirectReceiver(EndpointSpec spec) : RecvEndpoint(std::move(spec)) {}
  Geometry geometry() const { return {spec_.num_peers, spec_.depth, spec_.capacity}; }
  // Lays this receiver's region out in `memory` (RegionBytes(geometry()) zeroed bytes) and makes it the mailbox.
  Status InitRegion(void* memory, uint64_t bytes, FutexScope scope);
};

// A sender that writes header and payload straight into its receivers' slots.
class DirectSender : public SendEndpoint {
 protected:
  explicit DirectSender(EndpointSpec spec) : SendEndpoint(std::move(spec)), boxes_(spec_.num_peers) {}
  // Takes receiver r's region once attached as boxes_[r]: this sender's index must be one the receiver was set up
  // for, and a receiver's smaller slot capacity becomes this sender's limit. `who` names the receiver in errors.
  Status Adopt(uint32_t r, const std::string& who);
  // Waits for the slot to be free (back-pressure), copies payload then header, raises the flag.
  Status Write(uint32_t receiver, const MessageHeader& header, const void* data,
               Clock::time_point deadline) override;
  // Checked while a send waits for a free slot, after each quiet wait round (nullptr: nothing to check).
  virtual const PeerCheck* receiver_check(uint32_t receiver) const = 0;

  std::vector<Mailbox> boxes_;
};

}  // namespace m2n
