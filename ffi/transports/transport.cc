#include "transports/transport.h"

namespace m2n {

Status SendEndpoint::Send(uint32_t receiver, uint32_t layer, uint32_t micro_batch, const void* data,
                          uint64_t nbytes, double timeout_s) {
  if (receiver >= spec_.num_peers) {
    return Error(Code::kInvalidArgument, "receiver " + std::to_string(receiver) + " out of range [0, " +
                                             std::to_string(spec_.num_peers) + ")");
  }
  if (nbytes > spec_.capacity) {
    return Error(Code::kInvalidArgument, "message of " + std::to_string(nbytes) +
                                             " bytes exceeds the slot capacity " + std::to_string(spec_.capacity));
  }
  if (lost_[receiver]) return Status::Ok();  // tolerant, and that receiver is gone: nothing to deliver
  MessageHeader header{kMessageMagic, spec_.index, layer, micro_batch, next_seq_[receiver], nbytes};
  Status status = Write(receiver, header, data, DeadlineAfter(timeout_s > 0 ? timeout_s : spec_.timeout_s));
  if (status.ok()) {
    ++next_seq_[receiver];
  } else if (tolerant_ && IsPeerLoss(status)) {
    lost_[receiver] = 1;
    return Status::Ok();
  }
  return status;
}

Status RecvEndpoint::Recv(uint32_t sender, uint32_t layer, uint32_t micro_batch, void* out, uint64_t out_capacity,
                          uint64_t* nbytes, double timeout_s) {
  return RecvAll(&sender, 1, layer, micro_batch, &out, &out_capacity, nbytes, timeout_s);
}

Status RecvEndpoint::RecvAll(const uint32_t* senders, uint32_t count, uint32_t layer, uint32_t micro_batch,
                             void* const* outs, const uint64_t* capacities, uint64_t* nbytes, double timeout_s) {
  std::vector<Status> statuses(count);
  if (!tolerant_) {
    return RecvAllOnce(senders, count, layer, micro_batch, outs, capacities, nbytes, timeout_s, statuses.data());
  }
  // Tolerant: wait again for the messages left untaken, until each has arrived or its sender is lost. Every
  // round settles at least one message (the first failure of a round is never "not taken").
  std::vector<uint32_t> pending;  // indices into senders
  for (uint32_t k = 0; k < count; ++k) {
    if (senders[k] < spec_.num_peers && lost_[senders[k]]) {
      nbytes[k] = 0;
    } else {
      pending.push_back(k);
    }
  }
  while (!pending.empty()) {
    std::vector<uint32_t> from;
    std::vector<void*> into;
    std::vector<uint64_t> caps, got(pending.size(), 0);
    for (uint32_t k : pending) {
      from.push_back(senders[k]);
      into.push_back(outs[k]);
      caps.push_back(capacities[k]);
    }
    Status first = RecvAllOnce(from.data(), static_cast<uint32_t>(pending.size()), layer, micro_batch, into.data(),
                               caps.data(), got.data(), timeout_s, statuses.data());
    bool any_failed = false;
    for (size_t j = 0; j < pending.size(); ++j) any_failed = any_failed || !statuses[j].ok();
    if (!first.ok() && !any_failed) return first;  // refused before any wait (bad index, a broken channel)
    std::vector<uint32_t> again;
    for (size_t j = 0; j < pending.size(); ++j) {
      uint32_t k = pending[j];
      const Status& status = statuses[j];
      if (status.ok()) {
        nbytes[k] = got[j];
      } else if (status.code == Code::kNotTaken) {
        again.push_back(k);
      } else if (IsPeerLoss(status)) {
        lost_[senders[k]] = 1;
        nbytes[k] = 0;
      } else {
        return status;  // a malformed message: the channel is broken, not the peer lost
      }
    }
    if (again.size() == pending.size()) return first;  // cannot happen; never loop without progress
    pending = std::move(again);
  }
  return Status::Ok();
}

Status RecvEndpoint::RecvAllOnce(const uint32_t* senders, uint32_t count, uint32_t layer, uint32_t micro_batch,
                                 void* const* outs, const uint64_t* capacities, uint64_t* nbytes, double timeout_s,
                                 Status* statuses) {
  for (uint32_t k = 0; k < count; ++k) statuses[k] = Status::Ok();
  std::vector<bool> seen(spec_.num_peers, false);
  std::vector<Expectation> expects;
  expects.reserve(count);
  for (uint32_t k = 0; k < count; ++k) {
    uint32_t sender = senders[k];
    if (sender >= spec_.num_peers) {
      return Error(Code::kInvalidArgument, "sender " + std::to_string(sender) + " out of range [0, " +
                                               std::to_string(spec_.num_peers) + ")");
    }
    if (seen[sender]) {
      return Error(Code::kInvalidArgument, "sender " + std::to_string(sender) + " named twice in one receive");
    }
    seen[sender] = true;
    if (!broken_[sender].ok()) return broken_[sender];
    expects.push_back({sender, spec_.num_peers, expected_seq_[sender], layer, micro_batch, spec_.capacity});
  }
  TakeAll(expects, outs, capacities, nbytes, DeadlineAfter(timeout_s > 0 ? timeout_s : spec_.timeout_s),
          statuses);
  Status first;
  for (uint32_t k = 0; k < count; ++k) {
    uint32_t sender = senders[k];
    Status& status = statuses[k];
    if (status.ok() || status.code == Code::kDataLoss) OnConsumed(sender, expected_seq_[sender]);
    if (status.ok()) {
      ++expected_seq_[sender];
    } else {
      nbytes[k] = kNotReceived;  // so a caller that goes on after an error knows which messages it holds
    }
    if (status.code == Code::kDataLoss) {
      broken_[sender] = Error(status.code, "channel from sender " + std::to_string(sender) +
                                               " is broken: " + status.message);
    }
    if (first.ok() && !status.ok()) first = status;
  }
  return first;
}

void RecvEndpoint::TakeAll(const std::vector<Expectation>& expects, void* const* outs, const uint64_t* capacities,
                           uint64_t* nbytes, Clock::time_point deadline, Status* statuses) {
  std::vector<size_t> all(expects.size());
  for (size_t k = 0; k < all.size(); ++k) all[k] = k;
  TakeFromSlots(expects, all, outs, capacities, nbytes, deadline, statuses);
}

void RecvEndpoint::TakeFromSlots(const std::vector<Expectation>& expects, const std::vector<size_t>& which,
                                 void* const* outs, const uint64_t* capacities, uint64_t* nbytes,
                                 Clock::time_point deadline, Status* statuses) {
  size_t i = 0;
  for (; i < which.size(); ++i) {
    size_t k = which[i];
    statuses[k] = mailbox_.Receive(expects[k], outs[k], capacities[k], &nbytes[k], deadline,
                                   peer_check(expects[k].sender));
    if (!statuses[k].ok()) break;
  }
  for (++i; i < which.size(); ++i) statuses[which[i]] = NotTaken(expects[which[i]]);
}

Status RecvEndpoint::NotTaken(const Expectation& expect) {
  return Error(Code::kNotTaken, "message seq " + std::to_string(expect.seq) + " from sender " +
                                            std::to_string(expect.sender) +
                                            " not taken: another message of the same receive failed first");
}

static Status UnknownTransport(const std::string& transport) {
  return Error(Code::kInvalidArgument,
               "unknown M2N transport '" + transport + "' (expected shm, tcp or loopback)");
}

Status OpenSender(const EndpointSpec& spec, std::unique_ptr<SendEndpoint>* out) {
  if (spec.addresses.size() != spec.num_peers) {
    return Error(Code::kInvalidArgument, "a sender needs one address per receiver: got " +
                                             std::to_string(spec.addresses.size()) + " for " +
                                             std::to_string(spec.num_peers) + " receivers");
  }
  if (spec.transport == "shm") return OpenShmSender(spec, out);
  if (spec.transport == "tcp") return OpenTcpSender(spec, out);
  if (spec.transport == "loopback") return OpenLoopbackSender(spec, out);
  return UnknownTransport(spec.transport);
}

Status OpenReceiver(const EndpointSpec& spec, std::unique_ptr<RecvEndpoint>* out) {
  if (spec.addresses.size() != 1) {
    return Error(Code::kInvalidArgument,
                 "a receiver needs exactly one address (shm, loopback: channel name; tcp: host:port)");
  }
  if (spec.num_peers == 0 || spec.num_peers > kMaxSenders) {
    return Error(Code::kInvalidArgument, "num_senders must be in [1, 256]");
  }
  if (spec.transport == "shm") return OpenShmReceiver(spec, out);
  if (spec.transport == "tcp") return OpenTcpReceiver(spec, out);
  if (spec.transport == "loopback") return OpenLoopbackReceiver(spec, out);
  return UnknownTransport(spec.transport);
}

}  // namespace m2n
