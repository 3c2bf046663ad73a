"""A node in a process of its own: `python -m msjax.runtime.node_process --spec FILE`, started by the runner
(`msjax.runtime.processes`) with a `NodeSpec` (`msjax.comm.wire` bytes, deleted once read).

It loads its weights (from the checkpoint, reading only its own tensors, or from a weights file the runner
wrote), opens its endpoints through the deployment's rendezvous, says it is ready, then serves the requests of
its control channel one at a time with the same node object the runner's process would hold
(`msjax.runtime.nodes`): a request it cannot decode, or one that fails, is answered with `Failed` and the node
serves on; `Stop` ends it; so does the runner's process going away (then it removes the run's shared memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def _log(spec, msg: str) -> None:
    print(f"[{spec.role} node {spec.index} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def parent_alive(pid: int) -> bool:
    """Whether the runner's process still runs (a zombie does not: its parent has not reaped it yet)."""
    if os.getppid() != pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_weights(path: str) -> list:
    """The arrays of a `Weights` file, which is deleted once read (it may be large)."""
    from msjax.comm import wire
    try:
        weights = wire.decode(Path(path).read_bytes())
    finally:
        Path(path).unlink(missing_ok=True)
    return list(weights.arrays)


def module_from_arrays(make, arrays: list):
    """The module `make()` builds, its weights from `arrays` (tree order) instead of an initialiser."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    treedef = jax.tree.structure(abstract)
    if len(arrays) != treedef.num_leaves:
        raise ValueError(f"{len(arrays)} weight arrays for {treedef.num_leaves} leaves")
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in arrays]))


def attention_weights(spec):
    """(graphdef, state) of the attention role: from the checkpoint, else from the spec's weights file."""
    import jax.numpy as jnp
    from flax import nnx

    from msjax.models.modules import AttentionRole
    dtype = jnp.dtype(spec.dtype)
    if spec.checkpoint:
        from msjax.checkpoint import load_attention_role
        module = load_attention_role(spec.checkpoint, spec.model, dtype=dtype)
    elif spec.weights:
        module = module_from_arrays(lambda: AttentionRole(spec.model, dtype=dtype, rngs=nnx.Rngs(0)),
                                    read_weights(spec.weights))
    else:
        raise ValueError("the node spec names neither a checkpoint nor a weights file")
    module.kernels = spec.kernels
    return nnx.split(module)


def expert_weights(spec):
    """The expert node's weight source: experts -> (graphdef, state), from a weights file the runner wrote
    when there is one, else from the checkpoint (only those experts' tensors are read)."""
    import jax.numpy as jnp
    from flax import nnx

    from msjax.models.modules import ExpertRole
    dtype = jnp.dtype(spec.dtype)

    def load(experts: tuple[int, ...], weights_file: str | None):
        if weights_file:
            module = module_from_arrays(lambda: ExpertRole(spec.model, expert_ids=experts, dtype=dtype,
                                                           rngs=nnx.Rngs(0)), read_weights(weights_file))
        elif spec.checkpoint:
            from msjax.checkpoint import load_expert_role
            module = load_expert_role(spec.checkpoint, spec.model, expert_ids=experts, dtype=dtype)
        else:
            raise ValueError(f"no checkpoint to read experts {list(experts)} from, and no weights file")
        module.kernels = spec.kernels
        return nnx.split(module)
    return load


def build_node(spec, rendezvous):
    """The node `spec` describes, its endpoints open and connected, its readiness published."""
    import jax

    from msjax.comm.endpoints import channel_run, key, node_endpoints
    from msjax.runtime.nodes import AttentionNode, ExpertNode
    t = spec.topology
    devices = jax.devices()[:spec.tp]
    if len(devices) < spec.tp:
        raise RuntimeError(f"{spec.role} node {spec.index} needs {spec.tp} devices, this process has "
                           f"{len(devices)} ({jax.default_backend()})")
    if spec.role == "attention":
        graphdef, state = attention_weights(spec)  # before the endpoints: loading is the slow part
    endpoints = node_endpoints(t, rendezvous, spec.role, spec.index, remote=True)
    try:
        endpoints.connect()
        if spec.role == "attention":
            node = AttentionNode(spec.index, spec.model, spec.engine, graphdef, state, devices, endpoints,
                                 spec.placement, spec.dtype)
        else:
            node = ExpertNode(spec.index, spec.model, spec.placement[spec.index], devices, endpoints, spec.dtype,
                              expert_weights(spec), spec.weights)
    except BaseException:
        endpoints.close()
        raise
    rendezvous.set(key(channel_run(t), "ready", spec.role, spec.index), "1")
    return node


def serve(spec, parent: int) -> int:
    """Build the node, then answer requests until Stop (0) or until the runner's process is gone (3)."""
    from msjax.comm import native, wire
    from msjax.comm.rendezvous import RendezvousClient
    from msjax.runtime import protocol as p

    t = spec.topology
    rendezvous = RendezvousClient(t.rendezvous, token=t.token, timeout_s=t.startup_timeout_s)
    try:
        node = build_node(spec, rendezvous)
    finally:
        rendezvous.close()
    control, reply_to = node.endpoints.receivers["control"], node.endpoints.senders["reply"]
    _log(spec, f"ready over {t.transport}" + (f" with experts {list(node.experts)}" if spec.role == "expert" else ""))
    code = 0
    while True:
        raw = _next_request(control, parent)
        if raw is None:
            _log(spec, "the runner's process is gone; exiting")
            code = 3
            break
        what, reply = _answer(node, raw, p, wire, spec)
        data = wire.encode(reply)
        if len(data) > reply_to.capacity:
            data = wire.encode(p.Failed(f"a reply of {len(data)} bytes exceeds the reply channel's "
                                        f"{reply_to.capacity}"))
        try:
            reply_to.send(0, data)
        except native.M2NError as err:
            _log(spec, f"cannot answer the runner ({err}); exiting")
            code = 3
            break
        if what == "exit":
            _log(spec, f"the step failed mid-exchange ({reply.error}); exiting so that the peers see it")
            code = 4
            break
        if what == "stop":
            break
    node.close()
    _log(spec, "stopped")
    return code


def _next_request(control, parent: int) -> bytes | None:
    """The next request on the control channel, waited for in 1 s rounds, sleeping (not polling) between steps;
    None once the runner's process is gone."""
    from msjax.comm import native
    while True:
        try:
            with native.thread_poll_us(0):
                return control.recv(0, timeout_s=1.0)
        except native.M2NTimeout:
            if not parent_alive(parent):
                return None


def rewire(node, spec, generation: int) -> None:
    """Move `node`'s packet channels to `generation` through the deployment's rendezvous (`p.Rewire`)."""
    import dataclasses

    from msjax.comm.endpoints import packet_endpoints
    from msjax.comm.rendezvous import RendezvousClient
    t = dataclasses.replace(spec.topology, generation=generation)
    rendezvous = RendezvousClient(t.rendezvous, token=t.token, timeout_s=t.startup_timeout_s)
    try:
        packets = packet_endpoints(t, rendezvous, spec.role, spec.index)
        try:
            packets.connect()
        except BaseException:
            packets.close()
            raise
    finally:
        rendezvous.close()
    node.rewire(packets)


def _answer(node, raw: bytes, p, wire, spec) -> tuple[str, object]:
    """(what next, reply) for one raw request: "serve" on, "stop" (a Stop request), or "exit" — a step that
    failed after its first program was dispatched has left the packet channels out of step, and the node's
    peers would wait out their timeouts for messages that never come; exiting lets them see it at once."""
    try:
        request = wire.decode(raw)
    except wire.ProtocolError as err:
        return "serve", p.Failed(f"malformed request: {err}")
    if isinstance(request, p.Stop):
        return "stop", p.Ok()
    if isinstance(request, p.Rewire):
        try:
            rewire(node, spec, request.generation)
        except Exception as err:  # noqa: BLE001 - its old channels are gone or half-replaced: end the node
            return "exit", p.Failed(f"rewire to generation {request.generation} failed: {type(err).__name__}: {err}")
        return "serve", p.Ok()
    dispatched = False
    try:
        if isinstance(request, p.STEP_REQUESTS):
            steps = node.step(request)
            next(steps)  # checks the request; dispatches nothing yet
            dispatched = True
            try:
                while True:
                    next(steps)
            except StopIteration as done:
                return "serve", node.result(done.value)
        return "serve", node.result(node.control(request))
    except Exception as err:  # noqa: BLE001 - reported to the runner, which decides
        return "exit" if dispatched else "serve", p.Failed(f"{type(err).__name__}: {err}")


def remove_orphaned_segments(spec) -> None:
    """The runner's process died without closing: unlink the run's shared-memory segments (the run's name is
    unique; the other node processes are on their way out too and keep their mappings until they exit)."""
    if spec.topology.transport != "shm":
        return
    for segment in Path("/dev/shm").glob(f"msjax-m2n-{spec.topology.run}-*"):
        segment.unlink(missing_ok=True)


def main(argv=None) -> int:
    from msjax.comm import wire
    parser = argparse.ArgumentParser(prog="python -m msjax.runtime.node_process")
    parser.add_argument("--spec", required=True, help="the node's NodeSpec, written by the runner")
    args = parser.parse_args(argv)
    spec = wire.decode(Path(args.spec).read_bytes())
    os.unlink(args.spec)
    parent = os.getppid()
    try:
        return serve(spec, parent)
    finally:
        if not parent_alive(parent):  # the runner died without closing: remove what it would have
            remove_orphaned_segments(spec)
            shutil.rmtree(os.path.dirname(args.spec), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
