"""Multi-process deployment on one host: expert nodes (and with attention_processes, attention nodes) as node
processes, packets through the native M2N library's custom calls inside the nodes' layer programs (shm and tcp),
control through typed messages; greedy outputs identical to the single-process run, clear errors when a node
process fails to start, dies or gets a malformed request, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from msjax import SamplingParams
from msjax.comm import native
from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.engine import Engine
from msjax.errors import ConfigError
from msjax.models.programs import MoEModel
from msjax.runtime import protocol as p
from msjax.runtime.runner import make_runner
from tests.model_utils import assert_same_outputs, run_requests, run_segments, tiny_config

# hard limits: every M2N wait times out (60 s), start-up gives up after 120 s, subprocesses are waited with a timeout
pytestmark = pytest.mark.skipif(not native.is_built(), reason="native M2N library not built")

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(page_size=8, num_pages=24, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96)
_CACHE: dict = {}


def _model() -> MoEModel:
    if "model" not in _CACHE:
        _CACHE["model"] = MoEModel.random(tiny_config(), seed=0)
    return _CACHE["model"]


def _requests():
    rng = np.random.default_rng(1)
    return [(f"r{i}", rng.integers(0, 61, size=n).tolist(),
             SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True))
            for i, n in enumerate([3, 9, 12])]  # few shapes: compiles dominate on a CPU


def _reference():
    if "ref" not in _CACHE:
        _CACHE["ref"] = run_requests(Engine(_model(), EngineConfig(**OPTIONS)), _requests())
    return _CACHE["ref"]


def _schedule(compiled_hlo: str) -> list[str]:
    """The order XLA scheduled a layer program's main computation in, as a list of: route (a micro-batch's
    router top-k, inside its attention), send / recv (m2n calls, a run of them to every expert node counted
    once)."""
    entry = compiled_hlo[compiled_hlo.index("\nENTRY "):]
    kinds = []
    for line in entry.splitlines():
        kind = ("send" if 'custom_call_target="m2n_send"' in line else
                "recv" if 'custom_call_target="m2n_recv_all"' in line else
                "route" if "router/top_k" in line and "custom-call(" in line else None)
        if kind and (not kinds or kinds[-1] != kind):
            kinds.append(kind)
    return kinds


def _local_attention_nodes(runner):
    return [node for (role, _), node in runner.local.nodes.items() if role == "attention"]


def _check_generation(plan: DeploymentPlan, *, check_hlo: bool = False):
    want = _reference()
    before = run_segments()
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=plan)
    runner = engine.runner
    procs = list(runner.processes)
    seen = []
    try:
        assert type(runner).__name__ == "NodeRunner" and all(proc.alive() for proc in procs)
        assert sorted(proc.name for proc in procs) == sorted(
            [f"expert node {e}" for e in range(plan.expert_nodes)]
            + [f"attention node {a}" for a in range(plan.attention_nodes) if plan.attention_processes])
        local = _local_attention_nodes(runner)
        assert len(local) == (0 if plan.attention_processes else plan.attention_nodes)
        for node in local:  # tensor parallelism inside the node: its KV heads over its devices
            assert len(node.kv.k.sharding.device_set) == plan.attention_tp
        step = runner.step
        runner.step = lambda batches: (seen.append(batches), step(batches))[1]
        got = run_requests(engine, _requests())
        assert_same_outputs(got, want)
        assert engine.num_free_pages() == engine.num_total_pages()
        # every valid row routed to top_k experts in every layer, counted on whichever node ran it, read once
        rows = sum(int((b.positions >= 0).sum()) for step in seen for node in step for b in node)
        cfg = tiny_config()
        assert runner.expert_load().sum() == cfg.num_layers * cfg.top_k * rows
        assert runner.expert_load().sum() == 0
        if plan.attention_nodes > 1:  # both attention nodes had work (the engine spreads requests)
            assert all(any(step[a] for step in seen) for a in range(plan.attention_nodes))
        if local:  # one compile per step signature, whatever the depth (one layer program for every layer)
            signatures = {tuple((b.tokens.shape, b.page_table.shape, b.decode, b.num_logprobs) for b in step[0])
                          for step in seen if step[0]}
            for program in (local[0].programs.first, local[0].programs.layer, local[0].programs.head):
                assert program._cache_size() == len(signatures)
        if check_hlo:  # the data path is inside the program: the layer program holds both custom calls
            from msjax.runtime import step_inputs
            request = lambda node: p.AttentionStep(0, tuple(step_inputs.pack(b) for b in node))  # noqa: E731
            text = local[0].lower(request(seen[0][0]))
            assert "m2n_send" in text and "m2n_recv_all" in text
            step = max(seen, key=lambda s: len(s[0]))[0]  # a step with the most micro-batches
            scheduled = _schedule(local[0].lower(request(step), compiled=True))
            # paper §4.1's order: each micro-batch's receive, attention and send in turn, so the experts work on
            # micro-batch i while micro-batch i+1 is in attention
            assert scheduled == ["recv", "route", "send"] * len(step), scheduled
    finally:
        engine.close()
    assert all(proc.returncode == 0 for proc in procs), [proc.returncode for proc in procs]  # stopped cleanly
    assert run_segments() <= before


def test_step_inputs_pack_into_two_arrays_and_back():
    from msjax.runtime.step_inputs import StepBatch, layout, pack, unpack
    rng = np.random.default_rng(0)
    ints = lambda *shape: rng.integers(-5, 1000, size=shape).astype(np.int32)  # noqa: E731
    b = StepBatch(True, 0, ints(6), ints(6), ints(6), ints(4, 3), ints(4), rng.random(4, np.float32),
                  rng.random(4, np.float32), ints(4), rng.integers(0, 2**32, size=4, dtype=np.uint32), ints(4))
    mb = pack(b)
    assert mb.ints.dtype == np.int32 and mb.floats.dtype == np.float32 and layout(mb) == (6, 4, 3, True, 0)
    tokens, batch, logit_rows, temperature, top_p, top_k, seeds, steps = unpack(
        jnp.asarray(mb.ints), jnp.asarray(mb.floats), layout(mb))
    for got, want in [(tokens, b.tokens), (batch.positions, b.positions), (batch.seq_ids, b.seq_ids),
                      (batch.page_table, b.page_table), (logit_rows, b.logit_rows), (temperature, b.temperature),
                      (top_p, b.top_p), (top_k, b.top_k), (seeds, b.seeds), (steps, b.steps)]:
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), want)


@pytest.mark.slow  # full suite only (the quick subset keeps node processes through the worker-death test)
def test_shm_one_expert_node_one_micro_batch():
    _check_generation(DeploymentPlan(1, 1, 1, 1, 1, transport="shm"), check_hlo=True)


@pytest.mark.slow  # the quick subset stays under 5 minutes (tcp: test_more_plans in the full suite)
def test_tcp_two_expert_nodes_two_micro_batches():
    _check_generation(DeploymentPlan(1, 1, 2, 1, 2, transport="tcp"), check_hlo=True)


@pytest.mark.slow  # the quick subset stays under 5 minutes
def test_tensor_parallel_nodes_shm():
    """tp = 3 inside both nodes (two attention nodes here on three of the engine's devices each, the expert node
    a process with three): each node's program runs SPMD over its devices and sends one message per packet;
    both tensor-parallel attention nodes share the engine's process (their programs dispatched in phase
    order: neither waits on a program not yet dispatched)."""
    _check_generation(DeploymentPlan(2, 3, 1, 3, 2, transport="shm"))


@pytest.mark.slow  # the quick subset stays under 5 minutes
def test_attention_nodes_as_processes_shm():
    """Every node a process (two attention, two expert): the engine's process only schedules."""
    _check_generation(DeploymentPlan(2, 1, 2, 1, 2, transport="shm", attention_processes=True))


@pytest.mark.slow
@pytest.mark.parametrize("plan", [DeploymentPlan(1, 1, 2, 1, 2, transport="shm"),
                                  DeploymentPlan(1, 1, 1, 1, 1, transport="tcp"),
                                  DeploymentPlan(2, 1, 2, 1, 2, transport="shm"),
                                  DeploymentPlan(2, 1, 3, 1, 1, transport="tcp"),
                                  DeploymentPlan(2, 1, 3, 1, 2, transport="tcp", attention_processes=True),
                                  DeploymentPlan(1, 1, 2, 1, 3, transport="shm", attention_processes=True),
                                  DeploymentPlan(2, 3, 2, 3, 2, transport="tcp", attention_processes=True),
                                  DeploymentPlan(1, 1, 2, 1, 4, transport="shm")],
                         ids=["shm-1-2-2", "tcp-1-1-1", "shm-2a-2-2", "tcp-2a-3-1", "tcp-2ap-3-2", "shm-1ap-2-3",
                              "tcp-2ap-tp3-2-tp3", "shm-1-2-4"])
def test_more_plans(plan):
    _check_generation(plan)


@pytest.mark.slow
@pytest.mark.parametrize("attention_processes", [False, True], ids=["attention-here", "attention-processes"])
def test_rebalance_between_steps_moves_experts_across_processes(monkeypatch, attention_processes):
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=DeploymentPlan(
        1, 1, 2, 1, 2, transport="shm", attention_processes=attention_processes))
    runner = engine.runner
    procs, old = list(runner.processes), runner.placement
    new = ((3, 4, 0), (0, 1, 2))  # both nodes change; expert 0 gets a replica on each
    assert old != new
    real = MoEModel.expert_subset
    calls = []

    def before_step(step):
        calls.append(step)
        if step == 1:  # after the prefill: every request has KV in the cache
            # node 0 cannot load (weights of the wrong structure): node 1, which could, goes back, and the
            # runner keeps its placement
            monkeypatch.setattr(MoEModel, "expert_subset", lambda model, experts: (
                (None, {"w": np.zeros(1)}) if experts == new[0] else real(model, experts)))
            with pytest.raises(ConfigError, match="expert node 0 cannot load"):
                runner.set_placement(new)
            monkeypatch.setattr(MoEModel, "expert_subset", real)
            assert runner.placement == old
            runner.set_placement(new)
            assert runner.placement == new
        if step == 2:
            placement = engine.rebalance(redundancy=1)
            assert runner.placement == placement.nodes
    try:
        got = run_requests(engine, _requests(), before_step=before_step)
        assert 2 in calls
        assert_same_outputs(got, _reference())
        assert engine.num_free_pages() == engine.num_total_pages()
    finally:
        engine.close()
    assert all(proc.returncode == 0 for proc in procs), [proc.returncode for proc in procs]


@pytest.mark.slow
def test_worker_that_fails_to_start_is_a_clear_error():
    from msjax.runtime.hosts import WorkerError
    before = run_segments()
    start = time.monotonic()
    with pytest.raises(WorkerError, match="expert node 0 .* exited with code 1"):
        make_runner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 1, 1, 1, 1, transport="shm"),
                    checkpoint="/nonexistent/checkpoint", startup_timeout_s=60)
    assert time.monotonic() - start < 30
    assert run_segments() <= before


@pytest.mark.parametrize("transport", ["shm", pytest.param("tcp", marks=pytest.mark.slow)])
def test_attention_process_death_mid_step_is_a_clear_error(transport):
    """An attention process killed before a step (its requests' KV caches die with it): the step fails within
    seconds with an error naming that node, and every other process stops. With the runner's own liveness checks
    off, the exchange itself notices (the control channel). An expert node's death is survived instead:
    tests/test_expert_faults.py."""
    from msjax.runtime.hosts import WorkerError
    before = run_segments()
    plan = DeploymentPlan(2, 1, 2, 1, 1, transport=transport, attention_processes=True)
    runner = make_runner(_model(), EngineConfig(**OPTIONS), plan, timeout_s=60)
    try:
        engine = Engine(_model(), EngineConfig(**OPTIONS), plan=plan, runner=runner)
        for i in range(plan.attention_nodes):  # work for every attention node
            engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
        proc = runner.processes.procs["attention", 1]
        os.kill(proc.pid, signal.SIGKILL)  # node 0 lives on; the runner must name node 1
        proc.proc.wait(10)
        assert not runner.health().healthy and "attention node 1 exited" in runner.health().detail
        runner._recover = runner.links.check = lambda *args: None  # the exchange itself must notice
        start = time.monotonic()
        with pytest.raises(WorkerError, match="attention node 1 .*exited"):
            engine.step()
        assert time.monotonic() - start < 20  # not the 60 s exchange timeout
        assert runner.closed and not runner.health().healthy
    finally:
        runner.close()
    assert all(not proc.alive() for proc in runner.processes)
    assert run_segments() <= before


@pytest.mark.slow
def test_attention_process_death_between_steps_closes_the_deployment():
    """An attention process dies between steps and the engine asks the nodes for their expert load: the read
    fails within seconds naming the node (the runner's liveness check while it waits for the reply), and every
    other process stops; the runner refuses further use."""
    from msjax.runtime.hosts import WorkerError
    before = run_segments()
    plan = DeploymentPlan(2, 1, 1, 1, 1, transport="shm", attention_processes=True)
    runner = make_runner(_model(), EngineConfig(**OPTIONS), plan, timeout_s=60)
    try:
        victim = runner.processes.procs["attention", 1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(10)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="attention node 1 .*exited.*-9"):
            runner.expert_load()
        assert time.monotonic() - start < 20 and runner.closed
        with pytest.raises(WorkerError, match="closed"):
            runner.expert_load()
    finally:
        runner.close()
    assert all(not proc.alive() for proc in runner.processes)
    assert run_segments() <= before


@pytest.mark.slow  # full suite only: the quick subset stays under 5 minutes
def test_a_malformed_request_gets_an_error_reply_and_the_node_serves_on():
    """Garbage bytes, a request of another protocol version, one for the other role and one with arrays of the
    wrong size, each sent to a live node process: each gets a Failed reply naming the problem, and the
    deployment then generates exactly as before."""
    from msjax.comm import wire
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=DeploymentPlan(1, 1, 1, 1, 1, transport="shm",
                                                                           attention_processes=True))
    runner = engine.runner
    links, expert, attention = runner.links, ("expert", 0), ("attention", 0)
    try:
        import msgpack
        bad = {"garbage": (expert, b"\x00not a message"),
               "version": (expert, msgpack.packb({"v": 99, "t": "Ping", "b": {}})),
               "unknown type": (expert, msgpack.packb({"v": wire.VERSION, "t": "Exec", "b": {}})),
               "wrong role": (expert, wire.encode(p.ReadLoad())),
               "bad field": (expert, msgpack.packb({"v": wire.VERSION, "t": "ExpertStep",
                                                    "b": {"step": "one", "rounds": []}})),
               "bad sizes": (attention, wire.encode(p.AttentionStep(1, (p.MicroBatch(
                   np.zeros(3, np.int32), np.zeros(2, np.float32), 4, 1, 1, True, 0),))))}
        want = {"garbage": "malformed request", "version": "protocol version 99",
                "unknown type": "unknown message type 'Exec'", "wrong role": "does not take ReadLoad",
                "bad field": "ExpertStep.step: expected an integer", "bad sizes": "ints must be int32"}
        for name, (node, raw) in bad.items():
            links.senders[node].send(0, raw)
            reply = links.reply(node, wait_s=30)
            assert isinstance(reply, p.Failed) and want[name] in reply.error, (name, reply)
        links.submit(expert, p.Ping())
        assert links.reply(expert) == p.Pong("expert", 0, 0, tuple(range(tiny_config().num_experts)))
        assert_same_outputs(run_requests(engine, _requests()), _reference())
    finally:
        engine.close()
    assert all(proc.returncode == 0 for proc in runner.processes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packet_bytes_roundtrip(dtype):
    import jax.numpy as jnp

    from msjax.comm.wire import pack_rows, row_bytes, unpack_rows
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), dtype)
    ids = jnp.array([0, 3, 1, 7, 2, 2], jnp.int32)
    buf = pack_rows(rows, ids)
    assert buf.dtype == jnp.uint8 and buf.shape == (6, row_bytes(5, dtype))
    back, back_ids = unpack_rows(buf, 5, dtype)
    assert back.dtype == rows.dtype and bool((back == rows).all()) and bool((back_ids == ids).all())


def test_plan_transport_errors():
    import jax
    with pytest.raises(ConfigError, match=r"needs 6 devices in this process \(the expert nodes are processes\), "
                                          "only 2 exist"):
        make_runner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(2, 3, 1, 1, 1, transport="shm"),
                    devices=jax.devices()[:2])
    with pytest.raises(ConfigError, match="expert_tp: 5 does not divide"):
        make_runner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 1, 1, 5, 1, transport="shm"))
    for plan in (DeploymentPlan(1, 1, 1, 1, 1, attention_processes=True),
                 DeploymentPlan(colocated_devices=1, transport="shm", attention_processes=True)):
        with pytest.raises(ConfigError, match="attention_processes.*transport 'shm', 'tcp' or 'rdma'"):
            Engine(_model(), EngineConfig(**OPTIONS), plan=plan)


def test_an_rdma_plan_names_the_missing_verbs_device():
    """No RDMA device here: the plan fails when it is resolved (before any process starts), naming what is
    missing and the transports that would work."""
    import msjax
    if native.has_verbs():
        try:
            native.verbs_devices()
            pytest.skip("this machine has an RDMA device")
        except native.M2NError:
            pass
    with pytest.raises(ConfigError, match="transport: 'rdma' needs .*verbs.*transports that work here: 'auto'"):
        msjax.LLM("tiny-moe", plan=DeploymentPlan(1, 1, 2, 1, 2, transport="rdma"))


def test_plan_attention_processes_round_trips_through_toml():
    plan = DeploymentPlan(2, 1, 2, 1, 2, transport="tcp", attention_processes=True)
    assert "attention_processes = true" in plan.to_toml()
    assert DeploymentPlan.from_toml(plan.to_toml()) == plan
    with pytest.raises(ConfigError, match="attention_processes: must be true or false"):
        DeploymentPlan.from_toml('[plan]\nattention_processes = "yes"\n')


@pytest.mark.parametrize("max_model_len,max_num_seqs,micro_batches", [(96, 4, 1), (96, 4, 3), (None, 256, 2)])
def test_control_channel_holds_the_largest_step_and_reply(max_model_len, max_num_seqs, micro_batches):
    """The control channel to a node is sized from the engine's limits: the largest request (m prefill
    micro-batches of the most tokens and sequences, logprobs on; a routing table with every expert on every
    node) and the largest reply fit."""
    from msjax.comm import wire
    from msjax.config import MAX_LOGPROBS
    from msjax.runtime.deployment import channel_sizes, resolve
    from msjax.runtime.step_inputs import StepBatch, pack
    cfg = tiny_config()
    ec = EngineConfig(**{**OPTIONS, "max_model_len": max_model_len, "num_pages": 1024, "max_num_seqs": max_num_seqs,
                         "max_num_batched_tokens": 16 * max_num_seqs})
    plan = DeploymentPlan(1, 1, 2, 1, micro_batches, transport="shm", attention_processes=True)
    sizes = channel_sizes(cfg, resolve(cfg, ec, plan), 4)
    t, s = ec.max_num_batched_tokens, ec.max_num_seqs
    pages = -(-ec.resolved_max_model_len(cfg) // ec.page_size)
    i32 = lambda *shape: np.full(shape, 2**31 - 1, np.int32)  # noqa: E731
    f32 = lambda *shape: np.full(shape, 0.5, np.float32)  # noqa: E731
    big = StepBatch(False, MAX_LOGPROBS, i32(t), i32(t), i32(t), i32(s, pages), i32(s), f32(s), f32(s), i32(s),
                    np.full(s, 2**32 - 1, np.uint32), i32(s))
    step = wire.encode(p.AttentionStep(2**62, tuple(pack(big) for _ in range(micro_batches))))
    assert len(step) <= sizes.control
    every = tuple(range(cfg.num_experts))
    routing = wire.encode(p.SetRouting((every, every), ((1 / 3,) * cfg.num_experts,) * 2))
    assert len(routing) <= sizes.control
    reply = wire.encode(p.StepDone(2**62, tuple(p.SampledTokens(i32(s), f32(s), i32(s, MAX_LOGPROBS),
                                                                f32(s, MAX_LOGPROBS)) for _ in range(micro_batches))))
    assert len(reply) <= sizes.reply
    assert sizes.control < 2 * len(step) + (1 << 16)  # sized from the limits, not an arbitrary ceiling


@pytest.mark.slow
def test_launch_generates_like_the_single_process_engine(tmp_path):
    """Every node a process (--attention-processes), the weights read from the checkpoint by each node."""
    plan = tmp_path / "plan.toml"
    DeploymentPlan(2, 1, 2, 1, 2, transport="tcp").save(plan)
    out = subprocess.run([sys.executable, "-m", "msjax.launch", "--plan", str(plan), "--model", "tiny-moe",
                          "--prompt-ids", "1,2,3,4", "--prompt-ids", "5,6", "--max-tokens", "5", "--json",
                          "--attention-processes"], capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 attention process(es), 2 expert process(es) over tcp" in out.stderr
    import json

    from msjax.loading import load
    got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    model = load("tiny-moe")
    engine = Engine(model, EngineConfig(page_size=16, num_pages=64, max_num_seqs=8, max_num_batched_tokens=64))
    want = run_requests(engine, [("r0", [1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0.0)),
                                 ("r1", [5, 6], SamplingParams(max_tokens=5, temperature=0.0))])
    assert [g["token_ids"] for g in got] == [want["r0"][0], want["r1"][0]]


ENGINE = """
import sys, time
from msjax.config import DeploymentPlan, EngineConfig
from msjax.models.programs import MoEModel
from msjax.runtime.runner import make_runner
from tests.model_utils import tiny_config
config = EngineConfig(page_size=8, num_pages=24, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96)
plan = DeploymentPlan(1, 1, 2, 1, 1, transport=sys.argv[1], attention_processes=sys.argv[2] == "1")
r = make_runner(MoEModel.random(tiny_config()), config, plan)
print(" ".join(str(p.pid) for p in r.processes), r.run_name, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("transport,attention_processes", [("shm", False), ("tcp", False), ("shm", True)])
def test_workers_exit_and_clean_up_when_the_engine_is_killed(transport, attention_processes):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, transport, str(int(attention_processes))],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    pids = []
    try:
        line = engine.stdout.readline().split()  # blocks until the workers are up (start-up times out itself)
        assert line, "the engine process did not start its workers"
        pids, channel = [int(p) for p in line[:-1]], line[-1]
        engine.kill()
        engine.wait(10)
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p) for p in pids), "node processes outlived the engine"
        time.sleep(0.5)
        assert not list(Path("/dev/shm").glob(f"msjax-m2n-{channel}-*"))
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_server_over_node_processes_answers_like_the_offline_engine():
    """`msjax.serve` over a plan whose every node is a process (two attention, two expert, shm): HTTP completions
    from two concurrent clients equal the single-process engine's greedy text, the expert-load metric moves (read
    from the attention processes over their control channel), and stopping the server stops every process."""
    import concurrent.futures

    import msjax
    from serving.metrics import parse
    from tests.serving_utils import http, poll
    plan = DeploymentPlan(2, 1, 2, 1, 2, transport="shm", attention_processes=True)
    options = dict(max_num_seqs=4, num_pages=48, page_size=16, max_num_batched_tokens=64, max_model_len=128)
    prompts = ["Beautiful is better than", "Explicit is"]
    llm = msjax.LLM("tiny-moe", **options)  # one process, one program
    want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    del llm
    before = run_segments()
    srv = msjax.serve(msjax.ServeConfig(plan=plan, grpc_port=0, http_port=0, engine=options, warmup=False))
    runner = srv.engine.runner
    procs = list(runner.processes)
    try:
        assert len(procs) == 4 and not runner.local.nodes  # the server's process holds no node

        def complete(prompt):
            return http("POST", srv.http_address + "/v1/completions",
                        {"prompt": prompt, "max_tokens": 12, "temperature": 0}, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(complete, prompts))
        assert [status for status, _ in got] == [200, 200], got
        assert [body["choices"][0]["text"] for _, body in got] == want

        def expert_tokens():
            m = parse(http("GET", srv.http_address + "/metrics")[1])
            return sum(v for k, v in m.items() if k.startswith("msjax_expert_tokens_total"))
        poll(expert_tokens, what="expert load from the attention processes")
    finally:
        srv.stop()
    assert all(not proc.alive() for proc in procs)
    assert run_segments() <= before
