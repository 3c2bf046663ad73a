// Built when libibverbs is absent: the verbs transport reports itself missing.
#include "transports/verbs.h"

namespace m2n::verbs {

bool Compiled() { return false; }

Status ListDevices(std::vector<std::string>*) {
  return Error(Code::kUnavailable,
               "no RDMA device: msjax was built without libibverbs (apt-get install libibverbs-dev)");
}

Status OpenVerbsReceiver(const VerbsSpec&, std::unique_ptr<RecvEndpoint>*, Connectable**) {
  return ListDevices(nullptr);
}

Status OpenVerbsSender(const VerbsSpec&, std::unique_ptr<SendEndpoint>*, Connectable**) {
  return ListDevices(nullptr);
}

}  // namespace m2n::verbs
