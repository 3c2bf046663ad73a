// The one interface every M2N transport implements. A sender endpoint is sender `index` of M talking to N
// receivers; a receiver endpoint is receiver `index` of N holding one pre-registered region with a slot ring for
// each of its M senders. Both keep one sequence counter per channel and nothing else: no group set-up per
// message, no synchronisation beyond the completion flags in the receiver's region.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/m2n.h"

namespace m2n {

struct EndpointSpec {
  std::string transport;               // "shm" | "tcp" | "loopback" (| "verbs", set up through VerbsEndpoint)
  uint32_t index = 0;                  // this endpoint's index among the senders (or receivers)
  uint32_t num_peers = 1;              // receivers for a sender, senders for a receiver
  uint32_t depth = 4;                  // ring slots per sender
  uint64_t capacity = 1 << 20;         // bytes per slot
  double timeout_s = 10.0;             // default for send / receive / connect
  // Receivers: shm -> the channel name (segment "/msjax-m2n-<name>-r<index>"); tcp -> "host:port" to bind
  // (port 0 picks one; address() tells which); loopback -> the channel name (registered in this process under
  // (name, index)). Senders: one address per receiver, in receiver order.
  std::vector<std::string> addresses;
};

class SendEndpoint {
 public:
  virtual ~SendEndpoint() = default;
  // Sends `nbytes` of `data` to `receiver`, tagged (layer, micro_batch). Returns when the bytes are in the
  // receiver's slot (shm, loopback) or handed to the kernel (tcp); the receiver's completion flag tells it the rest.
  Status Send(uint32_t receiver, uint32_t layer, uint32_t micro_batch, const void* data, uint64_t nbytes,
              double timeout_s = -1);
  uint32_t index() const { return spec_.index; }
  uint32_t num_receivers() const { return spec_.num_peers; }
  const EndpointSpec& spec() const { return spec_; }
  // Tolerant: a send to a receiver that is gone (kUnavailable, kDeadlineExceeded) marks it lost and succeeds,
  // and every later send to it is dropped at once: a program keeps running past a peer's death, and its host
  // reads lost() afterwards (the runner re-runs the step without that peer).
  void SetTolerant(bool on) { tolerant_ = on; }
  bool tolerant() const { return tolerant_; }
  const std::vector<uint8_t>& lost() const { return lost_; }
  // The caller knows receiver `peer` is gone (the runner took it out of the deployment): as if a send had failed.
  void MarkLost(uint32_t peer) {
    if (peer < lost_.size()) lost_[peer] = 1;
  }

 protected:
  explicit SendEndpoint(EndpointSpec spec)
      : spec_(std::move(spec)), next_seq_(spec_.num_peers, 0), lost_(spec_.num_peers, 0) {}
  virtual Status Write(uint32_t receiver, const MessageHeader& header, const void* data,
                       Clock::time_point deadline) = 0;
  EndpointSpec spec_;
  std::vector<uint64_t> next_seq_;
  bool tolerant_ = false;
  std::vector<uint8_t> lost_;  // per receiver: 1 once lost (tolerant only)
};

inline constexpr uint64_t kNotReceived = ~uint64_t{0};

class RecvEndpoint {
 public:
  virtual ~RecvEndpoint() = default;
  // Waits for the next message from `sender`, which must be tagged (layer, micro_batch), and copies its payload
  // into `out` (at most `out_capacity` bytes). A malformed message breaks the channel: this and every later
  // receive from that sender fail with the first error.
  Status Recv(uint32_t sender, uint32_t layer, uint32_t micro_batch, void* out, uint64_t out_capacity,
              uint64_t* nbytes, double timeout_s = -1);
  // The next message of each of `count` distinct senders, all tagged (layer, micro_batch): sender senders[k]'s
  // payload into outs[k] (at most capacities[k] bytes), its size into nbytes[k]. What an M2N round asks of a
  // receiver: the messages are taken as they come, not in sender order (tcp reads every one that has not begun
  // straight from its socket, whichever is first). Errors as for Recv; the first failing sender's (in the
  // order given) is returned, and the messages that did arrive are consumed: nbytes[k] says which (kNotReceived
  // for a sender whose message the caller does not hold), so a caller can wait again for just the missing ones.
  Status RecvAll(const uint32_t* senders, uint32_t count, uint32_t layer, uint32_t micro_batch, void* const* outs,
                 const uint64_t* capacities, uint64_t* nbytes, double timeout_s = -1);
  // Tolerant: a sender that is gone (kUnavailable, kDeadlineExceeded) is marked lost and its message reads as 0
  // bytes, now and on every later receive, while the other senders' messages are still taken; a malformed
  // message is still an error. See SendEndpoint::SetTolerant.
  void SetTolerant(bool on) { tolerant_ = on; }
  bool tolerant() const { return tolerant_; }
  const std::vector<uint8_t>& lost() const { return lost_; }
  void MarkLost(uint32_t peer) {
    if (peer < lost_.size()) lost_[peer] = 1;
  }
  virtual std::string address() const = 0;
  uint32_t index() const { return spec_.index; }
  uint32_t num_senders() const { return spec_.num_peers; }
  uint64_t capacity() const { return spec_.capacity; }
  const Mailbox& mailbox() const { return mailbox_; }

 protected:
  explicit RecvEndpoint(EndpointSpec spec)
      : spec_(std::move(spec)), expected_seq_(spec_.num_peers, 0), broken_(spec_.num_peers),
        lost_(spec_.num_peers, 0) {}
  virtual const PeerCheck* peer_check(uint32_t sender) const = 0;
  // One attempt at every message: each one's status into statuses[k]; returns the first failure in order.
  Status RecvAllOnce(const uint32_t* senders, uint32_t count, uint32_t layer, uint32_t micro_batch,
                     void* const* outs, const uint64_t* capacities, uint64_t* nbytes, double timeout_s,
                     Status* statuses);
  // Waits for the messages `expects` describe and puts message k's payload in outs[k], its status in
  // statuses[k] (all OK on entry). By default one after another, each copied out of its slot, stopping at the
  // first failure (the rest keep a "not taken" error and stay unconsumed); tcp reads those that have not begun
  // from their sockets, straight into `outs`, in the order they come.
  virtual void TakeAll(const std::vector<Expectation>& expects, void* const* outs, const uint64_t* capacities,
                       uint64_t* nbytes, Clock::time_point deadline, Status* statuses);
  // The default's loop over the messages `which` (indices into `expects`, ascending), from their slots.
  void TakeFromSlots(const std::vector<Expectation>& expects, const std::vector<size_t>& which, void* const* outs,
                     const uint64_t* capacities, uint64_t* nbytes, Clock::time_point deadline, Status* statuses);
  static Status NotTaken(const Expectation& expect);
  // Called once the slot of (sender, seq) is free again (verbs returns a credit to the sender).
  virtual void OnConsumed(uint32_t sender, uint64_t seq) {}
  EndpointSpec spec_;
  Mailbox mailbox_;
  std::vector<uint64_t> expected_seq_;
  std::vector<Status> broken_;
  bool tolerant_ = false;
  std::vector<uint8_t> lost_;  // per sender: 1 once lost (tolerant only)
};

Status OpenSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out);
Status OpenReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out);

// Per transport (transports/shm.cc, transports/tcp.cc, transports/loopback.cc).
Status OpenShmSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out);
Status OpenShmReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out);
Status OpenTcpSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out);
Status OpenTcpReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out);
Status OpenLoopbackSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out);
Status OpenLoopbackReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out);

}  // namespace m2n
