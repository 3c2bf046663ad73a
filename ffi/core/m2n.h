// M2N core: M senders write messages into pre-registered receive slots of N receivers, with no XLA types.
//
// The semantics are those of RDMA write-with-immediate (paper §5): a sender writes a header and the valid bytes
// straight into a slot the receiver registered up front, then raises the slot's completion flag; the receiver
// waits on that flag only. There is no per-message group set-up and no synchronisation beyond the flags: a slot
// is written by exactly one sender (its ring position is fixed by (sender, sequence number)), and the receiver
// lowers the flag when it has copied the message out, which is what lets the sender reuse the slot.
//
// Receive region (one per receiver, shared memory or private memory the transport writes into):
//   RegionHeader | slot[sender 0][ring 0] ... slot[sender 0][ring depth-1] | slot[sender 1][ring 0] ...
//   slot = SlotControl (64 B: completion flag) | MessageHeader (64 B, 32 used) | payload (capacity, 64-aligned)
// Every header is validated against what the receiver expects (magic, sender range and identity, sequence
// number, layer and micro-batch, byte count against the slot and output capacity) from a private copy, so a
// malformed or hostile header is rejected with a readable error and never steers a copy out of bounds.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace m2n {

inline constexpr uint32_t kMessageMagic = 0x314E324D;  // "M2N1" in memory order
inline constexpr uint32_t kRegionMagic = 0x524E324D;   // "M2NR"
inline constexpr uint32_t kRegionVersion = 1;

// What travels in front of every message's payload (on the wire for TCP; in the slot for shm and verbs).
struct MessageHeader {
  uint32_t magic;
  uint32_t sender;       // index of the sending endpoint in [0, num_senders)
  uint32_t layer;        // tag: the model layer (or any user tag)
  uint32_t micro_batch;  // tag: the micro-batch
  uint64_t seq;          // per (sender, receiver) channel, 0, 1, 2, ...
  uint64_t nbytes;       // valid payload bytes that follow (only the valid rows travel)
};
static_assert(sizeof(MessageHeader) == 32, "MessageHeader is a wire format");

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,   // the caller asked for something impossible (bad index, too large a message)
  kDeadlineExceeded = 2,  // the peer did not deliver or free a slot in time
  kUnavailable = 3,       // the peer is gone (process exited, connection closed) or no device
  kDataLoss = 4,          // a malformed message was received and rejected
  kInternal = 5,          // a system call failed
  kNotTaken = 6,          // a message of a multi-sender receive left waiting because another one failed first
};


struct Status {
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
  static Status Ok() { return {}; }
};

inline Status Error(Code code, std::string message) { return Status{code, std::move(message)}; }

// A peer that is gone (its process exited, its connection closed) or stopped answering: what a tolerant
// endpoint (SetTolerant) records as a lost peer instead of failing.
inline bool IsPeerLoss(const Status& status) {
  return status.code == Code::kUnavailable || status.code == Code::kDeadlineExceeded;
}

using Clock = std::chrono::steady_clock;

// Shape of one receiver's region: a ring of `depth` slots per sender, each holding up to `capacity` bytes.
struct Geometry {
  uint32_t num_senders = 1;
  uint32_t depth = 4;
  uint64_t capacity = 1 << 20;
};

// What a receiver expects the next message from one sender to be.
struct Expectation {
  uint32_t sender;
  uint32_t num_senders;
  uint64_t seq;
  uint32_t layer;
  uint32_t micro_batch;
  uint64_t capacity;  // the smaller of the slot capacity and the caller's output buffer
};

// The header parser: OK, or kDataLoss with a message naming the field that is wrong.
Status ValidateHeader(const MessageHeader& header, const Expectation& expect);

// Checks only what can be checked before the receiver knows which message it is waiting for (the TCP
// receiver thread uses it on every header as it comes off the wire).
Status ValidateWireHeader(const MessageHeader& header, uint32_t connected_sender, uint32_t num_senders,
                          uint64_t expected_seq, uint64_t capacity);

std::string Describe(const MessageHeader& header);

// Completion flag of one slot; futex-waitable across processes.
struct alignas(64) SlotControl {
  std::atomic<uint32_t> full;     // 0: free (the sender may write), 1: a complete message is in the slot
  std::atomic<uint32_t> waiters;  // processes asleep on `full`: a flip wakes them only if there are any
};

struct alignas(64) RegionHeader {
  std::atomic<uint32_t> ready;  // kRegionMagic once the receiver has initialised the region
  uint32_t version;
  uint32_t num_senders;
  uint32_t depth;
  uint64_t capacity;
  int32_t receiver_pid;
  uint32_t receiver_index;
  std::atomic<int32_t> sender_pids[256];  // attached senders (shm), so a receiver notices one that died
};
inline constexpr uint32_t kMaxSenders = 256;

// Who may wait on a region's completion flags: any process that maps it (the default; what shm needs), or only
// the process that allocated it (loopback: private memory, so the cheaper process-private futex). Every view of
// one region must say the same: a waiter and a waker with different scopes use different futex keys, and the
// wake is lost.
enum class FutexScope { kShared, kPrivate };

// Called while waiting; a non-OK status aborts the wait (e.g. the peer process has exited).
struct PeerCheck {
  virtual ~PeerCheck() = default;
  virtual Status Check() const = 0;
};

// A view of one receive region. Does not own the memory.
class Mailbox {
 public:
  static uint64_t SlotStride(uint64_t capacity);
  static uint64_t RegionBytes(const Geometry& geometry);
  // Byte offset of the slot of (sender, seq) from the region's start (what a remote writer targets).
  static uint64_t SlotOffset(const Geometry& geometry, uint32_t sender, uint64_t seq);
  // Writes the region header and clears every flag; `memory` must hold RegionBytes(geometry) zeroed bytes.
  static Status Init(void* memory, uint64_t bytes, const Geometry& geometry, uint32_t receiver_index);
  // Checks a region someone else initialised (a sender attaching to a receiver's shared memory). `scope`: see
  // FutexScope (kPrivate only for memory no other process maps).
  static Status Attach(void* memory, uint64_t bytes, Mailbox* out, FutexScope scope = FutexScope::kShared);

  Mailbox() = default;
  const Geometry& geometry() const { return geometry_; }
  RegionHeader* region() const { return reinterpret_cast<RegionHeader*>(base_); }
  uint8_t* slot(uint32_t sender, uint64_t seq) const;
  SlotControl* control(uint32_t sender, uint64_t seq) const;
  MessageHeader* header(uint32_t sender, uint64_t seq) const;
  uint8_t* payload(uint32_t sender, uint64_t seq) const;

  // Producer side (the shm sender, or the TCP/verbs receiver thread on behalf of a remote sender).
  Status WaitWritable(uint32_t sender, uint64_t seq, Clock::time_point deadline, const PeerCheck* peer) const;
  void Publish(uint32_t sender, uint64_t seq) const;

  // Consumer side: waits for the message `expect` describes, validates its header, copies the payload to `out`
  // and frees the slot. `nbytes` gets the payload size.
  Status Receive(const Expectation& expect, void* out, uint64_t out_capacity, uint64_t* nbytes,
                 Clock::time_point deadline, const PeerCheck* peer) const;
  // The error a receive that waited in vain returns.
  static Status TimedOut(const Expectation& expect);

 private:
  uint8_t* base_ = nullptr;
  uint64_t bytes_ = 0;
  Geometry geometry_;
  FutexScope scope_ = FutexScope::kShared;
};

// Waits until `control->full` != `value` or the deadline passes: spins briefly, yields the CPU for a while (the
// peer may need this core: processes often outnumber cores), then sleeps on a futex in short rounds, checking
// `peer` between rounds so a dead peer is noticed within ~50 ms. Returns true if the flag changed.
bool WaitWhileEquals(SlotControl* control, uint32_t value, Clock::time_point deadline, const PeerCheck* peer,
                     Status* peer_status, FutexScope scope = FutexScope::kShared);
// The calling thread's poll budget for its waits from now on, in µs (< 0: back to MSJAX_M2N_POLL_US);
// returns the previous setting (-1: the process-wide one).
long SetThreadPollMicros(long us);
// Sets the flag and wakes sleepers, if any (no system call otherwise).
void SetAndWake(SlotControl* control, uint32_t value, FutexScope scope = FutexScope::kShared);

Clock::time_point DeadlineAfter(double seconds);

}  // namespace m2n
