// Loopback transport: endpoints in ONE process (attention and expert nodes hosted together) exchange packets
// through process-private memory, with no segment, socket or file descriptor, by the same data path as between
// processes. A receiver allocates its region (an anonymous private mapping: page-aligned, zeroed, its pages
// committed only as slots are used) and registers it in a process-wide table under (channel, index); a sender
// looks every receiver of its channel up there and writes into its slots directly, exactly as an shm sender
// writes into a mapped segment: region, write and receive path are transports/region.h's and the core's, shared
// with shm. The completion flags are process-private futexes (FutexScope::kPrivate).
//
// A missing peer: a receiver that closes marks its region closed and leaves the table, and its senders fail with
// kUnavailable, at once on their next send, or after one quiet wait round (~50 ms) when one is blocked on a full
// ring. The region stays allocated while a sender holds it, so a sender writing as the receiver closes writes
// into live memory nobody reads. A receiver cannot tell a sender that closed from one that has not sent yet
// (there is no process that could be dead): its receives time out.
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "transports/region.h"

namespace m2n {
namespace {

// One receiver's region and whether that receiver still holds it. Shared by the receiver and its senders.
class LoopbackRegion {
 public:
  LoopbackRegion(std::string channel, uint32_t index) : channel_(std::move(channel)), index_(index) {}
  Status Allocate(uint64_t bytes) {
    map_.bytes = bytes;
    map_.memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map_.memory == MAP_FAILED) {
      return Error(Code::kInternal, "cannot allocate the " + std::to_string(bytes) + "-byte receive region of " +
                                        Name() + ": " + std::strerror(errno));
    }
    return Status::Ok();
  }
  void* memory() const { return map_.memory; }
  uint64_t bytes() const { return map_.bytes; }
  bool open() const { return open_.load(std::memory_order_acquire); }
  void Close() { open_.store(false, std::memory_order_release); }
  std::string Name() const {
    return "M2N loopback receiver " + std::to_string(index_) + " of channel '" + channel_ + "'";
  }
  Status Closed() const {
    return Error(Code::kUnavailable, Name() + " was closed: nothing receives this sender's messages any more");
  }

 private:
  std::string channel_;
  uint32_t index_;
  Mapping map_;
  std::atomic<bool> open_{true};
};

// The open loopback receivers of this process, by (channel, receiver index).
class Registry {
 public:
  using Key = std::pair<std::string, uint32_t>;

  Status Add(const Key& key, std::shared_ptr<LoopbackRegion> region) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto [it, added] = open_.emplace(key, region);
      if (!added) {
        return Error(Code::kInvalidArgument, region->Name() + " is already open in this process: close it "
                                                              "before opening another under the same name");
      }
    }
    appeared_.notify_all();
    return Status::Ok();
  }

  void Remove(const Key& key, const LoopbackRegion* region) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = open_.find(key);
    if (it != open_.end() && it->second.get() == region) open_.erase(it);
  }

  // The receiver registered under `key`, waiting for it until `deadline`; nullptr if none appeared.
  std::shared_ptr<LoopbackRegion> WaitFor(const Key& key, Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    std::shared_ptr<LoopbackRegion> found;
    appeared_.wait_until(lock, deadline, [&] {
      auto it = open_.find(key);
      if (it != open_.end()) found = it->second;
      return found != nullptr;
    });
    return found;
  }

 private:
  std::mutex mu_;
  std::condition_variable appeared_;
  std::map<Key, std::shared_ptr<LoopbackRegion>> open_;
};

Registry& Loopbacks() {
  static auto* registry = new Registry();  // never destroyed: endpoints may still close while the process exits
  return *registry;
}

// What a sender blocked on a full ring checks between wait rounds: is the receiver still there?
class ReceiverOpen : public PeerCheck {
 public:
  explicit ReceiverOpen(std::shared_ptr<const LoopbackRegion> region) : region_(std::move(region)) {}
  Status Check() const override { return region_->open() ? Status::Ok() : region_->Closed(); }

 private:
  std::shared_ptr<const LoopbackRegion> region_;
};

class LoopbackReceiver : public DirectReceiver {
 public:
  explicit LoopbackReceiver(EndpointSpec spec) : DirectReceiver(std::move(spec)) {}
  ~LoopbackReceiver() override {
    if (!registered_) return;
    region_->Close();  // first: a sender that found the region just before it leaves the table still sees this
    Loopbacks().Remove(RegistryKey(), region_.get());
  }

  Status Open() {
    if (Status s = CheckChannelName("loopback", spec_.addresses[0]); !s.ok()) return s;
    region_ = std::make_shared<LoopbackRegion>(spec_.addresses[0], spec_.index);
    if (Status s = region_->Allocate(Mailbox::RegionBytes(geometry())); !s.ok()) return s;
    if (Status s = InitRegion(region_->memory(), region_->bytes(), FutexScope::kPrivate); !s.ok()) return s;
    if (Status s = Loopbacks().Add(RegistryKey(), region_); !s.ok()) return s;
    registered_ = true;
    return Status::Ok();
  }
  // what a Sender takes for this receiver: the channel name (the index is the sender's position in its list)
  std::string address() const override { return spec_.addresses[0]; }

 protected:
  // No liveness to check: a sender in this process that closed is indistinguishable from one yet to send.
  const PeerCheck* peer_check(uint32_t sender) const override { return nullptr; }

 private:
  Registry::Key RegistryKey() const { return {spec_.addresses[0], spec_.index}; }

  std::shared_ptr<LoopbackRegion> region_;
  bool registered_ = false;
};

class LoopbackSender : public DirectSender {
 public:
  explicit LoopbackSender(EndpointSpec spec) : DirectSender(std::move(spec)) {
    regions_.reserve(spec_.num_peers);
    checks_.reserve(spec_.num_peers);
  }

  Status Open() {
    auto deadline = DeadlineAfter(spec_.timeout_s);
    for (uint32_t r = 0; r < spec_.num_peers; ++r) {
      const std::string& channel = spec_.addresses[r];
      if (Status s = CheckChannelName("loopback", channel); !s.ok()) return s;
      auto region = Loopbacks().WaitFor({channel, r}, deadline);
      if (region == nullptr) {
        return Error(Code::kDeadlineExceeded,
                     "M2N loopback receiver " + std::to_string(r) + " of channel '" + channel +
                         "' did not appear within " + std::to_string(spec_.timeout_s) +
                         " s: no receiver of that channel and index is open in this process (loopback endpoints "
                         "must live in one process)");
      }
      if (Status s = Mailbox::Attach(region->memory(), region->bytes(), &boxes_[r], FutexScope::kPrivate);
          !s.ok()) {
        return s;
      }
      if (Status s = Adopt(r, region->Name()); !s.ok()) return s;
      checks_.emplace_back(region);
      regions_.push_back(std::move(region));
    }
    return Status::Ok();
  }

 protected:
  Status Write(uint32_t receiver, const MessageHeader& header, const void* data,
               Clock::time_point deadline) override {
    // A closed receiver fails the send at once, not only once its ring has filled.
    if (!regions_[receiver]->open()) return regions_[receiver]->Closed();
    return DirectSender::Write(receiver, header, data, deadline);
  }
  const PeerCheck* receiver_check(uint32_t receiver) const override { return &checks_[receiver]; }

 private:
  std::vector<std::shared_ptr<LoopbackRegion>> regions_;  // keeps each region's memory while this sender lives
  std::vector<ReceiverOpen> checks_;
};

}  // namespace

Status OpenLoopbackReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out) {
  auto endpoint = std::make_unique<LoopbackReceiver>(spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *out = std::move(endpoint);
  return Status::Ok();
}

Status OpenLoopbackSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out) {
  auto endpoint = std::make_unique<LoopbackSender>(spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *out = std::move(endpoint);
  return Status::Ok();
}

}  // namespace m2n
