"""One attention node as its own process (`python -m msjax.runtime.attention_worker --spec FILE`), started by
`msjax.runtime.multiprocess.MultiProcessRunner(attention_processes=True)`.

It holds the node's attention weights and KV cache (`AttentionNode`), meets the engine and the expert nodes
through JAX's distributed key-value store (addresses of the M2N endpoints), then loops on commands from the
engine's process over an M2N control channel: a step's packed inputs (`node_inputs`) to run as one jitted
program that exchanges packets with the expert nodes by itself (the m2n custom calls), control messages to
forward to the expert nodes (node 0 carries those: the step's shapes, re-placements, stop), replies of the
expert nodes to read back, the expert-load counter to report. Each command gets one pickled reply: the sampled
tokens as numpy arrays, or {"error": ...}. {"stop": true} ends it.
"""

from __future__ import annotations

import pickle
import sys

from msjax.runtime import worker_process


def _log(msg: str) -> None:
    worker_process.log("attention", msg)


def main(argv=None) -> int:
    return worker_process.main(argv, serve)


def serve(spec: dict, parent: int) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from msjax.comm import native
    from msjax.models.modules import AttentionRole
    from msjax.runtime.multiprocess import AttentionNode, _forget_failed_effects

    node, n_e, transport = spec["node"], spec["expert_nodes"], spec["transport"]
    cfg, dtype = spec["config"], jnp.dtype(spec["dtype"])
    if spec.get("checkpoint"):
        from msjax.checkpoint import load_attention_role
        module = load_attention_role(spec["checkpoint"], cfg, dtype=dtype)
    else:
        module = worker_process.module_from_leaves(lambda: AttentionRole(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
                                                   spec["leaves"])
    if spec.get("kernels"):
        module.kernels = spec["kernels"]
    graphdef, state = nnx.split(module)

    # -- rendezvous: receivers first (tcp binds here), publish them, then open senders to the others' --
    client = worker_process.rendezvous_client(spec)
    prefix, timeout_s = spec["prefix"], spec["timeout_s"]
    ms = int(spec["startup_timeout_s"] * 1000)
    back = native.Receiver(transport, spec["back_address"], node, n_e, spec["back_bytes"], timeout_s=timeout_s)
    ctl = native.Receiver(transport, spec["ctl_address"], node, 1, spec["ctl_bytes"], timeout_s=timeout_s)
    client.key_value_set(f"{prefix}/back/{node}", back.address)
    client.key_value_set(f"{prefix}/ctl/{node}", ctl.address)
    dispatch = [client.blocking_key_value_get(f"{prefix}/dispatch/{e}", ms) for e in range(n_e)]
    res_address = client.blocking_key_value_get(f"{prefix}/res", ms)
    tx = native.Sender(transport, dispatch, node, spec["dispatch_bytes"], timeout_s=timeout_s)
    res = native.Sender(transport, [res_address], node, spec["res_bytes"], timeout_s=timeout_s)
    client.key_value_set(f"{prefix}/ready-attention/{node}", "1")
    worker_process.end_rendezvous(client)

    attention = AttentionNode(cfg, spec["engine_config"], graphdef, state, jax.devices()[:spec["tp"]], tx, back,
                              dtype)
    routing = spec["routing"]
    control_layer = cfg.num_layers  # control messages to the expert nodes carry a layer no packet has
    _log(f"node {node} ready over {transport}")
    while True:
        with native.thread_poll_us(0):  # between steps: sleep, leave the core to the engine's host work
            raw = worker_process.next_message(ctl, parent, "attention")
        if raw is None:
            return 3
        command = pickle.loads(raw)
        reply: dict = {}
        try:
            for e, message in command.get("control", ()):
                tx.send(e, message, layer=control_layer, micro_batch=0)
            if command.get("stop"):
                break
            routing = command.get("routing", routing)
            if "step" in command:
                reply["sampled"] = jax.tree.map(np.asarray, attention.step(command["step"], routing))
            if command.get("replies"):
                reply["replies"] = [back.recv(e, layer=control_layer, micro_batch=0) for e in command["replies"]]
            if command.get("load"):
                reply["load"] = attention.read_load()
        except Exception as err:  # noqa: BLE001 - reported to the engine, which closes the deployment
            if command.get("stop"):
                break
            _forget_failed_effects()
            reply = {"error": f"{type(err).__name__}: {err}"}
            _log(f"command failed: {reply['error']}")
        data = pickle.dumps(reply)
        if len(data) > spec["res_bytes"]:
            data = pickle.dumps({"error": f"a reply of {len(data)} bytes exceeds the channel's {spec['res_bytes']}"})
        res.send(0, data)
    for endpoint in (ctl, back, tx, res):
        endpoint.close()
    _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
