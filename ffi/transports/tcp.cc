// TCP transport: a sender keeps one connection per receiver and writes header then the valid payload bytes.
// The receiver runs one I/O thread (epoll over the listening socket and every sender's connection, non-blocking)
// that validates each header as it comes off the wire, reads the payload straight into that sender's next slot
// of the registered region and raises the slot's flag, so the receiving side looks exactly like shared memory
// (and like RDMA write-with-immediate) to its consumer. One thread per receiver, not one per sender: an expert
// node may hear from many attention nodes, and a thread per connection multiplies threads past the cores.
// A consumer that asks for a message the I/O thread has not begun reads it itself, from the socket straight into
// its own buffer (TakeAll; a receive for several senders reads every such message, whichever comes first): one
// thread woken by the kernel per message, as for a plain blocking socket reader, instead of the I/O thread first
// and the consumer after it.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
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

class TcpReceiver : public RecvEndpoint {
 public:
  explicit TcpReceiver(EndpointSpec spec)
      : RecvEndpoint(std::move(spec)), channels_(spec_.num_peers) {
    for (uint32_t i = 0; i < spec_.num_peers; ++i) channels_[i].sender = i;
  }
  ~TcpReceiver() override {
    stopping_ = true;
    Kick();
    if (io_.joinable()) io_.join();
    for (auto& c : conns_) close(c->fd);
    for (int fd : {listen_fd_, epoll_fd_, wake_fd_}) {
      if (fd >= 0) close(fd);
    }
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
    listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
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

    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) return SysError("epoll_create1");
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return SysError("eventfd");
    for (auto [fd, tag] : {std::pair{listen_fd_, kListenTag}, std::pair{wake_fd_, kWakeTag}}) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = tag;
      if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) return SysError("epoll_ctl");
    }
    io_ = std::thread([this] { IoLoop(); });
    return Status::Ok();
  }
  std::string address() const override { return address_; }

 protected:
  const PeerCheck* peer_check(uint32_t sender) const override { return &channels_[sender]; }

  // The messages the I/O thread has not begun (their senders' connections idle between messages) are read here,
  // by the consumer, straight into its buffers, whichever comes first: those connections leave the I/O thread's
  // epoll set meanwhile and go back after. A message the I/O thread handles costs two wake-ups (the I/O
  // thread's, then the consumer's on the slot flag) and a copy out of the slot; on a busy host the wake-ups cost
  // more than the copy. Anything else (a message under way, already in its slot, or not what the receive
  // expects) takes the slot path, after the inline reads.
  void TakeAll(const std::vector<Expectation>& expects, void* const* outs, const uint64_t* capacities,
               uint64_t* nbytes, Clock::time_point deadline, Status* statuses) override {
    std::vector<Inline> reads;
    std::vector<size_t> slotted;  // messages k to take from their slots
    {
      std::lock_guard<std::mutex> lock(io_mu_);
      for (size_t k = 0; k < expects.size(); ++k) {
        Conn* c = Borrow(expects[k].sender, expects[k].seq);
        if (c == nullptr) {
          slotted.push_back(k);
        } else {
          reads.emplace_back(c, k);
        }
      }
    }
    ReadInline(reads, expects, outs, capacities, deadline);
    {
      std::lock_guard<std::mutex> lock(io_mu_);
      for (Inline& r : reads) {
        if (!Settle(r, expects[r.k], outs[r.k], &nbytes[r.k], &statuses[r.k])) slotted.push_back(r.k);
      }
    }
    std::sort(slotted.begin(), slotted.end());
    TakeFromSlots(expects, slotted, outs, capacities, nbytes, deadline, statuses);
  }

 private:
  struct Conn;
  struct Channel : PeerCheck {
    uint32_t sender = 0;
    std::atomic<bool> connected{false};
    Conn* conn = nullptr;  // its connection once the hello came (io_mu_)
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

  // One accepted connection, read as the bytes come: hello, then per message a header, a free slot, the payload.
  struct Conn {
    enum Phase { kHello, kHeader, kSlot, kPayload };
    int fd = -1;
    bool open = true;  // false once dropped (the fd is closed with the endpoint)
    bool borrowed = false;  // a consumer reads it (Take): the I/O thread leaves it alone
    uint64_t index = 0;  // in conns_: its epoll tag
    Phase phase = kHello;
    Clock::time_point hello_deadline;
    Hello hello{};
    MessageHeader header{};
    uint32_t sender = 0;
    uint64_t seq = 0;
    uint64_t got = 0;  // bytes of the current part read so far
  };
  // One message a consumer reads itself (TakeAll).
  struct Inline {
    Inline(Conn* conn, size_t index) : c(conn), k(index) {}
    Conn* c;
    size_t k;  // its index in the receive
    MessageHeader h{};
    uint64_t header_got = 0;
    uint64_t payload_got = 0;
    // kDone: all of it in the consumer's buffer; kEnded: the connection ended (err); kRejected: the header
    // failed the wire checks (status); kElsewhere: well-formed but not what the receive expects (the slot path
    // says why); kReading: the deadline passed first
    enum State { kReading, kDone, kEnded, kRejected, kElsewhere } state = kReading;
    int err = 0;
    Status status;
  };
  // epoll user data: a connection's index in conns_, or one of these
  static constexpr uint64_t kListenTag = ~uint64_t{0};
  static constexpr uint64_t kWakeTag = ~uint64_t{0} - 1;

  void IoLoop() {
    std::vector<epoll_event> events(64);
    while (!stopping_) {
      bool blocked = false;
      Clock::time_point next_hello = Clock::time_point::max();
      {
        std::lock_guard<std::mutex> lock(io_mu_);
        for (auto& c : conns_) {
          if (!Mine(*c)) continue;
          blocked |= c->phase == Conn::kSlot;
          if (c->phase == Conn::kHello) next_hello = std::min(next_hello, c->hello_deadline);
        }
      }
      int n = Wait(events, blocked, next_hello);
      if (stopping_) return;
      std::lock_guard<std::mutex> lock(io_mu_);  // consumers borrow and give back connections between rounds
      for (int i = 0; i < n; ++i) {
        uint64_t tag = events[i].data.u64;
        if (tag == kWakeTag) {
          uint64_t count;
          [[maybe_unused]] ssize_t got = read(wake_fd_, &count, sizeof(count));
        } else if (tag == kListenTag) {
          Accept();
        } else if (Mine(*conns_[tag])) {  // (borrowed since the event came: the consumer reads it)
          Pump(*conns_[tag]);
        }
      }
      // a connection waiting for a slot is out of the epoll set (its pending bytes would wake it in a loop) and
      // nothing announces that the consumer freed the slot: look again
      for (auto& c : conns_) {
        if (Mine(*c) && c->phase == Conn::kSlot) Pump(*c);
      }
      auto now = Clock::now();
      for (auto& c : conns_) {  // a connection that never says hello
        if (Mine(*c) && c->phase == Conn::kHello && now >= c->hello_deadline) Drop(*c);
      }
    }
  }

  bool Mine(const Conn& c) const { return c.open && !c.borrowed; }

  // Wakes the I/O thread from its epoll wait.
  void Kick() {
    if (wake_fd_ < 0) return;
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
  }

  // The connection of `sender` for the consumer to read message `seq` itself, if it sits idle before that
  // message's header; else null (io_mu_ held).
  Conn* Borrow(uint32_t sender, uint64_t seq) {
    Conn* c = channels_[sender].conn;
    if (c == nullptr || !Mine(*c) || c->phase != Conn::kHeader || c->got != 0 || c->seq != seq) return nullptr;
    if (!Watch(*c, false)) return nullptr;
    c->borrowed = true;
    return c;
  }

  // Hands a borrowed connection back to the I/O thread in `phase` (io_mu_ held). In kSlot it stays out of the
  // epoll set (the loop looks at it each round): the kick makes the loop take the next round now.
  void GiveBack(Conn& c, Conn::Phase phase) {
    c.borrowed = false;
    c.phase = phase;
    if (phase == Conn::kSlot) {
      Kick();
    } else if (!Watch(c, true)) {
      Fail(c, SysError("epoll_ctl"));
    }
  }

  // Ends a connection over `status`, which every later receive from its sender reports (io_mu_ held).
  Status Fail(Conn& c, Status status) {
    channels_[c.sender].Fail(status);
    c.borrowed = false;
    Drop(c);
    return status;
  }

  static Status ClosedBefore(uint32_t sender, uint64_t seq, int err) {
    return Error(Code::kUnavailable, "M2N sender " + std::to_string(sender) + " closed its connection" +
                                         (err ? std::string(" (") + std::strerror(err) + ")" : std::string()) +
                                         " before sending message seq " + std::to_string(seq));
  }
  static std::string MidMessage(uint32_t sender, uint64_t seq) {
    return "M2N sender " + std::to_string(sender) + " disconnected in the middle of message seq " +
           std::to_string(seq);
  }

  // Reads every message of `reads` as its bytes come (non-blocking reads, then sleeping in ppoll on all of their
  // sockets), until each is done or failed, or the deadline passes.
  void ReadInline(std::vector<Inline>& reads, const std::vector<Expectation>& expects, void* const* outs,
                  const uint64_t* capacities, Clock::time_point deadline) {
    std::vector<pollfd> waiting;
    while (true) {
      waiting.clear();
      for (Inline& r : reads) {
        if (r.state != Inline::kReading) continue;
        Advance(r, expects[r.k], static_cast<uint8_t*>(outs[r.k]), capacities[r.k]);
        if (r.state == Inline::kReading) waiting.push_back(pollfd{r.c->fd, POLLIN | POLLRDHUP, 0});
      }
      if (waiting.empty()) return;
      auto left = deadline - Clock::now();
      if (left <= Clock::duration::zero()) return;
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
      ppoll(waiting.data(), waiting.size(), &ts, nullptr);  // EINTR or an error: the reads say what happened
    }
  }

  // Reads what the socket has of one message: its header (checked as the I/O thread checks it, then against
  // what the receive expects) and its payload into `out`.
  void Advance(Inline& r, const Expectation& expect, uint8_t* out, uint64_t capacity) {
    if (r.header_got < sizeof(r.h)) {
      int got = RecvSome(r.c->fd, &r.h, sizeof(r.h), &r.header_got);
      if (got < 0) {
        r.state = Inline::kEnded;
        r.err = errno;
      }
      if (got <= 0) return;
      r.status = ValidateWireHeader(r.h, r.c->sender, spec_.num_peers, r.c->seq, spec_.capacity);
      if (!r.status.ok()) {
        r.state = Inline::kRejected;
        return;
      }
      Expectation bounded = expect;
      bounded.capacity = std::min(spec_.capacity, capacity);
      if (!ValidateHeader(r.h, bounded).ok()) {
        r.state = Inline::kElsewhere;
        return;
      }
    }
    int got = RecvSome(r.c->fd, out, r.h.nbytes, &r.payload_got);
    if (got < 0) {
      r.state = Inline::kEnded;
      r.err = errno;
    } else if (got > 0) {
      r.state = Inline::kDone;
    }
  }

  // Gives a connection read inline back to the I/O thread, with whatever of its message it did not finish
  // (io_mu_ held). False: the message is for the slot path.
  bool Settle(Inline& r, const Expectation& expect, void* out, uint64_t* nbytes, Status* status) {
    Conn& c = *r.c;
    switch (r.state) {
      case Inline::kDone:
        ++c.seq;
        c.got = 0;
        GiveBack(c, Conn::kHeader);
        *nbytes = r.h.nbytes;
        return true;
      case Inline::kEnded:
        *status = Fail(c, r.header_got < sizeof(r.h) ? ClosedBefore(c.sender, c.seq, r.err)
                                                     : Error(Code::kUnavailable, MidMessage(c.sender, c.seq)));
        return true;
      case Inline::kRejected:
        *status = Fail(c, r.status);
        return true;
      case Inline::kElsewhere:
        c.header = r.h;
        c.got = 0;
        GiveBack(c, Conn::kSlot);
        return false;
      case Inline::kReading:
        break;
    }
    // The deadline passed. `out` is not ours once we return: what came of the payload moves to the slot (free:
    // the consumer is past every earlier message of this sender), and the I/O thread goes on from there.
    if (r.header_got < sizeof(r.h)) {
      std::memcpy(&c.header, &r.h, r.header_got);
      c.got = r.header_got;
      GiveBack(c, Conn::kHeader);
    } else {
      std::memcpy(mailbox_.payload(c.sender, c.seq), out, r.payload_got);
      c.header = r.h;
      c.got = r.payload_got;
      GiveBack(c, Conn::kPayload);
    }
    *status = Mailbox::TimedOut(expect);
    return true;
  }

  // Reads into `dst` what the socket has of the `want` bytes (`got` of them there already). 1: all there;
  // 0: wait for more; -1: the connection ended (errno: 0 for EOF).
  static int RecvSome(int fd, void* dst, uint64_t want, uint64_t* got) {
    while (*got < want) {
      ssize_t n = recv(fd, static_cast<uint8_t*>(dst) + *got, want - *got, MSG_DONTWAIT);
      if (n > 0) {
        *got += static_cast<uint64_t>(n);
        continue;
      }
      if (n == 0) {
        errno = 0;
        return -1;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    return 1;
  }

  // Waits for socket events; while a connection waits for a slot, only briefly (the consumer frees slots
  // without a descriptor to poll).
  int Wait(std::vector<epoll_event>& events, bool blocked, Clock::time_point next_hello) {
    auto limit = blocked ? std::chrono::microseconds(50) : std::chrono::microseconds(100000);
    auto until = std::min(Clock::now() + limit, next_hello);
    auto ns = std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::nanoseconds>(until - Clock::now())
                                       .count());
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    int n = -1;
    errno = ENOSYS;
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 35)
    n = epoll_pwait2(epoll_fd_, events.data(), static_cast<int>(events.size()), &ts, nullptr);
#endif
    if (n < 0 && errno == ENOSYS) {  // glibc before 2.35 or kernel before 5.11: millisecond timeouts
      n = epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()),
                     static_cast<int>(std::max<int64_t>(blocked ? 1 : 0, ns / 1000000)));
    }
    return n < 0 ? 0 : n;
  }

  void Accept() {
    while (true) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;  // EAGAIN: none left (or a transient error: the listening socket stays)
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      auto conn = std::make_unique<Conn>();
      conn->fd = fd;
      conn->index = conns_.size();
      conn->hello_deadline = DeadlineAfter(std::max(1.0, spec_.timeout_s));
      if (!Watch(*conn, true)) {
        close(fd);
        continue;
      }
      conns_.push_back(std::move(conn));
    }
  }

  // Puts a connection in the epoll set (its bytes wake the loop) or takes it out.
  bool Watch(Conn& c, bool on) {
    if (!on) return epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c.fd, nullptr) == 0;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = c.index;
    return epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, c.fd, &ev) == 0;
  }

  // Ends a connection: no more reads. The descriptor stays open until the endpoint closes: closing a socket
  // with unread bytes sends a reset, and the peer would see "not connected" instead of our end of the stream.
  void Drop(Conn& c) {
    Watch(c, false);  // ENOENT when it waited for a slot (out of the set already): harmless
    shutdown(c.fd, SHUT_RDWR);
    c.open = false;
  }

  // The I/O thread's reads: RecvSome with the connection's count.
  int ReadSome(Conn& c, void* dst, uint64_t want) { return RecvSome(c.fd, dst, want, &c.got); }

  // Moves one connection as far as its bytes and the free slots allow.
  void Pump(Conn& c) {
    while (c.open) {
      switch (c.phase) {
        case Conn::kHello: {
          int r = ReadSome(c, &c.hello, sizeof(c.hello));
          if (r == 0) return;
          if (r < 0 || c.hello.magic != kHelloMagic || c.hello.sender >= spec_.num_peers ||
              c.hello.receiver != spec_.index || channels_[c.hello.sender].connected.exchange(true)) {
            Drop(c);  // not an M2N sender, or a second connection for one sender: refuse it
            return;
          }
          c.sender = c.hello.sender;
          channels_[c.sender].conn = &c;
          c.phase = Conn::kHeader;
          c.got = 0;
          break;
        }
        case Conn::kHeader: {
          int r = ReadSome(c, &c.header, sizeof(c.header));
          if (r == 0) return;
          if (r < 0) {
            Fail(c, ClosedBefore(c.sender, c.seq, errno));
            return;
          }
          Status status = ValidateWireHeader(c.header, c.sender, spec_.num_peers, c.seq, spec_.capacity);
          if (!status.ok()) {  // nothing of this message touches the region; the connection is dropped
            Fail(c, status);
            return;
          }
          if (mailbox_.control(c.sender, c.seq)->full.load(std::memory_order_acquire) != 0) {
            // Back-pressure: the consumer has not freed this slot yet; TCP flow control stalls the sender meanwhile
            Watch(c, false);
            c.phase = Conn::kSlot;
            return;
          }
          c.phase = Conn::kPayload;
          c.got = 0;
          break;
        }
        case Conn::kSlot:
          if (mailbox_.control(c.sender, c.seq)->full.load(std::memory_order_acquire) != 0) return;
          if (!Watch(c, true)) {
            Fail(c, SysError("epoll_ctl"));
            return;
          }
          c.phase = Conn::kPayload;
          c.got = 0;
          break;
        case Conn::kPayload: {
          int r = ReadSome(c, mailbox_.payload(c.sender, c.seq), c.header.nbytes);
          if (r == 0) return;
          if (r < 0) {
            Fail(c, Error(Code::kUnavailable, MidMessage(c.sender, c.seq)));
            return;
          }
          std::memcpy(mailbox_.header(c.sender, c.seq), &c.header, sizeof(c.header));
          mailbox_.Publish(c.sender, c.seq);
          ++c.seq;
          c.phase = Conn::kHeader;
          c.got = 0;
          break;
        }
      }
    }
  }

  std::atomic<bool> stopping_{false};
  std::mutex io_mu_;  // the connections' state, between the I/O thread and a consumer borrowing one
  std::vector<Channel> channels_;
  void* region_ = MAP_FAILED;
  uint64_t region_bytes_ = 0;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  std::string address_;
  std::thread io_;
  std::vector<std::unique_ptr<Conn>> conns_;  // the I/O thread's, under io_mu_ (a borrowed one: its consumer's)
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
