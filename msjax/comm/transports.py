"""Transport names, defined once, and how a plan's transport resolves to a native M2N transport.

A `DeploymentPlan` names where its nodes run and how they talk:

    auto, inprocess   every node in the engine's process     -> native "loopback" (process-private memory)
    shm               expert nodes (and, with attention_processes, attention nodes) as processes on this host
                                                             -> native "shm"
    tcp               as shm, over sockets (also across hosts) -> native "tcp"
    rdma              as tcp, over RDMA verbs               -> native "verbs" (needs an RDMA device)

Every placement uses the same node programs and the same m2n custom calls; only the native transport differs.
"""

from __future__ import annotations

from msjax.errors import ConfigError

PLAN_TRANSPORTS = ("auto", "inprocess", "shm", "tcp", "rdma")
IN_PROCESS = ("auto", "inprocess")  # plan transports that keep every node in the engine's process
NATIVE = {"auto": "loopback", "inprocess": "loopback", "shm": "shm", "tcp": "tcp", "rdma": "verbs"}


def is_in_process(plan_transport: str) -> bool:
    return plan_transport in IN_PROCESS


def native_transport(plan_transport: str) -> str:
    """The native M2N transport a plan's transport runs on, checked against this machine: the library must be
    built, and "rdma" needs the verbs transport compiled in and an RDMA device present. Errors name what is
    missing and the transports that would work here."""
    if plan_transport not in NATIVE:
        raise ConfigError("transport", f"must be one of {', '.join(PLAN_TRANSPORTS)}, got {plan_transport!r}")
    from msjax.comm import native
    try:
        native.library()
    except native.LibraryNotBuilt as err:
        raise ConfigError("transport", f"{plan_transport!r} needs the native M2N library, which is not built "
                          f"({err}); run tools/setup.sh") from None
    name = NATIVE[plan_transport]
    if name == "verbs":
        works = "'auto' (every node in this process), 'shm' or 'tcp' (node processes)"
        if not native.has_verbs():
            raise ConfigError("transport", "'rdma' needs the verbs transport, and this build of the M2N library "
                              "has none (libibverbs-dev was missing when it was built; tools/setup.sh installs it "
                              f"and rebuilds); transports that work here: {works}")
        try:
            native.verbs_devices()
        except native.M2NError as err:
            raise ConfigError("transport", f"'rdma' needs an RDMA verbs device (an InfiniBand or RoCE NIC seen by "
                              f"libibverbs): {err}; transports that work here: {works}") from None
    return name
