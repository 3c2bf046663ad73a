"""The Python face of M2N: transports (`transports`), the native endpoints and custom calls (`native`, `node_calls`),
packets and routing (`m2n`), the rendezvous (`rendezvous`), the node endpoints of a deployment (`endpoints`) and
the wire formats (`wire`).

Submodules are imported by name (`from msjax.comm import native`): this package imports nothing by itself, so
the configuration can name transports without loading JAX or the native library.
"""
