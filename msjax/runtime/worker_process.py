"""What the node processes of a multi-process deployment share (`expert_worker`, `attention_worker`): reading
the spec the runner wrote, noticing that the engine process is gone, the rendezvous client, and cleaning up
after an engine that died without closing."""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Callable


def log(kind: str, msg: str) -> None:
    print(f"[{kind}_worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def alive(pid: int) -> bool:
    """Whether the engine process still runs (a zombie does not: its parent has not reaped it yet)."""
    if os.getppid() != pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def remove_orphaned_segments(spec: dict) -> None:
    """The engine died without closing: unlink every shm segment of its run (the names are unique per run;
    the other node processes are on their way out too and keep their mappings until they exit)."""
    if spec["transport"] != "shm":
        return
    for seg in Path("/dev/shm").glob(f"msjax-m2n-{spec['channel']}-*"):
        try:
            seg.unlink()
        except OSError:
            pass


def main(argv, serve: Callable[[dict, int], int]) -> int:
    """`python -m msjax.runtime.<kind>_worker --spec FILE`: load the pickled spec (deleted at once: it may hold
    this node's weights) and run `serve(spec, engine_pid)`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="pickled node spec written by MultiProcessRunner")
    args = parser.parse_args(argv)
    with open(args.spec, "rb") as f:
        spec = pickle.load(f)
    os.unlink(args.spec)
    parent = os.getppid()
    try:
        return serve(spec, parent)
    finally:
        if not alive(parent):  # the engine died without closing: remove what it would have
            remove_orphaned_segments(spec)
            shutil.rmtree(os.path.dirname(args.spec), ignore_errors=True)


def next_message(rx, parent: int, kind: str, **tag) -> bytes | None:
    """The next control message on `rx` from sender 0 (the engine's side), waited for in 1 s rounds; None once
    the engine process is gone (the node should exit)."""
    from msjax.comm import native
    while True:
        try:
            return rx.recv(0, timeout_s=1.0, **tag)
        except native.M2NTimeout:
            if not alive(parent):
                log(kind, "engine process is gone; exiting")
                return None


def rendezvous_client(spec: dict):
    """A connected client of the runner's JAX coordination service (used only as a key-value store)."""
    from jax._src.lib import _jax
    errors = []
    client = _jax.get_distributed_runtime_client(
        spec["coordinator"], spec["client_id"], init_timeout=int(spec["startup_timeout_s"]), shutdown_timeout=5,
        shutdown_on_destruction=False, missed_heartbeat_callback=lambda *a: errors.append(a))
    client.connect()
    return client


def end_rendezvous(client) -> None:
    try:
        client.shutdown()
    except Exception:  # noqa: BLE001 - the engine may have closed the service already: rendezvous is over
        pass


def module_from_leaves(make: Callable, leaves: list):
    """The module `make()` builds, its weights from `leaves` (arrays in tree order) instead of an initialiser:
    how a node gets its weights from the runner when there is no checkpoint to read."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    treedef = jax.tree.structure(abstract)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(f"{len(leaves)} weight arrays for {treedef.num_leaves} leaves")
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]))
