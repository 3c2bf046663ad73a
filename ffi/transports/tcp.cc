// TCP transport: a sender keeps one connection per receiver and writes header then the valid payload bytes.
// The receiver runs one thread per connected sender that validates each header as it comes off the wire, reads
// the payload straight into that sender's next slot of the registered region and raises the slot's flag, so
// the receiving side looks exactly like shared memory (and like RDMA write-with-immediate) to its consumer.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>

#include "transports/transport.h"

namespace m2n {
namespace {

constexpr uint32_t kHelloMagic = 0x484E324D;  // "M2NH"

struct Hello {
  uint32_t magic;
  uint32_t sender;
  uint32_t receiver;
  uint32_t num_receivers;
};

Status SysError(const std::string& what) { return Error(Code::kInternal, what + ": " + std::strerror(errno)); }

Status ParseAddress(const std::string& address, sockaddr_in* out) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos) {
    return Error(Code::kInvalidArgument, "tcp address must be host:port, got '" + address + "'");
  }
  std::string host = address.substr(0, colon);
  char* end = nullptr;
  long port = std::strtol(address.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port < 0 || port > 65535 || colon + 1 == address.size()) {
    return Error(Code::kInvalidArgument, "bad port in tcp address '" + address + "'");
  }
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  if (getaddrinfo(host.empty() ? "0.0.0.0" : host.c_str(), nullptr, &hints, &result) != 0 || result == nullptr) {
    return Error(Code::kInvalidArgument, "cannot resolve host '" + host + "'");
  }
  *out = *reinterpret_cast<sockaddr_in*>(result->ai_addr);
  out->sin_port = htons(static_cast<uint16_t>(port));
  freeaddrinfo(result);
  return Status::Ok();
}

// Reads exactly n bytes; false on EOF or error (errno tells which, 0 for EOF).
bool ReadAll(int fd, void* data, size_t n) {
  auto* p = static_cast<uint8_t*>(data);
  while (n > 0) {
    ssize_t got = recv(fd, p, n, 0);
    if (got == 0) {
      errno = 0;
      return false;
    }
    if (got < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

class Flag : public PeerCheck {  // lets a blocked connection thread give up when the endpoint closes
 public:
  explicit Flag(const std::atomic<bool>* stopping) : stopping_(stopping) {}
  Status Check() const override {
    if (stopping_->load()) return Error(Code::kUnavailable, "receiver closing");
    return Status::Ok();
  }

 private:
  const std::atomic<bool>* stopping_;
};

class TcpReceiver : public RecvEndpoint {
 public:
  explicit TcpReceiver(EndpointSpec spec)
      : RecvEndpoint(std::move(spec)), stop_check_(&stopping_), channels_(spec_.num_peers) {
    for (uint32_t i = 0; i < spec_.num_peers; ++i) channels_[i].owner = this, channels_[i].sender = i;
  }
  ~TcpReceiver() override {
    stopping_ = true;
    if (listen_fd_ >= 0) shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : readers_) t.join();
    for (int fd : fds_) close(fd);
    if (listen_fd_ >= 0) close(listen_fd_);
    if (region_ != MAP_FAILED) munmap(region_, region_bytes_);
  }

  Status Open() {
    Geometry g{spec_.num_peers, spec_.depth, spec_.capacity};
    region_bytes_ = Mailbox::RegionBytes(g);
    region_ = mmap(nullptr, region_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region_ == MAP_FAILED) return SysError("mmap receive region");
    if (Status s = Mailbox::Init(region_, region_bytes_, g, spec_.index); !s.ok()) return s;
    if (Status s = Mailbox::Attach(region_, region_bytes_, &mailbox_); !s.ok()) return s;

    sockaddr_in addr{};
    if (Status s = ParseAddress(spec_.addresses[0], &addr); !s.ok()) return s;
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) return SysError("socket");
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      return SysError("bind " + spec_.addresses[0]);
    }
    if (listen(listen_fd_, 256) != 0) return SysError("listen");
    socklen_t len = sizeof(addr);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &addr.sin_addr, ip, sizeof(ip));
    address_ = std::string(ip) + ":" + std::to_string(ntohs(addr.sin_port));
    acceptor_ = std::thread([this] { AcceptLoop(); });
    return Status::Ok();
  }
  std::string address() const override { return address_; }

 protected:
  const PeerCheck* peer_check(uint32_t sender) const override { return &channels_[sender]; }

 private:
  struct Channel : PeerCheck {
    const TcpReceiver* owner = nullptr;
    uint32_t sender = 0;
    std::atomic<bool> connected{false};
    mutable std::mutex mu;
    Status error;  // why the connection ended (EOF, reset, malformed header)
    Status Check() const override {
      std::lock_guard<std::mutex> lock(mu);
      return error;
    }
    void Fail(Status status) {
      std::lock_guard<std::mutex> lock(mu);
      if (error.ok()) error = std::move(status);
    }
  };

  void AcceptLoop() {
    while (!stopping_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      timeval tv{static_cast<time_t>(std::max(1.0, spec_.timeout_s)), 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));  // a hello that never comes
      Hello hello{};
      bool ok = ReadAll(fd, &hello, sizeof(hello)) && hello.magic == kHelloMagic &&
                hello.sender < spec_.num_peers && hello.receiver == spec_.index &&
                !channels_[hello.sender].connected.exchange(true);
      if (!ok) {  // not an M2N sender, or a second connection for one sender: refuse it
        close(fd);
        continue;
      }
      tv = timeval{0, 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      std::lock_guard<std::mutex> lock(mu_);
      fds_.push_back(fd);
      readers_.emplace_back([this, fd, sender = hello.sender] { ReadLoop(fd, sender); });
    }
  }

  void ReadLoop(int fd, uint32_t sender) {
    Channel& channel = channels_[sender];
    for (uint64_t seq = 0;; ++seq) {
      MessageHeader h;
      if (!ReadAll(fd, &h, sizeof(h))) {
        int err = errno;
        channel.Fail(Error(Code::kUnavailable,
                           "M2N sender " + std::to_string(sender) + " closed its connection" +
                               (err ? std::string(" (") + std::strerror(err) + ")" : std::string()) +
                               " before sending message seq " + std::to_string(seq)));
        break;
      }
      Status status = ValidateWireHeader(h, sender, spec_.num_peers, seq, spec_.capacity);
      if (!status.ok()) {  // nothing of this message touches the region; the connection is dropped
        channel.Fail(status);
        shutdown(fd, SHUT_RDWR);
        break;
      }
      // Back-pressure: wait for the consumer to free the slot; TCP flow control stalls the sender meanwhile.
      while (true) {
        Status ready = mailbox_.WaitWritable(sender, seq, DeadlineAfter(3600), &stop_check_);
        if (ready.ok()) break;
        if (stopping_) return;
      }
      if (!ReadAll(fd, mailbox_.payload(sender, seq), h.nbytes)) {
        channel.Fail(Error(Code::kUnavailable, "M2N sender " + std::to_string(sender) +
                                                   " disconnected in the middle of message seq " +
                                                   std::to_string(seq)));
        break;
      }
      std::memcpy(mailbox_.header(sender, seq), &h, sizeof(h));
      mailbox_.Publish(sender, seq);
    }
  }

  std::atomic<bool> stopping_{false};
  Flag stop_check_;
  std::vector<Channel> channels_;
  void* region_ = MAP_FAILED;
  uint64_t region_bytes_ = 0;
  int listen_fd_ = -1;
  std::string address_;
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> readers_;
};

class TcpSender : public SendEndpoint {
 public:
  explicit TcpSender(EndpointSpec spec) : SendEndpoint(std::move(spec)), fds_(spec_.num_peers, -1) {}
  ~TcpSender() override {
    for (int fd : fds_) {
      if (fd >= 0) close(fd);
    }
  }

  Status Open() {
    auto deadline = DeadlineAfter(spec_.timeout_s);
    for (uint32_t r = 0; r < spec_.num_peers; ++r) {
      sockaddr_in addr{};
      if (Status s = ParseAddress(spec_.addresses[r], &addr); !s.ok()) return s;
      while (true) {  // the receiver may not be listening yet
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return SysError("socket");
        if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
          fds_[r] = fd;
          break;
        }
        int err = errno;
        close(fd);
        if (Clock::now() >= deadline) {
          return Error(Code::kDeadlineExceeded, "M2N tcp receiver " + std::to_string(r) + " at " +
                                                    spec_.addresses[r] + " not reachable within " +
                                                    std::to_string(spec_.timeout_s) + " s: " + std::strerror(err));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      int one = 1;
      setsockopt(fds_[r], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      timeval tv{static_cast<time_t>(spec_.timeout_s),
                 static_cast<suseconds_t>((spec_.timeout_s - static_cast<time_t>(spec_.timeout_s)) * 1e6)};
      setsockopt(fds_[r], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
      Hello hello{kHelloMagic, spec_.index, r, spec_.num_peers};
      if (Status s = WriteAll(r, &hello, sizeof(hello), nullptr, 0); !s.ok()) return s;
    }
    return Status::Ok();
  }

 protected:
  Status Write(uint32_t receiver, const MessageHeader& header, const void* data, Clock::time_point) override {
    return WriteAll(receiver, &header, sizeof(header), data, header.nbytes);
  }

 private:
  Status WriteAll(uint32_t r, const void* a, size_t na, const void* b, size_t nb) {
    iovec iov[2] = {{const_cast<void*>(a), na}, {const_cast<void*>(b), nb}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = nb > 0 ? 2 : 1;
    while (msg.msg_iovlen > 0) {
      ssize_t sent = sendmsg(fds_[r], &msg, MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          return Error(Code::kDeadlineExceeded, "M2N send to receiver " + std::to_string(r) +
                                                    " timed out (the receiver stopped reading)");
        }
        return Error(Code::kUnavailable, "M2N send to receiver " + std::to_string(r) + " at " +
                                             spec_.addresses[r] + " failed: " + std::strerror(errno) +
                                             " (the receiver exited?)");
      }
      auto left = static_cast<size_t>(sent);
      while (msg.msg_iovlen > 0 && left >= msg.msg_iov[0].iov_len) {
        left -= msg.msg_iov[0].iov_len;
        ++msg.msg_iov;
        --msg.msg_iovlen;
      }
      if (msg.msg_iovlen > 0) {
        msg.msg_iov[0].iov_base = static_cast<uint8_t*>(msg.msg_iov[0].iov_base) + left;
        msg.msg_iov[0].iov_len -= left;
      }
    }
    return Status::Ok();
  }

  std::vector<int> fds_;
};

}  // namespace

Status OpenTcpReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out) {
  auto endpoint = std::make_unique<TcpReceiver>(spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *out = std::move(endpoint);
  return Status::Ok();
}

Status OpenTcpSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out) {
  auto endpoint = std::make_unique<TcpSender>(spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *out = std::move(endpoint);
  return Status::Ok();
}

}  // namespace m2n
