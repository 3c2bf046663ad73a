// RDMA verbs transport over libibverbs. UNVERIFIED ON HARDWARE: it compiles in CI, and its live test skips with
// "no RDMA device" on machines without one.
//
// Receiver: its region (the same Mailbox layout as shm) is one memory region registered for remote write; one
// reliable-connected queue pair per sender, each with `depth` receive work requests posted to catch the
// immediates. A poller thread takes completions: IBV_WC_RECV_RDMA_WITH_IMM names (sender, seq) in the
// immediate; the poller checks the header the write put in the slot and raises the slot's flag. When the
// consumer frees a slot, the receiver RDMA-writes the channel's consumed count into the sender's credit word.
// Sender: waits for a credit (next seq - consumed < depth), stages header + valid bytes in a registered buffer
// and posts one RDMA WRITE WITH IMM to the slot (header at +64, payload at +128), then waits for its
// completion. A GPU buffer registered with RegisterDmabuf can be the source instead of the staging buffer.
#include <infiniband/verbs.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "transports/verbs.h"

namespace m2n::verbs {
namespace {

constexpr int kRemoteAccess = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;

Status VerbsError(const std::string& what) {
  return Error(Code::kInternal, "verbs: " + what + " failed: " + std::strerror(errno));
}

// One opened NIC port: context, protection domain and a completion queue shared by the endpoint's queue pairs.
class Device {
 public:
  static Status Open(const VerbsSpec& spec, int cq_entries, std::unique_ptr<Device>* out) {
    int n = 0;
    ibv_device** list = ibv_get_device_list(&n);
    if (list == nullptr || n == 0) {
      if (list != nullptr) ibv_free_device_list(list);
      return Error(Code::kUnavailable, "no RDMA device");
    }
    ibv_device* chosen = nullptr;
    for (int i = 0; i < n; ++i) {
      if (spec.device.empty() || spec.device == ibv_get_device_name(list[i])) {
        chosen = list[i];
        break;
      }
    }
    if (chosen == nullptr) {
      ibv_free_device_list(list);
      return Error(Code::kUnavailable, "no RDMA device named '" + spec.device + "'");
    }
    auto device = std::make_unique<Device>();
    device->port_ = spec.port;
    device->gid_index_ = spec.gid_index;
    device->ctx_ = ibv_open_device(chosen);
    ibv_free_device_list(list);
    if (device->ctx_ == nullptr) return VerbsError("ibv_open_device");
    if (ibv_query_port(device->ctx_, spec.port, &device->port_attr_) != 0) return VerbsError("ibv_query_port");
    if (ibv_query_gid(device->ctx_, spec.port, spec.gid_index, &device->gid_) != 0) return VerbsError("ibv_query_gid");
    device->pd_ = ibv_alloc_pd(device->ctx_);
    if (device->pd_ == nullptr) return VerbsError("ibv_alloc_pd");
    device->cq_ = ibv_create_cq(device->ctx_, cq_entries, nullptr, nullptr, 0);
    if (device->cq_ == nullptr) return VerbsError("ibv_create_cq");
    *out = std::move(device);
    return Status::Ok();
  }

  ~Device() {
    for (ibv_qp* qp : qps_) ibv_destroy_qp(qp);
    for (ibv_mr* mr : mrs_) ibv_dereg_mr(mr);
    if (cq_ != nullptr) ibv_destroy_cq(cq_);
    if (pd_ != nullptr) ibv_dealloc_pd(pd_);
    if (ctx_ != nullptr) ibv_close_device(ctx_);
  }

  Status RegisterHost(void* addr, size_t bytes, int access, ibv_mr** mr) {
    *mr = ibv_reg_mr(pd_, addr, bytes, access);
    if (*mr == nullptr) return VerbsError("ibv_reg_mr");
    mrs_.push_back(*mr);
    return Status::Ok();
  }

  // GPU memory exported as a dmabuf (cuMemGetHandleForAddressRange), so the NIC reads it without staging.
  Status RegisterDmabuf(int fd, uint64_t offset, size_t bytes, uint64_t iova, int access, ibv_mr** mr) {
    *mr = ibv_reg_dmabuf_mr(pd_, offset, bytes, iova, fd, access);
    if (*mr == nullptr) return VerbsError("ibv_reg_dmabuf_mr");
    mrs_.push_back(*mr);
    return Status::Ok();
  }

  Status CreateQp(uint32_t depth, ibv_qp** qp) {
    ibv_qp_init_attr attr{};
    attr.send_cq = cq_;
    attr.recv_cq = cq_;
    attr.qp_type = IBV_QPT_RC;
    attr.cap.max_send_wr = depth + 4;
    attr.cap.max_recv_wr = depth + 4;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    *qp = ibv_create_qp(pd_, &attr);
    if (*qp == nullptr) return VerbsError("ibv_create_qp");
    qps_.push_back(*qp);
    ibv_qp_attr init{};
    init.qp_state = IBV_QPS_INIT;
    init.pkey_index = 0;
    init.port_num = port_;
    init.qp_access_flags = kRemoteAccess;
    if (ibv_modify_qp(*qp, &init, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) != 0) {
      return VerbsError("ibv_modify_qp(INIT)");
    }
    return Status::Ok();
  }

  ConnInfo Local(ibv_qp* qp, uint32_t psn, uint64_t addr, uint32_t rkey) const {
    ConnInfo info;
    info.qp_num = qp->qp_num;
    info.psn = psn & 0xFFFFFF;
    info.lid = port_attr_.lid;
    info.port = port_;
    info.gid_index = gid_index_;
    std::memcpy(info.gid, gid_.raw, 16);
    info.addr = addr;
    info.rkey = rkey;
    info.mtu = port_attr_.active_mtu;
    return info;
  }

  // INIT -> RTR -> RTS against the remote side's ConnInfo.
  Status Connect(ibv_qp* qp, uint32_t local_psn, const ConnInfo& remote) {
    ibv_qp_attr rtr{};
    rtr.qp_state = IBV_QPS_RTR;
    rtr.path_mtu = static_cast<ibv_mtu>(std::min<uint32_t>(remote.mtu, port_attr_.active_mtu));
    rtr.dest_qp_num = remote.qp_num;
    rtr.rq_psn = remote.psn;
    rtr.max_dest_rd_atomic = 1;
    rtr.min_rnr_timer = 12;
    rtr.ah_attr.port_num = port_;
    rtr.ah_attr.dlid = remote.lid;
    if (port_attr_.link_layer == IBV_LINK_LAYER_ETHERNET || remote.lid == 0) {  // RoCE: route by GID
      rtr.ah_attr.is_global = 1;
      std::memcpy(rtr.ah_attr.grh.dgid.raw, remote.gid, 16);
      rtr.ah_attr.grh.sgid_index = gid_index_;
      rtr.ah_attr.grh.hop_limit = 1;
    }
    if (ibv_modify_qp(qp, &rtr,
                      IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) != 0) {
      return VerbsError("ibv_modify_qp(RTR)");
    }
    ibv_qp_attr rts{};
    rts.qp_state = IBV_QPS_RTS;
    rts.timeout = 14;
    rts.retry_cnt = 7;
    rts.rnr_retry = 7;
    rts.sq_psn = local_psn & 0xFFFFFF;
    rts.max_rd_atomic = 1;
    if (ibv_modify_qp(qp, &rts,
                      IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                          IBV_QP_MAX_QP_RD_ATOMIC) != 0) {
      return VerbsError("ibv_modify_qp(RTS)");
    }
    return Status::Ok();
  }

  ibv_cq* cq() const { return cq_; }

 private:
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_cq* cq_ = nullptr;
  ibv_port_attr port_attr_{};
  ibv_gid gid_{};
  uint8_t port_ = 1;
  uint8_t gid_index_ = 0;
  std::vector<ibv_qp*> qps_;
  std::vector<ibv_mr*> mrs_;
};

uint32_t RandomPsn() { return std::random_device{}() & 0xFFFFFF; }

Status PostRecv(ibv_qp* qp, uint64_t id) {
  ibv_recv_wr wr{};
  wr.wr_id = id;
  wr.num_sge = 0;  // write-with-immediate consumes a receive but places no data through it
  ibv_recv_wr* bad = nullptr;
  if (ibv_post_recv(qp, &wr, &bad) != 0) return VerbsError("ibv_post_recv");
  return Status::Ok();
}

class Broken : public PeerCheck {
 public:
  Status Check() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }
  void Fail(Status status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (error_.ok()) error_ = std::move(status);
  }

 private:
  mutable std::mutex mu_;
  Status error_;
};

class VerbsReceiver : public RecvEndpoint, public Connectable {
 public:
  VerbsReceiver(EndpointSpec spec, VerbsSpec vspec)
      : RecvEndpoint(std::move(spec)), vspec_(std::move(vspec)), qps_(spec_.num_peers, nullptr),
        psns_(spec_.num_peers, 0), remotes_(spec_.num_peers), wire_seq_(spec_.num_peers, 0),
        checks_(spec_.num_peers) {}
  ~VerbsReceiver() override {
    stopping_ = true;
    if (poller_.joinable()) poller_.join();
    device_.reset();
    std::free(region_);
    std::free(credits_);
  }

  Status Open() {
    Geometry g{spec_.num_peers, spec_.depth, spec_.capacity};
    region_bytes_ = Mailbox::RegionBytes(g);
    region_ = std::aligned_alloc(4096, (region_bytes_ + 4095) / 4096 * 4096);
    credits_ = static_cast<uint64_t*>(std::aligned_alloc(64, 64 * spec_.num_peers));
    if (region_ == nullptr || credits_ == nullptr) return Error(Code::kInternal, "verbs: out of memory");
    std::memset(region_, 0, region_bytes_);
    if (Status s = Mailbox::Init(region_, region_bytes_, g, spec_.index); !s.ok()) return s;
    if (Status s = Mailbox::Attach(region_, region_bytes_, &mailbox_); !s.ok()) return s;
    if (Status s = Device::Open(vspec_, static_cast<int>(spec_.num_peers * (2 * spec_.depth + 8)), &device_);
        !s.ok())
      return s;
    if (Status s = device_->RegisterHost(region_, region_bytes_, kRemoteAccess, &region_mr_); !s.ok()) return s;
    if (Status s = device_->RegisterHost(credits_, 64 * spec_.num_peers, IBV_ACCESS_LOCAL_WRITE, &credits_mr_);
        !s.ok())
      return s;
    for (uint32_t i = 0; i < spec_.num_peers; ++i) {
      if (Status s = device_->CreateQp(spec_.depth, &qps_[i]); !s.ok()) return s;
      psns_[i] = RandomPsn();
    }
    return Status::Ok();
  }

  Status LocalInfo(uint32_t sender, ConnInfo* info) override {
    if (sender >= spec_.num_peers) return Error(Code::kInvalidArgument, "sender out of range");
    *info = device_->Local(qps_[sender], psns_[sender], reinterpret_cast<uint64_t>(region_), region_mr_->rkey);
    return Status::Ok();
  }

  Status Connect(uint32_t sender, const ConnInfo& remote) override {
    if (sender >= spec_.num_peers) return Error(Code::kInvalidArgument, "sender out of range");
    for (uint32_t d = 0; d < spec_.depth; ++d) {
      if (Status s = PostRecv(qps_[sender], sender); !s.ok()) return s;
    }
    if (Status s = device_->Connect(qps_[sender], psns_[sender], remote); !s.ok()) return s;
    remotes_[sender] = remote;
    if (!poller_.joinable()) poller_ = std::thread([this] { Poll(); });
    return Status::Ok();
  }

  std::string address() const override { return "verbs:" + vspec_.device; }

 protected:
  const PeerCheck* peer_check(uint32_t sender) const override { return &checks_[sender]; }

  void OnConsumed(uint32_t sender, uint64_t seq) override {  // return one credit: consumed count = seq + 1
    std::lock_guard<std::mutex> lock(send_mu_);
    credits_[8 * sender] = seq + 1;
    ibv_sge sge{reinterpret_cast<uint64_t>(&credits_[8 * sender]), 8, credits_mr_->lkey};
    ibv_send_wr wr{};
    wr.wr_id = kCreditWr;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_INLINE | IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = remotes_[sender].addr;
    wr.wr.rdma.rkey = remotes_[sender].rkey;
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(qps_[sender], &wr, &bad) != 0) checks_[sender].Fail(VerbsError("credit ibv_post_send"));
  }

 private:
  static constexpr uint64_t kCreditWr = ~uint64_t{0};

  void Poll() {
    ibv_wc wcs[16];
    while (!stopping_) {
      int n = ibv_poll_cq(device_->cq(), 16, wcs);
      if (n <= 0) {
        std::this_thread::yield();
        continue;
      }
      for (int i = 0; i < n; ++i) Complete(wcs[i]);
    }
  }

  void Complete(const ibv_wc& wc) {
    if (wc.wr_id == kCreditWr) {
      if (wc.status != IBV_WC_SUCCESS) {
        for (auto& check : checks_) check.Fail(Error(Code::kUnavailable, std::string("verbs credit write failed: ") +
                                                                            ibv_wc_status_str(wc.status)));
      }
      return;
    }
    uint32_t sender = static_cast<uint32_t>(wc.wr_id);
    if (sender >= spec_.num_peers) return;
    if (wc.status != IBV_WC_SUCCESS) {
      checks_[sender].Fail(Error(Code::kUnavailable, "verbs connection from sender " + std::to_string(sender) +
                                                         " failed: " + ibv_wc_status_str(wc.status)));
      return;
    }
    if (wc.opcode != IBV_WC_RECV_RDMA_WITH_IMM) return;
    uint32_t imm_sender, seq_low;
    DecodeImm(ntohl(wc.imm_data), &imm_sender, &seq_low);
    uint64_t seq = wire_seq_[sender];
    if (imm_sender != (sender & 0xFF) || seq_low != (seq & 0xFFFFFF)) {
      checks_[sender].Fail(Error(Code::kDataLoss, "malformed M2N message rejected: immediate names sender " +
                                                      std::to_string(imm_sender) + " seq " + std::to_string(seq_low) +
                                                      ", expected sender " + std::to_string(sender) + " seq " +
                                                      std::to_string(seq)));
      return;
    }
    MessageHeader h;
    std::memcpy(&h, mailbox_.header(sender, seq), sizeof(h));
    Status status = ValidateWireHeader(h, sender, spec_.num_peers, seq, spec_.capacity);
    if (!status.ok()) {
      checks_[sender].Fail(status);
      return;
    }
    ++wire_seq_[sender];
    mailbox_.Publish(sender, seq);
    if (Status s = PostRecv(qps_[sender], sender); !s.ok()) checks_[sender].Fail(s);
  }

  VerbsSpec vspec_;
  std::unique_ptr<Device> device_;
  void* region_ = nullptr;
  uint64_t region_bytes_ = 0;
  uint64_t* credits_ = nullptr;  // one 64-byte line per sender: the consumed count being written back
  ibv_mr* region_mr_ = nullptr;
  ibv_mr* credits_mr_ = nullptr;
  std::vector<ibv_qp*> qps_;
  std::vector<uint32_t> psns_;
  std::vector<ConnInfo> remotes_;
  std::vector<uint64_t> wire_seq_;
  std::vector<Broken> checks_;
  std::mutex send_mu_;
  std::atomic<bool> stopping_{false};
  std::thread poller_;
};

class VerbsSender : public SendEndpoint, public Connectable {
 public:
  VerbsSender(EndpointSpec spec, VerbsSpec vspec)
      : SendEndpoint(std::move(spec)), vspec_(std::move(vspec)), qps_(spec_.num_peers, nullptr),
        psns_(spec_.num_peers, 0), remotes_(spec_.num_peers) {}
  ~VerbsSender() override {
    device_.reset();
    std::free(staging_);
    std::free(credits_);
  }

  Status Open() {
    stride_ = 64 + (spec_.capacity + 63) / 64 * 64;
    staging_ = static_cast<uint8_t*>(std::aligned_alloc(4096, (stride_ * spec_.num_peers + 4095) / 4096 * 4096));
    credits_ = static_cast<uint64_t*>(std::aligned_alloc(64, 64 * spec_.num_peers));
    if (staging_ == nullptr || credits_ == nullptr) return Error(Code::kInternal, "verbs: out of memory");
    std::memset(credits_, 0, 64 * spec_.num_peers);
    if (Status s = Device::Open(vspec_, static_cast<int>(spec_.num_peers * 8 + 8), &device_); !s.ok()) return s;
    if (Status s = device_->RegisterHost(staging_, stride_ * spec_.num_peers, IBV_ACCESS_LOCAL_WRITE, &staging_mr_);
        !s.ok())
      return s;
    if (Status s = device_->RegisterHost(credits_, 64 * spec_.num_peers, kRemoteAccess, &credits_mr_); !s.ok())
      return s;
    for (uint32_t r = 0; r < spec_.num_peers; ++r) {
      if (Status s = device_->CreateQp(vspec_.depth, &qps_[r]); !s.ok()) return s;
      psns_[r] = RandomPsn();
    }
    return Status::Ok();
  }

  Status LocalInfo(uint32_t receiver, ConnInfo* info) override {
    if (receiver >= spec_.num_peers) return Error(Code::kInvalidArgument, "receiver out of range");
    *info = device_->Local(qps_[receiver], psns_[receiver], reinterpret_cast<uint64_t>(&credits_[8 * receiver]),
                           credits_mr_->rkey);
    return Status::Ok();
  }

  Status Connect(uint32_t receiver, const ConnInfo& remote) override {
    if (receiver >= spec_.num_peers) return Error(Code::kInvalidArgument, "receiver out of range");
    if (Status s = device_->Connect(qps_[receiver], psns_[receiver], remote); !s.ok()) return s;
    remotes_[receiver] = remote;
    return Status::Ok();
  }

 protected:
  Status Write(uint32_t receiver, const MessageHeader& header, const void* data,
               Clock::time_point deadline) override {
    auto* consumed = reinterpret_cast<volatile uint64_t*>(&credits_[8 * receiver]);
    while (header.seq - *consumed >= vspec_.depth) {  // the receiver RDMA-writes its consumed count here
      if (Clock::now() >= deadline) {
        return Error(Code::kDeadlineExceeded, "M2N verbs send timed out waiting for a free slot at receiver " +
                                                  std::to_string(receiver));
      }
      std::this_thread::yield();
    }
    uint8_t* stage = staging_ + stride_ * receiver;
    std::memcpy(stage, &header, sizeof(header));
    std::memcpy(stage + 64, data, header.nbytes);
    Geometry g{1, vspec_.depth, spec_.capacity};  // slot offsets need only depth and capacity (same on both sides)
    ibv_sge sge{reinterpret_cast<uint64_t>(stage), static_cast<uint32_t>(64 + header.nbytes), staging_mr_->lkey};
    ibv_send_wr wr{};
    wr.wr_id = receiver;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.imm_data = htonl(EncodeImm(header.sender, header.seq));
    wr.wr.rdma.remote_addr = remotes_[receiver].addr + Mailbox::SlotOffset(g, header.sender, header.seq) + 64;
    wr.wr.rdma.rkey = remotes_[receiver].rkey;
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(qps_[receiver], &wr, &bad) != 0) return VerbsError("ibv_post_send");
    ibv_wc wc{};
    while (true) {  // the staging buffer is reused by the next send: wait for this write's completion
      int n = ibv_poll_cq(device_->cq(), 1, &wc);
      if (n < 0) return VerbsError("ibv_poll_cq");
      if (n == 1) break;
      if (Clock::now() >= deadline) {
        return Error(Code::kDeadlineExceeded, "M2N verbs write to receiver " + std::to_string(receiver) +
                                                  " did not complete in time");
      }
    }
    if (wc.status != IBV_WC_SUCCESS) {
      return Error(Code::kUnavailable, std::string("M2N verbs write failed: ") + ibv_wc_status_str(wc.status));
    }
    return Status::Ok();
  }

 private:
  VerbsSpec vspec_;
  std::unique_ptr<Device> device_;
  uint64_t stride_ = 0;
  uint8_t* staging_ = nullptr;
  uint64_t* credits_ = nullptr;  // one 64-byte line per receiver: its consumed count, written remotely
  ibv_mr* staging_mr_ = nullptr;
  ibv_mr* credits_mr_ = nullptr;
  std::vector<ibv_qp*> qps_;
  std::vector<uint32_t> psns_;
  std::vector<ConnInfo> remotes_;
};

EndpointSpec Plain(const VerbsSpec& v) {
  EndpointSpec spec;
  spec.transport = "verbs";
  spec.index = v.index;
  spec.num_peers = v.num_peers;
  spec.depth = v.depth;
  spec.capacity = v.capacity;
  spec.timeout_s = v.timeout_s;
  return spec;
}

}  // namespace

bool Compiled() { return true; }

Status ListDevices(std::vector<std::string>* names) {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr || n == 0) {
    if (list != nullptr) ibv_free_device_list(list);
    return Error(Code::kUnavailable, "no RDMA device");
  }
  for (int i = 0; i < n; ++i) {
    if (names != nullptr) names->push_back(ibv_get_device_name(list[i]));
  }
  ibv_free_device_list(list);
  return Status::Ok();
}

Status OpenVerbsReceiver(const VerbsSpec& spec, std::unique_ptr<RecvEndpoint>* out, Connectable** connect) {
  auto endpoint = std::make_unique<VerbsReceiver>(Plain(spec), spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *connect = endpoint.get();
  *out = std::move(endpoint);
  return Status::Ok();
}

Status OpenVerbsSender(const VerbsSpec& spec, std::unique_ptr<SendEndpoint>* out, Connectable** connect) {
  auto endpoint = std::make_unique<VerbsSender>(Plain(spec), spec);
  if (Status s = endpoint->Open(); !s.ok()) return s;
  *connect = endpoint.get();
  *out = std::move(endpoint);
  return Status::Ok();
}

}  // namespace m2n::verbs
