// C API of the M2N library: what Python (ctypes, msjax/comm/native.py) and the XLA FFI handlers call.
// Endpoints are named by an int64 handle (> 0). Functions return 0 on success or an m2n::Code, with a readable
// message in `err` (NUL-terminated, truncated to `err_len`).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// transport: "shm" | "tcp" | "loopback" (endpoints of one process, through private memory). addresses:
// comma-separated (sender: one per receiver; receiver: exactly one).
int m2n_open_sender(const char* transport, const char* addresses, uint32_t index, uint32_t num_receivers,
                    uint64_t capacity, double timeout_s, int64_t* handle, char* err, size_t err_len);
int m2n_open_receiver(const char* transport, const char* address, uint32_t index, uint32_t num_senders,
                      uint32_t depth, uint64_t capacity, double timeout_s, int64_t* handle, char* err,
                      size_t err_len);
int m2n_close(int64_t handle);
// The receiver's address for senders (tcp: "ip:port" actually bound; shm, loopback: the channel name).
int m2n_address(int64_t handle, char* out, size_t out_len);
int m2n_send(int64_t handle, uint32_t receiver, uint32_t layer, uint32_t micro_batch, const void* data,
             uint64_t nbytes, double timeout_s, char* err, size_t err_len);
int m2n_recv(int64_t handle, uint32_t sender, uint32_t layer, uint32_t micro_batch, void* out,
             uint64_t out_capacity, uint64_t* nbytes, double timeout_s, char* err, size_t err_len);
// One message from each of `count` distinct senders (an M2N round's share of one receiver), taken as they come:
// senders[k]'s payload into outs[k] (capacities[k] bytes), its size into nbytes[k]. Errors as m2n_recv's: the
// first failing sender's in the order given; the messages that did arrive are still consumed, and nbytes[k] is
// UINT64_MAX for each sender whose message was not received (wait again for just those).
int m2n_recv_all(int64_t handle, const uint32_t* senders, uint32_t count, uint32_t layer, uint32_t micro_batch,
                 void* const* outs, const uint64_t* capacities, uint64_t* nbytes, double timeout_s, char* err,
                 size_t err_len);
// Tolerant endpoints (the attention side of a deployment that survives an expert node's loss): a peer that is
// gone is marked lost instead of failing the call; a lost receiver's sends are dropped and a lost sender's
// messages read as 0 bytes. m2n_lost writes one flag per peer (1: lost) into `out` (n of them).
int m2n_set_tolerant(int64_t handle, int on);
int m2n_lost(int64_t handle, uint8_t* out, uint32_t n);
// Endpoint `handle` takes over the connection of endpoint `from` (of the same kind), which gets `handle`'s old
// one (close it): programs compiled against `handle` then talk over the new connection without a recompile.
// `handle` keeps its tolerance; the new connection starts with no peer lost.
int m2n_adopt(int64_t handle, int64_t from);
// Mark peer `peer` lost (the caller took it out of the deployment): no call waits for it from now on.
int m2n_mark_lost(int64_t handle, uint32_t peer);
// The header parser on its own: `bytes` (n of them) checked as the next message from `sender`.
int m2n_validate_header(const void* bytes, size_t n, uint32_t sender, uint32_t num_senders, uint64_t seq,
                        uint32_t layer, uint32_t micro_batch, uint64_t capacity, char* err, size_t err_len);
// Test hook for the receive path: writes `n` raw bytes (a header, then payload) into the slot of (sender, seq)
// of a shm or loopback receiver, as a faulty sender with the mapping would, and raises the slot's flag. Bytes beyond the
// slot are dropped (a real sender cannot write past its mapping's slot either).
int m2n_debug_inject(int64_t handle, uint32_t sender, uint64_t seq, const void* bytes, size_t n, char* err,
                     size_t err_len);
// How long the calling thread's waits poll before sleeping on the futex, in µs, overriding MSJAX_M2N_POLL_US for
// this thread only (< 0: back to the process-wide budget). Returns the previous setting (-1: process-wide).
long m2n_set_thread_poll_us(long us);
uint32_t m2n_header_bytes(void);
uint32_t m2n_message_magic(void);
int m2n_has_verbs(void);
// Verbs device discovery: 0 and the device names (comma-separated) in `out`, or kUnavailable "no RDMA device".
int m2n_verbs_devices(char* out, size_t out_len);

// Verbs set-up helpers that need no device (unit-tested): the immediate encoding, and ConnInfo parse +
// re-serialise of a blob (kConnInfoBytes), which rejects malformed connection info with a message.
uint32_t m2n_verbs_encode_imm(uint32_t sender, uint64_t seq);
// Verbs endpoints (UNVERIFIED ON HARDWARE): open, then for every peer exchange m2n_verbs_local_info blobs out of
// band and m2n_verbs_connect; then m2n_send / m2n_recv as for the other transports. kUnavailable "no RDMA
// device" where there is none.
int m2n_verbs_open(int is_sender, const char* device, uint32_t index, uint32_t num_peers, uint32_t depth,
                   uint64_t capacity, double timeout_s, int64_t* handle, char* err, size_t err_len);
int m2n_verbs_local_info(int64_t handle, uint32_t peer, char* out, size_t out_len, char* err, size_t err_len);
int m2n_verbs_connect(int64_t handle, uint32_t peer, const char* blob, size_t n, char* err, size_t err_len);
int m2n_verbs_conninfo_roundtrip(const char* blob, size_t n, char* out, size_t out_len);

#ifdef __cplusplus
}
#endif
