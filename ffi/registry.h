// Endpoints live in a process-wide table keyed by int64 handles, which is how a jitted program (an FFI attribute)
// and Python (ctypes) name the same endpoint.
#pragma once

#include <memory>
#include <mutex>

#include "transports/transport.h"

namespace m2n {
namespace verbs {
class Connectable;
}

struct Entry {
  std::mutex mu;  // one operation at a time per endpoint: its sequence counters are not shared-state safe
  std::unique_ptr<SendEndpoint> sender;
  std::unique_ptr<RecvEndpoint> receiver;
  verbs::Connectable* connectable = nullptr;  // verbs endpoints: queue-pair set-up, owned by sender/receiver
};

int64_t Register(std::unique_ptr<SendEndpoint> sender, std::unique_ptr<RecvEndpoint> receiver,
                 verbs::Connectable* connectable = nullptr);
std::shared_ptr<Entry> Find(int64_t handle);
bool Unregister(int64_t handle);

}  // namespace m2n
