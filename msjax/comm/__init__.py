"""The Python face of M2N: how tokens are packed for expert nodes, combined on return, and moved.

In-process transport: `InProcessTransport`. Between processes: the native M2N library (ffi/) with endpoints
`Sender` / `Receiver` over shared memory or TCP, and the `m2n_send` / `m2n_recv` custom calls for jitted
programs (msjax.comm.native; the library is loaded on first use).
"""

from msjax.comm.m2n import InProcessTransport, Packet, Routing, combine_returned, pack, transport_for
from msjax.comm.native import M2NError, M2NTimeout, Receiver, Sender, m2n_recv, m2n_send

__all__ = ["InProcessTransport", "M2NError", "M2NTimeout", "Packet", "Receiver", "Routing", "Sender",
           "combine_returned", "m2n_recv", "m2n_send", "pack", "transport_for"]
