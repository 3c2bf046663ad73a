// Shared-memory transport: each receiver owns one POSIX shared-memory segment holding its receive region; a
// sender maps every receiver's segment and writes header and payload straight into its slot, then raises the
// slot's flag (a futex word, so a waiting receiver sleeps instead of spinning). The receiver copies out once.
// The region and the write are transports/region.h's, shared with loopback; what is shm's own is the segment and
// noticing a peer process that exited.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "transports/region.h"

namespace m2n {
namespace {

std::string SegmentName(const std::string& channel, uint32_t receiver) {
  return "/msjax-m2n-" + channel + "-r" + std::to_string(receiver);
}

Status SysError(const std::string& what) { return Error(Code::kInternal, what + ": " + std::strerror(errno)); }

// True when `pid` has exited: no such process, or a zombie its parent has not reaped yet.
bool ProcessGone(int32_t pid) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0) return errno == ESRCH;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return false;
  char line[512];
  size_t n = std::fread(line, 1, sizeof(line) - 1, f);
  std::fclose(f);
  line[n] = '\0';
  const char* paren = std::strrchr(line, ')');  // "pid (comm) state ...": comm may hold spaces
  return paren != nullptr && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

class ProcessAlive : public PeerCheck {
 public:
  ProcessAlive(const std::atomic<int32_t>* pid, std::string who) : pid_(pid), who_(std::move(who)) {}
  ProcessAlive(int32_t pid, std::string who) : fixed_pid_(pid), who_(std::move(who)) {}
  Status Check() const override {
    int32_t pid = pid_ != nullptr ? pid_->load(std::memory_order_relaxed) : fixed_pid_;
    if (ProcessGone(pid)) return Error(Code::kUnavailable, who_ + " (pid " + std::to_string(pid) + ") has exited");
    return Status::Ok();
  }

 private:
  const std::atomic<int32_t>* pid_ = nullptr;  // attached later (a sender's pid, written when it attaches)
  int32_t fixed_pid_ = 0;
  std::string who_;
};

class ShmReceiver : public DirectReceiver {
 public:
  explicit ShmReceiver(EndpointSpec spec) : DirectReceiver(std::move(spec)) {}
  ~ShmReceiver() override {
    if (!name_.empty()) shm_unlink(name_.c_str());
  }

  Status Open() {
    if (Status s = CheckChannelName("shm", spec_.addresses[0]); !s.ok()) return s;
    name_ = SegmentName(spec_.addresses[0], spec_.index);
    map_.bytes = Mailbox::RegionBytes(geometry());
    shm_unlink(name_.c_str());  // a segment left by a crashed run of the same channel
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      std::string name = name_;
      name_.clear();
      return SysError("shm_open " + name);
    }
    if (ftruncate(fd, static_cast<off_t>(map_.bytes)) != 0) {
      close(fd);
      return SysError("ftruncate " + name_);
    }
    map_.memory = mmap(nullptr, map_.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map_.memory == MAP_FAILED) return SysError("mmap " + name_);
    if (Status s = InitRegion(map_.memory, map_.bytes, FutexScope::kShared); !s.ok()) return s;
    for (uint32_t i = 0; i < spec_.num_peers; ++i) {
      checks_.emplace_back(&mailbox_.region()->sender_pids[i], "M2N sender " + std::to_string(i));
    }
    return Status::Ok();
  }
  // what a Sender takes for this receiver: the channel name (the segment is derived from it and the index)
  std::string address() const override { return spec_.addresses[0]; }

 protected:
  const PeerCheck* peer_check(uint32_t sender) const override { return &checks_[sender]; }

 private:
  std::string name_;
  Mapping map_;
  std::vector<ProcessAlive> checks_;
};

class ShmSender : public DirectSender {
 public:
  explicit ShmSender(EndpointSpec spec) : DirectSender(std::move(spec)), maps_(spec_.num_peers) {}

  Status Open() {
    auto deadline = DeadlineAfter(spec_.timeout_s);
    for (uint32_t r = 0; r < spec_.num_peers; ++r) {
      if (Status s = CheckChannelName("shm", spec_.addresses[r]); !s.ok()) return s;
      std::string name = SegmentName(spec_.addresses[r], r);
      Status last;
      while (true) {  // the receiver may not have created its segment yet
        last = TryAttach(r, name);
        if (last.ok() || last.code != Code::kUnavailable) break;
        if (Clock::now() >= deadline) {
          return Error(Code::kDeadlineExceeded, "M2N shm receiver " + std::to_string(r) + " (" + name +
                                                    ") did not appear within " + std::to_string(spec_.timeout_s) +
                                                    " s: " + last.message);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (!last.ok()) return last;
      if (Status s = Adopt(r, name); !s.ok()) return s;
      RegionHeader* region = boxes_[r].region();
      region->sender_pids[spec_.index].store(static_cast<int32_t>(getpid()), std::memory_order_relaxed);
      checks_.emplace_back(region->receiver_pid, "M2N receiver " + std::to_string(r));
    }
    return Status::Ok();
  }

 protected:
  const PeerCheck* receiver_check(uint32_t receiver) const override { return &checks_[receiver]; }

 private:
  Status TryAttach(uint32_t r, const std::string& name) {
    int fd = shm_open(name.c_str(), O_RDWR, 0600);
    if (fd < 0) {
      if (errno == ENOENT) return Error(Code::kUnavailable, "segment does not exist yet");
      return SysError("shm_open " + name);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
      close(fd);
      return SysError("fstat " + name);
    }
    if (st.st_size < static_cast<off_t>(sizeof(RegionHeader))) {
      close(fd);
      return Error(Code::kUnavailable, "segment not sized yet");
    }
    Mapping& map = maps_[r];
    map.Unmap();  // an earlier try's mapping of a segment that was not sized or initialised yet
    map.bytes = static_cast<uint64_t>(st.st_size);
    map.memory = mmap(nullptr, map.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map.memory == MAP_FAILED) return SysError("mmap " + name);
    return Mailbox::Attach(map.memory, map.bytes, &boxes_[r]);
  }

  std::vector<Mapping> maps_;
  std::vector<ProcessAlive> checks_;
};

}  // namespace

Status OpenShmReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out) {
  auto endpoint = std::make_unique<ShmReceiver>(spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *out = std::move(endpoint);
  return Status::Ok();
}

Status OpenShmSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out) {
  auto endpoint = std::make_unique<ShmSender>(spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *out = std::move(endpoint);
  return Status::Ok();
}

}  // namespace m2n
