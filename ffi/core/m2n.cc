#include "core/m2n.h"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <thread>

namespace m2n {
namespace {

constexpr uint64_t kAlign = 64;
constexpr uint64_t kSlotPrefix = 128;  // SlotControl (64) + MessageHeader padded to 64
constexpr auto kWaitRound = std::chrono::milliseconds(50);

// How long a waiter keeps polling (yielding the core between polls) before it sleeps on the futex:
// MSJAX_M2N_POLL_US, default 200 µs. Longer buys latency with CPU time: worth it when every process owns a core
// (a sleeping vCPU can take hundreds of µs to wake; bench/pipeline_pinned.py polls 20 ms), not when processes
// outnumber cores (a poller then takes the core from the peer it waits for).
// A thread may override it for its own waits (m2n_set_thread_poll_us): a process that waits a whole step for
// a peer on its own core (the engine waiting on an attention process) should sleep at once instead.
thread_local long thread_poll_us = -1;  // < 0: the process-wide budget

std::chrono::microseconds PollBudget() {
  static const std::chrono::microseconds budget = [] {
    const char* text = std::getenv("MSJAX_M2N_POLL_US");
    long us = text != nullptr ? std::strtol(text, nullptr, 10) : 200;
    return std::chrono::microseconds(us < 0 ? 0 : us);
  }();
  return thread_poll_us >= 0 ? std::chrono::microseconds(thread_poll_us) : budget;
}

uint64_t RoundUp(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

long Futex(const std::atomic<uint32_t>* word, int op, FutexScope scope, uint32_t value, const timespec* timeout) {
  // FUTEX_PRIVATE_FLAG only for a region no other process maps: the kernel then keys the futex by address alone
  // (no page lookup), but a process-shared word needs the shared key, which waiter and waker must agree on.
  if (scope == FutexScope::kPrivate) op |= FUTEX_PRIVATE_FLAG;
  return syscall(SYS_futex, reinterpret_cast<const uint32_t*>(word), op, value, timeout, nullptr, 0);
}

}  // namespace

long SetThreadPollMicros(long us) {
  long previous = thread_poll_us;
  thread_poll_us = us < 0 ? -1 : us;
  return previous;
}

std::string Describe(const MessageHeader& h) {
  std::ostringstream s;
  s << "{magic=0x" << std::hex << h.magic << std::dec << " sender=" << h.sender << " layer=" << h.layer
    << " micro_batch=" << h.micro_batch << " seq=" << h.seq << " nbytes=" << h.nbytes << "}";
  return s.str();
}

Status ValidateWireHeader(const MessageHeader& h, uint32_t connected_sender, uint32_t num_senders,
                          uint64_t expected_seq, uint64_t capacity) {
  auto reject = [&](const std::string& why) {
    return Error(Code::kDataLoss, "malformed M2N message rejected: " + why + " in header " + Describe(h));
  };
  if (h.magic != kMessageMagic) return reject("bad magic (not an M2N message, or a torn write)");
  if (h.sender >= num_senders) {
    return reject("sender " + std::to_string(h.sender) + " out of range [0, " + std::to_string(num_senders) + ")");
  }
  if (h.sender != connected_sender) {
    return reject("sender " + std::to_string(h.sender) + " arrived on sender " + std::to_string(connected_sender) +
                  "'s channel");
  }
  if (h.seq != expected_seq) {
    return reject("sequence number " + std::to_string(h.seq) + ", expected " + std::to_string(expected_seq) +
                  " (a message was lost, duplicated or reordered)");
  }
  if (h.nbytes > capacity) {
    return reject("byte count " + std::to_string(h.nbytes) + " exceeds the receive capacity " +
                  std::to_string(capacity));
  }
  return Status::Ok();
}

Status ValidateHeader(const MessageHeader& h, const Expectation& e) {
  Status status = ValidateWireHeader(h, e.sender, e.num_senders, e.seq, e.capacity);
  if (!status.ok()) return status;
  if (h.layer != e.layer || h.micro_batch != e.micro_batch) {
    return Error(Code::kDataLoss, "M2N message out of step: expected layer " + std::to_string(e.layer) +
                                      " micro-batch " + std::to_string(e.micro_batch) + " from sender " +
                                      std::to_string(e.sender) + ", got " + Describe(h));
  }
  return Status::Ok();
}

Clock::time_point DeadlineAfter(double seconds) {
  if (!(seconds > 0)) seconds = 0;
  if (seconds > 1e6) seconds = 1e6;
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

void SetAndWake(SlotControl* control, uint32_t value, FutexScope scope) {
  control->full.store(value, std::memory_order_seq_cst);
  // Pairs with the waiter's seq_cst increment of `waiters` before it sleeps: either this load sees the waiter,
  // or the waiter's futex call sees the new value and does not sleep.
  if (control->waiters.load(std::memory_order_seq_cst) != 0) {
    Futex(&control->full, FUTEX_WAKE, scope, INT32_MAX, nullptr);
  }
}

bool WaitWhileEquals(SlotControl* control, uint32_t value, Clock::time_point deadline, const PeerCheck* peer,
                     Status* peer_status, FutexScope scope) {
  auto* word = &control->full;
  for (int i = 0; i < 200; ++i) {  // well under a microsecond per round: the peer is running right now
    if (word->load(std::memory_order_acquire) != value) return true;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  auto yield_until = Clock::now() + PollBudget();
  for (int i = 0;; ++i) {  // the peer may be waiting for this core
    if (word->load(std::memory_order_acquire) != value) return true;
    if ((i & 15) == 15 && Clock::now() >= yield_until) break;
    sched_yield();
  }
  for (bool slept_full_round = false;; ) {
    if (word->load(std::memory_order_acquire) != value) return true;
    if (peer != nullptr && slept_full_round) {  // a liveness check may read /proc: only after a quiet round
      Status status = peer->Check();
      if (!status.ok()) {
        if (word->load(std::memory_order_acquire) != value) return true;  // it delivered before it went
        *peer_status = std::move(status);
        return false;
      }
    }
    auto now = Clock::now();
    if (now >= deadline) return false;
    auto wait = std::min<Clock::duration>(deadline - now, kWaitRound);
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wait).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    control->waiters.fetch_add(1, std::memory_order_seq_cst);
    long rc = Futex(word, FUTEX_WAIT, scope, value, &ts);  // returns at once if the word already changed (EAGAIN)
    slept_full_round = rc != 0 && errno == ETIMEDOUT;
    control->waiters.fetch_sub(1, std::memory_order_seq_cst);
  }
}

uint64_t Mailbox::SlotStride(uint64_t capacity) { return kSlotPrefix + RoundUp(capacity); }

uint64_t Mailbox::RegionBytes(const Geometry& g) {
  return RoundUp(sizeof(RegionHeader)) + uint64_t{g.num_senders} * g.depth * SlotStride(g.capacity);
}

Status Mailbox::Init(void* memory, uint64_t bytes, const Geometry& g, uint32_t receiver_index) {
  if (g.num_senders == 0 || g.num_senders > kMaxSenders) {
    return Error(Code::kInvalidArgument, "num_senders must be in [1, " + std::to_string(kMaxSenders) + "], got " +
                                             std::to_string(g.num_senders));
  }
  if (g.depth == 0 || g.depth > 1024) {
    return Error(Code::kInvalidArgument, "ring depth must be in [1, 1024], got " + std::to_string(g.depth));
  }
  if (bytes < RegionBytes(g)) return Error(Code::kInvalidArgument, "receive region too small for its geometry");
  auto* region = new (memory) RegionHeader();
  region->version = kRegionVersion;
  region->num_senders = g.num_senders;
  region->depth = g.depth;
  region->capacity = g.capacity;
  region->receiver_pid = static_cast<int32_t>(getpid());
  region->receiver_index = receiver_index;
  for (auto& pid : region->sender_pids) pid.store(0, std::memory_order_relaxed);
  Mailbox box;
  box.base_ = static_cast<uint8_t*>(memory);
  box.bytes_ = bytes;
  box.geometry_ = g;
  for (uint32_t s = 0; s < g.num_senders; ++s) {
    for (uint32_t d = 0; d < g.depth; ++d) new (box.control(s, d)) SlotControl{{0}, {0}};
  }
  region->ready.store(kRegionMagic, std::memory_order_release);
  return Status::Ok();
}

Status Mailbox::Attach(void* memory, uint64_t bytes, Mailbox* out, FutexScope scope) {
  if (bytes < sizeof(RegionHeader)) return Error(Code::kDataLoss, "receive region smaller than its header");
  auto* region = static_cast<RegionHeader*>(memory);
  if (region->ready.load(std::memory_order_acquire) != kRegionMagic) {
    return Error(Code::kUnavailable, "receive region not initialised yet");
  }
  if (region->version != kRegionVersion) {
    return Error(Code::kDataLoss, "receive region version " + std::to_string(region->version) + ", expected " +
                                      std::to_string(kRegionVersion));
  }
  Geometry g{region->num_senders, region->depth, region->capacity};
  if (g.num_senders == 0 || g.num_senders > kMaxSenders || g.depth == 0 || g.depth > 1024 ||
      RegionBytes(g) > bytes) {
    return Error(Code::kDataLoss, "receive region header inconsistent with its size");
  }
  out->base_ = static_cast<uint8_t*>(memory);
  out->bytes_ = bytes;
  out->geometry_ = g;
  out->scope_ = scope;
  return Status::Ok();
}

uint64_t Mailbox::SlotOffset(const Geometry& g, uint32_t sender, uint64_t seq) {
  uint64_t index = uint64_t{sender} * g.depth + seq % g.depth;
  return RoundUp(sizeof(RegionHeader)) + index * SlotStride(g.capacity);
}

uint8_t* Mailbox::slot(uint32_t sender, uint64_t seq) const { return base_ + SlotOffset(geometry_, sender, seq); }
SlotControl* Mailbox::control(uint32_t sender, uint64_t seq) const {
  return reinterpret_cast<SlotControl*>(slot(sender, seq));
}
MessageHeader* Mailbox::header(uint32_t sender, uint64_t seq) const {
  return reinterpret_cast<MessageHeader*>(slot(sender, seq) + 64);
}
uint8_t* Mailbox::payload(uint32_t sender, uint64_t seq) const { return slot(sender, seq) + kSlotPrefix; }

Status Mailbox::WaitWritable(uint32_t sender, uint64_t seq, Clock::time_point deadline, const PeerCheck* peer) const {
  Status peer_status;
  if (WaitWhileEquals(control(sender, seq), 1, deadline, peer, &peer_status, scope_)) return Status::Ok();
  if (!peer_status.ok()) return peer_status;
  return Error(Code::kDeadlineExceeded, "M2N send timed out: receive slot for sender " + std::to_string(sender) +
                                            " seq " + std::to_string(seq) +
                                            " still full (the receiver stopped consuming or died)");
}

void Mailbox::Publish(uint32_t sender, uint64_t seq) const { SetAndWake(control(sender, seq), 1, scope_); }

Status Mailbox::TimedOut(const Expectation& expect) {
  return Error(Code::kDeadlineExceeded,
               "M2N receive timed out waiting for sender " + std::to_string(expect.sender) + " (layer " +
                   std::to_string(expect.layer) + ", micro-batch " + std::to_string(expect.micro_batch) +
                   ", seq " + std::to_string(expect.seq) + "): the sender died or never sent");
}

Status Mailbox::Receive(const Expectation& expect, void* out, uint64_t out_capacity, uint64_t* nbytes,
                        Clock::time_point deadline, const PeerCheck* peer) const {
  if (expect.sender >= geometry_.num_senders) {
    return Error(Code::kInvalidArgument, "sender " + std::to_string(expect.sender) + " out of range [0, " +
                                             std::to_string(geometry_.num_senders) + ")");
  }
  SlotControl* slot_control = control(expect.sender, expect.seq);
  Status peer_status;
  if (!WaitWhileEquals(slot_control, 0, deadline, peer, &peer_status, scope_)) {
    if (!peer_status.ok()) return peer_status;
    return TimedOut(expect);
  }
  MessageHeader h;
  std::memcpy(&h, header(expect.sender, expect.seq), sizeof(h));  // validate a private copy, not shared memory
  Expectation bounded = expect;
  bounded.capacity = std::min<uint64_t>(geometry_.capacity, out_capacity);
  Status status = ValidateHeader(h, bounded);
  if (status.ok()) {
    std::memcpy(out, payload(expect.sender, expect.seq), h.nbytes);
    *nbytes = h.nbytes;
  }
  SetAndWake(slot_control, 0, scope_);
  return status;
}

}  // namespace m2n
