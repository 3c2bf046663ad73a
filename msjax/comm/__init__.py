"""The Python face of M2N: how tokens are packed for expert nodes, combined on return, and moved."""

from msjax.comm.m2n import InProcessTransport, Packet, Routing, combine_returned, pack, transport_for

__all__ = ["InProcessTransport", "Packet", "Routing", "combine_returned", "pack", "transport_for"]
